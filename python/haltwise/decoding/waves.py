"""How one problem's K traces are started and when its vote settles: the one
state machine behind both parallel-sampling drivers (haltwise's own loop,
decoding/parallel.py, and vLLM, integrations/vllm.py).

* Warm-up (``warmup > 0``): the first ``warmup`` traces run uncut and alone;
  when they have all ended, the problem's threshold is set from them
  (DeepConf online: ``voting.warmup_threshold``) and the rest start.
* Waves (``wave_size > 0``): after the warm-up the traces start
  ``wave_size`` at a time, the next wave once no trace of the problem is in
  flight (0: all at once).
* Consensus, checked after each trace ends:
  - "unbeatable": the leader (by weight, every trace's weight <= 1) cannot be
    overturned by the traces not yet ended. The answer is then the one the
    full vote would give, whatever order the traces end in, so it is checked
    after every trace and in-flight siblings are cut at once;
  - "beta" / "run" (voting.vote_settled): checked only at a *wave boundary*
    (no trace of the problem in flight), on the traces of the waves so far.
    Which traces have ended is then fixed by the plan, not by timing, so the
    vote is a deterministic function of the traces -- what lets the policy
    replay these rules exactly on recorded traces (policy/strategy.py).
"""
from __future__ import annotations

import math
from typing import Sequence

from ..voting import vote_settled, warmup_threshold


class TraceWaves:
    """One problem's traces under one plan (an EarlyStopSettings-like object
    with traces, warmup, keep_percent, wave_size, consensus,
    consensus_threshold and an optional fixed ``threshold``)."""

    def __init__(self, settings):
        self.settings = settings
        self.queued = list(range(settings.traces))  # trace indices not started yet, in order
        self.in_flight: set[int] = set()
        self.ended = 0
        self.settled = False
        fixed = getattr(settings, "threshold", None)
        self.threshold: float | None = fixed  # LOW_CONFIDENCE threshold of the traces after warm-up
        self.warming = settings.warmup > 0
        self.dropped: list[int] = []  # traces never started because the vote settled

    def threshold_of(self, trace: int) -> float | None:
        """The threshold trace `trace` runs under (warm-up traces run uncut)."""
        return None if trace < self.settings.warmup else self.threshold

    def start(self) -> list[int]:
        """Traces to start now (each once); [] while the plan waits."""
        s = self.settings
        if self.settled or not self.queued:
            return []
        if self.warming:
            n = s.warmup
            if self.in_flight or self.ended:  # the warm-up is out: wait for it
                return []
        elif s.wave_size:
            if self.in_flight:
                return []
            n = s.wave_size
        else:
            n = len(self.queued)
        out, self.queued = self.queued[:n], self.queued[n:]
        self.in_flight.update(out)
        return out

    def end(self, trace: int, answers: Sequence[int | None], weights: Sequence[float] | None,
            warmup_lowests: Sequence[float] = ()) -> bool:
        """Trace `trace` ended. `answers` / `weights`: the votes of the
        problem's ended traces so far, in trace order (None: no vote);
        `warmup_lowests`: the warm-up traces' lowest window means, read when
        the warm-up is complete. Returns True when the vote has just settled:
        the caller ends the traces in flight and start() returns no more."""
        s = self.settings
        self.in_flight.discard(trace)
        self.ended += 1
        if self.warming and self.ended == s.warmup:
            self.warming = False
            usable = [v for v in warmup_lowests if not math.isnan(v)]
            self.threshold = warmup_threshold(usable, s.keep_percent) if usable else None
        remaining = s.traces - self.ended
        if self.settled or s.consensus is None or remaining == 0 or self.warming:
            return False
        if s.consensus != "unbeatable" and self.in_flight:
            return False  # beta / run: only at a wave boundary
        if vote_settled(answers, rule=s.consensus, threshold=s.consensus_threshold, remaining=remaining,
                        weights=weights if s.consensus == "unbeatable" else None):
            self.settled = True
            self.dropped, self.queued = self.queued, []
            return True
        return False
