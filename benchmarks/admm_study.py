"""ADMM against SparseGPT where users run it (issue J2): the whole model at the command line's settings, and single
layers across calibration sizes, iterations and ρ schedules. docs/admm-investigation.md reads both results files.

    python benchmarks/admm_study.py model     # ~10 min on 2 cores: results/<profile>-admm-cli.{csv,json}
    python benchmarks/admm_study.py layers    # ~5 min on 2 cores:  results/<profile>-admm-layers.{csv,json}

``model`` prunes the embedded model exactly as ``python -m labutils prune --method M --sparsity 0.5`` / ``--nm 2:4``
does with no size options (the profile's calibration windows and test tokens, seed 0): Wanda, SparseGPT, ADMM with
its default (gradual) mask and ADMM with Wanda's fixed mask, at 50 % and 2:4, in one ``lu.Comparison`` (same
calibration, same test tokens, times from the same run).

``layers`` asks why, one linear at a time, on the error that matters: each layer's output error on held-out windows
(H of 64 windows no fit saw), as a multiple of SparseGPT's fitted on the same calibration windows. The Hessians of
four linears (early, middle, late; attention and MLP) come from one hooked forward pass of the dense model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

import labutils as lu
from labutils.core.errors import BadInput

LINEARS = ("layers.0.mlp.down_proj", "layers.15.self_attn.q_proj", "layers.15.mlp.down_proj",
           "layers.29.mlp.up_proj")
CALIBRATION_SIZES = (16, 32, 64, 128)  # windows of the profile's seqlen; 32 is the command line's default
HELD_OUT = 64  # windows for the held-out error, drawn with another seed
# (label, AdmmSettings fields): the iterations and ρ schedules tried at the default calibration size
SCHEDULES = (("20 it, ρ 1 (default)", {}),
             ("50 it, ρ 1", {"iterations": 50}),
             ("100 it, ρ 1", {"iterations": 100}),
             ("20 it, ρ 0.3", {"rho": 0.3}),
             ("20 it, ρ 3", {"rho": 3.0}),
             ("50 it, ρ 0.1 × 1.15 per it", {"iterations": 50, "rho": 0.1, "rho_growth": 1.15}),
             ("50 it, gradual over 40", {"iterations": 50, "gradual_steps": 40}),
             ("20 it, ρ 1, whole-matrix mask", {"group": "layer"}))  # the release's unstructured selection


def model_study(profile_name: str, folder: Path | None) -> Path:
    profile = lu.get_profile(profile_name)
    lu.set_seed(0)
    dense, tokenizer = lu.load_model(profile, lu.get_device())
    vocab = dense.config.vocab_size
    calib = lu.calibration_data(profile, tokenizer, profile.nsamples, profile.seqlen, 0, vocab_size=vocab)
    test = lu.test_tokens(profile, tokenizer, profile.eval_tokens, vocab_size=vocab)
    print(f"{profile.name}: {profile.nsamples} × {profile.seqlen} calibration tokens, {profile.eval_tokens} test "
          "tokens (the command line's defaults)")
    result = lu.Comparison(profile, calib, test, dense)
    for target in (lu.as_target(0.5), lu.as_target("2:4")):
        result.add([lu.PruneSpec("wanda", target), lu.PruneSpec("sparsegpt", target), lu.PruneSpec("admm", target),
                    lu.PruneSpec("admm", target, params={"selection": "wanda"})])
    table = result.table
    sparsegpt = table[table["method"] == "sparsegpt"].set_index("target")
    table["perplexity / sparsegpt"] = table["perplexity"] / table["target"].map(sparsegpt["perplexity"])
    table["seconds / sparsegpt"] = table["seconds"] / table["target"].map(sparsegpt["seconds"])
    table["calibration windows"], table["seqlen"], table["test tokens"] = (profile.nsamples, profile.seqlen,
                                                                           profile.eval_tokens)
    path = lu.write_results(table, "admm-cli", profile, folder)
    print(table.round(3).to_string())
    return path


def hooked_hessians(model, windows: torch.Tensor, names: tuple[str, ...], batch_size: int, desc: str) -> dict:
    """H = 2 XᵀX (float32, on the CPU) of the named linears' inputs over ``windows``: one forward pass, hooked."""
    modules = dict(model.named_modules())
    missing = [n for n in names if not any(k.endswith(n) for k in modules)]
    if missing:
        raise BadInput(f"the model has no linear named {missing}")
    full = {n: next(k for k in modules if k.endswith(n)) for n in names}
    sums = {n: torch.zeros(modules[k].in_features, modules[k].in_features) for n, k in full.items()}

    def hook(name):
        def add(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
            sums[name].add_(2 * x.T @ x)
        return add

    handles = [modules[k].register_forward_pre_hook(hook(n)) for n, k in full.items()]
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch"):
                model(windows[start:start + batch_size].to(model.device))
    finally:
        for h in handles:
            h.remove()
    return {n: (modules[full[n]].weight.detach().float().cpu(), h) for n, h in sums.items()}


def layer_study(profile_name: str, folder: Path | None) -> Path:
    profile = lu.get_profile(profile_name)
    lu.set_seed(0)
    dense, tokenizer = lu.load_model(profile, lu.get_device())
    vocab = dense.config.vocab_size
    held = lu.calibration_data(profile, tokenizer, HELD_OUT, profile.seqlen, 1, vocab_size=vocab)
    held_h = hooked_hessians(dense, held, LINEARS, profile.batch_size, "held-out windows")
    fitted = {n: hooked_hessians(dense, lu.calibration_data(profile, tokenizer, n, profile.seqlen, 0,
                                                            vocab_size=vocab),
                                 LINEARS, profile.batch_size, f"{n} calibration windows")
              for n in CALIBRATION_SIZES}
    rows = []
    runs = [(target, n, name) for target in ("2:4", "50%") for n in CALIBRATION_SIZES for name in LINEARS]
    for target_label, n, name in tqdm(runs, desc="layers", unit="linear"):
        target = lu.as_target(target_label if target_label == "2:4" else 0.5)
        weight, hessian = fitted[n][name]
        test_h = held_h[name][1]
        sparsegpt_w, _ = lu.sparsegpt_weights(weight, hessian, target)
        base = lu.output_error(weight, sparsegpt_w, test_h)
        schedules = SCHEDULES if n == profile.nsamples else SCHEDULES[:1]
        if target.is_nm:  # N:M compares within groups of M: the mask's group does not apply
            schedules = [(label, fields) for label, fields in schedules if "group" not in fields]
        for label, fields in schedules:
            for selection in ("gradual", "wanda"):
                settings = lu.AdmmSettings(**{**fields, **({} if selection == "gradual" else {"gradual_steps": 0})})
                new_w, _ = lu.admm_update(weight, hessian, None, target, settings)
                rows.append({"target": target_label, "calibration windows": n, "linear": name, "schedule": label,
                             "selection": selection, "error / sparsegpt": lu.output_error(weight, new_w, test_h) / base,
                             "fit error / sparsegpt": lu.output_error(weight, new_w, hessian)
                             / lu.output_error(weight, sparsegpt_w, hessian)})
    table = pd.DataFrame(rows)
    summary = (table.groupby(["target", "calibration windows", "schedule", "selection"], sort=False)
               [["error / sparsegpt", "fit error / sparsegpt"]].mean())
    path = lu.write_results(summary, "admm-layers", profile, folder)
    print(summary.round(3).to_string())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=["model", "layers"])
    parser.add_argument("--profile", default=lu.DEFAULT_PROFILE)
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default $LAB_RESULTS or outputs/results; results/ is the committed one)")
    args = parser.parse_args(argv)
    try:
        path = (model_study if args.study == "model" else layer_study)(args.profile, args.out)
    except lu.LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
