"""``haltwise.Scheduler``: the native batch scheduler (csrc/scheduler.h) behind
a thin Python layer: argument checks, the StopConfig / StopReason / QueueFull
types, and the documentation of the semantics.

The scheduler keeps a running view of every sequence in the decode batch. Each
decode step the caller hands it the step's tokens and stop signals
(:func:`haltwise.signals`); it ends the sequences whose stop rules fire,
admits queued requests into the freed rows and returns a :class:`StepPlan`
saying which rows to keep, which requests to prefill, and what ended.

Semantics (identical in the pure-Python ``scheduler_reference.py``):

Rows
    The batch of step t has one row per active sequence. ``compact`` layout:
    the next batch is the kept rows in their old order (renumbered from 0)
    followed by the admitted rows. ``slots`` layout: each sequence holds a
    stable slot in ``[0, capacity)``; a batch's rows are the active slots in
    increasing order; admissions take the lowest free slots.
Per row, in row order
    A sequence cancelled, or whose group settled, since the last step ends
    with CANCELLED / GROUP_CONSENSUS (whichever came first) and this step's
    token is not appended. Otherwise the token is appended, the running state
    updated, and the rules evaluated in this order, the first that fires
    ending the sequence: INVALID_LOGITS (status != 0 or a NaN signal; that
    row's signals stay out of the means and the window), EOS, STOP_SEQUENCE
    (some stop sequence is a suffix of the generated tokens; matched by an
    Aho-Corasick automaton, O(1) amortised per token), MAX_TOKENS
    (num_tokens >= max_new_tokens), then, once num_tokens >=
    max(1, min_new_tokens), LOW_CONFIDENCE (mean of the chosen signal over the
    last min(num_tokens, window) tokens < threshold, strictly; a running double
    sum re-derived exactly from the window every ``window`` tokens) and
    CONFIDENT (entropy < h and margin > m, strictly, for ``confident_steps``
    consecutive tokens; the streak counts every valid token). In shadow mode
    the two confidence rules never stop a sequence: the first step and reason
    at which one would have is recorded.
Admission, after the step's evictions
    ``capacity`` rows at most. Priority classes, higher first, FIFO within a
    class. Aging: the effective priority is ``priority + waited //
    aging_steps`` where ``waited`` counts the step() calls since submission
    (the current one included); ties go to the earlier submission. A long
    wait thus lifts a low class above fresh high-priority requests, so no
    class starves. ``wave_size > 0``: a group's members are admitted at most
    ``wave_size`` per wave, and the next wave starts only once every admitted
    member has finished. ``group_atomic``: a group's wave (with no waves: all
    its queued members; at most ``capacity``) is admitted all or nothing; if
    it does not fit, admission stops for this step rather than let later
    requests starve the group. Members of one group that are queued at the
    same time must share a priority.
Groups and votes
    ``report_answer`` adds a finished member's answer to its group's weighted
    vote (a weight in ``[0, max_weight]``; the group's ``max_weight`` is set
    by the submit that creates it, default 1). A group is settled when its
    leader can no longer be overturned, ``leader > runner_up + remaining *
    max_weight`` (remaining: the group's active and queued members), or, with
    ``consensus_fraction``, once ``votes >= consensus_min_votes`` and
    ``leader / total >= consensus_fraction``. The rule is checked at the start
    of each step for the groups whose votes or members changed, that is after
    the caller has reported the answers of the previous plan's finished
    traces, so a trace that finished but has not yet reported cannot be
    outvoted by an early settle. Settling (or :meth:`Scheduler.settle_group`)
    ends the group's queued members at once and its active members at their
    next row, with GROUP_CONSENSUS; a later submit to a settled group ends at
    once the same way.
Group lifetime
    A group is released (its votes and state freed, its id forgotten) at the
    start of the first step after the plan that reported the end of its last
    member, if it still has no queued or active member then (checked after
    the settle rule). Between that plan and the next step the caller may
    report its members' answers and read ``vote`` / ``leader``; from the next
    step on the group is unknown: ``report_answer`` of its members raises
    ValueError, ``vote`` is ``{}``, ``leader`` None, ``settle_group`` 0, and a
    later submit with its id starts a new group. So a server that makes a
    group per request holds only the groups of requests in flight
    (``stats()["groups"]``).
Accounting
    Every submitted request ends exactly once, with one reason, and appears in
    exactly one plan's ``finished``: the plan of the step that ended it, or
    for requests ended while queued (cancel, settle, a settled group), the
    next plan. Within a plan: first the requests ended between the steps (in
    the order it happened), then the queued members of groups settled at the
    start of the step (by group id, then submission), then the rows that
    ended (row order), then the requests whose admission failed this step
    (OUT_OF_MEMORY: their state could not be allocated; in admission order).
Limits
    ``max_new_tokens`` <= ``MAX_NEW_TOKENS`` (2**24) and ``StopConfig.window``
    <= ``MAX_WINDOW`` (2**16), so that what one sequence allocates stays
    bounded; larger values are refused at submit / StopConfig.
"""
from __future__ import annotations

