"""ADMM weight update (issue J): optimal for a fixed mask, better than SparseGPT's update for the same mask, Wanda's
mask or a gradual one, exact targets through the driver, and bad parameters refused."""
import pytest
import torch
from conftest import make_tiny
from test_methods import correlated_inputs

import labutils as lu
from labutils.cli import main
from labutils.prune.methods.admm import AdmmSettings, admm_update, objective, scaled_problem
from labutils.prune.sparsity import nm_violations

TARGETS = [lu.as_target(0.5), lu.as_target("2:4"), lu.as_target("4:8")]


def layer_problem(seed=1, out=24, features=32):
    x = correlated_inputs(features=features, seed=seed)
    x[:, :3] *= 10  # a few outlier channels, as in real layers
    weight = torch.randn(out, features, generator=torch.Generator().manual_seed(seed))
    return weight, 2 * x.T @ x


def exact_masked_error(weight, hessian, pruned):
    """The smallest output error any update of the kept weights can reach, row by row by least squares."""
    x_half = torch.linalg.cholesky(hessian.double() / 2 + 1e-12 * torch.eye(len(hessian), dtype=torch.float64)).T
    best = torch.zeros_like(weight, dtype=torch.float64)
    for row in range(weight.shape[0]):
        keep = ~pruned[row]
        target = x_half @ weight[row].double()
        best[row, keep] = torch.linalg.lstsq(x_half[:, keep], target[:, None]).solution[:, 0]
    return lu.output_error(weight, best.float(), hessian)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.label)
def test_admm_beats_sparsegpt_with_the_same_mask(target):
    weight, hessian = layer_problem()
    sparsegpt, pruned = lu.sparsegpt_weights(weight, hessian, target)
    admm, same = admm_update(weight, hessian, pruned, target)
    assert torch.equal(same, pruned) and torch.equal(admm == 0, pruned | (weight == 0))
    admm_error, sparsegpt_error = lu.output_error(weight, admm, hessian), lu.output_error(weight, sparsegpt, hessian)
    masked_only = lu.output_error(weight, weight.masked_fill(pruned, 0), hessian)
    assert admm_error <= sparsegpt_error < masked_only


@pytest.mark.parametrize("target", TARGETS[:2], ids=lambda t: t.label)
def test_admm_converges_to_the_optimum_for_its_mask(target):
    gen = torch.Generator().manual_seed(2)  # mildly correlated channels of very different scales
    x = (torch.randn(512, 32, generator=gen) + 0.3 * torch.randn(512, 1, generator=gen)) * torch.logspace(-1, 1, 32)
    weight, hessian = torch.randn(24, 32, generator=gen), 2 * x.T @ x
    pruned = lu.select_mask(lu.wanda_score(weight, hessian.diagonal() / 2), target)
    trace = []
    admm, _ = admm_update(weight, hessian, pruned, target, AdmmSettings(iterations=300, dampening=0.0), trace=trace)
    objectives, residuals = zip(*trace)
    assert residuals[-1] < 1e-4 and residuals[-1] < residuals[10] < residuals[0]
    assert objectives[-1] <= objectives[0]  # the first iterate is the mask alone
    optimum = exact_masked_error(weight, hessian, pruned)
    assert lu.output_error(weight, admm, hessian) <= optimum * (1 + 1e-3)
    _, w0, _, hs = scaled_problem(weight, hessian, 0.0)
    assert objectives[-1] == pytest.approx(optimum ** 2, rel=1e-3)  # the trace is the squared output error
    assert objective(w0, w0, hs) == 0


def test_growing_rho_and_the_default_iterations_reach_the_same_error():
    weight, hessian = layer_problem(seed=3)
    target = lu.as_target(0.5)
    pruned = lu.select_mask(lu.wanda_score(weight, hessian.diagonal() / 2), target)
    constant, _ = admm_update(weight, hessian, pruned, target, AdmmSettings(iterations=200))
    growing, _ = admm_update(weight, hessian, pruned, target, AdmmSettings(iterations=60, rho=0.1, rho_growth=1.1))
    a, b = lu.output_error(weight, constant, hessian), lu.output_error(weight, growing, hessian)
    assert b == pytest.approx(a, rel=1e-3)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.label)
def test_mask_choice_wanda_and_gradual(target):
    weight, hessian = layer_problem(seed=4)
    _, wanda = admm_update(weight, hessian, None, target, AdmmSettings(gradual_steps=0))
    assert torch.equal(wanda, lu.select_mask(lu.wanda_score(weight, hessian.diagonal() / 2), target))
    gradual_weight, gradual = admm_update(weight, hessian, None, target, AdmmSettings(iterations=20, gradual_steps=15))
    assert int(gradual.sum()) == int(wanda.sum())  # the same number of weights pruned
    if target.is_nm:
        assert nm_violations(gradual_weight, target.n, target.m) == 0
    else:
        assert (gradual.sum(1) == int(weight.shape[1] * 0.5)).all()  # per row, like Wanda


