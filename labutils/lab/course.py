"""The notebooks as the course tools read them: tagged cells, exercises, and the student copies
(``python -m labutils student``).

Cell tags (a cell's ``metadata.tags``, shown in JupyterLab's property inspector) say what a cell is, so no tool
guesses:

- ``exercise:<id>`` — the code cell the student writes; ``<id>`` is ``<notebook number>.<exercise number>``, e.g.
  ``02.1``. The reference solution sits between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` lines (nbgrader's
  markers); what is outside them (a ``def`` line and its docstring, set-up code) stays in the student copy, so the
  cell still defines its names. The cell's ``metadata.task`` is one line saying what to write.
- ``check:<id>`` — a check cell scoring exercise ``<id>``, after it: ``lu.check_…(…, points=N)`` calls. The exercise
  is worth the sum of those ``points=`` numbers, read from the source, so a tool knows the maximum without running
  anything. The calls sit between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS`` (nbgrader's hidden-test
  markers), after a visible ``lu.sanity("<id>", …)`` line: student copies keep only the visible part, so no cell a
  student receives computes the expected answer or holds a prediction's answer; grading runs the master's cell.
- ``answers`` — the markdown cell at the end of a notebook where a student writes the explanations (the questions
  marked *(explain)*), graded by hand. In the master its solution region holds the answer key and the rubric; a
  student copy (and nbgrader's release) has ``YOUR ANSWER HERE`` in its place. Worth one point per explain question.
- ``instructor`` — for instructors only: left out of student copies and of graded runs.

Open questions have no code cell and no tag: a markdown cell asks, the ``answers`` cell takes the answer.

A student copy (``student_copy``) is the master with outputs and execution counts cleared, execution timings and
widget state dropped, every solution region replaced by ``raise NotImplementedError("Exercise <id>: <task>")`` at
the region's indentation, every hidden-test region removed, and the instructor cells removed. Everything else, cell ids included, is kept, so two
runs write byte-identical files, and every cell outside the exercises runs as in the master.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

from ..core.errors import BadInput

NOTEBOOKS = ("01-Setup.ipynb", "02-Prune.ipynb", "03-Inference.ipynb", "04-Benchmark.ipynb", "05-Recover.ipynb",
             "06-Calibrate.ipynb", "07-Quantize.ipynb", "08-Deploy.ipynb")
CORE = NOTEBOOKS[:4]  # graded by default; 05–08 are optional (grade --optional)
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
INSTRUCTOR, ANSWERS = "instructor", "answers"
ANSWER_STUB = "YOUR ANSWER HERE"  # nbgrader's text stub, so both tools hand out the same cell
EXPLAIN = re.compile(r"^\*\*(\d+)\.[^\n]*\((?:measure and )?explain\b", re.M)  # **5. … (explain).**
EXERCISE_ID = re.compile(r"\d\d\.\d+")


@dataclass(frozen=True)
class Exercise:
    """One scored exercise of a notebook: its cell, its check cells (indices into ``nb.cells``) and its worth."""

    id: str
    task: str
    cell: int
    checks: tuple[int, ...]
    max_points: int


def tagged(cell, kind: str) -> str | None:
    """The ``<id>`` of a cell's ``<kind>:<id>`` tag (kind: ``exercise`` or ``check``), or None."""
    ids = [tag.split(":", 1)[1] for tag in cell.get("metadata", {}).get("tags", []) if tag.startswith(f"{kind}:")]
    return ids[0] if ids else None


def is_instructor(cell) -> bool:
    return INSTRUCTOR in cell.get("metadata", {}).get("tags", [])


def is_answers(cell) -> bool:
    return ANSWERS in cell.get("metadata", {}).get("tags", []) and cell.cell_type == "markdown"


def explain_questions(nb) -> list[str]:
    """The numbers of a notebook's explain questions, in order (the manually graded part, a point each)."""
    return [number for cell in nb.cells if cell.cell_type == "markdown" and not is_answers(cell)
            for number in EXPLAIN.findall(cell.source)]


