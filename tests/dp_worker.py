"""One rank of the data-parallel tests (tests/test_data_parallel.py), launched by torchrun with 2 processes on gloo.

``python dp_worker.py api OUT``: prune each case of ``CASES`` with ``lu.prune_model(…, parallel=…)`` and write this
rank's mask hashes and weight hashes to OUT/rank<r>.json; then run the CLI (``ARGV`` after ``--``) on the same
processes, as ``torchrun -m labutils prune --data-parallel`` would.
``python dp_worker.py fail OUT -- ARGV``: the CLI, with rank 1 dying (``os._exit``) when it reaches decoder layer 1,
as a process killed for memory would.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from conftest import make_tiny, random_tokens

import labutils as lu
from labutils.cli import main
from labutils.prune import disk

# name → (spec, model seed); 3 batches of 2 windows: rank 0 runs batches 0 and 2, rank 1 batch 1.
CASES = {
    "wanda": (lu.PruneSpec("wanda", 0.5), 0),
    "sparsegpt": (lu.PruneSpec("sparsegpt", 0.5), 1),
    "sparsegpt-2:4": (lu.PruneSpec("sparsegpt", "2:4"), 2),
    "owl": (lu.PruneSpec("wanda", 0.7, owl=lu.OwlConfig(m=3.0, lam=0.1)), 3),
}
TOKENS = dict(shape=(6, 16), seed=1)
BATCH_SIZE = 2


def weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prune_case(name: str, parallel=None) -> dict:
    spec, seed = CASES[name]
    model = make_tiny(seed=seed, num_hidden_layers=4)
    report = lu.prune_model(model, spec, random_tokens(**TOKENS), batch_size=BATCH_SIZE, progress=False,
                            parallel=parallel)
    return {"mask": report.mask_sha256, "weights": weights_sha256(model)}


def run_api(out: Path) -> None:
    parallel, _ = lu.start_data_parallel(torch.device("cpu"))
    result = {name: prune_case(name, parallel) for name in CASES}
    (out / f"rank{parallel.rank}.json").write_text(json.dumps(result))
    # The group stays up for the CLI run that follows (start_data_parallel joins it): a second group made after
    # destroying this one would find this one's stale addresses in torchrun's store.


def die_at_layer_1() -> None:
    attach = disk.DiskLayers.attach

    def attach_or_die(self, i):
        if i == 1 and os.environ["RANK"] == "1":
            os._exit(3)
        return attach(self, i)
    disk.DiskLayers.attach = attach_or_die


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    if mode == "api":
        run_api(out)
    elif mode == "fail":
        die_at_layer_1()
    sys.exit(main(argv) if argv else 0)
