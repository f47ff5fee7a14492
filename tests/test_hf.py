"""haltwise inside Hugging Face ``generate``: a randomly initialised tiny GPT-2
(built from a config, nothing downloaded), batch 4, greedy and sampling; each
row must stop on its own, at the right step, for the right reason."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install haltwise[hf]) is installed in CI")
from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessorList, StoppingCriteriaList  # noqa: E402

from haltwise.integrations.hf import haltwise_stopping  # noqa: E402
from haltwise.scheduler import StopConfig, StopReason  # noqa: E402

PAD = 0
MAX_NEW = 12
PROMPT_LEN = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1,
                        eos_token_id=49, pad_token_id=PAD)
    return GPT2LMHeadModel(config).eval()


def generate(model, *, do_sample, stops, limits, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(3, 48, (4, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    proc, crit = haltwise_stopping(batch_size=4, stop=stops, max_new_tokens=limits, top_k_conf=5, backend="native")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=do_sample, top_k=None, top_p=None,
                         temperature=1.0 if do_sample else None, max_new_tokens=MAX_NEW, pad_token_id=PAD,
                         eos_token_id=None, logits_processor=LogitsProcessorList([proc]),
                         stopping_criteria=StoppingCriteriaList([crit]))
    return out[:, PROMPT_LEN:], crit.close()


@pytest.mark.parametrize("do_sample", [False, True])
def test_rows_stop_individually_for_their_reasons(model, do_sample):
    # A free run tells which tokens each row generates, so the rules can be aimed.
    free, _ = generate(model, do_sample=do_sample, stops=[StopConfig()] * 4, limits=[MAX_NEW] * 4)
    stops = [
        StopConfig(),  # row 0: MAX_TOKENS after 3
        StopConfig(stop_sequences=(tuple(free[1, 3:5].tolist()),)),  # row 1: its own tokens 3..4
        StopConfig(low_conf_signal="logprob", low_conf_threshold=1.0, min_new_tokens=6, window=3),  # row 2: cut at 6
        StopConfig(eos_ids=(int(free[3, 7]),)),  # row 3: "EOS" at its 8th token (or earlier if it repeats)
    ]
    limits = [3, MAX_NEW, MAX_NEW, MAX_NEW]
    seqs, finished = generate(model, do_sample=do_sample, stops=stops, limits=limits)

    assert sorted(finished) == [0, 1, 2, 3]
    first_eos = free[3].tolist().index(int(free[3, 7])) + 1
    expected = {0: (StopReason.MAX_TOKENS, 3), 2: (StopReason.LOW_CONFIDENCE, 6), 3: (StopReason.EOS, first_eos)}
    for row, (reason, n) in expected.items():
        assert finished[row].reason == reason, row
        assert finished[row].num_tokens == n, row
    assert finished[1].reason == StopReason.STOP_SEQUENCE and finished[1].num_tokens <= 5
    for row in range(4):
        n = finished[row].num_tokens
        # the recorded tokens are exactly what generate produced, and the row
        # stopped there: generate pads it from then on
        assert finished[row].tokens.tolist() == seqs[row, :n].tolist() == free[row, :n].tolist()
        assert (seqs[row, n:] == PAD).all()
    assert seqs.shape[1] == max(f.num_tokens for f in finished.values())


def test_rows_generate_stopped_are_cancelled_on_close(model):
    seqs, finished = generate(model, do_sample=False, stops=[StopConfig()] * 4, limits=[3, 50, 50, 50])
    assert finished[0].reason == StopReason.MAX_TOKENS
    # generate's own max_new_tokens ended the others: close() records them once, CANCELLED
    assert [finished[r].reason for r in (1, 2, 3)] == [StopReason.CANCELLED] * 3
    assert all(finished[r].num_tokens == MAX_NEW for r in (1, 2, 3))


def test_missing_processor_is_a_clear_error(model):
    proc, crit = haltwise_stopping(batch_size=4)
    ids = torch.randint(3, 48, (4, PROMPT_LEN))
    with pytest.raises(RuntimeError, match="pass the HaltwiseSignalsProcessor"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, pad_token_id=PAD,
                       stopping_criteria=StoppingCriteriaList([crit]))
