"""Model anatomy: finding the parts Wanda prunes in a loaded model (introduced in 02-Prune) — its decoder layers,
their linear sublayers and the routed experts of mixture-of-experts layers — and the model's sequence limit and
device.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from .config import flag_note
from .errors import BadInput

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


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
