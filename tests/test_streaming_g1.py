"""The GPU paths of pruning, checked on the CPU (issue G1): the mask fingerprint off the timed path and packed where the
weights are, pinned buffers reserved once for every low-memory run, and every CUDA call naming its device."""
import contextlib
import copy
import hashlib
import json
import threading
import time

import numpy as np
import pytest
import torch
from conftest import make_tiny, random_tokens

import labutils as lu
from labutils.jobs import bench_prune as bench
from labutils.prune import driver, offload, sparsity
from labutils.core.sparse.bits import pack_mask_torch
from labutils.prune.sparsity import prunable_linears
from labutils.prune.offload import OffloadedInputs, OffloadedLayers, PinnedPool
from labutils.prune.placement import calibration_inputs


def reference_mask_sha256(model) -> str:
    """The fingerprint as it was first written: one numpy ``packbits`` per linear, on the host."""
    digest = hashlib.sha256()
    for name, lin in prunable_linears(model).items():
        zeros = (lin.weight.detach() == 0).cpu().numpy()
        digest.update(f"{name}:{zeros.shape}".encode())
        digest.update(np.packbits(zeros).tobytes())
    return digest.hexdigest()


def odd_model():
    """Linears whose sizes are not multiples of 8 (30 × 30, 10 × 30, 77 × 30 …) with random zeros: no linear ends on a
    byte boundary."""
    model = make_tiny(hidden_size=30, intermediate_size=77, num_attention_heads=3, num_key_value_heads=1)
    gen = torch.Generator().manual_seed(3)
    for lin in prunable_linears(model).values():
        lin.weight.data[torch.rand(lin.weight.shape, generator=gen) < 0.5] = 0
    return model


# --- 1. the mask fingerprint ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 5), (13, 7), (2, 3, 5), (77, 36)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_pack_bits_is_numpys_packbits(shape, density):
    bits = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) < density
    packed = pack_mask_torch(bits)
    assert packed.dtype == torch.uint8
    np.testing.assert_array_equal(packed.numpy(), np.packbits(bits.numpy()))


def test_mask_sha256_is_the_reference_digest_in_one_transfer(monkeypatch):
    model = odd_model()
    expected = reference_mask_sha256(model)
    assert lu.mask_sha256(model) == expected
    # The device path (what runs on a GPU): packed by torch, then one copy to the host for all linears.
    monkeypatch.setattr(sparsity, "pack_mask", pack_mask_torch)
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(t.shape) or real_cpu(t, *a, **k))
    assert lu.mask_sha256(model) == expected
    assert len(copies) == 1 and len(prunable_linears(model)) == 14


def test_prune_model_can_leave_the_fingerprint_to_the_caller(monkeypatch, calib_tokens):
    a, b = make_tiny(), make_tiny()
    spec = lu.PruneSpec("wanda", 0.5)
    full = lu.prune_model(a, spec, calib_tokens, progress=False)
    assert full.mask_sha256 == reference_mask_sha256(a)
    monkeypatch.setattr(driver, "mask_sha256", lambda model: pytest.fail("hashed although fingerprint=False"))
    bare = lu.prune_model(b, spec, calib_tokens, progress=False, fingerprint=False)
    assert bare.mask_sha256 == "" and lu.mask_sha256(b) == full.mask_sha256


def test_bench_prune_times_pruning_alone(monkeypatch):
    """No fingerprint and no pinned allocation inside ``measure``; every row still has its hash."""
    timing, hashed, pools = [], [], []
    real_measure, real_hash = bench.measure, sparsity.mask_sha256

    def measure(device, fn):
        before = [p.allocations for p in pools]
        timing.append(True)
        try:
            return real_measure(device, fn)
        finally:
            timing.pop()
            assert [p.allocations for p in pools] == before, "pinned buffers allocated inside a timed run"

    def mask_hash(model):
        hashed.append(bool(timing))
        return real_hash(model)

    class CountedPool(PinnedPool):
        def __init__(self):
            super().__init__()
            pools.append(self)

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "mask_sha256", mask_hash)
    monkeypatch.setattr(driver, "mask_sha256", mask_hash)
    monkeypatch.setattr(bench, "PinnedPool", CountedPool)
    setup = bench.bench_setup(tiny=True, device="cpu", sizes={"nsamples": 4, "seqlen": 32})
    result = bench.bench_prune(setup, progress=False)
    assert hashed == [False] * 4 and len(pools) == 1 and pools[0].allocations > 0
    rows = result.rows
    assert rows[0]["mask sha256"] == rows[2]["mask sha256"] != rows[1]["mask sha256"] == rows[3]["mask sha256"]
    assert [r["same masks as default"] for r in rows] == ["", "", True, True]


