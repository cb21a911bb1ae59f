"""2:4 compression: clean refusals everywhere (CPU included), and on a GPU with 2:4 kernels, real conversion."""
import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny

import labutils as lu
from labutils.prune.masks import prune_by_score
from labutils.prune.sparsity import nm_violations, prunable_linears
from labutils.sparse24 import convert, kernel, shapes
from labutils.sparse24.convert import (
    SemiStructuredReport,
    semi_structured_ready,
    to_semi_structured,
    verify_semi_structured,
)
from labutils.sparse24.graphs import graphed_forward
from labutils.sparse24.kernel import CsltPlan, SparseLinear24
from labutils.sparse24.prefill import prefill_speedup_table
from labutils.sparse24.shapes import linear_shapes
from labutils.speed.latency import memory_table

HAS_CUDA = torch.cuda.is_available()
KERNELS_OK, KERNELS_REASON = lu.semi_structured_support()
needs_2_4_kernels = pytest.mark.skipif(not KERNELS_OK, reason=f"needs 2:4 sparse kernels: {KERNELS_REASON}")
# On a machine without CUDA the reason names the missing GPU; with CUDA, a CPU model is refused for being on the CPU.
CPU_REFUSAL = "the model is on cpu" if HAS_CUDA else r"CPU: 2:4 sparse kernels need an NVIDIA GPU with compute " \
                                                     r"capability ≥ 8.0"


def prune_2_4(model):
    target = lu.SparsityTarget.of(nm="2:4")
    for linear in prunable_linears(model).values():
        prune_by_score(linear, lu.magnitude_score(linear.weight), target)
    return model


def weights_snapshot(model):
    return {name: lin.weight.detach().clone() for name, lin in prunable_linears(model).items()}


def assert_unchanged(model, snapshot):
    for name, lin in prunable_linears(model).items():
        assert type(lin.weight) is torch.nn.Parameter, name
        assert torch.equal(lin.weight, snapshot[name]), name


# ---- refusals that hold on any machine --------------------------------------------------------------------------

def test_not_ready_on_cpu_with_reason(tiny_model):
    ready, reason = semi_structured_ready(tiny_model)
    assert ready is False
    assert reason.startswith("CPU: 2:4 sparse kernels need an NVIDIA GPU") or "the model is on cpu" in reason


def test_pruned_model_on_cpu_raises_lab_error():
    model = prune_2_4(make_tiny())
    snapshot = weights_snapshot(model)
    with pytest.raises(lu.LabError, match=CPU_REFUSAL) as info:
        to_semi_structured(model)
    assert not isinstance(info.value, lu.BadInput)  # an environment problem, not a bad argument
    assert_unchanged(model, snapshot)


def test_unpruned_weights_named_with_violation_count(tiny_model):
    q_proj = prunable_linears(tiny_model)["layers.0.self_attn.q_proj"].weight
    violations = nm_violations(q_proj, 2, 4)
    assert violations == 64 * 16  # random weights: every group of 4 has 4 non-zeros
    with pytest.raises(lu.BadInput, match=rf"14 of 14 linears cannot become 2:4 weights: layers.0.self_attn.q_proj "
                                          rf"breaks 2:4 in {violations} of 1024 groups"):
        to_semi_structured(tiny_model)


def test_one_broken_group_is_found_and_nothing_changes():
    model = prune_2_4(make_tiny())
    down = prunable_linears(model)["layers.1.mlp.down_proj"].weight
    with torch.no_grad():
        down[3, 4:8] = 1.0  # one group of 4 with 4 non-zeros
    snapshot = weights_snapshot(model)
    with pytest.raises(lu.BadInput, match=r"1 of 14 linears .*: layers.1.mlp.down_proj breaks 2:4 in 1 of"):
        to_semi_structured(model)
    assert_unchanged(model, snapshot)


