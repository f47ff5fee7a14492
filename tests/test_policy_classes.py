"""Request classes: each class has its own accuracy budget and trace count,
its own buckets and its own certification; a class with no budget never cuts."""
from __future__ import annotations

import numpy as np
import pytest

from haltwise.policy import Policy, PolicyConfig, TraceOutcome
from haltwise.scheduler import StopReason

K = 4
BASE = dict(traces=K, warmup_requests=2, evidence_window=300, control_boost=0.5, control_fraction=0.3, grid_size=6,
            evaluate_every=2, raise_interval=1, cooldown=5, window=4, min_new_tokens=2, strategies=(),
            epsilon=0.02, epsilon_overload=0.3)


def _request(rng, fragile: bool, traces: int) -> list[TraceOutcome]:
    """Four traces, reference 7. Trace 0 dips in confidence (any cut removes
    it). In a fragile request traces 0-2 all dip and trace 3 answers 9: a cut
    turns the right vote into a wrong one (a harm)."""
    out = []
    for k in range(traces):
        dip = k == 0 or (fragile and k < 3)
        values = rng.normal(-0.2, 0.02, 12).astype(np.float32)
        if dip:
            values[6:10] = rng.normal(-3.0, 0.5, 4)
        answer = 9 if (fragile and k == 3) else 7
        out.append(TraceOutcome(answer=answer, num_tokens=12, reason=int(StopReason.EOS), signal=values))
    return out


def test_each_class_is_certified_with_its_own_budget():
    cfg = PolicyConfig(**BASE, classes=(("loose", 0.3, None), ("tight", 0.005, None), ("never", 0.0, 2)))
    policy = Policy(cfg)
    rng = np.random.default_rng(0)
    plans: dict[str, list] = {"loose": [], "tight": [], "never": []}
    rid = 0
    for i in range(240):
        for cls in plans:
            plan = policy.plan(rid, "math", request_class=cls)
            plans[cls].append(plan)
            fragile = rng.random() < 0.1  # harm rate of any cut: 0.1 (> tight's 0.005, < loose's 0.3)
            policy.observe(rid, _request(rng, fragile, plan.traces)[: plan.traces])
            policy.feedback(rid, True, reference=7)
            rid += 1
    loose, tight, never = plans["loose"], plans["tight"], plans["never"]
    assert any(p.kind == "policy" and p.threshold is not None for p in loose[-50:]), "loose never cut"
    assert all(p.threshold is None for p in tight), "tight cut: its budget does not allow it"
    assert all(p.threshold is None and p.traces == 2 and p.epsilon == 0.0 for p in never)
    buckets = policy.thresholds()
    assert set(buckets) == {"@loose", "@loose/math", "@tight", "@tight/math"}  # no global bucket, none for "never"
    assert buckets["@loose"]["epsilon"] == 0.3 and buckets["@tight"]["epsilon"] == 0.005


def test_class_arguments_are_checked():
    policy = Policy(PolicyConfig(**BASE))
    with pytest.raises(ValueError, match="request_class must be one of"):
        policy.plan(1, request_class="vip")
    with pytest.raises(ValueError, match="pass request_class= instead"):
        policy.plan(1, "@critical/x")
    with pytest.raises(ValueError, match=r"classes\[0\] epsilon"):
        PolicyConfig(classes=(("x", 1.5, None),))
    with pytest.raises(ValueError, match="distinct names"):
        PolicyConfig(classes=(("x", 0.1, None), ("x", 0.2, None)))
    plan = policy.plan(2, request_class="critical")  # default classes: critical never cuts
    assert plan.threshold is None and plan.traces == K and plan.epsilon == 0.0


def test_a_class_tests_on_its_own_evidence_window(tmp_path):
    """A tighter class needs more labels before its test can certify anything
    (its min_evidence), so its evidence window is at least that
    (PolicyConfig.for_class). Its test must use that window, not the base
    one: with the base window of 30 the class (min_evidence 44) could never
    certify even on traffic no cut can harm; with its own it certifies, and a
    restart rebuilds the same window."""
    cfg = PolicyConfig(**{**BASE, "evidence_window": 30, "epsilon": 0.3}, classes=(("t", 0.1, None),))
    own = cfg.for_class("t")
    assert own.min_evidence > cfg.evidence_window and own.evidence_window == own.min_evidence
    db = tmp_path / "policy.db"
    policy = Policy(cfg, db=db)
    rng = np.random.default_rng(2)
    plans = []
    for rid in range(400):
        plan = policy.plan(rid, request_class="t")
        plans.append(plan)
        policy.observe(rid, _request(rng, False, plan.traces)[: plan.traces])
        policy.feedback(rid, True, reference=7)
    assert any(p.kind == "policy" and p.threshold is not None for p in plans[-50:]), "the class never cut"
    window = policy._window("@t")
    assert len(window) == own.evidence_window
    policy.close()
    again = Policy.open(db)
    assert [e.seq for e in again._window("@t")] == [e.seq for e in window]
    again.close()