# --- 5. pinned buffers reserved once ----------------------------------------------------------------------------

def test_a_reserved_pool_serves_every_low_memory_run(calib_tokens):
    model = make_tiny(num_hidden_layers=3)
    pool = PinnedPool()
    pool.reserve(model, calib_tokens, 4, torch.device("cpu"))
    reserved = pool.allocations
    assert reserved > 0
    hashes = {}
    with pool.reuse():
        for target in ("50%", "2:4", "50%"):
            low = copy.deepcopy(model)
            report = lu.prune_model(low, lu.PruneSpec("wanda", target), calib_tokens, batch_size=4, progress=False,
                                    low_memory="cpu")
            assert pool.allocations == reserved, f"the {target} run allocated buffers"
            hashes.setdefault(target, set()).add(report.mask_sha256)
    for target, found in hashes.items():  # the same masks as without a pool, in either mode
        alone = lu.prune_model(copy.deepcopy(model), lu.PruneSpec("wanda", target), calib_tokens, batch_size=4,
                               progress=False, low_memory="cpu")
        default = lu.prune_model(copy.deepcopy(model), lu.PruneSpec("wanda", target), calib_tokens, batch_size=4,
                                 progress=False)
        assert found == {alone.mask_sha256} == {default.mask_sha256}
    assert pool.allocations == reserved  # outside ``reuse`` the pool is not touched


def test_without_a_pool_a_second_run_counts_its_first_allocations_once(calib_tokens):
    """Unreserved, the first run inside ``reuse`` allocates and the second takes the same buffers back."""
    model = make_tiny()
    pool = PinnedPool()
    with pool.reuse():
        first = calibration_inputs(model, calib_tokens, 4, torch.device("cpu"), low_memory=True)
        first.run(lu.find_decoder_layers(model)[0], 0, advance=True)
        first.finish()
        after_first = pool.allocations
        second = calibration_inputs(model, calib_tokens, 4, torch.device("cpu"), low_memory=True)
        second.output_buffers()
        second.finish()
    assert after_first > 0 and pool.allocations == after_first
    assert OffloadedInputs(torch.device("cpu")).pool is None  # ordinary use: nothing reserved


# --- 8. every CUDA call names the device -------------------------------------------------------------------------

