"""Parallel sampling under the policy: the live counterpart of replay.py and
the body of `haltwise bench` run "(d) adaptive policy".

Each problem is one policy request (request id ``request_offset + index``):
the policy's plan gives the number of traces and the StopConfig of all of
them (control and warm-up plans run uncut with signals kept; policy plans
with the threshold in force); the problem's answer is the vote of the traces
that ended on their own, as in haltwise.decoding.parallel (ties go to the
lower trace index, as in the replay). Problems run in
chunks of ``chunk``: after each chunk the finished problems are reported to
the policy (observe) and labelled (feedback with the reference), so the
policy learns within the run as it would in service. The first chunk is all
planned before any label exists, so a fresh policy starts it in warm-up /
DeepConf start; pass a policy already calibrated (e.g. by
:func:`calibrate_from_run` on run (a)'s traces) to start certified.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from ..decoding.loop import DecodeLoop
from ..decoding.parallel import (VOTING_REASONS, EarlyStopSettings, ParallelSampler, ProblemResult, RunResult,
                                 TraceResult)
from ..scheduler import Finished, Scheduler, StopConfig
from ..stepper import Stepper
from ..tracebank import NO_ANSWER, TraceBank
from .policy import Policy, TraceOutcome


def run_adaptive(sampler: ParallelSampler, problems: Sequence, policy: Policy, *,
                 key: Callable[[Any], str | None] = lambda problem: None, max_new_tokens: int = 256,
                 chunk: int = 64, request_offset: int = 0, label: Callable[[int], bool] = lambda index: True,
                 name: str = "(d) adaptive policy",
                 progress: Callable[[int], None] | None = None) -> RunResult:
    """Decodes every problem under the policy's plans; returns a RunResult
    like ParallelSampler.run (settings.traces is the policy's normal K; a
    ProblemResult's threshold is the plan's). `label(index)` says which
    problems get their label fed back (default: all)."""
    cfg = policy.config
    task = sampler.task
    settings = EarlyStopSettings(name=name, traces=cfg.traces, signal=cfg.signal, window=cfg.window,
                                 max_new_tokens=max_new_tokens)
    K = max(cfg.trace_options)
    scheduler = Scheduler(sampler.capacity, layout="slots")
    stepper = Stepper(scheduler, temperature=sampler.temperature, top_k_conf=sampler.top_k_conf, seed=sampler.seed,
                      backend=sampler.backend)
    loop = DecodeLoop(sampler.runner_factory(sampler.capacity), scheduler, stepper)
    results = [ProblemResult(answer=None, reference=task.reference(p), threshold=None) for p in problems]
    base = StopConfig(eos_ids=tuple(task.eos_ids))
    records: dict[int, list[Finished | None]] = {}
    answers: dict[int, list[int | None]] = {}

    def on_finished(record: Finished) -> None:
        p, k = divmod(record.request_id, K)
        answer = task.answer_of(record.tokens) if record.reason in VOTING_REASONS else None
        records[p][k] = record
        answers[p][k] = answer
        results[p].traces.append(TraceResult.from_record(record, p, k, answer, results[p].reference))
        if progress is not None:
            progress(1)

    for lo in range(0, len(problems), chunk):
        batch = range(lo, min(lo + chunk, len(problems)))
        for p in batch:
            plan = policy.plan(request_offset + p, key(problems[p]), base=base)
            results[p].threshold = plan.threshold
            records[p] = [None] * plan.traces
            answers[p] = [None] * plan.traces
            prompt = task.prompt_ids(problems[p])
            for k in range(plan.traces):  # trace k of problem p: request id p * K + k (noise keyed by it)
                loop.submit(p * K + k, prompt, max_new_tokens=max_new_tokens, group=p, stop=plan.stop)
        loop.run(on_finished)
        for p in batch:
            served = policy.observe(request_offset + p, records[p], answers[p])
            results[p].vote(cfg.weighting)
            if served != results[p].answer:  # pragma: no cover - the two votes are the same rule
                raise RuntimeError(f"run_adaptive: the policy counted answer {served} for problem {p}, "
                                   f"the run {results[p].answer}")
            if label(p):
                policy.feedback(request_offset + p, results[p].correct, reference=int(results[p].reference))
    return RunResult(settings=settings, problems=results, loop=loop.stats)


def calibrate_from_run(policy: Policy, run: RunResult, problems: Sequence, *,
                       key: Callable[[Any], str | None] = lambda problem: None, request_offset: int = 0) -> int:
    """Feeds an uncut run recorded with ``record_signals`` (bench run (a)) to
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
                                 signal=-t.signals["entropy"] if cfg.signal == "neg_entropy" else t.signals[cfg.signal],
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
