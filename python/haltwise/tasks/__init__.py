"""Bundled tasks for benchmarks and examples (see arith.py)."""
