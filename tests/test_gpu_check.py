"""bench/gpu_check.py --dry-run on CPU, so the GPU check cannot rot between
GPU runs: its argument parsing, the triton backend (through Triton's
interpreter) against the float64 and torch references, the bad-row and
native-token checks, the launch-config sweep, the JSON report under $OUT and
the table."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OUT=str(out))
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself
    done = subprocess.run([sys.executable, SCRIPT, "--dry-run"], cwd=out, env=env, capture_output=True, text=True,
                          timeout=900)
    return done, out


@pytest.mark.slow
def test_dry_run_passes_and_prints_the_table(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "all checks passed"
    assert any(line.startswith("case ") and "triton" in line and "%copy" in line for line in lines)
    assert "bad rows: ok; native tokens: True" in done.stdout
    assert str(out / "gpu_check.json") in done.stdout


@pytest.mark.slow
def test_dry_run_report(dry_run):
    done, out = dry_run
    with open(out / "gpu_check.json") as f:
        report = json.load(f)
    assert report["dry_run"] is True
    assert "build" not in report  # a dry run builds nothing
    cases = report["cases"]
    # every dry case, greedy and sampled, float32 and bfloat16
    assert {(c["dtype"], c["temperature"]) for c in cases} == {(d, t) for d in ("float32", "bfloat16") for t in (0.0, 1.0)}
    for case in cases:
        assert "error" not in case, case
        check = case["check"]
        assert check["ok"] and check["status_ok"] and check["values_ok"] and check["tokens_ok"], case
        errors = check["worst_error_over_tolerance"]
        for name in ("entropy", "confidence", "margin", "topk_conf"):
            assert 0.0 <= errors[f"triton_{name}"] <= 1.0 and f"torch_{name}" in errors
        assert 0.0 <= errors["triton_logprob"] <= 1.0
        timing = case["timing"]
        assert timing["triton_ms"] > 0 and timing["torch_eager_ms"] > 0 and timing["copy_ms"] >= 0
    swept = [c for c in cases if "sweep" in c]
    assert swept, "no case ran the launch-config sweep"
    for case in swept:
        rows = case["sweep"]
        assert sum(r["planned"] for r in rows) == 1 and len(rows) > 1
        assert all(r["ms"] is not None and r["num_segments"] >= 1 for r in rows)
    assert report["bad_rows"]["ok"] is True
    assert report["native_tokens"] == {"ok": True, "tokens_differing": 0}
    assert report["versions"]["triton"] and report["versions"]["torch"]


def test_a_failed_check_fails_the_run(dry_run, capsys):
    """The report of the dry run, with one case made wrong, one raising and
    a bad-rows failure: each is named, the table says so, main would exit 1."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import gpu_check
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    _, out = dry_run
    with open(out / "gpu_check.json") as f:
        report = json.load(f)
    assert gpu_check.failures(report) == []
    report["cases"][0]["check"]["ok"] = False
    report["cases"][1] = {"name": report["cases"][1]["name"], "error": "RuntimeError('boom')"}
    report["bad_rows"]["ok"] = False
    failed = gpu_check.failures(report)
    assert failed == [report["cases"][0]["name"], report["cases"][1]["name"], "bad_rows"]
    gpu_check.print_table(report["cases"], report, "gpu_check.json", failed)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == "FAILED: " + ", ".join(failed)
    assert " NO " in next(line for line in printed if line.startswith(report["cases"][0]["name"]))
    assert " ERR " in next(line for line in printed if line.startswith(report["cases"][1]["name"]))
    assert "bad rows: FAILED" in "\n".join(printed)
