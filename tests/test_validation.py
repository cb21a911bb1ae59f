"""The Python API refuses bad input: one BadInput / LabError line naming the value given and what is allowed, raised
before the model is touched and writing nothing (targets, tokens, sizes, seeds, devices, model folders, output
folders, out of memory)."""
import math
import re

import numpy as np
import pytest
import torch
from conftest import copy_of, make_tiny, owl_lambda_message, raiser, random_tokens

import labutils as lu
from labutils.cli import main
from labutils.core.data import split_tokens
from labutils.core.loading import load_pretrained
from labutils.core.saved import check_output_dir, load_report
from labutils.core.validation import check_seed
from labutils.prune.masks import nm_mask
from labutils.prune.owl import owl_sparsities

TARGET_FORMS = ("target must be a SparsityTarget, a sparsity in [0, 1) such as 0.5 or '50%', or an N:M pattern such as "
                "'2:4'; got ")
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 400000000000000 bytes. Error code 12 (Cannot allocate memory)")
NOT_FINITE_ADVICE = ("— its weights are damaged or overflowed (for the cached default model run "
                     "`python -m labutils prepare`)")


def exactly(message: str) -> str:
    """A pytest.raises pattern for the whole message."""
    return f"^{re.escape(message)}$"


def refuses(model, message: str, method, target, tokens=None, **spec_options):
    """Building the PruneSpec raises BadInput with exactly ``message``; or, if the spec is valid, pruning ``model``
    with it does, and the model stays as it was."""
    try:
        spec = lu.PruneSpec(method, target, **spec_options)
    except lu.BadInput as exc:
        assert re.search(exactly(message), str(exc)), str(exc)
        return
    before = lu.mask_sha256(model)
    with pytest.raises(lu.BadInput, match=exactly(message)):
        lu.prune_model(model, spec, tokens, progress=False)
    assert lu.mask_sha256(model) == before


@pytest.fixture(scope="module")
def reference_hashes():
    """Mask hashes of wanda on the tiny model for the two SparsityTarget forms."""
    tokens = random_tokens((6, 16), 1)  # = calib_tokens
    hashes = {}
    for key, target in (("50%", lu.SparsityTarget.of(sparsity=0.5)), ("2:4", lu.SparsityTarget.of(nm="2:4"))):
        hashes[key] = lu.prune_model(make_tiny(), lu.PruneSpec("wanda", target), tokens, progress=False).mask_sha256
    assert hashes["50%"] != hashes["2:4"]
    return hashes


# --- targets ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,label", [
    (0.5, "50%"), (np.float32(0.5), "50%"), (np.float64(0.5), "50%"), (lu.SparsityTarget(0.5), "50%"),
    ("50%", "50%"), ("0.5", "50%"), (" 50 % ", "50%"), ("2:4", "2:4"), (" 2 : 4 ", "2:4"),
    (lu.SparsityTarget(n=2, m=4), "2:4"),
    (lu.SparsityTarget.of(nm=(np.int64(2), np.int32(4))), "2:4"),
])
def test_prune_model_accepts_every_target_form(target, label, tiny_model, calib_tokens, reference_hashes):
    report = lu.prune_model(tiny_model, lu.PruneSpec("wanda", target), calib_tokens, progress=False)
    assert report.target == label
    assert report.mask_sha256 == reference_hashes[label]


def test_as_target_normalises_numbers():
    assert lu.as_target(0) == lu.SparsityTarget(sparsity=0.0)
    target = lu.as_target(np.float32(0.25))
    assert type(target.sparsity) is float and target == lu.SparsityTarget(0.25) and target.label == "25%"
    assert lu.as_target("4:8") == lu.SparsityTarget(n=4, m=8)
    same = lu.SparsityTarget(0.5)
    assert lu.as_target(same) is same


