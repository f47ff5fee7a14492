"""``haltwise.Policy``: chooses the stop thresholds of each new request and
moves them as evidence arrives, inside the operator's accuracy budget.

It never touches the decode step. The caller asks it for a :class:`Plan` at
admission, runs the request's traces with ``plan.stop`` (``plan.traces`` of
them), reports the finished traces with :meth:`Policy.observe`, and later
the labels (:meth:`Policy.feedback`) and serving figures
(:meth:`Policy.observe_load`).

How a threshold is chosen (see notes/policy.md for the guarantee):

* Each request has a key naming a bucket (buckets.py: fallback rule).
* A new bucket's first ``warmup_requests`` requests run uncut; the lowest
  window means of their traces set the bucket's grid of candidate thresholds
  and its DeepConf start threshold (calibration.py).
* A random slice of requests (the control slice; ``control_boost`` while the
  bucket is not ready, then ``control_fraction``) runs uncut with its
  signals kept. Every candidate is replayed on those traces, so when labels
  arrive each candidate has a paired EM difference on each labelled control
  request. Learn-then-Test fixed-sequence testing (ltt.py) certifies the
  candidates whose EM drop is at most epsilon with confidence 1 - delta; the
  most token-saving certified one becomes the target.
* The value in force moves toward the target: down at once, up by at most
  ``max_raise_steps`` grid steps per ``raise_interval`` requests, never within
  ``cooldown`` requests of a lowering (the hysteresis of the EM loop).
* Under overload (load.py) the budget is ``epsilon_overload`` and fewer
  traces per request may be certified as well; leaving overload returns to
  the normal values at once.

Every public call is one SQLite transaction (store.py): a restarted policy
resumes exactly at the last call that returned. Thread-safe (one lock).
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..scheduler import StopConfig, StopReason, check_bool, check_float, check_int
from ..voting import weighted_vote
from . import ltt
from ..hashing import GOLDEN_GAMMA, MIX_1, MIX_2, splitmix64
from ..trace_rules import vote_weight
from .anytime import AnytimeState, Certifier, policy_families
from .buckets import (CLASS_PREFIX, BucketState, SliceCounts, class_of, needs_warmup, normalize_key, path_of,
                      resolve)
from .calibration import (VOTING_REASONS, CandidateOutcomes, TraceProfile, candidate_outcomes, deepconf_index,
                          differences, make_grid, quantile_levels, trace_profile)
from .config import PolicyConfig
from .cost import candidate_table
from .evaluation import choose, token_gain
from .load import LoadMonitor, LoadState
from .shadow import summarize as summarize_shadow
from .shadow import would_have
from .store import PolicyDatabaseError, Store
from .types import SOURCES, Plan, TraceOutcome

# A control request's traces must have ended on their own for the replay to be exact.
_NATURAL_ENDS = VOTING_REASONS | {StopReason.INVALID_LOGITS}


@dataclass
class _WindowStats:
    """A bucket's evidence window, summed: per candidate (R, G + 1) harms,
    helps, mean paired difference and mean tokens."""

    n: int  # labelled control requests the test uses
    control: int  # control requests in the window
    test: str = ""
    harms: np.ndarray | None = None
    helps: np.ndarray | None = None
    mean_d: np.ndarray | None = None
    tokens: np.ndarray | None = None
    em_uncut: float = math.nan

    def table(self, row: int, thresholds: list, cfg: PolicyConfig) -> list[dict]:
        return candidate_table(self.em_uncut, self.mean_d[row], self.tokens[row], thresholds,
                               price_per_1k_tokens=cfg.price_per_1k_tokens, value_per_correct=cfg.value_per_correct)


@dataclass
class _Evidence:
    """One control request as evidence for one bucket."""

    seq: int
    outcomes: CandidateOutcomes
    d: np.ndarray | None = None  # int8 (R, G + 1) paired differences; None while it does not count
    right: bool | None = None  # the uncut answer was right (None: not known)
    has_reference: bool = False


def control_draw(seed: int, request_id: int) -> float:
    """A uniform [0, 1) number from (seed, request_id) (splitmix64): the
    control slice is every request whose draw is below the control share, a
    selection independent of the request's content."""
    mask = (1 << 64) - 1
    z = splitmix64((seed * GOLDEN_GAMMA + request_id * MIX_1 + MIX_2) & mask)
    return (z >> 11) / float(1 << 53)


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


