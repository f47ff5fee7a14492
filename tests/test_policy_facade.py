"""The Policy facade against the real scheduler: plans drive
haltwise.Scheduler directly (the cut happens where the policy's replay says),
Finished records go back in, shadow mode records would-be cuts and reports
their effect, the value report, and argument errors that name the argument."""
from __future__ import annotations

import math

import numpy as np
import pytest

from haltwise.policy import Policy, PolicyConfig, TraceOutcome
from haltwise.policy.calibration import trace_profile
from haltwise.scheduler import Scheduler, StopConfig, StopReason
from haltwise.stepper import HostSignals

EOS = 2
CONFIG = PolicyConfig(epsilon=0.1, epsilon_overload=0.2, traces=4, warmup_requests=6, min_evidence=30,
                      evidence_window=200, control_boost=0.6, control_fraction=0.3, grid_size=8, evaluate_every=1,
                      raise_interval=1, max_raise_steps=8, cooldown=20, window=4, min_new_tokens=2,
                      price_per_1k_tokens=2.0,
                      value_per_correct=1.0)


def run_traces(stop: StopConfig, values: list[np.ndarray]) -> list:
    """Decodes one trace per values array through the native scheduler (logprob = values, EOS at the end)."""
    sched = Scheduler(len(values))
    for k, v in enumerate(values):
        sched.submit(k, max_new_tokens=len(v) + 5, stop=stop)
    plan = sched.step(np.zeros(0, np.int64), HostSignals.zeros(0))
    pos = [0] * len(values)
    finished = {}
    while len(plan.request_ids):
        rids = [int(r) for r in plan.request_ids]
        z = HostSignals.zeros(len(rids))
        lp = np.array([values[r][pos[r]] for r in rids], np.float32)
        tokens = np.array([EOS if pos[r] == len(values[r]) - 1 else 5 for r in rids])
        plan = sched.step(tokens, HostSignals(lp, z.entropy, z.confidence, z.margin, z.topk_conf, z.status))
        for r in rids:
            pos[r] += 1
        for f in plan.finished:
            finished[f.request_id] = f
    return [finished[k] for k in range(len(values))]


def sample(rng, right: bool) -> tuple[np.ndarray, int]:
    n = int(rng.integers(10, 20))
    v = rng.uniform(-0.3, 0.0, n)
    if not right:  # a low-confidence stretch
        at = int(rng.integers(2, n - 4))
        v[at: at + 4] = rng.uniform(-3.0, -1.5, 4)
    return v.astype(np.float32), (7 if right else int(rng.integers(8, 10)))


def one_request(policy: Policy, rid: int, rng, *, key=None, label=True):
    plan = policy.plan(rid, key, base=StopConfig(eos_ids=[EOS], stop_sequences=[[9, 9]]))
    assert plan.stop.eos_ids == (EOS,) and plan.stop.stop_sequences == ((9, 9),)
    drawn = [sample(rng, rng.random() < 0.6) for _ in range(plan.traces)]
    records = run_traces(plan.stop, [v for v, _ in drawn])
    answers = [a if r.reason in (StopReason.EOS,) else None for (v, a), r in zip(drawn, records)]
    served = policy.observe(rid, records, answers)
    if label:
        policy.feedback(rid, served == 7, reference=7)
    return plan, records, drawn


def test_plans_run_on_the_scheduler_and_cut_where_the_replay_says():
    policy = Policy(CONFIG)
    rng = np.random.default_rng(0)
    cut_seen = 0
    for rid in range(400):
        plan, records, drawn = one_request(policy, rid, rng)
        if plan.control:
            assert plan.stop.record_signals and plan.stop.low_conf_threshold is None
            assert all(r.reason == StopReason.EOS for r in records)
            continue
        if plan.threshold is None:
            continue
        assert plan.stop.low_conf_threshold == plan.threshold and plan.stop.low_conf_signal == CONFIG.signal
        for (v, a), r in zip(drawn, records):
            expected = trace_profile(np.asarray(v, np.float16), reason=int(StopReason.EOS), answer=a,
                                     window=CONFIG.window, min_new_tokens=CONFIG.min_new_tokens).cut_length(
                plan.threshold)
            if expected is None:
                assert r.reason == StopReason.EOS
            else:
                cut_seen += 1
                assert r.reason == StopReason.LOW_CONFIDENCE and r.num_tokens == expected
    assert cut_seen > 20, "no trace was cut: the policy never moved off 'no cut'"
    state = policy.thresholds()[""]
    assert state["ready"] and state["threshold"] is not None


