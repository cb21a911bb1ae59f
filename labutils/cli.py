"""Command line: ``python -m labutils prune …`` (the main job), ``export`` (a dense copy of a saved model, or a GGUF
file for llama.cpp), ``prepare``, ``bench-prune`` (04-Benchmark), for instructors ``student`` (student copies of the
notebooks) and ``grade`` (score submitted notebooks), and for maintainers ``readme`` (the result tables of the README
and docs/ from ``results/``)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import pandas as pd

from .core.config import DEFAULT_PROFILE, PROFILES
from .core.data import corpus_split, split_tokens
from .core.errors import BadInput, LabError
from .core.loading import embedded_model_dir, folder_tokenizer
from .core.manifests import strict_json
from .core.publish import PUBLISHED, cache_dir, check_can_write, interrupt_on_termination
from .core.saved import OUTPUT_KIND, SAVE_FORMATS, disk_table, export_dense, load_report
from .core.sparse.quant import STORED_QUANTS
from .core.validation import check_seed
from .deploy.commands import add_commands as add_deploy_commands
from .deploy.gguf import QUANTS, export_gguf
from .jobs.bench_prune import (
    MODES,
    TARGETS,
    bench_prune,
    bench_setup,
    default_json_path,
    read_baseline,
    summary_line,
    write_json,
)
from .jobs.main_job import PruneJob, run_prune_job, summary_table
from .lab.course import master_paths, write_student_copies
from .lab.feedback import feedback_folder
from .lab.grading import EXERCISE_TIMEOUT, GradingSettings, grade
from .lab.nbgrader_cells import stamp
from .lab.nbgrader_course import grade_course, release
from .lab.readme import update_readme
from .prune.masks import GROUPS
from .prune.methods import METHODS
from .prune.parallel import launched_ranks
from .prune.spec import CLI_FLAGS, METHOD_FLAGS, PruneSpec

EXPORT_FORMATS = ("dense", "gguf")


class LabParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (``error: …``, exit 2), as every other bad input is, instead of the
    whole usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; `{self.prog} --help` lists the options\n")


def build_parser() -> argparse.ArgumentParser:
    parser = LabParser(prog="python -m labutils", description="Wanda pruning lab")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    sub.add_parser("prepare", help="convert the embedded model once and check the corpus (setup runs this)")
    _add_bench_prune(sub)
    _add_course(sub)
    export = sub.add_parser("export", help="write a lab output folder (sparse or dense) as an ordinary dense "
                                           "transformers folder, for from_pretrained, vLLM or llama.cpp's converter")
    export.add_argument("folder", metavar="FOLDER", help="a folder written by prune or lu.save_pruned")
    export.add_argument("out", metavar="OUT", help="the dense folder to write (new, or an earlier lab output); with "
                                                   "--format gguf, the .gguf file to write (new, or one the lab wrote)")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="dense",
                        help="dense: a transformers folder (default); gguf: one file for llama.cpp, with the default "
                             "model's tokenizer and chat template (SmolLM2-135M-shaped Llama models only)")
    export.add_argument("--quant", choices=QUANTS, default=None,
                        help="with --format gguf: f16 (default; exact for a float16 model), or llama.cpp's q8_0 / "
                             "q4_0 block quantization")
    COMMANDS.update(add_deploy_commands(sub))
    readme = sub.add_parser("readme", help="rewrite the README and docs/ tables from results/ (after make notebooks)")
    readme.add_argument("--readme", default="README.md", help="the README to update (default README.md)")
    return parser


def _add_prune(sub) -> None:
    prune = sub.add_parser("prune", help="prune a model, evaluate dense and pruned perplexity, save the result",
                           description="With no options: Wanda, 50% unstructured, on the embedded default model.")
    prune.add_argument("--profile", choices=list(PROFILES), default=None,
                       help=f"lab profile (default: $LAB_PROFILE or {DEFAULT_PROFILE})")
    prune.add_argument("--method", default="wanda", help=f"one of {', '.join(METHODS)} (default: wanda)")
    prune.add_argument("--true-sequential", action="store_true",
                       help="re-collect o_proj and down_proj statistics after the sublayers before them are pruned")
    prune.add_argument("--owl", action="store_true", help="OWL: per-layer sparsity from outlier ratios (unstructured)")
    prune.add_argument("--owl-m", type=float, default=None, help="OWL outlier threshold, × layer mean (default 5)")
    prune.add_argument("--owl-lambda", type=float, default=None, help="OWL sparsity spread λ (default 0.08)")
    prune.add_argument("--group", choices=list(GROUPS), default=None,
                       help="unstructured targets: compare scores per output row or per layer (whole matrix); "
                            "default: magnitude and RIA per layer, Wanda per row, as in their papers' code")
    prune.add_argument("--alpha", type=float, default=None, help="RIA: exponent of the activation norm (default 0.5)")
    prune.add_argument("--dampening", type=float, default=None,
                       help="SparseGPT and ADMM: share of the mean Hessian diagonal added to it (default 0.01; "
                            "ADMM: 0.1 of the scaled Hessian)")
    prune.add_argument("--blocksize", type=int, default=None, help="SparseGPT: columns per block (default 128)")
    prune.add_argument("--selection", choices=["wanda", "gradual"], default=None,
                       help="ADMM: the mask chosen gradually over the first iterations, or Wanda's, fixed "
                            "(default gradual)")
    prune.add_argument("--iterations", type=int, default=None, help="ADMM: iterations (default 20)")
    prune.add_argument("--rho", type=float, default=None, help="ADMM: penalty ρ (default 1)")
    prune.add_argument("--rho-growth", type=float, default=None,
                       help="ADMM: ρ is multiplied by this every iteration (default 1: constant)")
    prune.add_argument("--gradual-steps", type=int, default=None,
                       help="ADMM with --selection gradual: iterations over which sparsity rises (default 15, at "
                            "most --iterations)")
    target = prune.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, default=None, help="unstructured sparsity in [0, 1) (default 0.5)")
    target.add_argument("--nm", default=None, help="N:M semi-structured pattern, e.g. 2:4 or 4:8")
    prune.add_argument("--nsamples", type=int, default=None, help="calibration windows (profile default)")
    prune.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (profile default)")
    prune.add_argument("--eval-tokens", type=int, default=None, help="test tokens for perplexity (profile default)")
    prune.add_argument("--eval-seqlen", type=int, default=None, help="tokens per perplexity window (profile default)")
    prune.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (profile default)")
    prune.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    prune.add_argument("--calibration", default="wiki", metavar="wiki|code|mixed|FOLDER",
                       help="calibration text: wiki, the profile's own (default); code, Python standard-library "
                            "modules; mixed, half of each; or a folder of *.txt / *.md / *.py files "
                            "(docs/running.md \"Calibration source\")")
    prune.add_argument("--quant", choices=list(STORED_QUANTS), default=None,
                       help="after pruning, quantize the linears and the embedding to llama.cpp's 4- or 8-bit blocks "
                            "(zeros kept), evaluate again and save the blocks (docs/saving.md \"Pruned and "
                            "quantized\"; default: none)")
    prune.add_argument("--out", default=None, help="output folder (default outputs/<profile>-<method>-<target>, "
                                                   "with -code, -mixed or -text-<folder> for another --calibration, "
                                                   "-q4_0 or -q8_0 for --quant)")
    prune.add_argument("--model", dest="model_path", default=None,
                       help="local folder or hub id replacing the profile's model")
    prune.add_argument("--tokenizer", dest="tokenizer_path", default=None, metavar="PATH_OR_ID",
                       help="folder or hub id of the tokenizer, for a --model folder saved without one")
    prune.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: best available)")
    prune.add_argument("--low-memory", action="store_true",
                       help="keep the model in CPU memory while pruning; one layer at a time visits the GPU")
    prune.add_argument("--stream-from-disk", action="store_true",
                       help="never load the model whole: each decoder layer is read from the safetensors files, "
                            "pruned and written as one shard of the sparse output (models larger than memory; "
                            "docs/gpu.md \"70B\")")
    prune.add_argument("--data-parallel", action="store_true",
                       help="under torchrun --nproc-per-node N: each process calibrates on its share of the samples, "
                            "statistics summed in one process's order (same masks); rank 0 evaluates and writes")
    prune.add_argument("--save-format", choices=list(SAVE_FORMATS), default="sparse",
                       help="sparse: kept values and masks, about half the bytes at 50%% (load with lu.load_pruned, "
                            "or write a dense copy with export); dense: an ordinary transformers folder "
                            "(default: sparse)")
    prune.add_argument("--json", action="store_true", help="print the whole report as JSON instead of a table")
    prune.add_argument("--strict", action="store_true",
                       help="stop before pruning when the dense perplexity is far from the profile's recorded one "
                            "(default: a warning)")


def _add_bench_prune(sub) -> None:
    bench = sub.add_parser("bench-prune", help="time pruning against the two-pass forward floor, default and "
                                               "low-memory mode (Llama-2-7B shapes on a GPU, or --tiny anywhere)")
    bench.add_argument("--tiny", action="store_true", help="a 4-layer tiny Llama on any device (what the tests run)")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: best available; the 7B needs cuda)")
    bench.add_argument("--nsamples", type=int, default=None, help="calibration windows (7B: 128, tiny: 8)")
    bench.add_argument("--seqlen", type=int, default=None, help="tokens per window (7B: 4096, tiny: 64)")
    bench.add_argument("--batch-size", type=int, default=None, help="windows per pass (7B: 4, tiny: 2)")
    bench.add_argument("--method", default="wanda", help=f"one of {', '.join(METHODS)} (default: wanda)")
    bench.add_argument("--targets", nargs="+", default=list(TARGETS), help="e.g. 50%% 2:4 (default)")
    bench.add_argument("--modes", nargs="+", default=list(MODES), help="default and/or low-memory (default: both)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", dest="json_path", default=None,
                       help="where to write the JSON, again after every row (default "
                            "results/bench-prune-<setup>-<date>.json)")
    bench.add_argument("--baseline", default=None, metavar="JSON",
                       help="an earlier run's JSON of the same setup: use its floor instead of measuring one, and "
                            "compare the low-memory masks with its default-mode masks (the GPU run's second step)")


def _add_course(sub) -> None:
    student = sub.add_parser("student", help="write the student copies of the notebooks, 01 to 08 (solutions replaced by "
                                             "stubs, hidden tests and the answer keys removed, outputs cleared), "
                                             "or an nbgrader release (--nbgrader)")
    student.add_argument("--out", default="student", help="folder for the copies (default: student/)")
    student.add_argument("--masters", default=".", help="folder holding the master notebooks (default: .)")
    student.add_argument("--stamp", action="store_true",
                         help="for maintainers: write each master's nbgrader metadata, derived from its cell tags, "
                              "into the masters in place (no copies)")
    student.add_argument("--nbgrader", default=None, metavar="COURSE",
                         help="instead of --out: make or update the nbgrader course folder COURSE (source/lab/ the "
                              "masters, nbgrader_config.py) and run nbgrader generate_assignment: hand out "
                              "COURSE/release/lab/")
    grading = sub.add_parser("grade", help="run every submitted notebook with the instructor's checks; write grades "
                                           "and one feedback file per student",
                             description="SUBMISSIONS holds one folder per student with their notebooks under the "
                                         "masters' names: SUBMISSIONS/<student>/01-Setup.ipynb …")
    grading.add_argument("submissions", metavar="SUBMISSIONS", nargs="?", default=None,
                         help="folder of student folders (not with --nbgrader)")
    grading.add_argument("--nbgrader", default=None, metavar="COURSE",
                         help="grade the nbgrader course folder COURSE made by student --nbgrader (submissions in "
                              "COURSE/submitted/<student>/lab/): nbgrader autograde and generate_feedback, then "
                              "--out from its gradebook")
    grading.add_argument("--export", action="store_true",
                         help="with --nbgrader: only write --out from the gradebook (after manual grading in the "
                              "formgrader); nothing runs")
    grading.add_argument("--out", default="grades.csv", help="grades table (default: grades.csv)")
    grading.add_argument("--feedback", default=None, help="folder for <student>.md (default: feedback/ next to --out)")
    grading.add_argument("--timeout", type=float, default=None,
                         help=f"seconds for each exercise and check cell (default {EXERCISE_TIMEOUT:g}: a correct 01.3 "
                              "took 175 s on a busy 2-core machine; the notebooks' own cells get 600); with "
                              "--nbgrader, every cell's (default 600)")
    grading.add_argument("--masters", default=".", help="folder holding the master notebooks (default: .)")
    grading.add_argument("--jobs", type=int, default=1,
                         help="notebooks graded at once, each in its own kernel (default 1); lowered to what the free "
                              "memory holds, 5 GiB a run")
    grading.add_argument("--optional", nargs="*", default=None, metavar="NN",
                         help="also grade these optional notebooks (05 06 07 08; --optional alone: all four); by "
                              "default only 01-04 are graded, and totals count only those")


def _student(args: argparse.Namespace) -> None:
    if args.stamp:
        for path in master_paths(args.masters):
            print(f"{'stamped' if stamp(path) else 'already stamped'} {path}")
        return
    if args.nbgrader:
        print(f"wrote {release(master_paths(args.masters), args.nbgrader)} (nbgrader generate_assignment)")
        return
    check_can_write(args.out, "--out", folder=True)
    for path in write_student_copies(master_paths(args.masters), args.out):
        print(f"wrote {path}")


def _grade(args: argparse.Namespace) -> None:
    if (args.submissions is None) == (args.nbgrader is None):
        raise BadInput("give SUBMISSIONS (the lab's own grader) or --nbgrader COURSE, one of the two")
    check_can_write(args.out, "--out")  # before any notebook runs
    optional = [] if args.optional is None else args.optional or ["05", "06", "07"]  # --optional alone: all three
    if args.nbgrader:
        table = grade_course(args.nbgrader, args.out, timeout=args.timeout, run=not args.export, optional=optional)
        print(table.groupby("student")[["points", "max"]].sum().to_string())
        print(f"wrote {args.out}; nbgrader's feedback is in {args.nbgrader}/feedback/")
        return
    check_can_write(feedback_folder(args.out, args.feedback), "--feedback", folder=True)
    timeout = EXERCISE_TIMEOUT if args.timeout is None else args.timeout
    table = grade(args.submissions, master_paths(args.masters, optional), args.out, args.feedback,
                  GradingSettings(timeout, args.jobs))
    totals = table.groupby("student")[["points", "max"]].sum()
    print(totals.to_string())
    print(f"wrote {args.out} and {feedback_folder(args.out, args.feedback) / '<student>.md'}")


def _prune(args: argparse.Namespace) -> None:
    flags = vars(args)
    job = {k: v for k, v in flags.items() if k not in ("command", "json", *CLI_FLAGS, *METHOD_FLAGS)}
    report = run_prune_job(PruneJob(PruneSpec.from_cli(flags), **job))
    if "rank" in report:  # another data-parallel rank: rank 0 prints
        return
    if args.json:
        print(strict_json(report))
        return
    if report["quality_warning"]:
        print(f"WARNING: {report['quality_warning']}")
    print(summary_table(report).to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\nmask sha256 {report['mask_sha256']}")
    if report["left_dense"]:
        reasons = sorted({d["reason"] for d in report["left_dense"]})
        print(f"left dense: {len(report['left_dense'])} weights ({'; '.join(reasons)}), listed in report.json")
    if report["empty_experts"]:
        print(f"{len(report['empty_experts'])} expert matrices received no calibration token and were pruned by "
              f"|W| alone: {', '.join(report['empty_experts'][:4])}{' …' if len(report['empty_experts']) > 4 else ''}")
    print(f"seconds: {', '.join(f'{k} {v:.1f}' for k, v in report['seconds'].items())}; "
          f"peak memory {report['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"\n{disk_table(report).to_string(formatters=DISK_FORMAT)}")
    print(f"saved to {report['output']}")


DISK_FORMAT = {"dense bytes": "{:,}".format, "sparse bytes": "{:,}".format, "sparse / dense": "{:.1%}".format}


def _export(args: argparse.Namespace) -> None:
    if args.format == "gguf":
        out = export_gguf(args.folder, args.out, args.quant or "f16")
        print(f"wrote {out}: {out.stat().st_size:,} bytes, weights {args.quant or 'f16'}, a complete llama.cpp model "
              f"(llama-cli -m {out})")
        return
    if args.quant is not None:
        raise BadInput(f"--quant {args.quant} goes with --format gguf; a dense export keeps the model's own dtype")
    out = export_dense(args.folder, args.out)
    print(disk_table(load_report(out)).to_string(formatters=DISK_FORMAT))
    print(f"wrote {out}: an ordinary transformers folder (AutoModelForCausalLM.from_pretrained({str(out)!r}))")


def _prepare(args: argparse.Namespace) -> None:
    path = embedded_model_dir(verify="full")
    splits = ("calibration", "validation", "test")
    sizes = {split: len(corpus_split(split)) for split in splits}
    tokenizer = folder_tokenizer(path)
    print(f"default model ready at {path} (every file checked against its manifest)")
    print(f"corpus articles per split: {sizes}")
    if tokenizer is not None:  # tokenized once here, then read from the cache by every run
        tokens = {split: split_tokens(tokenizer, split).numel() for split in splits}
        print(f"tokens per split with its tokenizer: {tokens} (kept in {cache_dir() / 'tokens'})")


def _bench_prune(args: argparse.Namespace) -> None:
    check_seed(args.seed)  # before the first line is printed: a bad option prints nothing but its error
    setup = bench_setup(args.tiny, args.device, specs=[PruneSpec(args.method, t) for t in args.targets],
                        modes=args.modes, seed=args.seed,
                        sizes={"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size})
    json_path = check_can_write(args.json_path or default_json_path(setup), "--json")  # before the benchmark runs
    if args.baseline is not None:
        read_baseline(args.baseline, setup)  # a wrong file is one line before any work
    print(f"bench-prune {setup.describe()}", flush=True)
    result = bench_prune(setup, on_row=lambda partial: write_json(partial, json_path), baseline=args.baseline)
    table = result.table()
    table["mask sha256"] = table["mask sha256"].str[:12]  # the JSON keeps the whole hash
    with pd.option_context("display.width", 200, "display.max_columns", 10):
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    for goal, met in result.goals().items():
        print(f"{'met' if met else 'NOT met'}: {goal}")
    print(f"wrote {json_path} (after every row)")
    print(summary_line(result.to_json()))


def _readme(args: argparse.Namespace) -> None:
    path = Path(args.readme)
    if not path.is_file():
        raise BadInput(f"--readme {path}: no such file; allowed: the lab's README.md")
    print(f"{path}: {'tables rewritten from results/' if update_readme(path) else 'already equal to results/'}")


COMMANDS = {"prune": _prune, "export": _export, "prepare": _prepare, "bench-prune": _bench_prune,
            "student": _student, "grade": _grade, "readme": _readme}


def _say(line: str) -> None:
    """``line`` on stderr in one write, newline included: ranks of one torchrun share that stream, and print()'s
    separate newline let two ranks' errors run into one line."""
    text = line + "\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (pytest's capsys)
        sys.stderr.write(text)
        return
    sys.stderr.flush()
    os.write(fd, text.encode())


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is KeyboardInterrupt again (see __init__)
    args = build_parser().parse_args(argv)
    PUBLISHED.clear()  # what an earlier command of this process published is not this one's output
    interrupt_on_termination()  # SIGTERM and SIGHUP clean up like Ctrl-C
    rank = ""
    try:
        rank = f"rank {os.environ['RANK']}: " if launched_ranks() > 1 and "RANK" in os.environ else ""
        COMMANDS[args.command](args)
    except LabError as exc:
        _say(f"{rank}error: {exc}")
        return 2
    except MemoryError:
        _say(f"{rank}error: out of memory: this machine cannot hold what the command asked for (use fewer "
             "--nsamples, shorter --seqlen, a smaller --batch-size or --eval-tokens); nothing was published")
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (publish.Terminated)
        code = 128 + getattr(exc, "signum", 2)
        outputs = [path for path, kind in PUBLISHED if kind == OUTPUT_KIND]  # not the model cache it rebuilt
        if outputs:
            print(f"interrupted after {outputs[-1]} was published: the new model is in place", file=sys.stderr)
            return 0
        why = (" — torchrun stopped this rank because another one failed (its error is above)"
               if rank and code != 130 else "")
        print(f"{rank}interrupted ({'Ctrl-C' if code == 130 else exc}{why}): nothing was published (an earlier "
              "output folder is unchanged)", file=sys.stderr)
        return code
    finally:  # a signal while the interpreter shuts down (torchrun stopping the other ranks) just ends it
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
    return 0
