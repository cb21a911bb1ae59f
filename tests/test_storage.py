"""Publishing folders: nothing lost whatever signal arrives when, no leftovers, one run per folder, a manifest."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_tiny

import labutils as lu
from labutils.cli import main
from labutils.core import locks, manifests, publish
from labutils.core.saved import check_output_dir

WORKER = Path(__file__).resolve().parent / "publish_worker.py"  # publishes, pausing where a test asks


def publish_version(folder: Path, version: str) -> None:
    with publish.atomic_folder(folder, "pruned-model") as tmp:
        (tmp / "model.safetensors").write_bytes(version.encode() * 300_000)
        (tmp / "report.json").write_text(json.dumps({"lab": "wanda-lab", "version": version}))


def version_at(folder: Path) -> str:
    assert manifests.verify_folder(folder, full=True) is None  # whole and exactly as written
    return json.loads((folder / "report.json").read_text())["version"]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def writer(folder: Path, pause: str, exchange: bool = True) -> list[str]:
    """The command line of a run publishing version 2 at ``folder`` that pauses at ``pause`` (tests/publish_worker.py)."""
    return [sys.executable, str(WORKER), str(folder), "2", pause, *([] if exchange else ["fallback"])]


def run_writer(folder: Path, pause: str, sig: int, exchange: bool = True):
    """Start a writer of version 2, send ``sig`` when it reaches ``pause``, return (exit code, stderr)."""
    proc = subprocess.Popen(writer(folder, pause, exchange), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.strip() == f"lab-pause {pause}":
            break
    else:
        pytest.fail(f"the writer never reached {pause}: {proc.wait()}")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out + err



@pytest.fixture(autouse=True)
def no_grace(monkeypatch):
    """Leftovers of the killed writers here are seconds old: judge them by their lock alone."""
    monkeypatch.setattr(locks, "LEFTOVER_GRACE", 0.0)

# (pause point, signal, two-rename fallback?, exit code, version at the folder afterwards, leftovers afterwards)
CASES = [
    ("writing", signal.SIGINT, False, 128 + signal.SIGINT, "1", False),
    ("writing", signal.SIGTERM, False, 128 + signal.SIGTERM, "1", False),
    ("writing", signal.SIGHUP, False, 128 + signal.SIGHUP, "1", False),
    ("writing", signal.SIGKILL, False, -signal.SIGKILL, "1", True),
    ("exchanged", signal.SIGINT, False, 0, "2", False),
    ("exchanged", signal.SIGTERM, False, 0, "2", False),
    ("exchanged", signal.SIGKILL, False, -signal.SIGKILL, "2", True),
    ("published", signal.SIGINT, False, 0, "2", False),
    ("between-renames", signal.SIGINT, True, 0, "2", False),
    ("between-renames", signal.SIGTERM, True, 0, "2", False),
    ("between-renames", signal.SIGKILL, True, -signal.SIGKILL, None, True),  # restored by the next run
]


@pytest.mark.parametrize("pause,sig,fallback,code,version,left", CASES,
                         ids=[f"{c[1].name}-at-{c[0]}{'-fallback' if c[2] else ''}" for c in CASES])
def test_signal_at_every_moment_loses_nothing(tmp_path, pause, sig, fallback, code, version, left):
    folder = tmp_path / "out" / "run"
    publish_version(folder, "1")
    rc, output = run_writer(folder, pause, sig, exchange=not fallback)
    assert rc == code, output
    if code == 0:
        assert "saved" in output and "was held until the new folder was in place" in output
    parent = folder.parent
    assert bool(leftovers(parent)) == left, leftovers(parent)
    if version is None:  # killed between the two renames: the old folder is aside, the name is empty
        assert not folder.exists()
    else:
        assert version_at(folder) == version
    # The next run into the same parent cleans up (and restores the old folder first where needed).
    lines = locks.sweep_leftovers(parent, log=lambda line: None)
    assert leftovers(parent) == []
    if version is None:
        assert any(line.startswith(f"restored {folder}") for line in lines)
        assert version_at(folder) == "1"
    elif left:
        assert any("left by a run that died" in line for line in lines)
    publish_version(folder, "3")
    assert version_at(folder) == "3" and leftovers(parent) == []


def test_leftovers_of_a_live_run_are_kept(tmp_path):
    live = tmp_path / f".run.tmp-{os.getpid()}-abc"
    live.mkdir()
    assert locks.sweep_leftovers(tmp_path, log=lambda line: None) == []
    assert live.exists()


def test_next_run_says_what_it_removed(tmp_path, capsys):
    folder = tmp_path / "run"
    rc, _ = run_writer(folder, "writing", signal.SIGKILL)
    assert rc == -signal.SIGKILL and leftovers(tmp_path)
    publish_version(folder, "3")
    assert "left by a run that died" in capsys.readouterr().err
    assert leftovers(tmp_path) == [] and version_at(folder) == "3"


def test_second_concurrent_run_stops_at_once(tmp_path, capsys):
    folder = tmp_path / "run"
    proc = subprocess.Popen(writer(folder, "writing"), stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline().strip() == "lab-pause writing"
        with pytest.raises(lu.LabError, match=f"another run \\(pid {proc.pid}\\) is writing .*choose another --out"):
            publish_version(folder, "9")
        assert main(["prune", "--out", str(folder)]) == 2
        assert f"another run (pid {proc.pid}) is writing" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert not folder.exists() and leftovers(tmp_path) == []  # the writer was interrupted before publishing
    publish_version(folder, "3")  # the lock is free again
    assert version_at(folder) == "3"


def test_lock_is_reentrant_within_a_process(tmp_path):
    with locks.output_lock(tmp_path / "run"), locks.output_lock(tmp_path / "run"):
        publish_version(tmp_path / "run", "1")
    assert version_at(tmp_path / "run") == "1"


def test_replacing_removes_only_listed_files(tmp_path):
    folder = tmp_path / "run"
    publish_version(folder, "1")
    old = tmp_path / "aside"
    folder.rename(old)
    (old / "thesis.tex").write_text("mine")  # appeared after the check: kept, and the folder with it
    manifests.remove_lab_folder(old, keep_as=tmp_path / "run.unlisted")
    assert not old.exists() and [p.name for p in (tmp_path / "run.unlisted").iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("setup,message", [
    (lambda f: (f.mkdir(), (f / "report.json").write_text('{"lab": "wanda-lab"}'),
                (f / "thesis.tex").write_text("x")), "not a lab output .*older lab version"),
    (lambda f: (publish_version(f, "1"), (f / "thesis.tex").write_text("x")), "holding files the lab did not write"),
])
def test_folder_with_foreign_files_is_never_replaced(tmp_path, setup, message):
    folder = tmp_path / "run"
    setup(folder)
    with pytest.raises(lu.BadInput, match=message):
        check_output_dir(folder)
    assert main(["prune", "--out", str(folder)]) == 2
    with pytest.raises(lu.BadInput, match=message):
        publish_version(folder, "2")
    assert (folder / "thesis.tex").read_text() == "x" and leftovers(tmp_path) == []


def test_symlinked_output_is_written_through_the_link(tmp_path):
    real = tmp_path / "real"
    publish_version(real, "1")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert check_output_dir(link) == link
    publish_version(link, "2")
    assert link.is_symlink() and version_at(real) == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_old_copy_that_cannot_be_restored_is_never_deleted(tmp_path, monkeypatch):
    old = tmp_path / f".run.old-{dead_pid()}"
    publish_version(old, "1")
    monkeypatch.setattr(locks, "_restore", lambda entry, target: False)  # e.g. another run holds run's lock
    assert locks.sweep_leftovers(tmp_path, log=lambda line: None) == []
    assert version_at(old) == "1"


def test_files_the_lab_did_not_write_survive_a_dead_runs_cleanup(tmp_path):
    left = tmp_path / f".run.tmp-{dead_pid()}-x"
    publish_version(left, "1")
    (left / "notes.txt").write_text("mine")
    locks.sweep_leftovers(tmp_path, log=lambda line: None)
    assert not left.exists()
    (kept,) = tmp_path.glob("run.unlisted-*")
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_leftover_names_that_no_run_made_are_left_alone(tmp_path):
    odd = tmp_path / ".data.tmp-99999999999999999999"
    odd.mkdir()
    publish_version(tmp_path / "run", "1")
    assert odd.exists() and version_at(tmp_path / "run") == "1"


@pytest.mark.parametrize("tamper", [
    lambda m: m["files"].update({"../victim.txt": m["files"]["report.json"]}),
    lambda m: m["files"].update({"/etc/hostname": m["files"]["report.json"]}),
    lambda m: m["files"]["report.json"].pop("bytes"),
    lambda m: m["files"].update({"report.json": None}),
])
def test_a_tampered_manifest_is_not_trusted(tmp_path, tamper):
    folder = tmp_path / "run"
    publish_version(folder, "1")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    manifest = json.loads((folder / manifests.MANIFEST_FILE).read_text())
    tamper(manifest)
    (folder / manifests.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(lu.BadInput, match="not a lab output"):
        publish_version(folder, "2")
    assert manifests.verify_folder(folder) == "no readable lab-manifest.json" and victim.read_text() == "keep"


@pytest.mark.parametrize("extra", ["empty-folder", "link-to-folder"])
def test_folders_and_links_count_as_foreign_entries(tmp_path, extra):
    folder = tmp_path / "run"
    publish_version(folder, "1")
    if extra == "empty-folder":
        (folder / "data").mkdir()
    else:
        (tmp_path / "elsewhere").mkdir()
        (folder / "data").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(lu.BadInput, match="holding files the lab did not write \\(data\\)"):
        check_output_dir(folder)


def test_the_lock_is_keyed_by_the_outputs_real_path_not_by_the_cache(tmp_path, monkeypatch):
    """Two runs writing one folder meet at the same lock whatever their LAB_CACHE_DIR or spelling of the path."""
    folder = tmp_path / "run"
    proc = subprocess.Popen(writer(folder, "writing"), stderr=subprocess.PIPE, text=True,
                            env={**os.environ, publish.CACHE_ENV: str(tmp_path / "a")})
    try:
        assert proc.stderr.readline().strip() == "lab-pause writing"
        monkeypatch.setenv(publish.CACHE_ENV, str(tmp_path / "b"))
        (tmp_path / "link").symlink_to(tmp_path)
        for spelling in (folder, tmp_path / "link" / "run", tmp_path / "x" / ".." / "run"):
            with pytest.raises(lu.LabError, match=f"another run \\(pid {proc.pid}\\) is writing"):
                publish_version(spelling, "9")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def test_lock_files_of_killed_runs_are_removed(tmp_path):
    stale = tmp_path / f".other{locks.LOCK_SUFFIX}"
    stale.write_text("12345\n")  # nobody holds it: its process was killed
    publish_version(tmp_path / "run", "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_live_runs_folder_is_left_alone_whatever_its_pid_says(tmp_path):
    """A run in another PID namespace (a container sharing the volume) has a PID that is dead here: its
    temporary folder is judged by the lock it holds, not by the PID."""
    live = tmp_path / f".run.tmp-{dead_pid()}-x"
    live.mkdir()
    (live / "weights").write_text("being written")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
                               str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert locks.sweep_leftovers(tmp_path, log=lambda line: None) == [] and live.exists()
    finally:
        holder.communicate("", timeout=30)
    assert locks.sweep_leftovers(tmp_path, log=lambda line: None) and not live.exists()


def test_a_leftover_younger_than_the_grace_is_left_for_its_run_to_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "LEFTOVER_GRACE", 3600.0)
    young = tmp_path / f".run.tmp-{dead_pid()}-x"
    young.mkdir()
    assert locks.sweep_leftovers(tmp_path, log=lambda line: None) == [] and young.exists()


@pytest.mark.parametrize("published,code,message", [
    (None, 143, "interrupted (SIGTERM): nothing was published"),
    ("pruned-model", 0, "was published: the new model is in place"),
    ("converted-model", 143, "interrupted (SIGTERM): nothing was published"),  # the cache, rebuilt by this run
])
def test_cli_says_what_an_interrupt_left(tmp_path, monkeypatch, capsys, published, code, message):
    """Only the command's own output counts as published: a model cache rebuilt earlier in the same run (or an
    output of an earlier command in the same process) does not turn an interrupt into exit 0."""
    def interrupted(job, progress=True):
        if published:
            publish.PUBLISHED.append((tmp_path / "run", published))
        raise publish.Terminated(signal.SIGTERM)

    monkeypatch.setattr(publish, "PUBLISHED", [])
    monkeypatch.setattr("labutils.cli.PUBLISHED", publish.PUBLISHED)
    monkeypatch.setattr("labutils.cli.run_prune_job", interrupted)
    assert main(["prune", "--out", str(tmp_path / "run")]) == code
    assert message in capsys.readouterr().err


def test_output_under_a_file_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["prune", "--out", str(blocker / "run")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_too_little_free_space_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(publish.shutil, "disk_usage", lambda path: publish.shutil._ntuple_diskusage(10, 5, 5))
    assert main(["prune", "--out", str(tmp_path / "run")]) == 2
    assert "GiB free" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_report_is_strict_json(tmp_path):
    report = {"perplexity": {"dense": float("nan"), "pruned": float("inf")}, "sizes": [1.0, float("-inf")]}
    out = lu.save_pruned(make_tiny(), tmp_path / "run", None, report)
    saved = json.loads((out / "report.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert saved["perplexity"] == {"dense": None, "pruned": None} and saved["sizes"] == [1.0, None]


@pytest.mark.parametrize("fmt, file", [("dense", "model.safetensors"), ("sparse", "sparse-model.safetensors")])
def test_damaged_output_is_not_loaded(fmt, file, tmp_path):
    out = lu.save_pruned(make_tiny(), tmp_path / "run", None, {}, format=fmt)
    with (out / file).open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(lu.LabError, match=f"saved model .* is damaged \\({file} has 1,000 bytes"):
        lu.load_pruned(out, "cpu")


# -------------------------------------------------------------------------- real file systems, where allowed

@pytest.fixture
def tmpfs(tmp_path):
    """Mount a 20 MB tmpfs (root and a kernel that allows it, as on the lab's CI); skip with the reason if not."""
    mounted = []

    def mount(options: str = "size=20m") -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                                text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_full_disk_while_safetensors_writes_is_one_line(tmpfs, monkeypatch):
    disk = tmpfs("size=200k")
    monkeypatch.setattr("labutils.core.saved.check_writable", lambda path, need_bytes=None: None)  # space taken later
    with pytest.raises(lu.LabError, match="could not write .*\\(the disk is full\\); nothing was written"):
        lu.save_pruned(make_tiny(), disk / "run", None, {})
    assert list(disk.iterdir()) == []


def test_full_disk_during_save_keeps_the_old_folder(tmpfs):
    disk = tmpfs()
    publish_version(disk / "run", "1")
    with pytest.raises(lu.LabError, match="could not write .*run.*No space left on device \\(the disk is full\\); "
                                          "the previous folder there is unchanged"):
        with publish.atomic_folder(disk / "run") as tmp:
            (tmp / "model.safetensors").write_bytes(b"\0" * 30 * 2**20)
    assert version_at(disk / "run") == "1" and leftovers(disk) == []


def test_cli_refuses_a_disk_too_small_and_a_read_only_mount(tmpfs, capsys):
    small = tmpfs()
    assert main(["prune", "--out", str(small / "run")]) == 2  # the default model needs ~0.5 GB
    assert "needs about 0.5" in capsys.readouterr().err
    read_only = tmpfs("size=20m,ro")
    assert main(["prune", "--out", str(read_only / "run")]) == 2
    assert "cannot be written: creating a folder in" in capsys.readouterr().err
    assert list(small.iterdir()) == [] and list(read_only.iterdir()) == []


def test_an_earlier_commands_publish_does_not_leak_into_the_next(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(publish, "PUBLISHED", [(tmp_path / "earlier", "pruned-model")])
    monkeypatch.setattr("labutils.cli.PUBLISHED", publish.PUBLISHED)
    monkeypatch.setattr("labutils.cli.run_prune_job", lambda job, progress=True: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    assert main(["prune", "--out", str(tmp_path / "run")]) == 130
    assert "interrupted (Ctrl-C): nothing was published" in capsys.readouterr().err


def test_an_output_inside_the_cache_or_its_own_input_is_refused(tmp_path, monkeypatch, capsys, tiny_dir):
    """--out in the model cache (the next rebuild deletes it) or export's OUT spelled otherwise than FOLDER (the
    sparse folder would be replaced by its dense copy): one line, exit 2, nothing written."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(publish.CACHE_ENV, str(cache))
    for out in (cache / "smollm2-135m-instruct-q4_1" / "pruned", cache / "tokens", cache / "locks", cache):
        assert main(["prune", "--out", str(out)]) == 2
        assert "inside the lab's model cache (LAB_CACHE_DIR)" in capsys.readouterr().err
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tiny_dir / "pruned")]) == 2
    assert "is inside the --model folder" in capsys.readouterr().err
    model = make_tiny()
    folder = lu.save_pruned(model, tmp_path / "run")
    before = sorted(p.name for p in folder.iterdir())
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    for out in (tmp_path / "run", "run/../run", "./run", tmp_path / "link", folder / "dense", tmp_path):
        assert main(["export", "run", str(out)]) == 2
        err = capsys.readouterr().err
        assert "the folder being exported" in err and len(err.strip().splitlines()) == 1, (out, err)
    assert sorted(p.name for p in folder.iterdir()) == before and lu.load_report(folder)["disk"]["format"] == "sparse"


def test_ctrl_c_while_the_command_line_imports_is_one_line(tmp_path):
    """SIGINT half a second after `python -m labutils prune` starts (torch and transformers are still importing)."""
    proc = subprocess.Popen([sys.executable, "-m", "labutils", "prune", "--out", str(tmp_path / "run")],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("interrupted (Ctrl-C)") and not (tmp_path / "run").exists()
