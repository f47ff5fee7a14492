"""pytest-benchmark suite of one scheduler step: native (binding included) vs
the pure-Python reference, on the workload of haltwise.benchmarks.scheduler
(full batch, every stop rule on, a steady stream of admissions)::

    pytest bench/bench_scheduler.py --benchmark-group-by=param:batch

`haltwise bench scheduler --json PATH` runs the same workload and reports
medians and the speedup of one run.
"""
from __future__ import annotations

import pytest

from haltwise.benchmarks.scheduler import SchedulerWorkload


@pytest.mark.parametrize("batch", [8, 256, 4096])
@pytest.mark.parametrize("implementation", ["native", "python"])
def test_scheduler_step(benchmark, implementation, batch):
    slow = implementation == "python" and batch > 256  # ~30 ms a step: fewer rounds
    workload = SchedulerWorkload(batch, implementation)
    workload.warm_up(50 if slow else 150)
    benchmark.pedantic(
        workload.run,
        setup=lambda: ((workload.prepare(),), {}),  # bookkeeping and inputs: not timed
        rounds=20 if slow else (200 if implementation == "python" else 2000),
        iterations=1,
    )