@pytest.mark.parametrize("value,shown", [
    ((2, 4), "(2, 4)"), (True, "True"), (None, "None"), ([0.5], "[0.5]"),
    (torch.tensor(0.5), "a tensor of shape () and dtype torch.float32"),
])
def test_target_of_another_kind(value, shown, tiny_model, calib_tokens):
    refuses(tiny_model, TARGET_FORMS + shown, "wanda", value, calib_tokens)
    with pytest.raises(lu.BadInput, match=exactly(TARGET_FORMS + shown)):
        lu.as_target(value)


@pytest.mark.parametrize("value,message", [
    (1.5, "sparsity must be a number in [0, 1); got 1.5"),
    (-0.5, "sparsity must be a number in [0, 1); got -0.5"),
    (1, "sparsity must be a number in [0, 1); got 1"),
    (float("nan"), "sparsity must be a number in [0, 1); got nan"),
    (float("inf"), "sparsity must be a number in [0, 1); got inf"),
    (np.float32(1.0), "sparsity must be a number in [0, 1); got np.float32(1.0)"),
    ("4:4", "N:M pattern needs 1 ≤ N < M; got N=4, M=4"),
    ("2:x", "N:M pattern must look like '2:4'; got '2:x'"),
    ("half", "target must look like '50%', '0.5' or '2:4'; got 'half'"),
    ("150%", "sparsity must be a number in [0, 1); got 1.5"),
])
def test_target_out_of_range(value, message, tiny_model, calib_tokens):
    refuses(tiny_model, message, "wanda", value, calib_tokens)


@pytest.mark.parametrize("kwargs,message", [
    ({"sparsity": -0.5}, "sparsity must be a number in [0, 1); got -0.5"),
    ({"sparsity": 1.5}, "sparsity must be a number in [0, 1); got 1.5"),
    ({"sparsity": float("nan")}, "sparsity must be a number in [0, 1); got nan"),
    ({"sparsity": True}, "sparsity must be a number in [0, 1); got True"),
    ({"sparsity": "0.5"}, "sparsity must be a number in [0, 1); got '0.5'"),
    ({}, "give exactly one of sparsity or nm (n and m); got sparsity=None, n=None, m=None"),
    ({"sparsity": 0.5, "n": 2, "m": 4}, "give exactly one of sparsity or nm (n and m); got sparsity=0.5, n=2, m=4"),
    ({"n": 2}, "an N:M target needs both n and m; got n=2, m=None"),
    ({"sparsity": 0.5, "m": 4}, "an N:M target needs both n and m; got n=None, m=4"),
    ({"n": 2.9, "m": 4}, "N:M pattern must be a pair of integers; got n=2.9, m=4"),
    ({"n": 2.0, "m": 4}, "N:M pattern must be a pair of integers; got n=2.0, m=4"),
    ({"n": True, "m": 4}, "N:M pattern must be a pair of integers; got n=True, m=4"),
    ({"n": 4, "m": 4}, "N:M pattern needs 1 ≤ N < M; got N=4, M=4"),
    ({"n": 0, "m": 4}, "N:M pattern needs 1 ≤ N < M; got N=0, M=4"),
])
def test_no_invalid_sparsity_target_can_be_built(kwargs, message):
    with pytest.raises(lu.BadInput, match=exactly(message)):
        lu.SparsityTarget(**kwargs)


def test_sparsity_target_stores_plain_python_numbers():
    target = lu.SparsityTarget(sparsity=np.float32(0.5))
    assert type(target.sparsity) is float and target == lu.SparsityTarget(0.5) and target.label == "50%"
    nm = lu.SparsityTarget(n=np.int64(2), m=np.int32(4))
    assert (type(nm.n), type(nm.m)) == (int, int) and nm == lu.SparsityTarget(n=2, m=4)
    assert hash(nm) == hash(lu.SparsityTarget(n=2, m=4))


