"""The bundled tiny model: a causal transformer with a KV cache (gpt.py), its training
script (train.py), its evaluation (evaluate.py) and weights (arith.safetensors)."""
