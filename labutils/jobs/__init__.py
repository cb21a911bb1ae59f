"""Whole runs that join pruning and evaluation: the ``main_job`` (``python -m labutils prune``), ``compare`` (every
method on the same model and tokens, 04) and ``bench_prune`` (pruning time against the forward floor, 04)."""
