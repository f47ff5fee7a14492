"""The vLLM logits processor's bookkeeping and step, without vLLM: a plain Python model
of vLLM's persistent batch (requests removed, added into the holes or appended, the
tail condensed into the holes with UNIDIRECTIONAL moves, rows reordered with SWAPs)
drives RowTable, and every row must stay attached to its own request."""
from __future__ import annotations

import dataclasses
import enum
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from haltwise.integrations.vllm_rows import RowTable, parse_settings, topk_confidence


class Direction(enum.Enum):  # vLLM's MoveDirectionality, by name
    UNIDIRECTIONAL = 1
    SWAP = 2


@dataclasses.dataclass(frozen=True)
class Update:  # vLLM's BatchUpdate fields
    batch_size: int
    removed: list
    added: list
    moved: list


def params(haltwise=None, **kw):
    base = dict(extra_args=None if haltwise is None else {"haltwise": haltwise}, ignore_eos=False, min_tokens=0,
                eos_token_id=2, all_stop_token_ids={2}, stop_token_ids=[])
    base.update(kw)
    return SimpleNamespace(**base)


class PersistentBatch:
    """vLLM's rules: removals first (their indices become holes), then additions fill
    the lowest holes and append past the end, then the tail is moved into the
    remaining holes (UNIDIRECTIONAL), then optional SWAPs reorder rows."""

    def __init__(self):
        self.slots: list = []  # request (a dict) or None

    def step(self, remove: list[int], n_add: int, swaps: list[tuple[int, int]], asks) -> tuple[Update, list]:
        occupied = [i for i, r in enumerate(self.slots) if r is not None]
        removed = sorted({occupied[j % len(occupied)] for j in remove}, reverse=True) if occupied else []
        for i in removed:
            self.slots[i] = None
        added, new = [], []
        holes = sorted(i for i, r in enumerate(self.slots) if r is None)
        for k in range(n_add):
            req = {"asks": asks(k), "out": []}
            index = holes.pop(0) if holes else len(self.slots)
            if index == len(self.slots):
                self.slots.append(None)
            self.slots[index] = req
            new.append(req)
            added.append((index, params({"window": 2} if req["asks"] else None), [1, 3], req["out"]))
        moved = []
        while True:  # condense: the last request into the first hole
            holes = [i for i, r in enumerate(self.slots) if r is None]
            while self.slots and self.slots[-1] is None:
                self.slots.pop()
            holes = [i for i in holes if i < len(self.slots)]
            if not holes:
                break
            last = len(self.slots) - 1
            self.slots[holes[0]], self.slots[last] = self.slots[last], None
            moved.append((last, holes[0], Direction.UNIDIRECTIONAL))
        n = len(self.slots)
        for a, b in swaps:
            if n >= 2 and a % n != b % n:
                a, b = a % n, b % n
                self.slots[a], self.slots[b] = self.slots[b], self.slots[a]
                moved.append((a, b, Direction.SWAP))
        return Update(n, removed, added, moved), new


steps_strategy = st.lists(
    st.tuples(st.lists(st.integers(0, 40), max_size=4), st.integers(0, 4),
              st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=3)),
    min_size=1, max_size=25)


@settings(max_examples=200, deadline=None)
@given(steps=steps_strategy, ask_mask=st.integers(0, 2**16))
def test_rows_follow_their_requests_through_batch_updates(steps, ask_mask):
    batch, table = PersistentBatch(), RowTable()
    counter = [0]

    def asks(_k):
        counter[0] += 1
        return bool(ask_mask >> (counter[0] % 16) & 1)

    ended = 0
    for remove, n_add, swaps in steps:
        before = {id(r["out"]) for r in batch.slots if r is not None and r["asks"]}
        update, _ = batch.step(remove, n_add, swaps, asks)
        table.update(update)
        after = {id(r["out"]) for r in batch.slots if r is not None and r["asks"]}
        ended += len(before - after)
        # every asking request sits at its index, with its own output list; nothing else is tracked
        expect = {i: r["out"] for i, r in enumerate(batch.slots) if r is not None and r["asks"]}
        assert set(table.rows) == set(expect)
        for i, out in expect.items():
            assert table.rows[i].out is out
        assert len(table.table) == len(table.rows)  # a request that left frees its stop state
        assert len({row.handle for row in table.rows.values()}) == len(table.rows)
        assert table.stats["vllm"] == ended