@pytest.mark.parametrize("nm,shown", [
    ((2.9, 4), "(2.9, 4)"), ((True, 4), "(True, 4)"), ((2, 4.0), "(2, 4.0)"), ((2, 4, 8), "(2, 4, 8)"),
    (24, "24"), (None, "None"),
])
def test_parse_nm_takes_only_integer_pairs(nm, shown):
    message = f"N:M pattern must be 'N:M' or a pair of integers; got {shown}"
    with pytest.raises(lu.BadInput, match=exactly(message)):
        lu.parse_nm(nm)
    if nm is not None:
        with pytest.raises(lu.BadInput, match=exactly(message)):
            lu.SparsityTarget.of(nm=nm)


def test_parse_nm_normalises_numpy_integers():
    n, m = lu.parse_nm((np.int64(2), np.uint8(4)))
    assert (n, m) == (2, 4) and (type(n), type(m)) == (int, int)


# --- model and tokens ------------------------------------------------------------------------------------------------

MODEL_MESSAGE = ("model must be a causal language model (a torch nn.Module whose config has vocab_size, as "
                 "lu.load_model gives); got ")


@pytest.mark.parametrize("model,shown", [
    (None, "None"), ("model", "'model'"), (torch.nn.Linear(2, 2), "Linear(in_features=2, out_features=2, bias=True)"),
])
def test_not_a_model(model, shown, calib_tokens):
    with pytest.raises(lu.BadInput, match=exactly(MODEL_MESSAGE + shown)):
        lu.prune_model(model, lu.PruneSpec("wanda", 0.5), calib_tokens, progress=False)
    with pytest.raises(lu.BadInput, match=exactly(MODEL_MESSAGE + shown)):
        lu.perplexity(model, calib_tokens.flatten(), seqlen=16, progress=False)


def bad_calibration_tokens():
    good = random_tokens((6, 16), 1)
    name = "calibration tokens"
    return [
        (good + 256, f"{name} must be token ids in [0, 256) (the model's vocab_size); got min {int(good.min()) + 256}, "
                     f"max {int(good.max()) + 256}"),
        (good.clone().index_fill_(1, torch.tensor([3]), -1),
         f"{name} must be token ids in [0, 256) (the model's vocab_size); got min -1, max {int(good.max())}"),
        (good[:1, :3].tolist(), f"{name} must be a torch.Tensor of integer token ids (make one with torch.tensor(ids)); "
                                f"got {good[:1, :3].tolist()!r}"),
        (good.float(), f"{name} must hold integer token ids (torch.long or another integer dtype); "
                       f"got dtype torch.float32"),
        (good.bool(), f"{name} must hold integer token ids (torch.long or another integer dtype); got dtype torch.bool"),
        (good[None], "method 'wanda' needs calibration tokens of shape (nsamples, seqlen); got (1, 6, 16)"),
        (good[0], "method 'wanda' needs calibration tokens of shape (nsamples, seqlen); got (16,)"),
        (good[:0], "method 'wanda' needs calibration tokens of shape (nsamples, seqlen); got (0, 16)"),
        (None, "method 'wanda' needs calibration tokens of shape (nsamples, seqlen); got None"),
    ]


@pytest.mark.parametrize("tokens,message", bad_calibration_tokens())
def test_bad_calibration_tokens(tokens, message, tiny_model):
    refuses(tiny_model, message, "wanda", 0.5, tokens)


def test_long_list_of_tokens_is_named_in_one_short_line(tiny_model, calib_tokens):
    with pytest.raises(lu.BadInput) as caught:
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", 0.5), calib_tokens.tolist(), progress=False)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 200 and message.endswith("…")


def test_other_integer_tokens_prune_like_long(tiny_model, calib_tokens, reference_hashes):
    report = lu.prune_model(tiny_model, lu.PruneSpec("wanda", 0.5), calib_tokens.to(torch.int32), progress=False)
    assert report.mask_sha256 == reference_hashes["50%"]


