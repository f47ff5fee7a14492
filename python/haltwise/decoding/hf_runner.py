"""A runner for Hugging Face causal LMs (``pip install haltwise[hf]``), and the
setup of ``haltwise bench --model DIR --problems-file FILE.jsonl``.

Rows of different lengths share one padded KV cache: every row's real tokens
are marked in a 2-D attention mask, each new token is written in the next
common column, and position ids are per row, so a row never sees another's
padding. Evicting rows is a swap-remove on every layer's keys and values;
columns that no live row uses any more are trimmed from the left.
Nothing is downloaded: the checkpoint must be a local directory.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch


def _layers(cache):
    """(keys, values) tensors per layer, [batch, heads, columns, head_dim], across transformers versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _set_layers(cache, tensors) -> None:
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, tensors):
            layer.keys, layer.values = k, v
    else:
        cache.key_cache[:] = [k for k, _ in tensors]
        cache.value_cache[:] = [v for _, v in tensors]


def _cache_argument(model) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` (transformers
    >= 5.x) or `past_key_values` (earlier)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def _new_cache(tensors):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(tensors):
        cache.update(k, v, i)
    return cache


class HFRunner:
    """Runner (haltwise.decoding.runners) over a transformers causal LM."""

    def __init__(self, model, pad_id: int = 0):
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device
        self.pad_id = pad_id
        self.cache_arg = _cache_argument(model)
        self.cache = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [batch, columns], 1 = real token
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)  # [batch] position of the next token

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        m = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)  # [m]
        width = int(lengths.max())
        ids = torch.full((m, width), self.pad_id, dtype=torch.long, device=self.device)  # right padding
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        mask = (torch.arange(width, device=self.device)[None, :] < lengths[:, None]).long()  # [m, width]
        positions = torch.arange(width, device=self.device).expand(m, width)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits = out.logits[torch.arange(m, device=self.device), lengths - 1]  # [m, V]
        self._append(_returned_cache(out), mask)
        self.next_pos = torch.cat([self.next_pos, lengths])
        return logits.float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [batch] -> logits [batch, V]
        self.mask = torch.cat([self.mask, torch.ones(self.batch, 1, dtype=torch.long, device=self.device)], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos[:, None],
                         use_cache=True, **{self.cache_arg: self.cache})
        self.cache = _returned_cache(out)
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1].float()

    @torch.inference_mode()  # the cache tensors are inference tensors
    def move_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if len(src) == 0:
            return
        for k, v in _layers(self.cache):
            k[dst] = k[src]
            v[dst] = v[src]
        self.mask[dst] = self.mask[src]
        self.next_pos[dst] = self.next_pos[src]

    @torch.inference_mode()
    def truncate(self, n: int) -> None:
        self.mask, self.next_pos = self.mask[:n], self.next_pos[:n]
        if n == 0:
            self.cache, self.mask = None, self.mask[:, :0]
            return
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        self.mask = self.mask[:, start:]  # columns no live row uses any more
        _set_layers(self.cache, [(k[:n, :, start:], v[:n, :, start:]) for k, v in _layers(self.cache)])

    def _append(self, new_cache, new_mask: torch.Tensor) -> None:
        """Adds prefilled rows; the shorter side is padded with masked columns on the left."""
        if self.cache is None or self.batch == 0:
            self.cache, self.mask = new_cache, new_mask
            return
        old_w, new_w = self.mask.shape[1], new_mask.shape[1]
        width = max(old_w, new_w)

        def pad(t: torch.Tensor, w: int) -> torch.Tensor:  # t: [b, h, w, d] -> [b, h, width, d]
            return torch.nn.functional.pad(t, (0, 0, width - w, 0))

        merged = [(torch.cat([pad(k, old_w), pad(nk, new_w)]), torch.cat([pad(v, old_w), pad(nv, new_w)]))
                  for (k, v), (nk, nv) in zip(_layers(self.cache), _layers(new_cache))]
        self.cache = _new_cache(merged)
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (width - old_w, 0)),
                               torch.nn.functional.pad(new_mask, (width - new_w, 0))])


def load_causal_lm(path):
    """A local checkpoint directory as transformers loads it (nothing is downloaded)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)


def hf_setup(model_dir: str | None, problems_file: str | None, cfg) -> dict:
    """Problems, task and runner factory for `haltwise bench --model DIR --problems-file FILE`.
    Both arguments are checked (the problems parsed) before the model loads;
    a bad one raises CliError naming it."""
    from pathlib import Path

    from .._cli_util import CliError
    from ..tasks.adapters import JsonlTask, TokenIds

    if not model_dir or not problems_file:
        raise CliError("--model DIR and --problems-file FILE.jsonl go together")
    if not Path(problems_file).is_file():
        raise CliError(f"--problems-file {problems_file}: does not exist"
                       + (" (it is a directory)" if Path(problems_file).is_dir() else ""))
    try:
        problems = JsonlTask.load(problems_file)[: cfg.problems]
    except (OSError, ValueError) as e:
        raise CliError(f"--problems-file {e}") from None
    model_path = Path(model_dir)
    if not (model_path / "config.json").is_file():
        found = "nothing" if not model_path.exists() else "a file" if not model_path.is_dir() else \
            "a directory without config.json"
        raise CliError(f"--model: no model at {model_dir} (expected a local Hugging Face checkpoint directory "
                       f"with config.json; found {found})")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = load_causal_lm(model_dir)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliError(f"--model: no model at {model_dir} ({first})") from None
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CliError(f"--model: the tokenizer in {model_dir} has no eos_token_id")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def decode(ids: TokenIds) -> str:
        text = tokenizer.decode(list(ids), skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence in, one string out
        return text

    task = JsonlTask(encode=lambda s: tokenizer(s, add_special_tokens=True)["input_ids"], decode=decode,
                     eos_ids=(eos,))
    return dict(cfg=replace(cfg, problems=len(problems)), problems=problems, task=task,
                runner_factory=lambda capacity: HFRunner(model, pad_id=pad))
