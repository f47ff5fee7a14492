"""haltwise.Scheduler: each stop rule and reason, admission (priorities,
aging, waves, group_atomic), groups and votes, cancel, QueueFull, every bad
input. Every test runs against the native scheduler and the pure-Python
reference (haltwise.scheduler_reference), which must agree; the differential
fuzz (test_scheduler_fuzz.py) checks them against each other at random.
"""
from __future__ import annotations

import doctest
import math
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import haltwise
from haltwise import QueueFull, StopConfig, StopReason
from haltwise.scheduler_reference import ReferenceScheduler

IMPLEMENTATIONS = {"native": haltwise.Scheduler, "reference": ReferenceScheduler}
EMPTY = np.empty(0, np.int64)
DEFAULTS = dict(logprob=-0.5, entropy=1.0, confidence=0.5, margin=0.2, topk_conf=2.0)
SIGNAL_FIELDS = tuple(DEFAULTS)


@pytest.fixture(params=list(IMPLEMENTATIONS))
def make(request):
    """The scheduler class under test: native or reference."""
    return IMPLEMENTATIONS[request.param]


def signals(n: int, status=0, **values) -> SimpleNamespace:
    """Per-row signals for a batch of n: each field a scalar or a list of n values."""
    out = {f: np.broadcast_to(np.asarray(values.get(f, DEFAULTS[f]), np.float32), (n,)).copy() for f in DEFAULTS}
    return SimpleNamespace(status=np.broadcast_to(np.asarray(status, np.int8), (n,)).copy(), **out)


def step(sched, tokens, **values):
    tokens = np.asarray(tokens, np.int64).reshape(-1)
    return sched.step(tokens, signals(len(tokens), **values))


def generate(make, stop=StopConfig(), tokens=(), max_new_tokens=1000, **per_token):
    """Runs one request alone over `tokens` (one per step) with per-token signal
    lists in `per_token`; returns (finished record, steps taken) or (None, steps)."""
    sched = make(1)
    sched.submit(0, max_new_tokens=max_new_tokens, stop=stop)
    assert sched.step(EMPTY, None).admitted == [(0, 0)]
    for i, token in enumerate(tokens):
        values = {field: per_token[field][i] for field in per_token}
        plan = step(sched, [token], **values)
        if plan.finished:
            (finished,) = plan.finished
            assert finished.tokens.tolist() == list(tokens[: i + 1])
            return finished, i + 1
    return None, len(tokens)


# ---- stop rules ---------------------------------------------------------------------------


def test_eos(make):
    f, steps = generate(make, StopConfig(eos_ids=(2, 9)), tokens=[5, 6, 9, 7])
    assert (f.reason, steps, f.num_tokens) == (StopReason.EOS, 3, 3)
    assert f.tokens.dtype == np.int64


def test_max_tokens(make):
    f, steps = generate(make, StopConfig(), tokens=[1] * 10, max_new_tokens=4)
    assert (f.reason, steps) == (StopReason.MAX_TOKENS, 4)


@pytest.mark.parametrize(
    "sequences,tokens,stops_at",
    [
        (((5, 6, 7),), [1, 5, 6, 7, 8], 4),  # one per step: the match straddles three steps
        (((5, 6, 7),), [5, 6, 5, 6, 7], 5),  # a false start, then the match
        (((1, 1, 2),), [1, 1, 1, 2], 4),  # needs the failure link: 1 1 [1] 2
        (((1, 2, 3, 4), (2, 3)), [1, 2, 3, 4], 3),  # a shorter sequence inside a longer one fires first
        (((2, 3), (1, 2, 3)), [1, 2, 3], 3),  # one sequence a suffix of another: both end here
        (((1, 2, 3), (2, 3, 4)), [1, 2, 2, 3, 4], 5),  # overlapping: 1 2 | 2 3 4
        (((3, 3, 3),), [3, 3, 4, 3, 3, 3], 6),  # repeats
        (((7,),), [6, 7], 2),  # length one
        (((5, 6), (6, 5)), [9, 9, 9], None),  # never
    ],
)
def test_stop_sequences(make, sequences, tokens, stops_at):
    f, steps = generate(make, StopConfig(stop_sequences=sequences), tokens=tokens)
    if stops_at is None:
        assert f is None
    else:
        assert (f.reason, steps) == (StopReason.STOP_SEQUENCE, stops_at)


