"""The decode benchmark's runs on a vLLM engine (CPU build), with the bundled checkpoint.

    python -m haltwise.benchmarks.vllm_engine --problems 100 --traces 16 --json /tmp/vllm.json

One engine with HaltwiseLogitsProcessor runs the settings of ``haltwise bench``
(``default_runs``) and the adaptive ``policy`` run through
:class:`haltwise.integrations.vllm.VLLMParallelSampler` and writes the bench's JSON
(``decode.bench_payload``: the same keys and row fields as the other engines); a
run the driver cannot do would be listed under "skipped" with the reason
(``VLLMParallelSampler.unsupported``). ``uncut``, ``static`` and ``policy`` cut in
the engine (HaltwiseLogitsProcessor); ``deepconf_low`` / ``deepconf_high`` run
DeepConf's way, on the client (top-20 logprobs of every token shipped to it, the
cut an abort), so their tokens/s carry that cost. Those logprobs are vLLM's default
``logprobs_mode="raw_logprobs"``: log_softmax of the raw logits, before temperature,
penalties and logits processors -- the temperature-1 distribution haltwise's signals
are computed on (docs/signals.md), so both engines' DeepConf cuts read the same
confidence (tests/test_vllm_engine.py checks it at temperature 0.7).

Then the throughput check: the same uncut traces (a) with the processor loaded and
every request asking with a threshold that never fires ("loaded, never cutting"),
(b) on a second engine without the processor, and (c) with the top-20 logprobs of
every token returned to the client, alternating over ``--throughput-rounds``
rounds (default 5) with both engines up. ``throughput.ratio`` = median over the rounds of
(a) / (b).
vLLM starts worker processes with spawn: run this as a module or script, not from an
interactive session.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from typing import Any

def make_engine(processor: bool, max_num_seqs: int, seed: int):
    from vllm import LLM

    from ..models import BUNDLED_CHECKPOINT

    procs = []
    if processor:
        from ..integrations.vllm import HaltwiseLogitsProcessor

        procs = [HaltwiseLogitsProcessor]
    return LLM(model=str(BUNDLED_CHECKPOINT), skip_tokenizer_init=True, gpu_memory_utilization=0.1,
               dtype="float32", max_model_len=144, max_num_seqs=max_num_seqs, seed=seed,
               logits_processors=procs, enforce_eager=True)


def uncut_tokens_per_s(llm, problems, traces: int, max_new: int, *, extra=None, logprobs=None) -> dict:
    from vllm import SamplingParams

    from ..tasks import arith

    prompts, params = [], []
    for p, problem in enumerate(problems):
        for k in range(traces):
            prompts.append({"prompt_token_ids": arith.prompt_ids(problem)})
            params.append(SamplingParams(temperature=1.0, seed=p * traces + k, max_tokens=max_new,
                                         stop_token_ids=[arith.EOS_ID], detokenize=False, logprobs=logprobs,
                                         extra_args=extra))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def throughput_check(llm, plain_llm, problems, traces: int, max_new: int, window: int, rounds: int) -> dict:
    """The throughput check of the module docstring. Both engines stay up and
    the three measurements alternate, `rounds` times, so drift on a shared
    machine hits each alike; each figure and each ratio is the median over the
    rounds (the ratios per round, so a slow round cancels in its own ratio)."""
    never = {"haltwise": {"low_conf_signal": "logprob", "low_conf_threshold": -1e30, "window": window}}
    runs: dict[str, list[dict]] = {"loaded_never_cutting": [], "absent": [], "deepconf_top20_logprobs": []}
    for _ in range(rounds):
        runs["loaded_never_cutting"].append(uncut_tokens_per_s(llm, problems, traces, max_new, extra=never))
        runs["absent"].append(uncut_tokens_per_s(plain_llm, problems, traces, max_new))
        runs["deepconf_top20_logprobs"].append(uncut_tokens_per_s(llm, problems, traces, max_new, logprobs=20))
    rate = {key: [r["tokens_per_s"] for r in rows] for key, rows in runs.items()}
    out: dict[str, Any] = {key: {"tokens": rows[0]["tokens"], "tokens_per_s": statistics.median(rate[key]),
                                 "rounds_tokens_per_s": rate[key]} for key, rows in runs.items()}
    absent = rate["absent"]
    out["ratio"] = statistics.median(a / b for a, b in zip(rate["loaded_never_cutting"], absent))
    out["deepconf_ratio"] = statistics.median(a / b for a, b in zip(rate["deepconf_top20_logprobs"], absent))
    out["rounds"] = rounds
    return out


def engine_runs(llm, problems, cfg, progress=None) -> tuple[list, dict[str, str]]:
    """default_runs(cfg) on `llm` that the driver can do (uncut first), then
    the adaptive policy (decode.adaptive_policy_run: calibrated on the shipped
    trace bank, each problem planned and observed through the driver's
    plan / done hooks), and {key: why} for the runs it cannot do."""
    from ..integrations.vllm import VLLMParallelSampler
    from ..tasks.adapters import ArithTask
    from .decode import adaptive_policy_run, default_runs

    sampler = VLLMParallelSampler(llm, ArithTask(), temperature=cfg.temperature, seed=cfg.seed)
    results, skipped = [], {}
    for settings in default_runs(cfg):
        why = sampler.unsupported(settings)
        if why:
            skipped[settings.key] = why
            continue
        results.append(sampler.run(problems, replace(settings, record_signals=False), progress=progress))
    results.append(adaptive_policy_run(cfg)(sampler, problems, results[0], progress=progress))
    return results, skipped


def main(argv=None) -> int:
    from ..tasks import arith
    from .decode import DecodeBenchConfig, bench_payload, format_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--traces", type=int, default=16)
    ap.add_argument("--throughput-problems", type=int, default=32)
    ap.add_argument("--throughput-rounds", type=int, default=5)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.throughput_rounds < 1:
        ap.error(f"--throughput-rounds must be >= 1, got {args.throughput_rounds}")

    cfg = DecodeBenchConfig(problems=args.problems, traces=args.traces, seed=args.seed,
                            throughput_problems=0 if args.skip_throughput else args.throughput_problems)
    problems = arith.eval_set(cfg.problems)
    max_new = min(cfg.max_new_tokens, 144 - max(len(arith.prompt_ids(p)) for p in problems))
    cfg = replace(cfg, max_new_tokens=max_new)
    t_start = time.perf_counter()
    llm = make_engine(True, args.max_num_seqs, args.seed)
    print(f"engine up in {time.perf_counter() - t_start:.0f} s", flush=True)
    results, skipped = engine_runs(llm, problems, cfg)
    payload: dict[str, Any] = bench_payload("vllm", cfg, results, skipped)
    payload["args"] = vars(args)
    print(format_table(payload["runs"]))
    for key, why in skipped.items():
        print(f"skipped {key}: {why}")
    if not args.skip_throughput:
        plain_llm = make_engine(False, args.max_num_seqs, args.seed)
        payload["throughput"] = throughput_check(llm, plain_llm, problems[: args.throughput_problems], cfg.traces,
                                                 max_new, cfg.window, args.throughput_rounds)
        t = payload["throughput"]
        print(f"throughput (medians of {args.throughput_rounds} alternating rounds): loaded never cutting "
              f"{t['loaded_never_cutting']['tokens_per_s']:.0f} tok/s, absent {t['absent']['tokens_per_s']:.0f} "
              f"tok/s, ratio {t['ratio']:.3f}; top-20 logprobs to the client "
              f"{t['deepconf_top20_logprobs']['tokens_per_s']:.0f} tok/s", flush=True)
    payload["wall_s"] = time.perf_counter() - t_start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
