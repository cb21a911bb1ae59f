"""ADMM weight update (Boža 2024, arXiv 2401.02938): with the mask fixed, the layer-wise least-squares problem
min ‖X Wᵀ − X Ŵᵀ‖² over the kept weights Ŵ, solved by the alternating direction method of multipliers.

It uses the same statistic as SparseGPT, H = 2 XᵀX (in × in). Each input j is first rescaled by ‖X_j‖ (so that H
has a unit diagonal and a weight's magnitude is its Wanda score), and H is dampened by ``dampening`` × its mean
diagonal. Then, for the scaled weights W₀ (out, in), with V the dense iterate, Z its pruned copy and U the scaled
dual variable:

    Z ← mask ⊙ (V + U)            (projection onto the kept weights)
    U ← U + V − Z
    V ← (W₀ H + ρ (Z − U)) (H + ρ I)⁻¹

and the result is the last Z, scaled back. One matrix product per iteration; (H + ρI)⁻¹ is computed once for a
constant ρ (the authors' release keeps ρ = 1), or from one eigendecomposition of H when ρ grows. The mask is chosen
gradually (the default, as in the paper and the authors' release): over the first ``gradual_steps`` iterations the
sparsity rises as s · (1 − (1 − t / T)³) and each step prunes the smallest |V + U| (the paper's cubic schedule); or
it is Wanda's (|W| · ‖X‖, in the method's group), fixed from the start (``selection="wanda"``). Why the gradual
mask is the default: docs/admm-investigation.md (at 2:4 Wanda's fixed mask leaves ADMM about level with SparseGPT).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ...core.errors import BadInput
from ...core.validation import check_choice, check_number
from ..masks import SparsityTarget, lowest_mask, nm_mask, select_mask
from .base import HESSIAN, Method, check_group

SELECTIONS = ("wanda", "gradual")  # how the mask is chosen


@dataclass(frozen=True)
class AdmmSettings:
    """How ``admm_update`` solves (05-Recover): the mask's comparison ``group`` ("row" or "layer"), the number of
    ``iterations``, the penalty ρ and its growth per iteration (1: constant), the iterations of the gradual mask
    (0: Wanda's mask) and the Hessian's ``dampening`` (a share of its mean scaled diagonal)."""

    group: str = "row"
    iterations: int = 20
    rho: float = 1.0
    rho_growth: float = 1.0
    gradual_steps: int = 15
    dampening: float = 0.1


def scaled_problem(weight: torch.Tensor, hessian: torch.Tensor, dampening: float):
    """(scale (in,), scaled weight W₀ (out, in), scaled and dampened H (in, in), undampened scaled H), all float32.
    Inputs that were never active (H_jj = 0) get scale 1 and zero weights, as SparseGPT gives them."""
    h = hessian.detach().float()
    dead = h.diagonal() <= 0
    scale = torch.where(dead, torch.ones_like(h.diagonal()), h.diagonal().clamp_min(0).sqrt())
    w0 = weight.detach().float().to(h.device) * scale
    w0[:, dead] = 0
    hs = h / scale[:, None] / scale[None, :]
    hs[dead, dead] = 1
    damped = hs.clone()
    damped.diagonal().add_(dampening * damped.diagonal().mean())
    return scale, w0, damped, hs


def objective(w0: torch.Tensor, z: torch.Tensor, hs: torch.Tensor) -> float:
    """½ tr((Z − W₀) H (Z − W₀)ᵀ): the squared output error ‖X Wᵀ − X Ẑᵀ‖² in the scaled problem (H = 2 XᵀX)."""
    delta = z - w0
    return float(0.5 * ((delta @ hs) * delta).sum())


def gradual_mask(v: torch.Tensor, target: SparsityTarget, group: str, fraction: float) -> torch.Tensor:
    """Pruned mask (True = pruned) of ``fraction`` of the target's pruning, smallest |v| first: unstructured, that
    share of the target sparsity in the method's group; N:M, that share of the weights N:M would prune, chosen
    over the whole matrix among those the N:M mask of |v| prunes."""
    score = v.abs()
    if target.is_nm:
        full = nm_mask(score, target.n, target.m)
        k = int(round(fraction * int(full.sum())))
        return lowest_mask(score.masked_fill(~full, float("inf")).reshape(1, -1), k).reshape(score.shape)
    return select_mask(score, SparsityTarget(sparsity=target.sparsity * fraction), group)


def admm_update(weight: torch.Tensor, hessian: torch.Tensor, pruned: torch.Tensor | None, target: SparsityTarget,
                settings: AdmmSettings | None = None, *,
                trace: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight in float32, pruned mask) for weight (out, in) and hessian (in, in); the weight is not modified.

    pruned: a fixed mask (True = pruned) to update the weights for, or None to choose one: Wanda's when
    ``settings.gradual_steps`` is 0, else gradually. ``settings``: ``AdmmSettings()`` when None. ``trace``, if
    given, receives one (objective, ‖V − Z‖ / ‖Z‖) per iteration (the objective of Z, undampened)."""
    settings = AdmmSettings() if settings is None else settings
    scale, w0, damped, hs = scaled_problem(weight, hessian, settings.dampening)
    if pruned is None and settings.gradual_steps == 0:
        pruned = select_mask(w0.abs(), target, settings.group)  # |W| · ‖X‖: Wanda's score
    fixed = pruned.to(w0.device) if pruned is not None else None
    rhs = w0 @ damped  # W₀ H, (out, in)
    solve = _inverse_solver(damped, settings.rho, settings.rho_growth)
    v, u = w0.clone(), torch.zeros_like(w0)
    mask, penalty = fixed, settings.rho
    for step in range(settings.iterations):
        if fixed is None and step < settings.gradual_steps:
            mask = gradual_mask(v + u, target, settings.group, 1 - (1 - (step + 1) / settings.gradual_steps) ** 3)
        z = (v + u).masked_fill_(mask, 0)
        u += v - z
        v = solve(rhs + penalty * (z - u), penalty)
        if settings.rho_growth != 1.0:  # U is the dual scaled by 1/ρ: rescale it with ρ
            u *= 1 / settings.rho_growth
            penalty *= settings.rho_growth
        if trace is not None:
            trace.append((objective(w0, z, hs), float((v - z).norm() / z.norm().clamp_min(1e-30))))
    if mask is None:  # no iterations: the mask alone
        mask = gradual_mask(w0, target, settings.group, 1.0)
    z = (v + u).masked_fill_(mask, 0)
    return z / scale, mask


def _inverse_solver(damped: torch.Tensor, rho: float, growth: float):
    """(x, ρ) ↦ x (H + ρ I)⁻¹: one inverse when ρ is constant, else one eigendecomposition for every ρ."""
    if growth == 1.0:
        eye = torch.eye(damped.shape[0], device=damped.device)
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped + rho * eye))
        return lambda x, penalty: x @ inverse
    values, vectors = torch.linalg.eigh(damped)
    return lambda x, penalty: ((x @ vectors) / (values + penalty)) @ vectors.T


