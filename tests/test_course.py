"""The gradable course: student copies of the real notebooks, every exercise's check on the reference solution and
on wrong answers, the nbgrader metadata and the answers cell (grading itself: tests/test_grading.py)."""
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
from labutils.deploy.loadtest import LoadTestResult
from labutils.lab import course

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
        kinds = {}
        for ex in found.values():
            before = [c.source for c in nb.cells[:ex.cell] if c.cell_type == "markdown"][-1]
            kind = next(k for k in KINDS if f"({k}, " in before)
            assert ex.max_points == KINDS[kind] and "*Hint:*" in before, (name, ex.id)
            kinds[ex.id] = kind
        ordered = [kinds[ex] for ex in sorted(kinds)]
        assert ordered[0] == "implement" and "predict" in ordered and "measure and explain" in ordered, name
        # A prediction may sit before the section that shows its result ("Predict first"); every other exercise
        # comes at the end, and after the first of those, code is exercises and checks only: every other cell of a
        # student copy runs as in the master
        first = min(ex.cell for ex in found.values() if kinds[ex.id] != "predict")
        assert all(course.tagged(c, "exercise") or course.tagged(c, "check")
                   for c in nb.cells[first:] if c.cell_type == "code"), name
        for ex in found.values():
            if ex.cell < first:
                assert kinds[ex.id] == "predict" and "Predict first" in nb.cells[ex.cell - 1].source, (name, ex.id)
                assert list(ex.checks) == [ex.cell + 1], (name, ex.id)  # its check right after it
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
    "08-Deploy.ipynb": lambda: dict(load=LoadTestResult(8, 4, 4, 0, 0, 2.0, [0.5, 0.6, 0.7, 0.8],
                                                        memory=[700e6, 705e6, 703e6])),
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