class Policy:
    """The thin policy layer (module docstring).

    Parameters
    ----------
    config: PolicyConfig | None
        Knobs; None: the defaults, or the stored config of an existing database.
    db: str | os.PathLike
        SQLite file (WAL mode), or ":memory:" (nothing survives the process).
        Where no file exists a new database is created; an existing file
        resumes where it stopped if it is a haltwise policy database (else
        PolicyDatabaseError, the file untouched); a config that differs from
        the stored one raises ValueError naming the fields. Several
        processes may share one database.
    readonly: bool
        Open an existing database without writing (reports); calls that
        write raise PolicyDatabaseError.
    clock: callable
        Seconds since the epoch, for audit and feedback times only (decisions
        never read the clock).

    Example
    -------
    >>> import haltwise
    >>> policy = haltwise.Policy(haltwise.PolicyConfig(traces=4, warmup_requests=1))
    >>> plan = policy.plan(0, "arith/terms=3", base=haltwise.StopConfig(eos_ids=[2]))
    >>> plan.kind, plan.traces, plan.stop.record_signals
    ('warmup', 4, True)
    """

    # Filled by _load() (from the database), reset by _snapshot()'s undo.
    _seq: int
    _buckets: dict[str, BucketState]
    _persisted: set[str]

    def __init__(self, config: PolicyConfig | None = None, *, db=":memory:", clock=time.time,
                 readonly: bool = False):
        if config is not None and not isinstance(config, PolicyConfig):
            raise TypeError(f"Policy: config must be a haltwise.PolicyConfig or None, got {type(config).__name__}")
        self._lock = threading.RLock()
        self._clock = clock
        fresh = config or PolicyConfig()

        def initial_rows(store: Store) -> None:  # a new database: written with its schema, in one transaction
            store.set_meta("config", fresh.to_json())
            store.set_meta("seq", 0)
            store.set_meta("load", LoadState().to_dict())

        store = Store(db, clock=clock, readonly=readonly, on_create=initial_rows)
        try:
            stored = store.get_meta("config")
            if stored is None:  # schema written, config not yet (an older haltwise crashed in between)
                if readonly:
                    raise PolicyDatabaseError(f"policy database {db} holds no config yet (never used)")
                with store.transaction():
                    initial_rows(store)
                config = fresh
            else:
                stored_config = PolicyConfig.from_json(stored)
                if config is not None and config != stored_config:
                    raise ValueError(f"Policy: config differs from the one stored in {db} in "
                                     f"{config.differences_from(stored_config)}; pass config=None to resume with it")
                config = stored_config
            store.set_synchronous(config.synchronous)
        except BaseException:
            store.close()
            raise
        self.config: PolicyConfig = config
        self.store = store
        self._levels = quantile_levels(config.grid_size, config.grid_low, config.grid_high)
        self._class_configs = {name: config.for_class(name) for name, _, _ in config.classes}
        self._load()

    @classmethod
    def open(cls, db, *, clock=time.time, readonly: bool = False) -> "Policy":
        """Resume the policy stored in `db` (an existing database), with its
        config. readonly: read without writing (reports; works on a read-only
        file and while another process writes); calls that write raise
        PolicyDatabaseError."""
        from pathlib import Path

        if str(db) != ":memory:" and not Path(db).exists():
            raise FileNotFoundError(f"Policy.open: db {db} does not exist")
        policy = cls(None, db=db, clock=clock, readonly=readonly)
        return policy

    @contextmanager
    def _write(self):
        """One public call's transaction. The in-memory state is rebuilt from
        the database first if another process committed since our last call,
        and after a failure (the transaction rolled back)."""
        undo: list = []  # the body may push a cheap undo of the in-memory state; else a failure reloads it
        try:
            with self.store.transaction():
                if self.store.changed_elsewhere():
                    self._load()
                yield undo
        except BaseException:
            if undo:
                undo[-1]()
            elif not self.store.readonly:
                self._load()
            raise

    def _snapshot(self, names: list[str]) -> Callable[[], None]:
        """An undo of what planning changes in memory: the request counter and
        the buckets on one path (created or updated)."""
        seq, persisted = self._seq, set(self._persisted)
        saved = {name: {**self._buckets[name].to_dict(), "grid": self._buckets[name].grid}
                 if name in self._buckets else None for name in names}

        def undo() -> None:
            self._seq, self._persisted = seq, persisted
            for name, state in saved.items():
                if state is None:
                    self._buckets.pop(name, None)
                    self._evidence.pop(name, None)
                else:
                    self._buckets[name] = BucketState.from_dict(state)
        return undo

    def _refresh(self) -> None:
        """Before a report: catch up with what other processes committed."""
        if self.store.changed_elsewhere():
            self._load()

    def close(self) -> None:
        with self._lock:
            self.store.close()

    def __enter__(self) -> "Policy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- loading ----------------------------------------------------------------------

    def _load(self) -> None:
        """(Re)build the in-memory state from the database."""
        cfg = self.config
        self._seq = int(self.store.get_meta("seq", 0))
        self._buckets = {name: BucketState.from_dict(state) for name, state in self.store.buckets().items()}
        self._persisted = set(self._buckets)
        self._monitor = LoadMonitor(
            {"queue_depth": cfg.slo_queue_depth, "p95_latency_s": cfg.slo_p95_latency_s,
             "kv_utilization": cfg.slo_kv_utilization},
            exit_fraction=cfg.exit_fraction, enter_after=cfg.enter_after, exit_after=cfg.exit_after,
            min_dwell=cfg.min_dwell, state=LoadState.from_dict(self.store.get_meta("load")))
        self._evidence: dict[str, dict[int, _Evidence]] = {}
        profiles_cache: dict[int, list[TraceProfile]] = {}
        for name, bucket in self._buckets.items():
            self._evidence[name] = {}
            if not bucket.frozen:
                continue
            for rid in self.store.evidence_window(name, self._cfg(name).evidence_window):
                row = self.store.request(rid)
                if rid not in profiles_cache:
                    profiles_cache[rid] = self._profiles_from_rows(self.store.traces(rid))
                if profiles_cache[rid] is None:
                    continue
                entry = _Evidence(seq=row["seq"], outcomes=self._outcomes(bucket, profiles_cache[rid]))
                self._label_entry(entry, row)
                self._evidence[name][rid] = entry

    def _profiles_from_rows(self, rows: list[dict]) -> list[TraceProfile] | None:
        if not rows or any(r["signal"] is None or StopReason(r["reason"]) not in _NATURAL_ENDS for r in rows):
            return None
        cfg = self.config
        return [trace_profile(r["signal"], reason=r["reason"], answer=r["answer"], window=cfg.window,
                              min_new_tokens=cfg.min_new_tokens, mean_logprob=r["mean_logprob"]) for r in rows]

    def _outcomes(self, bucket: BucketState, profiles: list[TraceProfile]) -> CandidateOutcomes:
        cfg = self._cfg(bucket.name)
        return candidate_outcomes(profiles, np.asarray(bucket.grid), cfg.strategy_rows, weighting=cfg.weighting)

    # ---- planning ---------------------------------------------------------------------

    def plan(self, request_id: int, key=None, *, base: StopConfig | None = None,
             control: bool | None = None, admit: Callable[[Plan], None] | None = None,
             request_class: str | None = None, consensus: bool = True) -> Plan:
        """The plan of a new request.

        request_id: int, unique over the policy's life
        key: the request's bucket: None / "" (global), "a/b" or ("a", "b")
        base: the caller's StopConfig (EOS ids, stop sequences, ...); the
            policy sets its low_conf_* fields, window, min_new_tokens, shadow
            and record_signals
        control: True forces a control plan (for replaying recorded uncut runs
            whose problems are a random sample, e.g. a benchmark's no-cut run);
            None: the control slice decides
        admit: called with the Plan before it is recorded, inside the same
            transaction (e.g. queueing its traces); if it raises, nothing of
            the plan is kept (the request_id may be planned again) and the
            exception propagates
        request_class: one of config.classes (e.g. "critical", "standard",
            "bulk"): the request is certified within its class's own bucket
            tree, at its class's epsilon and trace count; a class whose
            epsilon is 0 always runs uncut. None: the unclassed tree.
        consensus: False when the caller runs every trace at once and cannot
            run waves or consensus (e.g. the Stepper): the plan then uses the
            most aggressive certified threshold of the plain strategy.
        """
        consensus = check_bool("plan", "consensus", consensus)
        request_id = check_int("plan", "request_id", request_id)
        parts = normalize_key(key)
        if parts and parts[0].startswith(CLASS_PREFIX):
            raise ValueError(f"plan: key parts starting with {CLASS_PREFIX!r} name request classes; pass "
                             f"request_class= instead, got key {key!r}")
        if request_class is not None:
            known = [c[0] for c in self.config.classes]
            if request_class not in known:
                raise ValueError(f"plan: request_class must be one of {known} or None, got {request_class!r}")
            parts = (CLASS_PREFIX + request_class,) + parts
        if base is None:
            base = StopConfig()
        if not isinstance(base, StopConfig):
            raise TypeError(f"plan: base must be a haltwise.StopConfig or None, got {type(base).__name__}")
        if control is not None:
            control = check_bool("plan", "control", control)
        with self._lock:
            if self.store.request(request_id) is not None:
                raise ValueError(f"plan: request_id {request_id} was already planned")
            with self._write() as undo:
                if self.store.request(request_id) is not None:  # planned by another process meanwhile
                    raise ValueError(f"plan: request_id {request_id} was already planned")
                undo.append(self._snapshot(path_of(parts)))
                plan = self._plan(request_id, parts, base, control, consensus)
                if admit is not None:
                    admit(plan)
                return plan

    def _names_of(self, row: dict) -> list[str]:
        """The buckets a planned request belongs to ([] for a class that never cuts)."""
        cls = class_of(row["bucket"])
        if cls is not None and self._class_configs.get(cls) is None:
            return []
        return path_of(normalize_key(row["bucket"]))

    def _cfg(self, name: str) -> PolicyConfig:
        """The config a bucket runs under: its request class's, else the policy's."""
        cls = class_of(name)
        return self.config if cls is None else self._class_configs[cls]

    def _bucket(self, name: str) -> BucketState:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = BucketState(name=name)
            self._buckets[name] = bucket
            self._evidence[name] = {}
        return bucket

    def _plan(self, request_id: int, parts: tuple[str, ...], base: StopConfig, force_control: bool | None,
              consensus: bool = True) -> Plan:
        seq = self._seq
        names = path_of(parts)
        cls = class_of(names[-1])
        cfg = self._cfg(names[-1]) if cls is None or self._class_configs[cls] is not None else None
        if cfg is None:
            return self._plan_uncut(request_id, names[-1], base)
        path = [self._bucket(name) for name in names]
        overload = self._monitor.state.overload
        changed = set()
        for bucket in path:
            if self._ramp(bucket, seq, overload):
                changed.add(bucket.name)
        warm = [b for b in path if needs_warmup(b, cfg.warmup_requests)]
        u = control_draw(cfg.seed, request_id)
        if force_control:
            evidence_for = [b for b in path if b.frozen]
        elif force_control is None:
            evidence_for = [b for b in path
                            if b.frozen and u < (cfg.control_fraction if b.ready else cfg.control_boost)]
        else:
            evidence_for = []
        source, how = resolve(path)
        shadow = any(b.shadow for b in path)
        # the values of the source: normal (K traces) or, in overload once certified, the overload ones
        traces, index, row = cfg.traces, -1, 0
        normal_index = source.normal.index if source is not None and (how == "certified" or
                                                                      cfg.start == "deepconf") else -1
        normal_row = source.normal.strategy if source is not None and how == "certified" else cfg.start_row
        overload_values = overload and how == "certified" and any(b.ready and b.overload_ready for b in path)
        if warm:
            kind = "warmup"
        elif evidence_for or force_control:
            kind = "control"
        elif shadow:
            kind = "shadow"
        else:
            kind = "policy"
        if kind == "policy" and overload_values:
            # the overload values of the deepest ready bucket whose overload test has certified something
            source = next(b for b in reversed(path) if b.ready and b.overload_ready)
            traces, index, row = source.overload.traces, source.overload.index, source.overload.strategy
            if not consensus and cfg.strategy_rows[row].consensus is not None:  # the caller cannot run it
                traces, index, row = cfg.traces, max(source.normal.plain_certified, default=-1), 0
        elif kind == "policy":
            index, row = normal_index, normal_row
            if row != 0 and not consensus:  # the caller cannot run the strategy: the plain one's best certified
                index = max(source.normal.plain_certified, default=-1) if how == "certified" else -1
                row = 0
        elif kind == "shadow":
            index = normal_index  # shadow shadows the normal threshold on all K traces at once
        threshold = source.threshold_of(index) if source is not None else None
        run_threshold = threshold if kind in ("policy", "shadow") else None
        stop = dataclasses.replace(
            base, low_conf_signal=cfg.signal, window=cfg.window, min_new_tokens=cfg.min_new_tokens,
            low_conf_threshold=run_threshold, shadow=kind == "shadow" and run_threshold is not None,
            record_signals=kind in ("warmup", "control") or base.record_signals)
        epsilon = cfg.epsilon_overload if kind == "policy" and overload_values else cfg.epsilon
        strategy = cfg.strategy_rows[row]
        if kind == "policy":
            traces = strategy.traces
        # the user-report guard compares answers served with a cut to uncut ones: an exact strategy's
        # answer (all K traces, or unbeatable with no threshold) is the uncut answer
        exact = threshold is None and strategy.same_vote_as(cfg.strategy_rows[0])
        sliced = "cut" if kind == "policy" and not exact else "uncut"
        for bucket in warm:
            bucket.warmup_planned.append(request_id)
            changed.add(bucket.name)
        for bucket in evidence_for:
            self.store.add_evidence(bucket.name, request_id, seq)
        self.store.add_request(dict(
            request_id=request_id, seq=seq, bucket=names[-1], kind=kind,
            source=None if source is None else source.name, how=how, traces=traces,
            threshold=threshold, grid_index=index, strategy=row, overload=int(overload),
            shadow=int(kind == "shadow"), sliced=sliced))
        self._seq = seq + 1
        self.store.set_meta("seq", self._seq)
        for name in names:
            if name in changed or name not in self._persisted:
                self._persist(self._buckets[name])
        return Plan(request_id=request_id, key=names[-1],
                    source=None if source is None else source.name, how=how, kind=kind, stop=stop, traces=traces,
                    threshold=threshold, overload=overload,
                    epsilon=epsilon, strategy=strategy)

    def _plan_uncut(self, request_id: int, name: str, base: StopConfig) -> Plan:
        """A request of a class with no accuracy budget (epsilon 0): every
        trace runs to its end, nothing is certified or learned."""
        traces = next(k for c, _, k in self.config.classes if c == class_of(name)) or self.config.traces
        self.store.add_request(dict(request_id=request_id, seq=self._seq, bucket=name, kind="policy", source=None,
                                    how="uncut", traces=traces, threshold=None, grid_index=-1, strategy=0,
                                    overload=int(self._monitor.state.overload), shadow=0, sliced="uncut"))
        self._seq += 1
        self.store.set_meta("seq", self._seq)
        stop = dataclasses.replace(base, low_conf_threshold=None, shadow=False)
        return Plan(request_id=request_id, key=name, source=None, how="uncut", kind="policy", stop=stop,
                    traces=traces, threshold=None, overload=self._monitor.state.overload, epsilon=0.0)

    def _persist(self, bucket: BucketState) -> None:
        self.store.put_bucket(bucket.name, bucket.to_dict())
        self._persisted.add(bucket.name)

    # ---- ramps (the hysteresis of the EM loop) ------------------------------------------

    def _ramp(self, bucket: BucketState, seq: int, overload: bool) -> bool:
        """Raise the value in force of the active mode toward its target, through
        certified candidates only: to the most aggressive certified one at most
        ``max_raise_steps`` grid steps up (or, when none is that close, the next
        certified one), at most once per ``raise_interval`` requests and never
        within ``cooldown`` requests of a lowering."""
        cfg = self._cfg(bucket.name)
        if not bucket.ready:
            return False
        ramp = bucket.overload if (overload and bucket.overload_ready) else bucket.normal
        if seq < bucket.cooldown_until or seq - ramp.last_raise_seq < cfg.raise_interval:
            return False
        if ramp is bucket.normal and ramp.target_strategy != ramp.strategy and \
                (ramp.target_certified or ramp.target_strategy == 0):
            # another strategy certified and clearly better: switch to it at its least aggressive certified value
            old = (ramp.strategy, ramp.index)
            ramp.strategy, ramp.certified = ramp.target_strategy, list(ramp.target_certified)
            ramp.index = min(ramp.certified, default=-1)
            ramp.target = max(ramp.certified, default=-1)
            ramp.last_raise_seq = seq
            self.store.add_audit(seq, bucket.name, "strategy", cfg.strategy_rows[old[0]].name,
                                 cfg.strategy_rows[ramp.strategy].name,
                                 {"index": [old[1], ramp.index], "certified": len(ramp.certified)},
                                 "a certified strategy saves clearly more: switched at its least aggressive "
                                 "certified threshold")
            self._reset_slices(bucket, seq)
            return True
        if ramp.target <= ramp.index:
            return False
        above = [c for c in ramp.certified if ramp.index < c <= ramp.target]
        if not above:
            return False
        near = [c for c in above if c <= ramp.index + cfg.max_raise_steps]
        old = ramp.index
        ramp.index = max(near) if near else min(above)
        ramp.last_raise_seq = seq
        field = "overload_threshold" if ramp is bucket.overload else "threshold"
        self.store.add_audit(seq, bucket.name, field, bucket.threshold_of(old), bucket.threshold_of(ramp.index),
                             {"index": [old, ramp.index], "target": ramp.target, "traces": ramp.traces or cfg.traces,
                              "jump": not near},
                             f"raise toward the certified target through certified candidates (at most "
                             f"{cfg.max_raise_steps} grid steps per {cfg.raise_interval} requests)")
        self._reset_slices(bucket, seq)
        return True

    def _reset_slices(self, bucket: BucketState, seq: int) -> None:
        bucket.slices = SliceCounts(since_seq=seq)

    # ---- observing --------------------------------------------------------------------

    def observe(self, request_id: int, traces: Sequence, answers: Sequence[int | None] | None = None) -> int | None:
        """Report a request's finished traces (in trace order): TraceOutcome
        objects, or haltwise.Finished records together with `answers` (the
        answer extracted from each). Returns the answer the policy counts as
        served: the vote of the traces that ended on their own."""
        request_id = check_int("observe", "request_id", request_id)
        if isinstance(traces, (str, bytes)) or not hasattr(traces, "__len__"):
            raise TypeError(f"observe: traces must be a sequence, got {type(traces).__name__}")
        outcomes = self._as_outcomes(traces, answers)
        with self._lock:
            self._check_observe(request_id, self.store.request(request_id), outcomes)  # before any transaction
            with self._write():
                row = self.store.request(request_id)  # again: another process may have observed it meanwhile
                self._check_observe(request_id, row, outcomes)
                return self._observe(row, outcomes)

    def _unknown(self, call: str, request_id: int) -> str:
        """The error for a request id the database does not hold."""
        pruned = int(self.store.get_meta("pruned_before", 0))
        if pruned:
            return (f"{call}: request_id {request_id} is unknown: never planned, or pruned (prune() dropped the "
                    f"finished requests planned before request number {pruned})")
        return f"{call}: request_id {request_id} was never planned"

    def _check_observe(self, request_id: int, row: dict | None, outcomes: list[TraceOutcome]) -> None:
        if row is None:
            raise ValueError(self._unknown("observe", request_id))
        if row["observed"]:
            raise ValueError(f"observe: request_id {request_id} was already observed")
        if row["cancelled"]:
            raise ValueError(f"observe: request_id {request_id} was cancelled")
        if row["kind"] in ("warmup", "control"):
            if len(outcomes) != row["traces"]:
                raise ValueError(f"observe: a {row['kind']} request must report all its {row['traces']} traces, "
                                 f"got {len(outcomes)}")
            missing = [i for i, t in enumerate(outcomes) if t.signal is None]
            if missing:
                raise ValueError(f"observe: a {row['kind']} request needs every trace's signal "
                                 f"(record_signals); traces {missing[:5]} have none")
            bad = [i for i, t in enumerate(outcomes) if t.signal is not None and len(t.signal) != t.num_tokens]
            if bad:
                i = bad[0]
                raise ValueError(f"observe: traces[{i}].signal must have num_tokens={outcomes[i].num_tokens} "
                                 f"values, got {len(outcomes[i].signal)}")

    def _as_outcomes(self, traces: Sequence, answers) -> list[TraceOutcome]:
        if answers is not None and len(answers) != len(traces):
            raise ValueError(f"observe: answers must have one entry per trace ({len(traces)}), got {len(answers)}")
        out = []
        for i, t in enumerate(traces):
            if isinstance(t, TraceOutcome):
                if answers is not None:
                    t = dataclasses.replace(t, answer=answers[i])
                out.append(t)
            elif hasattr(t, "num_tokens") and hasattr(t, "reason"):
                if answers is None:
                    raise ValueError("observe: Finished records need answers= (the answer of each trace)")
                out.append(TraceOutcome.from_finished(t, answers[i], signal=self.config.signal))
            else:
                raise TypeError(f"observe: traces[{i}] must be a TraceOutcome or a haltwise.Finished, "
                                f"got {type(t).__name__}")
        for i, t in enumerate(out):
            if t.answer is not None and not isinstance(t.answer, (int, np.integer)):
                raise TypeError(f"observe: traces[{i}].answer must be an int or None, got {type(t.answer).__name__}")
            if t.num_tokens < 0:
                raise ValueError(f"observe: traces[{i}].num_tokens must be >= 0, got {t.num_tokens}")
            try:
                StopReason(int(t.reason))
            except ValueError:
                raise ValueError(f"observe: traces[{i}].reason must be a StopReason, got {t.reason!r}") from None
        return out

    def _vote(self, outcomes: Sequence[TraceOutcome], weighting: str) -> int | None:
        voters = [t for t in outcomes if StopReason(int(t.reason)) in VOTING_REASONS and t.answer is not None]
        weights = [vote_weight(t.mean_logprob) for t in voters] if weighting == "confidence" else None
        return weighted_vote([int(t.answer) for t in voters], weights)

    def _observe(self, row: dict, outcomes: list[TraceOutcome]) -> int | None:
        rid, kind = row["request_id"], row["kind"]
        names = self._names_of(row)
        cfg = self._cfg(names[-1]) if names else self.config
        path = [self._bucket(name) for name in names]
        served = self._vote(outcomes, cfg.strategy_rows[row.get("strategy", 0)].weighting)
        tokens = sum(int(t.num_tokens) for t in outcomes)
        cut = sum(StopReason(int(t.reason)) == StopReason.LOW_CONFIDENCE for t in outcomes)
        update = dict(observed=1, served_answer=_optional_int(served), tokens=tokens, cut_traces=cut)
        keep_signals = kind in ("warmup", "control")
        keep_traces = keep_signals or kind == "shadow"
        if kind == "shadow":
            voting = [StopReason(int(t.reason)) in VOTING_REASONS for t in outcomes]
            weights = [vote_weight(t.mean_logprob) for t in outcomes] \
                if cfg.weighting == "confidence" else None
            would = would_have(outcomes, [None if t.answer is None else int(t.answer) for t in outcomes], voting,
                               weights)
            update.update(would_answer=_optional_int(would.answer), would_tokens=would.tokens)
        self.store.update_request(rid, **update)
        row.update(update)
        if keep_traces:
            self.store.add_traces(rid, [dict(answer=_optional_int(t.answer), num_tokens=int(t.num_tokens),
                                             reason=int(t.reason),
                                             mean_logprob=None if math.isnan(t.mean_logprob) else t.mean_logprob,
                                             would_stop_step=int(t.would_stop_step),
                                             would_stop_reason=t.would_stop_reason,
                                             signal=t.signal if keep_signals else None) for t in outcomes])
        changed = set()
        profiles: list[TraceProfile] = []
        replayable = False  # every trace ended on its own: the replay of a cut is exact
        if keep_signals:
            # the policy works on the float16-rounded signals it stores, so a restarted process replays the same
            profiles = [trace_profile(np.asarray(t.signal, np.float16), reason=int(t.reason), answer=t.answer,
                                      window=cfg.window,
                                      min_new_tokens=cfg.min_new_tokens, mean_logprob=t.mean_logprob)
                        for t in outcomes]
            replayable = all(StopReason(int(t.reason)) in _NATURAL_ENDS for t in outcomes)
        # warm-up: collect, and freeze the grid when complete
        for bucket in path:
            if rid in bucket.warmup_planned and not bucket.frozen:
                bucket.warmup_observed.append(rid)
                bucket.warmup_lowests.extend(p.lowest for p in profiles)
                changed.add(bucket.name)
                if len(bucket.warmup_observed) >= cfg.warmup_requests:
                    if any(not math.isnan(v) for v in bucket.warmup_lowests):
                        self._freeze(bucket)
                    else:  # every warm-up trace was shorter than min_new_tokens: nothing to calibrate on yet
                        self.store.add_audit(self._seq, bucket.name, "grid", None, None,
                                             {"warmup_requests": len(bucket.warmup_observed),
                                              "min_new_tokens": cfg.min_new_tokens},
                                             "warm-up traces too short for the confidence rules; warming up again")
                        bucket.warmup_planned, bucket.warmup_observed, bucket.warmup_lowests = [], [], []
        # control evidence
        if keep_signals:
            if not replayable:  # never in a window: drop its rows so a restart's window is the one in memory
                self.store.remove_evidence(rid)
            for name in self.store.evidence_buckets(rid):
                bucket = self._buckets[name]
                if not replayable or not bucket.frozen:
                    continue
                entry = _Evidence(seq=row["seq"], outcomes=self._outcomes(bucket, profiles))
                if self._label_entry(entry, row):
                    self._count_labelled(bucket)
                self._evidence[name][rid] = entry
                self._prune(name)
                bucket.pending_evidence += 1
                changed.add(name)
        # shadow, slices, and labels that arrived before this observation
        for bucket in path:
            if kind == "shadow" and bucket.shadow:
                sc = bucket.shadow_counts
                sc.requests += 1
                sc.tokens_uncut += tokens
                sc.tokens_would += row["would_tokens"]
                sc.flips += int(row["would_answer"] != row["served_answer"])
                changed.add(bucket.name)
            if row["seq"] >= bucket.slices.since_seq:
                if row["sliced"] == "cut":
                    bucket.slices.cut_n += 1
                else:
                    bucket.slices.uncut_n += 1
                changed.add(bucket.name)
        if row["label"] is not None:
            self._count_label(path, row)
        if row["user_bad"]:
            self._count_report(path, row, row["user_bad"])
        for bucket in path:
            if bucket.pending_evidence >= cfg.evaluate_every:
                self._evaluate(bucket)
            self._persist(bucket)
        return served

    def _freeze(self, bucket: BucketState) -> None:
        cfg = self._cfg(bucket.name)
        grid = make_grid(bucket.warmup_lowests, self._levels)
        bucket.grid = [float(t) for t in grid]
        self._persist(bucket)
        self.store.put_grid(bucket.name, bucket.grid)
        bucket.frozen_seq = self._seq
        bucket.deepconf_index = deepconf_index(bucket.warmup_lowests, cfg.keep_percent, grid)
        start = bucket.deepconf_index if cfg.start == "deepconf" else -1
        bucket.normal.index = bucket.normal.target = start
        traces = len(bucket.warmup_lowests)
        bucket.warmup_lowests = []  # the grid holds what they said; keep the state small
        self.store.add_audit(self._seq, bucket.name, "grid", None, bucket.grid,
                             {"warmup_requests": len(bucket.warmup_observed), "traces": traces,
                              "levels": [cfg.grid_low, cfg.grid_high, cfg.grid_size]},
                             "warm-up done: candidate thresholds are quantiles of the warm-up traces' lowest "
                             "window means")
        self.store.add_audit(self._seq, bucket.name, "threshold", None, bucket.threshold_of(start),
                             {"keep_percent": cfg.keep_percent, "index": start, "traces": traces},
                             "DeepConf start (not certified)" if cfg.start == "deepconf" else "start uncut")

    def _prune(self, name: str) -> None:
        entries = self._evidence[name]
        if len(entries) > 2 * self._cfg(name).evidence_window:
            self._evidence[name] = {rid: entries[rid] for rid in self._window_ids(name)}

    # ---- labels -----------------------------------------------------------------------

    def _label_of(self, row: dict) -> tuple[bool | None, int | None]:
        """(correct, reference) as the test may use them, or (None, None)."""
        if row["label"] is not None:
            return bool(row["label"]), _optional_int(row["reference"])
        if self.config.unlabeled == "worst_case":
            if row["user_bad"] >= 1.0 and row["user_bad"] > row["user_good"]:
                return False, None
            return True, None  # unknown or reported right: D = [answer changed], an upper bound either way
        return None, None

    @staticmethod
    def _count_labelled(bucket: BucketState) -> None:
        """One more labelled control request for the re-test schedule (anytime.py)."""
        state = AnytimeState.from_dict(bucket.anytime)
        state.labelled += 1
        bucket.anytime = state.to_dict()

    def _label_entry(self, entry: _Evidence, row: dict) -> bool:
        """Set an evidence entry's paired differences from the request's labels.
        Returns whether the entry counts for the test now and did not before."""
        was = entry.d is not None
        correct, reference = self._label_of(row)
        if correct is None:
            entry.d, entry.right, entry.has_reference = None, None, False
            return False
        entry.d = differences(entry.outcomes, correct=correct, reference=reference)
        entry.right = correct if row["label"] is not None else None
        entry.has_reference = reference is not None
        return not was

    def feedback(self, request_id: int, correct: bool, *, source: str = "label", weight: float = 1.0,
                 reference: int | None = None) -> None:
        """Whether the answer served for `request_id` was right.

        source: "label" (ground truth, e.g. graded against a reference:
            decisive, the latest wins) or "user" (a user's report: evidence
            with its weight; reports on a request add up)
        weight: in (0, 1], the trust in a user report (labels: 1)
        reference: the right answer, when known: the test then also counts the
            requests a cut would have fixed

        Returns once the feedback is durable (acknowledged).
        """
        request_id = check_int("feedback", "request_id", request_id)
        correct = check_bool("feedback", "correct", correct)
        if not isinstance(source, str) or source not in SOURCES:
            raise ValueError(f"feedback: source must be one of {SOURCES}, got {source!r}")
        weight = check_float("feedback", "weight", weight, 0.0, 1.0)
        if weight == 0.0:
            raise ValueError("feedback: weight must be in (0, 1], got 0.0")
        if source == "label" and weight != 1.0:
            raise ValueError(f"feedback: a label (source='label') has weight 1.0, got {weight}")
        if reference is not None:
            reference = check_int("feedback", "reference", reference)
            if source != "label":
                raise ValueError("feedback: reference is only for source='label'")
        with self._lock:
            self._check_feedback(request_id, self.store.request(request_id), correct, reference)
            with self._write():
                row = self.store.request(request_id)  # again, inside the transaction: the current counters
                self._check_feedback(request_id, row, correct, reference)
                self._feedback(row, correct, source, weight, reference)

    def _check_feedback(self, request_id: int, row: dict | None, correct: bool, reference: int | None) -> None:
        if row is None:
            raise ValueError(self._unknown("feedback", request_id))
        if reference is not None and row["observed"]:
            served = row["served_answer"]
            if (served is not None and served == reference) != correct:
                raise ValueError(f"feedback: correct={correct} contradicts reference={reference} for the "
                                 f"served answer {served}")

    def _feedback(self, row: dict, correct: bool, source: str, weight: float, reference: int | None) -> None:
        rid = row["request_id"]
        self.store.add_feedback(rid, correct, source, weight, reference)
        first_label = source == "label" and row["label"] is None
        if source == "label":
            self.store.update_request(rid, label=int(correct),
                                      reference=reference if reference is not None else row["reference"])
        else:  # a user report adds up, in SQL: a report from another process is never overwritten
            self.store.add_to_request(rid, "user_good" if correct else "user_bad", weight)
        row.update(self.store.request(rid))
        if not row["observed"]:
            return  # applied when the request is observed
        path = [self._bucket(name) for name in self._names_of(row)]
        if first_label:
            self._count_label(path, row)
        if source == "user" and not correct:
            self._count_report(path, row, weight)
        for name in self.store.evidence_buckets(rid):
            entry = self._evidence.get(name, {}).get(rid)
            if entry is None:
                continue
            if self._label_entry(entry, row):
                self._count_labelled(self._buckets[name])
            self._buckets[name].pending_evidence += 1
        for bucket in path:
            if bucket.pending_evidence >= self.config.evaluate_every:
                self._evaluate(bucket)
            self._persist(bucket)

    def _count_label(self, path: list[BucketState], row: dict) -> None:
        """A request's first label: shadow and slice summaries."""
        right = bool(row["label"])
        reference = row["reference"]
        for bucket in path:
            if row["kind"] == "shadow" and bucket.shadow:
                sc = bucket.shadow_counts
                sc.labeled += 1
                changed = row["would_answer"] != row["served_answer"]
                sc.harms += int(right and changed)
                sc.helps += int(not right and reference is not None and row["would_answer"] == reference)
            if row["seq"] >= bucket.slices.since_seq:
                s = bucket.slices
                if row["sliced"] == "cut":
                    s.cut_labeled += 1
                    s.cut_right += int(right)
                else:
                    s.uncut_labeled += 1
                    s.uncut_right += int(right)

    def _count_report(self, path: list[BucketState], row: dict, weight: float) -> None:
        for bucket in path:
            if row["seq"] >= bucket.slices.since_seq:
                if row["sliced"] == "cut":
                    bucket.slices.cut_bad += weight
                else:
                    bucket.slices.uncut_bad += weight
                bucket.pending_evidence += 1

    def cancel(self, request_id: int) -> bool:
        """A planned request that will never be observed (cancelled, failed):
        frees its warm-up place. False if unknown, observed or already cancelled."""
        request_id = check_int("cancel", "request_id", request_id)
        with self._lock:
            row = self.store.request(request_id)
            if row is None or row["observed"] or row["cancelled"]:
                return False
            with self._write():
                row = self.store.request(request_id)
                if row["observed"] or row["cancelled"]:  # another process got there first
                    return False
                self.store.update_request(request_id, cancelled=1)
                for name in self._names_of(row):
                    bucket = self._bucket(name)
                    if request_id in bucket.warmup_planned and not bucket.frozen:
                        bucket.warmup_planned.remove(request_id)
                        self._persist(bucket)
            return True

    # ---- retention --------------------------------------------------------------------

    def prune(self, *, keep_last: int) -> dict[str, int]:
        """Bounds the database: deletes the request, trace and evidence rows
        that no decision, restart or pending call can need any more -- those
        of the requests planned more than `keep_last` requests ago that were
        observed or cancelled and are in no bucket's evidence window.

        Kept: every request still waiting for observe(), the control requests
        of every bucket's evidence window (what a restart rebuilds the tests
        from), bucket states, feedback and audit rows. The decision state is
        unchanged (state() before and after are equal, and so is a restart's).
        A label or report for a pruned request is refused with a ValueError,
        so choose keep_last beyond the latest a label can arrive. Request ids
        must stay unique over the policy's life; a pruned id can no longer be
        checked against a later plan(). SQLite reuses the freed pages, so the
        file stops growing (VACUUM shrinks it). Returns the rows deleted per
        table."""
        keep_last = check_int("prune", "keep_last", keep_last, 0)
        with self._lock:
            with self._write():
                keep: set[int] = set()
                for name, bucket in self._buckets.items():
                    if bucket.frozen:
                        # what a restart rebuilds, and what this process tests on
                        keep.update(self.store.evidence_window(name, self._cfg(name).evidence_window))
                        keep.update(self._window_ids(name))
                before = self._seq - keep_last
                deleted = self.store.prune(before, keep)
                if before > int(self.store.get_meta("pruned_before", 0)):
                    self.store.set_meta("pruned_before", before)
                # memory needs no change: an entry whose rows went is older than its bucket's window, never used
                # again, and dropped by the next trim
            return deleted

    # ---- the test ---------------------------------------------------------------------

    def _window_ids(self, name: str) -> list[int]:
        """The bucket's evidence window: its most recent control requests in plan
        order, at most its config's evidence_window (a class's is at least its
        min_evidence)."""
        entries = self._evidence.get(name, {})
        return sorted(entries, key=lambda rid: entries[rid].seq)[-self._cfg(name).evidence_window:]

    def _window(self, name: str) -> list[_Evidence]:
        entries = self._evidence.get(name, {})
        return [entries[rid] for rid in self._window_ids(name)]

    def _stats(self, bucket: BucketState) -> "_WindowStats":
        window = self._window(bucket.name)
        used = [e for e in window if e.d is not None]
        stats = _WindowStats(n=len(used), control=len(window))
        if not used:
            return stats
        d = np.stack([e.d for e in used])  # (n, R, G + 1)
        stats.test = self.config.test
        if stats.test == "auto":
            stats.test = "mcnemar" if any(e.has_reference for e in used) else "binomial"
        stats.harms = (d == 1).sum(axis=0)
        stats.helps = (d == -1).sum(axis=0)
        stats.mean_d = d.mean(axis=0)
        stats.tokens = np.stack([e.outcomes.tokens for e in window]).mean(axis=0)  # (R, G + 1)
        rights = [e.right for e in used if e.right is not None]
        stats.em_uncut = float(np.mean(rights)) if rights else math.nan
        return stats

    def _evaluate(self, bucket: BucketState) -> None:
        """Re-run the test of one bucket and move its targets (and, downward,
        its values in force)."""
        cfg = self._cfg(bucket.name)
        bucket.pending_evidence = 0
        if not bucket.frozen:
            return
        stats = self._stats(bucket)
        n = stats.n
        was_ready = bucket.ready
        anytime = AnytimeState.from_dict(bucket.anytime)
        bucket.labeled, bucket.control = n, stats.control
        if not n:
            bucket.last_eval = {"n": 0, "control": stats.control}
            return
        test, harms, helps, tokens, correct_uncut = stats.test, stats.harms, stats.helps, stats.tokens, stats.em_uncut
        G = len(bucket.grid)
        # the families of tests (anytime.policy_families), each a function of the level; the re-test schedule
        # (anytime.py) picks the levels; only a checkpoint adds candidates
        families = policy_families(cfg, harms, helps, n, test)
        sets, checkpoint = Certifier(cfg.schedule()).evaluate(anytime, families)
        bucket.anytime = anytime.to_dict()
        bucket.ready = anytime.checkpoints >= 1
        # the targets (evaluation.py): normal mode over every certified (strategy row, grid index), overload over
        # the trace counts; objective "value" ranks by expected value instead of tokens
        if cfg.objective == "value":
            tables = {r: stats.table(r, [None] * (G + 1), cfg) for r in range(len(cfg.strategy_rows))}
            gain = lambda r, c: tables[r][c]["value"]  # noqa: E731
        else:
            gain = token_gain(tokens)
        ramp = bucket.normal
        guard = self._guard(bucket)
        if guard is None or not bucket.ready or (ramp.strategy == 0 and ramp.index < 0):
            guard = None
        choice = choose(sets, gain=gain, in_force=(ramp.strategy, ramp.index), strategy_rows=cfg.strategy_rows,
                        trace_options=cfg.trace_options, overload_row=bucket.overload.target_strategy, guard=guard)
        rows, target_row, target, best = choice.rows, choice.target_row, choice.target, choice.overload
        certified = rows.get(0, [])
        row0_target = max(certified, default=-1)
        fail = next((c for c in range(G) if c not in certified and c > row0_target), None)
        bucket.last_eval = {
            "seq": self._seq, "n": n, "control": stats.control, "test": test, "certified": len(certified),
            "target": target, "strategy": cfg.strategy_rows[target_row].name,
            "strategies_certified": {cfg.strategy_rows[r].name: len(cs) for r, cs in rows.items()},
            "tokens_target": float(tokens[target_row, target + 1]),
            "em_uncut": correct_uncut, "tokens_uncut": float(tokens[0, 0]),
            "first_uncertified": None if fail is None else
            {"index": fail, "threshold": bucket.grid[fail], "harms": int(harms[0, fail + 1]),
             "helps": int(helps[0, fail + 1])},
            "overload": None if best is None else {"traces": best.traces, "index": best.index,
                                                   "strategy": cfg.strategy_rows[best.row].name},
            "guard": guard, "labelled": anytime.labelled, "checkpoint": anytime.checkpoints,
            "level": cfg.schedule().level(anytime.checkpoints) if anytime.checkpoints else None,
            "at_checkpoint": checkpoint,
        }
        if not bucket.ready:
            return
        if not was_ready:
            self.store.add_audit(self._seq, bucket.name, "ready", False, True,
                                 {"labeled": n, "control": stats.control, "min_evidence": cfg.min_evidence},
                                 "first checkpoint of the re-test schedule reached: the bucket's own test now decides")
        self._set_target(bucket, rows, target_row, target, n, test, harms, helps, guard)
        if best is not None:
            self._set_overload_target(bucket, best.row, best.traces, best.index, best.certified, n, test)
        elif bucket.overload_ready:
            bucket.overload_ready = False
            self.store.add_audit(self._seq, bucket.name, "overload_threshold", None, None, {"n": n, "test": test},
                                 "no overload candidate certified: overload runs the normal values")

    def _set_target(self, bucket: BucketState, rows: dict[int, list[int]], target_row: int, target: int, n: int,
                    test: str, harms, helps, guard) -> None:
        """New certified sets and target of the normal mode. A value in force
        that is no longer certified (or above the target in its row) drops at
        once: to the most aggressive certified candidate below it in its row,
        or, when its row has none, to the uncut plain strategy (row 0, no cut); an
        exact strategy always holds its "no cut" (evaluation.choose)."""
        cfg = self._cfg(bucket.name)
        ramp = bucket.normal
        old_target = (ramp.target_strategy, ramp.target)
        certified = rows.get(ramp.strategy, [])
        ramp.certified = list(certified)
        ramp.plain_certified = list(rows.get(0, []))
        ramp.target_strategy, ramp.target_certified = target_row, list(rows.get(target_row, []))
        # the target within the row in force (its best certified one when the strategy will change)
        ramp.target = target if target_row == ramp.strategy else max(certified, default=-1)
        allowed = ramp.index in certified or (ramp.strategy == 0 and ramp.index == -1)
        if not allowed or ramp.index > ramp.target:
            old = (ramp.strategy, ramp.index)
            below = [c for c in certified if c <= min(ramp.index, ramp.target)]
            if ramp.strategy != 0 and not below:
                ramp.strategy, ramp.index = 0, -1
                ramp.certified = list(rows.get(0, []))
                ramp.target = target if target_row == 0 else max(ramp.certified, default=-1)
            else:
                ramp.index = max(below, default=-1)
            bucket.cooldown_until = self._seq + cfg.cooldown
            evidence = {"n": n, "test": test, "epsilon": cfg.epsilon, "delta": cfg.delta,
                        "index": [old[1], ramp.index], "strategy": [cfg.strategy_rows[old[0]].name,
                                                                    cfg.strategy_rows[ramp.strategy].name],
                        "certified": len(certified)}
            if old[1] >= 0 or old[0]:
                h, g = int(harms[old[0], old[1] + 1]), int(helps[old[0], old[1] + 1])
                evidence.update(harms=h, helps=g, p_value=ltt.p_value(test, h, g, n, cfg.epsilon))
            if guard is not None:
                evidence["guard"] = guard
                reason = (f"user-report guard: bad-report rate on cut answers {guard['cut_rate']:.3f} vs uncut "
                          f"{guard['uncut_rate']:.3f} (z={guard['z']:.1f}); stepped back")
            else:
                reason = (f"lowered at once: the value in force is no longer certified (EM drop <= "
                          f"{cfg.epsilon} not shown at 1 - delta = {1 - cfg.delta:.2f})")
            if old[0] != ramp.strategy:
                evidence["threshold"] = [bucket.threshold_of(old[1]), bucket.threshold_of(ramp.index)]
                self.store.add_audit(self._seq, bucket.name, "strategy", cfg.strategy_rows[old[0]].name,
                                     cfg.strategy_rows[ramp.strategy].name, evidence, reason)
            else:
                self.store.add_audit(self._seq, bucket.name, "threshold", bucket.threshold_of(old[1]),
                                     bucket.threshold_of(ramp.index), evidence, reason)
            self._reset_slices(bucket, self._seq)
        elif (target_row, target) != old_target:
            self.store.add_audit(self._seq, bucket.name, "target", bucket.threshold_of(old_target[1]),
                                 bucket.threshold_of(target),
                                 {"n": n, "test": test, "index": [old_target[1], target], "in_force": ramp.index,
                                  "strategy": [cfg.strategy_rows[old_target[0]].name,
                                               cfg.strategy_rows[target_row].name],
                                  "certified": len(certified)},
                                 "certified target moved; the value in force follows at the rate limit")

    def _set_overload_target(self, bucket: BucketState, row: int, traces: int, index: int, certified: list[int],
                             n: int, test: str) -> None:
        ramp = bucket.overload
        old = (ramp.target_traces, ramp.target)
        old_row = ramp.target_strategy
        ramp.target_strategy, ramp.target_traces, ramp.target = row, traces, index
        newly = not bucket.overload_ready
        bucket.overload_ready = True
        same_family = ramp.traces == traces and ramp.strategy == row
        ramp.certified = list(certified)
        if self._monitor.state.overload:
            if not same_family:
                self._enter_overload_values(bucket)
            elif ramp.index > index or ramp.index not in certified:
                prev = ramp.index
                ramp.index = max((c for c in certified if c <= min(prev, index)), default=min(certified))
                bucket.cooldown_until = self._seq + self._cfg(bucket.name).cooldown
                self.store.add_audit(self._seq, bucket.name, "overload_threshold", bucket.threshold_of(prev),
                                     bucket.threshold_of(ramp.index), {"n": n, "test": test, "traces": traces},
                                     "lowered at once: the overload value in force is no longer certified")
        if newly or old != (traces, index) or old_row != row:
            self.store.add_audit(self._seq, bucket.name, "overload_target",
                                 {"traces": old[0], "threshold": bucket.threshold_of(old[1])},
                                 {"traces": traces, "threshold": bucket.threshold_of(index)},
                                 {"n": n, "test": test, "epsilon_overload": self._cfg(bucket.name).epsilon_overload,
                                  "certified": len(certified),
                                  "strategy": self._cfg(bucket.name).strategy_rows[row].name},
                                 "certified overload target (fewest tokens among the certified chains)")

    def _enter_overload_values(self, bucket: BucketState) -> None:
        """Overload values: the certified trace count at once, and the most
        aggressive certified threshold no more aggressive than the normal value
        in force (the least aggressive certified one if none is); then they ramp
        like any raise."""
        ramp = bucket.overload
        old = (ramp.traces, ramp.index)
        ramp.traces, ramp.strategy = ramp.target_traces, ramp.target_strategy
        floor = bucket.normal.index
        ramp.index = max((c for c in ramp.certified if c <= floor), default=min(ramp.certified))
        ramp.last_raise_seq = self._seq
        self.store.add_audit(self._seq, bucket.name, "overload_values",
                             {"traces": old[0], "threshold": bucket.threshold_of(old[1])},
                             {"traces": ramp.traces, "threshold": bucket.threshold_of(ramp.index)},
                             {"target": {"traces": ramp.target_traces, "threshold": bucket.threshold_of(ramp.target)}},
                             "overload: the certified trace count at once, the threshold from the normal value up")

    def _guard(self, bucket: BucketState) -> dict | None:
        """User-report guard: compares the weight of bad reports per served
        request on answers served with a cut and on uncut ones (control,
        warm-up, shadow) since the last change. Fires when the one-sided
        two-proportion z-score exceeds guard_z."""
        cfg = self.config
        s = bucket.slices
        if s.cut_n < cfg.guard_min_requests or s.uncut_n < cfg.guard_min_requests:
            return None
        rc, ru = min(1.0, s.cut_bad / s.cut_n), min(1.0, s.uncut_bad / s.uncut_n)
        pooled = (s.cut_bad + s.uncut_bad) / (s.cut_n + s.uncut_n)
        se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / s.cut_n + 1 / s.uncut_n))
        z = (rc - ru) / se
        return {"cut_rate": rc, "uncut_rate": ru, "z": z} if z > cfg.guard_z else None

    # ---- load -------------------------------------------------------------------------

    def observe_load(self, *, queue_depth: float | None = None, p95_latency_s: float | None = None,
                     kv_utilization: float | None = None) -> bool:
        """One observation of the serving figures (load.py: hysteresis).
        Returns whether the policy is now in overload mode."""
        with self._lock:
            with self._write():
                overload, switched = self._monitor.observe(queue_depth=queue_depth, p95_latency_s=p95_latency_s,
                                                           kv_utilization=kv_utilization)
                self.store.set_meta("load", self._monitor.state.to_dict())
                if switched:
                    s = self._monitor.state
                    self.store.add_audit(
                        self._seq, "", "overload", not overload, overload,
                        {"figures": s.last, "slos": self._monitor.slos,
                         "exit_fraction": self.config.exit_fraction, "observations": s.observations},
                        "overload: a figure stayed above its SLO" if overload else
                        "load fell: every figure stayed under exit_fraction x its SLO; normal budget again")
                    if overload:
                        for bucket in self._buckets.values():
                            if bucket.overload_ready:
                                self._enter_overload_values(bucket)
                                self._persist(bucket)
            return overload

    @property
    def overload(self) -> bool:
        return self._monitor.state.overload

    # ---- shadow -----------------------------------------------------------------------

    def set_shadow(self, key, on: bool = True) -> None:
        """Run a bucket (and the buckets under it) in shadow mode: its requests
        run uncut and record where the policy would have cut them."""
        parts = normalize_key(key)
        on = check_bool("set_shadow", "on", on)
        with self._lock:
            with self._write():
                names = path_of(parts)
                for name in names:
                    self._bucket(name)
                bucket = self._buckets[names[-1]]
                if bucket.shadow != on:
                    self.store.add_audit(self._seq, bucket.name, "shadow", bucket.shadow, on, {},
                                         "operator" + (": shadow on, nothing is cut" if on else ": shadow off"))
                    bucket.shadow = on
                for name in names:
                    self._persist(self._buckets[name])

    # ---- reports ----------------------------------------------------------------------

    def thresholds(self) -> dict[str, dict]:
        """Per bucket: readiness, the values in force (normal and overload) and the evidence counts."""
        with self._lock:
            self._refresh()
            out = {}
            for name, b in sorted(self._buckets.items()):
                out[name] = {
                    "frozen": b.frozen, "ready": b.ready, "shadow": b.shadow,
                    "threshold": b.threshold_of(b.normal.index), "target": b.threshold_of(b.normal.target),
                    "index": b.normal.index, "traces": self._cfg(name).traces,
                    "epsilon": self._cfg(name).epsilon,
                    "strategy": self._cfg(name).strategy_rows[b.normal.strategy].name,
                    "overload_threshold": b.threshold_of(b.overload.index) if b.overload_ready else None,
                    "overload_traces": (b.overload.traces or b.overload.target_traces) if b.overload_ready else None,
                    "labeled": b.labeled, "control": b.control,
                    "warmup": f"{len(b.warmup_observed)}/{self.config.warmup_requests}",
                }
            return out

    def report(self, *, last_changes: int = 10) -> dict:
        """Everything `haltwise policy show` prints."""
        cfg = self.config
        with self._lock:
            self._refresh()
            buckets = {}
            for name, b in sorted(self._buckets.items()):
                entry = self.thresholds()[name]
                ev = dict(b.last_eval)
                stats = self._stats(b) if b.frozen else None
                own = self._cfg(name)  # the bucket's request class's config (its epsilon)
                if stats is not None and stats.n:
                    # the candidates of the strategy in force around its threshold
                    table = stats.table(b.normal.strategy, [None] + list(b.grid), own)
                    idx = b.normal.index
                    rows = {}
                    for label, j in (("lower", idx - 1), ("chosen", idx), ("higher", idx + 1)):
                        if -1 <= j < len(b.grid):
                            rows[label] = table[j + 1]
                    entry["candidates"] = rows
                fail = dict(ev["first_uncertified"]) if ev.get("first_uncertified") else None
                if fail is not None and ev.get("n"):
                    ev["first_uncertified"] = fail
                    fail["p_value"] = ltt.p_value(ev["test"], fail["harms"], fail["helps"], ev["n"], own.epsilon)
                entry["last_eval"] = ev
                if b.shadow or b.shadow_counts.requests:
                    entry["shadow_summary"] = summarize_shadow(b.shadow_counts, delta=cfg.delta)
                s = b.slices
                entry["served"] = {
                    "em_cut": s.cut_right / s.cut_labeled if s.cut_labeled else None, "labeled_cut": s.cut_labeled,
                    "em_uncut": s.uncut_right / s.uncut_labeled if s.uncut_labeled else None,
                    "labeled_uncut": s.uncut_labeled, "bad_reports_cut": s.cut_bad, "bad_reports_uncut": s.uncut_bad,
                }
                buckets[name] = entry
            return {
                "config": {"epsilon": cfg.epsilon, "delta": cfg.delta, "epsilon_overload": cfg.epsilon_overload,
                           "signal": cfg.signal, "window": cfg.window, "traces": cfg.traces,
                           "control_fraction": cfg.control_fraction},
                "requests": self._seq, "overload": self._monitor.state.overload,
                "load": self._monitor.state.to_dict(), "feedback": self.store.feedback_count(),
                "buckets": buckets, "changes": self.store.audit(last_changes),
            }

    def audit(self, last: int | None = None) -> list[dict]:
        """The audit trail (oldest first): every change of a value in force."""
        with self._lock:
            return self.store.audit(last)

    def state(self) -> dict:
        """A deterministic snapshot of the decision state (for tests and
        restarts): request counter, buckets, load, evidence per bucket,
        feedback count."""
        with self._lock:
            self._refresh()
            return {
                "seq": self._seq,
                "buckets": {name: b.to_dict() for name, b in sorted(self._buckets.items())},
                "load": self._monitor.state.to_dict(),
                "evidence": {name: [(e.seq, e.d is not None) for e in self._window(name)]
                             for name in sorted(self._evidence)},
                "feedback": self.store.feedback_count(),
            }
