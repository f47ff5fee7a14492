"""Parallel sampling with early stopping: K traces per problem share a group;
DeepConf-style warm-up thresholds cut hopeless traces (LOW_CONFIDENCE); waves
and consensus rules drop the traces a settled vote no longer needs
(GROUP_CONSENSUS); the problem's answer is the vote over the traces that
finished naturally (cut traces never vote).

Request ids are ``problem_index * traces + trace_index``, and a token's noise
is keyed by (request, position), so two runs with the same seed sample the
same traces: a cut trace is a prefix of its uncut twin.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from ..scheduler import Finished, Scheduler, StopConfig, StopReason
from ..stepper import Stepper
from ..tasks.adapters import TokenIds
from ..trace_rules import VOTING_REASONS, lowest_group_confidence, vote_weight
from ..voting import weighted_vote
from .loop import DecodeLoop, LoopStats
from .runners import Runner
from .waves import TraceWaves

# The Finished field holding a trace's whole mean of a signal (a trace shorter than the window has no window mean).
_MEAN_FIELDS = {"topk_conf": "mean_topk_conf", "logprob": "mean_logprob", "neg_entropy": "mean_neg_entropy"}




class Task(Protocol):
    """What parallel sampling needs to know about problems."""

    eos_ids: tuple[int, ...]

    def prompt_ids(self, problem) -> list[int]: ...

    def answer_of(self, token_ids: TokenIds) -> int | None: ...

    def reference(self, problem) -> int: ...


@dataclass(frozen=True)
class EarlyStopSettings:
    """One way of running a problem's K traces.

    warmup: traces per problem that run uncut and set the problem's
        LOW_CONFIDENCE threshold (0: none; see `threshold`);
    keep_percent: the threshold is the (100 - keep_percent)-th percentile of
        their lowest window means (DeepConf: 90 keeps most traces, 10 only the best);
    signal, window: the per-token signal and window of the group confidence;
    wave_size: the traces after warm-up start this many at a time, the next
        wave once the last has ended (0: all at once), so a settled vote
        drops the rest unsampled;
    consensus: None, "unbeatable" (the leader cannot be overturned; checked
        after every trace), "beta" (Adaptive-Consistency, P(leader is the
        mode) >= consensus_threshold) or "run" (the first consensus_threshold
        answers agree), both checked at wave boundaries (decoding/waves.py);
    weighting: "majority" or "confidence" (weight = exp(mean logprob) of the trace);
    vote: "natural" (every trace that ended on its own votes, weighted by
        `weighting`) or "deepconf" (DeepConf online, as its reference code
        does it: a trace's lowest group confidence is its lowest window mean
        of `signal`, or its whole mean when it is shorter than the window;
        the warm-up percentile is taken over those values; a trace that
        ended on its own votes only if that value is >= the problem's
        threshold, weighted by it; `weighting` is ignored).
    """

    name: str = "uncut"
    traces: int = 16
    warmup: int = 0
    keep_percent: float = 90.0
    signal: str = "logprob"
    window: int = 16
    wave_size: int = 0
    consensus: str | None = None
    consensus_threshold: float = 0.95
    weighting: str = "majority"
    max_new_tokens: int = 256
    record_signals: bool = False
    vote: str = "natural"
    key: str = ""  # a stable name for reports (bench JSON "key")
    threshold: float | None = None  # a fixed LOW_CONFIDENCE threshold for every trace (no warm-up)

    def __post_init__(self):
        if self.traces < 1:
            raise ValueError(f"EarlyStopSettings: traces must be >= 1, got {self.traces}")
        if not 0 <= self.warmup < self.traces:
            raise ValueError(f"EarlyStopSettings: warmup must be in [0, traces), got {self.warmup}")
        if self.consensus not in (None, "unbeatable", "beta", "run"):
            raise ValueError(f"EarlyStopSettings: consensus must be None, 'unbeatable', 'beta' or 'run', "
                             f"got {self.consensus!r}")
        if self.threshold is not None and self.warmup:
            raise ValueError(f"EarlyStopSettings: a fixed threshold ({self.threshold}) and a warm-up threshold "
                             f"(warmup={self.warmup}) exclude each other")
        if self.weighting not in ("majority", "confidence"):
            raise ValueError(f"EarlyStopSettings: weighting must be 'majority' or 'confidence', got {self.weighting!r}")
        if self.vote not in ("natural", "deepconf"):
            raise ValueError(f"EarlyStopSettings: vote must be 'natural' or 'deepconf', got {self.vote!r}")
        if self.vote == "deepconf" and self.signal not in _MEAN_FIELDS:
            raise ValueError(f"EarlyStopSettings: vote='deepconf' needs a signal with a whole-trace mean "
                             f"{tuple(_MEAN_FIELDS)}, got {self.signal!r}")


@dataclass
class TraceResult:
    problem: int
    trace: int
    reason: StopReason
    num_tokens: int
    answer: int | None
    correct: bool
    min_window_mean: float
    mean_logprob: float
    signals: dict | None = None
    lowest_conf: float = math.nan  # lowest_group_confidence of the run's signal
    eligible: bool = True  # vote="deepconf": lowest_conf >= the problem's threshold
    would_stop_step: int = -1  # shadow mode (StopConfig.shadow): where the cut would have fired
    would_stop_reason: int | None = None

    @classmethod
    def from_record(cls, record: Finished, problem: int, trace: int, answer: int | None,
                    reference: int) -> "TraceResult":
        """A finished trace (trace `trace` of `problem`) with its extracted answer."""
        return cls(problem=problem, trace=trace, reason=StopReason(record.reason), num_tokens=record.num_tokens,
                   answer=answer, correct=answer is not None and answer == reference,
                   min_window_mean=record.min_window_mean, mean_logprob=record.mean_logprob,
                   signals=record.signals, would_stop_step=int(record.would_stop_step),
                   would_stop_reason=None if record.would_stop_reason is None else int(record.would_stop_reason))

    @classmethod
    def dropped(cls, problem: int, trace: int, reference: int) -> "TraceResult":
        """A trace never started because its problem's vote settled first."""
        return cls(problem=problem, trace=trace, reason=StopReason.GROUP_CONSENSUS, num_tokens=0, answer=None,
                   correct=False, min_window_mean=math.nan, mean_logprob=math.nan)

    @property
    def votes(self) -> bool:
        return self.reason in VOTING_REASONS and self.eligible

    @property
    def weight(self) -> float:
        return vote_weight(self.mean_logprob)


