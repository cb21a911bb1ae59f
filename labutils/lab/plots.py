"""Figures for the notebooks: every axis titled, units given."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib import ticker


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


def plot_method_comparison(table: pd.DataFrame, title: str = "Pruning methods compared"):
    """Two panels from ``compare_methods``' table: perplexity (log) and pruning time per method, grouped by
    target; the dense model's perplexity is the dashed line."""
    pruned = table[table["method"] != "dense"]
    targets = list(dict.fromkeys(pruned["target"]))
    methods = list(dict.fromkeys(pruned["method"]))
    colors = {m: plt.get_cmap("tab10")(k % 10) for k, m in enumerate(methods)}
    width = 0.8 / max(pruned.groupby("target").size())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for i, target in enumerate(targets):
        group = pruned[pruned["target"] == target]
        for k, (method, row) in enumerate(zip(group["method"], group.itertuples())):
            x = i + (k - (len(group) - 1) / 2) * width
            for ax, value in zip(axes, (row.perplexity, row.seconds)):
                ax.bar(x, value, width, color=colors[method], label=method)
    if "dense" in table.index:
        axes[0].axhline(table.loc["dense", "perplexity"], color="black", ls="--", lw=1, label="dense")
    _plain_log_axis(axes[0], "y")
    axes[0].set_ylabel("test perplexity (log scale, lower is better)")
    axes[1].set_ylabel("pruning time (s, calibration passes included)")
    for ax, name in zip(axes, ("Perplexity", "Pruning time")):
        ax.set_xticks(range(len(targets)), targets)
        ax.set_xlabel("sparsity target")
        ax.set_title(f"{title}: {name.lower()}")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per method
    axes[0].legend(unique.values(), unique.keys(), fontsize=8, ncols=2)
    fig.tight_layout()
    return fig


def plot_layer_sparsity(layer_sparsity: list[float], outlier_ratios: list[float], target: float):
    """OWL's per-layer sparsities (bars) next to the layers' outlier ratios (line)."""
    fig, ax = plt.subplots(figsize=(9, 3.6))
    layers = range(len(layer_sparsity))
    ax.bar(layers, layer_sparsity, color="tab:blue", label="OWL sparsity (left axis)")
    ax.axhline(target, color="black", ls="--", lw=1, label=f"uniform {target:.0%}")
    ax.set_ylim(0, min(1.0, max(layer_sparsity) + 0.2))  # bars from zero: their heights compare honestly
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity (share removed)")
    twin = ax.twinx()
    twin.plot(layers, [100 * r for r in outlier_ratios], color="tab:red", marker=".",
              label="outlier ratio (right axis)")
    twin.set_ylabel("outlier ratio (% of scores)")
    twin.set_ylim(bottom=0)
    ax.set_title("OWL: layers whose |W|·‖X‖ scores hold more outliers are pruned less")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8, ncols=3)
    fig.tight_layout()
    return fig


