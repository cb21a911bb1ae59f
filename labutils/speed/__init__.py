"""Timing and memory (04-Benchmark): interleaved timing with percentiles, prefill latency, decode throughput,
memory tables. Builds on ``core`` and ``prune``."""
