"""What a check says: ``CheckResult`` when an answer is right, ``CheckFailed`` when it is not, and the guard that
an implement exercise is the student's own code.

A failed check is read by a student in a notebook, so it shows as one short block, not as a traceback through this
package: IPython asks an exception for ``_render_traceback_()`` before it formats a traceback, and ``CheckFailed``
answers with four lines (what was checked and the points, what was expected in words, what was got, the hint). The
cell still ends in an error, so Run All stops there as it does for any error. Its ``str`` (the ``evalue`` of the
cell's error output, which ``grading`` reads) stays ``name — got\\nHint: hint``.
"""
from __future__ import annotations

import numbers
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..core.validation import check_count

LAB_ROOT = str(Path(__file__).resolve().parent.parent)  # labutils/: its code is what an exercise must not call
RED, BOLD, RESET = "\x1b[31m", "\x1b[1m", "\x1b[0m"


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: ``points`` of ``max_points`` (all or nothing) and what was compared."""

    name: str
    points: int
    max_points: int
    message: str

    @property
    def passed(self) -> bool:
        return self.points == self.max_points

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict}: {self.name} — {self.message} ({self.points}/{self.max_points} points)"

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows a returned result as its one line
        printer.text(str(self))


class CheckFailed(AssertionError):
    """A wrong answer: ``result`` (0 points) says what was got, ``expected`` what was wanted, ``hint`` how to get
    it right."""

    def __init__(self, result: CheckResult, hint: str, expected: str = ""):
        super().__init__(f"{result.name} — {result.message}\nHint: {hint}")
        self.result, self.hint, self.expected = result, hint, expected

    def headline(self) -> str:
        if not self.result.max_points:  # a sanity check (sanity.py): no points at stake
            return f"✗ {self.result.name}: not well formed yet"
        return f"✗ {self.result.name}: not right yet ({self.result.points}/{self.result.max_points} points)"

    def _render_traceback_(self) -> list[str]:
        """The block IPython shows instead of a traceback (one string per line)."""
        lines = [f"{RED}{BOLD}{self.headline()}{RESET}"]
        if self.expected:
            lines.append(f"  expected: {self.expected}")
        return lines + [f"  got:      {self.result.message}", f"  hint:     {self.hint}"]


class UsedTheLab(Exception):
    """An implement exercise's function ran the lab's own code (``where``: the function it entered)."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def own_work(student_fn: Callable, also: tuple[str, ...] = ()) -> Callable:
    """``student_fn``, wrapped so that calling it raises ``UsedTheLab`` if it entered any function of ``labutils``
    (or of the packages whose folders are in ``also``): an implement exercise must be written, not delegated.

    Every Python call made while it runs is seen (``sys.setprofile``), however the lab's function was reached
    (``lu.wanda_score``, an import under another name, a helper of the student's that calls it)."""
    roots = (LAB_ROOT, *also)

    def wrapped(*args):
        entered: list[str] = []

        def profile(frame, event, arg):
            if event == "call" and not entered and frame.f_code.co_filename.startswith(roots):
                module = frame.f_globals.get("__name__", "?")
                entered.append(f"{module}.{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}")
        previous = sys.getprofile()
        sys.setprofile(profile)
        try:
            result = student_fn(*args)
        finally:
            sys.setprofile(previous)
        if entered:
            raise UsedTheLab(entered[0])
        return result
    return wrapped


def where_raised(exc: BaseException) -> str:
    """`` (line N of <function>)`` for the last frame of the student's code in ``exc``'s traceback, or ''."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(LAB_ROOT) and "site-packages" not in f.filename
              and not f.filename.startswith(sys.prefix)]
    return f" (line {frames[-1].lineno} of {frames[-1].name})" if frames else ""


def graded(name: str, points: int, hint: str, compare: Callable[[], tuple[bool, str]], expected: str = "") \
        -> CheckResult:
    """Run ``compare`` → (right?, what was got) and return the result, or raise CheckFailed with the hint."""
    check_count("points", points)
    try:
        ok, message = compare()
    except NotImplementedError:
        ok, message = False, "not written yet (the cell still raises NotImplementedError)"
    except UsedTheLab as used:
        ok, message = False, (f"your function calls the lab's own code ({used.where}); the exercise is to write it "
                              f"yourself with torch, and grading scores a call to the lab 0")
    except Exception as exc:  # an error in the student's code is a wrong answer, reported with its message
        ok, message = False, f"the code raised {type(exc).__name__}: {exc}{where_raised(exc)}"
    result = CheckResult(name, points if ok else 0, points, message)
    if not ok:
        raise CheckFailed(result, hint, expected)
    return result


def number(value) -> float | None:
    """``value`` as a float if it is one real number (a one-element tensor included), else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None
