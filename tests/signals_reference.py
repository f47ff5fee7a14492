"""Float64 reference of the stop signals, written from the definitions in
docs/signals.md with numpy (independent of every backend, including the torch one).

The sampling noise is defined in float32 by the contract (csrc/philox.h), so
the reference draws it the same way, with its own Philox, and scores in float64.
"""
from __future__ import annotations

import math

import numpy as np

M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox 4x32-10 (Random123) on uint64 arrays holding uint32 values."""
    c0, c1, c2, c3, k0, k1 = (np.asarray(v, dtype=np.uint64) for v in (c0, c1, c2, c3, k0, k1))
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0  # < 2^64: exact in uint64
        p2 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p2 >> np.uint64(32)) ^ c1 ^ k0, p2 & M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & M32
        k0 = (k0 + np.uint64(0x9E3779B9)) & M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & M32
    return c0, c1, c2, c3


def random_bits(seed: int, offset: int, salt: int, vocab: int) -> np.ndarray:
    """uint64 [vocab] holding the 32 random bits of each column of one row (csrc/philox.h)."""
    col = np.arange(vocab, dtype=np.uint64)
    counter = (col >> np.uint64(6)) * np.uint64(16) + (col & np.uint64(15))
    seed_u, offset_u = np.uint64(seed % 2**64), np.uint64(offset % 2**64)
    words = philox4x32_10(counter, offset_u & M32, offset_u >> np.uint64(32), np.uint64(salt),
                          seed_u & M32, seed_u >> np.uint64(32))
    return np.choose(((col >> np.uint64(4)) & np.uint64(3)).astype(np.int64), words)


def gumbel(seed: int, offset: int, salt: int, vocab: int) -> np.ndarray:
    """float32 [vocab] noise of one row, per the contract in csrc/philox.h."""
    bits = random_bits(seed, offset, salt, vocab)
    u = ((bits >> np.uint64(8)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 16777216.0)
    return -np.log(-np.log(u))


def reference_row(x: np.ndarray, *, temperature: float, top_k_conf: int, seed=0, offset=0, salt=0) -> dict:
    """Signals of one valid row x (float64 [vocab], entries may be -inf).

    Also returns 'scores' (float64 Gumbel scores, or x for greedy) so a test can
    tell an exact tie from a wrong token."""
    finite = x[np.isfinite(x)]
    m = finite.max()
    lse = m + np.log(np.exp(finite - m).sum())
    p = np.exp(finite - lse)
    desc = np.sort(finite)[::-1]
    out = {
        "entropy": lse - (p * finite).sum(),
        "confidence": np.exp(desc[0] - lse),
        "margin": np.exp(desc[0] - lse) - (np.exp(desc[1] - lse) if len(desc) > 1 else 0.0),
        "topk_conf": -(desc[: min(top_k_conf, len(desc))] - lse).mean() if top_k_conf > 0 else 0.0,
    }
    if temperature == 0.0:
        scores = x
    else:
        inv_t = float(np.float32(1.0 / temperature))
        scores = x * inv_t + gumbel(seed, offset, salt, len(x)).astype(np.float64)
    token = int(np.argmax(scores))  # lowest index on ties
    out.update(token=token, logprob=x[token] - lse, scores=scores)
    return out


FLOAT32_MAX = float(np.finfo(np.float32).max)


def as_float32(value: float) -> float:
    """What a float32 output holds for the float64 reference value: itself
    (to float32 rounding, left to the caller's tolerance), or +-inf beyond
    float32's range (e.g. topk_conf of a row spanning -3e38 .. 3e38)."""
    value = float(value)
    if abs(value) > FLOAT32_MAX * (1 + 2.0**-24):  # rounds to +-inf
        return math.copysign(math.inf, value)
    return value


def huge_logits(gen, batch: int, vocab: int):
    """float32 [batch, vocab] rows whose x / T overflows float32 for T <= 0.5,
    each with its own pattern: all in [1e38, 3.4e38], all in [-3.4e38, -1e38]
    (x / T -> -inf for the row's largest logit too), both signs (x - max
    overflows as well), and logits in [-5, 5] beside -3.3e38 in 30% of the
    columns (a real race among the moderate ones). Random magnitudes: the
    largest logit is unique (almost surely) and never at a fixed column."""
    import torch

    u = torch.rand(batch, vocab, generator=gen, dtype=torch.float64)
    x = torch.empty(batch, vocab, dtype=torch.float64)
    for r in range(batch):
        kind = r % 4
        if kind == 0:
            x[r] = 1e38 + u[r] * 2.4e38
        elif kind == 1:
            x[r] = -(1e38 + u[r] * 2.4e38)
        elif kind == 2:
            x[r] = (u[r] * 2 - 1) * 3.4e38
        else:
            x[r] = u[r] * 10 - 5
            x[r, torch.rand(vocab, generator=gen) < 0.3] = -3.3e38
    return x.float()


def check_huge_rows(out, x, *, temperature, top_k_conf, seeds, offsets, salted):
    """Rows of huge_logits against the float64 reference: the token exactly
    (the scores' gaps dwarf float32 rounding), each signal to float32 rounding
    of the reference value, +-inf where that leaves float32's range."""
    x64 = x.double().numpy()
    for r in range(len(x64)):
        ref = reference_row(x64[r], temperature=temperature, top_k_conf=top_k_conf, seed=seeds[r],
                            offset=offsets[r], salt=r if salted else 0)
        assert out.status[r].item() == 0, f"row {r}: status {out.status[r].item()}"
        assert out.token[r].item() == ref["token"], f"row {r}, T={temperature}: token {out.token[r].item()}, " \
            f"reference {ref['token']} (the row's largest logit is at {int(np.argmax(x64[r]))})"
        for field in ("logprob", "entropy", "confidence", "margin", "topk_conf"):
            got, want = getattr(out, field)[r].item(), as_float32(ref[field])
            assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5), f"row {r} {field}: {got} vs {want}"
