"""The statistic a method reads from each linear's inputs, summed over the calibration tokens (02-Prune).

Wanda's (Sun et al. 2023, arXiv 2306.11695) is the squared L2 norm of each input channel j of a linear over all
calibration tokens t: ``Σ_t x_tj²``, shape (in,) — ``InputNormAccumulator``. A forward hook on the linear adds one
batch's term at a time, in float32, while ``inputs.run`` passes the batches through the decoder layer; Wanda's
score then takes its square root, ‖X_j‖₂. SparseGPT and ADMM need ``2 Σ_t x_t x_tᵀ``, shape (in, in) —
``HessianAccumulator``, the same hooks with another term.

Two refinements sit apart from the plain statistic: routed experts (``routing.RoutedExperts``) count only the
tokens sent to them, and data-parallel runs sum the batches in one process's order (``parallel.OrderedSum``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.anatomy import ExpertWeight, find_decoder_layers, find_linears
from ..core.errors import BadInput
from .calibration import LayerInputs, capture_layer_inputs
from .parallel import OrderedSum
from .routing import RoutedExperts

# Which statistic a method needs for each linear: none, (in,) Σ_t x_tj², or (in, in) 2 · Σ_t x_t x_tᵀ.
NO_STATISTIC, INPUT_NORMS, HESSIAN = "none", "norms", "hessian"


class _InputHooks:
    """Forward hooks on linears that fold every batch of inputs into one float32 statistic per linear
    (``stats[name]``); the subclass says the statistic's shape (``_empty``) and one batch's term (``_term``).

    Linears fed the very same tensor (q, k and v; gate and up) share one computation of the batch's term. Routed
    experts (``ExpertWeight``) are not modules: ``routing.RoutedExperts`` hooks them (``routed``: tokens per expert).
    """

    def __init__(self, linears: dict[str, nn.Linear | ExpertWeight]):
        self.stats = {name: self._empty(lin) for name, lin in linears.items()}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input seen, its term)
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()
                         if not isinstance(lin, ExpertWeight)]
        experts = RoutedExperts(linears, self.stats, self._term)
        self.routed = experts.routed
        self._handles += experts.handles

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            if self._last is None or self._last[0] is not x:  # q after k after v: the same input, one term
                self._last = (x, self._term(x.detach().reshape(-1, x.shape[-1])))
            self.stats[name].add_(self._last[1])
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class InputNormAccumulator(_InputHooks):
    """``stats[name]`` (in_features,): the sum over all tokens t of x[t, j]² — what Wanda and RIA need."""

    @staticmethod
    def _empty(lin: nn.Linear) -> torch.Tensor:
        return torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device)

    @staticmethod
    def isotropic(lin: nn.Linear) -> torch.Tensor:
        """The statistic of inputs that favour no feature: every norm 1 (Wanda's score becomes |W|)."""
        return torch.ones(lin.in_features, dtype=torch.float32, device=lin.weight.device)

    @staticmethod
    def _term(x: torch.Tensor) -> torch.Tensor:  # x: (tokens, in), the layer's dtype
        if x.dtype in (torch.float16, torch.bfloat16):
            # Accumulate in float32 without a float32 copy of x (1.4 GiB for one batch of 8 × 4096 tokens into
            # Llama-2-7B's down_proj); squaring in 16 bits instead would overflow above 256.
            return torch.linalg.vector_norm(x, 2, dim=0, dtype=torch.float32).square()
        return x.float().pow(2).sum(dim=0)


class HessianAccumulator(_InputHooks):
    """``stats[name]`` (in_features, in_features): 2 · Σ_t x_t x_tᵀ, the layer-wise Hessian SparseGPT needs."""

    @staticmethod
    def _empty(lin: nn.Linear) -> torch.Tensor:
        return torch.zeros(lin.in_features, lin.in_features, dtype=torch.float32, device=lin.weight.device)

    @staticmethod
    def isotropic(lin: nn.Linear) -> torch.Tensor:
        """The statistic of inputs that favour no feature: H = I (SparseGPT then prunes by |W| and compensates
        nothing)."""
        return torch.eye(lin.in_features, dtype=torch.float32, device=lin.weight.device)

    @staticmethod
    def _term(x: torch.Tensor) -> torch.Tensor:  # x: (tokens, in), the layer's dtype
        x = x.float()
        return 2 * x.T @ x


ACCUMULATORS = {INPUT_NORMS: InputNormAccumulator, HESSIAN: HessianAccumulator}


class LayerStatistics(dict):
    """name → statistic, as ``collect_statistics`` returns it; ``routed``: for each expert (``ExpertWeight``), how many
    calibration tokens its router sent to it."""

    routed: dict[str, int]


def collect_statistics(layer: nn.Module, layer_index: int, inputs: LayerInputs, linears: dict[str, nn.Linear],
                       statistic: str, advance: bool = False) -> LayerStatistics:
    """Run ``layer`` on every calibration batch of ``inputs`` (resident or offloaded) with hooks on ``linears`` and
    return their statistics: name → (in,) Σ_t x_tj² for "norms", (in, in) 2 XᵀX for "hessian". With ``advance``,
    the layer's outputs become the inputs of the next layer (only right if the layer is not changed afterwards).

    A routed expert's statistic sums only the tokens its router sent to it (``.routed`` counts them). An expert
    that received no token gets the statistic of inputs that favour no feature (``isotropic``: norms of 1, H = I),
    so it is pruned by weight magnitude alone, within the method's own comparison group.

    Data-parallel (``inputs.parallel``): each rank runs its own batches and the statistics are summed across ranks
    in the single-process order (``parallel.OrderedSum``), so every rank gets exactly one process's statistics."""
    accumulator = ACCUMULATORS[statistic]
    with accumulator(linears) as acc:
        if inputs.parallel is None:
            inputs.run(layer, layer_index, advance)
            routed = acc.routed
        else:
            reduction = OrderedSum(acc.stats, inputs.parallel, inputs.batch_ids, inputs.n_batches)
            inputs.run(layer, layer_index, advance, after_batch=reduction.batch_done)
            routed = reduction.finish({name: int(count) for name, count in acc.routed.items()})
    stats = LayerStatistics(acc.stats)
    stats.routed = {name: int(count) for name, count in routed.items()}
    for name, count in stats.routed.items():
        if count == 0:
            stats[name] = accumulator.isotropic(linears[name])
    return stats


@torch.no_grad()
def collect_input_norms(model: nn.Module, tokens: torch.Tensor, layer_index: int, batch_size: int = 8
                        ) -> dict[str, torch.Tensor]:
    """Input feature norms ``sqrt(sum_t x_tj**2)`` of every linear in decoder layer ``layer_index`` of the
    unpruned model (02-Prune plots them). Returns name -> tensor (in_features,) on the CPU."""
    layers = find_decoder_layers(model)
    if not 0 <= layer_index < len(layers):
        raise BadInput(f"layer_index {layer_index} out of range; the model has {len(layers)} decoder layers "
                       f"(0..{len(layers) - 1})")
    inputs = capture_layer_inputs(model, tokens, batch_size)
    for i in range(layer_index):
        inputs.run(layers[i], i, advance=True)
    stats = collect_statistics(layers[layer_index], layer_index, inputs, find_linears(layers[layer_index]),
                               INPUT_NORMS)
    return {name: sq.sqrt().cpu() for name, sq in stats.items()}
