"""Voting and settle rules (haltwise.voting)."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from haltwise.voting import beta_leader_probability, leader_counts, vote_settled, warmup_threshold, weighted_vote


def test_weighted_vote():
    assert weighted_vote([3, 5, 5, None]) == 5
    assert weighted_vote([3, 5, 5], [3.0, 1.0, 1.0]) == 3
    assert weighted_vote([7, 8]) == 7  # tie: first seen
    assert weighted_vote([None, None]) is None and weighted_vote([]) is None


def test_beta_leader_probability_known_values():
    assert beta_leader_probability(0, 0) == pytest.approx(0.5)
    # Beta(2, 1): P(X > 1/2) = 1 - 0.25
    assert beta_leader_probability(1, 0) == pytest.approx(0.75)
    # Beta(3, 1): 1 - (1/2)^3
    assert beta_leader_probability(2, 0) == pytest.approx(0.875)
    # Beta(3, 2): 1 - I_0.5(3, 2) = 1 - 5/16
    assert beta_leader_probability(2, 1) == pytest.approx(11 / 16)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.integers(0, 40), st.integers(0, 40))
def test_beta_leader_probability_matches_numerical_integration(first, second):
    a, b = first + 1, second + 1
    n = 20000  # midpoint rule of the Beta density on (1/2, 1)
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    xs = [0.5 + (i + 0.5) * 0.5 / n for i in range(n)]
    integral = sum(math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x)) for x in xs) * 0.5 / n
    assert beta_leader_probability(first, second) == pytest.approx(integral, abs=2e-4)


def test_vote_settled_rules():
    assert leader_counts([1, 1, 2, None]) == (2, 1)
    assert vote_settled([4, 4, 4, 4], rule="beta", threshold=0.95, remaining=10)  # 1 - 1/32
    assert not vote_settled([4, 4, 4, 5], rule="beta", threshold=0.95, remaining=10)
    assert vote_settled([2, 2, 2, 9], rule="run", threshold=3, remaining=0)
    assert not vote_settled([2, 9, 2, 2], rule="run", threshold=3, remaining=0)
    assert vote_settled([1, 1, 1, 2], rule="unbeatable", threshold=0, remaining=1)
    assert not vote_settled([1, 1, 1, 2], rule="unbeatable", threshold=0, remaining=2)
    with pytest.raises(ValueError, match="rule must be"):
        vote_settled([1], rule="magic", threshold=0, remaining=0)


def test_warmup_threshold_percentile():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert warmup_threshold(values, keep_percent=100) == 1.0
    assert warmup_threshold(values, keep_percent=50) == 3.0
    assert warmup_threshold(values + [float("nan")], keep_percent=10) == pytest.approx(4.6)
    with pytest.raises(ValueError, match="keep_percent"):
        warmup_threshold(values, keep_percent=0)
    with pytest.raises(ValueError, match="at least one"):
        warmup_threshold([float("nan")], keep_percent=50)
