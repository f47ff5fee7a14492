"""`haltwise policy show DB`, `haltwise policy prune DB`, `haltwise policy
simulate` and `haltwise replay`: thin shells over Policy.report,
Policy.prune, policy.simulate and policy.replay.run_replay.

Hook into the main parser with :func:`add_policy_subcommands`; every
subcommand sets ``args.handler`` (a function of the parsed args returning the
exit code)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .._cli_util import CliError, check_output, check_plot, json_default

if TYPE_CHECKING:
    from .config import PolicyConfig


def add_policy_subcommands(subparsers) -> None:
    """Adds ``policy`` (``show``, ``prune``, ``simulate``) and ``replay`` to an argparse subparsers object."""
    policy = subparsers.add_parser("policy", help="inspect a policy database")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    show = policy_sub.add_parser("show", help="current thresholds per bucket and the last changes")
    show.add_argument("db", metavar="DB", help="the policy's SQLite file")
    show.add_argument("--last", type=int, default=10, help="how many audit entries to print (default 10)")
    show.add_argument("--json", action="store_true", help="print the report as JSON")
    show.set_defaults(handler=_show)
    prune = policy_sub.add_parser("prune", help="bound the database: drop the rows of old finished requests that "
                                                "no decision, restart or pending call needs (Policy.prune)")
    prune.add_argument("db", metavar="DB", help="the policy's SQLite file")
    prune.add_argument("--keep-last", type=int, required=True, metavar="N",
                       help="keep every request planned in the last N (labels for older ones are then refused)")
    prune.add_argument("--vacuum", action="store_true", help="then VACUUM: give the freed pages back to the disk")
    prune.set_defaults(handler=_prune)
    sim = policy_sub.add_parser("simulate", help="probability of ever certifying a candidate over budget, by "
                                                 "simulation of the re-test schedule on boundary settings")
    sim.add_argument("--json", metavar="FILE", help="write the report as JSON")
    sim.add_argument("--repetitions", type=int, default=2000, help="streams per setting (default 2000)")
    sim.add_argument("--naive-repetitions", type=int, default=200,
                     help="streams per setting for the naive rule (default 200; 0: skip it)")
    sim.add_argument("--labels", type=int, default=4000, help="labelled control requests per stream (default 4000)")
    sim.add_argument("--epsilon", type=float, default=0.02)
    sim.add_argument("--delta", type=float, default=0.1)
    sim.add_argument("--epsilon-overload", type=float, default=0.05)
    sim.add_argument("--seed", type=int, default=0)
    sim.set_defaults(handler=_simulate)

    replay = subparsers.add_parser("replay", help="evaluate a policy offline on a trace bank, as a request stream")
    replay.add_argument("--bank", metavar="PATH", help="trace bank (.npz; default: the bundled arith bank)")
    replay.add_argument("--synthetic", action="store_true",
                        help="use a synthetic bank (haltwise.policy.synthetic) instead of --bank")
    replay.add_argument("--json", metavar="PATH", help="write the report as JSON")
    replay.add_argument("--plot", metavar="PATH", help="PNG of EM and tokens over time with threshold and load")
    replay.add_argument("--db", metavar="PATH", default=":memory:",
                        help="keep the policy's SQLite database here (default: in memory)")
    replay.add_argument("--config", metavar="PATH",
                        help="PolicyConfig as JSON (any subset of its fields, e.g. a report's policy_config); the "
                             "flags below override it; a min_evidence given there is used as is (null: derived)")
    # the policy flags default to None: only those given override --config, else the PolicyConfig defaults
    # (`python -m haltwise.policy.config` lists them)
    replay.add_argument("--epsilon", type=float, help="accuracy budget")
    replay.add_argument("--delta", type=float, help="error budget of the guarantee")
    replay.add_argument("--epsilon-overload", type=float, help="budget under overload")
    replay.add_argument("--traces", type=int, help="traces per request, <= the bank's")
    replay.add_argument("--signal", help="the cut's per-token signal")
    replay.add_argument("--control-fraction", type=float, help="share of uncut control requests")
    replay.add_argument("--control-boost", type=float,
                        help="control share while a bucket is not ready")
    replay.add_argument("--requests", type=int, default=20000)
    replay.add_argument("--window", type=int, default=1000, help="requests per reported window")
    replay.add_argument("--label-fraction", type=float, default=0.5)
    replay.add_argument("--label-delay", type=int, default=200, help="requests between an answer and its label")
    replay.add_argument("--labels", choices=["reference", "correct"], default="reference",
                        help="labels carry the right answer (reference) or only right/wrong (correct)")
    replay.add_argument("--bucket-by", choices=["difficulty", "none"], default="difficulty")
    replay.add_argument("--shadow", action="append", default=[], metavar="KEY",
                        help="run this bucket in shadow mode (repeatable)")
    replay.add_argument("--seed", type=int, default=0)
    replay.set_defaults(handler=_replay)


def _simulate(args) -> int:
    from .simulate import main_args

    if args.json:
        check_output("--json", args.json)
    for name in ("repetitions", "labels"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.naive_repetitions < 0:
        raise CliError(f"--naive-repetitions must be >= 0, got {args.naive_repetitions}")
    from .config import PolicyConfig

    try:
        PolicyConfig(epsilon=args.epsilon, delta=args.delta, epsilon_overload=args.epsilon_overload)
    except ValueError as e:
        raise CliError(str(e)) from None
    return main_args(args)


def _fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_show(report: dict) -> str:
    from .buckets import display_name

    cfg = report["config"]
    lines = [f"policy: {report['requests']} requests, {report['feedback']} feedback, "
             f"overload {'ON' if report['overload'] else 'off'}; epsilon {cfg['epsilon']}, delta {cfg['delta']}, "
             f"epsilon_overload {cfg['epsilon_overload']}, signal {cfg['signal']} (window {cfg['window']}), "
             f"{cfg['traces']} traces, control {cfg['control_fraction']:.0%}", ""]
    header = (f"{'bucket':<22} {'ready':>5} {'labelled/control':>16} {'threshold':>10} {'target':>10} "
              f"{'overload':>16} {'warm-up':>7} {'shadow':>6}")
    lines += [header, "-" * len(header)]
    for name, b in report["buckets"].items():
        overload = "-" if b["overload_threshold"] is None and b["overload_traces"] is None else \
            f"{b['overload_traces']} x {_fmt(b['overload_threshold'])}"
        lines.append(f"{display_name(name):<22} {'yes' if b['ready'] else 'no':>5} "
                     f"{str(b['labeled']) + '/' + str(b['control']):>16} {_fmt(b['threshold']):>10} "
                     f"{_fmt(b['target']):>10} {overload:>16} {b['warmup']:>7} {'on' if b['shadow'] else '':>6}")
    for name, b in report["buckets"].items():
        ev = b.get("last_eval") or {}
        if ev.get("n"):
            fail = ev.get("first_uncertified")
            tail = "" if not fail else (f"; next candidate {_fmt(fail['threshold'])}: {fail['harms']} harms, "
                                        f"{fail['helps']} helps, p = {_fmt(fail.get('p_value'))}")
            lines.append(f"  {display_name(name)}: test {ev['test']} on {ev['n']} labelled control requests, "
                         f"{ev['certified']} candidates certified, uncut EM {_fmt(ev.get('em_uncut'))}{tail}")
        rows = b.get("candidates") or {}
        if rows:
            parts = []
            for label in ("lower", "chosen", "higher"):
                r = rows.get(label)
                if r:
                    value = f", value {r['value']:.4f}" if "value" in r else ""
                    parts.append(f"{label} {_fmt(r['threshold'])}: EM {r['em']:.3f}, {r['tokens']:.0f} tok{value}")
            lines.append("    " + " | ".join(parts))
        shadow = b.get("shadow_summary")
        if shadow:
            lines.append(f"    shadow: {shadow['requests']} requests, would save {_fmt(shadow['saved'], '.1%')}, "
                         f"answer changed in {_fmt(shadow['flip_rate'], '.1%')}; {shadow['labeled']} labelled: "
                         f"EM change {_fmt(shadow['em_change'], '+.3f')} ({shadow['harms']} harms, "
                         f"{shadow['helps']} helps; harm rate <= {_fmt(shadow['harm_rate_upper'])})")
        served = b.get("served") or {}
        if served.get("labeled_cut") or served.get("bad_reports_cut"):
            lines.append(f"    served since last change: EM with a cut {_fmt(served['em_cut'])} "
                         f"({served['labeled_cut']} labelled) vs uncut {_fmt(served['em_uncut'])} "
                         f"({served['labeled_uncut']}); bad reports {served['bad_reports_cut']:.1f} vs "
                         f"{served['bad_reports_uncut']:.1f}")
    lines += ["", "last changes:"]
    for c in report["changes"]:
        lines.append(f"  #{c['seq']:<7} {display_name(c['bucket']):<18} {c['field']:<18} "
                     f"{json.dumps(c['old'])[:28]:>28} -> {json.dumps(c['new'])[:28]:<28} {c['reason']}")
    return "\n".join(lines)


def _open_policy(db: str, *, readonly: bool):
    """Policy.open(db) for a command: a missing or foreign file is one CliError line."""
    from .policy import Policy
    from .store import PolicyDatabaseError

    if not Path(db).exists():
        raise CliError(f"DB {db} does not exist")
    try:
        return Policy.open(db, readonly=readonly)
    except PolicyDatabaseError as e:
        raise CliError(str(e)) from None


def _show(args) -> int:
    # read-only: never writes, works on a read-only file and while the serving process writes
    policy = _open_policy(args.db, readonly=True)
    try:
        report = policy.report(last_changes=args.last)
    finally:
        policy.close()
    if args.json:
        print(json.dumps(report, indent=2, default=json_default))
    else:
        print(format_show(report))
    return 0


def _prune(args) -> int:
    if args.keep_last < 0:
        raise CliError(f"--keep-last must be >= 0, got {args.keep_last}")
    policy = _open_policy(args.db, readonly=False)
    size = Path(args.db).stat().st_size
    try:
        deleted = policy.prune(keep_last=args.keep_last)
        if args.vacuum:
            policy.store.vacuum()
    finally:
        policy.close()
    print(f"deleted {deleted['requests']} requests, {deleted['traces']} traces, {deleted['evidence']} evidence rows; "
          f"{args.db}: {size} -> {Path(args.db).stat().st_size} bytes")
    return 0


def _replay(args) -> int:
    from ..tracebank import TraceBank
    from .replay import DEFAULT_BANK, ReplayConfig, format_report, json_payload, plot_report, run_replay
    from .synthetic import synthetic_bank

    check_output("--json", args.json)
    check_plot("--plot", args.plot)
    if args.synthetic and args.bank:
        print("haltwise replay: give --bank or --synthetic, not both", file=sys.stderr)
        return 2
    if args.synthetic:
        bank = synthetic_bank(200, 32, seed=args.seed)
        print("bank: synthetic (haltwise.policy.synthetic, 200 problems x 32 traces)")
    else:
        path = Path(args.bank) if args.bank else DEFAULT_BANK
        if not path.exists():
            print(f"haltwise replay: bank {path} does not exist (record one with `haltwise bench --bank-out PATH`, "
                  f"or use --synthetic)", file=sys.stderr)
            return 2
        try:
            bank = TraceBank.load(path)
        except ValueError as e:
            raise CliError(str(e)) from None
        print(f"bank: {path} ({bank.num_problems} problems x {bank.traces_per_problem} traces)")
    policy_config = _replay_policy_config(args)
    stream = ReplayConfig(requests=args.requests, window=args.window, label_fraction=args.label_fraction,
                          label_delay=args.label_delay, labels=args.labels, bucket_by=args.bucket_by, seed=args.seed)
    report = run_replay(bank, policy_config, stream, db=args.db, shadow_keys=tuple(args.shadow))
    print(format_report(report))
    print(f"({report['seconds']['total']:.1f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(json_payload(report), indent=2, default=json_default) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _replay_policy_config(args) -> PolicyConfig:
    """The PolicyConfig of `haltwise replay`: --config's fields, then the policy flags that were given."""
    from .config import PolicyConfig

    fields: dict = {}
    if args.config:
        try:
            fields = json.loads(Path(args.config).read_text())
        except OSError as e:
            raise CliError(f"--config: cannot read {args.config}: {e.strerror or e}") from None
        except ValueError as e:
            raise CliError(f"--config: {args.config} is not JSON: {e}") from None
        if not isinstance(fields, dict):
            raise CliError(f"--config: {args.config} must hold a JSON object of PolicyConfig fields, "
                           f"got {type(fields).__name__}")
    for name in ("epsilon", "delta", "epsilon_overload", "traces", "signal", "control_fraction", "control_boost"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    try:
        return PolicyConfig.from_json(json.dumps(fields))
    except (TypeError, ValueError) as e:
        raise CliError(f"--config: {e}" if args.config else str(e)) from None


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m haltwise.policy.cli``) until the main CLI hooks these in."""
    parser = argparse.ArgumentParser(prog="haltwise")
    add_policy_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CliError as e:
        name = args.command if args.command != "policy" else f"policy {args.policy_command}"
        print(f"haltwise {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
