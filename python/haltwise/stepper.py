"""``haltwise.Stepper``: the drop-in step function of a decode loop.

It computes the fused signals on the logits' device, brings the small
per-row arrays to the host once, lets the native scheduler append tokens,
apply the stop rules, evict and admit, and hands back the tokens of the rows
that continue, on the logits' device.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .hashing import GOLDEN_GAMMA, splitmix64
from .metrics import HaltwiseMetrics, resolve
from .scheduler import QueueFull, Scheduler, StepPlan, StopConfig, StopReason, check_int, check_submit
from .signals import signals
from .signals_types import Signals

if TYPE_CHECKING:
    from .policy import Policy
    from .policy.types import Plan

_FIELDS = ("logprob", "entropy", "confidence", "margin", "topk_conf")
# With a policy, trace k of request r is scheduler request r * TRACE_STRIDE + k (0 <= k < K <= 4096, the most
# traces a PolicyConfig allows), in group r: ids of different requests never collide.
TRACE_STRIDE = 4096
REQUEST_ID_MIN, REQUEST_ID_MAX = -(2**63) // TRACE_STRIDE, (2**63 - 1) // TRACE_STRIDE


def trace_id(request_id: int, k: int) -> int:
    """The scheduler request id of trace k of a policy request."""
    return request_id * TRACE_STRIDE + k


def request_of(scheduler_id: int) -> tuple[int, int]:
    """(request_id, k) of a scheduler request id made by :func:`trace_id`."""
    request_id, k = divmod(int(scheduler_id), TRACE_STRIDE)
    return request_id, k


def row_seeds(base_seed: int, request_ids: np.ndarray) -> np.ndarray:
    """A 64-bit seed per request (splitmix64 of base_seed and the id), so a
    request's sampling noise never depends on the batch it runs in."""
    with np.errstate(over="ignore"):
        state = np.uint64(base_seed % 2**64) + request_ids.astype(np.uint64) * np.uint64(GOLDEN_GAMMA)
    return splitmix64(state).view(np.int64)


@dataclass(frozen=True)
class StepOutput:
    """What one decode step hands back to the loop.

    tokens:  int64 (len(keep),) on the logits' device: the next input token of
             every row that continues, in the order of ``keep``.
    keep:    int64 (len(keep),) on the logits' device: rows of this step that
             continue, increasing (in the slots layout ``plan.keep`` gives
             their slots); gather the KV cache / positions with it.
    plan:    the scheduler's StepPlan (finished records, admissions, layout data).
    signals: the Signals of this step, (batch_size,) tensors on the logits' device.
    finished: the records of the requests that ended (``plan.finished``
             without the traces of an admission that failed and was withdrawn).
    """

    tokens: torch.Tensor
    keep: torch.Tensor
    plan: StepPlan
    signals: Signals | None
    finished: list

    @property
    def admitted(self) -> list[tuple[int, int]]:
        """(request_id, row) of the requests to prefill before the next step."""
        return self.plan.admitted


