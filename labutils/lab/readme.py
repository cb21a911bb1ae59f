"""The result tables of README.md and docs/*.md, generated from the results files the notebooks write, so they cannot
drift.

Each generated table sits between ``<!-- results: NAME -->`` and ``<!-- /results -->``, in README.md (results at a
glance) or in one of the ``docs/*.md`` files beside it (docs/results.md, docs/saving.md, ...).
``README_TABLES[NAME]`` names the results file it reads (``results/<profile>-<stem>.json``, written by
``lu.write_results`` in a notebook; ``results/notebook-seconds.json`` by ``tests/execute_notebooks.py``) and turns
its rows into the table. ``python -m labutils readme`` rewrites every block of every one of those files from the
results files; a test checks that they equal what the committed results files give.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from ..core.config import DEFAULT_PROFILE
from ..core.errors import BadInput, LabError
from ..jobs.calibration_study import seed_spread
from .deploy_view import checklist_markdown, engines_markdown, loadtest_markdown
from .tables import admm_gain

BLOCK = re.compile(r"(<!-- results: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.DOTALL)


@dataclass(frozen=True)
class ReadmeTable:
    """One generated table: the results file's stem and what turns its rows (a DataFrame) into the table."""

    stem: str
    build: Callable[..., pd.DataFrame]
    profile: bool = True  # the file is results/<profile>-<stem>.json (False: results/<stem>.json)
    also: tuple[str, ...] = ()  # more results files (stems) whose rows ``build`` takes too, in this order


