"""The `haltwise` command line on bad input: outputs are checked before a run
and results are written before anything optional; a bad --model,
--problems-file or trace bank is one clear line and exit code 2, never a
traceback, and it is noticed before anything heavy runs."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from haltwise.cli import main
from haltwise.tracebank import SIGNALS, TraceBank


def _no_run(*args, **kwargs):
    raise AssertionError("the run started although an argument was bad")


@pytest.fixture
def no_decode_run(monkeypatch):
    import haltwise.benchmarks.decode as decode

    monkeypatch.setattr(decode, "bench_decode", _no_run)
    monkeypatch.setattr(decode, "bundled_setup", _no_run)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ---- outputs: checked before the run ----------------------------------------------------------


@pytest.mark.parametrize("option", ["--json", "--bank-out", "--plot"])
def test_bench_decode_checks_each_output_before_the_run(tmp_path, capsys, no_decode_run, option):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    target = blocker / "out.json"  # its parent is a file: nothing can be written there
    assert main(["bench", option, str(target), "--problems", "2", "--no-progress"]) == 2
    _one_line_error(capsys, option, str(target))


@pytest.mark.parametrize("suite", ["signals", "scheduler"])
def test_bench_suites_check_json_before_the_run(tmp_path, capsys, monkeypatch, suite):
    import haltwise.benchmarks.scheduler as scheduler_bench
    import haltwise.benchmarks.signals as signals_bench

    monkeypatch.setattr(signals_bench, "bench_signals", _no_run)
    monkeypatch.setattr(scheduler_bench, "bench_scheduler", _no_run)
    (tmp_path / "d").mkdir()
    assert main(["bench", suite, "--json", str(tmp_path / "d")]) == 2  # a directory, not a file
    _one_line_error(capsys, "--json", "directory")


def test_record_checks_out_before_the_run(tmp_path, capsys, no_decode_run):
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert main(["record", "--out", str(blocker / "bank.npz"), "--problems", "2", "--no-progress"]) == 2
    _one_line_error(capsys, "--out")


def test_plot_without_matplotlib_fails_before_the_run(tmp_path, capsys, monkeypatch, no_decode_run):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["bench", "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "r.json"),
                 "--problems", "2", "--no-progress"]) == 2
    _one_line_error(capsys, "--plot", "matplotlib")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "p.png").exists()


def test_results_are_written_before_the_plot(tmp_path, capsys, monkeypatch):
    import haltwise.benchmarks.decode as decode

    row = dict(name="(a) no early stopping", tokens=10, saved=0.0, em=0.5, em_single=0.5, em_diff=0.0,
               em_diff_se=0.0, tokens_per_s=1.0, wall_s=1.0, cut_traces=0, dropped_traces=0)

    def fake_bench(cfg, **kwargs):
        return {"baseline": row["name"], "config": {}, "runs": [row], "sweep": []}

    def failing_plot(*args, **kwargs):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(decode, "bench_decode", fake_bench)
    monkeypatch.setattr(decode, "plot", failing_plot)
    out = tmp_path / "r.json"
    with pytest.raises(RuntimeError, match="the plot failed"):
        main(["bench", "--plot", str(tmp_path / "p.png"), "--json", str(out), "--problems", "2", "--no-progress"])
    assert json.loads(out.read_text())["runs"][0]["tokens"] == 10  # the results survived the failed plot


# ---- --model and --problems-file ---------------------------------------------------------------


def _problems(tmp_path, text: str | bytes):
    path = tmp_path / "p.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


GOOD = json.dumps({"prompt": "1+1=", "answer": 2}) + "\n"


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "a_file"])
def test_model_that_is_not_a_model(tmp_path, capsys, no_decode_run, kind):
    model = tmp_path / "ckpt"
    if kind == "empty_dir":
        model.mkdir()
    elif kind == "a_file":
        model.write_text("weights?")
    problems = _problems(tmp_path, GOOD)
    assert main(["bench", "--model", str(model), "--problems-file", str(problems), "--no-progress"]) == 2
    _one_line_error(capsys, f"no model at {model}")


@pytest.fixture
def fake_model_dir(tmp_path, monkeypatch):
    """A directory that looks like a checkpoint; loading it fails the test."""
    transformers = pytest.importorskip("transformers")
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _no_run)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _no_run)
    return model


@pytest.mark.parametrize("content,needles", [
    (None, ["--problems-file", "does not exist"]),
    (GOOD + '{"prompt": "2+2=", "answer": 4\n', ["p.jsonl:2:", "not valid JSON"]),
    (GOOD + '["2+2=", 4]\n', ["p.jsonl:2:", "JSON object", "array"]),
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", ["p.jsonl", "not UTF-8 text"]),
    ("\n\n", ["p.jsonl", "no problems"]),
])
def test_problems_file_errors_come_before_the_model_loads(tmp_path, capsys, no_decode_run, fake_model_dir,
                                                          content, needles):
    path = tmp_path / "p.jsonl"
    if content is not None:
        _problems(tmp_path, content)
    assert main(["bench", "--model", str(fake_model_dir), "--problems-file", str(path), "--no-progress"]) == 2
    _one_line_error(capsys, *needles)


def test_model_and_problems_file_go_together(tmp_path, capsys, no_decode_run):
    assert main(["bench", "--problems-file", str(_problems(tmp_path, GOOD)), "--no-progress"]) == 2
    _one_line_error(capsys, "--model", "--problems-file")


# ---- replay: a bank's arrays are validated on load ------------------------------------------------


def _bank() -> TraceBank:
    rng = np.random.default_rng(0)
    traces = [[{"answer": int(rng.integers(0, 3)), "reason": 1,
                **{name: rng.normal(size=n).astype(np.float32) for name in SIGNALS}}
               for n in rng.integers(2, 9, size=4)] for _ in range(6)]
    return TraceBank.from_traces(rng.integers(0, 3, size=6), np.full(6, 3), traces)


@pytest.mark.parametrize("tamper", ["offsets_x3", "offsets_negated", "offsets_short", "lengths", "signal_short",
                                    "answers_shape"])
def test_a_tampered_bank_is_refused(tmp_path, capsys, tamper):
    bank = _bank()
    if tamper == "offsets_x3":
        bank.offsets = bank.offsets * 3
    elif tamper == "offsets_negated":
        bank.offsets = -bank.offsets
    elif tamper == "offsets_short":
        bank.offsets = bank.offsets[:-1]
    elif tamper == "lengths":
        bank.lengths = bank.lengths + 1
    elif tamper == "signal_short":
        bank.signals["entropy"] = bank.signals["entropy"][:-1]
    else:
        bank.answers = bank.answers[:, :3]
    path = tmp_path / "bank.npz"
    bank.save(path)
    with pytest.raises(ValueError, match=f"TraceBank.load: {path}"):
        TraceBank.load(path)
    assert main(["replay", "--bank", str(path), "--requests", "50", "--traces", "2"]) == 2
    _one_line_error(capsys, str(path))


def test_an_intact_bank_still_loads(tmp_path):
    path = tmp_path / "bank.npz"
    _bank().save(path)
    assert TraceBank.load(path).num_problems == 6


def test_replay_on_a_file_that_is_not_a_bank(tmp_path, capsys):
    path = tmp_path / "bank.npz"
    path.write_bytes(b"not a zip file")
    assert main(["replay", "--bank", str(path), "--requests", "50"]) == 2
    _one_line_error(capsys, str(path))


def test_bench_engine_vllm_refuses_options_it_cannot_honour(tmp_path, capsys):
    rc = main(["bench", "--engine", "vllm", "--model", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--model is not supported with --engine vllm" in err and str(tmp_path) in err


def test_bench_engine_hf_refuses_options_it_cannot_honour(tmp_path, capsys, no_decode_run):
    assert main(["bench", "--engine", "hf", "--problems-file", str(tmp_path / "p.jsonl")]) == 2
    err = _one_line_error(capsys, "--problems-file is not supported with --engine hf")
    assert "p.jsonl" in err
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert main(["bench", "--engine", "hf", "--weights", str(weights)]) == 2
    _one_line_error(capsys, "--weights must be a checkpoint directory with --engine hf", str(weights))


@pytest.mark.parametrize("flags, word", [(["--control-boost", "0.01"], "control_boost"),
                                         (["--control-fraction", "1.5"], "control_fraction")])
def test_replay_refuses_bad_policy_numbers_in_one_line(capsys, flags, word):
    assert main(["replay", "--synthetic", "--requests", "50", *flags]) == 2
    _one_line_error(capsys, word)


def test_replay_config_file_sets_the_policy_and_flags_override_it(tmp_path, capsys):
    """--config takes any subset of PolicyConfig's fields (the rest keep their
    defaults); a policy flag given on the command line wins over the file."""
    config = tmp_path / "policy.json"
    config.write_text(json.dumps({"strategies": [[2, "beta", 0.8, "majority"]], "overload_strategies": [],
                                  "epsilon": 0.04, "control_fraction": 0.1}))
    out = tmp_path / "r.json"
    assert main(["replay", "--synthetic", "--requests", "60", "--config", str(config), "--epsilon", "0.03",
                 "--json", str(out)]) == 0
    used = json.loads(out.read_text())["policy_config"]
    assert used["strategies"] == [[2, "beta", 0.8, "majority"]] and used["overload_strategies"] == []
    assert used["epsilon"] == 0.03 and used["control_fraction"] == 0.1  # the flag over the file; the file's
    assert used["delta"] == 0.1 and used["traces"] == 16  # left out: the defaults
    capsys.readouterr()


@pytest.mark.parametrize("text, needles", [("{not json", ["--config", "is not JSON"]),
                                           ("[1, 2]", ["--config", "JSON object", "list"]),
                                           ('{"epsilonn": 0.1}', ["--config", "unknown fields", "epsilonn"]),
                                           ('{"delta": 2}', ["--config", "delta"])])
def test_replay_refuses_a_bad_config_file_in_one_line(tmp_path, capsys, text, needles):
    config = tmp_path / "policy.json"
    config.write_text(text)
    assert main(["replay", "--synthetic", "--requests", "50", "--config", str(config)]) == 2
    _one_line_error(capsys, *needles)


def test_replay_refuses_a_missing_config_file_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["replay", "--synthetic", "--requests", "50", "--config", str(missing)]) == 2
    _one_line_error(capsys, "--config", str(missing))
