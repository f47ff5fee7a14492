"""The replay harness (`haltwise replay`): a policy evaluated offline, in
seconds, against a trace bank played as a stream of requests.

The stream
    ``requests`` requests; each draws a problem (difficulty level first: the
    mix favours easy levels in the first half and shifts toward hard ones at
    ``drift_at``) and a random subset of ``traces`` of its recorded traces
    (fresh samples of the same problem). The request's key is its difficulty
    band (``bucket_by="difficulty"``) or global.
Running a request
    The policy plans it; its traces are replayed exactly: a trace the plan's
    threshold would cut stops at its cut step (calibration.TraceProfile, the
    scheduler's rule) and does not vote; control and warm-up requests run
    uncut and report their signals; shadow requests report the would-be cut.
    The served answer is the vote of the rest. The uncut answer of the same
    request (same traces, no cut) is the baseline.
Feedback and load
    A ``label_fraction`` of requests gets a label ``label_delay`` requests
    later (with the reference answer unless ``labels="correct"``); a share of
    the wrong served answers without a label gets a user report. Every
    ``load_every`` requests the policy sees the queue depth and p95 latency
    of a load profile that spikes over ``spike`` (fractions of the stream).
Report
    Per window of ``window`` requests: vote EM of the served answers and of
    the uncut answers on the same requests, tokens per request of each, the
    median threshold in force, the share planned in overload, the queue
    depth. ``static_best``: the single fixed threshold (K traces, no control
    slice), chosen in hindsight on the whole stream, that saves the most
    tokens with EM >= uncut EM - epsilon. ``strategy_best``: the same over
    the whole strategy family (trace counts, and the config's consensus
    strategies, each x a fixed threshold).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ..scheduler import StopReason
from ..trace_rules import VOTING_REASONS, vote_weight, vote_weights
from ..tracebank import BUNDLED_BANK, NO_ANSWER, TraceBank
from ..voting import weighted_vote
from .calibration import TraceProfile, trace_profile, vote_matrix
from .config import PolicyConfig
from .policy import Policy
from .types import TraceOutcome
from .strategy import Strategy, deepconf_cut, replay_columns
from .strategy import replay as replay_strategy
from .strategy import run as run_strategy

DEFAULT_BANK = BUNDLED_BANK


@dataclass(frozen=True)
class ReplayConfig:
    """The stream (module docstring)."""

    requests: int = 20000
    window: int = 1000
    label_fraction: float = 0.5
    label_delay: int = 200
    labels: str = "reference"  # "reference": labels carry the right answer; "correct": right/wrong only
    user_report_rate: float = 0.1
    user_report_weight: float = 0.5
    drift_at: float = 0.5
    spike: tuple[float, float] = (0.65, 0.8)
    load_every: int = 10
    bucket_by: str = "difficulty"
    seed: int = 0

    def __post_init__(self):
        if self.requests < 1 or self.window < 1:
            raise ValueError(f"ReplayConfig: requests and window must be >= 1, got {self.requests}, {self.window}")
        for name in ("label_fraction", "user_report_rate", "user_report_weight", "drift_at"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ReplayConfig: {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.spike[0] <= self.spike[1] <= 1.0:
            raise ValueError(f"ReplayConfig: spike must be (start, end) fractions with start <= end, got {self.spike}")
        if self.labels not in ("reference", "correct"):
            raise ValueError(f"ReplayConfig: labels must be 'reference' or 'correct', got {self.labels!r}")
        if self.bucket_by not in ("difficulty", "none"):
            raise ValueError(f"ReplayConfig: bucket_by must be 'difficulty' or 'none', got {self.bucket_by!r}")
        if self.label_delay < 0 or self.load_every < 1:
            raise ValueError(f"ReplayConfig: label_delay must be >= 0 and load_every >= 1, "
                             f"got {self.label_delay}, {self.load_every}")


class BankTraces:
    """The bank's traces as profiles of the policy's signal, for fast exact replay."""

    def __init__(self, bank: TraceBank, config: PolicyConfig):
        self.bank = bank
        self.signal = config.signal
        K = bank.traces_per_problem
        self.values: list[list[np.ndarray]] = []
        self.profiles: list[list[TraceProfile]] = []
        self.answers = np.where(bank.answers == NO_ANSWER, NO_ANSWER, bank.answers)
        self.votes = np.zeros(bank.answers.shape, dtype=bool)
        self.mean_logprob = np.zeros(bank.answers.shape)
        for p in range(bank.num_problems):
            row_v, row_p = [], []
            for k in range(K):
                v = bank.signal(p, k, config.signal)
                reason = int(bank.reasons[p, k])
                answer = None if bank.answers[p, k] == NO_ANSWER else int(bank.answers[p, k])
                lp = bank.signal(p, k, "logprob")
                self.mean_logprob[p, k] = float(lp.mean()) if len(lp) else math.nan
                row_v.append(v)
                row_p.append(trace_profile(v, reason=reason, answer=answer, window=config.window,
                                           min_new_tokens=config.min_new_tokens,
                                           mean_logprob=self.mean_logprob[p, k]))
                self.votes[p, k] = StopReason(reason) in VOTING_REASONS and answer is not None
            self.values.append(row_v)
            self.profiles.append(row_p)


@dataclass
class _Request:
    problem: int
    subset: np.ndarray
    key: str


def make_stream(bank: TraceBank, cfg: ReplayConfig, traces: int) -> list[_Request]:
    """The requests: problems with the difficulty drift, random trace subsets."""
    if traces > bank.traces_per_problem:
        raise ValueError(f"replay: the policy runs {traces} traces per request but the bank holds "
                         f"{bank.traces_per_problem} per problem")
    rng = np.random.default_rng(cfg.seed)
    levels = np.unique(bank.difficulty)
    by_level = [np.flatnonzero(bank.difficulty == d) for d in levels]
    L = len(levels)
    easy = np.arange(L, 0, -1, dtype=np.float64)
    hard = np.arange(1, L + 1, dtype=np.float64)
    out = []
    for r in range(cfg.requests):
        weights = easy if r < cfg.drift_at * cfg.requests else hard
        level = int(rng.choice(L, p=weights / weights.sum()))
        p = int(rng.choice(by_level[level]))
        subset = rng.choice(bank.traces_per_problem, size=traces, replace=False)
        key = f"terms={int(levels[level])}" if cfg.bucket_by == "difficulty" else ""
        out.append(_Request(problem=p, subset=subset, key=key))
    return out


def load_profile(cfg: ReplayConfig, r: int, rng: np.random.Generator) -> dict:
    """Queue depth and p95 latency at request r: calm, then a spike over cfg.spike."""
    lo, hi = cfg.spike[0] * cfg.requests, cfg.spike[1] * cfg.requests
    base = 8.0 + rng.poisson(4.0)
    if lo <= r < hi:
        ramp = min(1.0, (r - lo) / max(1.0, 0.05 * (hi - lo)), (hi - r) / max(1.0, 0.05 * (hi - lo)))
        base += 160.0 * ramp
    queue = float(base)
    return {"queue_depth": queue, "p95_latency_s": 0.4 + queue / 50.0 + float(rng.normal(0.0, 0.05)) ** 2}


def _deepconf_cut(strategy, profs: list[TraceProfile]) -> tuple[list[bool], list[int]]:
    """strategy.deepconf_cut on a request's bank traces: (kept, tokens) per trace."""
    kept, spent, _ = deepconf_cut(strategy, [q.lowest for q in profs], [q.length for q in profs],
                                  lambda t: [q.cut_length(t) for q in profs])
    return kept, spent


