"""The anytime-valid re-test schedule (policy/anytime.py) and its simulator
(policy/simulate.py, `haltwise policy simulate`)."""
import json
import math

import numpy as np
import pytest

from haltwise.cli import main
from haltwise.policy import ltt
from haltwise.policy.anytime import AnytimeState, Certifier, RetestSchedule, policy_families
from haltwise.policy.config import PolicyConfig
from haltwise.policy.simulate import naive_schedule, run_setting, settings, simulate


def test_schedule_levels_sum_to_delta_and_checkpoints_are_preset():
    s = RetestSchedule(first=200, ratio=1.5, window=1000, delta=0.1)
    assert [s.checkpoint(j) for j in range(1, 7)] == [200, 300, 450, 675, 1013, 1513]
    assert math.fsum(s.level(j) for j in range(1, 200000)) == pytest.approx(0.1, rel=1e-4)
    assert sum(s.level(j) for j in range(1, 50)) < 0.1
    for labelled in range(0, 3000, 7):
        j = s.reached(labelled)
        assert j == sum(s.checkpoint(i) <= labelled for i in range(1, 20))
    naive = RetestSchedule(first=203, every=5, delta=0.1, spending="none")
    assert naive.reached(202) == 0 and naive.reached(203) == 1 and naive.reached(213) == 3
    assert naive.level(7) == 0.1


@pytest.mark.parametrize("kwargs, word", [
    (dict(first=0), "first"), (dict(first=10, ratio=1.0), "ratio"), (dict(first=10, delta=1.5), "delta"),
    (dict(first=10, spending="x"), "spending"), (dict(first=10, every=0), "every")])
def test_schedule_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        RetestSchedule(**kwargs)


def test_between_checkpoints_an_evaluation_only_removes():
    sched = RetestSchedule(first=100, ratio=2.0, window=1000, delta=0.1)
    certifier = Certifier(sched)
    state = AnytimeState(labelled=99)
    calls = []

    def family(level):
        calls.append(level)
        return list(range(len(calls) + 2))  # would certify more every time

    sets, at = certifier.evaluate(state, {"f": family})
    assert sets == {"f": []} and not at and calls == []  # before the first checkpoint: nothing
    state.labelled = 100
    sets, at = certifier.evaluate(state, {"f": family})
    assert at and sets == {"f": [0, 1, 2]} and calls == [pytest.approx(sched.level(1))]
    state.labelled = 150
    sets, at = certifier.evaluate(state, {"f": family})
    assert not at and sets == {"f": [0, 1, 2]}  # the family offered more: nothing is added between checkpoints
    sets, _ = certifier.evaluate(state, {"f": lambda level: [1, 2]})
    assert sets == {"f": [1, 2]}  # removals take effect
    sets, _ = certifier.evaluate(state, {"f": lambda level: [0, 1, 2, 3]})
    assert sets == {"f": [0, 1, 2]}  # a candidate that failed one re-test is back when it passes the next
    state.labelled = 200
    calls.clear()
    sets, at = certifier.evaluate(state, {"f": family})
    assert at and state.checkpoints == 2 and calls[-1] == pytest.approx(sched.level(2))
    assert AnytimeState.from_dict(state.to_dict()) == state


def test_a_candidate_keeps_the_level_of_the_checkpoint_that_certified_it():
    """Later checkpoints spend ever smaller levels on a window that stops
    growing; a candidate certified earlier is re-tested at its own level, so
    it is not lost merely because delta_j fell (it is lost when the window no
    longer certifies it at that level)."""
    sched = RetestSchedule(first=100, ratio=2.0, window=1000, delta=0.1)
    certifier = Certifier(sched)
    state = AnytimeState(labelled=100)
    lenient = sched.level(1)

    def family(level):  # 0 passes at any level; 1 and 2 only at the first checkpoint's level or above
        return [0, 1, 2] if level >= lenient - 1e-15 else [0]

    sets, at = certifier.evaluate(state, {"f": family})
    assert at and sets == {"f": [0, 1, 2]} and state.held("f") == {0: 1, 1: 1, 2: 1}
    state.labelled = 200
    sets, at = certifier.evaluate(state, {"f": family})
    assert at and sets == {"f": [0, 1, 2]}  # the new level alone certifies only 0
    assert state.held("f") == {0: 1, 1: 1, 2: 1}
    state.labelled = 400
    sets, at = certifier.evaluate(state, {"f": lambda level: [0, 1] if level >= lenient - 1e-15 else [0]})
    assert at and sets == {"f": [0, 1]} and state.held("f") == {0: 1, 1: 1}  # 2 failed its own level: dropped
    state.labelled = 800
    sets, at = certifier.evaluate(state, {"f": lambda level: [0, 1, 2] if level <= sched.level(4) + 1e-15 else []})
    # the held ones fail their level (an odd family, for the check): only what checkpoint 4 certifies remains
    assert at and sets == {"f": [0, 1, 2]} and state.held("f") == {0: 4, 1: 4, 2: 4}