def answer_text(source: str, handed_out: str) -> str:
    """What a student wrote in an answers cell: its lines less those of the cell as handed out (``handed_out``: the
    heading, the instructions, the stub); '' when nothing else is there."""
    given = set(handed_out.split("\n"))
    return "\n".join(line for line in source.split("\n") if line not in given).strip()


def read_notebook(path: str | Path, what: str = "notebook"):
    """An nbformat 4 notebook from ``path``; BadInput (saying which file) when it is missing or not a notebook."""
    try:
        return nbformat.read(str(path), as_version=4)
    except FileNotFoundError:
        raise BadInput(f"{what} {path} does not exist") from None
    except Exception as exc:  # nbformat raises JSON, validation and version errors of several types
        raise BadInput(f"{what} {path} is not a readable notebook: {str(exc).splitlines()[0]}") from None


def is_check_call(node: ast.AST) -> bool:
    """A call of ``<something>.check_…(…)``, such as ``lu.check_wanda_score(my_wanda_score, points=3)``."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("check_")


def check_points(source: str, where: str) -> int:
    """The sum of the ``points=`` numbers of a check cell's ``….check_…(…)`` calls, each a statement of its own (so
    the grader can keep what each returns)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise BadInput(f"{where}: the check cell is not valid Python ({exc.msg}, line {exc.lineno})") from None
    calls = [node for node in ast.walk(tree) if is_check_call(node)]
    statements = [node.value for node in tree.body if isinstance(node, ast.Expr) and is_check_call(node.value)]
    points = [kw.value.value for call in statements for kw in call.keywords
              if kw.arg == "points" and isinstance(kw.value, ast.Constant) and type(kw.value.value) is int]
    if not calls or len(points) != len(calls):
        raise BadInput(f"{where}: a check cell needs lu.check_…(…, points=<whole number>) calls, each a statement of "
                       f"its own; found {len(calls)} calls, {len(points)} of them like that")
    return sum(points)


def solution_regions(source: str, where: str, markers: tuple[str, str] = (BEGIN, END)) -> list[tuple[int, int]]:
    """(BEGIN line, END line) index pairs of a cell's solution regions (or, with ``markers``, its hidden-test
    regions), checked to be well nested."""
    (opening, closing), lines, regions, begin = markers, source.split("\n"), [], None
    for i, line in enumerate(lines):
        marker = line.strip()
        if marker == opening and begin is None:
            begin = i
        elif marker == closing and begin is not None:
            regions.append((begin, i))
            begin = None
        elif marker in (opening, closing):
            other = closing if begin is None else opening
            raise BadInput(f"{where}: {marker!r} on line {i + 1} does not pair with a {other!r}")
    if begin is not None:
        raise BadInput(f"{where}: {opening!r} on line {begin + 1} has no {closing!r}")
    return regions


def without_hidden_tests(source: str, where: str) -> str:
    """A check cell's source with its hidden-test regions (markers included) removed."""
    lines, drop = source.split("\n"), set()
    for begin, end in solution_regions(source, where, (HIDDEN_BEGIN, HIDDEN_END)):
        drop.update(range(begin, end + 1))
    return "\n".join(line for i, line in enumerate(lines) if i not in drop).rstrip("\n")


def exercises(nb, name: str) -> dict[str, Exercise]:
    """The scored exercises of a master notebook, by id, validated: each has one code cell with a task and a
    solution region, and one or more check cells after it; solution markers appear nowhere else."""
    cells, checks = {}, {}
    for index, cell in enumerate(nb.cells):
        where = f"{name} cell {index} (id {cell.get('id')})"
        exercise, check = tagged(cell, "exercise"), tagged(cell, "check")
        regions = solution_regions(cell.source, where)
        if exercise is not None:
            if cell.cell_type != "code" or not regions or not cell.metadata.get("task"):
                raise BadInput(f"{where}: an exercise cell must be a code cell with a solution region and a task")
            if exercise in cells or not EXERCISE_ID.fullmatch(exercise):
                raise BadInput(f"{where}: exercise id {exercise!r} is repeated or not like 02.1")
            cells[exercise] = index
        elif regions and not is_answers(cell):
            raise BadInput(f"{where}: solution markers outside an exercise or answers cell (tag it exercise:<id>)")
        if solution_regions(cell.source, where, (HIDDEN_BEGIN, HIDDEN_END)) and check is None:
            raise BadInput(f"{where}: hidden-test markers outside a check cell (tag it check:<id>)")
        if check is not None:
            if check not in cells:
                raise BadInput(f"{where}: check:{check} comes before (or without) its exercise cell")
            checks.setdefault(check, []).append((index, check_points(cell.source, where)))
    missing = sorted(set(cells) - set(checks))
    if missing:
        raise BadInput(f"{name}: exercises {missing} have no check cell")
    return {ex: Exercise(ex, nb.cells[index].metadata["task"], index, tuple(i for i, _ in checks[ex]),
                         sum(p for _, p in checks[ex])) for ex, index in cells.items()}