class CudaFakes:
    """Stand-ins for the CUDA stream API that record which device each call named, and in which thread."""

    def __init__(self):
        self.calls: list[tuple[str, object]] = []
        self.entered = threading.local()
        self.layer_moves: list[tuple[str, object, object]] = []  # (thread, target, device entered)

    def install(self, monkeypatch):
        fakes = self

        class Stream:
            def __init__(self, device=None):
                self.device = device
                fakes.calls.append(("Stream", device))

            def wait_event(self, event):
                assert event is not None

            def wait_stream(self, stream):
                pass

            def synchronize(self):
                pass

        class Event:
            def record(self, stream):
                fakes.calls.append(("Event.record", stream.device))

            def synchronize(self):
                pass

        @contextlib.contextmanager
        def device(d):
            fakes.entered.device = d
            yield

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self._current(Stream, device))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.Tensor, "record_stream",
                            lambda t, s: fakes.calls.append(("record_stream", s.device)))
        real = offload.tree_to  # tensors stay on the CPU, where the test can compute with them
        monkeypatch.setattr(offload, "tree_to", lambda obj, device, **kw: real(obj, torch.device("cpu"), **kw))

    def _current(self, stream_type, device):
        self.calls.append(("current_stream", device))
        return stream_type(device)

    def watch_host_memory(self, monkeypatch):
        """Pinning and host → device copies as CPU clones, recorded: (thread, what, device entered)."""
        pinned = self.pinned = set()  # data_ptr of every "page-locked" tensor

        def pinned_copy(tensor):
            self.layer_moves.append((threading.current_thread().name, "pin", getattr(self.entered, "device", None)))
            copy = tensor.clone()
            pinned.add(copy.data_ptr())
            return copy

        def device_copy(tensor, device, non_blocking):
            assert tensor.data_ptr() in pinned and non_blocking  # from page-locked memory, asynchronously
            self.layer_moves.append((threading.current_thread().name, device, getattr(self.entered, "device", None)))
            return tensor.clone()

        monkeypatch.setattr(offload, "_is_pinned", lambda tensor: tensor.data_ptr() in pinned)
        monkeypatch.setattr(offload, "_pinned_copy", pinned_copy)
        monkeypatch.setattr(offload, "_device_copy", device_copy)


@pytest.mark.parametrize("given", ["cuda:1", "cuda"])  # "cuda" while cuda:1 is current: fixed at construction
def test_every_cuda_call_names_the_device_of_a_non_default_gpu(given, monkeypatch, tiny_model, calib_tokens):
    fakes = CudaFakes()
    fakes.install(monkeypatch)
    cuda1 = torch.device("cuda", 1)
    resident = calibration_inputs(tiny_model, calib_tokens, 4, torch.device("cpu"), low_memory=False)
    offloaded = OffloadedInputs(torch.device(given))
    offloaded.pin = False  # no page-locked memory without CUDA
    assert offloaded.device == cuda1
    for hidden, kwargs in zip(resident.hidden, resident.kwargs):
        offloaded.add_batch(hidden, kwargs)
    layers = lu.find_decoder_layers(tiny_model)
    fakes.watch_host_memory(monkeypatch)
    homes = [[p for p in layer.parameters()] for layer in layers]
    with OffloadedLayers(layers, torch.device(given)) as placement:
        for i in range(len(layers)):
            layer = placement.attach(i)
            placement.prefetch(i + 1)
            offloaded.run(layer, i, advance=True)
            resident.run(layer, i, advance=True)
            placement.release(i)
    offloaded.finish()
    for s, r in zip(offloaded.hidden, resident.hidden):
        torch.testing.assert_close(s, r, rtol=0, atol=0)
    kinds = {kind for kind, _ in fakes.calls}
    assert {"Stream", "current_stream", "Event.record", "record_stream"} <= kinds
    assert all(device == cuda1 for _, device in fakes.calls), fakes.calls
    # Every tensor of every layer was pinned once and went to cuda:1, each from the fetch thread with cuda:1 entered
    # explicitly; back in CPU memory, each parameter is its pinned home (the same Parameter, the same buffer).
    tensors = sum(len(list(layer.parameters())) for layer in layers)
    assert [what for _, what, _ in fakes.layer_moves] == ["pin", cuda1] * tensors
    assert all(thread.startswith("layer-fetch") and entered == cuda1 for thread, _, entered in fakes.layer_moves)
    assert all(p is q for layer, before in zip(layers, homes) for p, q in zip(layer.parameters(), before))
    assert all(p.data_ptr() in fakes.pinned for layer in layers for p in layer.parameters())


def test_cpu_offload_makes_no_cuda_call(monkeypatch, tiny_model, calib_tokens):
    """The CPU path stays as it was: no stream, event or device call at all."""
    for name in ("Stream", "Event", "current_stream", "stream", "device"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, name=name, **k: pytest.fail(f"torch.cuda.{name} called"))
    low = lu.prune_model(copy.deepcopy(tiny_model), lu.PruneSpec("wanda", 0.5), random_tokens((4, 16)), batch_size=2,
                         progress=False, low_memory="cpu")
    assert low.low_memory


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: packing on the device, "
                                "pinned memory, streams")


