"""Interleaved median timing: on a shared, noisy machine the candidates of one
comparison are timed round-robin so they see the same conditions, and only
medians (and ratios of medians) are reported."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_times(candidates: dict[str, Callable[[], object]], *, repeats: int = 15, warmup: int = 2,
                 min_seconds: float = 0.0) -> dict[str, float]:
    """Median wall time in seconds of each callable, timed round-robin.

    Each round runs every candidate once; rounds continue until `repeats`
    rounds are done and at least `min_seconds` have passed.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - start < min_seconds:
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in samples.items()}
