"""Soak: a long stream of policy requests through Stepper + Scheduler + Policy
(random logits stand in for a model), with groups of traces, cancels,
admissions that fail, policy feedback and load figures. It checks that every
request ends exactly once and samples the process's RSS, which must stay flat
once the policy has warmed up: nothing may grow with the number of requests
served (the policy's rows go to its SQLite file, not to memory).

Every request ends in exactly one of these ways:
  observed   all its traces finished; the policy got them (observe) and, for
             some, a label or a user report (feedback)
  cancelled  cancelled while queued or running: every trace ended CANCELLED
             (or earlier on its own) and the policy was told (cancel)
  rejected   submitted with bad arguments: refused before anything was planned
A QueueFull admission (the queue lacks room for all K traces) and an
admission that clashes with a request the driver queued directly (some trace
id taken) are refused whole and retried later until admitted.

``python bench/soak.py --requests 1000000`` runs the long version; the test
suite runs a short one.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..policy import Policy, PolicyConfig
from ..scheduler import QueueFull, Scheduler, StopConfig, StopReason
from ..stepper import Stepper, request_of, trace_id

VOCAB = 16
EOS = 0
FOREIGN_BASE = -(2**40)  # group ids of the requests the driver queues directly (never a policy request id)


def rss_mb() -> float:
    """Resident set size of this process, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class SoakResult:
    requests: int
    observed: int = 0
    cancelled: int = 0
    rejected: int = 0
    queue_full: int = 0  # admissions refused for room, retried
    clashes: int = 0  # admissions refused because a trace id was taken, retried
    labels: int = 0
    user_reports: int = 0
    traces: int = 0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    max_groups: int = 0  # most groups the scheduler held at once (stays bounded when groups are released)
    rss_mb: list = field(default_factory=list)  # (requests ended, RSS MiB) samples

    @property
    def ended(self) -> int:
        return self.observed + self.cancelled + self.rejected

    def rss_growth_mb(self, after_fraction: float = 0.1) -> float:
        """RSS at the end minus RSS once `after_fraction` of the requests had ended (the warm-up)."""
        start = next(mb for n, mb in self.rss_mb if n >= after_fraction * self.requests)
        return self.rss_mb[-1][1] - start

    def summary(self) -> dict:
        out = asdict(self)
        growth = self.rss_growth_mb()
        out["rss_mb"] = {"first": self.rss_mb[0][1], "after_warmup": self.rss_mb[-1][1] - growth,
                         "end": self.rss_mb[-1][1], "max": max(mb for _, mb in self.rss_mb),
                         "growth_after_warmup": growth, "samples": self.rss_mb}
        out["requests_per_s"] = self.ended / self.seconds if self.seconds else None
        return out


class SoakError(AssertionError):
    """An accounting invariant broke: a request ended twice, never, or a record is unknown."""