@pytest.mark.parametrize("target", ["50%", "2:4"])
@pytest.mark.parametrize("selection", ["wanda", "gradual"])
def test_admm_through_the_driver(target, selection, calib_tokens):
    model = make_tiny()
    spec = lu.PruneSpec("admm", target, params={"selection": selection})
    report = lu.prune_model(model, spec, calib_tokens, progress=False)
    assert report.measured_sparsity == 0.5 and all(r.sparsity == 0.5 for r in report.sublayers)
    linears = lu.prune.sparsity.prunable_linears(model)
    if target == "2:4":
        assert all(nm_violations(lin.weight, 2, 4) == 0 for lin in linears.values())
    reference = make_tiny()
    lu.prune_model(reference, lu.PruneSpec("wanda", target), calib_tokens, progress=False)
    q = "layers.0.self_attn.q_proj"
    wanda_q = lu.prune.sparsity.prunable_linears(reference)[q].weight
    if selection == "wanda":  # layer 0 sees the same inputs: Wanda's mask, other weights
        assert torch.equal(linears[q].weight == 0, wanda_q == 0)
    assert not torch.equal(linears[q].weight, wanda_q)


@pytest.mark.parametrize("params,message", [
    ({"selection": "magnitude"}, "ADMM selection must be one of wanda, gradual; got 'magnitude'"),
    ({"iterations": 2.5}, "ADMM iterations must be a whole number"),
    ({"iterations": -1}, r"ADMM iterations must be a whole number in \[0, 10000\]"),
    ({"rho": 0}, r"ADMM rho must be a number in \(0, 1e6\]"),
    ({"rho_growth": 0.5}, r"ADMM rho_growth must be a number in \[1, 10\]"),
    ({"selection": "gradual", "iterations": 10}, r"gradual_steps \(15\) must not exceed iterations \(10\)"),
    ({"dampening": -1}, r"ADMM dampening must be a number in \[0, 10\]"),
    ({"blocksize": 64}, "method 'admm' does not take blocksize"),
])
def test_bad_admm_parameters(params, message, tiny_model, calib_tokens):
    with pytest.raises(lu.BadInput, match=message):
        lu.prune_model(tiny_model, lu.PruneSpec("admm", 0.5, params=params), calib_tokens)


def test_admm_on_the_command_line(tiny_with_tokenizer, tmp_path, capsys):
    small = ["--nsamples", "4", "--seqlen", "16", "--eval-tokens", "64", "--eval-seqlen", "32", "--batch-size", "2"]
    out = tmp_path / "admm"
    assert main(["prune", "--model", str(tiny_with_tokenizer), "--method", "admm", "--nm", "2:4", "--selection",
                 "gradual", "--iterations", "16", "--gradual-steps", "8", *small, "--out", str(out)]) == 0
    report = lu.load_report(out)
    assert report["method"] == "admm" and report["params"]["selection"] == "gradual"
    assert report["params"]["iterations"] == 16 and report["measured_sparsity"] == 0.5
    assert "admm" in capsys.readouterr().out
    assert main(["prune", "--method", "admm", "--rho", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "ADMM rho must be" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_the_default_mask_is_gradual(calib_tokens):
    """J2: `--method admm` chooses its mask gradually (the paper's default); Wanda's fixed mask is asked for."""
    spec = lu.PruneSpec("admm", "2:4")
    assert spec.params["selection"] == "gradual" and spec.params["gradual_steps"] == 15
    model, explicit = make_tiny(), make_tiny()
    lu.prune_model(model, spec, calib_tokens, progress=False)
    lu.prune_model(explicit, lu.PruneSpec("admm", "2:4", params={"selection": "gradual"}), calib_tokens,
                   progress=False)
    q = "layers.0.self_attn.q_proj"
    assert torch.equal(lu.prune.sparsity.prunable_linears(model)[q].weight,
                       lu.prune.sparsity.prunable_linears(explicit)[q].weight)
    with pytest.raises(lu.BadInput, match=r"gradual_steps \(15\) must not exceed iterations \(10\)"):
        lu.prune_model(make_tiny(), lu.PruneSpec("admm", "2:4", params={"iterations": 10}), calib_tokens)


def test_the_study_collects_each_linears_hessian_as_the_driver_does(calib_tokens):
    """benchmarks/admm_study.py's hooked pass gives layer 0's H = 2 XᵀX, as the pruning driver's statistics do."""
    import importlib
    study = importlib.import_module("benchmarks.admm_study")
    model = make_tiny()
    got = study.hooked_hessians(model, calib_tokens, ("layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"), 4,
                                "test")
    layer = lu.find_decoder_layers(model)[0]
    inputs = lu.capture_layer_inputs(model, calib_tokens, 4)
    want = lu.collect_statistics(layer, 0, inputs, {"q": layer.self_attn.q_proj, "down": layer.mlp.down_proj},
                                 "hessian")
    for name, key in (("layers.0.self_attn.q_proj", "q"), ("layers.0.mlp.down_proj", "down")):
        weight, hessian = got[name]
        assert torch.allclose(hessian, want[key].cpu().float(), rtol=1e-4, atol=1e-3)
    assert torch.equal(got["layers.0.mlp.down_proj"][0], layer.mlp.down_proj.weight)
    with pytest.raises(lu.BadInput, match="no linear named"):
        study.hooked_hessians(model, calib_tokens, ("layers.9.mlp.up_proj",), 4, "test")


def test_the_study_command_refuses_an_unknown_profile(capsys):
    import importlib
    study = importlib.import_module("benchmarks.admm_study")
    assert study.main(["model", "--profile", "no-such-profile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
