"""Calibration: a trace profile answers every threshold's cut exactly as
tracebank.cut_length and the live scheduler do; the vectorised vote equals
voting.weighted_vote; grids, the DeepConf start and paired differences."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from haltwise.decoding.parallel import VOTING_REASONS as PARALLEL_VOTING_REASONS
from haltwise.policy.calibration import (NO_VOTE, VOTING_REASONS, candidate_outcomes, deepconf_index, differences,
                                         make_grid, quantile_levels, trace_profile, vote_matrix)
from haltwise.scheduler import Scheduler, StopConfig, StopReason
from haltwise.stepper import HostSignals
from haltwise.tracebank import cut_length, lowest_window_mean
from haltwise.voting import warmup_threshold, weighted_vote

values_strategy = arrays(np.float64, st.integers(1, 60), elements=st.floats(-6, 0, allow_nan=False, width=32))


def test_voting_reasons_and_vote_weight_have_one_definition():
    from haltwise import trace_rules

    assert VOTING_REASONS is PARALLEL_VOTING_REASONS is trace_rules.VOTING_REASONS
    assert trace_rules.vote_weight(float("nan")) == 0.0
    assert trace_rules.vote_weight(-0.5) == pytest.approx(math.exp(-0.5))
    w = trace_rules.vote_weights([-0.5, float("nan"), 0.0])
    assert w.tolist() == pytest.approx([math.exp(-0.5), 0.0, 1.0])


@settings(max_examples=150, deadline=None)
@given(values=values_strategy, window=st.integers(1, 20), min_new=st.integers(0, 25),
       reason=st.sampled_from([StopReason.EOS, StopReason.MAX_TOKENS, StopReason.CONFIDENT]),
       probes=st.lists(st.floats(-7, 0.5), min_size=1, max_size=8))
def test_profile_cuts_equal_tracebank_cut_length(values, window, min_new, reason, probes):
    prof = trace_profile(values, reason=int(reason), answer=3, window=window, min_new_tokens=min_new)
    # EOS / MAX_TOKENS end the trace before LOW_CONFIDENCE is evaluated on the last token; CONFIDENT does not
    last = reason == StopReason.CONFIDENT
    expected_lowest = lowest_window_mean(values, window=window, min_new_tokens=min_new, last_evaluated=last)
    assert (math.isnan(prof.lowest) and math.isnan(expected_lowest)) or prof.lowest == pytest.approx(expected_lowest)
    got = prof.cut_lengths(np.array(probes))
    for t, n in zip(probes, got):
        cut = cut_length(values, t, window=window, min_new_tokens=min_new, last_evaluated=last)
        assert n == (len(values) if cut is None else cut)
        assert prof.cut_length(t) == cut


@pytest.mark.parametrize("window,min_new", [(4, 0), (4, 6), (8, 3)])
def test_profile_agrees_with_the_live_scheduler_at_the_last_token(window, min_new):
    """An EOS trace whose window mean dips only at its final token is NOT cut
    by the scheduler (EOS fires first); neither the profile nor
    tracebank.cut_length cuts it, unless told the last token was evaluated."""
    rng = np.random.default_rng(window + min_new)
    values = np.concatenate([rng.uniform(-0.2, 0.0, size=30), [-8.0]]).astype(np.float32)
    prof = trace_profile(values, reason=int(StopReason.EOS), answer=1, window=window, min_new_tokens=min_new)
    threshold = float(prof.lowest) - 0.05  # above the final dip's window mean, below every earlier one
    assert cut_length(values, threshold, window=window, min_new_tokens=min_new) is None
    assert cut_length(values, threshold, window=window, min_new_tokens=min_new, last_evaluated=True) == len(values)
    assert prof.cut_length(threshold) is None
    sched = Scheduler(1)
    sched.submit(0, max_new_tokens=100, stop=StopConfig(eos_ids=[2], low_conf_signal="logprob",
                                                         low_conf_threshold=threshold, window=window,
                                                         min_new_tokens=min_new))
    sched.step(np.zeros(0, np.int64), HostSignals.zeros(0))
    for n, v in enumerate(values):
        z = HostSignals.zeros(1)
        plan = sched.step(np.array([2 if n == len(values) - 1 else 5]),
                          HostSignals(np.array([v]), z.entropy, z.confidence, z.margin, z.topk_conf, z.status))
        if plan.finished:
            record = plan.finished[0]
            break
    assert record.reason == StopReason.EOS and record.num_tokens == len(values)
    assert record.min_window_mean == pytest.approx(prof.lowest, rel=1e-6)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), K=st.integers(1, 10), T=st.integers(1, 6), weighted=st.booleans())
def test_vote_matrix_equals_weighted_vote(data, K, T, weighted):
    answers = np.array(data.draw(st.lists(st.sampled_from([NO_VOTE, 1, 2, 3, 7]), min_size=K, max_size=K)),
                       dtype=np.int64)
    weights = np.array(data.draw(st.lists(st.floats(0, 1), min_size=K, max_size=K))) if weighted else None
    kept = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=K, max_size=K), min_size=T, max_size=T)))
    got = vote_matrix(answers, weights, kept)
    for t in range(T):
        idx = [k for k in range(K) if kept[t, k] and answers[k] != NO_VOTE]
        expected = weighted_vote([int(answers[k]) for k in idx], None if weights is None else [weights[k] for k in idx])
        assert got[t] == (NO_VOTE if expected is None else expected)


def profiles_of(rows, window=4, min_new=4):
    return [trace_profile(np.asarray(v, float), reason=int(StopReason.EOS), answer=a, window=window,
                          min_new_tokens=min_new) for v, a in rows]


def test_candidate_outcomes_replay_each_candidate():
    rng = np.random.default_rng(3)
    rows = [(rng.uniform(-0.3, 0, 20), 5), (rng.uniform(-0.3, 0, 20), 5),
            (np.r_[rng.uniform(-0.3, 0, 8), np.full(6, -3.0), rng.uniform(-0.3, 0, 6)], 9),
            (np.r_[rng.uniform(-0.3, 0, 10), np.full(6, -1.0), rng.uniform(-0.3, 0, 4)], 9)]
    profiles = profiles_of(rows)
    grid = np.array([-2.5, -0.8])
    out = candidate_outcomes(profiles, grid, (4, 2), weighting="majority")
    # row 0: 4 traces. no cut: 5 vs 9 tie -> first seen (5). -2.5 cuts trace 2 -> 5. -0.8 cuts traces 2 and 3 -> 5
    assert out.answers[0].tolist() == [5, 5, 5]
    tokens_cut2 = profiles[2].cut_length(-2.5)
    assert out.tokens[0, 1] == 60 + tokens_cut2
    assert out.tokens[0, 2] == 40 + profiles[2].cut_length(-0.8) + profiles[3].cut_length(-0.8)
    assert out.tokens[1].tolist() == [40, 40, 40]  # row 1: the first two traces never cut
    with pytest.raises(ValueError, match=r"trace_options\[0\] must be the request's 4 traces"):
        candidate_outcomes(profiles, grid, (2,), weighting="majority")


def test_differences_are_exact_with_a_reference_and_an_upper_bound_without():
    from haltwise.policy.calibration import CandidateOutcomes

    out = CandidateOutcomes(trace_options=(4,), answers=np.array([[5, 5, 9, NO_VOTE]]), tokens=np.zeros((1, 4), int))
    np.testing.assert_array_equal(differences(out, correct=True, reference=5), [[0, 0, 1, 1]])
    np.testing.assert_array_equal(differences(out, correct=False, reference=9), [[0, 0, -1, 0]])
    np.testing.assert_array_equal(differences(out, correct=True, reference=None), [[0, 0, 1, 1]])
    # uncut wrong, no reference: whether 9 is right is unknown; 0 bounds the true -1 or 0 from above
    np.testing.assert_array_equal(differences(out, correct=False, reference=None), [[0, 0, 0, 0]])


def test_grid_and_deepconf_start():
    lowests = list(np.linspace(-3, -0.1, 101)) + [math.nan]
    levels = quantile_levels(5, 0.1, 0.5)
    grid = make_grid(lowests, levels)
    quantiles = np.quantile(np.linspace(-3, -0.1, 101), levels)
    assert set(np.round(quantiles, 12)) <= set(np.round(grid, 12))
    assert np.all(np.diff(grid) > 0) and grid[0] == quantiles[0] and grid[-1] == quantiles[-1]
    # a clump of confident traces and a few low ones: the even part fills the gap between them
    clumped = make_grid([-2.0, -1.5] + [-0.01 - 0.001 * i for i in range(40)], quantile_levels(10, 0.0, 0.9))
    assert np.max(np.diff(clumped)) <= (clumped[-1] - clumped[0]) / 9 + 1e-12  # 10 even points, 9 gaps
    index = deepconf_index(lowests, 90.0, grid)
    assert grid[index] <= warmup_threshold([v for v in lowests if not math.isnan(v)], 90.0) < grid[index + 1]
    assert deepconf_index(lowests, 100.0, grid) == -1  # keep everything: below the whole grid
    with pytest.raises(ValueError, match="no finite window mean"):
        make_grid([math.nan], levels)
    with pytest.raises(ValueError, match="need 0 <= low <= high <= 1"):
        quantile_levels(3, 0.5, 0.1)
