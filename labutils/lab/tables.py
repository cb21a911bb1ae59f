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


def admm_gain(settings: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """ADMM against SparseGPT at each target, one row per setting and target: ``settings`` maps a setting's name
    (e.g. "05-Recover: 16 × 128 calibration tokens") to a comparison table (``lu.Comparison.table`` or its saved
    rows, indexed by variant) with columns target, method, perplexity and seconds, holding an "admm <target>" and a
    "sparsegpt <target>" row for each target compared. Columns: both perplexities, ADMM ÷ SparseGPT (below 1: ADMM
    is better) and pruning time ADMM ÷ SparseGPT."""
    rows = []
    for name, table in settings.items():
        for column in ("target", "perplexity", "seconds"):
            if column not in table.columns:
                raise BadInput(f"admm_gain: the table of {name!r} has no column {column!r}")
        for target in dict.fromkeys(table["target"]):
            admm, sparsegpt = f"admm {target}", f"sparsegpt {target}"
            if admm not in table.index or sparsegpt not in table.index:
                continue
            a, s = table.loc[admm], table.loc[sparsegpt]
            rows.append({"setting": name, "target": target, "SparseGPT perplexity": s["perplexity"],
                         "ADMM perplexity": a["perplexity"], "ADMM ÷ SparseGPT": a["perplexity"] / s["perplexity"],
                         "time ADMM ÷ SparseGPT": a["seconds"] / s["seconds"]})
    if not rows:
        raise BadInput("admm_gain: no setting has both an 'admm <target>' and a 'sparsegpt <target>' row")
    return pd.DataFrame(rows).set_index(["setting", "target"])


def method_findings(table: pd.DataFrame, sparsity: str, nm: str, owl: str, admm: pd.DataFrame | None = None) -> str:
    """04-Benchmark's "what the numbers say", as markdown written from the comparison ``table`` (``lu.Comparison``'s,
    indexed by variant; targets given as their labels, e.g. "50%", "2:4", "70%") so that no figure in the text can
    disagree with the run. ``admm``: 05-Recover's comparison (its reference run, ``lu.reference_table("admm", …)``),
    for one sentence on ADMM; None leaves it out."""
    ppl, cost = table["perplexity"], table["seconds / wanda"]
    need = [f"{m} {t}" for t in (sparsity, nm) for m in ("wanda", "sparsegpt", "ria")] + \
        [f"{m} {owl}" for m in ("wanda", "wanda + OWL", "magnitude", "magnitude + OWL")]
    missing = [v for v in need if v not in table.index]
    if missing:
        raise BadInput(f"method_findings: the table has no rows {missing}: run section 1 of 04-Benchmark first")

    def ratio(a: str, b: str) -> str:
        return f"{ppl[a] / ppl[b]:.2f}×"

    s, n, o = sparsity, nm, owl
    shown = {t: t.replace("%", " %") for t in (s, n, o)}  # the notebooks' spelling of a target in text
    lines = [
        f"- **SparseGPT** reaches {ratio(f'sparsegpt {s}', f'wanda {s}')} Wanda's perplexity at {shown[s]} and "
        f"{ratio(f'sparsegpt {n}', f'wanda {n}')} at {shown[n]}, for {cost[f'sparsegpt {s}']:.1f}× and "
        f"{cost[f'sparsegpt {n}']:.1f}× Wanda's pruning time (method time alone: "
        f"{table.loc[f'sparsegpt {s}', 'method seconds / wanda']:.1f}× and "
        f"{table.loc[f'sparsegpt {n}', 'method seconds / wanda']:.1f}×).",
        f"- **RIA**: {ratio(f'ria {s}', f'wanda {s}')} Wanda's perplexity at {shown[s]}, "
        f"{ratio(f'ria {n}', f'wanda {n}')} at {shown[n]}.",
        f"- **OWL** at {shown[o]}: Wanda's perplexity × {ppl[f'wanda + OWL {o}'] / ppl[f'wanda {o}']:.2f}, magnitude's "
        f"× {ppl[f'magnitude + OWL {o}'] / ppl[f'magnitude {o}']:.2f} (to {ppl[f'magnitude + OWL {o}']:,.0f}).",
    ]
    sequential = f"wanda (true-sequential) {s}"
    if sequential in table.index:
        lines.append(f"- **True-sequential** Wanda at {shown[s]}: {ratio(sequential, f'wanda {s}')} Wanda's perplexity.")
    if admm is not None:
        rows = [t for t in (s, n) if f"admm {t}" in admm.index and f"sparsegpt {t}" in admm.index]
        if rows:
            parts = [f"{admm.loc[f'admm {t}', 'perplexity'] / admm.loc[f'sparsegpt {t}', 'perplexity']:.2f}× "
                     f"SparseGPT's perplexity at {t.replace('%', ' %')} for {admm.loc[f'admm {t}', 'seconds'] / admm.loc[f'sparsegpt {t}', 'seconds']:.1f}× "
                     "its pruning time" for t in rows]
            lines.append("- **ADMM** (05-Recover's reference run, same sizes): " + "; ".join(parts) + ".")
    return "\n".join(lines)