def test_shape_not_a_kernel_multiple_is_named():
    model = prune_2_4(make_tiny(hidden_size=72, intermediate_size=136))  # multiples of 4, not of 16
    with pytest.raises(lu.BadInput, match=r"layers.0.self_attn.q_proj has shape \(out, in\) = \(72, 72\); the kernels "
                                          r"need out a multiple of 16 and in a multiple of 16"):
        to_semi_structured(model)


def test_subset_checks_only_the_selection(tiny_model):
    up = prunable_linears(tiny_model)["layers.0.mlp.up_proj"]
    prune_by_score(up, lu.magnitude_score(up.weight), lu.SparsityTarget.of(nm="2:4"))
    # the other 13 linears break 2:4, but only up_proj is asked for: the device is the only obstacle left
    with pytest.raises(lu.LabError, match=CPU_REFUSAL):
        to_semi_structured(tiny_model, linears=["layers.0.mlp.up_proj"])


@pytest.mark.parametrize("linears,message", [
    (["layers.0.mlp.up"], r"linears has unknown name\(s\) \['layers.0.mlp.up'\]; allowed: names from "
                          r"prunable_linears\(model\), e.g. layers.0.self_attn.q_proj"),
    ([], r"linears must be a non-empty list of names from prunable_linears\(model\); got \[\]"),
    ("layers.0.mlp.up_proj", "linears must be a non-empty list of names .*; got 'layers.0.mlp.up_proj'"),
])
def test_bad_linear_names(tiny_model, linears, message):
    with pytest.raises(lu.BadInput, match=message):
        to_semi_structured(tiny_model, linears=linears)


def test_graphs_and_speed_table_refuse_on_cpu(tiny_model):
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(lu.LabError, match="CUDA graphs need the model on a CUDA GPU; it is on cpu"):
        graphed_forward(tiny_model, ids)
    with pytest.raises(lu.LabError, match=f"cannot time 2:4 kernels \\(dense_model\\): {CPU_REFUSAL}"):
        prefill_speedup_table(tiny_model, tiny_model, (16,))
    with pytest.raises(lu.BadInput, match=r"lengths must be a non-empty sequence of positive integers; got \(0,\)"):
        prefill_speedup_table(tiny_model, tiny_model, (0,))


def test_report_compression_ratio():
    report = SemiStructuredReport(converted=("a",), dense_mib=32.0, compressed_mib=18.0)
    assert report.compression == pytest.approx(0.5625)


# ---- the comparison itself runs anywhere ------------------------------------------------------------------------

def test_verify_identical_models_pass(tiny_model, calib_tokens):
    check = verify_semi_structured(tiny_model, copy.deepcopy(tiny_model), calib_tokens)
    assert check.passed and check.max_abs_diff == 0.0 and check.top1_agreement == 1.0
    assert check.tolerance == pytest.approx(5e-2 + 1e-2 * check.max_abs_reference)


def test_verify_detects_a_different_model(tiny_model, calib_tokens):
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.lm_head.weight.mul_(3.0)
    check = verify_semi_structured(tiny_model, other, calib_tokens, atol=1e-3, rtol=1e-3)
    assert not check.passed and check.max_abs_diff > check.tolerance


@pytest.mark.parametrize("tokens,kwargs,message", [
    (torch.zeros(2, 4), {}, "tokens must hold integer token ids .*; got dtype torch.float32"),
    (torch.zeros(8, dtype=torch.long), {}, r"tokens must be a non-empty 2-d tensor of token ids; got shape \(8,\)"),
    (torch.zeros(1, 0, dtype=torch.long), {}, r"tokens must be a non-empty 2-d tensor of token ids; got shape \(1, 0\)"),
    (torch.full((1, 4), 256), {}, r"tokens must be token ids in \[0, 256\) .*; got min 256, max 256"),
    (torch.zeros(1, 4, dtype=torch.long), {"atol": -1.0}, "atol must be a number ≥ 0; got -1.0"),
    (torch.zeros(1, 4, dtype=torch.long), {"rtol": float("nan")}, "rtol must be a number ≥ 0; got nan"),
])
def test_verify_bad_input(tiny_model, tokens, kwargs, message):
    with pytest.raises(lu.BadInput, match=message):
        verify_semi_structured(tiny_model, tiny_model, tokens, **kwargs)


