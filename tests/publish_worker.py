"""A run that publishes version ARGV[2] of a small lab folder at ARGV[1], pausing at the point of publishing named by
ARGV[3] so that tests/test_storage.py can send a signal at exactly that moment; ARGV[4] == "fallback" takes the
two-rename path instead of the atomic exchange.

The pauses are injected here, by wrapping the functions publishing calls, so that ``labutils.core.publish`` holds
no test hook. It imports ``labutils.core.publish`` alone (no torch: the package's ``__init__`` is bypassed), so each
signal test costs a fraction of a second.

Pause points: "writing" (inside the block, before the manifest), "exchanged" (the new folder is in place, the old
one not yet removed), "published" (all done, signals still held), "between-renames" (fallback only: the old folder
renamed aside, the new one not yet in place). At a pause the worker says ``lab-pause POINT`` on stderr and waits up
to 30 s, less if a held signal arrives.
"""
import json
import os
import signal
import sys
import time
import types
from pathlib import Path

package = types.ModuleType("labutils")
package.__path__ = [str(Path(__file__).resolve().parents[1] / "labutils")]
sys.modules["labutils"] = package

from labutils.core import publish  # noqa: E402

folder, version, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
fallback = sys.argv[4:] == ["fallback"]


class HeldSignals(publish._HeldSignals):
    """Publishing's held-signals block, remembered while active so that a pause can end once a signal arrived,
    and pausing at "published" just before it ends."""

    active = None

    def __enter__(self):
        HeldSignals.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        pause("published")
        HeldSignals.active = None
        return super().__exit__(*exc)


def pause(name: str) -> None:
    if name != point:
        return
    print(f"lab-pause {name}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (HeldSignals.active and HeldSignals.active.received):
        time.sleep(0.02)


def swap_in(tmp: Path, path: Path, original=publish._swap_in):
    aside = original(tmp, path)
    pause("exchanged")
    return aside


def rename(src, dst, original=os.rename):
    original(src, dst)
    if ".old-" in Path(dst).name:  # the two-rename fallback moved the old folder aside
        pause("between-renames")


publish._HeldSignals = HeldSignals
publish._swap_in = swap_in
os.rename = rename
if fallback:
    publish._exchange = lambda a, b: False  # as on a system without renameat2(RENAME_EXCHANGE)

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started in background
publish.interrupt_on_termination()  # what the CLI does
try:
    with publish.atomic_folder(folder, "pruned-model") as tmp:
        (tmp / "model.safetensors").write_bytes(version.encode() * 300_000)
        (tmp / "report.json").write_text(json.dumps({"lab": "wanda-lab", "version": version}))
        pause("writing")
except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: as the CLI's main() exits
    sys.exit(128 + getattr(exc, "signum", 2))
print("saved", flush=True)
