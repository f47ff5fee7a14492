"""Median timing of several candidates in one run. On a shared, noisy machine
the candidates are timed in alternating blocks so they see the same
conditions, and only medians (and ratios of medians) are reported. Blocks
(several consecutive calls of one candidate) keep one candidate from paying
for another: torch's OpenMP workers spin for a while after an op, and the
first call after a switch also finds the caches full of the other's data."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_times(candidates: dict[str, Callable[[], object]], *, repeats: int = 15, block: int = 3,
                 warmup: int = 1) -> dict[str, float]:
    """Median wall time in seconds of each callable: `repeats` rounds, each
    running every candidate `block` times in a row (the first of a block, a
    warm-up, is not timed)."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in samples.items()}
