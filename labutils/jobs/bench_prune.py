"""How fast can Wanda prune? The floor, the default mode and the low-memory mode in one run (04-Benchmark).

Wanda has to run every decoder layer twice on the calibration set: once with hooks to collect input norms, and
once more after pruning to make the next layer's inputs (the last layer needs only the first). Scoring and
selecting the mask cost little next to that, so those forward passes are the floor: ``forward_floor`` times
exactly them (capture of the first layer's inputs, then 2L − 1 layer passes) with the driver's own code and
batches. ``bench_prune`` builds one random model (on the GPU for the 7B shape), times the floor, then prunes a fresh
copy of the same weights for every spec (one per target) in the default mode and in
the low-memory mode (``offload``), and reports wall time, × floor, peak GPU memory and each mask's hash.

    python -m labutils bench-prune          # Llama-2-7B shapes, fp16, 128 × 4096 tokens: needs a CUDA GPU
    python -m labutils bench-prune --tiny   # a tiny Llama, any device: what the tests run
"""
from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from transformers import LlamaConfig

from ..core.anatomy import check_seqlen, find_decoder_layers
from ..core.config import get_profile
from ..core.device import get_device, require_cuda, set_seed, versions
from ..core.errors import BadInput
from ..core.loading import LLAMA2_7B_CONFIG, random_model, tiny_llama_config
from ..core.manifests import write_json_atomic
from ..core.validation import check_positive_int
from ..prune.driver import prune_model
from ..prune.offload import PinnedPool
from ..prune.placement import calibration_inputs
from ..prune.sparsity import mask_sha256
from ..prune.spec import PruneSpec, check_spec
from ..speed.timing import Measured, measure

MODES = ("default", "low-memory")
TARGETS = ("50%", "2:4")
FULL_PROFILE = "llama2-7b-random"
FULL_BATCH_SIZE = 4  # 4 × 4096 tokens per pass: big enough to fill an H200, small enough for ≤ 4 GiB low-memory
DEFAULT_SPECS = tuple(PruneSpec("wanda", t) for t in TARGETS)
GOALS = {"default": 1.05, "low-memory": 1.15}  # × floor, from the lab's issue tracker


@dataclass(frozen=True)
class BenchSetup:
    """One benchmark's model shape, calibration sizes and the pruning runs to time (each in every mode)."""

    name: str
    config: LlamaConfig
    dtype: torch.dtype
    device: torch.device
    nsamples: int
    seqlen: int
    batch_size: int
    specs: tuple[PruneSpec, ...] = DEFAULT_SPECS
    modes: tuple[str, ...] = MODES
    seed: int = 0

    def describe(self) -> dict:
        c = self.config
        return {"name": self.name, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
                "intermediate": c.intermediate_size, "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device), "nsamples": self.nsamples, "seqlen": self.seqlen,
                "batch_size": self.batch_size, "method": ", ".join(dict.fromkeys(s.variant for s in self.specs)),
                "seed": self.seed}


