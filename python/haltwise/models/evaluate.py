"""Evaluate the bundled model: accuracy, trace lengths, speed, and how well each stop
signal separates right traces from wrong ones.

    PYTHONPATH=python python -m haltwise.models.evaluate [--weights PATH] [--problems 500]
        [--traces 16] [--json PATH]

K traces per eval problem are sampled at temperature 1.0 with the KV cache (many rows
per batch; finished rows are compacted out with ``KVCache.select_``). Reported:

* single-trace EM (mean over all traces) and majority-vote EM over the K traces of a
  problem (most common extracted answer; ties go to the answer reached first; traces
  without an answer do not vote);
* generated tokens per trace (EOS included) min / median / max, and tokens/s;
* AUROC of each per-token signal x trace score for "this trace is correct", pooled
  over all traces and within problems (mean over problems that have both right and
  wrong traces). Signals, all "higher = more confident", from the temperature-1
  distribution p of the step's logits: ``topk_conf`` = -(1/k) sum of the k largest
  log p (k = min(20, vocab); the DeepConf token confidence: a peaked distribution
  puts the other top-k tokens far down, so higher = more confident); ``logprob`` of
  the sampled token; ``neg_entropy`` = sum p log p;
  ``confidence`` = max p; ``margin`` = p1 - p2. Trace scores: ``mean`` over the
  trace, ``window`` = lowest mean over a sliding window of 16 tokens (the whole-trace
  mean when shorter), ``tail`` = mean of the last 16 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from haltwise.models.gpt import GPT, load_pretrained
from haltwise.tasks import arith

SIGNALS = ("topk_conf", "logprob", "neg_entropy", "confidence", "margin")
SCORES = ("mean", "window", "tail")
WINDOW = 16
TOP_K_CONF = 20


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per row, EOS included when produced
    signals: list[np.ndarray] | None  # per row: [n_generated, len(SIGNALS)] float32, or None
    seconds: float = 0.0  # wall time of prefill + decode
    n_tokens: int = 0  # generated tokens, all rows
    extra: dict = field(default_factory=dict)


def token_signals(logits: torch.Tensor, tokens: torch.Tensor, top_k: int = TOP_K_CONF) -> torch.Tensor:
    """Signals of the chosen tokens: [B, len(SIGNALS)] float32, order as SIGNALS.

    logits: [B, V] float (temperature-1 logits), tokens: [B] int64.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    p = logp.exp()
    k = min(top_k, logp.shape[-1])
    top = logp.topk(max(k, 2), dim=-1).values  # [B, max(k, 2)] descending
    topk_conf = -top[:, :k].mean(-1)  # DeepConf token confidence: higher = more confident
    logprob = logp.gather(1, tokens[:, None])[:, 0]
    neg_entropy = (p * logp).sum(-1)
    confidence = top[:, 0].exp()
    margin = confidence - top[:, 1].exp()
    return torch.stack([topk_conf, logprob, neg_entropy, confidence, margin], dim=-1)


