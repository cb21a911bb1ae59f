"""Quality and cost side by side: the closing table of 04-Benchmark (its figure: ``plots.plot_benchmark_summary``)."""
from __future__ import annotations

import pandas as pd

from ..core.errors import BadInput

COST_COLUMNS = ("prefill ms P50", "decode ms/token P50", "prefill × dense", "decode × dense")
MEMORY_COLUMNS = ("non-zero parameters", "MiB (params + buffers)", "peak prefill MiB (CUDA)")


def benchmark_summary(perplexity: pd.Series, accuracy: pd.DataFrame, latency: pd.DataFrame,
                      memory: pd.DataFrame) -> pd.DataFrame:
    """One row per model of ``latency`` (the models timed, dense first), with

    - quality: test perplexity (``perplexity``: model label → value, e.g. ``compare_methods``' column) and the
      zero-shot accuracy of each task and their mean (``accuracy``: ``zero_shot_table``'s output, one row per
      model; NaN for a model that was not evaluated);
    - cost: prefill and decode speed and their ratios to dense (``latency_table``), non-zero parameters and
      memory (``memory_table``).
    """
    models = list(latency.index)
    missing = [m for m in models if m not in perplexity.index]
    if missing:
        raise BadInput(f"no perplexity for {missing}; the perplexity series has {list(perplexity.index)[:6]}, …")
    table = pd.DataFrame({"perplexity": perplexity.reindex(models)}, index=pd.Index(models, name="model"))
    for task in accuracy.columns:
        table[f"{task} acc"] = accuracy[task].reindex(models)
    for column in COST_COLUMNS:
        table[column] = latency[column]
    for column in MEMORY_COLUMNS:
        if column in memory.columns:
            table[column] = memory[column].reindex(models)
    return table
