"""lu.compare_with_reference: the notebooks' figures against the committed reference run, within tolerances."""
import ast
import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

import labutils as lu
from labutils.lab import reference
from labutils.lab.reference import EXACT, Figures, Tolerance

ROOT = Path(__file__).resolve().parents[1]
PROFILE = lu.get_profile(None)


@pytest.fixture
def figures(tmp_path, monkeypatch):
    """A reference folder holding one results file, "demo", and tolerances for it."""
    monkeypatch.setenv(reference.REFERENCE_ENV, str(tmp_path))
    monkeypatch.setitem(reference.TOLERANCES, "demo", Figures(
        {"perplexity": Tolerance(relative=0.05), "acc": Tolerance(absolute=0.03), "answer": EXACT},
        left_out={"wanda 80%": "moves by 2× between kernels"}))
    table = pd.DataFrame({"perplexity": [14.0, 36.4, 10_000.0], "acc": [0.6, 0.44, float("nan")],
                          "answer": ["Paris.", "Paris, France", ""]},
                         index=pd.Index(["dense", "wanda 50%", "wanda 80%"], name="model"))
    lu.write_results(table, "demo", PROFILE, folder=tmp_path)
    return table


def test_figures_within_tolerance_pass_and_say_so_in_one_line_each(figures):
    moved = figures.assign(perplexity=figures["perplexity"] * [1.0, 1.04, 1.9], acc=figures["acc"] + 0.02)
    check = lu.compare_with_reference(moved, "demo", PROFILE)
    assert check.passed
    assert str(check).splitlines() == [
        "perplexity within 5 % of the reference run for 2 of 2 rows: True (wanda 80% left out: no tolerance holds it)",
        "acc within ±0.03 of the reference run for 2 of 2 rows: True (wanda 80% left out: no tolerance holds it)",
        "answer equal to the reference run for 2 of 2 rows: True (wanda 80% left out: no tolerance holds it)"]


def test_a_figure_outside_its_tolerance_fails_naming_the_row_and_both_values(figures):
    check = lu.compare_with_reference(figures.assign(perplexity=[14.0, 322.1, 1.0]), "demo", PROFILE,
                                      columns=["perplexity"])
    assert not check.passed
    assert str(check) == ("perplexity within 5 % of the reference run for 1 of 2 rows: False (wanda 80% left out: "
                          "no tolerance holds it) — outside: wanda 50%: 322.1 vs 36.4 (+784.89%)")
    text = lu.compare_with_reference(figures.assign(answer=["Lyon.", "Paris, France", ""]), "demo", PROFILE,
                                     columns=["answer"])
    assert "outside: dense: 'Lyon.' vs 'Paris.'" in str(text) and not text.passed


def test_nan_matches_only_nan_and_rows_missing_from_the_reference_fail(figures):
    assert not lu.compare_with_reference(figures.assign(acc=[0.6, float("nan"), 0.1]), "demo", PROFILE).passed
    extra = pd.concat([figures, figures.loc[["dense"]].rename(index={"dense": "ria 50%"})])
    check = lu.compare_with_reference(extra, "demo", PROFILE, columns=["perplexity"])
    assert not check.passed and str(check).endswith("— not in the reference run: ria 50%")
    subset = lu.compare_with_reference(figures.loc[["wanda 50%"]], "demo", PROFILE, columns=["perplexity"])
    assert subset.passed and "for 1 of 1 rows" in str(subset)


def test_no_reference_run_compares_nothing_and_says_so(figures):
    check = lu.compare_with_reference(figures, "demo", lu.get_profile("llama2-7b-random"))
    assert not check.passed and str(check) == "no reference run of 'demo' for profile llama2-7b-random: nothing compared"


@pytest.mark.parametrize("name, columns, message", [
    ("nothing", None, "no tolerances for results 'nothing'"),
    ("demo", ["seconds"], r"cannot compare columns \['seconds'\]"),
])
def test_bad_input_is_one_line(figures, name, columns, message):
    with pytest.raises(lu.BadInput, match=message):
        lu.compare_with_reference(figures, name, PROFILE, columns=columns)


def test_the_committed_run_is_the_reference_and_records_its_machine(monkeypatch):
    """Every results file with tolerances is committed, says which machine made it and has the compared columns."""
    monkeypatch.delenv(reference.REFERENCE_ENV, raising=False)
    assert reference.reference_dir() == ROOT / "results"
    for name, figures in reference.TOLERANCES.items():
        path = ROOT / "results" / f"{PROFILE.name}-{name}.json"
        assert path.is_file(), f"tolerances for {name!r} but no committed results/{path.name}"
        payload = json.loads(path.read_text())
        assert payload["machine"]["cpu"], f"{path.name} does not say which machine made it"
        for column in figures.columns:
            assert column in payload["rows"][0], (name, column)


def called_names() -> set[str]:
    """The results names the committed notebooks pass to lu.compare_with_reference (its second argument)."""
    names = set()
    for path in sorted(ROOT.glob("0*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code" or "compare_with_reference" not in cell.source:
                continue
            names |= {node.args[1].value for node in ast.walk(ast.parse(cell.source))
                      if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "compare_with_reference"}
    return names


def test_every_name_a_notebook_compares_has_tolerances_and_every_tolerance_is_used():
    assert called_names() == set(reference.TOLERANCES)


def test_every_tolerance_is_wider_than_the_spread_it_came_from():
    for name, figures in reference.TOLERANCES.items():
        for column, tolerance in [*figures.columns.items(), *figures.rows.items()]:
            allowed = tolerance.absolute or tolerance.relative
            assert tolerance == EXACT or allowed >= 2 * tolerance.spread > 0, (name, column, tolerance)


def test_a_row_can_have_its_own_tolerance(figures, monkeypatch):
    monkeypatch.setitem(reference.TOLERANCES, "demo", Figures(
        {"perplexity": Tolerance(relative=0.05)}, rows={("perplexity", "wanda"): Tolerance(relative=0.5)}))
    moved = figures.assign(perplexity=figures["perplexity"] * [1.0, 1.3, 1.3])
    check = lu.compare_with_reference(moved, "demo", PROFILE)
    assert str(check) == "perplexity within 5 % (wanda: 50 %) of the reference run for 3 of 3 rows: True"
    assert not lu.compare_with_reference(figures.assign(perplexity=[14.8, 36.4, 10_000.0]), "demo", PROFILE).passed


def test_reference_table_reads_a_results_file_back_with_its_index(tmp_path, monkeypatch):
    profile = lu.get_profile()
    table = pd.DataFrame({"target": ["-", "2:4"], "perplexity": [14.0, 56.5]},
                         index=pd.Index(["dense", "admm 2:4"], name="variant"))
    lu.write_results(table, "gain-test", profile, tmp_path)
    monkeypatch.setenv("LAB_REFERENCE", str(tmp_path))
    back = lu.reference_table("gain-test", profile)
    assert back.index.name == "variant" and back.loc["admm 2:4", "perplexity"] == 56.5
    assert lu.reference_table("no-such-results", profile) is None
