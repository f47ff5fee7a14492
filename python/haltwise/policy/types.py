"""The policy's public value types: the :class:`Plan` a request runs under
and the :class:`TraceOutcome` of each finished trace reported back
(policy.py holds the Policy that makes and reads them)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..scheduler import StopConfig
from ..trace_rules import oriented_signal
from .strategy import Strategy

KINDS = ("warmup", "control", "shadow", "policy")
SOURCES = ("label", "user")


@dataclass(frozen=True)
class Plan:
    """What to run for one request.

    request_id: the caller's id
    key:        the request's bucket ("" is the global one)
    source:     the bucket whose values apply (None: no bucket could say)
    how:        "certified" (source's own test), "deepconf" (source's warm-up
                start, not yet certified) or "uncut"
    kind:       "warmup" / "control" (run uncut, all traces, signals kept:
                stop.record_signals is set), "shadow" (run uncut, the cut is
                shadowed: stop.shadow is set) or "policy" (run as planned)
    stop:       the StopConfig for every trace of the request
    traces:     how many traces to sample
    threshold:  the LOW_CONFIDENCE threshold in force (in shadow: the one
                shadowed); None: no cut
    overload:   whether the overload budget applies
    epsilon:    the accuracy budget that certified it
    strategy:   how its traces run (policy/strategy.py: waves, consensus,
                weighting); control and warm-up plans run every trace at once
    """

    request_id: int
    key: str
    source: str | None
    how: str
    kind: str
    stop: StopConfig
    traces: int
    threshold: float | None
    overload: bool
    epsilon: float
    strategy: Strategy | None = None

    def __post_init__(self):
        if self.strategy is None:
            object.__setattr__(self, "strategy", Strategy(self.traces))

    @property
    def control(self) -> bool:
        """Run uncut, every trace to its natural end, and report all traces' signals."""
        return self.kind in ("warmup", "control")

    @property
    def shadow(self) -> bool:
        return self.kind == "shadow"


@dataclass(frozen=True)
class TraceOutcome:
    """One finished trace, as the policy needs it.

    answer:        the extracted answer (None: no parseable answer)
    num_tokens:    tokens generated
    reason:        its StopReason (it votes iff EOS, STOP_SEQUENCE, MAX_TOKENS or CONFIDENT)
    signal:        float ``(num_tokens,)`` values of the policy's oriented
                   signal (config.signal); required for warm-up and control plans
    mean_logprob:  for confidence-weighted votes
    would_stop_step, would_stop_reason: shadow mode records (Finished fields)
    """

    answer: int | None
    num_tokens: int
    reason: int
    signal: np.ndarray | None = None
    mean_logprob: float = math.nan
    would_stop_step: int = -1
    would_stop_reason: int | None = None

    @classmethod
    def from_finished(cls, record, answer: int | None, *, signal: str) -> "TraceOutcome":
        """From a :class:`haltwise.Finished` record (with ``record_signals`` for
        control plans) and the answer the caller extracted from its tokens."""
        values = None
        if getattr(record, "signals", None) is not None:
            raw = record.signals
            values = oriented_signal(raw, signal, np.float32)
        reason = record.would_stop_reason
        return cls(answer=answer, num_tokens=int(record.num_tokens), reason=int(record.reason), signal=values,
                   mean_logprob=float(record.mean_logprob), would_stop_step=int(record.would_stop_step),
                   would_stop_reason=None if reason is None else int(reason))