def plot_drift(drift: pd.DataFrame, degeneration: pd.DataFrame, title: str = "How far the sparse models drifted"):
    """03-Inference: top-1 agreement with dense, KL(dense ‖ model) and the repeated 3-gram ratio, one panel each.

    ``drift``: ``drift_table``'s output; ``degeneration``: ``degeneration_table``'s (same model names).
    """
    panels = [(drift["top-1 agreement"], "top-1 agreement with dense (share of positions)", (0, 1.18)),
              (drift["KL(dense ‖ model)"], "mean KL(dense ‖ model) (nats per token)",
               (0, 1.18 * max(drift["KL(dense ‖ model)"].max(), 1e-6))),
              (degeneration.iloc[:, 0], f"{degeneration.columns[0]} (share of n-grams)", (0, 1.18))]
    fig, axes = plt.subplots(1, 3, figsize=(12, 1.4 + 0.4 * len(drift)), sharey=True)
    for ax, (values, label, limits) in zip(axes, panels):
        values = values.reindex(drift.index)
        ax.barh(values.index[::-1], values[::-1], color="tab:blue")
        for y, value in enumerate(values[::-1]):
            ax.text(value, y, f" {value:.2f}", va="center")
        ax.set_xlim(*limits)  # room for the value labels
        ax.set_xlabel(label)
    axes[0].set_ylabel("model")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_sparsity_sweep(table: pd.DataFrame, methods: tuple[str, ...] = ("magnitude", "wanda"),
                        title: str = "Perplexity against sparsity"):
    """04-Benchmark: one line per method through its unstructured rows of ``compare_methods``' table, starting
    from the dense model at 0 %; perplexity on a log scale."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    dense = table.loc["dense", "perplexity"] if "dense" in table.index else None
    for method in methods:
        rows = table[(table["method"] == method) & table["target"].str.endswith("%")].sort_values("sparsity")
        x, y = list(100 * rows["sparsity"]), list(rows["perplexity"])
        if dense is not None:
            x, y = [0.0, *x], [dense, *y]
        ax.plot(x, y, marker="o", label=method)
    if dense is not None:
        ax.axhline(dense, color="black", ls="--", lw=1, label="dense")
    _plain_log_axis(ax, "y")
    ax.set_xlabel("sparsity of the decoder linears (%)")
    ax.set_ylabel("test perplexity (log scale, lower is better)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, which="major")
    fig.tight_layout()
    return fig


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
    axes[0].set_xlabel("test perplexity\n(log scale, lower is better)")

    tasks = [c for c in summary.columns if c.endswith(" acc")]
    height = 0.8 / max(len(tasks), 1)
    for k, task in enumerate(tasks):
        offsets = [v + (k - (len(tasks) - 1) / 2) * height for v in y]
        axes[1].barh(offsets, summary[task], height, label=task.removesuffix(" acc"), alpha=0.85)
    for v, missing in zip(y, summary[tasks].isna().all(axis=1) if tasks else [True] * len(models)):
        if missing:
            axes[1].text(0.02, v, "not evaluated", va="center", fontsize=8, color="gray")
    axes[1].set_xlim(0, 1.6)  # room on the right for the legend
    axes[1].set_xticks([0, 0.25, 0.5, 0.75, 1])
    axes[1].set_xlabel("zero-shot accuracy\n(share correct, higher is better)")
    if tasks:
        axes[1].legend(fontsize=8, loc="lower right")

    for k, column in enumerate(("prefill × dense", "decode × dense")):
        offsets = [v + (k - 0.5) * 0.4 for v in y]
        axes[2].barh(offsets, summary[column], 0.4, label=column.removesuffix(" × dense"))
    axes[2].axvline(1, color="black", ls="--", lw=1)
    axes[2].set_xlim(0, 1.6 * max(1.0, summary[["prefill × dense", "decode × dense"]].max().max()))
    axes[2].set_xlabel("× dense: dense time ÷ model time\n(higher is faster)")
    axes[2].legend(fontsize=8, loc="lower right")

    axes[3].barh(y, summary["MiB (params + buffers)"], color=colors)
    for v, (mib, nonzero) in zip(y, zip(summary["MiB (params + buffers)"], summary["non-zero parameters"])):
        axes[3].text(mib, v, f" {nonzero / 1e6:.0f} M non-zero", va="center", fontsize=8)
    axes[3].set_xlim(0, 1.6 * summary["MiB (params + buffers)"].max())
    axes[3].set_xlabel("memory of the weights\n(MiB)")

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


def plot_admm_convergence(trace: list[tuple[float, float]], references: dict[str, float],
                          title: str = "ADMM on one layer"):
    """Output error of ADMM's pruned iterate per iteration (from ``admm_update``'s ``trace``: the squared error
    of the scaled problem), log scale, with other methods' errors (``references``: label → error) as lines
    (05-Recover)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    errors = [max(objective, 0.0) ** 0.5 for objective, _ in trace]
    ax.plot(range(1, len(errors) + 1), errors, marker="o", markersize=3, label="ADMM, pruned iterate Z")
    for k, (label, value) in enumerate(references.items()):
        ax.axhline(value, linestyle="--", color=plt.get_cmap("tab10")(k + 1), label=label)
    _plain_log_axis(ax, "y")
    return _labelled(fig, ax, "iteration", "output error ‖XWᵀ − XŴᵀ‖ (log scale)", title)


