"""Hugging Face ``generate`` integration (``pip install haltwise[hf]``).

A read-only LogitsProcessor records the haltwise signals of every step; a
StoppingCriteria feeds the tokens ``generate`` chose and those signals to a
haltwise Scheduler (one request per batch row, "slots" layout so row i is
slot i) and returns the per-sequence ``is_done`` tensor of the current API.
So the same stop rules (EOS, stop sequences, MAX_TOKENS, LOW_CONFIDENCE,
CONFIDENT, INVALID_LOGITS) end each sequence individually, with its reason.

    proc, crit = haltwise_stopping(batch_size=4, stop=StopConfig(...), max_new_tokens=64)
    out = model.generate(ids, logits_processor=LogitsProcessorList([proc]),
                         stopping_criteria=StoppingCriteriaList([crit]), max_new_tokens=64)
    crit.finished[row].reason    # why row stopped

Rows that are done are padded with ``pad_token_id`` from then on (the
criteria carries an ``eos_token_id``, which is what makes ``generate`` pad).
``generate`` appends custom processors after its own, so the signals are those
of the scores as the processor receives them: the raw logits for greedy
decoding, the temperature-scaled (and top-k/top-p masked) ones when sampling
with warpers. The logprob fed to the rules is that of the token ``generate``
actually chose.
"""
from __future__ import annotations

from typing import Sequence, cast

import numpy as np
import torch
from transformers import LogitsProcessor, StoppingCriteria

from ..scheduler import Finished, Scheduler, StopConfig
from ..signals import signals
from ..signals_types import Signals
from ..stepper import HostSignals


class HaltwiseSignalsProcessor(LogitsProcessor):
    """Read-only: computes :func:`haltwise.signals` on each step's scores
    ``(batch_size, vocab_size)`` and keeps them; returns the scores unchanged."""

    def __init__(self, *, top_k_conf: int = 20, backend: str = "auto"):
        self.top_k_conf = top_k_conf
        self.backend = backend
        self.last: Signals | None = None
        self.last_scores: torch.Tensor | None = None
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = signals(scores, top_k_conf=self.top_k_conf, backend=self.backend)
        self.last_scores = scores
        self.steps += 1
        return scores


class HaltwiseStoppingCriteria(StoppingCriteria):
    """Applies haltwise stop rules inside ``generate``, row by row.

    processor: the HaltwiseSignalsProcessor in the same ``generate`` call.
    stop, max_new_tokens: one for all rows, or one per row.
    After (or during) generation, ``finished[row]`` is the row's Finished
    record (reason, tokens, confidence summary); :meth:`close` ends rows that
    ``generate`` stopped for its own reasons (CANCELLED) so every row ends once.
    """

    def __init__(self, processor: HaltwiseSignalsProcessor, *, batch_size: int,
                 stop: StopConfig | Sequence[StopConfig] = StopConfig(),
                 max_new_tokens: int | Sequence[int] = 256):
        stops = [stop] * batch_size if isinstance(stop, StopConfig) else list(stop)
        limits = [max_new_tokens] * batch_size if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(stops) != batch_size or len(limits) != batch_size:
            raise ValueError(f"HaltwiseStoppingCriteria: stop and max_new_tokens must have batch_size={batch_size} "
                             f"entries, got {len(stops)} and {len(limits)}")
        self.processor = processor
        self.batch_size = batch_size
        self.scheduler = Scheduler(batch_size, layout="slots")
        for row in range(batch_size):
            self.scheduler.submit(row, max_new_tokens=limits[row], stop=stops[row])
        plan = self.scheduler.step(np.zeros(0, dtype=np.int64), HostSignals.zeros(0))  # admits row i into slot i
        if [slot for _, slot in plan.admitted] != list(range(batch_size)):
            raise RuntimeError("HaltwiseStoppingCriteria: expected request i in slot i")
        assert plan.active is not None  # the slots layout
        self.active = np.flatnonzero(plan.active)
        self.done = torch.zeros(batch_size, dtype=torch.bool)
        self.finished: dict[int, Finished] = {}
        # generate() pads the rows that are done (instead of sampling on) only
        # when some criteria has an `eos_token_id`; ours are those of the configs.
        self.eos_token_id = sorted({t for s in stops for t in s.eos_ids})

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        sig, last_scores = self.processor.last, self.processor.last_scores
        if sig is None or last_scores is None or sig.token.shape[0] != self.batch_size:
            raise RuntimeError("HaltwiseStoppingCriteria: pass the HaltwiseSignalsProcessor of this criteria to "
                               "generate(logits_processor=...) so each step's signals are recorded")
        token = input_ids[:, -1]  # [batch], the token generate chose
        # logprob of that token: x_token - lse, with lse = x_argmax - logprob_argmax from the fused pass
        x = last_scores.float()
        lse = x.gather(1, sig.token[:, None]).squeeze(1) - sig.logprob
        logprob = x.gather(1, token[:, None]).squeeze(1) - lse
        rows = torch.from_numpy(self.active).to(token.device)
        host = {name: getattr(sig, name).index_select(0, rows).cpu().numpy()
                for name in ("entropy", "confidence", "margin", "topk_conf", "status")}
        host["logprob"] = logprob.index_select(0, rows).float().cpu().numpy()
        plan = self.scheduler.step(token.index_select(0, rows).cpu().numpy(), HostSignals(**host))
        self._record(plan)
        return cast(torch.BoolTensor, self.done.to(input_ids.device))  # bool dtype

    def close(self) -> dict[int, Finished]:
        """End the rows ``generate`` stopped on its own (CANCELLED); returns ``finished``."""
        for row in self.active:
            self.scheduler.cancel(int(row))
        if len(self.active):
            self._record(self.scheduler.step(np.zeros(len(self.active), dtype=np.int64),
                                             HostSignals.zeros(len(self.active))))
        return self.finished

    def _record(self, plan) -> None:
        for record in plan.finished:
            self.finished[record.request_id] = record
            self.done[record.request_id] = True
        assert plan.active is not None  # the slots layout
        self.active = np.flatnonzero(plan.active)


def haltwise_stopping(*, batch_size: int, stop: StopConfig | Sequence[StopConfig] = StopConfig(),
                      max_new_tokens: int | Sequence[int] = 256, top_k_conf: int = 20, backend: str = "auto"):
    """A (processor, criteria) pair to pass to ``generate``."""
    processor = HaltwiseSignalsProcessor(top_k_conf=top_k_conf, backend=backend)
    return processor, HaltwiseStoppingCriteria(processor, batch_size=batch_size, stop=stop,
                                                max_new_tokens=max_new_tokens)