def stub_source(source: str, exercise: str, task: str) -> str:
    """The cell with each solution region replaced by ``raise NotImplementedError(…)`` at the region's indentation."""
    lines, out, skipping = source.split("\n"), [], False
    message = f"Exercise {exercise}: {task}"
    for line in lines:
        marker = line.strip()
        if marker == BEGIN:
            indent = line[:len(line) - len(line.lstrip())]
            out.append(f"{indent}raise NotImplementedError({message!r})")
            skipping = True
        elif marker == END:
            skipping = False
        elif not skipping:
            out.append(line)
    return "\n".join(out)


def answer_stub(source: str) -> str:
    """An answers cell as handed out: each solution region (the key and rubric) replaced by ``YOUR ANSWER HERE``."""
    lines, out, skipping = source.split("\n"), [], False
    for line in lines:
        if line.strip() == BEGIN:
            out.append(ANSWER_STUB)
            skipping = True
        elif line.strip() == END:
            skipping = False
        elif not skipping:
            out.append(line)
    return "\n".join(out)


def student_copy(nb, name: str):
    """A student's copy of a master notebook (see the module docstring); the master is left unchanged."""
    found = exercises(nb, name)
    copy = nbformat.from_dict(nb)
    copy.metadata.pop("widgets", None)
    copy.cells = [cell for cell in copy.cells if not is_instructor(cell)]
    for cell in copy.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        exercise = tagged(cell, "exercise")
        if exercise is not None:
            cell.source = stub_source(cell.source, exercise, found[exercise].task)
        if is_answers(cell):
            cell.source = answer_stub(cell.source)
        if tagged(cell, "check") is not None:
            cell.source = without_hidden_tests(cell.source, f"{name} cell {cell.get('id')}")
    nbformat.validate(copy)
    return copy


def master_paths(folder: str | Path, optional: list[str] | None = None) -> list[Path]:
    """The master notebooks in ``folder`` (the lab's root): the core four (01–04) and the optional ones named in
    ``optional`` (by number, ``"05"``; None: every optional one present). BadInput naming the first one missing."""
    core, extra = NOTEBOOKS[:len(CORE)], NOTEBOOKS[len(CORE):]
    if optional is not None:
        unknown = sorted(set(optional) - {name[:2] for name in extra})
        if unknown:
            raise BadInput(f"--optional {unknown[0]}: the optional notebooks are {', '.join(n[:2] for n in extra)}")
        extra = [name for name in extra if name[:2] in optional]
    else:
        extra = [name for name in extra if (Path(folder) / name).is_file()]
    paths = [Path(folder) / name for name in (*core, *extra)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise BadInput(f"master notebook {missing[0]} not found: run from the lab's folder or pass --masters")
    return paths


def write_student_copies(masters: list[Path], out: str | Path) -> list[Path]:
    """Write a student copy of each master into ``out`` (created if missing), under the master's file name.

    Every copy is built before the first is written, so a bad master writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} exists and is not a folder")
    copies = {path.name: student_copy(read_notebook(path, "master notebook"), path.name) for path in masters}
    out.mkdir(parents=True, exist_ok=True)
    for name, copy in copies.items():
        nbformat.write(copy, str(out / name))
    return [out / name for name in copies]
