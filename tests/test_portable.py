"""The instructor's notebooks graded under two CPU kernel sets: full marks both times (``make test-portable``).

Grading re-runs each master notebook from a fresh kernel with the master's own solutions as the submission, so
every check compares a correct answer computed with this kernel set against the package's. The kernels inherit
the environment, so ``ATEN_CPU_CAPABILITY`` switches torch's float kernels for the whole run. About 10 minutes per
kernel set on 2 cores; marked ``portable`` (and ``slow``), so neither ``make test`` nor ``make test-unit`` runs it.
"""
import shutil
from pathlib import Path

import pytest
import torch

from labutils.lab import course, grading

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("05-Recover.ipynb", "06-Calibrate.ipynb", "07-Quantize.ipynb", "08-Deploy.ipynb")
MASTERS = [ROOT / name for name in course.NOTEBOOKS if name not in OPTIONAL]
OTHER = "avx2" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "default"


@pytest.mark.slow
@pytest.mark.portable
@pytest.mark.parametrize("capability", [None, OTHER], ids=["native", OTHER])
def test_the_masters_get_full_marks_under_two_kernel_sets(tmp_path, monkeypatch, capability):
    if capability is None:
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    else:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    instructor = tmp_path / "submissions" / "instructor"
    instructor.mkdir(parents=True)
    for master in MASTERS:
        shutil.copy(master, instructor / master.name)
    table = grading.grade(tmp_path / "submissions", MASTERS, tmp_path / "grades.csv",
                          settings=grading.GradingSettings(progress=False))
    short = table[table["points"] < table["max"]]
    assert short.empty, short.to_dict("records")
    assert len(table) == sum(len(course.exercises(course.read_notebook(m), m.name)) for m in MASTERS)
