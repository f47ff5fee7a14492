"""Persistence: SQLite in WAL mode, one transaction per call. A process
killed with SIGKILL at any instant restarts exactly at a call boundary at or
after the last acknowledged call, with every acknowledged feedback kept, and
then continues to the same state as a run that was never interrupted."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from haltwise.policy import Policy, PolicyConfig, TraceOutcome
from haltwise.scheduler import StopReason

CONFIG = PolicyConfig(epsilon=0.2, epsilon_overload=0.3, traces=4, warmup_requests=2, min_evidence=15,
                      evidence_window=60, control_boost=0.5, control_fraction=0.3, grid_size=10, evaluate_every=2,
                      max_raise_steps=2, raise_interval=3, cooldown=5, slo_queue_depth=50.0, slo_p95_latency_s=None,
                      enter_after=1, exit_after=1, min_dwell=2, window=4, min_new_tokens=2,
                      strategies=((2, "unbeatable", 1.0, "majority"),))


def make_ops(seed: int, requests: int) -> list[tuple]:
    """A deterministic stream of public calls: load figures, plans, observations, labels and user reports."""
    rng = np.random.default_rng(seed)
    ops: list[tuple] = []
    planned: list[int] = []
    for rid in range(requests):
        if rid % 5 == 0:
            ops.append(("load", float(200.0 if 60 <= rid < 80 else rng.uniform(0, 20))))
        ops.append(("plan", rid, ["easy", "hard"][rid % 2]))
        traces = []
        for _ in range(CONFIG.traces):
            right = rng.random() < (0.7 if rid % 2 == 0 else 0.45)
            n = int(rng.integers(6, 14))
            values = rng.normal(-0.2 if right else -0.6, 0.3, size=n).astype(np.float32)
            traces.append((1 if right else int(rng.integers(2, 4)), n, values))
        ops.append(("observe", rid, traces))
        planned.append(rid)
        if rid >= 3 and rng.random() < 0.8:
            target = planned[rid - 3]
            if rng.random() < 0.85:
                ops.append(("label", target))
            else:
                ops.append(("user", target, float(rng.uniform(0.3, 1.0))))
    return ops


def apply(policy: Policy, op: tuple, served: dict) -> None:
    kind = op[0]
    if kind == "load":
        policy.observe_load(queue_depth=op[1])
    elif kind == "plan":
        served[("plan", op[1])] = policy.plan(op[1], op[2])
    elif kind == "observe":
        plan = served[("plan", op[1])] if ("plan", op[1]) in served else None
        control = plan.control if plan is not None else True
        outcomes = [TraceOutcome(answer, n, int(StopReason.EOS), signal=values if control else None)
                    for answer, n, values in op[2]]
        served[op[1]] = policy.observe(op[1], outcomes)
    elif kind == "label":
        policy.feedback(op[1], served.get(op[1]) == 1, reference=1)
    elif kind == "user":
        policy.feedback(op[1], False, source="user", weight=op[2])


def served_answers_from(policy: Policy) -> dict:
    """After a restart: the plans and served answers the caller would still know, from the database."""
    out = {}
    for row in policy.store.requests_where("1"):
        out[("plan", row["request_id"])] = type("P", (), {"control": row["kind"] in ("warmup", "control")})()
        if row["observed"]:
            out[row["request_id"]] = row["served_answer"]
    return out


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_policy_store import CONFIG, make_ops, apply
    from haltwise.policy import Policy
    policy = Policy(CONFIG, db={db!r})
    served = {{}}
    for i, op in enumerate(make_ops({seed}, {requests})):
        apply(policy, op, served)
        print("ACK", i, flush=True)
    print("DONE", flush=True)
    time.sleep(120)
""")


def reference_states(ops: list[tuple]) -> list[dict]:
    """state() after each op of an uninterrupted in-memory run."""
    policy = Policy(CONFIG)
    served: dict = {}
    states = []
    for op in ops:
        apply(policy, op, served)
        states.append(policy.state())
    return states


