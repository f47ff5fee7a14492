"""vLLM integration (``pip install haltwise[vllm]``): a v1 logits processor that
stops each request early on haltwise's stop rules.

    from vllm import LLM, SamplingParams
    from haltwise.integrations.vllm import HaltwiseLogitsProcessor

    llm = LLM(model=str(haltwise.models.BUNDLED_CHECKPOINT), logits_processors=[HaltwiseLogitsProcessor], ...)
    params = SamplingParams(max_tokens=112, stop_token_ids=[2], extra_args={"haltwise": {
        "low_conf_signal": "logprob", "low_conf_threshold": -2.0, "window": 16, "min_new_tokens": 16}})

or ``vllm serve MODEL --logits-processors haltwise.integrations.vllm:HaltwiseLogitsProcessor``
with ``"vllm_xargs": {"haltwise": {...}}`` in the request body.

Per-request settings (``SamplingParams.extra_args["haltwise"]``), all optional:
``low_conf_signal``, ``low_conf_threshold``, ``window``, ``min_new_tokens`` (those
of :class:`haltwise.StopConfig`) and ``top_k_conf`` (k of the DeepConf token
confidence, default 20). ``validate_params`` refuses bad ones with vLLM's
VLLMValidationError (a ValueError from ``parse_settings``) whose message names the key;
the OpenAI server answers HTTP 400. A request without "haltwise" is
never touched: its logits are not read or written, so it decodes exactly the tokens it
decodes without the processor.

Each step (``apply``):

1. For every row that asked, the tokens vLLM sampled since the last step are fed,
   with the signals of the logits they were sampled from, to that request's stop
   rules: a one-slot native :class:`haltwise.Scheduler` per request (the same C++
   LOW_CONFIDENCE / CONFIDENT / INVALID_LOGITS rules as the decode loop and the HF
   integration; EOS, stop strings and max_tokens stay vLLM's). The logprob fed to the
   rules is that of the token vLLM chose: ``x[token] - logsumexp(x)`` over the raw
   logits, with the logsumexp recovered from the fused pass (``x[argmax] - logprob``).
2. A row whose rules fired gets its logits forced to its end token (the request's
   EOS, else its first stop token id): every other entry ``-inf``, the end token 0.
   So a cut output is the uncut output's prefix plus the end token; vLLM reports
   finish reason "stop".
3. One fused :func:`haltwise.signals` pass (native on CPU, Triton on CUDA) over the
   rows that asked and are still running (one pass per distinct ``top_k_conf``), on
   the raw logits (the model's distribution, as vLLM's default logprobs).

Rows follow :class:`BatchUpdate` exactly: removed, then added, then moved (SWAP
exchanges two rows' states, UNIDIRECTIONAL moves one and drops whatever the target
held). A request that leaves the batch (finished, aborted or preempted) ends its
rules with CANCELLED unless they had stopped it. ``stats`` counts requests by how
they ended (the stop reason names, plus "vllm" for requests vLLM ended itself), since
vLLM's output has no field for a stop reason.
"""
from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from .vllm_rows import EXTRA_ARGS_KEY, SETTING_KEYS, RowTable, parse_settings

__all__ = ["HaltwiseLogitsProcessor", "parse_settings", "EXTRA_ARGS_KEY", "SETTING_KEYS"]


class HaltwiseLogitsProcessor(LogitsProcessor):
    """vLLM v1 logits processor: haltwise's stop rules per request (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        try:
            parse_settings(sampling_params)
        except ValueError as e:  # the OpenAI server answers HTTP 400
            raise VLLMValidationError(str(e), parameter=f"extra_args.{EXTRA_ARGS_KEY}",
                                      value=(sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)) from None

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        spec = getattr(vllm_config, "speculative_config", None)
        if spec is not None:
            raise ValueError("HaltwiseLogitsProcessor: speculative decoding is not supported "
                             f"(several tokens per step have no per-token logits here), got {spec}")
        self.table = RowTable()

    @property
    def stats(self):
        """Requests by how they ended: stop reason names, "vllm" (ended by vLLM itself), "untracked"."""
        return self.table.stats

    def is_argmax_invariant(self) -> bool:
        return False  # forcing the end token changes the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.table.update(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.table.apply(logits)
