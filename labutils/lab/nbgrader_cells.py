"""The masters as nbgrader reads them: each cell's ``metadata.nbgrader``, derived from the lab's own tags
(``course.py``), so the two never disagree.

nbgrader (https://nbgrader.readthedocs.io, "Developing assignments") knows four kinds of cell; here:

- ``exercise:<id>`` → an autograded answer: ``solution`` (its ``### BEGIN SOLUTION`` region becomes nbgrader's
  stub in the release);
- ``check:<id>`` → an autograded test worth the cell's ``points=``: ``grade``, ``locked``; its
  ``### BEGIN HIDDEN TESTS`` region is removed from the release and put back by ``nbgrader autograde``;
- ``answers`` → the manually graded answer (markdown), one point per explain question: ``solution`` and ``grade``;
- every other cell → read-only: ``locked``, so ``nbgrader autograde`` runs the master's text of it, as
  ``python -m labutils grade`` does.

``grade_id`` is the cell's role and exercise (``check-02-1``), else ``cell-`` and the cell id, unique in a notebook.
The masters carry this metadata committed (``python -m labutils student --stamp`` writes it;
``tests/test_course.py`` fails when a master's differs from what its tags give).
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat

from .course import check_points, explain_questions, exercises, is_answers, is_instructor, read_notebook, tagged

SCHEMA_VERSION = 3


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", text)


def cell_metadata(nb, name: str) -> list[dict | None]:
    """The ``metadata.nbgrader`` of each cell of a master (None for instructor cells, which nbgrader never sees:
    masters ready for nbgrader have none)."""
    found = exercises(nb, name)
    out: list[dict | None] = []
    for index, cell in enumerate(nb.cells):
        exercise, check = tagged(cell, "exercise"), tagged(cell, "check")
        if is_instructor(cell):
            out.append(None)
            continue
        meta = {"grade": False, "locked": True, "solution": False, "task": False, "schema_version": SCHEMA_VERSION,
                "grade_id": f"cell-{_slug(str(cell.get('id')))}"}
        if exercise is not None:
            meta.update(locked=False, solution=True, grade_id=f"exercise-{_slug(exercise)}")
        elif check is not None:
            checks = found[check].checks
            suffix = "" if len(checks) == 1 else f"-{checks.index(index) + 1}"
            meta.update(grade=True, points=check_points(cell.source, name), grade_id=f"check-{_slug(check)}{suffix}")
        elif is_answers(cell):
            meta.update(grade=True, solution=True, locked=False, points=len(explain_questions(nb)),
                        grade_id=f"answers-{name[:2]}")
        out.append(meta)
    return out


def stamp(path: Path) -> bool:
    """Write the derived nbgrader metadata into a master in place; True if anything changed."""
    nb = read_notebook(path, "master notebook")
    changed = False
    for cell, meta in zip(nb.cells, cell_metadata(nb, path.name)):
        if meta is not None and cell.metadata.get("nbgrader") != meta:
            cell.metadata["nbgrader"] = meta
            changed = True
    if changed:
        nbformat.write(nb, str(path))
    return changed


def stale(nb, name: str) -> list[str]:
    """The ids of the cells whose committed nbgrader metadata is not what the tags give."""
    return [str(cell.get("id")) for cell, meta in zip(nb.cells, cell_metadata(nb, name))
            if meta is not None and cell.metadata.get("nbgrader") != meta]
