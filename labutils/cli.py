"""Command line: ``python -m labutils prune …`` (the main job) and ``python -m labutils prepare``."""
from __future__ import annotations

import argparse
import json
import sys

from .config import DEFAULT_PROFILE, PROFILES
from .errors import LabError
from .pipeline import PruneJob, run_prune_job, summary_table
from .pruning import METHODS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m labutils", description="Wanda pruning lab")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model, evaluate dense and pruned perplexity, save the result",
                           description="With no options: Wanda, 50%% unstructured, on the embedded default model.")
    prune.add_argument("--profile", choices=list(PROFILES), default=None,
                       help=f"lab profile (default: $LAB_PROFILE or {DEFAULT_PROFILE})")
    prune.add_argument("--method", default="wanda", help=f"one of {', '.join(METHODS)} (default: wanda)")
    prune.add_argument("--true-sequential", action="store_true",
                       help="re-collect o_proj and down_proj statistics after the sublayers before them are pruned")
    prune.add_argument("--owl", action="store_true", help="OWL: per-layer sparsity from outlier ratios (unstructured)")
    prune.add_argument("--owl-m", type=float, default=None, help="OWL outlier threshold, × layer mean (default 5)")
    prune.add_argument("--owl-lambda", type=float, default=None, help="OWL sparsity spread λ (default 0.08)")
    prune.add_argument("--alpha", type=float, default=None, help="RIA: exponent of the activation norm (default 0.5)")
    prune.add_argument("--dampening", type=float, default=None,
                       help="SparseGPT: share of the mean Hessian diagonal added to it (default 0.01)")
    prune.add_argument("--blocksize", type=int, default=None, help="SparseGPT: columns per block (default 128)")
    target = prune.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, default=None, help="unstructured sparsity in [0, 1) (default 0.5)")
    target.add_argument("--nm", default=None, help="N:M semi-structured pattern, e.g. 2:4 or 4:8")
    prune.add_argument("--nsamples", type=int, default=None, help="calibration windows (profile default)")
    prune.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (profile default)")
    prune.add_argument("--eval-tokens", type=int, default=None, help="test tokens for perplexity (profile default)")
    prune.add_argument("--eval-seqlen", type=int, default=None, help="tokens per perplexity window (profile default)")
    prune.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (profile default)")
    prune.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    prune.add_argument("--out", default=None, help="output folder (default outputs/<profile>-<method>-<target>)")
    prune.add_argument("--model", dest="model_path", default=None,
                       help="local folder or hub id replacing the profile's model")
    prune.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    prune.add_argument("--json", action="store_true", help="print the whole report as JSON instead of a table")

    sub.add_parser("prepare", help="convert the embedded model once and check the corpus (setup runs this)")
    return parser


def _prune(args: argparse.Namespace) -> None:
    method_params = ("alpha", "dampening", "blocksize")
    options = {k: v for k, v in vars(args).items() if k not in ("command", "json", *method_params)}
    params = {k: getattr(args, k) for k in method_params if getattr(args, k) is not None}
    report = run_prune_job(PruneJob(**options, params=params))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return
    if report["quality_warning"]:
        print(f"WARNING: {report['quality_warning']}")
    print(summary_table(report).to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\nmask sha256 {report['mask_sha256']}")
    print(f"seconds: {', '.join(f'{k} {v:.1f}' for k, v in report['seconds'].items())}")
    print(f"saved to {report['output']}")


def _prepare() -> None:
    from .data import corpus_split
    from .models import embedded_model_dir

    path = embedded_model_dir()
    sizes = {split: len(corpus_split(split)) for split in ("calibration", "validation", "test")}
    print(f"default model ready at {path}")
    print(f"corpus articles per split: {sizes}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prune":
            _prune(args)
        else:
            _prepare()
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
