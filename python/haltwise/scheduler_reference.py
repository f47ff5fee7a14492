"""A pure-Python scheduler with the semantics of :class:`haltwise.Scheduler`
(written out in ``haltwise/scheduler.py``), kept plain so that it can be read
against them line by line. The differential fuzz test checks the native
scheduler against it, plan by plan; the scheduler benchmark measures the
native one against it.

It favours the obvious over the fast, but is not slowed on purpose: rules are
O(1) per token (stop sequences are checked as suffixes, only those ending in
the token just generated) and admission compares class heads, as the native
one does.
"""
from __future__ import annotations

import heapq
import math
from typing import NamedTuple, Optional

import numpy as np

from .scheduler import (
    RECORDED_SIGNALS,
    Finished,
    QueueFull,
    StepPlan,
    StopConfig,
    StopReason,
    check_int,
    check_scheduler_options,
    check_max_weight,
    check_submit,
    check_weight,
)

NAN = float("nan")
_SAVES_TOKENS = (StopReason.LOW_CONFIDENCE, StopReason.CONFIDENT, StopReason.GROUP_CONSENSUS)
_SIGNAL_FIELDS = ("logprob", "entropy", "confidence", "margin", "topk_conf")


class ReferenceFinished(NamedTuple):
    """:class:`haltwise.Finished` of the reference scheduler."""

    request_id: int
    reason: StopReason
    group: Optional[int]
    num_tokens: int
    tokens: np.ndarray  # (num_tokens,) int64
    mean_topk_conf: float
    mean_logprob: float
    mean_neg_entropy: float
    mean_signal: float
    min_window_mean: float
    last_window_mean: float
    last_entropy: float
    steps_below_threshold: int
    would_stop_step: int
    would_stop_reason: Optional[StopReason]
    signals: Optional[dict]  # name -> (num_tokens,) float32


class ReferenceStepPlan(NamedTuple):
    """:class:`haltwise.StepPlan` of the reference scheduler."""

    finished: list
    keep: np.ndarray  # int64
    admitted: list  # [(request_id, row or slot)]
    request_ids: np.ndarray  # (next_batch,) int64
    positions: np.ndarray  # (next_batch,) int64
    active: Optional[np.ndarray]  # slots: (capacity,) bool
    free_slots: Optional[np.ndarray]  # slots: int64


Finished.register(ReferenceFinished)
StepPlan.register(ReferenceStepPlan)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _int64(values) -> np.ndarray:
    return _read_only(np.array(values, dtype=np.int64).reshape(-1))


class _Rules:
    """A StopConfig, preprocessed once per scheduler."""

    def __init__(self, stop: StopConfig):
        self.stop = stop
        self.eos = frozenset(stop.eos_ids)
        self.by_last_token: dict[int, list[tuple[int, ...]]] = {}
        for sequence in stop.stop_sequences:
            self.by_last_token.setdefault(sequence[-1], []).append(sequence)
        self.first_evaluated = max(1, stop.min_new_tokens)


class _Request:
    """A submitted request: queued, then (once admitted) running."""

    __slots__ = ("request_id", "seq", "priority", "group", "max_new_tokens", "rules", "submitted_at")

    def __init__(self, request_id, seq, priority, group, max_new_tokens, rules, submitted_at):
        self.request_id = request_id
        self.seq = seq
        self.priority = priority
        self.group = group
        self.max_new_tokens = max_new_tokens
        self.rules = rules
        self.submitted_at = submitted_at


