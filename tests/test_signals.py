"""haltwise.signals, backends "native" and "torch", against the float64
reference in signals_reference.py (the "triton" backend: test_signals_triton.py).

Inputs are fresh random logits (never zeros); the native kernel writes into
poisoned buffers so a row it forgets to write fails the test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import haltwise
from haltwise._native import core
from haltwise.reference import philox4x32_10 as philox_torch
from haltwise.signals_native import signals_native
from signals_reference import check_huge_rows, gumbel, huge_logits, random_bits, reference_row
from signals_reference import philox4x32_10 as philox_numpy

BACKENDS = ["native", "torch"]
FIELDS = ("logprob", "entropy", "confidence", "margin", "topk_conf")

# Random123 kat_vectors, "philox4x32 10" lines: counter, key, expected output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(core().philox4x32_10(list(counter), list(key))) == expected
    assert tuple(int(w) for w in philox_torch(*counter, *key)) == expected
    assert tuple(int(w) for w in philox_numpy(*counter, *key)) == expected


def poisoned_outputs(batch: int) -> haltwise.Signals:
    nan = lambda: torch.full((batch,), float("nan"))  # noqa: E731
    return haltwise.Signals(
        token=torch.full((batch,), -7, dtype=torch.int64),
        logprob=nan(), entropy=nan(), confidence=nan(), margin=nan(), topk_conf=nan(),
        status=torch.full((batch,), 99, dtype=torch.int8),
    )


def compute(backend, logits, *, temperature=0.0, top_k_conf=0, seed=0, offset=0):
    if backend != "native":
        return haltwise.signals(logits, temperature=temperature, top_k_conf=top_k_conf, seed=seed, offset=offset,
                                backend=backend)
    batch = logits.shape[0]
    salted = isinstance(seed, int) and isinstance(offset, int)
    rows = lambda v: v if isinstance(v, torch.Tensor) else torch.full((batch,), v, dtype=torch.int64)  # noqa: E731
    return signals_native(logits, temperature=temperature, top_k_conf=top_k_conf, seed=rows(seed),
                          offset=rows(offset), salted=salted, out=poisoned_outputs(batch))


def tolerance(dtype, logits64: np.ndarray) -> tuple[float, float]:
    """(rtol, atol). Every input dtype converts to float64 exactly, so the error
    is float32 arithmetic alone; logprob and topk_conf also carry the rounding
    of logsumexp, which grows with the logits' magnitude."""
    rtol = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}[dtype]
    finite = logits64[np.isfinite(logits64)]
    return rtol, 2e-5 + 4e-7 * float(np.abs(finite).max())


