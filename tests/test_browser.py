"""The four notebooks as a student sees them: JupyterLab in a real browser (Debian's Chromium, driven by Playwright).

For each notebook: it opens with no dirty mark on its tab once the kernel has started; every markdown table
renders with the columns its source header row declares; every image output is loaded and visible; no output
shows a "0%" progress bar. Then "Run All Cells" from the Run menu on 01-Setup finishes with no error output.

JupyterLab runs on 127.0.0.1 with a random token and temporary settings, workspaces, runtime and checkpoint
folders (autosave off), so nothing of a user's leaks in and nothing is written into the repository; the test
asserts the notebooks' bytes are unchanged. Nothing is downloaded: Chromium comes from Debian (`make setup`
installs it where it can), Playwright from PyPI drives it through `executable_path`.
"""
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["01-Setup.ipynb", "02-Prune.ipynb", "03-Inference.ipynb", "04-Benchmark.ipynb", "05-Recover.ipynb",
             "06-Calibrate.ipynb", "07-Quantize.ipynb", "08-Deploy.ipynb"]
RUN_ALL = "01-Setup.ipynb"
# Chromium's own background traffic goes nowhere on a closed network; keep it quiet and fast.
CHROMIUM_ARGS = ["--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"]
START_TIMEOUT_S = 90
RUN_ALL_TIMEOUT_S = 300
PROGRESS_AT_ZERO = re.compile(r"(?<![0-9.])0%\|")

# Test-only JupyterLab user settings: autosave off (Run All must never write a notebook back), every cell rendered
# (no windowing, so all tables and images are in the DOM), no news or update checks (no network).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
}


def _missing_tool(reason: str):
    """Fail where `make setup` installs the browser stack (CI; root with apt-get); elsewhere skip, saying why."""
    if os.environ.get("CI") or (os.geteuid() == 0 and shutil.which("apt-get")):
        pytest.fail(f"{reason}: `make setup` installs it here (as root with apt-get) — run it first")
    pytest.skip(f"{reason}: `sudo apt-get install chromium` and `make setup` enable this test")


def chromium_executable() -> str:
    for name in (os.environ.get("LAB_CHROMIUM", ""), "chromium", "chromium-browser"):
        path = name and shutil.which(name)
        if path:
            return path
    _missing_tool("no Chromium found (set LAB_CHROMIUM, or install Debian's `chromium` package)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook_hashes() -> dict[str, str]:
    return {nb: hashlib.sha256((ROOT / nb).read_bytes()).hexdigest() for nb in NOTEBOOKS}


def split_row(line: str) -> list[str]:
    """A GFM table row's cells: split on unescaped `|`, the optional outer pipes dropped."""
    cells = re.split(r"(?<!\\)\|", line.strip())
    if cells and cells[0].strip() == "":
        cells = cells[1:]
    if cells and cells[-1].strip() == "" and line.strip().endswith("|") and not line.strip().endswith("\\|"):
        cells = cells[:-1]
    return cells


DELIMITER = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def markdown_tables(source: str) -> list[dict]:
    """Each GFM table in a markdown source: its header cells and the cell count of every body row."""
    lines, tables, i = source.split("\n"), [], 0
    while i + 1 < len(lines):
        if "|" in lines[i] and DELIMITER.match(lines[i + 1]) and "-" in lines[i + 1]:
            header = [c.strip() for c in split_row(lines[i])]
            body, i = [], i + 2
            while i < len(lines) and lines[i].strip() and "|" in lines[i]:
                body.append(len(split_row(lines[i])))
                i += 1
            tables.append({"header": header, "body": body})
        else:
            i += 1
    return tables


def notebook_expectations(name: str) -> dict:
    nb = json.loads((ROOT / name).read_text())
    tables, images, code = [], 0, 0
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            tables += markdown_tables(source)
        elif cell["cell_type"] == "code":
            code += 1
            images += sum(1 for o in cell.get("outputs", []) if any(k.startswith("image/") for k in o.get("data", {})))
    return {"cells": len(nb["cells"]), "code": code, "tables": tables, "images": images}


@pytest.fixture(scope="module")
def unchanged_notebooks():
    """The repository's notebooks have the same bytes after the module as before it."""
    before = notebook_hashes()
    yield
    assert notebook_hashes() == before, "the browser test changed a notebook file (autosave or a save?)"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, unchanged_notebooks):
    """A JupyterLab server on 127.0.0.1 with a random token and throw-away state; shut down however the test ends."""
    if importlib.util.find_spec("jupyterlab") is None:
        _missing_tool("JupyterLab is not installed")
    tmp = tmp_path_factory.mktemp("lab")
    for rel, value in LAB_SETTINGS.items():
        (tmp / "settings" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "settings" / rel).write_text(json.dumps(value))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "ws"),
               JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               IPYTHONDIR=str(tmp / "ipython"))
    token, port = os.urandom(16).hex(), free_port()
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--IdentityProvider.token={token}",
           "--ServerApp.ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={ROOT}",
           f"--FileCheckpoints.root_dir={tmp / 'checkpoints'}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--ServerApp.terminals_enabled=False"] + (["--allow-root"] if os.geteuid() == 0 else [])
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log_tail = (tmp / "server.log").read_text()[-3000:]
                pytest.fail(f"JupyterLab did not start (exit {proc.poll()}):\n{log_tail}")
            time.sleep(0.3)
        yield base, token
    finally:
        # A clean shutdown stops the kernels too; the process group is killed if it does not come.
        try:
            req = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(req, timeout=5).close()
            proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium context (its HTTP cache shared by the pages) on the system binary."""
    executable = chromium_executable()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing_tool("Playwright is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b.new_context(viewport={"width": 1400, "height": 1000})
        finally:
            b.close()


def open_notebook(browser, lab, name: str):
    """A fresh page with `name` open, every cell rendered and its kernel started and idle."""
    base, token = lab
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{base}/lab/tree/{name}?reset&token={token}")  # reset: no tabs restored from an earlier page
    expected = notebook_expectations(name)
    page.wait_for_function(
        """([name, n]) => {
            const app = window.jupyterapp; if (!app) return false;
            const w = app.shell.currentWidget;
            if (!w || !w.context || w.context.path !== name || !w.context.isReady) return false;
            const s = w.sessionContext;
            return w.content.widgets.length === n && s.session && s.session.kernel && s.kernelDisplayStatus === 'idle'
                && w.node.querySelectorAll('.jp-Cell').length === n;
        }""", arg=[name, expected["cells"]])
    page.wait_for_timeout(500)  # a metadata update from the kernel (kernelspec, language_info) marks it dirty by now
    return page, expected


def close(page):
    """Shut the notebook's kernel down and drop the page: nothing is saved (autosave is off)."""
    try:
        page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
    finally:
        page.close()