import abc
import dataclasses
import enum
import functools
import math
import operator
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import numpy.typing as npt

from ._native import core

if TYPE_CHECKING:
    from ._core import StopRules as NativeStopRules

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_PRIORITY_MIN, _PRIORITY_MAX = -(2**31), 2**31 - 1
# Bounds that keep the memory of one sequence bounded (the C++ core has the same,
# kMaxNewTokens / kMaxWindow): an admitted sequence allocates
# min(window, max_new_tokens) floats for its window, then grows with its
# tokens (8 bytes each, 28 with record_signals). Requests beyond them are
# refused at submit / StopConfig with a ValueError naming the argument.
MAX_NEW_TOKENS = 2**24  # 16,777,216 tokens, far past any context length
MAX_WINDOW = 2**16  # 65,536 tokens: a window of 256 KiB per sequence at most
LAYOUTS = ("compact", "slots")
CONF_SIGNALS = ("topk_conf", "logprob", "confidence", "margin", "neg_entropy")
RECORDED_SIGNALS = ("topk_conf", "logprob", "entropy", "confidence", "margin")


class StopReason(enum.IntEnum):
    """Why a sequence ended. Values are shared with the C++ core."""

    EOS = 1
    MAX_TOKENS = 2
    STOP_SEQUENCE = 3
    LOW_CONFIDENCE = 4  # the window mean of the chosen signal fell under the threshold
    CONFIDENT = 5  # entropy and margin say the answer has converged
    GROUP_CONSENSUS = 6  # the other traces of the group settled the vote
    INVALID_LOGITS = 7  # status != 0 or a NaN signal
    CANCELLED = 8
    OUT_OF_MEMORY = 9  # its state could not be allocated at admission; it generated nothing


class QueueFull(RuntimeError):
    """``Scheduler.submit`` on a full queue (``max_queue`` requests queued); nothing changed."""


# ---- argument checks (shared with scheduler_reference.py) ------------------------


