"""Execute notebooks in place from a fresh kernel, as they are committed (``make notebooks``)."""
import sys
import time

import nbformat
from nbclient import NotebookClient

for path in sys.argv[1:]:
    start = time.perf_counter()
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)  # no widget state in git: the lab's progress bars are plain text
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
    nbformat.write(nb, path)
    print(f"{path}: executed in {time.perf_counter() - start:.0f} s")
