"""The vLLM-independent part of haltwise.integrations.vllm: per-request settings,
the rows that asked (following vLLM's BatchUpdate: removed, then added, then moved)
and the step (feed the sampled tokens to the native stop rules, force the end token
of the rows they stopped, one fused signals pass over the rows still running).
Importable without vLLM so the bookkeeping is tested on its own."""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ..metrics import HaltwiseMetrics
from ..scheduler import MAX_NEW_TOKENS, StopConfig, StopReason, check_int
from ..signals import signals
from ..signals_types import MAX_TOP_K_CONF
from ..stepper import HostSignals
from ..stop_table import StopTable

__all__ = ["RowTable", "HaltwiseSettings", "parse_settings", "end_token", "topk_confidence", "EXTRA_ARGS_KEY",
           "SETTING_KEYS"]

logger = logging.getLogger(__name__)

EXTRA_ARGS_KEY = "haltwise"
SETTING_KEYS = ("low_conf_signal", "low_conf_threshold", "window", "min_new_tokens", "top_k_conf")
_NO_LIMIT = MAX_NEW_TOKENS  # max_tokens is vLLM's to enforce
_SAVING = ("LOW_CONFIDENCE", "CONFIDENT")  # the cuts whose unspent budget counts as saved (as the scheduler's estimate)


@dataclasses.dataclass(frozen=True)
class HaltwiseSettings:
    stop: StopConfig
    top_k_conf: int


