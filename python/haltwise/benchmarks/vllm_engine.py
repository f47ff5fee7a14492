"""The decode benchmark's runs on a vLLM engine (CPU build), with the bundled checkpoint.

    python -m haltwise.benchmarks.vllm_engine --problems 100 --traces 16 --json /tmp/vllm.json

One engine with HaltwiseLogitsProcessor runs the settings of ``haltwise bench``
(``default_runs``) that the driver can replay from vLLM's logprobs, through
:class:`haltwise.integrations.vllm.VLLMParallelSampler`: ``uncut`` and ``static``
(cut + waves + consensus), with the bench's keys, tokens, tokens saved and the paired
vote-EM difference against uncut. (The DeepConf runs cut on top-20 confidence, which
vLLM does not return to the client.) Then the throughput check: the same uncut traces
(a) with the processor loaded and every request asking with a threshold that never
fires ("loaded, never cutting"), (b) on a second engine without the processor, and
(c) the DeepConf way: the top-20 logprobs of every token returned to the client
(where a client-side cut would read them). ``throughput.ratio`` = (a) / (b).
vLLM starts worker processes with spawn: run this as a module or script, not from an
interactive session.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from typing import Any

KEYS = ("uncut", "static")  # the runs of default_runs this driver replays


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


def main(argv=None) -> int:
    from .decode import DecodeBenchConfig, default_runs, paired_em_difference
    from ..integrations.vllm import VLLMParallelSampler
    from ..tasks import arith
    from ..tasks.adapters import ArithTask

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--traces", type=int, default=16)
    ap.add_argument("--throughput-problems", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

    cfg = DecodeBenchConfig(problems=args.problems, traces=args.traces, seed=args.seed)
    problems = arith.eval_set(cfg.problems)
    max_new = min(cfg.max_new_tokens, 144 - max(len(arith.prompt_ids(p)) for p in problems))
    cfg = replace(cfg, max_new_tokens=max_new)
    t_start = time.perf_counter()
    llm = make_engine(True, args.max_num_seqs, args.seed)
    print(f"engine up in {time.perf_counter() - t_start:.0f} s", flush=True)
    sampler = VLLMParallelSampler(llm, ArithTask(), temperature=cfg.temperature, seed=cfg.seed)
    runs, baseline = [], None
    for settings in default_runs(cfg):
        if settings.key not in KEYS:
            continue
        key = settings.key
        run = sampler.run(problems, replace(settings, record_signals=False))
        baseline = baseline or run
        diff, se = paired_em_difference(run, baseline)
        row = {"key": key, "name": settings.name, "tokens": run.tokens,
               "saved": 1.0 - run.tokens / baseline.tokens, "em": run.em, "em_single": run.em_single,
               "em_diff": diff, "em_diff_se": se, "wall_s": run.loop.wall_s,
               "tokens_per_s": run.tokens / run.loop.wall_s}
        runs.append(row)
        print(f"{key:22s} tokens {run.tokens:8d}  saved {row['saved']:6.1%}  vote EM {run.em:.3f} "
              f"({diff * 100:+.1f} +- {se * 100:.1f} points)  single {run.em_single:.3f}  {row['wall_s']:.0f} s  "
              f"{row['tokens_per_s']:.0f} tok/s", flush=True)
    payload: dict[str, Any] = {"engine": "vllm", "config": vars(args), "runs": runs}
    if not args.skip_throughput:
        sub = problems[: args.throughput_problems]
        never = {"haltwise": {"low_conf_signal": "logprob", "low_conf_threshold": -1e30, "window": cfg.window}}
        loaded = uncut_tokens_per_s(llm, sub, cfg.traces, max_new, extra=never)
        deepconf = uncut_tokens_per_s(llm, sub, cfg.traces, max_new, logprobs=20)
        del llm, sampler
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
