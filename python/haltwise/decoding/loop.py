"""The decode loop: continuous batching driven by haltwise.Stepper.

Top to bottom, each iteration:

1. hand the previous plan's finished sequences to the caller (who may report
   answers, settle groups, submit more requests);
2. evict: the runner drops the rows of sequences that ended (swap-remove);
3. decode one token for every row that continues;
4. prefill the requests the scheduler admitted (new rows at the end);
5. ``stepper.step`` on the logits, in the scheduler's row order.

The scheduler runs in its "slots" layout: each sequence keeps a stable slot,
and the loop maps slots to the runner's physical rows, which it compacts by
swap-remove. Only small per-row tensors are permuted between the two orders;
a cut trace stops costing compute at the next step, and no step copies the
KV cache of the rows that continue.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..scheduler import Finished, Scheduler, StopConfig
from ..stepper import Stepper
from .runners import Runner


@dataclass
class LoopStats:
    steps: int = 0
    tokens: int = 0  # tokens generated (decode steps over all rows, prefill first tokens included)
    wall_s: float = 0.0
    max_batch: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


class DecodeLoop:
    """Continuous-batching decode of submitted requests through a Stepper.

    runner: a :class:`~haltwise.decoding.runners.Runner` with capacity >= the
    scheduler's. scheduler: a Scheduler with ``layout="slots"``. stepper: any
    object with the Stepper interface (``start``, ``step``, ``batch_size``).
    """

    def __init__(self, runner: Runner, scheduler: Scheduler, stepper: Stepper):
        if scheduler.layout != "slots":
            raise ValueError(f"DecodeLoop: scheduler layout must be 'slots', got {scheduler.layout!r}")
        self.runner = runner
        self.scheduler = scheduler
        self.stepper = stepper
        self.prompts: dict[int, Sequence[int]] = {}
        self.stats = LoopStats()

    def submit(self, request_id: int, prompt: Sequence[int], *, max_new_tokens: int, group: int | None = None,
               priority: int = 0, stop: StopConfig = StopConfig()) -> None:
        """Queue a request; its prompt token ids are prefilled when it is admitted."""
        self.scheduler.submit(request_id, max_new_tokens=max_new_tokens, priority=priority, group=group, stop=stop)
        self.prompts[request_id] = list(prompt)

    def run(self, on_finished: Callable[[Finished], None]) -> LoopStats:
        """Decode until nothing is active or queued. ``on_finished`` sees every
        ended sequence, once, before the next step (it may submit, cancel,
        report answers or settle groups)."""
        device = self.runner.device
        start = time.perf_counter()
        slot_to_row: dict[int, int] = {}  # scheduler slot -> runner row
        step_slots = np.zeros(0, dtype=np.int64)  # slots of the batch just stepped, in row order
        out = self.stepper.start(device)
        while True:
            plan = out.plan
            for record in plan.finished:
                self.prompts.pop(record.request_id, None)
                on_finished(record)

            # 2. evict: rows of the sequences that ended leave the runner
            kept = np.asarray(plan.keep, dtype=np.int64)
            ended = np.setdiff1d(step_slots, kept, assume_unique=True)
            self._evict([slot_to_row.pop(int(s)) for s in ended], slot_to_row)

            # 3. decode one token for the rows that continue (runner order)
            parts = []
            if len(kept):
                rows = torch.as_tensor([slot_to_row[int(s)] for s in kept], dtype=torch.int64, device=device)
                tokens = torch.empty(len(kept), dtype=torch.int64, device=device)
                tokens[rows] = out.tokens  # out.tokens is in the order of plan.keep
                parts.append(self.runner.decode(tokens))
                self.stats.tokens += len(kept)

            # 4. prefill the admitted requests into new rows at the end
            if plan.admitted:
                first_row = self.runner.batch
                prompts = [self.prompts[rid] for rid, _ in plan.admitted]
                parts.append(self.runner.prefill(prompts))
                for i, (_, slot) in enumerate(plan.admitted):
                    slot_to_row[slot] = first_row + i
                self.stats.tokens += len(prompts)  # each prefill yields a first token

            # 5. step on the logits in the scheduler's row order (active slots, increasing)
            assert plan.active is not None  # the slots layout
            step_slots = np.flatnonzero(plan.active).astype(np.int64)
            if len(step_slots) == 0:
                if self.scheduler.stats()["queued"] == 0:
                    break
                out = self.stepper.start(device)  # an empty step admits what the caller just submitted
                continue
            logits = torch.cat(parts) if len(parts) > 1 else parts[0]  # [batch, V], runner order
            order = torch.as_tensor([slot_to_row[int(s)] for s in step_slots], dtype=torch.int64, device=device)
            out = self.stepper.step(logits.index_select(0, order))
            self.stats.steps += 1
            self.stats.max_batch = max(self.stats.max_batch, len(step_slots))
            self.stats.batch_sizes.append(len(step_slots))
        self.stats.wall_s += time.perf_counter() - start
        return self.stats

    def _evict(self, rows: list[int], slot_to_row: dict[int, int]) -> None:
        """Swap-remove `rows` from the runner: live rows from the end fill the holes."""
        if not rows:
            return
        n = self.runner.batch
        new_n = n - len(rows)
        removed = set(rows)
        holes = sorted(r for r in rows if r < new_n)
        movers = [r for r in range(new_n, n) if r not in removed]
        if holes:
            row_to_slot = {row: slot for slot, row in slot_to_row.items()}
            self.runner.move_rows(torch.as_tensor(movers, device=self.runner.device),
                                  torch.as_tensor(holes, device=self.runner.device))
            for src, dst in zip(movers, holes):
                slot_to_row[row_to_slot[src]] = dst
        self.runner.truncate(new_n)
