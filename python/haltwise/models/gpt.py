"""A small causal transformer with a KV cache, in plain torch (nanoGPT / gpt-fast style).

Pre-norm blocks (LayerNorm -> attention -> residual, LayerNorm -> GELU MLP -> residual),
rotary position embeddings (RoPE), untied output head. Batch-first throughout.

Two ways to call ``GPT.forward``:

* training / reference: ``logits = model(idx)`` with ``idx: [B, T]`` -> ``[B, T, V]``,
  plain causal attention over the T tokens, no cache.
* decoding: ``logits = model(idx, cache, lengths)``: the T new tokens of row b go to
  positions ``cache.lengths[b] .. cache.lengths[b] + T - 1``; only the first
  ``lengths[b]`` of them are real (right padding, for prefilling prompts of different
  lengths); each real token attends to every cached position of its row up to and
  including itself; ``cache.lengths`` then advances by ``lengths``. A decode step is
  ``model(next_token[:, None], cache)``.

Rows never interact: attention is per row and there is no batch-level normalisation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "KVCache", "GPT", "load_pretrained", "save_pretrained", "BUNDLED_CHECKPOINT", "DEFAULT_WEIGHTS"]

# The bundled weights: a Hugging Face checkpoint directory (config.json + model.safetensors,
# NemotronForCausalLM; see hf_checkpoint.py) that transformers and vLLM load as well.
BUNDLED_CHECKPOINT = Path(__file__).resolve().with_name("arith-nemotron")
DEFAULT_WEIGHTS = BUNDLED_CHECKPOINT


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int
    max_seq_len: int
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class KVCache:
    """Per-layer keys and values of every row, and how many positions each row holds.

    k, v:     [n_layer, batch, n_head, max_len, head_dim], ``dtype`` (float32 by default)
    lengths:  [batch] int64, tokens already cached per row (positions 0 .. lengths[b]-1 are valid)
    """

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device="cpu", dtype=torch.float32):
        if max_len > config.max_seq_len:
            raise ValueError(f"KVCache: max_len must be <= config.max_seq_len ({config.max_seq_len}), got {max_len}")
        shape = (config.n_layer, batch, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, device=device, dtype=torch.int64)
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def view(self, lo: int, hi: int) -> "KVCache":
        """Rows [lo, hi) as a KVCache sharing this one's k and v storage (writes go
        through); its lengths are a copy, since forward() replaces them."""
        rows = object.__new__(KVCache)
        rows.k, rows.v = self.k[:, lo:hi], self.v[:, lo:hi]
        rows.lengths = self.lengths[lo:hi].clone()
        rows.max_len = self.max_len
        return rows

    def select_(self, rows: torch.Tensor) -> "KVCache":
        """In place: keep only ``rows`` (int64 [n], indices into the batch), in that order."""
        rows = torch.as_tensor(rows, dtype=torch.int64, device=self.k.device)
        if rows.dim() != 1:
            raise ValueError(f"KVCache.select_: rows must be 1-D, got shape {tuple(rows.shape)}")
        self.k = self.k.index_select(1, rows)  # [L, n, H, S, D]
        self.v = self.v.index_select(1, rows)
        self.lengths = self.lengths.index_select(0, rows)  # [n]
        return self

    def extend_(self, other: "KVCache") -> "KVCache":
        """In place: append ``other``'s rows after ours (same layers/heads; other.max_len <= ours)."""
        if other.k.shape[0] != self.k.shape[0] or other.k.shape[2:3] != self.k.shape[2:3] or other.k.shape[4] != self.k.shape[4]:
            raise ValueError(
                f"KVCache.extend_: other must have the same layers, heads and head_dim, "
                f"got {tuple(other.k.shape)} vs ours {tuple(self.k.shape)}"
            )
        if other.max_len > self.max_len:
            raise ValueError(f"KVCache.extend_: other.max_len must be <= {self.max_len}, got {other.max_len}")
        ok, ov = other.k.to(self.k), other.v.to(self.v)
        if other.max_len < self.max_len:  # pad the sequence axis up to our max_len
            pad = (0, 0, 0, self.max_len - other.max_len)
            ok, ov = F.pad(ok, pad), F.pad(ov, pad)
        self.k = torch.cat([self.k, ok], dim=1)  # [L, B + B', H, S, D]
        self.v = torch.cat([self.v, ov], dim=1)
        self.lengths = torch.cat([self.lengths, other.lengths.to(self.lengths.device)])
        return self


