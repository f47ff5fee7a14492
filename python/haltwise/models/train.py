"""Train the bundled arithmetic model on freshly generated problems (CPU, a few minutes).

    PYTHONPATH=python python -m haltwise.models.train \
        --out /tmp/hw/arith.safetensors --steps 4000 --minutes 29 \
        --stop-at-em 0.6 --seed 0 --threads 1
    PYTHONPATH=python python -m haltwise.models.hf_checkpoint \
        /tmp/hw/arith.safetensors python/haltwise/models/arith-nemotron

(the commands that made the bundled checkpoint; see notes/model.md).

Every batch is new problems from ``training_problems(seed)`` (eval prompts removed), so
there are no epochs and no overfitting to a fixed set. The loss is next-token cross
entropy on the solution tokens and EOS only (the prompt's random digits carry nothing to
learn). The learning rate warms up linearly and then follows a cosine to 10% of its peak
over the run, where the run's progress is elapsed/--minutes, or step/--steps when
--steps is given (then --minutes is only a safety cap). Weights are saved as float32
safetensors with the config and the training figures in the metadata, every
--save-every minutes and at the end.

Training on to convergence makes this task too easy (temperature-1 EM near 100%, nothing
to stop early), and the accuracy jumps within a few hundred steps, so "train N minutes"
lands anywhere between 10% and 99% depending on the machine's load. --stop-at-em makes
"train less" reproducible instead: every --em-every steps (once the loss EMA is below
--em-check-below) it samples 4 traces at temperature 1 for 128 validation problems
(seed "val", not the eval set) and stops once their EM reaches the target.

--threads: on a machine shared with other jobs, 1 thread ran ~2.5x faster than 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from haltwise.models.gpt import GPT, GPTConfig, save_pretrained
from haltwise.tasks import arith


def make_batch(problems: list[arith.Problem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs [B, T] int64, targets [B, T] int64, loss mask [B, T] bool (solution + EOS targets)."""
    seqs = [arith.format_training_example(p) for p in problems]
    T = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(seqs), T), arith.PAD_ID, dtype=torch.int64)
    targets = torch.full((len(seqs), T), arith.PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, (s, p) in enumerate(zip(seqs, problems)):
        n = len(s) - 1
        inputs[b, :n] = torch.tensor(s[:-1])
        targets[b, :n] = torch.tensor(s[1:])
        first = len(p.prompt)  # targets[first] is the first solution token (s[0] is BOS)
        mask[b, first:n] = True
    return inputs, targets, mask


@torch.no_grad()
def sampled_em(model: GPT, problems: list[arith.Problem], max_new: int, temperature: float = 0.0, traces: int = 1) -> float:
    """Exact match over ``traces`` decodes per problem at ``temperature`` (0: greedy), with the KV cache."""
    from haltwise.models.evaluate import generate

    was_training = model.training
    model.eval()
    prompts = [arith.prompt_ids(p) for p in problems for _ in range(traces)]
    gen = torch.Generator().manual_seed(1234)
    out = generate(model, prompts, max_new=max_new, temperature=temperature, generator=gen)
    model.train(was_training)
    answers = [p.answer for p in problems for _ in range(traces)]
    hits = [arith.extract_answer(arith.decode(toks)) == a for toks, a in zip(out.tokens, answers)]
    return sum(hits) / len(hits)


def save_checkpoint(model: GPT, args, meta: dict, step: int) -> None:
    save_pretrained(model, args.out, meta)
    if args.ckpt_dir:
        Path(args.ckpt_dir).mkdir(parents=True, exist_ok=True)
        save_pretrained(model, Path(args.ckpt_dir) / f"step{step}.safetensors", meta)


def lr_at(progress: float, peak: float, warmup_frac: float) -> float:
    if progress < warmup_frac:
        return peak * progress / warmup_frac
    x = min(1.0, (progress - warmup_frac) / (1 - warmup_frac))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * x)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="safetensors file to write (hf_checkpoint.py converts it)")
    ap.add_argument("--minutes", type=float, default=25.0, help="time budget (schedule and cap)")
    ap.add_argument("--steps", type=int, default=None, help="step budget (schedule); --minutes stays a cap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=float, default=0.03, help="fraction of the run")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--n-layer", type=int, default=3)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=96)
    ap.add_argument("--d-ff", type=int, default=384)
    ap.add_argument("--max-seq-len", type=int, default=144)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-every", type=int, default=250, help="steps between greedy-EM checks (0: never)")
    ap.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    ap.add_argument("--ckpt-dir", default=None, help="also keep a copy of every checkpoint here (step<N>.safetensors)")
    ap.add_argument(
        "--stop-at-em",
        type=float,
        default=None,
        help="stop once the temperature-1 EM on the validation stream reaches this (train less, reproducibly)",
    )
    ap.add_argument("--em-every", type=int, default=100, help="steps between temperature-1 EM checks")
    ap.add_argument("--em-check-below", type=float, default=0.05, help="check only once the loss EMA is below this")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = GPTConfig(
        vocab_size=len(arith.VOCAB),
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_model=args.d_model,
        d_ff=args.d_ff,
        max_seq_len=args.max_seq_len,
    )
    model = GPT(config).train()
    print(f"config {config}  params {model.num_params():,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    stream = arith.training_problems(args.seed)
    # validation: a separate stream (seed string "val"), not the eval set, and not in training
    val = arith.generate_problems(128, "val")
    max_new = config.max_seq_len - max(len(arith.prompt_ids(p)) for p in val)

    budget_s = args.minutes * 60
    t0 = time.time()
    last_save = t0
    step, ema, tokens_seen = 0, None, 0
    meta = {}
    bar = tqdm(total=args.steps or int(budget_s), unit="step" if args.steps else "s", mininterval=15.0, file=sys.stdout)
    while True:
        elapsed = time.time() - t0
        progress = step / args.steps if args.steps else elapsed / budget_s
        if progress >= 1.0 or elapsed >= budget_s:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, args.lr, args.warmup)
        inputs, targets, mask = make_batch([next(stream) for _ in range(args.batch)])
        logits = model(inputs)  # [B, T, V]
        loss = F.cross_entropy(logits[mask], targets[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += int(mask.sum())
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.update(1 if args.steps else int(time.time() - t0) - bar.n)
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}", step=step, refresh=False)
        if args.val_every and step % args.val_every == 0:
            em = sampled_em(model, val, max_new)
            tqdm.write(f"step {step:6d}  {elapsed / 60:5.1f} min  loss {ema:.4f}  greedy val EM {em:.3f}")
        stop = False
        if args.stop_at_em is not None and step % args.em_every == 0 and ema < args.em_check_below:
            em_t1 = sampled_em(model, val, max_new, temperature=1.0, traces=4)
            tqdm.write(f"step {step:6d}  {elapsed / 60:5.1f} min  loss {ema:.4f}  T=1 val EM {em_t1:.3f}")
            stop = em_t1 >= args.stop_at_em
        meta = {
            "train_steps": step,
            "train_minutes": f"{(time.time() - t0) / 60:.2f}",
            "train_seed": args.seed,
            "train_loss_ema": f"{ema:.4f}",
            "train_target_tokens": tokens_seen,
            "train_args": " ".join(sys.argv[1:] if argv is None else argv),
        }
        if stop:
            meta["stopped_at_t1_val_em"] = f"{em_t1:.3f}"
            tqdm.write(f"T=1 val EM {em_t1:.3f} >= --stop-at-em {args.stop_at_em}: stopping")
            break
        if time.time() - last_save > args.save_every * 60:
            save_checkpoint(model, args, meta, step)
            last_save = time.time()
    bar.close()
    em = sampled_em(model, val, max_new)
    meta["greedy_val_em"] = f"{em:.3f}"
    save_checkpoint(model, args, meta, step)
    print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min, loss {ema:.4f}, greedy val EM {em:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
