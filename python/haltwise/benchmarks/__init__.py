"""Benchmark harnesses shared by bench/ (pytest-benchmark) and the `haltwise bench` CLI."""
