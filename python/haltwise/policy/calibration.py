"""Calibration: turning uncut traces into candidate thresholds and into what
each candidate would have done.

* A trace's *profile*: the running minimum of its sliding-window mean over the
  steps where the scheduler evaluates the confidence rules. A threshold t cuts
  the trace iff its lowest window mean is < t, at the first step whose window
  mean is < t -- so one profile answers the cut of every threshold at once.
  The scheduler does not evaluate the confidence rules at the step where an
  earlier rule ends the sequence (EOS, STOP_SEQUENCE, MAX_TOKENS,
  INVALID_LOGITS), so an uncut trace that ended that way is evaluated on all
  but its last token (as ``Finished.min_window_mean`` is).
* The candidate *grid* of a bucket: quantiles of the lowest window means of
  its warm-up traces, ascending -- from safest (cuts least) to most aggressive.
* The DeepConf start: :func:`haltwise.voting.warmup_threshold` of the warm-up
  traces, snapped down to the grid.
* A request's *candidate outcomes*: for each candidate (traces K', grid index
  j, with j = -1 meaning "no cut"), the voted answer and the tokens spent when
  only its first K' traces run and each is cut where threshold j would cut it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..scheduler import StopReason
from ..trace_rules import VOTING_REASONS, first_cut_step, first_cut_steps, vote_weight
from ..tracebank import window_means
from ..voting import warmup_threshold
from .strategy import Strategy, deepconf_cut, replay, replay_columns

# Rules checked before LOW_CONFIDENCE: the step they fire at is never evaluated by it.
ENDS_BEFORE_CONFIDENCE = frozenset({StopReason.EOS, StopReason.STOP_SEQUENCE, StopReason.MAX_TOKENS,
                                    StopReason.INVALID_LOGITS})
NO_VOTE = np.iinfo(np.int64).min  # stands for "no answer" in int64 answer arrays


@dataclass(frozen=True)
class TraceProfile:
    """What a threshold would do to one uncut trace.

    start:   steps before the first evaluated one (max(1, min_new_tokens) - 1)
    running: float64 (evaluated steps,) running minimum of the window mean
    length:  tokens the uncut trace generated
    answer:  its answer (None: none, or a reason that does not vote)
    weight:  its vote weight under confidence weighting (exp of mean logprob)
    """

    start: int
    running: np.ndarray
    length: int
    answer: int | None
    weight: float

    @property
    def lowest(self) -> float:
        """Lowest window mean (NaN if the rules were never evaluated): t cuts iff lowest < t."""
        return float(self.running[-1]) if self.running.size else math.nan

    def cut_length(self, threshold: float) -> int | None:
        """Tokens at which `threshold` cuts the trace, None if it never does."""
        return first_cut_step(self.running, self.start, threshold)

    def cut_lengths(self, thresholds: np.ndarray) -> np.ndarray:
        """int64 (len(thresholds),): tokens generated under each threshold --
        the cut step, or the full length where the threshold never cuts."""
        return first_cut_steps(self.running, self.start, thresholds, self.length)


def evaluated_length(num_tokens: int, reason: int) -> int:
    """Tokens of an uncut trace at which the confidence rules were evaluated."""
    return num_tokens - 1 if num_tokens > 0 and StopReason(reason) in ENDS_BEFORE_CONFIDENCE else num_tokens


def trace_profile(values: np.ndarray, *, reason: int, answer: int | None, window: int, min_new_tokens: int,
                  mean_logprob: float = math.nan) -> TraceProfile:
    """The profile of an uncut trace from its per-token oriented signal values
    (float ``(num_tokens,)``, higher = more confident)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"trace_profile: values must be 1-D (num_tokens,), got shape {values.shape}")
    n = len(values)
    evaluated = evaluated_length(n, reason)
    start = max(1, min_new_tokens) - 1
    means = window_means(values[:evaluated], window)[start:]
    running = np.minimum.accumulate(means) if means.size else means
    votes = StopReason(reason) in VOTING_REASONS and answer is not None
    weight = vote_weight(mean_logprob)
    return TraceProfile(start=start if means.size else 0, running=running, length=n,
                        answer=int(answer) if votes else None, weight=weight)


