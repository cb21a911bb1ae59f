"""Beyond Wanda: SparseGPT, RIA, OWL and true-sequential calibration, through the shared driver."""
import json

import pandas as pd
import pytest
import torch
from conftest import make_tiny, random_tokens

import labutils as lu
from labutils.cli import main
from labutils.core.loading import embedded_model_dir
from labutils.prune.calibration import run_layer
from labutils.prune.driver import calibration_stages
from labutils.prune.masks import apply_mask, nm_mask
from labutils.prune.methods import REGISTRY
from labutils.prune.methods.base import Method
from labutils.prune.methods.ria import ria_score
from labutils.prune.owl import owl_sparsities
from labutils.prune.sparsity import nm_violations, prunable_linears
from labutils.prune.statistics import HessianAccumulator


def correlated_inputs(tokens=256, features=32, seed=0):
    """Inputs whose channels are correlated and unevenly scaled, as in real layers: (tokens, features)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, features // 4, generator=gen)
    mix = torch.randn(features // 4, features, generator=gen)
    return base @ mix + 0.1 * torch.randn(tokens, features, generator=gen)


def slow_sparsegpt(weight, hessian, target, dampening=0.01, blocksize=128):
    """Reference OBS pruning: the same mask rules, but every error is pushed onto ALL later columns at once
    (no lazy batching), one column at a time, with the full inverse Hessian factor."""
    w = weight.clone().float()
    u = lu.prune.methods.sparsegpt.inverse_hessian_factor(hessian, dampening)
    mask = torch.zeros_like(w, dtype=torch.bool)
    cols = w.shape[1]
    if target.is_nm:
        blocksize = max(target.m, blocksize // target.m * target.m)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        if not target.is_nm:
            metric = (w[:, start:end] ** 2 / u.diagonal()[start:end] ** 2).flatten()
            k = int(metric.numel() * target.sparsity)
            order = sorted(range(metric.numel()), key=lambda i: (metric[i].item(), i))[:k]
            for i in order:
                mask[i // (end - start), start + i % (end - start)] = True
        for j in range(start, end):
            if target.is_nm and (j - start) % target.m == 0:
                metric = w[:, j : j + target.m] ** 2 / u.diagonal()[j : j + target.m] ** 2
                mask[:, j : j + target.m] = nm_mask(metric, target.n, target.m)
            err = torch.where(mask[:, j], w[:, j], torch.zeros(())) / u[j, j]
            w[:, j:] -= err[:, None] * u[j, j:][None, :]
            w[:, j] = torch.where(mask[:, j], torch.zeros(()), w[:, j])
    return w, mask


@pytest.mark.parametrize("target", [lu.SparsityTarget.of(sparsity=0.5), lu.SparsityTarget.of(nm="2:4")])
def test_sparsegpt_beats_the_same_mask_without_updates(target):
    x = correlated_inputs()
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    hessian = 2 * x.T @ x
    new_weight, mask = lu.sparsegpt_weights(weight, hessian, target, blocksize=8)
    assert (new_weight[mask] == 0).all()
    masked_only = weight.masked_fill(mask, 0)
    err_sparsegpt = (x @ new_weight.T - x @ weight.T).norm()
    err_mask_only = (x @ masked_only.T - x @ weight.T).norm()
    assert err_sparsegpt < 0.8 * err_mask_only
    assert lu.output_error(weight, new_weight, hessian) == pytest.approx(float(err_sparsegpt), rel=1e-3)
    assert not torch.equal(new_weight[~mask], weight[~mask])  # kept weights were updated too
    if target.is_nm:
        assert nm_violations(new_weight, 2, 4) == 0
    else:
        assert int(mask.sum()) == 16 * 32 // 2


@pytest.mark.parametrize("target", [lu.SparsityTarget.of(sparsity=0.6), lu.SparsityTarget.of(nm="2:4"),
                                    lu.SparsityTarget.of(nm="4:8")])
def test_sparsegpt_lazy_blocks_match_slow_reference(target):
    x = correlated_inputs(features=48, seed=3)
    weight = torch.randn(10, 48, generator=torch.Generator().manual_seed(2))
    hessian = 2 * x.T @ x
    fast_w, fast_mask = lu.sparsegpt_weights(weight, hessian, target, blocksize=16)
    slow_w, slow_mask = slow_sparsegpt(weight, hessian, target, blocksize=16)
    assert torch.equal(fast_mask, slow_mask)
    torch.testing.assert_close(fast_w, slow_w, rtol=1e-4, atol=1e-5)


def test_sparsegpt_handles_dead_inputs():
    x = correlated_inputs()
    x[:, 5] = 0  # an input channel that never fires
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    new_weight, _ = lu.sparsegpt_weights(weight, 2 * x.T @ x, lu.SparsityTarget.of(sparsity=0.5))
    assert torch.isfinite(new_weight).all() and (new_weight[:, 5] == 0).all()


def test_hessian_accumulator_matches_direct_product(tiny_model, calib_tokens):
    layer = lu.find_decoder_layers(tiny_model)[0]
    down = {"mlp.down_proj": layer.mlp.down_proj}
    seen = []
    handle = layer.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    inputs = lu.capture_layer_inputs(tiny_model, calib_tokens, batch_size=4)
    with HessianAccumulator(down) as acc:
        run_layer(layer, 0, inputs)
    handle.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(acc.stats["mlp.down_proj"], 2 * x.T @ x, rtol=1e-5, atol=1e-4)


def test_ria_score_matches_direct_computation():
    gen = torch.Generator().manual_seed(0)
    weight, sq_norm = torch.randn(4, 6, generator=gen), torch.rand(6, generator=gen) * 10
    expected = torch.empty(4, 6)
    for i in range(4):
        for j in range(6):
            a = abs(weight[i, j])
            row, col = weight[i].abs().sum(), weight[:, j].abs().sum()
            expected[i, j] = (a / row + a / col) * sq_norm[j].sqrt() ** 0.7
    torch.testing.assert_close(ria_score(weight, sq_norm, alpha=0.7), expected)
    assert torch.isfinite(ria_score(torch.zeros(3, 4), torch.ones(4))).all()


@pytest.mark.parametrize("method", ["ria", "sparsegpt"])
@pytest.mark.parametrize("nm", ["2:4", "4:8"])
def test_every_method_keeps_the_nm_pattern(method, nm, calib_tokens):
    model = make_tiny()
    report = lu.prune_model(model, lu.PruneSpec(method, nm), calib_tokens, progress=False)
    n, m = lu.parse_nm(nm)
    assert all(nm_violations(lin.weight, n, m) == 0 for lin in prunable_linears(model).values())
    assert report.measured_sparsity == pytest.approx(1 - n / m) and report.mask_sha256 == lu.mask_sha256(model)


def test_sparsegpt_through_driver_changes_weights_and_hits_target(calib_tokens):
    model, dense = make_tiny(), make_tiny()
    spec = lu.PruneSpec("sparsegpt", 0.5, params={"blocksize": 32})
    report = lu.prune_model(model, spec, calib_tokens, progress=False)
    assert report.params == {"dampening": 0.01, "blocksize": 32}
    for (name, lin), ref in zip(prunable_linears(model).items(), prunable_linears(dense).values()):
        kept = lin.weight != 0
        assert (lin.weight == 0).float().mean() == 0.5, name
        assert not torch.equal(lin.weight[kept], ref.weight[kept]), name


def test_owl_sparsities_average_to_target_and_follow_outliers():
    ratios = [0.010, 0.030, 0.020, 0.050, 0.012]
    sparsities = owl_sparsities(ratios, 0.7, 0.08)
    assert sum(sparsities) / len(sparsities) == pytest.approx(0.7, abs=1e-12)
    order_by_ratio = sorted(range(5), key=lambda i: ratios[i])
    assert [sparsities[i] for i in order_by_ratio] == sorted(sparsities, reverse=True)  # more outliers, less pruned
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)
    assert owl_sparsities([0.02] * 4, 0.5, 0.08) == [0.5] * 4


def test_owl_in_the_driver(calib_tokens):
    model = make_tiny(num_hidden_layers=4)
    spec = lu.PruneSpec("wanda", 0.7, owl=lu.OwlConfig(m=3, lam=0.05))
    report = lu.prune_model(model, spec, calib_tokens, progress=False)
    layer_sparsity = report.layer_sparsity
    assert len(layer_sparsity) == 4 and sum(layer_sparsity) / 4 == pytest.approx(0.7)
    assert report.owl["M"] == 3 and len(report.owl["outlier_ratios"]) == 4
    table = report.to_frame()
    for row in table.itertuples():  # realised per-row counts are ⌊in·s_l⌋: within one weight per row
        assert abs(row.sparsity - layer_sparsity[row.layer]) < 1 / row.in_features
    assert report.label == "wanda + OWL 70%"


@pytest.mark.parametrize("lam,message", [
    (0.5, r"OWL lambda 0.5 moves some layer's sparsity out of \[0, 1\).*allowed here: 0 ≤ lambda < 0\.\d+"),
    (-0.1, r"OWL lambda must be a number in \[0, 1\).*got -0.1"),
])
def test_owl_lambda_outside_range(lam, message, calib_tokens):
    model = make_tiny(num_hidden_layers=3)
    before = lu.mask_sha256(model)
    with pytest.raises(lu.BadInput, match=message):
        lu.prune_model(model, lu.PruneSpec("wanda", 0.9, owl=lu.OwlConfig(lam=lam)), calib_tokens, progress=False)
    assert lu.mask_sha256(model) == before


def test_true_sequential_differs_only_where_expected(calib_tokens):
    # Within one layer (same inputs) only o_proj and down_proj may change; later layers see other inputs.
    plain, ts = make_tiny(num_hidden_layers=1), make_tiny(num_hidden_layers=1)
    lu.prune_model(plain, lu.PruneSpec("wanda", 0.5), calib_tokens, progress=False)
    report = lu.prune_model(ts, lu.PruneSpec("wanda", 0.5, true_sequential=True), calib_tokens, progress=False)
    differs = {name.split(".", 2)[2] for (name, a), b in zip(prunable_linears(plain).items(),
                                                            prunable_linears(ts).values())
               if not torch.equal(a.weight == 0, b.weight == 0)}
    assert differs == {"self_attn.o_proj", "mlp.down_proj"}
    assert report.true_sequential and report.label == "wanda (true-sequential) 50%"
    assert calibration_stages(["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"], True) == [
        ["self_attn.q_proj", "mlp.up_proj"], ["self_attn.o_proj"], ["mlp.down_proj"]]


def test_true_sequential_statistics_come_from_the_partly_pruned_layer(calib_tokens):
    """o_proj's mask must be Wanda's on the inputs it sees once q, k, v (and gate, up) are pruned."""
    model, reference = make_tiny(num_hidden_layers=1), make_tiny(num_hidden_layers=1)
    lu.prune_model(model, lu.PruneSpec("wanda", 0.5, true_sequential=True), calib_tokens, progress=False)
    layer = lu.find_decoder_layers(reference)[0]
    linears = lu.find_linears(layer)
    inputs = lu.capture_layer_inputs(reference, calib_tokens, batch_size=8)
    stats = lu.collect_statistics(layer, 0, inputs, linears, "norms")
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        apply_mask(linears[name], lu.unstructured_mask(lu.wanda_score(linears[name].weight, stats[name]), 0.5))
    stats = lu.collect_statistics(layer, 0, inputs, {"o": linears["self_attn.o_proj"]}, "norms")
    expected = lu.unstructured_mask(lu.wanda_score(linears["self_attn.o_proj"].weight, stats["o"]), 0.5)
    assert torch.equal(lu.find_decoder_layers(model)[0].self_attn.o_proj.weight == 0, expected)


@pytest.mark.parametrize("method,params,message", [
    ("sparsegpt", {"dampening": -0.01}, r"SparseGPT dampening must be a number in \[0, 10\].*got -0.01"),
    ("sparsegpt", {"dampening": float("nan")}, "SparseGPT dampening must be"),
    ("sparsegpt", {"blocksize": 0}, r"SparseGPT blocksize must be a whole number of columns in \[1, 65536\]; got 0"),
    ("sparsegpt", {"blocksize": 2.5}, "SparseGPT blocksize must be a whole number"),
    ("ria", {"alpha": -1}, r"RIA alpha must be a number in \[0, 10\]"),
    ("wanda", {"alpha": 0.5}, r"method 'wanda' does not take alpha; it takes group \(default row\)"),
    ("ria", {"dampening": 0.1}, r"method 'ria' does not take dampening; it takes alpha \(default 0.5\)"),
])
def test_bad_method_parameters(method, params, message, tiny_model, calib_tokens):
    with pytest.raises(lu.BadInput, match=message):
        lu.prune_model(tiny_model, lu.PruneSpec(method, 0.5, params=params), calib_tokens)


def test_bad_combinations(tiny_model, calib_tokens):
    with pytest.raises(lu.BadInput, match="OWL sets a different sparsity per layer.*got 2:4"):
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", "2:4", owl=lu.OwlConfig()), calib_tokens)
    with pytest.raises(lu.BadInput, match="true-sequential mode re-collects.*'magnitude' uses none"):
        lu.prune_model(tiny_model, lu.PruneSpec("magnitude", 0.5, true_sequential=True), calib_tokens)
    with pytest.raises(lu.BadInput, match="OWL M must be a number > 0"):
        lu.OwlConfig(m=0)
    with pytest.raises(lu.BadInput, match="'magnitude' with OWL needs calibration tokens"):
        lu.prune_model(tiny_model, lu.PruneSpec("magnitude", 0.5, owl=lu.OwlConfig()), None)


def test_sparsegpt_singular_hessian_gives_advice():
    with pytest.raises(lu.LabError, match="not positive definite even with dampening 0.*larger dampening"):
        lu.sparsegpt_weights(torch.randn(4, 8), -torch.eye(8), lu.SparsityTarget.of(sparsity=0.5), dampening=0.0)


def test_registry_is_the_single_source_of_methods():
    assert tuple(REGISTRY) == ("magnitude", "wanda", "sparsegpt", "ria", "admm")
    for method in REGISTRY.values():
        assert isinstance(method, Method) and method.statistic in ("none", "norms", "hessian")
        assert method.resolve(None) == method.params  # the defaults pass the method's own check


@pytest.mark.parametrize("argv,message", [
    (["--method", "sparsegpt", "--dampening", "-1"], "SparseGPT dampening must be"),
    (["--method", "wanda", "--alpha", "0.5"], "method 'wanda' does not take alpha"),
    (["--owl", "--nm", "2:4"], "needs an unstructured target; got 2:4"),
    (["--owl-lambda", "0.1"], "add --owl to use OWL"),
    (["--owl", "--owl-lambda", "1.5"], "OWL lambda must be"),
    (["--method", "magnitude", "--true-sequential"], "'magnitude' uses none"),
])
def test_cli_bad_method_options_write_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_cli_runs_every_method_variant(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    model_dir = tmp_path / "tiny"
    make_tiny(vocab_size=len(tokenizer), max_position_embeddings=256).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--nsamples", "4", "--seqlen", "32", "--eval-tokens", "256",
              "--eval-seqlen", "128"]
    runs = {"sgpt": ["--method", "sparsegpt", "--nm", "2:4", "--blocksize", "16"],
            "ria": ["--method", "ria", "--alpha", "0.3", "--group", "row"],
            "owl": ["--method", "magnitude", "--owl", "--sparsity", "0.6", "--owl-lambda", "0.05"],
            "ts": ["--method", "wanda", "--true-sequential"]}
    for name, argv in runs.items():
        assert main(["prune", *common, *argv, "--out", str(tmp_path / name)]) == 0, name
    reports = {name: json.loads((tmp_path / name / "report.json").read_text()) for name in runs}
    assert reports["sgpt"]["params"] == {"dampening": 0.01, "blocksize": 16} and reports["sgpt"]["nm"] == "2:4"
    assert reports["ria"]["params"] == {"alpha": 0.3, "group": "row"}
    assert reports["ria"]["label"] == "ria (alpha=0.3, group=row) 50%"
    assert reports["owl"]["owl"]["lambda"] == 0.05 and len(reports["owl"]["layer_sparsity"]) == 2
    assert reports["ts"]["true_sequential"] and reports["ts"]["label"] == "wanda (true-sequential) 50%"


def test_comparison_harness_on_a_tiny_model(tmp_path):
    model_dir = tmp_path / "tiny"
    make_tiny().save_pretrained(model_dir)
    profile = lu.get_profile("smollm2-135m", eval_seqlen=32, batch_size=4)
    calib = random_tokens((4, 16), 0)
    test = random_tokens((128,), 1)
    variants = [lu.PruneSpec("wanda", 0.5),
                lu.PruneSpec("sparsegpt", 0.5),
                lu.PruneSpec("wanda", 0.7, owl=lu.OwlConfig(lam=0.02))]
    dense, _ = lu.load_model(profile, torch.device("cpu"), str(model_dir))
    result = lu.compare_methods(profile, variants, calib, test, dense, progress=False)
    table = result.table
    assert list(table.index) == ["dense", "wanda 50%", "sparsegpt 50%", "wanda + OWL 70%"]
    assert table.loc["wanda 50%", "seconds / wanda"] == 1.0
    assert table.loc["sparsegpt 50%", "method seconds / wanda"] > 0
    assert (table["perplexity"] > 1).all() and table.loc["wanda + OWL 70%", "sparsity"] == pytest.approx(0.7, abs=0.01)
    assert result.reports["wanda + OWL 70%"].layer_sparsity is not None
    csv = lu.write_results(table, "methods", profile, tmp_path / "results")
    assert csv.name == "smollm2-135m-methods.csv" and json.loads(csv.with_suffix(".json").read_text())["rows"]
    fig = lu.plot_method_comparison(table)
    assert [ax.get_ylabel() for ax in fig.axes][:2] == ["test perplexity (log scale, lower is better)",
                                                         "pruning time (s, calibration passes included)"]


def test_comparison_measures_a_repeated_variant_once_and_leaves_dense_alone():
    dense = make_tiny()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    profile = lu.get_profile("smollm2-135m", eval_seqlen=32, batch_size=4)
    calib = random_tokens((4, 16), 0)
    test = random_tokens((128,), 1)
    sweep = lu.sweep_variants(("magnitude", "wanda"), (0.3, 0.6))
    variants = sweep + [lu.PruneSpec("wanda", 0.6),
                        lu.PruneSpec("wanda", "2:4")]
    result = lu.compare_methods(profile, variants, calib, test, dense, progress=False)
    assert list(result.table.index) == ["dense", "magnitude 30%", "magnitude 60%", "wanda 30%", "wanda 60%",
                                        "wanda 2:4"]
    assert [v.label for v in sweep] == list(result.table.index[1:5])
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # copied, never pruned
    assert result.table.loc["dense", "perplexity"] == pytest.approx(lu.perplexity(dense, test, 32, progress=False))
    assert result.table["sparsity"].tolist() == pytest.approx([0.0, 0.3, 0.6, 0.3, 0.6, 0.5], abs=0.02)
    fig = lu.plot_sparsity_sweep(result.table, ("magnitude", "wanda"))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["wanda"].get_xdata()) == pytest.approx([0, 30, 60], abs=1)  # dense, then the sweep
    assert fig.axes[0].get_xlabel() == "sparsity of the decoder linears (%)"


def test_comparison_keeps_the_models_asked_for(calib_tokens):
    dense = make_tiny()
    profile = lu.get_profile("smollm2-135m", eval_seqlen=32, batch_size=4)
    test = random_tokens((128,), 1)
    variants = [lu.PruneSpec("magnitude", 0.5), lu.PruneSpec("wanda", 0.5)]
    result = lu.Comparison(profile, calib_tokens, test, dense, progress=False)
    result.add(variants, keep=["wanda 50%"])
    assert list(result.models) == ["wanda 50%"]
    alone = make_tiny()
    report = lu.prune_model(alone, variants[1], calib_tokens, profile.batch_size, progress=False)
    assert lu.mask_sha256(result.models["wanda 50%"]) == report.mask_sha256  # the very model that was measured
    assert result.table.loc["wanda 50%", "perplexity"] == lu.perplexity(result.models["wanda 50%"], test, 32, 4,
                                                                        progress=False)
    with pytest.raises(lu.BadInput, match=r"keep has unknown name\(s\) \['wanda 2:4'\]"):
        lu.Comparison(profile, calib_tokens, test, dense, progress=False).add(variants, keep=["wanda 2:4"])


def test_a_comparison_grows_over_several_adds_and_measures_each_variant_once(calib_tokens, monkeypatch):
    dense = make_tiny()
    profile = lu.get_profile("smollm2-135m", eval_seqlen=32, batch_size=4)
    comparison = lu.Comparison(profile, calib_tokens, random_tokens((128,), 1), dense, progress=False)
    first = comparison.add([lu.PruneSpec("magnitude", 0.5), lu.PruneSpec("wanda", 0.5)])
    assert list(first.index) == ["magnitude 50%", "wanda 50%"]
    pruned = []
    monkeypatch.setattr("labutils.jobs.compare.prune_model", lambda model, spec, *a: pruned.append(spec.label) or
                        lu.prune_model(model, spec, *a))
    second = comparison.add([lu.PruneSpec("wanda", 0.5), lu.PruneSpec("wanda", "2:4")], keep=["wanda 2:4"])
    assert pruned == ["wanda 2:4"] and list(second.index) == ["wanda 50%", "wanda 2:4"]
    assert list(comparison.table.index) == ["dense", "magnitude 50%", "wanda 50%", "wanda 2:4"]
    assert comparison.table.loc["wanda 2:4", "seconds / wanda"] == 1.0 and list(comparison.models) == ["wanda 2:4"]
    with pytest.raises(lu.BadInput, match=r"keep: \['wanda 50%'\] were measured by an earlier add\(\) without keep"):
        comparison.add([lu.PruneSpec("wanda", 0.5)], keep=["wanda 50%"])


def test_spec_labels_and_folder_names():
    target = lu.SparsityTarget.of(sparsity=0.7)
    assert lu.PruneSpec("wanda", target, true_sequential=True).slug == "wanda-ts-70"
    assert lu.PruneSpec("magnitude", "2:4").slug == "magnitude-2-4"
    assert lu.PruneSpec("wanda", target, true_sequential=True).label == "wanda (true-sequential) 70%"
    assert lu.PruneSpec("magnitude", target, owl=lu.OwlConfig()).label == "magnitude + OWL 70%"
    assert lu.PruneSpec("ria", "4:8").label == "ria 4:8"


def test_write_results_goes_where_lab_results_says(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_RESULTS", str(tmp_path / "elsewhere"))
    path = lu.write_results(pd.DataFrame({"x": [1.0]}), "t", lu.get_profile("smollm2-135m"))
    assert path == tmp_path / "elsewhere" / "smollm2-135m-t.csv" and path.with_suffix(".json").is_file()