def rope_tables(config: GPTConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_seq_len, head_dim // 2] float32."""
    half = config.head_dim // 2
    inv_freq = config.rope_base ** (-torch.arange(half, dtype=torch.float32, device=device) / half)  # [D/2]
    angles = torch.arange(config.max_seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq  # [S, D/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [B or 1, 1, T, D/2] (rotate the two halves of each head as pairs)
    x1, x2 = x.chunk(2, dim=-1)  # [B, H, T, D/2] each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None, write, attn_mask):
        # x: [B, T, C]
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # [B, T, C] each
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]
        else:
            rows, cols, pos, n_keys = write  # rows, cols, pos: [N]; N = real new tokens
            kc, vc = cache.k[layer], cache.v[layer]  # [B, H, S, D]
            kc[rows, :, pos] = k[rows, :, cols].to(kc.dtype)  # [N, H, D]
            vc[rows, :, pos] = v[rows, :, cols].to(vc.dtype)
            keys = kc[:, :, :n_keys].to(q.dtype)  # [B, H, K, D]
            vals = vc[:, :, :n_keys].to(q.dtype)
            if T == 1:  # decode: plain matmuls beat SDPA's masked CPU path ~1.5x at this size
                scores = (q @ keys.transpose(-1, -2)) * self.head_dim**-0.5  # [B, H, 1, K]
                y = torch.softmax(scores.masked_fill(~attn_mask, float("-inf")), dim=-1) @ vals  # [B, H, 1, D]
            else:
                y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=attn_mask)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff)
        self.proj = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x):
        # x: [B, T, C] -> [B, T, F] -> [B, T, C]
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, layer, cache, write, attn_mask):
        # x: [B, T, C]
        x = x + self.attn(self.ln1(x), cos, sin, layer, cache, write, attn_mask)
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(nn.Module):
    rope_cos: torch.Tensor  # buffers, registered in __init__
    rope_sin: torch.Tensor

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.d_model % config.n_head or config.head_dim % 2:
            raise ValueError(
                f"GPT: d_model must split into n_head heads of even size, got d_model={config.d_model}, n_head={config.n_head}"
            )
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)  # [S, D/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, lengths: torch.Tensor | None = None):
        """Logits [B, T, vocab_size] float32 for ``idx`` (int64 [B, T]); see the module docstring."""
        if idx.dim() != 2:
            raise ValueError(f"GPT.forward: idx must be 2-D [batch, tokens], got shape {tuple(idx.shape)}")
        B, T = idx.shape
        x = self.tok_emb(idx)  # [B, T, C]
        write = attn_mask = None
        if cache is None:
            if lengths is not None:
                raise ValueError("GPT.forward: lengths is only meaningful with a cache")
            if T > self.config.max_seq_len:
                raise ValueError(f"GPT.forward: at most max_seq_len={self.config.max_seq_len} tokens, got {T}")
            cos = self.rope_cos[:T][None, None]  # [1, 1, T, D/2]
            sin = self.rope_sin[:T][None, None]
        else:
            if cache.batch != B:
                raise ValueError(f"GPT.forward: cache holds {cache.batch} rows, idx has {B}")
            start = cache.lengths  # [B]
            if lengths is None:
                lengths = torch.full((B,), T, dtype=torch.int64, device=idx.device)
            elif lengths.shape != (B,) or int(lengths.min()) < 0 or int(lengths.max()) > T:  # host sync: validation
                raise ValueError(f"GPT.forward: lengths must be [{B}] with entries in [0, {T}], got {lengths.tolist()}")
            new_len = start + lengths  # [B]
            n_keys = int(new_len.max())  # host sync: how many cache positions attention reads
            if n_keys > cache.max_len:
                raise ValueError(f"GPT.forward: rows would hold up to {n_keys} tokens, cache.max_len is {cache.max_len}")
            t = torch.arange(T, device=idx.device)
            pos = start[:, None] + t  # [B, T], position of each new token
            real = t[None, :] < lengths[:, None]  # [B, T], False for right padding
            rows, cols = real.nonzero(as_tuple=True)  # [N] each
            write = (rows, cols, pos[rows, cols], n_keys)
            # query at position pos[b, t] sees key j iff j <= pos[b, t]; padded queries see
            # the same (their output is garbage but never NaN, and nothing reads it)
            j = torch.arange(n_keys, device=idx.device)
            attn_mask = (j[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, K] bool
            pos_c = pos.clamp(max=self.config.max_seq_len - 1)  # padded tokens may run past the end
            cos = self.rope_cos[pos_c][:, None]  # [B, 1, T, D/2]
            sin = self.rope_sin[pos_c][:, None]
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, layer, cache, write, attn_mask)  # [B, T, C]
        logits = self.head(self.ln_f(x))  # [B, T, V]
        if cache is not None:
            cache.lengths = new_len
        return logits

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=torch.float32) -> KVCache:
        """An empty KVCache for this model (max_len defaults to config.max_seq_len)."""
        device = device if device is not None else self.head.weight.device
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, device=device, dtype=dtype)


def save_pretrained(model: GPT, path, extra_metadata: dict | None = None) -> None:
    """Write the weights (float32) as safetensors, with the config as JSON in the metadata."""
    from safetensors.torch import save_file

    meta = {"config": json.dumps(asdict(model.config))}
    meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)


def load_pretrained(path=None, device="cpu") -> tuple[GPT, GPTConfig]:
    """The model stored at ``path``, float32, eval mode: a checkpoint directory
    (default: ``BUNDLED_CHECKPOINT``; see hf_checkpoint.py) or a safetensors file
    written by ``save_pretrained``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else BUNDLED_CHECKPOINT
    if path.is_dir():
        from .hf_checkpoint import read_checkpoint

        config, state, _ = read_checkpoint(path)
    else:
        if not path.exists():
            raise FileNotFoundError(f"load_pretrained: no checkpoint directory or weights file at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"load_pretrained: {path} has no 'config' entry in its safetensors metadata")
        config = GPTConfig(**json.loads(meta["config"]))
        state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    model = GPT(config)
    model.load_state_dict(state)
    return model.to(device).eval(), config
