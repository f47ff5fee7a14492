"""The `haltwise` command line: benchmarks, trace recording, replay and policy
inspection. Each subcommand is a thin shell over a library function."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._cli_util import CliError, check_output, check_plot, json_default


def _write_json(path: str | None, payload) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=json_default) + "\n")
        print(f"wrote {path}")


def _bench_signals(args) -> int:
    from .benchmarks.signals import bench_signals, format_table

    check_output("--json", args.json)
    rows = bench_signals(repeats=args.repeats)
    print(format_table(rows))
    _write_json(args.json, rows)
    return 0


def _bench_scheduler(args) -> int:
    from .benchmarks.scheduler import bench_scheduler, format_table

    check_output("--json", args.json)
    rows = bench_scheduler(repeats=args.repeats)
    print(format_table(rows))
    _write_json(args.json, rows)
    return 0


def _check_engine(args, unsupported: tuple[str, ...], package: str, extra: str) -> None:
    """--engine ENGINE decodes the bundled checkpoint: refuses the options it cannot
    honour and a missing engine package, naming them, before anything runs."""
    import importlib.util

    for option in unsupported:
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value:
            raise CliError(f"{option} is not supported with --engine {args.engine} (it decodes the bundled "
                           f"checkpoint), got {value!r}")
    if importlib.util.find_spec(package) is None:
        raise CliError(f"--engine {args.engine} needs {package}: pip install 'haltwise[{extra}]' (see the README)")


def _bench_vllm(args) -> int:
    """`haltwise bench --engine vllm`: the decode runs on a vLLM engine (benchmarks/vllm_engine.py)."""
    _check_engine(args, ("--model", "--problems-file", "--weights", "--bank-out", "--plot"), "vllm", "vllm")
    check_output("--json", args.json)
    from .benchmarks import vllm_engine

    argv = ["--problems", str(args.problems), "--traces", str(args.traces), "--seed", str(args.seed),
            "--throughput-problems", str(args.throughput_problems or 0)]
    if not args.throughput_problems:
        argv.append("--skip-throughput")
    if args.json:
        argv += ["--json", args.json]
    return vllm_engine.main(argv)


def _bench_decode(args) -> int:
    import torch

    from .benchmarks import decode

    if args.engine == "vllm":
        return _bench_vllm(args)
    if args.engine == "hf":
        # --model DIR --problems-file F already decodes your checkpoint in transformers
        _check_engine(args, ("--model", "--problems-file"), "transformers", "hf")
        if args.weights and not Path(args.weights).is_dir():
            raise CliError(f"--weights must be a checkpoint directory with --engine hf (transformers loads "
                           f"directories), got {args.weights!r}")

    # every output is checked before the run, whose results a bad path would lose
    check_output("--json", args.json)
    check_output("--bank-out", args.bank_out)
    check_plot("--plot", args.plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = decode.DecodeBenchConfig(problems=args.problems, traces=args.traces, capacity=args.capacity,
                            temperature=args.temperature, seed=args.seed, max_new_tokens=args.max_new_tokens,
                            throughput_problems=args.throughput_problems)
    kwargs = {}
    if args.model or args.problems_file:
        from .decoding.hf_runner import hf_setup

        kwargs = hf_setup(args.model, args.problems_file, cfg)
        cfg = kwargs.pop("cfg")
    payload = decode.bench_decode(cfg, progress=not args.no_progress, bank_path=args.bank_out, weights=args.weights,
                                  engine=args.engine, **kwargs)
    _write_json(args.json, payload)  # the results first: nothing optional may lose them
    print(decode.format_table(payload["runs"]))
    if "throughput" in payload:
        t = payload["throughput"]
        print(f"throughput, {cfg.throughput_problems} problems x {cfg.traces} traces, no cutting: "
              f"haltwise.Stepper {t['haltwise_tokens_per_s']:.0f} tok/s vs plain torch step "
              f"{t['plain_tokens_per_s']:.0f} tok/s ({t['ratio']:.2f}x)")
    if args.plot:
        decode.plot(args.plot, payload["runs"], payload["sweep"], payload["runs"][0]["tokens"])
        print(f"wrote {args.plot}")
    return 0


def _record(args) -> int:
    from tqdm import tqdm

    from .benchmarks.decode import DecodeBenchConfig, bank_from_run, bank_problems
    from .benchmarks import decode
    from .decoding.parallel import EarlyStopSettings, ParallelSampler

    check_output("--out", args.out)

    cfg = DecodeBenchConfig(problems=args.problems, traces=args.traces, temperature=args.temperature, seed=args.seed,
                            capacity=args.capacity)
    setup = decode.bundled_setup(cfg, args.weights, problems=bank_problems(args.problems))
    cfg, problems, task = setup["cfg"], setup["problems"], setup["task"]
    sampler = ParallelSampler(setup["runner_factory"], task, capacity=cfg.capacity, temperature=cfg.temperature,
                              seed=cfg.seed)
    settings = EarlyStopSettings(name="record", traces=cfg.traces, max_new_tokens=cfg.max_new_tokens,
                                 record_signals=True)
    with tqdm(total=len(problems) * cfg.traces, unit="trace", disable=args.no_progress) as bar:
        run = sampler.run(problems, settings, progress=bar.update)
    meta = {"temperature": cfg.temperature, "seed": cfg.seed, "traces": cfg.traces, "problems": len(problems),
            "source": "haltwise record (bundled model, bank problem stream)", "max_new_tokens": cfg.max_new_tokens}
    bank = bank_from_run(run, [task.difficulty(p) for p in problems], meta)
    bank.save(args.out)
    print(f"wrote {args.out}: {len(problems)} problems x {cfg.traces} traces, {run.tokens} tokens, "
          f"vote EM {run.em:.3f}, single-trace EM {run.em_single:.3f}, {run.loop.wall_s:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haltwise", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run a benchmark (default: the end-to-end decode benchmark)")
    bench.add_argument("suite", nargs="?", default="decode", choices=["decode", "signals", "scheduler"],
                       help="decode: early stopping on the bundled model and task; signals: the fused kernel; "
                            "scheduler: the native step")
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON")
    bench.add_argument("--repeats", type=int, default=11, help="timed rounds per measurement (signals, scheduler)")
    bench.add_argument("--plot", metavar="PATH", help="decode: PNG of tokens vs EM over a threshold sweep")
    bench.add_argument("--problems", type=int, default=500, help="decode: problems of the eval set")
    bench.add_argument("--traces", type=int, default=32, help="decode: traces per problem")
    bench.add_argument("--capacity", type=int, default=256, help="decode: rows decoded together")
    bench.add_argument("--temperature", type=float, default=1.0)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--max-new-tokens", type=int, default=160)
    bench.add_argument("--throughput-problems", type=int, default=100,
                       help="decode: problems for the Stepper vs plain-torch throughput check (0: skip)")
    bench.add_argument("--engine", choices=["haltwise", "hf", "vllm"], default="haltwise",
                       help="decode: haltwise's own decode loop on its own model; hf: the same loop and runs on "
                            "the checkpoint as Hugging Face transformers loads it (pip install 'haltwise[hf]'); "
                            "vllm: a vLLM engine with the logits processor (pip install 'haltwise[vllm]')")
    bench.add_argument("--weights", metavar="PATH",
                       help="decode: the bundled model's weights (a checkpoint directory or a safetensors file)")
    bench.add_argument("--model", metavar="DIR", help="decode: a local Hugging Face checkpoint directory")
    bench.add_argument("--problems-file", metavar="JSONL",
                       help='decode: your problems, one {"prompt": str, "answer": int} per line')
    bench.add_argument("--bank-out", metavar="PATH", help="decode: save run (a)'s traces as a trace bank")
    bench.add_argument("--threads", type=int, default=0, help="torch threads for the model (0: torch's default)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")

    from .policy.cli import add_policy_subcommands

    add_policy_subcommands(sub)  # `haltwise policy show DB`, `haltwise replay`

    record = sub.add_parser("record", help="sample uncut traces with their signals into a trace bank (npz)")
    record.add_argument("--out", required=True, metavar="PATH")
    record.add_argument("--problems", type=int, default=256, help="problems of the bank stream (never eval prompts)")
    record.add_argument("--traces", type=int, default=32)
    record.add_argument("--capacity", type=int, default=512)
    record.add_argument("--temperature", type=float, default=1.0)
    record.add_argument("--seed", type=int, default=0)
    record.add_argument("--weights", metavar="PATH",
                        help="checkpoint directory or safetensors file (default: the bundled checkpoint)")
    record.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "handler"):  # subcommands that carry their own handler (policy, replay)
        handler = args.handler
    elif args.command == "bench":
        handler = {"decode": _bench_decode, "signals": _bench_signals, "scheduler": _bench_scheduler}[args.suite]
    elif args.command == "record":
        handler = _record
    else:
        return 2
    try:
        return handler(args)
    except CliError as e:
        name = args.command if args.command != "policy" else f"policy {args.policy_command}"
        print(f"haltwise {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
