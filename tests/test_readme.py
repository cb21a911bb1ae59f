"""The result tables of the README and docs/ come from the committed results files, the committed notebooks keep the
lab's time budget (issue E, items 8 and 9), and the README stays a short start (issue H2, item 6).

``labutils.lab.readme`` regenerates every ``<!-- results: NAME -->`` block of README.md and docs/*.md from
``results/``, which the notebooks write (``lu.write_results``) when they are executed for a commit
(``make notebooks``); the same run records each notebook's run time. So a number that differs from the committed
run fails here. The README keeps the three commands CI runs (``.ci/run``), stays within 300 lines, and every
relative link of the README, CONTRIBUTING.md and docs/ reaches a file (and a heading, for ``#anchor`` links).
"""
import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from execute_notebooks import cell_seconds

from labutils.lab.readme import BLOCK, README_TABLES, generated_files, markdown_table, render_readme

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINKED = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *DOCS]
NOTEBOOKS = ["01-Setup.ipynb", "02-Prune.ipynb", "03-Inference.ipynb", "04-Benchmark.ipynb", "05-Recover.ipynb",
             "06-Calibrate.ipynb", "07-Quantize.ipynb", "08-Deploy.ipynb"]
CELL_BUDGET = 180  # seconds on the 2-core reference machine
# whole-notebook budgets of the long ones; 06 (optional, not in make test) prunes 45 models
NOTEBOOK_BUDGET = {"04-Benchmark.ipynb": 330, "05-Recover.ipynb": 300, "06-Calibrate.ipynb": 900,
                   "07-Quantize.ipynb": 300, "08-Deploy.ipynb": 600}


def test_every_generated_table_is_in_the_readme_or_docs_and_equals_the_committed_results():
    files = generated_files(ROOT / "README.md")
    assert files[1:] == DOCS and DOCS, "the generated tables live in README.md and docs/*.md"
    names = set()
    for path in files:
        text = path.read_text()
        names |= {m["name"] for m in BLOCK.finditer(text)}
        assert render_readme(text, ROOT / "results") == text, f"{path.name}: run `python -m labutils readme`"
    assert sorted(names) == sorted(README_TABLES)
    assert "prune" in {m["name"] for m in BLOCK.finditer((ROOT / "README.md").read_text())}  # results at a glance


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
    if notebook in NOTEBOOK_BUDGET:
        budget = NOTEBOOK_BUDGET[notebook]
        assert sum(seconds) <= budget, f"{notebook} ran {sum(seconds):.0f} s (budget {budget} s)"


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


def test_the_readme_command_rewrites_a_drifted_table_in_docs(tmp_path, capsys):
    from labutils.cli import main
    shutil.copytree(ROOT / "results", tmp_path / "results")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    text = (ROOT / "docs" / "results.md").read_text()
    block = next(BLOCK.finditer(text))
    (tmp_path / "docs" / "results.md").write_text(text.replace(block["body"], "| stale | table |\n"))
    assert main(["readme", "--readme", str(tmp_path / "README.md")]) == 0
    assert (tmp_path / "docs" / "results.md").read_text() == text and "tables rewritten" in capsys.readouterr().out
    assert main(["readme", "--readme", str(tmp_path / "README.md")]) == 0
    assert "already equal" in capsys.readouterr().out


def test_the_readme_is_a_short_start():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines (at most 300: reference material goes to docs/)"


def test_the_readme_gives_the_three_commands_ci_runs():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The three commands"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ["make setup", "python -m labutils prune", "make test"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == ["make setup", "make test"], "CI runs the README's setup command, then its test command"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(path: Path) -> list[str]:
    """The relative link targets of ``path``'s markdown, code blocks left out."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    for target in _links(path):
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        assert where.exists(), f"{path.name}: link {target} names no file"
        if anchor and where.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", where.read_text(), flags=re.S), re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{path.name}: link {target} names no heading"


def test_the_readme_links_every_docs_file_and_contributing():
    links = {target.partition("#")[0] for target in _links(ROOT / "README.md")}
    assert {f"docs/{p.name}" for p in DOCS} | {"CONTRIBUTING.md"} <= links


SYMPTOMS = ["Accuracy collapse", "A model that will not load", "No speed-up", "Repeated or garbled output",
            "Out of memory"]  # issue L1, item 4


def _symptoms() -> dict[str, str]:
    """docs/troubleshooting.md's "## Symptoms" section, as {### subsection heading: its text}."""
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    section = re.search(r"^## Symptoms\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "docs/troubleshooting.md has no '## Symptoms' section followed by another section"
    parts = re.split(r"^### (.*)\n", section.group(1), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _lab_commands(text: str) -> list[str]:
    """Every ``python -m labutils …`` quoted in ``text``: inline code that starts with it, and code-block lines."""
    inline = re.findall(r"`(python -m labutils [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    blocks = [line.split("#")[0] for block in re.findall(r"```\w*\n(.*?)```", text, re.S)
              for line in block.splitlines() if line.strip().startswith("python -m labutils ")]
    return [" ".join(command.split()) for command in inline + blocks]


def test_troubleshooting_has_a_subsection_per_symptom_and_each_quotes_a_command():
    symptoms = _symptoms()
    assert list(symptoms) == SYMPTOMS
    for heading, body in symptoms.items():
        assert _lab_commands(body), f"troubleshooting.md '### {heading}' quotes no `python -m labutils …` command"
        assert "results/" in body or "benchmarks/results/" in body, f"'### {heading}' names no figure's results file"


@pytest.mark.parametrize("command", sorted({c for body in _symptoms().values() for c in _lab_commands(body)}))
def test_every_command_of_the_troubleshooting_symptoms_parses(command, capsys):
    """Parsed by the real parser of ``python -m labutils`` (nothing runs); a prune command's spec is built too, so a
    method, target or OWL option that does not exist fails here."""
    import shlex

    from labutils.cli import build_parser
    from labutils.prune.spec import PruneSpec
    argv = shlex.split(command)[3:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`{command}` does not parse: {capsys.readouterr().err.strip()}")
    if args.command == "prune":
        PruneSpec.from_cli(vars(args))