# ---- on a GPU with 2:4 kernels ----------------------------------------------------------------------------------

@pytest.fixture(params=["lab", "stock"])
def gpu_pair(request):
    """A tiny fp16 Llama with kernel-friendly dims (multiples of 64 / 128), pruned 2:4, and a compressed copy
    (the lab's SparseLinear24 modules, or torch's stock subclass weights)."""
    config = lu.tiny_llama_config(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                  num_key_value_heads=4, max_position_embeddings=256)
    dense = prune_2_4(lu.random_model(config, torch.float16, torch.device("cuda"), seed=0))
    sparse = copy.deepcopy(dense)
    return dense, sparse, to_semi_structured(sparse, kernel=request.param)


@needs_2_4_kernels
def test_gpu_convert_and_verify(gpu_pair):
    dense, sparse, report = gpu_pair
    assert semi_structured_ready(dense)[0]
    assert len(report.converted) == 14 and report.compression < 0.7
    if report.kernel == "lab":
        assert all(isinstance(lin, SparseLinear24) for lin in prunable_linears(sparse).values())
    else:
        assert all(isinstance(lin.weight, torch.sparse.SparseSemiStructuredTensor)
                   for lin in prunable_linears(sparse).values())
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    check = verify_semi_structured(dense, sparse, tokens, atol=1e-2, rtol=1e-2)
    assert check.passed and check.top1_agreement > 0.98, check
    memory = memory_table({"dense": dense, "2:4": sparse}, prompt_len=64)
    assert memory.loc["2:4", "parameters"] == memory.loc["dense", "parameters"]
    assert memory.loc["2:4", "MiB (params + buffers)"] < memory.loc["dense", "MiB (params + buffers)"]
    assert memory["peak prefill MiB (CUDA)"].gt(0).all()


@needs_2_4_kernels
def test_gpu_graphed_forward_matches_eager(gpu_pair):
    _, sparse, _ = gpu_pair
    generator = torch.Generator().manual_seed(1)
    first, second = (torch.randint(0, 512, (1, 32), generator=generator).cuda() for _ in range(2))
    graphed = graphed_forward(sparse, first)
    with torch.inference_mode():
        eager = sparse(input_ids=second, use_cache=False).logits
    replayed = graphed(second).clone()
    torch.testing.assert_close(replayed, eager, atol=1e-2, rtol=1e-2)
    with pytest.raises(lu.BadInput, match=r"input_ids must be a tensor of shape \(1, 32\); got a tensor of shape "
                                          r"\(1, 16\) .*capture another graph"):
        graphed(second[:, :16])
    graphed.release()


@needs_2_4_kernels
def test_gpu_speed_table(gpu_pair):
    dense, sparse, _ = gpu_pair
    timing = lu.PrefillSettings(warmup=1, repeats=2, decode_prompt_len=16, decode_tokens=4, decode_repeats=1)
    table = prefill_speedup_table(dense, sparse, (64, 128, 512), timing, progress=False)
    assert list(table.index) == [("prefill", 64), ("prefill", 128), ("prefill", 512), ("decode", 4)]
    assert "exceed the models' 256 positions" in table.loc[("prefill", 512), "note"]
    timed = table.loc[[("prefill", 64), ("prefill", 128)], ["dense eager ms", "2:4 eager ms", "dense graphed ms",
                                                              "2:4 graphed ms"]]
    assert (timed > 0).all().all()
    assert table.loc[("decode", 4), "2:4 eager ms"] > 0


@needs_2_4_kernels
@pytest.mark.skipif(KERNELS_OK and kernel.search_problem() is not None, reason="this cuSPARSELt's search is refused "
                    "(kernel.BROKEN_SEARCH: it broke the CUDA context on an H200)")
