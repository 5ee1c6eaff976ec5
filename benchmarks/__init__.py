"""Benchmark scripts, each run from the repository root as ``python -m benchmarks.bench_X``."""
