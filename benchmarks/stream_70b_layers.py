"""Per-layer figures of disk-streamed pruning at Llama-2-70B's layer shape, on whatever machine runs it (docs/gpu.md "70B").

    python benchmarks/stream_70b_layers.py WORK [--layers 2] [--method wanda] [--dtype bfloat16] [-- PRUNE_OPTIONS]

Writes a random model with Llama-2-70B's decoder layers (8192 wide, 28672 in the MLP, 64 query and 8 key-value
heads) to WORK/model — ``--layers`` of them, in ``--dtype`` on disk, with the default model's 49152-token
vocabulary so that its tokenizer makes the calibration text —, then prunes it with ``python -m labutils prune
--stream-from-disk`` (the default profile: float32 on a CPU) and prints the run's per-layer seconds and peak
memory as JSON (also written to WORK/figures.json). Every number of docs/gpu.md's 70B section that says "measured
on the CPU" comes from this script.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from labutils.core.loading import embedded_model_dir
from labutils.prune.disk import write_random_checkpoint

LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--dtype", default="bfloat16")
    args, prune_options = parser.parse_known_args()
    prune_options = [o for o in prune_options if o != "--"] or ["--nsamples", "8", "--seqlen", "128",
                                                                "--eval-tokens", "512", "--eval-seqlen", "128",
                                                                "--batch-size", "4"]
    model = args.work / "model"
    start = time.perf_counter()
    size = write_random_checkpoint(model, LlamaConfig(num_hidden_layers=args.layers, vocab_size=49152, **LLAMA2_70B),
                                   getattr(torch, args.dtype))
    written = time.perf_counter() - start
    out = args.work / "out"
    command = [sys.executable, "-m", "labutils", "prune", "--stream-from-disk", "--model", str(model), "--tokenizer",
               str(embedded_model_dir()), "--method", args.method, "--out", str(out), *prune_options]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    report = json.loads((out / "report.json").read_text())
    figures = {"layers": args.layers, "dtype on disk": args.dtype, "compute dtype": report["dtype"],
               "bytes on disk": size, "seconds to write the model": round(written, 1),
               "seconds of the whole run": round(time.perf_counter() - start, 1),
               "prune seconds": report["seconds"]["prune"], "layer seconds": report.get("layer_seconds"),
               "peak RSS GiB": round(report["peak_rss_bytes"] / 2**30, 2), "command": " ".join(command),
               "calibration": f"{report['nsamples']} x {report['seqlen']}", "device": report["device"]}
    (args.work / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
