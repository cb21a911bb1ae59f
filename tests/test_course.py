"""The gradable course: student copies of the real notebooks, every exercise's check on the reference solution and
on wrong answers, and grading of small synthetic submissions (one kernel per submitted notebook, seconds each)."""
import ast
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from conftest import make_tiny, random_tokens

import labutils as lu
from labutils.cli import main
from labutils.lab import course, grading

ROOT = Path(lu.__file__).parent.parent
if not (ROOT / course.NOTEBOOKS[0]).is_file():
    pytest.skip("the notebooks are not next to the package (an installed copy)", allow_module_level=True)
MASTERS = course.master_paths(ROOT)
KINDS = {"implement": 3, "predict": 1, "measure and explain": 2}  # the points of each kind of exercise


def masters():
    return {path.name: course.read_notebook(path) for path in MASTERS}


def test_student_copies_are_deterministic_and_hold_no_solution(tmp_path):
    first = course.write_student_copies(MASTERS, tmp_path / "a")
    second = course.write_student_copies(MASTERS, tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    for path, (name, master) in zip(first, masters().items()):
        copy = nbformat.read(str(path), as_version=4)
        nbformat.validate(copy)
        found = course.exercises(master, name)
        text = path.read_text()
        assert course.BEGIN not in text and course.END not in text and "Answer key" not in text
        assert text.count(course.ANSWER_STUB) == 1 and "*Rubric*" not in text
        assert not any(course.is_instructor(c) for c in copy.cells)
        assert [c.id for c in copy.cells] == [c.id for c in master.cells if not course.is_instructor(c)]
        assert all(c.outputs == [] and c.execution_count is None for c in copy.cells if c.cell_type == "code")
        by_id = {c.id: c for c in copy.cells}
        for ex in found.values():
            stub = by_id[master.cells[ex.cell].id].source
            assert f"raise NotImplementedError('Exercise {ex.id}: " in stub or \
                f'raise NotImplementedError("Exercise {ex.id}: ' in stub
            lines = master.cells[ex.cell].source.split("\n")
            solution = lines[lines.index(next(x for x in lines if x.strip() == course.BEGIN)) + 1:]
            assert not [x for x in solution[:-1] if x.strip() and x.strip() != course.END and x in stub.split("\n")]
            for index in ex.checks:  # check cells kept with their tag: the visible sanity line, no hidden tests
                kept = by_id[master.cells[index].id]
                assert kept.source == f'lu.sanity("{ex.id}", ' + kept.source.split(", ", 1)[1], kept.source
                assert course.HIDDEN_BEGIN in master.cells[index].source and "check_" not in kept.source
                assert course.tagged(kept, "check") == ex.id
        assert course.HIDDEN_BEGIN not in text and "HIDDEN" not in text


def test_no_answer_reaches_a_student_copy(tmp_path):
    """Every check call of a master sits in a hidden-test region; a copy holds no prediction's answer in any form (the
    letter, a digest of it), no reference expression of a measurement, and nothing that names a check."""
    for path, (name, master) in zip(course.write_student_copies(MASTERS, tmp_path), masters().items()):
        text = path.read_text()
        for ex in course.exercises(master, name).values():
            for index in ex.checks:
                source = master.cells[index].source
                visible = course.without_hidden_tests(source, name)
                assert not any(course.is_check_call(n) for n in ast.walk(ast.parse(visible))), (name, ex.id)
                if "check_prediction" in source:
                    answer = source.split(course.HIDDEN_BEGIN)[1].split('"')[3]  # check_prediction("id", VAR, "x"
                    assert len(answer) == 1 and f'= "{answer}"' not in text, (name, ex.id)
                    assert lu.lab.checks.answer_digest(source.split('"')[3], answer) not in text
        assert "lu.model_sparsity(wanda_model)" not in text and "lu.mean_kl(logits" not in text


def test_every_notebook_has_graduated_exercises_with_hints_and_an_answer_key():
    for name, nb in masters().items():
        found = course.exercises(nb, name)
        assert len(found) >= 3, name
        kinds = []
        for ex in found.values():
            before = [c.source for c in nb.cells[:ex.cell] if c.cell_type == "markdown"][-1]
            kind = next(k for k in KINDS if f"({k}, " in before)
            assert ex.max_points == KINDS[kind] and "*Hint:*" in before, (name, ex.id)
            kinds.append(kind)
        assert kinds[0] == "implement" and "predict" in kinds and "measure and explain" in kinds, name
        first = min(ex.cell for ex in found.values())  # after it, code is exercises and checks only: every other
        assert all(course.tagged(c, "exercise") or course.tagged(c, "check")  # cell of a student copy runs as in
                   for c in nb.cells[first:] if c.cell_type == "code"), name  # the master
        questions = [c.source for c in nb.cells if c.cell_type == "markdown" and "(explain)." in c.source]
        (answers,) = [c for c in nb.cells if course.is_answers(c)]  # the key and rubric, in a solution region
        key = answers.source.split(course.BEGIN)[1]
        assert "*Rubric*" in key and not any(course.is_instructor(c) for c in nb.cells), name
        for number in course.explain_questions(nb):
            assert f"**{number}.**" in key and f"**{number}.**" in answers.source.split(course.BEGIN)[0], (name, number)
        assert len(course.explain_questions(nb)) >= 2 and questions, name


# Small stand-ins for what each notebook has in memory when its exercises run: tiny random Llama models.
def _tiny_pruned():
    model = make_tiny(seed=3)
    lu.prune_model(model, lu.PruneSpec("wanda", 0.5), random_tokens((4, 16), seed=2), progress=False)
    return model


def _tiny_quantized_folder():
    """A folder holding what 07's section 3 saves for Wanda 50 % + q4_0, from a tiny model."""
    out = Path(tempfile.mkdtemp())
    model = _tiny_pruned()
    lu.quantize_model(model, "q4_0")
    lu.save_pruned(model, out / "wanda-50-q4_0", None, {"dtype": "float32"})
    return types.SimpleNamespace(out=str(out))


STATE = {
    "01-Setup.ipynb": lambda: dict(model=make_tiny(), test=random_tokens((2048,)), device=torch.device("cpu"),
                                   profile=types.SimpleNamespace(batch_size=4, eval_seqlen=128), trained_ppl=1.0),
    "02-Prune.ipynb": lambda: dict(wanda_model=_tiny_pruned()),
    "03-Inference.ipynb": lambda: dict(dense=make_tiny(), pruned={"wanda 50%": _tiny_pruned()}, DRIFT_SEQLEN=64,
                                       heldout=random_tokens((256,)), device=torch.device("cpu")),
    "04-Benchmark.ipynb": lambda: dict(dense=make_tiny(), calib=random_tokens((4, 32)), pd=pd,
                                       profile=types.SimpleNamespace(batch_size=2)),
    "05-Recover.ipynb": lambda: dict(dense=make_tiny(), calib=random_tokens((4, 32)), pd=pd,
                                     profile=types.SimpleNamespace(batch_size=2)),
    "06-Calibrate.ipynb": lambda: dict(pd=pd, nsamples_table=pd.DataFrame(
        {"nsamples": [1, 1, 1, 16, 16, 16, 128, 128, 128], "seed": [0, 1, 2] * 3,
         "perplexity (wiki)": [40.0, 35.5, 37.0, 31.0, 32.5, 31.5, 30.2, 30.6, 30.4]})),
    "07-Quantize.ipynb": lambda: dict(settings=_tiny_quantized_folder()),
}


def _wrong(value):
    """A wrong answer of the same type: another letter, or a number (or dict of numbers) 1 % off."""
    if isinstance(value, str):
        return "d" if value != "d" else "a"
    if isinstance(value, dict):
        return {key: v * 1.01 for key, v in value.items()}
    return value * 1.01


def _run_check(source: str, space: dict):
    """Run a check cell in ``space`` and return the value of its last statement, as a notebook shows it."""
    tree = ast.parse(source)
    last = tree.body.pop()
    exec(compile(tree, "check", "exec"), space)
    return eval(compile(ast.Expression(last.value), "check", "eval"), space)


def _region_names(source: str) -> set[str]:
    """The names assigned in a cell's solution region (for an answer or a measurement at top level)."""
    lines = source.split("\n")
    begin, end = course.solution_regions(source, "cell")[0]
    tree = ast.parse("\n".join(line.strip() if i == 0 else line for i, line in enumerate(lines[begin + 1:end])))
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


@pytest.mark.parametrize("name", course.NOTEBOOKS)
def test_every_check_passes_on_the_reference_and_fails_with_a_hint_otherwise(name):
    """The master's exercise and check cells, run in order on tiny stand-ins for the notebook's models and data: every
    check gives full points. Then the student copy's stubs: an implement stub makes its check fail with a hint; a
    predict or measure stub raises at once, and a wrong value in its place makes the check fail with a hint."""
    nb = masters()[name]
    found = course.exercises(nb, name)
    space = {"lu": lu, "torch": torch, **STATE[name]()}
    for ex in found.values():
        exec(nb.cells[ex.cell].source, space)
        for index in ex.checks:
            result = _run_check(nb.cells[index].source, space)
            assert isinstance(result, lu.CheckResult) and result.passed, (ex.id, result)
            assert result.points == result.max_points == ex.max_points, ex.id
    for ex in found.values():
        source = nb.cells[ex.cell].source
        try:
            exec(course.stub_source(source, ex.id, ex.task), space)
        except NotImplementedError as exc:
            assert str(exc).startswith(f"Exercise {ex.id}: {ex.task}")
            checked = {node.id for i in ex.checks for node in ast.walk(ast.parse(nb.cells[i].source))
                       if isinstance(node, ast.Name)}
            for key in _region_names(source) & checked & set(space):
                space[key] = _wrong(space[key])
        for index in ex.checks:
            with pytest.raises(lu.CheckFailed, match="Hint: ") as failure:
                _run_check(nb.cells[index].source, space)
            assert failure.value.result.points == 0, ex.id


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
    table = grading.grade(subs, [master], tmp_path / "grades.csv", timeout=2, progress=False)
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
    one = grading.grade(subs, [master], tmp_path / "one.csv", timeout=10, progress=False)
    two = grading.grade(subs, [master], tmp_path / "two.csv", timeout=10, progress=False, jobs=2)
    assert one.equals(two) and list(two["points"]) == [2, 0, 0, 2, 3, 1, 0, 0, 0]
    with pytest.raises(lu.BadInput, match="jobs must be an integer ≥ 1"):
        grading.grade(subs, [master], tmp_path / "x.csv", jobs=0)


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
    for optional, message in ((["05"], "05-Recover.ipynb not found"), (["08"], "--optional 08: the optional")):
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


@pytest.mark.slow  # this file again in a subprocess under another kernel set
def test_every_check_still_passes_and_fails_as_it_should_under_another_kernel_set():
    """The test above, in a process whose torch runs its portable C++ kernels instead of this CPU's vector ones
    (``ATEN_CPU_CAPABILITY=default``): a correct answer computed with them gets full points, a wrong one none (docs/testing.md
    "Portability"; ``make test-portable`` grades the real notebooks under AVX2 kernels)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::"
                           "test_every_check_passes_on_the_reference_and_fails_with_a_hint_otherwise"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"{len(course.NOTEBOOKS)} passed" in done.stdout


def test_masters_carry_the_nbgrader_metadata_their_tags_give():
    """nbgrader reads metadata.nbgrader: every cell has it as nbgrader_cells derives it (python -m labutils student
    --stamp writes it), grade ids are unique, and the points are the checks' points plus one per explain question."""
    from labutils.lab import nbgrader_cells
    for name, nb in masters().items():
        assert nbgrader_cells.stale(nb, name) == [], name
        meta = [c.metadata["nbgrader"] for c in nb.cells]
        assert len({m["grade_id"] for m in meta}) == len(meta), name
        found = course.exercises(nb, name)
        auto = sum(m.get("points", 0) for m in meta if m["grade"] and not m["solution"])
        manual = [m["points"] for m in meta if m["grade"] and m["solution"]]
        assert auto == sum(ex.max_points for ex in found.values()) and manual == [len(course.explain_questions(nb))]
        assert all(m["locked"] for c, m in zip(nb.cells, meta) if not course.tagged(c, "exercise")
                   and not course.is_answers(c)), name


def test_the_answers_cell_is_collected_for_review(tmp_path):
    """A student's explanations (the answers cell) get a manual row and a place in review/<notebook>.md beside the key
    and rubric; a copy left as handed out counts as no answer."""
    from labutils.lab import review
    path = MASTERS[1]
    master = course.read_notebook(path)
    for student, text in {"alice": "**4.** The embeddings stay dense.", "bob": None}.items():
        copy = course.student_copy(master, path.name)
        if text:
            cell = review.answers_cell(copy)
            cell.source = cell.source.replace(course.ANSWER_STUB, text)
        (tmp_path / student).mkdir()
        nbformat.write(copy, str(tmp_path / student / path.name))
    rows = {s: review.manual_rows(s, path, master, tmp_path / s / path.name)[0] for s in ("alice", "bob", "carol")}
    assert rows["alice"] == ("alice", "02-Prune", "02.answers", 0, 3, "", review.TO_GRADE)
    assert rows["bob"][-1] == rows["carol"][-1] == review.NO_ANSWER
    review.write_reviews(tmp_path / "review", {s: tmp_path / s for s in ("alice", "bob")}, {path: master})
    text = (tmp_path / "review" / "02-Prune.md").read_text()
    assert "*Rubric*" in text and "## alice\n\n**4.** The embeddings stay dense." in text
    assert "## bob\n\n*(no answer)*" in text
