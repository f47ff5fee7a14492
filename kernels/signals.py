"""Triton kernels of the fused stop signals (``haltwise.signals``, backend
"triton"); the launcher is python/haltwise/signals_triton.py and the contract
is docs/signals.md, with docs/sampling.md and csrc/philox.h for the sampling
noise.

One pass per row segment keeps, per tile of BLOCK columns:
  - the max of the finite logits and its first column (greedy token),
  - s = sum exp(x - max) and t = sum exp(x - max) * (x - max), rebased when
    the max moves (entropy = log s - t / s),
  - the `keep` = max(top_k_conf, 2) largest logits, an unordered list of KP
    slots (the next power of two): a tile whose max does not beat the list's
    minimum costs nothing more; otherwise its values above the minimum are
    moved in one at a time, one int64 reduction each (_top_insert),
  - the Gumbel race argmax x * x_scale + g * noise_scale when sampling (the
    order of x / T + g, never overflowing: score_scales in
    python/haltwise/signals_types.py),
  - NaN / +inf flags, looked for only in tiles whose sum of exp comes out
    non-finite (those entries are then treated as -inf, so the math of a bad
    row stays finite; its outputs become placeholders).
With one segment per row the same program writes the outputs; otherwise each
segment writes its partial state and _signals_merge_kernel combines them.

A tile is shaped [BLOCK // 64, 4, 16] (row-major, so still contiguous columns)
because that is the Philox layout: column c uses word (c >> 4) & 3 of counter
(c >> 6) * 16 + (c & 15), so one Philox call feeds the 4 columns that differ
only in the word index, and each counter is computed once, not four times.
"""
import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))  # globals read inside @triton.jit must be constexpr
_POS_INF = tl.constexpr(float("inf"))
_INT64_MIN = tl.constexpr(-(2**63))
_INT64_MAX = tl.constexpr(2**63 - 1)
_HIGH_HALF = tl.constexpr(-(2**32))  # 0xFFFFFFFF00000000 as int64


