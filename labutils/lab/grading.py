"""Score submitted notebooks with the instructor's checks: ``python -m labutils grade SUBMISSIONS/``.

Layout: ``SUBMISSIONS/<student>/<notebook>``: one folder per student (its name is the student in the grades),
holding the notebooks under the masters' file names (``01-Setup.ipynb`` …); other files are ignored.

For each student and each master notebook:

1. Build the run: the master's cells, with the source of each ``exercise:<id>`` cell taken from the student's cell
   with that tag (or, if the tag was lost, the cell with the same cell id). The student's check cells and any
   other change are ignored: the checks are the master's. Instructor cells are left out.
2. Rewrite each of the master's ``check:<id>`` cells to keep what its ``lu.check_…(…)`` statements return (a
   ``CheckResult``; a failed check raises instead) in a fresh list, and follow it with a closing cell that prints
   that list on one line after a nonce drawn (``secrets``) for that cell in this run. Only the last line with that
   nonce, in the closing cell's output, counts: a student's code that prints such a line cannot know the nonce,
   and the points can come from nowhere else.
3. Execute from a fresh kernel (nbclient, errors allowed: a failing cell does not stop the run) with the kernel's
   working directory at the masters, so it sees the instructor's ``outputs/``; ``lu.write_results`` writes to a
   temporary folder (``$LAB_RESULTS``), so the committed ``results/`` stay as they are. The student's cells and the
   check cells get ``timeout`` seconds each, the master's own cells ``MASTER_TIMEOUT``; a cell past its time is
   interrupted and counts as that cell's error.
4. If the kernel dies, or stays busy after the interrupt, the run starts again from a fresh kernel with the
   exercise that was running replaced by its stub (it scores 0, with the reason), once per exercise at most.
5. Score each exercise: the points of the check results recorded for its check cells (all or nothing per check);
   the error is the reason it lost points: its check's message and hint, or its own cell's error.

Output: ``grades.csv`` (student, notebook, exercise, points, max, error, grading): one row per student and exercise
of every master, ``grading`` = ``auto``; a notebook not submitted scores 0. Then one row per student and notebook for
the answers cell, graded by hand (``review.py``: ``manual: to grade`` or ``manual: no answer``, 0 points until an
instructor enters them), with ``review/<notebook>.md`` beside the grades to read them. And ``<student>.md`` in the
feedback folder: the points and, for each exercise short of full marks, why and the hint.

Not guarded against: code written to subvert the kernel itself (replacing the lab's check functions at run time)
shares the process with the checks, which no executed notebook can rule out; instructors read the submissions.
"""
from __future__ import annotations

import ast
import json
import multiprocessing
import os
import secrets
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pandas as pd
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from tqdm import tqdm

from ..core.errors import BadInput
from ..core.validation import check_count, check_number
from ..jobs.compare import RESULTS_ENV
from .course import Exercise, exercises, is_check_call, is_instructor, read_notebook, stub_source, tagged
from .feedback import feedback_folder, feedback_text
from .review import AUTO, manual_rows, write_reviews

COLUMNS = ["student", "notebook", "exercise", "points", "max", "error", "grading"]
MARKER = "labutils-grade"  # first word of a closing cell's line; the nonce and the JSON results follow
RESULTS = "__grading_results__"  # the kernel's list of what a check cell's checks returned
MASTER_TIMEOUT = 600  # seconds for each of the master's own cells (make test's nbval limit)
RUN_MEMORY = 5 * 2**30  # bytes a notebook run may take: 02's kernel held about 4.2 GB resident (ps, while it ran)
EXERCISE_TIMEOUT = 400  # seconds for an exercise or check cell: a correct 01.3 took 175 s on a busy 2-core machine
PROBE_TIMEOUT = 30    # seconds an interrupted kernel has to answer again before it counts as stuck
TIMED_OUT = "CellTimeout"


@dataclass
class Run:
    """One execution of a built notebook: the cells as run, those that timed out, and where it stopped (if early)."""

    cells: list
    timed_out: list = field(default_factory=list)  # the cells (objects) interrupted after their time
    stopped_at: int | None = None
    stop_reason: str = ""


