"""Shared fixtures: tiny random Llama models on the CPU, and no network."""
import os

# No test may reach the Hugging Face Hub: fail fast instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import labutils as lu  # noqa: E402


def make_tiny(seed: int = 0, **overrides):
    """A 2-layer random Llama (GQA) in float32 with non-trivial weights."""
    return lu.random_model(lu.tiny_llama_config(**overrides), torch.float32, torch.device("cpu"), seed=seed)


def random_tokens(shape: tuple[int, ...], seed: int = 0, vocab_size: int = 256) -> torch.Tensor:
    """Token ids drawn uniformly from the tiny models' vocabulary, the same for the same seed."""
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def raiser(exc: BaseException):
    """A stand-in for any function that raises ``exc`` when called (for monkeypatch)."""
    def fail(*args, **kwargs):
        raise exc
    return fail


def copy_of(folder, tmp_path):
    """A copy of a model ``folder`` to damage (``tmp_path / "model"``)."""
    return shutil.copytree(folder, tmp_path / "model")


def owl_lambda_message(lam, where="at every target: the most and least pruned layers are 2·lambda apart; "
                                  "allowed here: 0 ≤ lambda < 0.5 (--owl-lambda, OwlConfig(lam=…); the paper uses 0.08)"):
    return f"OWL lambda {lam!r} moves some layer's sparsity out of [0, 1) {where}"


@pytest.fixture
def tiny_model():
    return make_tiny()


@pytest.fixture
def calib_tokens():
    return random_tokens((6, 16), seed=1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved like a hub folder, without tokenizer files (max_position_embeddings 128)."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tiny_dir, tmp_path_factory):
    """The tiny model plus a byte-level tokenizer (256 ids, the tiny vocabulary): real text, no download."""
    path = tmp_path_factory.mktemp("tiny-tok") / "model"
    shutil.copytree(tiny_dir, path)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(path)
    return path


NBVAL_OUTPUT_TIMEOUT = 60  # seconds


def pytest_collection_modifyitems(items):
    """nbval waits a hard-coded 5 s for each output message of a notebook cell after the cell has finished; on a
    busy 2-core CI machine the kernel can take longer than that to flush a cell's progress bars, which failed a
    whole run once. Waiting longer changes nothing that is checked: a cell that really hangs still hits
    ``--nbval-cell-timeout``."""
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT


@pytest.fixture(scope="session")
def sharded_tiny(tiny_with_tokenizer, tmp_path_factory):
    """The tiny model with its tokenizer, saved in several safetensors shards with an index (as large models are)."""
    folder = tmp_path_factory.mktemp("sharded") / "model"
    model, tokenizer = lu.load_model(lu.get_profile(None), torch.device("cpu"), str(tiny_with_tokenizer))
    model.save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder
