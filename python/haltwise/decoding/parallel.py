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
from ..voting import vote_settled, warmup_threshold, weighted_vote
from .loop import DecodeLoop, LoopStats
from .runners import Runner

# Traces whose answer counts: they ended on their own, not cut or dropped.
VOTING_REASONS = frozenset({StopReason.EOS, StopReason.STOP_SEQUENCE, StopReason.MAX_TOKENS, StopReason.CONFIDENT})


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
        LOW_CONFIDENCE threshold (0: no cut);
    keep_percent: the threshold is the (100 - keep_percent)-th percentile of
        their lowest window means (DeepConf: 90 keeps most traces, 10 only the best);
    signal, window: the per-token signal and window of the group confidence;
    wave_size: the traces after warm-up are admitted this many at a time
        (0: all at once), so a settled vote drops the rest unsampled;
    consensus: None, "unbeatable" (the scheduler's rule: the leader cannot be
        overturned), "beta" (Adaptive-Consistency, P(leader is the mode) >=
        consensus_threshold) or "run" (the first consensus_threshold answers agree);
    weighting: "majority" or "confidence" (weight = exp(mean logprob) of the trace).
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

    def __post_init__(self):
        if self.traces < 1:
            raise ValueError(f"EarlyStopSettings: traces must be >= 1, got {self.traces}")
        if not 0 <= self.warmup < self.traces:
            raise ValueError(f"EarlyStopSettings: warmup must be in [0, traces), got {self.warmup}")
        if self.consensus not in (None, "unbeatable", "beta", "run"):
            raise ValueError(f"EarlyStopSettings: consensus must be None, 'unbeatable', 'beta' or 'run', "
                             f"got {self.consensus!r}")
        if self.weighting not in ("majority", "confidence"):
            raise ValueError(f"EarlyStopSettings: weighting must be 'majority' or 'confidence', got {self.weighting!r}")


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

    @classmethod
    def from_record(cls, record: Finished, problem: int, trace: int, answer: int | None,
                    reference: int) -> "TraceResult":
        """A finished trace (trace `trace` of `problem`) with its extracted answer."""
        return cls(problem=problem, trace=trace, reason=StopReason(record.reason), num_tokens=record.num_tokens,
                   answer=answer, correct=answer is not None and answer == reference,
                   min_window_mean=record.min_window_mean, mean_logprob=record.mean_logprob,
                   signals=record.signals)

    @property
    def votes(self) -> bool:
        return self.reason in VOTING_REASONS

    @property
    def weight(self) -> float:
        return math.exp(self.mean_logprob) if not math.isnan(self.mean_logprob) else 0.0


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
        weights = [t.weight for t in voters] if weighting == "confidence" else None
        self.answer = weighted_vote([t.answer for t in voters], weights)
        return self.answer


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
            progress: Callable[[int], object] | None = None) -> RunResult:
        """Decode every problem's traces; `progress(n)` is called as traces end."""
        K = settings.traces
        scheduler = Scheduler(self.capacity, layout="slots", wave_size=settings.wave_size)
        stepper = (stepper_factory(scheduler) if stepper_factory is not None else
                   Stepper(scheduler, temperature=self.temperature, top_k_conf=self.top_k_conf, seed=self.seed,
                           backend=self.backend))
        loop = DecodeLoop(self.runner_factory(self.capacity), scheduler, stepper)
        results = [ProblemResult(answer=None, reference=self.task.reference(p), threshold=None) for p in problems]
        prompts = [self.task.prompt_ids(p) for p in problems]
        warmup_left = [settings.warmup] * len(problems)
        settled = [False] * len(problems)
        base = StopConfig(eos_ids=tuple(self.task.eos_ids), low_conf_signal=settings.signal, window=settings.window,
                          min_new_tokens=settings.window, record_signals=settings.record_signals)

        def submit(p: int, traces: range, threshold: float | None) -> None:
            stop = dataclasses.replace(base, low_conf_threshold=threshold)
            for k in traces:
                loop.submit(p * K + k, prompts[p], max_new_tokens=settings.max_new_tokens, group=p, stop=stop)

        def on_finished(record: Finished) -> None:
            p, k = divmod(record.request_id, K)
            answer = self.task.answer_of(record.tokens) if record.reason in VOTING_REASONS else None
            trace = TraceResult.from_record(record, p, k, answer, results[p].reference)
            results[p].traces.append(trace)
            if progress is not None:
                progress(1)
            if settings.consensus is not None and answer is not None:
                weight = trace.weight if settings.weighting == "confidence" else None
                scheduler.report_answer(record.request_id, answer, weight)
            if settings.warmup and k < settings.warmup:
                warmup_left[p] -= 1
                if warmup_left[p] == 0:  # warm-up done: this problem's threshold, then its other traces
                    lows = [t.min_window_mean for t in results[p].traces if t.trace < settings.warmup]
                    usable = [v for v in lows if not math.isnan(v)]
                    results[p].threshold = warmup_threshold(usable, settings.keep_percent) if usable else None
                    submit(p, range(settings.warmup, K), results[p].threshold)
            self._maybe_settle(p, results[p], settings, scheduler, settled, remaining=K - len(results[p].traces))

        for p in range(len(problems)):
            submit(p, range(settings.warmup or K), None)
        loop.run(on_finished)

        for problem in results:
            problem.vote(settings.weighting)
        return RunResult(settings=settings, problems=results, loop=loop.stats)

    @staticmethod
    def _maybe_settle(p: int, problem: ProblemResult, settings: EarlyStopSettings, scheduler: Scheduler,
                      settled: list[bool], remaining: int) -> None:
        """Caller-side consensus rules ("beta", "run"); "unbeatable" is the scheduler's own."""
        if settled[p] or settings.consensus not in ("beta", "run") or remaining == 0:
            return
        answers = [t.answer for t in sorted(problem.traces, key=lambda t: t.trace) if t.votes]
        if vote_settled(answers, rule=settings.consensus, threshold=settings.consensus_threshold,
                        remaining=remaining):
            settled[p] = True
            scheduler.settle_group(p)