def _code(source: str, timeout: float, role: str, exercise: str | None = None):
    return nbformat.v4.new_code_cell(source, metadata={"grading": {"timeout": timeout, "role": role,
                                                                   "exercise": exercise}})


def recording_source(source: str) -> str:
    """A check cell that starts a fresh results list and appends to it what each ``….check_…(…)`` statement returns."""
    tree = ast.parse(source)
    append = ast.Attribute(ast.Name(RESULTS, ast.Load()), "append", ast.Load())
    tree.body = [ast.Expr(ast.Call(append, [node.value], []))
                 if isinstance(node, ast.Expr) and is_check_call(node.value) else node for node in tree.body]
    return f"{RESULTS} = []\n{ast.unparse(ast.fix_missing_locations(tree))}"


def closing_source(nonce: str) -> str:
    """The cell after a check cell: one line, the marker, the nonce, and what the checks returned as JSON."""
    fields = "('name', 'points', 'max_points', 'message')"
    return (f"import json\nprint({MARKER!r}, {nonce!r}, "
            f"json.dumps([{{key: getattr(r, key) for key in {fields}}} for r in {RESULTS}]))")


def build_run(master, found: dict[str, Exercise], sources: dict[str, str], timeout: float) -> tuple[list, dict]:
    """The cells to execute, and for each closing cell (by index in them) its (exercise id, nonce).

    ``sources``: exercise id → the source to run in that exercise's cell (the student's, or the stub)."""
    solutions = {ex.cell: ex.id for ex in found.values()}
    checks = {index: ex.id for ex in found.values() for index in ex.checks}
    cells, closing = [], {}
    for index, cell in enumerate(master.cells):
        if is_instructor(cell):
            continue
        cell = nbformat.from_dict(cell)
        cell.metadata["grading"] = {"timeout": MASTER_TIMEOUT, "role": "master", "exercise": None}
        if index in solutions:
            cell.source = sources[solutions[index]]
            cell.metadata["grading"] = {"timeout": timeout, "role": "exercise", "exercise": solutions[index]}
        if index in checks:
            cell.source = recording_source(cell.source)
            cell.metadata["grading"] = {"timeout": timeout, "role": "check", "exercise": checks[index]}
        cells.append(cell)
        if index in checks:
            nonce = secrets.token_hex(16)
            closing[len(cells)] = (checks[index], nonce)
            cells.append(_code(closing_source(nonce), PROBE_TIMEOUT, "close", checks[index]))
    return cells, closing


def execute(cells: list, cwd: Path) -> Run:
    """Run ``cells`` in order from a fresh kernel; stop early only if the kernel dies or stays busy."""
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": kernelspec})
    run = Run(nb.cells)

    def on_error(cell, cell_index, execute_reply):
        if execute_reply["content"].get("ename") == TIMED_OUT:
            run.timed_out.append(cell)
    client = NotebookClient(nb, kernel_name="python3", allow_errors=True, shutdown_kernel="immediate",
                            interrupt_on_timeout=True,  # and report the cell as failed (below), then go on
                            error_on_timeout={"ename": TIMED_OUT, "evalue": "timed out", "traceback": []},
                            timeout_func=lambda cell: cell.metadata["grading"]["timeout"], on_cell_error=on_error,
                            resources={"metadata": {"path": str(cwd)}})
    with tempfile.TemporaryDirectory() as scratch, client.setup_kernel(env={**os.environ, RESULTS_ENV: scratch}):
        for index, cell in enumerate(list(nb.cells)):
            try:
                client.execute_cell(cell, index)
                if any(c is cell for c in run.timed_out):  # interrupted: does the kernel answer again?
                    nb.cells.append(_code("pass", PROBE_TIMEOUT, "probe"))  # at the end: indices stay put
                    probe = client.execute_cell(nb.cells[-1], len(nb.cells) - 1)
                    if any(c is probe for c in run.timed_out):
                        run.stopped_at, run.stop_reason = index, "it ran past its time and ignored the interrupt"
                        break
            except DeadKernelError:
                run.stopped_at, run.stop_reason = index, "the kernel died"
                break
    return run


