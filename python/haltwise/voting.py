"""Answer voting over the finished traces of one problem, and the rules that
say a vote is settled (so the problem's remaining traces can be dropped).

Sources: self-consistency (majority vote), DeepConf (confidence-weighted
vote, warm-up percentile threshold), Adaptive-Consistency (Beta stopping rule).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np


def weighted_vote(answers: Sequence[int | None], weights: Sequence[float] | None = None) -> int | None:
    """The answer with the largest total weight (ties: the one seen first);
    None answers (malformed traces) never win. None when nothing voted."""
    totals: dict[int, float] = {}
    for i, answer in enumerate(answers):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + (1.0 if weights is None else float(weights[i]))
    if not totals:
        return None
    return max(totals, key=lambda a: totals[a])  # max keeps the first of equal keys (insertion order)


def leader_counts(answers: Iterable[int | None]) -> tuple[int, int]:
    """(votes of the leading answer, votes of the runner-up)."""
    common = Counter(a for a in answers if a is not None).most_common(2)
    first = common[0][1] if common else 0
    second = common[1][1] if len(common) > 1 else 0
    return first, second


def beta_leader_probability(first: int, second: int) -> float:
    """P(p1 > p2) under a uniform prior when the two leading answers have
    `first` and `second` votes: P(X > 1/2) for X ~ Beta(first + 1, second + 1)
    (Adaptive-Consistency). For integer parameters the Beta CDF is a binomial
    tail: P(X <= 1/2) = P(Binomial(first + second + 1, 1/2) >= first + 1)."""
    n = first + second + 1
    tail = sum(math.comb(n, k) for k in range(first + 1, n + 1)) / 2**n
    return 1.0 - tail


def vote_settled(answers: Sequence[int | None], *, rule: str, threshold: float, remaining: int,
                 weights: Sequence[float] | None = None) -> bool:
    """Whether a problem's vote is settled.

    rule "beta": beta_leader_probability >= threshold (e.g. 0.95);
    rule "run": the first int(threshold) answers all agree;
    rule "unbeatable": the leader cannot be overturned by the `remaining`
    traces, each worth at most 1: leader > runner-up + remaining, on the
    weighted totals when `weights` (each in [0, 1]) are given.
    """
    if rule == "unbeatable" and weights is not None:
        totals: dict[int, float] = {}
        for answer, w in zip(answers, weights):
            if answer is not None:
                totals[answer] = totals.get(answer, 0.0) + float(w)
        top = sorted(totals.values(), reverse=True) + [0.0, 0.0]
        return top[0] > top[1] + remaining
    first, second = leader_counts(answers)
    if rule == "beta":
        return first > 0 and beta_leader_probability(first, second) >= threshold
    if rule == "run":
        run = int(threshold)
        valid = [a for a in answers if a is not None]
        return len(valid) >= run and len(set(valid[:run])) == 1
    if rule == "unbeatable":
        return first > second + remaining
    raise ValueError(f"vote_settled: rule must be 'beta', 'run' or 'unbeatable', got {rule!r}")


def warmup_threshold(lowest_window_means: Sequence[float], keep_percent: float) -> float:
    """DeepConf online threshold: the (100 - keep_percent)-th percentile of the
    warm-up traces' lowest window confidence. keep_percent=90 keeps traces at
    least as confident as the least confident 90% (DeepConf-high); 10 keeps only
    the top 10% (DeepConf-low)."""
    if not 0.0 < keep_percent <= 100.0:
        raise ValueError(f"warmup_threshold: keep_percent must be in (0, 100], got {keep_percent}")
    values = np.asarray([v for v in lowest_window_means if not math.isnan(v)], dtype=np.float64)
    if values.size == 0:
        raise ValueError("warmup_threshold: needs at least one warm-up trace with a window mean")
    return float(np.percentile(values, 100.0 - keep_percent))