def _num(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def _label(name: str) -> str:
    """"wanda 50%" → "Wanda 50 %": the README's and docs' spelling of a variant label."""
    for raw, shown in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT"), ("ria", "RIA"), ("admm", "ADMM")):
        name = re.sub(rf"\b{raw}\b", shown, name)
    return re.sub(r"(\d)%", r"\1 %", name)


def _prune(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.set_index("model")
    dense = rows.loc["dense", "perplexity"]
    return pd.DataFrame({"model": [_label(m) for m in rows.index],
                         "perplexity": [_num(p) for p in rows["perplexity"]],
                         "perplexity ÷ dense": [_num(p / dense) for p in rows["perplexity"]]})


def _groups(rows: pd.DataFrame) -> pd.DataFrame:
    table = {}
    for r in rows.itertuples():
        text = _num(r.perplexity)
        table.setdefault(_label(r.method), {})[f"per {r.group}"] = f"**{text}** (default)" if r.default else text
    return pd.DataFrame(table).T.rename_axis("method").reset_index()[["method", "per layer", "per row"]]


def _methods(rows: pd.DataFrame) -> pd.DataFrame:
    """04's comparison: every variant at 50 %, 2:4 and 70 % (the sweep's other points are in ``_sweep``)."""
    order = ("-", "50%", "2:4", "70%")
    rows = rows[rows["target"].isin(order)].copy()
    rows["order"] = rows["target"].map(order.index)
    out = []
    for r in rows.sort_values("order", kind="stable").to_dict("records"):
        times = ["", ""]
        if r["method"] == "wanda":
            times = [f"1.00 ({r['seconds']:.1f} s)", f"1.00 ({r['method seconds']:.1f} s)"]
        elif r["variant"] != "dense":
            times = [_num(r["seconds / wanda"]), _num(r["method seconds / wanda"])]
        out.append({"variant": _label(r["variant"]), "perplexity": _num(r["perplexity"]),
                    "pruning time / Wanda": times[0], "method time / Wanda": times[1]})
    return pd.DataFrame(out)


def _admm_cli(rows: pd.DataFrame) -> pd.DataFrame:
    """benchmarks/admm_study.py model: every variant at the command line's settings, perplexity and pruning time
    against SparseGPT's at the same target."""
    out = []
    for r in rows.to_dict("records"):
        dense = r["variant"] == "dense"
        out.append({"variant": "dense" if dense else _label(r["variant"].replace("(selection=wanda)",
                                                                                  "(Wanda's mask)")),
                    "perplexity": _num(r["perplexity"], 3),
                    "÷ SparseGPT": "" if dense else _num(r["perplexity / sparsegpt"], 3),
                    "pruning seconds": "" if dense else f"{r['seconds']:.0f}",
                    "time ÷ SparseGPT": "" if dense else _num(r["seconds / sparsegpt"])})
    return pd.DataFrame(out)


def _admm_gain(notebook: pd.DataFrame, cli: pd.DataFrame) -> pd.DataFrame:
    """ADMM ÷ SparseGPT per setting and target (``lu.admm_gain``): 05-Recover's run and the command line's."""
    gain = admm_gain({"05-Recover (16 × 128 calibration, 1024 test tokens)": notebook.set_index("variant"),
                      "command line (32 × 128, 8192)": cli.set_index("variant")})
    return pd.DataFrame({"setting": gain.index.get_level_values("setting"),
                         "target": [_label(t) for t in gain.index.get_level_values("target")],
                         "SparseGPT perplexity": [_num(v) for v in gain["SparseGPT perplexity"]],
                         "ADMM perplexity": [_num(v) for v in gain["ADMM perplexity"]],
                         "ADMM ÷ SparseGPT": [_num(v, 3) for v in gain["ADMM ÷ SparseGPT"]],
                         "pruning time ADMM ÷ SparseGPT": [_num(v, 1) for v in gain["time ADMM ÷ SparseGPT"]]})


def _admm_layers(rows: pd.DataFrame) -> pd.DataFrame:
    """benchmarks/admm_study.py layers: held-out output error ÷ SparseGPT's, mean of four linears, both masks."""
    wide = rows.pivot_table(index=["target", "calibration windows", "schedule"], columns="selection",
                            values="error / sparsegpt", sort=False).reset_index()
    return pd.DataFrame({"target": [_label(t) for t in wide["target"]],
                         "calibration windows": wide["calibration windows"].astype(int),
                         "iterations and ρ": wide["schedule"],
                         "gradual mask": [_num(v, 3) for v in wide["gradual"]],
                         "Wanda's mask": [_num(v, 3) for v in wide["wanda"]]})


def _nm(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.set_index("variant")
    targets = ["50%", "4:8", "2:4"]
    dense = _num(rows.loc["dense", "perplexity"])
    table = [{"model": "dense", **{_label(t): dense for t in targets}}]
    for method in ("magnitude", "wanda"):
        table.append({"model": _label(method),
                      **{_label(t): _num(rows.loc[f"{method} {t}", "perplexity"]) for t in targets}})
    return pd.DataFrame(table)


def _sweep(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.set_index("variant")
    swept = sorted({t for t in rows["target"] if t.endswith("%") and f"magnitude {t}" in rows.index
                    and f"wanda {t}" in rows.index}, key=lambda t: float(t[:-1]))
    return pd.DataFrame([{"sparsity": _label(t), "magnitude": _num(rows.loc[f"magnitude {t}", "perplexity"]),
                          "Wanda": _num(rows.loc[f"wanda {t}", "perplexity"]),
                          "magnitude / Wanda": _num(rows.loc[f"magnitude {t}", "perplexity"]
                                                    / rows.loc[f"wanda {t}", "perplexity"])} for t in swept])


def _zeroshot(rows: pd.DataFrame) -> pd.DataFrame:
    table = {}
    for r in rows.itertuples():
        row = table.setdefault(_label(r.model), {})
        row[f"{r.task} acc"] = f"{r.acc:.3f} ± {r.acc_stderr:.3f}"
        if pd.notna(r.acc_norm) and r.task != "wiki_lastword":
            row[f"{r.task} acc_norm"] = f"{r.acc_norm:.3f} ± {r.acc_norm_stderr:.3f}"
        row.setdefault("_n", []).append(int(r.n))
    for row in table.values():
        row["items"] = " / ".join(str(n) for n in row.pop("_n"))
    return pd.DataFrame(table).T.rename_axis("model").reset_index()


def _latency(rows: pd.DataFrame) -> pd.DataFrame:
    out = rows[["model"]].assign(model=rows["model"].map(_label))
    for column in rows.columns.drop("model"):
        out[column] = [_num(v, 2 if "×" in column else 1) for v in rows[column]]
    return out


def _drift(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"model": rows["model"].map(_label),
                         "top-1 agreement with dense": [f"{v:.3f}" for v in rows["top-1 agreement"]],
                         "mean KL(dense ‖ model), nats": [f"{v:.3f}" for v in rows["KL(dense ‖ model)"]],
                         "held-out perplexity": [_num(v) for v in rows["perplexity"]],
                         "repeated 3-gram ratio": [_num(v) for v in rows["repeated 3-gram ratio"]]})


def _zeros(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"weight, kernel": rows["weight, kernel"], "zero share": [f"{v:.2f}" for v in rows["zero share"]],
                         "P50 ms": [f"{v:.3f}" for v in rows["P50 ms"]], "× dense": [_num(v) for v in rows["× dense"]]})


def _memory(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"model": rows["model"].map(_label), "parameters": [f"{v:,}" for v in rows["parameters"]],
                         "non-zero parameters": [f"{v:,}" for v in rows["non-zero parameters"]],
                         "zero share": [f"{v:.4f}" for v in rows["zero share"]],
                         "MiB (params + buffers)": [f"{v:.0f}" for v in rows["MiB (params + buffers)"]]})


def _notebook_seconds(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"notebook": [f"`{n}`" for n in rows["notebook"]],
                         "seconds": [f"{v:.0f}" for v in rows["seconds"]],
                         "slowest cell, seconds": [f"{v:.0f}" for v in rows["slowest cell"]]})


