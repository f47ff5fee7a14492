"""``haltwise policy simulate``: the policy's re-test schedule on synthetic
boundary settings, repeated many times, to measure the probability that a
candidate over budget is EVER certified over a stream.

What runs is the policy's own code: the families of tests of
:func:`anytime.policy_families` over an evidence window of the config's
``evidence_window`` most recent labelled control requests, evaluated every
``evaluate_every`` labels by :class:`anytime.Certifier` with the config's
:meth:`PolicyConfig.schedule` -- exactly what ``Policy._evaluate`` calls.
Only the evidence is synthetic: each labelled control request draws one
uniform u, and candidate c (of trace option r) harms when u < h[r][c] and
helps when u > 1 - g[r][c] (a monotone coupling: candidates are nested, as
cuts at rising thresholds are).

Settings (all at the boundary of the null, the hardest case for the test):

* ``harms_only``: every candidate harms with probability epsilon, never
  helps (right/wrong labels: the binomial test);
* ``many_helps``: every candidate harms with probability 0.2 and helps with
  0.2 - epsilon (E[D] = epsilon; references: the McNemar test);
* ``falls_then_rises``: the drop E[D] falls below 0 then rises past epsilon
  along the candidate order (McNemar): a safe prefix, then violators;
* ``overload_harms_only``: every overload candidate (all trace options) at
  epsilon_overload, the normal candidates safe.

A violator is a candidate whose E[D] >= its budget. The rate is the share of
repetitions in which any evaluation returned a certified set holding a
violator. The naive rule (a fresh level-delta test every ``evaluate_every``
labels once ``min_evidence`` labels are in, the re-test rule before the
schedule existed) runs on the same streams through the same Certifier, to
show that the simulator can fail.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .anytime import AnytimeState, Certifier, RetestSchedule, policy_families
from . import ltt
from .config import PolicyConfig
from .ltt import min_evidence


@dataclass(frozen=True)
class Setting:
    name: str
    test: str  # "binomial" or "mcnemar"
    harm: tuple  # (R, C) harm probabilities (C = 1 + grid candidates; column 0: no cut)
    help: tuple  # (R, C) help probabilities


def settings(config: PolicyConfig, grid: int = 10) -> list[Setting]:
    """The boundary settings for `config` (its trace options and budgets)."""
    eps, eps_o = config.epsilon, config.epsilon_overload
    R, C = len(config.strategy_rows), grid + 1
    other_rows = config.normal_rows  # rows tested in normal mode besides row 0
    zeros = [[0.0] * C for _ in range(R)]

    def normal(harm: Sequence[float], helps: Sequence[float]) -> tuple[tuple, tuple]:
        """Row 0's grid and every other row's columns (its "no cut" like the first grid value)."""
        h = [list(r) for r in zeros]
        g = [list(r) for r in zeros]
        h[0][1:] = list(harm)
        g[0][1:] = list(helps)
        for r in other_rows:
            h[r] = [harm[0]] + list(harm)
            g[r] = [helps[0]] + list(helps)
        return tuple(map(tuple, h)), tuple(map(tuple, g))

    out = []
    h, g = normal([eps] * grid, [0.0] * grid)
    out.append(Setting("harms_only", "binomial", h, g))
    h, g = normal([0.2] * grid, [0.2 - eps] * grid)
    out.append(Setting("many_helps", "mcnemar", h, g))
    # E[D] along the grid: 0.01, 0, -0.01, -0.02, -0.01, 0, eps, eps, 1.5 eps, 2 eps ...
    drops = [0.01, 0.0, -0.01, -0.02, -0.01, 0.0, eps, eps, 1.5 * eps, 2 * eps]
    drops = (drops + [2 * eps] * grid)[:grid]
    helps = [0.05] * grid
    h, g = normal([d + 0.05 for d in drops], helps)
    out.append(Setting("falls_then_rises", "mcnemar", h, g))
    h = [[eps_o] * C for _ in range(R)]
    h[0][0] = 0.0  # all K traces, no cut: nothing changes
    g = [[0.0] * C for _ in range(R)]
    out.append(Setting("overload_harms_only", "binomial", tuple(map(tuple, h)), tuple(map(tuple, g))))
    return out


def _violators(config: PolicyConfig, setting: Setting) -> dict[str, set[int]]:
    """Per family, the candidates (as the family indexes them) whose drop is >= the budget."""
    h, g = np.asarray(setting.harm), np.asarray(setting.help)
    out = {"normal": {c for c in range(h.shape[1] - 1)
                      if h[0, c + 1] - g[0, c + 1] >= config.epsilon - 1e-12}}
    for r in config.normal_rows:
        out[f"normal/{r}"] = {c for c in range(h.shape[1]) if h[r, c] - g[r, c] >= config.epsilon - 1e-12}
    for r in range(len(config.trace_options), len(config.strategy_rows)):
        out[f"overload/s{r}"] = {c for c in range(h.shape[1]) if h[r, c] - g[r, c] >= config.epsilon_overload - 1e-12}
    for r, k in enumerate(config.trace_options):
        out[f"overload/{k}"] = {c for c in range(h.shape[1]) if h[r, c] - g[r, c] >= config.epsilon_overload - 1e-12}
    return out


def naive_schedule(config: PolicyConfig) -> RetestSchedule:
    """The rule before the re-test schedule: a fresh test at the full delta
    every evaluate_every labels once min_evidence (computed at delta) are in."""
    first = min_evidence(config.epsilon, config.delta / config.chain_starts, "mcnemar")
    return RetestSchedule(first=first, window=config.evidence_window, delta=config.delta, spending="none",
                          every=config.evaluate_every)


def run_setting(config: PolicyConfig, setting: Setting, *, repetitions: int, labels: int, seed: int,
                schedule: RetestSchedule | None = None, every_evaluation: bool = False) -> dict:
    """Share of repetitions in which some evaluation certified a violator.
    every_evaluation: run every evaluate_every-th evaluation, not only those
    at which a checkpoint is reached (same result, slower)."""
    schedule = schedule or config.schedule()
    certifier = Certifier(schedule)
    harm, help_ = np.asarray(setting.harm), np.asarray(setting.help)
    violators = _violators(config, setting)
    every, window = config.evaluate_every, config.evidence_window
    points = np.arange(every, labels + 1, every)
    if not every_evaluation:
        # Between checkpoints an evaluation returns a subset of the last checkpoint's sets (Certifier.evaluate),
        # so only the evaluations at which a checkpoint is reached can certify a violator first: run those.
        reached = np.array([schedule.reached(int(p)) for p in points])
        points = points[np.diff(np.concatenate([[0], reached])) > 0]
    lows = np.maximum(points - window, 0)
    rng = np.random.default_rng(seed)
    failures = 0
    for _ in range(repetitions):
        u = rng.random(labels)  # drawn whichever evaluations run: the streams do not depend on every_evaluation
        harms = np.zeros((labels + 1,) + harm.shape, np.int32)
        helps = np.zeros_like(harms)
        harms[1:] = np.cumsum(u[:, None, None] < harm[None], axis=0)
        helps[1:] = np.cumsum(u[:, None, None] > 1.0 - help_[None], axis=0)
        wh = (harms[points] - harms[lows]).tolist()
        wg = (helps[points] - helps[lows]).tolist()
        state = AnytimeState()
        for e, point in enumerate(points.tolist()):
            state.labelled = point
            n = point - int(lows[e])
            sets, _ = certifier.evaluate(state, policy_families(config, wh[e], wg[e], n, setting.test))
            if any(violators[name] & set(cols) for name, cols in sets.items()):
                failures += 1
                break
    rate = failures / repetitions
    return {"name": setting.name, "repetitions": repetitions, "rate": rate,
            "se": math.sqrt(rate * (1.0 - rate) / repetitions), "labels": labels, "test": setting.test}


def simulate(config: PolicyConfig | None = None, *, repetitions: int = 2000, labels: int = 4000, seed: int = 0,
             naive_repetitions: int | None = None, grid: int = 10) -> dict:
    """Both rules on every setting. Returns the report written by ``haltwise policy simulate``."""
    config = config or PolicyConfig()
    if isinstance(repetitions, bool) or not isinstance(repetitions, int) or repetitions < 1:
        raise ValueError(f"simulate: repetitions must be an int >= 1, got {repetitions!r}")
    if isinstance(labels, bool) or not isinstance(labels, int) or labels < config.evaluate_every:
        raise ValueError(f"simulate: labels must be an int >= evaluate_every ({config.evaluate_every}), "
                         f"got {labels!r}")
    naive_repetitions = repetitions if naive_repetitions is None else naive_repetitions
    if isinstance(naive_repetitions, bool) or not isinstance(naive_repetitions, int) or naive_repetitions < 0:
        raise ValueError(f"simulate: naive_repetitions must be an int >= 0, got {naive_repetitions!r}")
    schedule = config.schedule()
    report: dict[str, Any] = {
        "delta": config.delta, "epsilon": config.epsilon, "epsilon_overload": config.epsilon_overload,
        "labels": labels, "evaluate_every": config.evaluate_every, "evidence_window": config.evidence_window,
        "schedule": {"first": schedule.first, "ratio": schedule.ratio, "spending": schedule.spending,
                     "checkpoints": [schedule.checkpoint(j) for j in range(1, schedule.reached(labels) + 1)]},
        "settings": [], "naive": [],
    }
    with ltt.batch_cache():  # every repetition revisits the same levels: worth a large, short-lived cache
        for i, setting in enumerate(settings(config, grid)):
            report["settings"].append(run_setting(config, setting, repetitions=repetitions, labels=labels,
                                                  seed=seed * 1000 + i))
            if naive_repetitions:
                report["naive"].append(run_setting(config, setting, repetitions=naive_repetitions, labels=labels,
                                                   seed=seed * 1000 + i, schedule=naive_schedule(config)))
    report["valid"] = all(s["rate"] + 2 * s["se"] <= config.delta for s in report["settings"])
    return report


def format_report(report: dict) -> str:
    lines = [f"re-test schedule: checkpoints at {report['schedule']['checkpoints']} labels "
             f"(delta {report['delta']}, {report['labels']} labels per stream, evaluated every "
             f"{report['evaluate_every']}, window {report['evidence_window']})",
             f"{'setting':<22} {'rule':<10} {'reps':>6} {'P(ever certify a violator)':>28} {'+2 se <= delta':>15}"]
    for rule, rows in (("anytime", report["settings"]), ("naive", report["naive"])):
        for s in rows:
            ok = s["rate"] + 2 * s["se"] <= report["delta"]
            lines.append(f"{s['name']:<22} {rule:<10} {s['repetitions']:>6} "
                         f"{s['rate']:>20.4f} +- {s['se']:.4f} {'yes' if ok else 'NO':>15}")
    return "\n".join(lines)


def main_args(args) -> int:
    config = PolicyConfig(epsilon=args.epsilon, delta=args.delta, epsilon_overload=args.epsilon_overload)
    report = simulate(config, repetitions=args.repetitions, labels=args.labels, seed=args.seed,
                      naive_repetitions=args.naive_repetitions)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["valid"] else 1


__all__ = ["Setting", "settings", "naive_schedule", "run_setting", "simulate", "format_report"]
