"""Scheduler step time against capacity: one long request (batch 1), the
median of 300 steps (step plus reading keep and request_ids), compact and
slots layouts. The step must not depend on the capacity.

    python bench/scheduler_capacity.py [capacity ...]     (default: 256 10000000)
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import haltwise
from haltwise.stepper import HostSignals


def step_us(capacity: int, layout: str, steps: int = 300) -> float:
    sched = haltwise.Scheduler(capacity, layout=layout)
    sched.submit(0, max_new_tokens=10**6)
    sched.step(np.zeros(0, np.int64), None)
    tokens, signals = np.zeros(1, np.int64), HostSignals.zeros(1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = sched.step(tokens, signals)
        plan.keep, plan.request_ids  # noqa: B018
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


if __name__ == "__main__":
    for capacity in [int(a) for a in sys.argv[1:]] or [256, 10**7]:
        for layout in ("compact", "slots"):
            print(f"capacity {capacity:>10} {layout:8} batch 1: {step_us(capacity, layout):10.1f} us/step", flush=True)
