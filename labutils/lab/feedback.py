"""What each student reads after grading: ``<student>.md`` in the feedback folder (``python -m labutils grade``),
the total, each notebook's points, and why each exercise lost points with its hint."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .review import AUTO


def feedback_folder(out: str | Path, feedback: str | Path | None) -> Path:
    """Where the feedback files go: ``feedback``, or ``feedback/`` next to the grades file ``out``."""
    return Path(out).parent / "feedback" if feedback is None else Path(feedback)


def feedback_text(student: str, rows: pd.DataFrame) -> str:
    """A student's feedback in markdown: the total, each notebook's points, and why each exercise lost points; the
    explanations graded by hand are listed with their points still to come."""
    auto, manual = rows[rows["grading"] == AUTO], rows[rows["grading"] != AUTO]
    lines = [f"# Feedback for {student}", "", f"Total: {auto['points'].sum()} / {auto['max'].sum()} points."
             + (f" Your explanations ({manual['max'].sum()} points) are graded by hand." if len(manual) else ""), ""]
    for notebook, part in auto.groupby("notebook", sort=False):
        lines += [f"## {notebook}: {part['points'].sum()} / {part['max'].sum()}", ""]
        if part["error"].str.startswith("not submitted").all():
            lines += [f"N{part['error'].iloc[0][1:]}.", ""]
            continue
        for row in part.itertuples():
            verdict = "full marks" if row.points == row.max else row.error
            lines.append(f"- **{row.exercise}** {row.points} / {row.max}: {verdict}")
        for row in manual[manual["notebook"] == notebook].itertuples():
            lines.append(f"- **{row.exercise}** (your explanations, {row.max} points): "
                         f"{'to be graded by hand' if row.grading == 'manual: to grade' else 'no answer given'}")
        lines.append("")
    return "\n".join(lines)
