"""2:4 sparse speed on a CUDA GPU: Llama-2-7B shapes, random fp16 weights, cuSPARSELt kernels.

Builds the ``llama2-7b-random`` profile's model (random init directly on the GPU, float16), prunes every decoder
linear to 2:4 by magnitude (cheap; quality means nothing with random weights), compresses a copy to cuSPARSELt 2:4
weights, checks its logits against the masked dense model, and times prefill (eager and CUDA-graphed) at
512–8192 tokens and batch-1 decode. Prints the tables and writes them as JSON.
First every weight shape is timed alone (dense vs 2:4 with cuSPARSELt's algorithm 0; ``--search`` adds the searched plan), then
the whole model for each of ``--kernels``: ``lab`` (default; the lab's ``SparseLinear24``, one direct cuSPARSELt
call per linear: see ``labutils/sparse24/kernel.py``) and/or ``stock`` (torch's ``SparseSemiStructuredTensor`` weights).

    python benchmarks/gpu_semistructured.py            # the GPU run; writes results/gpu_semistructured.json
    # what benchmarks/gpu_run.sh runs for goal (c), one kernel per process (a sticky CUDA error ends only its own):
    python benchmarks/gpu_semistructured.py --parts model --kernels lab --lengths 4096 --warm-linears \
        --verify-tokens 4096 --memory-tokens 4096 --decode-tokens 0 --out OUT/prefill-lab.json
    python benchmarks/gpu_semistructured.py --tiny     # a tiny model, any machine: smoke test; on a CPU it
                                                       # says why the 2:4 kernels are skipped

Run from the repository root with the lab installed (``make setup``), or prefix ``PYTHONPATH=.``.

Positions: Llama-2-7B was trained with 4096; for 8192-token prefills the configuration allows 8192
(``--max-positions``). RoPE has no weights, so every weight shape stays Llama-2-7B's.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from transformers import LlamaConfig

from labutils.core.anatomy import max_sequence_length
from labutils.core.config import get_profile
from labutils.core.device import device_summary, get_device, require_cuda, set_seed
from labutils.core.errors import LabError
from labutils.core.loading import LLAMA2_7B_CONFIG, random_model, tiny_llama_config
from labutils.core.manifests import write_json_atomic
from labutils.jobs.compare import table_records
from labutils.prune.masks import SparsityTarget, prune_by_score
from labutils.prune.methods import magnitude_score
from labutils.prune.sparsity import nm_violations, prunable_linears
from labutils.sparse24.convert import (
    backend_name,
    semi_structured_ready,
    to_semi_structured,
    verify_semi_structured,
)
from labutils.sparse24.prefill import PrefillSettings, first_calls, prefill_speedup_table
from labutils.sparse24.shapes import LinearTimingSettings, linear_shapes, linear_speedup_table
from labutils.speed.latency import latency_table, memory_table, random_prompt

PROFILE = "llama2-7b-random"
TINY_LENGTHS = (128, 256, 512, 1024)
KERNEL_CHOICES = ("lab", "lab-fused", "stock")  # the tiny model has 512 positions: 1024 shows the "skipped" row
PREFILL_GOAL = 1.2  # goal (c): the 2:4 model's prefill at 4096 tokens ≥ 1.2× dense, replayed from CUDA graphs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model with 64/128-multiple dims (smoke test)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="prefill lengths (default 512..8192)")
    parser.add_argument("--max-positions", type=int, default=8192, help="max_position_embeddings of the 7B config")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed (0: no decode row)")
    parser.add_argument("--verify-tokens", type=int, default=256,
                        help="prompt length of the logits check against the masked dense model")
    parser.add_argument("--memory-tokens", type=int, default=None,
                        help="prefill length of the memory table (default 2048; tiny: 256)")
    parser.add_argument("--warm-linears", action="store_true",
                        help="before the whole model, call each 2:4 weight shape once at every token count used "
                             "(prefill lengths, verify and memory tokens) and record what each first call cost")
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
    record = Record(args.out or (None if args.tiny else Path("results/gpu_semistructured.json")))
    dense, dtype, description = build_model(args.tiny, args.max_positions, device, args.seed)
    step(f"built {description} in {dtype} on {device}")
    step(f"pruned to 2:4 by magnitude; groups breaking 2:4: {prune_2_4(dense)}")
    ready, reason = semi_structured_ready(dense)
    record.update(benchmark="gpu-semistructured", model=description, dtype=str(dtype), device=device_summary(device),
                  backend=backend_name(), semi_structured_ready=ready, reason=reason, complete=False)
    if ready:
        parts = {"linears": lambda: record.update(linears=run_linears(dense, args, step))} \
            if "linears" in args.parts else {}
        if "model" in args.parts:
            parts.update({kernel: partial(run_sparse, dense, args, step, kernel, record.section(kernel), record.save)
                          for kernel in args.kernels})
        broken = None  # set after a sticky CUDA error: every later CUDA call of this process would fail
        for name, run in parts.items():
            if broken is not None:
                record.section(name)["error"] = f"not run: the CUDA context broke earlier ({broken})"
                record.save()
                step(f"{name} not run: the CUDA context broke earlier")
                continue
            try:
                run()
            except (LabError, RuntimeError) as exc:  # one kernel failing must not cost the others' numbers
                record.section(name)["error"] = f"{type(exc).__name__}: {exc}"
                record.save()
                step(f"{name} FAILED: {type(exc).__name__}: {exc}")
                broken = release_gpu_memory()
    else:
        step(f"2:4 sparse kernels skipped: {reason}")
        try:
            to_semi_structured(dense)
        except LabError as exc:
            step(f"to_semi_structured refuses as it should: {exc}")
        dense_only = latency_table({"dense (2:4 masked)": dense}, prompt_len=64, new_tokens=8, warmup=1, repeats=3,
                                   progress=False)
        print(dense_only.round(2).to_string())
        record.update(dense_latency=table_records(dense_only))
    record.update(complete=True)
    step("done")
    print(summary_line(record.record), flush=True)
    return 1 if any(isinstance(v, dict) and "error" in v for v in record.record.values()) else 0


class Record:
    """The run's JSON record, saved again (atomically) after every update: a run killed by its time limit keeps
    every row it finished. ``section(name)`` is the dict a part fills as it goes, calling ``save()`` after each
    result. No file when ``path`` is None (``--tiny``)."""

    def __init__(self, path: Path | None):
        self.path, self.record = path, {}

    def update(self, **fields) -> None:
        self.record.update(fields)
        self.save()

    def section(self, name: str) -> dict:
        return self.record.setdefault(name, {})

    def save(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.record)


def release_gpu_memory() -> str | None:
    """Free the cached GPU memory after a failed part; None when that worked. After a sticky CUDA error (an illegal
    instruction, seen on an H200 after cuSPARSELt's search) every CUDA call raises again, ``empty_cache`` too: the
    error is returned instead of raised, and the caller runs nothing more on this process's GPU."""
    if not torch.cuda.is_available():
        return None
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def summary_line(record: dict) -> str:
    """One line for a saved record (complete or cut short): per kernel, the 2:4 prefill against dense, replayed from
    CUDA graphs (what goal (c) is judged on: ≥ 1.2× at 4096 tokens) and eager, at each length measured."""
    if record.get("semi_structured_ready") is False:
        return f"2:4 prefill: no 2:4 kernels here ({record.get('reason')})"
    parts = []
    for kernel in KERNEL_CHOICES:
        section = record.get(kernel)
        if not isinstance(section, dict):
            continue
        timed = [row for row in section.get("speed", []) if row.get("phase") == "prefill" and "graphed × dense" in row]
        text = f"{kernel}: " + (", ".join(
            f"{row['tokens']} tokens graphed {row['graphed × dense']:.2f}× dense "
            f"({'met' if row['graphed × dense'] >= PREFILL_GOAL else 'NOT met'} ≥ {PREFILL_GOAL}), "
            f"eager {row['eager × dense']:.2f}×" for row in timed) if timed else "no prefill timed")
        if "error" in section:
            text += f" ({section['error'][:100]})"
        elif "verify" in section and not section["verify"].get("passed"):
            text += " (LOGITS CHECK FAILED)"
        parts.append(text)
    if isinstance(record.get("linears"), dict) and "error" in record["linears"]:
        parts.append(f"linears: {record['linears']['error'][:100]}")
    tail = "complete" if record.get("complete") else "CUT SHORT"
    return "2:4 prefill · " + " · ".join(parts or ["nothing measured"]) + f" · {tail}"


def run_linears(dense, args: argparse.Namespace, step) -> list[dict]:
    """Each weight shape alone: dense vs 2:4 (algorithm 0 and searched) at several token counts; with
    ``--fused-shapes`` also the stacked q/k/v and gate/up shapes that ``lab-fused`` multiplies."""
    shapes = linear_shapes(dense)
    if args.fused_shapes:  # a stacked shape equal to a single one keeps both names
        for shape, names in linear_shapes(dense, fused=True).items():
            shapes.setdefault(shape, []).extend(n for n in names if n not in shapes.get(shape, []))
    lengths = tuple(args.linear_lengths or ((64, 256) if args.tiny else (512, 2048, 4096, 8192)))
    table = linear_speedup_table(list(shapes), lengths, LinearTimingSettings(search=args.search),
                                 dtype=next(dense.parameters()).dtype, progress=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(3).to_string(), flush=True)
    step("timed each linear shape alone (" + "; ".join(f"{o}×{i}: {', '.join(n)}" for (o, i), n in shapes.items())
         + ")")
    return table_records(table)


def run_sparse(dense, args: argparse.Namespace, step, kernel: str, section: dict, save) -> None:
    """Compress a copy, warm its GEMMs (``--warm-linears``), verify it, and time it against the masked dense model;
    ``section`` (the record's entry for this kernel) is filled as it goes and ``save()`` called after every result
    and every row."""
    sparse = copy.deepcopy(dense)
    report = to_semi_structured(sparse, alg_search_tokens=args.alg_search_tokens, kernel=kernel.removesuffix("-fused"),
                                fuse=kernel.endswith("-fused"))
    step(f"compressed {len(report.converted)} linears with {report.backend} ({report.kernel} kernel): "
         f"{report.dense_mib:.0f} MiB → {report.compressed_mib:.0f} MiB ({report.compression:.2f}); "
         f"alg ids {sorted(set(report.alg_ids.values()))}")
    section["conversion"] = {"kernel": report.kernel, "backend": backend_name(), "converted": len(report.converted),
                             "fused groups": len(report.fused), "dense_mib": report.dense_mib,
                             "compressed_mib": report.compressed_mib, "alg_ids": sorted(set(report.alg_ids.values()))}
    save()
    lengths = tuple(args.lengths or (TINY_LENGTHS if args.tiny else (512, 1024, 2048, 4096, 8192)))
    memory_tokens = args.memory_tokens or (256 if args.tiny else 2048)
    if args.warm_linears:
        limit = max_sequence_length(dense)
        counts = sorted({n for n in (*lengths, args.verify_tokens, memory_tokens) if n <= limit})
        warm = section.setdefault("first calls", [])
        first_calls(sparse, counts, seed=args.seed, on_row=lambda row: (warm.append(row), save()))
        slowest = max(warm, key=lambda row: row["first call s"])
        step(f"warmed {len(warm)} (2:4 shape, tokens) pairs; slowest first call {slowest['first call s']:.2f} s "
             f"({slowest['shape (out, in)']} at {slowest['tokens']} tokens)")
    check = verify_semi_structured(dense, sparse, random_prompt(dense, args.verify_tokens, 1, args.seed))
    step(f"logits vs masked dense: max |diff| {check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g}, "
         f"max |logit| {check.max_abs_reference:.3g}), top-1 agreement {check.top1_agreement:.1%}: "
         f"{'PASS' if check.passed else 'FAIL'}")
    section["verify"] = {**asdict(check), "tokens": args.verify_tokens}
    save()
    memory = memory_table({"dense (2:4 masked)": dense, "2:4 cuSPARSELt": sparse}, prompt_len=memory_tokens,
                          seed=args.seed)
    print(memory.round(3).to_string(), flush=True)
    section["memory"] = table_records(memory)
    save()
    speed = section.setdefault("speed", [])
    timing = PrefillSettings(warmup=args.warmup, repeats=args.repeats, decode_tokens=args.decode_tokens,
                             decode_repeats=args.decode_repeats, seed=args.seed)
    table = prefill_speedup_table(dense, sparse, lengths, timing, progress=False,
                                  on_row=lambda row: (speed.append(_plain(row)), save()))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(3).to_string(), flush=True)
    step(f"timed prefill{' and decode' if args.decode_tokens else ''} ({kernel} kernel)")
    del sparse
    torch.cuda.empty_cache()


def _plain(row: dict) -> dict:
    """A table row as JSON takes it (numpy scalars as Python numbers)."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


if __name__ == "__main__":
    sys.exit(main())
