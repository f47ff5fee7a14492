"""The output type of :func:`haltwise.signals` and the row status codes."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

# Row status bits (int8); 0 means the row was valid. A row can carry several.
STATUS_OK = 0
STATUS_NAN = 1  # the row holds a NaN
STATUS_POSINF = 2  # the row holds +inf
STATUS_NO_FINITE = 4  # no entry of the row is finite (e.g. everything masked to -inf)

MAX_TOP_K_CONF = 128  # csrc/signals_cpu.h kMaxTopKConf


def score_scales(temperature: float) -> tuple[float, float]:
    """(x_scale, noise_scale) of the Gumbel race at `temperature` > 0, the same
    in every backend (csrc/signals_cpu_kernel.h computes them in C++).

    The draw is token = argmax_j (x_j / T + g_j), g_j the Gumbel noise of
    csrc/philox.h: a sample of softmax(x / T). Each score is evaluated in
    float32 as fl(fl(x_j * x_scale) + fl(g_j * noise_scale)), where
    inv_t = float32(1 / T) and, when inv_t > 1, noise_scale = 2^-e is the
    power of two that brings x_scale = inv_t * noise_scale into [0.5, 1)
    (otherwise x_scale = inv_t, noise_scale = 1). So:
      - x_j * x_scale never overflows (|x_j * x_scale| <= |x_j|), while
        x_j * inv_t does for |x_j| > T * 3.4e38 (e.g. 3e38 at T = 0.5):
        the larger logit wins, as it must, instead of two +inf scores tying;
      - scaling by a power of two is exact, so wherever x_j * inv_t + g_j did
        not overflow the scores are those times noise_scale: the same order,
        the same ties, the same tokens as the unscaled score;
      - where |x / T| is so large that the noise is below float32's
        resolution (|x / T| >~ 2^24 |g|), equal logits tie and the lowest
        index wins, as for any float32 score; distinct logits that far apart
        have probability ratios below exp(-1e7) anyway.
    """
    inv_t = float(np.float32(1.0 / temperature))  # rounded once, as in every backend
    if inv_t <= 1.0:
        return inv_t, 1.0
    _, exponent = math.frexp(inv_t)  # inv_t = m * 2^exponent, m in [0.5, 1)
    noise_scale = math.ldexp(1.0, -exponent)
    return inv_t * noise_scale, noise_scale


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
