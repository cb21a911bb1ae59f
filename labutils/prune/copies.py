"""Copying nested tensors between devices, and the copy streams of the low-memory mode (``prune.offload``).

``tree_to`` copies every tensor of a layer's inputs (hidden states, and the keyword arguments a decoder layer
takes: masks, rotary embeddings) at once, each shared tensor once. ``CopyStreams`` holds one side stream per
copy direction on CUDA and names its device in every CUDA call; off CUDA its methods do nothing and copies are
synchronous, which is how the tests run the offload code on a CPU.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def tree_to(obj, device: torch.device, *, non_blocking: bool = False, memo: dict | None = None,
            empty: Callable[[torch.Size, torch.dtype], torch.Tensor] | None = None):
    """``obj`` with every tensor inside (dicts, lists, tuples) copied to ``device``; other values are kept.

    A tensor reached twice is copied once (``memo``, by id), so tensors the layers share stay shared. ``empty``
    makes each copy's buffer from (shape, dtype) (``OffloadedInputs``: pinned, or from a ``PinnedPool``); default:
    a new tensor on ``device``. A copy is always made, even to the tensor's own device, so the offloaded path really
    copies when it runs on a CPU.
    """
    memo = {} if memo is None else memo
    if empty is None:
        def empty(shape, dtype):
            return torch.empty(shape, dtype=dtype, device=device)

    def copy(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            memo[id(t)] = empty(t.shape, t.dtype).copy_(t, non_blocking=non_blocking)
        return memo[id(t)]
    return _tree_map(copy, obj)


def _tree_map(fn, obj):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_map(fn, v) for v in obj)
    return obj


class CopyStreams:
    """Two side streams on CUDA, one per copy direction, so a fetch never queues behind a write-back (the GPU has a
    copy engine for each direction). Off CUDA every method is a no-op and copies are synchronous.

    Every CUDA call names ``device`` (its index fixed here, in the caller's thread): "cuda" alone would mean the
    current device, which another thread, or a run on cuda:1 while cuda:0 is current, sees differently."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.fetch = torch.cuda.Stream(device) if self.cuda else None  # host → device
        self.store = torch.cuda.Stream(device) if self.cuda else None  # device → host

    def compute(self):
        """The stream the layers compute on: ``device``'s current stream."""
        return torch.cuda.current_stream(self.device)

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def on_device(self):
        """``device`` current for this thread (a worker thread starts on cuda:0)."""
        return torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()

    def event(self, stream=None):
        """An event recorded now on ``stream`` (default: the compute stream); None off CUDA."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream or self.compute())
        return event

    def after(self, stream, event) -> None:
        """Work queued on ``stream`` from now on waits for ``event`` (None: nothing to wait for)."""
        if self.cuda and event is not None:
            stream.wait_event(event)


def tensors_in(obj) -> list[torch.Tensor]:
    """Every tensor inside ``obj`` (dicts, lists, tuples), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []
