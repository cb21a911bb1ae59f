"""Figures for the notebooks: every axis titled, units given."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib import ticker
import torch


def _plain_log_axis(ax, which: str) -> None:
    """Log scale on axis ``which`` ("x" or "y") labelled 1, 2, 5, 10, 20, 50, … in plain numbers."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def outlier_summary(norms: dict[str, torch.Tensor], factor: float = 5.0) -> pd.DataFrame:
    """Per linear: input channels, median and largest channel norm, and how many channels exceed
    ``factor`` × the median — the outlier features Wanda keeps weights for."""
    rows = []
    for name, norm in norms.items():
        median = norm.median().item()
        rows.append({"sublayer": name, "channels": norm.numel(), "median ‖X_j‖": median,
                     "max ‖X_j‖": norm.max().item(), "max / median": norm.max().item() / median,
                     f"channels > {factor:g}× median": int((norm > factor * median).sum())})
    return pd.DataFrame(rows).set_index("sublayer")


def plot_input_norms(norms: dict[str, torch.Tensor], layer_index: int,
                     names: tuple[str, ...] = ("self_attn.q_proj", "mlp.down_proj")):
    """Per-channel input norms of a few linears of one decoder layer, log scale."""
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        norm = norms[name]
        ax.plot(norm.numpy(), lw=0.8)
        ax.axhline(norm.median().item(), color="gray", ls="--", lw=0.8, label="median")
        _plain_log_axis(ax, "y")
        ax.set_title(f"layer {layer_index} {name}: input channel norms")
        ax.set_xlabel("input channel j")
        ax.set_ylabel("‖X_j‖₂ over calibration tokens (log)")
        ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def plot_perplexity(table: pd.DataFrame, title: str = "Test perplexity after pruning"):
    """Horizontal bars of the ``perplexity`` column, log scale (lower is better)."""
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(table)))
    ax.barh(table.index[::-1], table["perplexity"][::-1], color="tab:blue")
    for y, value in enumerate(table["perplexity"][::-1]):
        ax.text(value, y, f" {value:.1f}", va="center")
    _plain_log_axis(ax, "x")
    ax.set_xlim(left=1)  # perplexity is at least 1: bars start from a perfect model
    ax.set_xlabel("perplexity (log scale, lower is better)")
    ax.set_ylabel("model")
    ax.set_title(title)
    fig.tight_layout()
    return fig
