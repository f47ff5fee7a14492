"""A strategy is the whole way a request runs beside its cut threshold: how
many traces (K'), in waves of what size, which consensus rule ends the vote
early, and how votes are weighted. The policy certifies (strategy, threshold)
pairs; this module replays a strategy on a control request's uncut traces,
for every candidate threshold at once, exactly as the parallel-sampling
drivers run it (decoding/waves.py):

* the first K' traces run (trace k is the same sample whatever the plan:
  noise is keyed by request and position), each cut where the threshold cuts
  it (calibration.TraceProfile);
* "beta" / "run" settle only at wave boundaries, on the traces of the waves
  so far: the replayed vote and tokens are exact;
* "unbeatable" is checked after every trace; its answer is the full vote's
  (the leader could no longer be overturned), so the replayed answer is
  exact. Its tokens assume the traces of a wave start together and end after
  their lengths (the siblings in flight are charged up to the settling
  moment): exact while a wave fits in the batch, an estimate otherwise --
  tokens only steer which certified candidate is chosen, never what is
  certified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..voting import vote_settled, warmup_threshold, weighted_vote

CONSENSUS_RULES = (None, "unbeatable", "beta", "run")
WEIGHTINGS = ("majority", "confidence")


@dataclass(frozen=True)
class Strategy:
    """traces: K'; wave_size: traces per wave (0: all at once); consensus:
    None, "unbeatable", "beta" or "run" with its consensus_threshold;
    weighting: "majority" or "confidence"; warmup, keep_percent: DeepConf's
    per-problem threshold (the first `warmup` traces run uncut, alone; the
    others are cut at the (100 - keep_percent)-th percentile of their lowest
    window means; 0: the policy's grid threshold instead)."""

    traces: int
    wave_size: int = 0
    consensus: str | None = None
    consensus_threshold: float = 0.95
    weighting: str = "majority"
    warmup: int = 0
    keep_percent: float = 90.0

    def __post_init__(self):
        if isinstance(self.traces, bool) or not isinstance(self.traces, int) or self.traces < 1:
            raise ValueError(f"Strategy: traces must be an int >= 1, got {self.traces!r}")
        if isinstance(self.wave_size, bool) or not isinstance(self.wave_size, int) or self.wave_size < 0:
            raise ValueError(f"Strategy: wave_size must be an int >= 0, got {self.wave_size!r}")
        if self.consensus not in CONSENSUS_RULES:
            raise ValueError(f"Strategy: consensus must be one of {CONSENSUS_RULES}, got {self.consensus!r}")
        if self.consensus in ("beta", "run") and not self.wave_size:
            raise ValueError(f"Strategy: consensus {self.consensus!r} is checked at wave boundaries and needs "
                             f"wave_size > 0, got {self.wave_size}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Strategy: weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup < self.traces:
            raise ValueError(f"Strategy: warmup must be an int in [0, traces={self.traces}), got {self.warmup!r}")
        if not 0.0 < self.keep_percent <= 100.0:
            raise ValueError(f"Strategy: keep_percent must be in (0, 100], got {self.keep_percent!r}")

    @property
    def name(self) -> str:
        parts = [f"K={self.traces}"]
        if self.wave_size:
            parts.append(f"waves of {self.wave_size}")
        if self.consensus == "unbeatable":
            parts.append("unbeatable")
        elif self.consensus is not None:
            parts.append(f"{self.consensus} {self.consensus_threshold:g}")
        if self.weighting != "majority":
            parts.append(self.weighting)
        if self.warmup:
            parts.append(f"DeepConf warm-up {self.warmup} keep {self.keep_percent:g}%")
        return ", ".join(parts)

    @property
    def exact(self) -> bool:
        """Its vote is the vote of all its traces uncut (no cut, and no warm-up
        threshold): no consensus, or "unbeatable" (it stops only once the leader
        can no longer be overturned)."""
        return self.consensus in (None, "unbeatable") and not self.warmup

    def same_vote_as(self, base: "Strategy") -> bool:
        """Its answer is always `base`'s uncut answer on the same traces: both
        exact, with the same traces and the same vote weighting (a confidence-
        weighted vote can differ from the majority on the same traces)."""
        return self.exact and base.exact and self.traces == base.traces and self.weighting == base.weighting

    def waves(self) -> list[range]:
        """The traces in the order they start: the warm-up alone, then waves."""
        K, w = self.traces, self.warmup
        out = [range(0, w)] if w else []
        step = self.wave_size or (K - w)
        out += [range(start, min(start + step, K)) for start in range(w, K, step)]
        return out


def deepconf_cut(strategy: Strategy, lowests: Sequence[float], lengths: Sequence[int],
                 cut_lengths: Callable[[float], Sequence[int | None]]) -> tuple[list[bool], list[int], float | None]:
    """A warm-up strategy's per-problem cut of one request's traces: the
    threshold from the warm-up traces' lowest window means; `cut_lengths(t)`
    gives each trace's cut step under threshold t (None: not cut). Returns
    (kept per trace, tokens per trace, the threshold or None)."""
    K, w = strategy.traces, strategy.warmup
    usable = [v for v in lowests[:w] if not math.isnan(v)]
    if not usable:
        return [True] * K, [int(n) for n in lengths[:K]], None
    threshold = warmup_threshold(usable, strategy.keep_percent)
    steps = cut_lengths(threshold)
    kept = [k < w or steps[k] is None for k in range(K)]
    tokens = [int(lengths[k]) if kept[k] else int(steps[k]) for k in range(K)]
    return kept, tokens, threshold


def run(strategy: Strategy, answers: Sequence[int | None], weights: Sequence[float] | np.ndarray,
        lengths: Sequence[int] | np.ndarray) -> tuple[int | None, list[int], list[bool]]:
    """`strategy` on one request's traces under one cut: answers[k] is trace
    k's vote (None: cut, no answer or no vote), weights[k] its confidence
    weight, lengths[k] its tokens under the cut. Returns (voted answer, tokens
    of each of the first K' traces, whether each ended before the vote
    settled: the others ended with GROUP_CONSENSUS, in flight or unstarted)."""
    K = strategy.traces
    answers, lengths = list(answers[:K]), [int(n) for n in lengths[:K]]
    weights = list(weights[:K]) if strategy.weighting == "confidence" else [1.0] * K
    rule = strategy.consensus
    if rule is None:
        return weighted_vote(answers, weights), lengths, [True] * K
    if rule != "unbeatable":
        for members in strategy.waves():
            end = members.stop
            if end < K and vote_settled(answers[:end], rule=rule, threshold=strategy.consensus_threshold,
                                        remaining=K - end):
                return (weighted_vote(answers[:end], weights[:end]), lengths[:end] + [0] * (K - end),
                        [True] * end + [False] * (K - end))
        return weighted_vote(answers, weights), lengths, [True] * K
    # unbeatable: after every trace, in the order they end (wave by wave, shortest first, ties by index); a
    # warm-up is checked only once it is complete
    ended: list[int] = []
    for members in strategy.waves():
        warmup = strategy.warmup and members.start == 0
        for k in sorted(members, key=lambda i: (lengths[i], i)):
            ended.append(k)
            order = sorted(ended)
            if warmup and len(ended) < members.stop:
                continue
            if len(ended) < K and vote_settled([answers[i] for i in order], rule="unbeatable", threshold=0.0,
                                               remaining=K - len(ended), weights=[weights[i] for i in order]):
                at = lengths[k]  # the settling moment within the wave: siblings in flight stop there
                done = set(ended)
                tokens = [lengths[i] if i in done else (at if i in members else 0) for i in range(K)]
                return (weighted_vote([answers[i] for i in order], [weights[i] for i in order]), tokens,
                        [i in done for i in range(K)])
    return weighted_vote(answers, weights), lengths, [True] * K


def replay(strategy: Strategy, answers: Sequence[int | None], weights: Sequence[float] | np.ndarray,
           lengths: Sequence[int] | np.ndarray) -> tuple[int | None, int]:
    """(voted answer, tokens) of :func:`run`."""
    answer, tokens, _ = run(strategy, answers, weights, lengths)
    return answer, sum(tokens)


def replay_columns(strategy: Strategy, answers: np.ndarray, weights: np.ndarray, lengths: np.ndarray,
                   kept: np.ndarray, no_vote: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`replay` for every cut column at once: answers int64 (K,)
    (no_vote: none), weights (K,), lengths int64 (T, K) tokens per column,
    kept bool (T, K) (not cut). Returns int64 (T,) answers (no_vote: none)
    and int64 (T,) tokens. Columns with the same cut pattern and lengths are
    replayed once."""
    T = lengths.shape[0]
    out_answers = np.full(T, no_vote, dtype=np.int64)
    out_tokens = np.zeros(T, dtype=np.int64)
    seen: dict[tuple, tuple[int | None, int]] = {}
    K = strategy.traces
    for t in range(T):
        key = (kept[t, :K].tobytes(), lengths[t, :K].tobytes())
        if key not in seen:
            votes = [int(a) if (keep and a != no_vote) else None for a, keep in zip(answers[:K], kept[t, :K])]
            seen[key] = replay(strategy, votes, weights[:K], lengths[t, :K])
        answer, tokens = seen[key]
        out_answers[t] = no_vote if answer is None else answer
        out_tokens[t] = tokens
    return out_answers, out_tokens
