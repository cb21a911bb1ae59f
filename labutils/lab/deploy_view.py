"""08-Deploy's figure: every engine and weight format side by side, decode speed against perplexity."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd


def plot_engines(table: pd.DataFrame, title: str = "One model, three ways to run it on this CPU"):
    """Two panels over the rows of ``engine_table``: decode tokens/s (left) and test perplexity (right), one bar
    group per engine and weights, one bar per model; the same model's bars share a colour."""
    frame = table.reset_index()
    frame["runtime"] = frame["engine"] + "\n" + frame["weights"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, column, label in ((axes[0], "decode tok/s", "decode speed, tokens/s (higher is better)"),
                              (axes[1], "perplexity", "test perplexity (lower is better)")):
        pivot = frame.pivot(index="runtime", columns="model", values=column).loc[frame["runtime"].unique(),
                                                                                   frame["model"].unique()]
        pivot.plot.bar(ax=ax, rot=0, width=0.8)
        ax.set_xlabel("engine and weights")
        ax.set_ylabel(label)
        ax.legend(fontsize=8, title=None)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.0f" if column == "decode tok/s" else "%.1f", fontsize=6, padding=1)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def engines_markdown(rows: pd.DataFrame) -> pd.DataFrame:
    """The README's engine table (08's ``engines`` results): display strings."""
    return pd.DataFrame({"engine": rows["engine"], "weights": rows["weights"], "model": rows["model"],
                         "weights MB": [f"{v:.1f}" for v in rows["weights MB"]],
                         "perplexity": [f"{v:.2f}" for v in rows["perplexity"]],
                         "vs PyTorch": [f"{v:+.2%}" for v in rows["vs PyTorch"]],
                         "prefill tok/s": [f"{v:.0f}" for v in rows["prefill tok/s"]],
                         "decode tok/s": [f"{v:.1f}" for v in rows["decode tok/s"]],
                         "decode × dense": [f"{v:.2f}" for v in rows["decode × dense"]]})


def checklist_markdown(rows: pd.DataFrame) -> pd.DataFrame:
    """The README's deployment checklist (08's ``deploy-checklist`` results)."""
    return pd.DataFrame({"item": rows["item"], "measured": rows["measured"], "required": rows["required"],
                         "passed": ["yes" if ok else "**no**" for ok in rows["passed"]]})


def loadtest_markdown(rows: pd.DataFrame) -> pd.DataFrame:
    """The README's load-test line (08's ``loadtest`` results)."""
    return pd.DataFrame({"clients": rows["clients"], "requests": rows["requests"], "errors": rows["errors"],
                         "P50 s": [f"{v:.2f}" for v in rows["p50 s"]], "P95 s": [f"{v:.2f}" for v in rows["p95 s"]],
                         "tokens/s": [f"{v:.1f}" for v in rows["tokens/s"]],
                         "server MiB start → peak → end": [f"{a:.0f} → {b:.0f} → {c:.0f}" for a, b, c in zip(
                             rows["server MiB at start"], rows["server MiB peak"], rows["server MiB at end"])],
                         "answered by": rows["answered by"]})