@torch.inference_mode()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new: int,
    temperature: float = 1.0,
    *,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
    record_signals: bool = False,
) -> Generation:
    """Sample a continuation of every prompt (token id lists, BOS included) with the KV cache.

    A row stops at EOS or after ``max_new`` tokens. ``temperature`` 0 is greedy (argmax);
    otherwise ``torch.multinomial`` on softmax(logits / temperature).
    """
    device = model.head.weight.device
    out_tokens: list[list[int]] = [[] for _ in prompts]
    out_signals: list[np.ndarray | None] = [None] * len(prompts)
    t0 = time.perf_counter()
    n_tokens = 0
    for c0 in range(0, len(prompts), batch_size):
        chunk = prompts[c0 : c0 + batch_size]
        n = len(chunk)
        lens = torch.tensor([len(p) for p in chunk], dtype=torch.int64, device=device)  # [n]
        T = int(lens.max())
        max_len = min(model.config.max_seq_len, T + max_new)
        padded = torch.full((n, T), arith.PAD_ID, dtype=torch.int64, device=device)  # [n, T]
        for b, p in enumerate(chunk):
            padded[b, : len(p)] = torch.tensor(p)
        cache = model.new_cache(n, max_len)
        logits = model(padded, cache, lens)  # prefill: [n, T, V]
        last = logits[torch.arange(n, device=device), lens - 1]  # [n, V], logits after each prompt

        steps = min(max_new, max_len - int(lens.min()))
        toks = torch.full((n, steps), arith.PAD_ID, dtype=torch.int64)  # [n, steps] (host)
        sigs = torch.zeros((n, steps, len(SIGNALS))) if record_signals else None
        n_gen = torch.zeros(n, dtype=torch.int64)  # generated tokens per row (host)
        rows = torch.arange(n)  # chunk row of each cache row (host)
        alive = torch.ones(n, dtype=torch.bool)  # per cache row: still generating
        for step in range(steps):
            if temperature == 0:
                tok = last.argmax(-1)  # [b]
            else:
                probs = torch.softmax(last.float() / temperature, dim=-1)
                tok = torch.multinomial(probs, 1, generator=generator)[:, 0]  # [b]
            tok_h, live = tok.cpu(), rows[alive]  # host sync: bookkeeping of finished rows
            toks[live, step] = tok_h[alive]
            if sigs is not None:
                sigs[live, step] = token_signals(last[alive.to(device)], tok[alive.to(device)]).cpu()
            n_gen[live] += 1
            full = cache.lengths.cpu() >= max_len  # no room for this token's keys
            alive &= (tok_h != arith.EOS_ID) & ~full
            if not alive.any():
                break
            # compact once 1/8 of the rows are done, or a done row has no room for another step
            if int((~alive).sum()) * 8 >= alive.numel() or bool(full.any()):
                keep = alive.nonzero()[:, 0]
                cache.select_(keep.to(device))
                rows, tok, alive = rows[keep], tok[keep.to(device)], alive[keep]
            last = model(tok[:, None], cache)[:, 0]  # decode step: [b, V]
        for b in range(n):
            k = int(n_gen[b])
            out_tokens[c0 + b] = toks[b, :k].tolist()
            if sigs is not None:
                out_signals[c0 + b] = sigs[b, :k].numpy()
        n_tokens += int(n_gen.sum())
    signals = [s for s in out_signals if s is not None] if record_signals else None  # every entry, when recorded
    return Generation(out_tokens, signals, time.perf_counter() - t0, n_tokens)


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