def run_plan(plan, traces: BankTraces, problem: int, subset: np.ndarray) -> tuple[list[TraceOutcome], int]:
    """What the decode loop would report for `plan` on a bank problem whose
    recorded traces `subset` are the request's samples (the first plan.traces
    of them run): the TraceOutcome of each trace and the tokens generated.
    Exact, by the prefix property: a cut trace is the recorded one stopped at
    its cut step."""
    bank = traces.bank
    p = problem
    outcomes, tokens = [], 0
    for k in subset[: plan.traces]:
        prof = traces.profiles[p][k]
        answer = None if traces.answers[p, k] == NO_ANSWER else int(traces.answers[p, k])
        reason = int(bank.reasons[p, k])
        n = prof.length
        mlp = float(traces.mean_logprob[p, k])
        if plan.control:
            outcomes.append(TraceOutcome(answer=answer, num_tokens=n, reason=reason, signal=traces.values[p][k],
                                         mean_logprob=mlp))
            tokens += n
            continue
        step = prof.cut_length(plan.threshold) if plan.threshold is not None else None
        if plan.shadow:
            outcomes.append(TraceOutcome(answer=answer, num_tokens=n, reason=reason, mean_logprob=mlp,
                                         would_stop_step=-1 if step is None else step,
                                         would_stop_reason=None if step is None else int(StopReason.LOW_CONFIDENCE)))
            tokens += n
        elif step is not None:
            outcomes.append(TraceOutcome(answer=None, num_tokens=step, reason=int(StopReason.LOW_CONFIDENCE),
                                         mean_logprob=mlp))
            tokens += step
        else:
            outcomes.append(TraceOutcome(answer=answer, num_tokens=n, reason=reason, mean_logprob=mlp))
            tokens += n
    if plan.kind == "policy" and plan.strategy.warmup:  # DeepConf's per-problem threshold (strategy.deepconf_cut)
        kept, spent = _deepconf_cut(plan.strategy, [traces.profiles[p][k] for k in subset[: plan.traces]])
        outcomes = [t if keep else TraceOutcome(answer=None, num_tokens=n, reason=int(StopReason.LOW_CONFIDENCE),
                                                mean_logprob=t.mean_logprob)
                    for t, keep, n in zip(outcomes, kept, spent)]
        tokens = sum(spent)
    if plan.kind == "policy" and plan.strategy.consensus is not None:
        # waves and consensus (strategy.run): the traces after the vote settled end with GROUP_CONSENSUS
        votes = [t.answer if StopReason(t.reason) in VOTING_REASONS else None for t in outcomes]
        _, spent, ended = run_strategy(plan.strategy, votes, [vote_weight(t.mean_logprob) for t in outcomes],
                                       [t.num_tokens for t in outcomes])
        outcomes = [t if done else TraceOutcome(answer=None, num_tokens=n, reason=int(StopReason.GROUP_CONSENSUS),
                                                mean_logprob=t.mean_logprob)
                    for t, n, done in zip(outcomes, spent, ended)]
        tokens = sum(spent)
    return outcomes, tokens


