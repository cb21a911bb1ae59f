"""2:4 sparse weights that really run faster: cuSPARSELt on NVIDIA GPUs (introduced in 04-Benchmark).

A 2:4-pruned weight is still a dense tensor full of zeros, and a dense GEMM multiplies zeros like any other
number. Sparse tensor cores (compute capability ≥ 8.0) skip them, if the weight is compressed first: the kept
half of the values plus 2-bit indices. ``torch.sparse`` does that with a tensor subclass; this module swaps the
weights of a pruned model's decoder linears for it and checks the result against the masked dense model
(``sparse24.prefill`` times both). We always use the cuSPARSELt backend: the CUTLASS one refuses compute
capability 9.0 (H100/H200).

Each eager call of the subclass pays Python and planning on the CPU; replayed from a CUDA graph
(``sparse24.graphs``) only the kernels remain. Measured speeds live in docs/results.md and ``benchmarks/results/``, not here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.anatomy import CompressedLinear, find_decoder_layers, model_device
from ..core.device import cuda_capability, get_device
from ..core.errors import BadInput, LabError
from ..core.validation import (
    check_choice,
    check_flag,
    check_names,
    check_no_problems,
    check_number,
    check_positive_int,
    check_tokens,
)
from ..prune.sparsity import nm_violations, prunable_linears, split_linear_name
from .kernel import (
    CsltPlan,
    FusedSlice24,
    FusedSparse24,
    SparseLinear24,
    SparseMatmul24,
    check_against_dense,
    fusion_units,
    search_plan,
    search_problem,
)

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
    """max |sparse − dense| of a small 2:4 product on ``device`` through the cuSPARSELt backend, or the error message
    of a kernel that failed. The backend is named, not left to ``to_sparse_semi_structured``'s default: where that
    default is CUTLASS (``SparseSemiStructuredTensor._FORCE_CUTLASS``, or the default of another torch version), an
    sm90 card (H100 / H200) would fail this check although cuSPARSELt, which the lab uses, runs there."""
    weight = torch.randn(128, 128, dtype=torch.float16, device=device)
    weight = weight * torch.tensor([1, 1, 0, 0], dtype=torch.bool, device=device).tile(128, 32)
    x = torch.randn(128, 64, dtype=torch.float16, device=device)
    try:
        sparse_out = torch.mm(_backend().from_dense(weight), x)
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
    return True, f"2:4 matmul ran on compute capability {major}.{minor} through {backend_name()}"


def backend_name() -> str:
    """The 2:4 backend the lab runs, with its version: "cuSPARSELt 0.8.0" (torch reports 800: major · 1000 +
    minor · 100 + patch), or that there is none."""
    if not torch.backends.cusparselt.is_available():
        return "no cuSPARSELt in this torch build"
    version = torch.backends.cusparselt.version()
    if isinstance(version, int):
        version = f"{version // 1000}.{version // 100 % 10}.{version % 100}"
    return f"cuSPARSELt {version}"


def semi_structured_ready(model: nn.Module) -> tuple[bool, str]:
    """(True, what will be used) if ``model``'s decoder linears can become cuSPARSELt 2:4 weights here, else
    (False, why not) — notebooks print the reason when they skip the GPU-only cells. Needs CUDA, compute capability
    ≥ 8.0, a torch with cuSPARSELt, the model on the GPU and float16 / bfloat16 weights. The 2:4 pattern itself
    is checked by ``to_semi_structured``."""
    device = model_device(model)
    problem = kernel_problem(device)
    if problem is not None:
        return False, problem
    dtypes = {lin.weight.dtype for lin in prunable_linears(model, experts=False).values()}
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    if not dtypes <= set(SUPPORTED_DTYPES):
        return False, f"weights are {names}; 2:4 kernels take float16 or bfloat16 (model.half())"
    major, minor = cuda_capability(device)
    return True, (f"{backend_name()} on {torch.cuda.get_device_name(device)} "
                  f"(compute capability {major}.{minor}), weights {names}")


@dataclass(frozen=True)
class SemiStructuredReport:
    """What ``to_semi_structured`` did: the linears converted, weight memory before / after (a fused group's packed
    weight counted once, each member's dense weight by itself), the cuSPARSELt plan each linear runs
    (``CsltPlan``: algorithm id and split-K; algorithm 0 = the library's default choice) and the groups of linears
    fused into one GEMM."""

    converted: tuple[str, ...]
    dense_mib: float
    compressed_mib: float
    plans: dict[str, CsltPlan] = field(default_factory=dict)
    backend: str = "cuSPARSELt"
    kernel: str = "lab"  # "lab": SparseLinear24 modules; "stock": torch's SparseSemiStructuredTensor weights
    fused: tuple[tuple[str, ...], ...] = ()

    @property
    def alg_ids(self) -> dict[str, int]:
        """The cuSPARSELt algorithm id of each converted linear (its plan's ``alg_id``)."""
        return {name: plan.alg_id for name, plan in self.plans.items()}

    @property
    def compression(self) -> float:
        """compressed / dense bytes of the converted weights (≈ 0.56 for fp16: half the values + metadata)."""
        return self.compressed_mib / self.dense_mib if self.dense_mib else math.nan


def _select(model: nn.Module, linears: Sequence[str] | None) -> dict[str, nn.Linear]:
    available = prunable_linears(model, experts=False)  # stacked experts have no 2:4 kernel here: left dense
    if linears is None:
        return available
    return {name: available[name] for name in check_names("linears", linears, list(available),
                                                           "prunable_linears(model)")}


def _pattern_and_shape_problems(selected: dict[str, nn.Linear]) -> list[str]:
    problems = []
    for name, lin in selected.items():
        if isinstance(lin, CompressedLinear):
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
                       alg_search_tokens: int | None = None, kernel: str = "lab", fuse: bool = False,
                       progress: bool = False) -> SemiStructuredReport:
    """Make every prunable decoder linear (or ``linears``, names as in ``prunable_linears``) run on its 2:4
    compressed weight, in place. ``kernel="lab"`` (default) replaces each ``nn.Linear`` by a ``SparseLinear24``
    (one cuSPARSELt call, transpose fused, row-major output: see ``sparse24.kernel`` for why); ``"stock"``
    keeps the ``nn.Linear`` and swaps its weight for torch's ``SparseSemiStructuredTensor`` (for comparison).
    ``fuse=True`` (lab kernel only) stacks q/k/v and gate/up of each layer into one 2:4 weight each, multiplied
    once per input (``FusedSparse24``); each projection becomes a ``FusedSlice24`` returning its columns. A group
    is fused only if all its members are selected and alike (``fusion_groups``); the others convert one by one.

    Nothing is changed unless every selected weight passes first: exactly 2:4 (BadInput naming each layer and its
    violating groups), shape multiples of the kernel's tile (BadInput), a device that can run it (LabError saying
    why), float16 / bfloat16 (BadInput). ``alg_search_tokens`` runs cuSPARSELt's search (algorithm and split-K)
    once per weight shape for inputs of that many tokens (slower conversion, sometimes faster matmuls); None keeps
    algorithm 0. The stock kernel can only take the algorithm id: its plans record split_k 1.
    """
    check_choice("kernel", kernel, KERNELS)
    if check_flag("fuse", fuse) and kernel != "lab":
        raise BadInput(f"fuse=True needs kernel='lab' (torch's stock 2:4 weights cannot be fused); got {kernel!r}")
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
        if (problem := search_problem()) is not None:  # before anything is converted
            raise LabError(f"alg_search_tokens: {problem}")
    converter = _Converter(find_decoder_layers(model), kernel, alg_search_tokens)
    return converter.convert(selected, fusion_units(selected, fuse), progress)


@dataclass
class _Converter:
    """One conversion: compresses each unit (one linear, or a fused group), searches a plan once per weight shape,
    checks each new shape against F.linear and puts the new modules in place."""

    layers: list[nn.Module]
    kernel: str
    alg_search_tokens: int | None
    by_shape: dict[tuple[int, int], CsltPlan] = field(default_factory=dict)

    @torch.no_grad()
    def convert(self, selected: dict[str, nn.Linear], units: list[tuple[str, ...]],
                progress: bool) -> SemiStructuredReport:
        dense_bytes = compressed_bytes = 0
        plans: dict[str, CsltPlan] = {}
        for names in tqdm(units, desc="2:4 compress", unit="GEMM", disable=not progress):
            lins = [selected[name] for name in names]
            weight = torch.cat([lin.weight.detach() for lin in lins]).contiguous()  # (Σ out, in)
            try:
                packed, plan = self._unit(names, lins, weight)
            except LabError:  # check_against_dense's verdict: already says what is wrong
                raise
            except RuntimeError as exc:  # a cuSPARSELt failure: say where, and that earlier layers are converted
                raise LabError(f"cuSPARSELt could not compress {' + '.join(names)} {tuple(weight.shape)} "
                               f"{weight.dtype}: {exc}. {len(plans)} linears before it are already converted; "
                               "rebuild the model.") from exc
            dense_bytes += weight.numel() * weight.element_size()
            compressed_bytes += packed.numel() * packed.element_size()
            plans.update(dict.fromkeys(names, plan))
        return SemiStructuredReport(converted=tuple(plans), dense_mib=dense_bytes / 2**20,
                                    compressed_mib=compressed_bytes / 2**20, plans=plans, kernel=self.kernel,
                                    fused=tuple(unit for unit in units if len(unit) > 1))

    def _unit(self, names: tuple[str, ...], lins: list[nn.Linear],
              weight: torch.Tensor) -> tuple[torch.Tensor, CsltPlan]:
        pad_to = min_shape(weight.dtype, dense=True)[0]
        if self.kernel == "stock":
            sparse = _backend().from_dense(weight)  # compresses with torch._cslt_compress too
            plan = CsltPlan(self._plan(SparseMatmul24(sparse.packed, *weight.shape, pad_to=pad_to)).alg_id)
            sparse.alg_id_cusparselt = plan.alg_id  # the stock path takes no split-K
            lins[0].weight = nn.Parameter(sparse, requires_grad=False)
            return sparse.packed, plan
        bias = None if lins[0].bias is None else torch.cat([lin.bias.detach() for lin in lins])
        packed = torch._cslt_compress(weight)
        if len(lins) == 1:
            module = SparseLinear24(packed, *weight.shape, bias, pad_to=pad_to)
        else:
            module = FusedSparse24(packed, tuple(lin.out_features for lin in lins), weight.shape[1], bias,
                                   pad_to=pad_to)
        first_of_shape = weight.shape not in self.by_shape
        module.plan = self._plan(module)
        if first_of_shape:  # one check per shape catches a wrong layout at once
            check_against_dense(module, weight, bias, " + ".join(names))
        members = [module] if len(lins) == 1 else [FusedSlice24(module, i) for i in range(len(lins))]
        for name, member in zip(names, members):
            index, path = split_linear_name(name)
            parent, _, attr = path.rpartition(".")
            setattr(self.layers[index].get_submodule(parent), attr, member)
        return packed, module.plan

    def _plan(self, module: SparseMatmul24) -> CsltPlan:
        """The plan for this weight shape: searched on the first weight of the shape, then reused."""
        shape = (module.out_features, module.in_features)
        if shape not in self.by_shape:
            tokens = self.alg_search_tokens
            try:
                self.by_shape[shape] = CsltPlan() if tokens is None else search_plan(module, tokens)
            except RuntimeError as exc:  # seen on torch 2.11 + cuSPARSELt 0.8 (H200): every search fails
                raise LabError(f"cuSPARSELt's search failed for a {shape} weight at {tokens} tokens: {exc}. "
                               "Convert without alg_search_tokens (in a fresh process).") from exc
        return self.by_shape[shape]


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
