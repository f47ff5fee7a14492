"""Context buckets: keys, the fallback rule (own certified -> nearest ready
ancestor -> own DeepConf start -> uncut), warm-up per bucket, and evidence
that counts for every bucket on a request's path."""
from __future__ import annotations

import numpy as np
import pytest

from haltwise.policy import Policy, PolicyConfig
from haltwise.policy.buckets import BucketState, normalize_key, path_of, resolve
from haltwise.policy.replay import BankTraces, run_plan
from haltwise.policy.synthetic import synthetic_bank


def test_keys_and_paths():
    assert normalize_key(None) == () and normalize_key("") == ()
    assert normalize_key("arith/terms=3") == ("arith", "terms=3") == normalize_key(["arith", "terms=3"])
    assert path_of(("arith", "terms=3")) == ["", "arith", "arith/terms=3"]
    with pytest.raises(ValueError, match="key parts must be non-empty and free of '/'"):
        normalize_key(("a", "b/c"))
    with pytest.raises(ValueError, match="key parts must be non-empty"):
        normalize_key("a//b")
    with pytest.raises(TypeError, match="key parts must be str, got int"):
        normalize_key(("a", 3))


def test_resolve_rule_on_states():
    root, mid, leaf = BucketState(""), BucketState("a"), BucketState("a/x")
    assert resolve([root, mid, leaf]) == (None, "uncut")
    mid.grid = [0.0]
    assert resolve([root, mid, leaf]) == (mid, "deepconf")  # nothing ready: deepest frozen bucket's start
    leaf.grid = [0.0]
    assert resolve([root, mid, leaf]) == (leaf, "deepconf")
    root.ready = True
    assert resolve([root, mid, leaf]) == (root, "certified")  # a ready ancestor beats an uncertified start
    mid.ready = True
    assert resolve([root, mid, leaf]) == (mid, "certified")  # the nearest ready ancestor
    leaf.ready = True
    assert resolve([root, mid, leaf]) == (leaf, "certified")


CONFIG = PolicyConfig(epsilon=0.1, epsilon_overload=0.2, traces=8, warmup_requests=2, min_evidence=40,
                      evidence_window=300, control_boost=0.5, control_fraction=0.2, grid_size=20, evaluate_every=2,
                      raise_interval=5)


@pytest.fixture(scope="module")
def traces():
    return BankTraces(synthetic_bank(60, 16, seed=2), CONFIG)


def play(policy, traces, rid, key, rng):
    bank = traces.bank
    p = int(rng.integers(bank.num_problems))
    plan = policy.plan(rid, key)
    outcomes, _ = run_plan(plan, traces, p, rng.permutation(bank.traces_per_problem))
    served = policy.observe(rid, outcomes)
    policy.feedback(rid, served == bank.references[p], reference=int(bank.references[p]))
    return plan


def test_fallback_from_warmup_to_parent_to_own(traces):
    policy = Policy(CONFIG)
    rng = np.random.default_rng(0)
    rid = 0
    # the very first requests warm up the root and the busy child
    first = [play(policy, traces, rid + i, "busy", rng) for i in range(2)]
    rid += 2
    assert [p.kind for p in first] == ["warmup", "warmup"]
    # after warm-up, nothing is ready: the child's own DeepConf start applies
    plan = play(policy, traces, rid, "busy", rng)
    rid += 1
    assert (plan.how, plan.source) == ("deepconf", "busy")
    while not policy.thresholds()["busy"]["ready"]:
        play(policy, traces, rid, "busy", rng)
        rid += 1
        assert rid < 2000, "the busy bucket never became ready"
    assert policy.thresholds()[""]["ready"]  # the root took the same evidence
    # a new sibling: its first requests warm it up, then it runs with the nearest ready ancestor's values
    new = [play(policy, traces, rid + i, "rare", rng) for i in range(2)]
    rid += 2
    assert [p.kind for p in new] == ["warmup", "warmup"]
    served = []
    for _ in range(30):
        plan = play(policy, traces, rid, "rare", rng)
        rid += 1
        if plan.kind == "policy":
            served.append(plan)
    assert served and all(p.how == "certified" and p.source == "" for p in served)
    root_threshold = policy.thresholds()[""]["threshold"]
    assert served[-1].threshold == root_threshold
    # once the sibling holds min_evidence labelled control requests, its own test decides
    while not policy.thresholds()["rare"]["ready"]:
        play(policy, traces, rid, "rare", rng)
        rid += 1
        assert rid < 4000, "the rare bucket never became ready"
    plans = [play(policy, traces, rid + i, "rare", rng) for i in range(30)]
    own = [p for p in plans if p.kind == "policy"]
    assert own and all(p.how == "certified" and p.source == "rare" for p in own)
    ready_audit = [a["bucket"] for a in policy.audit() if a["field"] == "ready"]
    assert sorted(ready_audit) == ["", "busy", "rare"] and ready_audit[-1] == "rare"


def test_control_slice_is_selected_independently_of_the_key(traces):
    """The control draw depends on (seed, request id) only; a bucket counts a
    request as evidence with the share its readiness allows."""
    from haltwise.policy.policy import control_draw

    draws = np.array([control_draw(7, rid) for rid in range(20000)])
    assert abs((draws < 0.05).mean() - 0.05) < 0.006 and abs((draws < 0.25).mean() - 0.25) < 0.015
    assert control_draw(7, 3) == control_draw(7, 3) != control_draw(8, 3)
