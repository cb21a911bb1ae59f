"""Execute notebooks in place from a fresh kernel, as they are committed (``make notebooks``).

Progress bars are plain text: a bar rewrites its line with carriage returns, and JupyterLab shows only the last
state of each line. The saved outputs are collapsed the same way (consecutive stream outputs merged, each line cut
to what follows its last ``\\r``), so the file holds what a student sees: one finished bar per loop.
"""
import sys
import time

import nbformat
from nbclient import NotebookClient


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
    for path in sys.argv[1:]:
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        nb.metadata.pop("widgets", None)  # no widget state in git: the lab's progress bars are plain text
        NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
        collapse_streams(nb)
        nbformat.write(nb, path)
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s")
