"""2:4 sparse speed on a CUDA GPU: Llama-2-7B shapes, random fp16 weights, cuSPARSELt kernels.

Builds the ``llama2-7b-random`` profile's model (random init directly on the GPU, float16), prunes every decoder
linear to 2:4 by magnitude (cheap; quality means nothing with random weights), compresses a copy to cuSPARSELt 2:4
weights, checks its logits against the masked dense model, and times prefill (eager and CUDA-graphed) at
512–8192 tokens and batch-1 decode. Prints the tables and writes them as JSON.
First every weight shape is timed alone (dense vs 2:4 with cuSPARSELt's algorithm 0; ``--search`` adds the searched plan), then
the whole model for each of ``--kernels``: ``lab`` (default; the lab's ``SparseLinear24``, one direct cuSPARSELt
call per linear: see ``labutils/sparse24/kernel.py``) and/or ``stock`` (torch's ``SparseSemiStructuredTensor`` weights).

    python benchmarks/gpu_semistructured.py            # the GPU run; writes results/gpu_semistructured.json
    python benchmarks/gpu_semistructured.py --tiny     # a tiny model, any machine: smoke test; on a CPU it
                                                       # says why the 2:4 kernels are skipped

Run from the repository root with the lab installed (``make setup``), or prefix ``PYTHONPATH=.``.

Positions: Llama-2-7B was trained with 4096; for 8192-token prefills the configuration allows 8192
(``--max-positions``). RoPE has no weights, so every weight shape stays Llama-2-7B's.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from transformers import LlamaConfig

from labutils.core.config import get_profile
from labutils.core.device import device_summary, get_device, require_cuda, set_seed
from labutils.core.errors import LabError
from labutils.core.models import LLAMA2_7B_CONFIG, random_model, tiny_llama_config
from labutils.jobs.compare import table_records
from labutils.prune.masks import SparsityTarget, prune_by_score
from labutils.prune.methods import magnitude_score
from labutils.prune.sparsity import nm_violations, prunable_linears
from labutils.sparse24.prefill import prefill_speedup_table
from labutils.sparse24.convert import (
    semi_structured_ready,
    to_semi_structured,
    verify_semi_structured,
)
from labutils.sparse24.shapes import linear_shapes, linear_speedup_table
from labutils.speed.latency import latency_table, memory_table, random_prompt

PROFILE = "llama2-7b-random"
TINY_LENGTHS = (128, 256, 512, 1024)
KERNEL_CHOICES = ("lab", "lab-fused", "stock")  # the tiny model has 512 positions: 1024 shows the "skipped" row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model with 64/128-multiple dims (smoke test)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="prefill lengths (default 512..8192)")
    parser.add_argument("--max-positions", type=int, default=8192, help="max_position_embeddings of the 7B config")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-repeats", type=int, default=2)
    parser.add_argument("--alg-search-tokens", type=int, default=None,
                        help="run cuSPARSELt's algorithm search per weight shape for this many tokens (off by default)")
    parser.add_argument("--kernels", nargs="+", choices=KERNEL_CHOICES, default=["lab"],
                        help="lab: SparseLinear24 modules (default); lab-fused: the same with q/k/v and gate/up fused "
                             "into one 2:4 GEMM each; stock: torch's SparseSemiStructuredTensor weights; several: one "
                             "table each")
    parser.add_argument("--parts", nargs="+", choices=("linears", "model"), default=["linears", "model"],
                        help="linears: each weight shape alone; model: the whole model per kernel (default: both)")
    parser.add_argument("--search", action="store_true",
                        help="the per-linear table also times the plan cuSPARSELt's search picks (refused where the "
                             "search is known to break: see labutils.sparse24.kernel.BROKEN_SEARCH)")
    parser.add_argument("--fused-shapes", action="store_true",
                        help="the per-linear table also times the fused q/k/v and gate/up shapes")
    parser.add_argument("--linear-lengths", type=int, nargs="+", default=None,
                        help="token counts of the per-linear timing (default 512 2048 4096 8192; tiny: 64 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default results/gpu_semistructured.json; none with --tiny)")
    return parser.parse_args(argv)


def build_model(tiny: bool, max_positions: int, device: torch.device, seed: int):
    """(model, dtype, description): the profile's random 7B in float16 on the GPU, or a tiny Llama."""
    if tiny:
        config = tiny_llama_config(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=512)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        return random_model(config, dtype, device, seed), dtype, "tiny Llama (2 layers, hidden 256, mlp 512)"
    profile = get_profile(PROFILE)
    require_cuda(f"profile {PROFILE!r}")
    dtype = getattr(torch, profile.dtype)
    config = LlamaConfig(**{**LLAMA2_7B_CONFIG, "max_position_embeddings": max_positions})
    return random_model(config, dtype, device, seed), dtype, f"{profile.model_id}, {max_positions} positions"