@pytest.mark.parametrize("tokens,message", [
    (torch.arange(64).reshape(4, 16), "tokens must be a non-empty 1-d tensor of token ids; got shape (4, 16)"),
    (torch.zeros(0, dtype=torch.long), "tokens must be a non-empty 1-d tensor of token ids; got shape (0,)"),
    (torch.arange(64.0), "tokens must hold integer token ids (torch.long or another integer dtype); "
                         "got dtype torch.float32"),
    (torch.arange(250, 314), "tokens must be token ids in [0, 256) (the model's vocab_size); got min 250, max 313"),
    ([1, 2, 3], "tokens must be a torch.Tensor of integer token ids (make one with torch.tensor(ids)); got [1, 2, 3]"),
])
def test_bad_perplexity_tokens(tokens, message, tiny_model):
    with pytest.raises(lu.BadInput, match=exactly(message)):
        lu.perplexity(tiny_model, tokens, seqlen=16, progress=False)


def test_perplexity_accepts_other_integer_tokens(tiny_model):
    tokens = random_tokens((64,), 2)
    expected = lu.perplexity(tiny_model, tokens, seqlen=16, progress=False)
    assert lu.perplexity(tiny_model, tokens.to(torch.int32), seqlen=16, progress=False) == expected


def test_method_that_is_not_a_name(tiny_model, calib_tokens):
    refuses(tiny_model, "method must be a method's name, one of magnitude, wanda, sparsegpt, ria, admm; got ['wanda']",
            ["wanda"], 0.5, calib_tokens)


# --- perplexity that is not finite ----------------------------------------------------------------------------------

def test_nan_weight_gives_a_clear_perplexity_error(tiny_model):
    tokens = random_tokens((64,), 2)
    with torch.no_grad():
        tiny_model.lm_head.weight[7, 3] = float("nan")
    batches = []
    tiny_model.register_forward_hook(lambda module, args, output: batches.append(1))
    message = "perplexity is not finite (nan): the model's logits hold NaN or inf values " + NOT_FINITE_ADVICE
    with pytest.raises(lu.LabError, match=exactly(message)):
        lu.perplexity(tiny_model, tokens, seqlen=16, batch_size=1, progress=False)
    assert len(batches) == 1  # stopped after the first batch, not after all four


def test_inf_weight_gives_a_clear_perplexity_error(tiny_model):
    with torch.no_grad():
        tiny_model.model.norm.weight[0] = float("inf")
    with pytest.raises(lu.LabError, match=r"^perplexity is not finite \((nan|inf)\): the model's logits hold NaN"):
        lu.perplexity(tiny_model, torch.arange(64), seqlen=16, progress=False)


def test_overflowing_perplexity_is_an_error_not_an_overflow(tiny_model):
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(1e35)  # finite logits, but a mean loss of ~1e35 nats: exp() overflows
    with pytest.raises(lu.LabError, match=r"^perplexity is not finite \(inf\): the mean loss of \S+e\+3\d nats per "
                                          r"token overflows exp\(\) — its weights are damaged"):
        lu.perplexity(tiny_model, torch.arange(64), seqlen=16, progress=False)


# --- out of memory ---------------------------------------------------------------------------------------------------

def test_is_out_of_memory():
    assert lu.core.errors.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert lu.core.errors.is_out_of_memory(RuntimeError(CPU_OOM))
    assert not lu.core.errors.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lu.core.errors.is_out_of_memory(ValueError("can't allocate memory"))


def test_real_cpu_allocation_failure_is_recognised():
    try:
        torch.empty(2**50)  # 4 PiB: more than any address space
    except RuntimeError as exc:
        assert lu.core.errors.is_out_of_memory(exc), str(exc)
    else:
        pytest.skip("this machine allocated 4 PiB of virtual memory, so there is no allocator error to recognise")


def test_out_of_cpu_memory_while_pruning_gives_advice(tiny_model, calib_tokens, monkeypatch):
    monkeypatch.setattr("labutils.prune.calibration.run_layer", raiser(RuntimeError(CPU_OOM)))
    message = ("out of CPU memory while pruning with wanda 50%: use a smaller --batch-size, fewer --nsamples, "
               "shorter --seqlen")
    with pytest.raises(lu.LabError, match=exactly(message)) as caught:
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", 0.5), calib_tokens, progress=False)
    assert str(caught.value.__cause__) == CPU_OOM