def test_gpu_algorithm_search(gpu_pair):
    dense, _, _ = gpu_pair
    searched = copy.deepcopy(dense)
    report = to_semi_structured(searched, alg_search_tokens=64)
    assert all(isinstance(a, int) and a >= 0 for a in report.alg_ids.values())
    tokens = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(2))
    assert verify_semi_structured(dense, searched, tokens).passed


@needs_2_4_kernels
def test_gpu_float32_model_is_refused():
    model = prune_2_4(lu.random_model(lu.tiny_llama_config(hidden_size=128, intermediate_size=256), torch.float32,
                                      torch.device("cuda")))
    assert "take float16 or bfloat16" in semi_structured_ready(model)[1]
    message = (r"2:4 kernels take float16 or bfloat16 weights \(convert the model with model.half\(\) first\): "
               r"layers.0.self_attn.q_proj is torch.float32; .* \(and 11 more\)")
    with pytest.raises(lu.BadInput, match=message):
        to_semi_structured(model)


# ---- the lab's 2:4 linear, with cuSPARSELt emulated on the CPU ----------------------------------------------------

def emulated_compress(weight):
    """torch._cslt_compress's layout, emulated: the kept values (out, in / 2) row after row, then metadata (here: the
    position 0..3 of each kept value in its group of 4, as numbers of the weight's dtype), flattened."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    positions = groups.abs().topk(2, dim=-1).indices.sort(dim=-1).values  # the 2 kept of each group of 4
    values = groups.gather(-1, positions)
    return torch.cat([values.reshape(-1), positions.reshape(-1).to(weight.dtype)])


def emulated_decompress(packed, in_features):
    half = packed.numel() // 2
    values, positions = packed[:half], packed[half:].long()
    out_features = half * 2 // in_features
    groups = torch.zeros(out_features, in_features // 4, 4, dtype=packed.dtype, device=packed.device)
    groups.scatter_(-1, positions.view(out_features, -1, 2), values.view(out_features, -1, 2))
    return groups.view(out_features, in_features)


def emulated_cslt(packed, dense_t, *, bias=None, transpose_result=False, alg_id=0, split_k=1, **split_k_mode):
    """torch._cslt_sparse_mm's contract for an ``emulated_compress``-ed weight W: W · B (+ b), transposed if asked
    (the split-K mode keyword is split_k_mode or, in some older torch, split_k_one_kernel). Summed in float64 and
    rounded once to the weight's dtype, so a product does not depend on how BLAS blocks it (a stacked weight gives
    its members' rows bit for bit)."""
    out = emulated_decompress(packed, dense_t.shape[0]).double() @ dense_t.double()
    if bias is not None:
        out = out + bias.double()[:, None]
    out = out.to(packed.dtype)
    return out.t().contiguous() if transpose_result else out


def emulated_module(monkeypatch, linear, **kwargs):
    """``linear`` as a ``SparseLinear24`` whose products run ``emulated_cslt`` (torch._cslt_sparse_mm replaced)."""
    monkeypatch.setattr(torch, "_cslt_sparse_mm", emulated_cslt)
    return SparseLinear24.from_linear(linear, compress=emulated_compress, **kwargs)


@pytest.mark.parametrize("shape", [(2, 37), (1, 1), (3, 8), (16,)])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_linear_matches_linear_on_any_token_count(monkeypatch, shape, bias):
    """Padding to multiples of 8 tokens, the transposed operand and the fused transpose give F.linear exactly."""
    torch.manual_seed(0)
    linear = prune_2_4_linear(torch.nn.Linear(32, 48, bias=bias))
    module = emulated_module(monkeypatch, linear)
    x = torch.randn(*shape, 32)
    y = module(x)
    assert y.shape == (*shape, 48) and y.is_contiguous()
    torch.testing.assert_close(y, linear(x))
    lu.find_linears(torch.nn.Sequential(module))  # recognised as a linear sublayer


def prune_2_4_linear(linear):
    prune_by_score(linear, lu.magnitude_score(linear.weight), lu.SparsityTarget.of(nm="2:4"))
    return linear


