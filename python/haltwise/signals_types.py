"""The output type of :func:`haltwise.signals` and the row status codes."""
from __future__ import annotations

from typing import NamedTuple

import torch

# Row status bits (int8); 0 means the row was valid. A row can carry several.
STATUS_OK = 0
STATUS_NAN = 1  # the row holds a NaN
STATUS_POSINF = 2  # the row holds +inf
STATUS_NO_FINITE = 4  # no entry of the row is finite (e.g. everything masked to -inf)

MAX_TOP_K_CONF = 128  # csrc/signals_cpu.h kMaxTopKConf


class Signals(NamedTuple):
    """Per-row outputs of one decode step, each a tensor of shape ``(batch_size,)``
    on the logits' device. Rows with ``status != 0`` hold placeholders (token 0,
    all signals 0.0).
    """

    token: torch.Tensor  # int64: argmax (T=0) or Gumbel-max sample (T>0)
    logprob: torch.Tensor  # float32: x_token - logsumexp(x), under T=1
    entropy: torch.Tensor  # float32: nats, in [0, log V]
    confidence: torch.Tensor  # float32: max_j p_j
    margin: torch.Tensor  # float32: p_(1) - p_(2); 1.0 when only one token is finite
    topk_conf: torch.Tensor  # float32: -(1/k) sum_{j<=k} log p_(j); zeros when top_k_conf == 0
    status: torch.Tensor  # int8: 0 valid, else STATUS_* bits


def empty_signals(batch: int, device: torch.device | str = "cpu") -> Signals:
    """Uninitialised output buffers for a backend to fill, each ``(batch,)`` on `device`."""
    f32 = torch.float32
    return Signals(
        token=torch.empty(batch, dtype=torch.int64, device=device),
        logprob=torch.empty(batch, dtype=f32, device=device),
        entropy=torch.empty(batch, dtype=f32, device=device),
        confidence=torch.empty(batch, dtype=f32, device=device),
        margin=torch.empty(batch, dtype=f32, device=device),
        topk_conf=torch.empty(batch, dtype=f32, device=device),
        status=torch.empty(batch, dtype=torch.int8, device=device),
    )