def _disk(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"model": rows["model"].map(_label), "part": rows["part"],
                         "dense MB": [_num(v, 1) for v in rows["dense MB"]],
                         "sparse MB": [_num(v, 1) for v in rows["sparse MB"]],
                         "sparse / dense": [f"{v:.1%}".replace("%", " %") for v in rows["sparse / dense"]]})


def _load_times(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"folder": rows["folder"], "format": rows["format"],
                         "model file, MB": [_num(v / 1e6, 1) for v in rows["model bytes"]],
                         "load s P50": [f"{v:.3f}" for v in rows["seconds P50"]],
                         "load s P95": [f"{v:.3f}" for v in rows["seconds P95"]],
                         "× dense copy": [_num(v) for v in rows["× first"]]})


def _recovery(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"model": rows["model"].map(_label),
                         "perplexity before": [_num(v) for v in rows["perplexity before"]],
                         "perplexity after": [_num(v) for v in rows["perplexity after"]],
                         "after ÷ before": [_num(v) for v in rows["after ÷ before"]],
                         "mask hash unchanged": ["yes" if v else "NO" for v in rows["mask hash unchanged"]],
                         "sparsity after": [f"{v:.4f}" for v in rows["sparsity after"]],
                         "LoRA parameters": [f"{v:,}" for v in rows["LoRA parameters"]]})


def _calibration_nsamples(rows: pd.DataFrame) -> pd.DataFrame:
    """06's section 1: the runs at the most common window length, by number of windows."""
    stats = seed_spread(rows[rows["seqlen"] == rows["seqlen"].mode()[0]], "nsamples", "perplexity (wiki)")
    last = stats["mean"].iloc[-1]
    return pd.DataFrame({"calibration windows": stats.index, "seeds": stats["runs"],
                         "perplexity, mean": [_num(v) for v in stats["mean"]],
                         "lowest – highest seed": [f"{_num(a)} – {_num(b)}" for a, b in zip(stats["min"], stats["max"])],
                         f"mean ÷ {stats.index[-1]} windows": [_num(v / last, 3) for v in stats["mean"]]})


