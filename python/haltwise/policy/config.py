"""``PolicyConfig``: every knob of the policy layer, checked at construction,
stored with the policy's database (a restarted policy runs with the config it
was created with). The README's knob table is generated from
:data:`KNOBS` (``python -m haltwise.policy.config``)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional

from ..scheduler import CONF_SIGNALS, check_float, check_int
from .ltt import TESTS, min_evidence
from .strategy import Strategy

_WHERE = "PolicyConfig"


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs of :class:`haltwise.Policy` (see :data:`KNOBS` for one line on each)."""

    # the accuracy budget
    epsilon: float = 0.02
    delta: float = 0.1
    epsilon_overload: float = 0.05
    test: str = "auto"
    unlabeled: str = "skip"
    # what a request runs
    traces: int = 16
    overload_traces: tuple[int, ...] = ()
    fewer_traces: str = "overload"
    signal: str = "logprob"
    window: int = 16
    min_new_tokens: Optional[int] = None
    weighting: str = "majority"
    # (wave_size, consensus, consensus_threshold, weighting) of the consensus strategies certified beside the
    # plain one (K traces at once, no consensus); policy/strategy.py
    strategies: tuple = ((2, "unbeatable", 1.0, "majority"), (2, "beta", 0.9, "majority"),
                         (8, "beta", 0.99, "majority"))
    # the same, certified for overload only (at epsilon_overload; never served in normal operation)
    overload_strategies: tuple = ((2, "beta", 0.8, "majority"),)
    # request classes: (name, epsilon, traces) -- each certified on its own with its own budget; epsilon 0 never
    # cuts (every trace runs to its end); None: the config's epsilon / traces
    classes: tuple = (("critical", 0.0, None), ("standard", None, None), ("bulk", 0.05, None))
    # warm-up, candidates, start
    warmup_requests: int = 8
    keep_percent: float = 90.0
    start: str = "exact"
    grid_size: int = 40
    grid_low: float = 0.01
    grid_high: float = 0.9
    # evidence
    control_fraction: float = 0.05
    control_boost: float = 0.25
    min_evidence: Optional[int] = None
    evidence_window: int = 1000
    evaluate_every: int = 5
    retest_ratio: float = 1.5
    chain_starts: int = 3
    seed: int = 0
    # moves (hysteresis)
    max_raise_steps: int = 4
    raise_interval: int = 50
    cooldown: int = 200
    # load
    slo_queue_depth: Optional[float] = 64.0
    slo_p95_latency_s: Optional[float] = 2.0
    slo_kv_utilization: Optional[float] = None
    exit_fraction: float = 0.7
    enter_after: int = 2
    exit_after: int = 5
    min_dwell: int = 10
    # value
    price_per_1k_tokens: Optional[float] = None
    value_per_correct: Optional[float] = None
    objective: str = "tokens"
    # user-report guard
    guard_z: float = 3.0
    guard_min_requests: int = 50
    # storage
    synchronous: str = "FULL"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("epsilon", check_float(_WHERE, "epsilon", self.epsilon, 0.0, 1.0))
        set_("delta", check_float(_WHERE, "delta", self.delta, 0.0, 1.0))
        if not 0.0 < self.epsilon < 1.0 or not 0.0 < self.delta < 0.5:
            raise ValueError(f"{_WHERE}: need 0 < epsilon < 1 and 0 < delta < 0.5, "
                             f"got epsilon={self.epsilon}, delta={self.delta}")
        set_("epsilon_overload", check_float(_WHERE, "epsilon_overload", self.epsilon_overload, 0.0, 1.0))
        if self.epsilon_overload < self.epsilon:
            raise ValueError(f"{_WHERE}: epsilon_overload must be >= epsilon ({self.epsilon}), "
                             f"got {self.epsilon_overload}")
        _choice("test", self.test, ("auto",) + TESTS)
        _choice("unlabeled", self.unlabeled, ("skip", "worst_case"))
        set_("traces", check_int(_WHERE, "traces", self.traces, 1, 4096))
        if isinstance(self.overload_traces, (str, bytes)) or not hasattr(self.overload_traces, "__iter__"):
            raise TypeError(f"{_WHERE}: overload_traces must be a sequence of ints, "
                            f"got {type(self.overload_traces).__name__}")
        options = tuple(check_int(_WHERE, "overload_traces[]", k, 1, self.traces) for k in self.overload_traces)
        default = {max(1, self.traces * 3 // 4), max(1, self.traces // 2), max(1, self.traces // 4)} - {self.traces}
        fewer = tuple(sorted(set(options) - {self.traces}, reverse=True))
        # () asks for the default options; (traces,) turns them off and stays so when re-validated
        # (from_json, dataclasses.replace)
        set_("overload_traces", fewer or ((self.traces,) if options else tuple(sorted(default, reverse=True))))
        _choice("fewer_traces", self.fewer_traces, ("overload", "always"))
        _choice("signal", self.signal, CONF_SIGNALS)
        set_("window", check_int(_WHERE, "window", self.window, 1))
        set_("min_new_tokens", self.window if self.min_new_tokens is None
             else check_int(_WHERE, "min_new_tokens", self.min_new_tokens, 0))
        _choice("weighting", self.weighting, ("majority", "confidence"))
        set_("strategies", self._strategy_items("strategies", self.strategies))
        set_("overload_strategies", self._strategy_items("overload_strategies", self.overload_strategies))
        if isinstance(self.classes, (str, bytes)) or not hasattr(self.classes, "__iter__"):
            raise TypeError(f"{_WHERE}: classes must be a sequence of (name, epsilon, traces), "
                            f"got {type(self.classes).__name__}")
        classes = []
        for i, item in enumerate(self.classes):
            if isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) != 3:
                raise ValueError(f"{_WHERE}: classes[{i}] must be (name, epsilon, traces), got {item!r}")
            name, eps, k = item
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"{_WHERE}: classes[{i}] name must be a non-empty str without '/', got {name!r}")
            if eps is not None:
                eps = check_float(_WHERE, f"classes[{i}] epsilon", eps, 0.0, 1.0)
                if not eps < 1.0:
                    raise ValueError(f"{_WHERE}: classes[{i}] epsilon must be in [0, 1) or None, got {eps}")
            k = None if k is None else check_int(_WHERE, f"classes[{i}] traces", k, 1, 4096)
            classes.append((name, eps, k))
        if len({c[0] for c in classes}) != len(classes):
            raise ValueError(f"{_WHERE}: classes must have distinct names, got {[c[0] for c in classes]}")
        set_("classes", tuple(classes))
        set_("warmup_requests", check_int(_WHERE, "warmup_requests", self.warmup_requests, 1))
        set_("keep_percent", check_float(_WHERE, "keep_percent", self.keep_percent, 0.0, 100.0))
        if self.keep_percent == 0.0:
            raise ValueError(f"{_WHERE}: keep_percent must be in (0, 100], got 0.0")
        _choice("start", self.start, ("deepconf", "exact", "uncut"))
        set_("grid_size", check_int(_WHERE, "grid_size", self.grid_size, 1, 1000))
        set_("grid_low", check_float(_WHERE, "grid_low", self.grid_low, 0.0, 1.0))
        set_("grid_high", check_float(_WHERE, "grid_high", self.grid_high, 0.0, 1.0))
        if self.grid_low > self.grid_high:
            raise ValueError(f"{_WHERE}: grid_low must be <= grid_high, got {self.grid_low} > {self.grid_high}")
        set_("control_fraction", check_float(_WHERE, "control_fraction", self.control_fraction, 0.0, 1.0))
        set_("control_boost", check_float(_WHERE, "control_boost", self.control_boost, 0.0, 1.0))
        if self.control_boost < self.control_fraction:
            raise ValueError(f"{_WHERE}: control_boost must be >= control_fraction ({self.control_fraction}), "
                             f"got {self.control_boost}")
        set_("chain_starts", check_int(_WHERE, "chain_starts", self.chain_starts, 1, 100))
        set_("retest_ratio", check_float(_WHERE, "retest_ratio", self.retest_ratio, 1.0))
        if self.retest_ratio <= 1.0:
            raise ValueError(f"{_WHERE}: retest_ratio must be > 1, got {self.retest_ratio}")
        if self.min_evidence is None:  # the least n with which a chain's test can certify anything at checkpoint 1
            # (the single chain of another strategy row when there are any, else one of row 0's chains)
            paths = len(self.trace_options) if self.fewer_traces == "always" else 1
            paths += len(self.strategies)
            share = 1.0 / paths
            chains = 1 if paths > 1 else self.chain_starts
            set_("min_evidence", min_evidence(self.epsilon, self.first_level * share / chains, "mcnemar"))
        set_("min_evidence", check_int(_WHERE, "min_evidence", self.min_evidence, 1))
        floor = min_evidence(self.epsilon, self.delta, "binomial")
        if self.min_evidence < floor:
            raise ValueError(f"{_WHERE}: min_evidence must be >= {floor}, the fewest labelled requests with which the "
                             f"test can certify anything at epsilon={self.epsilon}, delta={self.delta}; "
                             f"got {self.min_evidence}")
        set_("evidence_window", check_int(_WHERE, "evidence_window", self.evidence_window, 1))
        if self.evidence_window < self.min_evidence:
            raise ValueError(f"{_WHERE}: evidence_window must be >= min_evidence ({self.min_evidence}), "
                             f"got {self.evidence_window}")
        set_("evaluate_every", check_int(_WHERE, "evaluate_every", self.evaluate_every, 1))
        set_("seed", check_int(_WHERE, "seed", self.seed))
        set_("max_raise_steps", check_int(_WHERE, "max_raise_steps", self.max_raise_steps, 1))
        set_("raise_interval", check_int(_WHERE, "raise_interval", self.raise_interval, 0))
        set_("cooldown", check_int(_WHERE, "cooldown", self.cooldown, 0))
        for name in ("slo_queue_depth", "slo_p95_latency_s", "slo_kv_utilization"):
            if getattr(self, name) is not None:
                value = check_float(_WHERE, name, getattr(self, name), 0.0)
                if value <= 0.0:
                    raise ValueError(f"{_WHERE}: {name} must be > 0 or None, got {value}")
                set_(name, value)
        set_("exit_fraction", check_float(_WHERE, "exit_fraction", self.exit_fraction, 0.0, 1.0))
        if not 0.0 < self.exit_fraction < 1.0:
            raise ValueError(f"{_WHERE}: exit_fraction must be in (0, 1), got {self.exit_fraction}")
        set_("enter_after", check_int(_WHERE, "enter_after", self.enter_after, 1))
        set_("exit_after", check_int(_WHERE, "exit_after", self.exit_after, 1))
        set_("min_dwell", check_int(_WHERE, "min_dwell", self.min_dwell, 0))
        for name in ("price_per_1k_tokens", "value_per_correct"):
            if getattr(self, name) is not None:
                set_(name, check_float(_WHERE, name, getattr(self, name), 0.0))
        _choice("objective", self.objective, ("tokens", "value"))
        if self.objective == "value" and (self.price_per_1k_tokens is None or self.value_per_correct is None):
            raise ValueError(f"{_WHERE}: objective='value' needs price_per_1k_tokens and value_per_correct, "
                             f"got {self.price_per_1k_tokens} and {self.value_per_correct}")
        set_("guard_z", check_float(_WHERE, "guard_z", self.guard_z, 0.0))
        set_("guard_min_requests", check_int(_WHERE, "guard_min_requests", self.guard_min_requests, 1))
        _choice("synchronous", self.synchronous, ("FULL", "NORMAL", "OFF"))

    @property
    def first_level(self) -> float:
        """Test level of the first checkpoint of the re-test schedule (anytime.py)."""
        return self.delta * 6.0 / math.pi ** 2

    def schedule(self):
        """The re-test schedule (anytime.RetestSchedule) this config runs."""
        from .anytime import RetestSchedule

        return RetestSchedule(first=self.min_evidence, ratio=self.retest_ratio, window=self.evidence_window,
                              delta=self.delta)

    def for_class(self, name: str) -> "PolicyConfig | None":
        """The config a request class runs under: its epsilon and trace count
        (the overload budget at least its epsilon; the fewer-trace and
        strategy options rebuilt for its traces; min_evidence recomputed for
        its epsilon, and the evidence window at least that). None for a
        class whose epsilon is 0 (never cut)."""
        for cls_name, eps, traces in self.classes:
            if cls_name == name:
                eps = self.epsilon if eps is None else eps
                traces = self.traces if traces is None else traces
                if eps == 0.0:
                    return None
                own = dataclasses.replace(self, epsilon=eps, epsilon_overload=max(eps, self.epsilon_overload),
                                          traces=traces, min_evidence=None, classes=(),
                                          overload_traces=() if len(self.trace_options) > 1 else (traces,),
                                          evidence_window=2**31)  # the window follows once min_evidence is known
                return dataclasses.replace(own, evidence_window=max(self.evidence_window, own.min_evidence))
        raise ValueError(f"{_WHERE}: unknown request class {name!r}; the classes are "
                         f"{[c[0] for c in self.classes]}")

    def _strategy_items(self, name: str, items) -> tuple:
        """The validated (wave_size, consensus, consensus_threshold, weighting[, warmup, keep_percent]) rows."""
        if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
            raise TypeError(f"{_WHERE}: {name} must be a sequence of (wave_size, consensus, "
                            f"consensus_threshold, weighting), got {type(items).__name__}")
        rows = []
        for i, item in enumerate(items):
            if isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) not in (4, 6):
                raise ValueError(f"{_WHERE}: {name}[{i}] must be (wave_size, consensus, consensus_threshold, "
                                 f"weighting[, warmup, keep_percent]), got {item!r}")
            wave, rule, threshold, weighting, warmup, keep = (*item, 0, 90.0)[:6]
            if rule is None and not warmup:
                raise ValueError(f"{_WHERE}: {name}[{i}] needs a consensus rule or a DeepConf warm-up (the plain "
                                 f"strategy is always there), got neither")
            try:
                Strategy(self.traces, wave, rule, float(threshold), weighting, warmup, float(keep))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{_WHERE}: {name}[{i}]: {err}") from None
            row = (int(wave), None if rule is None else str(rule), float(threshold), str(weighting))
            rows.append(row + ((int(warmup), float(keep)) if warmup else ()))
        return tuple(rows)

    @property
    def strategy_rows(self) -> tuple[Strategy, ...]:
        """The rows a control request is replayed with: all K traces with no
        consensus (row 0), the overload trace options, the consensus
        strategies with K traces, then the overload-only strategies."""
        plain = tuple(Strategy(k, weighting=self.weighting) for k in self.trace_options)
        return plain + tuple(Strategy(self.traces, *row) for row in self.strategies + self.overload_strategies)

    @property
    def overload_only_rows(self) -> range:
        """Strategy rows of overload_strategies: certified and served in overload only."""
        return range(len(self.trace_options) + len(self.strategies), len(self.strategy_rows))

    @property
    def start_row(self) -> int:
        """The strategy row a bucket runs, with no cut, before anything is
        certified: with start="exact" the first "unbeatable" strategy without a
        warm-up and with the config's vote weighting (its vote is the uncut
        vote: the leader could no longer be overturned); 0 (all K traces, as start="uncut") otherwise or when
        strategies holds no such strategy."""
        if self.start != "exact":
            return 0
        rows = self.strategy_rows
        return next((r for r in range(len(self.trace_options), self.overload_only_rows.start)
                     if rows[r].consensus == "unbeatable" and rows[r].same_vote_as(rows[0])), 0)

    @property
    def normal_rows(self) -> tuple[int, ...]:
        """Strategy rows certified for normal operation besides row 0 (each a Bonferroni path)."""
        fewer = range(1, len(self.trace_options)) if self.fewer_traces == "always" else range(0)
        return tuple(fewer) + tuple(range(len(self.trace_options), self.overload_only_rows.start))

    @property
    def trace_options(self) -> tuple[int, ...]:
        """K' values a control request is replayed with: traces first, then the overload options."""
        return (self.traces,) + tuple(k for k in self.overload_traces if k != self.traces)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PolicyConfig":
        data = json.loads(text)
        data["overload_traces"] = tuple(data.get("overload_traces", ()))
        for name in ("strategies", "overload_strategies", "classes"):
            if name in data:
                data[name] = tuple(tuple(row) for row in data[name])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{_WHERE}.from_json: unknown fields {unknown}")
        return cls(**data)

    def differences_from(self, other: "PolicyConfig") -> list[str]:
        """Names of the fields whose values differ."""
        return [f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


def _choice(name: str, value, choices: tuple) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{_WHERE}: {name} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{_WHERE}: {name} must be one of {choices}, got {value!r}")


# (name, default shown, meaning) -- the README table.
KNOBS: list[tuple[str, str]] = [
    ("epsilon", "Accuracy budget: the EM of early-stopped answers may fall at most this much below the EM of "
                "uncut answers."),
    ("delta", "... with confidence 1 - delta over the whole stream: the chance that a candidate over budget is "
              "ever put in force is at most delta (anytime-valid; notes/policy.md)."),
    ("epsilon_overload", "The larger budget spent while the load monitor says overload."),
    ("test", "'binomial' (harms only; right/wrong labels), 'mcnemar' (harms and helps; needs labels with the "
             "reference answer) or 'auto' (mcnemar once labels carry references)."),
    ("unlabeled", "'skip': control requests without a label stay out of the test (labels missing at random); "
                  "'worst_case': they count as harmed wherever the answer changed (valid for any label selection)."),
    ("traces", "Traces sampled per request (K) in normal operation."),
    ("overload_traces", "Fewer-trace options (default 3K/4, K/2, K/4; (traces,) turns them off)."),
    ("fewer_traces", "'overload': the fewer-trace options are certified for overload only; 'always': in normal "
                     "operation too (one more test path each: more labels before the first certificate)."),
    ("signal", "Oriented per-token signal of LOW_CONFIDENCE (logprob, neg_entropy, topk_conf, confidence, margin)."),
    ("window", "Sliding window W of the group confidence."),
    ("min_new_tokens", "No cut before this many tokens (default: window)."),
    ("weighting", "Vote weighting: 'majority' or 'confidence' (exp mean logprob)."),
    ("strategies", "Strategies certified beside the plain one (K traces at once): (wave_size, consensus "
                   "'unbeatable' / 'beta' / 'run' / None, its threshold, weighting[, DeepConf warm-up traces, "
                   "keep_percent]); () certifies thresholds only."),
    ("overload_strategies", "Strategies certified for overload only, at epsilon_overload (never served in normal "
                            "operation), in the form of strategies."),
    ("classes", "Request classes (name, epsilon, traces), each certified on its own with its own budget "
                "(plan(request_class=...)); epsilon 0 never cuts; None: the config's value."),
    ("warmup_requests", "First requests of a new bucket that run uncut and calibrate it."),
    ("keep_percent", "DeepConf start: the threshold keeps this percent of warm-up traces."),
    ("start", "Before a bucket (or an ancestor) is certified: 'exact' (the first 'unbeatable' strategy, no cut: "
              "its vote is the uncut vote, so it loses nothing and saves the traces that could no longer change "
              "it; 'uncut' when there is none), 'uncut' (all traces, no cut) or 'deepconf' (the warm-up percentile, not certified: can lose "
              "more than epsilon)."),
    ("grid_size", "Candidate thresholds per bucket: this many warm-up quantiles plus as many evenly spaced values "
                  "between the first and last."),
    ("grid_low", "Quantile of warm-up lowest window means of the safest candidate."),
    ("grid_high", "Quantile of the most aggressive candidate."),
    ("control_fraction", "Share of requests that run uncut with signals kept (the control slice)."),
    ("control_boost", "Control share while a bucket has fewer than min_evidence labelled control requests."),
    ("min_evidence", "Labelled control requests before a bucket's own test replaces its parent's values (None: the "
                     "least number with which one chain of the test can certify anything at the first checkpoint's level)."),
    ("evidence_window", "The test uses the bucket's most recent this-many control requests."),
    ("evaluate_every", "Re-evaluate a bucket after this many new pieces of evidence (between checkpoints an "
                       "evaluation can only remove candidates)."),
    ("retest_ratio", "Checkpoints of the re-test schedule grow by this factor from min_evidence labels until the "
                     "evidence window is full, then come every evidence_window // 2 labels; checkpoint j tests at "
                     "delta 6 / (pi^2 j^2)."),
    ("chain_starts", "Fixed-sequence chains over the grid (start points 0, G/s, 2G/s, ...; each at delta / s), so "
                     "one unlucky safe candidate cannot block the rest."),
    ("seed", "Keys the control selection hash."),
    ("max_raise_steps", "A threshold rises at most this many grid steps at a time ..."),
    ("raise_interval", "... and at most once per this many requests; lowering is immediate."),
    ("cooldown", "Requests after a lowering during which it may not rise again."),
    ("slo_queue_depth", "Overload when the queue is deeper than this (None: ignore)."),
    ("slo_p95_latency_s", "Overload when the p95 latency exceeds this (None: ignore)."),
    ("slo_kv_utilization", "Overload when the KV-cache utilisation exceeds this (None: ignore)."),
    ("exit_fraction", "Calm when every figure is below exit_fraction x its SLO."),
    ("enter_after", "Consecutive overloaded observations to enter overload."),
    ("exit_after", "Consecutive calm observations to leave it ..."),
    ("min_dwell", "... and no sooner than this many observations after entering."),
    ("price_per_1k_tokens", "Cost of 1k generated tokens, for the value report."),
    ("value_per_correct", "Value of a right answer, for the value report."),
    ("objective", "'tokens' (most saving certified threshold) or 'value' (highest expected value among the "
                  "certified)."),
    ("guard_z", "User-report guard: step back one notch when bad reports on cut answers exceed those on uncut "
                "answers by this z-score."),
    ("guard_min_requests", "Requests per side before the guard may fire."),
    ("synchronous", "SQLite synchronous mode: FULL survives power loss, NORMAL survives process kills."),
]


def knob_table() -> str:
    """The README's markdown table of knobs with their defaults."""
    defaults = PolicyConfig()
    lines = ["| knob | default | meaning |", "| --- | --- | --- |"]
    for name, meaning in KNOBS:
        lines.append(f"| `{name}` | `{getattr(defaults, name)!r}` | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(knob_table())
