"""PruneSpec: the one value a pruning run is described by — validated once, labels computed from it."""
import pytest
import torch

import labutils as lu
from labutils.prune.owl import OwlConfig


def test_spec_normalises_target_params_and_owl():
    spec = lu.PruneSpec("ria", "50%")
    assert spec.target == lu.SparsityTarget(0.5) and spec.params == {"alpha": 0.5, "group": "layer"}  # defaults
    assert lu.PruneSpec("wanda", "2:4").target == lu.SparsityTarget(n=2, m=4)
    assert lu.PruneSpec("magnitude", 0.7, owl=True).owl == OwlConfig()
    assert lu.PruneSpec("wanda", 0.5, owl=False).owl is None
    assert lu.PruneSpec("ria", 0.5, params={"alpha": 1.0}).params == {"alpha": 1.0, "group": "layer"}


def test_equal_specs_are_equal_and_hashable():
    a, b = lu.PruneSpec("ria", 0.5), lu.PruneSpec("ria", lu.SparsityTarget(0.5), params={"alpha": 0.5})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != lu.PruneSpec("ria", 0.5, params={"alpha": 1.0})


@pytest.mark.parametrize("spec,variant,label,slug", [
    (lu.PruneSpec("wanda", 0.5), "wanda", "wanda 50%", "wanda-50"),
    (lu.PruneSpec("wanda", "2:4", true_sequential=True), "wanda (true-sequential)", "wanda (true-sequential) 2:4",
     "wanda-ts-2-4"),
    (lu.PruneSpec("magnitude", 0.7, owl=True), "magnitude + OWL", "magnitude + OWL 70%", "magnitude-owl-70"),
])
def test_labels_are_computed_from_the_spec(spec, variant, label, slug):
    assert (spec.variant, spec.label, spec.slug) == (variant, label, slug)


def test_to_dict_is_what_reports_record():
    spec = lu.PruneSpec("wanda", 0.6, owl=OwlConfig(m=4.0, lam=0.1), true_sequential=True)
    assert spec.to_dict() == {"method": "wanda", "target": "60%", "params": {"group": "row"}, "true_sequential": True,
                              "owl": {"M": 4.0, "lambda": 0.1}}


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "obc"}, "unknown method 'obc'; allowed: magnitude, wanda, sparsegpt, ria"),
    ({"method": 3}, "method must be a method's name, one of magnitude, wanda, sparsegpt, ria, admm; got 3"),
    ({"target": 1.5}, r"sparsity must be a number in \[0, 1\); got 1.5"),
    ({"method": "magnitude", "true_sequential": True}, "true-sequential mode re-collects calibration statistics"),
    ({"true_sequential": "yes"}, "true_sequential must be True or False; got 'yes'"),
    ({"target": "2:4", "owl": True}, "OWL sets a different sparsity per layer and needs an unstructured target"),
    ({"owl": {"m": 5}}, "owl must be an OwlConfig, True or None; got {'m': 5}"),
    ({"params": {"alpha": 0.5}}, "method 'wanda' does not take alpha; it takes group \\(default row\\)"),
    ({"owl": OwlConfig(lam=0.6)}, "OWL lambda 0.6 moves some layer's sparsity out of"),
])
def test_bad_specs_are_refused_when_built(kwargs, message):
    with pytest.raises(lu.BadInput, match=message):
        lu.PruneSpec(**{"method": "wanda", "target": 0.5, **kwargs})


