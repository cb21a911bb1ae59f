"""Low-memory pruning ("offload"): weights and activations kept in CPU memory, each visiting the GPU in turn
(04-Benchmark; ``prune_model(low_memory=True)``, ``--low-memory``). ``placement`` picks this mode; the default
(resident) path never enters this module.

The default driver keeps the model and every calibration batch's hidden states on the GPU: 12.6 GiB of fp16
weights plus 4 GiB per copy of the activations for Llama-2-7B at 128 × 4096 tokens. Pruning only ever needs ONE
decoder layer and ONE batch at a time, so the low-memory mode offloads everything else to CPU memory:

- ``OffloadedInputs``: the hidden states entering the current layer live in page-locked ("pinned") CPU memory.
  While the GPU runs batch b, a copy stream already brings batch b + 1 in (double buffering), and each output
  goes back to CPU memory on a second stream (the other copy direction). Pinned memory is what lets these copies
  run alongside compute.
- ``OffloadedLayers``: the model's weights stay in CPU memory, pinned once and reused. A fetch thread copies
  layer i + 1 to the GPU on one stream while layer i computes; a store thread copies layer i back (with its zeros)
  into the same pinned buffers on the other stream while layer i + 1 computes.
- ``PinnedPool``: pinned buffers reserved once and reused by every offloaded run (``bench-prune`` times runs that
  allocate nothing).

Every CUDA call names the device (streams, events, the copy thread's current device), so cuda:1 works while cuda:0
is current. Nothing changes in what is computed, batch by batch and in the same order, so the masks are exactly the
default mode's. On a CPU the same code runs with copies from one CPU tensor to another (that is how the tests
exercise it).
"""
from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import NamedTuple

import torch
from torch import nn

from ..core.anatomy import find_decoder_layers
from .calibration import LayerInputs, capture_layer_inputs, layer_output
from .copies import CopyStreams, tensors_in, tree_to


