"""Cost-benefit: expected value per request of a candidate threshold,

    EV = value_per_correct x EM - price_per_1k_tokens x tokens / 1000,

with EM and tokens estimated on the bucket's control requests (EM: the
labelled ones, as the uncut EM minus the mean paired difference, a lower
estimate when labels say only right/wrong; tokens: all of them)."""
from __future__ import annotations

import numpy as np


def expected_value(em: float, tokens: float, *, price_per_1k_tokens: float, value_per_correct: float) -> float:
    return value_per_correct * em - price_per_1k_tokens * tokens / 1000.0


def candidate_table(em_uncut: float, mean_difference: np.ndarray, mean_tokens: np.ndarray, thresholds,
                    *, price_per_1k_tokens: float | None, value_per_correct: float | None) -> list[dict]:
    """One row per candidate: threshold, estimated EM, tokens per request and
    (when prices are set) expected value."""
    rows = []
    for c, threshold in enumerate(thresholds):
        em = float(em_uncut - mean_difference[c])
        row = {"threshold": threshold, "em": em, "tokens": float(mean_tokens[c])}
        if price_per_1k_tokens is not None and value_per_correct is not None:
            row["value"] = expected_value(em, row["tokens"], price_per_1k_tokens=price_per_1k_tokens,
                                          value_per_correct=value_per_correct)
        rows.append(row)
    return rows
