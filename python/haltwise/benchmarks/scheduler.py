"""`haltwise bench scheduler`: the cost of one scheduler step, native
(haltwise.Scheduler, Python binding included) vs the pure-Python reference
(haltwise.scheduler_reference), on the same workload: a full batch, every
stop rule on, a steady stream of admissions.

The workload (one per batch size B, identical for both implementations):
capacity B, kept full; the queue is kept at B/4 + 8 requests; max_new_tokens
uniform in [32, 160]; half of the requests are parallel samples in groups of 8
(their votes reported as they finish, 60% for one answer; settled by the
unbeatable-leader rule or consensus_fraction 0.75 of at least 4 votes); every
request has 2 EOS ids, 3 stop sequences, min_new_tokens 4, LOW_CONFIDENCE on
topk_conf over a window of 8, CONFIDENT after 3 calm steps. Tokens and signals are random
(vocabulary 1000, stop-sequence tokens made frequent), drawn ahead of time so
that drawing them is not timed; every rule fires now and then (see ``stats``
in each row).

Timed per step: ``step(tokens, signals)`` and reading the plan as a decode
loop does (keep, admitted, request_ids, positions, each finished record's
id, reason and group). Not timed: drawing inputs, reporting answers,
submitting. Reported: medians over many steps, the two implementations timed
in alternating rounds so that they share the machine's conditions.
"""
from __future__ import annotations

import gc
import statistics
import time

import numpy as np

from ..scheduler import Scheduler, StepPlan, StopConfig
from ..scheduler_reference import ReferenceScheduler, ReferenceStepPlan
from ..stepper import HostSignals

BATCHES = (8, 256, 4096)
VOCAB = 1000
EOS_IDS = (1, 2)
STOP = StopConfig(
    eos_ids=EOS_IDS,
    stop_sequences=((9, 10), (9, 9, 9), (10, 11, 12)),
    min_new_tokens=4,
    low_conf_signal="topk_conf",
    low_conf_threshold=1.0,
    window=8,
    confident_entropy_below=0.5,
    confident_margin_above=0.5,
    confident_steps=3,
)
GROUP_SIZE = 8
IMPLEMENTATIONS: dict[str, type[Scheduler] | type[ReferenceScheduler]] = {"native": Scheduler, "python": ReferenceScheduler}


class SchedulerWorkload:
    """A scheduler under a steady stream of requests. ``prepare()`` draws the
    next step's inputs (and does the untimed bookkeeping of the previous
    plan); ``run(inputs)`` is the timed part."""

    def __init__(self, batch: int, implementation: str = "native", *, seed: int = 0, pool: int = 64):
        self.batch = batch
        self.scheduler = IMPLEMENTATIONS[implementation](batch, consensus_fraction=0.75, consensus_min_votes=4)
        self.rng = np.random.default_rng(seed)
        self.queue_target = batch // 4 + 8
        self.next_id = 0
        self.plan: StepPlan | ReferenceStepPlan | None = None
        rng = np.random.default_rng(seed + 1)
        tokens = rng.integers(20, VOCAB, (pool, batch))
        tokens[rng.random((pool, batch)) < 1 / 100] = EOS_IDS[0]
        tokens[rng.random((pool, batch)) < 1 / 40] = 9
        tokens[rng.random((pool, batch)) < 1 / 40] = 10
        self.tokens = tokens.astype(np.int64)
        self.signals = [
            HostSignals(
                logprob=-rng.exponential(0.7, batch).astype(np.float32),
                entropy=rng.uniform(0.0, 3.0, batch).astype(np.float32),
                confidence=rng.uniform(0.2, 1.0, batch).astype(np.float32),
                margin=rng.uniform(0.0, 1.0, batch).astype(np.float32),
                topk_conf=rng.uniform(0.5, 3.0, batch).astype(np.float32),
                status=(rng.random(batch) < 1e-4).astype(np.int8),
            )
            for _ in range(pool)
        ]
        self.turn = 0
        self._top_up()

    def _top_up(self) -> None:
        sched = self.scheduler
        while sched.stats()["queued"] < self.queue_target:
            group = None
            if self.rng.random() < 0.5:  # a group: its members' ids are group * GROUP_SIZE + k
                group = -(-self.next_id // GROUP_SIZE)
                self.next_id = group * GROUP_SIZE
            for _ in range(GROUP_SIZE if group is not None else 1):
                sched.submit(self.next_id, max_new_tokens=int(self.rng.integers(32, 161)), stop=STOP, group=group)
                self.next_id += 1

    def prepare(self):
        """Bookkeeping of the previous plan, then the next step's inputs (untimed)."""
        if self.plan is not None:
            for f in self.plan.finished:
                if f.group is not None:
                    self.scheduler.report_answer(f.request_id, 0 if self.rng.random() < 0.6 else 1, 1.0)
            self._top_up()
        n = self.scheduler.batch_size
        i = self.turn % len(self.tokens)
        self.turn += 1
        s = self.signals[i]
        return self.tokens[i, :n], HostSignals(s.logprob[:n], s.entropy[:n], s.confidence[:n], s.margin[:n],
                                               s.topk_conf[:n], s.status[:n])

    def run(self, inputs) -> None:
        """The timed part: one step and reading its plan as a decode loop does."""
        plan = self.scheduler.step(*inputs)
        plan.keep, plan.admitted, plan.request_ids, plan.positions  # noqa: B018
        for f in plan.finished:
            f.request_id, f.reason, f.group  # noqa: B018
        self.plan = plan

    def timed_step(self) -> float:
        inputs = self.prepare()
        t0 = time.perf_counter()
        self.run(inputs)
        return time.perf_counter() - t0

    def warm_up(self, steps: int) -> None:
        for _ in range(steps):
            self.run(self.prepare())


def bench_scheduler(batches=BATCHES, *, repeats: int = 11, warmup_steps: int = 150, seed: int = 0) -> list[dict]:
    """Median step time (microseconds) of the native scheduler and the Python
    reference at each batch size. Each of ``repeats`` rounds times a block of
    steps of each implementation in turn (more steps for the faster one).

    Returns one dict per batch: batch, native_us, python_us, speedup
    (python_us / native_us), and stats (the native scheduler's counters at the
    end, showing which rules fired)."""
    rows = []
    for batch in batches:
        native = SchedulerWorkload(batch, "native", seed=seed)
        python = SchedulerWorkload(batch, "python", seed=seed)
        native.warm_up(warmup_steps)
        python.warm_up(warmup_steps if batch <= 256 else warmup_steps // 3)
        native_block = 200
        python_block = 50 if batch <= 256 else 4
        samples: dict[str, list[float]] = {"native": [], "python": []}
        gc.collect()
        for _ in range(repeats):
            samples["native"] += [native.timed_step() for _ in range(native_block)]
            samples["python"] += [python.timed_step() for _ in range(python_block)]
        native_us = statistics.median(samples["native"]) * 1e6
        python_us = statistics.median(samples["python"]) * 1e6
        rows.append({"batch": batch, "native_us": native_us, "python_us": python_us,
                     "speedup": python_us / native_us, "stats": native.scheduler.stats()})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'batch':>6} {'native us':>10} {'python us':>11} {'speedup':>8}"]
    for r in rows:
        lines.append(f"{r['batch']:>6} {r['native_us']:>10.2f} {r['python_us']:>11.1f} {r['speedup']:>7.1f}x")
    lines.append("median step time, binding included; speedup = python reference / native (higher is better)")
    return "\n".join(lines)