def test_stop_sequences_match_suffix_check_at_random(make):
    """The automaton against a brute-force suffix check, over many random streams."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        sequences = tuple(tuple(rng.integers(0, 3, rng.integers(1, 4)).tolist()) for _ in range(rng.integers(1, 4)))
        tokens = rng.integers(0, 3, 12).tolist()
        expected = next((i + 1 for i in range(len(tokens))
                         if any(tuple(tokens[max(0, i + 1 - len(s)): i + 1]) == s for s in sequences)), None)
        f, steps = generate(make, StopConfig(stop_sequences=sequences), tokens=tokens)
        assert (steps if f else None) == expected, (sequences, tokens)


def test_rule_order(make):
    stop = StopConfig(eos_ids=(3,), stop_sequences=((2, 3), (4,)))
    # EOS before STOP_SEQUENCE: token 3 ends both
    assert generate(make, stop, tokens=[2, 3])[0].reason == StopReason.EOS
    # STOP_SEQUENCE before MAX_TOKENS
    assert generate(make, stop, tokens=[1, 4], max_new_tokens=2)[0].reason == StopReason.STOP_SEQUENCE
    # EOS before MAX_TOKENS
    assert generate(make, stop, tokens=[3], max_new_tokens=1)[0].reason == StopReason.EOS
    # INVALID_LOGITS before everything
    f, _ = generate(make, stop, tokens=[3], max_new_tokens=1, logprob=[float("nan")])
    assert f.reason == StopReason.INVALID_LOGITS
    # MAX_TOKENS before the confidence rules
    low = StopConfig(low_conf_threshold=10.0)
    assert generate(make, low, tokens=[1], max_new_tokens=1)[0].reason == StopReason.MAX_TOKENS


@pytest.mark.parametrize("field", SIGNAL_FIELDS + ("status",))
def test_invalid_logits(make, field):
    """A NaN in any of the five signals, or a nonzero status, ends the sequence.
    Its token is kept; its signals stay out of the means."""
    per_token = {"status": [0, 0, 4]} if field == "status" else {field: [0.25, 0.75, float("nan")]}
    stop = StopConfig(record_signals=True)
    f, steps = generate(make, stop, tokens=[4, 5, 6], **per_token)
    assert (f.reason, steps, f.tokens.tolist()) == (StopReason.INVALID_LOGITS, 3, [4, 5, 6])
    if field == "topk_conf":
        assert f.mean_topk_conf == 0.5 and f.mean_signal == 0.5
    assert all(math.isfinite(v) for v in (f.mean_topk_conf, f.mean_logprob, f.mean_neg_entropy, f.last_entropy))
    assert all(len(v) == 3 for v in f.signals.values())  # recorded raw, the invalid row too
    if field != "status":
        assert math.isnan(f.signals[field][2])


def test_invalid_first_token_has_nan_summaries(make):
    f, _ = generate(make, StopConfig(), tokens=[1], status=[1])
    assert f.reason == StopReason.INVALID_LOGITS and f.num_tokens == 1
    for name in ("mean_topk_conf", "mean_logprob", "mean_neg_entropy", "mean_signal", "min_window_mean",
                 "last_window_mean", "last_entropy"):
        assert math.isnan(getattr(f, name)), name


@pytest.mark.parametrize("value", [0.3, 0.1, 2.7, -1.3])
def test_low_confidence_strict_at_the_boundary(make, value):
    """The window mean of equal float32 values is exactly that value: a
    threshold equal to it never fires (strict <), the next double above it does."""
    v = float(np.float32(value))
    stop = StopConfig(low_conf_threshold=v, window=4)
    f, _ = generate(make, stop, tokens=[1] * 50, max_new_tokens=50, topk_conf=[v] * 50)
    assert f.reason == StopReason.MAX_TOKENS and f.steps_below_threshold == 0 and f.min_window_mean == v
    stop = StopConfig(low_conf_threshold=math.nextafter(v, math.inf), window=4)
    f, steps = generate(make, stop, tokens=[1] * 50, max_new_tokens=50, topk_conf=[v] * 50)
    assert (f.reason, steps) == (StopReason.LOW_CONFIDENCE, 1)


def test_low_confidence_window_is_a_sliding_mean(make):
    # W = 3; values 1, 1, 0.25, 0.25, 0.25: means 1, 1, .75, .5, .25
    values = [1.0, 1.0, 0.25, 0.25, 0.25, 0.25]
    for threshold, expected_step in [(0.9, 3), (0.75, 4), (0.5, 5), (0.25, None)]:
        stop = StopConfig(low_conf_threshold=threshold, window=3)
        f, steps = generate(make, stop, tokens=[1] * 6, max_new_tokens=6, topk_conf=values)
        if expected_step is None:
            assert f.reason == StopReason.MAX_TOKENS and f.min_window_mean == 0.25
        else:
            assert (f.reason, steps) == (StopReason.LOW_CONFIDENCE, expected_step)


def test_window_sum_is_rederived_and_never_drifts(make):
    """A huge value that leaves the window would leave its rounding behind in a
    running sum; the sum is re-derived from the window every W tokens."""
    w = 4
    values = [1e20] + [0.25] * (2 * w - 1)
    f, _ = generate(make, StopConfig(window=w), tokens=[1] * (2 * w), max_new_tokens=2 * w, topk_conf=values)
    assert f.last_window_mean == 0.25


def test_min_new_tokens_delays_confidence_rules(make):
    low = dict(topk_conf=[0.0] * 10)
    for min_new, expected in [(0, 1), (1, 1), (5, 5)]:
        stop = StopConfig(low_conf_threshold=0.5, min_new_tokens=min_new)
        f, steps = generate(make, stop, tokens=[1] * 10, **low)
        assert (f.reason, steps) == (StopReason.LOW_CONFIDENCE, expected)
    stop = StopConfig(confident_margin_above=0.5, confident_steps=1, min_new_tokens=3)
    f, steps = generate(make, stop, tokens=[1] * 10, margin=[0.9] * 10)
    assert (f.reason, steps) == (StopReason.CONFIDENT, 3)


@pytest.mark.parametrize(
    "signal,field,value,oriented",
    [
        ("topk_conf", "topk_conf", 0.25, 0.25),
        ("logprob", "logprob", -2.5, -2.5),
        ("confidence", "confidence", 0.25, 0.25),
        ("margin", "margin", 0.125, 0.125),
        ("neg_entropy", "entropy", 1.5, -1.5),  # oriented: higher = more confident
    ],
)
def test_low_conf_signal_choice(make, signal, field, value, oriented):
    stop = StopConfig(low_conf_signal=signal, low_conf_threshold=oriented, window=2)
    f, _ = generate(make, stop, tokens=[1] * 3, max_new_tokens=3, **{field: [value] * 3})
    assert f.reason == StopReason.MAX_TOKENS and f.mean_signal == oriented and f.last_window_mean == oriented
    stop = StopConfig(low_conf_signal=signal, low_conf_threshold=oriented + 0.5, window=2)
    f, steps = generate(make, stop, tokens=[1] * 3, max_new_tokens=3, **{field: [value] * 3})
    assert (f.reason, steps) == (StopReason.LOW_CONFIDENCE, 1)


def test_confident(make):
    stop = StopConfig(confident_entropy_below=0.5, confident_margin_above=0.5, confident_steps=3)
    calm = dict(entropy=0.25, margin=0.75)
    # a streak broken at step 3 (entropy exactly at the bound: strict), then 3 calm steps
    entropy = [0.25, 0.25, 0.5, 0.25, 0.25, 0.25, 0.25]
    f, steps = generate(make, stop, tokens=[1] * 7, entropy=entropy, margin=[calm["margin"]] * 7)
    assert (f.reason, steps) == (StopReason.CONFIDENT, 6)
    margin = [0.75, 0.75, 0.5, 0.75, 0.75, 0.75, 0.75]  # margin exactly at the bound: strict
    f, steps = generate(make, stop, tokens=[1] * 7, entropy=[0.25] * 7, margin=margin)
    assert (f.reason, steps) == (StopReason.CONFIDENT, 6)


def test_confident_with_one_bound_or_off(make):
    only_entropy = StopConfig(confident_entropy_below=0.5, confident_steps=2)
    f, steps = generate(make, only_entropy, tokens=[1] * 5, entropy=[0.25] * 5, margin=[0.0] * 5)
    assert (f.reason, steps) == (StopReason.CONFIDENT, 2)
    only_margin = StopConfig(confident_margin_above=0.5, confident_steps=2)
    f, steps = generate(make, only_margin, tokens=[1] * 5, entropy=[9.0] * 5, margin=[0.75] * 5)
    assert (f.reason, steps) == (StopReason.CONFIDENT, 2)
    for off in (StopConfig(confident_entropy_below=0.5, confident_steps=0), StopConfig(confident_steps=2)):
        f, _ = generate(make, off, tokens=[1] * 5, max_new_tokens=5, entropy=[0.0] * 5, margin=[1.0] * 5)
        assert f.reason == StopReason.MAX_TOKENS


def test_shadow_records_and_never_stops(make):
    stop = StopConfig(low_conf_threshold=0.5, window=1, confident_margin_above=0.5, confident_steps=1,
                      shadow=True)
    topk = [1.0, 1.0, 0.25, 1.0, 0.25, 1.0]
    margin = [0.75, 0.0, 0.0, 0.0, 0.0, 0.0]  # would be CONFIDENT at step 1
    f, _ = generate(make, stop, tokens=[1] * 6, max_new_tokens=6, topk_conf=topk, margin=margin)
    assert f.reason == StopReason.MAX_TOKENS and f.num_tokens == 6
    assert (f.would_stop_step, f.would_stop_reason) == (1, StopReason.CONFIDENT)
    assert f.steps_below_threshold == 2 and f.min_window_mean == 0.25
    # LOW_CONFIDENCE first; a later CONFIDENT does not overwrite it
    stop = StopConfig(low_conf_threshold=0.5, window=1, confident_margin_above=0.5, confident_steps=1,
                      shadow=True, min_new_tokens=2)
    f, _ = generate(make, stop, tokens=[1] * 6, max_new_tokens=6, topk_conf=topk, margin=[0.0, 0.0, 0.0, 0.75, 0, 0])
    assert (f.would_stop_step, f.would_stop_reason) == (3, StopReason.LOW_CONFIDENCE)
    # no shadow: nothing recorded
    f, _ = generate(make, StopConfig(), tokens=[1], max_new_tokens=1)
    assert (f.would_stop_step, f.would_stop_reason) == (-1, None)


def test_record_signals_and_summaries(make):
    rng = np.random.default_rng(3)
    per_token = {field: rng.uniform(0.1, 2.0, 7).astype(np.float32).tolist() for field in SIGNAL_FIELDS}
    stop = StopConfig(record_signals=True, low_conf_signal="margin", window=3, min_new_tokens=2)
    f, _ = generate(make, stop, tokens=list(range(7)), max_new_tokens=7, **per_token)
    assert set(f.signals) == {"topk_conf", "logprob", "entropy", "confidence", "margin"}
    for field in SIGNAL_FIELDS:
        assert f.signals[field].dtype == np.float32
        np.testing.assert_array_equal(f.signals[field], np.float32(per_token[field]))
    mean = lambda xs: math.fsum(xs) / len(xs)  # noqa: E731 - exact here: few float32 values of similar size
    assert f.mean_topk_conf == mean(per_token["topk_conf"])
    assert f.mean_logprob == mean(per_token["logprob"])
    assert f.mean_neg_entropy == mean([-x for x in per_token["entropy"]])
    assert f.mean_signal == mean(per_token["margin"])
    windows = [mean(per_token["margin"][max(0, n - 3): n]) for n in range(2, 8)]  # evaluated from token 2 on
    assert f.min_window_mean == min(windows) and f.last_window_mean == windows[-1]
    assert f.last_entropy == per_token["entropy"][-1]
    assert generate(make, StopConfig(), tokens=[1], max_new_tokens=1)[0].signals is None


def test_min_window_mean_nan_when_never_evaluated(make):
    f, _ = generate(make, StopConfig(eos_ids=(1,)), tokens=[1])
    assert math.isnan(f.min_window_mean) and f.last_window_mean == DEFAULTS["topk_conf"]


# ---- rows, layouts ----------------------------------------------------------------------


def test_compact_layout(make):
    sched = make(3)
    for i in range(5):
        sched.submit(i, max_new_tokens=10, stop=StopConfig(eos_ids=(0,)))
    plan = sched.step(EMPTY, None)
    assert plan.admitted == [(0, 0), (1, 1), (2, 2)] and plan.active is None and plan.free_slots is None
    plan = step(sched, [5, 0, 5])  # row 1 ends: rows 0, 2 kept and renumbered 0, 1; request 3 appended
    assert [f.request_id for f in plan.finished] == [1]
    assert plan.keep.tolist() == [0, 2] and plan.admitted == [(3, 2)]
    assert plan.request_ids.tolist() == [0, 2, 3] and plan.positions.tolist() == [1, 1, 0]
    assert sched.batch_size == 3


def test_slots_layout(make):
    sched = make(4, layout="slots")
    for i in range(6):
        sched.submit(i, max_new_tokens=10, stop=StopConfig(eos_ids=(0,)))
    plan = sched.step(EMPTY, None)
    assert plan.admitted == [(0, 0), (1, 1), (2, 2), (3, 3)]
    plan = step(sched, [0, 5, 0, 5])  # slots 0 and 2 free; requests 4, 5 take them, lowest first
    assert plan.keep.tolist() == [1, 3] and plan.admitted == [(4, 0), (5, 2)]
    assert plan.request_ids.tolist() == [4, 1, 5, 3] and plan.positions.tolist() == [0, 1, 0, 1]
    assert plan.active.tolist() == [True] * 4 and plan.free_slots.tolist() == []
    plan = step(sched, [5, 0, 5, 5])
    assert plan.keep.tolist() == [0, 2, 3] and plan.admitted == []
    assert plan.active.tolist() == [True, False, True, True] and plan.free_slots.tolist() == [1]
    assert plan.request_ids.tolist() == [4, 5, 3]


def test_plan_arrays_are_read_only(make):
    sched = make(2)
    sched.submit(0, max_new_tokens=1)
    sched.step(EMPTY, None)
    plan = step(sched, [7])
    for array in (plan.keep, plan.request_ids, plan.positions, plan.finished[0].tokens):
        with pytest.raises(ValueError):
            array[...] = 0
    assert isinstance(plan, haltwise.StepPlan) and isinstance(plan.finished[0], haltwise.Finished)


def test_inputs_torch_signals_and_strided_numpy(make):
    sched = make(2)
    for i in range(2):
        sched.submit(i, max_new_tokens=2)
    sched.step(EMPTY, None)
    t = haltwise.Signals(token=torch.tensor([3, 4]), logprob=torch.full((2,), -0.5), entropy=torch.ones(2),
                         confidence=torch.full((2,), 0.5), margin=torch.full((2,), 0.2), topk_conf=torch.ones(2),
                         status=torch.zeros(2, dtype=torch.int8))
    assert sched.step(t.token, t).keep.tolist() == [0, 1]
    wide = {f: np.arange(4, dtype=np.float32)[::2] for f in SIGNAL_FIELDS}  # stride 8 bytes
    plan = sched.step(np.array([5, 6, 7, 8])[::2], SimpleNamespace(status=np.zeros(4, np.int8)[::2], **wide))
    assert [f.tokens.tolist() for f in plan.finished] == [[3, 5], [4, 7]]


# ---- admission ----------------------------------------------------------------------------


def test_priority_classes_and_fifo(make):
    sched = make(1, aging_steps=0)
    for request_id, priority in [(0, 0), (1, 5), (2, 0), (3, 5), (4, 9)]:
        sched.submit(request_id, max_new_tokens=1, priority=priority)
    order = [sched.step(EMPTY, None).admitted[0][0]]
    for _ in range(4):
        order.append(step(sched, [1]).admitted[0][0])
    assert order == [4, 1, 3, 0, 2]


def test_aging_lifts_a_low_class(make):
    """A stream of fresh high-priority requests starves priority 0 without aging;
    with aging_steps=a it gains a level every a steps and gets in."""
    def admitted_low(aging_steps):
        sched = make(1, aging_steps=aging_steps)
        sched.submit(0, max_new_tokens=1, priority=0)
        next_id, tokens = 1, EMPTY
        for t in range(40):
            sched.submit(next_id, max_new_tokens=1, priority=3)
            next_id += 1
            plan = step(sched, tokens) if len(tokens) else sched.step(EMPTY, None)
            if (0, 0) in plan.admitted:
                return t
            tokens = [1]
        return None

    assert admitted_low(0) is None
    # waited w steps: effective priority w // 4; the high ones wait one step each: 3 + 0. At w // 4 == 3 it ties
    # and wins, being older (ties go to the earlier submission).
    assert admitted_low(4) == 11


def test_waves(make):
    sched = make(8, wave_size=2)
    for i in range(5):
        sched.submit(i, max_new_tokens=3, group=7)
    sched.submit(99, max_new_tokens=1)
    plan = sched.step(EMPTY, None)
    assert plan.admitted == [(0, 0), (1, 1), (99, 2)]  # a wave of 2; ungrouped requests are not held back
    plan = step(sched, [1, 1, 1])
    assert plan.admitted == []
    plan = step(sched, [1, 1])
    assert plan.admitted == []
    plan = step(sched, [1, 1])  # both end (MAX_TOKENS): the next wave
    assert [f.request_id for f in plan.finished] == [0, 1] and [r for r, _ in plan.admitted] == [2, 3]
    plan = step(sched, [1, 1])
    sched.cancel(2)
    plan = step(sched, [1, 1])  # 2 cancelled, 3 still running: wave not over
    assert plan.admitted == []
    plan = step(sched, [1])
    assert [r for r, _ in plan.admitted] == [4]


def test_group_atomic(make):
    sched = make(3, group_atomic=True)
    sched.submit(0, max_new_tokens=2)
    sched.step(EMPTY, None)
    for i in range(1, 4):
        sched.submit(i, max_new_tokens=1, group=5)
    sched.submit(9, max_new_tokens=1)  # later, ungrouped: must not jump ahead of the group
    plan = step(sched, [1])
    assert plan.admitted == []  # 2 free rows, the group needs 3
    plan = step(sched, [1])
    assert [r for r, _ in plan.admitted] == [1, 2, 3]
    plan = step(sched, [1, 1, 1])
    assert [r for r, _ in plan.admitted] == [9]


def test_group_atomic_with_waves_and_capacity(make):
    sched = make(2, group_atomic=True, wave_size=3)
    for i in range(5):
        sched.submit(i, max_new_tokens=1, group=1)
    plan = sched.step(EMPTY, None)
    assert [r for r, _ in plan.admitted] == [0, 1]  # a wave of 3 does not fit in 2 rows: capped at capacity
    plan = step(sched, [1, 1])
    assert [r for r, _ in plan.admitted] == [2, 3]  # both finished: the wave is over, a new one starts
    plan = step(sched, [1, 1])
    assert [r for r, _ in plan.admitted] == [4]


def test_group_members_share_a_priority(make):
    sched = make(1)
    sched.submit(0, max_new_tokens=1, group=3, priority=1)
    with pytest.raises(ValueError, match="priority"):
        sched.submit(1, max_new_tokens=1, group=3, priority=2)
    sched.step(EMPTY, None)  # 0 admitted: no member queued, any priority goes
    sched.submit(1, max_new_tokens=1, group=3, priority=2)


# ---- groups and votes -------------------------------------------------------------------------


def run_group(make, n_active, n_queued, **options):
    sched = make(n_active, **options)
    for i in range(n_active + n_queued):
        sched.submit(i, max_new_tokens=100, group=1, stop=StopConfig(eos_ids=(0,)))
    sched.step(EMPTY, None)
    return sched


def test_settle_by_vote(make):
    sched = run_group(make, n_active=4, n_queued=2)
    plan = step(sched, [0, 0, 5, 5])  # 0, 1 finish; 2 active and 2 queued remain
    assert [f.request_id for f in plan.finished] == [0, 1] and [r for r, _ in plan.admitted] == [4, 5]
    sched.report_answer(0, 42)
    sched.report_answer(1, 42, weight=1.0)
    assert sched.vote(1) == {42: 2.0} and sched.leader(1) == 42
    plan = step(sched, [5, 5, 5, 5])  # 2 > 0 + 4 remaining? no
    assert plan.finished == []
    plan = step(sched, [0, 0, 5, 5])  # 2, 3 finish
    sched.report_answer(2, 42)
    sched.report_answer(3, 42, 0.5)  # 3.5 > 0 + 2 remaining: settled at the start of the next step
    plan = step(sched, [5, 5])
    assert [(f.request_id, f.reason, f.num_tokens) for f in plan.finished] == [
        (4, StopReason.GROUP_CONSENSUS, 2), (5, StopReason.GROUP_CONSENSUS, 2)]  # this step's token not appended
    assert sched.stats()["tokens_saved_estimate"] == 2 * 98
    sched.submit(9, max_new_tokens=5, group=1)  # a settled group: ends at once
    plan = sched.step(EMPTY, None)
    assert [(f.request_id, f.reason, f.num_tokens) for f in plan.finished] == [(9, StopReason.GROUP_CONSENSUS, 0)]


def test_no_settle_while_a_tie_is_possible(make):
    sched = run_group(make, n_active=3, n_queued=0)
    step(sched, [0, 5, 5])
    sched.report_answer(0, 2)
    plan = step(sched, [0, 5])  # 1 > 0 + 2? no. 1 finishes
    sched.report_answer(1, 1)
    plan = step(sched, [5])  # 1 vs 1, 1 remaining: no
    assert plan.finished == []
    assert sched.leader(1) == 2  # ties: the key reported first, not the smallest


def test_leader_ties_go_to_the_first_reported_answer_as_in_weighted_vote(make):
    from haltwise.voting import weighted_vote

    sched = run_group(make, n_active=5, n_queued=0)
    step(sched, [0, 0, 0, 0, 0])
    reports = [(7, 0.5), (3, 0.25), (3, 0.25), (9, 0.5), (3, 0.0)]  # 7, 3 and 9 tie at 0.5
    for request_id, (key, weight) in enumerate(reports):
        sched.report_answer(request_id, key, weight)
        assert sched.leader(1) == weighted_vote([k for k, _ in reports[: request_id + 1]],
                                                [w for _, w in reports[: request_id + 1]])
    assert list(sched.vote(1)) == [7, 3, 9] and sched.leader(1) == 7


def test_settle_by_fraction(make):
    sched = run_group(make, n_active=6, n_queued=5, consensus_fraction=0.6, consensus_min_votes=3)
    plan = step(sched, [0, 0, 0, 0, 5, 5])  # 0-3 finish, 6-9 admitted, 10 still queued
    assert [r for r, _ in plan.admitted] == [6, 7, 8, 9]
    for request_id, key in [(0, 1), (1, 1), (2, 1)]:
        sched.report_answer(request_id, key, weight=0.5)
    sched.report_answer(3, 2, weight=1.0)  # leader 1.5 of 2.5 = 0.6 with 4 votes; 1.5 > 1 + 7 is far off
    plan = step(sched, [5] * 6)
    # the queued member first (settled at the start of the step), then the rows in order
    assert [(f.request_id, f.reason, f.num_tokens) for f in plan.finished] == [
        (10, StopReason.GROUP_CONSENSUS, 0)] + [(i, StopReason.GROUP_CONSENSUS, int(i < 6)) for i in range(4, 10)]
    assert sched.stats()["active"] == 0 and sched.stats()["queued"] == 0


def test_fraction_needs_min_votes(make):
    sched = run_group(make, n_active=4, n_queued=0, consensus_fraction=0.5, consensus_min_votes=3)
    step(sched, [0, 0, 5, 5])
    sched.report_answer(0, 1)
    sched.report_answer(1, 1)  # 100% but 2 votes
    assert step(sched, [5, 5]).finished == []


def test_settle_group(make):
    sched = run_group(make, n_active=2, n_queued=2)
    assert sched.settle_group(1) == 4
    assert sched.settle_group(1) == 0 and sched.settle_group(12345) == 0
    assert sched.cancel(0) is False  # already ending
    plan = step(sched, [5, 5])
    assert [(f.request_id, f.reason, f.num_tokens) for f in plan.finished] == [
        (2, StopReason.GROUP_CONSENSUS, 0), (3, StopReason.GROUP_CONSENSUS, 0),
        (0, StopReason.GROUP_CONSENSUS, 0), (1, StopReason.GROUP_CONSENSUS, 0)]  # their token not appended
    assert all(f.group == 1 for f in plan.finished)


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan"), float("inf")])
def test_report_answer_bad_weight(make, weight):
    sched = run_group(make, n_active=1, n_queued=0)
    step(sched, [0])
    with pytest.raises(ValueError, match="weight"):
        sched.report_answer(0, 1, weight)
    sched.report_answer(0, 1, 0.0)


def test_a_weight_above_the_groups_max_weight_is_refused_and_names_it(make):
    sched, eos = make(4), StopConfig(eos_ids=(0,))
    sched.submit(0, max_new_tokens=9, group=1, max_weight=12.5, stop=eos)
    sched.submit(1, max_new_tokens=9, group=1, stop=eos)  # None: the group's
    sched.submit(2, max_new_tokens=9, group=1, max_weight=12.5, stop=eos)  # the same value
    sched.submit(3, max_new_tokens=9, group=2, stop=eos)  # default 1
    sched.step(EMPTY, None)
    step(sched, [0, 0, 0, 0])
    with pytest.raises(ValueError, match="max_weight 12.5"):
        sched.report_answer(0, 1, 13.0)
    sched.report_answer(0, 1, 12.5)  # nothing changed: it can still report
    sched.report_answer(1, 2, 8.0)
    assert sched.vote(1) == {1: 12.5, 2: 8.0}
    with pytest.raises(ValueError, match=r"max_weight 1(\.0)?"):
        sched.report_answer(3, 1, 1.5)
    sched.report_answer(3, 1, 1.0)
    for weight in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="weight"):
            sched.report_answer(2, 1, weight)


@pytest.mark.parametrize("kwargs", [dict(group=1, max_weight=2.0), dict(group=None, max_weight=1.0),
                                    dict(group=1, max_weight=-1.0), dict(group=1, max_weight=float("inf")),
                                    dict(group=1, max_weight=float("nan"))])
def test_submit_bad_max_weight(make, kwargs):
    sched = make(2)
    sched.submit(0, max_new_tokens=5, group=1, max_weight=3.0)
    with pytest.raises(ValueError, match="max_weight"):
        sched.submit(1, max_new_tokens=5, **kwargs)
    assert sched.stats()["submitted"] == 1 and sched.stats()["queued"] == 1


@pytest.mark.parametrize("max_weight", [1.0, 4.0, 12.0])
def test_settle_counts_each_remaining_member_at_the_groups_max_weight(make, max_weight):
    sched = make(3)
    for i in range(3):
        sched.submit(i, max_new_tokens=100, group=1, max_weight=max_weight, stop=StopConfig(eos_ids=(0,)))
    sched.step(EMPTY, None)
    step(sched, [0, 5, 5])  # 0 finishes; 2 remain
    sched.report_answer(0, 1, max_weight)  # max_weight > 0 + 2 * max_weight? no
    assert step(sched, [0, 5]).finished[0].request_id == 1  # 1 finishes; 1 remains
    sched.report_answer(1, 1, max_weight)  # 2 * max_weight > 0 + 1 * max_weight: settled at the next step
    plan = step(sched, [5])
    assert [(f.request_id, f.reason) for f in plan.finished] == [(2, StopReason.GROUP_CONSENSUS)]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(2, 5), max_weight=st.sampled_from((0.5, 1.0, 4.0, 12.0)), data=st.data())
def test_settle_by_vote_is_the_documented_rule_for_any_max_weight(n, max_weight, data):
    """Both schedulers, driven alike: a group settles exactly when leader >
    runner_up + remaining * max_weight after the answers of a step's finished
    members (remaining: its active members)."""
    scheds = [cls(n) for cls in IMPLEMENTATIONS.values()]
    for sched in scheds:
        for i in range(n):
            sched.submit(i, max_new_tokens=100, group=1, max_weight=max_weight, stop=StopConfig(eos_ids=(0,)))
        sched.step(EMPTY, None)
    active, tally, settled = list(range(n)), {}, False
    while active:
        tokens = [data.draw(st.sampled_from((0, 5))) for _ in active]
        plans = [step(sched, tokens) for sched in scheds]
        ended = [[(f.request_id, f.reason) for f in plan.finished] for plan in plans]
        assert ended[0] == ended[1]
        if settled:
            assert ended[0] == [(r, StopReason.GROUP_CONSENSUS) for r in active]
            break
        assert ended[0] == [(r, StopReason.EOS) for r, t in zip(active, tokens) if t == 0]
        for request_id, _ in ended[0]:
            key = data.draw(st.integers(0, 2))
            weight = data.draw(st.sampled_from((0.0, max_weight / 4, max_weight / 2, max_weight)))
            for sched in scheds:
                sched.report_answer(request_id, key, weight)
            tally[key] = tally.get(key, 0.0) + weight
        active = [r for r, t in zip(active, tokens) if t != 0]
        first, second = (sorted(tally.values(), reverse=True) + [0.0, 0.0])[:2]
        settled = bool(tally) and first > second + len(active) * max_weight
        assert scheds[0].vote(1) == scheds[1].vote(1) and scheds[0].leader(1) == scheds[1].leader(1)


def test_a_large_weight_does_not_settle_while_a_remaining_member_could_outweigh_it(make):
    """With max_weight 10, a first vote of 8 against one remaining member is
    not settled (10 could overturn it), though 8 > 0 + 1 * 1."""
    sched = make(2)
    for i in range(2):
        sched.submit(i, max_new_tokens=100, group=1, max_weight=10.0, stop=StopConfig(eos_ids=(0,)))
    sched.step(EMPTY, None)
    step(sched, [0, 5])
    sched.report_answer(0, 1, 8.0)
    assert step(sched, [5]).finished == []
    step(sched, [0])
    sched.report_answer(1, 2, 10.0)
    assert sched.leader(1) == 2


def test_report_answer_needs_a_finished_group_member(make):
    sched = make(2)
    sched.submit(0, max_new_tokens=2, group=1)
    sched.submit(1, max_new_tokens=1)  # no group
    sched.submit(2, max_new_tokens=1, group=1)  # queued
    sched.step(EMPTY, None)
    for request_id in (0, 1, 2, 77):  # active, ungrouped, queued, unknown
        with pytest.raises(ValueError, match="report_answer"):
            sched.report_answer(request_id, 1)
    step(sched, [5, 5])
    with pytest.raises(ValueError):
        sched.report_answer(1, 1)  # finished but ungrouped
    step(sched, [5, 5])
    sched.report_answer(0, 1)
    with pytest.raises(ValueError):
        sched.report_answer(0, 1)  # twice
    assert sched.vote(1) == {1: 1.0} and sched.vote(99) == {} and sched.leader(99) is None


# ---- cancel, queue full --------------------------------------------------------------------------


def test_cancel(make):
    sched = make(1)
    sched.submit(0, max_new_tokens=5)
    sched.submit(1, max_new_tokens=5)
    sched.step(EMPTY, None)
    step(sched, [3])
    assert sched.cancel(1) is True  # queued: ends at once
    assert sched.cancel(0) is True  # active: ends at the next step
    assert sched.cancel(0) is False and sched.cancel(1) is False and sched.cancel(42) is False
    plan = step(sched, [4])
    assert [(f.request_id, f.reason, f.tokens.tolist()) for f in plan.finished] == [
        (1, StopReason.CANCELLED, []), (0, StopReason.CANCELLED, [3])]  # the step's token is not appended
    stats = sched.stats()
    assert stats["finished"]["CANCELLED"] == 2 and stats["tokens_generated"] == 1
    sched.submit(0, max_new_tokens=1)  # a finished id may be submitted again


def test_queue_full_loses_nothing(make):
    sched = make(1, max_queue=2)
    sched.submit(0, max_new_tokens=1)
    sched.submit(1, max_new_tokens=1)
    before = sched.stats()
    with pytest.raises(QueueFull):
        sched.submit(2, max_new_tokens=1)
    assert isinstance(QueueFull("x"), RuntimeError)
    assert sched.stats() == before
    ended = [f.request_id for f in sched.step(EMPTY, None).finished]
    sched.submit(2, max_new_tokens=1)  # room again
    for _ in range(4):
        if sched.batch_size == 0:
            break
        ended += [f.request_id for f in step(sched, [1]).finished]
    assert ended == [0, 1, 2]
    assert sched.stats()["submitted"] == 3 and sched.stats()["finished"]["MAX_TOKENS"] == 3


def test_stats(make):
    sched = make(2)
    for i in range(3):
        sched.submit(i, max_new_tokens=4, stop=StopConfig(low_conf_threshold=0.5, eos_ids=(0,)))
    sched.step(EMPTY, None)
    step(sched, [0, 1], topk_conf=[1.0, 0.25])  # 0: EOS; 1: LOW_CONFIDENCE after 1 token (saves 3)
    stats = sched.stats()
    assert stats == dict(submitted=3, active=1, queued=0, tokens_generated=2, tokens_saved_estimate=3, groups=0,
                         finished=dict(EOS=1, MAX_TOKENS=0, STOP_SEQUENCE=0, LOW_CONFIDENCE=1, CONFIDENT=0,
                                       GROUP_CONSENSUS=0, INVALID_LOGITS=0, CANCELLED=0, OUT_OF_MEMORY=0))


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(capacity=0), ValueError, "capacity"),
        (dict(capacity=1.5), TypeError, "capacity"),
        (dict(layout="rows"), ValueError, "layout"),
        (dict(max_queue=0), ValueError, "max_queue"),
        (dict(aging_steps=-1), ValueError, "aging_steps"),
        (dict(wave_size=-1), ValueError, "wave_size"),
        (dict(group_atomic=1), TypeError, "group_atomic"),
        (dict(consensus_fraction=0.0), ValueError, "consensus_fraction"),
        (dict(consensus_fraction=1.5), ValueError, "consensus_fraction"),
        (dict(consensus_fraction=float("nan")), ValueError, "consensus_fraction"),
        (dict(consensus_min_votes=0), ValueError, "consensus_min_votes"),
    ],
)
def test_bad_scheduler_options(make, kwargs, error, match):
    kwargs = {"capacity": 2, **kwargs}
    with pytest.raises(error, match=match):
        make(kwargs.pop("capacity"), **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(window=0), ValueError, "window"),
        (dict(min_new_tokens=-1), ValueError, "min_new_tokens"),
        (dict(confident_steps=-2), ValueError, "confident_steps"),
        (dict(confident_entropy_below=-0.1), ValueError, "confident_entropy_below"),
        (dict(confident_margin_above=-0.1), ValueError, "confident_margin_above"),
        (dict(low_conf_threshold=float("nan")), ValueError, "low_conf_threshold"),
        (dict(low_conf_threshold="high"), TypeError, "low_conf_threshold"),
        (dict(low_conf_signal="entropy"), ValueError, "low_conf_signal"),
        (dict(stop_sequences=((1, 2), ())), ValueError, r"stop_sequences\[1\]"),
        (dict(stop_sequences=("ab",)), TypeError, "stop_sequences"),
        (dict(eos_ids=(1.5,)), TypeError, "eos_ids"),
        (dict(eos_ids=2), TypeError, "eos_ids"),
        (dict(shadow="yes"), TypeError, "shadow"),
    ],
)
def test_bad_stop_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        StopConfig(**kwargs)


def test_stop_config_normalises_lists():
    config = StopConfig(eos_ids=[2, np.int64(3)], stop_sequences=[[1, 2]], low_conf_threshold=1)
    assert config == StopConfig(eos_ids=(2, 3), stop_sequences=((1, 2),), low_conf_threshold=1.0)
    assert hash(config) == hash(StopConfig(eos_ids=(2, 3), stop_sequences=((1, 2),), low_conf_threshold=1.0))


def test_native_stop_rules_check_their_fields():
    """The C++ boundary checks what StopConfig checks, for callers that bypass it."""
    from haltwise._native import core

    good = dict(eos_ids=[], stop_sequences=[], min_new_tokens=0, low_conf_signal="topk_conf",
                low_conf_threshold=None, window=16, confident_entropy_below=None, confident_margin_above=None,
                confident_steps=0, shadow=False, record_signals=False)
    core().StopRules(**good)
    for bad, match in [(dict(window=0), "window"), (dict(stop_sequences=[[]]), "stop sequence"),
                       (dict(low_conf_signal="x"), "low_conf_signal"), (dict(min_new_tokens=-1), "min_new_tokens"),
                       (dict(low_conf_threshold=float("inf")), "low_conf_threshold")]:
        with pytest.raises(ValueError, match=match):
            core().StopRules(**{**good, **bad})


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
        (dict(max_new_tokens=2, priority=2**40), ValueError, "priority"),
        (dict(max_new_tokens=2, group="a"), TypeError, "group"),
        (dict(max_new_tokens=2, stop={"eos_ids": (1,)}), TypeError, "stop"),
        (dict(max_new_tokens=2, request_id=1.0), TypeError, "request_id"),
        (dict(max_new_tokens=2, request_id=2**63), ValueError, "request_id"),
    ],
)
def test_bad_submit(make, kwargs, error, match):
    kwargs = dict(kwargs)
    sched = make(1)
    with pytest.raises(error, match=match):
        sched.submit(kwargs.pop("request_id", 0), **kwargs)
    assert sched.stats()["submitted"] == 0


def test_duplicate_id(make):
    sched = make(1)
    sched.submit(0, max_new_tokens=2)
    with pytest.raises(ValueError, match="already queued or active"):
        sched.submit(0, max_new_tokens=2)  # queued
    sched.step(EMPTY, None)
    with pytest.raises(ValueError, match="already queued or active"):
        sched.submit(0, max_new_tokens=2)  # active
    assert sched.stats()["submitted"] == 1


def good_step_args(n):
    return np.zeros(n, np.int64), signals(n)


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("tokens", np.zeros(2, np.int64), r"tokens must have shape \(3,\).*got \(2,\)"),
        ("tokens", np.zeros(3, np.int32), "tokens must be int64, got int32"),
        ("tokens", np.zeros((3, 1), np.int64), r"tokens must be 1-D"),
        ("logprob", np.zeros(4, np.float32), r"signals.logprob must have shape \(3,\)"),
        ("entropy", np.zeros(3, np.float64), "signals.entropy must be float32, got float64"),
        ("confidence", np.zeros(3, np.float16), "signals.confidence must be float32"),
        ("margin", np.zeros(2, np.float32), "signals.margin must have shape"),
        ("topk_conf", torch.zeros(3, dtype=torch.float64), "signals.topk_conf must be float32"),
        ("status", np.zeros(3, np.int32), "signals.status must be int8, got int32"),
        ("status", np.zeros(3, np.uint8), "signals.status must be int8"),
    ],
)
def test_bad_step_inputs(make, name, bad, match):
    sched = make(3)
    for i in range(3):
        sched.submit(i, max_new_tokens=5)
    sched.step(EMPTY, None)
    tokens, sig = good_step_args(3)
    if name == "tokens":
        tokens = bad
    else:
        setattr(sig, name, bad)
    with pytest.raises(ValueError, match=match):
        sched.step(tokens, sig)
    assert sched.stats()["tokens_generated"] == 0
    assert sched.step(*good_step_args(3)).keep.tolist() == [0, 1, 2]  # nothing changed


def test_step_signals_missing_attribute(make):
    sched = make(1)
    sched.submit(0, max_new_tokens=5)
    sched.step(EMPTY, None)
    with pytest.raises(TypeError, match="status"):
        sched.step(np.zeros(1, np.int64), SimpleNamespace(**{f: np.zeros(1, np.float32) for f in SIGNAL_FIELDS}))
    with pytest.raises(TypeError, match="signals must have"):
        sched.step(np.zeros(1, np.int64), None)  # None only with an empty batch


def test_every_request_ends_exactly_once(make):
    """A busy run with every kind of ending: the finished lists, over all plans,
    name every submitted request exactly once."""
    rng = np.random.default_rng(11)
    sched = make(4, wave_size=2, consensus_fraction=0.6)
    stop = StopConfig(eos_ids=(0,), stop_sequences=((1, 2),), low_conf_threshold=0.3, window=2,
                      confident_entropy_below=0.1, confident_steps=2)
    ended, submitted, next_id = [], [], 0
    for t in range(300):
        if t < 250:
            for _ in range(rng.integers(0, 3)):
                try:
                    sched.submit(next_id, max_new_tokens=int(rng.integers(1, 10)), stop=stop,
                                 group=int(rng.integers(0, 5)) if rng.random() < 0.5 else None)
                    submitted.append(next_id)
                except QueueFull:  # pragma: no cover - max_queue is large here
                    pass
                next_id += 1
        if rng.random() < 0.05 and submitted:
            sched.cancel(int(rng.choice(submitted)))
        n = sched.batch_size
        plan = sched.step(rng.integers(0, 5, n).astype(np.int64),
                          signals(n, topk_conf=rng.random(n), entropy=rng.random(n), status=rng.random(n) < 0.02))
        for f in plan.finished:
            ended.append(f.request_id)
            if f.group is not None and rng.random() < 0.8:
                sched.report_answer(f.request_id, int(rng.integers(0, 2)))
    assert sorted(ended) == sorted(submitted) and len(set(ended)) == len(ended)
    stats = sched.stats()
    assert sum(stats["finished"].values()) == stats["submitted"] == len(submitted)


# ---- group lifetime ----------------------------------------------------------------------------


def test_group_is_released_the_step_after_its_last_end_is_reported(make):
    sched = make(2, consensus_fraction=0.5, consensus_min_votes=1)
    sched.submit(0, max_new_tokens=1, group=9)
    sched.submit(1, max_new_tokens=2, group=9)
    sched.step(EMPTY, None)
    plan = step(sched, [5, 5])
    assert [f.request_id for f in plan.finished] == [0]
    sched.report_answer(0, 3)
    plan = step(sched, [5])  # the vote settles the group (fraction 1 >= 0.5): 1 ends at this row
    assert [(f.request_id, f.reason, f.group) for f in plan.finished] == [(1, StopReason.GROUP_CONSENSUS, 9)]
    assert sched.stats()["groups"] == 1
    # Between the plan that reports the last end and the next step: answers and votes still work.
    sched.report_answer(1, 3, 0.5)
    assert sched.vote(9) == {3: 1.5} and sched.leader(9) == 3
    sched.step(EMPTY, None)
    assert sched.stats()["groups"] == 0
    assert sched.vote(9) == {} and sched.leader(9) is None and sched.settle_group(9) == 0
    with pytest.raises(ValueError, match="report_answer: request 0 is not a finished member"):
        sched.report_answer(0, 3)
    # The id starts a new group (it is not settled any more).
    sched.submit(2, max_new_tokens=1, group=9)
    assert sched.step(EMPTY, None).admitted == [(2, 0)]


def test_group_ended_while_queued_is_released_after_its_plan(make):
    sched = make(1)
    sched.submit(0, max_new_tokens=1, group=4)
    sched.cancel(0)  # ended between steps: reported by the next plan
    plan = sched.step(EMPTY, None)
    assert [(f.request_id, f.reason) for f in plan.finished] == [(0, StopReason.CANCELLED)]
    assert sched.stats()["groups"] == 1  # the caller has not seen that plan before this step
    sched.report_answer(0, 1)
    assert sched.vote(4) == {1: 1.0}
    sched.step(EMPTY, None)
    assert sched.stats()["groups"] == 0


def test_groups_do_not_accumulate(make):
    """A long run of short-lived groups (one per request, answers never reported,
    as the Stepper makes them for a policy): the scheduler holds only the live ones."""
    sched = make(8)
    held = []
    for t in range(400):
        for k in range(2):
            sched.submit(t * 2 + k, max_new_tokens=3, group=t)
        step(sched, [7] * sched.batch_size)
        held.append(sched.stats()["groups"])
    assert max(held) <= 8 and sched.stats()["submitted"] == 800
    for _ in range(6):
        step(sched, [7] * sched.batch_size)
    assert sched.stats()["groups"] == 0 and sched.batch_size == 0


# ---- what cannot be served, and admissions that fail ------------------------------------------


def test_requests_beyond_the_limits_are_refused_at_submit(make):
    from haltwise.scheduler import MAX_NEW_TOKENS, MAX_WINDOW

    sched = make(1)
    with pytest.raises(ValueError, match=rf"submit: max_new_tokens must be in \[1, {MAX_NEW_TOKENS}\], got {2**62}"):
        sched.submit(1, max_new_tokens=2**62)
    with pytest.raises(ValueError, match=rf"submit: max_new_tokens must be in \[1, {MAX_NEW_TOKENS}\], got {10**9}"):
        sched.submit(1, max_new_tokens=10**9)  # would have reserved gigabytes for one sequence
    with pytest.raises(ValueError, match=rf"StopConfig: window must be in \[1, {MAX_WINDOW}\], got {2**62}"):
        StopConfig(window=2**62)
    assert sched.stats()["submitted"] == 0
    # The limits themselves are served.
    sched.submit(1, max_new_tokens=MAX_NEW_TOKENS, stop=StopConfig(window=MAX_WINDOW, low_conf_threshold=0.5))
    assert sched.step(EMPTY, None).admitted == [(1, 0)]
    assert step(sched, [3], topk_conf=0.25).finished[0].reason == StopReason.LOW_CONFIDENCE


def test_native_limits_match_python():
    from haltwise._native import core
    from haltwise.scheduler import MAX_NEW_TOKENS, MAX_WINDOW

    assert (core().MAX_NEW_TOKENS, core().MAX_WINDOW) == (MAX_NEW_TOKENS, MAX_WINDOW)
    native = core().Scheduler(capacity=1, layout="compact", max_queue=4, aging_steps=0, wave_size=0,
                              group_atomic=False, consensus_fraction=None, consensus_min_votes=1)
    rules = haltwise.scheduler._native_rules(StopConfig())
    with pytest.raises(ValueError, match=rf"max_new_tokens must be in \[1, {MAX_NEW_TOKENS}\], got {2**62}"):
        native.submit(1, 2**62, 0, None, rules)
    assert native.stats()["submitted"] == 0


# The reported sequence, bypassing nothing: an unservable request, a step, stats, cancel. It must neither
# crash the interpreter nor lose the request: refused at submit, or accepted and ended with a reason.
UNSERVABLE = textwrap.dedent(
    """
    import numpy as np
    from haltwise import Scheduler, StopConfig

    s = Scheduler(1)
    accepted = False
    try:
        s.submit(1, max_new_tokens=2**62, stop=StopConfig(window=2**62))
        accepted = True
    except ValueError as err:
        print("refused:", err)
    try:
        s.step(np.empty(0, np.int64), None)
    except Exception as err:
        print("step raised:", type(err).__name__, err)
    stats = s.stats()
    ended = sum(stats["finished"].values())
    assert stats["submitted"] == int(accepted), stats
    assert stats["active"] + stats["queued"] + ended == stats["submitted"], ("a request was lost", stats)
    s.cancel(1)
    s.submit(2, max_new_tokens=1)  # its row is free
    assert s.step(np.empty(s.batch_size, np.int64), None if s.batch_size == 0 else 0) is not None
    print("done")
    """
)


def test_unservable_request_is_never_lost_and_never_crashes():
    result = subprocess.run([sys.executable, "-c", UNSERVABLE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "done" in result.stdout, (result.returncode, result.stdout, result.stderr[-3000:])
    assert "refused: StopConfig: window must be in [1, 65536], got 4611686018427387904" in result.stdout


@pytest.mark.parametrize("layout", ["compact", "slots"])
def test_failed_admission_ends_the_request(make, layout):
    """An admission whose state cannot be allocated ends that request with
    OUT_OF_MEMORY in the same plan; its row goes to the next request."""
    sched = make(2, layout=layout)
    sched.submit(0, max_new_tokens=3, group=5)
    sched.submit(1, max_new_tokens=3)
    sched.submit(2, max_new_tokens=3, group=5)
    sched._fail_next_admissions(1)
    plan = sched.step(EMPTY, None)
    assert [(f.request_id, f.reason, f.group, f.num_tokens) for f in plan.finished] == [
        (0, StopReason.OUT_OF_MEMORY, 5, 0)]
    assert plan.admitted == [(1, 0), (2, 1)]
    stats = sched.stats()
    assert (stats["submitted"], stats["active"], stats["queued"], stats["finished"]["OUT_OF_MEMORY"]) == (3, 2, 0, 1)
    assert not sched.cancel(0)  # ended: nothing to cancel
    sched.report_answer(0, 7)  # a finished group member: its answer counts like any other
    assert sched.vote(5) == {7: 1.0}
    sched.submit(0, max_new_tokens=1)  # the id may be used again
    ended = []
    for _ in range(5):
        ended += [(f.request_id, f.reason) for f in step(sched, [4] * sched.batch_size).finished]
    assert sorted(ended) == [(0, StopReason.MAX_TOKENS), (1, StopReason.MAX_TOKENS), (2, StopReason.MAX_TOKENS)]


def test_failed_group_atomic_admission_loses_no_row(make):
    sched = make(3, group_atomic=True)
    for i in range(3):
        sched.submit(i, max_new_tokens=2, group=1)
    sched.submit(3, max_new_tokens=2)
    sched._fail_next_admissions(2)
    plan = sched.step(EMPTY, None)
    assert [(f.request_id, f.reason) for f in plan.finished] == [(0, StopReason.OUT_OF_MEMORY),
                                                                 (1, StopReason.OUT_OF_MEMORY)]
    assert plan.admitted == [(2, 0), (3, 1)]  # the rows the failures did not take go to the next requests


# ---- capacity ----------------------------------------------------------------------------------

# The largest capacity, under an address-space limit of 1 GiB more than the interpreter already maps:
# the scheduler's memory and step must not be sized by the capacity (slots exist as they are first used).
HUGE_CAPACITY = textwrap.dedent(
    """
    import resource
    import numpy as np
    import haltwise
    from haltwise.stepper import HostSignals

    vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    for layout in ("compact", "slots"):
        s = haltwise.Scheduler(2**31 - 1, layout=layout)
        for i in range(3):
            s.submit(i, max_new_tokens=3 + i)
        plan = s.step(np.zeros(0, np.int64), None)
        assert [slot for _, slot in plan.admitted] == [0, 1, 2], plan.admitted
        ended = []
        for t in range(400):
            s.submit(100 + t, max_new_tokens=1 + t % 7)
            n = s.batch_size
            plan = s.step(np.zeros(n, np.int64), HostSignals.zeros(n))
            ended += [f.request_id for f in plan.finished]
            assert len(plan.request_ids) == s.batch_size <= 8
        assert len(ended) >= 390, len(ended)
        if layout == "slots":
            assert plan.request_ids.size == s.batch_size and plan.keep.max() < 16
    print("ok")
    """
)


@pytest.mark.skipif(sys.platform != "linux" or "asan" in __import__("os").environ.get("LD_PRELOAD", ""),
                    reason="needs /proc and RLIMIT_AS (AddressSanitizer reserves terabytes of address space)")
def test_step_and_memory_do_not_grow_with_capacity():
    result = subprocess.run([sys.executable, "-c", HUGE_CAPACITY], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stdout, result.stderr[-3000:])


def test_docstring_examples():
    import haltwise.scheduler

    result = doctest.testmod(haltwise.scheduler, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
