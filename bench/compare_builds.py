"""Times `haltwise bench signals` under two installs of haltwise (for example
the released wheel and a native gcc build from source), interleaved on the
same machine in one run, and prints the median native kernel time of each
install per setting with their ratio.

    python bench/compare_builds.py --a WHEEL_VENV/bin/haltwise --b GCC_VENV/bin/haltwise --rounds 5

Each round runs `haltwise bench signals --json ...` once per install, the
order alternating between rounds so drift in machine load hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run_once(exe: str, repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "signals.json")
        env = dict(os.environ)
        env.pop("HALTWISE_CPU_ISA", None)
        isa = subprocess.run([os.path.join(os.path.dirname(exe), "python"), "-c",
                              "from haltwise._native import core; print(core().signals_cpu_isa())"],
                             env=env, check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run([exe, "bench", "signals", "--repeats", str(repeats), "--json", path], env=env, check=True,
                       stdout=subprocess.DEVNULL, cwd=tmp)
        with open(path) as f:
            rows = json.load(f)
    for row in rows:
        row["isa"] = isa
    return rows


# --focus: only the native kernel at (64, 128256) fp32, k=20, T=0 and T=1, in
# short processes: more alternations per minute than the whole suite allows.
FOCUS = """
import json, sys, torch
from haltwise.benchmarks.signals import make_logits
from haltwise.benchmarks.timing import median_times
from haltwise.signals import signals
from haltwise._native import core
x = make_logits(64, 128256, torch.float32)
rows = []
for t in (0.0, 1.0):
    ms = median_times({"native": lambda: signals(x, temperature=t, top_k_conf=20, seed=1, offset=2,
                                                  backend="native")}, repeats=int(sys.argv[1]))["native"] * 1e3
    rows.append({"batch": 64, "vocab": 128256, "dtype": "float32", "temperature": t, "top_k_conf": 20,
                 "native_ms": ms, "isa": core().signals_cpu_isa()})
print(json.dumps(rows))
"""


def run_focus(exe: str, repeats: int) -> list[dict]:
    env = dict(os.environ)
    env.pop("HALTWISE_CPU_ISA", None)
    out = subprocess.run([os.path.join(os.path.dirname(exe), "python"), "-c", FOCUS, str(repeats)], env=env,
                         check=True, capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout
    return json.loads(out.strip().splitlines()[-1])


def key(row: dict) -> tuple:
    return (row["batch"], row["vocab"], row["dtype"], row["temperature"], row["top_k_conf"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="the `haltwise` script of the first install (the wheel)")
    parser.add_argument("--b", required=True, help="the `haltwise` script of the second install (the baseline)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=11, help="passed to `haltwise bench signals`")
    parser.add_argument("--json", help="write every run's rows here")
    parser.add_argument("--focus", action="store_true",
                        help="time only the native kernel at (64, 128256) fp32, k=20 (not the whole suite)")
    args = parser.parse_args(argv)

    times: dict[str, dict[tuple, list[float]]] = {"a": {}, "b": {}}
    isas: dict[str, set[str]] = {"a": set(), "b": set()}
    runs = []
    for r in range(args.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for name in order:
            rows = (run_focus if args.focus else run_once)(getattr(args, name), args.repeats)
            runs.append({"round": r, "install": name, "rows": rows})
            for row in rows:
                times[name].setdefault(key(row), []).append(row["native_ms"])
                isas[name].add(row["isa"])
            print(f"round {r + 1}/{args.rounds} {name} done", file=sys.stderr, flush=True)

    print(f"a = {args.a} (isa {', '.join(sorted(isas['a']))})")
    print(f"b = {args.b} (isa {', '.join(sorted(isas['b']))})")
    print(f"medians of {args.rounds} interleaved runs, each the median of {args.repeats} timed rounds")
    print(f"{'(batch, vocab)':>15} {'dtype':>8} {'T':>3} {'a ms':>8} {'b ms':>8} {'a / b':>6}")
    ratios = []
    for k in times["a"]:
        a, b = statistics.median(times["a"][k]), statistics.median(times["b"][k])
        ratios.append(a / b)
        print(f"{str((k[0], k[1])):>15} {k[2]:>8} {k[3]:>3.1f} {a:>8.3f} {b:>8.3f} {a / b:>6.3f}")
    print(f"geometric mean a / b: {statistics.geometric_mean(ratios):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