@dataclass
class ProblemResult:
    answer: int | None
    reference: int
    threshold: float | None
    traces: list[TraceResult] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        return self.answer is not None and self.answer == self.reference

    def vote(self, weighting: str) -> int | None:
        """Sets and returns the answer: the vote of the traces that ended on
        their own, in trace order (ties go to the lower trace, as in replay)."""
        self.traces.sort(key=lambda t: t.trace)
        voters = [t for t in self.traces if t.votes]
        if weighting == "deepconf":
            weights = [0.0 if math.isnan(t.lowest_conf) else t.lowest_conf for t in voters]
        else:
            weights = [t.weight for t in voters] if weighting == "confidence" else None
        self.answer = weighted_vote([t.answer for t in voters], weights)
        return self.answer

    def end_trace(self, waves: TraceWaves, settings: EarlyStopSettings, trace: TraceResult) -> bool:
        """Tells `waves` that `trace` (already in self.traces) has ended, with
        the votes so far. True when that settles the vote: the traces never
        started are then recorded (TraceResult.dropped) and the caller ends
        those in flight (GROUP_CONSENSUS)."""
        ended = sorted(self.traces, key=lambda t: t.trace)
        voters = [t if t.votes else None for t in ended]
        lows = [t.lowest_conf if settings.vote == "deepconf" else t.min_window_mean
                for t in ended if t.trace < settings.warmup]
        settled = waves.end(trace.trace, [t.answer if t else None for t in voters],
                            [t.weight if (t and settings.weighting == "confidence") else 1.0 for t in voters], lows)
        if settled:
            self.traces.extend(TraceResult.dropped(trace.problem, j, self.reference) for j in waves.dropped)
        self.threshold = waves.threshold
        return settled

    def count_votes(self, settings: EarlyStopSettings) -> int | None:
        """The vote once every trace has ended: vote="deepconf" first keeps
        the traces whose lowest group confidence reaches the threshold."""
        if settings.vote == "deepconf" and self.threshold is not None:
            for t in self.traces:
                t.eligible = not t.lowest_conf < self.threshold  # NaN (no token) stays eligible
        return self.vote("deepconf" if settings.vote == "deepconf" else settings.weighting)


@dataclass
class RunResult:
    settings: EarlyStopSettings
    problems: list[ProblemResult]
    loop: LoopStats

    @property
    def tokens(self) -> int:
        """Generated tokens over all traces (prompts excluded)."""
        return sum(t.num_tokens for p in self.problems for t in p.traces)

    @property
    def em(self) -> float:
        """Exact match of the voted answers."""
        return float(np.mean([p.correct for p in self.problems]))

    @property
    def em_single(self) -> float:
        """Exact match of single traces, over the traces that voted."""
        voting = [t.correct for p in self.problems for t in p.traces if t.votes]
        return float(np.mean(voting)) if voting else float("nan")

    def correct_vector(self) -> np.ndarray:
        return np.array([p.correct for p in self.problems], dtype=np.float64)


@dataclass(frozen=True)
class ProblemPlan:
    """How one problem runs (ParallelSampler.run's per-problem hook):
    settings: its EarlyStopSettings (traces at most the run's);
    stop: the StopConfig of its traces (its low_conf_threshold is replaced by
        the plan's threshold of each trace); None: built from settings."""

    settings: EarlyStopSettings
    stop: StopConfig | None = None


class PlannedSampler(Protocol):
    """A parallel-sampling driver with per-problem plan / done hooks
    (ParallelSampler here, VLLMParallelSampler on vLLM): what the adaptive
    policy runs on (policy.sampling.run_adaptive)."""

    task: Task

    def run(self, problems: Sequence, settings: EarlyStopSettings, *,
            progress: Callable[[int], object] | None = None,
            plan: Callable[[int], ProblemPlan] | None = None,
            done: Callable[[int, ProblemResult], object] | None = None,
            max_problems: int | None = None) -> RunResult: ...


class ProblemFeed:
    """The problems of one run (both drivers): started in order, at most
    `max_problems` in flight (None: all), the next begun when one finishes;
    a finished problem's vote is counted and reported (`done`).
    begin(p) plans and submits problem p and records its settings in
    `settings_of`."""

    def __init__(self, results: list[ProblemResult], settings_of: dict[int, EarlyStopSettings],
                 begin: Callable[[int], None], done: Callable[[int, ProblemResult], object] | None,
                 max_problems: int | None, where: str):
        self.limit = len(results) if max_problems is None else max_problems
        if self.limit < 1:
            raise ValueError(f"{where}: max_problems must be >= 1 or None, got {max_problems}")
        self.results, self.settings_of, self.begin, self.done, self.where = results, settings_of, begin, done, where
        self.next = 0

    def _begin_next(self) -> None:
        self.next += 1
        self.begin(self.next - 1)

    def start(self) -> None:
        while self.next < min(self.limit, len(self.results)):
            self._begin_next()

    def finish(self, p: int) -> None:
        """Problem p's traces have all ended."""
        self.results[p].count_votes(self.settings_of[p])
        if self.done is not None:
            self.done(p, self.results[p])
        if self.next < len(self.results):
            self._begin_next()

    def check_complete(self) -> None:
        """Every problem began and ended each of its traces once."""
        missing = [p for p, r in enumerate(self.results)
                   if p not in self.settings_of or len(r.traces) != self.settings_of[p].traces]
        if missing:  # every trace ends once (scheduler / engine contract); a broken driver lands here
            raise RuntimeError(f"{self.where}: problems {missing[:5]} did not end all their traces")


def default_stop(settings: EarlyStopSettings, eos_ids: Sequence[int]) -> StopConfig:
    """The StopConfig of a problem's traces when its plan gives none (its
    low_conf_threshold is set per trace: TraceWaves.threshold_of)."""
    return StopConfig(eos_ids=tuple(eos_ids), low_conf_signal=settings.signal, window=settings.window,
                      min_new_tokens=settings.window, record_signals=settings.record_signals)