class _Trace:
    """The running state of one active sequence and its stop rules."""

    def __init__(self, request: _Request):
        self.request = request
        self.rules = request.rules
        self.pending_end: Optional[StopReason] = None
        self.tokens: list[int] = []
        self.recorded: Optional[dict[str, list[float]]] = (
            {name: [] for name in RECORDED_SIGNALS} if request.rules.stop.record_signals else None)
        self.invalid = False
        self.sums = dict(topk_conf=0.0, logprob=0.0, neg_entropy=0.0, signal=0.0)
        window = request.rules.stop.window
        self.ring = [0.0] * min(window, request.max_new_tokens)
        self.window_sum = 0.0
        self.min_window_mean = 0.0
        self.evaluated = False
        self.last_entropy = 0.0
        self.confident_streak = 0
        self.steps_below = 0
        self.would_stop_step = -1
        self.would_stop_reason: Optional[StopReason] = None

    def on_token(self, token, logprob, entropy, confidence, margin, topk_conf, status) -> Optional[StopReason]:
        stop = self.rules.stop
        self.tokens.append(token)
        n = len(self.tokens)
        if self.recorded is not None:
            for name, value in zip(RECORDED_SIGNALS, (topk_conf, logprob, entropy, confidence, margin)):
                self.recorded[name].append(value)
        if status != 0 or any(math.isnan(v) for v in (logprob, entropy, confidence, margin, topk_conf)):
            self.invalid = True
            return StopReason.INVALID_LOGITS

        neg_entropy = -entropy
        value = {"topk_conf": topk_conf, "logprob": logprob, "confidence": confidence, "margin": margin,
                 "neg_entropy": neg_entropy}[stop.low_conf_signal]
        self.sums["topk_conf"] += topk_conf
        self.sums["logprob"] += logprob
        self.sums["neg_entropy"] += neg_entropy
        self.sums["signal"] += value
        # Window: ring[(n - 1) % W] holds valid token n's value.
        w = stop.window
        pos = (n - 1) % w
        if n > w:
            self.window_sum = self.window_sum - self.ring[pos] + value
        else:
            self.window_sum += value
        self.ring[pos] = value
        if n % w == 0:  # re-derive every W tokens
            exact = 0.0
            for v in self.ring:
                exact += v
            self.window_sum = exact
        self.last_entropy = entropy
        if stop.confident_on:
            calm = (stop.confident_entropy_below is None or entropy < stop.confident_entropy_below) and (
                stop.confident_margin_above is None or margin > stop.confident_margin_above)
            self.confident_streak = self.confident_streak + 1 if calm else 0

        if token in self.rules.eos:
            return StopReason.EOS
        for sequence in self.rules.by_last_token.get(token, ()):
            if len(sequence) <= n and tuple(self.tokens[n - len(sequence):]) == sequence:
                return StopReason.STOP_SEQUENCE
        if n >= self.request.max_new_tokens:
            return StopReason.MAX_TOKENS
        if n < self.rules.first_evaluated:
            return None

        window_mean = self.window_sum / min(n, w)
        if not self.evaluated or window_mean < self.min_window_mean:
            self.min_window_mean = window_mean
        self.evaluated = True
        if stop.low_conf_threshold is not None and window_mean < stop.low_conf_threshold:
            self.steps_below += 1
            if not stop.shadow:
                return StopReason.LOW_CONFIDENCE
            if self.would_stop_step < 0:
                self.would_stop_step, self.would_stop_reason = n, StopReason.LOW_CONFIDENCE
        if stop.confident_on and self.confident_streak >= stop.confident_steps:
            if not stop.shadow:
                return StopReason.CONFIDENT
            if self.would_stop_step < 0:
                self.would_stop_step, self.would_stop_reason = n, StopReason.CONFIDENT
        return None

    def finish(self, reason: StopReason, group) -> ReferenceFinished:
        n = len(self.tokens)
        valid = n - 1 if self.invalid else n
        mean = (lambda total: total / valid) if valid > 0 else (lambda total: NAN)
        return ReferenceFinished(
            request_id=self.request.request_id,
            reason=reason,
            group=group,
            num_tokens=n,
            tokens=_int64(self.tokens),
            mean_topk_conf=mean(self.sums["topk_conf"]),
            mean_logprob=mean(self.sums["logprob"]),
            mean_neg_entropy=mean(self.sums["neg_entropy"]),
            mean_signal=mean(self.sums["signal"]),
            min_window_mean=self.min_window_mean if self.evaluated else NAN,
            last_window_mean=self.window_sum / min(valid, self.rules.stop.window) if valid > 0 else NAN,
            last_entropy=self.last_entropy if valid > 0 else NAN,
            steps_below_threshold=self.steps_below,
            would_stop_step=self.would_stop_step,
            would_stop_reason=self.would_stop_reason,
            signals=None if self.recorded is None else {
                name: _read_only(np.array(values, dtype=np.float32)) for name, values in self.recorded.items()},
        )


