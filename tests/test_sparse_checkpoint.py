"""The sparse checkpoint (issue I): smaller on disk, loaded back bit for bit with the masks, readable with numpy
alone from the README's description, dense export, model card, and clear errors for damaged files."""
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import test_moe
import torch
from conftest import make_tiny, random_tokens
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import labutils as lu
from labutils.cli import main
from labutils.core.manifests import write_manifest
from labutils.core.saved import load_report
from labutils.core.sparse.files import SPARSE_FILE
from labutils.core.sparse.format import METADATA_KEY
from labutils.core.sparse.model import prunable_parameter_names

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATTERNS = {  # name: spec
    "wanda 50%": lu.PruneSpec("wanda", 0.5),
    "magnitude 70%": lu.PruneSpec("magnitude", 0.7),
    "wanda 2:4": lu.PruneSpec("wanda", "2:4"),
    "wanda 4:8": lu.PruneSpec("wanda", "4:8"),
    "wanda OWL 70%": lu.PruneSpec("wanda", 0.7, owl=lu.OwlConfig(m=2.0)),
    "wanda per layer": lu.PruneSpec("wanda", 0.5, params={"group": "layer"}),
    "sparsegpt 50%": lu.PruneSpec("sparsegpt", 0.5),
    "sparsegpt 2:4": lu.PruneSpec("sparsegpt", "2:4"),
}
INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that -0.0 ≠ 0.0 and NaN patterns compare exactly."""
    return t.detach().contiguous().view(INT[t.element_size()])


def assert_same_bits(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k


def pruned(spec: lu.PruneSpec, dtype=torch.float32, model=None):
    """A tiny model pruned with ``spec``, its per-parameter pruned masks from the driver (True = pruned)."""
    model = (model or make_tiny(intermediate_size=192)).to(dtype)
    report = lu.prune_model(model, spec, random_tokens((8, 32)), batch_size=4, progress=False)
    return model, report


def true_kept(model) -> dict[str, torch.Tensor]:
    record = lu.kept_masks(model)
    return {name: record.kept(name) for name in record.packed}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparse_round_trip_is_bit_for_bit_with_the_masks(pattern, dtype, tmp_path):
    model, report = pruned(PATTERNS[pattern], dtype)
    kept = true_kept(model)
    assert set(kept) == set(prunable_parameter_names(model))
    for name, mask in kept.items():  # the record is the driver's mask: every pruned weight is +0.0
        weight = model.state_dict()[name]
        assert int((bits(weight)[~mask] != 0).sum()) == 0
    nm = report.spec.target.label if report.nm else None
    out = lu.save_pruned(model, tmp_path / "run", None, {"nm": nm, "dtype": str(dtype)[6:]})
    loaded, _, saved = lu.load_pruned(out, "cpu")
    assert_same_bits(model.state_dict(), loaded.state_dict())
    assert type(loaded) is type(model) and not loaded.training
    loaded_kept = true_kept(loaded)
    assert loaded_kept.keys() == kept.keys() and all(torch.equal(kept[k], loaded_kept[k]) for k in kept)
    assert lu.kept_masks(loaded).nm == report.nm
    assert lu.mask_sha256(loaded) == report.mask_sha256
    # the same logits as the same weights loaded by from_pretrained (model.to(dtype) also cast its rotary buffer;
    # from_pretrained keeps that in float32, as the sparse loader does)
    dense = AutoModelForCausalLM.from_pretrained(lu.save_pruned(model, tmp_path / "dense", format="dense"))
    ids = random_tokens((1, 12))
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, loaded(ids).logits)
        if dtype == torch.float32:
            assert torch.equal(model(ids).logits, loaded(ids).logits)
    layouts = {e["layout"] for e in _layout(out)["tensors"].values()}
    assert layouts == ({"nm"} if report.nm else {"bitmask"})
    assert saved["disk"]["format"] == "sparse" and not (out / "model.safetensors").exists()


def _layout(folder: Path) -> dict:
    with safe_open(str(folder / SPARSE_FILE), "pt") as f:
        return json.loads(f.metadata()[METADATA_KEY])


@pytest.mark.parametrize("spec, dtype, bound", [
    (lu.PruneSpec("wanda", 0.5), torch.float16, 0.57), (lu.PruneSpec("wanda", 0.5), torch.bfloat16, 0.57),
    (lu.PruneSpec("wanda", 0.5), torch.float32, 0.54), (lu.PruneSpec("wanda", "2:4"), torch.float16, 0.57),
    (lu.PruneSpec("magnitude", 0.7), torch.float16, 0.40), (lu.PruneSpec("wanda", "4:8"), torch.float16, 0.57),
], ids=str)
def test_pruned_linears_take_at_most_the_promised_share(spec, dtype, bound, tmp_path):
    model, _ = pruned(spec, dtype)
    out = lu.save_pruned(model, tmp_path / "run", None, {"nm": spec.target.label if spec.target.is_nm else None})
    disk = load_report(out)["disk"]
    names = prunable_parameter_names(model)
    state = model.state_dict()
    with safe_open(str(out / SPARSE_FILE), "pt") as f:  # the report's figures are the file's tensors
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                     if k.rpartition(".")[0] in names)
    assert disk["pruned linears"]["sparse"] == stored
    assert disk["pruned linears"]["dense"] == sum(state[n].numel() * state[n].element_size() for n in names)
    assert disk["pruned linears"]["sparse"] / disk["pruned linears"]["dense"] <= bound
    assert disk["model"]["sparse"] == (out / SPARSE_FILE).stat().st_size < disk["model"]["dense"]
    table = lu.disk_table(load_report(out))
    assert list(table.index) == ["model", "pruned linears"] and table["sparse / dense"].max() < 1


def test_a_kept_zero_stays_a_kept_weight(tmp_path):
    """SparseGPT may leave (or update to) exactly 0.0 a weight it kept; a -0.0 keeps its sign. The zero pattern
    cannot tell those from pruned weights, the saved masks can."""
    for spec in (lu.PruneSpec("sparsegpt", 0.5), lu.PruneSpec("sparsegpt", "2:4")):
        model, report = pruned(spec)
        name = "model.layers.0.mlp.down_proj.weight"
        kept = true_kept(model)[name]
        rows, cols = kept[:4].nonzero(as_tuple=True)
        with torch.no_grad():
            weight = model.state_dict()[name]
            weight[rows[0], cols[0]] = 0.0
            weight[rows[1], cols[1]] = -0.0
        out = lu.save_pruned(model, tmp_path / spec.slug, None, {"nm": "2:4" if report.nm else None})
        loaded, _, _ = lu.load_pruned(out, "cpu")
        assert_same_bits(model.state_dict(), loaded.state_dict())
        assert torch.equal(true_kept(loaded)[name], kept)  # the two zeros are still kept
        assert bool(torch.signbit(loaded.state_dict()[name][rows[1], cols[1]]))


def test_readme_numpy_decoder_reads_the_file(tmp_path):
    """docs/saving.md's format section gives a numpy decoder; it must decode what the lab writes."""
    readme = (Path(__file__).parents[1] / "docs" / "saving.md").read_text()
    section = readme[readme.index("## Sparse checkpoint format"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for spec in (lu.PruneSpec("wanda", 0.5), lu.PruneSpec("wanda", "2:4"), lu.PruneSpec("wanda", "4:8")):
        for dtype in (torch.float32, torch.float16):
            model, report = pruned(spec, dtype)
            out = lu.save_pruned(model, tmp_path / f"{spec.slug}-{dtype}", None,
                                 {"nm": spec.target.label if spec.target.is_nm else None})
            scope = {}
            exec(code, scope)
            weights = scope["read_sparse_checkpoint"](str(out / SPARSE_FILE))
            state = model.state_dict()
            assert set(weights) == set(state)
            for k, v in weights.items():
                assert np.array_equal(v.view(np.uint8), state[k].contiguous().numpy().view(np.uint8)), k


@pytest.mark.parametrize("family", ["qwen2_moe-dense0", "gpt_oss"])
def test_routed_experts_round_trip(family, tmp_path):
    model, report = pruned(lu.PruneSpec("wanda", 0.5), model=test_moe.make(family))
    kept = true_kept(model)
    assert any(".experts." in name for name in kept)
    out = lu.save_pruned(model, tmp_path / "run")
    loaded, _, _ = lu.load_pruned(out, "cpu")
    assert_same_bits(model.state_dict(), loaded.state_dict())
    assert all(torch.equal(kept[k], v) for k, v in true_kept(loaded).items())
    assert load_report(out)["disk"]["pruned linears"]["sparse"] / load_report(out)["disk"]["pruned linears"][
        "dense"] <= 0.54


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_format_is_an_ordinary_transformers_folder(dtype, tmp_path):
    model, report = pruned(lu.PruneSpec("wanda", "2:4"), dtype)
    out = lu.save_pruned(model, tmp_path / "run", None, {"nm": "2:4"}, format="dense")
    assert (out / "model.safetensors").is_file() and not (out / SPARSE_FILE).exists()
    assert_same_bits(model.state_dict(), AutoModelForCausalLM.from_pretrained(out, dtype=dtype).state_dict())
    loaded, _, saved = lu.load_pruned(out, "cpu")
    assert_same_bits(model.state_dict(), loaded.state_dict())
    assert saved["disk"]["format"] == "dense"
    assert saved["disk"]["model"]["dense"] == (out / "model.safetensors").stat().st_size
    again = lu.save_pruned(loaded, tmp_path / "again", None, saved)  # a dense folder saved sparse: 2:4 from report
    assert {e["layout"] for e in _layout(again)["tensors"].values()} == {"nm"}
    assert_same_bits(model.state_dict(), lu.load_pruned(again, "cpu")[0].state_dict())


def test_export_writes_a_dense_copy_and_the_card(tmp_path, capsys):
    model, report = pruned(lu.PruneSpec("wanda", 0.5))
    src = lu.save_pruned(model, tmp_path / "sparse", None, {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                            "license": "apache-2.0", "method": "wanda",
                                                            "measured_sparsity": 0.5, "target": "50%",
                                                            "perplexity": {"dense": 10.0, "pruned": 12.5}})
    assert main(["export", str(src), str(tmp_path / "dense")]) == 0
    assert "ordinary transformers folder" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert_same_bits(model.state_dict(), exported.state_dict())
    card = (tmp_path / "dense" / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in front and "license: apache-2.0" in front
    assert "- wanda" in front and "50.00%" in card and "10.000 → 12.500" in card
    assert "from_pretrained" in card and "licence: apache-2.0" in card
    sparse_card = (src / "README.md").read_text()
    assert "python -m labutils export" in sparse_card and "lu.load_pruned" in sparse_card
    assert main(["export", str(src), str(src)]) == 2
    assert "is inside the folder being exported" in capsys.readouterr().err
    assert main(["export", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "not a lab output folder" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cli_saves_sparse_by_default_with_a_card(tiny_with_tokenizer, tmp_path, capsys):
    small = ["--nsamples", "4", "--seqlen", "16", "--eval-tokens", "64", "--eval-seqlen", "32", "--batch-size", "2"]
    for fmt in ("sparse", "dense"):
        out = tmp_path / fmt
        flags = [] if fmt == "sparse" else ["--save-format", "dense"]
        assert main(["prune", "--model", str(tiny_with_tokenizer), *small, "--out", str(out), *flags]) == 0
        text = capsys.readouterr().out
        assert "pruned linears" in text and "sparse / dense" in text
        assert (out / (SPARSE_FILE if fmt == "sparse" else "model.safetensors")).is_file()
        report = load_report(out)
        assert report["disk"]["format"] == fmt and report["base_model"] == str(tiny_with_tokenizer)
        card = (out / "README.md").read_text()
        assert "license: unknown" in card and "does not know the base model's licence" in card
        assert f"{report['perplexity']['pruned']:.3f}" in card
    assert main(["prune", "--model", str(tmp_path / "sparse"), *small, "--out", str(tmp_path / "x")]) == 2
    assert "python -m labutils export" in capsys.readouterr().err


def test_ensure_pruned_recognises_both_formats(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    profile = lu.get_profile()
    spec = lu.PruneSpec("magnitude", 0.5)
    report = {"profile": profile.name, **spec.to_dict()}
    for fmt in ("dense", "sparse"):
        model, _ = pruned(spec)
        folder = lu.save_pruned(model, lu.default_output_dir(profile, spec), None, report, format=fmt)
        found, how = lu.ensure_pruned(profile, spec)
        assert found == folder and how.startswith("found")
        assert lu.load_pruned(found, "cpu")[2]["disk"]["format"] == fmt


def test_weights_changed_where_pruned_are_refused_before_writing(tmp_path):
    model, _ = pruned(lu.PruneSpec("wanda", 0.5))
    name = "model.layers.1.self_attn.q_proj.weight"
    pruned_at = (~true_kept(model)[name]).nonzero()[0]
    with torch.no_grad():
        model.state_dict()[name][tuple(pruned_at)] = 1.0
    with pytest.raises(lu.BadInput, match=rf"{re.escape(name)} holds 1 non-zero weights where pruning removed them"):
        lu.save_pruned(model, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []
    lu.save_pruned(model, tmp_path / "run", format="dense")  # the dense format stores anything


@pytest.mark.parametrize("damage, message", [
    ("values", "model.layers.0.mlp.up_proj.weight: 2 values but the mask keeps"),
    ("mask", "model.layers.0.mlp.up_proj.weight: mask has"),
    ("version", "uses sparse layout version 3; this lab reads versions 1 and 2"),
    ("layout", "model.layers.0.mlp.up_proj.weight: unknown layout 'csr'"),
    ("positions", "model.layers.0.mlp.up_proj.weight: positions have"),
    ("rank", "model.layers.0.mlp.up_proj.weight: a group's positions number exceeds the 6 sets of 2 in 4"),
    ("missing", "model.layers.0.mlp.up_proj.weight.values missing"),
])
def test_damaged_sparse_files_name_the_tensor(damage, message, tmp_path):
    nm = damage in ("positions", "rank")
    model, _ = pruned(lu.PruneSpec("wanda", "2:4" if nm else 0.5))
    out = lu.save_pruned(model, tmp_path / "run", None, {"nm": "2:4" if nm else None})
    path, key = out / SPARSE_FILE, "model.layers.0.mlp.up_proj.weight"
    tensors = load_file(str(path))
    layout = _layout(out)
    if damage == "values":
        tensors[f"{key}.values"] = tensors[f"{key}.values"][:2].clone()
    elif damage == "mask":
        tensors[f"{key}.mask"] = tensors[f"{key}.mask"][:-1].clone()
    elif damage == "version":
        layout["version"] = 3
    elif damage == "layout":
        layout["tensors"][key]["layout"] = "csr"
    elif damage == "positions":
        tensors[f"{key}.positions"] = tensors[f"{key}.positions"][:-1].clone()
    elif damage == "rank":
        tensors[f"{key}.positions"][:] = 255  # 3-bit numbers 7: more than C(4, 2) = 6 sets
    else:
        del tensors[f"{key}.values"]
    save_file(tensors, str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(layout)})
    write_manifest(out, "pruned-model")  # a consistent manifest: the file itself must be caught
    with pytest.raises(lu.LabError, match=re.escape(message)):
        lu.load_pruned(out, "cpu")


def test_a_truncated_file_is_caught_before_loading(tmp_path):
    model, _ = pruned(lu.PruneSpec("wanda", 0.5))
    out = lu.save_pruned(model, tmp_path / "run")
    path = out / SPARSE_FILE
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(lu.LabError, match="damaged"):
        lu.load_pruned(out, "cpu")
    write_manifest(out, "pruned-model")
    with pytest.raises(lu.LabError, match="not a readable safetensors file"):
        lu.load_pruned(out, "cpu")


def test_save_pruned_validates_its_arguments(tmp_path):
    model = make_tiny()
    with pytest.raises(lu.BadInput, match="format must be one of sparse, dense; got 'csr'"):
        lu.save_pruned(model, tmp_path / "run", format="csr")
    with pytest.raises(lu.BadInput, match="folder must be a path; got NoneType"):
        lu.save_pruned(model, None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a timing on a 25M-parameter model
def test_loading_sparse_is_vectorised(tmp_path):
    """A 25M-parameter model: the sparse folder loads in at most 10× the dense folder's time (a per-weight Python
    loop would take minutes). The default profile's ratio is measured in 04-Benchmark."""
    model = lu.random_model(lu.tiny_llama_config(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                                                 num_attention_heads=8, num_key_value_heads=4, vocab_size=2048),
                            torch.float32, torch.device("cpu"))
    lu.prune_model(model, lu.PruneSpec("magnitude", 0.5), progress=False)
    folders = {fmt: lu.save_pruned(model, tmp_path / fmt, format=fmt) for fmt in ("dense", "sparse")}
    start = time.perf_counter()
    table = lu.load_time_table(folders, repeats=3)
    assert time.perf_counter() - start < 60
    assert table.loc["sparse", "× first"] <= 10, table  # a per-weight loop: hundreds of times; a busy machine: 3.5×
    assert table.loc["sparse", "model bytes"] < 0.6 * table.loc["dense", "model bytes"]
    assert math.isclose(table.loc["dense", "× first"], 1.0)


def flip_bits(path: Path, tensor: str, byte: int, mask: int) -> None:
    """XOR ``mask`` into byte ``byte`` of ``tensor``'s data in the safetensors file ``path`` (the manifest untouched)."""
    from labutils.core import checksums
    with checksums._Mapped(path) as view:
        start, end = checksums.safetensors_ranges(view)[tensor]
    assert start + byte < end
    with path.open("r+b") as f:
        f.seek(start + byte)
        value = f.read(1)[0]
        f.seek(start + byte)
        f.write(bytes([value ^ mask]))


KEY = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("spec, part, byte, mask", [
    ("0.5", "values", 400, 0x01),     # the lowest bit of a kept value
    ("0.5", "values", 403, 0x40),     # an exponent bit: the weight off by a factor
    ("0.5", "mask", 100, 0x03),       # two mask bits (the popcount unchanged)
    ("2:4", "positions", 50, 0x10),   # an N:M group's position rank
])
def test_any_damaged_byte_of_a_sparse_save_is_named_and_never_exported(spec, part, byte, mask, tmp_path, capsys):
    """Damage the sampled check of old could not see: every byte of every tensor is compared with the digest the
    manifest recorded when the folder was written, on every load; export stops too (exit 2, nothing written)."""
    target = "2:4" if spec == "2:4" else float(spec)
    model, _ = pruned(lu.PruneSpec("wanda", target))
    out = lu.save_pruned(model, tmp_path / "run", None, {"nm": "2:4" if spec == "2:4" else None})
    flip_bits(out / SPARSE_FILE, f"{KEY}.{part}", byte, mask)
    message = f"{SPARSE_FILE}: tensor {KEY}.{part} differs from what was written (xxh3 mismatch)"
    with pytest.raises(lu.LabError, match=re.escape(message)):
        lu.load_pruned(out, "cpu")
    assert main(["export", str(out), str(tmp_path / "dense")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "dense").exists()


def test_a_damaged_byte_of_a_dense_save_is_named(tmp_path):
    model, _ = pruned(lu.PruneSpec("wanda", 0.5))
    out = lu.save_pruned(model, tmp_path / "run", format="dense")
    flip_bits(out / "model.safetensors", KEY, 1001, 0x01)
    with pytest.raises(lu.LabError, match=re.escape(f"model.safetensors: tensor {KEY} differs from what was written")):
        lu.load_pruned(out, "cpu")


def _rewrite_layout(out: Path, edit) -> None:
    """Rewrite the sparse file's layout metadata with ``edit`` (on the parsed JSON, or its text if it returns a
    string) and the manifest to match, as a tool that "repairs" folders would."""
    path = out / SPARSE_FILE
    tensors = load_file(str(path))
    layout = _layout(out)
    edited = edit(layout)
    text = edited if isinstance(edited, str) else json.dumps(layout)
    save_file(tensors, str(path), metadata={"format": "pt", METADATA_KEY: text})


@pytest.mark.parametrize("damage, message", [
    ("report not json", "report.json is not readable JSON"),
    ("report dtype", "report.json: field 'dtype' is 'float16x'"),
    ("report list", "report.json: it holds list, not an object"),
    ("metadata truncated", f"its {METADATA_KEY} metadata is not JSON"),
    ("shapes swapped", "has shape (192, 64), its config.json needs (64, 192)"),
    ("aliases missing", "field 'aliases' is missing"),
    ("shape a string", "shape is '64x128', not a list of sizes"),
])
def test_damaged_metadata_with_a_matching_manifest_is_one_line(damage, message, tmp_path, capsys):
    model, _ = pruned(lu.PruneSpec("wanda", 0.5))
    out = lu.save_pruned(model, tmp_path / "run")
    key = "model.layers.0.mlp.down_proj.weight"
    if damage == "report not json":
        (out / "report.json").write_text('{"lab": "wanda-lab", "dtype": ')
    elif damage == "report dtype":
        (out / "report.json").write_text(json.dumps({**load_report(out), "dtype": "float16x"}))
    elif damage == "report list":
        (out / "report.json").write_text("[1, 2]")
    elif damage == "metadata truncated":
        _rewrite_layout(out, lambda layout: json.dumps(layout)[:-40])
    elif damage == "shapes swapped":
        _rewrite_layout(out, lambda layout: layout["tensors"][key].update(shape=layout["tensors"][key]["shape"][::-1]))
    elif damage == "aliases missing":
        _rewrite_layout(out, lambda layout: layout.pop("aliases"))
    else:
        _rewrite_layout(out, lambda layout: layout["tensors"][key].update(shape="64x128"))
    write_manifest(out, "pruned-model")
    with pytest.raises(lu.LabError, match=re.escape(message)):
        lu.load_pruned(out, "cpu")
    assert main(["export", str(out), str(tmp_path / "dense")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("call, message", [
    (lambda tmp: lu.load_pruned(None), "expected the path of a lab output folder; got NoneType"),
    (lambda tmp: lu.load_pruned(lu.save_pruned(make_tiny(), tmp / "m"), "cpu", dtype="float16"),
     "dtype must be a torch dtype such as torch.float16; got 'float16'"),
    (lambda tmp: lu.save_pruned(None, tmp / "n"), "model must be a transformers model; got NoneType"),
    (lambda tmp: lu.save_pruned(make_tiny(), tmp / "r", report=[1]), "report must be a dict"),
])
def test_library_calls_with_bad_arguments_raise_bad_input(call, message, tmp_path):
    with pytest.raises(lu.BadInput, match=re.escape(message)):
        call(tmp_path)
