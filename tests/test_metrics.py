"""haltwise.metrics: a real decode (Stepper on random logits; the vLLM processor's
RowTable without vLLM) scraped over HTTP from prometheus_client's exposition, in
one process and in multiprocess mode; and haltwise without prometheus_client."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

prometheus_client = pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
from prometheus_client import CollectorRegistry, multiprocess  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from haltwise import Policy, PolicyConfig, Scheduler, StopConfig, Stepper  # noqa: E402
from haltwise.integrations.vllm_rows import RowTable  # noqa: E402
from haltwise.metrics import HaltwiseMetrics, get_metrics, metrics_from_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def scrape(registry: CollectorRegistry) -> dict:
    """GET /metrics from an HTTP server on the registry; {(sample name, labels): value}."""
    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=30) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def finished_by_reason(samples: dict) -> dict:
    return {dict(labels)["reason"]: value for (name, labels), value in samples.items()
            if name == "haltwise_finished_sequences_total"}


def decode(stepper: Stepper, seed: int, cancel: int | None = None) -> None:
    """Steps random logits until the batch and the queue are empty; cancels one request midway."""
    gen = torch.Generator().manual_seed(seed)
    stepper.start()
    steps = 0
    while stepper.batch_size or stepper.scheduler.stats()["queued"]:
        if steps == 3 and cancel is not None:
            stepper.scheduler.cancel(cancel)
        if stepper.batch_size == 0:
            stepper.start()
            continue
        # a peaked row now and then: some sequences become CONFIDENT, flat ones LOW_CONFIDENCE
        logits = torch.randn(stepper.batch_size, 16, generator=gen) * (1 + 30 * (steps % 5 == 0))
        stepper.step(logits)
        steps += 1


def submit_mix(sched: Scheduler, n: int) -> None:
    """Requests under stop rules that end them in different ways."""
    for rid in range(n):
        stop = [StopConfig(eos_ids=(0,)),
                StopConfig(low_conf_signal="logprob", low_conf_threshold=-2.0, window=4),
                StopConfig(confident_entropy_below=0.5, confident_margin_above=5.0, confident_steps=1),
                StopConfig()][rid % 4]
        sched.submit(rid, max_new_tokens=10 + rid % 7, stop=stop)


def test_stepper_metrics_equal_the_scheduler_stats():
    registry = CollectorRegistry()
    sched = Scheduler(6, layout="slots")
    submit_mix(sched, 24)
    stepper = Stepper(sched, temperature=1.0, seed=5, metrics=get_metrics(registry))
    decode(stepper, seed=1, cancel=20)
    stats = sched.stats()
    samples = scrape(registry)
    expected = {reason: n for reason, n in stats["finished"].items() if n}
    assert len(expected) >= 4, expected  # the mix ends sequences in several ways
    assert finished_by_reason(samples) == expected
    assert samples[("haltwise_tokens_generated_total", ())] == stats["tokens_generated"] > 0
    assert samples[("haltwise_tokens_saved_upper_bound_total", ())] == stats["tokens_saved_estimate"] > 0


def test_metrics_count_from_the_stepper_s_creation_and_are_shared_per_registry():
    registry = CollectorRegistry()
    sched = Scheduler(4)
    submit_mix(sched, 8)
    decode(Stepper(sched, temperature=1.0), seed=2)  # before metrics: not counted
    before = sched.stats()
    submit_mix(sched, 8)  # ids reused: the earlier ones have ended
    decode(Stepper(sched, temperature=1.0, seed=3, metrics=get_metrics(registry)), seed=3)
    after = sched.stats()
    samples = scrape(registry)
    assert samples[("haltwise_tokens_generated_total", ())] == after["tokens_generated"] - before["tokens_generated"]
    assert sum(finished_by_reason(samples).values()) == 8
    assert get_metrics(registry) is get_metrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        HaltwiseMetrics(registry)  # a second set in the same registry: prometheus_client refuses


def test_policy_gauges_follow_the_thresholds_and_the_overload_state():
    registry = CollectorRegistry()
    metrics = get_metrics(registry)
    policy = Policy(PolicyConfig(traces=2, window=4, enter_after=1))
    stepper = Stepper(Scheduler(8, layout="slots"), temperature=1.0, policy=policy, metrics=metrics)
    stepper.submit(1, max_new_tokens=4, key="math/easy")
    samples = scrape(registry)
    buckets = {dict(labels)["bucket"] for (name, labels) in samples if name == "haltwise_policy_threshold"}
    assert buckets == {"(global)", "math", "math/easy"}
    assert math.isnan(samples[("haltwise_policy_threshold", (("bucket", "math"), ("mode", "normal")))])  # warm-up
    assert samples[("haltwise_policy_overload", ())] == 0
    policy.observe_load(queue_depth=1e6)
    metrics.record_policy(policy)
    assert scrape(registry)[("haltwise_policy_overload", ())] == 1

    # values in force, and the overload fallback to the normal value
    fake = SimpleNamespace(overload=False, thresholds=lambda: {
        "": {"threshold": -1.5, "overload_threshold": None}, "a": {"threshold": -2.0, "overload_threshold": -1.0}})
    metrics.record_policy(fake)
    samples = scrape(registry)
    assert samples[("haltwise_policy_threshold", (("bucket", "(global)"), ("mode", "overload")))] == -1.5
    assert samples[("haltwise_policy_threshold", (("bucket", "a"), ("mode", "normal")))] == -2.0
    assert samples[("haltwise_policy_threshold", (("bucket", "a"), ("mode", "overload")))] == -1.0
    assert samples[("haltwise_policy_overload", ())] == 0


def test_bad_arguments_are_refused_naming_them(monkeypatch):
    with pytest.raises(TypeError, match="Stepper: metrics must be a bool, None or a haltwise.metrics.HaltwiseMetrics"):
        Stepper(Scheduler(1), metrics="yes")
    with pytest.raises(TypeError, match="registry must be a prometheus_client.CollectorRegistry"):
        HaltwiseMetrics(registry={})
    monkeypatch.setenv("HALTWISE_METRICS", "on")
    with pytest.raises(ValueError, match="HALTWISE_METRICS must be '0', '1' or unset, got 'on'"):
        metrics_from_env("HaltwiseLogitsProcessor")
    monkeypatch.setenv("HALTWISE_METRICS", "0")
    assert metrics_from_env("HaltwiseLogitsProcessor") is None


def test_without_prometheus_client_haltwise_runs_and_metrics_say_how_to_install(monkeypatch):
    code = textwrap.dedent("""
        import sys
        import haltwise, haltwise.metrics, haltwise.stepper, haltwise.integrations.vllm_rows
        assert "prometheus_client" not in sys.modules, "imported without being asked for"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if not installed
    monkeypatch.delenv("HALTWISE_METRICS", raising=False)
    sched = Scheduler(2)
    sched.submit(0, max_new_tokens=3)
    decode(Stepper(sched), seed=0)  # metrics off: no import
    assert sched.stats()["finished"]["MAX_TOKENS"] == 1
    with pytest.raises(ImportError, match=r'pip install "haltwise\[metrics\]"'):
        Stepper(Scheduler(1), metrics=True)
    assert metrics_from_env("HaltwiseLogitsProcessor") is None  # unset: off when it cannot import
    monkeypatch.setenv("HALTWISE_METRICS", "1")
    with pytest.raises(ImportError, match=r'pip install "haltwise\[metrics\]"'):
        metrics_from_env("HaltwiseLogitsProcessor")