def check_plan(chosen: ProblemPlan, problem: int, traces: int, where: str) -> None:
    """A plan may not run more traces than the run's K: trace k of problem p
    is request p * K + k whatever the plan."""
    if chosen.settings.traces > traces:
        raise ValueError(f"{where}: plan({problem}) runs {chosen.settings.traces} traces, more than "
                         f"settings.traces={traces}")


class ParallelSampler:
    """Runs K traces per problem through one DecodeLoop under EarlyStopSettings."""

    def __init__(self, runner_factory: Callable[[int], Runner], task: Task, *, capacity: int = 256,
                 temperature: float = 1.0, seed: int = 0, top_k_conf: int = 20, backend: str = "auto"):
        self.runner_factory = runner_factory
        self.task = task
        self.capacity = capacity
        self.temperature = temperature
        self.seed = seed
        self.top_k_conf = top_k_conf
        self.backend = backend

    def run(self, problems: Sequence, settings: EarlyStopSettings, *,
            stepper_factory: Callable[[Scheduler], Stepper] | None = None,
            progress: Callable[[int], object] | None = None,
            plan: Callable[[int], ProblemPlan] | None = None,
            done: Callable[[int, ProblemResult], object] | None = None,
            max_problems: int | None = None) -> RunResult:
        """Decode every problem's traces; `progress(n)` is called as traces end.

        plan(p): the problem's own plan, asked when it starts (default: every
            problem runs `settings`); its traces must not exceed settings.traces
            (trace k of problem p is request p * settings.traces + k, so a
            trace's tokens do not depend on the plan);
        done(p, result): called once a problem's traces have all ended and its
            vote is counted (a policy observes and labels it there);
        max_problems: problems in flight at once (None: all); the next one
            starts, and is planned, when one is done.
        """
        K = settings.traces
        scheduler = Scheduler(self.capacity, layout="slots")
        stepper = (stepper_factory(scheduler) if stepper_factory is not None else
                   Stepper(scheduler, temperature=self.temperature, top_k_conf=self.top_k_conf, seed=self.seed,
                           backend=self.backend))
        loop = DecodeLoop(self.runner_factory(self.capacity), scheduler, stepper)
        results = [ProblemResult(answer=None, reference=self.task.reference(p), threshold=None) for p in problems]
        # by problem, from when it begins
        waves: dict[int, TraceWaves] = {}
        settings_of: dict[int, EarlyStopSettings] = {}
        stops: dict[int, StopConfig] = {}

        def submit(p: int) -> None:
            prompt = self.task.prompt_ids(problems[p])
            for k in waves[p].start():
                trace_stop = dataclasses.replace(stops[p], low_conf_threshold=waves[p].threshold_of(k))
                loop.submit(p * K + k, prompt, max_new_tokens=settings_of[p].max_new_tokens, group=p, stop=trace_stop)

        def begin(p: int) -> None:
            chosen = plan(p) if plan is not None else ProblemPlan(settings)
            check_plan(chosen, p, K, "ParallelSampler.run")
            s = chosen.settings
            stops[p] = chosen.stop if chosen.stop is not None else default_stop(s, self.task.eos_ids)
            settings_of[p] = s
            waves[p] = TraceWaves(s)
            results[p].threshold = waves[p].threshold
            submit(p)

        def on_finished(record: Finished) -> None:
            p, k = divmod(record.request_id, K)
            s = settings_of[p]
            answer = self.task.answer_of(record.tokens) if record.reason in VOTING_REASONS else None
            trace = TraceResult.from_record(record, p, k, answer, results[p].reference)
            if s.vote == "deepconf":
                trace.lowest_conf = lowest_group_confidence(record.min_window_mean,
                                                            getattr(record, _MEAN_FIELDS[s.signal]))
            results[p].traces.append(trace)
            if progress is not None:
                progress(1)
            if results[p].end_trace(waves[p], s, trace):
                scheduler.settle_group(p)  # in-flight siblings end at their next row (GROUP_CONSENSUS)
            submit(p)
            if len(results[p].traces) == s.traces:
                feed.finish(p)

        feed = ProblemFeed(results, settings_of, begin, done, max_problems, "ParallelSampler.run")
        feed.start()
        loop.run(on_finished)
        feed.check_complete()
        return RunResult(settings=settings, problems=results, loop=loop.stats)