def test_shadow_records_would_be_cuts_and_reports_their_effect():
    policy = Policy(CONFIG)
    rng = np.random.default_rng(1)
    for rid in range(200):  # make the root ready with a threshold
        one_request(policy, rid, rng)
    assert policy.thresholds()[""]["threshold"] is not None
    policy.set_shadow("exp", True)
    shadowed = 0
    for rid in range(200, 420):
        plan, records, _ = one_request(policy, rid, rng, key="exp")
        if plan.kind == "shadow":
            shadowed += 1
            # the would-be threshold runs in shadow (none: nothing to shadow)
            assert plan.stop.shadow == (plan.threshold is not None)
            assert plan.stop.low_conf_threshold == plan.threshold
            assert all(r.reason == StopReason.EOS for r in records)  # nothing is cut
    assert shadowed > 50
    summary = policy.report()["buckets"]["exp"]["shadow_summary"]
    assert summary["requests"] == shadowed and summary["labeled"] == shadowed
    assert 0 < summary["saved"] < 1 and summary["em_change"] is not None
    assert summary["harms"] + summary["helps"] <= shadowed
    assert [a["field"] for a in policy.audit() if a["bucket"] == "exp"][:1] == ["shadow"]


def test_value_report_and_value_objective():
    policy = Policy(CONFIG)
    rng = np.random.default_rng(2)
    for rid in range(300):
        one_request(policy, rid, rng)
    rows = policy.report()["buckets"][""]["candidates"]
    assert {"chosen"} <= set(rows)
    for r in rows.values():
        assert r["value"] == pytest.approx(1.0 * r["em"] - 2.0 * r["tokens"] / 1000)
    by_value = Policy(PolicyConfig(**{**CONFIG.__dict__, "objective": "value"}))
    rng = np.random.default_rng(2)
    for rid in range(300):
        one_request(by_value, rid, rng)
    assert by_value.thresholds()[""]["ready"]
    with pytest.raises(ValueError, match="objective='value' needs price_per_1k_tokens"):
        PolicyConfig(objective="value")


def test_finished_records_convert_with_the_policy_signal():
    rng = np.random.default_rng(3)
    v, _ = sample(rng, True)
    (record,) = run_traces(StopConfig(eos_ids=[EOS], record_signals=True), [v])
    out = TraceOutcome.from_finished(record, 7, signal="logprob")
    np.testing.assert_array_equal(out.signal, v)
    assert out.num_tokens == len(v) and out.reason == int(StopReason.EOS) and out.answer == 7
    neg = TraceOutcome.from_finished(record, 7, signal="neg_entropy")
    np.testing.assert_array_equal(neg.signal, -record.signals["entropy"])
    assert math.isclose(out.mean_logprob, float(np.mean(v)), rel_tol=1e-5)


def test_argument_errors_name_the_argument():
    policy = Policy(CONFIG)
    plan = policy.plan(1, "a")
    with pytest.raises(TypeError, match="plan: base must be a haltwise.StopConfig or None, got dict"):
        policy.plan(2, "a", base={})
    with pytest.raises(TypeError, match="plan: request_id must be an int, got str"):
        policy.plan("x", "a")
    with pytest.raises(ValueError, match="observe: request_id 5 was never planned"):
        policy.observe(5, [])
    with pytest.raises(ValueError, match=r"observe: a warmup request needs every trace's signal"):
        policy.observe(1, [TraceOutcome(1, 3, int(StopReason.EOS))] * plan.traces)
    with pytest.raises(ValueError, match=r"traces\[0\]\.signal must have num_tokens=3 values, got 2"):
        policy.observe(1, [TraceOutcome(1, 3, int(StopReason.EOS), signal=np.zeros(2))] * plan.traces)
    with pytest.raises(ValueError, match="Finished records need answers="):
        policy.observe(1, [type("F", (), {"num_tokens": 3, "reason": 1})()])
    good = [TraceOutcome(1, 3, int(StopReason.EOS), signal=np.zeros(3, np.float32))] * plan.traces
    assert policy.observe(1, good) == 1
    with pytest.raises(ValueError, match="request_id 1 was already observed"):
        policy.observe(1, good)
    with pytest.raises(ValueError, match="feedback: correct=False contradicts reference=1 for the served answer 1"):
        policy.feedback(1, False, reference=1)
    with pytest.raises(ValueError, match=r"feedback: weight must be in \[0.0, 1.0\], got 1.5"):
        policy.feedback(1, False, source="user", weight=1.5)
    with pytest.raises(ValueError, match="feedback: source must be one of"):
        policy.feedback(1, False, source="admin")
    with pytest.raises(ValueError, match="a label \\(source='label'\\) has weight 1.0, got 0.5"):
        policy.feedback(1, False, weight=0.5)
    with pytest.raises(TypeError, match="feedback: correct must be a bool, got int"):
        policy.feedback(1, 1)
    with pytest.raises(ValueError, match="observe_load: queue_depth must be a finite number"):
        policy.observe_load(queue_depth=math.nan)
    with pytest.raises(TypeError, match="PolicyConfig: traces must be an int, got float"):
        PolicyConfig(traces=4.0)
    with pytest.raises(ValueError, match="PolicyConfig: min_evidence must be >= 114"):
        PolicyConfig(min_evidence=50)
    with pytest.raises(ValueError, match="epsilon_overload must be >= epsilon"):
        PolicyConfig(epsilon=0.05, epsilon_overload=0.02)


