"""2:4 weights that run faster on NVIDIA GPUs (04-Benchmark): the cuSPARSELt ``kernel`` module, ``convert`` (one
support check, conversion and verification of a pruned model, whole-model speedup), CUDA ``graphs`` and the
per-shape bench in ``shapes``. Builds on ``core``, ``prune`` and ``speed``."""