def test_a_unidirectional_move_onto_an_occupied_row_replaces_it():
    table = RowTable()
    outs = [[], []]
    table.update(Update(2, [], [(0, params({}), [1], outs[0]), (1, params({}), [1], outs[1])], []))
    table.update(Update(1, [], [], [(1, 0, Direction.UNIDIRECTIONAL)]))
    assert list(table.rows) == [0] and table.rows[0].out is outs[1]
    assert table.stats["vllm"] == 1


@pytest.mark.parametrize("bad, match", [
    ({"window": 0}, r"extra_args\['haltwise'\]: StopConfig: window must be .*got 0"),
    ({"low_conf_signal": "vibes"}, r"low_conf_signal must be one of .* got 'vibes'"),
    ({"low_conf_threshold": "high"}, r"low_conf_threshold must be a number, got str"),
    ({"min_new_tokens": -1}, r"min_new_tokens must be >= 0, got -1"),
    ({"top_k_conf": 500}, r"top_k_conf must be in \[0, 128\], got 500"),
    ({"top_k_conf": 0, "low_conf_signal": "topk_conf"}, r"needs top_k_conf >= 1"),
    ({"threshold": 1.0}, r"unknown key\(s\) \['threshold'\]"),
    ([1, 2], r"must be a dict .* got list"),
    ("{window: 3}", r"must be a dict or a JSON object string, got a string that is not JSON"),
    ('{"window": -2}', r"window must be .*got -2"),
])
def test_bad_settings_are_refused_naming_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_settings(params(bad))


def test_settings_that_cannot_end_the_request_are_refused():
    with pytest.raises(ValueError, match="ignore_eos"):
        parse_settings(params({}, ignore_eos=True))
    with pytest.raises(ValueError, match="min_tokens=3"):
        parse_settings(params({}, min_tokens=3))
    assert parse_settings(params(None)) is None
    s = parse_settings(params({"low_conf_signal": "logprob", "low_conf_threshold": -1.5, "window": 4,
                               "min_new_tokens": 2, "top_k_conf": 5}))
    assert (s.stop.low_conf_threshold, s.stop.window, s.stop.min_new_tokens, s.top_k_conf) == (-1.5, 4, 2, 5)
    # the OpenAI server's vllm_xargs carry the same settings as a JSON object string
    assert parse_settings(params('{"low_conf_signal": "logprob", "low_conf_threshold": -1.5, "window": 4, '
                                 '"min_new_tokens": 2, "top_k_conf": 5}')) == s


def test_step_cuts_on_the_native_rule_and_forces_the_end_token_only_on_that_row():
    """Row 0 asks (logprob window 2 < -1.0 after 2 tokens), row 1 does not. The
    logprob fed is that of the token the engine sampled, so a sampled unlikely
    token triggers the cut at the next step, and row 1's logits are untouched."""
    table = RowTable()
    outs = [[], []]
    cfg = {"low_conf_signal": "logprob", "low_conf_threshold": -1.0, "window": 2, "min_new_tokens": 2}
    table.update(Update(2, [], [(0, params(cfg), [1], outs[0]), (1, params(None), [1], outs[1])], []))
    V = 8
    x = torch.full((2, V), -5.0)
    x[:, 3] = 5.0  # token 3 is near certain, the others ~ -10 logprob

    def step(tokens):
        logits = x.clone()
        before = logits.clone()
        result = table.apply(logits)
        assert torch.equal(result[1], before[1])  # the row that did not ask
        for out, t in zip(outs, tokens):
            out.append(t)
        return result

    r = step([3, 3])  # step 1: nothing fed yet
    assert torch.equal(r[0], x[0])
    r = step([3, 3])  # feeds token 3 (logprob ~0): fine
    assert torch.equal(r[0], x[0])
    r = step([5, 5])  # feeds token 3 again: window mean ~0
    assert torch.equal(r[0], x[0])
    r = step([3, 3])  # feeds the unlikely 5: window mean ~ -5 < -1 -> cut: forced now
    assert r[0, 2] == 0.0 and torch.isinf(r[0]).sum() == V - 1
    assert table.rows[0].reason == "LOW_CONFIDENCE" and table.stats["LOW_CONFIDENCE"] == 1
    lp5 = torch.log_softmax(x[0], -1)[5].item()
    assert lp5 < -9  # the fed logprob was the sampled token's, not the argmax's
    r = step([2, 3])  # stays forced until vLLM removes it
    assert r[0, 2] == 0.0
    table.update(Update(1, [0], [], [(1, 0, Direction.UNIDIRECTIONAL)]))
    assert table.rows == {} and table.stats["vllm"] == 0  # cut requests are not counted twice


