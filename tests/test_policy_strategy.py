"""Strategies (policy/strategy.py): a strategy replayed on a request's uncut
traces gives exactly what the parallel-sampling loop does live with it (the
premise of certifying strategies counterfactually), and the policy puts a
certified consensus strategy in force."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_policy_sampling import problems, sampler  # noqa: F401  (the module-scoped fixture)

from haltwise.decoding.parallel import EarlyStopSettings
from haltwise.policy import Policy, PolicyConfig, TraceOutcome
from haltwise.policy.calibration import NO_VOTE, candidate_outcomes, trace_profile
from haltwise.policy.strategy import Strategy, replay
from haltwise.scheduler import StopReason

K, WINDOW, MAX_NEW = 8, 4, 10
LIVE = [
    Strategy(K, 2, "beta", 0.9),
    Strategy(K, 2, "run", 2.0),
    Strategy(K, 4, "beta", 0.8, "confidence"),
    Strategy(K, 2, "unbeatable"),
    Strategy(K, 0, "unbeatable"),
    Strategy(K, 2, "beta", 0.9, warmup=2, keep_percent=70.0),
    Strategy(K, warmup=3, keep_percent=50.0),
]


def _settings(strategy: Strategy | None = None, threshold: float | None = None, **extra) -> EarlyStopSettings:
    s = strategy or Strategy(K)
    return EarlyStopSettings(traces=K, max_new_tokens=MAX_NEW, window=WINDOW, wave_size=s.wave_size,
                             consensus=s.consensus, consensus_threshold=s.consensus_threshold,
                             weighting=s.weighting, warmup=s.warmup, keep_percent=s.keep_percent,
                             threshold=threshold, **extra)


@pytest.fixture(scope="module")
def uncut(sampler):  # noqa: F811
    probs = problems(24, 5)
    return probs, sampler.run(probs, _settings(record_signals=True))


def _profiles(result, dtype=np.float16):
    """The policy replays float16-rounded signals; the live warm-up percentile reads the loop's float32 ones."""
    return [trace_profile(np.asarray(t.signals["logprob"], dtype), reason=int(t.reason), answer=t.answer,
                          window=WINDOW, min_new_tokens=WINDOW, mean_logprob=t.mean_logprob)
            for t in sorted(result.traces, key=lambda t: t.trace)]


@pytest.mark.parametrize("strategy", LIVE, ids=lambda s: s.name)
def test_replayed_strategy_matches_the_live_run(sampler, uncut, strategy):  # noqa: F811
    """Answers always; tokens too for the rules checked at wave boundaries."""
    probs, base = uncut
    lowests = [p.lowest for r in base.problems for p in _profiles(r) if not math.isnan(p.lowest)]
    threshold = float(np.quantile(lowests, 0.3))  # cuts some traces, not all
    for cut in ((None,) if strategy.warmup else (None, threshold)):  # a warm-up sets its own threshold
        live = sampler.run(probs, _settings(strategy, cut))
        column = 0 if cut is None else 1
        settled = 0
        for p, (result, twin) in enumerate(zip(live.problems, base.problems)):
            assert sorted(t.trace for t in result.traces) == list(range(K))
            grid = np.array([threshold - 1e-9 if cut is None else threshold])
            profiles = _profiles(twin, np.float32 if strategy.warmup else np.float16)
            out = candidate_outcomes(profiles, grid, (K, strategy), weighting="majority")
            replayed = out.answers[1, column]
            assert (None if replayed == NO_VOTE else replayed) == result.answer, (p, cut)
            settled += any(t.reason in (StopReason.GROUP_CONSENSUS, StopReason.LOW_CONFIDENCE)
                           for t in result.traces)
            if strategy.consensus != "unbeatable":
                assert out.tokens[1, column] == sum(t.num_tokens for t in result.traces), (p, cut)
        if cut is None:
            assert settled, f"{strategy.name}: no problem settled or cut early: the check proves little"


