"""Quality and cost side by side: the closing table and figure of 04-Benchmark."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from .errors import BadInput
from .plots import _plain_log_axis

COST_COLUMNS = ("prefill ms P50", "decode tokens/s P50", "prefill × dense", "decode × dense")
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


def plot_benchmark_summary(summary: pd.DataFrame, title: str = "Quality and cost"):
    """Four panels from ``benchmark_summary``: perplexity (log), zero-shot accuracy per task, speed relative to
    dense (prefill and decode), and memory with the share of non-zero parameters."""
    models = list(summary.index)
    colors = [plt.get_cmap("tab10")(k % 10) for k in range(len(models))]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2 + 0.25 * len(models)))
    y = range(len(models))[::-1]

    axes[0].barh(y, summary["perplexity"], color=colors)
    _plain_log_axis(axes[0], "x")
    axes[0].set_xlim(left=1)  # perplexity is at least 1: bars start from a perfect model
    axes[0].set_xlabel("test perplexity (log scale, lower is better)")

    tasks = [c for c in summary.columns if c.endswith(" acc")]
    height = 0.8 / max(len(tasks), 1)
    for k, task in enumerate(tasks):
        offsets = [v + (k - (len(tasks) - 1) / 2) * height for v in y]
        axes[1].barh(offsets, summary[task], height, label=task.removesuffix(" acc"), alpha=0.85)
    axes[1].set_xlim(0, 1.6)  # room on the right for the legend
    axes[1].set_xticks([0, 0.25, 0.5, 0.75, 1])
    axes[1].set_xlabel("zero-shot accuracy (share correct, higher is better)")
    if tasks:
        axes[1].legend(fontsize=8, loc="lower right")

    for k, column in enumerate(("prefill × dense", "decode × dense")):
        offsets = [v + (k - 0.5) * 0.4 for v in y]
        axes[2].barh(offsets, summary[column], 0.4, label=column.removesuffix(" × dense"))
    axes[2].axvline(1, color="black", ls="--", lw=1)
    axes[2].set_xlim(0, 1.6 * max(1.0, summary[["prefill × dense", "decode × dense"]].max().max()))
    axes[2].set_xlabel("speed relative to dense (× , higher is faster)")
    axes[2].legend(fontsize=8, loc="lower right")

    axes[3].barh(y, summary["MiB (params + buffers)"], color=colors)
    for v, (mib, nonzero) in zip(y, zip(summary["MiB (params + buffers)"], summary["non-zero parameters"])):
        axes[3].text(mib, v, f" {nonzero / 1e6:.0f} M non-zero", va="center", fontsize=8)
    axes[3].set_xlim(0, 1.6 * summary["MiB (params + buffers)"].max())
    axes[3].set_xlabel("memory of the weights (MiB)")

    for ax, name in zip(axes, ("quality: perplexity", "quality: zero-shot accuracy", "cost: speed",
                               "cost: memory")):
        ax.set_title(name)
        ax.set_yticks(list(y), models)
    for ax in axes[1:]:
        ax.tick_params(labelleft=False)
    axes[0].set_ylabel("model")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
