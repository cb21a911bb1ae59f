"""Every error of ``python -m labutils`` is one line on stderr, exit code 2 and nothing written — never a traceback:
damaged model folders, a model without a tokenizer, unknown devices, out-of-range seeds, sizes and targets, and the
outputs of every command checked before the work."""
import json
import re
import shutil

import pytest
import torch
from conftest import copy_of, make_tiny, owl_lambda_message, raiser

import labutils as lu
from labutils.cli import main
from labutils.core.data import split_tokens
from labutils.core.loading import load_pretrained

SMALL = ["--nsamples", "2", "--seqlen", "16", "--eval-tokens", "64", "--eval-seqlen", "32"]


def cli_error(argv, tmp_path, capsys) -> str:
    """The one line a failing ``prune`` prints; asserts exit code 2, no traceback and no output folder."""
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists()
    return lines[0]


# 1. Model folders that exist but are not a whole model

def test_empty_model_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = cli_error(["prune", "--model", str(empty), *SMALL], tmp_path, capsys)
    assert f"model folder {empty} has no config.json (it is empty); allowed: a folder written by" in line
    assert "no local folder" not in line


def test_folder_with_only_config(tmp_path, capsys):
    folder = tmp_path / "config-only"
    lu.tiny_llama_config().save_pretrained(folder)
    line = cli_error(["prune", "--model", str(folder), *SMALL], tmp_path, capsys)
    assert f"model folder {folder} has config.json but no weights (*.safetensors or pytorch_model.bin)" in line
    assert "no local folder" not in line


def test_truncated_weights(tiny_dir, tmp_path, capsys):
    folder = copy_of(tiny_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = cli_error(["prune", "--model", str(folder), *SMALL], tmp_path, capsys)
    assert f"model weights {weights} are unreadable (SafetensorError: " in line
    assert "damaged or incomplete" in line


def test_model_path_that_is_a_file(tiny_dir, tmp_path, capsys):
    line = cli_error(["prune", "--model", str(tiny_dir / "model.safetensors"), *SMALL], tmp_path, capsys)
    assert "model.safetensors' is a file; allowed: a folder holding config.json" in line


# 2. A model without a tokenizer, on a profile that tokenizes text

NO_TOKENIZER = ("the model has no tokenizer (its folder holds no tokenizer.json / tokenizer_config.json) and "
                "profile 'smollm2-135m' needs one to tokenize the corpus; pass --tokenizer PATH (the base model's "
                "folder or hub id) or copy its tokenizer files into the folder")


def test_model_without_tokenizer_stops_before_evaluating(tiny_dir, tmp_path, capsys, monkeypatch):
    def no_heavy_work(*args, **kwargs):
        raise AssertionError("the job should have stopped before evaluating")

    monkeypatch.setattr("labutils.jobs.main_job.perplexity", no_heavy_work)
    line = cli_error(["prune", "--profile", "smollm2-135m", "--model", str(tiny_dir), *SMALL], tmp_path, capsys)
    assert line == f"error: {NO_TOKENIZER}"


def test_tokenizer_flag_gives_a_folder_without_one_its_tokenizer(tiny_dir, tiny_with_tokenizer, tmp_path, capsys):
    """``--tokenizer PATH`` for a model folder saved without tokenizer files: the job runs and saves it with the
    pruned model."""
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_dir), "--tokenizer", str(tiny_with_tokenizer), *SMALL,
                 "--method", "magnitude", "--out", str(out), "--json"]) == 0  # no calibration: the test set is enough
    report = json.loads(capsys.readouterr().out)
    assert report["perplexity"]["dense"] > 0 and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("case", ["no tokenizer files", "a file", "too many tokens", "without --model"])