def prune(linear: nn.Linear, hessian: torch.Tensor, target: SparsityTarget, selection: str,
          **settings: float | str) -> torch.Tensor:
    """The registry's entry: ``settings`` are ``AdmmSettings``' fields as ``METHOD.params`` holds them (whole
    numbers may come as floats from the command line)."""
    given = AdmmSettings(**settings)
    steps = int(given.gradual_steps) if selection == "gradual" else 0
    solver = replace(given, iterations=int(given.iterations), gradual_steps=steps)
    new_weight, pruned = admm_update(linear.weight, hessian.to(linear.weight.device), None, target, solver)
    with torch.no_grad():
        linear.weight.copy_(new_weight.to(linear.weight.dtype))
    return pruned


def check(params: dict) -> None:
    check_choice("ADMM selection", params["selection"], SELECTIONS)
    check_group(params)
    for name, low, high in (("iterations", 0, 10000), ("gradual_steps", 1, 10000)):
        value = params[name]
        check_number(f"ADMM {name}", value, low, high, allowed=f"a whole number in [{low}, {high}]")
        if not float(value).is_integer():
            raise BadInput(f"ADMM {name} must be a whole number in [{low}, {high}]; got {value!r}")
    if params["selection"] == "gradual" and params["gradual_steps"] > params["iterations"]:
        raise BadInput(f"ADMM gradual_steps ({params['gradual_steps']}) must not exceed iterations "
                       f"({params['iterations']}): the mask must be final before the last iteration")
    check_number("ADMM rho", params["rho"], 0, 1e6, interval="(]", allowed="a number in (0, 1e6]")
    check_number("ADMM rho_growth", params["rho_growth"], 1, 10, allowed="a number in [1, 10] (1: constant ρ)")
    check_number("ADMM dampening", params["dampening"], 0, 10,
                 allowed="a number in [0, 10], a share of the mean scaled Hessian diagonal (the authors use 0.1)")


METHOD = Method("admm", HESSIAN, prune, "a mask chosen gradually (or Wanda's), weights solved by ADMM",
                {"selection": "gradual", **asdict(AdmmSettings())}, check)