def test_replay_rules_by_hand():
    answers, weights = [1, 1, 1, 1, 2, 1], [1.0] * 6
    lengths = [5, 6, 7, 8, 9, 10]
    # beta 0.9 in waves of 2: after wave 1 (2-0) P = 1 - 1/8 = 0.875 < 0.9; after wave 2 (4-0) P = 1 - 1/32: settled
    assert replay(Strategy(6, 2, "beta", 0.9), answers, weights, lengths) == (1, 5 + 6 + 7 + 8)
    # unbeatable, all at once: 4-0 when the 4th trace ends (length 8), 2 remaining: 4 > 0 + 2; the two in
    # flight are charged up to that moment
    assert replay(Strategy(6, 0, "unbeatable"), answers, weights, lengths) == (1, 5 + 6 + 7 + 8 + 8 + 8)
    # beta would have settled on 3-1 never: with a 2 in the first wave it waits for the whole vote
    assert replay(Strategy(6, 2, "beta", 0.9), [1, 2, 1, 1, 1, 1], weights, lengths) == (1, 45)
    # no consensus: every trace
    assert replay(Strategy(6), [1, 1, 2, 1, 1, 1], weights, lengths) == (1, 45)
    # fewer traces: the first K'
    assert replay(Strategy(3), [None, 2, 1], weights, lengths) == (2, 18)


def test_strategy_arguments_are_checked():
    with pytest.raises(ValueError, match="needs wave_size > 0"):
        Strategy(8, 0, "beta")
    with pytest.raises(ValueError, match="consensus must be one of"):
        Strategy(8, 2, "vote")
    with pytest.raises(ValueError, match=r"strategies\[0\]"):
        PolicyConfig(traces=8, strategies=((0, "run", 2.0, "majority"),))
    with pytest.raises(ValueError, match=r"strategies\[0\] needs a consensus rule"):
        PolicyConfig(traces=8, strategies=((2, None, 1.0, "majority"),))


SMALL = dict(epsilon=0.2, epsilon_overload=0.3, traces=K, warmup_requests=2, min_evidence=15, evidence_window=100,
             control_boost=0.5, control_fraction=0.3, grid_size=6, evaluate_every=2, raise_interval=1, cooldown=5,
             window=WINDOW, min_new_tokens=2)


def _agreeing_stream(policy: Policy, requests: int, seed: int) -> list:
    """Labelled requests whose traces all give the right answer (7): no
    candidate can harm. Returns the plans."""
    rng = np.random.default_rng(seed)
    plans = []
    for rid in range(requests):
        plan = policy.plan(rid)
        plans.append(plan)
        policy.observe(rid, [TraceOutcome(answer=7, num_tokens=12, reason=int(StopReason.EOS),
                                          signal=rng.normal(-0.5, 0.2, 12).astype(np.float32))
                             for _ in range(plan.traces)])
        policy.feedback(rid, True, reference=7)
    return plans


def test_a_certified_consensus_strategy_is_put_in_force():
    """Every trace agrees with the reference: no strategy can harm, so the one
    that saves most (waves + consensus) is certified and reached."""
    cfg = PolicyConfig(**SMALL, strategies=((2, "unbeatable", 1.0, "majority"), (2, "beta", 0.9, "majority")))
    policy = Policy(cfg)
    strategies = [p.strategy for p in _agreeing_stream(policy, 150, 0)]
    assert strategies[-1] == Strategy(K, 2, "beta", 0.9), [s.name for s in strategies[-5:]]
    assert any(a["field"] == "strategy" for a in policy.audit())
    assert policy.thresholds()[""]["strategy"] == "K=8, waves of 2, beta 0.9"
    # the report shows the candidates of the strategy in force: fewer tokens than the plain run's
    report = policy.report()["buckets"][""]
    stats = policy._stats(policy._buckets[""])
    chosen = report["candidates"]["chosen"]
    row, index = len(cfg.trace_options) + 1, policy._buckets[""].normal.index  # the Beta strategy's row
    assert chosen["tokens"] == pytest.approx(stats.tokens[row, index + 1])
    assert chosen["tokens"] < stats.tokens[0, 0]
    # a caller that queues every trace at once (the Stepper) gets the plain strategy's certified value instead
    plain = next(p for p in (policy.plan(1000 + i, consensus=False) for i in range(20)) if p.kind == "policy")
    bucket = policy._buckets[""]
    assert plain.strategy == Strategy(K)
    assert plain.threshold == bucket.threshold_of(max(bucket.normal.plain_certified, default=-1))


