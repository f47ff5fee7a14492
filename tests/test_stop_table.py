"""haltwise.StopTable (csrc/stop_table.h): entries fed by handle must stop for the
same reason at the same token as a Scheduler row with the same StopConfig fed the
same tokens one step at a time, however the feeds interleave the entries; a
bad call changes nothing and says which argument is wrong."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haltwise.scheduler import Scheduler, StopConfig
from haltwise.stepper import HostSignals
from haltwise.stop_table import NOT_FED, StopTable

configs = st.builds(
    StopConfig,
    eos_ids=st.sampled_from([(), (2,), (2, 5)]),
    stop_sequences=st.sampled_from([(), ((3, 4),), ((4,), (6, 6, 6))]),
    min_new_tokens=st.integers(0, 4),
    low_conf_signal=st.sampled_from(["topk_conf", "logprob", "confidence", "margin", "neg_entropy"]),
    low_conf_threshold=st.one_of(st.none(), st.floats(-1.5, 1.5)),
    window=st.integers(1, 6),
    confident_entropy_below=st.one_of(st.none(), st.floats(0.0, 1.0)),
    confident_margin_above=st.one_of(st.none(), st.floats(0.0, 1.0)),
    confident_steps=st.integers(0, 3),
)


def signals_of(rng: np.random.Generator, n: int) -> HostSignals:
    f = lambda: rng.normal(0.0, 1.0, n).astype(np.float32)  # noqa: E731
    logprob, entropy = f(), np.abs(f())
    if n:
        logprob[rng.random(n) < 0.03] = np.nan  # a bad row now and then: INVALID_LOGITS
    status = (rng.random(n) < 0.03).astype(np.int8)
    return HostSignals(logprob, entropy, f(), np.abs(f()), f(), status)


def row_of(signals: HostSignals, i: int) -> HostSignals:
    return HostSignals(*(np.ascontiguousarray(getattr(signals, k)[i:i + 1]) for k in
                         ("logprob", "entropy", "confidence", "margin", "topk_conf", "status")))


@settings(max_examples=150, deadline=None)
@given(st.lists(configs, min_size=1, max_size=6), st.lists(st.integers(1, 12), min_size=1, max_size=12),
       st.integers(0, 2**32 - 1), st.integers(1, 40))
def test_entries_stop_as_a_scheduler_row_does(cfgs, feed_sizes, seed, max_new):
    rng = np.random.default_rng(seed)
    table = StopTable()
    handles = [table.add(cfg, max_new) for cfg in cfgs]
    rows = []
    for cfg in cfgs:
        s = Scheduler(1, layout="slots")
        s.submit(0, max_new_tokens=max_new, stop=cfg)
        s.step(np.zeros(0, np.int64), HostSignals.zeros(0))
        rows.append(s)
    expect_reason = [0] * len(cfgs)
    for size in feed_sizes:
        which = rng.integers(0, len(cfgs), size)  # an entry may take several tokens in one call
        tokens = rng.integers(0, 8, size).astype(np.int64)
        sig = signals_of(rng, size)
        codes = table.feed(np.array([handles[w] for w in which], np.int64), tokens, sig)
        assert codes.dtype == np.int8 and codes.shape == (size,)
        for i, w in enumerate(which.tolist()):
            if expect_reason[w]:
                assert codes[i] == NOT_FED
                continue
            plan = rows[w].step(tokens[i:i + 1], row_of(sig, i))
            reason = int(plan.finished[0].reason) if plan.finished else 0
            assert codes[i] == reason, (i, w, cfgs[w])
            expect_reason[w] = reason
    for w, s in enumerate(rows):
        generated = s.stats()["tokens_generated"]
        assert table.num_tokens(handles[w]) == generated


def test_handles_are_reused_and_start_fresh():
    table = StopTable()
    cut = StopConfig(low_conf_signal="logprob", low_conf_threshold=-1.0, window=1)
    a, b = table.add(cut), table.add(cut)
    low = HostSignals(np.array([-5.0], np.float32), *(np.ones(1, np.float32) for _ in range(4)), np.zeros(1, np.int8))
    assert table.feed(np.array([a], np.int64), np.array([7], np.int64), low).tolist() == [4]  # LOW_CONFIDENCE
    assert StopTable.reason(4).name == "LOW_CONFIDENCE" and StopTable.reason(0) is None
    table.remove(a)
    assert len(table) == 1
    c = table.add(StopConfig())
    assert c == a and table.num_tokens(c) == 0  # the freed handle, with a fresh state
    assert table.feed(np.array([c, b], np.int64), np.array([7, 7], np.int64),
                      HostSignals(*(np.full(2, -5.0, np.float32) for _ in range(5)), np.zeros(2, np.int8))).tolist() \
        == [0, 4]
    with pytest.raises(ValueError, match="handle 0 is not in the table"):
        table.remove(c) or table.remove(c)


def test_bad_calls_name_the_argument_and_change_nothing():
    table = StopTable()
    h = table.add(StopConfig(eos_ids=(2,)))
    ok = HostSignals(*(np.zeros(2, np.float32) for _ in range(5)), np.zeros(2, np.int8))
    with pytest.raises(ValueError, match=r"handles\[1\] = 9 is not in the table"):
        table.feed(np.array([h, 9], np.int64), np.array([2, 2], np.int64), ok)
    assert table.num_tokens(h) == 0  # the good handle before it was not fed either
    with pytest.raises(ValueError, match=r"tokens must be int64, got int32"):
        table.feed(np.array([h, h], np.int64), np.array([1, 1], np.int32), ok)
    with pytest.raises(ValueError, match=r"signals.logprob must have shape \(1,\)"):
        table.feed(np.array([h], np.int64), np.array([1], np.int64), ok)
    with pytest.raises(ValueError, match=r"handles must be int64, got float64"):
        table.feed(np.array([0.0]), np.array([1], np.int64), ok)
    with pytest.raises(TypeError, match="signals must have the attributes"):
        table.feed(np.array([h], np.int64), np.array([1], np.int64), object())
    with pytest.raises(ValueError, match=r"max_new_tokens must be"):
        table.add(StopConfig(), 0)
    with pytest.raises(TypeError, match="stop must be a StopConfig, got dict"):
        table.add({"window": 4})
    with pytest.raises(ValueError, match="handle 5 is not in the table"):
        table.num_tokens(5)
    assert table.num_tokens(h) == 0 and len(table) == 1
