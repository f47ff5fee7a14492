"""``haltwise.signals``: argument checks and backend dispatch for the fused
per-step stop signals (definitions in docs/signals.md and in reference.py)."""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch

from .signals_types import MAX_TOP_K_CONF, Signals

if TYPE_CHECKING:
    from typing_extensions import TypeGuard

BACKENDS = ("auto", "torch", "native", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_TEMPERATURE = 1e-6  # below this (but > 0) float32 scores x / T + g lose the noise for |x| ~ 10: use 0
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_row(name: str, value: object, batch: int, device: torch.device) -> torch.Tensor:
    """An int or an int64 tensor [batch] as a contiguous int64 [batch] tensor on `device`."""
    if _is_int(value):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"signals: {name} must fit in int64, got {value}")
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64:
            raise TypeError(f"signals: {name} must be an int or an int64 tensor, got a {value.dtype} tensor")
        if value.shape != (batch,):
            raise ValueError(f"signals: {name} must have shape ({batch},) (one per row), got {tuple(value.shape)}")
        return value.to(device).contiguous()
    raise TypeError(f"signals: {name} must be an int or an int64 tensor [batch], got {type(value).__name__}")


def _check_logits(logits: object) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"signals: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"signals: logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if batch == 0 or vocab == 0:
        raise ValueError(f"signals: logits must have batch > 0 and vocab > 0, got shape {tuple(logits.shape)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"signals: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if vocab > 1 and logits.stride(1) != 1:
        raise ValueError(f"signals: logits must have unit column stride, got strides {tuple(logits.stride())}")


def _check_options(temperature: object, top_k_conf: object, backend: object) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"signals: temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"signals: temperature must be finite and >= 0, got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"signals: temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {temperature}")
    if not _is_int(top_k_conf):
        raise TypeError(f"signals: top_k_conf must be an int, got {type(top_k_conf).__name__}")
    if not 0 <= top_k_conf <= MAX_TOP_K_CONF:
        raise ValueError(f"signals: top_k_conf must be in [0, {MAX_TOP_K_CONF}], got {top_k_conf}")
    if not isinstance(backend, str):
        raise TypeError(f"signals: backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"signals: backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` on `device`, or ValueError if it cannot run there."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "native"
    if backend == "native" and device.type != "cpu":
        raise ValueError(f"signals: backend 'native' needs CPU logits, got device {device}")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        raise ValueError(
            f"signals: backend 'triton' needs CUDA logits (or CPU logits with TRITON_INTERPRET=1), got device {device}"
        )
    return backend


def signals(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k_conf: int = 0,
    seed: int | torch.Tensor = 0,
    offset: int | torch.Tensor = 0,
    backend: str = "auto",
) -> Signals:
    """Next token and stop signals of one decode step, reading the logits once.

    Parameters
    ----------
    logits: torch.Tensor
        ``(batch_size, vocab_size)``, float32 / float16 / bfloat16, CPU or CUDA,
        any row stride, unit column stride. Entries may be ``-inf`` (masked).
    temperature: float
        0 for greedy argmax (lowest index on ties); > 0 for Gumbel-max
        sampling ``argmax_j x_j / T + g_j`` with Philox noise (csrc/philox.h),
        scored in float32 so that x / T cannot overflow (signals_types.score_scales).
    top_k_conf: int
        k of the DeepConf token confidence, 0 (off) to 128.
    seed, offset: int or torch.Tensor
        Scalars (the row index is mixed in so rows differ) or int64 tensors
        ``(batch_size,)``: then a row's draw depends only on its own logits,
        seed and offset, never on its place in the batch.
    backend: str
        "auto" (triton on CUDA, native on CPU), "native", "triton" or "torch".

    Returns
    -------
    Signals
        NamedTuple of ``(batch_size,)`` tensors on the logits' device: token
        (int64), logprob, entropy, confidence, margin, topk_conf (float32) and
        status (int8, 0 = valid; rows with NaN, +inf or nothing finite get
        STATUS_* bits and placeholder outputs, never an exception).

    Example
    -------
    >>> import torch, haltwise
    >>> out = haltwise.signals(torch.tensor([[0.0, 2.0, 1.0]]), top_k_conf=2)
    >>> out.token.tolist(), round(out.confidence.item(), 4)
    ([1], 0.6652)
    """
    _check_logits(logits)
    _check_options(temperature, top_k_conf, backend)
    concrete = resolve_backend(backend, logits.device)
    batch = logits.shape[0]
    salted = _is_int(seed) and _is_int(offset)
    seed_rows = _per_row("seed", seed, batch, logits.device)
    offset_rows = _per_row("offset", offset, batch, logits.device)
    temperature = float(temperature)

    if concrete == "native":
        from .signals_native import signals_native

        return signals_native(
            logits, temperature=temperature, top_k_conf=top_k_conf, seed=seed_rows, offset=offset_rows, salted=salted
        )
    if concrete == "triton":
        from .signals_triton import signals_triton

        return signals_triton(
            logits, temperature=temperature, top_k_conf=top_k_conf, seed=seed_rows, offset=offset_rows, salted=salted
        )
    from .reference import signals_torch

    salt = torch.arange(batch, device=logits.device) if salted else torch.zeros(batch, dtype=torch.int64, device=logits.device)
    return signals_torch(logits, temperature=temperature, top_k_conf=top_k_conf, seed=seed_rows, offset=offset_rows, salt=salt)
