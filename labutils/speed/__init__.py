"""Timing and memory (04-Benchmark): ``timing`` (interleaved rounds, percentiles, decode steps, peak memory) and
``latency`` (prefill and decode tables, memory table, zeros × matmul). Builds on ``core`` and ``prune``."""
