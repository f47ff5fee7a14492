"""The tiny transformer: cached decoding matches the uncached forward, cache surgery keeps
the right rows, rows never interact, and the bundled weights load and solve problems."""

from pathlib import Path

import pytest
import torch

from haltwise.models import BUNDLED_CHECKPOINT
from haltwise.models.gpt import GPT, GPTConfig, KVCache, load_pretrained, save_pretrained
from haltwise.tasks import arith

ATOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    # these models are tiny: a second thread only adds contention (10x slower on a busy machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=len(arith.VOCAB), n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=48)
    m = GPT(config).eval()
    # random init is near-uniform; sharpen it so that real differences would show
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def random_tokens(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(arith.VOCAB), (batch, length), generator=g)


def prefill(model, seqs, lens, cache):
    """Prefill row b with seqs[b, :lens[b]], right-padded with PAD to max(lens)."""
    T = int(lens.max())
    padded = torch.full((seqs.shape[0], T), arith.PAD_ID, dtype=torch.int64)
    for b in range(seqs.shape[0]):
        padded[b, : lens[b]] = seqs[b, : lens[b]]
    return model(padded, cache, lens)  # [B, T, V]


@torch.no_grad()
def test_cached_decoding_matches_full_forward_with_ragged_prompts(model):
    B, S = 4, 40
    seqs = random_tokens(B, S, seed=1)
    full = model(seqs)  # [B, S, V]
    lens = torch.tensor([5, 17, 1, 11])  # ragged: rows 0, 2, 3 are right-padded
    cache = model.new_cache(B, max_len=S)
    logits = prefill(model, seqs, lens, cache)
    for b in range(B):
        torch.testing.assert_close(logits[b, : lens[b]], full[b, : lens[b]], atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == lens.tolist()
    # step by step: each row continues from its own position
    for step in range(S - int(lens.max())):
        pos = lens + step  # [B]
        tok = seqs[torch.arange(B), pos][:, None]  # [B, 1]
        out = model(tok, cache)  # [B, 1, V]
        torch.testing.assert_close(out[:, 0], full[torch.arange(B), pos], atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == (lens + S - int(lens.max())).tolist()


@torch.no_grad()
def test_multi_token_chunks_after_prefill(model):
    # a second multi-token chunk (ragged again) on top of a ragged prefill
    B, S = 3, 30
    seqs = random_tokens(B, S, seed=2)
    full = model(seqs)
    cache = model.new_cache(B, max_len=S)
    lens1 = torch.tensor([4, 9, 6])
    prefill(model, seqs, lens1, cache)
    lens2 = torch.tensor([7, 2, 0])  # row 2 adds nothing this time
    chunk = torch.full((B, 7), arith.PAD_ID, dtype=torch.int64)
    for b in range(B):
        chunk[b, : lens2[b]] = seqs[b, lens1[b] : lens1[b] + lens2[b]]
    out = model(chunk, cache, lens2)
    for b in range(B):
        torch.testing.assert_close(out[b, : lens2[b]], full[b, lens1[b] : lens1[b] + lens2[b]], atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == (lens1 + lens2).tolist()


@torch.no_grad()
def test_select_keeps_the_right_rows_in_order(model):
    B, S = 4, 24
    seqs = random_tokens(B, S, seed=3)
    full = model(seqs)
    lens = torch.tensor([3, 8, 5, 6])
    cache = model.new_cache(B, max_len=S)
    prefill(model, seqs, lens, cache)
    keep = torch.tensor([3, 0])  # drop rows 1 and 2, and reorder
    cache.select_(keep)
    assert cache.batch == 2 and cache.k.shape[1] == 2
    assert cache.lengths.tolist() == lens[keep].tolist()
    for step in range(10):
        pos = lens[keep] + step
        out = model(seqs[keep, pos][:, None], cache)
        torch.testing.assert_close(out[:, 0], full[keep, pos], atol=ATOL, rtol=0)


@torch.no_grad()
def test_extend_appends_admitted_rows(model):
    S = 32
    seqs = random_tokens(5, S, seed=4)
    full = model(seqs)
    running = model.new_cache(3, max_len=S)
    lens_a = torch.tensor([6, 2, 9])
    prefill(model, seqs[:3], lens_a, running)
    for step in range(4):  # the running rows advance a little first
        model(seqs[torch.arange(3), lens_a + step][:, None], running)
    admitted = model.new_cache(2, max_len=20)  # shorter max_len: padded on extend
    lens_b = torch.tensor([5, 12])
    prefill(model, seqs[3:], lens_b, admitted)
    running.extend_(admitted)
    assert running.batch == 5 and running.max_len == S
    pos = torch.cat([lens_a + 4, lens_b])  # [5]
    assert running.lengths.tolist() == pos.tolist()
    for step in range(8):
        p = pos + step
        out = model(seqs[torch.arange(5), p][:, None], running)
        torch.testing.assert_close(out[:, 0], full[torch.arange(5), p], atol=ATOL, rtol=0)


@torch.no_grad()
def test_rows_are_independent(model):
    S = 20
    a = random_tokens(1, S, seed=5)
    others1 = random_tokens(3, S, seed=6)
    others2 = random_tokens(5, S, seed=7)
    # uncached: row a's logits do not depend on its batch mates
    alone = model(a)[0]
    torch.testing.assert_close(model(torch.cat([others1, a]))[3], alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(model(torch.cat([a, others2]))[0], alone, atol=ATOL, rtol=0)
    # cached, with batch mates of different prompt lengths
    results = []
    for mates, mate_lens in [(others1, [2, 13, 7]), (others2, [1, 1, 15, 4, 9])]:
        batch = torch.cat([a, mates])
        lens = torch.tensor([6, *mate_lens])
        cache = model.new_cache(batch.shape[0], max_len=S)
        first = prefill(model, batch, lens, cache)[0, :6]
        steps = [model(batch[torch.arange(batch.shape[0]), lens + s][:, None], cache)[0, 0] for s in range(5)]
        results.append(torch.cat([first, torch.stack(steps)]))
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(results[0], alone[:11], atol=ATOL, rtol=0)


@torch.no_grad()
def test_forward_rejects_bad_arguments(model):
    cache = model.new_cache(2, max_len=8)
    with pytest.raises(ValueError, match="idx must be 2-D"):
        model(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="lengths"):
        model(torch.zeros(2, 4, dtype=torch.int64), cache, torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(2, 9, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="rows"):
        model(torch.zeros(3, 1, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(model.config, 1, max_len=model.config.max_seq_len + 1)


def test_save_and_load_round_trip(model, tmp_path):
    path = tmp_path / "m.safetensors"
    save_pretrained(model, path, {"note": "test"})
    loaded, config = load_pretrained(path)
    assert config == model.config
    assert not loaded.training
    x = random_tokens(2, 12, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_bundled_weights_load_and_solve_eval_problems():
    from haltwise.models.evaluate import generate

    assert isinstance(BUNDLED_CHECKPOINT, Path)
    weights = BUNDLED_CHECKPOINT / "model.safetensors"
    assert (BUNDLED_CHECKPOINT / "config.json").is_file(), f"bundled checkpoint missing at {BUNDLED_CHECKPOINT}"
    assert weights.stat().st_size <= 8 * 2**20
    model, config = load_pretrained()
    assert config.vocab_size == len(arith.VOCAB)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    problems = arith.eval_set(32)
    out = generate(model, [arith.prompt_ids(p) for p in problems], max_new=100, temperature=0.0)
    hits = sum(arith.extract_answer(arith.decode(t)) == p.answer for t, p in zip(out.tokens, problems))
    assert hits >= 4, f"greedy decoding solved only {hits}/32 eval problems"


def test_checkpoint_round_trip_and_refusals(model, tmp_path):
    from haltwise.models.hf_checkpoint import write_checkpoint

    ckpt = write_checkpoint(model, tmp_path / "ckpt", bos_token_id=arith.BOS_ID, eos_token_id=arith.EOS_ID,
                            pad_token_id=arith.PAD_ID)
    loaded, config = load_pretrained(ckpt)
    assert config == model.config
    x = random_tokens(2, 12, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    import json

    from safetensors.torch import load_file, save_file

    hf = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**hf, "hidden_act": "relu2"}))
    with pytest.raises(ValueError, match="'hidden_act' must be 'gelu', got 'relu2'"):
        load_pretrained(ckpt)
    (ckpt / "config.json").write_text(json.dumps(hf))
    state = load_file(str(ckpt / "model.safetensors"))
    state["model.layers.0.self_attn.k_proj.weight"][30] = 1.0  # head 0, a padding dimension
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match="k_proj.weight must be zero"):
        load_pretrained(ckpt)
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        load_pretrained(tmp_path)


def test_bundled_checkpoint_gives_the_same_logits_in_transformers():
    """haltwise's plain-torch GPT and transformers' NemotronForCausalLM on the one
    bundled checkpoint: same logits for prompts and full traces."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is installed in CI")

    ours, config = load_pretrained()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_CHECKPOINT, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "NemotronForCausalLM"
    problems = arith.eval_set(4)
    seqs = [arith.format_training_example(p) for p in problems]
    n = min(len(s) for s in seqs)
    x = torch.tensor([s[:n] for s in seqs], dtype=torch.int64)  # [4, n] prompt + solution prefix
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits
    assert a.shape == b.shape == (4, n, config.vocab_size)
    torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
