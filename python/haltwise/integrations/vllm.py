"""vLLM integration (``pip install haltwise[vllm]``): a v1 logits processor that
stops each request early on haltwise's stop rules.

    from vllm import LLM, SamplingParams
    from haltwise.integrations.vllm import HaltwiseLogitsProcessor

    llm = LLM(model=str(haltwise.models.BUNDLED_CHECKPOINT), logits_processors=[HaltwiseLogitsProcessor], ...)
    params = SamplingParams(max_tokens=112, stop_token_ids=[2], extra_args={"haltwise": {
        "low_conf_signal": "logprob", "low_conf_threshold": -2.0, "window": 16, "min_new_tokens": 16}})

or ``vllm serve MODEL --logits-processors haltwise.integrations.vllm:HaltwiseLogitsProcessor``
with ``"vllm_xargs": {"haltwise": "{\"low_conf_threshold\": -2.0}"}`` in the request body (the
server's vllm_xargs hold no nested objects, so there the settings are a JSON object string;
``extra_args`` takes a dict or that string).

Per-request settings (``SamplingParams.extra_args["haltwise"]``), all optional:
``low_conf_signal``, ``low_conf_threshold``, ``window``, ``min_new_tokens`` (those
of :class:`haltwise.StopConfig`) and ``top_k_conf`` (k of the DeepConf token
confidence, default 20). ``validate_params`` refuses bad ones with vLLM's
VLLMValidationError (a ValueError from ``parse_settings``) whose message names the key;
the OpenAI server answers HTTP 400. A request without "haltwise" is
never touched: its logits are not read or written, so it decodes exactly the tokens it
decodes without the processor.

Each step (``apply``):

1. For every row that asked, the tokens vLLM sampled since the last step are fed,
   with the signals of the logits they were sampled from, to that request's stop
   rules: its entry in a native :class:`haltwise.stop_table.StopTable`, all rows in
   one call per signalled step (the same C++ LOW_CONFIDENCE / CONFIDENT /
   INVALID_LOGITS rules as the decode loop and the HF integration; EOS, stop strings
   and max_tokens stay vLLM's). The logprob fed to the
   rules is that of the token vLLM chose: ``x[token] - logsumexp(x)`` over the raw
   logits, with the logsumexp recovered from the fused pass (``x[argmax] - logprob``).
2. A row whose rules fired gets its logits forced to its end token (the request's
   EOS, else its first stop token id): every other entry ``-inf``, the end token 0.
   So a cut output is the uncut output's prefix plus the end token; vLLM reports
   finish reason "stop".
3. One fused :func:`haltwise.signals` pass (native on CPU, Triton on CUDA) over the
   rows that asked and are still running (one pass per distinct ``top_k_conf``), on
   the raw logits (the model's distribution, as vLLM's default logprobs).

Rows follow :class:`BatchUpdate` exactly: removed, then added, then moved (SWAP
exchanges two rows' states, UNIDIRECTIONAL moves one and drops whatever the target
held). A request that leaves the batch (finished, aborted or preempted) ends its
rules with CANCELLED unless they had stopped it. ``stats`` counts requests by how
they ended (the stop reason names, plus "vllm" for requests vLLM ended itself), since
vLLM's output has no field for a stop reason.

Metrics: the processor counts the same in prometheus_client (docs/metrics.md), on
unless the environment variable ``HALTWISE_METRICS=0``. It runs in vLLM's engine core
process: for its metrics to reach ``vllm serve``'s /metrics, start the server with
``PROMETHEUS_MULTIPROC_DIR`` set to an empty directory (prometheus_client's
multiprocess mode).
"""
from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from ..metrics import metrics_from_env
from .vllm_rows import EXTRA_ARGS_KEY, SETTING_KEYS, RowTable, parse_settings, topk_confidence

__all__ = ["HaltwiseLogitsProcessor", "parse_settings", "EXTRA_ARGS_KEY", "SETTING_KEYS"]


