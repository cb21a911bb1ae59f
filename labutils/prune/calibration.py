"""Layer-by-layer calibration: capture decoder inputs, run one layer at a time, accumulate input norms.

Introduced in 02-Prune. Wanda needs, for every linear sublayer, the squared L2 norm of each input feature
over all calibration tokens: ``sum_t x_tj**2`` for feature ``j``. The model is never run end to end: the
hidden states entering the first decoder layer are captured once, then each layer is run on them and its
outputs become the next layer's inputs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import BadInput, LabError
from ..core.anatomy import ExpertWeight, decoder_stack, expert_hidden, find_decoder_layers, find_linears
from ..core.validation import check_positive_int
from .parallel import DataParallel, OrderedSum


@dataclass
class LayerInputs:
    """Hidden states entering the current decoder layer, one tensor (batch, seq, hidden) per batch, and the
    keyword arguments each decoder layer receives for that batch (attention mask, ``position_embeddings``,
    …), exactly as the model's own forward passes them."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict]] = field(default_factory=list)  # [batch][layer] -> kwargs
    batch_ids: list[int] = field(default_factory=list)  # each batch's place among all calibration batches
    n_batches: int = 0  # all calibration batches, on every rank together
    parallel: DataParallel | None = None  # data-parallel: this rank holds only its own batches (``parallel``)

    def add_batch(self, hidden: torch.Tensor, layer_kwargs: list[dict]) -> None:
        """Keep one captured batch: its hidden states and every layer's keyword arguments."""
        self.hidden.append(hidden)
        self.kwargs.append(layer_kwargs)

    def run(self, layer: nn.Module, layer_index: int, advance: bool, after_batch=None) -> None:
        """Run ``layer`` on every batch (hooks on its linears see every input); ``advance``: its outputs become
        the inputs of the next layer. With ``advance=False`` no outputs are kept at all. ``after_batch(b)``, if
        given, is called once batch b has run."""
        outputs = run_layer(layer, layer_index, self, keep=advance, after_batch=after_batch)
        if advance:
            self.hidden = outputs

    def finish(self) -> None:
        """Wait for pending copies (none here; ``streaming.StreamedInputs`` has some)."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: remembers what it was called with and passes the hidden states on."""

    def __init__(self, layer: nn.Module, sink: list[dict]):
        super().__init__()
        self.sink = sink
        if hasattr(layer, "attention_type"):  # some models read this to choose the mask
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((hidden_states, dict(kwargs)))
        return hidden_states


@contextlib.contextmanager
def layers_replaced(owner: nn.Module, attribute: str, replacement: nn.ModuleList):
    original = getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


@contextlib.contextmanager
def outer_modules_on(owner: nn.Module, attribute: str, device: torch.device):
    """``owner``'s modules beside its decoder stack ``owner.attribute`` (embeddings, final norm, rotary embedding)
    on ``device`` for the duration; the decoder layers stay put."""
    outer = [child for name, child in owner.named_children() if name != attribute]
    homes = [next(iter(m.parameters()), next(iter(m.buffers()), None)) for m in outer]
    homes = [device if t is None else t.device for t in homes]
    for module in outer:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(outer, homes):
            module.to(home)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int,
                         device: torch.device | None = None, into: LayerInputs | None = None,
                         parallel: DataParallel | None = None) -> LayerInputs:
    """Run only the embeddings of ``model`` on ``tokens`` (n, seqlen) in batches and return what the decoder
    layers receive. Every decoder layer is temporarily replaced by a recorder, so no layer computes.

    ``device``: where the embeddings run (default: the model's device; the embeddings move there for the
    duration). ``into``: the store that keeps the batches (default: a new ``LayerInputs`` on the device; the
    low-memory mode passes a ``streaming.StreamedInputs`` that keeps them in CPU memory). ``parallel``: keep only
    this rank's batches (b mod world = rank).
    """
    check_positive_int("batch_size", batch_size)
    layers = find_decoder_layers(model)
    device = device or next(model.parameters()).device
    base, attribute = decoder_stack(model)  # its forward runs the embeddings, then the (replaced) layers
    captured = LayerInputs(hidden=[]) if into is None else into
    batches = tokens.split(batch_size)
    captured.n_batches, captured.parallel = len(batches), parallel
    with outer_modules_on(base, attribute, device):
        for b, batch in enumerate(batches):
            if parallel is not None and not parallel.owns(b):
                continue
            calls: list[tuple[torch.Tensor, dict]] = []
            recorders = nn.ModuleList(_Recorder(layer, calls) for layer in layers)
            with layers_replaced(base, attribute, recorders):
                base(input_ids=batch.to(device), use_cache=False)
            if len(calls) != len(layers):
                raise LabError(f"{type(model).__name__} called {len(calls)} of its {len(layers)} decoder layers; "
                               "layer-by-layer calibration needs every layer called once per forward pass")
            captured.add_batch(calls[0][0], [kwargs for _, kwargs in calls])
            captured.batch_ids.append(b)
    return captured