def test_other_runtime_errors_pass_through_pruning(tiny_model, calib_tokens, monkeypatch):
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr("labutils.prune.calibration.run_layer", raiser(error))
    with pytest.raises(RuntimeError) as caught:
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", 0.5), calib_tokens, progress=False)
    assert caught.value is error and not isinstance(caught.value, lu.LabError)


@pytest.mark.parametrize("error,where", [(RuntimeError(CPU_OOM), "CPU"),
                                         (torch.OutOfMemoryError("CUDA out of memory"), "GPU")])
def test_out_of_memory_while_evaluating_gives_advice(error, where, tiny_model, monkeypatch):
    monkeypatch.setattr(tiny_model, "forward", raiser(error))
    message = (f"out of {where} memory while evaluating (perplexity, batch_size=4, seqlen=16): use a smaller "
               f"--batch-size or --eval-seqlen")
    with pytest.raises(lu.LabError, match=exactly(message)) as caught:
        lu.perplexity(tiny_model, torch.arange(64), seqlen=16, progress=False)
    assert caught.value.__cause__ is error


def test_other_runtime_errors_pass_through_perplexity(tiny_model, monkeypatch):
    error = RuntimeError("expected scalar type Half but found Float")
    monkeypatch.setattr(tiny_model, "forward", raiser(error))
    with pytest.raises(RuntimeError) as caught:
        lu.perplexity(tiny_model, torch.arange(64), seqlen=16, progress=False)
    assert caught.value is error


# --- OWL lambda ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam,sparsity", [(1.0, 0.5), (0.5, 0.5), (0.5, 0.9), (0.75, 0.1)])
def test_owl_lambda_that_can_never_work_is_refused_before_calibration(lam, sparsity, tiny_model, calib_tokens,
                                                                      monkeypatch):
    monkeypatch.setattr("labutils.prune.driver.layer_outlier_ratios", raiser(AssertionError("calibrated first")))
    refuses(tiny_model, owl_lambda_message(lam), "wanda", sparsity, calib_tokens, owl=lu.OwlConfig(lam=lam))


def test_owl_at_zero_sparsity_allows_no_spread(tiny_model, calib_tokens, monkeypatch):
    monkeypatch.setattr("labutils.prune.driver.layer_outlier_ratios", raiser(AssertionError("calibrated first")))
    message = owl_lambda_message(0.08, "at target 0%: the layers average 0, so any spread takes one below 0; allowed "
                                       "here: lambda = 0 (--owl-lambda, OwlConfig(lam=…))")
    refuses(tiny_model, message, "wanda", 0.0, calib_tokens, owl=lu.OwlConfig())


@pytest.mark.parametrize("sparsity,ratios", [(0.9, [0.0] * 9 + [1.0]), (0.1, [1.0] * 9 + [0.0])])
def test_owl_lambda_bound_is_tight(sparsity, ratios):
    # λ = 0.45 is above S (0.1) or at least 1 − S (0.1), yet works for ratios whose normalised mean is 1 − S: the
    # early check must let it through.
    lu.PruneSpec("wanda", lu.SparsityTarget(sparsity), owl=lu.OwlConfig(lam=0.45))
    layer_sparsity = owl_sparsities(ratios, sparsity, 0.45)
    assert all(0 <= s < 1 for s in layer_sparsity)
    assert max(layer_sparsity) - min(layer_sparsity) == pytest.approx(0.9)


def test_owl_exact_bound_still_checked_after_calibration(calib_tokens):
    model = make_tiny(num_hidden_layers=3)  # normalised mean ≥ 1/3, so at 90% λ must stay below 0.15
    before = lu.mask_sha256(model)
    with pytest.raises(lu.BadInput, match=r"^OWL lambda 0.4 moves some layer's sparsity out of \[0, 1\) at target "
                                          r"90%; allowed here: 0 ≤ lambda < 0\.\d+$"):
        lu.prune_model(model, lu.PruneSpec("wanda", 0.9, owl=lu.OwlConfig(lam=0.4)), calib_tokens, progress=False)
    assert lu.mask_sha256(model) == before