@pytest.mark.parametrize("kill_after,kill_delay,requests", [(45, 0.0, 120), (260, 0.0, 120), (5, 0.1, 400)])
def test_sigkill_loses_nothing_acknowledged_and_resumes_exactly(tmp_path, kill_after, kill_delay, requests):
    """kill_delay 0: killed right after acknowledging call `kill_after`; > 0:
    killed at an arbitrary instant later, usually inside a transaction."""
    seed = 11
    ops = make_ops(seed, requests)
    db = tmp_path / "policy.db"
    code = CHILD.format(tests=str(Path(__file__).parent), db=str(db), seed=seed, requests=requests)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked = -1
    try:
        for line in proc.stdout:
            if line.startswith("ACK"):
                acked = int(line.split()[1])
                if acked >= kill_after:
                    break
            elif line.startswith("DONE"):
                break
        time.sleep(kill_delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rest = proc.stdout.read()  # acknowledgements printed before the kill
        errors = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    # a line cut short by the kill ("AC", "ACK 1") is not an acknowledgement of what it lacks
    acked = max([acked] + [int(line.split()[1]) for line in rest.splitlines()[:-1] if line.startswith("ACK ")]
                + [int(line.split()[1]) for line in rest.splitlines()[-1:] if line.startswith("ACK ")
                   and rest.endswith("\n")])
    assert acked >= kill_after and "DONE" not in rest, f"the child stopped early or finished: {errors}"
    states = reference_states(ops)

    restored = Policy.open(db)
    assert restored.store.journal_mode == "wal"
    state = restored.state()
    committed = [m for m in range(acked, len(ops)) if states[m] == state]
    assert committed, "the restored state matches no call boundary at or after the last acknowledged call"
    m = committed[0] + 1  # calls applied
    assert m <= acked + 2, "more calls committed than were acknowledged plus the one in flight"
    # every acknowledged feedback call is in the feedback table
    want = [op for op in ops[: acked + 1] if op[0] in ("label", "user")]
    rows = restored.store.feedback_rows()
    assert len(rows) >= len(want)
    for op, row in zip(want, rows):
        assert row["request_id"] == op[1] and row["source"] == ("label" if op[0] == "label" else "user")
    # and it carries on to the same place as the run that was never killed
    served = served_answers_from(restored)
    for op in ops[m:]:
        apply(restored, op, served)
    assert restored.state() == states[-1]
    assert restored.thresholds() == thresholds_of(ops)
    restored.close()


def thresholds_of(ops):
    policy = Policy(CONFIG)
    served: dict = {}
    for op in ops:
        apply(policy, op, served)
    return policy.thresholds()


def test_the_stream_exercises_what_persistence_must_keep():
    """Guards the test above: its stream freezes grids, makes buckets ready,
    moves thresholds and switches overload, so 'same state' means something."""
    ops = make_ops(11, 120)
    policy = Policy(CONFIG)
    served: dict = {}
    for op in ops:
        apply(policy, op, served)
    fields = {a["field"] for a in policy.audit()}
    assert {"grid", "ready", "threshold", "overload"} <= fields
    assert any(b["ready"] for b in policy.thresholds().values())


def test_restart_in_process_and_config_checks(tmp_path):
    db = tmp_path / "p.db"
    ops = make_ops(3, 50)
    policy = Policy(CONFIG, db=db)
    served: dict = {}
    for op in ops[:80]:
        apply(policy, op, served)
    before = policy.state()
    policy.close()
    again = Policy.open(db)
    assert again.state() == before
    assert again.config == CONFIG
    again.close()
    with pytest.raises(ValueError, match=r"config differs from the one stored .* \['epsilon'\]"):
        Policy(PolicyConfig(**{**CONFIG.__dict__, "epsilon": 0.25}), db=db)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Policy.open(tmp_path / "missing.db")


def test_a_failed_call_changes_nothing(tmp_path):
    policy = Policy(CONFIG, db=tmp_path / "p.db")
    policy.plan(1, "a")
    before = policy.state()
    with pytest.raises(ValueError, match="request_id 1 was already planned"):
        policy.plan(1, "a")
    with pytest.raises(ValueError, match="a warmup request must report all its 4 traces, got 1"):
        policy.observe(1, [TraceOutcome(1, 5, int(StopReason.EOS), signal=np.zeros(5, np.float32))])
    with pytest.raises(ValueError, match="request_id 99 was never planned"):
        policy.feedback(99, True)
    assert policy.state() == before
    assert policy.store.feedback_count() == 0


def test_every_change_is_audited_with_evidence_and_reason():
    ops = make_ops(11, 120)
    policy = Policy(CONFIG)
    served: dict = {}
    for op in ops:
        apply(policy, op, served)
    audit = policy.audit()
    assert audit
    for a in audit:
        assert a["reason"] and isinstance(a["evidence"], dict) and a["at"] > 0
        assert a["field"] in {"grid", "threshold", "target", "ready", "overload", "overload_target",
                              "overload_threshold", "overload_values", "shadow", "strategy"}
    moves = [a for a in audit if a["field"] in ("threshold", "strategy") and a["old"] is not None]
    assert moves and all(a["old"] != a["new"] for a in moves)


def test_per_request_queries_use_an_index_and_old_files_gain_it(tmp_path):
    """The queries the policy runs for every request and label look a request
    up by id: each must search an index, never scan a table that grows with
    the stream (a scan of `evidence` by request id made labels O(requests):
    the 10^6 soak slowed from about 550 to under 100 requests/s). A file made
    before an index existed gains it when opened for writing."""
    import sqlite3

    from haltwise.policy.store import Store

    path = tmp_path / "p.db"
    store = Store(str(path))
    per_request = [
        ("SELECT bucket FROM evidence WHERE request_id = ?", (1,)),  # Store.evidence_buckets
        ("SELECT * FROM requests WHERE request_id = ?", (1,)),  # Store.request
        ("SELECT k FROM traces WHERE request_id = ? ORDER BY k", (1,)),  # Store.traces
        ("SELECT e.request_id FROM evidence e JOIN requests r ON r.request_id = e.request_id "
         "WHERE e.bucket = ? AND r.observed = 1 AND r.cancelled = 0 ORDER BY e.seq DESC LIMIT ?", ("", 10)),
    ]
    for sql, params in per_request:
        plan = " | ".join(row[-1] for row in store.conn.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "USING" in plan and not any(part.strip().startswith("SCAN") for part in plan.split("|")), (sql, plan)
    store.close()
    conn = sqlite3.connect(path)  # a file from before the index: drop it, reopen for writing
    conn.execute("DROP INDEX evidence_request")
    conn.commit()
    conn.close()
    store = Store(str(path))
    names = {row[0] for row in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    store.close()
    assert "evidence_request" in names


def test_a_restart_rebuilds_the_same_window_when_some_controls_cannot_be_replayed(tmp_path):
    """A control request whose traces did not all end on their own (one ran
    out of memory) cannot be replayed, so it never enters a bucket's window.
    A restart must rebuild the same window as the process that ran: were its
    evidence row kept, the rebuilt window (the last rows by count) would hold
    fewer replayable requests than the window in memory."""
    cfg = PolicyConfig(epsilon=0.2, epsilon_overload=0.3, traces=4, warmup_requests=2, min_evidence=15,
                       evidence_window=20, control_boost=1.0, control_fraction=1.0, grid_size=6, evaluate_every=2,
                       window=4, min_new_tokens=2, strategies=())
    db = tmp_path / "p.db"
    policy = Policy(cfg, db=db)
    rng = np.random.default_rng(5)
    broken = 0
    for rid in range(80):
        plan = policy.plan(rid)
        oom = plan.kind == "control" and rid % 7 == 0
        broken += oom
        traces = [TraceOutcome(answer=7, num_tokens=10, signal=rng.normal(-0.3, 0.1, 10).astype(np.float32),
                               reason=int(StopReason.OUT_OF_MEMORY if (oom and k == 0) else StopReason.EOS))
                  for k in range(plan.traces)]
        policy.observe(rid, traces)
        policy.feedback(rid, True, reference=7)
    assert broken >= 5
    running = policy.state()
    assert len(running["evidence"][""]) == cfg.evidence_window
    policy.close()
    again = Policy.open(db)
    assert again.state() == running
    again.close()