def bench_setup(tiny: bool = False, device: str | None = None, *, specs: Sequence[PruneSpec] | None = None,
                modes: Sequence[str] = MODES, seed: int = 0, sizes: dict[str, int] | None = None) -> BenchSetup:
    """The 7B setup (``llama2-7b-random`` profile: fp16, 128 × 4096 tokens, batch 4, CUDA only) or a tiny one
    (4 layers, 8 × 64 tokens, batch 2, any device). ``specs``: the runs to time (default: Wanda 50 % and 2:4);
    ``sizes``: overrides of nsamples, seqlen and batch_size. Everything is validated."""
    specs = DEFAULT_SPECS if specs is None else tuple(specs)
    if not specs:
        raise BadInput("give at least one PruneSpec to time; got none")
    targets = [check_spec(spec, "each of specs").target.label for spec in specs]
    if len(set(targets)) < len(targets):
        raise BadInput(f"each spec is a row named by its target: give each target once; got {', '.join(targets)}")
    for mode in modes:
        if mode not in MODES:
            raise BadInput(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    if not modes:
        raise BadInput(f"give at least one mode; got modes={list(modes)}")
    unknown = set(sizes or {}) - {"nsamples", "seqlen", "batch_size"}
    if unknown:
        raise BadInput(f"sizes takes nsamples, seqlen and batch_size; got {', '.join(sorted(unknown))}")
    if tiny:
        config = tiny_llama_config(num_hidden_layers=4, hidden_size=128, intermediate_size=256,
                                   max_position_embeddings=256)
        dev = get_device(device)
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        chosen = dict(nsamples=8, seqlen=64, batch_size=2)
    else:
        require_cuda(f"bench-prune at Llama-2-7B scale (profile {FULL_PROFILE!r}; --tiny runs anywhere)")
        profile = get_profile(FULL_PROFILE)
        config, dtype, dev = LlamaConfig(**LLAMA2_7B_CONFIG), getattr(torch, profile.dtype), get_device(device)
        chosen = dict(nsamples=profile.nsamples, seqlen=profile.seqlen, batch_size=FULL_BATCH_SIZE)
    chosen.update({k: check_positive_int(k, v) for k, v in (sizes or {}).items() if v is not None})
    check_seqlen(config, "seqlen", chosen["seqlen"])
    return BenchSetup("tiny" if tiny else FULL_PROFILE, config, dtype, dev, specs=specs, modes=tuple(modes),
                      seed=seed, **chosen)


@torch.no_grad()
def forward_floor(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> None:
    """The forward passes any Wanda run must make, through the driver's own code: capture the first layer's
    inputs, then each layer twice (the second pass feeds the next layer; the last layer runs once)."""
    device = next(model.parameters()).device
    inputs = calibration_inputs(model, tokens, batch_size, device, low_memory=False)
    layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        inputs.run(layer, i, advance=False)
        if i + 1 < len(layers):
            inputs.run(layer, i, advance=True)


@dataclass
class BenchResult:
    """What ``bench_prune`` measured; ``table()`` is the printed table, ``to_json()`` the saved record. ``complete``
    is False until the last row is in (the record is saved after every row); ``floor_from`` names the earlier run
    whose floor and default-mode masks this one compares with (``baseline``), if any."""

    setup: dict
    floor: Measured
    rows: list[dict] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    complete: bool = False
    floor_from: str = ""

    def table(self) -> pd.DataFrame:
        return _table(self.floor.seconds, self.floor.peak_gib, self.rows)

    def goals(self) -> dict[str, bool]:
        """Which of the lab's goals this run met: each mode's × floor, and identical masks in both modes."""
        met = {}
        for row in self.rows:
            met[f"{row['mode']} {row['target']} ≤ {GOALS[row['mode']]}× floor"] = row["× floor"] <= GOALS[row["mode"]]
            if row["mode"] == "low-memory":
                if isinstance(row["same masks as default"], bool):  # only when the default mode ran too
                    met[f"low-memory {row['target']} same masks as default"] = row["same masks as default"]
                if not math.isnan(row["peak GPU GiB"]):
                    met[f"low-memory {row['target']} ≤ 4 GiB"] = row["peak GPU GiB"] <= 4.0
        return met

    def to_json(self) -> dict:
        floor = {"seconds": self.floor.seconds, "peak_gib": _nan_to_none(self.floor.peak_gib)}
        if self.floor_from:
            floor["from"] = self.floor_from
        return {"benchmark": "bench-prune", "setup": self.setup, "environment": self.environment, "floor": floor,
                "rows": [{k: _nan_to_none(v) for k, v in row.items()} for row in self.rows], "goals": self.goals(),
                "complete": self.complete}


def _table(floor_seconds: float, floor_peak_gib: float | None, rows: list[dict]) -> pd.DataFrame:
    """The floor first (× floor 1), then one row per (mode, target)."""
    floor = {"mode": "floor: 2 passes / layer", "target": "", "seconds": floor_seconds, "× floor": 1.0,
             "peak GPU GiB": floor_peak_gib, "mask sha256": "", "same masks as default": ""}
    return pd.DataFrame([floor, *rows]).set_index(["mode", "target"])


def _nan_to_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def bench_prune(setup: BenchSetup, progress: bool = True, *, on_row=None,
                baseline: str | Path | None = None) -> BenchResult:
    """Floor, then every (mode, target) on a fresh copy of the same random weights and the same tokens.

    Only pruning is timed: the copy of the pristine weights, the low-memory mode's pinned CPU buffers (the
    activations' and the layers' own, reserved once: ``PinnedPool``) and the mask fingerprint are outside
    ``measure``. ``on_row(result)`` is called once the floor is measured and after every row (the CLI saves the
    JSON each time, so a run cut short keeps its rows). ``baseline``: the JSON of an earlier run of the same setup
    (the GPU run's default-mode step); its floor is used instead of measuring one and its default-mode masks are
    what a low-memory row is compared with."""
    earlier = read_baseline(baseline, setup) if baseline is not None else None
    set_seed(setup.seed)
    device = setup.device
    model = random_model(setup.config, setup.dtype, device, seed=setup.seed)
    tokens = torch.randint(0, setup.config.vocab_size, (setup.nsamples, setup.seqlen),
                           generator=torch.Generator().manual_seed(setup.seed))
    pristine = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    forward_floor(model, tokens[:setup.batch_size], setup.batch_size)  # warm-up: kernels, handles, allocator
    if earlier is None:
        floor = measure(device, lambda: forward_floor(model, tokens, setup.batch_size))
    else:
        floor = Measured(earlier["floor"]["seconds"], earlier["floor"].get("peak_gib") or math.nan)
    result = BenchResult(setup.describe(), floor, environment=_environment(device),
                         floor_from="" if baseline is None else str(baseline))
    compared = [] if earlier is None else [row for row in earlier["rows"] if row.get("mode") == "default"]
    report = on_row or (lambda result: None)
    report(result)
    pinned = PinnedPool()
    with pinned.reuse():
        for mode in setup.modes:
            low_memory = mode == "low-memory"
            model.to("cpu" if low_memory else device)  # low-memory mode: the layers visit from CPU memory
            if low_memory:
                pinned.reserve(model, tokens, setup.batch_size, device)
            for spec in setup.specs:
                model.load_state_dict(pristine)
                run = measure(device, lambda: prune_model(model, spec, tokens, setup.batch_size, progress,
                                                          low_memory=device if low_memory else False,
                                                          fingerprint=False))
                result.rows.append(_row(mode, run, floor.seconds, mask_sha256(model), compared + result.rows))
                report(result)
    result.complete = True
    report(result)
    return result


def read_baseline(path: str | Path, setup: BenchSetup) -> dict:
    """The record of an earlier ``bench-prune --json`` run of this same setup (model, sizes, dtype, seed), checked:
    one line (BadInput) for a missing file, another benchmark's JSON, or a different setup."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"--baseline {path}: no such file; give the JSON of an earlier bench-prune run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"--baseline {path}: not a readable JSON file ({exc})") from None
    floor = record.get("floor") if isinstance(record, dict) else None
    if not isinstance(record, dict) or record.get("benchmark") != "bench-prune" or not isinstance(floor, dict) \
            or not isinstance(floor.get("seconds"), (int, float)) or not isinstance(record.get("rows"), list) \
            or not all(isinstance(row, dict) for row in record["rows"]):
        raise BadInput(f"--baseline {path}: not the JSON of a bench-prune run (its floor and rows are missing)")
    mine, theirs = setup.describe(), record.get("setup") or {}
    differ = [f"{key} {theirs.get(key)!r} there, {mine[key]!r} here" for key in
              ("name", "layers", "hidden", "intermediate", "dtype", "nsamples", "seqlen", "batch_size", "seed")
              if theirs.get(key) != mine[key]]
    if differ:
        raise BadInput(f"--baseline {path}: another setup ({'; '.join(differ)}); its floor and masks do not apply")
    return record


def _row(mode: str, run: Measured, floor_seconds: float, sha256: str, earlier: list[dict]) -> dict:
    """One (mode, target) row of the table; a low-memory row compares its masks with the default mode's (measured in
    this run, or in the baseline's)."""
    target = run.result.target
    default = [r["mask sha256"] for r in earlier if r["mode"] == "default" and r["target"] == target]
    return {"mode": mode, "target": target, "seconds": run.seconds, "× floor": run.seconds / floor_seconds,
            "peak GPU GiB": run.peak_gib, "mask sha256": sha256,
            "same masks as default": "" if not default or mode == "default" else default[0] == sha256}


def _environment(device: torch.device) -> dict:
    env = {"date": datetime.date.today().isoformat(), "device": str(device), **versions()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_json(result: BenchResult, path: str | Path) -> Path:
    """Save ``result.to_json()`` atomically (a reader never sees half a file; the CLI calls it after every row)."""
    return write_json_atomic(path, result.to_json())


def summary_line(record: dict) -> str:
    """One line for a saved record (``to_json()``, complete or cut short): each row's × floor against its goal, and
    the low-memory mode's memory and masks. ``benchmarks/gpu_run.sh`` ends each bench-prune step with it."""
    rows = record.get("rows") or []
    parts = []
    for row in rows:
        goal = GOALS.get(row.get("mode"), math.inf)
        ratio = row.get("× floor")
        text = f"{row.get('mode')} {row.get('target')} " + ("?" if ratio is None else f"{ratio:.2f}× floor "
                                                                 f"({'met' if ratio <= goal else 'NOT met'} ≤ {goal})")
        if row.get("mode") == "low-memory":
            if row.get("peak GPU GiB") is not None:
                text += f", {row['peak GPU GiB']:.2f} GiB"
            if isinstance(row.get("same masks as default"), bool):
                text += ", same masks" if row["same masks as default"] else ", MASKS DIFFER"
        parts.append(text)
    floor = (record.get("floor") or {}).get("seconds")
    head = f"bench-prune {(record.get('setup') or {}).get('nsamples')}×{(record.get('setup') or {}).get('seqlen')}: " \
           + ("no floor yet" if floor is None else f"floor {floor:.2f} s")
    tail = "complete" if record.get("complete") else f"CUT SHORT after {len(rows)} row(s)"
    return " · ".join([head, *parts, tail])


def default_json_path(setup: BenchSetup) -> Path:
    """results/bench-prune-<setup>-<date>.json (the GPU script passes benchmarks/results/… to keep it)."""
    return Path("results") / f"bench-prune-{setup.name}-{datetime.date.today().isoformat()}.json"


def saved_bench_results(folder: str | Path = "benchmarks/results") -> pd.DataFrame | None:
    """The newest bench-prune JSON in ``folder`` as a table (floor first), its date and GPU in ``.attrs``; None
    if no run was saved there (the lab commits its GPU runs to benchmarks/results/)."""
    files = sorted(Path(folder).glob("*bench-prune*.json"))
    if not files:
        return None
    record = json.loads(files[-1].read_text())
    table = _table(record["floor"]["seconds"], record["floor"]["peak_gib"], record["rows"])
    table.attrs.update({**record["setup"], **record["environment"], "file": str(files[-1])})  # both name a device
    return table
