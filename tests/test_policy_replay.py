"""The replay harness end to end on a small bank (the budget holds), and the
`haltwise replay` / `haltwise policy show` commands."""
from __future__ import annotations

import json
from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest

from haltwise.policy.cli import main
from haltwise.policy.config import PolicyConfig
from haltwise.policy.replay import ReplayConfig, make_stream, run_replay
from haltwise.policy.synthetic import synthetic_bank


@pytest.fixture(scope="module")
def bank():
    return synthetic_bank(80, 16, seed=0)


def test_replay_keeps_the_accuracy_budget_on_a_small_bank(bank):
    config = PolicyConfig(traces=8)
    report = run_replay(bank, config, ReplayConfig(requests=4000, window=500, seed=0))
    windows = report["windows"]
    assert len(windows) == 8
    normal = [w for w in windows if not w["overload"]]
    within = np.mean([w["em_policy"] >= w["em_uncut"] - config.epsilon for w in normal])
    assert within >= 0.9
    overall = report["overall"]
    assert overall["em_policy"] >= overall["em_uncut"] - config.epsilon
    assert overall["saved"] > 0.05, "the policy saved nothing: the budget check would be vacuous"
    assert any(w["overload"] for w in windows)  # the load spike reached the policy
    assert report["static_best"]["em"] >= report["static_best"]["em_uncut"] - config.epsilon
    assert report["targets"]["windows_within_budget"] == pytest.approx(within)
    # the policy's own account of what it did
    assert report["policy"]["buckets"][""]["ready"]


def test_the_stream_drifts_toward_harder_problems(bank):
    cfg = ReplayConfig(requests=4000, seed=1)
    stream = make_stream(bank, cfg, 8)
    first = np.mean([bank.difficulty[r.problem] for r in stream[:2000]])
    second = np.mean([bank.difficulty[r.problem] for r in stream[2000:]])
    assert second > first + 0.5
    assert all(len(set(r.subset)) == 8 for r in stream[:50])
    with pytest.raises(ValueError, match="runs 40 traces per request but the bank holds 16"):
        make_stream(bank, cfg, 40)


