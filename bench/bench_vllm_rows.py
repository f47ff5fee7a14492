"""pytest-benchmark of the vLLM logits processor's own step, without vLLM:
RowTable.apply (haltwise.integrations.vllm_rows) on a batch where every row
asks with a threshold that never fires, as the bench's throughput check runs
it. Each round feeds every row the token it sampled last step and runs the
fused signals pass on this step's logits::

    pytest bench/bench_vllm_rows.py --benchmark-group-by=param:rows

The time per round over the rows is the processor's cost per asking row per
token; an engine step at the same batch takes the rest (bench/RESULTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from haltwise.integrations.vllm_rows import RowTable

VOCAB = 27  # the bundled checkpoint's vocabulary
NEVER = {"low_conf_signal": "logprob", "low_conf_threshold": -1e30, "window": 16}


@dataclass
class _Update:  # vLLM's BatchUpdate fields
    batch_size: int
    removed: list
    added: list
    moved: list


@pytest.mark.parametrize("rows", [32, 128])
def test_processor_step(benchmark, rows):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    outs: list[list[int]] = [[] for _ in range(rows)]
    params = [SimpleNamespace(extra_args={"haltwise": NEVER}, ignore_eos=False, min_tokens=0, eos_token_id=2,
                              all_stop_token_ids={2}, stop_token_ids=[], max_tokens=10**9) for _ in range(rows)]
    table = RowTable()
    table.update(_Update(rows, [], [(i, params[i], [1], outs[i]) for i in range(rows)], []))
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0))

    def sample():  # the tokens vLLM sampled after the last step: one more output token per row
        for out in outs:
            out.append(int(rng.integers(3, VOCAB)))
        return (logits.clone(),), {}

    table.apply(logits.clone())  # the first step: signals kept for the token sampled after it
    benchmark.pedantic(table.apply, setup=sample, rounds=300, iterations=1, warmup_rounds=10)
    assert dict(table.stats) == {}, table.stats  # never cut: every row was fed every round
