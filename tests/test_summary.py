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
