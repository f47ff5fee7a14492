"""Stepper.submit with a policy admits a request's K traces all or nothing:
trace ids never collide (K up to the config's 4096), a request that cannot
be queued leaves no plan, no queued trace and no record behind, and the same
request can be submitted again."""
from __future__ import annotations

import pytest
import torch

from haltwise import Policy, PolicyConfig, QueueFull, Scheduler, StopConfig, StopReason, Stepper
from haltwise.stepper import TRACE_STRIDE, request_of, trace_id


def _stepper(traces: int, **sched):
    policy = Policy(PolicyConfig(traces=traces, window=4))
    return Stepper(Scheduler(sched.pop("capacity", 8), **sched), temperature=1.0, policy=policy), policy


def _drain(stepper, limit=1000):
    records = list(stepper.start().finished)
    for _ in range(limit):
        if not stepper.batch_size and not stepper.scheduler.stats()["queued"]:
            break
        out = stepper.step(torch.randn(stepper.batch_size, 6))
        records += out.finished
    return records


def test_thousands_of_traces_get_distinct_ids():
    stepper, _ = _stepper(2048, capacity=4)
    for rid in (0, 1):
        plan = stepper.submit(rid, max_new_tokens=1)
        assert plan.traces == 2048
    stats = stepper.scheduler.stats()
    assert stats["submitted"] == stats["queued"] == 4096
    records = _drain(stepper, limit=5000)
    ids = [r.request_id for r in records]
    assert len(ids) == len(set(ids)) == 4096
    assert sorted(request_of(i) for i in ids) == [(r, k) for r in (0, 1) for k in range(2048)]
    assert all(r.group == request_of(r.request_id)[0] for r in records)


def test_one_trace_requests_use_the_same_id_scheme():
    stepper, _ = _stepper(1)
    stepper.submit(3, max_new_tokens=2)
    out = stepper.start()
    assert out.admitted[0][0] == trace_id(3, 0) == 3 * TRACE_STRIDE


@pytest.mark.parametrize("request_id", [2**62, -(2**62)])
def test_a_request_id_without_room_for_its_trace_ids_is_refused_before_planning(request_id):
    stepper, policy = _stepper(4)
    with pytest.raises(ValueError, match=r"Stepper.submit: request_id must be in \[.*\], got"):
        stepper.submit(request_id, max_new_tokens=2)
    assert policy.store.request(request_id) is None and stepper.scheduler.stats()["submitted"] == 0


def test_bad_arguments_are_refused_before_planning():
    stepper, policy = _stepper(4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        stepper.submit(5, max_new_tokens=0)
    assert policy.store.request(5) is None


def test_queue_full_in_the_middle_of_a_group_queues_nothing_and_plans_nothing():
    stepper, policy = _stepper(16, capacity=16, max_queue=20)
    stepper.submit(1, max_new_tokens=2)  # 16 queued: room for 4 more
    before = policy.state()
    with pytest.raises(QueueFull, match=r"request 2 needs up to 16 queue places, 4 are free"):
        stepper.submit(2, max_new_tokens=2)
    assert stepper.scheduler.stats()["queued"] == 16  # none of request 2's traces
    assert policy.store.request(2) is None and policy.state() == before  # no orphan plan, no warm-up place
    stepper.start()  # request 1's traces leave the queue
    plan = stepper.submit(2, max_new_tokens=2)  # the retry is a normal submission
    assert plan.traces == 16 and stepper.scheduler.stats()["queued"] == 16


def test_a_trace_the_scheduler_refuses_rolls_the_whole_request_back():
    stepper, policy = _stepper(4, capacity=8)
    sched = stepper.scheduler
    sched.submit(trace_id(9, 2), max_new_tokens=3)  # someone else holds request 9's third trace id
    before = policy.state()
    with pytest.raises(ValueError, match=str(trace_id(9, 2))):
        stepper.submit(9, max_new_tokens=2)
    assert policy.store.request(9) is None and policy.state() == before
    records = _drain(stepper)
    # the two traces queued before the refusal were withdrawn: no record of them reaches the caller
    assert [(r.request_id, r.reason) for r in records] == [(trace_id(9, 2), StopReason.MAX_TOKENS)]
    plan = stepper.submit(9, max_new_tokens=2)  # and the request can be submitted again
    records = _drain(stepper)
    assert sorted(r.request_id for r in records) == [trace_id(9, k) for k in range(plan.traces)]
    assert all(r.reason == StopReason.MAX_TOKENS for r in records)


def test_plain_submit_is_unchanged():
    stepper = Stepper(Scheduler(2))
    assert stepper.submit(1, max_new_tokens=2, stop=StopConfig()) is None
    assert stepper.scheduler.stats()["queued"] == 1


def test_a_plan_that_fails_to_commit_withdraws_its_queued_traces(monkeypatch):
    stepper, policy = _stepper(4, capacity=8)
    store = policy.store
    real = store.transaction

    import contextlib

    @contextlib.contextmanager
    def failing_commit():
        with real() as conn:
            yield conn
        raise OSError("disk full")  # the COMMIT went through here, but the caller must see a failure

    monkeypatch.setattr(store, "transaction", failing_commit)
    with pytest.raises(OSError, match="disk full"):
        stepper.submit(4, max_new_tokens=2)
    monkeypatch.undo()
    assert _drain(stepper) == []  # the 4 queued traces were withdrawn: no record reaches the caller
    assert stepper.scheduler.stats()["queued"] == 0
