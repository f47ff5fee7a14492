"""Trace semantics shared by the decode loop (decoding/parallel.py), the
policy (policy/) and the offline replays: which traces vote, a trace's vote
weight, and DeepConf's per-trace confidence. One definition each."""
from __future__ import annotations

import math

import numpy as np

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
