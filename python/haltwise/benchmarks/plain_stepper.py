"""The baseline step function: torch argmax / multinomial on the logits and
nothing else, with the same interface as haltwise.Stepper. The scheduler
still does the bookkeeping any continuous-batching loop needs (EOS, max
length, eviction, admission), fed zero signals, so comparing the two loops
isolates what haltwise's signals and stop rules cost per step."""
from __future__ import annotations

import torch

from ..scheduler import Scheduler
from ..stepper import HostSignals, StepOutput, Stepper


class PlainStepper(Stepper):
    def __init__(self, scheduler: Scheduler, *, temperature: float = 1.0, seed: int = 0):
        super().__init__(scheduler, temperature=temperature, seed=seed)
        self.generator = torch.Generator().manual_seed(seed)

    def step(self, logits: torch.Tensor) -> StepOutput:
        if self.temperature == 0.0:
            tokens = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)
            tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        plan = self.scheduler.step(tokens.cpu().numpy(), HostSignals.zeros(len(tokens)))
        return self._output(plan, None, tokens)
