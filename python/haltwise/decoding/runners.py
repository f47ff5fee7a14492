"""Model runners: what the decode loop needs from a causal LM with a KV cache.

A runner holds ``batch`` physical rows, each a sequence with its own KV cache.
The loop only ever asks it to

* ``prefill(prompts)``: append one row per prompt and return the logits of
  each prompt's last position, ``(len(prompts), vocab_size)``;
* ``decode(tokens)``: feed one token to every row, return ``(batch, vocab_size)``;
* ``move_rows(src, dst)`` then ``truncate(n)``: drop finished rows by moving
  live rows from the end into their places (swap-remove, so evicting k rows
  copies at most k rows of KV cache, never the whole batch).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..models.gpt import GPT, KVCache


class Runner(Protocol):
    vocab_size: int
    device: torch.device

    @property
    def batch(self) -> int: ...

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None: ...

    def truncate(self, n: int) -> None: ...


class GPTRunner:
    """The bundled GPT (haltwise.models.gpt) over a preallocated KV store.

    k, v: (n_layer, capacity, n_head, max_len, head_dim); the first ``batch``
    rows are live. Forward passes run on views of those rows, so nothing is
    copied to run a step, and attention reads only up to the longest live row.
    """

    def __init__(self, model: GPT, capacity: int, max_len: int | None = None, pad_id: int = 0):
        config = model.config
        self.model = model
        self.vocab_size = config.vocab_size
        self.device = model.head.weight.device
        self.pad_id = pad_id
        self.max_len = max_len or config.max_seq_len
        self.capacity = capacity
        self.store = KVCache(config, capacity, self.max_len, device=self.device)
        self._batch = 0

    @property
    def batch(self) -> int:
        return self._batch

    def _view(self, lo: int, hi: int) -> KVCache:
        return self.store.view(lo, hi)

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        m = len(prompts)
        if self._batch + m > self.capacity:
            raise ValueError(f"GPTRunner.prefill: {self._batch} + {m} rows exceed capacity {self.capacity}")
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=self.device)  # [m]
        idx = torch.full((m, int(lengths.max())), self.pad_id, dtype=torch.int64, device=self.device)  # [m, T]
        for i, p in enumerate(prompts):
            idx[i, : len(p)] = torch.as_tensor(p, dtype=torch.int64)
        rows = self._view(self._batch, self._batch + m)
        rows.lengths.zero_()
        logits = self.model(idx, rows, lengths)  # [m, T, V]
        self.store.lengths[self._batch : self._batch + m] = rows.lengths
        self._batch += m
        return logits[torch.arange(m, device=self.device), lengths - 1]  # [m, V]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [batch] -> logits [batch, V]
        rows = self._view(0, self._batch)
        logits = self.model(tokens[:, None], rows)[:, -1]
        self.store.lengths[: self._batch] = rows.lengths
        return logits

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if len(src):
            self.store.k[:, dst] = self.store.k[:, src]
            self.store.v[:, dst] = self.store.v[:, src]
            self.store.lengths[dst] = self.store.lengths[src]

    def truncate(self, n: int) -> None:
        self._batch = n
