"""Plain-torch references: the readable definition of every signal and the
``torch`` backend of :func:`haltwise.signals`. (The benchmarks' eager
baseline, with torch's own sampler, is benchmarks/signals.py:torch_eager.)

The sampling noise follows the contract in ``csrc/philox.h`` exactly (Philox
4x32-10, key = the row's seed, counter = (column block, offset, salt)), so
this backend draws the same tokens as ``native`` and ``triton``.
"""
from __future__ import annotations

import torch

from .signals_types import STATUS_NAN, STATUS_NO_FINITE, STATUS_POSINF, Signals, score_scales

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for uint32 values held in int64, without
    int64 overflow: b is split into 16-bit halves."""
    low_part = a * (b & 0xFFFF)  # < 2^48
    high_part = a * (b >> 16)  # < 2^48
    hi = (high_part + (low_part >> 16)) >> 16
    lo = ((high_part << 16) + low_part) & _MASK32
    return hi, lo


def philox4x32_10(
    c0: int | torch.Tensor, c1: int | torch.Tensor, c2: int | torch.Tensor, c3: int | torch.Tensor,
    k0: int | torch.Tensor, k1: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox 4x32-10 on int64 tensors holding uint32 values (broadcastable).

    Returns the four output words as int64 tensors in [0, 2^32).
    """
    c0, c1, c2, c3, k0, k1 = (torch.as_tensor(v, dtype=torch.int64) for v in (c0, c1, c2, c3, k0, k1))
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_ROUND_A, c0)
        hi2, lo2 = _mulhilo32(_ROUND_B, c2)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def random_bits(seed: torch.Tensor, offset: torch.Tensor, salt: torch.Tensor, vocab: int) -> torch.Tensor:
    """The 32 random bits of every (row, column): int64 [batch, vocab] in [0, 2^32).

    seed, offset, salt: int64 [batch]. Column j uses word (j >> 4) & 3 of
    Philox at counter ((j >> 6) * 16 + (j & 15), offset_lo, offset_hi, salt).
    """
    col = torch.arange(vocab, device=seed.device)
    counter = (col >> 6) * 16 + (col & 15)  # [vocab]
    word = (col >> 4) & 3  # [vocab]
    k0, k1 = (seed & _MASK32)[:, None], ((seed >> 32) & _MASK32)[:, None]
    off_lo, off_hi = (offset & _MASK32)[:, None], ((offset >> 32) & _MASK32)[:, None]
    words = philox4x32_10(counter[None, :], off_lo, off_hi, salt[:, None], k0, k1)
    stacked = torch.stack(torch.broadcast_tensors(*words), dim=-1)  # [batch, vocab, 4]
    return stacked.gather(-1, word.expand(len(seed), vocab)[..., None]).squeeze(-1)


def gumbel_noise(seed: torch.Tensor, offset: torch.Tensor, salt: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise float32 [batch, vocab]: u = ((bits >> 8) + 0.5) / 2^24, g = -log(-log u)."""
    u = ((random_bits(seed, offset, salt, vocab) >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    return -torch.log(-torch.log(u))


def row_status(x: torch.Tensor) -> torch.Tensor:
    """int8 [batch] status bits of float32 logits [batch, vocab]."""
    status = torch.isnan(x).any(-1).to(torch.int8) * STATUS_NAN
    status |= torch.isposinf(x).any(-1).to(torch.int8) * STATUS_POSINF
    status |= (~torch.isfinite(x).any(-1)).to(torch.int8) * STATUS_NO_FINITE
    return status


def signals_torch(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k_conf: int,
    seed: torch.Tensor,
    offset: torch.Tensor,
    salt: torch.Tensor,
) -> Signals:
    """The stop signals with plain torch ops, float32.

    logits: [batch, vocab] float32/float16/bfloat16, any device.
    seed, offset, salt: int64 [batch] on the logits' device; the sampling
    noise follows the contract, so the tokens are those of the other backends.
    """
    x = logits.float()
    batch, vocab = x.shape
    status = row_status(x)
    valid = status == 0
    x = torch.where(valid[:, None], x, torch.zeros_like(x))  # placeholders keep the math finite

    lse = torch.logsumexp(x, dim=-1)  # [batch]
    logp = x - lse[:, None]  # [batch, vocab], -inf where masked
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    entropy = entropy.clamp(0.0, float(torch.log(torch.tensor(float(vocab)))))

    n_keep = min(max(top_k_conf, 2), vocab)
    top_x = x.topk(n_keep, dim=-1).values  # [batch, n_keep], descending
    top = top_x - lse[:, None]  # log p of the largest; -inf where x - lse overflows (p = 0 all the same)
    confidence = top[:, 0].exp()
    second = top[:, 1].exp() if vocab > 1 else torch.zeros_like(confidence)
    margin = confidence - second

    if top_k_conf > 0:
        finite = torch.isfinite(x).sum(-1)  # [batch]
        k = finite.clamp(max=top_k_conf)
        keep = torch.arange(n_keep, device=x.device)[None, :] < k[:, None]
        # float64: x - lse can pass float32's range (logits ~ +-3e38) while the mean is representable
        top64 = top_x.double() - lse.double()[:, None]
        topk_conf = (-torch.where(keep, top64, torch.zeros_like(top64)).sum(-1) / k.clamp(min=1)).float()
    else:
        topk_conf = torch.zeros_like(confidence)

    if temperature == 0.0:
        token = x.argmax(-1)  # lowest index on ties
    else:
        # x * x_scale + g * noise_scale: never overflows, same order as x / T + g (score_scales)
        x_scale, noise_scale = score_scales(temperature)
        token = (x * x_scale + gumbel_noise(seed, offset, salt, vocab) * noise_scale).argmax(-1)
    logprob = logp.gather(1, token[:, None]).squeeze(1)

    zero = torch.zeros_like(confidence)
    return Signals(
        token=torch.where(valid, token, torch.zeros_like(token)),
        logprob=torch.where(valid, logprob, zero),
        entropy=torch.where(valid, entropy, zero),
        confidence=torch.where(valid, confidence, zero),
        margin=torch.where(valid, margin, zero),
        topk_conf=torch.where(valid, topk_conf, zero),
        status=status,
    )
