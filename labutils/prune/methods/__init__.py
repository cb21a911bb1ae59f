"""The method registry. Adding a method is one module in this folder plus one line in ``REGISTRY``.

Each method turns one linear's weight and its calibration statistic into pruned weights; the layer-by-layer
driver in ``labutils.prune.driver`` is shared by all of them.
"""
from ...core.errors import BadInput
from . import admm, magnitude, ria, sparsegpt, wanda
from .admm import admm_update
from .base import Method
from .magnitude import magnitude_score
from .ria import ria_score
from .sparsegpt import output_error, sparsegpt_weights
from .wanda import wanda_score

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        magnitude.METHOD,
        wanda.METHOD,
        sparsegpt.METHOD,
        ria.METHOD,
        admm.METHOD,
    )
}


METHODS = tuple(REGISTRY)


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    if name not in REGISTRY:
        raise BadInput(f"unknown method {name!r}; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["METHODS", "REGISTRY", "Method", "admm_update", "get_method", "magnitude_score", "output_error", "ria_score",
           "sparsegpt_weights", "wanda_score"]