def layer_output(out) -> torch.Tensor:
    """The hidden states a decoder layer returns (older transformers return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def run_layer(layer: nn.Module, layer_index: int, inputs: LayerInputs, keep: bool = True,
              after_batch=None) -> list[torch.Tensor]:
    """Outputs of one decoder layer for every batch of ``inputs``; same shapes as ``inputs.hidden``.
    ``keep=False`` drops each output as soon as it is made (a statistics-only pass) and returns [].
    ``after_batch(b)``, if given, is called after batch b."""
    outputs = []
    with torch.no_grad():
        for b, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            out = layer_output(layer(hidden, **kwargs[layer_index]))
            if keep:
                outputs.append(out)
            if after_batch is not None:
                after_batch(b)
    return outputs


class LayerStatistics(dict):
    """name → statistic, as ``collect_statistics`` returns it; ``routed``: for each expert (``ExpertWeight``), how many
    calibration tokens its router sent to it."""

    routed: dict[str, int]


def _routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states (tokens, hidden), chosen experts (tokens, top-k)) of a call to a stacked-experts module:
    ``experts(hidden_states, top_k_index, top_k_weights)``."""
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return hidden, index


class _InputHooks:
    """Forward hooks on linears that fold every batch of inputs into one float32 statistic per linear.

    Linears fed the very same tensor (q, k and v; gate and up) share one computation of the batch's term. Routed
    experts (``ExpertWeight``) are not modules: a pre-hook on their experts module reads the router's choice and
    folds in, for each expert, only the tokens sent to it — their hidden states for gate and up, and what its down
    projection reads (``expert_hidden``) for down. That takes one host sync per expert and batch (an empty expert
    is skipped).
    """

    def __init__(self, linears: dict[str, nn.Linear | ExpertWeight]):
        self.stats = {name: self._empty(lin) for name, lin in linears.items()}
        self.routed = {name: 0 for name, lin in linears.items() if isinstance(lin, ExpertWeight)}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input seen, its term)
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()
                         if not isinstance(lin, ExpertWeight)]
        by_module: dict[int, tuple[nn.Module, dict[int, dict[str, str]]]] = {}
        for name, lin in linears.items():
            if isinstance(lin, ExpertWeight):
                _, experts = by_module.setdefault(id(lin.experts), (lin.experts, {}))
                experts.setdefault(lin.index, {})[lin.kind] = name
        self._handles += [module.register_forward_pre_hook(self._experts_hook(experts), with_kwargs=True)
                          for module, experts in by_module.values()]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            if self._last is None or self._last[0] is not x:
                self._last = (x, self._term(x.detach().reshape(-1, x.shape[-1])))
            self.stats[name].add_(self._last[1])
        return hook

    def _experts_hook(self, experts: dict[int, dict[str, str]]):
        """A pre-hook for one stacked-experts module; ``experts``: expert index → {kind: statistic name}."""
        def hook(module, args, kwargs):
            hidden, index = _routing(args, kwargs)
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])
            index = index.reshape(hidden.shape[0], -1)
            for expert, names in experts.items():
                x = hidden[(index == expert).any(dim=1)]
                if x.shape[0] == 0:
                    continue
                for name in names.values():
                    self.routed[name] += x.shape[0]
                first = [names[k] for k in ("gate_proj", "up_proj") if k in names]
                if first:
                    term = self._term(x)
                    for name in first:
                        self.stats[name].add_(term)
                if "down_proj" in names:
                    self.stats[names["down_proj"]].add_(self._term(expert_hidden(module, expert, x)))
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


NO_STATISTIC, INPUT_NORMS, HESSIAN = "none", "norms", "hessian"
ACCUMULATORS = {INPUT_NORMS: InputNormAccumulator, HESSIAN: HessianAccumulator}


def collect_statistics(layer: nn.Module, layer_index: int, inputs: LayerInputs, linears: dict[str, nn.Linear],
                       statistic: str, advance: bool = False) -> LayerStatistics:
    """Run ``layer`` on every calibration batch of ``inputs`` (resident or streamed) with hooks on ``linears`` and
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