def auroc(scores, labels) -> float:
    """Rank-based AUROC (ties averaged) of ``scores`` for binary ``labels``; NaN if one class is empty."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    avg_rank = upper - (counts - 1) / 2.0  # mean rank within each tie group
    ranks = avg_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def trace_scores(sig: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """[len(SIGNALS), len(SCORES)] scores of one trace from its [n, len(SIGNALS)] signals."""
    out = np.full((sig.shape[1], len(SCORES)), np.nan)
    if sig.shape[0] == 0:
        return out
    mean = sig.mean(0)
    if sig.shape[0] >= window:
        c = np.cumsum(np.vstack([np.zeros((1, sig.shape[1])), sig]), axis=0)
        win = ((c[window:] - c[:-window]) / window).min(0)
    else:
        win = mean
    tail = sig[-window:].mean(0)
    return np.stack([mean, win, tail], axis=1)


def majority(answers: list[int | None]) -> int | None:
    votes = Counter(a for a in answers if a is not None)
    return votes.most_common(1)[0][0] if votes else None


def evaluate(model: GPT, n_problems: int, k: int, seed: int, batch_size: int, max_new: int | None) -> dict:
    problems = arith.eval_set(n_problems)
    prompts = [arith.prompt_ids(p) for p in problems for _ in range(k)]  # row i*k + j: trace j of problem i
    if max_new is None:
        max_new = model.config.max_seq_len - max(len(p) for p in prompts)
    gen = generate(
        model,
        prompts,
        max_new,
        temperature=1.0,
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
        record_signals=True,
    )
    answers = [arith.extract_answer(arith.decode(t)) for t in gen.tokens]
    truth = np.array([p.answer for p in problems for _ in range(k)])
    correct = np.array([a == t for a, t in zip(answers, truth)])  # [P*k]
    lengths = np.array([len(t) for t in gen.tokens])
    assert gen.signals is not None  # record_signals=True
    scores = np.stack([trace_scores(s) for s in gen.signals])  # [P*k, n_signals, n_scores]

    maj_correct = np.array([majority(answers[i * k : (i + 1) * k]) == p.answer for i, p in enumerate(problems)])
    per_problem = correct.reshape(len(problems), k)
    mixed = [i for i in range(len(problems)) if 0 < per_problem[i].sum() < k]

    table = {}
    for si, sname in enumerate(SIGNALS):
        for ci, cname in enumerate(SCORES):
            s = scores[:, si, ci]
            within = [auroc(s[i * k : (i + 1) * k], correct[i * k : (i + 1) * k]) for i in mixed]
            table[f"{sname}/{cname}"] = {
                "pooled": auroc(s, correct),
                "within": float(np.mean(within)) if within else math.nan,
            }
    by_difficulty = {}
    for d in sorted({p.difficulty for p in problems}):
        idx = np.array([i for i, p in enumerate(problems) if p.difficulty == d])
        by_difficulty[str(d)] = {
            "problems": int(len(idx)),
            "em_single": float(per_problem[idx].mean()),
            "em_majority": float(maj_correct[idx].mean()),
            "median_length": float(np.median(lengths.reshape(len(problems), k)[idx])),
        }
    return {
        "problems": len(problems),
        "traces_per_problem": k,
        "seed": seed,
        "max_new": max_new,
        "em_single": float(correct.mean()),
        "em_majority": float(maj_correct.mean()),
        "em_pass_at_k": float(per_problem.any(1).mean()),
        "no_answer_frac": float(np.mean([a is None for a in answers])),
        "length_min": int(lengths.min()),
        "length_median": float(np.median(lengths)),
        "length_mean": float(lengths.mean()),
        "length_max": int(lengths.max()),
        "length_percentiles": {str(q): float(np.percentile(lengths, q)) for q in (1, 5, 95, 99)},
        "frac_shorter_than_30": float(np.mean(lengths < 30)),
        "frac_hit_max_new": float(np.mean(lengths >= max_new)),
        "mean_length_correct": float(lengths[correct].mean()) if correct.any() else math.nan,
        "mean_length_wrong": float(lengths[~correct].mean()) if (~correct).any() else math.nan,
        "tokens": int(gen.n_tokens),
        "seconds": gen.seconds,
        "tokens_per_s": gen.n_tokens / gen.seconds,
        "mixed_problems": len(mixed),
        "auroc": table,
        "by_difficulty": by_difficulty,
    }


def format_report(r: dict) -> str:
    lines = [
        f"problems {r['problems']} x {r['traces_per_problem']} traces (T=1.0, seed {r['seed']}, max_new {r['max_new']})",
        f"EM single-trace      {r['em_single']:.3f}",
        f"EM majority@{r['traces_per_problem']:<2d}       {r['em_majority']:.3f}",
        f"pass@{r['traces_per_problem']:<2d}              {r['em_pass_at_k']:.3f}",
        f"no answer            {r['no_answer_frac']:.3f}",
        f"generated tokens     min {r['length_min']}  median {r['length_median']:.0f}  mean {r['length_mean']:.1f}  max {r['length_max']}"
        f"  (p1 {r['length_percentiles']['1']:.0f}, p99 {r['length_percentiles']['99']:.0f}; "
        f"<30: {r['frac_shorter_than_30']:.4f}, hit max_new: {r['frac_hit_max_new']:.4f}; "
        f"mean right {r['mean_length_correct']:.1f}, wrong {r['mean_length_wrong']:.1f})",
        f"speed                {r['tokens']} tokens in {r['seconds']:.1f} s = {r['tokens_per_s']:.0f} tokens/s",
        "by difficulty (terms): "
        + "  ".join(
            f"{d}: EM {v['em_single']:.2f} maj {v['em_majority']:.2f} len {v['median_length']:.0f}"
            for d, v in r["by_difficulty"].items()
        ),
        f"AUROC for 'trace is correct' (within: mean over {r['mixed_problems']} problems with both outcomes)",
        f"{'signal':<12} " + " ".join(f"{c + ' pooled':>13} {c + ' within':>13}" for c in SCORES),
    ]
    for s in SIGNALS:
        cells = " ".join(f"{r['auroc'][f'{s}/{c}']['pooled']:>13.3f} {r['auroc'][f'{s}/{c}']['within']:>13.3f}" for c in SCORES)
        lines.append(f"{s:<12} {cells}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="checkpoint directory or gpt.py safetensors file (default: the bundled checkpoint)")
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--traces", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=512, help="rows decoded together")
    ap.add_argument("--max-new", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, config = load_pretrained(args.weights)
    print(f"model {config}  params {model.num_params():,}", flush=True)
    r = evaluate(model, args.problems, args.traces, args.seed, args.batch, args.max_new)
    r["weights"] = args.weights or "bundled"
    print(format_report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
