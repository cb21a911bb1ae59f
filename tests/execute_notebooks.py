"""Execute notebooks in place from a fresh kernel, as they are committed (``make notebooks``).

The notebooks write their result tables to a scratch folder (``$LAB_RESULTS``); once every notebook has run, the
tables are copied into the committed ``results/``. So while the notebooks run, ``results/`` still holds the previous
reference run, which their ``lu.compare_with_reference`` lines compare with.

Progress bars are plain text: a bar rewrites its line with carriage returns, and JupyterLab shows only the last
state of each line. The saved outputs are collapsed the same way (consecutive stream outputs merged, each line cut
to what follows its last ``\\r``), so the file holds what a student sees: one finished bar per loop.
"""
import json
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient

SECONDS_FILE = Path("results/notebook-seconds.json")  # read by docs/running.md's "notebook-seconds" table
RUN_FOLDER = Path("outputs/notebook-results")  # this run's result tables, copied into results/ at the end


def cell_seconds(nb) -> list[float]:
    """Each code cell's run time, from the timestamps nbclient records in its metadata (0 for a cell without)."""
    seconds = []
    for cell in nb.cells:
        timing = cell.get("metadata", {}).get("execution", {})
        if cell.cell_type == "code" and "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            start, end = (datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            seconds.append((end - start).total_seconds())
        elif cell.cell_type == "code":
            seconds.append(0.0)
    return seconds


def record_seconds(path: str, nb) -> None:
    """Write this notebook's run time and slowest cell into ``SECONDS_FILE`` (other notebooks' rows kept)."""
    rows = json.loads(SECONDS_FILE.read_text())["rows"] if SECONDS_FILE.is_file() else []
    seconds = cell_seconds(nb)
    row = {"notebook": path, "seconds": round(sum(seconds), 1), "slowest cell": round(max(seconds, default=0), 1)}
    rows = sorted([r for r in rows if r["notebook"] != path] + [row], key=lambda r: r["notebook"])
    SECONDS_FILE.parent.mkdir(exist_ok=True)
    SECONDS_FILE.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


def collapse_streams(nb) -> None:
    """Merge consecutive stream outputs of one name and keep, of every line, the text after its last '\\r'."""
    for cell in nb.cells:
        merged = []
        for output in cell.get("outputs", []):
            if merged and output.output_type == "stream" and merged[-1].output_type == "stream" \
                    and merged[-1].name == output.name:
                merged[-1].text += output.text
            else:
                merged.append(output)
        for output in merged:
            if output.output_type == "stream":
                output.text = "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in output.text.split("\n"))
        if "outputs" in cell:
            cell.outputs = merged


if __name__ == "__main__":
    shutil.rmtree(RUN_FOLDER, ignore_errors=True)
    os.environ["LAB_RESULTS"] = str(RUN_FOLDER)  # the kernels inherit it
    for path in sys.argv[1:]:
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        nb.metadata.pop("widgets", None)  # no widget state in git: the lab's progress bars are plain text
        NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
        collapse_streams(nb)
        nbformat.write(nb, path)
        record_seconds(path, nb)
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s")
    for table in sorted(RUN_FOLDER.glob("*")):
        shutil.copy2(table, SECONDS_FILE.parent / table.name)
    print(f"copied {len(list(RUN_FOLDER.glob('*')))} result files into {SECONDS_FILE.parent}/")