def _calibration_seqlen(rows: pd.DataFrame) -> pd.DataFrame:
    """06's section 2: the runs of the token budget that every window length was run at, by window length."""
    budget = rows.groupby("tokens")["seqlen"].nunique().idxmax()
    chosen = rows[rows["tokens"] == budget]
    stats = seed_spread(chosen, "seqlen", "perplexity (wiki)")
    return pd.DataFrame({"window length": stats.index,
                         "windows": [budget // s for s in stats.index], "seeds": stats["runs"],
                         "perplexity, mean": [_num(v) for v in stats["mean"]],
                         "lowest – highest seed": [f"{_num(a)} – {_num(b)}" for a, b in zip(stats["min"], stats["max"])]})


def _calibration_domain(rows: pd.DataFrame) -> pd.DataFrame:
    """06's section 3: calibration text × test set, mean over seeds (lowest – highest seed)."""
    out = {"calibrated on": list(dict.fromkeys(rows["source"]))}
    for test in ("wiki", "code"):
        stats = seed_spread(rows, "source", f"perplexity ({test})").loc[out["calibrated on"]]
        out[f"perplexity on held-out {test}"] = [f"{_num(r['mean'])} ({_num(r['min'])} – {_num(r['max'])})"
                                                 for _, r in stats.iterrows()]
    return pd.DataFrame(out)


def _portability(rows: pd.DataFrame) -> pd.DataFrame:
    def spread(r) -> str:
        if r["largest spread"] == 0:
            return "0"
        if "±" in r["tolerance"]:
            return f"{r['largest spread']:.3g}"
        return f"{r['largest spread']:.2%}".replace("%", " %") if r["largest spread"] >= 1e-4 else \
            f"{r['largest spread']:.1e}"
    return pd.DataFrame({"results (notebook)": [f"{r} ({NOTEBOOK_OF.get(r, '')})" for r in rows["results"]],
                         "figure": rows["column"], "compared": rows["figures compared"],
                         "largest spread": [spread(r) for _, r in rows.iterrows()],
                         "seen at (variant)": rows["seen at"], "tolerance": rows["tolerance"],
                         "tolerance ÷ spread": ["exact" if pd.isna(v) else f"{v:.1f}×"
                                                for v in rows["tolerance ÷ spread"]]})


def _quantization(rows: pd.DataFrame) -> pd.DataFrame:
    """07's table: each model at float16, q8_0 and q4_0, its bytes on disk and perplexity."""
    return pd.DataFrame({"model": [_label(m) for m in rows["model"]], "weights": rows["weights"],
                         "MB on disk": [_num(b / 1e6, 1) for b in rows["bytes"]],
                         "÷ float16 dense": [f"{s:.1%}" for s in rows["÷ f16 dense bytes"]],
                         "bits per parameter": [_num(b) for b in rows["bits per parameter"]],
                         "perplexity": [_num(p) for p in rows["perplexity"]],
                         "÷ dense": [_num(r) for r in rows["÷ dense perplexity"]]})


NOTEBOOK_OF = {"trained": "01", "outliers": "02", "prune": "02, 03", "groups": "02", "answers": "03", "drift": "03",
               "perplexity": "04", "layer-errors": "04", "zeroshot": "04", "admm-layer": "05", "admm": "05",
               "recovery": "05", "admm-cli": "benchmarks/admm_study.py", "admm-layers": "benchmarks/admm_study.py",
               "calibration": "06", "calibration-domain": "06",
               "quantization": "07", "engines": "08", "deploy-checklist": "08", "loadtest": "08"}


README_TABLES: dict[str, ReadmeTable] = {
    "prune": ReadmeTable("prune", _prune),  # 02-Prune
    "groups": ReadmeTable("groups", _groups),  # 02-Prune
    "disk": ReadmeTable("disk", _disk),  # 02-Prune
    "drift": ReadmeTable("drift", _drift),  # 03-Inference
    "methods": ReadmeTable("perplexity", _methods),  # 04-Benchmark
    "nm": ReadmeTable("perplexity", _nm),
    "sweep": ReadmeTable("perplexity", _sweep),
    "zeroshot": ReadmeTable("zeroshot", _zeroshot),
    "latency": ReadmeTable("latency", _latency),
    "memory": ReadmeTable("memory", _memory),
    "zeros": ReadmeTable("zeros", _zeros),
    "load-times": ReadmeTable("load-times", _load_times),  # 04-Benchmark
    "admm": ReadmeTable("admm", _methods),  # 05-Recover
    "recovery": ReadmeTable("recovery", _recovery),  # 05-Recover
    "admm-cli": ReadmeTable("admm-cli", _admm_cli),  # benchmarks/admm_study.py model
    "admm-gain": ReadmeTable("admm", _admm_gain, also=("admm-cli",)),  # 05-Recover and admm_study.py model
    "admm-layers": ReadmeTable("admm-layers", _admm_layers),  # benchmarks/admm_study.py layers
    "calibration": ReadmeTable("calibration", _calibration_nsamples),  # 06-Calibrate
    "calibration-seqlen": ReadmeTable("calibration", _calibration_seqlen),
    "calibration-domain": ReadmeTable("calibration-domain", _calibration_domain),
    "quantization": ReadmeTable("quantization", _quantization),  # 07-Quantize
    "engines": ReadmeTable("engines", engines_markdown),  # 08-Deploy
    "deploy-checklist": ReadmeTable("deploy-checklist", checklist_markdown),
    "loadtest": ReadmeTable("loadtest", loadtest_markdown),
    "notebook-seconds": ReadmeTable("notebook-seconds", _notebook_seconds, profile=False),
    "portability": ReadmeTable("portability", _portability, profile=False),  # benchmarks/portability.py
    "portability-machines": ReadmeTable("portability-machines", lambda rows: rows.fillna(""), profile=False),
}


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame of display strings as a GitHub markdown table (``|`` inside a cell escaped)."""
    def row(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    lines = [row(frame.columns), row(["---"] * len(frame.columns))] + [row(r) for r in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def results_rows(folder: Path, table: ReadmeTable, profile: str = DEFAULT_PROFILE) -> pd.DataFrame:
    """The rows of the results file ``table`` reads, from ``folder``; LabError naming the file if it is missing."""
    path = folder / (f"{profile}-{table.stem}.json" if table.profile else f"{table.stem}.json")
    if not path.is_file():
        raise LabError(f"{path} is missing: run the notebook that writes it (make notebooks), then "
                       "`python -m labutils readme`")
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise LabError(f"{path} is not a results file (JSON with a 'rows' list: {type(exc).__name__}: {exc}); "
                       "run the notebook that writes it again (make notebooks)") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise LabError(f"{path}: field 'rows' is not a non-empty list of rows; run the notebook that writes it again")
    return pd.DataFrame(rows)


def render_readme(text: str, folder: Path, profile: str = DEFAULT_PROFILE) -> str:
    """``text`` (README.md or a docs/*.md file) with every ``<!-- results: NAME -->`` block regenerated from the
    results in ``folder``."""
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in README_TABLES:
            raise BadInput(f"README block {name!r} is unknown; allowed: {', '.join(README_TABLES)}")
        table = README_TABLES[name]
        rows = [results_rows(folder, table, profile)]
        rows += [results_rows(folder, ReadmeTable(stem, table.build, table.profile), profile) for stem in table.also]
        try:
            built = table.build(*rows)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LabError(f"the results file of README block {name!r} ({table.stem}) lacks what the table needs "
                           f"({type(exc).__name__}: {exc}); run the notebook that writes it again") from None
        return match[1] + markdown_table(built) + match[4]
    return BLOCK.sub(replace, text)


def generated_files(readme: Path) -> list[Path]:
    """``readme`` and every ``docs/*.md`` beside it (sorted): the files whose generated tables ``update_readme``
    rewrites."""
    return [readme, *sorted((readme.parent / "docs").glob("*.md"))]


def _read_text(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{label}: not a readable UTF-8 text file ({exc})") from None


def update_readme(readme: Path, folder: Path | None = None) -> bool:
    """Rewrite the generated tables of ``readme`` and of the ``docs/*.md`` beside it from ``folder`` (default:
    ``results/`` beside ``readme``); True if any file changed. Every file is rendered before any is written, so a
    bad results file leaves them all as they were."""
    folder = folder or readme.parent / "results"
    changed = {}
    for path in generated_files(readme):
        old = _read_text(path, f"--readme {readme}" if path == readme else str(path))
        new = render_readme(old, folder)
        if new != old:
            changed[path] = new
    for path, new in changed.items():
        path.write_text(new)
    return bool(changed)
