"""The ``native`` backend: hands raw buffers to the fused C++ kernel
(csrc/signals_cpu.cc), which releases the GIL and runs on torch's thread count."""
from __future__ import annotations

import torch

from ._native import core
from .signals_types import Signals, empty_signals

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def signals_native(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k_conf: int,
    seed: torch.Tensor,
    offset: torch.Tensor,
    salted: bool,
    out: Signals | None = None,
) -> Signals:
    """logits: CPU [batch, vocab] float32/float16/bfloat16, unit column stride.
    seed, offset: CPU int64 [batch], contiguous. salted: mix the row index into
    the counter (scalar seed/offset). out: optional preallocated contiguous
    outputs (tests poison them to prove every row is written)."""
    batch, vocab = logits.shape
    out = out if out is not None else empty_signals(batch)
    sample = temperature > 0.0
    core().signals_cpu(
        logits=logits.data_ptr(),
        dtype=_DTYPE_CODES[logits.dtype],
        batch=batch,
        vocab=vocab,
        row_stride=logits.stride(0),
        sample=sample,
        inv_temperature=1.0 / temperature if sample else 0.0,
        top_k_conf=top_k_conf,
        seed=seed.data_ptr(),
        offset=offset.data_ptr(),
        salt_with_row=salted,
        token=out.token.data_ptr(),
        logprob=out.logprob.data_ptr(),
        entropy=out.entropy.data_ptr(),
        confidence=out.confidence.data_ptr(),
        margin=out.margin.data_ptr(),
        topk_conf=out.topk_conf.data_ptr(),
        status=out.status.data_ptr(),
        num_threads=torch.get_num_threads(),
    )
    return out