def test_sparse_linear_layout_check_catches_an_untransposed_result(monkeypatch):
    from labutils.sparse24.kernel import check_against_dense

    linear = prune_2_4_linear(torch.nn.Linear(32, 48, bias=False))
    good = emulated_module(monkeypatch, linear)
    check_against_dense(good, linear.weight, None, "ok")
    wrong_layout = SparseLinear24(linear.weight.clone(), 48, 32)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda p, d, **kw: (p @ d).contiguous())  # never transposed
    with pytest.raises(lu.LabError, match="2:4 kernel for layers.0.mlp.up_proj"):
        check_against_dense(wrong_layout, linear.weight, None, "layers.0.mlp.up_proj")


def test_sparse_linear_algorithm_search_is_used(monkeypatch):
    linear = prune_2_4_linear(torch.nn.Linear(32, 48, bias=False))
    seen = {}

    def search(module, tokens):
        seen.update(in_features=module.in_features, tokens=tokens)
        return CsltPlan(3, 2, 1)

    module = emulated_module(monkeypatch, linear, alg_search_tokens=64, search=search)
    assert module.plan == CsltPlan(3, 2, 1) and module.alg_id == 3 and seen == {"in_features": 32, "tokens": 64}
    assert "alg_id=3, split_k=2, split_k_mode=1" in repr(module)


def test_unknown_kernel_is_refused(tiny_model):
    with pytest.raises(lu.BadInput, match="kernel must be one of lab, stock; got 'fast'"):
        to_semi_structured(prune_2_4(tiny_model), kernel="fast")


def test_linear_shapes_lists_each_shape_once(tiny_model):
    shapes = linear_shapes(tiny_model)
    assert shapes == {(64, 64): ["self_attn.q_proj", "self_attn.o_proj"], (32, 64): ["self_attn.k_proj",
                      "self_attn.v_proj"], (128, 64): ["mlp.gate_proj", "mlp.up_proj"], (64, 128): ["mlp.down_proj"]}


def test_linear_speedup_table_refuses_without_kernels_and_bad_input():
    with pytest.raises(lu.BadInput, match=r"lengths must be a non-empty sequence of positive integers; got \[0\]"):
        lu.linear_speedup_table([(64, 64)], [0])
    with pytest.raises(lu.BadInput, match=r"shapes must hold at least one \(out, in\) weight shape; got an empty list"):
        lu.linear_speedup_table([], [64])
    with pytest.raises(lu.BadInput, match=r"shapes\[1\] \(out, in\) must be a 2-long sequence of positive integers"):
        lu.linear_speedup_table([(64, 64), (64,)], [64])
    with pytest.raises(lu.LabError, match=CPU_REFUSAL if not HAS_CUDA else "cannot time 2:4 kernels"):
        lu.linear_speedup_table([(64, 64)], [64], device="cpu")


def check_linear_table(table, search: bool):
    """What the per-linear table of one (128, 256) shape at 64 and 100 tokens must hold: the searched columns only
    when the search ran (G3: the GPU test asked for "2:4 searched ms" from a run without the search)."""
    assert list(table.index) == [("128×256", 64), ("128×256", 100)]
    timed = ["dense ms", "2:4 alg 0 ms", "2:4 alg 0 × dense"] + (["2:4 searched ms"] if search else [])
    assert (table[timed] > 0).all().all()
    assert search == any("searched" in column for column in table.columns)


@needs_2_4_kernels
def test_gpu_linear_speedup_table():
    table = lu.linear_speedup_table([(128, 256)], [64, 100], lu.LinearTimingSettings(warmup=1, repeats=2),
                                    progress=False)
    check_linear_table(table, search=False)