def check_int(where: str, name: str, value: Any, lo: int = _INT64_MIN, hi: int = _INT64_MAX) -> int:
    """``value`` as an int in [lo, hi]; TypeError / ValueError naming it otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}") from None
    if not lo <= value <= hi:
        bound = f">= {lo}" if hi == _INT64_MAX else f"in [{lo}, {hi}]"
        raise ValueError(f"{where}: {name} must be {bound}, got {value}")
    return value


def check_float(where: str, name: str, value: Any, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``value`` as a finite float in [lo, hi]; TypeError / ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        bound = "finite" if (lo, hi) == (-math.inf, math.inf) else f"in [{lo}, {hi}]" if hi != math.inf else f">= {lo}"
        raise ValueError(f"{where}: {name} must be {bound}, got {value}")
    return value


def check_bool(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be a bool, got {type(value).__name__}")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class StopConfig:
    """The stop rules of a request. Immutable and hashable: one compiled copy
    (with its stop-sequence automaton) is shared by all requests using an
    equal config. Fields are checked here, at construction: a bad one raises
    ValueError (or TypeError) naming it. Lists are accepted and stored as tuples.

    Example
    -------
    >>> from haltwise import StopConfig
    >>> StopConfig(eos_ids=[2], stop_sequences=[[13, 13]], low_conf_threshold=1.5).stop_sequences
    ((13, 13),)
    """

    eos_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # several, any length >= 1
    min_new_tokens: int = 0  # no confidence rule fires before this many generated tokens
    low_conf_signal: str = "topk_conf"  # one of CONF_SIGNALS; all oriented: higher = more confident
    low_conf_threshold: Optional[float] = None  # None: LOW_CONFIDENCE off
    window: int = 16  # W of the sliding-window mean (DeepConf's group confidence); in [1, MAX_WINDOW]
    confident_entropy_below: Optional[float] = None
    confident_margin_above: Optional[float] = None
    confident_steps: int = 0  # CONFIDENT: this many consecutive calm tokens; off when 0 or both bounds None
    shadow: bool = False  # evaluate the confidence rules, record when they would stop, never stop on them
    record_signals: bool = False  # return the per-token signals in Finished.signals

    def __post_init__(self) -> None:
        where = "StopConfig"
        if isinstance(self.eos_ids, (str, bytes)) or not hasattr(self.eos_ids, "__iter__"):
            raise TypeError(f"{where}: eos_ids must be a sequence of ints, got {type(self.eos_ids).__name__}")
        eos = tuple(check_int(where, "eos_ids[]", t) for t in self.eos_ids)
        if isinstance(self.stop_sequences, (str, bytes)) or not hasattr(self.stop_sequences, "__iter__"):
            raise TypeError(
                f"{where}: stop_sequences must be a sequence of token-id sequences, "
                f"got {type(self.stop_sequences).__name__}"
            )
        sequences = []
        for i, sequence in enumerate(self.stop_sequences):
            if isinstance(sequence, (str, bytes)) or not hasattr(sequence, "__iter__"):
                raise TypeError(f"{where}: stop_sequences[{i}] must be a sequence of ints, got {type(sequence).__name__}")
            sequence = tuple(check_int(where, f"stop_sequences[{i}][]", t) for t in sequence)
            if not sequence:
                raise ValueError(f"{where}: stop_sequences[{i}] must hold at least one token, got ()")
            sequences.append(sequence)
        if not isinstance(self.low_conf_signal, str):
            raise TypeError(f"{where}: low_conf_signal must be a str, got {type(self.low_conf_signal).__name__}")
        if self.low_conf_signal not in CONF_SIGNALS:
            raise ValueError(f"{where}: low_conf_signal must be one of {CONF_SIGNALS}, got {self.low_conf_signal!r}")
        optional = lambda name, lo: None if getattr(self, name) is None else check_float(where, name, getattr(self, name), lo)  # noqa: E731
        values = dict(
            eos_ids=eos,
            stop_sequences=tuple(sequences),
            min_new_tokens=check_int(where, "min_new_tokens", self.min_new_tokens, 0),
            low_conf_threshold=optional("low_conf_threshold", -math.inf),
            window=check_int(where, "window", self.window, 1, MAX_WINDOW),
            confident_entropy_below=optional("confident_entropy_below", 0.0),
            confident_margin_above=optional("confident_margin_above", 0.0),
            confident_steps=check_int(where, "confident_steps", self.confident_steps, 0),
            shadow=check_bool(where, "shadow", self.shadow),
            record_signals=check_bool(where, "record_signals", self.record_signals),
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def low_confidence_on(self) -> bool:
        return self.low_conf_threshold is not None

    @property
    def confident_on(self) -> bool:
        return self.confident_steps > 0 and (
            self.confident_entropy_below is not None or self.confident_margin_above is not None
        )


def check_scheduler_options(capacity: Any, layout: Any, max_queue: Any, aging_steps: Any, wave_size: Any,
                            group_atomic: Any, consensus_fraction: Any, consensus_min_votes: Any) -> dict[str, Any]:
    where = "Scheduler"
    if not isinstance(layout, str):
        raise TypeError(f"{where}: layout must be a str, got {type(layout).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"{where}: layout must be one of {LAYOUTS}, got {layout!r}")
    if consensus_fraction is not None:
        consensus_fraction = check_float(where, "consensus_fraction", consensus_fraction)
        if not 0.0 < consensus_fraction <= 1.0:
            raise ValueError(f"{where}: consensus_fraction must be in (0, 1] or None, got {consensus_fraction}")
    return dict(
        capacity=check_int(where, "capacity", capacity, 1, 2**31 - 1),
        layout=layout,
        max_queue=check_int(where, "max_queue", max_queue, 1),
        aging_steps=check_int(where, "aging_steps", aging_steps, 0),
        wave_size=check_int(where, "wave_size", wave_size, 0),
        group_atomic=check_bool(where, "group_atomic", group_atomic),
        consensus_fraction=consensus_fraction,
        consensus_min_votes=check_int(where, "consensus_min_votes", consensus_min_votes, 1),
    )


def check_submit(request_id: Any, max_new_tokens: Any, priority: Any, group: Any,
                 stop: Any) -> tuple[int, int, int, int | None]:
    where = "submit"
    if not isinstance(stop, StopConfig):
        raise TypeError(f"{where}: stop must be a haltwise.StopConfig, got {type(stop).__name__}")
    return (
        check_int(where, "request_id", request_id),
        check_int(where, "max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS),
        check_int(where, "priority", priority, _PRIORITY_MIN, _PRIORITY_MAX),
        None if group is None else check_int(where, "group", group),
    )


def check_weight(weight: Any) -> float:
    """A reported answer's weight: finite, >= 0 (default 1); the group's
    max_weight is checked by the scheduler."""
    return 1.0 if weight is None else check_float("report_answer", "weight", weight, 0.0)


def check_max_weight(max_weight: Any, group: int | None) -> float | None:
    """submit's max_weight: None, or finite and >= 0 with a group."""
    if max_weight is None:
        return None
    max_weight = check_float("submit", "max_weight", max_weight, 0.0)
    if group is None:
        raise ValueError("submit: max_weight needs a group")
    return max_weight


