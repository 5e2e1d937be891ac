"""Benchmarks and load tests run from the repository root (``python -m loadtest.<name>``)."""
