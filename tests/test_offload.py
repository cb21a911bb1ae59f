"""The low-memory mode (prune/offload.py) on the CPU: each layer's weights and inputs are copied to the device and
back, overlapping compute, through a reserved pinned pool, and give the default mode's weights; a CPU run makes no
CUDA call and a GPU run names its device in every call."""
import contextlib
import copy
import threading
import time

import pytest
import torch
from conftest import make_tiny, random_tokens

import labutils as lu
from labutils.core.device import SectionTimer
from labutils.core.saved import is_lab_output
from labutils.prune import offload
from labutils.prune.calibration import run_layer
from labutils.prune.offload import OffloadedInputs, OffloadedLayers, PinnedPool, tree_to
from labutils.prune.placement import calibration_inputs

TARGETS = {"50%": lu.SparsityTarget.of(sparsity=0.5), "2:4": lu.SparsityTarget.of(nm="2:4"),
           "60%": lu.SparsityTarget.of(sparsity=0.6)}


@pytest.mark.parametrize("method, target, options", [
    ("wanda", "50%", {}), ("wanda", "2:4", {}), ("magnitude", "50%", {}), ("sparsegpt", "2:4", {}),
    ("ria", "50%", {}), ("wanda", "50%", {"true_sequential": True}), ("wanda", "60%", {"owl": lu.OwlConfig()}),
])
def test_low_memory_mode_gives_the_default_modes_weights(method, target, options, calib_tokens):
    model = make_tiny(num_hidden_layers=3)
    default, low = copy.deepcopy(model), copy.deepcopy(model)
    spec = lu.PruneSpec(method, TARGETS[target], **options)
    a = lu.prune_model(default, spec, calib_tokens, batch_size=4, progress=False)
    b = lu.prune_model(low, spec, calib_tokens, batch_size=4, progress=False, low_memory="cpu")
    assert b.low_memory and not a.low_memory
    assert a.mask_sha256 == b.mask_sha256
    for (name, x), y in zip(default.state_dict().items(), low.state_dict().values()):
        assert torch.equal(x, y), name  # not only the masks: SparseGPT's updated weights too
    assert [s.pruned for s in a.sublayers] == [s.pruned for s in b.sublayers]
    assert a.layer_sparsity == b.layer_sparsity


def test_offloaded_inputs_copy_every_batch_and_match_resident_inputs(tiny_model, calib_tokens):
    resident = calibration_inputs(tiny_model, calib_tokens, 4, torch.device("cpu"), low_memory=False)
    offloaded = calibration_inputs(tiny_model, calib_tokens, 4, torch.device("cpu"), low_memory=True)
    assert isinstance(offloaded, OffloadedInputs) and len(offloaded.hidden) == 2
    layers = lu.find_decoder_layers(tiny_model)
    for i, layer in enumerate(layers):
        produced = []
        handle = layer.register_forward_hook(lambda m, a, out: produced.append(out))
        resident.run(layer, i, advance=True)
        offloaded.run(layer, i, advance=True)
        handle.remove()
        for r, s in zip(resident.hidden, offloaded.hidden):
            torch.testing.assert_close(s, r, rtol=0, atol=0)
        # the offloaded store holds its own copies, never the tensors the layer returned
        own = {t.data_ptr() for t in offloaded.hidden}
        assert not own & {(o[0] if isinstance(o, tuple) else o).data_ptr() for o in produced}
    offloaded.finish()


def test_statistics_pass_keeps_no_outputs(tiny_model, calib_tokens):
    inputs = calibration_inputs(tiny_model, calib_tokens, 4, torch.device("cpu"), low_memory=False)
    before = [t.clone() for t in inputs.hidden]
    layer = lu.find_decoder_layers(tiny_model)[0]
    assert run_layer(layer, 0, inputs, keep=False) == []
    inputs.run(layer, 0, advance=False)
    assert all(torch.equal(a, b) for a, b in zip(before, inputs.hidden))


def test_tree_to_copies_shared_tensors_once():
    t = torch.arange(4.0)
    copied = tree_to({"a": t, "b": (t, 3, None), "c": [t * 2]}, torch.device("cpu"))
    assert copied["a"] is copied["b"][0] and copied["a"].data_ptr() != t.data_ptr()
    assert copied["b"][1:] == (3, None) and torch.equal(copied["c"][0], t * 2)


