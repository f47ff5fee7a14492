"""Trace semantics shared by the decode loop (decoding/parallel.py), the
policy (policy/) and the offline replays: which traces vote, a trace's vote
weight, DeepConf's per-trace confidence, a signal's orientation and the step
at which a threshold cuts a trace. One definition each."""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from numpy.typing import DTypeLike

from .scheduler import StopReason

# Traces whose answer counts: they ended on their own, not cut or dropped.
VOTING_REASONS = frozenset({StopReason.EOS, StopReason.STOP_SEQUENCE, StopReason.MAX_TOKENS, StopReason.CONFIDENT})


def vote_weight(mean_logprob: float) -> float:
    """Confidence-weighted vote: exp(mean log-probability) of the trace; 0 for
    a trace without a token (NaN mean)."""
    return 0.0 if math.isnan(mean_logprob) else math.exp(mean_logprob)


def vote_weights(mean_logprobs) -> np.ndarray:
    """:func:`vote_weight` of an array (float64)."""
    values = np.asarray(mean_logprobs, dtype=np.float64)
    return np.where(np.isnan(values), 0.0, np.exp(np.where(np.isnan(values), 0.0, values)))


def lowest_group_confidence(min_window_mean: float, whole_mean: float) -> float:
    """DeepConf's per-trace confidence: the lowest sliding-window mean, or the
    whole trace's mean when the trace is shorter than the window."""
    return whole_mean if math.isnan(min_window_mean) else min_window_mean


def oriented_signal(signals: Mapping[str, np.ndarray], name: str, dtype: DTypeLike | None = None) -> np.ndarray:
    """Per-token values of signal `name` oriented as the confidence rules use
    them (higher = more confident) from raw per-token signals: "neg_entropy"
    is minus signals["entropy"], every other name is signals[name] itself.
    dtype: of the result (None: that of the stored values)."""
    if name == "neg_entropy":
        return -np.asarray(signals["entropy"], dtype)
    return np.asarray(signals[name], dtype)


def first_cut_step(running_min: np.ndarray, start: int, threshold: float) -> int | None:
    """The token count at which `threshold` cuts a trace (LOW_CONFIDENCE: the
    first evaluated window mean < threshold), None if it never does.
    running_min: the running minimum of the window mean over the evaluated
    steps; start: the steps before the first evaluated one."""
    if not running_min.size or not running_min[-1] < threshold:
        return None
    # running_min is non-increasing: the first step below t is a search on its negation
    return start + int(np.searchsorted(-running_min, -threshold, side="right")) + 1


def first_cut_steps(running_min: np.ndarray, start: int, thresholds: np.ndarray, length: int) -> np.ndarray:
    """int64 (len(thresholds),): :func:`first_cut_step` of each threshold, with
    `length` (the uncut trace's tokens) where it never cuts."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if not running_min.size:
        return np.full(thresholds.shape, length, dtype=np.int64)
    first = np.searchsorted(-running_min, -thresholds, side="right")
    return np.where(first < running_min.size, start + first + 1, length).astype(np.int64)