def test_bad_tokenizer_flags_are_one_line(case, tiny_dir, tiny_with_tokenizer, tmp_path, capsys):
    model, tokenizer = str(tiny_dir), str(tiny_with_tokenizer)
    if case == "too many tokens":  # the byte-level tokenizer has 256 tokens; this model embeds 128
        small = tmp_path / "small"
        make_tiny(vocab_size=128).save_pretrained(small)
        model = str(small)
        capsys.readouterr()  # the save's own progress bar
    argv = {"no tokenizer files": ["--model", model, "--tokenizer", model],
            "a file": ["--model", model, "--tokenizer", str(tiny_dir / "config.json")],
            "too many tokens": ["--model", model, "--tokenizer", tokenizer],
            "without --model": ["--tokenizer", tokenizer]}[case]
    expected = {"no tokenizer files": r"--tokenizer .*model: allowed: a folder holding tokenizer.json or "
                                      r"tokenizer_config.json, or a Hugging Face Hub id",
                "a file": r"--tokenizer .*config.json: allowed: a folder holding",
                "too many tokens": r"--tokenizer .* has 256 tokens but the model embeds 128: it is not this model's",
                "without --model": r"--tokenizer goes with --model"}[case]
    assert re.search(expected, cli_error(["prune", *argv, *SMALL], tmp_path, capsys))


# 3. Devices

@pytest.mark.parametrize("device", ["foo", "meta", "cuda:x", ""])
def test_unknown_device(device, tmp_path, capsys):
    line = cli_error(["prune", "--device", device, *SMALL], tmp_path, capsys)
    assert line == f"error: device {device!r} is not one the lab can run on; allowed: cuda, cuda:N, mps, cpu"


# 4. Seeds

@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1"])
def test_seed_out_of_range(seed, tmp_path, capsys):
    line = cli_error(["prune", "--seed", seed, *SMALL], tmp_path, capsys)
    assert line == f"error: seed must be an integer in [0, 2**63 − 1] = [0, 9223372036854775807]; got {seed}"