def test_a_deepconf_warmup_strategy_is_one_candidate_with_its_own_threshold():
    """A DeepConf warm-up strategy sets its threshold per problem: it is
    certified as one candidate (no grid threshold), and a plan under it runs
    no fixed threshold."""
    cfg = PolicyConfig(**SMALL, strategies=((0, None, 1.0, "majority", 2, 10.0),))
    warmup = cfg.strategy_rows[len(cfg.trace_options)]  # the first (only) consensus strategy row
    assert warmup == Strategy(K, consensus_threshold=1.0, warmup=2, keep_percent=10.0)
    assert "DeepConf warm-up 2 keep 10%" in warmup.name
    policy = Policy(cfg)
    plans = _agreeing_stream(policy, 150, 1)
    certified = policy._buckets[""].last_eval["strategies_certified"]
    assert certified[warmup.name] == 1  # its "no grid threshold" column only
    under = [p for p in plans if p.kind == "policy" and p.strategy.warmup]
    assert all(p.threshold is None and p.stop.low_conf_threshold is None for p in under)


def test_fewer_traces_can_be_certified_for_normal_operation():
    """fewer_traces="always": a fewer-trace option is a normal-mode strategy
    of its own (one more test path); when it is certified and saves most,
    plans run that many traces."""
    kwargs = dict(SMALL, overload_traces=(2,), strategies=())
    assert PolicyConfig(**kwargs).normal_rows == ()
    cfg = PolicyConfig(**kwargs, fewer_traces="always")
    assert cfg.normal_rows == (1,)
    plans = _agreeing_stream(Policy(cfg), 150, 2)
    last = [p for p in plans[-20:] if p.kind == "policy"]
    assert last and all(p.traces == 2 and p.strategy == Strategy(2) for p in last)


def test_an_overload_only_strategy_is_served_in_overload_only():
    """overload_strategies are replayed on the control requests and certified at
    epsilon_overload like the others, but they are no normal-mode path: never
    in force in normal operation (min_evidence does not grow), and the
    strategy an overloaded bucket runs when it saves most."""
    strategies = ((2, "unbeatable", 1.0, "majority"),)
    aggressive = Strategy(K, 2, "beta", 0.6)
    cfg = PolicyConfig(**SMALL, strategies=strategies, overload_strategies=((2, "beta", 0.6, "majority"),),
                       overload_traces=(K,))  # no fewer-trace options: the consensus strategies compete
    assert cfg.strategy_rows[-1] == aggressive and list(cfg.overload_only_rows) == [len(cfg.strategy_rows) - 1]
    assert cfg.normal_rows == tuple(range(len(cfg.trace_options), len(cfg.strategy_rows) - 1))
    assert cfg.min_evidence == PolicyConfig(**SMALL, strategies=strategies, overload_strategies=(),
                                            overload_traces=(K,)).min_evidence
    policy = Policy(cfg)
    normal = _agreeing_stream(policy, 150, 3)
    assert all(p.strategy != aggressive for p in normal)
    assert policy.thresholds()[""]["strategy"] != aggressive.name
    policy.observe_load(queue_depth=1000.0)
    assert policy.observe_load(queue_depth=1000.0)  # enter_after=2 hot observations: overloaded
    rng = np.random.default_rng(4)
    served = []
    for rid in range(150, 190):
        plan = policy.plan(rid)
        served.append(plan)
        policy.observe(rid, [TraceOutcome(answer=7, num_tokens=12, reason=int(StopReason.EOS),
                                          signal=rng.normal(-0.5, 0.2, 12).astype(np.float32))
                             for _ in range(plan.traces)])
    served = [p for p in served if p.kind == "policy"]
    assert served and all(p.overload and p.strategy == aggressive and p.epsilon == SMALL["epsilon_overload"]
                          for p in served)
    with pytest.raises(ValueError, match=r"overload_strategies\[0\] must be \(wave_size"):
        PolicyConfig(**SMALL, overload_strategies=((2, "beta"),))


