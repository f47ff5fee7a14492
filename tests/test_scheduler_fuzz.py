"""Differential fuzz of the native scheduler (haltwise.Scheduler) against the
pure-Python reference (haltwise.scheduler_reference), driven by hypothesis.

Random sequences of submit / step / cancel / report_answer / settle_group run
against both; every StepPlan, every return value or exception, the stats and
the votes must agree exactly (floats bit for bit, NaN = NaN). On every step
the invariants of the semantics are checked against a model kept here:
each request ends exactly once; no row or slot is held twice; keep is
increasing and in range; admitted rows follow the kept ones (compact); the
next batch is what keep and admitted say; a finished sequence's tokens are
exactly the tokens stepped in for it. Both layouts.

Signals come from small grids that contain the thresholds, so strict
comparisons are exercised at their boundaries, plus a huge value that
would leave a drifting window sum off; some rows hold NaN or a nonzero status. CI-deterministic: derandomize=True, no example database.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import haltwise
from haltwise import QueueFull, StopConfig, StopReason
from haltwise.scheduler_reference import ReferenceScheduler

FINISHED_FIELDS = (
    "request_id", "reason", "group", "num_tokens", "tokens", "mean_topk_conf", "mean_logprob", "mean_neg_entropy",
    "mean_signal", "min_window_mean", "last_window_mean", "last_entropy", "steps_below_threshold",
    "would_stop_step", "would_stop_reason", "signals",
)
SIGNAL_FIELDS = ("logprob", "entropy", "confidence", "margin", "topk_conf")
TOKENS = st.integers(0, 5)  # a tiny vocabulary, so EOS and stop sequences fire often
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # signal values; thresholds are drawn from the same grid
# Signal values: the grid, plus one so large that a running window sum would keep its rounding after it
# leaves the window (sums of grid values alone are exact in double and could never drift).
VALUES = GRID + (1e20,)
NOT_APPENDED = (StopReason.CANCELLED, StopReason.GROUP_CONSENSUS)  # an active row ending so drops its token


def assert_same(a, b, where: str) -> None:
    """Exact equality, NaN equal to NaN, types and dtypes included."""
    if isinstance(a, float) or isinstance(b, float):
        assert type(a) is type(b) and (a == b or (math.isnan(a) and math.isnan(b))), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), f"{where}: {a!r} vs {b!r}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), f"{where}: {a} != {b}"
    elif isinstance(a, dict) or isinstance(b, dict):
        assert isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b), f"{where}: {a!r} != {b!r}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} ({type(a).__name__}) != {b!r} ({type(b).__name__})"


def assert_same_plan(native, reference) -> None:
    assert len(native.finished) == len(reference.finished), (native.finished, reference.finished)
    for i, (f, g) in enumerate(zip(native.finished, reference.finished)):
        for field in FINISHED_FIELDS:
            assert_same(getattr(f, field), getattr(g, field), f"finished[{i}].{field}")
    for field in ("keep", "request_ids", "positions", "active", "free_slots"):
        a, b = getattr(native, field), getattr(reference, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert_same(a, b, field)
    assert native.admitted == reference.admitted


def outcome(call):
    """(result, None) or (None, exception type)."""
    try:
        return call(), None
    except (ValueError, TypeError, QueueFull) as err:
        return None, type(err)


stop_configs = st.builds(
    StopConfig,
    eos_ids=st.lists(TOKENS, max_size=2).map(tuple),
    stop_sequences=st.lists(st.lists(TOKENS, min_size=1, max_size=3).map(tuple), max_size=3).map(tuple),
    min_new_tokens=st.integers(0, 3),
    low_conf_signal=st.sampled_from(("topk_conf", "logprob", "confidence", "margin", "neg_entropy")),
    low_conf_threshold=st.sampled_from((0.5, None, 0.25, 0.75, -0.5)),
    window=st.integers(1, 4),
    confident_entropy_below=st.sampled_from((0.5, None, 0.25, 0.75, 0.0)),
    confident_margin_above=st.sampled_from((0.5, None, 0.25, 0.75, 0.0)),
    confident_steps=st.sampled_from((1, 2, 0, 3)),
    shadow=st.booleans(),
    record_signals=st.booleans(),
)


class Differential(RuleBasedStateMachine):
    """Both schedulers, driven alike, plus the model the invariants check against."""

    layout = "compact"

    @initialize(
        capacity=st.integers(1, 5),
        max_queue=st.integers(1, 8),
        aging_steps=st.integers(0, 3),
        wave_size=st.integers(0, 3),
        group_atomic=st.booleans(),
        consensus_fraction=st.one_of(st.none(), st.sampled_from((0.5, 0.6, 1.0))),
        consensus_min_votes=st.integers(1, 3),
        configs=st.lists(stop_configs, min_size=1, max_size=3),
    )
    def start(self, capacity, max_queue, aging_steps, wave_size, group_atomic, consensus_fraction,
              consensus_min_votes, configs):
        options = dict(layout=self.layout, max_queue=max_queue, aging_steps=aging_steps, wave_size=wave_size,
                       group_atomic=group_atomic, consensus_fraction=consensus_fraction,
                       consensus_min_votes=consensus_min_votes)
        self.native = haltwise.Scheduler(capacity, **options)
        self.reference = ReferenceScheduler(capacity, **options)
        self.capacity = capacity
        self.configs = configs
        self.next_id = 0
        self.group_priority = {}  # group -> the priority its members are submitted with
        self.group_max_weight = {}  # group -> the max_weight its members are mostly submitted with
        # The model. live: request_id -> the states of its submissions that have not been reported ended yet,
        # oldest first ("queued", "active"); an id ended while queued (cancel, settle) and submitted again has
        # two until the next plan. tokens: the tokens stepped in per active request.
        self.live: dict[int, list[str]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.rows: list[int] = []  # request id of each row of the next batch
        self.slot_of: dict[int, int] = {}  # slots layout: request id -> slot
        self.ended: list[int] = []  # request ids as they end (a resubmitted id may appear again)
        self.submitted = 0

    # ---- operations -------------------------------------------------------------------

    @rule(data=st.data(), count=st.integers(1, 3))
    def submit(self, data, count):
        for _ in range(count):
            self.submit_one(data, data.draw(st.integers(0, 4)) > 0)

    def submit_one(self, data, fresh):
        request_id = self.next_id if fresh or self.next_id == 0 else data.draw(st.integers(0, self.next_id))
        group = data.draw(st.one_of(st.none(), st.integers(0, 3)))
        priority = data.draw(st.integers(0, 2))
        if group is not None and data.draw(st.integers(0, 9)) > 0:
            priority = self.group_priority.setdefault(group, priority)  # mostly a group's own priority
        max_weight = None
        if group is not None:  # mostly the group's own max_weight; sometimes None (the group's) or another
            own = self.group_max_weight.setdefault(group, data.draw(st.sampled_from((0.5, 1.0, 4.0))))
            choice = data.draw(st.integers(0, 9))
            max_weight = own if choice >= 3 else None if choice >= 1 else data.draw(st.sampled_from((0.5, 1.0, 4.0)))
        elif data.draw(st.integers(0, 19)) == 0:
            max_weight = 1.0  # without a group: refused
        kwargs = dict(max_new_tokens=data.draw(st.integers(1, 8)), priority=priority, group=group,
                      stop=data.draw(st.sampled_from(self.configs)), max_weight=max_weight)
        a = outcome(lambda: self.native.submit(request_id, **kwargs))
        b = outcome(lambda: self.reference.submit(request_id, **kwargs))
        assert a == b
        if a[1] is None:
            assert "active" not in self.live.get(request_id, []), "an active id was accepted again"
            self.live.setdefault(request_id, []).append("queued")
            self.submitted += 1
        else:
            assert a[1] is QueueFull or request_id in self.live or group is not None or max_weight is not None
        self.next_id = max(self.next_id, request_id + 1)

    @precondition(lambda self: self.next_id > 0)
    @rule(data=st.data())
    def cancel(self, data):
        request_id = data.draw(st.integers(0, self.next_id))
        assert self.native.cancel(request_id) == self.reference.cancel(request_id)

    @precondition(lambda self: self.ended)
    @rule(data=st.data())
    def report_answer(self, data):
        request_id = data.draw(st.sampled_from(self.ended))
        key = data.draw(st.integers(0, 2))
        weight = data.draw(st.sampled_from((None, 0.0, 0.5, 1.0, 2.5, 4.0, 5.0)))
        assert outcome(lambda: self.native.report_answer(request_id, key, weight)) == outcome(
            lambda: self.reference.report_answer(request_id, key, weight))

    @rule(group=st.integers(0, 4))
    def settle_group(self, group):
        assert self.native.settle_group(group) == self.reference.settle_group(group)

    @rule(data=st.data())
    def step(self, data):
        n = self.native.batch_size
        assert n == self.reference.batch_size == len(self.rows)
        tokens = np.array(data.draw(st.lists(TOKENS, min_size=n, max_size=n)), dtype=np.int64)
        values = {f: np.array(data.draw(st.lists(st.sampled_from(VALUES), min_size=n, max_size=n)), np.float32)
                  for f in SIGNAL_FIELDS}
        status = np.zeros(n, np.int8)
        if n and data.draw(st.integers(0, 7)) == 0:  # an invalid row: nonzero status or a NaN signal
            r = data.draw(st.integers(0, n - 1))
            if data.draw(st.booleans()):
                status[r] = data.draw(st.sampled_from((1, 2, 4)))
            else:
                values[data.draw(st.sampled_from(SIGNAL_FIELDS))][r] = np.nan
        signals = SimpleNamespace(status=status, **values)
        plan = self.native.step(tokens, signals)
        assert_same_plan(plan, self.reference.step(tokens, signals))
        self.check_plan(plan, tokens)

    # ---- the model -----------------------------------------------------------------------

    def check_plan(self, plan, tokens):
        compact = self.layout == "compact"
        previous = self.rows
        previous_slots = {} if compact else {self.slot_of[i]: i for i in previous}  # slot -> request id
        ended_rows = set()
        for f in plan.finished:
            request_id = f.request_id
            assert self.live.get(request_id), f"request {request_id} ended twice or was never submitted"
            state = self.live[request_id].pop(0)
            if not self.live[request_id]:
                del self.live[request_id]
            assert isinstance(f.reason, StopReason)
            if state == "queued":
                assert f.num_tokens == 0 and f.tokens.size == 0
                assert f.reason in (StopReason.CANCELLED, StopReason.GROUP_CONSENSUS)
            else:
                row = previous.index(request_id)
                ended_rows.add(row)
                expected = self.tokens.pop(request_id)
                if f.reason not in NOT_APPENDED:
                    expected = expected + [int(tokens[row])]
                assert f.tokens.tolist() == expected
                self.slot_of.pop(request_id, None)
            assert f.num_tokens == len(f.tokens)
            if f.signals is not None:
                assert all(v.dtype == np.float32 and v.shape == (f.num_tokens,) for v in f.signals.values())
            self.ended.append(request_id)

        keep = plan.keep.tolist()
        assert keep == sorted(set(keep)), "keep must be strictly increasing"
        if compact:
            assert all(0 <= k < len(previous) for k in keep)
            kept_ids = [previous[k] for k in keep]
        else:
            assert all(k in previous_slots for k in keep), "keep names a slot that was not active"
            kept_ids = [previous_slots[k] for k in keep]
        assert sorted(kept_ids + [previous[r] for r in ended_rows]) == sorted(previous), "a row neither kept nor ended"
        for row, request_id in enumerate(previous):
            if row not in ended_rows:
                self.tokens[request_id].append(int(tokens[row]))

        for request_id, where in plan.admitted:
            assert self.live.get(request_id) == ["queued"], f"admitted {request_id}: {self.live.get(request_id)}"
            self.live[request_id] = ["active"]
            self.tokens[request_id] = []
        admitted_ids = [request_id for request_id, _ in plan.admitted]
        if compact:
            assert [where for _, where in plan.admitted] == list(range(len(keep), len(keep) + len(admitted_ids)))
            self.rows = kept_ids + admitted_ids
        else:
            for request_id, slot in plan.admitted:
                assert 0 <= slot < self.capacity and slot not in self.slot_of.values(), "slot held twice"
                self.slot_of[request_id] = slot
            self.rows = sorted(self.slot_of, key=self.slot_of.get)
            active = plan.active.tolist()
            assert [s for s in range(self.capacity) if active[s]] == sorted(self.slot_of.values())
            assert plan.free_slots.tolist() == [s for s in range(self.capacity) if not active[s]]
            # admissions take the lowest free slots
            free_before = sorted(set(range(self.capacity)) - {self.slot_of[i] for i in kept_ids})
            assert sorted(slot for _, slot in plan.admitted) == free_before[: len(plan.admitted)]
        assert plan.request_ids.tolist() == self.rows
        assert len(set(self.rows)) == len(self.rows) <= self.capacity
        assert plan.positions.tolist() == [len(self.tokens[i]) for i in self.rows]

    @invariant()
    def same_stats_and_votes(self):
        if not hasattr(self, "native"):
            return
        stats = self.native.stats()
        assert_same(stats, self.reference.stats(), "stats")
        assert stats["submitted"] == self.submitted
        assert stats["active"] + stats["queued"] + sum(stats["finished"].values()) == self.submitted
        assert stats["active"] == self.native.batch_size
        for group in range(5):
            assert_same(self.native.vote(group), self.reference.vote(group), f"vote({group})")
            assert self.native.leader(group) == self.reference.leader(group)


class DifferentialSlots(Differential):
    layout = "slots"


FUZZ_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("machine", [Differential, DifferentialSlots], ids=["compact", "slots"])
def test_native_matches_reference(machine):
    run_state_machine_as_test(machine, settings=FUZZ_SETTINGS)