@triton.jit
def _tile_columns(BLOCK: tl.constexpr):
    """int32 [BLOCK // 64, 4, 16] column offsets 0 .. BLOCK - 1, row-major."""
    r = tl.arange(0, BLOCK // 64)[:, None, None]
    w = tl.arange(0, 4)[None, :, None]
    lane = tl.arange(0, 16)[None, None, :]
    return r * 64 + w * 16 + lane


@triton.jit
def _gumbel_tile(start, seed, off_lo, off_hi, salt, BLOCK: tl.constexpr):
    """float32 [BLOCK // 64, 4, 16] Gumbel noise of columns start + _tile_columns;
    start is a multiple of 64. Mapping and constants: csrc/philox.h."""
    r = tl.arange(0, BLOCK // 64)[:, None, None]
    w = tl.arange(0, 4)[None, :, None]
    lane = tl.arange(0, 16)[None, None, :]
    c0 = (((start >> 6) + r) * 16 + lane).to(tl.uint32)  # [R, 1, 16]
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, zero + off_lo, zero + off_hi, zero + salt)
    bits = tl.where(w == 0, w0, tl.where(w == 1, w1, tl.where(w == 2, w2, w3)))  # [R, 4, 16]
    u = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24: exact, in (0, 1)
    return -tl.log(-tl.log(u))


@triton.jit
def _sortable(x):
    """int32 whose signed order is the order of float32 x (x not NaN); its own inverse."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _unsortable(key):
    """float32 from a _sortable key (int32, or the high half of an int64 key)."""
    key = key.to(tl.int32)
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _top_empty(keep, KP: tl.constexpr):
    """An empty top list: int64 [KP] keys (_sortable(value) << 32) | slot, the
    used slots (< keep) holding -inf, the others INT64_MAX (never the minimum)."""
    slots = tl.arange(0, KP)
    empty = (_sortable(tl.full([KP], _NEG_INF, tl.float32)).to(tl.int64) << 32) | slots
    return tl.where(slots < keep, empty, _INT64_MAX)


@triton.jit
def _top_values(top, keep, KP: tl.constexpr):
    """float32 [KP] values of a top list, -inf in the unused slots."""
    return tl.where(tl.arange(0, KP) < keep, _unsortable(top >> 32), _NEG_INF)


@triton.jit
def _top_insert(top, vals, idx, keep):
    """Inserts into the top list (see _top_empty) the values of `vals` (any
    shape; `idx`: distinct int32 >= 0, same shape) that beat its minimum, one
    at a time: (value, index) packed into an int64 key make each step a single
    reduction over the tile. At most `keep` steps can matter: after them every
    remaining value is <= the list's minimum. Returns (top, its minimum as float32)."""
    keys = (_sortable(vals).to(tl.int64) << 32) | idx
    best = tl.max(keys)
    low = tl.min(top)
    n = keep * 0
    while ((best >> 32) > (low >> 32)) & (n < keep):
        keys = tl.where(keys == best, _INT64_MIN, keys)  # drop this one copy
        top = tl.where(top == low, (best & _HIGH_HALF) | (low & 0xFFFFFFFF), top)  # it replaces the minimum
        low = tl.min(top)
        best = tl.max(keys)
        n += 1
    return top, _unsortable(low >> 32)


@triton.jit
def _finalize_row(
    row, row_ptr, m, s, t, argmax, best_idx, flags, top, keep, top_k_conf, log_vocab,
    token_ptr, logprob_ptr, entropy_ptr, confidence_ptr, margin_ptr, topk_conf_ptr, status_ptr,
    SAMPLE: tl.constexpr, KP: tl.constexpr,
):
    """Turns a row's merged state into its outputs. flags: 1 NaN seen, 2 +inf seen;
    m: max of the finite logits (-inf if none)."""
    status = flags | tl.where(m > _NEG_INF, 0, 4)
    ok = status == 0
    if SAMPLE:
        token = best_idx
    else:
        token = argmax
    token = tl.where(ok, token, 0)
    # bad rows compute on placeholders (m = 0, s = 1): no NaN, not even discarded ones
    m = tl.where(ok, m, 0.0)
    s = tl.where(ok, s, 1.0)
    t = tl.where(ok, t, 0.0)
    top = tl.where(ok, top, _NEG_INF)
    # one scalar re-read beats carrying the chosen logit through the race
    x_tok = tl.where(ok, tl.load(row_ptr + token).to(tl.float32), 0.0)
    log_s = tl.log(s)
    # everything relative to m: |x - m| is exact-ish even for logits ~1e4
    logprob = (x_tok - m) - log_s
    entropy = tl.minimum(tl.maximum(log_s - t / s, 0.0), log_vocab)
    confidence = 1.0 / s
    slots = tl.arange(0, KP)
    first_max = tl.min(tl.where(top == m, slots, KP))
    second = tl.max(tl.where(slots == first_max, _NEG_INF, top))  # -inf: one finite logit
    margin = confidence - tl.exp(second - m) / s
    finite = top > _NEG_INF
    n_top = tl.sum(finite.to(tl.int32))
    # float64: top - m can leave float32's range (logits ~ +-3e38) while the mean does not
    shifted = tl.where(finite, top.to(tl.float64) - m.to(tl.float64), 0.0)
    mean_shifted = tl.sum(shifted) / tl.maximum(n_top, 1).to(tl.float64)
    # top_k_conf == 1 keeps 2 logits (for the margin) but averages only the largest
    mean_shifted = tl.where(top_k_conf == 1, 0.0, mean_shifted)
    topk_conf = tl.where(top_k_conf > 0, log_s.to(tl.float64) - mean_shifted, 0.0).to(tl.float32)
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, tl.where(ok, logprob, 0.0))
    tl.store(entropy_ptr + row, tl.where(ok, entropy, 0.0))
    tl.store(confidence_ptr + row, tl.where(ok, confidence, 0.0))
    tl.store(margin_ptr + row, tl.where(ok, margin, 0.0))
    tl.store(topk_conf_ptr + row, tl.where(ok, topk_conf, 0.0))
    tl.store(status_ptr + row, status.to(tl.int8))


