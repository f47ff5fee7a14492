"""haltwise.Stepper: the step function of a decode loop, in both scheduler
layouts, and its admissions through a policy."""
import pytest
import torch

from haltwise import Policy, PolicyConfig, Scheduler, StopConfig, StopReason, Stepper
from haltwise.stepper import TRACE_STRIDE


@pytest.mark.parametrize("layout", ["compact", "slots"])
def test_step_returns_the_tokens_of_the_rows_that_continue(layout):
    sched = Scheduler(3, layout=layout)
    for rid, n in enumerate([2, 5, 3, 4]):
        sched.submit(rid, max_new_tokens=n)
    stepper = Stepper(sched, temperature=1.0, seed=9)
    out = stepper.start()
    assert [rid for rid, _ in out.admitted] == [0, 1, 2] and stepper.batch_size == 3
    ended, steps = {}, 0
    while stepper.batch_size:
        ids = stepper.request_ids.copy()
        logits = torch.randn(stepper.batch_size, 11, generator=torch.Generator().manual_seed(steps))
        out = stepper.step(logits)
        steps += 1
        kept = out.keep.tolist()
        assert kept == sorted(kept)
        # the tokens handed back are this step's tokens of exactly the kept rows
        assert torch.equal(out.tokens, out.signals.token[out.keep])
        assert set(ids[kept].tolist()) <= set(stepper.request_ids.tolist())
        for f in out.plan.finished:
            ended[f.request_id] = (f.reason, f.num_tokens)
    assert ended == {0: (StopReason.MAX_TOKENS, 2), 1: (StopReason.MAX_TOKENS, 5), 2: (StopReason.MAX_TOKENS, 3),
                     3: (StopReason.MAX_TOKENS, 4)}


def test_step_checks_the_logits_shape():
    sched = Scheduler(2)
    sched.submit(0, max_new_tokens=3)
    stepper = Stepper(sched)
    stepper.start()
    with pytest.raises(ValueError, match=r"logits must be \[1, vocab\].*got shape \(2, 5\)"):
        stepper.step(torch.randn(2, 5))


def test_submit_goes_through_the_policy():
    # A fresh policy's first requests are warm-up: every trace uncut, signals kept.
    policy = Policy(PolicyConfig(traces=4, window=4))
    sched = Scheduler(8, layout="slots")
    stepper = Stepper(sched, temperature=1.0, policy=policy)
    plan = stepper.submit(7, max_new_tokens=5, key="math", stop=StopConfig(eos_ids=(0,)))
    assert plan.kind == "warmup" and plan.traces == 4 and plan.stop.record_signals
    out = stepper.start()
    assert sorted(rid for rid, _ in out.admitted) == [7 * TRACE_STRIDE + k for k in range(4)]
    records = []
    while stepper.batch_size:
        out = stepper.step(torch.randn(stepper.batch_size, 6))
        records += out.plan.finished
    assert len(records) == 4 and all(r.group == 7 and r.signals is not None for r in records)
    records.sort(key=lambda r: r.request_id)
    assert policy.observe(7, records, answers=[1, 1, 2, None]) == 1  # the served answer: the vote
    policy.feedback(7, True)
    assert policy.thresholds()["math"]["warmup"] == "1/8"  # the warm-up request counted toward calibration
    plain = Stepper(Scheduler(2))
    assert plain.submit(1, max_new_tokens=2) is None and plain.scheduler.stats()["queued"] == 1
