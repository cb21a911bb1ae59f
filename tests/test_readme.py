"""The README's result tables come from the committed results files, and the committed notebooks keep the lab's
time budget (issue E, items 8 and 9).

``labutils.lab.readme`` regenerates every ``<!-- results: NAME -->`` block of README.md from ``results/``, which
the notebooks write (``lu.write_results``) when they are executed for a commit (``make notebooks``); the same run
records each notebook's run time. So a README number that differs from the committed run fails here.
"""
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from execute_notebooks import cell_seconds

from labutils.lab.readme import BLOCK, README_TABLES, markdown_table, render_readme

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01-Setup.ipynb", "02-Prune.ipynb", "03-Inference.ipynb", "04-Benchmark.ipynb", "05-Recover.ipynb"]
CELL_BUDGET, BENCHMARK_BUDGET = 180, 300  # seconds on the 2-core reference machine


def test_every_generated_table_is_in_the_readme_and_equals_the_committed_results():
    text = (ROOT / "README.md").read_text()
    assert sorted(m["name"] for m in BLOCK.finditer(text)) == sorted(README_TABLES)
    assert render_readme(text, ROOT / "results") == text, "run `python -m labutils readme` after `make notebooks`"


def test_a_changed_number_is_caught(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = next(BLOCK.finditer(text))
    body = block["body"]
    digit = next(i for i, ch in enumerate(body) if ch.isdigit())
    edited = text.replace(body, body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1:], 1)
    assert render_readme(edited, ROOT / "results") == text != edited


def test_markdown_cells_escape_pipes():
    assert markdown_table(pd.DataFrame({"a": ["x | y"], "b": ["1"]})) == "| a | b |\n| --- | --- |\n| x \\| y | 1 |\n"


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_the_committed_run_kept_the_time_budget(notebook):
    seconds = cell_seconds(nbformat.read(ROOT / notebook, as_version=4))
    assert seconds and all(s > 0 for s in seconds[:1]), "the committed notebook has no execution timestamps"
    assert max(seconds) <= CELL_BUDGET, f"a cell ran {max(seconds):.0f} s (budget {CELL_BUDGET} s)"
    if notebook in ("04-Benchmark.ipynb", "05-Recover.ipynb"):
        assert sum(seconds) <= BENCHMARK_BUDGET, f"{notebook} ran {sum(seconds):.0f} s (budget {BENCHMARK_BUDGET} s)"


def test_the_readme_command_rewrites_a_drifted_table(tmp_path, capsys):
    from labutils.cli import main
    shutil.copytree(ROOT / "results", tmp_path / "results")
    text = (ROOT / "README.md").read_text()
    block = next(BLOCK.finditer(text))
    (tmp_path / "README.md").write_text(text.replace(block["body"], "| stale | table |\n"))
    assert main(["readme", "--readme", str(tmp_path / "README.md")]) == 0
    assert (tmp_path / "README.md").read_text() == text and "tables rewritten" in capsys.readouterr().out
    assert main(["readme", "--readme", str(tmp_path / "nothing.md")]) == 2
    assert capsys.readouterr().err.startswith("error: --readme")
