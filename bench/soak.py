"""The long soak: policy requests through Stepper + Scheduler + Policy with
groups, cancels, failing admissions and feedback (haltwise.benchmarks.soak).
Every request must end exactly once, and the RSS must stay flat after the
warm-up. Prints the figures; --json writes them::

    python bench/soak.py --requests 1000000 --json bench/results/soak.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from haltwise.benchmarks.soak import rss_mb, run_soak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--traces", type=int, default=4, help="traces per request (PolicyConfig.traces)")
    parser.add_argument("--max-queue", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db", metavar="PATH", help="policy database (default: a temporary file)")
    parser.add_argument("--max-growth-mb", type=float, default=32.0,
                        help="fail if the RSS grows more than this after the first 10%% of requests")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.db and Path(args.db).exists():
        print(f"soak: --db {args.db} exists; give a new path", file=sys.stderr)
        return 2
    start = rss_mb()

    def progress(n: int) -> None:
        print(f"  {n:>9} requests ended, RSS {rss_mb():7.1f} MiB", flush=True)

    result = run_soak(args.requests, capacity=args.capacity, traces=args.traces, max_queue=args.max_queue,
                      seed=args.seed, db=args.db, progress=progress, samples=20)
    summary = result.summary()
    summary["rss_mb"]["process_start"] = start
    rss = summary["rss_mb"]
    print(f"{result.requests} requests in {result.seconds:.0f} s ({summary['requests_per_s']:.0f}/s): "
          f"{result.observed} observed, {result.cancelled} cancelled, {result.rejected} rejected; "
          f"{result.queue_full} QueueFull and {result.clashes} id clashes retried; {result.traces} traces, "
          f"{result.tokens} tokens, {result.labels} labels, {result.user_reports} user reports; at most "
          f"{result.max_groups} groups held at once")
    print(f"RSS: {rss['after_warmup']:.1f} MiB after 10% of the requests, {rss['end']:.1f} MiB at the end "
          f"(growth {rss['growth_after_warmup']:+.1f} MiB, max {rss['max']:.1f} MiB)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    if rss["growth_after_warmup"] > args.max_growth_mb:
        print(f"soak: RSS grew {rss['growth_after_warmup']:.1f} MiB after the warm-up (limit {args.max_growth_mb})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
