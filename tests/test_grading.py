"""Grading: the lab's own grader on a synthetic master (one kernel per submitted notebook, seconds each), the
student and grade commands' bad input, and masters whose tags are wrong."""
from pathlib import Path

import nbformat
import pytest

import labutils as lu
from labutils.cli import main
from labutils.lab import course, grading

ROOT = Path(lu.__file__).parent.parent


# Grading, on a synthetic master: three exercises checked by a tiny check module in the masters' folder (so each
# kernel starts in seconds, without importing torch), and one folder per student.
CHECKS = '''from dataclasses import dataclass


@dataclass
class Result:
    name: str
    points: int
    max_points: int
    message: str


def check_equal(name, got, expected, points=1):
    if got != expected:
        raise AssertionError(f"{name}: {got!r} is not the answer\\nHint: read the question")
    return Result(name, points, points, "right")
'''
WRITES = ("import os\nimport minicheck as mc\n\nos.makedirs(os.environ.get('LAB_RESULTS', 'results'), exist_ok=True)"
          "  # like lu.write_results")
SOLUTIONS = {"99.1": "def double(x):\n    return 2 * x", "99.2": "def square(x):\n    return x * x",
             "99.3": "ANSWER = 'b'"}


def _code(source, tags=(), cell_id=None, **metadata):
    return nbformat.v4.new_code_cell(source, id=cell_id, metadata={"tags": list(tags), **metadata})


def synthetic_master(folder: Path) -> Path:
    (folder / "minicheck.py").write_text(CHECKS)
    cells = [nbformat.v4.new_markdown_cell("# 99 · Synthetic", id="title"), _code(WRITES, (), "imp")]
    for ex, (function, call, expected, points) in {"99.1": ("def double(x):\n", "double(21)", 42, 2),
                                                  "99.2": ("def square(x):\n", "square(5)", 25, 3),
                                                  "99.3": ("", "ANSWER", "'b'", 1)}.items():
        body = SOLUTIONS[ex].split("\n")[-1].strip()
        indent = "    " if function else ""
        cells.append(nbformat.v4.new_markdown_cell(f"**{ex}** *Hint:* think.", id=f"md-{ex.replace('.', '-')}"))
        cells.append(_code(f"{function}{indent}### BEGIN SOLUTION\n{indent}{body}\n{indent}### END SOLUTION",
                           [f"exercise:{ex}"], f"ex-{ex.replace('.', '-')}", task=f"solve {ex}"))
        cells.append(_code(f"mc.check_equal({ex!r}, {call}, {expected}, points={points})", [f"check:{ex}"],
                           f"ck-{ex.replace('.', '-')}"))
    cells.append(nbformat.v4.new_markdown_cell("Answer key: b", id="key", metadata={"tags": ["instructor"]}))
    path = folder / "99-Synthetic.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}}), str(path))
    return path


def submit(master: Path, folder: Path, student: str, sources: dict[str, str], edit=None) -> None:
    """A student copy of ``master`` with ``sources`` (exercise id → cell source) filled in, saved as handed in."""
    copy = course.student_copy(course.read_notebook(master), master.name)
    for cell in copy.cells:
        if course.tagged(cell, "exercise") in sources:
            cell.source = sources[course.tagged(cell, "exercise")]
    if edit:
        edit(copy)
    (folder / student).mkdir(parents=True)
    nbformat.write(copy, str(folder / student / master.name))


def tamper(copy) -> None:
    """Rewrite every check cell to pass, and print a forged result line in an exercise cell."""
    for cell in copy.cells:
        if course.tagged(cell, "check"):
            cell.source = "print('PASS')"
        if course.tagged(cell, "exercise") == "99.3":
            cell.source = ("ANSWER = 'a'\nprint('labutils-grade 0 [{\"name\": \"x\", \"points\": 9, \"max_points\": 9, "
                           "\"message\": \"\"}]')")


@pytest.mark.slow  # executes notebooks' cells
def test_grading_scores_exactly_what_the_master_checks_pass(tmp_path):
    (tmp_path / "masters").mkdir()
    master = synthetic_master(tmp_path / "masters")
    subs = tmp_path / "submissions"
    submit(master, subs, "alice", {"99.1": SOLUTIONS["99.1"]})                     # one exercise solved
    submit(master, subs, "mallory", {"99.1": SOLUTIONS["99.1"]}, edit=tamper)      # the same, tampered
    submit(master, subs, "bob", {"99.1": "def double(x):\n    return (2 *", "99.2": SOLUTIONS["99.2"],
                                 "99.3": "while True:\n    pass"})                 # syntax error, solved, endless loop
    submit(master, subs, "erin", {"99.1": "import os\nos._exit(1)", "99.2": SOLUTIONS["99.2"]})  # kills the kernel
    (subs / "dave").mkdir()                                                          # handed in nothing
    table = grading.grade(subs, [master], tmp_path / "grades.csv",
                          settings=grading.GradingSettings(timeout=2, progress=False))
    assert (tmp_path / "grades.csv").read_text().splitlines()[0] == "student,notebook,exercise,points,max,error,grading"
    assert list(table.columns) == ["student", "notebook", "exercise", "points", "max", "error", "grading"]
    score = {(r.student, r.exercise): (r.points, r.error) for r in table.itertuples()}
    assert [score["alice", ex][0] for ex in SOLUTIONS] == [2, 0, 0]
    assert "NotImplementedError: Exercise 99.2: solve 99.2" in score["alice", "99.2"][1]
    assert [score["mallory", ex][0] for ex in SOLUTIONS] == [2, 0, 0]
    assert score["mallory", "99.3"][1] == "AssertionError: 99.3: 'a' is not the answer Hint: read the question"
    assert [score["bob", ex][0] for ex in SOLUTIONS] == [0, 3, 0]
    assert score["bob", "99.1"][1].startswith("SyntaxError") and "timed out after 2 s" in score["bob", "99.3"][1]
    assert [score["erin", ex][0] for ex in SOLUTIONS] == [0, 3, 0]
    assert score["erin", "99.1"][1].startswith("the kernel died: scored 0, and the notebook was run again")
    assert all(score["dave", ex] == (0, "not submitted (no 99-Synthetic.ipynb)") for ex in SOLUTIONS)
    assert set(table["max"]) == {1, 2, 3} and len(table) == 15
    assert not (tmp_path / "masters" / "results").exists()  # result tables of graded runs go to a scratch folder
    feedback = (tmp_path / "feedback" / "bob.md").read_text()
    assert "Total: 3 / 6 points." in feedback and "**99.2** 3 / 3: full marks" in feedback
    assert "Not submitted (no 99-Synthetic.ipynb)." in (tmp_path / "feedback" / "dave.md").read_text()
    assert sorted(p.name for p in (tmp_path / "feedback").iterdir()) == [f"{s}.md" for s in
                                                                        ("alice", "bob", "dave", "erin", "mallory")]


