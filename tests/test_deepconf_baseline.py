"""DeepConf online as its reference code does it (decoding/parallel.py, vote="deepconf")."""
import math

import pytest

from haltwise.decoding.parallel import (EarlyStopSettings, ProblemResult, TraceResult, lowest_group_confidence)
from haltwise.scheduler import StopReason
from haltwise.benchmarks.decode import DecodeBenchConfig, deepconf_setup, default_runs


def _trace(k, answer, lowest, reason=StopReason.EOS):
    return TraceResult(problem=0, trace=k, reason=reason, num_tokens=10, answer=answer, correct=answer == 7,
                       min_window_mean=lowest, mean_logprob=-0.1, lowest_conf=lowest)


def test_short_trace_uses_its_whole_mean():
    assert lowest_group_confidence(math.nan, 3.5) == 3.5
    assert lowest_group_confidence(2.0, 3.5) == 2.0


def test_votes_are_filtered_and_weighted_by_lowest_group_confidence():
    p = ProblemResult(answer=None, reference=7, threshold=5.0)
    # two confident traces say 7 (weights 9 + 8 = 17), three say 3: one of them below the threshold,
    # the others 10 + 6 = 16; cut trace never votes
    p.traces = [_trace(0, 3, 10.0), _trace(1, 7, 9.0), _trace(2, 3, 4.0), _trace(3, 7, 8.0), _trace(4, 3, 6.0),
                _trace(5, 3, 12.0, reason=StopReason.LOW_CONFIDENCE)]
    for t in p.traces:
        t.eligible = not t.lowest_conf < p.threshold
    assert p.vote("deepconf") == 7
    p.traces[2].eligible = True  # with the filtered trace back in, 3 wins 20 to 17
    assert p.vote("deepconf") == 3
    p.traces[2].eligible = False
    assert p.vote("majority") == 3  # unweighted: 3 has 2 votes (10, 6) against 7's 2; first seen wins


def test_bench_runs_keys_and_deepconf_setup():
    cfg = DecodeBenchConfig()
    runs = default_runs(cfg)
    assert [r.key for r in runs] == ["uncut", "deepconf_low", "deepconf_high", "static"]
    low, high = runs[1], runs[2]
    assert (low.warmup, low.keep_percent, high.keep_percent) == (16, 10.0, 90.0)
    assert low.signal == high.signal == "topk_conf" and low.vote == "deepconf" and low.window == 10
    assert runs[0].vote == "natural" and runs[3].consensus == "beta"
    assert deepconf_setup(DecodeBenchConfig(traces=8))["warmup"] == 4


def test_deepconf_vote_needs_a_signal_with_a_whole_mean():
    with pytest.raises(ValueError, match="vote='deepconf' needs a signal"):
        EarlyStopSettings(signal="margin", vote="deepconf")
    with pytest.raises(ValueError, match="vote must be"):
        EarlyStopSettings(vote="x")
