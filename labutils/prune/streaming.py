"""Low-memory pruning: weights and activations streamed between CPU memory and the GPU (04-Benchmark).

The default driver keeps the model and every calibration batch's hidden states on the GPU: 12.6 GiB of fp16
weights plus 4 GiB per copy of the activations for Llama-2-7B at 128 × 4096 tokens. Pruning only ever needs ONE
decoder layer and ONE batch at a time, so the low-memory mode keeps everything else in CPU memory:

- ``StreamedInputs``: the hidden states entering the current layer live in page-locked ("pinned") CPU memory.
  While the GPU runs batch b, a copy stream already brings batch b + 1 in (double buffering), and each output
  goes back to CPU memory on a second stream (the other copy direction). Pinned memory is what lets these copies
  run alongside compute.
- ``OffloadedLayers``: the model's weights stay in CPU memory. A background thread copies layer i + 1 to the GPU
  while layer i computes, and copies layer i back (with its zeros) while layer i + 1 computes.

Nothing changes in what is computed, batch by batch and in the same order, so the masks are exactly the default
mode's. On a CPU the same code runs with copies from one CPU tensor to another (that is how the tests exercise it).
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.device import get_device
from ..core.errors import BadInput
from ..core.models import model_device
from ..core.validation import describe
from .calibration import LayerInputs, capture_layer_inputs, layer_output


def tree_to(obj, device: torch.device, *, pin: bool = False, non_blocking: bool = False, memo: dict | None = None):
    """``obj`` with every tensor inside (dicts, lists, tuples) copied to ``device``; other values are kept.

    A tensor reached twice is copied once (``memo``, by id), so tensors the layers share stay shared. ``pin``
    puts CPU copies in page-locked memory. A copy is always made, even to the tensor's own device, so the
    streamed path really copies when it runs on a CPU.
    """
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            copy = torch.empty(obj.shape, dtype=obj.dtype, device=device, pin_memory=pin)
            memo[id(obj)] = copy.copy_(obj, non_blocking=non_blocking)
        return memo[id(obj)]
    if isinstance(obj, dict):
        return {k: tree_to(v, device, pin=pin, non_blocking=non_blocking, memo=memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_to(v, device, pin=pin, non_blocking=non_blocking, memo=memo) for v in obj)
    return obj


class _Streams:
    """Two side streams on CUDA, one per copy direction, so a fetch never queues behind a write-back (the GPU has a
    copy engine for each direction). Off CUDA every method is a no-op and copies are synchronous."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.fetch = torch.cuda.Stream(device) if self.cuda else None  # host → device
        self.store = torch.cuda.Stream(device) if self.cuda else None  # device → host

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def event(self, stream=None):
        """An event recorded now on ``stream`` (default: the compute stream); None off CUDA."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream or torch.cuda.current_stream())
        return event

    def after(self, stream, event) -> None:
        """Work queued on ``stream`` from now on waits for ``event`` (None: nothing to wait for)."""
        if self.cuda and event is not None:
            stream.wait_event(event)


class StreamedInputs(LayerInputs):
    """``LayerInputs`` whose batches live in CPU memory (pinned on CUDA) and visit ``device`` one or two at a time.

    ``hidden[b]`` (batch, seq, hidden) and ``kwargs[b][layer]`` are CPU tensors. ``run`` fetches batch b + 1 on
    one stream while the layer computes batch b, and writes outputs back on another into a second set of buffers,
    which become the inputs of the next layer (the old inputs become the next output buffers: two sets in all).
    """

    def __init__(self, device: torch.device):
        super().__init__(hidden=[], kwargs=[])
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.streams = _Streams(self.device)
        self._spare: list[torch.Tensor] = []

    def add_batch(self, hidden: torch.Tensor, layer_kwargs: list[dict]) -> None:
        """Copy one captured batch (on the device) into CPU memory, on the store stream."""
        streams = self.streams
        streams.after(streams.store, streams.event())
        with streams.on(streams.store):
            memo: dict = {}  # every layer's kwargs hold the same tensors: copy them once
            self.hidden.append(tree_to(hidden, torch.device("cpu"), pin=self.pin, non_blocking=True, memo=memo))
            self.kwargs.append([tree_to(kw, torch.device("cpu"), pin=self.pin, non_blocking=True, memo=memo)
                                for kw in layer_kwargs])
        if self.pin:  # the device tensors must outlive the copies reading them
            for t in [hidden, *_tensors(layer_kwargs)]:
                t.record_stream(streams.store)

    def _fetch(self, b: int, layer_index: int):
        with self.streams.on(self.streams.fetch):
            hidden = tree_to(self.hidden[b], self.device, non_blocking=True)
            kwargs = tree_to(self.kwargs[b][layer_index], self.device, non_blocking=True)
        return hidden, kwargs, self.streams.event(self.streams.fetch)

    def _use(self, fetched):
        hidden, kwargs, arrived = fetched
        if arrived is not None:  # the compute stream waits for this batch, on the GPU
            torch.cuda.current_stream().wait_event(arrived)
        if self.pin:  # allocated on the fetch stream, used on the compute stream
            for t in [hidden, *_tensors(kwargs)]:
                t.record_stream(torch.cuda.current_stream())
        return hidden, kwargs

    def _store(self, out: torch.Tensor, target: torch.Tensor, computed) -> None:
        self.streams.after(self.streams.store, computed)
        with self.streams.on(self.streams.store):
            target.copy_(out, non_blocking=True)
        if self.pin:
            out.record_stream(self.streams.store)

    def run(self, layer: nn.Module, layer_index: int, advance: bool) -> None:
        """Run ``layer`` on every batch, the next batch arriving while this one computes; ``advance``: the outputs
        become the inputs of the next layer."""
        streams = self.streams
        if streams.cuda:
            # Buffers change roles between passes: reads wait for the last writes into them, writes for the reads.
            streams.fetch.wait_stream(streams.store)
            streams.store.wait_stream(streams.fetch)
        if advance and len(self._spare) != len(self.hidden):
            self._spare = [torch.empty(h.shape, dtype=h.dtype, pin_memory=self.pin) for h in self.hidden]
        n = len(self.hidden)
        ahead = self._fetch(0, layer_index)
        done = []  # compute-finished events, one per batch
        for b in range(n):
            hidden, kwargs = self._use(ahead)
            out = layer_output(layer(hidden, **kwargs))
            done.append(streams.event())
            if advance:
                self._store(out, self._spare[b], done[b])
            del hidden, kwargs, out
            if b + 1 < n:
                if b >= 1 and done[b - 1] is not None:
                    # The host waits until batch b - 1 is computed (batch b is queued, the GPU stays busy): at most
                    # two batches of inputs on the device, however far ahead Python could run.
                    done[b - 1].synchronize()
                ahead = self._fetch(b + 1, layer_index)
        if advance:
            self.hidden, self._spare = self._spare, self.hidden

    def finish(self) -> None:
        """Wait until every copy to CPU memory has landed."""
        if self.streams.cuda:
            self.streams.store.synchronize()


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


class OffloadedLayers:
    """Decoder layers kept in CPU memory and visiting ``device`` one at a time, copied by one background thread.

    ``prefetch(i)`` starts copying layer i to the device; ``attach(i)`` waits for that copy (the compute stream
    waits on the GPU, the host only for the thread); ``release(i)`` copies layer i back to CPU memory once the
    GPU has finished with it. Use as a context manager: leaving it waits for every copy back.
    """

    def __init__(self, layers: nn.ModuleList, device: torch.device):
        self.layers = layers
        self.device = torch.device(device)
        self.streams = _Streams(self.device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-copies")
        self._fetches: dict[int, Future] = {}
        self._releases: list[Future] = []

    def _to(self, layer: nn.Module, device: torch.device, after) -> object:
        # Runs on the worker thread. To the GPU: queued on the copy stream, the host thread returns once the pageable
        # source is staged. Back to the CPU: waits for ``after`` (the compute that used the layer), then copies.
        stream = self.streams.fetch
        self.streams.after(stream, after)
        with self.streams.on(stream):
            layer.to(device, non_blocking=device.type == "cuda")
        return self.streams.event(stream)

    def prefetch(self, i: int) -> None:
        if 0 <= i < len(self.layers) and i not in self._fetches:
            self._fetches[i] = self._pool.submit(self._to, self.layers[i], self.device, None)

    def attach(self, i: int) -> nn.Module:
        """Layer i on the device, ready for the compute stream."""
        self.prefetch(i)
        arrived = self._fetches.pop(i).result()
        if arrived is not None:
            torch.cuda.current_stream().wait_event(arrived)
        return self.layers[i]

    def release(self, i: int) -> None:
        """Copy layer i back to CPU memory after the work queued on it so far (the caller must not touch it)."""
        self._releases.append(self._pool.submit(self._to, self.layers[i], torch.device("cpu"),
                                                self.streams.event()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for future in self._releases:
            future.result()
        self._pool.shutdown(wait=True)
        if self.streams.cuda:
            self.streams.fetch.synchronize()


@contextlib.contextmanager
def layer_visits(layers: nn.ModuleList, device: torch.device, low_memory: bool, desc: str, progress: bool = True):
    """``with layer_visits(…) as visits: for i, layer in visits: …`` — each decoder layer in order, on ``device``.

    Default mode: the layers already are there. Low-memory mode: ``OffloadedLayers`` brings layer i in (layer
    i + 1 is already on its way) and copies it back once the loop body is done with it; leaving the ``with``
    waits for every copy back, also when the body raised.
    """
    steps = tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress)
    if not low_memory:
        yield ((i, layers[i]) for i in steps)
        return

    def visits(placement: OffloadedLayers):
        for i in steps:
            layer = placement.attach(i)
            placement.prefetch(i + 1)
            yield i, layer
            placement.release(i)

    with OffloadedLayers(layers, device) as placement:
        yield visits(placement)


def calibration_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int, device: torch.device,
                       low_memory: bool) -> LayerInputs:
    """The captured inputs of the first decoder layer: on ``device`` (default mode) or streamed from CPU memory."""
    into = StreamedInputs(device) if low_memory else None
    return capture_layer_inputs(model, tokens, batch_size, device=device, into=into)


class Placement(NamedTuple):
    """Where the layers of a pruning run compute, and whether they stream from CPU memory (low-memory mode)."""

    device: torch.device
    streamed: bool


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
