"""Runs 02-Prune's from-scratch Wanda cell and ``lu.prune_model`` on one model, in this process's CPU capability
(``ATEN_CPU_CAPABILITY`` is read when torch loads, so tests/test_scratch_wanda.py starts one process per capability).

``python scratch_wanda_worker.py THREADS…``: for each thread count, prints one JSON line: the capability torch
uses, the thread count, both mask hashes, and how many output rows had equal scores at their pruning threshold
(the near-ties whose order used to depend on the kernel).

The model is a tiny random Llama built to tie: every linear's rows, and the embedding's columns, come in equal
pairs, so every activation has pairs of equal channels (equal norms ‖X_j‖ = ‖X_j+1‖), and weights take four values,
so a row's |W_ij|·‖X_j‖ and |W_i,j+1|·‖X_j+1‖ are often exactly equal — at the threshold too.
"""
import contextlib
import json
import sys
from pathlib import Path

import nbformat
import torch
from conftest import make_tiny, random_tokens
from tqdm import tqdm

import labutils as lu

NOTEBOOK = Path(__file__).resolve().parents[1] / "02-Prune.ipynb"
TAG = "wanda-from-scratch"  # the cell's tag in 02-Prune
SPARSITY, BATCH_SIZE = 0.5, 3


def scratch_cell_source() -> str:
    cells = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if TAG in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {TAG!r} in {NOTEBOOK.name}, found {len(cells)}"
    return cells[0].source


@torch.no_grad()
def tying_model() -> torch.nn.Module:
    """A 3-layer tiny Llama whose activations have equal channel pairs (see the module docstring)."""
    model = make_tiny(seed=5, num_hidden_layers=3)
    levels = torch.tensor([-0.1, -0.05, 0.05, 0.1])
    generator = torch.Generator().manual_seed(7)
    for name, param in model.named_parameters():
        if param.dim() != 2:
            continue
        param.copy_(levels[torch.randint(0, 4, param.shape, generator=generator)])
        if "embed_tokens" in name or "lm_head" in name:
            param[:, 1::2] = param[:, 0::2]  # hidden channels 2c and 2c + 1 start equal …
        else:
            param[1::2] = param[0::2]  # … and every linear writes equal pairs of outputs
    return model


def threshold_ties(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Rows of the dense model's linears whose k-th and (k+1)-th lowest Wanda scores are equal (layer inputs of the
    dense model: enough to show the model ties at thresholds)."""
    ties = 0
    inputs = lu.capture_layer_inputs(model, tokens, BATCH_SIZE)
    for i, layer in enumerate(lu.find_decoder_layers(model)):
        linears = lu.find_linears(layer)
        stats = lu.collect_statistics(layer, i, inputs, linears, "norms", advance=True)
        for name, lin in linears.items():
            score = lu.wanda_score(lin.weight, stats[name])
            k = int(lin.in_features * SPARSITY)
            ties += int((score.kthvalue(k, dim=1).values == score.kthvalue(k + 1, dim=1).values).sum())
    return ties


class _Lab:
    """``lu`` for the cell, except that ``load_model`` hands out a fresh copy of the tying model."""

    def __getattr__(self, name):
        return getattr(lu, name)

    @staticmethod
    def load_model(profile, device):
        return tying_model(), None


def run(threads: int) -> dict:
    torch.set_num_threads(threads)
    tokens = random_tokens((9, 16), seed=3)
    model = tying_model()
    library = lu.prune_model(model, lu.PruneSpec("wanda", SPARSITY), tokens, BATCH_SIZE, progress=False)
    space = {"contextlib": contextlib, "torch": torch, "tqdm": tqdm, "lu": _Lab(), "device": torch.device("cpu"),
             "calib": tokens, "SPARSITY": SPARSITY, "profile": type("P", (), {"batch_size": BATCH_SIZE})()}
    exec(compile(scratch_cell_source(), "02-Prune scratch cell", "exec"), space)
    return {"capability": torch.backends.cpu.get_cpu_capability(), "threads": threads,
            "library": library.mask_sha256, "scratch": lu.mask_sha256(space["scratch"]),
            "ties": threshold_ties(tying_model(), tokens)}


if __name__ == "__main__":
    for count in sys.argv[1:]:
        print(json.dumps(run(int(count))), flush=True)
