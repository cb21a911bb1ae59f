"""Where a pruning run's decoder layers and calibration activations live (02-Prune; the low-memory mode: 04-Benchmark).

Three placements, one layer loop (``driver.prune_all``):

- resident (the default): the model and every calibration batch's hidden states stay where the model is; the loop
  visits the model's own layers and nothing is copied;
- offloaded (``low_memory``): the model stays in CPU memory and each decoder layer, and each batch of activations,
  visits the compute device one at a time (``offload``: ``OffloadedLayers``, ``OffloadedInputs``);
- streamed from disk (``disk.DiskLayers``): each layer is read from the checkpoint when its turn comes, and dropped
  after (activations offloaded as above on a GPU).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.anatomy import model_device
from ..core.device import get_device
from ..core.errors import BadInput
from ..core.validation import describe
from .calibration import LayerInputs, capture_layer_inputs
from .offload import OffloadedInputs, OffloadedLayers


class Placement(NamedTuple):
    """Where the layers of a pruning run compute, whether layers and activations are offloaded to CPU memory
    (low-memory mode), and, streaming from disk, the ``disk.DiskLayers`` that reads and writes them."""

    device: torch.device
    offloaded: bool
    disk: object = None


def compute_device(model: nn.Module, low_memory: bool | str | torch.device) -> Placement:
    """The placement that ``prune_model``'s ``low_memory`` asks for:

    False — the default mode: everything where the model is. True — the model stays in CPU memory and its layers
    visit the best device here (``get_device``); a device or its name ("cuda:1") — they visit that device.
    """
    home = model_device(model)
    if low_memory is False:
        return Placement(home, False)
    if not (low_memory is True or isinstance(low_memory, (str, torch.device))):
        raise BadInput(f"low_memory must be False, True or a device such as 'cuda'; got {describe(low_memory)}")
    if home.type != "cpu":
        raise BadInput(f"low_memory keeps the model in CPU memory and moves one layer at a time to the GPU; the "
                       f"model is on {home}: load it on the CPU (or move it with model.to('cpu')) first")
    return Placement(get_device(None if low_memory is True else str(low_memory)), True)


def calibration_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int, device: torch.device,
                       low_memory: bool, parallel=None) -> LayerInputs:
    """The captured inputs of the first decoder layer: on ``device`` (default mode) or offloaded to CPU memory;
    ``parallel`` (``parallel.DataParallel``): only this rank's batches."""
    into = OffloadedInputs(device) if low_memory else None
    return capture_layer_inputs(model, tokens, batch_size, device=device, into=into, parallel=parallel)


@contextlib.contextmanager
def layer_visits(layers: nn.ModuleList, where: Placement, desc: str, progress: bool = True):
    """``with layer_visits(…) as visits: for i, layer in visits: …`` — each decoder layer in order, on
    ``where.device``.

    Default mode: the layers already are there. Low-memory mode: ``OffloadedLayers`` brings layer i in (layer
    i + 1 is already on its way) and copies it back once the loop body is done with it; leaving the ``with``
    waits for every copy back, also when the body raised. ``where.disk`` (a ``disk.DiskLayers``): each layer is
    read from the checkpoint when its turn comes and dropped after, the same way.
    """
    steps = tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress)
    if where.disk is None and not where.offloaded:
        yield ((i, layers[i]) for i in steps)
        return

    def visits(placement: OffloadedLayers):
        for i in steps:
            layer = placement.attach(i)
            placement.prefetch(i + 1)
            yield i, layer
            placement.release(i)

    with (where.disk if where.disk is not None else OffloadedLayers(layers, where.device)) as placement:
        yield visits(placement)
