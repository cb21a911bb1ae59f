"""2:4 sparse weights that really run faster: cuSPARSELt on NVIDIA GPUs (introduced in 04-Benchmark).

A 2:4-pruned weight is still a dense tensor full of zeros, and a dense GEMM multiplies zeros like any other
number. Sparse tensor cores (compute capability ≥ 8.0) skip them, if the weight is compressed first: the kept
half of the values plus 2-bit indices. ``torch.sparse`` does that with a tensor subclass; this module swaps the
weights of a pruned model's decoder linears for it, checks the result against the masked dense model, and
times both. We always use the cuSPARSELt backend: the CUTLASS one refuses compute capability 9.0 (H100/H200).

Each eager call of the subclass pays Python and planning on the CPU; replayed from a CUDA graph
(``sparse24.graphs``) only the kernels remain. Measured speeds live in the README and ``benchmarks/results/``, not here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.device import cuda_capability, get_device
from ..core.errors import LabError
from ..core.models import find_decoder_layers, max_sequence_length, model_device
from ..core.validation import (
    check_choice,
    check_names,
    check_no_problems,
    check_number,
    check_positive_int,
    check_positive_ints,
    check_tokens,
)
from ..prune.sparsity import nm_violations, prunable_linears, split_linear_name
from ..speed.latency import prefill_fn, random_prompt
from ..speed.timing import decode_interleaved, time_interleaved
from .graphs import GraphedForward, graphed_forward
from .kernel import SparseLinear24, check_against_dense, search_alg_id

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_FALLBACK_MIN_SHAPE = (16, 16)  # torch 2.13's cuSPARSELt multiples for 16-bit weights, if its private table moves
_FALLBACK_DENSE_MIN_SHAPE = (8, 8)  # … and for the dense operand
NO_GPU = "2:4 sparse kernels need an NVIDIA GPU with compute capability ≥ 8.0, and torch sees no CUDA GPU here"


def _backend() -> type:
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def min_shape(dtype: torch.dtype, dense: bool = False) -> tuple[int, int]:
    """(rows, cols) that a weight's (out, in) must be multiples of (``dense``: the dense operand's), from torch's
    own table for this dtype."""
    table = getattr(_backend(), "_DTYPE_SHAPE_CONSTRAINTS", {})
    config = table.get(dtype) or table.get(torch.float16)
    if config is None:
        return _FALLBACK_DENSE_MIN_SHAPE if dense else _FALLBACK_MIN_SHAPE
    return (config.dense_min_rows, config.dense_min_cols) if dense else (config.sparse_min_rows, config.sparse_min_cols)


def kernel_problem(device: torch.device | None = None) -> str | None:
    """Why 2:4 kernels cannot run here, or None when they can: the lab's one support check. ``device``: where the
    weights are (None: this machine's first GPU). Needs CUDA, compute capability ≥ 8.0, a torch build with
    cuSPARSELt, and a 2:4 (128, 128) × (128, 64) float16 product through ``torch.sparse`` that matches the dense one."""
    if not torch.cuda.is_available():
        if device is None:
            return "no CUDA GPU: 2:4 sparse tensor-core kernels exist only on NVIDIA GPUs (compute capability ≥ 8.0)"
        return f"{get_device().type.upper()}: {NO_GPU}"  # "CPU: …" (or "MPS: …" on a Mac)
    if device is not None and device.type != "cuda":
        return f"the model is on {device}; 2:4 kernels run on the CUDA GPU only: move it there first"
    major, minor = cuda_capability(device)
    if (major, minor) < (8, 0):
        return f"compute capability {major}.{minor} < 8.0: this GPU has no sparse tensor cores for 2:4 kernels"
    if not torch.backends.cusparselt.is_available():
        return (f"this torch build ({torch.__version__}) ships without cuSPARSELt, the 2:4 backend this lab uses "
                "(the CUTLASS one refuses compute capability 9.0); install an official CUDA wheel of torch")
    error = _trial_product_error(device or torch.device("cuda"))
    if isinstance(error, str):
        return f"to_sparse_semi_structured failed on compute capability {major}.{minor}: {error}"
    return None if error <= 1e-1 else f"2:4 matmul ran but differs from dense by {error:.3g}"


def _trial_product_error(device: torch.device) -> float | str:
    """max |sparse − dense| of a small 2:4 product on ``device``, or the error message of a kernel that failed."""
    weight = torch.randn(128, 128, dtype=torch.float16, device=device)
    weight = weight * torch.tensor([1, 1, 0, 0], dtype=torch.bool, device=device).tile(128, 32)
    x = torch.randn(128, 64, dtype=torch.float16, device=device)
    try:
        sparse_out = torch.mm(torch.sparse.to_sparse_semi_structured(weight), x)
    except (RuntimeError, NotImplementedError, ValueError) as exc:  # no cuSPARSELt / CUTLASS kernel here
        return str(exc)
    return (sparse_out - torch.mm(weight, x)).abs().max().item()


def semi_structured_support() -> tuple[bool, str]:
    """(True, what ran) if 2:4 sparse kernels really run on this machine, else (False, why not): ``kernel_problem``
    for 01-Setup's table."""
    problem = kernel_problem()
    if problem is not None:
        return False, problem
    major, minor = cuda_capability()
    version = torch.backends.cusparselt.version()
    return True, f"2:4 matmul ran on compute capability {major}.{minor} (cuSPARSELt {version})"


def semi_structured_ready(model: nn.Module) -> tuple[bool, str]:
    """(True, what will be used) if ``model``'s decoder linears can become cuSPARSELt 2:4 weights here, else
    (False, why not) — notebooks print the reason when they skip the GPU-only cells. Needs CUDA, compute capability
    ≥ 8.0, a torch with cuSPARSELt, the model on the GPU and float16 / bfloat16 weights. The 2:4 pattern itself
    is checked by ``to_semi_structured``."""
    device = model_device(model)
    problem = kernel_problem(device)
    if problem is not None:
        return False, problem
    dtypes = {lin.weight.dtype for lin in prunable_linears(model).values()}
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    if not dtypes <= set(SUPPORTED_DTYPES):
        return False, f"weights are {names}; 2:4 kernels take float16 or bfloat16 (model.half())"
    major, minor = cuda_capability(device)
    return True, (f"cuSPARSELt {torch.backends.cusparselt.version()} on {torch.cuda.get_device_name(device)} "
                  f"(compute capability {major}.{minor}), weights {names}")


@dataclass(frozen=True)
class SemiStructuredReport:
    """What ``to_semi_structured`` did: the linears converted, weight memory before / after, and the
    cuSPARSELt algorithm id each uses (0 = the library's default choice)."""

    converted: tuple[str, ...]
    dense_mib: float
    compressed_mib: float
    alg_ids: dict[str, int] = field(default_factory=dict)
    backend: str = "cuSPARSELt"
    kernel: str = "lab"  # "lab": SparseLinear24 modules; "stock": torch's SparseSemiStructuredTensor weights

    @property
    def compression(self) -> float:
        """compressed / dense bytes of the converted weights (≈ 0.56 for fp16: half the values + metadata)."""
        return self.compressed_mib / self.dense_mib if self.dense_mib else math.nan


def _select(model: nn.Module, linears: Sequence[str] | None) -> dict[str, nn.Linear]:
    available = prunable_linears(model)
    if linears is None:
        return available
    return {name: available[name] for name in check_names("linears", linears, list(available),
                                                           "prunable_linears(model)")}


def _pattern_and_shape_problems(selected: dict[str, nn.Linear]) -> list[str]:
    problems = []
    for name, lin in selected.items():
        if isinstance(lin, SparseLinear24):
            problems.append(f"{name} is already a 2:4 compressed linear")
            continue
        weight = lin.weight
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            problems.append(f"{name} is already a 2:4 compressed weight")
            continue
        rows, cols = min_shape(weight.dtype)
        if weight.shape[0] % rows or weight.shape[1] % cols:
            problems.append(f"{name} has shape (out, in) = {tuple(weight.shape)}; the kernels need out a multiple "
                            f"of {rows} and in a multiple of {cols}")
            continue
        violations = nm_violations(weight, 2, 4)
        if violations:
            groups = weight.numel() // 4
            problems.append(f"{name} breaks 2:4 in {violations} of {groups} groups of 4 inputs "
                            "(prune it with nm='2:4' first)")
    return problems


KERNELS = ("lab", "stock")


def to_semi_structured(model: nn.Module, *, linears: Sequence[str] | None = None,
                       alg_search_tokens: int | None = None, kernel: str = "lab",
                       progress: bool = False) -> SemiStructuredReport:
    """Make every prunable decoder linear (or ``linears``, names as in ``prunable_linears``) run on its 2:4
    compressed weight, in place. ``kernel="lab"`` (default) replaces each ``nn.Linear`` by a ``SparseLinear24``
    (one cuSPARSELt call, transpose fused, row-major output: see ``sparse24.kernel`` for why); ``"stock"``
    keeps the ``nn.Linear`` and swaps its weight for torch's ``SparseSemiStructuredTensor`` (for comparison).

    Nothing is changed unless every selected weight passes first: exactly 2:4 (BadInput naming each layer and its
    violating groups), shape multiples of the kernel's tile (BadInput), a device that can run it (LabError saying
    why), float16 / bfloat16 (BadInput). ``alg_search_tokens`` runs cuSPARSELt's algorithm search once per weight
    shape for inputs of that many tokens (slower conversion, sometimes faster matmuls); None keeps algorithm 0.
    """
    check_choice("kernel", kernel, KERNELS)
    selected = _select(model, linears)
    problems = _pattern_and_shape_problems(selected)
    check_no_problems(f"{len(problems)} of {len(selected)} linears cannot become 2:4 weights", problems)
    problem = kernel_problem(model_device(model))
    if problem is not None:
        raise LabError(f"cannot convert to 2:4 sparse weights: {problem}")
    wrong = [f"{name} is {lin.weight.dtype}" for name, lin in selected.items()
             if lin.weight.dtype not in SUPPORTED_DTYPES]
    check_no_problems("2:4 kernels take float16 or bfloat16 weights (convert the model with model.half() first)",
                      wrong, limit=3)
    if alg_search_tokens is not None:
        check_positive_int("alg_search_tokens", alg_search_tokens)
    return _convert(model, selected, alg_search_tokens, kernel, progress)


@torch.no_grad()
def _convert(model: nn.Module, selected: dict[str, nn.Linear], alg_search_tokens: int | None, kernel: str,
             progress: bool) -> SemiStructuredReport:
    dense_bytes = compressed_bytes = 0
    alg_ids: dict[str, int] = {}
    by_shape: dict[tuple[int, int], int] = {}
    layers = find_decoder_layers(model)
    for name, lin in tqdm(selected.items(), desc="2:4 compress", unit="linear", disable=not progress):
        weight = lin.weight.detach().contiguous()
        try:
            if kernel == "lab":
                packed = torch._cslt_compress(weight)
            else:
                sparse = _backend().from_dense(weight)  # compresses with torch._cslt_compress too
                packed = sparse.packed
            first_of_shape = weight.shape not in by_shape
            if first_of_shape:  # the search runs once per weight shape, on this compressed weight
                by_shape[weight.shape] = 0 if alg_search_tokens is None else search_alg_id(
                    packed, weight.shape[1], alg_search_tokens, weight.dtype, weight.device)
            alg_id = by_shape[weight.shape]
            if kernel == "lab":
                bias = None if lin.bias is None else lin.bias.detach().clone()
                module = SparseLinear24(packed, *weight.shape, bias, alg_id=alg_id,
                                        pad_to=min_shape(weight.dtype, dense=True)[0])
                if first_of_shape:  # one check per shape catches a wrong layout at once
                    check_against_dense(module, weight, lin.bias, name)
                index, path = split_linear_name(name)
                parent, _, attr = path.rpartition(".")
                setattr(layers[index].get_submodule(parent), attr, module)
            else:
                sparse.alg_id_cusparselt = alg_id
                lin.weight = nn.Parameter(sparse, requires_grad=False)
        except RuntimeError as exc:  # a cuSPARSELt failure: say where, and that earlier layers are converted
            raise LabError(f"cuSPARSELt could not compress {name} {tuple(weight.shape)} {weight.dtype}: {exc}. "
                           f"{len(alg_ids)} linears before it are already converted; rebuild the model.") from exc
        dense_bytes += weight.numel() * weight.element_size()
        compressed_bytes += packed.numel() * packed.element_size()
        alg_ids[name] = alg_id
    return SemiStructuredReport(converted=tuple(alg_ids), dense_mib=dense_bytes / 2**20,
                                compressed_mib=compressed_bytes / 2**20, alg_ids=alg_ids, kernel=kernel)


@dataclass(frozen=True)
class SemiStructuredCheck:
    """Logits of the 2:4 model against the masked dense model on the same tokens. ``passed`` when
    max |sparse − dense| ≤ atol + rtol · max |dense| (one bound for the whole tensor: fp16 sums in another
    order differ a little everywhere, so an element-wise bound would be too strict for large logits)."""

    max_abs_diff: float
    max_abs_reference: float
    tolerance: float
    top1_agreement: float  # share of positions where both pick the same next token
    passed: bool


@torch.inference_mode()
def verify_semi_structured(dense_masked_model: nn.Module, sparse_model: nn.Module, tokens: torch.Tensor, *,
                           atol: float = 5e-2, rtol: float = 1e-2) -> SemiStructuredCheck:
    """Compare the logits (batch, seq, vocab) of both models on ``tokens`` (batch, seq) int64; works on any
    device, so the comparison itself can be checked on a CPU."""
    tokens = check_tokens("tokens", tokens, dense_masked_model.config.vocab_size, ndim=2)
    check_number("atol", atol, 0, allowed="a number ≥ 0")
    check_number("rtol", rtol, 0, allowed="a number ≥ 0")
    reference = dense_masked_model(input_ids=tokens.to(model_device(dense_masked_model)), use_cache=False).logits
    logits = sparse_model(input_ids=tokens.to(model_device(sparse_model)), use_cache=False).logits
    reference, logits = reference.float(), logits.float().to(reference.device)
    max_diff = float((logits - reference).abs().max())
    max_ref = float(reference.abs().max())
    tolerance = atol + rtol * max_ref
    agreement = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    return SemiStructuredCheck(max_abs_diff=max_diff, max_abs_reference=max_ref, tolerance=tolerance,
                               top1_agreement=agreement, passed=max_diff <= tolerance)


def prefill_speedup_table(dense_model: nn.Module, sparse_model: nn.Module,
                          lengths: Sequence[int] = (512, 1024, 2048, 4096, 8192), *, warmup: int = 2, repeats: int = 5,
                          graphs: bool = True, decode_prompt_len: int = 128, decode_tokens: int = 32,
                          decode_repeats: int = 3, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Batch-1 speed of the 2:4 model against the masked dense model, on the GPU.

    One row per prefill length: P50 ms of dense and 2:4, eager and replayed from a CUDA graph
    (``graphed_forward``), and "× dense" = dense ms / 2:4 ms (> 1: the sparse model is faster). Each length
    times its four variants in interleaved, rotated rounds (``time_interleaved``) on one fixed prompt;
    only the last position's logits are computed, as in ``generate()``. A length above the models' maximum
    positions, or one that runs out of GPU memory, gets a note instead of numbers. The last row is decode:
    P50 ms per token over ``decode_tokens`` steps after a ``decode_prompt_len`` prefill, one untimed warm-up run
    then ``decode_repeats`` timed runs, eager only (replaying decode from a graph needs a static KV cache).
    """
    lengths = check_positive_ints("lengths", lengths)
    check_positive_int("decode_repeats", decode_repeats)
    for name, model in (("dense_model", dense_model), ("sparse_model", sparse_model)):
        problem = kernel_problem(model_device(model))
        if problem is not None:
            raise LabError(f"cannot time 2:4 kernels ({name}): {problem}")
    limit = min(max_sequence_length(dense_model), max_sequence_length(sparse_model))
    rows = [_prefill_row(dense_model, sparse_model, n, limit, warmup, repeats, graphs, seed)
            for n in tqdm(lengths, desc="prefill lengths", unit="length", disable=not progress)]
    rows.append(_decode_row(dense_model, sparse_model, decode_prompt_len, decode_tokens, decode_repeats, seed))
    table = pd.DataFrame(rows).set_index(["phase", "tokens"])
    table.attrs.update(warmup=warmup, repeats=repeats, device=torch.cuda.get_device_name(model_device(dense_model)))
    return table


def _prefill_row(dense: nn.Module, sparse: nn.Module, length: int, limit: int, warmup: int, repeats: int,
                 graphs: bool, seed: int) -> dict:
    row = {"phase": "prefill", "tokens": length}
    if length > limit:
        return {**row, "note": f"skipped: {length} tokens exceed the models' {limit} positions"}
    ids = random_prompt(dense, length, 1, seed)
    captured: list[GraphedForward] = []
    try:
        fns = {"dense eager": prefill_fn(dense, ids), "2:4 eager": prefill_fn(sparse, ids)}
        if graphs:
            for label, model in (("dense graphed", dense), ("2:4 graphed", sparse)):
                captured.append(graphed_forward(model, ids, logits_to_keep=1))
                fns[label] = partial(captured[-1], ids)
        stats = time_interleaved(fns, warmup=warmup, repeats=repeats, device=ids.device)
    except torch.cuda.OutOfMemoryError:
        return {**row, "note": f"skipped: out of GPU memory at {length} tokens"}
    finally:
        for graph in captured:
            graph.release()
        torch.cuda.empty_cache()
    return {**row, **_speed_columns(stats), "note": ""}


def _speed_columns(stats: dict) -> dict:
    columns = {}
    for mode in ("eager", "graphed"):
        if f"dense {mode}" in stats:
            dense_ms, sparse_ms = stats[f"dense {mode}"].p50 * 1e3, stats[f"2:4 {mode}"].p50 * 1e3
            columns.update({f"dense {mode} ms": dense_ms, f"2:4 {mode} ms": sparse_ms,
                            f"{mode} × dense": dense_ms / sparse_ms})
    return columns


def _decode_row(dense: nn.Module, sparse: nn.Module, prompt_len: int, new_tokens: int, repeats: int,
                seed: int) -> dict:
    row = {"phase": "decode", "tokens": new_tokens}
    try:
        models = {"dense eager": dense, "2:4 eager": sparse}
        prompts = {label: random_prompt(model, prompt_len, 1, seed) for label, model in models.items()}
        stats = decode_interleaved(models, prompts, new_tokens, warmup=1, repeats=repeats)
    except torch.cuda.OutOfMemoryError:
        return {**row, "note": "skipped: out of GPU memory while decoding"}
    note = f"ms per token (P50) after a {prompt_len}-token prompt, batch 1, eager only"
    return {**row, **_speed_columns(stats), "note": note}