# ---- output types -------------------------------------------------------------------


class Finished(abc.ABC):
    """A sequence that ended (read-only). Native and reference schedulers each
    have their own class; both are registered as subclasses of this one.

    Attributes
    ----------
    request_id: int
    reason: StopReason
    group: int | None
    num_tokens: int
        Tokens generated (0 for a request that ended while queued).
    tokens: np.ndarray
        ``(num_tokens,)`` int64: exactly the tokens stepped in for it.
    mean_topk_conf, mean_logprob, mean_neg_entropy: float
        Means over the tokens with valid signals (all but the last token of an
        INVALID_LOGITS sequence); NaN when there are none.
    mean_signal: float
        Mean of the config's ``low_conf_signal`` (oriented), same tokens.
    min_window_mean: float
        Minimum of the window mean over the steps where the confidence rules
        were evaluated (num_tokens >= max(1, min_new_tokens) and no earlier
        rule fired), whether or not LOW_CONFIDENCE is on; NaN if never. A
        LOW_CONFIDENCE threshold t would have cut this trace iff
        ``min_window_mean < t`` (the calibration quantity of DeepConf).
    last_window_mean: float
        Window mean after the last valid token; NaN if none.
    last_entropy: float
        Entropy of the last valid token; NaN if none.
    steps_below_threshold: int
        Evaluated steps whose window mean was under the threshold.
    would_stop_step: int
        Shadow mode: num_tokens at which a confidence rule first would have
        stopped the sequence; -1 if none (always -1 outside shadow mode).
    would_stop_reason: StopReason | None
    signals: dict[str, np.ndarray] | None
        ``record_signals``: float32 ``(num_tokens,)`` arrays "topk_conf",
        "logprob", "entropy", "confidence", "margin" (raw, as stepped in).
    """

    __slots__ = ()
    # For type checkers only (no runtime attributes); tools/gen_stubs.py types
    # the native class in _core.pyi from these.
    request_id: int
    reason: StopReason
    group: int | None
    num_tokens: int
    tokens: npt.NDArray[np.int64]
    mean_topk_conf: float
    mean_logprob: float
    mean_neg_entropy: float
    mean_signal: float
    min_window_mean: float
    last_window_mean: float
    last_entropy: float
    steps_below_threshold: int
    would_stop_step: int
    would_stop_reason: StopReason | None
    signals: dict[str, npt.NDArray[np.float32]] | None


class StepPlan(abc.ABC):
    """What the caller does before the next step (read-only).

    Attributes
    ----------
    finished: list[Finished]
        Every sequence that ended since the previous plan.
    keep: np.ndarray
        int64, increasing: rows (compact) / slots (slots layout) of the batch
        just stepped whose sequences continue. Compact callers gather their
        KV cache with it.
    admitted: list[tuple[int, int]]
        ``(request_id, row or slot)`` moved from the queue into the batch; the
        caller prefills them. Compact: rows ``len(keep)`` onwards, in order.
    request_ids: np.ndarray
        ``(next_batch,)`` int64: the request of each row of the next step.
    positions: np.ndarray
        ``(next_batch,)`` int64: tokens generated so far by each (0 for the
        admitted); the Stepper keys sampling noise by (request, position).
    active: np.ndarray | None
        Slots layout: ``(capacity,)`` bool, slots that hold a sequence; compact: None.
    free_slots: np.ndarray | None
        Slots layout: int64, the free slots, increasing; compact: None.
    """

    __slots__ = ()
    # For type checkers only, as in Finished.
    finished: list[Finished]
    keep: npt.NDArray[np.int64]
    admitted: list[tuple[int, int]]
    request_ids: npt.NDArray[np.int64]
    positions: npt.NDArray[np.int64]
    active: npt.NDArray[np.bool_] | None
    free_slots: npt.NDArray[np.int64] | None