def run_replay(bank: TraceBank, policy_config: PolicyConfig, cfg: ReplayConfig, *, db: str = ":memory:",
               progress: Callable[[int], None] | None = None, shadow_keys: tuple[str, ...] = ()) -> dict:
    """Plays the stream through a fresh Policy; returns the report (module docstring)."""
    t0 = time.perf_counter()
    traces = BankTraces(bank, policy_config)
    K = policy_config.traces
    stream = make_stream(bank, cfg, K)
    policy = Policy(policy_config, db=db)
    for key in shadow_keys:
        policy.set_shadow(key, True)
    rng = np.random.default_rng(cfg.seed + 1)
    load_rng = np.random.default_rng(cfg.seed + 2)
    weighting = policy_config.weighting
    pending: dict[int, list[tuple]] = {}
    rows = []
    queue_depth = 0.0
    for r, req in enumerate(stream):
        for args in pending.pop(r, []):
            policy.feedback(*args[:2], **args[2])
        if r % cfg.load_every == 0:
            figures = load_profile(cfg, r, load_rng)
            queue_depth = figures["queue_depth"]
            policy.observe_load(**figures)
        plan = policy.plan(r, req.key)
        p = req.problem
        outcomes, tokens = run_plan(plan, traces, p, req.subset)
        served = policy.observe(r, outcomes)
        full = req.subset[:K]
        voters = [int(traces.answers[p, k]) for k in full if traces.votes[p, k]]
        weights = [vote_weight(traces.mean_logprob[p, k]) for k in full if traces.votes[p, k]] \
            if weighting == "confidence" else None
        uncut = weighted_vote(voters, weights)
        reference = int(bank.references[p])
        right = served is not None and served == reference
        u_label, u_report = rng.random(), rng.random()  # drawn for every request: labels never depend on the policy
        if u_label < cfg.label_fraction:
            kwargs = {"reference": reference} if cfg.labels == "reference" else {}
            pending.setdefault(r + cfg.label_delay, []).append((r, right, kwargs))
        elif not right and u_report < cfg.user_report_rate:
            pending.setdefault(r + cfg.label_delay // 2, []).append(
                (r, False, {"source": "user", "weight": cfg.user_report_weight}))
        rows.append((p, right, uncut is not None and uncut == reference, tokens,
                     int(traces.bank.lengths[p, full].sum()), plan.threshold, plan.overload, plan.kind, queue_depth,
                     plan.traces))
        if progress is not None:
            progress(1)
    seconds_policy = time.perf_counter() - t0
    report = _report(rows, stream, traces, bank, policy_config, cfg)
    report["seconds"] = {"policy_stream": seconds_policy, "total": time.perf_counter() - t0}
    report["policy"] = policy.report(last_changes=15)
    policy.close()
    return report