def test_a_state_stored_without_certificate_levels_holds_the_last_checkpoints():
    stored = {"labelled": 300, "checkpoints": 2, "sets": {"f": [0, 3]}}
    state = AnytimeState.from_dict(stored)
    assert state.held("f") == {0: 2, 3: 2}
    assert AnytimeState.from_dict(state.to_dict()) == state


def test_policy_families_match_the_chain_design():
    cfg = PolicyConfig(traces=16, overload_traces=(8,), strategies=((4, "unbeatable", 1.0, "majority"),),
                       overload_strategies=((2, "beta", 0.8, "majority"),))
    rng = np.random.default_rng(1)
    harms = rng.integers(0, 6, size=(4, 41)).tolist()
    helps = rng.integers(0, 6, size=(4, 41)).tolist()
    fam = policy_families(cfg, harms, helps, 400, "mcnemar")
    # the overload-only strategy (row 3) has an overload family and no normal one
    assert set(fam) == {"normal", "normal/2", "overload/16", "overload/8", "overload/s2", "overload/s3"}
    # normal mode: Bonferroni over the plain grid (3 chains) and the consensus strategy (1 chain from no cut)
    assert fam["normal"](0.1) == ltt.certified_set(harms[0][1:], helps[0][1:], 400, epsilon=0.02, delta=0.05,
                                                   test="mcnemar", starts=3)
    assert fam["normal/2"](0.1) == ltt.certified_set(harms[2], helps[2], 400, epsilon=0.02, delta=0.05,
                                                     test="mcnemar", starts=1)
    # overload: weights 1 (all traces), 2 (fewer traces), 1 (each consensus strategy) -> 1/5, 2/5, 1/5, 1/5
    assert fam["overload/8"](0.1) == ltt.certified_set(harms[1], helps[1], 400, epsilon=0.05, delta=0.04,
                                                       test="mcnemar", starts=1)
    assert fam["overload/s2"](0.1) == ltt.certified_set(harms[2], helps[2], 400, epsilon=0.05, delta=0.02,
                                                        test="mcnemar", starts=1)
    assert fam["overload/s3"](0.1) == ltt.certified_set(harms[3], helps[3], 400, epsilon=0.05, delta=0.02,
                                                        test="mcnemar", starts=1)


def test_skipping_non_checkpoint_evaluations_gives_the_same_outcome():
    cfg = PolicyConfig(evidence_window=400, min_evidence=150)
    for setting in settings(cfg)[:3:2]:
        fast = run_setting(cfg, setting, repetitions=30, labels=600, seed=3)
        full = run_setting(cfg, setting, repetitions=30, labels=600, seed=3, every_evaluation=True)
        assert fast == full


def test_anytime_schedule_holds_and_the_naive_rule_fails():
    """The whole-stream error: the schedule stays within delta on every
    boundary setting; the naive rule (fresh level-delta test every 5 labels)
    exceeds it on the same streams."""
    cfg = PolicyConfig()
    by_name = {s.name: s for s in settings(cfg)}
    good = run_setting(cfg, by_name["harms_only"], repetitions=400, labels=4000, seed=11)
    bad = run_setting(cfg, by_name["harms_only"], repetitions=150, labels=4000, seed=11,
                      schedule=naive_schedule(cfg))
    assert good["rate"] + 2 * good["se"] <= cfg.delta
    assert bad["rate"] - 2 * bad["se"] > cfg.delta


def test_simulate_report_and_cli(tmp_path):
    report = simulate(PolicyConfig(), repetitions=20, labels=400, naive_repetitions=5)
    assert [s["name"] for s in report["settings"]] == ["harms_only", "many_helps", "falls_then_rises",
                                                        "overload_harms_only"]
    for s in report["settings"]:
        assert set(s) >= {"name", "repetitions", "rate", "se"} and s["repetitions"] == 20
    out = tmp_path / "sim.json"
    rc = main(["policy", "simulate", "--json", str(out), "--repetitions", "20", "--naive-repetitions", "0",
               "--labels", "300"])
    data = json.loads(out.read_text())
    assert data["delta"] == 0.1 and len(data["settings"]) == 4 and data["naive"] == []
    assert rc == (0 if data["valid"] else 1)
    with pytest.raises(ValueError, match="repetitions"):
        simulate(PolicyConfig(), repetitions=0)


def test_simulate_cli_bad_input(capsys):
    assert main(["policy", "simulate", "--repetitions", "0"]) == 2
    assert "--repetitions must be >= 1, got 0" in capsys.readouterr().err
    assert main(["policy", "simulate", "--delta", "2"]) == 2
    assert "delta" in capsys.readouterr().err
