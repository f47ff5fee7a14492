"""The bundled model as a standard Hugging Face checkpoint directory, so haltwise's own
loop, transformers and vLLM all decode the same weights.

The architecture is transformers' / vLLM's ``NemotronForCausalLM``, the one standard
architecture that expresses haltwise's GPT (``gpt.py``) exactly: pre-norm LayerNorm
with bias (Nemotron's ``LayerNorm1P`` stores ``weight - 1``), a GELU MLP with biases,
RoPE over the two halves of the rotated dimensions, an untied head without bias, and
an explicit ``head_dim``. vLLM's CPU attention refuses head_dim 24 (ours: 96 / 4
heads), so each head is zero-padded to 64 dimensions:

* q, k, v: the head's 24 real dimensions first, then 40 zero rows. Nemotron rotates
  the first ``partial_rotary_factor * head_dim`` = 24 dimensions with frequencies
  ``rope_theta ** (-2i / 24)``, exactly ours; the zero dimensions add nothing to
  ``q . k`` and nothing to the output (their ``o_proj`` columns are zero).
* Attention scales by ``head_dim ** -0.5`` = 1/8 instead of 1/sqrt(24): the q rows are
  multiplied by sqrt(64 / 24) to compensate.

``write_checkpoint`` converts a GPT to that directory (config.json + model.safetensors);
``read_checkpoint`` converts back, refusing a checkpoint whose padding is not zero or
whose config is not this layout, naming the key. The round trip is exact except for the
q rows (one float32 multiply and divide); tests/test_gpt.py checks that GPT and
transformers give the same logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .gpt import GPT, GPTConfig

__all__ = ["PADDED_HEAD_DIM", "hf_config", "write_checkpoint", "read_checkpoint"]

PADDED_HEAD_DIM = 64


def hf_config(config: GPTConfig, *, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> dict:
    """The config.json of ``config`` as a NemotronForCausalLM (heads padded to 64)."""
    if config.head_dim > PADDED_HEAD_DIM:
        raise ValueError(f"hf_config: head_dim must be <= {PADDED_HEAD_DIM}, got {config.head_dim}")
    return {
        "architectures": ["NemotronForCausalLM"],
        "model_type": "nemotron",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,
        "head_dim": PADDED_HEAD_DIM,
        "hidden_act": "gelu",
        "max_position_embeddings": config.max_seq_len,
        "norm_eps": 1e-5,  # torch.nn.LayerNorm's default, which gpt.py uses
        "rope_theta": config.rope_base,
        "partial_rotary_factor": config.head_dim / PADDED_HEAD_DIM,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "haltwise_head_dim": config.head_dim,  # the unpadded head size, for read_checkpoint
    }


def _pad_rows(w: torch.Tensor, n_head: int, head_dim: int) -> torch.Tensor:
    # w: [n_head * head_dim, C] -> [n_head * 64, C], each head's rows first, zeros after
    out = w.new_zeros(n_head, PADDED_HEAD_DIM, w.shape[1])
    out[:, :head_dim] = w.view(n_head, head_dim, w.shape[1])
    return out.reshape(n_head * PADDED_HEAD_DIM, w.shape[1])


def _unpad_rows(w: torch.Tensor, n_head: int, head_dim: int, name: str) -> torch.Tensor:
    # w: [n_head * 64, C] -> [n_head * head_dim, C]
    w = w.view(n_head, PADDED_HEAD_DIM, w.shape[1])
    if w[:, head_dim:].abs().max() > 0:
        raise ValueError(f"read_checkpoint: {name} must be zero in each head's dimensions {head_dim}..63")
    return w[:, :head_dim].reshape(n_head * head_dim, w.shape[2])


def to_hf_state(model: GPT) -> dict[str, torch.Tensor]:
    c = model.config
    q_scale = math.sqrt(PADDED_HEAD_DIM / c.head_dim)
    sd = {k: v.detach().to(torch.float32).cpu() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "lm_head.weight": sd["head.weight"],
           "model.norm.weight": sd["ln_f.weight"] - 1.0, "model.norm.bias": sd["ln_f.bias"]}
    for i in range(c.n_layer):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].split(c.d_model, dim=0)  # [C, C] each
        out[p + "self_attn.q_proj.weight"] = _pad_rows(q * q_scale, c.n_head, c.head_dim)
        out[p + "self_attn.k_proj.weight"] = _pad_rows(k, c.n_head, c.head_dim)
        out[p + "self_attn.v_proj.weight"] = _pad_rows(v, c.n_head, c.head_dim)
        out[p + "self_attn.o_proj.weight"] = _pad_rows(sd[b + "attn.proj.weight"].t(), c.n_head, c.head_dim).t()
        out[p + "input_layernorm.weight"] = sd[b + "ln1.weight"] - 1.0
        out[p + "input_layernorm.bias"] = sd[b + "ln1.bias"]
        out[p + "post_attention_layernorm.weight"] = sd[b + "ln2.weight"] - 1.0
        out[p + "post_attention_layernorm.bias"] = sd[b + "ln2.bias"]
        out[p + "mlp.up_proj.weight"] = sd[b + "mlp.fc.weight"]
        out[p + "mlp.up_proj.bias"] = sd[b + "mlp.fc.bias"]
        out[p + "mlp.down_proj.weight"] = sd[b + "mlp.proj.weight"]
        out[p + "mlp.down_proj.bias"] = sd[b + "mlp.proj.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def write_checkpoint(model: GPT, path, *, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                     metadata: dict | None = None) -> Path:
    """Write ``model`` as a NemotronForCausalLM checkpoint directory (config.json +
    model.safetensors, float32) at ``path``; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = hf_config(model.config, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(to_hf_state(model), str(path / "model.safetensors"), metadata=meta)
    return path


def _expect(hf: dict, key: str, want) -> None:
    got = hf.get(key)
    if got != want:
        raise ValueError(f"read_checkpoint: config.json {key!r} must be {want!r}, got {got!r}")


def read_checkpoint(path) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(config, GPT state dict, safetensors metadata) of a checkpoint directory written
    by ``write_checkpoint``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"read_checkpoint: expected a directory with config.json and model.safetensors, got {path}")
    hf = json.loads((path / "config.json").read_text())
    for key, want in (("model_type", "nemotron"), ("hidden_act", "gelu"), ("head_dim", PADDED_HEAD_DIM),
                      ("attention_bias", False), ("mlp_bias", True), ("tie_word_embeddings", False),
                      ("num_key_value_heads", hf.get("num_attention_heads"))):
        _expect(hf, key, want)
    head_dim = hf.get("haltwise_head_dim")
    if not isinstance(head_dim, int) or hf["hidden_size"] != head_dim * hf["num_attention_heads"]:
        raise ValueError(f"read_checkpoint: config.json 'haltwise_head_dim' * num_attention_heads must equal "
                         f"hidden_size {hf['hidden_size']}, got {head_dim!r}")
    _expect(hf, "partial_rotary_factor", head_dim / PADDED_HEAD_DIM)
    config = GPTConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                       d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                       max_seq_len=hf["max_position_embeddings"], rope_base=float(hf["rope_theta"]))
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        meta = f.metadata() or {}
    hs = {k: v.to(torch.float32) for k, v in load_file(str(path / "model.safetensors")).items()}
    q_scale = math.sqrt(PADDED_HEAD_DIM / head_dim)
    sd = {"tok_emb.weight": hs["model.embed_tokens.weight"], "head.weight": hs["lm_head.weight"],
          "ln_f.weight": hs["model.norm.weight"] + 1.0, "ln_f.bias": hs["model.norm.bias"]}
    n_head = config.n_head
    for i in range(config.n_layer):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        q = _unpad_rows(hs[p + "self_attn.q_proj.weight"], n_head, head_dim, p + "self_attn.q_proj.weight") / q_scale
        k = _unpad_rows(hs[p + "self_attn.k_proj.weight"], n_head, head_dim, p + "self_attn.k_proj.weight")
        v = _unpad_rows(hs[p + "self_attn.v_proj.weight"], n_head, head_dim, p + "self_attn.v_proj.weight")
        sd[b + "attn.qkv.weight"] = torch.cat([q, k, v], dim=0)
        sd[b + "attn.proj.weight"] = _unpad_rows(hs[p + "self_attn.o_proj.weight"].t().contiguous(), n_head, head_dim,
                                                 p + "self_attn.o_proj.weight").t()
        sd[b + "ln1.weight"] = hs[p + "input_layernorm.weight"] + 1.0
        sd[b + "ln1.bias"] = hs[p + "input_layernorm.bias"]
        sd[b + "ln2.weight"] = hs[p + "post_attention_layernorm.weight"] + 1.0
        sd[b + "ln2.bias"] = hs[p + "post_attention_layernorm.bias"]
        sd[b + "mlp.fc.weight"] = hs[p + "mlp.up_proj.weight"]
        sd[b + "mlp.fc.bias"] = hs[p + "mlp.up_proj.bias"]
        sd[b + "mlp.proj.weight"] = hs[p + "mlp.down_proj.weight"]
        sd[b + "mlp.proj.bias"] = hs[p + "mlp.down_proj.bias"]
    return config, {k: v.contiguous() for k, v in sd.items()}, meta


def main(argv=None) -> int:
    """Convert a gpt.py safetensors file (``save_pretrained``) to a checkpoint directory."""
    import argparse

    from ..tasks import arith
    from .gpt import load_pretrained

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("weights", help="safetensors file written by haltwise.models.gpt.save_pretrained")
    ap.add_argument("out", help="checkpoint directory to write")
    args = ap.parse_args(argv)
    from safetensors import safe_open

    with safe_open(args.weights, framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "config"}
    model, _ = load_pretrained(args.weights)
    write_checkpoint(model, args.out, bos_token_id=arith.BOS_ID, eos_token_id=arith.EOS_ID, pad_token_id=arith.PAD_ID,
                     metadata=meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