def _report(rows, stream, traces: BankTraces, bank: TraceBank, pc: PolicyConfig, cfg: ReplayConfig) -> dict:
    eps = pc.epsilon
    windows = []
    for lo in range(0, len(rows), cfg.window):
        chunk = rows[lo: lo + cfg.window]
        thresholds = [c[5] for c in chunk if c[7] == "policy" and c[5] is not None]
        overload_share = float(np.mean([c[6] for c in chunk]))
        windows.append({
            "start": lo, "requests": len(chunk),
            "em_policy": float(np.mean([c[1] for c in chunk])), "em_uncut": float(np.mean([c[2] for c in chunk])),
            "tokens_policy": float(np.mean([c[3] for c in chunk])),
            "tokens_uncut": float(np.mean([c[4] for c in chunk])),
            "threshold": float(np.median(thresholds)) if thresholds else None,
            "cut_share": len(thresholds) / len(chunk),
            "traces": float(np.mean([c[9] for c in chunk])),
            "control_share": float(np.mean([c[7] in ("control", "warmup") for c in chunk])),
            "overload": bool(overload_share >= 0.5), "overload_share": overload_share,
            "queue_depth": float(np.mean([c[8] for c in chunk])),
        })
    tokens_policy = sum(c[3] for c in rows)
    tokens_uncut = sum(c[4] for c in rows)
    em_policy = float(np.mean([c[1] for c in rows]))
    em_uncut = float(np.mean([c[2] for c in rows]))
    outcomes = _row_outcomes(stream, traces, bank, pc)
    static = static_best(stream, traces, bank, pc, window=cfg.window, outcomes=outcomes)
    strategy = strategy_best(stream, traces, bank, pc, outcomes)
    family = family_best(stream, traces, bank, pc, np.array([bool(c[6]) for c in rows]), outcomes,
                         label_fraction=cfg.label_fraction, label_delay=cfg.label_delay)
    normal = [w for w in windows if not w["overload"]]
    spike = [w for w in windows if w["overload"]]
    first_spike = next((i for i, w in enumerate(windows) if w["overload"]), None)
    before = [w for w in windows[max(0, (first_spike or 0) - 2): first_spike or 0] if not w["overload"]]
    saved = 1.0 - tokens_policy / tokens_uncut
    normal_rows = [c for c in rows if not c[6]]
    saved_normal = 1.0 - sum(c[3] for c in normal_rows) / max(1, sum(c[4] for c in normal_rows))
    targets = {
        "windows_within_budget": (sum(w["em_policy"] >= w["em_uncut"] - eps for w in normal) / len(normal))
        if normal else None,
        "savings_vs_static_best": saved / static["saved"] if static["saved"] > 0 else None,
        "savings_vs_strategy_best": saved / strategy["saved"] if strategy["saved"] > 0 else None,
        "family_best_vs_strategy_best": family["saved"] / strategy["saved"] if strategy["saved"] > 0 else None,
        "savings_vs_family_best": saved / family["saved"] if family["saved"] > 0 else None,
        "family_best_after_first_checkpoint_vs_strategy_best":
            family["saved_after_first_checkpoint"] / strategy["saved"] if strategy["saved"] > 0 else None,
        "spike_token_drop": (1.0 - np.mean([w["tokens_policy"] for w in spike]) /
                             np.mean([w["tokens_policy"] for w in before])) if spike and before else None,
        "spike_em_gap": (float(np.mean([w["em_uncut"] - w["em_policy"] for w in spike])) if spike else None),
        "spike_worst_window_gap": (max(w["em_uncut"] - w["em_policy"] for w in spike) if spike else None),
    }
    targets["met"] = {
        "windows_within_budget>=0.95": targets["windows_within_budget"] is not None and
        targets["windows_within_budget"] >= 0.95,
        "savings>=0.9*strategy_best": targets["savings_vs_strategy_best"] is not None and
        targets["savings_vs_strategy_best"] >= 0.9,
        "spike_tokens_drop>=0.2": targets["spike_token_drop"] is not None and targets["spike_token_drop"] >= 0.2,
        "spike_em_within_epsilon_overload": targets["spike_worst_window_gap"] is not None and
        targets["spike_worst_window_gap"] <= pc.epsilon_overload,
    }
    return {
        "epsilon": eps, "delta": pc.delta, "epsilon_overload": pc.epsilon_overload,
        "bank": {"problems": bank.num_problems, "traces": bank.traces_per_problem, "meta": bank.meta},
        "stream": {**asdict(cfg), "spike": list(cfg.spike)},
        "policy_config": json.loads(pc.to_json()),
        "windows": windows,
        "overall": {"em_policy": em_policy, "em_uncut": em_uncut, "tokens_policy": tokens_policy / len(rows),
                    "tokens_uncut": tokens_uncut / len(rows), "saved": saved, "saved_outside_overload": saved_normal},
        "static_best": static,
        "strategy_best": strategy,
        "family_best": family,
        "targets": targets,
    }


FINE_LEVELS = np.linspace(0.0, 0.95, 96)  # the fixed-threshold searches (static_best, trace counts)
COARSE_LEVELS = np.linspace(0.0, 0.94, 48)  # consensus strategies: every request's waves replayed per column


@dataclass(frozen=True)
class _CutGrid:
    """Thresholds (column 0: no cut; the others: quantiles of all the bank's
    lowest window means), and under each one every bank trace's tokens
    (int64 (P, K, T)) and whether it still votes (bool (P, K, T))."""

    thresholds: np.ndarray
    lengths: np.ndarray
    kept: np.ndarray


