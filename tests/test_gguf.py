"""``export --format gguf`` / ``lu.export_gguf``, read back with gguf's own reader: every tensor exact in f16 (zeros
included), within the quantizer's bound in q8_0 / q4_0, the template's metadata copied, the lab's fields added,
every bad input one line, exit 2, nothing written. The fast tests give the export a tiny template GGUF written here
for the tiny Llama (untied lm_head, so ``output.weight`` too); one slow test exports the real default model against
its own GGUF file and checks the Q/K row order on it."""
import errno
import struct

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import labutils as lu
from labutils.cli import main
from labutils.deploy import gguf as gguf_export
from labutils.core.loading import embedded_gguf_path
from labutils.deploy.gguf import MARKER_KEY, from_gguf_rows, gguf_name, template, template_reader, to_gguf_rows
from conftest import make_tiny

TINY_HEADS = {"attn_q": 4, "attn_k": 2}  # lu.tiny_llama_config: 4 query heads, 2 key/value heads
REAL_HEADS = {"attn_q": 9, "attn_k": 3}  # SmolLM2-135M
Q4_EPS, Q8_EPS = 0.01, 0.07  # the bounds' slack for the float16 block scale (2⁻¹¹ relative, times up to 8 or 127)


def run(argv: list[str]) -> int:
    """The command line's exit code, argparse's own errors (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def fake_lab_gguf(path):
    """A file that passes for an earlier lab export (its first bytes hold the marker key): what may be replaced."""
    key = MARKER_KEY.encode()
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + b"old")
    return path


def prune_half(model) -> None:
    """Zero the smaller-magnitude half of each row of each decoder linear (what magnitude 50 % does, at once)."""
    with torch.no_grad():
        for layer in lu.find_decoder_layers(model):
            for linear in lu.find_linears(layer).values():
                weight = linear.weight
                weight.scatter_(1, weight.abs().argsort(dim=1)[:, :weight.shape[1] // 2], 0)


def write_tiny_template(path, model) -> None:
    """A GGUF file shaped like ``model`` (a tiny Llama) with the metadata a real one carries: what the export copies."""
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_token_merges(["t 1", "t1 2"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}")
    for name, tensor in model.state_dict().items():
        writer.add_tensor(gguf_name(name), np.zeros(tuple(tensor.shape), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_template(tmp_path_factory):
    """The export's template replaced, for this module, by a tiny GGUF file of the tiny Llama's shapes."""
    path = tmp_path_factory.mktemp("template") / "tiny.gguf"
    write_tiny_template(path, make_tiny())
    template.cache_clear(), template_reader.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_export, "embedded_gguf_path", lambda: path)
        yield path
    template.cache_clear(), template_reader.cache_clear()


@pytest.fixture(scope="module")
def pruned(tiny_template, tmp_path_factory):
    """(lab output folder, its state dict): the tiny Llama in float16 (untied lm_head), 50 % of each row pruned."""
    model = make_tiny()
    prune_half(model)
    model.half()
    folder = tmp_path_factory.mktemp("gguf") / "pruned"
    lu.save_pruned(model, folder, None, {"method": "magnitude", "label": "magnitude 50%", "target": "50%"})
    return folder, model.state_dict()


@pytest.fixture(scope="module")
def exported(pruned):
    """{quant: gguf reader of the exported file}: f16 and q8_0 through lu.export_gguf (q8_0 over an earlier lab
    file, which is replaced), q4_0 through the command line."""
    folder = pruned[0]
    paths = {quant: folder.parent / f"model-{quant}.gguf" for quant in gguf_export.QUANTS}
    lu.export_gguf(folder, paths["f16"])
    lu.export_gguf(folder, fake_lab_gguf(paths["q8_0"]), quant="q8_0")
    assert main(["export", str(folder), str(paths["q4_0"]), "--format", "gguf", "--quant", "q4_0"]) == 0
    return {quant: gguf.GGUFReader(path) for quant, path in paths.items()}


def linear_pairs(state: dict, reader, heads: dict = TINY_HEADS) -> list:
    """(GGUF tensor, the model's tensor as the file orders it) for every tensor the file holds; the file holds
    them all (a tied lm_head is the embedding: no ``output.weight``)."""
    tensors = {t.name: t for t in reader.tensors}
    pairs = []
    for name, tensor in state.items():
        target = gguf_name(name)
        if target == "output.weight" and target not in tensors:
            assert torch.equal(tensor, state["model.embed_tokens.weight"])  # tied
            continue
        kind = target.split(".")[-2]
        pairs.append((tensors.pop(target), to_gguf_rows(tensor, heads[kind]) if kind in heads else tensor))
    assert not tensors, f"tensors the model does not have: {list(tensors)}"
    return pairs


def as_torch(tensor) -> torch.Tensor:
    """A reader tensor's values as torch has them, shape (out, in); quantized ones dequantized."""
    data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    if tensor.tensor_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
        data = np.array(data)  # the reader's read-only memory map; dequantized arrays are already fresh
    return torch.from_numpy(data).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def test_f16_is_every_weight_exactly_with_its_zeros(pruned, exported):
    state = pruned[1]
    reader = exported["f16"]
    shapes = template()[1]
    assert [t.name for t in reader.tensors] == list(shapes)  # the template's tensors, in its order
    zeros = 0
    for tensor, expected in linear_pairs(state, reader):
        assert tuple(int(n) for n in reversed(tensor.shape)) == shapes[tensor.name]
        want = gguf.GGMLQuantizationType.F16 if expected.ndim == 2 else gguf.GGMLQuantizationType.F32
        assert tensor.tensor_type == want, tensor.name
        stored = as_torch(tensor)
        assert torch.equal(stored, expected.to(stored.dtype)), tensor.name  # bit for bit: the model is float16
        if tensor.name.startswith("blk.") and expected.ndim == 2:
            assert torch.equal(stored == 0, expected == 0), tensor.name  # every pruned zero, and only those
            zeros += int((stored == 0).sum())
    assert zeros > 0.49 * sum(t.numel() for n, t in state.items() if n.startswith("model.layers.") and t.ndim == 2)


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_weights_are_within_the_quantizers_bound(quant, pruned, exported):
    """Per block of 32 weights, |stored − weight| ≤ max|block|/127·(½+ε) for q8_0 (rounding to 8 bits) and
    ≤ max|block|/8·(1+ε) for q4_0 (its scale is max/−8, so −max clips to 7 steps); pruned zeros stay exactly 0.
    Norms stay float32; the token embedding and an untied output are q8_0 in both."""
    types = gguf.GGMLQuantizationType
    for tensor, expected in linear_pairs(pruned[1], exported[quant]):
        stored, weight = as_torch(tensor), expected.float()
        if weight.ndim == 1:
            assert tensor.tensor_type == types.F32 and torch.equal(stored, weight), tensor.name
            continue
        q8 = quant == "q8_0" or tensor.name in ("token_embd.weight", "output.weight")
        assert tensor.tensor_type == (types.Q8_0 if q8 else types.Q4_0), tensor.name
        blocks, errors = weight.reshape(-1, 32), (stored - weight).reshape(-1, 32)
        bound = blocks.abs().amax(dim=1, keepdim=True) * ((0.5 + Q8_EPS) / 127 if q8 else (1 + Q4_EPS) / 8)
        assert (errors.abs() <= bound).all(), (tensor.name, (errors.abs() - bound).max().item())
        assert (stored[weight == 0] == 0).all(), tensor.name


def assert_metadata_copied(fields: dict, source: dict) -> None:
    """Every field of the template ``source`` but the file type is in ``fields`` (a reader's), same type and value."""
    copied = [k for k in source if not k.startswith("GGUF.") and k != "general.file_type"]
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"} <= set(copied)
    for key in copied:
        assert fields[key].types == source[key].types and fields[key].contents() == source[key].contents(), key


def test_the_templates_metadata_is_copied_and_the_pruning_recorded(exported):
    for quant, reader in exported.items():
        fields = reader.fields
        assert_metadata_copied(fields, template_reader().fields)
        file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
        assert fields["general.file_type"].contents() == file_type
        assert fields["wanda_lab.method"].contents() == "magnitude 50%"
        assert fields["wanda_lab.target"].contents() == "50%"
        assert fields["wanda_lab.linear_sparsity"].contents() == pytest.approx(0.5, abs=0.01)


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """Lab outputs the GGUF export refuses: a Llama of other shapes and a tiny Qwen2 (another model type)."""
    base = tmp_path_factory.mktemp("others")
    qwen = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2))
    return {"three layers": lu.save_pruned(make_tiny(num_hidden_layers=3), base / "three-layers"),
            "qwen2": lu.save_pruned(qwen, base / "qwen2")}


