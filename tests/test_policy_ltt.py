"""The accuracy test: exact p-values, and the false-acceptance rate of the
whole certification (fixed-sequence chains over a grid) checked by
simulation over many seeds -- including a naive procedure the same check
must catch, so the check itself can fail."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haltwise.policy import ltt

EPS, DELTA = 0.02, 0.1
SEEDS = 2000
# a rate estimated from SEEDS Bernoulli draws exceeds delta by 3 standard errors with probability ~0.1%
SLACK = 3 * math.sqrt(DELTA * (1 - DELTA) / SEEDS)


def exact_cdf(k: int, n: int, p: float) -> float:
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, min(k, n) + 1))


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.3), (3, 100, 0.02), (40, 1000, 0.05), (41, 1000, 0.05),
                                   (17, 60, 0.4), (59, 60, 0.99), (5, 5, 0.5), (-1, 5, 0.5)])
def test_binomial_cdf_matches_the_sum_of_the_pmf(k, n, p):
    # k <= 40 and k > 40 take different code paths (plain loop vs numpy)
    assert ltt.binomial_cdf(k, n, p) == pytest.approx(exact_cdf(k, n, p) if k >= 0 else 0.0, rel=1e-10, abs=1e-300)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), frac=st.floats(0, 1), alpha=st.sampled_from([0.01, 0.05, 0.1, 0.3]))
def test_clopper_pearson_upper_is_the_level_alpha_point(n, frac, alpha):
    k = int(frac * n)
    upper = ltt.clopper_pearson_upper(k, n, alpha)
    if k == n:
        assert upper == 1.0
        return
    # conservative side: at the bound the lower tail is <= alpha, a hair below it is > alpha
    assert ltt.binomial_cdf(k, n, upper) <= alpha
    assert ltt.binomial_cdf(k, n, upper * (1 - 1e-6)) > alpha * (1 - 1e-3)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 600), h=st.integers(0, 80), g=st.integers(0, 120),
       eps=st.sampled_from([0.02, 0.05, 0.1]), delta=st.sampled_from([0.1, 0.05, 0.0333, 0.0167]))
def test_mcnemar_fast_decision_equals_the_literal_one(n, h, g, eps, delta):
    if h + g > n:
        return
    assert ltt.mcnemar_rejects(h, g, n, eps, delta) == ltt._mcnemar_rejects_direct(h, g, n, eps, delta)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(20, 600), h=st.integers(0, 40), g=st.integers(0, 60), extra=st.integers(1, 20))
def test_mcnemar_is_monotone_more_helps_never_hurt_more_harms_never_help(n, h, g, extra):
    if h + g + extra > n:
        return
    base = ltt.mcnemar_rejects(h, g, n, EPS, DELTA)
    if base:
        assert ltt.mcnemar_rejects(h, g + extra, n, EPS, DELTA)
    if not base:
        assert not ltt.mcnemar_rejects(h + extra, g, n, EPS, DELTA)


def test_min_evidence_is_the_first_n_that_can_certify():
    for test in ltt.TESTS:
        n = ltt.min_evidence(EPS, DELTA, test)
        assert ltt.rejects(test, 0, 0, n, EPS, DELTA)
        assert not ltt.rejects(test, 0, 0, n - 1, EPS, DELTA)
    assert ltt.min_evidence(EPS, DELTA, "binomial") == 114  # ceil(log 0.1 / log 0.98)


def test_fixed_sequence_stops_at_the_first_failure():
    calls = []

    def decide(i, result):
        def f():
            calls.append(i)
            return result
        return f

    assert ltt.fixed_sequence([decide(0, True), decide(1, True), decide(2, False), decide(3, True)]) == 1
    assert calls == [0, 1, 2]  # candidate 3 is never tested
    assert ltt.fixed_sequence([decide(0, False)]) == -1


def test_certified_set_chains_start_at_fixed_points_and_skip_a_blocked_candidate():
    assert ltt.chain_starts(40, 3) == [0, 13, 26]
    assert ltt.chain_starts(2, 3) == [0, 1]
    n = 400
    harms = np.zeros(30, int)
    helps = np.zeros(30, int)
    harms[2] = 40  # one bad early candidate
    out = ltt.certified_set(harms, helps, n, epsilon=EPS, delta=DELTA, test="binomial", starts=3)
    assert out == [0, 1] + list(range(10, 30))
    assert ltt.certified_set(harms, helps, n, epsilon=EPS, delta=DELTA, test="binomial", starts=1) == [0, 1]


# ---- validity by simulation ------------------------------------------------------------


def simulate_chain(rng: np.random.Generator, n: int, harm: np.ndarray, help_: np.ndarray) -> np.ndarray:
    """(n, C) paired differences for C nested candidates: one uniform per
    problem decides, for every candidate at once, whether it is harmed or
    helped (so the candidates' outcomes are dependent, as on real traces)."""
    u = rng.random((n, 1))
    d = np.zeros((n, len(harm)), dtype=np.int8)
    d[u < harm[None, :]] = 1
    d[(u >= 1 - help_[None, :])] = -1
    return d


def false_acceptance(procedure, harm, help_, n, seeds=SEEDS) -> float:
    """Share of seeds where the chosen candidate's true EM drop exceeds EPS."""
    drop = harm - help_
    rng = np.random.default_rng(12345)
    bad = 0
    for _ in range(seeds):
        chosen = procedure(simulate_chain(rng, n, harm, help_))
        bad += chosen >= 0 and drop[chosen] > EPS
    return bad / seeds


def ltt_procedure(test: str, starts: int):
    def choose(d):
        harms, helps = ltt.chain_counts(d)
        out = ltt.certified_set(harms, helps, d.shape[0], epsilon=EPS, delta=DELTA, test=test, starts=starts)
        return max(out, default=-1)
    return choose


def naive_procedure(d):
    """Most aggressive candidate whose observed EM drop is within the budget: no test at all."""
    ok = np.flatnonzero(d.mean(axis=0) <= EPS)
    return int(ok.max()) if ok.size else -1


# Every candidate's EM drop is just above epsilon: any certification is a false acceptance.
ALL_NULL = (np.linspace(0.03, 0.12, 10), np.linspace(0.03, 0.12, 10) - EPS - 0.001)
# A realistic chain: drop falls below zero (cuts fix answers), then climbs past epsilon.
CROSSING = (np.linspace(0.002, 0.15, 12), np.array([0.004, 0.02, 0.04, 0.06, 0.075, 0.085, 0.09, 0.09, 0.085,
                                                    0.08, 0.07, 0.06]))


@pytest.mark.parametrize("test", ltt.TESTS)
@pytest.mark.parametrize("starts", [1, 3])
@pytest.mark.parametrize("harm,help_,n", [(*ALL_NULL, 300), (*CROSSING, 200), (*CROSSING, 600)])
def test_false_acceptance_is_at_most_delta(test, starts, harm, help_, n):
    rate = false_acceptance(ltt_procedure(test, starts), harm, help_, n)
    assert rate <= DELTA + SLACK, f"{test} with {starts} chains accepted a too-aggressive candidate {rate:.3f}"


def test_the_simulation_catches_an_invalid_procedure():
    # the naive rule picks a candidate that breaks the budget far more often than delta
    assert false_acceptance(naive_procedure, *ALL_NULL, 300, seeds=500) > 3 * DELTA


def test_the_binomial_test_is_exact_at_the_boundary():
    # P(harm) = epsilon exactly, no helps: the rejection rate of the exact test approaches delta from below
    rng = np.random.default_rng(7)
    n, seeds = 500, 4000
    harms = rng.binomial(n, EPS, size=seeds)
    rate = np.mean([ltt.rejects("binomial", int(h), 0, n, EPS, DELTA) for h in harms])
    assert rate <= DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / seeds)
    assert rate >= DELTA / 2  # exact, not wildly conservative