@needs_cuda
def test_gpu_mask_sha256_packs_on_the_device_to_the_same_digest():
    model = odd_model()
    expected = reference_mask_sha256(model)
    assert lu.mask_sha256(model.to("cuda")) == expected


@needs_cuda
def test_gpu_reserved_pinned_pool_serves_low_memory_runs_with_the_default_masks():
    config = lu.tiny_llama_config(num_hidden_layers=3, hidden_size=256, intermediate_size=512,
                                  max_position_embeddings=256)
    tokens = random_tokens((8, 128), 0)
    model = lu.random_model(config, torch.float16, torch.device("cpu"), seed=0)
    pool = PinnedPool()
    pool.reserve(model, tokens, 2, torch.device("cuda"))
    reserved = pool.allocations
    with pool.reuse():
        for target in ("50%", "2:4"):
            spec = lu.PruneSpec("wanda", target)
            low = lu.prune_model(copy.deepcopy(model), spec, tokens, batch_size=2, progress=False,
                                 low_memory="cuda")
            default = lu.prune_model(copy.deepcopy(model).to("cuda"), spec, tokens, batch_size=2, progress=False)
            assert pool.allocations == reserved and low.mask_sha256 == default.mask_sha256


def test_section_timer_records_on_its_own_devices_stream(monkeypatch):
    """The driver's CUDA-event timer records on the named device's stream, not on the current device's."""
    from labutils.core.device import SectionTimer
    asked, recorded = [], []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: asked.append(device) or f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timer = SectionTimer(torch.device("cuda", 1))
    with timer.section():
        pass
    assert asked == [torch.device("cuda", 1)] * 2 and recorded == ["stream of cuda:1"] * 2


def test_fingerprint_must_be_a_flag(tiny_model, calib_tokens):
    with pytest.raises(lu.BadInput, match="fingerprint must be True or False; got 'no'"):
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", 0.5), calib_tokens, progress=False, fingerprint="no")


def test_saved_bench_results_reads_back_a_written_run(tmp_path):
    """A run written by bench-prune (its setup and environment both name a device) reads back as 04 shows it: the
    newest file of the folder, floor first, with date, GPU and calibration size in attrs."""
    result = bench.bench_prune(bench.bench_setup(tiny=True, device="cpu", sizes={"nsamples": 4}), progress=False)
    bench.write_json(result, tmp_path / "2026-01-01-bench-prune.json")
    newer = result.to_json()
    newer["environment"]["gpu"] = "a newer GPU"
    (tmp_path / "2026-02-01-bench-prune.json").write_text(json.dumps(newer))
    table = lu.saved_bench_results(tmp_path)
    assert list(table.index)[0] == ("floor: 2 passes / layer", "") and len(table) == 1 + len(result.rows)
    assert table.attrs["gpu"] == "a newer GPU" and table.attrs["nsamples"] == 4
    assert table.attrs["device"] == "cpu" and table.attrs["file"].endswith("2026-02-01-bench-prune.json")
    assert lu.saved_bench_results(tmp_path / "empty") is None


# --- 9. the layers' copies (G3 item 5): pinned homes reused, one thread and stream per direction, overlap -----------

def visit_all(layers, device, timeline=None, compute=None):
    with OffloadedLayers(layers, device, timeline) as placement:
        for i in range(len(layers)):
            layer = placement.attach(i)
            placement.prefetch(i + 1)
            if compute is not None:
                compute(i, layer)
            placement.release(i)