def run_soak(requests: int, *, capacity: int = 256, traces: int = 4, max_queue: int = 512, seed: int = 0,
             db: str | None = None, cancel_rate: float = 0.03, reject_rate: float = 0.01, clash_rate: float = 0.005,
             label_rate: float = 0.5, report_rate: float = 0.1, samples: int = 50,
             progress=None) -> SoakResult:
    """Serves `requests` policy requests; raises SoakError on any accounting
    error. db: the policy's SQLite file (default: a temporary file)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    tmp = None
    if db is None:
        tmp = tempfile.TemporaryDirectory(prefix="haltwise-soak-")
        db = os.path.join(tmp.name, "policy.db")
    # a small evidence window and a loose epsilon keep the policy's per-request work low; overload comes and
    # goes with the queue; synchronous OFF: the soak measures memory and accounting, not fsync
    config = PolicyConfig(traces=traces, warmup_requests=4, window=4, min_new_tokens=1, epsilon=0.1,
                          epsilon_overload=0.15, evidence_window=200, control_fraction=0.05, control_boost=0.25,
                          synchronous="OFF", slo_queue_depth=0.75 * max_queue)
    policy = Policy(config, db=db)
    scheduler = Scheduler(capacity, layout="slots", max_queue=max_queue)
    stepper = Stepper(scheduler, temperature=1.0, seed=seed, policy=policy)
    base = StopConfig(eos_ids=(EOS,))
    result = SoakResult(requests=requests)
    every = max(1, requests // samples)

    # requests not yet admitted: fresh ones are numbered on demand (bookkeeping must not grow with the stream)
    fresh = iter(range(requests))
    pending: deque[int] = deque()  # refused for room, to retry first
    open_requests: dict[int, dict] = {}  # admitted, not yet ended: request id -> its bookkeeping
    ended = bytearray(requests)  # 1 once a request has ended
    done = 0
    blocked: list[int] = []  # requests refused for a clash, waiting for the direct request to end
    foreign: dict[int, int] = {}  # scheduler ids the driver queued directly -> the policy request they clash with
    seen_traces: set[int] = set()
    t0 = time.perf_counter()

    def end(rid: int, how: str) -> None:
        nonlocal done
        if ended[rid]:
            raise SoakError(f"request {rid} ended twice (now {how})")
        ended[rid] = 1
        done += 1
        setattr(result, how, getattr(result, how) + 1)
        n = done
        if n % every == 0 or n == requests:
            result.rss_mb.append((n, rss_mb()))
            if progress is not None:
                progress(n)

    def on_record(record) -> None:
        sid = record.request_id
        if sid in foreign:
            foreign.pop(sid)
            pending.extendleft(reversed(blocked))
            blocked.clear()
            return
        if sid in seen_traces:
            raise SoakError(f"trace {sid} reported twice")
        seen_traces.add(sid)
        rid, k = request_of(sid)
        entry = open_requests.get(rid)
        if entry is None or k >= len(entry["records"]) or record.group != rid:
            raise SoakError(f"record of unknown trace {sid} (request {rid}, trace {k}, group {record.group})")
        if entry["records"][k] is not None:
            raise SoakError(f"trace {k} of request {rid} ended twice")
        entry["records"][k] = record
        entry["left"] -= 1
        result.traces += 1
        result.tokens += int(record.num_tokens)
        if entry["left"]:
            return
        del open_requests[rid]
        for j in range(len(entry["records"])):
            seen_traces.discard(trace_id(rid, j))
        if entry["cancelled"]:
            if not policy.cancel(rid):
                raise SoakError(f"policy.cancel({rid}) refused a planned, unobserved request")
            end(rid, "cancelled")
            return
        answers = [int(r.tokens[-1]) % 3 if r.num_tokens and r.reason != StopReason.CANCELLED else None
                   for r in entry["records"]]
        served = policy.observe(rid, entry["records"], answers)
        u = rng.random()
        if u < label_rate:
            reference = int(rng.integers(0, 3))
            policy.feedback(rid, served is not None and served == reference, reference=reference)
            result.labels += 1
        elif u < label_rate + report_rate:
            policy.feedback(rid, bool(rng.random() < 0.7), source="user", weight=float(rng.uniform(0.2, 1.0)))
            result.user_reports += 1
        end(rid, "observed")

    def admit_some() -> None:
        budget = capacity // 2
        while budget:
            if not pending:
                rid = next(fresh, None)
                if rid is None:
                    return
                pending.append(rid)
            budget -= 1
            rid = pending[0]
            u = rng.random()
            if u < reject_rate:  # a caller's mistake: refused before anything is planned
                pending.popleft()
                try:
                    stepper.submit(rid, max_new_tokens=0, key=f"k{rid % 3}", stop=base)
                except ValueError:
                    end(rid, "rejected")
                    continue
                raise SoakError(f"request {rid} with max_new_tokens=0 was accepted")
            if u < reject_rate + clash_rate and not foreign and not blocked:
                sid = trace_id(rid, traces - 1)  # the driver takes one of its trace ids directly
                try:
                    scheduler.submit(sid, max_new_tokens=2, group=FOREIGN_BASE - rid, stop=base)
                    foreign[sid] = rid
                except QueueFull:
                    pass
            try:
                plan = stepper.submit(rid, max_new_tokens=int(rng.integers(2, 9)), key=f"k{rid % 3}", stop=base)
            except QueueFull:
                result.queue_full += 1
                return  # no room now: retry after the next step
            except ValueError as e:
                if not foreign or "already" not in str(e):
                    raise
                result.clashes += 1
                blocked.append(pending.popleft())  # retried once the direct request has ended
                continue
            pending.popleft()
            open_requests[rid] = {"records": [None] * plan.traces, "left": plan.traces, "cancelled": False}
            if rng.random() < cancel_rate:
                cancel(rid)

    def cancel(rid: int) -> None:
        entry = open_requests[rid]
        entry["cancelled"] = True
        for k in range(len(entry["records"])):
            scheduler.cancel(trace_id(rid, k))  # False for a trace already ending: it still reports once

    out = stepper.start()
    while done < requests or foreign:
        for record in out.finished:
            on_record(record)
        if open_requests and rng.random() < cancel_rate / 4:  # a cancel of a running request
            rid = next(iter(open_requests))
            if not open_requests[rid]["cancelled"]:
                cancel(rid)
        admit_some()
        if result.steps % 64 == 0:
            stats = scheduler.stats()
            result.max_groups = max(result.max_groups, stats.get("groups", 0))
            policy.observe_load(queue_depth=float(stats["queued"]))
        if stepper.batch_size:
            out = stepper.step(torch.randn(stepper.batch_size, VOCAB))
        else:
            out = stepper.start()
        result.steps += 1
        if result.steps > 1000 * requests + 10_000:
            raise SoakError(f"no progress: {done} of {requests} requests ended after {result.steps} steps")
    for record in out.finished:
        on_record(record)
    # drain what the driver queued directly, then check that nothing is left anywhere
    while scheduler.stats()["queued"] or stepper.batch_size:
        out = stepper.step(torch.randn(stepper.batch_size, VOCAB)) if stepper.batch_size else stepper.start()
        for record in out.finished:
            on_record(record)
    result.seconds = time.perf_counter() - t0
    stats = scheduler.stats()
    if stats.get("groups", 0):  # every group's members ended: the scheduler must have released it
        raise SoakError(f"the scheduler still holds {stats['groups']} groups after every request ended")
    unsent = next(fresh, None) is not None
    if open_requests or pending or blocked or foreign or unsent or stats["active"] or stats["queued"]:
        raise SoakError(f"left over: {len(open_requests)} open, {len(pending)} pending, {len(foreign)} direct, "
                        f"scheduler {stats}")
    if done != requests or result.ended != requests or not all(ended):
        raise SoakError(f"{done} of {requests} requests ended")
    rows = policy.store.conn.execute("SELECT SUM(observed), SUM(cancelled), COUNT(*) FROM requests").fetchone()
    if rows != (result.observed, result.cancelled, result.observed + result.cancelled):
        raise SoakError(f"the policy's records (observed, cancelled, planned) = {rows} disagree with the driver's "
                        f"({result.observed}, {result.cancelled})")
    policy.close()
    if tmp is not None:
        tmp.cleanup()
    return result