def test_certify_rejects_bad_input():
    with pytest.raises(ValueError, match="differences must be 2-D"):
        ltt.certify(np.zeros(3), epsilon=EPS, delta=DELTA, test="binomial")
    with pytest.raises(ValueError, match="only -1, 0 and 1"):
        ltt.certify(np.full((3, 2), 2), epsilon=EPS, delta=DELTA, test="binomial")
    with pytest.raises(ValueError, match="test must be one of"):
        ltt.rejects("z-test", 0, 0, 10, EPS, DELTA)
    with pytest.raises(ValueError, match="p must be in"):
        ltt.binomial_cdf(1, 10, 1.5)


def test_the_test_caches_stay_bounded_over_a_stream_of_levels():
    """The re-test schedule spends a new level at every checkpoint, so cache
    entries of earlier levels are dead: a long-lived policy must not keep
    them (the soak's RSS grew ~20-40 bytes per request while rejects() and
    clopper_pearson_upper() filled caches of 2**18 and 2**16 entries)."""
    harms, helps = np.arange(8), np.full(8, 5)
    for j in range(1, 2000):  # far more (level, counts) keys than the bound
        level = DELTA * 6 / (math.pi ** 2 * j * j)
        ltt.certified_set(harms, helps, 200, epsilon=EPS, delta=level, test="mcnemar", starts=2)
    for cached in (ltt.rejects, ltt.clopper_pearson_upper):
        info = cached.cache_info()
        assert info.maxsize == ltt.SERVING_CACHE
        assert info.currsize <= ltt.SERVING_CACHE


def test_batch_cache_is_large_and_is_dropped_after_the_block():
    serving = ltt.rejects, ltt.clopper_pearson_upper
    with ltt.batch_cache(1 << 13):
        assert ltt.rejects is not serving[0] and ltt.clopper_pearson_upper is not serving[1]
        assert ltt.rejects.cache_info().maxsize == 1 << 13
        ltt.certified_set(np.arange(4), np.full(4, 3), 100, epsilon=EPS, delta=DELTA, test="mcnemar")
        assert ltt.rejects.cache_info().currsize > 0
        # same decisions as the serving caches
        assert ltt.rejects("mcnemar", 2, 3, 100, EPS, DELTA) == serving[0]("mcnemar", 2, 3, 100, EPS, DELTA)
    assert (ltt.rejects, ltt.clopper_pearson_upper) == serving
