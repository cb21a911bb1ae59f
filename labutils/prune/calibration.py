"""Layer-by-layer calibration: capture the first decoder layer's inputs, then run one layer at a time.

Introduced in 02-Prune. The model is never run end to end: the hidden states entering the first decoder layer are
captured once per calibration batch (``capture_layer_inputs``), then each layer is run on them and its outputs
become the next layer's inputs (``LayerInputs.run``). What the hooks collect while a layer runs is in
``statistics``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.anatomy import decoder_stack, find_decoder_layers
from ..core.errors import LabError
from ..core.validation import check_positive_int
from .parallel import DataParallel


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
        """Wait for pending copies (none here; ``offload.OffloadedInputs`` has some)."""


@dataclass(frozen=True)
class CalibrationData:
    """What a pruning pass calibrates on: ``tokens`` (nsamples, seqlen) ids (None when nothing needs them), run
    ``batch_size`` rows at a time, and ``parallel``: this process's share of the batches (data-parallel) or None."""

    tokens: torch.Tensor | None
    batch_size: int
    parallel: DataParallel | None = None


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
    low-memory mode passes an ``offload.OffloadedInputs`` that keeps them in CPU memory). ``parallel``: keep only
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