def test_bench_prune_seed_out_of_range(capsys):
    assert main(["bench-prune", "--tiny", "--seed", str(2**63)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: seed must be an integer in [0, 2**63 − 1]")


# 5. Sizes: each error names the field and its CLI flag

def test_help_shows_a_single_percent_sign(capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Wanda, 50% unstructured" in out and "%%" not in out


@pytest.mark.parametrize("flag,value,message", [
    ("--eval-seqlen", "1", "eval_seqlen 1 is too short: a perplexity window predicts eval_seqlen − 1 tokens; "
                           "allowed: 2 or more (CLI flag --eval-seqlen)"),
    ("--eval-seqlen", "0", "eval_seqlen must be a positive integer (≥ 1); got 0 (CLI flag --eval-seqlen)"),
    ("--eval-tokens", "0", "eval_tokens must be a positive integer (≥ 1); got 0 (CLI flag --eval-tokens)"),
    ("--batch-size", "-2", "batch_size must be a positive integer (≥ 1); got -2 (CLI flag --batch-size)"),
])
def test_profile_sizes_name_their_flag(flag, value, message, tmp_path, capsys):
    assert cli_error(["prune", *SMALL, flag, value], tmp_path, capsys) == f"error: {message}"


def test_windows_longer_than_the_model_name_their_flag(tiny_dir, tmp_path, capsys):
    line = cli_error(["prune", "--model", str(tiny_dir), *SMALL, "--eval-seqlen", "200"], tmp_path, capsys)
    assert line == ("error: eval_seqlen 200 exceeds the model's maximum sequence length; allowed: 1..128 "
                    "(CLI flag --eval-seqlen)")
    line = cli_error(["prune", "--model", str(tiny_dir), *SMALL, "--seqlen", "129"], tmp_path, capsys)
    assert line.endswith("seqlen 129 exceeds the model's maximum sequence length; allowed: 1..128 (CLI flag --seqlen)")


def test_more_eval_tokens_than_the_test_set(tiny_with_tokenizer, tmp_path, capsys):
    _, tokenizer = load_pretrained(tiny_with_tokenizer, torch.float32, torch.device("cpu"))
    total = split_tokens(tokenizer, "test").numel()
    line = cli_error(["prune", "--model", str(tiny_with_tokenizer), *SMALL, "--eval-tokens", "1000000000"],
                     tmp_path, capsys)
    assert line == (f"error: eval_tokens 1000000000 exceeds the test set's {total:,} tokens; allowed: 32..{total} "
                    "(CLI flag --eval-tokens)")
    profile = lu.get_profile("smollm2-135m")
    assert lu.test_tokens(profile, tokenizer, total).numel() == total  # the whole test set is still allowed


# Every bad input of every command: one line, exit 2, nothing written — checked before the work, not after

def one_line(argv, capsys, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"(rank \d+: )?error: ", err[0]) and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("argv, message", [
    (["prune", "--nsamples", "x"], "argument --nsamples: invalid int value: 'x'; `python -m labutils prune --help`"),
    (["prune", "--method"], "argument --method: expected one argument"),
    (["prunee"], "invalid choice: 'prunee'"),
    ([], "the following arguments are required: command"),
    (["bench-prune", "--seed"], "argument --seed: expected one argument"),
    (["grade", "--timeout"], "argument --timeout: expected one argument"),  # no SUBMISSIONS: test_grading_nbgrader.py
])
def test_option_errors_are_one_line_not_the_usage_block(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("error: "), err


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a process count"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT are not"),
    ({"WORLD_SIZE": "2", "RANK": "7", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK='7' is not a process"),
])
def test_broken_launcher_variables_are_one_line(env, message, monkeypatch, tmp_path, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    line = one_line(["prune", "--data-parallel", *SMALL, "--out", str(tmp_path / "out")], capsys)
    assert message in line and not (tmp_path / "out").exists()


def test_tokenizer_without_model_is_refused_for_every_mode(tiny_with_tokenizer, tmp_path, capsys):
    for extra in ([], ["--stream-from-disk"]):
        line = one_line(["prune", *extra, "--tokenizer", str(tiny_with_tokenizer), "--out", str(tmp_path / "o")],
                        capsys)
        assert "--tokenizer goes with --model" in line


def test_outputs_of_every_command_are_checked_before_the_work(tmp_path, capsys, monkeypatch):
    """bench-prune --json, student --out, grade --out / --feedback: a folder where a file goes, a path under a file,
    /proc (where nothing can be created, as root too: what a read-only mount does) — refused at once (the benchmark
    and the grading do not run)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr("labutils.cli.bench_prune", lambda setup: pytest.fail("the benchmark ran"))
    monkeypatch.setattr("labutils.cli.grade", lambda *a, **k: pytest.fail("grading ran"))
    (tmp_path / "subs" / "alice").mkdir(parents=True)
    for path, message in ((tmp_path, "is a folder"), (blocker / "x.json", "is a file, not a folder"),
                          ("/proc/lab.json", "cannot be written")):
        assert message in one_line(["bench-prune", "--tiny", "--json", str(path)], capsys)
        assert message in one_line(["grade", str(tmp_path / "subs"), "--out", str(path)], capsys)
    assert "--feedback" in one_line(["grade", str(tmp_path / "subs"), "--out", str(tmp_path / "g.csv"),
                                     "--feedback", str(blocker)], capsys)
    for path in (blocker, blocker / "copies", "/proc/copies"):
        assert "--out" in one_line(["student", "--out", str(path)], capsys)
    assert not (tmp_path / "g.csv").exists() and not (tmp_path / "feedback").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"\xff\xfe not utf-8"), "not a readable UTF-8 text file"),
])
def test_readme_command_on_a_bad_readme_is_one_line(damage, message, tmp_path, capsys):
    readme = tmp_path / "README.md"
    damage(readme)
    assert message in one_line(["readme", "--readme", str(readme)], capsys)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not a results file"), ('{"profile": "x"}', "is not a results file"),
    ('{"rows": []}', "field 'rows' is not a non-empty list"), ('{"rows": [{"model": "dense"}]}', "lacks what the"),
])
def test_readme_command_on_damaged_results_is_one_line(content, message, tmp_path, capsys):
    root = lu.__file__.rsplit("/labutils/", 1)[0]
    shutil.copytree(f"{root}/results", tmp_path / "results")
    shutil.copy(f"{root}/README.md", tmp_path / "README.md")
    (tmp_path / "results" / "smollm2-135m-prune.json").write_text(content)
    before = (tmp_path / "README.md").read_text()
    assert message in one_line(["readme", "--readme", str(tmp_path / "README.md")], capsys)
    assert (tmp_path / "README.md").read_text() == before


def test_memory_error_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("labutils.cli.run_prune_job", lambda job, progress=True: (_ for _ in ()).throw(MemoryError()))
    assert "out of memory" in one_line(["prune", "--nsamples", "100000000", "--out", str(tmp_path / "o")], capsys)


@pytest.mark.parametrize("argv,message", [
    (["prune", "--sparsity", "1.2"], "sparsity must be a number in [0, 1); got 1.2"),
    (["prune", "--nm", "4:2"], "1 ≤ N < M; got N=4, M=2"),
    (["prune", "--nsamples", "0"], "nsamples must be a positive integer (≥ 1); got 0"),
    (["prune", "--seqlen", "-5"], "seqlen must be a positive integer (≥ 1); got -5"),
    (["prune", "--method", "obs"], "unknown method 'obs'"),
])
def test_cli_bad_input_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_owl_lambda_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("labutils.jobs.main_job.load_model", raiser(AssertionError("loaded the model first")))
    out = tmp_path / "out"
    assert main(["prune", "--owl", "--owl-lambda", "1.0", "--out", str(out)]) == 2
    assert owl_lambda_message(1.0) in capsys.readouterr().err
    assert not out.exists()


# 5. The calibration source (--calibration)


@pytest.mark.parametrize("argv, message", [
    (["--calibration", "nope"], "error: calibration must be wiki, code, mixed or a folder of text files (*.txt, *.md, "
                                "*.py); got 'nope': no such folder"),
    (["--calibration", "code", "--method", "magnitude"],
     "error: --calibration code chooses calibration text; method 'magnitude' uses none (allowed: wiki, the default)"),
    (["--calibration", "mixed", "--nsamples", "1"],
     "error: calibration 'mixed' takes half its windows from each text and needs nsamples ≥ 2; got 1"),
    (["--calibration", "code", "--profile", "llama2-7b-random"],
     "error: calibration 'code' needs a profile with real text; profile 'llama2-7b-random' calibrates on random "
     "tokens (allowed: wiki)"),
])
def test_bad_calibration_source_is_one_line_before_loading(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("labutils.jobs.main_job.load_model", raiser(AssertionError("loaded the model first")))
    assert cli_error(["prune", *argv], tmp_path, capsys) == message


def test_empty_calibration_folder_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("labutils.jobs.main_job.load_model", raiser(AssertionError("loaded the model first")))
    (tmp_path / "texts").mkdir()
    line = cli_error(["prune", "--calibration", str(tmp_path / "texts")], tmp_path, capsys)
    assert line.endswith(f"got '{tmp_path / 'texts'}': it holds no *.txt, *.md or *.py file")


def test_calibration_source_names_the_default_folder_only_when_not_the_default(tmp_path):
    from labutils.jobs.main_job import PruneJob
    profile = lu.get_profile("smollm2-135m")
    (tmp_path / "My Texts").mkdir()
    (tmp_path / "My Texts" / "a.md").write_text("words")
    folders = {value: PruneJob(calibration=value).output_dir(profile).name
               for value in ("wiki", "code", "mixed", str(tmp_path / "My Texts"))}
    assert folders == {"wiki": "smollm2-135m-wanda-50", "code": "smollm2-135m-wanda-50-code",
                       "mixed": "smollm2-135m-wanda-50-mixed",
                       str(tmp_path / "My Texts"): "smollm2-135m-wanda-50-text-My-Texts"}
    assert PruneJob().output_dir(profile) == lu.jobs.main_job.default_output_dir(profile, PruneJob().spec)
    assert PruneJob(calibration="code", out=str(tmp_path / "o")).output_dir(profile) == tmp_path / "o"
    assert PruneJob(calibration="code").calibration_label() == "code"
    assert PruneJob(lu.PruneSpec("magnitude", 0.5)).calibration_label() is None


@pytest.mark.slow
def test_folder_calibration_is_recorded_in_the_report(tiny_with_tokenizer, tmp_path, capsys):
    """A whole CLI run calibrated on a folder of text: report.json and the model card name the source."""
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out"
    argv = ["prune", "--model", str(tiny_with_tokenizer), *SMALL, "--calibration", str(texts), "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"] == str(texts) and report["mask_sha256"]
    assert f"from {texts}" in (out / "README.md").read_text()
    assert main([*argv[:-2], "--calibration", "wiki", "--out", str(tmp_path / "wiki")]) == 0
    wiki = json.loads((tmp_path / "wiki" / "report.json").read_text())
    assert wiki["calibration"] == "wiki" and wiki["mask_sha256"] != report["mask_sha256"]
    capsys.readouterr()
