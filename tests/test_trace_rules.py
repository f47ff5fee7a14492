"""haltwise.trace_rules and haltwise.hashing: one definition of each trace
rule, and every user of it agrees (vote weight of a NaN mean, signal
orientation, where a threshold cuts a trace, splitmix64)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from haltwise import trace_rules
from haltwise.decoding.parallel import ProblemResult, TraceResult
from haltwise.hashing import GOLDEN_GAMMA, splitmix64
from haltwise.policy.calibration import ENDS_BEFORE_CONFIDENCE, evaluated_length, trace_profile
from haltwise.policy.config import PolicyConfig
from haltwise.policy.policy import control_draw
from haltwise.policy.types import TraceOutcome
from haltwise.policy.replay import BankTraces
from haltwise.scheduler import StopReason
from haltwise.stepper import row_seeds
from haltwise.tracebank import SIGNALS, TraceBank, cut_length, replay_warmup_cut, window_means

NAN = float("nan")


def _bank(traces: list[list[dict]], references: list[int]) -> TraceBank:
    rows = []
    for row in traces:
        out = []
        for t in row:
            n = len(t["logprob"])
            out.append({"answer": t["answer"], "reason": int(t.get("reason", StopReason.EOS)),
                        **{name: np.asarray(t.get(name, np.full(n, -0.1)), np.float32) for name in SIGNALS}})
        rows.append(out)
    return TraceBank.from_traces(references, [1] * len(references), rows)


# ---- vote weight ------------------------------------------------------------------------------------------


def test_vote_weight_of_a_nan_mean_is_zero():
    assert trace_rules.vote_weight(NAN) == 0.0
    assert trace_rules.vote_weight(-0.5) == pytest.approx(math.exp(-0.5))
    assert trace_rules.vote_weights([-0.5, NAN, 0.0]).tolist() == pytest.approx([math.exp(-0.5), 0.0, 1.0])


def _trace(k: int, answer: int, mean_logprob: float) -> TraceResult:
    return TraceResult(problem=0, trace=k, reason=StopReason.EOS, num_tokens=5, answer=answer, correct=False,
                       min_window_mean=NAN, mean_logprob=mean_logprob)


def test_a_nan_mean_votes_with_weight_zero_in_the_parallel_sampler():
    # first reported and NaN: a NaN weight would keep answer 1 in front (max never replaces a NaN key)
    problem = ProblemResult(answer=None, reference=2, threshold=None,
                            traces=[_trace(0, 1, NAN), _trace(1, 2, -4.0)])
    assert problem.traces[0].weight == 0.0
    assert problem.vote("confidence") == 2
    assert problem.vote("majority") == 1  # tie of one vote each: the first trace


def test_a_nan_mean_votes_with_weight_zero_in_the_bank_replays():
    nan_logprob = {"answer": 1, "logprob": np.full(6, np.nan)}
    sure = {"answer": 2, "logprob": np.full(6, -3.0)}
    empty = {"answer": 3, "logprob": np.zeros(0)}
    bank = _bank([[nan_logprob, sure, empty]], references=[2])
    # tracebank's DeepConf replay (no warm-up: every trace votes)
    out = replay_warmup_cut(bank, warmup=0, keep_percent=90, signal="logprob", window=2, weighting="confidence")
    assert out.correct.tolist() == [True]
    # the policy replay's profiles and means
    traces = BankTraces(bank, PolicyConfig(traces=3, window=2, min_new_tokens=1, weighting="confidence"))
    assert [p.weight for p in traces.profiles[0]] == [0.0, pytest.approx(math.exp(-3.0)), 0.0]
    assert trace_rules.vote_weights(traces.mean_logprob[0]).tolist() == [0.0, pytest.approx(math.exp(-3.0)), 0.0]
    # the policy's profile of a trace it is handed
    assert trace_profile(np.zeros(4), reason=int(StopReason.EOS), answer=1, window=2, min_new_tokens=1,
                         mean_logprob=NAN).weight == 0.0


# ---- orientation ----------------------------------------------------------------------------------------


def test_oriented_signal_and_its_users():
    raw = {"entropy": np.array([0.5, 2.0], np.float32), "logprob": np.array([-0.1, -3.0], np.float32)}
    assert trace_rules.oriented_signal(raw, "neg_entropy").tolist() == [-0.5, -2.0]
    assert trace_rules.oriented_signal(raw, "logprob").tolist() == pytest.approx([-0.1, -3.0])
    assert trace_rules.oriented_signal(raw, "logprob", np.float64).dtype == np.float64
    with pytest.raises(KeyError):
        trace_rules.oriented_signal(raw, "margin")
    bank = _bank([[{"answer": 1, "logprob": raw["logprob"], "entropy": raw["entropy"]}]], references=[1])
    assert bank.signal(0, 0, "neg_entropy").tolist() == [-0.5, -2.0]
    assert bank.signal(0, 0, "neg_entropy").dtype == np.float32

    class Record:
        num_tokens, reason, mean_logprob, would_stop_step, would_stop_reason = 2, int(StopReason.EOS), -1.0, -1, None
        signals = raw

    assert TraceOutcome.from_finished(Record(), 1, signal="neg_entropy").signal.tolist() == [-0.5, -2.0]
    assert TraceOutcome.from_finished(Record(), 1, signal="logprob").signal.tolist() == pytest.approx([-0.1, -3.0])


# ---- where a threshold cuts a trace ----------------------------------------------------------------------


def _brute_cut(values: np.ndarray, threshold: float, window: int, min_new: int, evaluated: int) -> int | None:
    """The first evaluated token count n (n >= max(1, min_new), n <= evaluated) whose window mean < threshold."""
    for n in range(max(1, min_new), evaluated + 1):
        lo = max(0, n - window)
        if values[lo:n].astype(np.float64).mean() < threshold:
            return n
    return None


_values = arrays(np.float64, st.integers(0, 40), elements=st.floats(-6, 0, allow_nan=False, width=32))
_reasons = st.sampled_from([StopReason.EOS, StopReason.STOP_SEQUENCE, StopReason.MAX_TOKENS, StopReason.CONFIDENT,
                            StopReason.INVALID_LOGITS])


@settings(max_examples=300, deadline=None)
@given(values=_values, window=st.integers(1, 50), min_new=st.integers(0, 45), reason=_reasons,
       probes=st.lists(st.floats(-7, 0.5), min_size=1, max_size=6))
def test_tracebank_and_calibration_cut_a_trace_at_the_same_step(values, window, min_new, reason, probes):
    """Traces shorter than the window (or than min_new_tokens), empty ones, and
    traces whose last token a token rule ended (not evaluated) included."""
    last_evaluated = reason not in ENDS_BEFORE_CONFIDENCE
    evaluated = evaluated_length(len(values), int(reason))
    assert evaluated == (len(values) if last_evaluated else max(len(values) - 1, 0))
    prof = trace_profile(values, reason=int(reason), answer=1, window=window, min_new_tokens=min_new)
    # thresholds equal to window means hit the boundary (< cuts, == does not)
    means = window_means(values, window) if len(values) else np.zeros(0)
    thresholds = list(probes) + [float(m) for m in means[:3]]
    lengths = prof.cut_lengths(np.array(thresholds))
    for t, n in zip(thresholds, lengths):
        expected = _brute_cut(values, t, window, min_new, evaluated)
        assert cut_length(values, t, window=window, min_new_tokens=min_new, last_evaluated=last_evaluated) == expected
        assert prof.cut_length(t) == expected
        assert n == (len(values) if expected is None else expected)


def test_first_cut_step_edges():
    running = np.array([-0.5, -0.5, -1.0, -2.0])
    assert trace_rules.first_cut_step(running[:2], 3, -0.5) is None  # == does not cut
    assert trace_rules.first_cut_step(running, 3, -0.5) == 6
    assert trace_rules.first_cut_step(running, 3, -0.4) == 4
    assert trace_rules.first_cut_step(running, 3, -0.6) == 6
    assert trace_rules.first_cut_step(running, 0, NAN) is None
    assert trace_rules.first_cut_step(np.zeros(0), 0, 1.0) is None
    assert trace_rules.first_cut_steps(running, 3, [-0.4, -0.6, -3.0], 9).tolist() == [4, 6, 9]
    assert trace_rules.first_cut_steps(np.zeros(0), 0, [1.0], 7).tolist() == [7]


# ---- splitmix64 -------------------------------------------------------------------------------------------


def test_splitmix64_scalar_and_array_agree_and_its_users_are_unchanged():
    states = [0, 1, 2**63, 2**64 - 1, 0x1234_5678_9ABC_DEF0]
    arr = splitmix64(np.array(states, dtype=np.uint64))
    assert arr.dtype == np.uint64 and arr.tolist() == [splitmix64(s) for s in states]
    assert splitmix64(-1) == splitmix64(2**64 - 1)
    # splitmix64 seeded with 0: its first two outputs
    assert [splitmix64(GOLDEN_GAMMA), splitmix64(2 * GOLDEN_GAMMA)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    # values these functions gave before they shared the definition
    assert [control_draw(s, r) for s, r in [(0, 0), (7, 3), (2**63, -5), (-1, 2**62)]] == \
        [0.15736142654322738, 0.446600099594495, 0.6067501887898372, 0.4823933564026188]
    assert row_seeds(12345, np.array([0, 1, -1, 2**40], dtype=np.int64)).tolist() == \
        [-906084347102765743, 2454886589211414944, 1593668222074929880, 5156559243297113287]
    assert row_seeds(-3, np.array([7], dtype=np.int64)).tolist() == [8817880822462381631]