class HaltwiseLogitsProcessor(LogitsProcessor):
    """vLLM v1 logits processor: haltwise's stop rules per request (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        try:
            parse_settings(sampling_params)
        except ValueError as e:  # the OpenAI server answers HTTP 400
            raise VLLMValidationError(str(e), parameter=f"extra_args.{EXTRA_ARGS_KEY}",
                                      value=(sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)) from None

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        spec = getattr(vllm_config, "speculative_config", None)
        if spec is not None:
            raise ValueError("HaltwiseLogitsProcessor: speculative decoding is not supported "
                             f"(several tokens per step have no per-token logits here), got {spec}")
        self.table = RowTable(metrics=metrics_from_env("HaltwiseLogitsProcessor"))

    @property
    def stats(self):
        """Requests by how they ended: stop reason names, "vllm" (ended by vLLM itself), "untracked"."""
        return self.table.stats

    def is_argmax_invariant(self) -> bool:
        return False  # forcing the end token changes the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.table.update(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.table.apply(logits)


# The warm-up thresholds come from vLLM's logprobs (log_softmax), the rule runs on the
# processor's (x[token] - logsumexp from the fused pass): the two differ by float32
# rounding (~1e-6). This model decodes many traces token for token alike, whose lowest
# window mean then equals the threshold; haltwise's own loop, where both sides are the
# same numbers, keeps them (the rule is strict). Lowering the threshold by this margin
# keeps them here too instead of cutting them on rounding.
ROUNDING_MARGIN = 1e-4


class _Trace:
    """A trace in flight: its problem, index, and what vLLM has returned so far."""

    def __init__(self, problem: int, trace: int, top_k: int):
        self.problem, self.trace, self.top_k = problem, trace, top_k
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []  # of the sampled tokens (NaN where vLLM returned none)
        self.confs: list[float] = []  # top_k > 0: each token's topk_confidence

    def extend(self, token_ids, logprobs) -> None:
        self.token_ids.extend(token_ids)
        if logprobs is None or len(logprobs) != len(token_ids):
            self.logprobs.extend([float("nan")] * len(token_ids))
            self.confs.extend([float("nan")] * len(token_ids) if self.top_k else [])
            return
        self.logprobs.extend(lp[t].logprob for t, lp in zip(token_ids, logprobs))
        if self.top_k:
            self.confs.extend(topk_confidence([v.logprob for v in lp.values()], self.top_k) for lp in logprobs)

    def truncate(self, n: int) -> None:
        del self.token_ids[n:], self.logprobs[n:], self.confs[n:]


class VLLMParallelSampler:
    """K traces per problem on a vLLM engine, under the same :class:`EarlyStopSettings`
    (warm-up thresholds, waves, consensus rules, votes) as haltwise's own
    :class:`~haltwise.decoding.parallel.ParallelSampler`, sharing its code: which
    traces start when and when the vote settles (one
    :class:`~haltwise.decoding.waves.TraceWaves` per problem), the end of a trace
    and the vote (``ProblemResult.end_trace`` / ``count_votes``) and the window means
    (``tracebank``). Needs an ``LLM`` whose engine loaded HaltwiseLogitsProcessor.

    * Warm-up traces run uncut and return the sampled tokens' logprobs, from which the
      problem's threshold is set; later traces get it through ``extra_args``.
    * Waves: after the warm-up a problem's traces are added ``wave_size`` at a time
      (0: all at once), the next wave once the previous one has ended.
    * Consensus: once a problem's vote is settled ("unbeatable" checked after every
      trace, "beta" / "run" at wave boundaries) its in-flight traces are ended through
      vLLM's own ``abort_request`` (reason GROUP_CONSENSUS, their tokens so far
      counted) and the rest never start (GROUP_CONSENSUS, 0 tokens).
    * A trace whose end token the processor forced is told apart from one that ended on
      its own by replaying the rule on its returned logprobs (``tracebank.cut_length``:
      the rule fired on a token before the last one): it gets reason LOW_CONFIDENCE and
      does not vote, as in the haltwise loop.
    * ``signal="topk_conf"`` (the DeepConf baselines of ``haltwise bench``) runs the
      DeepConf way, on the client, as DeepConf's own vLLM integration does: every
      token comes back with its top ``top_k_conf`` logprobs (``logprobs=k``), the
      client computes each token's confidence (``vllm_rows.topk_confidence``), sets
      the warm-up threshold from them and aborts a trace (``abort_request``, reason
      LOW_CONFIDENCE) as soon as a window mean falls below it (the window /
      min_new_tokens rule of ``tracebank.cut_length``); no haltwise settings reach
      the engine. ``vote="deepconf"`` filters and weights the votes by the traces'
      lowest group confidence (``ProblemResult.count_votes``), as in haltwise's loop.
      The logprobs are vLLM's default ``logprobs_mode="raw_logprobs"``: log_softmax
      of the raw logits, before temperature, penalties and logits processors -- the
      model's distribution, on which haltwise computes its signals too
      (docs/signals.md). Shipping k logprobs per token to the client is the cost this
      comparison measures against haltwise's in-engine cut.
    """

    def __init__(self, llm, task, *, temperature: float = 1.0, seed: int = 0, top_k_conf: int = 20):
        self.llm, self.task = llm, task
        self.temperature, self.seed, self.top_k_conf = temperature, seed, top_k_conf
        self._run_id = 0

    @staticmethod
    def unsupported(settings) -> str | None:
        """Why this driver cannot run `settings` (None: it can)."""
        # logprob: cut in the engine and replayed from the sampled tokens' logprobs;
        # topk_conf: computed and cut on the client from the top-k logprobs
        if settings.signal not in ("logprob", "topk_conf"):
            return (f"settings.signal must be 'logprob' (cut in the engine) or 'topk_conf' (cut on the client "
                    f"from vLLM's top-k logprobs), got {settings.signal!r}")
        return None

    def run(self, problems, settings, progress=None, *, plan=None, done=None, max_problems=None):
        """Decode every problem's traces; `progress(n)` is called as traces end.
        plan / done / max_problems: ParallelSampler.run's per-problem hooks (the
        adaptive policy plans and observes each problem through them,
        policy.sampling.run_adaptive): plan(p) is asked when problem p starts,
        done(p, result) once its vote is counted, and at most max_problems are
        in flight (None: all). A plan's StopConfig reaches the engine through
        extra_args (its threshold per trace, signal, window, min_new_tokens);
        ``shadow`` is evaluated on the client from the returned logprobs (the
        engine never cuts; would_stop_step says where it would have), and
        ``record_signals`` returns those logprobs as ``signals["logprob"]`` (and the
        client's ``signals["topk_conf"]`` when it computes them)."""
        import math
        import time

        import numpy as np
        from vllm.sampling_params import RequestOutputKind

        from ..decoding.loop import LoopStats
        from ..decoding.parallel import (ProblemFeed, ProblemPlan, ProblemResult, RunResult, TraceResult, check_plan,
                                         default_stop)
        from ..decoding.waves import TraceWaves
        from ..scheduler import StopReason
        from ..trace_rules import VOTING_REASONS, lowest_group_confidence
        from ..tracebank import cut_length, lowest_window_mean

        why = self.unsupported(settings)
        if why:
            raise ValueError(f"VLLMParallelSampler.run: {why}")

        engine = self.llm.llm_engine
        K = settings.traces
        self._run_id += 1
        tag = f"hw{self._run_id}"
        results = [ProblemResult(answer=None, reference=self.task.reference(p), threshold=None) for p in problems]
        prompts = [{"prompt_token_ids": list(self.task.prompt_ids(p))} for p in problems]
        waves: dict[int, TraceWaves] = {}  # by problem, from when it begins
        settings_of: dict = {}
        stops: dict = {}
        live: dict[str, _Trace] = {}  # request id -> trace in flight
        stats = LoopStats()

        def on_client(p: int) -> bool:
            """DeepConf's way: the client computes the confidence and cuts."""
            return settings_of[p].signal == "topk_conf"

        def cut_rule(p: int, values, threshold: float, last_evaluated: bool = True):
            stop = stops[p]
            return cut_length(values, threshold, window=stop.window, min_new_tokens=stop.min_new_tokens,
                              last_evaluated=last_evaluated)

        def threshold_of(p: int, k: int) -> float | None:
            """The threshold the processor cuts trace k at: the problem's minus the margin
            (None: uncut, cut on the client, or shadowed)."""
            base = waves[p].threshold_of(k)
            return None if base is None or on_client(p) or stops[p].shadow else base - ROUNDING_MARGIN

        def begin(p: int) -> None:
            chosen = plan(p) if plan is not None else ProblemPlan(settings)
            check_plan(chosen, p, K, "VLLMParallelSampler.run")
            s = chosen.settings
            why = self.unsupported(s)
            if why:
                raise ValueError(f"VLLMParallelSampler.run: plan({p}): {why}")
            stop = chosen.stop if chosen.stop is not None else default_stop(s, self.task.eos_ids)
            if stop.low_conf_signal != s.signal and (stop.low_conf_threshold is not None or stop.shadow):
                raise ValueError(f"VLLMParallelSampler.run: plan({p}) cuts on {stop.low_conf_signal!r}; the client "
                                 f"replays the rule on the settings' signal {s.signal!r}: they must be the same")
            settings_of[p], stops[p] = s, stop
            waves[p] = TraceWaves(s)
            results[p].threshold = waves[p].threshold
            submit(p)

        def submit(p: int) -> None:
            s, stop = settings_of[p], stops[p]
            top_k = self.top_k_conf if on_client(p) else 0
            for k in waves[p].start():
                threshold = threshold_of(p, k)
                extra = None
                if threshold is not None:
                    extra = {EXTRA_ARGS_KEY: {"low_conf_signal": s.signal, "low_conf_threshold": threshold,
                                              "window": stop.window, "min_new_tokens": stop.min_new_tokens,
                                              "top_k_conf": self.top_k_conf}}
                params = SamplingParams(temperature=self.temperature, seed=self.seed * 1_000_003 + p * K + k,
                                        max_tokens=s.max_new_tokens, stop_token_ids=list(self.task.eos_ids),
                                        logprobs=top_k, extra_args=extra, detokenize=False,
                                        output_kind=RequestOutputKind.DELTA)
                rid = f"{tag}-{p}-{k}"
                engine.add_request(rid, prompts[p], params)
                live[rid] = _Trace(p, k, top_k)

        def client_cut(rid: str) -> None:
            """Aborts the trace once a window mean of its confidence is below the threshold."""
            t = live[rid]
            threshold = waves[t.problem].threshold_of(t.trace)
            if threshold is None or stops[t.problem].shadow:  # shadow: never cut, end() says where it would have
                return
            n = cut_rule(t.problem, np.array(t.confs, dtype=np.float64), threshold)
            if n is not None:
                engine.abort_request([rid])
                t.truncate(n)  # the trace as the rule cut it (a step may return more than one token)
                end(rid, StopReason.LOW_CONFIDENCE)

        def recorded(p: int, t: _Trace) -> dict:
            """The per-token signals the client has (Finished.signals' names)."""
            out = {"logprob": np.array(t.logprobs, dtype=np.float32)}
            if on_client(p):
                out["topk_conf"] = np.array(t.confs, dtype=np.float32)
            return out

        def end(rid: str, reason: StopReason) -> None:
            t = live.pop(rid)
            p, k = t.problem, t.trace
            s, stop = settings_of[p], stops[p]
            values = np.array(t.confs if on_client(p) else t.logprobs, dtype=np.float64)
            logprobs = np.array(t.logprobs, dtype=np.float64)
            threshold = threshold_of(p, k)
            # the rule fired on some token before the last: the processor forced the end token
            # (at the next step, or one later when async scheduling delays the token's value)
            if (reason == StopReason.EOS and threshold is not None and len(values) >= 2
                    and cut_rule(p, values[:-1], threshold) is not None):
                reason = StopReason.LOW_CONFIDENCE
            answer = self.task.answer_of(t.token_ids) if reason in VOTING_REASONS else None
            trace = TraceResult(
                problem=p, trace=k, reason=reason, num_tokens=len(t.token_ids), answer=answer,
                correct=answer is not None and answer == results[p].reference,
                min_window_mean=lowest_window_mean(values, window=stop.window, min_new_tokens=stop.min_new_tokens),
                mean_logprob=float(logprobs.mean()) if len(logprobs) else math.nan,
                signals=recorded(p, t) if stop.record_signals else None)
            shadowed = waves[p].threshold_of(k) if stop.shadow else None
            if shadowed is not None:  # where the rule would have stopped this uncut trace
                step = cut_rule(p, values, shadowed, last_evaluated=False)
                if step is not None:
                    trace.would_stop_step, trace.would_stop_reason = step, int(StopReason.LOW_CONFIDENCE)
            if s.vote == "deepconf":
                trace.lowest_conf = lowest_group_confidence(trace.min_window_mean,
                                                            float(values.mean()) if len(values) else math.nan)
            results[p].traces.append(trace)
            if progress is not None:
                progress(1)
            if results[p].end_trace(waves[p], s, trace):
                siblings = [r for r, x in live.items() if x.problem == p]
                if siblings:
                    engine.abort_request(siblings)
                for r in siblings:
                    x = live.pop(r)
                    results[p].traces.append(TraceResult(
                        problem=p, trace=x.trace, reason=StopReason.GROUP_CONSENSUS, num_tokens=len(x.token_ids),
                        answer=None, correct=False, min_window_mean=math.nan, mean_logprob=math.nan))
            submit(p)
            if len(results[p].traces) == s.traces:
                feed.finish(p)

        feed = ProblemFeed(results, settings_of, begin, done, max_problems, "VLLMParallelSampler.run")
        t0 = time.perf_counter()
        feed.start()
        while engine.has_unfinished_requests():
            outputs = engine.step()
            stats.steps += 1
            for out in outputs:
                t = live.get(out.request_id)
                if t is None:
                    continue  # aborted: already recorded
                comp = out.outputs[0]
                t.extend(comp.token_ids, comp.logprobs)
                if out.finished:
                    end(out.request_id, StopReason.MAX_TOKENS if comp.finish_reason == "length" else StopReason.EOS)
                elif on_client(t.problem):
                    client_cut(out.request_id)
        stats.wall_s = time.perf_counter() - t0
        feed.check_complete()
        run = RunResult(settings=settings, problems=results, loop=stats)
        stats.tokens = run.tokens
        return run
