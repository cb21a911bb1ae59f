"""``python -m labutils student --nbgrader COURSE`` and ``grade --nbgrader COURSE``: the lab's two instructor
commands as thin front-ends over nbgrader, for an instructor without a JupyterHub.

The course folder is nbgrader's own layout (nbgrader's documentation, "Managing assignment files"), so an
instructor's existing nbgrader setup (formgrader, gradebook, LMS export) takes it as it is:

    COURSE/nbgrader_config.py            written once if missing: the course id, the cell timeout
    COURSE/source/<assignment>/*.ipynb   the masters (with their metadata.nbgrader, see nbgrader_cells.py)
    COURSE/release/<assignment>/         what students receive (nbgrader generate_assignment)
    COURSE/submitted/<student>/<assignment>/*.ipynb   what they hand back
    COURSE/autograded/, COURSE/feedback/, COURSE/gradebook.db   nbgrader autograde / generate_feedback

``grade --nbgrader`` then writes the same ``grades.csv`` as the lab's own grader (``grading.py``), from nbgrader's
gradebook: one row per student and exercise, the error of a failed check read from the autograded notebook, and one
row per notebook for the answers cell (``manual: to grade`` / ``manual: no answer`` / ``manual: graded``, with the
score an instructor entered in the formgrader).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd

from ..core.errors import BadInput
from .course import CORE, is_instructor, read_notebook
from .grading import COLUMNS, error_line
from .review import AUTO, NO_ANSWER, TO_GRADE

ASSIGNMENT = "lab"
CONFIG = '''c = get_config()  # written by python -m labutils student --nbgrader; edit freely, it is not overwritten
c.CourseDirectory.course_id = "wanda-lab"
c.Execute.timeout = {timeout}  # seconds per cell: the masters' own cells take minutes on a CPU
c.ClearSolutions.code_stub = {{"python": "# YOUR CODE HERE\\nraise NotImplementedError()"}}
'''


def nbgrader(course: Path, *args: str) -> None:
    """Run one nbgrader command in the course folder; BadInput with its last error line if it fails."""
    if importlib.util.find_spec("nbgrader") is None:  # requirements.txt pins it; make setup installs it
        raise BadInput("nbgrader is not installed: pip install nbgrader==0.9.6 (make setup installs it)")
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, capture_output=True, text=True)
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line or "Error" in line] or ["?"]
        raise BadInput(f"nbgrader {args[0]} failed in {course}: {errors[-1].strip()}")


def release(masters: list[Path], course: str | Path, assignment: str = ASSIGNMENT, timeout: float = 600) -> Path:
    """Copy the masters to ``COURSE/source/<assignment>/`` (less any ``instructor`` cell) and run nbgrader
    generate_assignment; the release folder."""
    course = Path(course)
    if course.exists() and not course.is_dir():
        raise BadInput(f"--nbgrader {course} exists and is not a folder")
    source = course / "source" / assignment
    source.mkdir(parents=True, exist_ok=True)
    if not (course / "nbgrader_config.py").exists():
        (course / "nbgrader_config.py").write_text(CONFIG.format(timeout=int(timeout)))
    for path in masters:  # instructor cells (masters older than the answers cells) never reach nbgrader
        nb = read_notebook(path, "master notebook")
        nb.cells = [cell for cell in nb.cells if not is_instructor(cell)]
        nbformat.write(nb, str(source / path.name))
    nbgrader(course, "generate_assignment", assignment, "--force")
    return course / "release" / assignment


def submitted_students(course: Path, assignment: str) -> list[str]:
    """The students with a submission of ``assignment``; BadInput when the course folder has none."""
    if not (course / "source" / assignment).is_dir():
        raise BadInput(f"{course} has no source/{assignment}/: make it with python -m labutils student --nbgrader "
                       f"{course}")
    students = sorted(p.parent.name for p in (course / "submitted").glob(f"*/{assignment}") if p.is_dir())
    if not students:
        raise BadInput(f"no submissions in {course}/submitted/: expected {course}/submitted/<student>/{assignment}/")
    return students


def check_error(notebook: Path, grade_id: str) -> str:
    """The one-line error of a grade cell in an autograded notebook ('' if it ran clean or is not there)."""
    if not notebook.is_file():
        return f"not submitted (no {notebook.name})"
    nb = nbformat.read(str(notebook), as_version=4)
    for cell in nb.cells:
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id:
            return error_line(cell)
    return ""


def grade_rows(course: Path, assignment: str, students: list[str], optional: list[str] | None = None) \
        -> pd.DataFrame:
    """The grades table from nbgrader's gradebook and autograded notebooks: the core notebooks 01-04 and the
    optional ones numbered in ``optional`` (None: every notebook of the assignment)."""
    from nbgrader.api import Gradebook

    rows = []
    with Gradebook(f"sqlite:///{(course / 'gradebook.db').resolve()}") as gradebook:
        notebooks = [nb.name for nb in gradebook.find_assignment(assignment).notebooks
                     if optional is None or nb.name in {n.removesuffix(".ipynb") for n in CORE} or nb.name[:2] in optional]
        for student in students:
            for name in sorted(notebooks):
                try:
                    grades = gradebook.find_submission_notebook(name, assignment, student).grades
                except Exception:  # nbgrader's MissingEntry: this notebook was not submitted
                    grades = None
                for cell in sorted(gradebook.find_notebook(name, assignment).grade_cells, key=lambda c: c.name):
                    parts = cell.name.split("-")  # check-02-1 → 02.1; answers-02 → 02.answers
                    exercise = f"{parts[1]}.{parts[2]}" if parts[0] == "check" else f"{name[:2]}.answers"
                    grade = next((g for g in grades or [] if g.name == cell.name), None)
                    score = 0 if grade is None else (grade.manual_score if grade.manual_score is not None
                                                     else grade.auto_score or 0)
                    autograded = course / "autograded" / student / assignment / f"{name}.ipynb"
                    if cell.name.startswith("check-"):
                        error = "" if score == cell.max_score else check_error(autograded, cell.name)
                        rows.append((student, name, exercise, int(score), int(cell.max_score), error, AUTO))
                    else:
                        status = NO_ANSWER if grade is None or (grade.auto_score == 0 and grade.manual_score is None) \
                            else TO_GRADE if grade.needs_manual_grade else "manual: graded"
                        score = int(score) if float(score).is_integer() else score  # a hand-given 1.5 stays
                        rows.append((student, name, exercise, score, int(cell.max_score), "", status))
    return pd.DataFrame(rows, columns=COLUMNS)


def grade_course(course: str | Path, out: str | Path, assignment: str = ASSIGNMENT,
                 timeout: float | None = None, run: bool = True, optional: list[str] | None = None) -> pd.DataFrame:
    """nbgrader autograde and generate_feedback on every submission (unless ``run`` is False: after manual grading),
    then ``out`` (grades.csv) from the gradebook, for 01-04 and the optional notebooks numbered in ``optional``."""
    course, out = Path(course), Path(out)
    if not course.is_dir():
        raise BadInput(f"--nbgrader {course} does not exist or is not a folder")
    if out.is_dir() or not out.parent.is_dir():
        raise BadInput(f"--out {out} must be a file in an existing folder")
    students = submitted_students(course, assignment)
    extra = [f"--Execute.timeout={int(timeout)}"] if timeout else []
    if run:
        nbgrader(course, "autograde", assignment, "--create", "--force", *extra)
    elif not (course / "gradebook.db").is_file():
        raise BadInput(f"{course} has no gradebook.db yet: run grade --nbgrader without --export first")
    nbgrader(course, "generate_feedback", assignment, "--force")
    table = grade_rows(course, assignment, students, optional)
    table.to_csv(out, index=False)
    return table
