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
every token returned to the client. ``throughput.ratio`` = (a) / (b).
vLLM starts worker processes with spawn: run this as a module or script, not from an
interactive session.
"""
from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

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
        sub = problems[: args.throughput_problems]
        never = {"haltwise": {"low_conf_signal": "logprob", "low_conf_threshold": -1e30, "window": cfg.window}}
        loaded = uncut_tokens_per_s(llm, sub, cfg.traces, max_new, extra=never)
        deepconf = uncut_tokens_per_s(llm, sub, cfg.traces, max_new, logprobs=20)
        del llm
        plain_llm = make_engine(False, args.max_num_seqs, args.seed)
        absent = uncut_tokens_per_s(plain_llm, sub, cfg.traces, max_new)
        payload["throughput"] = {"loaded_never_cutting": loaded, "absent": absent, "deepconf_top20_logprobs": deepconf,
                                 "ratio": loaded["tokens_per_s"] / absent["tokens_per_s"],
                                 "deepconf_ratio": deepconf["tokens_per_s"] / absent["tokens_per_s"]}
        print(f"throughput: loaded never cutting {loaded['tokens_per_s']:.0f} tok/s, absent "
              f"{absent['tokens_per_s']:.0f} tok/s, ratio {payload['throughput']['ratio']:.3f}; "
              f"top-20 logprobs to the client {deepconf['tokens_per_s']:.0f} tok/s", flush=True)
    payload["wall_s"] = time.perf_counter() - t_start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
