"""Recovery by fine-tuning a pruned model with LoRA, the mask kept (introduced in 05-Recover, section 3).

Sun et al. (arXiv 2306.11695, §5) recover part of what 2:4 costs by LoRA fine-tuning (rank 8 on q_proj and v_proj).
A LoRA update B·A is dense, so merging it into a pruned weight would fill its zeros. Here every LoRA layer uses
the masked update (B·A · scale) ⊙ M, with M the weight's non-zeros, in training as in the merge: the model that is
trained is the model that is kept, and every pruned weight is exactly zero before, during and after. The LoRA
layers are peft's (``peft.tuners.lora.Linear``), with that one change in ``get_delta_weight`` and ``forward``.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.errors import BadInput
from ..core.sparse.bits import kept_masks, storage_names
from ..core.sparse.format import nonzero_bits
from ..core.validation import check_model, check_number, check_positive_int, check_tokens
from .sparsity import mask_sha256, model_sparsity


def masked_merge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 kept: torch.Tensor | None = None) -> torch.Tensor:
    """W + (B·A · scale) ⊙ M: a LoRA update merged into a pruned weight without filling its zeros. weight (out, in),
    lora_a (r, in), lora_b (out, r); kept (out, in) bool, default the non-zeros of ``weight``."""
    kept = nonzero_bits(weight) if kept is None else kept
    return weight + (lora_b @ lora_a * scale).to(weight.dtype) * kept


@dataclass
class RecoveryReport:
    """What ``recover`` did: the adapter, the training run, and the check that the mask survived."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    steps: int
    tokens: int  # training tokens seen
    trainable: int  # LoRA parameters trained
    seconds: float
    losses: list[float] = field(default_factory=list)  # training loss per step
    mask_sha256: str = ""  # before and after: equal
    sparsity: float = 0.0  # of the decoder linears, after the merge


@dataclass(frozen=True)
class RecoverySettings:
    """How ``recover`` fine-tunes: the LoRA adapter (``rank``, ``alpha``: the update is scaled by alpha / rank, and
    the names of the linears it wraps, ``targets``) and the training run (``epochs`` over the windows, ``batch_size``
    windows per AdamW step at learning rate ``lr``, shuffled with ``seed``). The defaults are Sun et al.'s §5 rank 8
    on q_proj and v_proj."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    epochs: int = 1
    batch_size: int = 4
    lr: float = 2e-4
    seed: int = 0


def recover(model: nn.Module, tokens: torch.Tensor, settings: RecoverySettings | None = None, *,
            progress: bool = True) -> RecoveryReport:
    """Fine-tune a pruned ``model`` in place with masked LoRA on ``tokens`` (windows, seqlen) for
    ``settings.epochs``, then merge: ``lu.recover(model, lu.calibration_data(...))``. Only the linears named in
    ``settings.targets`` get adapters; every pruned weight stays exactly zero (the mask hash is checked before and
    after). ``settings``: ``RecoverySettings()`` when None. Returns a report."""
    settings = RecoverySettings() if settings is None else settings
    linears, tokens = _checked(model, tokens, settings)
    before = mask_sha256(model)
    trainable_before = {id(p): p.requires_grad for p in model.parameters()}  # peft freezes the whole model
    kept = _kept_bits(model, linears)
    from .lora import KEPT_ATTRIBUTE, LoraConfig, MaskedLoraLinear, get_peft_model  # peft takes ~1 s, ~170 MB
    for name, linear in linears.items():
        object.__setattr__(linear, KEPT_ATTRIBUTE, kept[name])
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.targets),
                        lora_dropout=0.0, bias="none")
    config._register_custom_module({nn.Linear: MaskedLoraLinear})
    with warnings.catch_warnings():  # peft asks transformers a question transformers 5 has renamed
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    start = time.perf_counter()
    losses = _train(peft_model, tokens, trainable, settings, progress)
    merged = peft_model.merge_and_unload()
    for linear in linears.values():
        delattr(linear, KEPT_ATTRIBUTE)
    for param in merged.parameters():  # the same Parameter objects: give back what peft froze
        param.requires_grad_(trainable_before.get(id(param), param.requires_grad))
    after = mask_sha256(merged)
    if after != before:  # cannot happen: every update is masked
        raise RuntimeError(f"recovery changed the mask (sha256 {before[:12]} → {after[:12]})")
    return RecoveryReport(settings.rank, settings.alpha, tuple(settings.targets), len(losses),
                          int(tokens.numel()) * settings.epochs, sum(p.numel() for p in trainable),
                          time.perf_counter() - start, losses, after, model_sparsity(merged)["linear_sparsity"])


def _checked(model: nn.Module, tokens: torch.Tensor,
             settings: RecoverySettings) -> tuple[dict[str, nn.Linear], torch.Tensor]:
    """Every input check of ``recover``, before anything changes: the target linears by name, and the tokens."""
    check_model(model)
    tokens = check_tokens("recovery tokens", tokens, model.config.vocab_size, ndim=2)
    for name in ("rank", "epochs", "batch_size"):
        check_positive_int(name, getattr(settings, name))
    check_number("alpha", settings.alpha, 0, 1e6, interval="(]")
    check_number("lr", settings.lr, 0, 1, interval="(]", allowed="a learning rate in (0, 1]")
    return _target_linears(model, settings.targets), tokens


def _target_linears(model: nn.Module, targets) -> dict[str, nn.Linear]:
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
        raise BadInput(f"targets must be a non-empty tuple of linear names such as ('q_proj', 'v_proj'); "
                       f"got {targets!r}")
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets}
    missing = sorted(set(targets) - {name.rpartition(".")[2] for name in found})
    if missing:
        raise BadInput(f"targets {missing} name no linear of this model; e.g. 'q_proj', 'k_proj', 'v_proj', "
                       "'o_proj', 'gate_proj', 'up_proj', 'down_proj'")
    return found


def _kept_bits(model: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """The mask each target linear's update may touch, (out, in) bool by name: the non-zeros among the weights
    pruning kept (the record, where there is one). A kept weight that is exactly zero stays zero too, so the zero
    pattern — the mask hash, the measured sparsity — is the same after recovery."""
    record, names = kept_masks(model), storage_names(model)
    bits = {}
    for name, linear in linears.items():
        pname = names[linear.weight.untyped_storage().data_ptr()][0]
        kept = nonzero_bits(linear.weight.detach())
        if record is not None and pname in record.packed:
            kept &= record.kept(pname).to(kept.device)
        bits[name] = kept
    return bits


def _train(model: nn.Module, tokens: torch.Tensor, params: list, settings: RecoverySettings,
           progress: bool) -> list[float]:
    """AdamW on the LoRA parameters, causal-LM loss on every window; one step per batch, windows shuffled."""
    device = next(model.parameters()).device
    epochs, batch_size = settings.epochs, settings.batch_size
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    steps = epochs * math.ceil(len(tokens) / batch_size)
    losses = []
    model.train()
    with tqdm(total=steps, desc="recovery", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(tokens), generator=generator)
            for start in range(0, len(tokens), batch_size):
                batch = tokens[order[start:start + batch_size]].to(device)
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
                bar.update()
    model.eval()
    return losses