def plot_recovery_losses(losses: dict[str, list[float]], title: str = "LoRA recovery: training loss"):
    """Training loss per step of each recovered model (``RecoveryReport.losses`` by label) (05-Recover)."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for label, values in losses.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
    return _labelled(fig, ax, "training step (one batch of calibration windows)", "cross-entropy loss, nats per token",
                     title)


def plot_calibration_sweep(spread: pd.DataFrame, dense: float, xlabel: str, title: str, log_x: bool = True):
    """Perplexity against one calibration knob (06-Calibrate): the mean over seeds (``seed_spread``'s rows, indexed by
    the knob) with bars from the lowest to the highest seed, and the dense model's perplexity as a line."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = spread.index.to_numpy()
    ax.errorbar(x, spread["mean"], yerr=[spread["mean"] - spread["min"], spread["max"] - spread["mean"]],
                marker="o", capsize=4, label=f"Wanda 50 %: mean of {int(spread['runs'].max())} seeds, bar = min–max")
    ax.axhline(dense, color="gray", ls="--", lw=0.8, label="dense")
    if log_x:
        _plain_log_axis(ax, "x")
    return _labelled(fig, ax, xlabel, "test perplexity (lower is better)", title)


def plot_calibration_domains(spread: dict[str, pd.DataFrame], dense: dict[str, float], title: str):
    """Perplexity on each test set (``spread``: test set → ``seed_spread`` by calibration source) for each
    calibration source, bars at the mean over seeds with min–max error bars, the dense model as a black tick
    (06-Calibrate)."""
    fig, axes = plt.subplots(1, len(spread), figsize=(4.2 * len(spread), 3.6), squeeze=False)
    for ax, (test, table) in zip(axes[0], spread.items()):
        x = range(len(table))
        ax.bar(x, table["mean"], yerr=[table["mean"] - table["min"], table["max"] - table["mean"]], capsize=4,
               color=[f"C{i}" for i in x], label="Wanda 50 %: mean over seeds, bar = min–max")
        ax.axhline(dense[test], color="black", lw=1, label="dense")
        ax.set_xticks(list(x), [f"calibrated on {s}" for s in table.index], rotation=15)
        _labelled(fig, ax, "calibration text", f"perplexity on held-out {test} (lower is better)",
                  f"test set: {test}")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
def plot_quantization(table: pd.DataFrame, dense_fp16_bytes: int, target: float,
                      title: str = "Pruning plus quantization: size against quality"):
    """Perplexity against megabytes on disk, one line per model through its float16, 8-bit and 4-bit rows
    (``quantization_table``), with the size target (a share of the float16 dense model) as a vertical line
    (07-Quantize)."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for model, rows in table.groupby(level="model", sort=False):
        rows = rows.droplevel("model").sort_values("bytes")
        ax.plot(rows["bytes"] / 1e6, rows["perplexity"], marker="o", label=model)
        for weights, row in rows.iterrows():
            ax.annotate(weights, (row["bytes"] / 1e6, row["perplexity"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.axvline(target * dense_fp16_bytes / 1e6, color="grey", linestyle="--", linewidth=1,
               label=f"{target:.0%} of the float16 dense model")
    _plain_log_axis(ax, "y")
    return _labelled(fig, ax, "bytes on disk, MB", "test perplexity (log scale)", title)


def _labelled(fig, ax, xlabel: str, ylabel: str, title: str):
    """Axis labels, title and a small legend on a one-panel figure; the figure, laid out."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