def quantile_levels(size: int, low: float, high: float) -> np.ndarray:
    """`size` quantile levels evenly spaced in [low, high]."""
    if size < 1:
        raise ValueError(f"quantile_levels: size must be >= 1, got {size}")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"quantile_levels: need 0 <= low <= high <= 1, got low={low}, high={high}")
    return np.linspace(low, high, size)


def make_grid(lowests: Sequence[float], levels: np.ndarray) -> np.ndarray:
    """Candidate thresholds, ascending, duplicates removed (float64): the
    quantiles of the warm-up lowest window means at `levels`, together with as
    many thresholds evenly spaced in value between the first and the last of
    them. Quantiles alone are dense where warm-up traces are dense and can
    leave a wide gap exactly where the few low-confidence traces lie (a
    well-calibrated model's warm-up has few of them); the even part bounds
    every gap by range / (len(levels) - 1)."""
    values = np.asarray([v for v in lowests if not math.isnan(v)], dtype=np.float64)
    if values.size == 0:
        raise ValueError("make_grid: lowests holds no finite window mean (the warm-up traces were too short "
                         "for the confidence rules to be evaluated)")
    quantiles = np.quantile(values, levels)
    even = np.linspace(quantiles[0], quantiles[-1], len(levels))
    return np.unique(np.concatenate([quantiles, even]))


def deepconf_index(lowests: Sequence[float], keep_percent: float, grid: np.ndarray) -> int:
    """The DeepConf start as a grid index: the largest grid threshold <= the
    warm-up percentile threshold (-1 when it is below the whole grid)."""
    usable = [v for v in lowests if not math.isnan(v)]
    if not usable:
        return -1
    threshold = warmup_threshold(usable, keep_percent)
    return int(np.searchsorted(grid, threshold, side="right")) - 1


@dataclass(frozen=True)
class CandidateOutcomes:
    """What every candidate would have done on one request.

    trace_options: tuple of K' values (rows)
    answers: int64 (len(trace_options), G + 1): the voted answer (NO_VOTE: none);
             column 0 is "no cut", column j + 1 is grid index j
    tokens:  int64 (same shape): tokens generated
    """

    trace_options: tuple[int, ...]
    answers: np.ndarray
    tokens: np.ndarray


def candidate_outcomes(profiles: Sequence[TraceProfile], grid: np.ndarray, trace_options: Sequence, *,
                       weighting: str) -> CandidateOutcomes:
    """Replays every candidate (a row per strategy x {no cut} + grid) on a
    request's uncut traces (in trace order). A row is a K' (all traces at
    once, no consensus, `weighting`) or a :class:`~haltwise.policy.strategy.Strategy`
    (waves, consensus, its own weighting: strategy.replay). Row 0 must run
    every trace the request ran with no consensus: its column 0 is the uncut
    answer the others are compared with. The vote is
    :func:`haltwise.voting.weighted_vote` over the traces that are not cut,
    voted and have an answer."""
    strategies = [s if isinstance(s, Strategy) else Strategy(int(s), weighting=weighting) for s in trace_options]
    grid = np.asarray(grid, dtype=np.float64)
    G = len(grid)
    thresholds = np.concatenate([[-math.inf], grid])  # -inf: never cuts
    lengths = np.stack([p.cut_lengths(thresholds) for p in profiles]) if profiles else np.zeros((0, G + 1), np.int64)
    lowest = np.array([p.lowest for p in profiles], dtype=np.float64)
    cut = lowest[:, None] < thresholds[None, :]  # NaN lowest: never cut
    answers = np.full((len(strategies), G + 1), NO_VOTE, dtype=np.int64)
    tokens = np.zeros((len(strategies), G + 1), dtype=np.int64)
    if not strategies or strategies[0].traces != len(profiles) or strategies[0].consensus is not None:
        raise ValueError(f"candidate_outcomes: trace_options[0] must be the request's {len(profiles)} traces, "
                         f"got {tuple(trace_options)}")
    votes = np.array([p.answer if p.answer is not None else NO_VOTE for p in profiles], dtype=np.int64)
    all_weights = np.array([p.weight for p in profiles], dtype=np.float64)
    for row, strategy in enumerate(strategies):
        k = strategy.traces
        if not 1 <= k <= len(profiles):
            raise ValueError(f"candidate_outcomes: trace_options must be in [1, {len(profiles)}], got {k}")
        if strategy.warmup:  # DeepConf's per-problem threshold: one candidate, the same in every column
            kept, spent, _ = deepconf_cut(strategy, [p.lowest for p in profiles], [p.length for p in profiles],
                                          lambda t: [p.cut_length(t) for p in profiles])
            answer, used = replay(strategy, [int(v) if keep and v != NO_VOTE else None for v, keep in zip(votes, kept)],
                                  all_weights, spent)
            answers[row], tokens[row] = NO_VOTE if answer is None else answer, used
        elif strategy.consensus is None:
            tokens[row] = lengths[:k].sum(axis=0)
            weights = all_weights[:k] if strategy.weighting == "confidence" else None
            answers[row] = vote_matrix(votes[:k], weights, ~cut[:k].T)
        else:
            answers[row], tokens[row] = replay_columns(strategy, votes, all_weights, lengths.T, ~cut.T, NO_VOTE)
    return CandidateOutcomes(trace_options=tuple(s.traces for s in strategies), answers=answers, tokens=tokens)