def test_valid_inputs_still_prune_to_the_target(tiny_model, calib_tokens):
    report = lu.prune_model(tiny_model, lu.PruneSpec("wanda", np.float64(0.5)), calib_tokens, progress=False)
    assert math.isclose(report.measured_sparsity, 0.5)


NO_TOKENIZER = ("the model has no tokenizer (its folder holds no tokenizer.json / tokenizer_config.json) and "
                "profile 'smollm2-135m' needs one to tokenize the corpus; pass --tokenizer PATH (the base model's "
                "folder or hub id) or copy its tokenizer files into the folder")


def test_config_without_model_type(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path)
    (folder / "config.json").write_text("{}")
    with pytest.raises(lu.LabError, match=r"could not be loaded from config.json and model.safetensors "
                                          r"\(ValueError: Unrecognized model"):
        load_pretrained(folder, torch.float32, torch.device("cpu"))


def test_data_functions_need_a_tokenizer_but_random_profiles_do_not():
    profile = lu.get_profile("smollm2-135m")
    for call in (lambda: lu.test_tokens(profile, None, 64), lambda: lu.calibration_data(profile, None, 2, 16, 0),
                 lambda: lu.heldout_tokens(profile, None, 64)):
        with pytest.raises(lu.LabError) as info:
            call()
        assert str(info.value) == NO_TOKENIZER
    with pytest.raises(lu.LabError, match="no tokenizer .* and split_tokens needs one"):
        split_tokens(None, "test")
    random = lu.get_profile("llama2-7b-random")
    assert lu.test_tokens(random, None, 64, vocab_size=50).shape == (64,)


def test_cuda_index_beyond_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(lu.LabError, match=r"device 'cuda:1' asked for, but this machine has 1 CUDA GPU\(s\); "
                                          r"allowed: cuda, cuda:0..cuda:0"):
        lu.get_device("cuda:1")
    assert lu.get_device("cuda:0") == torch.device("cuda:0")
    assert lu.get_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("seed", [2**63, -1, True, 1.0, "0"])
def test_check_seed_refuses(seed):
    with pytest.raises(lu.BadInput, match=r"seed must be an integer in \[0, 2\*\*63 − 1\]"):
        check_seed(seed)
    with pytest.raises(lu.BadInput, match="seed must be"):
        lu.set_seed(seed)
    with pytest.raises(lu.BadInput, match="seed must be"):
        lu.core.data.random_windows(torch.arange(100), 2, 8, seed)


def test_largest_seed_is_allowed():
    assert check_seed(2**63 - 1) == 2**63 - 1
    lu.set_seed(2**63 - 1)
    random = lu.get_profile("llama2-7b-random")
    assert lu.test_tokens(random, None, 8, vocab_size=50, seed=2**63 - 1).shape == (8,)  # its own seed wraps
    lu.set_seed(0)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_sparsity_outside_range(sparsity):
    with pytest.raises(lu.BadInput, match=r"sparsity must be a number in \[0, 1\); got"):
        lu.SparsityTarget.of(sparsity=sparsity)


@pytest.mark.parametrize("nm,message", [
    ("4:4", "1 ≤ N < M; got N=4, M=4"),
    ("5:4", "1 ≤ N < M; got N=5, M=4"),
    ("0:4", "1 ≤ N < M; got N=0, M=4"),
    ("2-4", "must look like '2:4'; got '2-4'"),
    ((2, "x"), "pair of integers"),
])
def test_bad_nm(nm, message):
    with pytest.raises(lu.BadInput, match=message):
        lu.SparsityTarget.of(nm=nm)


def test_sparsity_and_nm_together():
    with pytest.raises(lu.BadInput, match="exactly one of sparsity or nm"):
        lu.SparsityTarget.of(sparsity=0.5, nm="2:4")


