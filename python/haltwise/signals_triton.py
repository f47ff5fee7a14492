"""The ``triton`` backend of :func:`haltwise.signals`: picks the tile size and
how many segments each row is split into, allocates the outputs and launches
the kernels of kernels/signals.py (installed as ``haltwise.kernels``).
No host sync: every decision below uses shapes and device properties only.

Heuristic (untuned defaults; bench/gpu_check.py times the alternatives):
  - BLOCK, the columns per tile: the next power of two >= vocab, at least 64
    (the Philox block) and at most 4096 when greedy (16 columns per thread
    with 8 warps), 2048 when sampling (the Philox rounds hold more registers
    live), 1024 under the interpreter (its cost is per operation, so larger
    tiles are cheaper there; 1024 still gives rows of a few thousand columns
    several tiles, the loop a test should run).
  - num_warps: 4 up to 1024 columns per tile, 8 above.
  - Segments: a row is split only when the batch alone cannot fill the GPU
    (batch < 2 x SMs): enough segments for ~4 programs per SM, each segment at
    least 2 tiles long and at most 64 segments. Every segment but the last
    is a multiple of BLOCK, so the Philox column blocks never straddle two.
    The interpreter pretends to have 2 SMs, so batch 1 with a long row takes
    the split path just as it would on a GPU.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton

from .kernels.signals import _signals_merge_kernel, _signals_segment_kernel
from .signals_types import Signals, empty_signals, score_scales

MAX_BLOCK_GREEDY = 4096
MAX_BLOCK_SAMPLE = 2048
MAX_BLOCK_INTERPRET = 1024
PROGRAMS_PER_SM = 4  # target when splitting rows: enough loads in flight per SM
SPLIT_BELOW_SMS = 2  # split rows when batch < this many programs per SM
MIN_SEGMENT_TILES = 2  # shorter segments cost more in partial state than they gain
MAX_SEGMENTS = 64  # bounds the merge kernel's work per row
INTERPRET_SMS = 2


class Plan(NamedTuple):
    block: int  # columns per tile, a power of two >= 64
    num_segments: int  # programs per row; 1 = single pass, no merge kernel
    num_warps: int


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan(batch: int, vocab: int, *, sample: bool, device: torch.device) -> Plan:
    """The launch configuration for logits [batch, vocab] on `device` (see module docstring)."""
    if device.type == "cuda":
        max_block = MAX_BLOCK_SAMPLE if sample else MAX_BLOCK_GREEDY
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        max_block, sms = MAX_BLOCK_INTERPRET, INTERPRET_SMS
    block = min(max_block, max(64, triton.next_power_of_2(vocab)))
    num_segments = 1
    if batch < SPLIT_BELOW_SMS * sms:
        num_segments = min(
            math.ceil(PROGRAMS_PER_SM * sms / batch),
            math.ceil(vocab / (MIN_SEGMENT_TILES * block)),
            MAX_SEGMENTS,
        )
    return Plan(block=block, num_segments=max(num_segments, 1), num_warps=4 if block <= 1024 else 8)


def segments(vocab: int, config: Plan) -> tuple[int, int]:
    """(columns per segment, number of segments) for a row of `vocab` columns:
    the length is a multiple of config.block, the count <= config.num_segments."""
    seg_len = math.ceil(math.ceil(vocab / config.num_segments) / config.block) * config.block
    return seg_len, math.ceil(vocab / seg_len)


def empty_workspace(batch: int, num_segments: int, top_k_conf: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial-state buffers of the split path: float32 [batch, nseg, 4],
    int32 [batch, nseg, 4], float32 [batch, nseg, KP] (layout in kernels/signals.py)."""
    kp = triton.next_power_of_2(max(top_k_conf, 2))
    return (
        torch.empty(batch, num_segments, 4, dtype=torch.float32, device=device),
        torch.empty(batch, num_segments, 4, dtype=torch.int32, device=device),
        torch.empty(batch, num_segments, kp, dtype=torch.float32, device=device),
    )