def test_a_second_low_memory_visit_pins_nothing_and_writes_back_into_the_same_buffers(monkeypatch, tiny_model):
    """The low-memory mode measured 3.67× the floor on an H200 with the weights in pageable memory and a fresh host
    allocation on every copy back. Now each tensor is pinned once; every later visit copies back into it."""
    fakes = CudaFakes()
    fakes.install(monkeypatch)
    fakes.watch_host_memory(monkeypatch)
    layers = lu.find_decoder_layers(tiny_model)
    tensors = sum(len(list(layer.parameters())) for layer in layers)
    visit_all(layers, torch.device("cuda:1"))
    homes = [p.data_ptr() for p in layers.parameters()]
    fakes.layer_moves.clear()

    def prune(i, layer):  # what pruning does on the "device" (a CPU clone here): the copy back carries it home
        assert layer.mlp.down_proj.weight.data_ptr() not in homes
        layer.mlp.down_proj.weight.data[0] = 0

    visit_all(layers, torch.device("cuda:1"), compute=prune)
    assert [what for _, what, _ in fakes.layer_moves].count("pin") == 0
    assert len(fakes.layer_moves) == tensors  # only the fetches: no host allocation, no pinning
    assert [p.data_ptr() for p in layers.parameters()] == homes
    assert all(not layer.mlp.down_proj.weight[0].any() for layer in layers)


def test_a_copy_back_never_holds_up_the_next_fetch(monkeypatch):
    """One thread (and stream) per direction: while layer 0's copy back is still waiting (here: held until layer 2
    has arrived), the fetches go on. With both directions on one worker the fetch of layer 2 would queue behind
    the copy back and this test would wait out its 10 s and fail."""
    layers = lu.find_decoder_layers(make_tiny(num_hidden_layers=4))
    arrived_2 = threading.Event()
    order = []
    real_fetch, real_store = OffloadedLayers._fetch, OffloadedLayers._store

    def fetch(self, i):
        result = real_fetch(self, i)
        order.append(f"fetch {i}")
        if i == 2:
            arrived_2.set()
        return result

    def store(self, i, computed):
        if i == 0:
            arrived_2.wait(timeout=10)
        order.append(f"store {i}")
        return real_store(self, i, computed)

    monkeypatch.setattr(OffloadedLayers, "_fetch", fetch)
    monkeypatch.setattr(OffloadedLayers, "_store", store)
    visit_all(layers, torch.device("cpu"))
    assert order.index("fetch 2") < order.index("store 0")
    assert sorted(order) == sorted([f"fetch {i}" for i in range(4)] + [f"store {i}" for i in range(4)])


def test_the_copies_overlap_compute_on_the_cpu_emulation():
    """The timeline of a CPU run (real copies, CPU tensor to CPU tensor, on the fetch and store threads; each layer's
    compute held 30 ms): layer i + 1 arrives while layer i computes, and layer i goes home while i + 1 computes."""
    layers = lu.find_decoder_layers(make_tiny(num_hidden_layers=4))
    timeline = []
    visit_all(layers, torch.device("cpu"), timeline, compute=lambda i, layer: time.sleep(0.03))
    spans = {(what, i): (thread, start, end) for what, i, thread, start, end in timeline}
    for i in range(3):
        compute_start, compute_end = spans[("compute", i)][1:]
        assert spans[("fetch", i + 1)][2] < compute_end  # the next layer was in before this one finished
        next_start, next_end = spans[("compute", i + 1)][1:]
        assert spans[("store", i)][1] < next_end  # this layer went home while the next computed
    threads = {what: {spans[key][0].rsplit("_", 1)[0] for key in spans if key[0] == what}
               for what in ("fetch", "store", "compute")}
    assert threads == {"fetch": {"layer-fetch"}, "store": {"layer-store"}, "compute": {"MainThread"}}
    # The layers are home again: every parameter back in CPU memory, none left on a copy thread.
    assert all(p.device.type == "cpu" for p in layers.parameters())


def test_a_loop_that_raises_still_brings_every_layer_home(tiny_model):
    """A layer that was fetched or attached but never released (the loop body raised) is copied back on exit."""
    layers = lu.find_decoder_layers(tiny_model)
    before = [p.data_ptr() for p in layers.parameters()]
    with pytest.raises(RuntimeError, match="stop"):
        with OffloadedLayers(layers, torch.device("cpu")) as placement:
            placement.attach(0)
            placement.prefetch(1)
            raise RuntimeError("stop")
    assert [p.data_ptr() for p in layers.parameters()] == before