def current(js: str) -> str:
    """A page function over the open notebook panel's node (`root`): queries never see other tabs."""
    return f"() => {{ const root = window.jupyterapp.shell.currentWidget.node; {js} }}"


def dirty_problems(page, name: str) -> list[str]:
    state = page.evaluate(
        """(name) => {
            const tab = [...document.querySelectorAll('.lm-DockPanel-tabBar .lm-TabBar-tab')]
                .find(t => t.textContent.trim() === name);
            return {tab: !!tab, dirty: !!tab && tab.classList.contains('jp-mod-dirty'),
                    model: window.jupyterapp.shell.currentWidget.context.model.dirty};
        }""", name)
    assert state["tab"], f"{name}: no tab for the notebook"
    if state["dirty"] or state["model"]:
        return [f"opens dirty (modified mark on its tab: {state['dirty']}, document model dirty: {state['model']})"]
    return []


def table_problems(page, expected: dict) -> list[str]:
    """Every markdown table, in order, has the columns its source header declares, in its header and each row."""
    rendered = page.evaluate(current(
        """return [...root.querySelectorAll('.jp-MarkdownCell .jp-RenderedMarkdown table')].map(t => ({
               header: [...t.querySelectorAll('thead th')].map(th => th.textContent.trim()),
               rows: [...t.querySelectorAll('tbody tr')].map(tr => tr.querySelectorAll('td').length)}));"""))
    problems = []
    if len(rendered) != len(expected["tables"]):
        problems.append(f"{len(expected['tables'])} markdown tables in the source, {len(rendered)} rendered")
    for k, (src, got) in enumerate(zip(expected["tables"], rendered)):
        want = len(src["header"])
        if len(got["header"]) != want:
            problems.append(f"table {k + 1}: its header row declares {want} columns {src['header']}, rendered "
                            f"{len(got['header'])} {got['header']}")
        # The renderer silently drops a row's extra cells (an unescaped `|`): only the source shows the loss.
        uneven = [(r + 1, n) for r, n in enumerate(src["body"]) if n != want]
        if uneven:
            problems.append(f"table {k + 1}: source rows (row, cells) {uneven} do not have {want} cells "
                            "(an unescaped `|`?); the renderer drops or pads cells")
        if got["rows"] != [want] * len(src["body"]):
            problems.append(f"table {k + 1}: rendered rows have {got['rows']} cells, the source "
                            f"{len(src['body'])} rows of {want}")
    return problems


def image_problems(page, expected: dict) -> list[str]:
    """Every image output is rendered, loaded (naturalWidth > 0) and visible once scrolled to."""
    images = page.evaluate(current(
        """return (async () => {
               const out = [];
               for (const img of root.querySelectorAll('.jp-OutputArea-output img, .jp-RenderedMarkdown img')) {
                   img.scrollIntoView();
                   if (!img.complete) await new Promise(r => { img.onload = img.onerror = r; });
                   const box = img.getBoundingClientRect();
                   out.push({output: !!img.closest('.jp-OutputArea-output'), natural: img.naturalWidth,
                             width: box.width, height: box.height, visible: img.checkVisibility(
                                 {checkOpacity: true, checkVisibilityCSS: true})});
               }
               return out;
           })();"""))
    problems = []
    n_outputs = sum(i["output"] for i in images)
    if n_outputs != expected["images"]:
        problems.append(f"{expected['images']} image outputs in the source, {n_outputs} rendered")
    hidden = [(k + 1, i) for k, i in enumerate(images)
              if not (i["natural"] > 0 and i["width"] > 0 and i["height"] > 0 and i["visible"])]
    if hidden:
        problems.append(f"images not visible (number in page order, state): {hidden}")
    return problems