def _never_ran(request: _Request, reason: StopReason, group) -> ReferenceFinished:
    record = request.rules.stop.record_signals
    return ReferenceFinished(
        request_id=request.request_id, reason=reason, group=group, num_tokens=0, tokens=_int64([]),
        mean_topk_conf=NAN, mean_logprob=NAN, mean_neg_entropy=NAN, mean_signal=NAN, min_window_mean=NAN,
        last_window_mean=NAN, last_entropy=NAN, steps_below_threshold=0, would_stop_step=-1, would_stop_reason=None,
        signals={name: _read_only(np.zeros(0, np.float32)) for name in RECORDED_SIGNALS} if record else None,
    )


class _Group:
    def __init__(self, group_id: int):
        self.id = group_id
        self.priority = 0  # of its queued members
        self.queued: dict[int, _Request] = {}  # seq -> request, submit order
        self.active = 0
        self.wave_count = 0
        self.settled = False
        self.dirty = False
        self.release_candidate = False  # in the scheduler's _empty list
        self.reported_by = 0  # the step whose plan reports the group's latest end
        self.ended: list[int] = []  # its members that ended (they may still report an answer)
        self.tally: dict[int, float] = {}  # answer key -> weight, first-reported first
        self.votes = 0
        self.total = 0.0
        self.max_weight = 1.0  # the most one member's answer may weigh

    def leader(self) -> Optional[int]:
        best, best_weight = None, 0.0
        for key, weight in self.tally.items():
            if best is None or weight > best_weight:  # ties: the key reported first
                best, best_weight = key, weight
        return best

    def settled_by_vote(self, fraction, min_votes) -> bool:
        weights = sorted(self.tally.values(), reverse=True) + [0.0, 0.0]
        first, second = weights[0], weights[1]
        remaining = self.active + len(self.queued)
        if first > second + remaining * self.max_weight:
            return True
        return fraction is not None and self.votes >= min_votes and self.total > 0 and first / self.total >= fraction