def check_against_reference(backend, logits, *, temperature=0.0, top_k_conf=0, seed=0, offset=0, salted=True):
    out = compute(backend, logits, temperature=temperature, top_k_conf=top_k_conf, seed=seed, offset=offset)
    x64 = logits.double().numpy()
    batch = x64.shape[0]
    seeds = seed.tolist() if isinstance(seed, torch.Tensor) else [seed] * batch
    offsets = offset.tolist() if isinstance(offset, torch.Tensor) else [offset] * batch
    rtol, atol = tolerance(logits.dtype, x64)
    ties = 0
    for r in range(batch):
        ref = reference_row(x64[r], temperature=temperature, top_k_conf=top_k_conf, seed=seeds[r],
                            offset=offsets[r], salt=r if salted else 0)
        assert out.status[r].item() == 0, f"row {r}: status {out.status[r].item()}"
        token = out.token[r].item()
        if token != ref["token"]:
            # Only an exact float tie may be resolved differently.
            best, got = ref["scores"][ref["token"]], ref["scores"][token]
            assert math.isclose(best, got, rel_tol=1e-6, abs_tol=1e-6), f"row {r}: token {token} vs {ref['token']}"
            ties += 1
            continue
        for field in FIELDS:
            got, want = getattr(out, field)[r].item(), float(ref[field])
            assert math.isclose(got, want, rel_tol=rtol, abs_tol=atol), f"row {r} {field}: {got} vs {want}"
    assert ties <= max(1, batch // 100), f"{ties} near-tie disagreements in {batch} rows"
    return out


def random_logits(batch, vocab, dtype, *, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=g) * scale + 0.5).to(dtype)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (1, 1),  # V=1: a single token, margin 1, entropy 0
    (3, 2),  # V=2: top-2 is the whole row
    (5, 7),  # V below one SIMD vector: padding path
    (64, 1000),  # V not a multiple of the 256-column chunk, batch >= 64
    (2, 32000),  # Llama-2 vocabulary
    (1, 50257),  # GPT-2 vocabulary, batch 1: the row is split across threads
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,vocab", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,top_k_conf", [(0.0, 20), (1.0, 0), (0.7, 64)])
def test_matches_float64_reference(backend, batch, vocab, dtype, temperature, top_k_conf):
    logits = random_logits(batch, vocab, dtype, seed=batch * vocab)
    out = check_against_reference(backend, logits, temperature=temperature, top_k_conf=top_k_conf, seed=11, offset=3)
    assert out.token.dtype == torch.int64 and out.status.dtype == torch.int8
    assert all(getattr(out, f).dtype == torch.float32 for f in FIELDS)
    if top_k_conf == 0:
        assert torch.equal(out.topk_conf, torch.zeros(batch))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows(backend):
    # A slice of a wider tensor: row stride 3000 > vocab, and a storage offset.
    wide = random_logits(8, 3000, torch.float32, seed=5)
    logits = wide[:, 17:2017]
    assert logits.stride() == (3000, 1) and not logits.is_contiguous()
    check_against_reference(backend, logits, temperature=1.0, top_k_conf=20, seed=4, offset=9)
    check_against_reference(backend, logits, top_k_conf=20)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_logits(backend, dtype):
    logits = random_logits(16, 4099, dtype, seed=1).float()
    g = torch.Generator().manual_seed(2)
    logits[torch.rand(logits.shape, generator=g) < 0.6] = float("-inf")
    logits[3, :] = float("-inf")
    logits[3, 4000] = 1.5  # all but one masked: margin 1, confidence 1, entropy 0
    logits[5, :] = float("-inf")
    logits[5, 7] = 2.0
    logits[5, 4098] = 2.0  # two finite, equal: margin 0, lowest index wins greedy
    logits = logits.to(dtype)
    for temperature in (0.0, 1.0):
        out = check_against_reference(backend, logits, temperature=temperature, top_k_conf=20, seed=8, offset=1)
        assert out.token[3].item() == 4000
        assert out.margin[3].item() == 1.0 and out.confidence[3].item() == 1.0 and out.entropy[3].item() == 0.0
        assert out.margin[5].item() == 0.0
        assert out.token[5].item() in (7, 4098)
        finite = torch.isfinite(logits.float()).sum(-1)
        # topk_conf averages over min(k, finite) entries: still finite
        assert torch.isfinite(out.topk_conf).all() and (finite > 0).all()
    assert compute(backend, logits, top_k_conf=20).token[5].item() == 7


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitude_logits(backend):
    # 1e4 would overflow exp() without the running max.
    logits = random_logits(8, 5000, torch.float32, scale=1e4, seed=3)
    check_against_reference(backend, logits, top_k_conf=20)
    check_against_reference(backend, logits, temperature=2.0, top_k_conf=20, seed=1, offset=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 0.013, 0.0])