def test_cli_replay_writes_the_documented_json_and_policy_show_reads_the_db(tmp_path, capsys, monkeypatch):
    small = synthetic_bank(40, 8, seed=4)
    path = tmp_path / "bank.npz"
    small.save(path)
    out, png, db = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "p.db"
    code = main(["replay", "--bank", str(path), "--requests", "800", "--window", "200", "--traces", "4",
                 "--json", str(out), "--plot", str(png), "--db", str(db), "--shadow", "terms=3"])
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["epsilon"] == 0.02
    for w in payload["windows"]:
        assert {"em_policy", "em_uncut", "tokens_policy", "tokens_uncut", "overload"} <= set(w)
        assert isinstance(w["overload"], bool)
    assert {"tokens", "em"} <= set(payload["static_best"])
    strategy = payload["strategy_best"]
    assert len(strategy["tokens"]) == 800 and all(isinstance(t, int) for t in strategy["tokens"])
    assert strategy["traces"] in (4, 3, 2, 1) and strategy["em"] >= strategy["em_uncut"] - 0.02
    # a strategy family that contains static_best's (K traces, fixed threshold) saves at least as much
    assert strategy["saved"] >= payload["static_best"]["saved"] - 1e-12
    assert '"True"' not in out.read_text() and '"False"' not in out.read_text()
    assert png.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "static best in hindsight" in printed and "targets:" in printed
    assert main(["policy", "show", str(db), "--last", "5"]) == 0
    shown = capsys.readouterr().out
    assert "(global)" in shown and "last changes:" in shown and "terms=3" in shown
    assert main(["policy", "show", str(db), "--json"]) == 0
    shown_json = capsys.readouterr().out
    report = json.loads(shown_json)
    assert report["requests"] == 800
    assert isinstance(report["overload"], bool) and isinstance(report["load"]["overload"], bool)
    assert all(isinstance(b["frozen"], bool) for b in report["buckets"].values())
    assert '"True"' not in shown_json and '"False"' not in shown_json
    # numpy values in the report are written as JSON values
    from haltwise.policy.policy import Policy

    monkeypatch.setattr(Policy, "report", lambda self, last_changes: {"b": np.bool_(False), "n": np.int64(2)})
    assert main(["policy", "show", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"b": False, "n": 2}


def test_json_default_turns_numpy_scalars_into_json_values():
    from haltwise._cli_util import json_default

    text = json.dumps({"b": np.bool_(True), "i": np.int64(3), "f": np.float32(0.5), "a": np.arange(2)},
                      default=json_default)
    assert json.loads(text) == {"b": True, "i": 3, "f": 0.5, "a": [0, 1]}
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        json.dumps({"x": object()}, default=json_default)


def test_cli_errors(tmp_path, capsys):
    assert main(["replay", "--bank", str(tmp_path / "none.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["policy", "show", str(tmp_path / "none.db")]) == 2
    assert "DB" in capsys.readouterr().err


def test_strategy_best_searches_the_consensus_strategies_and_its_tokens_replay_exactly(bank):
    """strategy_best covers the config's consensus strategies too; the
    winner's per-request tokens and its EM are recomputed here trace by trace
    (each trace cut where its profile says, then the strategy's waves and
    vote) and must agree."""
    from haltwise.policy import strategy as strategies
    from haltwise.policy.replay import BankTraces, strategy_best

    config = PolicyConfig(traces=8, overload_traces=(8,), strategies=((2, "beta", 0.8, "majority"),),
                          overload_strategies=())
    traces = BankTraces(bank, config)
    stream = make_stream(bank, ReplayConfig(requests=300, seed=3), 8)
    best = strategy_best(stream, traces, bank, config)
    names = [s.name for s in config.strategy_rows]
    assert names == ["K=8", "K=8, waves of 2, beta 0.8"]
    # on this bank the consensus strategy wins (it stops on agreeing pairs), so its replay is what is checked
    assert best["strategy"] == "K=8, waves of 2, beta 0.8" and best["em"] >= best["em_uncut"] - config.epsilon
    plain_only = strategy_best(stream, traces, bank, PolicyConfig(traces=8, overload_traces=(8,), strategies=(),
                                                                  overload_strategies=()))
    assert best["saved"] > plain_only["saved"]
    # an overload-only strategy is never served in normal operation: not a candidate of strategy_best
    overload_only = PolicyConfig(traces=8, overload_traces=(8,), strategies=(),
                                 overload_strategies=((2, "beta", 0.8, "majority"),))
    assert strategy_best(stream, BankTraces(bank, overload_only), bank, overload_only) == plain_only
    strategy = config.strategy_rows[names.index(best["strategy"])]
    threshold = -np.inf if best["threshold"] is None else best["threshold"]
    right = 0
    for req, tokens in zip(stream, best["tokens"]):
        p, ks = req.problem, req.subset[: strategy.traces]
        profiles = [traces.profiles[p][k] for k in ks]
        lengths = [int(prof.cut_lengths(np.array([threshold]))[0]) for prof in profiles]
        votes = [int(traces.answers[p, k]) if traces.votes[p, k] and not prof.lowest < threshold else None
                 for k, prof in zip(ks, profiles)]
        answer, spent = strategies.replay(strategy, votes, np.ones(len(ks)), lengths)
        assert spent == tokens
        right += answer == bank.references[p]
    assert right / len(stream) == pytest.approx(best["em"])


def test_family_best_is_the_best_static_choice_per_key_and_under_overload_by_brute_force(bank):
    """family_best, the ceiling the replay reports beside strategy_best: outside
    overload each request runs the better of the pooled and its key's best
    normal candidate (each within epsilon on its population), under overload
    the overload family's best within epsilon_overload, and the control slice
    runs uncut. Recomputed here candidate by candidate."""
    from haltwise.policy.replay import BankTraces, _row_outcomes, family_best, strategy_best

    config = PolicyConfig(traces=8, overload_traces=(8, 4), strategies=((2, "beta", 0.9, "majority"),),
                          overload_strategies=((2, "beta", 0.8, "majority"),), control_fraction=0.1)
    traces = BankTraces(bank, config)
    stream = make_stream(bank, ReplayConfig(requests=400, seed=5), 8)
    overload = np.zeros(len(stream), dtype=bool)
    overload[250:330] = True
    outcomes = _row_outcomes(stream, traces, bank, config)
    family = family_best(stream, traces, bank, config, overload, outcomes)
    base_right, base_tokens = outcomes[0].right[:, 0], outcomes[0].tokens[:, 0].astype(float)

    def brute(rows, mask, epsilon):
        best = None
        for r in rows:
            right, tokens = outcomes[r].right, outcomes[r].tokens
            for j in range(right.shape[1]):
                if right[mask, j].mean() >= base_right[mask].mean() - epsilon:
                    total = tokens[mask, j].sum()
                    if best is None or total < best[0]:
                        best = (total, r, j)
        return best[1:]

    # rows: K=8, K=4 (overload only: fewer_traces="overload"), Beta 0.9 (normal), Beta 0.8 (overload only)
    assert config.normal_rows == (2,) and list(config.overload_only_rows) == [3]
    normal_rows = [0, 2]
    calm = ~overload
    keys = np.array([req.key for req in stream])
    tokens = base_tokens.copy()
    r, j = brute(normal_rows, calm, config.epsilon)
    tokens[calm] = outcomes[r].tokens[calm, j]
    assert family["normal"]["strategy"] == config.strategy_rows[r].name
    for key in sorted(set(keys[calm].tolist())):
        mask = calm & (keys == key)
        r, j = brute(normal_rows, mask, config.epsilon)
        tokens[mask] = np.minimum(tokens[mask], outcomes[r].tokens[mask, j])
        assert family["keys"][key]["strategy"] == config.strategy_rows[r].name
    r, j = brute(range(len(outcomes)), overload, config.epsilon_overload)
    tokens[overload] = outcomes[r].tokens[overload, j]
    assert family["overload"]["strategy"] == config.strategy_rows[r].name
    assert family["saved"] == pytest.approx(0.9 * (1.0 - tokens.sum() / base_tokens.sum()))
    # before the first checkpoint nothing is certified: the warm-up and the controls that bring min_evidence
    # labels run uncut, then the start strategy until the labels arrive
    late = family_best(stream, traces, bank, config, overload, outcomes, label_fraction=0.8, label_delay=30)
    for report, fraction, delay in ((family, 1.0, 0), (late, 0.8, 30)):
        uncut = config.warmup_requests + int(np.ceil(config.min_evidence / fraction))
        spent = 0.1 * base_tokens + 0.9 * tokens
        spent[:uncut] = base_tokens[:uncut]
        spent[uncut: uncut + delay] = outcomes[config.start_row].tokens[uncut: uncut + delay, 0]
        assert report["saved_after_first_checkpoint"] == pytest.approx(1.0 - spent.sum() / base_tokens.sum())
    assert late["saved_after_first_checkpoint"] < family["saved_after_first_checkpoint"] < family["saved"]
    assert late["saved"] == family["saved"]
    assert 0.0 < family["saved"] < 1.0
    # the control slice is charged: with none, the same choices save more
    free = family_best(stream, traces, bank, dataclasses_replace(config, control_fraction=0.0), overload, outcomes)
    assert free["saved"] == pytest.approx(family["saved"] / 0.9)
    # strategy_best from the shared outcomes is the one computed on its own
    assert strategy_best(stream, traces, bank, config, outcomes) == strategy_best(stream, traces, bank, config)


def test_strategy_best_replays_a_deepconf_warmup_strategy_with_its_own_per_problem_cut(bank):
    """A warm-up strategy has no grid threshold: its warm-up traces run whole
    and the rest are cut at the warm-up percentile, per problem. Its one
    column must charge every warm-up trace in full and cut some of the others
    (a fixed-threshold replay would cut warm-up traces too)."""
    from haltwise.policy.replay import BankTraces, _cut_grid, _strategy_outcomes

    config = PolicyConfig(traces=8, overload_traces=(8,), strategies=((0, None, 0.95, "majority", 4, 50.0),))
    strategy = config.strategy_rows[1]
    assert strategy.warmup == 4
    traces = BankTraces(bank, config)
    stream = make_stream(bank, ReplayConfig(requests=200, seed=5), 8)
    right, tokens, thresholds = _strategy_outcomes(stream, traces, bank, strategy,
                                                  _cut_grid(traces, np.linspace(0.0, 0.9, 10)))
    assert right.shape == tokens.shape == (200, 1) and np.isnan(thresholds).all()
    warmup_tokens = np.array([sum(traces.profiles[r.problem][k].length for k in r.subset[:4]) for r in stream])
    uncut_tokens = np.array([sum(traces.profiles[r.problem][k].length for k in r.subset[:8]) for r in stream])
    assert (tokens[:, 0] >= warmup_tokens).all() and (tokens[:, 0] <= uncut_tokens).all()
    assert (tokens[:, 0] < uncut_tokens).sum() > 20  # keep 50%: many later traces are cut