def test_a_discarded_sample_does_not_shift_the_signals():
    """A step whose sample is discarded (a partial prefill chunk: the output list does
    not grow) drops that step's signals, so the next token meets its own."""
    table = RowTable()
    out: list[int] = []
    cfg = {"low_conf_signal": "logprob", "low_conf_threshold": -1.0, "window": 1, "min_new_tokens": 1}
    table.update(Update(1, [], [(0, params(cfg), [1], out)], []))
    bad = torch.zeros(1, 4)
    bad[0, 0] = 20.0  # token 0 certain; token 1 has logprob -20
    good = torch.zeros(1, 4)  # uniform: logprob of any token -1.386
    good[0, 1] = 10.0  # token 1 certain
    table.apply(bad.clone())  # discarded chunk: out stays empty
    table.apply(good.clone())
    out.append(1)
    r = table.apply(good.clone())  # feeds token 1 with good's signals: logprob ~0, no cut
    assert not table.rows[0].stopped and torch.equal(r, good)
    step, j = table.rows[0].pending[0]
    assert table.rows[0].fed == 1 and math.isfinite(float(step.lse[j]))


def test_placeholder_tokens_wait_for_their_value():
    table = RowTable()
    out: list[int] = []
    cfg = {"low_conf_signal": "logprob", "low_conf_threshold": -1.0, "window": 1, "min_new_tokens": 1}
    table.update(Update(1, [], [(0, params(cfg), [1], out)], []))
    x = torch.zeros(1, 4)
    x[0, 1] = 10.0
    table.apply(x.clone())
    out.append(-1)  # async scheduling: the token is not known yet
    table.apply(x.clone())
    assert table.rows[0].fed == 0 and len(table.rows[0].pending) == 2
    out[-1] = 0  # now known: an unlikely token -> cut
    out.append(-1)
    r = table.apply(x.clone())
    assert table.rows[0].fed == 1 and table.rows[0].reason == "LOW_CONFIDENCE"
    assert r[0, 2] == 0.0