def test_logits_whose_ratio_to_t_overflows(backend, temperature):
    # x / T beyond float32's range (|x| up to 3.4e38, T < 1): the draw is still
    # softmax(x / T), so where the largest logit leads by ~1e31 it always wins;
    # rows mixing signs make x - max overflow too.
    gen = torch.Generator().manual_seed(int(temperature * 1000) + 71)
    x = huge_logits(gen, 8, 300)
    for seed in range(4):
        seeds = (torch.randint(-2**62, 2**62, (8,), generator=gen), torch.randint(0, 2**40, (8,), generator=gen))
        out = compute(backend, x, temperature=temperature, top_k_conf=20, seed=seeds[0], offset=seeds[1])
        check_huge_rows(out, x, temperature=temperature, top_k_conf=20, seeds=seeds[0].tolist(),
                        offsets=seeds[1].tolist(), salted=False)
    for seed in range(4):  # the case as first reported: two logits, scalar seed
        pair = torch.tensor([[2e38, 3e38], [-3e38, -2e38]])
        assert compute(backend, pair, temperature=temperature, seed=seed).token.tolist() == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 50257])
def test_all_equal_rows(backend, vocab):
    logits = torch.full((4, vocab), 3.25)
    out = compute(backend, logits, top_k_conf=20)
    assert out.token.tolist() == [0] * 4  # lowest index on ties
    torch.testing.assert_close(out.confidence, torch.full((4,), 1.0 / vocab), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.entropy, torch.full((4,), math.log(vocab)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.topk_conf, torch.full((4,), math.log(vocab)), rtol=1e-5, atol=1e-6)
    expected_margin = 1.0 if vocab == 1 else 0.0
    assert out.margin.tolist() == [expected_margin] * 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_invalid_rows_are_flagged_and_isolated(backend, dtype):
    logits = random_logits(6, 777, dtype, seed=9)
    logits[1, 500] = float("nan")
    logits[2, 3] = float("inf")
    logits[3, :] = float("-inf")
    logits[4, 10] = float("nan")
    logits[4, 11] = float("inf")
    for temperature in (0.0, 1.0):
        out = compute(backend, logits, temperature=temperature, top_k_conf=20, seed=2, offset=5)
        assert out.status.tolist() == [
            0,
            haltwise.STATUS_NAN,
            haltwise.STATUS_POSINF,
            haltwise.STATUS_NO_FINITE,
            haltwise.STATUS_NAN | haltwise.STATUS_POSINF,
            0,
        ]
        for r in (1, 2, 3, 4):  # finite placeholders
            assert out.token[r].item() == 0
            assert all(getattr(out, f)[r].item() == 0.0 for f in FIELDS)
        good = compute(backend, logits[[0, 5]], temperature=temperature, top_k_conf=20, seed=torch.tensor([2, 2]),
                       offset=torch.tensor([5, 5]))
        x64 = logits.double().numpy()
        for row, g in ((0, 0), (5, 1)):
            ref = reference_row(x64[row], temperature=temperature, top_k_conf=20, seed=2, offset=5, salt=row)
            assert out.token[row].item() == ref["token"]
            for f in FIELDS:
                assert math.isclose(getattr(out, f)[row].item(), float(ref[f]), rel_tol=2e-5, abs_tol=2e-5)
            assert good.status[g].item() == 0


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_distribution(backend, temperature):
    # 40000 draws of one 8-way distribution: every row the same logits, its own offset.
    x = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.7])
    draws = 40000
    logits = x.expand(draws, -1)  # row stride 0: also a strided read
    out = compute(backend, logits, temperature=temperature, seed=torch.full((draws,), 1234),
                  offset=torch.arange(draws))
    counts = np.bincount(out.token.numpy(), minlength=8)
    probs = torch.softmax(x.double() / temperature, -1).numpy()
    # 99.9% critical value of chi-square with 7 degrees of freedom; the seed is
    # fixed, so this is deterministic, and a wrong noise mapping is far above it.
    assert chi_square(counts, probs) < 24.32


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_reproducible_and_keyed(backend):
    logits = random_logits(64, 1000, torch.float32, scale=1.0, seed=4)
    a = compute(backend, logits, temperature=1.0, seed=7, offset=100)
    b = compute(backend, logits, temperature=1.0, seed=7, offset=100)
    c = compute(backend, logits, temperature=1.0, seed=7, offset=101)
    d = compute(backend, logits, temperature=1.0, seed=8, offset=100)
    assert torch.equal(a.token, b.token)
    # With ~1000 near-uniform choices, a re-keyed draw coincides rarely.
    assert (a.token == c.token).float().mean() < 0.2
    assert (a.token == d.token).float().mean() < 0.2
    # scalar seed/offset: the row index is mixed in, so equal rows draw differently
    same_rows = logits[:1].expand(64, -1)
    assert len(set(compute(backend, same_rows, temperature=1.0, seed=7, offset=1).token.tolist())) > 32


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_is_batch_invariant(backend):
    logits = random_logits(32, 3001, torch.float32, scale=1.0, seed=6)
    seeds = torch.arange(32) * 1000 + 5
    offsets = torch.arange(32) + 40
    full = compute(backend, logits, temperature=0.8, top_k_conf=20, seed=seeds, offset=offsets)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    shuffled = compute(backend, logits[perm], temperature=0.8, top_k_conf=20, seed=seeds[perm], offset=offsets[perm])
    assert torch.equal(shuffled.token, full.token[perm])
    for r in (0, 13, 31):
        alone = compute(backend, logits[r:r + 1], temperature=0.8, top_k_conf=20, seed=seeds[r:r + 1],
                        offset=offsets[r:r + 1])
        assert alone.token.item() == full.token[r].item()


