"""Shadow mode: a bucket's requests run uncut with the would-be threshold in
shadow (``StopConfig(shadow=True)``), so the scheduler records for each trace
the step and reason at which it would have been cut (``would_stop_step``,
``would_stop_reason``) without cutting. From those records this module works
out what the cut would have done to the request (tokens, answer), and sums it
up per bucket; once labels arrive the summary gives the estimated EM effect.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..scheduler import StopReason
from ..voting import weighted_vote
from .buckets import ShadowCounts
from .ltt import clopper_pearson_upper


@dataclass(frozen=True)
class WouldHave:
    """What the shadowed rules would have done to one request."""

    tokens: int  # tokens the request would have generated
    answer: int | None  # the vote without the traces that would have been cut
    cut_traces: int


def would_have(traces: Sequence, answers: Sequence[int | None], voting: Sequence[bool],
               weights: Sequence[float] | None) -> WouldHave:
    """traces: objects with num_tokens, would_stop_step and would_stop_reason;
    answers / voting / weights: each trace's answer, whether it voted when
    uncut, and its vote weight (None: majority)."""
    tokens, kept, kept_weights, cut = 0, [], [], 0
    for i, t in enumerate(traces):
        stops = t.would_stop_step is not None and t.would_stop_step >= 0 and \
            t.would_stop_reason is not None and StopReason(t.would_stop_reason) == StopReason.LOW_CONFIDENCE
        if stops:
            tokens += int(t.would_stop_step)
            cut += 1
            continue
        tokens += int(t.num_tokens)
        if voting[i] and answers[i] is not None:
            kept.append(answers[i])
            kept_weights.append(1.0 if weights is None else weights[i])
    answer = weighted_vote(kept, kept_weights if weights is not None else None)
    return WouldHave(tokens=tokens, answer=answer, cut_traces=cut)


def summarize(counts: ShadowCounts, *, delta: float) -> dict:
    """Shadow savings and EM effect of one bucket: the share of tokens the cut
    would have saved, how often it would have changed the answer, and, over
    the labelled shadow requests, the estimated EM change (helps - harms) / n
    with a one-sided (1 - delta) upper bound on the harm rate."""
    out = {"requests": counts.requests, "labeled": counts.labeled,
           "saved": (1.0 - counts.tokens_would / counts.tokens_uncut) if counts.tokens_uncut else None,
           "flip_rate": counts.flips / counts.requests if counts.requests else None,
           "harms": counts.harms, "helps": counts.helps}
    if counts.labeled:
        out["em_change"] = (counts.helps - counts.harms) / counts.labeled
        out["harm_rate_upper"] = clopper_pearson_upper(counts.harms, counts.labeled, delta)
    else:
        out["em_change"] = None
        out["harm_rate_upper"] = None
    return out
