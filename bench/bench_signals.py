"""pytest-benchmark suite of the fused signals: native vs torch eager vs the
time to read the logits once, grouped per size so ratios read off one table.

    pytest bench/bench_signals.py --benchmark-group-by=group --benchmark-columns=median

`haltwise bench signals --json PATH` measures the same cases (interleaved
medians) and writes the JSON rows quoted in bench/RESULTS.md.
"""
import pytest
import torch

from haltwise import signals
from haltwise.benchmarks.signals import DTYPES, SETTINGS, SIZES, make_logits, torch_eager

CASES = [(b, v, d, t, k) for (b, v) in SIZES for d in DTYPES for (t, k) in SETTINGS]


@pytest.mark.parametrize("impl", ["native", "torch_eager", "read_once"])
@pytest.mark.parametrize("batch,vocab,dtype,temperature,top_k_conf", CASES,
                         ids=[f"{b}x{v}-{d}-T{t}-k{k}" for b, v, d, t, k in CASES])
def test_signals(benchmark, impl, batch, vocab, dtype, temperature, top_k_conf):
    benchmark.group = f"{batch}x{vocab} {dtype} T={temperature} k={top_k_conf}"
    logits = make_logits(batch, vocab, DTYPES[dtype])
    fn = {
        "native": lambda: signals(logits, temperature=temperature, top_k_conf=top_k_conf, seed=1, offset=2,
                                  backend="native"),
        "torch_eager": lambda: torch_eager(logits, temperature, top_k_conf),
        "read_once": lambda: logits.amax(-1),
    }[impl]
    out = benchmark(fn)
    assert out is not None and (not isinstance(out, torch.Tensor) or out.shape == (batch,))
