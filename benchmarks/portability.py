"""How far the notebooks' figures move between CPU kernel variants: the spread the reference tolerances come from.

    python benchmarks/portability.py REFERENCE NAME=FOLDER [NAME=FOLDER ...] [--write results/portability.json]

REFERENCE and each FOLDER hold the results files of one run of the notebooks (``lu.write_results``; ``make
test-portable`` writes one per variant under outputs/portable/). For every figure the notebooks compare with the
reference run (``labutils.lab.reference.TOLERANCES``) it prints the largest difference any variant shows — relative
for a relative tolerance, absolute for an absolute one —, the row it was seen on, the tolerance and the tolerance
as a multiple of that spread. ``--write`` saves the table, and beside it ``…-machines.json``: which CPU, kernel set and settings each run
recorded, for docs/testing.md ("Portability", ``python -m labutils readme``). Exits 1 when some figure of some variant lies outside its tolerance.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from labutils.core.device import KERNEL_SETTINGS
from labutils.lab.reference import TOLERANCES

PROFILE = "smollm2-135m"


def load(folder: Path, name: str, index: list[str] | None = None) -> tuple[dict[str, dict], dict, list[str]] | None:
    """The rows of results file ``name`` in ``folder``, keyed by their index columns (the file's own, else
    ``index``: a file written before results recorded them), the machine it records, and the index columns."""
    path = folder / f"{PROFILE}-{name}.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    rows = payload["rows"]
    index = payload.get("index") or index or [next(iter(rows[0]))]
    return {" / ".join(str(r[i]) for i in index): r for r in rows}, payload.get("machine", {}), index


def machine_row(run: str, folder: Path) -> dict:
    """Where a run's results came from, as its results files record it (``kernel_summary``)."""
    machines = [m for m in (load(folder, name) for name in TOLERANCES) if m is not None and m[1]]
    machine = machines[0][1] if machines else {}
    settings = ", ".join(f"{k}={machine[k]}" for k in KERNEL_SETTINGS if k in machine)
    return {"run": run, "cpu": machine.get("cpu", "not recorded"), "kernels": machine.get("cpu capability", ""),
            "torch threads": machine.get("torch threads"), "settings": settings or "none", "torch": machine.get("torch")}


def difference(got, want, tolerance) -> float:
    """|got − want|, relative to want for a relative tolerance; for text 0 when equal, else infinite."""
    if isinstance(got, str) or isinstance(want, str):
        return 0.0 if got == want else math.inf
    got, want = (math.nan if v is None else float(v) for v in (got, want))
    if math.isnan(got) or math.isnan(want):
        return 0.0 if math.isnan(got) and math.isnan(want) else math.inf
    return abs(got - want) if tolerance.absolute or not want else abs(got - want) / abs(want)


def spread_rows(reference: Path, variants: dict[str, Path]) -> tuple[list[dict], bool]:
    """One row per compared figure (a column, or the rows of a column with their own tolerance): how many figures
    the variants gave, the largest spread from the reference and where, the tolerance and how many spreads it is."""
    rows, ok = [], True
    for name, figures in TOLERANCES.items():
        base = load(reference, name)
        if base is None:
            continue
        for column in figures.columns:
            groups: dict[str, dict] = {}  # "" (the column's tolerance) or a row's first word → its spread
            for variant, folder in variants.items():
                other = load(folder, name, base[2])
                for key, row in (other[0] if other else {}).items():
                    if key not in base[0] or column not in row or not figures.compared(column, key):
                        continue
                    special = key.split(" ")[0] if (column, key.split(" ")[0]) in figures.rows else ""
                    tolerance = figures.tolerance(column, key)
                    got, want = row[column], base[0][key][column]
                    ok &= tolerance.allows(got, want)
                    group = groups.setdefault(special, {"n": 0, "worst": 0.0, "at": "", "tolerance": tolerance})
                    group["n"] += 1
                    diff = difference(got, want, tolerance)
                    if diff > group["worst"] or not group["at"]:
                        group["worst"], group["at"] = diff, f"{key} ({variant})"
            for special, group in sorted(groups.items()):
                tolerance = group["tolerance"]
                allowed = tolerance.absolute or tolerance.relative
                rows.append({"results": name, "column": column + (f" ({special} rows)" if special else ""),
                             "figures compared": group["n"], "largest spread": group["worst"],
                             "seen at": group["at"], "tolerance": tolerance.text,
                             "tolerance ÷ spread": allowed / group["worst"] if group["worst"] and allowed else None})
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("variants", nargs="+", help="NAME=FOLDER")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)
    variants = {}
    for item in args.variants:
        name, _, folder = item.partition("=")
        if not folder or not Path(folder).is_dir():
            parser.error(f"expected NAME=FOLDER with an existing folder; got {item!r}")
        variants[name] = Path(folder)
    rows, ok = spread_rows(args.reference, variants)
    width = max(len(r["results"] + r["column"]) for r in rows) + 3
    for r in rows:
        ratio = "-" if r["tolerance ÷ spread"] is None else f"{r['tolerance ÷ spread']:.1f}×"
        print(f"{r['results'] + ': ' + r['column']:<{width}} n={r['figures compared']:<4} spread "
              f"{r['largest spread']:<10.3g} tolerance {r['tolerance']:<8} {ratio:>7}  at {r['seen at']}")
    if args.write:
        args.write.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        runs = [machine_row("reference run (results/)", args.reference)]
        runs += [machine_row(f"variant {name}", folder) for name, folder in variants.items()]
        args.write.with_name(f"{args.write.stem}-machines.json").write_text(json.dumps({"rows": runs}, indent=2) + "\n")
    print("every figure within its tolerance" if ok else "SOME FIGURES OUTSIDE THEIR TOLERANCE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
