"""The `haltwise` command line: benchmarks, trace recording, replay and policy
inspection. Each subcommand is a thin shell over a library function."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _write_json(path: str | None, payload) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def _bench_signals(args) -> int:
    from .benchmarks.signals import bench_signals, format_table

    rows = bench_signals(repeats=args.repeats)
    print(format_table(rows))
    _write_json(args.json, rows)
    return 0


def _bench_scheduler(args) -> int:
    from .benchmarks.scheduler import bench_scheduler, format_table

    rows = bench_scheduler(repeats=args.repeats)
    print(format_table(rows))
    _write_json(args.json, rows)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        handler = {"signals": _bench_signals, "scheduler": _bench_scheduler}.get(args.suite)
        if handler is None:
            raise SystemExit("haltwise bench decode: not available yet")
        return handler(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