def test_cancel_frees_a_warmup_place():
    policy = Policy(PolicyConfig(**{**CONFIG.__dict__, "warmup_requests": 2}))
    assert policy.plan(1).kind == "warmup" and policy.plan(2).kind == "warmup"
    assert policy.plan(3).kind != "warmup"  # both warm-up places are taken (outstanding)
    assert policy.cancel(2) and not policy.cancel(2) and not policy.cancel(77)
    assert policy.plan(4).kind == "warmup"
    with pytest.raises(ValueError, match="request_id 2 was cancelled"):
        policy.observe(2, [])


def test_user_reports_accumulate_and_labels_are_decisive():
    policy = Policy(PolicyConfig(**{**CONFIG.__dict__, "unlabeled": "worst_case"}))
    plan = policy.plan(1)
    outs = [TraceOutcome(7, 5, int(StopReason.EOS), signal=np.zeros(5, np.float32))] * plan.traces
    policy.observe(1, outs)
    policy.feedback(1, False, source="user", weight=0.5)
    policy.feedback(1, False, source="user", weight=0.6)
    row = policy.store.request(1)
    assert row["user_bad"] == pytest.approx(1.1) and row["label"] is None
    policy.feedback(1, True, reference=7)
    row = policy.store.request(1)
    assert row["label"] == 1 and row["reference"] == 7
    assert [r["source"] for r in policy.store.feedback_rows()] == ["user", "user", "label"]


def test_warmup_too_short_to_calibrate_starts_again():
    policy = Policy(PolicyConfig(**{**CONFIG.__dict__, "warmup_requests": 1}))
    plan = policy.plan(1)
    short = [TraceOutcome(7, 1, int(StopReason.EOS), signal=np.zeros(1, np.float32))] * plan.traces
    policy.observe(1, short)  # one token each: the confidence rules were never evaluated
    assert not policy.thresholds()[""]["frozen"]
    assert policy.audit()[-1]["reason"].startswith("warm-up traces too short")
    assert policy.plan(2).kind == "warmup"


def test_the_policy_certifies_only_at_the_checkpoints_of_its_re_test_schedule():
    """End to end: the bucket becomes ready at the first checkpoint; the
    certified set grows only at an evaluation that reached a new checkpoint
    (in between, evaluations may only remove), and the value in force is always
    certified."""
    policy = Policy(CONFIG)
    schedule = CONFIG.schedule()
    rng = np.random.default_rng(5)
    seen_checkpoints, grown_at = set(), []
    previous, previous_checkpoint, previous_row = set(), 0, None
    for rid in range(400):
        one_request(policy, rid, rng)
        ev = policy.report()["buckets"][""]["last_eval"] or {}
        state = policy._buckets[""]
        if "checkpoint" not in ev:
            continue
        assert state.ready == (ev["checkpoint"] >= 1)
        assert ev["checkpoint"] == schedule.reached(ev["labelled"])
        now = set(state.normal.certified)  # the certified set of the strategy row in force
        if now - previous and state.normal.strategy == previous_row:
            # one row's set grew since the last request: a new checkpoint was reached in between (a switch to
            # another certified row shows that row's set, which the last checkpoint certified)
            grown_at.append(ev["checkpoint"] > previous_checkpoint)
        if ev["checkpoint"]:
            assert ev["level"] == pytest.approx(schedule.level(ev["checkpoint"]))
            seen_checkpoints.add(ev["checkpoint"])
        if state.normal.index >= 0:
            assert state.normal.index in now
        previous, previous_checkpoint, previous_row = now, ev["checkpoint"], state.normal.strategy
    assert len(seen_checkpoints) >= 3, "the stream never passed three checkpoints: the check would be vacuous"
    assert grown_at and all(grown_at)