def progress_problems(page) -> list[str]:
    texts = page.evaluate(current("return [...root.querySelectorAll('.jp-OutputArea-output')].map(o => o.innerText);"))
    zero = [t.strip()[:120] for t in texts if PROGRESS_AT_ZERO.search(t)]
    return [f"outputs showing a 0% progress bar: {zero}"] if zero else []


def run_all(page) -> None:
    """Run > Run All Cells on the open notebook, then wait until it has finished. Run All queues every code cell at
    once ("[*]"): wait to see that, then for the queue to drain. A cell that fails stops the run and clears the
    queue, so a failure ends the wait early too."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
    queued = "[...root.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].some(p => p.textContent.includes('*'))"
    page.wait_for_function(current(f"return {queued};"), timeout=10_000)
    status = "window.jupyterapp.shell.currentWidget.sessionContext.kernelDisplayStatus"
    page.wait_for_function(current(f"return {status} === 'idle' && !{queued};"),
                           timeout=RUN_ALL_TIMEOUT_S * 1000, polling=500)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_opens_clean(browser, lab, name):
    """As opened, before anything runs: not dirty, tables with their columns, images visible, no 0% bar."""
    page, expected = open_notebook(browser, lab, name)
    try:
        problems = (dirty_problems(page, name) + table_problems(page, expected) + image_problems(page, expected)
                    + progress_problems(page))
        assert not problems, f"{name}:\n  " + "\n  ".join(problems)
    finally:
        close(page)


def test_run_all_setup_notebook(browser, lab):
    """Run > Run All Cells on 01-Setup, as a student does first: every cell runs, none leaves an error output."""
    page, expected = open_notebook(browser, lab, RUN_ALL)
    try:
        run_all(page)
        result = page.evaluate(
            """() => window.jupyterapp.shell.currentWidget.content.widgets
                .filter(c => c.model.type === 'code')
                .map(c => ({count: c.model.executionCount, outputs: c.model.outputs.toJSON()}))""")
        errors = [(k + 1, o.get("ename"), o.get("evalue")) for k, c in enumerate(result) for o in c["outputs"]
                  if o["output_type"] == "error"]
        assert not errors, f"{RUN_ALL}: Run All left error outputs (code cell, exception, message): {errors}"
        logged = [(k + 1, o["text"][-300:]) for k, c in enumerate(result) for o in c["outputs"]
                  if o.get("name") == "stderr" and "Traceback (most recent call last)" in o["text"]]
        assert not logged, f"{RUN_ALL}: a traceback printed to stderr (code cell, text): {logged}"
        counts = [c["count"] for c in result]
        assert counts == list(range(1, len(counts) + 1)), f"Run All did not execute every cell in order: {counts}"
        assert not progress_problems(page), f"{RUN_ALL} after Run All: {progress_problems(page)}"
    finally:
        close(page)  # discarded unsaved: autosave is off, and the module checks the file's bytes


@pytest.mark.large  # Run All of 01 up to its first exercise, about a minute: make test-optional
def test_run_all_on_a_student_copy_stops_at_a_wrong_answer_with_a_short_block(browser, lab):
    """A student copy of 01 (python -m labutils student) opens clean; with a wrong my_perplexity, Run All stops at its
    check cell, which shows the short block (what was expected, what was got, the hint), no traceback through the
    package, and the cells after it do not run."""
    from labutils.lab import course
    folder = ROOT / "outputs" / "browser-student"
    (copy,) = course.write_student_copies([ROOT / RUN_ALL], folder)
    nb = json.loads(copy.read_text())
    for cell in nb["cells"]:
        if "exercise:01.1" in cell["metadata"].get("tags", []):
            cell["source"] = "def my_perplexity(model, window):\n    return -1.0"
    copy.write_text(json.dumps(nb, indent=1))
    name = str(copy.relative_to(ROOT))
    page, expected = open_notebook(browser, lab, name)
    try:
        assert not table_problems(page, expected) + image_problems(page, expected)
        run_all(page)
        cells = page.evaluate(current(
            "return [...root.querySelectorAll('.jp-CodeCell')].map(c => ({text: c.querySelector('.jp-OutputArea')"
            "?.innerText || '', prompt: c.querySelector('.jp-InputPrompt').textContent}));"))
        failed = [k for k, c in enumerate(cells) if "✗" in c["text"]]
        assert len(failed) == 1, [c["text"][:200] for c in cells]
        block = cells[failed[0]]["text"]
        assert "01.1 form: not well formed yet" in block and "expected:" in block and "hint:" in block, block
        assert "Traceback" not in block and "labutils" not in block and ".py" not in block, block
        assert all(c["prompt"].strip() in ("[ ]:", "[ ]") for c in cells[failed[0] + 1:]), "Run All did not stop"
    finally:
        close(page)