def test_fewer_traces_turned_off_stay_off_through_a_round_trip():
    """overload_traces=(traces,) turns the fewer-trace options off; re-validating
    the config (the policy database's copy, a request class's config) keeps them
    off instead of restoring the defaults."""
    off = PolicyConfig(traces=8, overload_traces=(8,))
    assert off.trace_options == (8,)
    again = PolicyConfig.from_json(off.to_json())
    assert again == off and again.trace_options == (8,)
    assert off.for_class("standard").trace_options == (8,)
    assert PolicyConfig(traces=8).trace_options == (8, 6, 4, 2)
    Policy(off).close()  # stores the config and compares it with what it reads back


def _uncertified_plans(policy: Policy, requests: int, **plan_kw) -> list:
    """Plans of a bucket that gets no labels (nothing is ever certified)."""
    rng = np.random.default_rng(1)
    plans = []
    for rid in range(requests):
        plan = policy.plan(rid, **plan_kw)
        plans.append(plan)
        policy.observe(rid, [TraceOutcome(answer=int(a), num_tokens=12, reason=int(StopReason.EOS),
                                          signal=rng.normal(-0.5, 0.2, 12).astype(np.float32))
                             for a in rng.integers(0, 3, plan.traces)])
    return plans


def test_a_new_bucket_starts_exact_before_anything_is_certified():
    """start="exact" (the default): before its bucket is certified a request runs
    the first unbeatable strategy with no cut, whose vote is the uncut vote; with
    start="uncut", without such a strategy, or for a caller that cannot run
    consensus (plan(consensus=False)) it runs all K traces at once."""
    exact = Strategy(K, 2, "unbeatable", 1.0)
    strategies = ((2, "beta", 0.9, "majority"), (2, "unbeatable", 1.0, "majority"))
    assert PolicyConfig().start == "exact"
    policy = Policy(PolicyConfig(**SMALL, strategies=strategies))
    served = [p for p in _uncertified_plans(policy, 40) if p.kind == "policy"]
    assert served and all(p.strategy == exact and p.threshold is None and p.traces == K and p.how != "certified"
                          for p in served)
    # the user-report guard counts their answers as uncut ones: they are the uncut answers
    assert {policy.store.request(p.request_id)["sliced"] for p in served} == {"uncut"}
    for cfg, kw in ((PolicyConfig(**SMALL, strategies=strategies, start="uncut"), {}),
                    (PolicyConfig(**SMALL, strategies=((2, "beta", 0.9, "majority"),)), {}),
                    (PolicyConfig(**SMALL, strategies=strategies), {"consensus": False})):
        served = [p for p in _uncertified_plans(Policy(cfg), 40, **kw) if p.kind == "policy"]
        assert served and all(p.strategy == Strategy(K) and p.threshold is None for p in served), cfg.start


