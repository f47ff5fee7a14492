"""The bundled tiny model: a causal transformer with a KV cache (gpt.py), its training
script (train.py), its evaluation (evaluate.py) and its weights, a Hugging Face
checkpoint directory that haltwise, transformers and vLLM all load
(``BUNDLED_CHECKPOINT``; the format in hf_checkpoint.py)."""

from .gpt import BUNDLED_CHECKPOINT

__all__ = ["BUNDLED_CHECKPOINT"]
