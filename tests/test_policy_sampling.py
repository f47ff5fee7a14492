"""Run "policy": parallel sampling on a real decode loop with the
policy's plans, learning between chunks; and calibration from a recorded
uncut run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from haltwise.decoding.parallel import EarlyStopSettings, ParallelSampler
from haltwise.decoding.runners import GPTRunner
from haltwise.models.gpt import GPT, GPTConfig
from haltwise.policy import Policy, PolicyConfig
from haltwise.policy.sampling import calibrate_from_run, run_adaptive
from haltwise.scheduler import StopReason

VOCAB = 23


class ToyTask:
    """Prompts are random token lists; a trace's answer is its second-to-last token mod 3."""

    eos_ids = (2,)

    def prompt_ids(self, problem):
        return problem["prompt"]

    def answer_of(self, token_ids):
        return int(token_ids[-2]) % 3 if len(token_ids) >= 2 else None

    def reference(self, problem):
        return problem["answer"]


@pytest.fixture(scope="module")
def sampler():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend (50x slower on a 2-core machine)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=64)).eval()
    with torch.no_grad():
        model.head.weight.mul_(6.0)
    torch.set_grad_enabled(False)
    yield ParallelSampler(lambda capacity: GPTRunner(model, capacity, max_len=48), ToyTask(), capacity=48,
                          temperature=1.0, seed=1, top_k_conf=5, backend="native")
    torch.set_num_threads(threads)


def problems(n, seed):
    rng = np.random.default_rng(seed)
    return [{"prompt": list(rng.integers(3, VOCAB, size=6)), "answer": int(rng.integers(0, 3))} for _ in range(n)]


CONFIG = PolicyConfig(epsilon=0.2, epsilon_overload=0.3, traces=4, warmup_requests=3, min_evidence=15,
                      evidence_window=100, control_boost=0.5, control_fraction=0.2, grid_size=8, evaluate_every=2,
                      raise_interval=1, cooldown=5, window=4, min_new_tokens=2)


def test_run_adaptive_plans_observes_and_labels_every_problem(sampler):
    policy = Policy(CONFIG)
    probs = problems(12, 0)
    run = run_adaptive(sampler, probs, policy, key=lambda p: "toy", max_new_tokens=10, chunk=6)
    assert len(run.problems) == 12 and run.settings.key == "policy"
    assert policy.state()["seq"] == 12 and policy.store.feedback_count() == 12
    rows = policy.store.requests_where("1")
    assert all(r["observed"] for r in rows)
    for row, result in zip(sorted(rows, key=lambda r: r["request_id"]), run.problems):
        assert len(result.traces) == row["traces"]
        assert row["served_answer"] == result.answer
        if row["kind"] in ("warmup", "control"):
            assert all(t.reason != StopReason.LOW_CONFIDENCE for t in result.traces)
    assert {r["kind"] for r in rows[:3]} == {"warmup"}


def test_calibrate_from_an_uncut_run_then_serve(sampler):
    policy = Policy(CONFIG)
    calib = problems(20, 1)
    uncut = sampler.run(calib, EarlyStopSettings(traces=4, max_new_tokens=10, window=4, record_signals=True))
    assert calibrate_from_run(policy, uncut, calib, key=lambda p: "toy") == 20
    state = policy.thresholds()
    assert state["toy"]["frozen"] and state["toy"]["ready"] and state["toy"]["labeled"] == 17  # 3 were warm-up
    assert policy.store.feedback_count() == 20
    run = run_adaptive(sampler, problems(4, 2), policy, key=lambda p: "toy", max_new_tokens=10, chunk=4,
                       request_offset=1000)
    assert len(run.problems) == 4 and all(p.threshold == state["toy"]["threshold"] for p in run.problems
                                          if p.threshold is not None)
    no_signals = uncut.__class__(settings=uncut.settings, problems=[
        type(p)(answer=p.answer, reference=p.reference, threshold=None,
                traces=[type(t)(**{**t.__dict__, "signals": None}) for t in p.traces]) for p in uncut.problems[:2]],
        loop=uncut.loop)
    with pytest.raises(ValueError, match="the run must record signals"):
        calibrate_from_run(Policy(CONFIG), no_signals, calib[:2])
