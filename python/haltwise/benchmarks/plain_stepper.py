"""The baseline step function: torch argmax / multinomial on the logits and
nothing else, with the same interface as haltwise.Stepper. The scheduler
still does the bookkeeping any continuous-batching loop needs (EOS, max
length, eviction, admission), fed zero signals, so comparing the two loops
isolates what haltwise's signals and stop rules cost per step."""
from __future__ import annotations

import numpy as np
import torch

from ..scheduler import Scheduler
from ..stepper import HostSignals, StepOutput


class PlainStepper:
    def __init__(self, scheduler: Scheduler, *, temperature: float = 1.0, seed: int = 0):
        self.scheduler = scheduler
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)
        self._slots = np.zeros(0, dtype=np.int64)
        self.batch_size = 0

    def start(self, device="cpu") -> StepOutput:
        plan = self.scheduler.step(np.zeros(0, dtype=np.int64), HostSignals.zeros(0))
        return self._output(plan, torch.zeros(0, dtype=torch.int64, device=device))

    def step(self, logits: torch.Tensor) -> StepOutput:
        if self.temperature == 0.0:
            tokens = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)
            tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        plan = self.scheduler.step(tokens.cpu().numpy(), HostSignals.zeros(len(tokens)))
        return self._output(plan, tokens)

    def _output(self, plan, tokens: torch.Tensor) -> StepOutput:
        kept_rows = plan.keep if plan.active is None else np.searchsorted(self._slots, plan.keep)
        keep = torch.tensor(kept_rows, dtype=torch.int64, device=tokens.device)
        if plan.active is not None:
            self._slots = np.flatnonzero(plan.active)
        self.batch_size = len(plan.request_ids)
        return StepOutput(tokens=tokens.index_select(0, keep), keep=keep, plan=plan, signals=None)