def parse_settings(params) -> HaltwiseSettings | None:
    """The request's haltwise settings, None if it did not ask; ValueError naming
    the key for anything wrong."""
    extra = params.extra_args
    if not extra or EXTRA_ARGS_KEY not in extra:
        return None
    where = f"extra_args[{EXTRA_ARGS_KEY!r}]"
    cfg = extra[EXTRA_ARGS_KEY]
    if isinstance(cfg, str):  # the OpenAI server's vllm_xargs hold no nested objects: a JSON string then
        try:
            cfg = json.loads(cfg)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} must be a dict or a JSON object string, got a string that is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} must be a dict with keys among {SETTING_KEYS}, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(SETTING_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected keys among {SETTING_KEYS}")
    try:
        top_k_conf = check_int(where, "top_k_conf", cfg.get("top_k_conf", 20), 0, MAX_TOP_K_CONF)
        stop = StopConfig(**{k: v for k, v in cfg.items() if k != "top_k_conf"})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    if stop.low_conf_signal == "topk_conf" and top_k_conf == 0:
        raise ValueError(f"{where}: low_conf_signal 'topk_conf' needs top_k_conf >= 1, got top_k_conf 0")
    if params.ignore_eos:
        raise ValueError(f"{where}: a request that asks haltwise to stop it cannot set ignore_eos=True")
    if params.min_tokens:
        raise ValueError(f"{where}: use the haltwise key min_new_tokens instead of min_tokens "
                         f"(min_tokens masks the end token that a cut forces), got min_tokens={params.min_tokens}")
    return HaltwiseSettings(stop=stop, top_k_conf=top_k_conf)


def topk_confidence(logprobs, k: int) -> float:
    """DeepConf's token confidence (haltwise's ``topk_conf``, docs/signals.md) from the
    log-probabilities vLLM returns for one token (``logprobs=k``: the top k, plus the
    sampled token when it is not among them): minus the mean of the k largest finite
    ones, 0.0 when there are none. Higher = more confident."""
    top = sorted((v for v in logprobs if math.isfinite(v)), reverse=True)[:k]
    return -math.fsum(top) / len(top) if top else 0.0


def end_token(params) -> int | None:
    """The token a cut forces: the request's EOS, else its smallest stop token id."""
    if params.eos_token_id is not None:
        return int(params.eos_token_id)
    stops = sorted(params.all_stop_token_ids or params.stop_token_ids or ())
    return int(stops[0]) if stops else None


class _StepSignals:
    """One apply's fused-pass results for the rows it ran, kept until each row's
    sampled token arrives: that step's logits (on their device) and logsumexp,
    for the sampled token's logprob, and the other signals on the host."""

    __slots__ = ("serial", "x", "lse", "host", "status")

    def __init__(self, serial: int, x: torch.Tensor, out) -> None:
        self.serial = serial  # steps are fed oldest first
        self.x = x  # [n, V], the gathered rows (a copy the fused pass needs anyway)
        self.lse = x.gather(1, out.token[:, None]).squeeze(1) - out.logprob  # x[argmax] - logprob(argmax)
        # [4, n] float32: entropy, confidence, margin, topk_conf (one transfer)
        self.host = torch.stack((out.entropy, out.confidence, out.margin, out.topk_conf)).cpu().numpy()
        self.status = out.status.cpu().numpy()

    def logprobs(self, js: npt.NDArray[np.int64], tokens: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The logprob of ``tokens[i]`` in row ``js[i]`` (NaN for a token outside the
        vocabulary): one gather, one transfer."""
        valid = (tokens >= 0) & (tokens < self.x.shape[1])
        j = torch.from_numpy(js).to(self.x.device)
        t = torch.from_numpy(np.where(valid, tokens, 0)).to(self.x.device)
        values = (self.x[j, t].float() - self.lse[j].float()).cpu().numpy()
        return np.where(valid, values, np.float32(np.nan)).astype(np.float32, copy=False)

    def fed_signals(self, js: npt.NDArray[np.int64], tokens: npt.NDArray[np.int64]) -> HostSignals:
        """Rows ``js`` of this step's signals, with the logprobs of ``tokens``."""
        entropy, confidence, margin, topk = self.host[:, js]
        return HostSignals(self.logprobs(js, tokens), entropy, confidence, margin, topk, self.status[js])


class _Row:
    """One request that asked: its entry in the RowTable's StopTable and the steps
    whose sampled token it has not fed yet."""

    __slots__ = ("settings", "out", "end", "max_tokens", "handle", "start", "fed", "seen_len", "pending", "stopped",
                 "reason")

    def __init__(self, settings: HaltwiseSettings, out: list[int], end: int, handle: int,
                 max_tokens: int | None = None):
        self.settings, self.out, self.end, self.handle, self.max_tokens = settings, out, end, handle, max_tokens
        self.start = len(out)  # output tokens it came with (a resumed request keeps its own)
        self.fed = len(out)  # output tokens accounted for
        self.seen_len = len(out)  # len(out) at the last apply, placeholders included
        self.pending: collections.deque = collections.deque()  # (_StepSignals, row in it), oldest first
        self.stopped = False
        self.reason: str | None = None


class RowTable:
    """The state of HaltwiseLogitsProcessor without vLLM: the rows that asked, keyed
    by their index in vLLM's persistent batch, and the step. ``update`` takes a
    BatchUpdate (or any object with its fields; moves' directions are compared by
    name, "SWAP" / "UNIDIRECTIONAL"). ``metrics``: a HaltwiseMetrics that counts what
    ``stats`` counts, and the tokens fed to the rules (docs/metrics.md)."""

    def __init__(self, metrics: HaltwiseMetrics | None = None):
        self.rows: dict[int, _Row] = {}
        self.table = StopTable()  # the rows' stop rules, fed once per signalled step
        self._serial = 0
        self.stats: collections.Counter = collections.Counter()
        self.metrics = metrics

    def _count(self, key: str) -> None:
        self.stats[key] += 1
        if self.metrics is not None:
            if key in ("untracked", "no_end_token"):
                self.metrics.record_untracked(key)
            else:
                self.metrics.record_finished((key,))

    # ---- batch bookkeeping ------------------------------------------------------

    def _end(self, row: _Row | None) -> None:
        if row is None:
            return
        self.table.remove(row.handle)
        if not row.stopped:
            self._count("vllm")

    def update(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._end(self.rows.pop(index, None))
        for index, params, _prompt, out in batch_update.added:
            self._end(self.rows.pop(index, None))
            settings = parse_settings(params)
            if settings is None:
                continue
            end = end_token(params)
            if end is None:
                logger.warning("haltwise: a request asked for early stopping but has no EOS or stop token id "
                               "to end it with; it decodes uncut")
                self._count("no_end_token")
                continue
            handle = self.table.add(settings.stop)
            self.rows[index] = _Row(settings, out, end, handle, getattr(params, "max_tokens", None))
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction.name == "SWAP":
                if row_b is not None:
                    self.rows[a] = row_b
            else:
                self._end(row_b)  # UNIDIRECTIONAL: b's old occupant is replaced

    # ---- the step -----------------------------------------------------------------

    def _collect(self, row: _Row, feeds: list) -> None:
        """Queue the row's newly sampled tokens with the steps that signalled them, as
        (row, step, row in step, token); step None: a token with no signalled step."""
        n = len(row.out)
        if n == row.seen_len and row.pending:
            row.pending.pop()  # the last step's sample was discarded (a partial prefill chunk)
        row.seen_len = n
        k = row.fed
        while k < n and row.out[k] != -1:  # -1: async placeholder, not known yet
            if not row.pending:
                feeds.append((row, None, 0, row.out[k]))
                break
            step, j = row.pending.popleft()
            feeds.append((row, step, j, row.out[k]))
            k += 1
        row.fed = k  # all of them, unless the row stops on one (then _feed sets it)

    def _feed(self, feeds: list) -> int:
        """Feed the queued tokens to their rows' rules: one native call per signalled
        step, oldest first (a row's tokens come from successive steps, so each row
        is fed in order and takes nothing after it stops). Returns how many were fed."""
        by_step: dict[int, tuple[_StepSignals, list[int]]] = {}
        untracked = []
        for i, (row, step, _j, _token) in enumerate(feeds):
            if step is None:
                untracked.append(row)
            else:
                by_step.setdefault(step.serial, (step, []))[1].append(i)
        fed = 0
        for serial in sorted(by_step):
            step, items = by_step[serial]
            rows = [feeds[i][0] for i in items]
            js = np.array([feeds[i][2] for i in items], dtype=np.int64)
            tokens = np.array([feeds[i][3] for i in items], dtype=np.int64)
            handles = np.array([row.handle for row in rows], dtype=np.int64)
            codes = self.table.feed(handles, tokens, step.fed_signals(js, tokens))
            fed += int(np.count_nonzero(codes >= 0))
            for i in np.flatnonzero(codes > 0).tolist():
                self._stopped(rows[i], StopReason(int(codes[i])).name)
        for row in untracked:
            if not row.stopped:
                logger.warning("haltwise: more sampled tokens than signalled steps (speculative decoding?); "
                               "the request decodes uncut from here")
                row.stopped, row.reason = True, "untracked"
                self._count("untracked")
        return fed

    def _stopped(self, row: _Row, reason: str) -> None:
        row.stopped, row.reason = True, reason
        row.fed = row.start + self.table.num_tokens(row.handle)
        self._count(reason)
        if self.metrics is not None and row.max_tokens is not None and reason in _SAVING:
            # the forced end token is one more output token
            self.metrics.record_tokens(0, max(0, row.max_tokens - row.fed - 1))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        feeds: list = []
        for index in sorted(self.rows):
            row = self.rows[index]
            if not row.stopped:
                self._collect(row, feeds)
        fed = self._feed(feeds)
        running: dict[int, list[int]] = collections.defaultdict(list)  # top_k_conf -> rows
        forced = []
        for index in sorted(self.rows):
            row = self.rows[index]
            if row.stopped:
                if row.reason != "untracked":
                    forced.append((index, row.end))
            else:
                running[row.settings.top_k_conf].append(index)
        for k, rows in running.items():
            idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
            x = logits.index_select(0, idx)  # [n, V], this step's logits of those rows (a copy, kept for the next step)
            self._serial += 1
            step = _StepSignals(self._serial, x, signals(x, temperature=0.0, top_k_conf=k))  # one fused pass
            for j, index in enumerate(rows):
                self.rows[index].pending.append((step, j))
        if self.metrics is not None and fed:
            self.metrics.record_tokens(fed)  # once per step, not per row
        for index, end in forced:
            logits[index].fill_(-math.inf)
            logits[index, end] = 0.0
        return logits
