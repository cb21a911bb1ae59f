"""Disk-streamed pruning (issue K, item 1): ``--stream-from-disk`` never loads the model whole, and gives the in-memory
job's masks, weights and perplexities, bit for bit; a model of 1.6 GB on disk is pruned in under 1 GiB of memory."""
import json
import subprocess
import sys

import pytest
import test_moe
import torch
from transformers import LlamaConfig

import labutils as lu
from labutils.core.loading import embedded_model_dir
from labutils.core.sparse.files import SPARSE_INDEX
from labutils.prune.disk import CheckpointReader, write_random_checkpoint

SMALL = dict(nsamples=6, seqlen=16, eval_tokens=512, eval_seqlen=32, batch_size=2)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def assert_same_model(a_folder, b_folder):
    """The two saved models hold the same tensors bit for bit and the same recorded masks."""
    a, _, _ = lu.load_pruned(a_folder, "cpu")
    b, _, _ = lu.load_pruned(b_folder, "cpu")
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(bits(sa[name]), bits(sb[name])), name
    ka, kb = lu.kept_masks(a), lu.kept_masks(b)
    assert set(ka.packed) == set(kb.packed) and ka.nm == kb.nm
    assert all(torch.equal(ka.packed[n], kb.packed[n]) for n in ka.packed)


@pytest.mark.parametrize("spec", [lu.PruneSpec("wanda", 0.5), lu.PruneSpec("sparsegpt", "2:4"),
                                  lu.PruneSpec("wanda", 0.6, owl=lu.OwlConfig(lam=0.1)),
                                  lu.PruneSpec("admm", 0.5, true_sequential=True)],
                         ids=["wanda", "sparsegpt-2:4", "owl", "admm-true-sequential"])
def test_streamed_job_is_the_in_memory_job(spec, sharded_tiny, tmp_path):
    memory = lu.run_prune_job(lu.PruneJob(spec, model_path=str(sharded_tiny), out=str(tmp_path / "memory"), **SMALL),
                              progress=False)
    streamed = lu.run_prune_job(lu.PruneJob(spec, model_path=str(sharded_tiny), out=str(tmp_path / "streamed"),
                                            stream_from_disk=True, **SMALL), progress=False)
    assert streamed["mask_sha256"] == memory["mask_sha256"]
    assert streamed["perplexity"] == memory["perplexity"]  # the same windows, batches and operations
    for key in ("measured_sparsity", "parameters", "nonzero_parameters", "linear_sparsity", "model_sparsity",
                "sublayers", "layer_sparsity"):
        assert streamed[key] == memory[key], key
    assert streamed["stream_from_disk"] and streamed["peak_rss_bytes"] > 0
    assert_same_model(tmp_path / "memory", tmp_path / "streamed")
    out = tmp_path / "streamed"
    index = json.loads((out / SPARSE_INDEX).read_text())
    n_layers = lu.load_report(out)["disk"]["shards"] - 1
    assert len(set(index["weight_map"].values())) == n_layers + 1 == 3  # the outer weights, then one per layer
    assert "shards" in (out / "README.md").read_text()


def test_stacked_experts_are_refused_before_any_work(tmp_path, tiny_with_tokenizer):
    """transformers stacks Qwen2-MoE's per-expert tensors while loading the whole model; streaming reads the model's
    own names, so it says so at once and writes nothing."""
    folder = tmp_path / "moe"
    test_moe.make("qwen2_moe").save_pretrained(folder)
    job = lu.PruneJob(model_path=str(folder), tokenizer_path=str(tiny_with_tokenizer), out=str(tmp_path / "b"),
                      stream_from_disk=True, **SMALL)
    with pytest.raises(lu.LabError, match="stores its experts one by one.*prune this model in memory"):
        lu.run_prune_job(job, progress=False)
    assert not (tmp_path / "b").exists()


def test_reader_copies_and_never_writes_the_checkpoint(sharded_tiny):
    reader = CheckpointReader(sharded_tiny)
    name = "model.layers.0.mlp.up_proj.weight"
    first = reader.read([name], torch.float32, torch.device("cpu"))[name]
    first.zero_()  # pruning writes into what was read: the file must not change
    again = reader.read([name], torch.float32, torch.device("cpu"))[name]
    assert bool((again != 0).any())
    with pytest.raises(lu.LabError, match="does not hold model.layers.9"):
        reader.read(["model.layers.9.mlp.up_proj.weight"], torch.float32, torch.device("cpu"))


