"""Shared fixtures: tiny random Llama models on the CPU, and no network."""
import os

# No test may reach the Hugging Face Hub: fail fast instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture
def tiny_model():
    return make_tiny()


@pytest.fixture
def calib_tokens():
    return random_tokens((6, 16), seed=1)


NBVAL_OUTPUT_TIMEOUT = 60  # seconds


def pytest_collection_modifyitems(items):
    """nbval waits a hard-coded 5 s for each output message of a notebook cell after the cell has finished; on a
    busy 2-core CI machine the kernel can take longer than that to flush a cell's progress bars, which failed a
    whole run once. Waiting longer changes nothing that is checked: a cell that really hangs still hits
    ``--nbval-cell-timeout``."""
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT
