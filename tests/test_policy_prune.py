"""Policy.prune: the database stays bounded while the decision state, a
restart's rebuild and every pending call are unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from haltwise.policy import Policy, PolicyConfig, TraceOutcome
from haltwise.scheduler import StopReason

K = 4
CFG = dict(traces=K, warmup_requests=2, min_evidence=20, evidence_window=40, control_boost=0.5, control_fraction=0.3,
           grid_size=6, evaluate_every=2, raise_interval=1, cooldown=5, window=4, min_new_tokens=2, epsilon=0.2,
           epsilon_overload=0.3, strategies=((2, "unbeatable", 1.0, "majority"),))


def _traces(rng: np.random.Generator, n: int) -> list[TraceOutcome]:
    """n traces; trace 0 dips in confidence (a cut removes it); one request in
    ten is fragile (a cut turns its right vote wrong), so thresholds move."""
    fragile = rng.random() < 0.1
    out = []
    for k in range(n):
        values = rng.normal(-0.2, 0.02, 12).astype(np.float32)
        if k == 0 or (fragile and k < 3):
            values[6:10] = rng.normal(-3.0, 0.5, 4)
        out.append(TraceOutcome(answer=9 if (fragile and k == n - 1) else 7, num_tokens=12,
                                reason=int(StopReason.EOS), signal=values))
    return out


def _drive(policy: Policy, rids: range, seed: int, *, pending: tuple[int, ...] = ()) -> list[tuple]:
    """Plan, observe and label each request (two keys); the ids in `pending`
    are planned but left unobserved. Returns what each plan said."""
    rng = np.random.default_rng(seed)
    said = []
    for rid in rids:
        plan = policy.plan(rid, "a" if rid % 3 else "b")
        said.append((plan.kind, plan.how, plan.traces, plan.threshold, plan.strategy.name))
        traces = _traces(rng, plan.traces)
        if rid in pending:
            continue
        policy.observe(rid, traces)
        policy.feedback(rid, True, reference=7)
    return said


def test_prune_keeps_the_decision_state_a_restart_and_pending_requests(tmp_path):
    cfg = PolicyConfig(**CFG)
    pruned = Policy(cfg, db=tmp_path / "pruned.db")
    whole = Policy(cfg, db=tmp_path / "whole.db")
    pending = (5, 150)
    for policy in (pruned, whole):
        _drive(policy, range(400), seed=1, pending=pending)
    assert any(b["strategy"] != "K=4" or b["threshold"] is not None for b in whole.thresholds().values())
    before = pruned.state()
    traces_before = pruned.store.count("traces")
    deleted = pruned.prune(keep_last=60)
    assert deleted["requests"] > 200 and deleted["traces"] > 100 and deleted["evidence"] > 0
    assert pruned.store.count("traces") == traces_before - deleted["traces"]
    # what is left: the last 60 requests, the pending ones, each bucket's evidence window
    windows = sum(len(pruned._window(name)) for name in pruned._evidence)
    assert pruned.store.count("requests") <= 60 + len(pending) + windows
    assert pruned.state() == before == whole.state()
    pruned.close()
    pruned = Policy.open(tmp_path / "pruned.db")
    assert pruned.state() == before  # a restart rebuilds the same state from what is left
    # the pending requests, planned long before the horizon, still complete
    for policy in (pruned, whole):
        for rid in pending:
            policy.observe(rid, _traces(np.random.default_rng(rid), K))
            policy.feedback(rid, True, reference=7)
    # and the stream goes on exactly as on the database that was never pruned
    assert _drive(pruned, range(400, 600), seed=2) == _drive(whole, range(400, 600), seed=2)
    assert pruned.state() == whole.state()
    # a label for a pruned request is refused, and says why
    with pytest.raises(ValueError, match=r"feedback: request_id 10 is unknown: never planned, or pruned"):
        pruned.feedback(10, True, reference=7)
    assert whole.feedback(10, False, source="user") is None  # the unpruned database still holds it
    for policy in (pruned, whole):
        policy.close()


def test_prune_is_idempotent_and_checks_its_argument(tmp_path):
    policy = Policy(PolicyConfig(**CFG), db=tmp_path / "p.db")
    _drive(policy, range(120), seed=3)
    policy.prune(keep_last=30)
    assert policy.prune(keep_last=30) == {"traces": 0, "evidence": 0, "requests": 0}
    with pytest.raises(ValueError, match="keep_last"):
        policy.prune(keep_last=-1)
    with pytest.raises(ValueError, match=r"observe: request_id 1000 was never planned|never planned, or pruned"):
        policy.observe(1000, _traces(np.random.default_rng(0), K))
    policy.close()


def test_the_prune_command(tmp_path, capsys):
    from haltwise.cli import main

    db = tmp_path / "p.db"
    policy = Policy(PolicyConfig(**CFG), db=db)
    _drive(policy, range(200), seed=4)
    state = policy.state()
    policy.close()
    assert main(["policy", "prune", str(db), "--keep-last", "20", "--vacuum"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deleted ") and "requests" in out and str(db) in out
    again = Policy.open(db)
    assert again.state() == state and again.store.count("requests") < 200
    again.close()
    for argv, needle in ((["policy", "prune", str(tmp_path / "none.db"), "--keep-last", "5"], "does not exist"),
                         (["policy", "prune", str(db), "--keep-last", "-1"], "--keep-last must be >= 0")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and err.count("haltwise policy prune:") == 1, err