@pytest.mark.parametrize("search", [False, True])
def test_linear_speedup_table_columns_with_and_without_the_search(monkeypatch, search):
    """The GPU test's check, run on the CPU emulation: without the search there is no searched column to ask for."""
    use_emulated_kernels(monkeypatch)
    fake_mm_search(monkeypatch, (5, 2, 1, 9), [])
    timing = lu.LinearTimingSettings(warmup=0, repeats=1, search=search)
    table = lu.linear_speedup_table([(128, 256)], [64, 100], timing, dtype=torch.float32, device="cpu", progress=False)
    check_linear_table(table, search)


SEARCH = lu.LinearTimingSettings(search=True)


def test_a_measuring_process_refuses_the_search(monkeypatch, tiny_model):
    """benchmarks/gpu_run.sh sets LAB_NO_CUSPARSELT_SEARCH in every step: no search can break a measuring process."""
    use_emulated_kernels(monkeypatch)
    assert kernel.search_problem() is None
    monkeypatch.setenv(kernel.NO_SEARCH_VARIABLE, "1")
    assert "LAB_NO_CUSPARSELT_SEARCH is set" in kernel.search_problem()
    with pytest.raises(lu.LabError, match="search=True: cuSPARSELt's algorithm search is refused in this process"):
        lu.linear_speedup_table([(32, 64)], [8], SEARCH, dtype=torch.float32, device="cpu")
    with pytest.raises(lu.LabError, match="alg_search_tokens: .*refused in this process"):
        to_semi_structured(prune_2_4(tiny_model).half(), alg_search_tokens=64)


def test_the_support_check_runs_cusparselt_itself_not_the_default_backend(monkeypatch):
    """G3: torch's ``to_sparse_semi_structured`` picks CUTLASS where ``_FORCE_CUTLASS`` is set (or another torch
    defaults to it), and CUTLASS refuses sm90; the lab's check names the cuSPARSELt backend. Here the default path
    fails as CUTLASS does on an H100 and the named backend (emulated: it keeps the 2:4 weight) works."""
    def cutlass_on_sm90(weight, *args, **kwargs):
        raise RuntimeError("CUTLASS semi-structured sparsity is not supported on compute capability 9.0")

    class Cusparselt:
        @staticmethod
        def from_dense(weight):
            return weight

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", cutlass_on_sm90)
    monkeypatch.setattr(convert, "_backend", lambda: Cusparselt)
    assert convert._trial_product_error(torch.device("cpu")) == 0


@pytest.mark.parametrize("reported, name", [(800, "cuSPARSELt 0.8.0"), (603, "cuSPARSELt 0.6.3"),
                                            (1200, "cuSPARSELt 1.2.0")])
def test_backend_name_spells_the_version(monkeypatch, reported, name):
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cusparselt, "version", lambda: reported)
    assert convert.backend_name() == name


# ---- cuSPARSELt's plan, padding, counts and errors, emulated on the CPU -------------------------------------------