class Stepper:
    """Replaces the token-choice-and-stop part of a decode loop.

    The loop it replaces (one sequence batch, no eviction)::

        logits = model(input_ids, cache)[:, -1]         # (batch, vocab)
        next_ids = logits.argmax(-1)                     # or multinomial
        done |= next_ids == eos_id
        input_ids = next_ids[:, None]
        if done.all(): break

    becomes (requests were submitted to ``scheduler``)::

        out = stepper.start()                            # first admissions
        while stepper.batch_size or scheduler.stats()["queued"]:
            cache.select_(out.keep); prefill(out.admitted)       # compact + admit
            logits = model(torch.cat([out.tokens, admitted_ids])...)
            out = stepper.step(logits)                   # (batch, vocab) -> StepOutput

    Parameters: temperature (0 greedy, > 0 Gumbel-max sampling), top_k_conf
    (k of the DeepConf confidence), seed (mixed with each request id; the noise
    of a token is keyed by (request, position), so runs are reproducible and a
    request samples the same tokens whatever else is in the batch), backend of
    :func:`haltwise.signals`, policy (a :class:`haltwise.Policy` that plans
    each request :meth:`submit` admits), metrics (True: count finished
    sequences, tokens and the policy's thresholds in prometheus_client's global
    registry; or a :class:`haltwise.metrics.HaltwiseMetrics`; docs/metrics.md).
    """

    def submit(self, request_id: int, *, max_new_tokens: int, key: str | tuple[str, ...] | None = None,
               stop: StopConfig = StopConfig(), priority: int = 0, request_class: str | None = None) -> Plan | None:
        """Queue a request. Without a policy: one sequence with `stop`; returns None.

        With a policy: ``policy.plan(request_id, key, base=stop,
        request_class=request_class, consensus=False)`` decides its
        StopConfig (the threshold in force; uncut with signals kept for control
        and warm-up requests; shadowed cuts) and its number of traces K; the K
        traces are scheduler requests ``trace_id(request_id, k)`` (=
        ``request_id * TRACE_STRIDE + k``) in group ``request_id``. Returns the
        Plan; report the finished traces with ``policy.observe(request_id,
        records, answers)``.

        Admission is all or nothing: the arguments and the queue's room for K
        traces are checked before anything is queued; if the scheduler still
        refuses a trace (an id or group the caller also uses directly), the
        traces already queued are withdrawn (cancelled; their records never
        reach :attr:`StepOutput.finished`) and the plan is undone. Either way
        the exception propagates (QueueFull, ValueError) and the same
        request_id can be submitted again.
        """
        if self.policy is None:
            self.scheduler.submit(request_id, max_new_tokens=max_new_tokens, priority=priority, stop=stop)
            return None
        request_id = check_int("Stepper.submit", "request_id", request_id, REQUEST_ID_MIN, REQUEST_ID_MAX)
        # the arguments, before the policy records a plan
        check_submit(trace_id(request_id, 0), max_new_tokens, priority, request_id, stop)
        room = self._queue_room()
        most = self.policy.config.traces  # no plan has more traces (fewer under overload)
        if room is not None and room < most:  # cheap refusal before planning (a plan undone costs a reload)
            raise QueueFull(f"Stepper.submit: request {request_id} needs up to {most} queue places, {room} are free "
                            f"(max_queue={self.scheduler.max_queue}); nothing was queued or planned")

        admitted: list[int] = []

        def admit(plan: Plan) -> None:  # inside the policy's planning transaction: raising undoes the plan
            if plan.traces > TRACE_STRIDE:
                raise ValueError(f"Stepper.submit: a plan may have at most {TRACE_STRIDE} traces, got {plan.traces}")
            room = self._queue_room()
            if room is not None and plan.traces > room:
                raise QueueFull(f"Stepper.submit: request {request_id} needs {plan.traces} queue places, {room} are "
                                f"free (max_queue={self.scheduler.max_queue}); nothing was queued or planned")
            queued = []
            try:
                for k in range(plan.traces):
                    self.scheduler.submit(trace_id(request_id, k), max_new_tokens=max_new_tokens, priority=priority,
                                          group=request_id, stop=plan.stop)
                    queued.append(trace_id(request_id, k))
            except BaseException:
                self._withdraw(queued)
                raise
            admitted.extend(queued)

        try:
            # every trace is queued at once: no waves or consensus here (ParallelSampler runs those)
            plan = self.policy.plan(request_id, key, base=stop, admit=admit, request_class=request_class,
                                    consensus=False)
        except BaseException:
            self._withdraw(admitted)  # queued, but the plan's transaction failed to commit: undo the queueing too
            raise
        if self.metrics is not None:  # a plan may have moved thresholds; reading them costs ~10 us, a plan ~100x that
            self.metrics.record_policy(self.policy)
        return plan

    def _withdraw(self, scheduler_ids: list[int]) -> None:
        """Cancel queued traces of an admission that failed; their CANCELLED records are dropped."""
        for sid in scheduler_ids:
            if self.scheduler.cancel(sid):
                self._withdrawn[sid] += 1

    def _queue_room(self) -> int | None:
        """Free queue places, or None if the scheduler does not say."""
        max_queue = getattr(self.scheduler, "max_queue", None)
        return None if max_queue is None else max_queue - self.scheduler.stats()["queued"]

    def __init__(self, scheduler: Scheduler, *, temperature: float = 0.0, top_k_conf: int = 20, seed: int = 0,
                 backend: str = "auto", policy: Policy | None = None,
                 metrics: bool | HaltwiseMetrics | None = None) -> None:
        self.metrics = resolve(metrics, "Stepper")
        self.scheduler = scheduler
        self.policy = policy  # a haltwise.Policy: plans what submit() queues
        self.temperature = temperature
        self.top_k_conf = top_k_conf
        self.seed = seed
        self.backend = backend
        self._request_ids = np.zeros(0, dtype=np.int64)
        self._positions = np.zeros(0, dtype=np.int64)
        self._slots = np.zeros(0, dtype=np.int64)  # slots layout: slot of each row of the next step
        self._withdrawn: Counter = Counter()  # traces of a failed admission: their CANCELLED records are dropped
        if self.metrics is not None:
            # token counters advance by the scheduler's own totals: deltas from here on
            stats = scheduler.stats()
            self._tokens_seen = (stats["tokens_generated"], stats["tokens_saved_estimate"])
            if policy is not None:
                self.metrics.record_policy(policy)

    @property
    def batch_size(self) -> int:
        """Rows the next call to :meth:`step` expects."""
        return len(self._request_ids)

    @property
    def request_ids(self) -> np.ndarray:
        """int64 (batch_size,): the request held by each row of the next step."""
        return self._request_ids

    def start(self, device: torch.device | str = "cpu") -> StepOutput:
        """Runs the scheduler on an empty batch: the first admissions (and the
        records of anything dropped from the queue)."""
        plan = self.scheduler.step(np.zeros(0, dtype=np.int64), HostSignals.zeros(0))
        return self._output(plan, None, torch.zeros(0, dtype=torch.int64, device=device))

    def step(self, logits: torch.Tensor) -> StepOutput:
        """logits: (batch_size, vocab_size) float32/float16/bfloat16, rows in the
        order of the previous plan (kept rows, then admitted)."""
        if logits.dim() != 2 or logits.shape[0] != self.batch_size:
            raise ValueError(
                f"Stepper.step: logits must be [{self.batch_size}, vocab] (one row per active sequence), "
                f"got shape {tuple(logits.shape)}"
            )
        device = logits.device
        sig = signals(
            logits,
            temperature=self.temperature,
            top_k_conf=self.top_k_conf,
            seed=torch.from_numpy(row_seeds(self.seed, self._request_ids)).to(device),
            offset=torch.from_numpy(self._positions).to(device),
            backend=self.backend,
        )
        if device.type == "cpu":  # numpy views: the scheduler reads them faster than tensors
            tokens = sig.token.numpy()
            logprob, entropy, confidence, margin, topk_conf = (getattr(sig, f).numpy() for f in _FIELDS)
            host = HostSignals(logprob, entropy, confidence, margin, topk_conf, status=sig.status.numpy())
        else:
            # The one host sync of the step: the scheduler needs the per-row
            # values. One float64 copy holds them all exactly (tokens < 2^53).
            rows = [sig.token, sig.status] + [getattr(sig, f) for f in _FIELDS]
            packed = torch.stack([r.double() for r in rows]).cpu().numpy()  # [7, batch]
            tokens = packed[0].astype(np.int64)
            logprob, entropy, confidence, margin, topk_conf = packed[2:].astype(np.float32)
            host = HostSignals(logprob, entropy, confidence, margin, topk_conf, status=packed[1].astype(np.int8))
        plan = self.scheduler.step(tokens, host)
        return self._output(plan, sig, sig.token)

    def _output(self, plan: StepPlan, sig: Signals | None, tokens: torch.Tensor) -> StepOutput:
        # plan.keep holds rows (compact) or slots (slots layout); rows of this
        # step are the previous plan's active slots in increasing order.
        kept_rows = plan.keep if plan.active is None else np.searchsorted(self._slots, plan.keep)
        keep = torch.tensor(kept_rows, dtype=torch.int64, device=tokens.device)  # copies: plan arrays are read-only
        self._request_ids = np.array(plan.request_ids, dtype=np.int64)
        self._positions = np.array(plan.positions, dtype=np.int64)
        if plan.active is not None:
            self._slots = np.flatnonzero(plan.active)
        finished = plan.finished
        if self._withdrawn:
            finished = []
            for record in plan.finished:
                sid = record.request_id
                if self._withdrawn[sid] and record.reason == StopReason.CANCELLED and record.num_tokens == 0:
                    self._withdrawn[sid] -= 1
                    if not self._withdrawn[sid]:
                        del self._withdrawn[sid]
                    continue
                finished.append(record)
        if self.metrics is not None:
            self._record(finished)
        return StepOutput(tokens=tokens.index_select(0, keep), keep=keep, plan=plan, signals=sig, finished=finished)

    def _record(self, finished: list) -> None:
        """Once per step: counts by reason, and the scheduler's token totals since the last step."""
        assert self.metrics is not None
        if finished:
            self.metrics.record_records(finished)
        stats = self.scheduler.stats()
        generated, saved = stats["tokens_generated"], stats["tokens_saved_estimate"]
        self.metrics.record_tokens(generated - self._tokens_seen[0], saved - self._tokens_seen[1])
        self._tokens_seen = (generated, saved)


@dataclass(frozen=True)
class HostSignals:
    """Host (numpy) copies of one step's per-row signals, as the scheduler reads them."""

    logprob: np.ndarray
    entropy: np.ndarray
    confidence: np.ndarray
    margin: np.ndarray
    topk_conf: np.ndarray
    status: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> "HostSignals":
        f = np.zeros(n, dtype=np.float32)
        return cls(f, f, f, f, f, status=np.zeros(n, dtype=np.int8))