@torch.no_grad()
def prune_2_4(model) -> int:
    """Magnitude 2:4 on every decoder linear; returns the number of groups still breaking 2:4 (0)."""
    target = SparsityTarget.of(nm="2:4")
    for linear in prunable_linears(model).values():
        prune_by_score(linear, magnitude_score(linear.weight), target)
    return sum(nm_violations(linear.weight, 2, 4) for linear in prunable_linears(model).values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

    set_seed(args.seed)
    device = get_device()
    step(f"device: {device_summary(device)}")
    dense, dtype, description = build_model(args.tiny, args.max_positions, device, args.seed)
    step(f"built {description} in {dtype} on {device}")
    step(f"pruned to 2:4 by magnitude; groups breaking 2:4: {prune_2_4(dense)}")
    ready, reason = semi_structured_ready(dense)
    result = {"model": description, "dtype": str(dtype), "device": device_summary(device),
              "semi_structured_ready": ready, "reason": reason}
    out = args.out or (None if args.tiny else Path("results/gpu_semistructured.json"))
    if ready:
        parts = {"linears": lambda: run_linears(dense, args, step)} if "linears" in args.parts else {}
        if "model" in args.parts:
            parts.update({kernel: partial(run_sparse, dense, args, step, kernel) for kernel in args.kernels})
        for name, run in parts.items():
            try:
                result[name] = run()
            except (LabError, RuntimeError) as exc:  # one kernel failing must not cost the others' numbers
                result[name] = {"error": f"{type(exc).__name__}: {exc}"}
                step(f"{name} FAILED: {type(exc).__name__}: {exc}")
                torch.cuda.empty_cache()
            write_result(out, result, step)  # after every part: a run cut short keeps what it measured
    else:
        step(f"2:4 sparse kernels skipped: {reason}")
        try:
            to_semi_structured(dense)
        except LabError as exc:
            step(f"to_semi_structured refuses as it should: {exc}")
        dense_only = latency_table({"dense (2:4 masked)": dense}, prompt_len=64, new_tokens=8, warmup=1, repeats=3,
                                   progress=False)
        print(dense_only.round(2).to_string())
        result["dense_latency"] = table_records(dense_only)
        write_result(out, result, step)
    step("done")
    return 0


def write_result(out: Path | None, result: dict, step) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        step(f"wrote {out}")


def run_linears(dense, args: argparse.Namespace, step) -> list[dict]:
    """Each weight shape alone: dense vs 2:4 (algorithm 0 and searched) at several token counts; with
    ``--fused-shapes`` also the stacked q/k/v and gate/up shapes that ``lab-fused`` multiplies."""
    shapes = linear_shapes(dense)
    if args.fused_shapes:  # a stacked shape equal to a single one keeps both names
        for shape, names in linear_shapes(dense, fused=True).items():
            shapes.setdefault(shape, []).extend(n for n in names if n not in shapes.get(shape, []))
    lengths = tuple(args.linear_lengths or ((64, 256) if args.tiny else (512, 2048, 4096, 8192)))
    table = linear_speedup_table(list(shapes), lengths, dtype=next(dense.parameters()).dtype, search=args.search,
                                 progress=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(3).to_string(), flush=True)
    step("timed each linear shape alone (" + "; ".join(f"{o}×{i}: {', '.join(n)}" for (o, i), n in shapes.items())
         + ")")
    return table_records(table)


def run_sparse(dense, args: argparse.Namespace, step, kernel: str) -> dict:
    """Compress a copy, verify it, and time it against the masked dense model."""
    sparse = copy.deepcopy(dense)
    report = to_semi_structured(sparse, alg_search_tokens=args.alg_search_tokens, kernel=kernel.removesuffix("-fused"),
                                fuse=kernel.endswith("-fused"))
    step(f"compressed {len(report.converted)} linears with {report.backend} ({report.kernel} kernel): "
         f"{report.dense_mib:.0f} MiB → {report.compressed_mib:.0f} MiB ({report.compression:.2f}); "
         f"alg ids {sorted(set(report.alg_ids.values()))}")
    check = verify_semi_structured(dense, sparse, random_prompt(dense, 256, 1, args.seed))
    step(f"logits vs masked dense: max |diff| {check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g}, "
         f"max |logit| {check.max_abs_reference:.3g}), top-1 agreement {check.top1_agreement:.1%}: "
         f"{'PASS' if check.passed else 'FAIL'}")
    memory = memory_table({"dense (2:4 masked)": dense, "2:4 cuSPARSELt": sparse}, prompt_len=2048 if not args.tiny
                          else 256, seed=args.seed)
    print(memory.round(3).to_string(), flush=True)
    lengths = tuple(args.lengths or (TINY_LENGTHS if args.tiny else (512, 1024, 2048, 4096, 8192)))
    table = prefill_speedup_table(dense, sparse, lengths, warmup=args.warmup, repeats=args.repeats,
                                  decode_tokens=args.decode_tokens, decode_repeats=args.decode_repeats, seed=args.seed,
                                  progress=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(3).to_string(), flush=True)
    step(f"timed prefill and decode ({kernel} kernel)")
    del sparse
    torch.cuda.empty_cache()
    return {"conversion": {"kernel": report.kernel, "converted": len(report.converted), "dense_mib": report.dense_mib,
                           "compressed_mib": report.compressed_mib, "alg_ids": sorted(set(report.alg_ids.values()))},
            "verify": asdict(check), "memory": table_records(memory),
            "speed": table_records(table)}


if __name__ == "__main__":
    sys.exit(main())
