"""Hysteresis: overload detection cannot oscillate, and threshold moves are
bounded and rate-limited (down at once, up in bounded steps)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haltwise.policy import Policy, PolicyConfig, TraceOutcome
from haltwise.policy.calibration import trace_profile
from haltwise.policy.load import LoadMonitor
from haltwise.policy.synthetic import synthetic_bank
from haltwise.tracebank import NO_ANSWER


def monitor(**kw) -> LoadMonitor:
    opts = dict(exit_fraction=0.7, enter_after=2, exit_after=3, min_dwell=5)
    opts.update(kw)
    return LoadMonitor({"queue_depth": 100.0, "p95_latency_s": 2.0}, **opts)


def test_enter_after_consecutive_hot_and_leave_after_calm_and_dwell():
    m = monitor()
    assert m.observe(queue_depth=150) == (False, False)  # one hot observation is not enough
    assert m.observe(queue_depth=10) == (False, False)  # the streak is broken
    assert m.observe(queue_depth=150) == (False, False)
    assert m.observe(p95_latency_s=3.0) == (True, True)  # any figure over its SLO counts
    for _ in range(3):  # calm, but min_dwell = 5 observations since entering
        assert m.observe(queue_depth=10, p95_latency_s=0.1) == (True, False)
    assert m.observe(queue_depth=10) == (True, False)
    assert m.observe(queue_depth=10) == (False, True)


def test_hovering_between_the_lines_never_switches():
    m = monitor()
    for _ in range(3):
        m.observe(queue_depth=200)
    assert m.state.overload
    for i in range(200):  # between 0.7 x SLO and the SLO: neutral, forever
        overload, switched = m.observe(queue_depth=80 + (i % 2) * 15)
        assert overload and not switched


@settings(max_examples=200, deadline=None)
@given(figures=st.lists(st.floats(0, 300), min_size=1, max_size=300), enter=st.integers(1, 4),
       exit_=st.integers(1, 4), dwell=st.integers(0, 8))
def test_no_oscillation_switches_are_spaced(figures, enter, exit_, dwell):
    m = monitor(enter_after=enter, exit_after=exit_, min_dwell=dwell)
    switches = [i for i, q in enumerate(figures) if m.observe(queue_depth=q)[1]]
    for a, b in zip(switches, switches[1:]):
        # after entering: at least max(dwell, exit) observations; after leaving: at least `enter`
        assert b - a >= (max(dwell, exit_) if switches.index(a) % 2 == 0 else enter)


def test_bad_figures_are_refused_naming_them():
    m = monitor()
    with pytest.raises(ValueError, match="queue_depth must be a finite number >= 0 or None, got -1"):
        m.observe(queue_depth=-1)
    with pytest.raises(ValueError, match="figures must be among"):
        m.observe(qps=3)


# ---- the EM loop's ramp ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bank():
    return synthetic_bank(60, 16, seed=5)


def drive(policy: Policy, bank, requests: int, *, start: int = 0, seed: int = 0, load=None) -> None:
    """Plays `requests` requests of the bank through the policy with immediate labels."""
    rng = np.random.default_rng(seed)
    for rid in range(start, start + requests):
        if load is not None:
            policy.observe_load(queue_depth=load(rid))
        p = int(rng.integers(bank.num_problems))
        plan = policy.plan(rid, None)
        outcomes = []
        for k in rng.choice(bank.traces_per_problem, plan.traces, replace=False):
            v = bank.signal(p, k, "logprob")
            answer = None if bank.answers[p, k] == NO_ANSWER else int(bank.answers[p, k])
            reason = int(bank.reasons[p, k])
            if plan.control:
                outcomes.append(TraceOutcome(answer, len(v), reason, signal=v))
                continue
            prof = trace_profile(v, reason=reason, answer=answer, window=16, min_new_tokens=16)
            cut = None if plan.threshold is None else prof.cut_length(plan.threshold)
            outcomes.append(TraceOutcome(answer, len(v), reason) if cut is None else
                            TraceOutcome(None, cut, 4))
        served = policy.observe(rid, outcomes)
        reference = int(bank.references[p])
        policy.feedback(rid, served == reference, reference=reference)


FAST = dict(epsilon=0.1, epsilon_overload=0.2, delta=0.1, traces=8, warmup_requests=2, min_evidence=40,
            evidence_window=300,
            control_boost=0.5, control_fraction=0.2, grid_size=20, evaluate_every=2, max_raise_steps=2,
            raise_interval=15, cooldown=40, slo_queue_depth=50.0, slo_p95_latency_s=None, enter_after=2,
            exit_after=2, min_dwell=3)


def test_raises_are_bounded_and_rate_limited_lowering_is_immediate(bank):
    config = PolicyConfig(**FAST)
    policy = Policy(config)
    drive(policy, bank, 700)
    raises = [a for a in policy.audit() if a["field"] == "threshold" and a["reason"].startswith("raise")]
    assert raises, "the policy never raised a threshold: the test would prove nothing"
    for a in raises:
        old, new = a["evidence"]["index"]
        assert new > old
        # at most max_raise_steps, unless no certified candidate lay that close (then the next certified one)
        assert new - old <= config.max_raise_steps or a["evidence"]["jump"]
    seqs = [a["seq"] for a in raises]
    assert all(b - a >= config.raise_interval for a, b in zip(seqs, seqs[1:]))
    lowers = [a for a in policy.audit() if a["field"] == "threshold" and a["reason"].startswith("lowered")]
    for a in lowers:  # a lowering starts a cooldown: no raise within `cooldown` requests
        assert not [s for s in seqs if a["seq"] < s < a["seq"] + config.cooldown]


def test_overload_switches_traces_and_returns_to_normal(bank):
    policy = Policy(PolicyConfig(**FAST))
    drive(policy, bank, 500)
    assert policy.thresholds()[""]["ready"]
    spike = lambda rid: 200.0 if 500 <= rid < 560 else 5.0  # noqa: E731
    plans = []
    rng = np.random.default_rng(9)
    for rid in range(500, 640):
        policy.observe_load(queue_depth=spike(rid))
        plan = policy.plan(rid, None)
        plans.append(plan)
        p = int(rng.integers(bank.num_problems))
        outs = [TraceOutcome(int(bank.answers[p, k]) if bank.answers[p, k] != NO_ANSWER else None,
                             int(bank.lengths[p, k]), int(bank.reasons[p, k]),
                             signal=bank.signal(p, k, "logprob") if plan.control else None)
                for k in range(plan.traces)]
        policy.observe(rid, outs)
    overloaded = [p for p in plans if p.overload]
    assert overloaded and not plans[0].overload and not plans[-1].overload
    switches = [a for a in policy.audit() if a["field"] == "overload"]
    assert [a["new"] for a in switches] == [True, False]  # one episode, no flapping
    state = policy.thresholds()[""]
    assert state["overload_traces"] is not None, "no overload candidate was certified: the test proves nothing"
    served = [p for p in overloaded if p.kind == "policy"]
    assert served and all(p.epsilon == FAST["epsilon_overload"] and p.traces == state["overload_traces"]
                          for p in served)
    assert all(p.epsilon == FAST["epsilon"] and p.traces == 8 for p in plans[-20:] if p.kind == "policy")