@triton.jit
def _signals_segment_kernel(
    logits_ptr, logits_row_stride, seed_ptr, offset_ptr,
    token_ptr, logprob_ptr, entropy_ptr, confidence_ptr, margin_ptr, topk_conf_ptr, status_ptr,
    part_f_ptr, part_i_ptr, part_top_ptr,
    vocab, seg_len, x_scale, noise_scale, top_k_conf, keep, log_vocab,
    SAMPLE: tl.constexpr, SALTED: tl.constexpr, FINALIZE: tl.constexpr,
    BLOCK: tl.constexpr, KP: tl.constexpr,
):
    """Grid (batch, num_segments). Program (row, seg) reads columns
    [seg * seg_len, min((seg + 1) * seg_len, vocab)) of its row; seg_len is a
    multiple of BLOCK (itself a multiple of 64, the Philox block).
    FINALIZE (one segment): writes the outputs, each [batch]. Otherwise writes
    the partial state of (row, seg): part_f float32 [batch, nseg, 4] = (max,
    s, t, best score), part_i int32 [batch, nseg, 4] = (argmax, best column,
    flags, unused), part_top float32 [batch, nseg, KP]."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    row_ptr = logits_ptr + row * logits_row_stride
    begin = seg * seg_len
    end = tl.minimum(begin + seg_len, vocab)
    offs = _tile_columns(BLOCK)

    if SAMPLE:
        seed = tl.load(seed_ptr + row)
        offset = tl.load(offset_ptr + row).to(tl.uint64, bitcast=True)
        off_lo = offset.to(tl.uint32)
        off_hi = (offset >> 32).to(tl.uint32)
        if SALTED:
            salt = row.to(tl.uint32)
        else:
            salt = off_lo * 0

    m = _NEG_INF  # max of the finite logits so far
    s = 0.0  # sum exp(x - m)
    t = 0.0  # sum exp(x - m) * (x - m)
    argmax = seg * 0
    best = _NEG_INF  # Gumbel race
    best_idx = seg * 0
    flags = seg * 0
    top = _top_empty(keep, KP)
    thr = _NEG_INF  # the list's minimum: a logit must beat it to enter
    # a while loop, not range(begin, end, BLOCK): Triton 3.6's interpreter, with
    # NumPy 2, cannot take a runtime value as a range bound (compiled, both are loops)
    start = begin
    while start < end:
        cols = start + offs
        raw = tl.load(row_ptr + cols, mask=cols < end, other=_NEG_INF).to(tl.float32)
        x = tl.where(raw < _POS_INF, raw, _NEG_INF)  # NaN, +inf leave the math; the row gets flagged
        tile_max = tl.max(x)
        if tile_max > m:
            argmax = tl.min(tl.where(x == tile_max, cols, vocab))
        m_new = tl.maximum(m, tile_max)
        base = tl.where(m_new > _NEG_INF, m_new, 0.0)  # all masked so far: no -inf - -inf
        # exp of the raw logits: a NaN or +inf makes tile_s non-finite (each
        # term is <= 1 otherwise), so good tiles spend no reduction on flags
        e = tl.exp(raw - base)
        tile_s = tl.sum(e)
        if (tile_s != tile_s) | (tile_s == _POS_INF):
            flags |= tl.max((raw != raw).to(tl.int32)) | (tl.max((raw == _POS_INF).to(tl.int32)) * 2)
            e = tl.exp(x - base)
            tile_s = tl.sum(e)
        # never 0 * -inf: x - base is -inf for masked x, and for finite x when
        # it leaves float32's range (logits ~ +-3e38); e is 0 there
        tile_t = tl.sum(e * tl.where(e > 0.0, x - base, 0.0))
        # capped: exp(-shift) is 0 in float32 from ~104 on, and base - m may overflow
        shift = tl.minimum(tl.where(m > _NEG_INF, base - m, 0.0), 200.0)
        rescale = tl.exp(-shift)
        t = rescale * (t - shift * s) + tile_t
        s = rescale * s + tile_s
        m = m_new
        if tile_max > thr:  # the threshold test: most tiles stop here
            top, thr = _top_insert(top, x, cols, keep)
        if SAMPLE:
            score = x * x_scale + _gumbel_tile(start, seed, off_lo, off_hi, salt, BLOCK) * noise_scale
            tile_best = tl.max(score)
            if tile_best > best:
                best = tile_best
                best_idx = tl.min(tl.where(score == tile_best, cols, vocab))
        start += BLOCK

    top = _top_values(top, keep, KP)
    if FINALIZE:
        _finalize_row(
            row, row_ptr, m, s, t, argmax, best_idx, flags, top, keep, top_k_conf, log_vocab,
            token_ptr, logprob_ptr, entropy_ptr, confidence_ptr, margin_ptr, topk_conf_ptr, status_ptr,
            SAMPLE, KP,
        )
    else:
        part = row * tl.num_programs(1) + seg
        tl.store(part_f_ptr + part * 4 + 0, m)
        tl.store(part_f_ptr + part * 4 + 1, s)
        tl.store(part_f_ptr + part * 4 + 2, t)
        tl.store(part_f_ptr + part * 4 + 3, best)
        tl.store(part_i_ptr + part * 4 + 0, argmax)
        tl.store(part_i_ptr + part * 4 + 1, best_idx)
        tl.store(part_i_ptr + part * 4 + 2, flags)
        tl.store(part_top_ptr + part * KP + tl.arange(0, KP), top)


@triton.jit
def _signals_merge_kernel(
    logits_ptr, logits_row_stride,
    token_ptr, logprob_ptr, entropy_ptr, confidence_ptr, margin_ptr, topk_conf_ptr, status_ptr,
    part_f_ptr, part_i_ptr, part_top_ptr,
    num_segments, vocab, top_k_conf, keep, log_vocab,
    SAMPLE: tl.constexpr, NSEG_P: tl.constexpr, KP: tl.constexpr,
):
    """Grid (batch,). Merges the num_segments partial states of a row (layout in
    _signals_segment_kernel; NSEG_P = next power of two) and writes its outputs."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    segs = tl.arange(0, NSEG_P)
    live = segs < num_segments
    part = row * num_segments + segs
    pm = tl.load(part_f_ptr + part * 4 + 0, mask=live, other=_NEG_INF)
    ps = tl.load(part_f_ptr + part * 4 + 1, mask=live, other=0.0)
    pt = tl.load(part_f_ptr + part * 4 + 2, mask=live, other=0.0)
    pbest = tl.load(part_f_ptr + part * 4 + 3, mask=live, other=_NEG_INF)
    parg = tl.load(part_i_ptr + part * 4 + 0, mask=live, other=vocab)
    pbest_idx = tl.load(part_i_ptr + part * 4 + 1, mask=live, other=vocab)
    pflags = tl.load(part_i_ptr + part * 4 + 2, mask=live, other=0)

    m = tl.max(pm)
    base = tl.where(m > _NEG_INF, m, 0.0)
    has = pm > _NEG_INF  # segments with a finite logit; the others hold s = t = 0
    shift = tl.minimum(tl.where(has, base - pm, 0.0), 200.0)  # capped as in _signals_segment_kernel
    rescale = tl.where(has, tl.exp(-shift), 0.0)
    s = tl.sum(rescale * ps)
    t = tl.sum(rescale * (pt - shift * ps))
    argmax = tl.min(tl.where(pm == m, parg, vocab))  # segment order = column order: lowest wins
    best = tl.max(pbest)
    best_idx = tl.min(tl.where(pbest == best, pbest_idx, vocab))
    flags = tl.max(pflags & 1) | tl.max(pflags & 2)

    slots = tl.arange(0, KP)
    idx = segs[:, None] * KP + slots[None, :]  # [NSEG_P, KP]
    vals = tl.load(part_top_ptr + row * num_segments * KP + idx,
                   mask=live[:, None] & (slots < keep)[None, :], other=_NEG_INF)
    top, _ = _top_insert(_top_empty(keep, KP), vals, idx, keep)
    _finalize_row(
        row, row_ptr, m, s, t, argmax, best_idx, flags, _top_values(top, keep, KP), keep, top_k_conf, log_vocab,
        token_ptr, logprob_ptr, entropy_ptr, confidence_ptr, margin_ptr, topk_conf_ptr, status_ptr,
        SAMPLE, KP,
    )
