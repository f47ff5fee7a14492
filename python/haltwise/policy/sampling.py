"""Parallel sampling under the policy: the live counterpart of replay.py and
the body of `haltwise bench` run "policy".

Each problem is one policy request (request id ``request_offset + index``):
the policy's plan gives the number of traces and the StopConfig of all of
them (control and warm-up plans run uncut with signals kept; policy plans
with the threshold and strategy in force); the problem's answer is the vote
of the traces that ended on their own, as in haltwise.decoding.parallel
(ties go to the lower trace index, as in the replay). At most ``chunk``
problems are in flight; each is reported to the policy (observe) and
labelled (feedback with the reference) as soon as its traces have ended, so
the policy learns within the run as it would in service. The first problems
are planned before any label exists, so a fresh policy starts them in
warm-up; pass a policy already calibrated (e.g. by :func:`calibrate_from_bank`
on the shipped trace bank) to start certified.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from ..decoding.parallel import EarlyStopSettings, PlannedSampler, ProblemPlan, ProblemResult, RunResult
from ..scheduler import StopConfig
from ..trace_rules import oriented_signal
from ..tracebank import NO_ANSWER, TraceBank
from .policy import Policy
from .types import TraceOutcome


def run_adaptive(sampler: PlannedSampler, problems: Sequence, policy: Policy, *,
                 key: Callable[[Any], str | None] = lambda problem: None, max_new_tokens: int = 256,
                 chunk: int = 64, request_offset: int = 0, label: Callable[[int], bool] = lambda index: True,
                 name: str = "policy (adaptive, certified)",
                 progress: Callable[[int], None] | None = None) -> RunResult:
    """Decodes every problem under the policy's plans on the sampler's one
    parallel decode loop (the plan / done hooks of ParallelSampler.run, or of
    VLLMParallelSampler.run on a vLLM engine): at
    most `chunk` problems in flight; each is planned when it starts (its
    trace count, threshold and strategy: waves, consensus, weighting) and
    observed, then labelled, as soon as its traces have ended, so later
    problems run on what the earlier ones taught. Returns a RunResult like
    ParallelSampler.run (settings.traces is the policy's K; a ProblemResult's
    threshold is its plan's). `label(index)` says which problems get their
    label fed back (default: all)."""
    cfg = policy.config
    settings = EarlyStopSettings(name=name, key="policy", traces=cfg.traces, signal=cfg.signal, window=cfg.window,
                                 max_new_tokens=max_new_tokens)
    base = StopConfig(eos_ids=tuple(sampler.task.eos_ids))

    def plan(p: int) -> ProblemPlan:
        chosen = policy.plan(request_offset + p, key(problems[p]), base=base)
        s = chosen.strategy
        return ProblemPlan(dataclasses.replace(settings, traces=chosen.traces, wave_size=s.wave_size,
                                               consensus=s.consensus, consensus_threshold=s.consensus_threshold,
                                               weighting=s.weighting, warmup=s.warmup, keep_percent=s.keep_percent,
                                               threshold=chosen.stop.low_conf_threshold),
                           stop=chosen.stop)

    def done(p: int, result: ProblemResult) -> None:
        traces = sorted(result.traces, key=lambda t: t.trace)
        outcomes = [TraceOutcome(answer=t.answer, num_tokens=t.num_tokens, reason=int(t.reason),
                                 signal=None if t.signals is None else
                                 oriented_signal(t.signals, cfg.signal, np.float32),
                                 mean_logprob=t.mean_logprob, would_stop_step=t.would_stop_step,
                                 would_stop_reason=t.would_stop_reason) for t in traces]
        served = policy.observe(request_offset + p, outcomes)
        if served != result.answer:  # pragma: no cover - the two votes are the same rule
            raise RuntimeError(f"run_adaptive: the policy counted answer {served} for problem {p}, "
                               f"the run {result.answer}")
        if label(p):
            policy.feedback(request_offset + p, result.correct, reference=int(result.reference))

    return sampler.run(problems, settings, plan=plan, done=done, max_problems=chunk, progress=progress)


def calibrate_from_run(policy: Policy, run: RunResult, problems: Sequence, *,
                       key: Callable[[Any], str | None] = lambda problem: None, request_offset: int = 0) -> int:
    """Feeds an uncut run recorded with ``record_signals`` (bench run `uncut`) to
    the policy as forced control requests with their labels, so the policy
    starts certified. The run's problems should be a random sample of the
    traffic the policy will serve (and, for an honest benchmark, not the
    problems it is then evaluated on). Returns the number of requests fed."""
    cfg = policy.config
    for i, (problem, result) in enumerate(zip(problems, run.problems)):
        if len(result.traces) < cfg.traces:
            raise ValueError(f"calibrate_from_run: problem {i} has {len(result.traces)} traces, the policy runs "
                             f"{cfg.traces}")
        if any(t.signals is None for t in result.traces[: cfg.traces]):
            raise ValueError("calibrate_from_run: the run must record signals (EarlyStopSettings.record_signals)")
        outcomes = [TraceOutcome(answer=t.answer, num_tokens=t.num_tokens, reason=int(t.reason),
                                 signal=oriented_signal(t.signals, cfg.signal, np.float32),
                                 mean_logprob=t.mean_logprob)
                    for t in result.traces[: cfg.traces]]
        _calibrate_one(policy, request_offset + i, key(problem), outcomes, int(result.reference))
    return len(run.problems)


def calibrate_from_bank(policy: Policy, bank: TraceBank, *, key: Callable[[int], str | None] = lambda p: None,
                        request_offset: int = 0) -> int:
    """The same from a trace bank (its first ``traces`` traces per problem);
    `key(p)` names problem p's bucket. Returns the number of requests fed."""
    cfg = policy.config
    if bank.traces_per_problem < cfg.traces:
        raise ValueError(f"calibrate_from_bank: the bank has {bank.traces_per_problem} traces per problem, the "
                         f"policy runs {cfg.traces}")
    for p in range(bank.num_problems):
        outcomes = []
        for k in range(cfg.traces):
            answer = None if bank.answers[p, k] == NO_ANSWER else int(bank.answers[p, k])
            logprob = bank.signal(p, k, "logprob")
            outcomes.append(TraceOutcome(answer=answer, num_tokens=int(bank.lengths[p, k]),
                                         reason=int(bank.reasons[p, k]), signal=bank.signal(p, k, cfg.signal),
                                         mean_logprob=float(logprob.mean()) if logprob.size else math.nan))
        _calibrate_one(policy, request_offset + p, key(p), outcomes, int(bank.references[p]))
    return bank.num_problems


def _calibrate_one(policy: Policy, request_id: int, key, outcomes: list[TraceOutcome], reference: int) -> None:
    """One labelled uncut request, fed as a forced control request."""
    plan = policy.plan(request_id, key, control=True)
    served = policy.observe(request_id, outcomes[: plan.traces])
    policy.feedback(request_id, served is not None and served == reference, reference=reference)