def use_emulated_kernels(monkeypatch, mm=emulated_cslt):
    """cuSPARSELt emulated where the lab calls it: compression keeps the dense 2:4 weight, the product is
    ``mm``, and the support checks pass. Returns the log of products: (packed, keywords) per call."""
    from labutils.sparse24 import convert, shapes

    calls = []

    def logged_mm(packed, dense_t, **kwargs):
        calls.append((packed, kwargs))
        return mm(packed, dense_t, **kwargs)

    monkeypatch.setattr(torch, "_cslt_compress", emulated_compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", logged_mm)
    monkeypatch.setattr(convert, "kernel_problem", lambda device=None: None)
    monkeypatch.setattr(shapes, "kernel_problem", lambda device=None: None)
    # The emulation is not this machine's cuSPARSELt: neither its BROKEN_SEARCH entry (0.8.0 on the GPU machines)
    # nor benchmarks/gpu_run.sh's LAB_NO_CUSPARSELT_SEARCH applies to it.
    monkeypatch.setattr(kernel, "BROKEN_SEARCH", {})
    monkeypatch.delenv(kernel.NO_SEARCH_VARIABLE, raising=False)
    return calls


def fake_mm_search(monkeypatch, answer, log):
    """torch._C._cusparselt.mm_search answering ``answer`` and logging (packed, dense_B shape)."""
    def mm_search(compressed_a, dense_b, bias, alpha, out_dtype, transpose_result):
        assert transpose_result is True and alpha is None and out_dtype is None
        log.append((compressed_a, tuple(dense_b.shape)))
        return answer

    monkeypatch.setattr(torch._C, "_cusparselt", SimpleNamespace(mm_search=mm_search), raising=False)


def test_plan_keywords_follow_the_schema(monkeypatch):
    from labutils.sparse24 import kernel

    names = [a.name for a in torch.ops.aten._cslt_sparse_mm.default._schema.arguments]
    assert kernel.split_k_keyword() in names  # this torch's own spelling (torch 2.13: split_k_mode)
    assert CsltPlan().mm_kwargs() == {"alg_id": 0, "split_k": 1} or kernel.split_k_keyword() is None
    monkeypatch.setattr(kernel, "split_k_keyword", lambda: "split_k_mode")
    assert CsltPlan(3, 2, 1).mm_kwargs() == {"alg_id": 3, "split_k": 2, "split_k_mode": 1}
    monkeypatch.setattr(kernel, "split_k_keyword", lambda: "split_k_one_kernel")  # some older torch
    assert CsltPlan(3, 2, False).mm_kwargs() == {"alg_id": 3, "split_k": 2, "split_k_one_kernel": False}
    monkeypatch.setattr(kernel, "split_k_keyword", lambda: None)  # no split-K arguments at all
    assert CsltPlan(3, 2, 1).mm_kwargs() == {"alg_id": 3}


@pytest.mark.parametrize("answer,plan", [((5, 4, 1, 9), CsltPlan(5, 4, 1)), ((2, 3, True, 9), CsltPlan(2, 3, True))])
def test_forward_runs_the_searched_split_k_on_a_padded_search(monkeypatch, answer, plan):
    """The search's split-K choice reaches the kernel call, and the search saw 100 tokens padded to 104."""
    from labutils.sparse24 import kernel

    calls = use_emulated_kernels(monkeypatch)
    searched = []
    fake_mm_search(monkeypatch, answer, searched)
    keyword = "split_k_one_kernel" if isinstance(answer[2], bool) else "split_k_mode"
    monkeypatch.setattr(kernel, "split_k_keyword", lambda: keyword)
    linear = prune_2_4_linear(torch.nn.Linear(32, 48, bias=True))
    module = SparseLinear24.from_linear(linear, alg_search_tokens=100)
    assert module.plan == plan and searched[0][1] == (32, 104)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(module(x), linear(x))
    assert calls[-1][1] == {"bias": module.bias, "transpose_result": True, "alg_id": plan.alg_id,
                            "split_k": plan.split_k, keyword: plan.split_k_mode}
    assert f"split_k={plan.split_k}, split_k_mode={plan.split_k_mode}" in repr(module)


def test_search_without_mm_search_falls_back_to_the_algorithm_only(monkeypatch):
    use_emulated_kernels(monkeypatch)
    monkeypatch.delattr(torch._C, "_cusparselt", raising=False)
    seen = []

    def old_search(packed, dense_t, *, bias=None, transpose_result=False):
        seen.append((tuple(dense_t.shape), transpose_result))
        return 7

    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", old_search)
    module = SparseLinear24.from_linear(prune_2_4_linear(torch.nn.Linear(32, 48)), alg_search_tokens=9)
    assert module.plan == CsltPlan(7, 1, None) and seen == [((32, 16), True)]


def test_nonzero_count_skips_the_metadata_of_a_2d_packed_weight():
    """A 2-D packed tensor (rows, values + metadata): only the first out · in / 2 elements are values."""
    values = torch.zeros(16, 16)
    values[:, ::2] = 1.0  # 128 non-zero kept values of a (16, 32) weight
    metadata = torch.full((16, 4), 3.0)  # non-zero index bits
    packed = torch.cat([values.reshape(-1), metadata.reshape(-1)]).view(16, -1)  # (16, 20)
    module = SparseLinear24(packed, 16, 32)
    assert module.nonzero_weights() == 128
    assert SparseLinear24(packed.reshape(-1), 16, 32).nonzero_weights() == 128


def test_wrong_numbers_are_reported_by_the_dense_check_not_as_a_compression_failure(monkeypatch):
    use_emulated_kernels(monkeypatch, mm=lambda packed, dense_t, **kw: 2 * emulated_cslt(packed, dense_t, **kw))
    model = prune_2_4(make_tiny()).half()
    with pytest.raises(lu.LabError, match=r"2:4 kernel for layers.0.self_attn.q_proj differs from the dense "
                                          r"product") as info:
        to_semi_structured(model)
    assert "could not compress" not in str(info.value)


def test_speedup_table_searches_first_on_its_own_copy(monkeypatch):
    """Every search runs before anything is timed, on a compressed copy that algorithm 0 never uses."""
    calls = use_emulated_kernels(monkeypatch)
    searched = []
    fake_mm_search(monkeypatch, (5, 2, 1, 9), searched)
    table = lu.linear_speedup_table([(32, 64)], [8, 12], lu.LinearTimingSettings(warmup=0, repeats=1, search=True),
                                    dtype=torch.float32, device="cpu", progress=False)
    assert [shape for _, shape in searched] == [(64, 8), (64, 16)]  # 12 tokens padded to 16
    assert len(calls) == 2 * 2  # alg 0 and searched, once per length: all after the searches (no mm before)
    alg0 = [packed for packed, kw in calls if kw["alg_id"] == 0]
    tuned = [packed for packed, kw in calls if kw["alg_id"] == 5]
    assert len(alg0) == len(tuned) == 2
    assert all(p.data_ptr() != searched[0][0].data_ptr() for p in alg0)
    assert all(p.data_ptr() == searched[0][0].data_ptr() for p in tuned)
    assert table.loc[("32×64", 12), "searched split_k"] == 2
    assert (table[["dense ms", "2:4 alg 0 ms", "2:4 searched ms"]] > 0).all().all()


def test_a_failed_search_is_named_as_such(monkeypatch):
    use_emulated_kernels(monkeypatch)

    def mm_search(*args):
        raise RuntimeError("CUDA error: internal error when calling `cusparseLtMatmulSearch(...)`")

    monkeypatch.setattr(torch._C, "_cusparselt", SimpleNamespace(mm_search=mm_search), raising=False)
    with pytest.raises(lu.LabError, match=r"cuSPARSELt's search failed for a \(64, 64\) weight at 32 tokens: CUDA "
                                          r"error: .*Convert without alg_search_tokens"):
        to_semi_structured(prune_2_4(make_tiny()).half(), alg_search_tokens=32)


def test_a_search_of_a_broken_cusparselt_is_refused_before_any_work(monkeypatch, tiny_model):
    """cuSPARSELt 0.8.0's search broke the CUDA context on an H200: it is refused with the reason, nothing converted,
    and the speedup table refuses ``search=True`` at once."""
    monkeypatch.delenv(kernel.NO_SEARCH_VARIABLE, raising=False)
    monkeypatch.setattr(torch.backends.cusparselt, "version", lambda: 800)
    monkeypatch.setattr(convert, "kernel_problem", lambda device=None: None)
    monkeypatch.setattr(shapes, "kernel_problem", lambda device=None: None)
    model = prune_2_4(tiny_model).half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lu.LabError, match=r"alg_search_tokens: cuSPARSELt's algorithm search is refused .*0\.8\.0"):
        to_semi_structured(model, alg_search_tokens=64)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(lu.LabError, match="search=True: cuSPARSELt's algorithm search is refused"):
        lu.linear_speedup_table([(32, 64)], [8], SEARCH, dtype=torch.float32, device="cpu")
    monkeypatch.setattr(torch.backends.cusparselt, "version", lambda: 701)
    assert kernel.search_problem() is None
