"""`haltwise bench signals`: the fused native kernel vs torch eager computing
the same outputs vs the time to read the logits once, medians of one run."""
from __future__ import annotations

import torch

from ..signals import signals
from .timing import median_times

SIZES = [(1, 32000), (64, 128256), (256, 32000)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SETTINGS = [(0.0, 20), (1.0, 20)]  # (temperature, top_k_conf)


def make_logits(batch: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random logits with the spread of a real LM head (std 3), never zeros."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=g) * 3.0).to(dtype)


def torch_eager(logits: torch.Tensor, temperature: float, top_k_conf: int):
    """The baseline: the same outputs the way one writes them in torch eager
    (log_softmax, entropy, topk, argmax or multinomial), lean: no placeholder
    handling beyond a per-row status, no Philox (torch's own generator)."""
    x = logits.float()
    logp = torch.log_softmax(x, dim=-1)  # [B, V]
    p = logp.exp()
    entropy = torch.special.entr(p).sum(-1)  # -sum p log p, 0 where p == 0
    top = logp.topk(max(top_k_conf, 2), dim=-1).values  # [B, k]
    confidence = top[:, 0].exp()
    margin = confidence - top[:, 1].exp()
    topk_conf = -top[:, :top_k_conf].mean(-1)
    if temperature == 0.0:
        token = logp.argmax(-1)
    else:
        probs = p if temperature == 1.0 else torch.softmax(x / temperature, dim=-1)
        token = torch.multinomial(probs, 1).squeeze(-1)
    logprob = logp.gather(1, token[:, None]).squeeze(1)
    status = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1)
    return token, logprob, entropy, confidence, margin, topk_conf, status


def bench_signals(sizes=SIZES, dtypes=("float32", "bfloat16"), settings=SETTINGS, *, repeats: int = 11) -> list[dict]:
    rows = []
    for batch, vocab in sizes:
        for dtype_name in dtypes:
            logits = make_logits(batch, vocab, DTYPES[dtype_name])
            for temperature, top_k_conf in settings:
                times = median_times(
                    {
                        "native": lambda: signals(logits, temperature=temperature, top_k_conf=top_k_conf,
                                                  seed=1, offset=2, backend="native"),
                        "torch": lambda: torch_eager(logits, temperature, top_k_conf),
                        "read_once": lambda: logits.amax(-1),
                    },
                    repeats=repeats,
                )
                rows.append({
                    "batch": batch, "vocab": vocab, "dtype": dtype_name, "temperature": temperature,
                    "top_k_conf": top_k_conf, "native_ms": times["native"] * 1e3,
                    "torch_ms": times["torch"] * 1e3, "read_once_ms": times["read_once"] * 1e3,
                })
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'batch':>5} {'vocab':>6} {'dtype':>8} {'T':>3} {'k':>3} {'native ms':>10} {'torch ms':>9} " \
             f"{'read ms':>8} {'vs torch':>9} {'vs read':>8}"
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['batch']:>5} {r['vocab']:>6} {r['dtype']:>8} {r['temperature']:>3.1f} {r['top_k_conf']:>3} "
            f"{r['native_ms']:>10.3f} {r['torch_ms']:>9.3f} {r['read_once_ms']:>8.3f} "
            f"{r['torch_ms'] / r['native_ms']:>8.1f}x {r['native_ms'] / r['read_once_ms']:>7.2f}x"
        )
    lines.append("vs torch = torch eager / native (higher is better); vs read = native / read-once (lower is better)")
    return "\n".join(lines)