def test_offloaded_layers_visit_and_return(tiny_model):
    layers = lu.find_decoder_layers(tiny_model)
    with OffloadedLayers(layers, torch.device("cpu")) as placement:
        for i in range(len(layers)):
            assert placement.attach(i) is layers[i]
            placement.prefetch(i + 1)
            placement.release(i)
    assert all(p.device.type == "cpu" for p in tiny_model.parameters())


def test_low_memory_needs_the_model_in_cpu_memory(tiny_model, calib_tokens):
    target = TARGETS["50%"]
    with pytest.raises(lu.BadInput, match="low_memory keeps the model in CPU memory.*the model is on meta"):
        lu.prune_model(tiny_model.to("meta"), lu.PruneSpec("wanda", target), calib_tokens, low_memory=True)


@pytest.mark.parametrize("value,message", [
    (1, "low_memory must be False, True or a device such as 'cuda'; got 1"),
    (None, "low_memory must be False, True or a device such as 'cuda'; got None"),
    ("nowhere", "device 'nowhere' is not one the lab can run on; allowed: cuda, cuda:N, mps, cpu"),
])
def test_low_memory_takes_a_flag_or_a_device(value, message, tiny_model, calib_tokens):
    before = lu.mask_sha256(tiny_model)
    with pytest.raises(lu.BadInput, match=message):
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", TARGETS["50%"]), calib_tokens, low_memory=value)
    assert lu.mask_sha256(tiny_model) == before


def test_section_timer_on_cpu_times_each_section():
    timer = SectionTimer(torch.device("cpu"))
    for _ in range(3):
        with timer.section():
            sum(range(1000))
    seconds = timer.seconds()
    assert len(seconds) == 3 and all(0 <= s < 1 for s in seconds)


@pytest.mark.slow
def test_main_job_low_memory_gives_the_same_model(tmp_path):
    """`python -m labutils prune --low-memory` on the default profile: same masks and perplexities as the default."""
    sizes = dict(nsamples=4, seqlen=64, eval_tokens=512, batch_size=2, device="cpu")
    default = lu.run_prune_job(lu.PruneJob(out=str(tmp_path / "default"), **sizes), progress=False)
    low = lu.run_prune_job(lu.PruneJob(out=str(tmp_path / "low"), low_memory=True, **sizes), progress=False)
    assert low["mask_sha256"] == default["mask_sha256"]
    assert low["perplexity"] == default["perplexity"]
    assert is_lab_output(tmp_path / "low")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: streams, pinned memory")


@needs_cuda
@pytest.mark.parametrize("target", ["50%", "2:4"])
def test_gpu_low_memory_same_weights_less_memory(target):
    """On a GPU: offloaded to pinned CPU memory, copied on copy streams, the weights still match the default mode's."""
    config = lu.tiny_llama_config(num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                                  max_position_embeddings=256)
    tokens = random_tokens((8, 128), 0)
    on_gpu = lu.random_model(config, torch.float16, torch.device("cuda"), seed=0)
    on_cpu = copy.deepcopy(on_gpu).to("cpu")
    torch.cuda.reset_peak_memory_stats()
    a = lu.prune_model(on_gpu, lu.PruneSpec("wanda", TARGETS[target]), tokens, batch_size=2, progress=False)
    default_peak = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    b = lu.prune_model(on_cpu, lu.PruneSpec("wanda", TARGETS[target]), tokens, batch_size=2, progress=False,
                       low_memory="cuda")
    assert torch.cuda.max_memory_allocated() - base < default_peak
    assert a.mask_sha256 == b.mask_sha256 and all(p.device.type == "cpu" for p in on_cpu.parameters())
    for x, y in zip(on_gpu.state_dict().values(), on_cpu.state_dict().values()):
        assert torch.equal(x.cpu(), y)


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


def visit_all(layers, device, timeline=None, compute=None):
    with OffloadedLayers(layers, device, timeline) as placement:
        for i in range(len(layers)):
            layer = placement.attach(i)
            placement.prefetch(i + 1)
            if compute is not None:
                compute(i, layer)
            placement.release(i)


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