def test_skeleton_holds_no_weights(sharded_tiny):
    model = lu.skeleton(sharded_tiny, torch.float32)
    assert all(p.is_meta for p in model.parameters())
    outer = lu.load_outer(model, CheckpointReader(sharded_tiny), torch.float32)
    assert "model.embed_tokens.weight" in outer and not outer["model.embed_tokens.weight"].is_meta
    assert all(p.is_meta for p in lu.find_decoder_layers(model).parameters())


@pytest.mark.parametrize("change, message", [
    (dict(low_memory=True), "already keeps the model out of memory"),
    (dict(save_format="dense"), "writes the sparse format, shard by shard"),
])
def test_stream_refuses_what_it_cannot_do(change, message, sharded_tiny, tmp_path):
    job = lu.PruneJob(model_path=str(sharded_tiny), out=str(tmp_path / "x"), stream_from_disk=True, **change, **SMALL)
    with pytest.raises(lu.BadInput, match=message):
        lu.run_prune_job(job, progress=False)
    assert not (tmp_path / "x").exists()


def test_stream_needs_safetensors(tiny_with_tokenizer, tmp_path):
    folder = tmp_path / "bin"
    model, tokenizer = lu.load_model(lu.get_profile(None), torch.device("cpu"), str(tiny_with_tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # an older folder: pickled weights only
    (folder / "model.safetensors").unlink()
    job = lu.PruneJob(model_path=str(folder), out=str(tmp_path / "x"), stream_from_disk=True, **SMALL)
    with pytest.raises(lu.LabError, match="streaming from disk reads safetensors weights"):
        lu.run_prune_job(job, progress=False)
    assert not (tmp_path / "x").exists()


def test_stream_of_an_unreachable_hub_model_fails_clearly(tmp_path):
    job = lu.PruneJob(model_path="nobody/no-such-model", out=str(tmp_path / "x"), stream_from_disk=True, **SMALL)
    with pytest.raises(lu.LabError, match="model 'nobody/no-such-model' not found.*Hugging Face Hub could not"):
        lu.run_prune_job(job, progress=False)


# A Llama-shaped model of 1.63 GB (1.52 GiB) in float32: 60 layers, 768 wide, grouped-query attention (4 key-value
# heads for 12 query heads) as Llama-2-70B has, and the default model's vocabulary (its tokenizer makes the
# calibration text) with embeddings tied, as SmolLM2's are.
BIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=60, num_attention_heads=12,
           num_key_value_heads=4, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.mark.slow
@pytest.mark.large  # about a minute: make test-optional runs it, make test (15 minutes on 2 cores) does not
def test_a_large_model_streams_in_little_memory(tmp_path):
    """1.6 GB on disk, pruned with a peak RSS under 1 GiB (measured by the pruning process itself, imports
    included), with the same masks as the in-memory run of the same model."""
    folder = tmp_path / "big"
    size = write_random_checkpoint(folder, LlamaConfig(**BIG))
    assert size >= 1.5 * 2**30
    profile = lu.get_profile(None, nsamples=4, seqlen=32)
    model, tokenizer = lu.load_model(profile, torch.device("cpu"), str(folder), str(embedded_model_dir()))
    # The calibration tokens, as the streamed run makes them; this also leaves the tokenized corpus in the lab's
    # cache (data.split_tokens), as any earlier run on this machine would have: tokenizing it takes ~0.5 GB.
    tokens = lu.calibration_data(profile, tokenizer, 4, 32, 0, vocab_size=BIG["vocab_size"])
    lu.test_tokens(profile, tokenizer, 256)
    small = ["--nsamples", "4", "--seqlen", "32", "--eval-tokens", "256", "--eval-seqlen", "64", "--batch-size", "2"]
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "labutils", "prune", "--stream-from-disk", "--model", str(folder),
                          "--tokenizer", str(embedded_model_dir()), "--out", str(out), *small],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = lu.load_report(out)
    assert report["peak_rss_bytes"] <= 2**30, report["peak_rss_bytes"]
    assert report["disk"]["model"]["dense"] == size and report["disk"]["shards"] == 61

    memory = lu.prune_model(model, lu.PruneSpec("wanda", 0.5), tokens, batch_size=2, progress=False)
    assert memory.mask_sha256 == report["mask_sha256"]
