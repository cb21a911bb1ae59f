"""What checking every byte costs a load: ``lu.load_pruned`` of the default model's Wanda 50 % save, sparse and
dense, with and without the manifest check, interleaved (docs/saving.md "Saving: what is guaranteed").

    python benchmarks/check_cost.py [--rounds 7]

Prunes the default model once (8 × 128 calibration tokens; the figures do not depend on the mask) into a temporary
folder, then times each load ``--rounds`` times and prints the medians, their ratio and ``verify_folder`` alone.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import labutils as lu
from labutils.core import manifests, saved


def load_seconds(folder: Path, check: bool) -> float:
    original = saved.check_intact
    if not check:
        saved.check_intact = lambda path: None
    try:
        start = time.perf_counter()
        lu.load_pruned(folder, "cpu")
        return time.perf_counter() - start
    finally:
        saved.check_intact = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as tmp:
        profile = lu.get_profile(None)
        model, tokenizer = lu.load_model(profile, torch.device("cpu"))
        calib = lu.calibration_data(profile, tokenizer, 8, 128, 0, vocab_size=model.config.vocab_size)
        lu.prune_model(model, lu.PruneSpec("wanda", 0.5), calib, 8, progress=False)
        folders = {fmt: lu.save_pruned(model, Path(tmp) / fmt, tokenizer, format=fmt) for fmt in ("sparse", "dense")}
        times: dict[tuple[str, bool], list[float]] = {}
        for _ in range(rounds):
            for fmt, folder in folders.items():
                for check in (False, True):
                    times.setdefault((fmt, check), []).append(load_seconds(folder, check))
        for fmt, folder in folders.items():
            bare, checked = (statistics.median(times[(fmt, c)]) for c in (False, True))
            start = time.perf_counter()
            manifests.verify_folder(folder)
            verify = time.perf_counter() - start
            print(f"{fmt}: {saved.model_file_bytes(folder) / 1e6:.0f} MB; load {bare:.3f} s without the check, "
                  f"{checked:.3f} s with every byte checked (medians of {rounds}): ×{checked / bare:.3f}; "
                  f"verify_folder alone {verify:.3f} s")


if __name__ == "__main__":
    main()
