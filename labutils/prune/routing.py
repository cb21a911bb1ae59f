"""Routed experts' statistics (mixture-of-experts models, 02-Prune): each expert sees only the tokens its router
sent to it.

A stacked-experts module holds every expert's weights as ``ExpertWeight`` slices, not modules, so no forward hook
can see an expert's inputs. A pre-hook on the experts module reads the router's choice instead and folds in, for
each expert, only the tokens sent to it: their hidden states for gate and up, and what its down projection reads
(``expert_hidden``) for down. That takes one host sync per expert and batch (an empty expert is skipped).
``statistics.collect_statistics`` gives an expert that received no token the statistic of inputs that favour no
feature.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..core.anatomy import ExpertWeight, expert_hidden


def routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states (tokens, hidden), chosen experts (tokens, top-k)) of a call to a stacked-experts module:
    ``experts(hidden_states, top_k_index, top_k_weights)``."""
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return hidden, index


class RoutedExperts:
    """Pre-hooks on the experts modules of ``linears``' routed experts (``ExpertWeight``) that add each batch's
    term (``term``: (tokens, in) → the statistic's shape) into ``stats[name]``, over the tokens routed to that
    expert; ``routed[name]`` counts those tokens. ``handles``: the hooks, for the caller to remove."""

    def __init__(self, linears: dict[str, nn.Linear | ExpertWeight], stats: dict[str, torch.Tensor],
                 term: Callable[[torch.Tensor], torch.Tensor]):
        self.stats, self._term = stats, term
        self.routed = {name: 0 for name, lin in linears.items() if isinstance(lin, ExpertWeight)}
        by_module: dict[int, tuple[nn.Module, dict[int, dict[str, str]]]] = {}
        for name, lin in linears.items():
            if isinstance(lin, ExpertWeight):
                _, experts = by_module.setdefault(id(lin.experts), (lin.experts, {}))
                experts.setdefault(lin.index, {})[lin.kind] = name
        self.handles = [module.register_forward_pre_hook(self._hook(experts), with_kwargs=True)
                        for module, experts in by_module.values()]

    def _hook(self, experts: dict[int, dict[str, str]]):
        """A pre-hook for one stacked-experts module; ``experts``: expert index → {kind: statistic name}."""
        def hook(module, args, kwargs):
            hidden, index = routing(args, kwargs)
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])
            index = index.reshape(hidden.shape[0], -1)
            for expert, names in experts.items():
                x = hidden[(index == expert).any(dim=1)]
                if x.shape[0] == 0:
                    continue
                for name in names.values():
                    self.routed[name] += x.shape[0]
                first = [names[k] for k in ("gate_proj", "up_proj") if k in names]
                if first:
                    term = self._term(x)
                    for name in first:
                        self.stats[name].add_(term)
                if "down_proj" in names:
                    self.stats[names["down_proj"]].add_(self._term(expert_hidden(module, expert, x)))
        return hook