class ReferenceScheduler:
    """Same constructor, methods and results as :class:`haltwise.Scheduler`;
    plans are :class:`ReferenceStepPlan`, finished records :class:`ReferenceFinished`."""

    def __init__(self, capacity: int, *, layout: str = "compact", max_queue: int = 1_000_000,
                 aging_steps: int = 256, wave_size: int = 0, group_atomic: bool = False,
                 consensus_fraction: float | None = None, consensus_min_votes: int = 3):
        o = check_scheduler_options(capacity, layout, max_queue, aging_steps, wave_size, group_atomic,
                                    consensus_fraction, consensus_min_votes)
        self._capacity, self._layout = o["capacity"], o["layout"]
        self._max_queue, self._aging_steps, self._wave_size = o["max_queue"], o["aging_steps"], o["wave_size"]
        self._group_atomic = o["group_atomic"]
        self._fraction, self._min_votes = o["consensus_fraction"], o["consensus_min_votes"]
        self._step_count = 0
        self._next_seq = 0
        self._slots: list[Optional[_Trace]] = [None] * self._capacity
        self._free: list[int] = list(range(self._capacity))  # a heap: lowest first
        self._rows: list[int] = []  # slot of each row of the next batch
        self._classes: dict[int, dict[int, _Request]] = {}  # priority -> {seq: request}, submit order
        self._queued: dict[int, _Request] = {}  # request_id -> queued request
        self._active: dict[int, int] = {}  # request_id -> slot
        self._groups: dict[int, _Group] = {}
        self._dirty: list[_Group] = []  # groups whose votes or members changed since the last step
        self._empty: list[_Group] = []  # groups with no queued or active member, to release
        self._awaiting: dict[int, _Group] = {}  # finished grouped request_id -> its group
        self._pending: list[ReferenceFinished] = []  # ended between steps
        self._rules: dict[StopConfig, _Rules] = {}
        self._stats = dict(submitted=0, tokens_generated=0, tokens_saved_estimate=0)
        self._fail_admissions = 0  # _fail_next_admissions()
        self._finished_counts = {reason.name: 0 for reason in StopReason}

    capacity = property(lambda self: self._capacity)
    layout = property(lambda self: self._layout)
    batch_size = property(lambda self: len(self._rows))

    # ---- ending ------------------------------------------------------------------

    def _record(self, record: ReferenceFinished, max_new_tokens: int, group: Optional[_Group], out: list):
        self._finished_counts[record.reason.name] += 1
        if record.reason in _SAVES_TOKENS:
            self._stats["tokens_saved_estimate"] += max_new_tokens - record.num_tokens
        if group is not None:
            self._awaiting[record.request_id] = group
            group.ended.append(record.request_id)
            group.reported_by = self._step_count + 1 if out is self._pending else self._step_count
            if not group.queued and group.active == 0 and not group.release_candidate:
                group.release_candidate = True
                self._empty.append(group)
        out.append(record)

    def _dequeue(self, request: _Request) -> None:
        del self._queued[request.request_id]
        del self._classes[request.priority][request.seq]
        if not self._classes[request.priority]:
            del self._classes[request.priority]
        if request.group is not None:
            del request.group.queued[request.seq]

    def _end_queued(self, request: _Request, reason: StopReason, out: list) -> None:
        self._dequeue(request)
        group = request.group
        if group is not None:
            self._mark_dirty(group)
        self._record(_never_ran(request, reason, None if group is None else group.id), request.max_new_tokens,
                     group, out)

    def _trace(self, slot: int) -> _Trace:
        """The sequence in a slot that holds one (a row of the batch, or an active request's)."""
        trace = self._slots[slot]
        assert trace is not None, f"slot {slot} is free"
        return trace

    def _end_active(self, slot: int, reason: StopReason, out: list) -> None:
        trace = self._trace(slot)
        request = trace.request
        del self._active[request.request_id]
        group = request.group
        if group is not None:
            group.active -= 1
            if group.active == 0:
                group.wave_count = 0  # the wave is over
            self._mark_dirty(group)
        self._record(trace.finish(reason, None if group is None else group.id), request.max_new_tokens, group, out)
        self._slots[slot] = None
        heapq.heappush(self._free, slot)

    # ---- groups ------------------------------------------------------------------

    def _mark_dirty(self, group: _Group) -> None:
        if not group.settled and not group.dirty:
            group.dirty = True
            self._dirty.append(group)

    def _settle(self, group: _Group, out: list) -> int:
        group.settled = True
        ended = 0
        for slot in self._rows:
            trace = self._trace(slot)
            if trace.request.group is group and trace.pending_end is None:
                trace.pending_end = StopReason.GROUP_CONSENSUS
                ended += 1
        for request in list(group.queued.values()):
            self._end_queued(request, StopReason.GROUP_CONSENSUS, out)
            ended += 1
        return ended

    def _release_groups(self) -> None:
        """Releases the groups whose last member's end was reported in an
        earlier plan and that are still empty (the rule in haltwise/scheduler.py)."""
        keep = []
        for group in self._empty:
            if group.queued or group.active:
                group.release_candidate = False
            elif group.reported_by >= self._step_count:
                keep.append(group)
            else:
                for request_id in group.ended:
                    if self._awaiting.get(request_id) is group:
                        del self._awaiting[request_id]
                del self._groups[group.id]
        self._empty = keep

    def settle_group(self, group: int) -> int:
        group = self._groups.get(check_int("settle_group", "group", group))
        if group is None or group.settled:
            return 0
        return self._settle(group, self._pending)

    def report_answer(self, request_id: int, answer_key: int, weight: float | None = None) -> None:
        request_id = check_int("report_answer", "request_id", request_id)
        answer_key = check_int("report_answer", "answer_key", answer_key)
        weight = check_weight(weight)
        group = self._awaiting.get(request_id)
        if group is None:
            raise ValueError(f"report_answer: request {request_id} is not a finished member of a group awaiting "
                             "its answer (unknown, still queued or active, in no group, or already reported)")
        if weight > group.max_weight:
            raise ValueError(f"report_answer: weight {weight} exceeds its group's max_weight {group.max_weight} "
                             "(set at submit)")
        del self._awaiting[request_id]
        group.tally[answer_key] = group.tally.get(answer_key, 0.0) + weight
        group.votes += 1
        group.total += weight
        self._mark_dirty(group)

    def vote(self, group: int) -> dict[int, float]:
        group = self._groups.get(check_int("vote", "group", group))
        return {} if group is None else dict(group.tally)

    def leader(self, group: int) -> Optional[int]:
        group = self._groups.get(check_int("leader", "group", group))
        return None if group is None else group.leader()

    # ---- requests ------------------------------------------------------------------

    def submit(self, request_id: int, *, max_new_tokens: int, priority: int = 0, group: int | None = None,
               stop: StopConfig = StopConfig(), max_weight: float | None = None) -> None:
        request_id, max_new_tokens, priority, group_id = check_submit(request_id, max_new_tokens, priority, group,
                                                                      stop)
        max_weight = check_max_weight(max_weight, group_id)
        if request_id in self._queued or request_id in self._active:
            raise ValueError(f"submit: request_id {request_id} is already queued or active")
        group = self._groups.get(group_id) if group_id is not None else None
        if group is not None and max_weight is not None and max_weight != group.max_weight:
            raise ValueError(f"submit: group {group_id} has max_weight {group.max_weight}, got {max_weight}")
        settled = group is not None and group.settled
        if group is not None and not settled and group.queued and group.priority != priority:
            raise ValueError(f"submit: priority of a group's queued members must match: group {group_id} has "
                             f"members queued with priority {group.priority}, got {priority}")
        if not settled and len(self._queued) >= self._max_queue:
            raise QueueFull(f"submit: the queue is full (max_queue={self._max_queue}); request {request_id} "
                            "was not queued")
        if group_id is not None and group is None:
            group = self._groups[group_id] = _Group(group_id)
            group.max_weight = 1.0 if max_weight is None else max_weight
        self._awaiting.pop(request_id, None)
        self._stats["submitted"] += 1
        if stop not in self._rules:
            self._rules[stop] = _Rules(stop)
        request = _Request(request_id, self._next_seq, priority, group, max_new_tokens, self._rules[stop],
                           self._step_count)
        self._next_seq += 1
        if settled:
            self._record(_never_ran(request, StopReason.GROUP_CONSENSUS, group_id), max_new_tokens, group,
                         self._pending)
            return
        self._queued[request_id] = request
        self._classes.setdefault(priority, {})[request.seq] = request
        if group is not None:
            group.priority = priority
            group.queued[request.seq] = request

    def cancel(self, request_id: int) -> bool:
        request_id = check_int("cancel", "request_id", request_id)
        if request_id in self._queued:
            self._end_queued(self._queued[request_id], StopReason.CANCELLED, self._pending)
            return True
        if request_id in self._active:
            trace = self._trace(self._active[request_id])
            if trace.pending_end is not None:
                return False
            trace.pending_end = StopReason.CANCELLED
            return True
        return False

    # ---- the step ------------------------------------------------------------------

    def _blocked(self, group: Optional[_Group]) -> bool:
        return group is not None and self._wave_size > 0 and group.wave_count >= self._wave_size

    def _best(self) -> Optional[_Request]:
        """The next request to admit: each class's oldest member whose group is
        not blocked, then the highest effective priority, then the oldest."""
        best, best_key = None, None
        for priority, members in self._classes.items():
            head = next((r for r in members.values() if not self._blocked(r.group)), None)
            if head is None:
                continue
            waited = self._step_count - head.submitted_at
            effective = priority + (waited // self._aging_steps if self._aging_steps > 0 else 0)
            key = (effective, -head.seq)
            if best_key is None or key > best_key:
                best, best_key = head, key
        return best

    def _admit_one(self, request: _Request, next_rows: list, admitted: list, finished: list) -> bool:
        """Moves a queued request into the lowest free slot; False (the request
        ended with OUT_OF_MEMORY, into ``finished``) when its state cannot be
        allocated."""
        try:
            if self._fail_admissions > 0:
                self._fail_admissions -= 1
                raise MemoryError("injected by _fail_next_admissions")
            trace = _Trace(request)
        except MemoryError:
            self._end_queued(request, StopReason.OUT_OF_MEMORY, finished)
            return False
        self._dequeue(request)
        slot = heapq.heappop(self._free)
        self._slots[slot] = trace
        self._active[request.request_id] = slot
        if request.group is not None:
            request.group.active += 1
            request.group.wave_count += 1
        next_rows.append(slot)
        admitted.append((request.request_id, len(next_rows) - 1 if self._layout == "compact" else slot))
        return True

    def _admit(self, next_rows: list, admitted: list, finished: list) -> None:
        free = len(self._free)
        while free > 0:
            head = self._best()
            if head is None:
                break
            group = head.group
            if group is None or not self._group_atomic:
                free -= self._admit_one(head, next_rows, admitted, finished)
                continue
            unit = len(group.queued)
            if self._wave_size > 0:
                unit = min(unit, self._wave_size - group.wave_count)
            unit = min(unit, self._capacity)
            if unit > free:
                break  # all or nothing: wait for rows rather than starve the group
            for request in list(group.queued.values())[:unit]:
                free -= self._admit_one(request, next_rows, admitted, finished)

    def _fail_next_admissions(self, count: int) -> None:
        """Testing hook: the next ``count`` admissions fail as if memory ran out."""
        self._fail_admissions = check_int("_fail_next_admissions", "count", count, 0)

    def _inputs(self, tokens, signals) -> tuple:
        rows = len(self._rows)

        def host(name, value, kind, itemsize, dtype_name):
            if not isinstance(value, np.ndarray):
                try:
                    value = np.asarray(value)
                except Exception as err:  # noqa: BLE001 - any failure to read it is the caller's argument
                    raise ValueError(f"step: {name} must be a numpy array or a CPU torch tensor, "
                                     f"got {type(value).__name__} ({err})") from None
            if value.dtype.kind != kind or value.dtype.itemsize != itemsize or value.dtype.byteorder == ">":
                raise ValueError(f"step: {name} must be {dtype_name}, got {value.dtype}")
            if value.ndim != 1:
                raise ValueError(f"step: {name} must be 1-D [batch], got shape {value.shape}")
            return value

        arrays = [host("tokens", tokens, "i", 8, "int64")]
        if signals is None and rows == 0 and arrays[0].shape[0] == 0:
            return [], [[]] * 6
        for field in _SIGNAL_FIELDS + ("status",):
            if not hasattr(signals, field):
                raise TypeError("step: signals must have the attributes logprob, entropy, confidence, margin, "
                                f"topk_conf and status (a haltwise.Signals, say), got {type(signals).__name__} "
                                f"without {field!r}")
            kind, size, name = ("f", 4, "float32") if field != "status" else ("i", 1, "int8")
            arrays.append(host(f"signals.{field}", getattr(signals, field), kind, size, name))
        names = ["tokens"] + [f"signals.{f}" for f in _SIGNAL_FIELDS + ("status",)]
        for name, array in zip(names, arrays):
            if array.shape[0] != rows:
                raise ValueError(f"step: {name} must have shape ({rows},) (one per row of the batch), "
                                 f"got ({array.shape[0]},)")
        return arrays[0].tolist(), [a.tolist() for a in arrays[1:]]

    def step(self, tokens, signals) -> ReferenceStepPlan:
        tokens, (logprob, entropy, confidence, margin, topk_conf, status) = self._inputs(tokens, signals)
        self._step_count += 1
        finished, self._pending = self._pending, []
        # The settle rule, for groups whose votes or members changed since the last step.
        dirty, self._dirty = sorted(self._dirty, key=lambda g: g.id), []
        for group in dirty:
            group.dirty = False
            if not group.settled and group.settled_by_vote(self._fraction, self._min_votes):
                self._settle(group, finished)
        self._release_groups()

        compact = self._layout == "compact"
        keep, next_rows = [], []
        for r, slot in enumerate(self._rows):
            trace = self._trace(slot)
            reason = trace.pending_end
            if reason is None:
                reason = trace.on_token(tokens[r], logprob[r], entropy[r], confidence[r], margin[r], topk_conf[r],
                                        status[r])
                self._stats["tokens_generated"] += 1
            if reason is None:
                keep.append(r if compact else slot)
                next_rows.append(slot)
            else:
                self._end_active(slot, reason, finished)

        admitted: list = []
        self._admit(next_rows, admitted, finished)
        self._rows = next_rows if compact else sorted(next_rows)
        traces = [self._trace(slot) for slot in self._rows]
        active = None if compact else _read_only(np.array([t is not None for t in self._slots], dtype=bool))
        return ReferenceStepPlan(
            finished=finished,
            keep=_int64(keep),
            admitted=admitted,
            request_ids=_int64([t.request.request_id for t in traces]),
            positions=_int64([len(t.tokens) for t in traces]),
            active=active,
            free_slots=None if active is None else _int64(np.flatnonzero(~active)),
        )

    @property
    def max_queue(self) -> int:
        return self._max_queue

    def stats(self) -> dict:
        return dict(
            submitted=self._stats["submitted"],
            active=len(self._rows),
            queued=len(self._queued),
            finished=dict(self._finished_counts),
            tokens_generated=self._stats["tokens_generated"],
            tokens_saved_estimate=self._stats["tokens_saved_estimate"],
            groups=len(self._groups),
        )

    def __repr__(self) -> str:
        return f"ReferenceScheduler(capacity={self.capacity}, layout={self.layout!r}, batch_size={self.batch_size})"
