"""2:4 compression: clean refusals everywhere (CPU included), and on a GPU with 2:4 kernels, real conversion."""
import copy

import pytest
import torch
from conftest import make_tiny

import labutils as lu
from labutils.prune.masks import prune_by_score
from labutils.prune.sparsity import nm_violations, prunable_linears
from labutils.sparse24.convert import (
    SemiStructuredReport,
    prefill_speedup_table,
    semi_structured_ready,
    to_semi_structured,
    verify_semi_structured,
)
from labutils.sparse24.graphs import graphed_forward
from labutils.sparse24.kernel import SparseLinear24
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
    table = prefill_speedup_table(dense, sparse, (64, 128, 512), warmup=1, repeats=2, decode_prompt_len=16,
                                  decode_tokens=4, decode_repeats=1, progress=False)
    assert list(table.index) == [("prefill", 64), ("prefill", 128), ("prefill", 512), ("decode", 4)]
    assert "exceed the models' 256 positions" in table.loc[("prefill", 512), "note"]
    timed = table.loc[[("prefill", 64), ("prefill", 128)], ["dense eager ms", "2:4 eager ms", "dense graphed ms",
                                                              "2:4 graphed ms"]]
    assert (timed > 0).all().all()
    assert table.loc[("decode", 4), "2:4 eager ms"] > 0


@needs_2_4_kernels
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

def emulated_cslt(packed, dense_t, *, bias, transpose_result, alg_id):
    """torch._cslt_sparse_mm's contract with ``packed`` = the dense 2:4 weight: W · B, transposed if asked."""
    out = packed @ dense_t
    if bias is not None:
        out = out + bias[:, None]
    return out.t().contiguous() if transpose_result else out


def emulated_module(linear, **kwargs):
    return SparseLinear24.from_linear(linear, compress=lambda w: w.clone(), mm=emulated_cslt, **kwargs)


@pytest.mark.parametrize("shape", [(2, 37), (1, 1), (3, 8), (16,)])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_linear_matches_linear_on_any_token_count(shape, bias):
    """Padding to multiples of 8 tokens, the transposed operand and the fused transpose give F.linear exactly."""
    torch.manual_seed(0)
    linear = prune_2_4_linear(torch.nn.Linear(32, 48, bias=bias))
    module = emulated_module(linear)
    x = torch.randn(*shape, 32)
    y = module(x)
    assert y.shape == (*shape, 48) and y.is_contiguous()
    torch.testing.assert_close(y, linear(x))
    lu.find_linears(torch.nn.Sequential(module))  # recognised as a linear sublayer


def prune_2_4_linear(linear):
    prune_by_score(linear, lu.magnitude_score(linear.weight), lu.SparsityTarget.of(nm="2:4"))
    return linear


def test_sparse_linear_layout_check_catches_an_untransposed_result():
    from labutils.sparse24.kernel import check_against_dense

    linear = prune_2_4_linear(torch.nn.Linear(32, 48, bias=False))
    good = emulated_module(linear)
    check_against_dense(good, linear.weight, None, "ok")
    wrong_layout = SparseLinear24(linear.weight.clone(), 48, 32, mm=lambda p, d, **kw: (p @ d).contiguous())
    with pytest.raises(lu.LabError, match="2:4 kernel for layers.0.mlp.up_proj"):
        check_against_dense(wrong_layout, linear.weight, None, "layers.0.mlp.up_proj")


def test_sparse_linear_algorithm_search_is_used():
    linear = prune_2_4_linear(torch.nn.Linear(32, 48, bias=False))
    seen = {}

    def search(packed, in_features, tokens, dtype, device):
        seen.update(in_features=in_features, tokens=tokens)
        return 3

    module = emulated_module(linear, alg_search_tokens=64, search=search)
    assert module.alg_id == 3 and seen == {"in_features": 32, "tokens": 64}
    assert "alg_id=3" in repr(module)


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


@needs_2_4_kernels
def test_gpu_linear_speedup_table():
    table = lu.linear_speedup_table([(128, 256)], [64, 100], warmup=1, repeats=2, progress=False)
    assert list(table.index) == [("128×256", 64), ("128×256", 100)]
    assert (table[["dense ms", "2:4 alg 0 ms", "2:4 searched ms"]] > 0).all().all()
