"""04-Benchmark's closing table: quality and cost joined by model, and its figure."""
import math

import matplotlib
import pandas as pd
import pytest

import labutils as lu

matplotlib.use("Agg")


def _parts():
    models = ["dense", "wanda 50%", "wanda 2:4"]
    ppl = pd.Series({"dense": 13.5, "magnitude 50%": 270.0, "wanda 50%": 34.0, "wanda 2:4": 140.0})
    accuracy = pd.DataFrame({"wiki_lastword": [0.46, 0.33], "mean": [0.6, 0.45]}, index=["dense", "wanda 50%"])
    latency = pd.DataFrame({"prefill ms P50": [100.0, 98.0, 101.0], "decode ms/token P50": [50.0, 47.6, 52.6],
                            "prefill × dense": [1.0, 1.02, 0.99], "decode × dense": [1.0, 1.05, 0.95]},
                           index=pd.Index(models, name="model"))
    memory = pd.DataFrame({"non-zero parameters": [100, 50, 50], "MiB (params + buffers)": [4.0, 4.0, 4.0],
                           "peak prefill MiB (CUDA)": [math.nan] * 3}, index=models)
    return ppl, accuracy, latency, memory


def test_benchmark_summary_joins_by_model():
    summary = lu.benchmark_summary(*_parts())
    assert list(summary.index) == ["dense", "wanda 50%", "wanda 2:4"]  # the timed models, in order
    assert summary.loc["wanda 2:4", "perplexity"] == 140.0
    assert summary.loc["wanda 50%", "wiki_lastword acc"] == 0.33 and summary.loc["wanda 50%", "mean acc"] == 0.45
    assert math.isnan(summary.loc["wanda 2:4", "wiki_lastword acc"])  # not evaluated
    assert summary.loc["wanda 50%", "non-zero parameters"] == 50 and summary.loc["dense", "prefill ms P50"] == 100.0


def test_benchmark_summary_needs_every_perplexity():
    ppl, accuracy, latency, memory = _parts()
    with pytest.raises(lu.BadInput, match=r"no perplexity for \['wanda 2:4'\]"):
        lu.benchmark_summary(ppl.drop("wanda 2:4"), accuracy, latency, memory)


def test_summary_figure_has_titled_panels():
    fig = lu.plot_benchmark_summary(lu.benchmark_summary(*_parts()), "test")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["quality: perplexity", "quality: zero-shot accuracy", "cost: speed", "cost: memory"]
    assert all(ax.get_xlabel() for ax in fig.axes)
    accuracy_panel, speed_panel = fig.axes[1], fig.axes[2]
    assert [t.get_text() for t in accuracy_panel.texts] == ["not evaluated"]  # wanda 2:4's row is labelled, not blank
    assert speed_panel.get_xlabel() == "× dense: dense time ÷ model time\n(higher is faster)"


def test_summary_figure_labels_do_not_collide():
    """Issue E2: the four panels' x labels ran into each other; each label now stays within its own panel's width."""
    fig = lu.plot_benchmark_summary(lu.benchmark_summary(*_parts()), "test")
    renderer = fig.canvas.get_renderer()
    boxes = [ax.xaxis.label.get_window_extent(renderer) for ax in fig.axes[:4]]
    gap = 0.01 * fig.bbox.width  # a visible gap between neighbours, not labels that touch
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 + gap < right.x0, (left, right)


def _comparison(rows: dict[str, tuple]) -> pd.DataFrame:
    """A Comparison-like table from {variant: (target, method, perplexity, seconds)}; Wanda's time ratios added."""
    table = pd.DataFrame([{"variant": v, "target": t, "method": m, "perplexity": p, "seconds": s,
                           "method seconds": s / 2} for v, (t, m, p, s) in rows.items()]).set_index("variant")
    wanda = table[table["method"] == "wanda"].set_index("target")
    for column in ("seconds", "method seconds"):
        table[f"{column} / wanda"] = table[column] / table["target"].map(wanda[column])
    return table


def test_admm_gain_per_setting_and_target():
    small = _comparison({"dense": ("-", "dense", 14.0, 0.0), "sparsegpt 50%": ("50%", "sparsegpt", 34.0, 20.0),
                         "admm 50%": ("50%", "admm", 30.6, 50.0), "sparsegpt 2:4": ("2:4", "sparsegpt", 70.0, 30.0),
                         "admm 2:4": ("2:4", "admm", 56.0, 90.0)})
    cli = _comparison({"sparsegpt 2:4": ("2:4", "sparsegpt", 57.0, 60.0), "admm 2:4": ("2:4", "admm", 46.0, 300.0),
                       "wanda 2:4": ("2:4", "wanda", 130.0, 15.0)})
    gain = lu.admm_gain({"notebook": small, "command line": cli})
    assert list(gain.index) == [("notebook", "50%"), ("notebook", "2:4"), ("command line", "2:4")]
    assert gain.loc[("notebook", "2:4"), "ADMM ÷ SparseGPT"] == pytest.approx(0.8)
    assert gain.loc[("command line", "2:4"), "time ADMM ÷ SparseGPT"] == pytest.approx(5.0)
    assert gain.loc[("notebook", "50%"), "SparseGPT perplexity"] == 34.0
    with pytest.raises(lu.BadInput, match="no setting has both"):
        lu.admm_gain({"only wanda": cli.loc[["wanda 2:4"]]})
    with pytest.raises(lu.BadInput, match="has no column 'seconds'"):
        lu.admm_gain({"broken": small.drop(columns="seconds")})


def test_method_findings_are_written_from_the_table():
    rows = {"dense": ("-", "dense", 14.0, 0.0)}
    for target, scale in (("50%", 1.0), ("2:4", 4.0)):
        rows |= {f"wanda {target}": (target, "wanda", 36.0 * scale, 10.0),
                 f"sparsegpt {target}": (target, "sparsegpt", 33.0 * scale, 30.0),
                 f"ria {target}": (target, "ria", 40.0 * scale, 12.0)}
    rows |= {"wanda 70%": ("70%", "wanda", 800.0, 10.0), "wanda + OWL 70%": ("70%", "wanda + OWL", 600.0, 11.0),
             "magnitude 70%": ("70%", "magnitude", 40000.0, 1.0),
             "magnitude + OWL 70%": ("70%", "magnitude + OWL", 30000.0, 2.0)}
    table = _comparison(rows)
    text = lu.method_findings(table, "50%", "2:4", "70%")
    assert "0.92× Wanda's perplexity at 50 %" in text and "3.0× and 3.0× Wanda's pruning time" in text
    assert "Wanda's perplexity × 0.75, magnitude's × 0.75 (to 30,000)" in text
    assert "ADMM" not in text and "True-sequential" not in text
    admm = _comparison({"sparsegpt 2:4": ("2:4", "sparsegpt", 70.0, 30.0), "admm 2:4": ("2:4", "admm", 56.0, 60.0)})
    assert "0.80× SparseGPT's perplexity at 2:4 for 2.0× its pruning time" in lu.method_findings(
        table, "50%", "2:4", "70%", admm)
    table.loc["sparsegpt 2:4", "perplexity"] = 72.0  # a changed figure changes the text
    assert "0.50× at 2:4" in lu.method_findings(table, "50%", "2:4", "70%")
    with pytest.raises(lu.BadInput, match=r"no rows \['ria 2:4'\]"):
        lu.method_findings(table.drop(index="ria 2:4"), "50%", "2:4", "70%")