def _error(cell, run: Run) -> str:
    """A cell's error as one line: its timeout, a failed check's message and hint, or the exception."""
    if any(c is cell for c in run.timed_out):
        return f"timed out after {cell.metadata['grading']['timeout']:g} s (interrupted)"
    return error_line(cell)


def error_line(cell) -> str:
    """The first error a code cell's outputs hold, as one line ('' if none): a failed check's message and hint, or
    the exception's type and message. The grader's and nbgrader's grades tables both say it this way."""
    for output in cell.get("outputs", []):
        if output.output_type == "error":
            text = output.evalue.replace("\nHint: ", ". Hint: ") if output.ename == "CheckFailed" else \
                f"{output.ename}: {output.evalue}"
            return " ".join(text.split())
    return ""


def _recorded(cell, nonce: str) -> list[dict]:
    """The results a closing cell printed after its nonce (its last such line; none if it printed none)."""
    prefix = f"{MARKER} {nonce} "
    lines = [line for output in cell.get("outputs", []) if output.output_type == "stream"
             for line in output.text.splitlines() if line.startswith(prefix)]
    try:
        return json.loads(lines[-1][len(prefix):]) if lines else []
    except ValueError:
        return []


def score(run: Run, found: dict[str, Exercise], closing: dict, reasons: dict[str, str]) -> dict[str, tuple[int, str]]:
    """exercise id → (points, error) from a run; ``reasons``: exercises replaced by their stub, and why.

    The error is the first cause of lost points: the stub's reason, the student's cell's error, the check's
    failure (message and hint) or error, a run that stopped before the check."""
    scores = {}
    for ex in found.values():
        results = [r for index, (exercise, nonce) in closing.items() if exercise == ex.id
                   for r in _recorded(run.cells[index], nonce)]
        points = min(sum(r["points"] for r in results if r["points"] == r["max_points"]), ex.max_points)
        causes = [reasons[ex.id]] if ex.id in reasons else []
        for role in ("exercise", "check"):
            causes += [_error(cell, run) for cell in run.cells if cell.metadata["grading"]["exercise"] == ex.id
                       and cell.metadata["grading"]["role"] == role and _error(cell, run)]
        causes += [f"{r['name']} — {r['message']}" for r in results if r["points"] < r["max_points"]]
        if not results and run.stopped_at is not None:
            causes.append(f"not checked: the run stopped at cell {run.stopped_at} ({run.stop_reason})")
        scores[ex.id] = points, "" if points == ex.max_points else (causes + ["the check recorded no result"])[0]
    return scores


def student_sources(path: Path, master, found: dict[str, Exercise]) -> tuple[dict[str, str], dict[str, str]]:
    """(exercise id → the student's cell source, exercise id → why it has none) for one submitted notebook."""
    try:
        submitted = read_notebook(path, "submission")
    except BadInput as exc:
        return {}, {ex: str(exc) for ex in found}
    by_tag, by_id = {}, {cell.get("id"): cell for cell in submitted.cells if cell.cell_type == "code"}
    for cell in submitted.cells:
        if cell.cell_type == "code" and tagged(cell, "exercise") is not None:
            by_tag.setdefault(tagged(cell, "exercise"), cell)
    sources, missing = {}, {}
    for ex in found.values():
        cell = by_tag.get(ex.id) or by_id.get(master.cells[ex.cell].get("id"))
        if cell is None:
            missing[ex.id] = f"no cell tagged exercise:{ex.id} in the submission"
        else:
            sources[ex.id] = cell.source
    return sources, missing