def test_nm_input_size_not_divisible(tiny_model, calib_tokens):
    before = lu.mask_sha256(tiny_model)
    with pytest.raises(lu.BadInput, match="divisible by M=3; layer 0 self_attn.q_proj has 64 inputs"):
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", lu.SparsityTarget.of(nm="2:3")), calib_tokens)
    assert lu.mask_sha256(tiny_model) == before  # nothing was pruned


def test_nm_mask_rejects_indivisible_score():
    with pytest.raises(lu.BadInput, match="divisible by M=4; got 6"):
        nm_mask(torch.rand(2, 6), 2, 4)


@pytest.mark.parametrize("field,value", [("nsamples", 0), ("nsamples", -3), ("seqlen", 0), ("seqlen", -1),
                                         ("eval_tokens", 0), ("batch_size", 0), ("nsamples", 2.5)])
def test_non_positive_sizes(field, value):
    with pytest.raises(lu.BadInput, match=f"{field} must be a positive integer.*got {value!r}"):
        lu.get_profile("smollm2-135m", **{field: value})


def test_seqlen_above_model_maximum(tiny_model):
    with pytest.raises(lu.BadInput, match=r"seqlen 129 exceeds the model's maximum sequence length; allowed: 1..128"):
        lu.perplexity(tiny_model, torch.zeros(300, dtype=torch.long), seqlen=129)


def test_unknown_method_and_profile(tiny_model, calib_tokens):
    with pytest.raises(lu.BadInput, match="unknown method 'obc'; allowed: magnitude, wanda, sparsegpt, ria"):
        lu.prune_model(tiny_model, lu.PruneSpec("obc", lu.SparsityTarget.of(sparsity=0.5)), calib_tokens)
    with pytest.raises(lu.BadInput, match="unknown profile 'gpt5'; allowed: smollm2-135m"):
        lu.get_profile("gpt5")