def _cut_grid(traces: BankTraces, levels: np.ndarray) -> _CutGrid:
    lowest_all = np.array([prof.lowest for row in traces.profiles for prof in row])
    lowest_all = lowest_all[~np.isnan(lowest_all)]
    thresholds = np.concatenate([[-np.inf], np.unique(np.quantile(lowest_all, levels))])
    P, Kb = traces.bank.answers.shape
    lengths_all = np.zeros((P, Kb, len(thresholds)), dtype=np.int64)
    kept_all = np.zeros((P, Kb, len(thresholds)), dtype=bool)
    for p in range(P):
        for k in range(Kb):
            prof = traces.profiles[p][k]
            lengths_all[p, k] = prof.cut_lengths(thresholds)
            kept_all[p, k] = ~(prof.lowest < thresholds) & traces.votes[p, k]
    return _CutGrid(thresholds, lengths_all, kept_all)


def _fixed_outcomes(stream: list[_Request], traces: BankTraces, bank: TraceBank, pc: PolicyConfig, K: int,
                    grid: _CutGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per request and threshold of `grid`, with the request's first K
    traces: whether the vote is right (bool (n, T)) and the tokens (int (n, T))."""
    thresholds, lengths_all, kept_all = grid.thresholds, grid.lengths, grid.kept
    T = len(thresholds)
    per_request = np.zeros((len(stream), T), dtype=bool)
    request_tokens = np.zeros((len(stream), T), dtype=np.int64)
    for i, req in enumerate(stream):
        p, ks = req.problem, req.subset[:K]
        weights = vote_weights(traces.mean_logprob[p, ks]) if pc.weighting == "confidence" else None
        winners = vote_matrix(traces.answers[p, ks], weights, kept_all[p, ks].T)
        request_tokens[i] = lengths_all[p, ks].sum(axis=0)
        per_request[i] = winners == bank.references[p]
    return per_request, request_tokens, thresholds


def _strategy_outcomes(stream: list[_Request], traces: BankTraces, bank: TraceBank, strategy: Strategy,
                       grid: _CutGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_fixed_outcomes` for a consensus strategy (policy/strategy.py
    replays its waves and vote exactly). A DeepConf warm-up strategy cuts at
    its own per-problem threshold (strategy.deepconf_cut, as run_plan serves
    it): one column, threshold NaN."""
    if strategy.warmup:
        return _warmup_outcomes(stream, traces, bank, strategy)
    thresholds, lengths_all, kept_all = grid.thresholds, grid.lengths, grid.kept
    answers_all = np.where(traces.votes, traces.answers, NO_ANSWER).astype(np.int64)
    K = strategy.traces
    per_request = np.zeros((len(stream), len(thresholds)), dtype=bool)
    request_tokens = np.zeros((len(stream), len(thresholds)), dtype=np.int64)
    for i, req in enumerate(stream):
        p, ks = req.problem, req.subset[:K]
        weights = vote_weights(traces.mean_logprob[p, ks]) if strategy.weighting == "confidence" else np.ones(K)
        winners, tokens = replay_columns(strategy, answers_all[p, ks], weights,
                                         np.ascontiguousarray(lengths_all[p, ks].T),
                                         np.ascontiguousarray(kept_all[p, ks].T), NO_ANSWER)
        per_request[i] = winners == bank.references[p]
        request_tokens[i] = tokens
    return per_request, request_tokens, thresholds


def _warmup_outcomes(stream: list[_Request], traces: BankTraces, bank: TraceBank,
                     strategy: Strategy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    K = strategy.traces
    per_request = np.zeros((len(stream), 1), dtype=bool)
    request_tokens = np.zeros((len(stream), 1), dtype=np.int64)
    for i, req in enumerate(stream):
        p, ks = req.problem, req.subset[:K]
        kept, spent = _deepconf_cut(strategy, [traces.profiles[p][k] for k in ks])
        votes = [int(traces.answers[p, k]) if keep and traces.votes[p, k] else None for k, keep in zip(ks, kept)]
        answer, tokens = replay_strategy(strategy, votes, [vote_weight(m) for m in traces.mean_logprob[p, ks]], spent)
        per_request[i, 0] = answer is not None and answer == bank.references[p]
        request_tokens[i, 0] = tokens
    return per_request, request_tokens, np.array([np.nan])


class _RowOutcome(NamedTuple):
    """One strategy row replayed on every request at every fixed cut threshold."""

    strategy: Strategy
    right: np.ndarray  # bool (n, T): the vote is right
    tokens: np.ndarray  # int (n, T)
    thresholds: np.ndarray  # (T,): column 0 is no cut


def _row_outcomes(stream: list[_Request], traces: BankTraces, bank: TraceBank, pc: PolicyConfig) -> list[_RowOutcome]:
    """Every strategy row of the config (indexed as pc.strategy_rows) replayed
    on every request at every fixed cut threshold. Trace-count rows use 96
    quantiles, consensus rows 48 (every request's waves and vote replayed
    exactly); row 0, all K traces on the fine grid, is also static_best's."""
    fine, coarse = _cut_grid(traces, FINE_LEVELS), _cut_grid(traces, COARSE_LEVELS)  # once for every row
    out = []
    for r, strategy in enumerate(pc.strategy_rows):
        if r < len(pc.trace_options):
            right, tokens, thresholds = _fixed_outcomes(stream, traces, bank, pc, strategy.traces, fine)
        else:
            right, tokens, thresholds = _strategy_outcomes(stream, traces, bank, strategy, coarse)
        out.append(_RowOutcome(strategy, right, tokens, thresholds))
    return out


def _fewest_tokens(outcomes: list[_RowOutcome], rows, mask: np.ndarray, base_em: float,
                   epsilon: float) -> tuple[int, int]:
    """Among the columns of `rows` (indices into outcomes), the one with the
    fewest tokens over the requests in `mask` (not empty) whose vote EM there
    is >= base_em - epsilon: (row, column). Row 0's column 0, the uncut run
    whose EM base_em is, always qualifies, and every caller offers it."""
    best: tuple[int, int, int] | None = None
    for r in rows:
        right, tokens = outcomes[r].right, outcomes[r].tokens
        ok = np.flatnonzero(right[mask].mean(axis=0) >= base_em - epsilon)
        if not ok.size:
            continue
        sums = tokens[mask][:, ok].sum(axis=0)
        j = int(ok[np.argmin(sums)])
        if best is None or sums.min() < best[0]:
            best = (int(sums.min()), r, j)
    if best is None:
        raise ValueError("_fewest_tokens: no candidate within epsilon (row 0 must be offered, on requests)")
    return best[1], best[2]


def _describe(outcomes: list[_RowOutcome], r: int, j: int) -> dict:
    strategy, thresholds = outcomes[r].strategy, outcomes[r].thresholds
    return {"strategy": strategy.name, "traces": int(strategy.traces),
            "threshold": None if j == 0 or np.isnan(thresholds[j]) else float(thresholds[j])}


def strategy_best(stream: list[_Request], traces: BankTraces, bank: TraceBank, pc: PolicyConfig,
                  outcomes: list[_RowOutcome] | None = None) -> dict:
    """The best single static strategy in hindsight: among (trace count K' in
    the config's trace options) x (fixed cut threshold, 96 quantiles) and
    (each of the config's consensus strategies, not the overload-only ones) x
    (fixed cut threshold, 48 quantiles), the one with the fewest tokens whose vote EM over the stream
    is >= the uncut K-trace EM - epsilon ("threshold" None: no cut, or a
    DeepConf warm-up strategy's own per-problem cut). "tokens": that
    strategy's tokens per request. `outcomes`: :func:`_row_outcomes`, if
    already computed."""
    outcomes = outcomes or _row_outcomes(stream, traces, bank, pc)
    base_right, base_tokens = outcomes[0].right[:, 0], outcomes[0].tokens[:, 0]  # row 0, column 0: the uncut run
    every = np.ones(len(stream), dtype=bool)
    rows = [r for r in range(len(outcomes)) if r not in pc.overload_only_rows]  # never served in normal operation
    r, j = _fewest_tokens(outcomes, rows, every, float(base_right.mean()), pc.epsilon)
    per_request = outcomes[r].tokens[:, j]
    return {"strategies": "trace count x fixed cut threshold, and each consensus strategy x fixed cut threshold",
            **_describe(outcomes, r, j), "em": float(outcomes[r].right[:, j].mean()),
            "em_uncut": float(base_right.mean()), "saved": float(1.0 - per_request.sum() / base_tokens.sum()),
            "tokens": [int(t) for t in per_request]}


def family_best(stream: list[_Request], traces: BankTraces, bank: TraceBank, pc: PolicyConfig,
                overload: np.ndarray, outcomes: list[_RowOutcome] | None = None, *, label_fraction: float = 1.0,
                label_delay: int = 0) -> dict:
    """What the policy's own candidate family could save at most with static
    choices made in hindsight and nothing to learn: outside overload, each
    request runs the better (fewer tokens) of the normal family's best
    candidate over the whole stream and its key's best over the key's
    requests (each within epsilon of uncut on its population: the values of
    the root bucket or of the request's own bucket); under overload (the
    requests the policy served in overload, `overload`), the overload
    family's best candidate within epsilon_overload over those requests; and
    the control slice (``control_fraction`` of the requests) runs uncut. No
    warm-up, no evidence to gather, no threshold to ramp: a ceiling for the
    policy's savings, not a strategy anyone can run.

    "saved_after_first_checkpoint" charges, besides, the one thing no
    certification can skip: before anything is certified, the warm-up and
    the control requests that bring the first checkpoint's ``min_evidence``
    labels (at `label_fraction`) run uncut, and the `label_delay` requests
    until those labels arrive run the start strategy with no cut (the
    config's start row: the exact start by default)."""
    outcomes = outcomes or _row_outcomes(stream, traces, bank, pc)
    base_right, base_tokens = outcomes[0].right[:, 0], outcomes[0].tokens[:, 0]
    normal_rows = [0, *pc.normal_rows]
    calm = ~overload
    tokens = base_tokens.astype(np.float64).copy()
    choices: dict = {}
    if calm.any():
        pooled = _fewest_tokens(outcomes, normal_rows, calm, float(base_right[calm].mean()), pc.epsilon)
        tokens[calm] = outcomes[pooled[0]].tokens[calm, pooled[1]]
        choices["normal"] = _describe(outcomes, *pooled)
        keys = np.array([req.key for req in stream])
        per_key = {}
        for key in sorted(set(keys[calm].tolist())):
            mask = calm & (keys == key)
            r, j = _fewest_tokens(outcomes, normal_rows, mask, float(base_right[mask].mean()), pc.epsilon)
            tokens[mask] = np.minimum(tokens[mask], outcomes[r].tokens[mask, j])
            per_key[key] = _describe(outcomes, r, j)
        choices["keys"] = per_key
    if overload.any():
        r, j = _fewest_tokens(outcomes, range(len(outcomes)), overload, float(base_right[overload].mean()),
                              pc.epsilon_overload)
        tokens[overload] = outcomes[r].tokens[overload, j]
        choices["overload"] = _describe(outcomes, r, j)
    base = base_tokens.astype(np.float64)

    def saved_with(uncut: int, start: int) -> float:
        """Savings when the first `uncut` requests run uncut, the next `start` the start strategy, the rest
        the choices above with the control slice uncut."""
        spent = pc.control_fraction * base + (1.0 - pc.control_fraction) * tokens
        spent[:uncut] = base[:uncut]
        spent[uncut: uncut + start] = outcomes[pc.start_row].tokens[uncut: uncut + start, 0]
        return float(1.0 - spent.sum() / base.sum())

    before = len(stream) if label_fraction <= 0 else pc.warmup_requests + math.ceil(pc.min_evidence / label_fraction)
    return {"saved": saved_with(0, 0), "control_fraction": pc.control_fraction,
            "saved_after_first_checkpoint": saved_with(before, label_delay),
            "first_checkpoint": {"uncut_requests": min(before, len(stream)), "start_requests": label_delay},
            **choices}


def static_best(stream: list[_Request], traces: BankTraces, bank: TraceBank, pc: PolicyConfig,
                levels: np.ndarray | None = None, window: int = 1000,
                outcomes: list[_RowOutcome] | None = None) -> dict:
    """The best single fixed threshold in hindsight: on every request of the
    stream (K traces, no control slice), tokens and vote EM at each of a
    fine grid of thresholds (quantiles of all the bank's lowest window means);
    the most saving one with EM >= uncut EM - epsilon. `outcomes`:
    :func:`_row_outcomes`, if already computed (its row 0 is this fine grid)."""
    if outcomes is not None and levels is None:
        per_request, request_tokens, thresholds = outcomes[0].right, outcomes[0].tokens, outcomes[0].thresholds
    else:
        grid = _cut_grid(traces, FINE_LEVELS if levels is None else levels)
        per_request, request_tokens, thresholds = _fixed_outcomes(stream, traces, bank, pc, pc.traces, grid)
    T = len(thresholds)
    right = per_request.sum(axis=0)
    tokens = request_tokens.sum(axis=0).astype(np.float64)
    n = len(stream)
    em = right / n
    ok = np.flatnonzero(em >= em[0] - pc.epsilon)
    best = int(ok[np.argmin(tokens[ok])])
    # the same windows as the report: does the hindsight threshold keep each window inside the budget?
    em_windows = [(float(per_request[lo: lo + window, best].mean()), float(per_request[lo: lo + window, 0].mean()),
                   float(request_tokens[lo: lo + window, best].mean())) for lo in range(0, n, window)]
    return {"threshold": None if best == 0 else float(thresholds[best]), "tokens": float(tokens[best] / n),
            "windows_within_budget": float(np.mean([s >= u - pc.epsilon for s, u, _ in em_windows])),
            "windows": [{"em": s, "em_uncut": u, "tokens": t} for s, u, t in em_windows],
            "em": float(em[best]), "tokens_uncut": float(tokens[0] / n), "em_uncut": float(em[0]),
            "saved": float(1.0 - tokens[best] / tokens[0]),
            "curve": [{"threshold": None if i == 0 else float(thresholds[i]), "tokens": float(tokens[i] / n),
                       "em": float(em[i])} for i in range(0, T, 5)]}


def format_report(report: dict) -> str:
    lines = [f"{'window':>7} {'EM policy':>9} {'EM uncut':>8} {'tok policy':>10} {'tok uncut':>9} {'threshold':>9} "
             f"{'traces':>6} {'control':>7} {'queue':>6} {'overload':>8}"]
    for w in report["windows"]:
        thr = "-" if w["threshold"] is None else f"{w['threshold']:.3f}"
        lines.append(f"{w['start']:>7d} {w['em_policy']:>9.3f} {w['em_uncut']:>8.3f} {w['tokens_policy']:>10.1f} "
                     f"{w['tokens_uncut']:>9.1f} {thr:>9} {w['traces']:>6.1f} {w['control_share']:>7.1%} "
                     f"{w['queue_depth']:>6.0f} {'yes' if w['overload'] else '':>8}")
    o, s, t = report["overall"], report["static_best"], report["targets"]
    lines.append(f"overall: EM policy {o['em_policy']:.3f} vs uncut {o['em_uncut']:.3f}; tokens saved {o['saved']:.1%} "
                 f"({o['saved_outside_overload']:.1%} outside overload)")
    thr = "none" if s["threshold"] is None else f"{s['threshold']:.4f}"
    lines.append(f"static best in hindsight: threshold {thr}, saves {s['saved']:.1%}, EM {s['em']:.3f} "
                 f"(uncut {s['em_uncut']:.3f}); its windows within budget: {s['windows_within_budget']:.0%}")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines.append(f"targets: windows within budget {fmt(t['windows_within_budget'])} (>= 0.95), savings / strategy "
                 f"best {fmt(t['savings_vs_strategy_best'])} (>= 0.9; static best: "
                 f"{fmt(t['savings_vs_static_best'])}), spike token drop {fmt(t['spike_token_drop'])} "
                 f"(>= 0.2), worst spike EM gap {fmt(t['spike_worst_window_gap'])} (<= {report['epsilon_overload']})")
    lines.append(f"the policy's own family, chosen in hindsight with nothing to learn (family_best), would save "
                 f"{report['family_best']['saved']:.1%}: {fmt(t['family_best_vs_strategy_best'])} of strategy best "
                 f"({fmt(t['family_best_after_first_checkpoint_vs_strategy_best'])} after the evidence of the first "
                 f"checkpoint); the policy reached {fmt(t['savings_vs_family_best'])} of it")
    lines.append("met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in t["met"].items()))
    return "\n".join(lines)


def plot_report(report: dict, path: str) -> None:
    """EM and tokens over the stream, with the threshold in force and the load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = report["windows"]
    x = [v["start"] + v["requests"] / 2 for v in w]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    eps = report["epsilon"]
    ax = axes[0]
    ax.plot(x, [v["em_uncut"] for v in w], "o-", color="gray", label="uncut")
    ax.plot(x, [v["em_policy"] for v in w], "o-", color="tab:blue", label="policy")
    ax.plot(x, [v["em"] for v in report["static_best"]["windows"]], "--", color="tab:green",
            label="static best threshold (hindsight)")
    ax.fill_between(x, [v["em_uncut"] - eps for v in w], [v["em_uncut"] for v in w], color="gray", alpha=0.15,
                    label=f"budget (epsilon={eps})")
    ax.set_ylabel("vote EM")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(x, [v["tokens_uncut"] for v in w], "o-", color="gray", label="uncut")
    ax.plot(x, [v["tokens_policy"] for v in w], "o-", color="tab:blue", label="policy")
    ax.plot(x, [v["tokens"] for v in report["static_best"]["windows"]], "--", color="tab:green",
            label="static best threshold (hindsight)")
    ax.set_ylabel("tokens / request")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(x, [np.nan if v["threshold"] is None else v["threshold"] for v in w], "o-", color="tab:purple",
            label="threshold in force (median)")
    ax.set_ylabel("threshold")
    twin = ax.twinx()
    twin.plot(x, [v["queue_depth"] for v in w], color="tab:red", alpha=0.6, label="queue depth")
    twin.set_ylabel("queue depth")
    ax.set_xlabel("request")
    for a in axes:
        for v in w:
            if v["overload"]:
                a.axvspan(v["start"], v["start"] + v["requests"], color="tab:red", alpha=0.08)
        a.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    fig.suptitle("haltwise replay: policy vs uncut (shaded: overload)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def json_payload(report: dict) -> dict:
    """The `--json` document: the fields the issue names first, everything else after."""
    return {
        "epsilon": report["epsilon"],
        "windows": report["windows"],
        "static_best": report["static_best"],
        "strategy_best": report["strategy_best"],
        **{k: v for k, v in report.items() if k not in ("epsilon", "windows", "static_best", "strategy_best")},
    }