class PinnedPool:
    """CPU buffers (page-locked on CUDA) kept from one low-memory run to the next, for a benchmark.

    A low-memory run on Llama-2-7B at 128 × 4096 tokens holds 8 GiB of pinned activations (two sets). Allocating
    them inside a timed run costs seconds, and torch's host caching allocator makes every later run cheaper than
    the first; ``bench-prune`` reserves them once, untimed (``reserve``), and every timed run reuses them. Inside
    ``with pool.reuse():`` each ``OffloadedInputs`` takes its buffers from the pool and gives them back at
    ``finish``; outside, each run allocates its own, as always.
    """

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self.allocations = 0  # buffers this pool had to make (a reused one does not count)

    def empty(self, shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        """A free buffer of this shape, dtype and pinning, or a new one."""
        free = self._free.get((tuple(shape), dtype, pin))
        if free:
            return free.pop()
        self.allocations += 1
        return torch.empty(shape, dtype=dtype, pin_memory=pin)

    def give_back(self, tensors: list[torch.Tensor], pin: bool) -> None:
        """Return buffers (each once, however often listed); nothing may still read or write them."""
        for t in {id(t): t for t in tensors}.values():
            self._free.setdefault((tuple(t.shape), t.dtype, pin), []).append(t)

    @contextlib.contextmanager
    def reuse(self):
        global _reused_pool
        previous, _reused_pool = _reused_pool, self
        try:
            yield self
        finally:
            _reused_pool = previous

    def reserve(self, model: nn.Module, tokens: torch.Tensor, batch_size: int, device: torch.device) -> None:
        """Fill the pool with every buffer a low-memory run on these tokens takes (both sets), untimed, and pin
        the model's layers in place (``pin_layers``), as their first visit would."""
        with self.reuse():
            inputs = capture_layer_inputs(model, tokens, batch_size, device=device, into=OffloadedInputs(device))
            inputs.output_buffers()
            inputs.finish()
        if torch.device(device).type == "cuda":
            pin_layers(find_decoder_layers(model))  # the layers' own pinned homes (OffloadedLayers), made once


_reused_pool: PinnedPool | None = None  # set by ``PinnedPool.reuse``


class OffloadedInputs(LayerInputs):
    """``LayerInputs`` whose batches live in CPU memory (pinned on CUDA) and visit ``device`` one or two at a time.

    ``hidden[b]`` (batch, seq, hidden) and ``kwargs[b][layer]`` are CPU tensors. ``run`` fetches batch b + 1 on
    one stream while the layer computes batch b, and writes outputs back on another into a second set of buffers,
    which become the inputs of the next layer (the old inputs become the next output buffers: two sets in all).
    Made inside ``PinnedPool.reuse``, the buffers come from that pool and go back to it at ``finish``.
    """

    def __init__(self, device: torch.device):
        super().__init__(hidden=[], kwargs=[])
        self.streams = CopyStreams(torch.device(device))
        self.device = self.streams.device
        self.pin = self.device.type == "cuda"
        self.pool = _reused_pool
        self._spare: list[torch.Tensor] = []

    def _empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if self.pool is None:
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        return self.pool.empty(shape, dtype, self.pin)

    def add_batch(self, hidden: torch.Tensor, layer_kwargs: list[dict]) -> None:
        """Copy one captured batch (on the device) into CPU memory, on the store stream."""
        streams, cpu = self.streams, torch.device("cpu")
        streams.after(streams.store, streams.event())
        with streams.on(streams.store):
            memo: dict = {}  # every layer's kwargs hold the same tensors: copy them once
            self.hidden.append(tree_to(hidden, cpu, non_blocking=True, memo=memo, empty=self._empty))
            self.kwargs.append([tree_to(kw, cpu, non_blocking=True, memo=memo, empty=self._empty)
                                for kw in layer_kwargs])
        if streams.cuda:  # the device tensors must outlive the copies reading them
            for t in [hidden, *tensors_in(layer_kwargs)]:
                t.record_stream(streams.store)

    def _fetch(self, b: int, layer_index: int):
        with self.streams.on(self.streams.fetch):
            hidden = tree_to(self.hidden[b], self.device, non_blocking=True)
            kwargs = tree_to(self.kwargs[b][layer_index], self.device, non_blocking=True)
        return hidden, kwargs, self.streams.event(self.streams.fetch)

    def _use(self, fetched):
        hidden, kwargs, arrived = fetched
        if self.streams.cuda:
            compute = self.streams.compute()
            compute.wait_event(arrived)  # the compute stream waits for this batch, on the GPU
            for t in [hidden, *tensors_in(kwargs)]:  # allocated on the fetch stream, used on the compute stream
                t.record_stream(compute)
        return hidden, kwargs

    def _store(self, out: torch.Tensor, target: torch.Tensor, computed) -> None:
        self.streams.after(self.streams.store, computed)
        with self.streams.on(self.streams.store):
            target.copy_(out, non_blocking=True)
        if self.streams.cuda:
            out.record_stream(self.streams.store)

    def output_buffers(self) -> list[torch.Tensor]:
        """The second set of CPU buffers, which the outputs are written into (made once, shaped like the inputs)."""
        if len(self._spare) != len(self.hidden):
            self._spare = [self._empty(h.shape, h.dtype) for h in self.hidden]
        return self._spare

    def run(self, layer: nn.Module, layer_index: int, advance: bool, after_batch=None) -> None:
        """Run ``layer`` on every batch, the next batch arriving while this one computes; ``advance``: the outputs
        become the inputs of the next layer; ``after_batch(b)``, if given, is called once batch b is queued."""
        streams = self.streams
        if streams.cuda:
            # Buffers change roles between passes: reads wait for the last writes into them, writes for the reads.
            streams.fetch.wait_stream(streams.store)
            streams.store.wait_stream(streams.fetch)
        spare = self.output_buffers() if advance else None
        n = len(self.hidden)
        ahead = self._fetch(0, layer_index)
        done = []  # compute-finished events, one per batch
        for b in range(n):
            hidden, kwargs = self._use(ahead)
            out = layer_output(layer(hidden, **kwargs))
            done.append(streams.event())
            if advance:
                self._store(out, spare[b], done[b])
            del hidden, kwargs, out
            if after_batch is not None:
                after_batch(b)
            if b + 1 < n:
                if b >= 1 and done[b - 1] is not None:
                    # The host waits until batch b - 1 is computed (batch b is queued, the GPU stays busy): at most
                    # two batches of inputs on the device, however far ahead Python could run.
                    done[b - 1].synchronize()
                ahead = self._fetch(b + 1, layer_index)
        if advance:
            self.hidden, self._spare = spare, self.hidden

    def finish(self) -> None:
        """Wait until every copy has landed. Buffers taken from a ``PinnedPool`` go back to it (the store is then
        empty): nothing on either stream may still touch them."""
        if self.streams.cuda:
            self.streams.fetch.synchronize()
            self.streams.store.synchronize()
        if self.pool is not None:
            self.pool.give_back([*self.hidden, *self._spare, *tensors_in(self.kwargs)], self.pin)
            self.hidden, self.kwargs, self._spare = [], [], []


class OffloadedLayers:
    """Decoder layers kept in CPU memory and visiting ``device`` one at a time.

    ``prefetch(i)`` starts copying layer i to the device; ``attach(i)`` waits for that copy (the compute stream
    waits on the GPU, the host only for the copy thread); ``release(i)`` copies layer i back once the GPU has
    finished with it. Use as a context manager: leaving it waits for every copy back, and brings back a layer that
    was fetched or attached but not released (the loop body raised).

    Host memory: each layer's parameters and buffers live in page-locked ("pinned") CPU memory, pinned once, the
    first time the layer visits (``pin_layers`` does it ahead, untimed, for a benchmark), and reused: the copy back
    writes into the very tensors the fetch read, so a visit allocates no host memory, and both directions are
    asynchronous DMA (from pageable memory the driver stages every copy through a bounce buffer, host blocked).

    Streams: host → device on the fetch stream, issued by the fetch thread; device → host on the store stream,
    issued by the store thread: one stream and one thread per direction, as ``copies.CopyStreams`` intends (the GPU
    has a copy engine for each), so a copy back never queues behind the next fetch, nor a fetch behind a copy back.

    Lifetimes: a layer's device tensors are made on the fetch thread and read on the compute stream; the copy back
    waits for an event recorded at ``release`` (the compute that used the layer), and the store thread drops the
    device tensors only once that copy has landed (it waits for its own event): nothing is freed while a stream
    still reads it. On a CPU the same code makes real copies (CPU tensor to CPU tensor) on the two threads: that is
    how the tests show the copies overlapping compute (``timeline``).
    """

    def __init__(self, layers: nn.ModuleList, device: torch.device, timeline: list | None = None):
        self.layers = layers
        self.streams = CopyStreams(torch.device(device))
        self.device = self.streams.device
        self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-fetch")
        self._storer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-store")
        self._fetches: dict[int, Future] = {}
        self._visiting: dict[int, list[tuple[_Slot, torch.Tensor]]] = {}  # layer → (slot, its CPU home)
        self._attached: dict[int, float] = {}  # layer → when attach returned
        self._releases: list[Future] = []
        self._released: set[int] = set()
        self.timeline = timeline  # if a list: (what, layer, thread, start, end) per copy and visit, host clock

    def _span(self, what: str, i: int, start: float) -> None:
        if self.timeline is not None:
            self.timeline.append((what, i, threading.current_thread().name, start, time.perf_counter()))

    def _fetch(self, i: int):
        # The fetch thread: each tensor of layer i copied from its (pinned) CPU home into new device memory.
        start, streams = time.perf_counter(), self.streams
        homes = self._visiting[i] = []  # filled as it goes: a fetch that fails half-way is still brought back
        with streams.on_device(), streams.on(streams.fetch):
            for slot in layer_slots(self.layers[i]):
                home = slot.pinned() if streams.cuda else slot.get()
                slot.set(_device_copy(home, self.device, streams.cuda))
                homes.append((slot, home))
            arrived = streams.event(streams.fetch)
        self._span("fetch", i, start)
        return arrived

    def _store(self, i: int, computed) -> None:
        # The store thread: after ``computed``, each device tensor back into its CPU home; the device tensors are
        # dropped once those copies have landed.
        start, streams = time.perf_counter(), self.streams
        homes = self._visiting.pop(i)
        with streams.on_device():
            streams.after(streams.store, computed)
            with streams.on(streams.store):
                for slot, home in homes:
                    home.copy_(slot.get(), non_blocking=streams.cuda)
                landed = streams.event(streams.store)
            if landed is not None:
                landed.synchronize()
            for slot, home in homes:
                slot.set(home)
        self._span("store", i, start)

    def prefetch(self, i: int) -> None:
        if 0 <= i < len(self.layers) and i not in self._fetches and i not in self._attached:
            self._fetches[i] = self._fetcher.submit(self._fetch, i)

    def attach(self, i: int) -> nn.Module:
        """Layer i on the device, ready for the compute stream."""
        self.prefetch(i)
        arrived = self._fetches.pop(i).result()
        if arrived is not None:
            self.streams.compute().wait_event(arrived)
        self._attached[i] = time.perf_counter()
        return self.layers[i]

    def release(self, i: int) -> None:
        """Copy layer i back to CPU memory after the work queued on it so far (the caller must not touch it)."""
        self._span("compute", i, self._attached.pop(i))
        self._released.add(i)
        self._releases.append(self._storer.submit(self._store, i, self.streams.event()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        wait(list(self._fetches.values()))
        for i in list(self._visiting):  # fetched or attached, never released: the loop body raised
            if i not in self._released:
                self._releases.append(self._storer.submit(self._store, i, self.streams.event()))
        try:
            for future in self._releases:
                future.result()
        finally:
            self._fetcher.shutdown(wait=True)
            self._storer.shutdown(wait=True)


class _Slot(NamedTuple):
    """One parameter or buffer of a layer, read and replaced where the module keeps it (a parameter keeps its
    ``nn.Parameter`` object: only its data moves, as ``Module.to`` does it)."""

    module: nn.Module
    name: str
    parameter: bool

    def get(self) -> torch.Tensor:
        return self.module._parameters[self.name].data if self.parameter else self.module._buffers[self.name]

    def set(self, tensor: torch.Tensor) -> None:
        if self.parameter:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor

    def pinned(self) -> torch.Tensor:
        """The CPU tensor held here, page-locked: pinned in place of the pageable one the first time only."""
        tensor = self.get()
        if not _is_pinned(tensor):
            tensor = _pinned_copy(tensor)
            self.set(tensor)
        return tensor


# The three host-memory operations of OffloadedLayers, by name, so that a CPU test can stand in for CUDA's.
def _is_pinned(tensor: torch.Tensor) -> bool:
    return tensor.is_pinned()


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.pin_memory()


def _device_copy(tensor: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    return tensor.to(device, non_blocking=non_blocking, copy=True)


def layer_slots(layer: nn.Module) -> list[_Slot]:
    """Every parameter and buffer of ``layer``: each module's own, a tensor shared by two modules once."""
    slots, seen = [], set()
    for module in layer.modules():
        for store, parameter in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in store.items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    slots.append(_Slot(module, name, parameter))
    return slots


def pin_layers(layers: nn.ModuleList) -> int:
    """Pin every decoder layer's CPU tensors now, as their first low-memory visit would (``bench-prune`` calls it
    outside the timed runs). Returns how many were pinned: 0 when all already are, or without CUDA."""
    if not torch.cuda.is_available():
        return 0
    slots = [slot for layer in layers for slot in layer_slots(layer)]
    fresh = sum(not _is_pinned(slot.get()) for slot in slots)
    for slot in slots:
        slot.pinned()
    return fresh