def test_native_and_torch_draw_the_same_tokens():
    logits = random_logits(256, 5000, torch.bfloat16, scale=2.0, seed=12)
    seeds, offsets = torch.arange(256) * 7919, torch.arange(256) * 3
    native = compute("native", logits, temperature=1.0, seed=seeds, offset=offsets)
    ref = compute("torch", logits, temperature=1.0, seed=seeds, offset=offsets)
    differ = (native.token != ref.token).nonzero().flatten().tolist()
    x64 = logits.double().numpy()
    for r in differ:  # allowed only at an exact float tie of the two scores
        g = gumbel(int(seeds[r]), int(offsets[r]), 0, 5000).astype(np.float64)
        s = x64[r] + g
        assert math.isclose(s[native.token[r]], s[ref.token[r]], rel_tol=1e-6)
    assert len(differ) <= 2


def test_noise_bits_match_between_torch_and_numpy():
    # The bits are the contract and must agree exactly; the float32 logs of
    # two libraries may differ in the last place, which only matters at ties.
    from haltwise.reference import gumbel_noise, random_bits as bits_torch

    seed, offset, salt = torch.tensor([2**40 + 3, -5]), torch.tensor([2**33 + 1, 7]), torch.tensor([0, 1])
    bits = bits_torch(seed, offset, salt, 300).numpy()
    np.testing.assert_array_equal(bits[0], random_bits(2**40 + 3, 2**33 + 1, 0, 300).astype(np.int64))
    np.testing.assert_array_equal(bits[1], random_bits(-5, 7, 1, 300).astype(np.int64))
    g = gumbel_noise(seed, offset, salt, 300).numpy()
    np.testing.assert_allclose(g[1], gumbel(-5, 7, 1, 300), rtol=1e-5, atol=1e-6)