def test_from_cli_reads_the_command_lines_flags():
    assert lu.PruneSpec.from_cli({}) == lu.PruneSpec("wanda", 0.5)
    assert lu.PruneSpec.from_cli({"sparsity": 0.0}).target == lu.SparsityTarget(0.0)
    assert lu.PruneSpec.from_cli({"nm": "4:8", "out": "ignored"}) == lu.PruneSpec("wanda", "4:8")
    flags = {"method": "ria", "sparsity": 0.6, "alpha": None, "owl": True, "owl_m": None, "owl_lambda": 0.05}
    assert lu.PruneSpec.from_cli(flags) == lu.PruneSpec("ria", 0.6, owl=OwlConfig(lam=0.05))
    assert lu.PruneSpec.from_cli({"method": "sparsegpt", "blocksize": 64}).params["blocksize"] == 64
    with pytest.raises(lu.BadInput, match="add --owl to use OWL"):
        lu.PruneSpec.from_cli({"owl_m": 4.0})
    with pytest.raises(lu.BadInput, match="give one of --sparsity or --nm"):
        lu.PruneSpec.from_cli({"sparsity": 0.5, "nm": "2:4"})
    with pytest.raises(lu.BadInput, match="method 'wanda' does not take alpha"):
        lu.PruneSpec.from_cli({"alpha": 0.5})


def test_prune_model_takes_only_a_spec(tiny_model, calib_tokens):
    with pytest.raises(lu.BadInput, match=r"spec must be a PruneSpec, e.g. lu.PruneSpec\('wanda', 0.5\); got 'wanda'"):
        lu.prune_model(tiny_model, "wanda", calib_tokens)
    report = lu.prune_model(tiny_model, lu.PruneSpec("wanda", "2:4", true_sequential=True), calib_tokens,
                            progress=False)
    assert report.label == "wanda (true-sequential) 2:4"
    assert (report.method, report.target, report.nm, report.target_sparsity) == ("wanda", "2:4", (2, 4), 0.5)


def test_changed_parameters_name_the_variant():
    spec = lu.PruneSpec("ria", 0.5, params={"alpha": 1.0})
    assert (spec.label, spec.slug) == ("ria (alpha=1) 50%", "ria-alpha1-50")
    assert lu.PruneSpec("ria", 0.5, params={"alpha": 0.5}).label == "ria 50%"  # the default names nothing
    profile = lu.get_profile("smollm2-135m")
    assert lu.default_output_dir(profile, spec) != lu.default_output_dir(profile, lu.PruneSpec("ria", 0.5))


def test_bench_setup_takes_specs_with_distinct_targets():
    setup = lu.bench_setup(tiny=True, device="cpu", specs=[lu.PruneSpec("ria", "2:4")], sizes={"nsamples": 2})
    assert setup.specs == (lu.PruneSpec("ria", "2:4"),) and setup.nsamples == 2 and setup.describe()["method"] == "ria"
    with pytest.raises(lu.BadInput, match="give each target once; got 50%, 50%"):
        lu.bench_setup(tiny=True, device="cpu", specs=[lu.PruneSpec("wanda", 0.5), lu.PruneSpec("ria", 0.5)])
    with pytest.raises(lu.BadInput, match="sizes takes nsamples, seqlen and batch_size; got layers"):
        lu.bench_setup(tiny=True, device="cpu", sizes={"layers": 2})
    with pytest.raises(lu.BadInput, match=r"^each of specs must be a PruneSpec, e.g. lu.PruneSpec\('wanda', 0.5\); "
                                          r"got 'wanda 50%'$"):
        lu.bench_setup(tiny=True, device="cpu", specs=["wanda 50%"])


def test_every_entry_point_takes_only_specs(tiny_model):
    profile, tokens = lu.get_profile("smollm2-135m"), torch.zeros(64, dtype=torch.long)
    with pytest.raises(lu.BadInput, match=r"^each of variants must be a PruneSpec, e.g. lu.PruneSpec\('wanda', 0.5\); "
                                          r"got \('wanda', 0.5\)$"):
        lu.compare_methods(profile, [("wanda", 0.5)], tokens[None], tokens, tiny_model, progress=False)
    with pytest.raises(lu.BadInput, match=r"^PruneJob.spec must be a PruneSpec, e.g. lu.PruneSpec\('wanda', 0.5\); "
                                          r"got 'wanda'$"):
        lu.run_prune_job(lu.PruneJob("wanda"), progress=False)