def test_a_ready_bucket_that_certified_nothing_keeps_the_exact_strategy():
    """A bucket's first checkpoint may certify nothing (here min_evidence is the
    binomial floor, below what each chain needs at that checkpoint's level).
    The bucket is then ready on its own test and still runs the exact strategy
    with no cut -- its vote is the uncut vote, so it needs no certificate --
    instead of falling back to all K traces at once."""
    exact = Strategy(K, 2, "unbeatable", 1.0)
    cfg = PolicyConfig(**{**SMALL, "min_evidence": 11},
                       strategies=((2, "unbeatable", 1.0, "majority"), (2, "beta", 0.9, "majority")))
    policy = Policy(cfg)
    rng = np.random.default_rng(3)
    empty_ready = []
    for rid in range(150):
        bucket = policy._buckets.get("")
        nothing = bucket is not None and bucket.ready and not any(bucket.anytime["sets"].values())
        plan = policy.plan(rid)
        if nothing and plan.kind == "policy":
            empty_ready.append(plan)
        policy.observe(rid, [TraceOutcome(answer=7, num_tokens=12, reason=int(StopReason.EOS),
                                          signal=rng.normal(-0.5, 0.2, 12).astype(np.float32))
                             for _ in range(plan.traces)])
        policy.feedback(rid, True, reference=7)
    assert empty_ready, "the stream never showed a ready bucket with nothing certified"
    assert all(p.how == "certified" and p.strategy == exact and p.threshold is None for p in empty_ready), \
        [(p.strategy.name, p.threshold) for p in empty_ready]
    assert policy.thresholds()[""]["strategy"] == "K=8, waves of 2, beta 0.9"  # certified later, and reached


def test_an_unbeatable_strategy_with_another_weighting_is_not_exact():
    """The unbeatable rule gives the full vote under its own weighting; when that
    differs from the config's (row 0, the uncut baseline) the answers can
    differ, so it is neither the exact start nor a candidate without a
    certificate, and its answers count as cut for the user-report guard."""
    from haltwise.policy.evaluation import choose
    from haltwise.voting import weighted_vote

    answers, weights = [1, 1, 2, 2, 2], [0.9, 0.9, 0.1, 0.1, 0.1]
    assert weighted_vote(answers, None) == 2 and weighted_vote(answers, weights) == 1
    same = PolicyConfig(**SMALL, strategies=((2, "unbeatable", 1.0, "majority"),))
    other = PolicyConfig(**SMALL, strategies=((2, "unbeatable", 1.0, "confidence"),))
    row = len(same.trace_options)
    assert same.start_row == row and other.start_row == 0
    assert same.strategy_rows[row].same_vote_as(same.strategy_rows[0])
    assert not other.strategy_rows[row].same_vote_as(other.strategy_rows[0])
    for cfg, holds in ((same, [-1]), (other, [])):
        sets = {"normal": [], f"normal/{row}": []}
        sets.update({f"overload/{k}": [] for k in cfg.trace_options})
        sets.update({f"overload/s{r}": [] for r in range(len(cfg.trace_options), len(cfg.strategy_rows))})
        tokens = {0: 100.0, row: 60.0}
        got = choose(sets, gain=lambda r, c: -tokens[r], in_force=(0, -1), strategy_rows=cfg.strategy_rows,
                     trace_options=cfg.trace_options, overload_row=0, guard=None)
        assert got.rows[row] == holds
        assert (got.target_row, got.target) == ((row, -1) if holds else (0, -1))
    policy = Policy(other)
    served = [p for p in _uncertified_plans(policy, 30) if p.kind == "policy"]
    assert served and all(p.strategy == Strategy(K) for p in served)


def test_the_unbeatable_vote_is_the_uncut_vote():
    """What makes start="exact" lose nothing: on any traces (votes, missing votes,
    ties, lengths) the unbeatable strategy's answer is the vote of all K traces."""
    from haltwise.voting import weighted_vote

    rng = np.random.default_rng(7)
    for _ in range(2000):
        k = int(rng.integers(1, 10))
        answers = [None if rng.random() < 0.2 else int(rng.integers(0, 3)) for _ in range(k)]
        lengths = rng.integers(1, 30, k)
        for wave in (0, 1, 3):
            strategy = Strategy(k, wave, "unbeatable")
            answer, _ = replay(strategy, answers, np.ones(k), lengths)
            assert answer == weighted_vote(answers, None), (answers, lengths.tolist(), wave)
