"""haltwise.signals, backend "triton" (kernels/signals.py, launched by
haltwise.signals_triton), against the float64 reference in signals_reference.py
and against the tokens the native backend draws.

Without CUDA the kernels run under the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1), so sizes stay small; forced launch configurations still
run every path: several tiles per row, the split-row path with its merge
kernel, tiles cut by the end of a row or of a segment. Outputs and the split
path's workspace are poisoned before each launch, so a row or a segment that
is not written fails the test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import haltwise
from haltwise import signals_triton as st
from haltwise.kernels.signals import _gumbel_tile
from signals_reference import check_huge_rows, gumbel, huge_logits, random_bits, reference_row

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FIELDS = ("logprob", "entropy", "confidence", "margin", "topk_conf")

# Forced launch configurations, whatever plan() would pick for the shape.
SINGLE = st.Plan(block=512, num_segments=1, num_warps=4)  # one program per row, several tiles
SPLIT = st.Plan(block=256, num_segments=3, num_warps=4)  # 2-3 segments per row + the merge kernel
CONFIGS = pytest.mark.parametrize("config", [SINGLE, SPLIT], ids=["single", "split"])

# (atol, rtol). The reference is fed the same dtype-rounded logits, so these
# bound only the kernel's float32 arithmetic, alike for every dtype (16-bit
# rows only have more exact ties). Errors measured under the interpreter stay
# below 3% of these; the slack is for CUDA's approximate exp.
DTYPES = [
    pytest.param(torch.float32, (1e-6, 5e-6), id="fp32"),
    pytest.param(torch.float16, (1e-6, 5e-6), id="fp16"),
    pytest.param(torch.bfloat16, (1e-6, 5e-6), id="bf16"),
]
FP32_TOL = (1e-6, 5e-6)


def random_logits(gen: torch.Generator, batch: int, vocab: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=gen) * scale + 0.25  # never zeros


def row_seeds(batch: int, base: int = 1234):
    """Per-row int64 seed and offset tensors (a negative seed and a 64-bit
    offset use the high key and counter words)."""
    seed = torch.arange(batch, dtype=torch.int64) * 7919 - base
    offset = torch.arange(batch, dtype=torch.int64) + (5 << 32) + 17
    return seed, offset


def poisoned_signals(batch: int) -> haltwise.Signals:
    nan = lambda: torch.full((batch,), float("nan"), device=DEVICE)  # noqa: E731
    return haltwise.Signals(
        token=torch.full((batch,), -7, dtype=torch.int64, device=DEVICE),
        logprob=nan(), entropy=nan(), confidence=nan(), margin=nan(), topk_conf=nan(),
        status=torch.full((batch,), 99, dtype=torch.int8, device=DEVICE),
    )


def run(x, config, *, temperature=0.0, top_k_conf=0, seed=None, offset=None, salted=False):
    """st.launch with a forced config into poisoned outputs (and workspace)."""
    batch, vocab = x.shape
    if seed is None:
        seed, offset = row_seeds(batch)
    _, num_segments = st.segments(vocab, config)
    workspace = None
    if num_segments > 1:
        part_f, part_i, part_top = st.empty_workspace(batch, num_segments, top_k_conf, DEVICE)
        part_f.fill_(float("nan"))
        part_i.fill_(-123456789)
        part_top.fill_(float("nan"))
        workspace = (part_f, part_i, part_top)
    out = poisoned_signals(batch)
    got = st.launch(
        x.to(DEVICE), temperature=temperature, top_k_conf=top_k_conf, seed=seed.to(DEVICE),
        offset=offset.to(DEVICE), salted=salted, config=config, out=out, workspace=workspace,
    )
    assert got is out
    return haltwise.Signals(*(t.cpu() for t in got))


def expected_status(row: np.ndarray) -> int:
    return (
        haltwise.STATUS_NAN * bool(np.isnan(row).any())
        | haltwise.STATUS_POSINF * bool(np.isposinf(row).any())
        | haltwise.STATUS_NO_FINITE * (not np.isfinite(row).any())
    )


def assert_same_token(token: int, ref: dict, temperature: float) -> None:
    """A token other than the reference's is allowed only at a tie of the
    float64 scores: exact for greedy, ~float32 rounding when sampling."""
    if token == ref["token"]:
        return
    a, b = ref["scores"][token], ref["scores"][ref["token"]]
    slack = 0.0 if temperature == 0.0 else 1e-6 * max(abs(a), abs(b), 1.0)
    assert abs(a - b) <= slack, f"token {token} (score {a!r}) but the reference picks {ref['token']} (score {b!r})"


def check_against_reference(x, out, *, temperature, top_k_conf, seed, offset, salted=False, tol=FP32_TOL):
    atol, rtol = tol
    x64 = x.float().double().cpu().numpy()
    for name in FIELDS:
        assert not torch.isnan(getattr(out, name)).any(), f"{name} holds NaN: a row was not written"
    for r, row in enumerate(x64):
        status = expected_status(row)
        assert int(out.status[r]) == status, f"row {r}: status {int(out.status[r])}, expected {status}"
        if status:
            assert int(out.token[r]) == 0
            assert all(float(getattr(out, name)[r]) == 0.0 for name in FIELDS), f"row {r}: placeholders not 0"
            continue
        ref = reference_row(row, temperature=temperature, top_k_conf=top_k_conf, seed=int(seed[r]),
                            offset=int(offset[r]), salt=r if salted else 0)
        token = int(out.token[r])
        assert_same_token(token, ref, temperature)
        assert 0.0 <= float(out.entropy[r]) <= float(np.float32(math.log(len(row)))), f"row {r}: entropy out of range"
        lse = row[ref["token"]] - ref["logprob"]
        expected = dict(ref, logprob=row[token] - lse)
        for name in FIELDS:
            got, want = float(getattr(out, name)[r]), float(expected[name])
            assert abs(got - want) <= atol + rtol * abs(want), f"row {r} {name}: {got!r} vs reference {want!r}"


# (batch, vocab, top_k_conf), with why each is there
SHAPES = [
    pytest.param(1, 1, 2, id="V1"),  # one column: margin 1, entropy 0, k = 1 < top_k_conf
    pytest.param(3, 2, 1, id="V2-k1"),  # top_k_conf 1 keeps 2 logits (margin) but averages one
    pytest.param(2, 7, 128, id="V7-k128"),  # top_k_conf far above V: k = number of finite entries
    pytest.param(3, 1024, 20, id="V1024"),  # V > BLOCK: several tiles; segments end on tile bounds
    pytest.param(3, 1037, 0, id="V1037-k0"),  # V not a multiple of BLOCK: a partial last tile
]


@pytest.mark.parametrize("batch,vocab,top_k_conf", SHAPES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@CONFIGS
def test_matches_reference(batch, vocab, top_k_conf, dtype, tol, config):
    gen = torch.Generator().manual_seed(vocab * 31 + batch)
    x = random_logits(gen, batch, vocab).to(dtype)
    seed, offset = row_seeds(batch)
    for temperature in (0.0, 0.8):
        out = run(x, config, temperature=temperature, top_k_conf=top_k_conf, seed=seed, offset=offset)
        check_against_reference(x, out, temperature=temperature, top_k_conf=top_k_conf, seed=seed,
                                offset=offset, tol=tol)


@CONFIGS
def test_top_k_conf_128_over_many_tiles(config):
    # the longest insertion runs: 128 slots refilled from several tiles / segments
    gen = torch.Generator().manual_seed(5)
    x = random_logits(gen, 2, 700)
    seed, offset = row_seeds(2)
    out = run(x, config, top_k_conf=128, seed=seed, offset=offset)
    check_against_reference(x, out, temperature=0.0, top_k_conf=128, seed=seed, offset=offset)


@CONFIGS
def test_strided_rows(config):
    # a slice of a wider tensor: row stride 900, rows starting off any alignment
    gen = torch.Generator().manual_seed(11)
    wide = random_logits(gen, 3, 900).to(torch.bfloat16)
    x = wide[:, 37:37 + 700]
    assert x.stride() == (900, 1)
    seed, offset = row_seeds(3)
    for temperature in (0.0, 1.0):
        out = run(x, config, temperature=temperature, top_k_conf=5, seed=seed, offset=offset)
        dense = run(x.contiguous(), config, temperature=temperature, top_k_conf=5, seed=seed, offset=offset)
        for a, b in zip(out, dense):
            assert torch.equal(a, b)
        check_against_reference(x, out, temperature=temperature, top_k_conf=5, seed=seed, offset=offset)


@CONFIGS
def test_masked_logits(config):
    gen = torch.Generator().manual_seed(12)
    x = random_logits(gen, 5, 700)
    neg_inf = float("-inf")
    x[0, torch.rand(700, generator=gen) < 0.6] = neg_inf  # a typical mask
    x[1, :] = neg_inf
    x[1, 613] = 2.5  # all but one masked
    x[2, :] = neg_inf
    x[2, [40, 650]] = torch.tensor([1.0, 3.0])  # two finite, in different segments
    x[3, :500] = neg_inf  # whole segments masked: merged with s = 0
    x[4, 300:] = neg_inf  # later segments masked
    seed, offset = row_seeds(5)
    for temperature in (0.0, 1.0):
        out = run(x, config, temperature=temperature, top_k_conf=20, seed=seed, offset=offset)
        check_against_reference(x, out, temperature=temperature, top_k_conf=20, seed=seed, offset=offset)
        assert int(out.token[1]) == 613
        assert (float(out.confidence[1]), float(out.margin[1])) == (1.0, 1.0)
        assert float(out.entropy[1]) == 0.0 and float(out.logprob[1]) == 0.0 and float(out.topk_conf[1]) == 0.0
        assert int(out.token[2]) in (40, 650)
        assert torch.isfinite(x[:, out.token]).diagonal().all(), "a masked token was drawn"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@CONFIGS
def test_logits_of_magnitude_1e4(dtype, config):
    gen = torch.Generator().manual_seed(13)
    base = torch.randn(4, 600, generator=gen)
    x = torch.stack([
        base[0] * 1e4,  # one token takes all the mass
        base[1] + 1e4,  # lse ~ 1e4: cancellation if computed naively (bf16: many exact ties)
        base[2] * 0.01 - 1e4,  # nearly uniform, far below zero
        base[3] * 3 + 5e3,
    ]).to(dtype)
    seed, offset = row_seeds(4)
    for temperature in (0.0, 0.7):
        out = run(x, config, temperature=temperature, top_k_conf=8, seed=seed, offset=offset)
        check_against_reference(x, out, temperature=temperature, top_k_conf=8, seed=seed, offset=offset)


# The interpreter computes with NumPy, which reports every float32 overflow
# to +-inf (IEEE behaviour, as on the GPU); "invalid value" (a NaN made from
# infinities) still fails the test.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("temperature", [0.5, 0.013, 0.0])
@CONFIGS
def test_logits_whose_ratio_to_t_overflows(temperature, config):
    # x / T beyond float32's range: the largest logit still wins (it leads by
    # ~1e31), and every signal matches the float64 reference (rows mixing
    # signs make x - max overflow, so a tile's rescale and the top-k mean must too)
    gen = torch.Generator().manual_seed(int(temperature * 1000) + 72)
    x = huge_logits(gen, 8, 700)
    seed = torch.randint(-2**62, 2**62, (8,), generator=gen)
    offset = torch.randint(0, 2**40, (8,), generator=gen)
    out = run(x, config, temperature=temperature, top_k_conf=20, seed=seed, offset=offset)
    check_huge_rows(out, x, temperature=temperature, top_k_conf=20, seeds=seed.tolist(), offsets=offset.tolist(),
                    salted=False)
    native = haltwise.signals(x, temperature=temperature, top_k_conf=20, seed=seed, offset=offset, backend="native")
    assert torch.equal(out.token, native.token)
    pair = torch.tensor([[2e38, 3e38], [-3e38, -2e38]])
    for s in range(3):  # the case as first reported: two logits, scalar seed
        got = haltwise.signals(pair.to(DEVICE), temperature=temperature, seed=s, backend="triton").token.cpu()
        assert got.tolist() == [1, 1]


@CONFIGS
def test_ties_take_the_lowest_index(config):
    x = torch.full((3, 1000), 0.37)  # all equal
    x[1, [700, 300, 5]] = 4.0  # the max in three tiles, two segments
    x[2, [700, 300]] = 4.0
    seed, offset = row_seeds(3)
    out = run(x, config, top_k_conf=4, seed=seed, offset=offset)
    assert out.token.tolist() == [0, 5, 300]
    check_against_reference(x, out, temperature=0.0, top_k_conf=4, seed=seed, offset=offset)
    assert float(out.margin[1]) == 0.0  # p_(1) == p_(2)
    assert abs(float(out.entropy[0]) - math.log(1000)) < 1e-5
    sampled = run(x, config, temperature=1.0, top_k_conf=4, seed=seed, offset=offset)
    check_against_reference(x, sampled, temperature=1.0, top_k_conf=4, seed=seed, offset=offset)


@CONFIGS
def test_sampling_ties_take_the_lowest_index(config):
    # Two equal logits whose 24-bit uniforms are equal for these seeds: exactly
    # equal scores. Seed 9: columns in different tiles (SINGLE) or segments
    # (SPLIT: the merge decides); seed 38: one tile (SINGLE) or two (SPLIT).
    pairs = {9: (392, 925), 38: (214, 275)}
    x = torch.full((2, 1000), float("-inf"))
    for r, (i, j) in enumerate(pairs.values()):
        bits = random_bits(list(pairs)[r], 0, 0, 1000) >> np.uint64(8)
        assert bits[i] == bits[j]  # the premise: the same noise
        x[r, [i, j]] = 1.5
    seed = torch.tensor(list(pairs), dtype=torch.int64)
    out = run(x, config, temperature=0.9, top_k_conf=2, seed=seed, offset=torch.zeros(2, dtype=torch.int64))
    assert out.token.tolist() == [392, 214]


@CONFIGS
def test_bad_rows_are_flagged_and_isolated(config):
    gen = torch.Generator().manual_seed(14)
    x = random_logits(gen, 7, 700) * 3e3  # large logits: no overflow in a bad row either
    x[1, 699] = float("nan")  # in the last segment, the last partial tile
    x[2, 0] = float("inf")
    x[3, :] = float("-inf")
    x[4, :] = float("-inf")
    x[4, 350] = float("nan")
    x[5, 10] = float("nan")
    x[5, 500] = float("inf")
    seed, offset = row_seeds(7)
    for temperature in (0.0, 1.0):
        out = run(x, config, temperature=temperature, top_k_conf=3, seed=seed, offset=offset)
        assert out.status.tolist() == [0, 1, 2, 4, 5, 3, 0]
        check_against_reference(x, out, temperature=temperature, top_k_conf=3, seed=seed, offset=offset)
        # the valid rows are exactly what they are without the bad ones
        alone = run(x[[0, 6]], config, temperature=temperature, top_k_conf=3, seed=seed[[0, 6]],
                    offset=offset[[0, 6]])
        for a, b in zip(out, alone):
            assert torch.equal(a[[0, 6]], b)


def test_greedy_token_is_argmax():
    gen = torch.Generator().manual_seed(15)
    x = random_logits(gen, 6, 1500).to(torch.bfloat16)  # bf16: plenty of exact ties
    out = haltwise.signals(x.to(DEVICE), backend="triton")
    assert torch.equal(out.token.cpu(), x.float().argmax(-1))  # torch: first index on ties


def test_sampling_is_reproducible_and_keyed():
    gen = torch.Generator().manual_seed(16)
    x = (random_logits(gen, 1, 600) * 0.05).expand(8, 600).contiguous().to(DEVICE)  # near-uniform, 8 equal rows
    draw = lambda **kw: haltwise.signals(x, temperature=1.0, backend="triton", **kw).token.cpu()  # noqa: E731
    first = draw(seed=42, offset=3)
    assert torch.equal(first, draw(seed=42, offset=3))
    assert (first != draw(seed=42, offset=4)).sum() >= 6  # a new step, new noise
    assert (first != draw(seed=43, offset=3)).sum() >= 6
    assert len(set(first.tolist())) >= 6  # scalar seed: the row index salts each row
    same = torch.full((8,), 42, dtype=torch.int64, device=DEVICE)
    per_row = draw(seed=same, offset=same)
    assert len(set(per_row.tolist())) == 1  # per-row seeds: a row's draw ignores its place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_same_tokens_as_native(dtype):
    gen = torch.Generator().manual_seed(17)
    x = random_logits(gen, 6, 3000, scale=1.0).to(dtype)
    seed, offset = row_seeds(6)
    disagreements = draws = 0
    for temperature, salted in ((0.5, True), (1.0, False), (2.0, True)):
        # scalar seed/offset (salted with the row index) or per-row tensors
        s, o = (7, 99) if salted else (seed, offset)
        native = haltwise.signals(x, temperature=temperature, seed=s, offset=o, backend="native").token
        on_device = lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v  # noqa: E731
        triton_tokens = haltwise.signals(x.to(DEVICE), temperature=temperature, seed=on_device(s),
                                         offset=on_device(o), backend="triton").token.cpu()
        for r in range(6):
            draws += 1
            if native[r] == triton_tokens[r]:
                continue
            disagreements += 1
            ref = reference_row(x[r].double().numpy(), temperature=temperature, top_k_conf=0,
                                seed=7 if salted else int(seed[r]), offset=99 if salted else int(offset[r]),
                                salt=r if salted else 0)
            a, b = ref["scores"][int(native[r])], ref["scores"][int(triton_tokens[r])]
            assert abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1.0), f"row {r}, T={temperature}: not a tie"
    assert disagreements <= 1, f"{disagreements} of {draws} draws differ from native"


def test_gpt2_vocab_through_the_public_api():
    # the plan splits one long row (8 segments of 1024-column tiles under the interpreter)
    vocab = 50257
    config = st.plan(1, vocab, sample=True, device=DEVICE)
    assert config.num_segments > 1
    gen = torch.Generator().manual_seed(18)
    x = random_logits(gen, 1, vocab)
    out = haltwise.signals(x.to(DEVICE), temperature=1.0, top_k_conf=20, seed=5, offset=6, backend="triton")
    out = haltwise.Signals(*(t.cpu() for t in out))
    check_against_reference(x, out, temperature=1.0, top_k_conf=20, seed=[5], offset=[6], salted=True)
    native = haltwise.signals(x, temperature=1.0, top_k_conf=20, seed=5, offset=6, backend="native")
    assert torch.equal(out.token, native.token)


def test_plan():
    one_row = st.plan(1, 32000, sample=False, device=DEVICE)
    assert one_row.num_segments > 1  # a lone row is split across programs
    assert st.plan(4096, 32000, sample=False, device=DEVICE).num_segments == 1  # enough rows already
    assert st.plan(3, 5, sample=True, device=DEVICE) == st.Plan(block=64, num_segments=1, num_warps=4)
    for vocab in (1, 63, 64, 1000, 50257, 151936):
        for requested in (1, 2, 3, 7, 64):
            config = st.Plan(block=256, num_segments=requested, num_warps=4)
            seg_len, count = st.segments(vocab, config)
            assert seg_len % 256 == 0 and count <= requested
            assert (count - 1) * seg_len < vocab <= count * seg_len  # every segment holds columns


def test_workspace_of_the_wrong_shape_is_rejected():
    x = torch.randn(2, 1000).to(DEVICE)
    seed, offset = (t.to(DEVICE) for t in row_seeds(2))
    _, num_segments = st.segments(1000, SPLIT)
    workspace = st.empty_workspace(2, num_segments + 1, 0, DEVICE)
    with pytest.raises(ValueError, match="workspace"):
        st.launch(x, temperature=0.0, top_k_conf=0, seed=seed, offset=offset, salted=False, config=SPLIT,
                  workspace=workspace)


@triton.jit
def _philox_probe_kernel(out_ptr, seed, c0, c1, c2, c3):
    zero = tl.zeros([4], dtype=tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, zero + c0.to(tl.uint32), zero + c1.to(tl.uint32), zero + c2.to(tl.uint32),
                               zero + c3.to(tl.uint32))
    lane = tl.arange(0, 4)
    tl.store(out_ptr + lane, w0.to(tl.int32, bitcast=True), mask=lane == 0)
    tl.store(out_ptr + lane, w1.to(tl.int32, bitcast=True), mask=lane == 1)
    tl.store(out_ptr + lane, w2.to(tl.int32, bitcast=True), mask=lane == 2)
    tl.store(out_ptr + lane, w3.to(tl.int32, bitcast=True), mask=lane == 3)


def test_philox_known_answer_inside_triton():
    # Random123 kat_vectors "philox4x32 10": key (k0, k1) = the seed's (low, high) words
    out = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    seed = (0x299F31D0 << 32) | 0xA4093822
    _philox_probe_kernel[(1,)](out, seed, 0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344,
                               enable_fp_fusion=False)  # explicit: Triton 3.9 warns when left unset
    assert [w & 0xFFFFFFFF for w in out.cpu().tolist()] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@triton.jit
def _gumbel_probe_kernel(out_ptr, start, seed, offset, salt, BLOCK: tl.constexpr):
    # the same key/counter derivation as _signals_segment_kernel
    offset = offset.to(tl.int64).to(tl.uint64, bitcast=True)
    g = _gumbel_tile(start, seed, offset.to(tl.uint32), (offset >> 32).to(tl.uint32), salt.to(tl.uint32), BLOCK)
    r = tl.arange(0, BLOCK // 64)[:, None, None]
    w = tl.arange(0, 4)[None, :, None]
    lane = tl.arange(0, 16)[None, None, :]
    tl.store(out_ptr + r * 64 + w * 16 + lane, g)


@pytest.mark.parametrize("seed,offset,salt", [(12345, 7, 0), (-3, (9 << 32) + 1, 5), (2**63 - 1, -1, 2**31 - 1)])
def test_gumbel_noise_matches_the_contract(seed, offset, salt):
    start, block = 192, 256  # an odd Philox block: word and counter mapping both checked
    out = torch.full((block,), float("nan"), device=DEVICE)
    _gumbel_probe_kernel[(1,)](out, start, seed, offset, salt, BLOCK=block, enable_fp_fusion=False)
    expected = gumbel(seed, offset, salt, start + block)[start:]
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-6, atol=1e-6)


# Compiles the kernels for CUDA targets without a GPU (Triton's own frontend,
# MLIR passes and the ptxas bundled in its wheel), so a construct only the
# interpreter accepts fails here. Runs in a subprocess: under TRITON_INTERPRET=1
# the kernel modules hold interpreted functions, which cannot be compiled.
_COMPILE_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from haltwise.kernels.signals import _signals_merge_kernel, _signals_segment_kernel

OUT = {"token_ptr": "*i64", "logprob_ptr": "*fp32", "entropy_ptr": "*fp32", "confidence_ptr": "*fp32",
       "margin_ptr": "*fp32", "topk_conf_ptr": "*fp32", "status_ptr": "*i8",
       "part_f_ptr": "*fp32", "part_i_ptr": "*i32", "part_top_ptr": "*fp32"}
arch, dtype, sample, finalize, block, kp = sys.argv[1:]
sample, finalize = sample == "1", finalize == "1"
target = GPUTarget("cuda", int(arch), 32)
sig = {"logits_ptr": "*" + dtype, "logits_row_stride": "i64", "seed_ptr": "*i64", "offset_ptr": "*i64", **OUT,
       "vocab": "i32", "seg_len": "i32", "x_scale": "fp32", "noise_scale": "fp32", "top_k_conf": "i32", "keep": "i32",
       "log_vocab": "fp32"}
const = dict(SAMPLE=sample, SALTED=True, FINALIZE=finalize, BLOCK=int(block), KP=int(kp))
sig.update({name: "constexpr" for name in const})
options = dict(num_warps=8 if int(block) > 1024 else 4, enable_fp_fusion=False)
compiled = [triton.compile(ASTSource(_signals_segment_kernel, sig, const), target=target, options=options)]
if not finalize:
    sig = {"logits_ptr": "*" + dtype, "logits_row_stride": "i64", **OUT, "num_segments": "i32", "vocab": "i32",
           "top_k_conf": "i32", "keep": "i32", "log_vocab": "fp32"}
    const = dict(SAMPLE=sample, NSEG_P=64, KP=int(kp))
    sig.update({name: "constexpr" for name in const})
    compiled.append(triton.compile(ASTSource(_signals_merge_kernel, sig, const), target=target,
                                   options=dict(num_warps=4, enable_fp_fusion=False)))
print(" ".join(str(len(k.asm["cubin"])) for k in compiled))
"""


@pytest.mark.parametrize(
    "arch,dtype,sample,finalize,block,kp",
    [
        (90, "fp32", 1, 1, 2048, 32),  # Hopper, sampling, one segment per row
        (80, "bf16", 0, 0, 4096, 2),  # Ampere, greedy, split rows + the merge kernel
        (90, "fp16", 1, 0, 1024, 128),  # sampling, split rows, the largest top list
    ],
)
def test_kernels_compile_for_cuda(arch, dtype, sample, finalize, block, kp, tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cached kernel would hide a compile error
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch), dtype, str(sample), str(finalize),
                             str(block), str(kp)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"sm_{arch} {dtype}: compile failed:\n{result.stderr[-4000:]}"
    sizes = [int(n) for n in result.stdout.split()]
    assert len(sizes) == (1 if finalize else 2) and all(n > 0 for n in sizes), result.stdout
