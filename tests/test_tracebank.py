"""The trace bank: round trip, and replay that agrees with the live scheduler."""
from __future__ import annotations


import numpy as np
import pytest

from haltwise.scheduler import Scheduler, StopConfig, StopReason
from haltwise.stepper import HostSignals
from haltwise.tracebank import NO_ANSWER, SIGNALS, TraceBank, cut_length, lowest_window_mean, window_means


def random_bank(P=5, K=4, seed=0) -> TraceBank:
    rng = np.random.default_rng(seed)
    traces = [[{"answer": (None if rng.random() < 0.2 else int(rng.integers(0, 5))), "reason": int(StopReason.EOS),
                **{name: rng.normal(size=int(rng.integers(1, 40))).astype(np.float32) for name in ["_len"]}}
               for _ in range(K)] for _ in range(P)]
    for row in traces:
        for t in row:
            n = len(t.pop("_len"))
            for name in SIGNALS:
                t[name] = rng.normal(-1.0, 1.0, size=n).astype(np.float32)
    return TraceBank.from_traces(rng.integers(0, 5, size=P), rng.integers(3, 7, size=P), traces,
                                 meta={"note": "test"})


def test_round_trip(tmp_path):
    bank = random_bank()
    path = tmp_path / "bank.npz"
    bank.save(path)
    back = TraceBank.load(path)
    for name in ("references", "difficulty", "answers", "reasons", "lengths", "offsets"):
        np.testing.assert_array_equal(getattr(back, name), getattr(bank, name))
    for name in SIGNALS:
        np.testing.assert_array_equal(back.signals[name], bank.signals[name])
    assert back.meta == {"note": "test"}
    assert (back.answers == NO_ANSWER).any() and back.correct.dtype == bool
    p, k = 3, 2
    assert len(back.signal(p, k, "logprob")) == back.lengths[p, k]
    np.testing.assert_array_equal(back.signal(p, k, "neg_entropy"), -back.signal(p, k, "entropy"))


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a trace bank"):
        TraceBank.load(path)


def test_window_means_brute_force():
    rng = np.random.default_rng(1)
    values = rng.normal(size=37)
    for window in (1, 4, 16, 50):
        expected = [values[max(0, t + 1 - window): t + 1].mean() for t in range(len(values))]
        np.testing.assert_allclose(window_means(values, window), expected, rtol=1e-12)


def feed(values, threshold, window, min_new):
    """Runs one sequence with these logprobs through the live scheduler."""
    sched = Scheduler(1)
    sched.submit(0, max_new_tokens=len(values), stop=StopConfig(
        low_conf_signal="logprob", low_conf_threshold=threshold, window=window, min_new_tokens=min_new))
    sched.step(np.zeros(0, np.int64), HostSignals.zeros(0))
    for v in values:
        zeros = HostSignals.zeros(1)
        plan = sched.step(np.array([5]), HostSignals(np.array([v], np.float32), zeros.entropy, zeros.confidence,
                                                     zeros.margin, zeros.topk_conf, zeros.status))
        if plan.finished:
            return plan.finished[0]
    raise AssertionError("the sequence never ended")


@pytest.mark.parametrize("window,min_new", [(4, 0), (4, 6), (8, 3), (1, 1)])
def test_replay_matches_the_live_scheduler(window, min_new):
    rng = np.random.default_rng(window * 10 + min_new)
    values = rng.normal(-1.0, 0.8, size=60).astype(np.float32)
    lowest = lowest_window_mean(values, window=window, min_new_tokens=min_new)
    uncut = feed(values, None, window, min_new)
    assert uncut.reason == StopReason.MAX_TOKENS and uncut.min_window_mean == pytest.approx(lowest, rel=1e-9)
    for threshold in (lowest - 1e-3, lowest + 1e-3, float(np.median(values))):
        record = feed(values, threshold, window, min_new)
        expected = cut_length(values, threshold, window=window, min_new_tokens=min_new)
        if expected is None:
            assert record.reason == StopReason.MAX_TOKENS
        else:
            assert record.reason == StopReason.LOW_CONFIDENCE and record.num_tokens == expected
            assert record.min_window_mean == pytest.approx(lowest_window_mean(
                values[: record.num_tokens], window=window, min_new_tokens=min_new, last_evaluated=True), rel=1e-9)


def test_the_last_token_of_a_finished_trace_never_cuts():
    # Only the last window mean is low: the token that ends the trace (here
    # MAX_TOKENS) is checked first, so neither the scheduler nor the replay cuts.
    values = np.array([-0.1] * 9 + [-50.0], dtype=np.float32)
    assert cut_length(values, -1.0, window=4, min_new_tokens=0) is None
    assert feed(values, -1.0, 4, 0).reason == StopReason.MAX_TOKENS
    assert lowest_window_mean(values, window=4, min_new_tokens=0) == pytest.approx(-0.1)
