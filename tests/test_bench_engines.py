"""`haltwise bench` writes the same JSON on every engine: the same runs under the
same keys with the same row fields (decode.run_row), and the runs an engine
cannot do under "skipped" with the reason. Here the haltwise engine against
--engine hf (the bundled checkpoint in transformers under the same loop); the
vLLM engine's JSON is checked in tests/test_vllm_engine.py."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers", reason="the hf extra is installed in CI")

from haltwise.cli import main  # noqa: E402

# tiny: 2 problems x 4 traces of at most 40 tokens, no throughput check
ARGS = ["--problems", "2", "--traces", "4", "--max-new-tokens", "40", "--throughput-problems", "0", "--no-progress"]
KEYS = ["uncut", "deepconf_low", "deepconf_high", "static", "policy"]


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    out = {}
    for engine in ("haltwise", "hf"):
        path = tmp_path_factory.mktemp(engine) / "bench.json"
        assert main(["bench", "--engine", engine, *ARGS, "--json", str(path)]) == 0
        out[engine] = json.loads(path.read_text())
    return out


def test_hf_engine_writes_the_same_runs_and_fields(payloads):
    ours, hf = payloads["haltwise"], payloads["hf"]
    assert (ours["engine"], hf["engine"]) == ("haltwise", "hf")
    assert sorted(hf) == sorted(ours)
    assert [r["key"] for r in hf["runs"]] == [r["key"] for r in ours["runs"]] == KEYS
    for a, b in zip(ours["runs"], hf["runs"]):
        assert list(b) == list(a), a["key"]
        assert b["name"] == a["name"]
    assert hf["skipped"] == ours["skipped"] == {}  # the bundled task: every run, the policy included
    assert hf["config"] == ours["config"] and hf["deepconf"] == ours["deepconf"]


def test_hf_engine_decodes_the_same_uncut_traces(payloads):
    """transformers' forward of the checkpoint equals haltwise's GPT up to float
    rounding (tests/test_gpt.py) and the loop's noise is keyed by (request,
    position): the uncut traces are the same tokens, with the same votes."""
    ours, hf = payloads["haltwise"]["runs"][0], payloads["hf"]["runs"][0]
    assert ours["tokens"] > 0
    for field in ("tokens", "em", "em_single"):
        assert hf[field] == ours[field], field