@pytest.mark.parametrize("case, message", [
    ("plain folder", "is not a lab output folder"),
    ("unknown quant", "argument --quant: invalid choice: 'q5_k'"),
    ("quant with dense", "--quant q8_0 goes with --format gguf"),
    ("no .gguf suffix", "does not end in .gguf"),
    ("existing other file", "exists and is not a GGUF file written by the lab"),
    ("existing folder", "is a folder; allowed: a new .gguf file"),
    ("inside the folder", "is inside the folder being exported"),
    ("three layers", "num_hidden_layers is 3 but the template GGUF's llama.block_count is 2"),
    ("qwen2", "model type 'qwen2' cannot be exported to GGUF; allowed: llama (LlamaForCausalLM)"),
])
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(case, message, pruned, other_models, tmp_path, capsys):
    folder, out = pruned[0], tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    extra = ["--format", "gguf"]
    if case == "plain folder":
        folder = tmp_path
    elif case == "unknown quant":
        extra += ["--quant", "q5_k"]
    elif case == "quant with dense":
        extra = ["--quant", "q8_0"]
    elif case == "no .gguf suffix":
        out = out.with_suffix(".bin")
    elif case == "existing other file":
        out.write_bytes(b"GGUF not ours")
    elif case == "existing folder":
        out.mkdir()
    elif case == "inside the folder":
        out = folder / "model.gguf"
    elif case in other_models:
        folder = other_models[case]
    before = sorted(p.name for p in out.parent.iterdir())
    assert run(["export", str(folder), str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in out.parent.iterdir()) == before
    if case == "existing other file":
        assert out.read_bytes() == b"GGUF not ours"
    with pytest.raises(lu.BadInput, match="quant must be one of f16, q8_0, q4_0; got 'q4_k'"):
        lu.export_gguf(pruned[0], tmp_path / "api.gguf", quant="q4_k")


def test_an_interrupted_export_leaves_the_previous_file(pruned, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the file is being written: the partial file is removed, the earlier export is unchanged."""
    out = fake_lab_gguf(tmp_path / "model.gguf")
    before = out.read_bytes()

    def interrupted(path, *args):
        path.write_bytes(b"GGUF partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_export, "write_gguf", interrupted)
    assert main(["export", str(pruned[0]), str(out), "--format", "gguf"]) == 130
    assert "nothing was published" in capsys.readouterr().err
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


@pytest.mark.parametrize("earlier", [False, True])
def test_a_full_disk_is_one_line_and_leaves_what_was_there(earlier, pruned, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing: one line saying so and what is at OUT now (the earlier export, or nothing)."""
    out = fake_lab_gguf(tmp_path / "model.gguf") if earlier else tmp_path / "model.gguf"
    before = out.read_bytes() if earlier else None

    def full(path, *args):
        path.write_bytes(b"GGUF partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_export, "write_gguf", full)
    assert main(["export", str(pruned[0]), str(out), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device (the disk is full); " in err and err.count("\n") == 1
    assert ("the previous file there is unchanged" if earlier else "nothing was written") in err
    assert (out.read_bytes() == before) if earlier else not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["model.gguf"] if earlier else [])


@pytest.fixture
def real_template(monkeypatch):
    """The export's own template, the default model's GGUF file, even where this module's tiny one is in place."""
    template.cache_clear(), template_reader.cache_clear()
    monkeypatch.setattr(gguf_export, "embedded_gguf_path", embedded_gguf_path)
    yield
    template.cache_clear(), template_reader.cache_clear()


@pytest.mark.slow
def test_the_default_model_round_trips_against_its_own_gguf(real_template, tmp_path):
    """The fact the export relies on, checked on the real template: its attn_q / attn_k are the converted model's
    q_proj / k_proj with their rows in llama.cpp's rotary order (from_gguf_rows undoes it), attn_v as it is. Then
    the default model, pruned and in float16, exported f16: the template's 272 tensors in its order, each the
    model's bit for bit, every metadata field copied."""
    model, tokenizer = lu.load_model(lu.get_profile(lu.DEFAULT_PROFILE), "cpu")
    tensors = {t.name: t for t in template_reader().tensors}
    for proj, target, heads in [("q_proj", "attn_q", 9), ("k_proj", "attn_k", 3), ("v_proj", "attn_v", None)]:
        weight = getattr(model.model.layers[0].self_attn, proj).weight.detach()
        stored = as_torch(tensors[f"blk.0.{target}.weight"])
        assert torch.equal(stored, weight if heads is None else to_gguf_rows(weight, heads)), proj
        if heads:
            assert not torch.equal(stored, weight) and torch.equal(from_gguf_rows(stored, heads), weight), proj
    prune_half(model)
    model.half()
    folder = lu.save_pruned(model, tmp_path / "pruned", tokenizer, {"method": "magnitude"}, format="dense")
    reader = gguf.GGUFReader(lu.export_gguf(folder, tmp_path / "model.gguf"))
    assert [t.name for t in reader.tensors] == list(template()[1]) and len(reader.tensors) == 272
    for tensor, expected in linear_pairs(model.state_dict(), reader, REAL_HEADS):
        stored = as_torch(tensor)
        assert torch.equal(stored, expected.to(stored.dtype)), tensor.name
    assert_metadata_copied(reader.fields, template_reader().fields)
    assert reader.fields["wanda_lab.method"].contents() == "magnitude"