def grade_notebook(master_path: Path, master, found: dict[str, Exercise], submission: Path,
                   timeout: float) -> dict[str, tuple[int, str]]:
    """exercise id → (points, error) for one submitted notebook (see the module docstring)."""
    if not submission.is_file():
        return {ex: (0, f"not submitted (no {submission.name})") for ex in found}
    sources, reasons = student_sources(submission, master, found)
    if len(reasons) == len(found) and not sources:
        return {ex: (0, reasons[ex]) for ex in found}
    while True:
        run_sources = {ex.id: stub_source(master.cells[ex.cell].source, ex.id, ex.task) if ex.id in reasons
                       else sources[ex.id] for ex in found.values()}
        cells, closing = build_run(master, found, run_sources, timeout)
        run = execute(cells, master_path.parent.resolve())
        culprit = None if run.stopped_at is None else cells[run.stopped_at].metadata["grading"]["exercise"]
        if culprit is None or culprit in reasons:
            return score(run, found, closing, reasons)
        reasons[culprit] = f"{run.stop_reason}: scored 0, and the notebook was run again with this exercise's stub"


def memory_jobs(jobs: int) -> int:
    """``jobs``, lowered so that that many notebook runs fit in the memory available now (``RUN_MEMORY`` each)."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, min(jobs, available // RUN_MEMORY))


def run_tasks(tasks: list[tuple], jobs: int, progress: bool) -> list[dict]:
    """``grade_notebook(*task)`` for every task, in order: here, or in ``jobs`` worker processes (each starts its
    own kernels, so students run side by side)."""
    bar = tqdm(total=len(tasks), desc="grading", unit="notebook", disable=not progress)
    if jobs == 1:
        results = []
        for task in tasks:
            results.append(grade_notebook(*task))
            bar.update()
        return results
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(grade_notebook, *task) for task in tasks]
        for future in as_completed(futures):
            bar.update()
        return [future.result() for future in futures]


@dataclass(frozen=True)
class GradingSettings:
    """How a class is graded: ``timeout`` seconds per exercise and check cell, ``jobs`` notebooks at once (lowered
    to what the free memory holds, ``memory_jobs``), a progress bar or not."""

    timeout: float = EXERCISE_TIMEOUT
    jobs: int = 1
    progress: bool = True


def grade(submissions: str | Path, masters: list[Path], out: str | Path, feedback: str | Path | None = None,
          settings: GradingSettings = GradingSettings()) -> pd.DataFrame:
    """Grade every student folder in ``submissions`` against ``masters``; write ``out`` (CSV) and one feedback
    file per student in ``feedback`` (default: ``feedback/`` next to ``out``). Returns the grades table.

    Every input is checked before anything runs or is written."""
    submissions, out = Path(submissions), Path(out)
    timeout = check_number("timeout", settings.timeout, 0, interval="(]")
    jobs = check_count("jobs", settings.jobs, minimum=1)
    if not submissions.is_dir():
        raise BadInput(f"submissions folder {submissions} does not exist or is not a folder")
    students = sorted(p for p in submissions.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not students:
        raise BadInput(f"no student folders in {submissions}: expected {submissions}/<student>/01-Setup.ipynb …")
    if out.is_dir() or not out.parent.is_dir():
        raise BadInput(f"--out {out} must be a file in an existing folder")
    feedback = feedback_folder(out, feedback)
    if feedback.exists() and not feedback.is_dir():
        raise BadInput(f"feedback folder {feedback} exists and is not a folder")
    loaded = {path: read_notebook(path, "master notebook") for path in masters}
    found = {path: exercises(nb, path.name) for path, nb in loaded.items()}
    pairs = [(student, path) for student in students for path in loaded]
    scored = run_tasks([(path, loaded[path], found[path], student / path.name, timeout) for student, path in pairs],
                       memory_jobs(jobs), settings.progress)
    rows = []
    for (student, path), scores in zip(pairs, scored):
        rows += [(student.name, path.stem, ex, points, found[path][ex].max_points, error, AUTO)
                 for ex, (points, error) in scores.items()]
        rows += manual_rows(student.name, path, loaded[path], student / path.name)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.to_csv(out, index=False)
    write_reviews(out.parent / "review", {student.name: student for student in students}, loaded)
    feedback.mkdir(parents=True, exist_ok=True)
    for student, rows in table.groupby("student", sort=True):
        (feedback / f"{student}.md").write_text(feedback_text(student, rows))
    return table