def launch(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k_conf: int,
    seed: torch.Tensor,
    offset: torch.Tensor,
    salted: bool,
    config: Plan,
    out: Signals | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Signals:
    """Runs the kernels with an explicit `config`; writes into `out` and
    `workspace` when given (e.g. reused buffers) else into fresh ones.

    logits: ``(batch_size, vocab_size)`` float32/float16/bfloat16, unit column
    stride, CUDA (or CPU under TRITON_INTERPRET=1). seed, offset: int64
    ``(batch_size,)``, contiguous, on the logits' device. out: Signals of
    ``(batch_size,)`` contiguous tensors. workspace: from empty_workspace with
    the segment count of segments(vocab, config) (unused with one segment).
    """
    batch, vocab = logits.shape
    if vocab >= 2**31:  # columns are int32 inside the kernels
        raise ValueError(f"signals_triton: vocab must be < 2^31, got {vocab}")
    device = logits.device
    sample = temperature > 0.0
    keep = max(top_k_conf, 2)  # the margin needs the two largest logits
    kp = triton.next_power_of_2(keep)
    seg_len, num_segments = segments(vocab, config)
    if out is None:
        out = empty_signals(batch, device)
    common = dict(
        top_k_conf=top_k_conf,
        keep=keep,
        log_vocab=math.log(vocab),
        SAMPLE=sample,
        KP=kp,
        num_warps=config.num_warps,
        # no FMA contraction: x * x_scale + g * noise_scale rounds like the torch
        # and native backends, so sampled tokens agree (explicit also silences Triton 3.9)
        enable_fp_fusion=False,
    )
    # float32(1 / T) is rounded once, as in every backend, then split so the
    # scores cannot overflow (both factors are float32 values: passed exactly)
    x_scale, noise_scale = score_scales(temperature) if sample else (0.0, 1.0)
    if num_segments == 1:
        dummy = out.logprob  # partial-state pointers are not read on this path
        _signals_segment_kernel[(batch, 1)](
            logits, logits.stride(0), seed, offset, *out, dummy, dummy, dummy,
            vocab=vocab, seg_len=seg_len, x_scale=x_scale, noise_scale=noise_scale, SALTED=salted,
            FINALIZE=True, BLOCK=config.block, **common,
        )
        return out
    if workspace is None:
        workspace = empty_workspace(batch, num_segments, top_k_conf, device)
    elif workspace[0].shape != (batch, num_segments, 4) or workspace[2].shape[-1] != kp:
        raise ValueError(
            f"signals_triton: workspace must come from empty_workspace({batch}, {num_segments}, {top_k_conf}), "
            f"got shapes {[tuple(w.shape) for w in workspace]}"
        )
    _signals_segment_kernel[(batch, num_segments)](
        logits, logits.stride(0), seed, offset, *out, *workspace,
        vocab=vocab, seg_len=seg_len, x_scale=x_scale, noise_scale=noise_scale, SALTED=salted,
        FINALIZE=False, BLOCK=config.block, **common,
    )
    _signals_merge_kernel[(batch,)](
        logits, logits.stride(0), *out, *workspace,
        num_segments=num_segments, vocab=vocab,
        NSEG_P=triton.next_power_of_2(num_segments), **common,
    )
    return out


def signals_triton(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k_conf: int,
    seed: torch.Tensor,
    offset: torch.Tensor,
    salted: bool,
) -> Signals:
    """logits: ``(batch_size, vocab_size)`` float32/float16/bfloat16, CUDA (or
    CPU under TRITON_INTERPRET=1), unit column stride, any row stride.
    seed, offset: int64 ``(batch_size,)`` on the logits' device, contiguous.
    salted: mix the row index into the Philox counter (scalar seed/offset).
    Arguments are validated by haltwise.signals. Returns Signals on the
    logits' device."""
    batch, vocab = logits.shape
    config = plan(batch, vocab, sample=temperature > 0.0, device=logits.device)
    return launch(
        logits, temperature=temperature, top_k_conf=top_k_conf, seed=seed, offset=offset,
        salted=salted, config=config,
    )