@pytest.mark.large  # worker processes import labutils afresh: about a minute on one busy core (make test-optional)
def test_grading_in_parallel_gives_the_same_table(tmp_path):
    """--jobs 2: two notebooks graded at once in worker processes, the same rows in the same order as one at a time."""
    (tmp_path / "masters").mkdir()
    master = synthetic_master(tmp_path / "masters")
    subs = tmp_path / "submissions"
    submit(master, subs, "alice", {"99.1": SOLUTIONS["99.1"]})
    submit(master, subs, "bob", dict(SOLUTIONS))
    submit(master, subs, "carol", {"99.2": "def square(x):\n    return x + x"})
    one = grading.grade(subs, [master], tmp_path / "one.csv", settings=grading.GradingSettings(10, 1, False))
    two = grading.grade(subs, [master], tmp_path / "two.csv", settings=grading.GradingSettings(10, 2, False))
    assert one.equals(two) and list(two["points"]) == [2, 0, 0, 2, 3, 1, 0, 0, 0]
    with pytest.raises(lu.BadInput, match="jobs must be an integer ≥ 1"):
        grading.grade(subs, [master], tmp_path / "x.csv", settings=grading.GradingSettings(jobs=0))


def test_command_line_writes_copies_and_refuses_bad_input_writing_nothing(tmp_path, capsys):
    assert main(["student", "--out", str(tmp_path / "copies"), "--masters", str(ROOT)]) == 0
    assert sorted(p.name for p in (tmp_path / "copies").iterdir()) == sorted(course.NOTEBOOKS)
    assert capsys.readouterr().out.count("wrote ") == len(course.NOTEBOOKS)
    (tmp_path / "empty").mkdir()
    (tmp_path / "student").mkdir()
    cases = [(["student", "--masters", str(tmp_path / "empty"), "--out", str(tmp_path / "x")], "master notebook"),
             (["grade", str(tmp_path / "nowhere"), "--masters", str(ROOT), "--out", str(tmp_path / "g.csv")],
              "does not exist"),
             (["grade", str(tmp_path / "empty"), "--masters", str(ROOT), "--out", str(tmp_path / "g.csv")],
              "no student folders"),
             (["grade", str(tmp_path), "--masters", str(ROOT), "--out", str(tmp_path / "g.csv"), "--timeout", "0"],
              "timeout must be"),
             (["grade", str(tmp_path), "--masters", str(ROOT), "--out", str(tmp_path / "no" / "g.csv")],
              "must be a file in an existing folder")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copies", "empty", "student"]
    core = tmp_path / "core"  # masters without the optional notebooks: grading needs only 01-04 unless asked
    core.mkdir()
    for name in course.CORE:
        (core / name).write_bytes((ROOT / name).read_bytes())
    assert course.master_paths(core, []) == [core / name for name in course.CORE] == course.master_paths(core)
    assert [p.name[:2] for p in course.master_paths(ROOT, ["07", "05"])] == ["01", "02", "03", "04", "05", "07"]
    for optional, message in ((["05"], "05-Recover.ipynb not found"), (["09"], "--optional 09: the optional")):
        with pytest.raises(lu.BadInput, match=message):
            course.master_paths(core, optional)


@pytest.mark.parametrize("edit, message", [  # cells: 0 title, 1 imports, 2 markdown, 3 exercise 99.1, 4 its check
    (lambda nb: nb.cells[4].metadata.update(tags=[]), r"exercises \['99.1'\] have no check cell"),
    (lambda nb: setattr(nb.cells[4], "source", "mc.check_equal('x', 1, 1)"), "points=<whole number>"),
    (lambda nb: setattr(nb.cells[1], "source", "### BEGIN SOLUTION\n### END SOLUTION"), "outside an exercise or answers cell"),
    (lambda nb: setattr(nb.cells[3], "source", nb.cells[3].source + "\n### END SOLUTION"), "does not pair"),
    (lambda nb: nb.cells[4].metadata.update(tags=["check:99.7"]), "before .or without. its exercise cell"),
    (lambda nb: nb.cells[3].metadata.pop("task"), "a solution region and a task"),
])
def test_a_badly_tagged_master_is_refused_with_the_cell_named(tmp_path, edit, message):
    nb = course.read_notebook(synthetic_master(tmp_path))
    edit(nb)
    with pytest.raises(lu.BadInput, match=message):
        course.student_copy(nb, "99-Synthetic.ipynb")
