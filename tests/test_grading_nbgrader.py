"""The instructor commands over nbgrader (``student --nbgrader``, ``grade --nbgrader``): a synthetic master released,
submitted as students do (full, none, one solved, tampered, endless loop, syntax error), autograded
by nbgrader, scored as the lab's own grader scores it (tests/test_grading.py)."""
import shutil

import nbformat
import pytest
from test_grading import SOLUTIONS, synthetic_master

import labutils as lu
from labutils.cli import main
from labutils.lab import nbgrader_cells, nbgrader_course

pytest.importorskip("nbgrader", reason="nbgrader is not installed (requirements.txt pins nbgrader==0.9.6)")


def _course(tmp_path):
    (tmp_path / "masters").mkdir()
    master = synthetic_master(tmp_path / "masters")
    nbgrader_cells.stamp(master)
    (tmp_path / "course" / "source" / "lab").mkdir(parents=True)
    shutil.copy(tmp_path / "masters" / "minicheck.py", tmp_path / "course" / "source" / "lab")  # released with it
    return master, nbgrader_course.release([master], tmp_path / "course")


def _submit(release, course, student, sources=None, edit=None):
    folder = course / "submitted" / student / "lab"
    folder.mkdir(parents=True)
    shutil.copy(release / "minicheck.py", folder)
    if sources is None:
        return
    nb = nbformat.read(str(release / "99-Synthetic.ipynb"), as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id", "")
        if grade_id.startswith("exercise-") and grade_id[9:].replace("-", ".") in sources:
            cell.source = sources[grade_id[9:].replace("-", ".")]
    if edit:
        edit(nb)
    nbformat.write(nb, str(folder / "99-Synthetic.ipynb"))


def _tamper(nb):
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("grade"):
            cell.source = "print('PASS')"


@pytest.mark.slow  # nbgrader runs a kernel per submission
def test_nbgrader_release_and_autograde_score_as_the_labs_grader(tmp_path):
    master, release = _course(tmp_path)
    course = tmp_path / "course"
    text = (release / "99-Synthetic.ipynb").read_text()
    assert "BEGIN SOLUTION" not in text and "Answer key" not in text and "raise NotImplementedError()" in text
    _submit(release, course, "alice", {"99.1": SOLUTIONS["99.1"]})
    _submit(release, course, "mallory", {"99.1": SOLUTIONS["99.1"], "99.3": "ANSWER = 'a'"}, edit=_tamper)
    _submit(release, course, "bob", {"99.1": "def double(x):\n    return (2 *", "99.2": SOLUTIONS["99.2"],
                                     "99.3": "while True:\n    pass"})
    _submit(release, course, "carol", dict(SOLUTIONS))
    _submit(release, course, "dave")
    table = nbgrader_course.grade_course(course, tmp_path / "grades.csv", timeout=5)
    assert list(table.columns) == ["student", "notebook", "exercise", "points", "max", "error", "grading"]
    score = {(r.student, r.exercise): (r.points, r.error) for r in table.itertuples()}
    assert [score["alice", ex][0] for ex in SOLUTIONS] == [2, 0, 0]
    assert [score["mallory", ex][0] for ex in SOLUTIONS] == [2, 0, 0]  # the check cells come back from the gradebook
    assert "99.3: 'a' is not the answer" in score["mallory", "99.3"][1]
    assert [score["bob", ex][0] for ex in SOLUTIONS] == [0, 3, 0]
    assert [score["carol", ex][0] for ex in SOLUTIONS] == [2, 3, 1]
    assert all(score["dave", ex] == (0, "not submitted (no 99-Synthetic.ipynb)") for ex in SOLUTIONS)
    assert (course / "feedback" / "alice" / "lab" / "99-Synthetic.html").is_file()
    again = nbgrader_course.grade_course(course, tmp_path / "again.csv", run=False)  # --export: nothing runs
    assert again.equals(table)
    assert nbgrader_course.grade_rows(course, "lab", ["alice"], optional=[]).empty  # 99 is neither core nor asked for
    assert len(nbgrader_course.grade_rows(course, "lab", ["alice"], optional=["99"])) == 3


def test_grade_command_refuses_bad_nbgrader_input_writing_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nosubs" / "source" / "lab").mkdir(parents=True)
    cases = [(["grade", "--out", str(tmp_path / "g.csv")], "give SUBMISSIONS"),
             (["grade", str(tmp_path), "--nbgrader", str(tmp_path / "empty"), "--out", str(tmp_path / "g.csv")],
              "one of the two"),
             (["grade", "--nbgrader", str(tmp_path / "nowhere"), "--out", str(tmp_path / "g.csv")], "does not exist"),
             (["grade", "--nbgrader", str(tmp_path / "empty"), "--out", str(tmp_path / "g.csv")], "no source/lab/"),
             (["grade", "--nbgrader", str(tmp_path / "nosubs"), "--out", str(tmp_path / "g.csv")], "no submissions")]
    (tmp_path / "graded" / "source" / "lab").mkdir(parents=True)
    (tmp_path / "graded" / "submitted" / "ann" / "lab").mkdir(parents=True)
    cases.append((["grade", "--nbgrader", str(tmp_path / "graded"), "--export", "--out", str(tmp_path / "g.csv")],
                  "no gradebook.db yet"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "graded", "nosubs"]
    assert not list((tmp_path / "empty").iterdir()) and not (tmp_path / "graded" / "gradebook.db").exists()
    (tmp_path / "file").write_text("")
    assert main(["student", "--nbgrader", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    with pytest.raises(lu.BadInput, match="not a folder"):
        nbgrader_course.release([], tmp_path / "file")