def vote_matrix(answers: np.ndarray, weights: np.ndarray | None, kept: np.ndarray) -> np.ndarray:
    """Votes of many cut patterns at once: answers int64 (K,) (NO_VOTE: no
    answer), weights float (K,) or None (majority), kept bool (T, K) ->
    int64 (T,) winners (NO_VOTE: nothing voted). Row t is exactly
    :func:`haltwise.voting.weighted_vote` over the kept traces in trace order
    (ties: the answer seen first)."""
    answers = np.asarray(answers, dtype=np.int64)
    kept = np.asarray(kept, dtype=bool) & (answers != NO_VOTE)[None, :]
    K = len(answers)
    keys, inverse = np.unique(answers, return_inverse=True)
    member = inverse.reshape(-1)[:, None] == np.arange(len(keys))[None, :]  # (K, A)
    w = np.ones(K) if weights is None else np.asarray(weights, dtype=np.float64)
    totals = kept.astype(np.float64) @ (member * w[:, None])  # (T, A)
    first = np.where(kept[:, :, None] & member[None, :, :], np.arange(K)[None, :, None], K).min(axis=1)  # (T, A)
    present = first < K
    best = np.full(kept.shape[0], NO_VOTE, dtype=np.int64)
    has = present.any(axis=1)
    if has.any():
        top = np.where(present, totals, -np.inf).max(axis=1, keepdims=True)
        winner = np.where(present & (totals == top), first, K).argmin(axis=1)  # ties: the one seen first
        best[has] = keys[winner[has]]
    return best


def differences(outcomes: CandidateOutcomes, *, correct: bool, reference: int | None) -> np.ndarray:
    """int8 (len(trace_options), G + 1): the paired EM difference D = correct
    (uncut, all traces) - correct (candidate) of one labelled request, or a
    pointwise upper bound of it when only right/wrong is known:

    * reference known: exact, in {-1, 0, 1};
    * uncut right (correct=True): any other answer is wrong, D = [answer differs];
    * uncut wrong, no reference: D <= 0 and whether a different answer is
      right is unknown; 0 is used (an upper bound, so tests stay valid).
    """
    uncut = outcomes.answers[0, 0]
    if reference is not None:
        right_uncut = int(uncut == reference)
        return (right_uncut - (outcomes.answers == reference).astype(np.int8)).astype(np.int8)
    if correct:
        return (outcomes.answers != uncut).astype(np.int8)
    return np.zeros(outcomes.answers.shape, dtype=np.int8)