def test_native_thread_count_does_not_change_results():
    logits = random_logits(1, 50257, torch.float32, seed=21)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compute("native", logits, temperature=1.0, top_k_conf=20, seed=3, offset=4)
        torch.set_num_threads(2)
        two = compute("native", logits, temperature=1.0, top_k_conf=20, seed=3, offset=4)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.token, two.token)
    for f in FIELDS:
        torch.testing.assert_close(getattr(one, f), getattr(two, f), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: haltwise.signals([[1.0, 2.0]]), TypeError, "logits must be a torch.Tensor"),
        (lambda: haltwise.signals(torch.randn(3, 4, 5)), ValueError, r"2-D \[batch, vocab\], got shape \(3, 4, 5\)"),
        (lambda: haltwise.signals(torch.randn(4)), ValueError, r"got shape \(4,\)"),
        (lambda: haltwise.signals(torch.randn(0, 5)), ValueError, "batch > 0 and vocab > 0"),
        (lambda: haltwise.signals(torch.randn(2, 0)), ValueError, "batch > 0 and vocab > 0"),
        (lambda: haltwise.signals(torch.ones(2, 5, dtype=torch.int64)), TypeError, "got torch.int64"),
        (lambda: haltwise.signals(torch.randn(2, 5, dtype=torch.float64)), TypeError, "got torch.float64"),
        (lambda: haltwise.signals(torch.randn(5, 2).t()), ValueError, "unit column stride"),
        (lambda: haltwise.signals(torch.randn(2, 5), backend="cuda"), ValueError, "backend must be one of"),
        (lambda: haltwise.signals(torch.randn(2, 5), backend=3), TypeError, "backend must be a str"),
        (lambda: haltwise.signals(torch.randn(2, 5), temperature=-0.5), ValueError, "temperature must be finite and >= 0"),
        (lambda: haltwise.signals(torch.randn(2, 5), temperature=float("nan")), ValueError, "temperature"),
        (lambda: haltwise.signals(torch.randn(2, 5), temperature=1e-9), ValueError, "or >= 1e-06"),
        (lambda: haltwise.signals(torch.randn(2, 5), temperature="hot"), TypeError, "temperature must be a float"),
        (lambda: haltwise.signals(torch.randn(2, 5), top_k_conf=-1), ValueError, r"top_k_conf must be in \[0, 128\]"),
        (lambda: haltwise.signals(torch.randn(2, 5), top_k_conf=129), ValueError, r"got 129"),
        (lambda: haltwise.signals(torch.randn(2, 5), top_k_conf=2.5), TypeError, "top_k_conf must be an int"),
        (lambda: haltwise.signals(torch.randn(2, 5), seed=torch.tensor([1, 2, 3])), ValueError,
         r"seed must have shape \(2,\)"),
        (lambda: haltwise.signals(torch.randn(2, 5), offset=torch.tensor([1.0, 2.0])), TypeError,
         "offset must be an int or an int64 tensor"),
        (lambda: haltwise.signals(torch.randn(2, 5), seed=2**64), ValueError, "seed must fit in int64"),
        (lambda: haltwise.signals(torch.randn(2, 5), seed="x"), TypeError, "seed must be an int"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_triton_backend_on_cpu_outside_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA logits"):
        haltwise.signals(torch.randn(2, 5), backend="triton")


def test_every_instruction_set_gives_the_same_results():
    # The kernel is compiled once per ISA; the Gumbel score is never fused, so
    # the generic, AVX2 and AVX-512 builds draw identical tokens; the signals
    # (FMA in the exp/log polynomials, sums in double) agree to float32 rounding.
    import os
    import subprocess
    import sys

    script = (
        "import torch, haltwise, sys; from haltwise._native import core\n"
        "g = torch.Generator().manual_seed(3)\n"
        "x = (torch.randn(9, 5003, generator=g) * 3).to(torch.bfloat16)\n"
        "x[2, ::3] = float('-inf')\n"
        "out = [haltwise.signals(x, temperature=t, top_k_conf=20, seed=5, offset=6, backend='native') for t in (0.0, 0.8)]\n"
        "torch.save([o._asdict() for o in out], sys.argv[1])\n"
        "print(core().signals_cpu_isa())\n"
    )
    results = {}
    for isa in ("generic", "avx2", "avx512"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"haltwise_isa_{os.getpid()}_{isa}.pt")
        env = dict(os.environ, HALTWISE_CPU_ISA=isa)
        used = subprocess.run([sys.executable, "-c", script, path], env=env, check=True, capture_output=True,
                              text=True).stdout.strip()
        results[used] = [haltwise.Signals(**o) for o in torch.load(path)]
        os.remove(path)
    assert "generic" in results
    reference = results.pop("generic")
    for isa, out in results.items():
        for a, b in zip(out, reference):
            assert torch.equal(a.token, b.token) and torch.equal(a.status, b.status), isa
            for field in FIELDS:
                torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-7)
