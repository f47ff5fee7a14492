"""The decode loop (haltwise.decoding): continuous batching with eviction and
admission must give every request exactly the tokens it would get alone, a cut
trace must leave the batch at once, and a cut trace is a prefix of its uncut twin."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from haltwise.decoding.loop import DecodeLoop
from haltwise.decoding.runners import GPTRunner
from haltwise.models.gpt import GPT, GPTConfig
from haltwise.scheduler import Scheduler, StopConfig, StopReason
from haltwise.stepper import Stepper

VOCAB = 23


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=96)
    gpt = GPT(config).eval()
    with torch.no_grad():  # sharpen the random model a little so traces differ in confidence
        gpt.head.weight.mul_(8.0)
    return gpt


def prompts(n: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [list(rng.integers(3, VOCAB, size=int(rng.integers(3, 12)))) for _ in range(n)]


def decode_all(model, requests, *, capacity, stops=None, temperature=1.0, max_new=20):
    """{request_id: (reason, tokens)} and the loop's stats."""
    scheduler = Scheduler(capacity, layout="slots")
    stepper = Stepper(scheduler, temperature=temperature, top_k_conf=5, seed=123, backend="native")
    loop = DecodeLoop(GPTRunner(model, capacity, max_len=64), scheduler, stepper)
    for rid, prompt in enumerate(requests):
        stop = stops[rid] if stops else StopConfig(eos_ids=(2,))
        loop.submit(rid, prompt, max_new_tokens=max_new, stop=stop)
    done = {}
    batch_log = []

    def on_finished(record):
        assert record.request_id not in done
        done[record.request_id] = (StopReason(record.reason), record.tokens.tolist())
        batch_log.append((loop.stats.steps, loop.runner.batch))

    stats = loop.run(on_finished)
    assert loop.runner.batch == 0
    return done, stats


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batching_never_changes_a_request_tokens(model, temperature):
    requests = prompts(12)
    # capacity 3: requests wait in the queue and are admitted into freed rows
    # mid-run (swap-remove compaction, prefill between decodes); capacity 1:
    # each request alone; capacity 12: all at once.
    alone, _ = decode_all(model, requests, capacity=1, temperature=temperature)
    for capacity in (3, 12):
        batched, stats = decode_all(model, requests, capacity=capacity, temperature=temperature)
        assert batched == alone
        assert stats.max_batch == min(capacity, len(requests))
    reasons = {reason for reason, _ in alone.values()}
    assert StopReason.MAX_TOKENS in reasons or StopReason.EOS in reasons


def test_cut_trace_leaves_the_batch_and_is_a_prefix(model):
    requests = prompts(6)
    uncut, _ = decode_all(model, requests, capacity=6, max_new=30)
    # request 2 gets an impossible logprob threshold: cut as soon as it may be (min_new_tokens=4)
    stops = [StopConfig(eos_ids=(2,)) for _ in requests]
    stops[2] = StopConfig(eos_ids=(2,), low_conf_signal="logprob", low_conf_threshold=1.0, min_new_tokens=4, window=4)
    cut, stats = decode_all(model, requests, capacity=6, stops=stops, max_new=30)
    reason, tokens = cut[2]
    assert reason == StopReason.LOW_CONFIDENCE and len(tokens) == 4
    assert uncut[2][1][:4] == tokens  # the same noise, keyed by (request, position)
    assert all(cut[r] == uncut[r] for r in range(6) if r != 2)
    # the cut row stopped costing compute: from then on the batch is one row smaller
    assert stats.batch_sizes[4] == stats.batch_sizes[3] - 1


def test_loop_requires_slots_layout(model):
    with pytest.raises(ValueError, match="layout must be 'slots'"):
        DecodeLoop(GPTRunner(model, 2), Scheduler(2), Stepper(Scheduler(2)))


def test_problem_feed_keeps_at_most_max_problems_in_flight_and_reports_each_once():
    """The problem queue both parallel-sampling drivers share: problems begin in
    order, at most max_problems at once, the next when one finishes; each finished
    problem is reported once with its vote counted; a problem that did not end all
    its traces is an error, as is max_problems < 1."""
    from haltwise.decoding.parallel import EarlyStopSettings, ProblemFeed, ProblemResult, TraceResult

    results = [ProblemResult(answer=None, reference=3, threshold=None) for _ in range(4)]
    settings_of: dict = {}
    begun, reported = [], []

    def begin(p):
        begun.append(p)
        settings_of[p] = EarlyStopSettings(traces=1)

    feed = ProblemFeed(results, settings_of, begin, lambda p, r: reported.append((p, r.answer)), 2, "here")
    feed.start()
    assert begun == [0, 1]
    for p in (1, 0, 2, 3):
        results[p].traces.append(TraceResult(problem=p, trace=0, reason=StopReason.EOS, num_tokens=2, answer=p,
                                             correct=p == 3, min_window_mean=0.0, mean_logprob=-0.1))
        feed.finish(p)
        assert len(begun) - len(reported) <= 2
    assert begun == [0, 1, 2, 3] and reported == [(1, 1), (0, 0), (2, 2), (3, 3)]
    feed.check_complete()
    results[2].traces.clear()
    with pytest.raises(RuntimeError, match=r"here: problems \[2\] did not end all their traces"):
        feed.check_complete()
    with pytest.raises(ValueError, match="here: max_problems must be >= 1 or None, got 0"):
        ProblemFeed(results, settings_of, begin, None, 0, "here")
