"""The Hugging Face runner under the decode loop: rows of different lengths in
one padded cache, swap-remove eviction and mid-run admission must give every
request the tokens it gets alone (a randomly initialised tiny GPT-2)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra is installed in CI")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from haltwise.decoding.hf_runner import HFRunner  # noqa: E402
from haltwise.decoding.loop import DecodeLoop  # noqa: E402
from haltwise.scheduler import Scheduler, StopConfig  # noqa: E402
from haltwise.stepper import Stepper  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    gpt = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        gpt.lm_head.weight.mul_(30.0)  # peaked logits: no near-ties between runs
    return gpt


def decode_all(model, prompts, capacity, temperature):
    scheduler = Scheduler(capacity, layout="slots")
    loop = DecodeLoop(HFRunner(model), scheduler,
                      Stepper(scheduler, temperature=temperature, seed=3, backend="native"))
    for rid, prompt in enumerate(prompts):
        loop.submit(rid, prompt, max_new_tokens=6 + rid % 5, stop=StopConfig(eos_ids=(39,)))
    done = {}
    loop.run(lambda r: done.__setitem__(r.request_id, r.tokens.tolist()))
    assert loop.runner.batch == 0
    return done


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_runner_batching_is_invisible(model, temperature):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 39, size=int(rng.integers(2, 9)))) for _ in range(7)]
    alone = decode_all(model, prompts, 1, temperature)
    assert decode_all(model, prompts, 3, temperature) == alone
    assert decode_all(model, prompts, 7, temperature) == alone


def test_hf_runner_logits_match_an_uncached_forward(model):
    runner = HFRunner(model)
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    first = runner.prefill(prompts)
    tokens = first.argmax(-1)
    second = runner.decode(tokens)
    for row, prompt in enumerate(prompts):
        full = model(torch.tensor([prompt + [int(tokens[row])]])).logits[0]
        torch.testing.assert_close(first[row], full[-2], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(second[row], full[-1], rtol=1e-4, atol=1e-4)


def test_bench_cli_on_a_local_checkpoint(model, tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {str(d): d + 1 for d in range(10)} | {"[UNK]": 0, " ": 11, "+": 12, "=": 13, "[EOS]": 39}
    vocab |= {f"w{i}": i for i in range(14, 39)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", unk_token="[UNK]")
    model_dir = tmp_path / "ckpt"
    model.save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    problems = tmp_path / "p.jsonl"
    problems.write_text("\n".join(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b})
                                  for a, b in [(1, 2), (3, 4), (5, 5)]))
    from haltwise.cli import main

    out_json = tmp_path / "b.json"
    assert main(["bench", "--model", str(model_dir), "--problems-file", str(problems), "--traces", "8",
                 "--max-new-tokens", "6", "--throughput-problems", "0", "--no-progress",
                 "--json", str(out_json)]) == 0
    payload = json.loads(out_json.read_text())
    assert [r["key"] for r in payload["runs"]] == ["uncut", "deepconf_low", "deepconf_high", "static"]
    assert list(payload["skipped"]) == ["policy"]  # calibrated on the bundled task's bank only
    assert payload["runs"][0]["tokens"] > 0 and 0.0 <= payload["runs"][0]["em"] <= 1.0
    assert "no early stopping" in capsys.readouterr().out