_WORKER = textwrap.dedent("""
    import json, sys
    from types import SimpleNamespace
    import test_metrics as t
    from haltwise import Scheduler, Stepper
    from haltwise.metrics import get_metrics

    seed, threshold = int(sys.argv[1]), float(sys.argv[2])
    sched = Scheduler(4, layout="slots")
    t.submit_mix(sched, 12)
    metrics = get_metrics()  # the global registry: in multiprocess mode, values go to PROMETHEUS_MULTIPROC_DIR
    t.decode(Stepper(sched, temperature=1.0, seed=seed, metrics=metrics), seed=seed)
    metrics.record_policy(SimpleNamespace(overload=seed % 2 == 0, thresholds=lambda: {
        "": {"threshold": threshold, "overload_threshold": None}}))
    print(json.dumps(sched.stats()))
""")


def test_multiprocess_mode_sums_the_processes(tmp_path):
    """Processes with PROMETHEUS_MULTIPROC_DIR set each record; a MultiProcessCollector
    scrape sums their counters and shows the gauges the last process set."""
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    stats = []
    for seed, threshold in ((11, -1.25), (12, -0.75)):  # one after the other: the second sets the gauges last
        done = subprocess.run([sys.executable, "-c", _WORKER, str(seed), str(threshold)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        stats.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert len(list(mp_dir.glob("*.db"))) >= 2  # the processes wrote their own files

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(mp_dir))
    samples = scrape(registry)
    expected: Counter = Counter()
    for s in stats:
        expected.update({reason: n for reason, n in s["finished"].items() if n})
    assert finished_by_reason(samples) == dict(expected)
    assert samples[("haltwise_tokens_generated_total", ())] == sum(s["tokens_generated"] for s in stats)
    assert samples[("haltwise_tokens_saved_upper_bound_total", ())] == sum(s["tokens_saved_estimate"] for s in stats)
    assert samples[("haltwise_policy_threshold", (("bucket", "(global)"), ("mode", "normal")))] == -0.75
    assert samples[("haltwise_policy_overload", ())] == 1  # seed 12 is even


def test_vllm_row_table_metrics_without_vllm():
    """The processor's RowTable, driven as vLLM drives it: a request cut by its rule, one
    that vLLM ends, one that does not ask and one with no end token."""
    from test_vllm_rows import Direction, Update, params

    registry = CollectorRegistry()
    table = RowTable(metrics=get_metrics(registry))
    cut = {"low_conf_signal": "logprob", "low_conf_threshold": 0.0, "window": 2, "min_new_tokens": 3}
    never = {**cut, "low_conf_threshold": -1e30}
    outs: list[list[int]] = [[], [], [], []]
    table.update(Update(4, [], [
        (0, params(cut, max_tokens=20), [1], outs[0]), (1, params(never, max_tokens=20), [1], outs[1]),
        (2, params(None, max_tokens=20), [1], outs[2]),
        (3, params(cut, eos_token_id=None, all_stop_token_ids=set(), max_tokens=20), [1], outs[3])], []))
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        logits = table.apply(torch.randn(4, 8, generator=gen))
        for out, row in zip(outs, logits):
            out.append(int(row.argmax()))
    assert table.rows[0].reason == "LOW_CONFIDENCE" and outs[0][-1] == 2  # forced to the end token
    table.update(Update(2, [0, 1], [], [(3, 0, Direction.UNIDIRECTIONAL), (2, 1, Direction.UNIDIRECTIONAL)]))
    samples = scrape(registry)
    assert finished_by_reason(samples) == {"LOW_CONFIDENCE": 1, "vllm": 1} == {
        k: v for k, v in table.stats.items() if k != "no_end_token"}
    assert samples[("haltwise_vllm_uncut_requests_total", (("cause", "no_end_token"),))] == 1
    # fed: the cut row its 3 tokens (min_new_tokens); the other row every token known at its last apply (7)
    assert samples[("haltwise_tokens_generated_total", ())] == 3 + 7
    assert samples[("haltwise_tokens_saved_upper_bound_total", ())] == 20 - 3 - 1  # less the forced end token


def test_docs_list_every_metric_with_its_type_and_labels():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    metrics = HaltwiseMetrics(CollectorRegistry())
    found = 0
    for metric in vars(metrics).values():
        if not isinstance(metric, prometheus_client.metrics.MetricWrapperBase):
            continue
        found += 1
        scraped = metric._name + ("_total" if metric._type == "counter" else "")
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{scraped}` |")), None)
        assert row is not None, f"docs/metrics.md has no row for {scraped}"
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1].startswith(metric._type), (scraped, cells[1])
        assert [label.strip("` ") for label in cells[2].split(",") if label.strip()] == list(metric._labelnames)
    assert found == 6


def test_decode_loop_metrics_equal_what_the_loop_produced():
    """A real decode: a small random GPT through DecodeLoop, its Stepper counting."""
    from haltwise.decoding.loop import DecodeLoop
    from haltwise.decoding.runners import GPTRunner
    from haltwise.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=23, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=96)).eval()
    with torch.no_grad():
        model.head.weight.mul_(8.0)  # some confident rows, some not
    registry = CollectorRegistry()
    scheduler = Scheduler(4, layout="slots")
    stepper = Stepper(scheduler, temperature=1.0, top_k_conf=5, seed=7, backend="native",
                      metrics=get_metrics(registry))
    loop = DecodeLoop(GPTRunner(model, 4, max_len=64), scheduler, stepper)
    for rid in range(10):
        stop = StopConfig(eos_ids=(2,), low_conf_signal="topk_conf", low_conf_threshold=[None, 2.5][rid % 2],
                          window=4)
        loop.submit(rid, [3 + rid, 5, 7], max_new_tokens=20, stop=stop)
    records = []
    with torch.no_grad():
        stats = loop.run(records.append)
    samples = scrape(registry)
    assert finished_by_reason(samples) == dict(Counter(r.reason.name for r in records))
    assert len(records) == 10 and len({r.reason for r in records}) >= 2, [r.reason for r in records]
    # no request was cancelled or settled, so every row stepped appended a token
    assert samples[("haltwise_tokens_generated_total", ())] == stats.tokens == sum(r.num_tokens for r in records)
    saved = sum(20 - r.num_tokens for r in records if r.reason.name in ("LOW_CONFIDENCE", "CONFIDENT"))
    assert samples[("haltwise_tokens_saved_upper_bound_total", ())] == saved > 0