def test_model_not_found(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(lu.LabError, match="model '.*no-such-model' not found: there is no local folder"):
        load_pretrained(str(missing), torch.float32, torch.device("cpu"))
    assert not missing.exists()


def test_hub_model_unreachable_says_how_to_get_it():
    # The llama2-7b profile's weights are gated and this machine is offline: the message says what to do.
    with pytest.raises(lu.LabError, match="(?s)meta-llama/Llama-2-7b-hf' not found.*hf auth login.*HF_TOKEN"):
        load_pretrained("meta-llama/Llama-2-7b-hf", torch.float16, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so the CUDA-only profile is allowed")
@pytest.mark.parametrize("profile", ["llama2-7b", "llama2-7b-random"])
def test_cuda_profile_without_cuda(profile, tmp_path):
    with pytest.raises(lu.LabError, match=f"profile '{profile}' needs a CUDA GPU, and this machine has none"):
        lu.load_model(lu.get_profile(profile), torch.device("cpu"))
    out = tmp_path / "out"
    assert main(["prune", "--profile", profile, "--out", str(out)]) == 2
    assert not out.exists()


def test_output_folder_that_is_not_a_lab_output(tmp_path, capsys):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("do not overwrite")
    with pytest.raises(lu.BadInput, match="exists and is a folder that is not a lab output"):
        check_output_dir(precious)
    assert main(["prune", "--out", str(precious)]) == 2
    assert "not a lab output" in capsys.readouterr().err
    assert [p.name for p in precious.iterdir()] == ["chapter1.tex"]


def test_output_path_that_is_a_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"x")
    with pytest.raises(lu.BadInput, match="exists and is a file"):
        check_output_dir(target)
    assert target.read_bytes() == b"x"


def test_previous_lab_output_may_be_replaced(tmp_path):
    previous = lu.save_pruned(make_tiny(), tmp_path / "run", None, {"run": 1})
    assert check_output_dir(previous) == previous
    lu.save_pruned(make_tiny(seed=1), previous, None, {"run": 2})
    assert load_report(previous)["run"] == 2


def test_out_of_memory_is_reraised_with_advice(tiny_model, calib_tokens, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("labutils.prune.calibration.run_layer", oom)
    with pytest.raises(lu.LabError, match="out of GPU memory.*fewer calibration samples.*--seqlen"):
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", lu.SparsityTarget.of(sparsity=0.5)), calib_tokens)


def test_missing_data_package_says_how_to_install():
    from labutils.core.publish import packaged_file

    with pytest.raises(lu.LabError, match="needs the PyPI package 'no-such-lab-package'.*make setup"):
        packaged_file("no-such-lab-package", "x.gguf", "1.0", "the default model")
    with pytest.raises(lu.LabError, match="nothing.bin is missing from it; reinstall it: pip install --force"):
        packaged_file("pytest", "nothing.bin", "9.0.3", "a test")


def calibration_folders(tmp_path):
    """(value, message) for every calibration source that is refused."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n")
    (tmp_path / "latin").mkdir()
    (tmp_path / "latin" / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "file.txt").write_text("text")
    allowed = "calibration must be wiki, code, mixed or a folder of text files (*.txt, *.md, *.py); got "
    return [(str(tmp_path / "missing"), f"{allowed}'{tmp_path / 'missing'}': no such folder"),
            (str(tmp_path / "file.txt"), f"{allowed}'{tmp_path / 'file.txt'}': not a folder"),
            (str(tmp_path / "empty"), f"{allowed}'{tmp_path / 'empty'}': it holds no *.txt, *.md or *.py file"),
            (str(tmp_path / "blank"), f"{allowed}'{tmp_path / 'blank'}': its 1 text file(s) are empty"),
            (str(tmp_path / "latin"), f"{allowed}'{tmp_path / 'latin'}': cannot read it as UTF-8 text "
                                      "(UnicodeDecodeError: "),
            ("", f"{allowed}''"), (3, f"{allowed}3"), (None, f"{allowed}None")]


def test_bad_calibration_sources_are_one_line(tmp_path):
    from labutils.core.sources import calibration_source
    for value, message in calibration_folders(tmp_path):
        with pytest.raises(lu.BadInput) as info:
            calibration_source(value)
        assert str(info.value).startswith(message) and "\n" not in str(info.value), (value, str(info.value))
        with pytest.raises(lu.BadInput, match=re.escape(message)):  # the data function checks it the same way
            lu.calibration_data(lu.get_profile("smollm2-135m"), None, 2, 16, 0, source=value)


def test_calibration_sources_refused_where_they_cannot_apply():
    random = lu.get_profile("llama2-7b-random")
    for source in ("code", "mixed"):
        with pytest.raises(lu.BadInput, match=exactly(f"calibration '{source}' needs a profile with real text; "
                                                      "profile 'llama2-7b-random' calibrates on random tokens "
                                                      "(allowed: wiki)")):
            lu.calibration_data(random, None, 2, 16, 0, vocab_size=50, source=source)
    assert lu.calibration_data(random, None, 2, 16, 0, vocab_size=50, source="wiki").shape == (2, 16)
    with pytest.raises(lu.BadInput, match=exactly("calibration 'mixed' takes half its windows from each text and "
                                                  "needs nsamples ≥ 2; got 1")):
        lu.calibration_data(lu.get_profile("smollm2-135m"), None, 1, 16, 0, source="mixed")
    with pytest.raises(lu.LabError, match="no tokenizer .* and calibration 'code' needs one"):
        lu.calibration_data(lu.get_profile("smollm2-135m"), None, 2, 16, 0, source="code")
    with pytest.raises(lu.BadInput, match=exactly("test source must be one of wiki, code; got 'mixed'")):
        lu.test_tokens(lu.get_profile("smollm2-135m"), None, 64, source="mixed")
    with pytest.raises(lu.BadInput, match="test source 'code' needs a profile with real text"):
        lu.test_tokens(random, None, 64, vocab_size=50, source="code")
