"""The decode loop with continuous batching and early stopping: model runners
(runners.py), the loop itself (loop.py) and parallel sampling with votes,
warm-up thresholds and consensus (parallel.py)."""