def test_signals_pass_groups_rows_by_top_k_conf():
    table = RowTable()
    outs = [[], [], []]
    table.update(Update(3, [], [(i, params({"top_k_conf": k}), [1], outs[i]) for i, k in enumerate((2, 3, 2))], []))
    x = torch.randn(3, 16)
    table.apply(x.clone())
    assert table.rows[0].pending[0][0] is table.rows[2].pending[0][0]  # one pass for k=2
    assert table.rows[1].pending[0][0] is not table.rows[0].pending[0][0]
    for i, k in enumerate((2, 3, 2)):
        step, j = table.rows[i].pending[0]
        expect = -torch.log_softmax(x[i], -1).topk(k).values.mean().item()
        assert step.host[3, j] == pytest.approx(expect, rel=1e-5, abs=1e-5)
        assert float(step.lse[j]) == pytest.approx(torch.logsumexp(x[i].double(), -1).item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sampled_token_logprobs_are_one_gather_against_a_float64_reference(dtype):
    """The logprobs fed to the rules: ``x[token] - logsumexp`` for each (row, token)
    asked, on fresh random rows (V=37, not a block multiple, one -inf mask); a token
    outside the vocabulary gets NaN (which ends its request as INVALID_LOGITS)."""
    from haltwise.integrations.vllm_rows import _StepSignals
    from haltwise.signals import signals

    gen = torch.Generator().manual_seed(int(dtype.itemsize))
    x = (torch.randn(5, 37, generator=gen) * 4).to(dtype)
    x[3, 10:20] = -math.inf
    step = _StepSignals(0, x, signals(x, temperature=0.0, top_k_conf=4))
    js = [0, 1, 2, 3, 4, 3, 1]
    tokens = [0, 36, 17, 5, 40, 12, -3]
    got = step.logprobs(np.array(js), np.array(tokens)).tolist()
    ref = torch.log_softmax(x.double(), -1)
    for j, t, g in zip(js, tokens, got):
        if 0 <= t < 37:
            assert g == pytest.approx(ref[j, t].item(), rel=1e-5, abs=1e-5), (j, t)
        else:
            assert math.isnan(g), (j, t)
    assert got[5] == -math.inf  # a masked token sampled: its logprob, -inf


def test_tokens_that_arrive_together_are_fed_in_order_and_stop_at_the_cut():
    """Async scheduling delivers two tokens at once: each is fed with its own step's
    signals, and once the first cuts the row the second is not fed. A token outside
    the vocabulary ends its own request as INVALID_LOGITS."""
    table = RowTable()
    outs = [[], []]
    cfg = {"low_conf_signal": "logprob", "low_conf_threshold": -1.0, "window": 1, "min_new_tokens": 1}
    table.update(Update(2, [], [(0, params(cfg), [1], outs[0]), (1, params(cfg), [1], outs[1])], []))
    x = torch.zeros(2, 6)
    x[:, 1] = 20.0  # token 1 certain; others ~ -20
    table.apply(x.clone())
    outs[0].append(-1), outs[1].append(-1)
    table.apply(x.clone())
    outs[0][:] = [0, 1]  # the unlikely token first: cut there, the certain one is never fed
    outs[1][:] = [1, 99]  # fine, then a token the vocabulary does not have
    r = table.apply(x.clone())
    assert (table.rows[0].reason, table.rows[0].fed) == ("LOW_CONFIDENCE", 1)
    assert (table.rows[1].reason, table.rows[1].fed) == ("INVALID_LOGITS", 2)
    assert r[0, 2] == 0.0 and r[1, 2] == 0.0
    assert dict(table.stats) == {"LOW_CONFIDENCE": 1, "INVALID_LOGITS": 1}


@pytest.mark.parametrize("k", [1, 2, 20])
def test_topk_confidence_from_returned_logprobs_is_haltwise_topk_conf(k):
    """What the vLLM driver computes on the client from a token's returned logprobs
    (the top k, plus the sampled token when it is not among them) is haltwise's
    topk_conf of the same logits, whatever the sampled token."""
    from haltwise.reference import signals_torch

    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(6, 27, generator=gen) * 3
    logits[5, 20:] = -math.inf  # fewer finite entries than k: k' = the finite ones
    zeros = torch.zeros(6, dtype=torch.int64)
    expected = signals_torch(logits, temperature=1.0, top_k_conf=k, seed=zeros, offset=zeros, salt=zeros).topk_conf
    logp = torch.log_softmax(logits.double(), -1)
    for row in range(6):
        top = logp[row].topk(k).indices.tolist()
        sampled = int(logp[row].argmin()) if row % 2 else top[-1]  # beyond the top k, or among them
        returned = [float(logp[row, t]) for t in {*top, sampled}]
        assert topk_confidence(returned, k) == pytest.approx(float(expected[row]), abs=1e-5)
    assert topk_confidence([], k) == 0.0
