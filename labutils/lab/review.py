"""The hand-graded part of a class: each student's answers cell (the explain questions), for an instructor to read
and score with the rubric beside it.

``python -m labutils grade`` adds one row per student and notebook to ``grades.csv`` for the answers cell
(exercise ``<nn>.answers``, 0 points of one per explain question, ``grading`` = ``manual: to grade`` or
``manual: no answer``) and writes ``review/<notebook>.md``: the master's answer key and rubric, then every
student's answer under their name. An instructor scores there, or in nbgrader's formgrader when grading with nbgrader
(the same cell is nbgrader's manually graded answer).
"""
from __future__ import annotations

from pathlib import Path

from ..core.errors import BadInput
from .course import BEGIN, END, answer_stub, answer_text, explain_questions, is_answers, read_notebook

TO_GRADE, NO_ANSWER, AUTO = "manual: to grade", "manual: no answer", "auto"


def answers_cell(nb):
    """The master's (or a submission's) answers cell, or None."""
    return next((cell for cell in nb.cells if is_answers(cell)), None)


def student_answer(master, submission: Path) -> str:
    """What a student wrote in the answers cell of a submitted notebook ('' if nothing, or no such notebook)."""
    if not submission.is_file():
        return ""
    try:
        submitted = read_notebook(submission, "submission")
    except BadInput:
        return ""
    handed_out = answer_stub(answers_cell(master).source)
    cell = next((c for c in submitted.cells if c.get("id") == answers_cell(master).get("id")), None) \
        or answers_cell(submitted)
    return "" if cell is None else answer_text(cell.source, handed_out)


def manual_rows(student: str, path: Path, master, submission: Path) -> list[tuple]:
    """The grades row of a notebook's answers cell for one student (none if the master has no answers cell)."""
    if answers_cell(master) is None:
        return []
    status = TO_GRADE if student_answer(master, submission) else NO_ANSWER
    return [(student, path.stem, f"{path.name[:2]}.answers", 0, len(explain_questions(master)), "", status)]


def review_text(path: Path, master, answers: dict[str, str]) -> str:
    """``review/<notebook>.md``: the key and rubric, then each student's answer (student → text)."""
    key = answers_cell(master).source.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    lines = [f"# {path.stem}: the explain questions, to grade by hand", "",
             f"Questions {', '.join(explain_questions(master))}, one point each. Enter the scores in grades.csv "
             "(the rows `…answers`) or in nbgrader's formgrader.", "", "## Key and rubric", "", key, ""]
    for student, text in answers.items():
        lines += [f"## {student}", "", text or "*(no answer)*", ""]
    return "\n".join(lines)


def write_reviews(folder: Path, submissions: dict[str, Path], loaded: dict[Path, object]) -> None:
    """One review file per master with an answers cell; ``submissions``: student → their folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for path, master in loaded.items():
        if answers_cell(master) is not None:
            answers = {student: student_answer(master, where / path.name) for student, where in submissions.items()}
            (folder / f"{path.stem}.md").write_text(review_text(path, master, answers))