@functools.cache
def _core() -> ModuleType:
    native = core()
    native.scheduler_register_types(StopReason, QueueFull)
    StepPlan.register(native.StepPlan)
    Finished.register(native.Finished)
    return native


@functools.lru_cache(maxsize=4096)
def _native_rules(stop: StopConfig) -> NativeStopRules:
    """The compiled (native) form of a StopConfig, built once per distinct config."""
    return _core().StopRules(
        eos_ids=list(stop.eos_ids),
        stop_sequences=[list(s) for s in stop.stop_sequences],
        min_new_tokens=stop.min_new_tokens,
        low_conf_signal=stop.low_conf_signal,
        low_conf_threshold=stop.low_conf_threshold,
        window=stop.window,
        confident_entropy_below=stop.confident_entropy_below,
        confident_margin_above=stop.confident_margin_above,
        confident_steps=stop.confident_steps,
        shadow=stop.shadow,
        record_signals=stop.record_signals,
    )


_DEFAULT_STOP = StopConfig()


class Scheduler:
    """The native batch scheduler. See this module's docstring for the semantics.

    Parameters
    ----------
    capacity: int
        Most rows in a batch (>= 1).
    layout: str
        "compact" (rows renumbered every step; the caller compacts its KV
        cache with ``keep``) or "slots" (stable slots; the caller masks).
    max_queue: int
        Most queued requests; submit() beyond raises :class:`QueueFull`.
    aging_steps: int
        A queued request gains one priority level per ``aging_steps`` steps
        waited; 0 turns aging off.
    wave_size: int
        > 0: a group's members are admitted at most this many at a time, the
        next wave once the previous one has finished.
    group_atomic: bool
        Admit a group's wave (or all its queued members) all or nothing.
    consensus_fraction: float | None
        Settle a group once its leader holds this fraction of the vote weight
        (and at least ``consensus_min_votes`` answers are in).
    consensus_min_votes: int

    Not thread-safe: calls from two threads at once raise RuntimeError.
    step() releases the GIL while it works.

    Example
    -------
    >>> import numpy as np, haltwise
    >>> sched = haltwise.Scheduler(2)
    >>> sched.submit(7, max_new_tokens=1)
    >>> plan = sched.step(np.empty(0, np.int64), None)   # batch 0: the first admissions
    >>> plan.admitted
    [(7, 0)]
    >>> f32 = lambda v: np.full(1, v, np.float32)
    >>> sig = haltwise.Signals(token=None, logprob=f32(-0.1), entropy=f32(0.2), confidence=f32(0.9),
    ...                        margin=f32(0.8), topk_conf=f32(3.0), status=np.zeros(1, np.int8))
    >>> plan = sched.step(np.array([42]), sig)
    >>> [(f.request_id, f.reason.name, f.tokens.tolist()) for f in plan.finished]
    [(7, 'MAX_TOKENS', [42])]
    """

    def __init__(self, capacity: int, *, layout: str = "compact", max_queue: int = 1_000_000,
                 aging_steps: int = 256, wave_size: int = 0, group_atomic: bool = False,
                 consensus_fraction: float | None = None, consensus_min_votes: int = 3):
        options = check_scheduler_options(capacity, layout, max_queue, aging_steps, wave_size, group_atomic,
                                          consensus_fraction, consensus_min_votes)
        self._native = _core().Scheduler(**options)
        self._step = self._native.step
        self._max_queue = options["max_queue"]

    @property
    def capacity(self) -> int:
        return self._native.capacity

    @property
    def layout(self) -> str:
        return self._native.layout

    @property
    def max_queue(self) -> int:
        """Most queued requests; submit() beyond raises QueueFull."""
        return self._max_queue

    @property
    def batch_size(self) -> int:
        """Rows of the next step's batch."""
        return self._native.batch_size

    def submit(self, request_id: int, *, max_new_tokens: int, priority: int = 0, group: int | None = None,
               stop: StopConfig = _DEFAULT_STOP, max_weight: float | None = None) -> None:
        """Queue a request. ValueError for a request_id already queued or active,
        max_new_tokens outside ``[1, MAX_NEW_TOKENS]`` (2**24), or a priority
        unlike that of its group's queued members; :class:`QueueFull` when
        ``max_queue`` requests are queued. On any error nothing changes.

        max_weight (needs a group; finite, >= 0): the most one member's answer
        may weigh in the group's vote (:meth:`report_answer`). The submit that
        creates the group sets it (default 1.0); a later submit to the group
        may repeat it or leave it None, another value raises ValueError.

        Once accepted, a request always ends, exactly once, in some plan's
        ``finished``: if its state cannot be allocated when it is admitted,
        it ends with OUT_OF_MEMORY (and its row goes to the next request)."""
        request_id, max_new_tokens, priority, group = check_submit(request_id, max_new_tokens, priority, group, stop)
        max_weight = check_max_weight(max_weight, group)
        self._native.submit(request_id, max_new_tokens, priority, group, _native_rules(stop), max_weight)

    def step(self, tokens: Any, signals: Any) -> StepPlan:
        """One decode step.

        Parameters
        ----------
        tokens: np.ndarray or torch.Tensor
            ``(batch_size,)`` int64, the token each row generated this step.
        signals: haltwise.Signals or any object with attributes
            ``logprob, entropy, confidence, margin, topk_conf`` (float32
            ``(batch_size,)``) and ``status`` (int8 ``(batch_size,)``): numpy
            arrays or CPU torch tensors (read in place). None is accepted when
            the batch is empty.

        With an empty batch (``np.empty(0, np.int64)``) this is how the caller
        gets the first admissions and the records of requests ended in the
        queue. A wrong length or dtype raises ValueError naming the argument.
        """
        return self._step(tokens, signals)

    def cancel(self, request_id: int) -> bool:
        """Queued: ends at once (reported in the next plan). Active: ends at the
        next step with CANCELLED. False for an unknown or finished request, or
        one already ending (cancelled, or its group settled)."""
        return self._native.cancel(check_int("cancel", "request_id", request_id))

    def report_answer(self, request_id: int, answer_key: int, weight: float | None = None) -> None:
        """Add the answer of a finished group member to its group's vote
        (weight finite, in [0, the group's max_weight], default 1). ValueError
        unless the request has finished, belongs to a group, and has not
        reported yet, or for a weight above the group's max_weight."""
        self._native.report_answer(check_int("report_answer", "request_id", request_id),
                                   check_int("report_answer", "answer_key", answer_key), check_weight(weight))

    def settle_group(self, group: int) -> int:
        """A caller-side consensus rule fired: end the group's remaining members
        with GROUP_CONSENSUS (queued ones at once, active ones at the next
        step). Returns how many; 0 for an unknown or already settled group."""
        return self._native.settle_group(check_int("settle_group", "group", group))

    def vote(self, group: int) -> dict[int, float]:
        """The group's vote: answer key -> summed weight (first-reported first)."""
        return self._native.vote(check_int("vote", "group", group))

    def leader(self, group: int) -> int | None:
        """The answer key with the most weight (ties: the key reported first); None before any vote."""
        return self._native.leader(check_int("leader", "group", group))

    def stats(self) -> dict:
        """Counters: submitted, active, queued, finished (reason name -> count),
        tokens_generated, groups (groups held: see "Group lifetime" in this
        module's docstring), and tokens_saved_estimate: the sum, over sequences
        ended by LOW_CONFIDENCE, CONFIDENT or GROUP_CONSENSUS, of
        max_new_tokens - num_tokens. It is the budget those sequences did not
        spend, an upper bound on the tokens saved (they might have hit EOS
        sooner)."""
        return self._native.stats()

    def _fail_next_admissions(self, count: int) -> None:
        """Testing hook: the next ``count`` admissions fail as if memory ran out."""
        self._native.fail_next_admissions(check_int("_fail_next_admissions", "count", count, 0))

    def __repr__(self) -> str:
        return f"Scheduler(capacity={self.capacity}, layout={self.layout!r}, batch_size={self.batch_size})"
