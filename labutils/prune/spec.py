"""What one pruning run does: method, target, the method's parameters, true-sequential, OWL (02-Prune, 04).

``PruneSpec`` is the one value every entry point takes: ``prune_model``, the command line (``from_cli``),
the main job, ``compare_methods`` and ``bench-prune``. It is validated when built, so every instance can run;
labels and folder names are computed from it, never parsed back.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import BadInput
from ..core.validation import check_flag, describe
from .masks import SparsityTarget, as_target
from .methods import REGISTRY, Method, get_method
from .owl import OwlConfig, check_owl_lambda

CLI_FLAGS = ("method", "sparsity", "nm", "owl", "owl_m", "owl_lambda", "true_sequential")
METHOD_FLAGS = tuple(dict.fromkeys(name for method in REGISTRY.values() for name in method.params))  # alpha, …


@dataclass(frozen=True)
class PruneSpec:
    """One pruning run: ``PruneSpec("wanda", 0.5)``, ``PruneSpec("wanda", "2:4")``,
    ``PruneSpec("ria", 0.5, params={"alpha": 0.5})``, ``PruneSpec("magnitude", 0.7, owl=OwlConfig())``.

    target: anything ``as_target`` takes (a SparsityTarget, 0.5, "50%", "2:4"), stored as a SparsityTarget.
    params: the method's parameters; stored complete, defaults filled in (``lu.get_method(name).params``).
    true_sequential: re-collect the statistics of o_proj and down_proj after the sublayers before them are pruned.
    owl: give each layer its own sparsity from its outlier ratio (unstructured targets only); True = OwlConfig().
    """

    method: str = "wanda"
    target: SparsityTarget | float | str = 0.5
    params: dict | None = field(default=None, hash=False)
    true_sequential: bool = False
    owl: OwlConfig | bool | None = None

    def __post_init__(self):  # frozen: normalise through object.__setattr__
        if not isinstance(self.method, str):
            raise BadInput(f"method must be a method's name, one of {', '.join(REGISTRY)}; got {describe(self.method)}")
        method = get_method(self.method)
        target = as_target(self.target)
        check_flag("true_sequential", self.true_sequential)
        owl = OwlConfig() if self.owl is True else (None if self.owl is False else self.owl)
        if owl is not None and not isinstance(owl, OwlConfig):
            raise BadInput(f"owl must be an OwlConfig, True or None; got {describe(self.owl)}")
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "params", method.resolve(self.params))
        object.__setattr__(self, "owl", owl)
        if self.true_sequential and not method.needs_calibration:
            raise BadInput(f"true-sequential mode re-collects calibration statistics; method {self.method!r} uses none")
        if owl is not None and target.is_nm:
            raise BadInput(f"OWL sets a different sparsity per layer and needs an unstructured target; "
                           f"got {target.label}")
        if owl is not None:
            check_owl_lambda(owl.lam, target.sparsity)

    @classmethod
    def from_cli(cls, flags: Mapping[str, Any]) -> PruneSpec:
        """The spec the command line's flags describe (``python -m labutils prune``): ``method``, ``sparsity`` or
        ``nm`` (neither: 50 %), the method's parameters (``alpha``, ``dampening``, ``blocksize``), ``owl`` with
        optional ``owl_m`` / ``owl_lambda``, ``true_sequential``. Missing or None flags take their defaults; other
        keys are not the spec's and are ignored."""
        sparsity, nm = flags.get("sparsity"), flags.get("nm")
        if sparsity is not None and nm is not None:
            raise BadInput(f"give one of --sparsity or --nm; got sparsity={sparsity!r}, nm={nm!r}")
        owl_m, owl_lambda = flags.get("owl_m"), flags.get("owl_lambda")
        if not flags.get("owl") and (owl_m is not None or owl_lambda is not None):
            raise BadInput("--owl-m and --owl-lambda set OWL's parameters; add --owl to use OWL")
        owl = None
        if flags.get("owl"):
            owl = OwlConfig(**{k: v for k, v in (("m", owl_m), ("lam", owl_lambda)) if v is not None})
        target = SparsityTarget.of(nm=nm) if nm is not None else SparsityTarget.of(
            sparsity=0.5 if sparsity is None else sparsity)
        params = {k: flags[k] for k in METHOD_FLAGS if flags.get(k) is not None}
        method = "wanda" if flags.get("method") is None else flags["method"]
        return cls(method, target, params, flags.get("true_sequential", False), owl)

    @property
    def runner(self) -> Method:
        """The registered method (``lu.get_method(self.method)``)."""
        return get_method(self.method)

    @property
    def needs_calibration(self) -> bool:
        """Whether the run needs calibration tokens: for the method's statistic, or for OWL's outlier ratios."""
        return self.runner.needs_calibration or self.owl is not None

    @property
    def changed_params(self) -> dict:
        """The method's parameters that differ from its defaults (they name the variant)."""
        return {k: v for k, v in self.params.items() if v != self.runner.params[k]}

    @property
    def variant(self) -> str:
        """The method and its options, without the target: "wanda", "wanda (true-sequential)", "magnitude + OWL",
        "ria (alpha=1)"."""
        changed = ", ".join(f"{k}={_short(v)}" for k, v in self.changed_params.items())
        variant = self.method + (f" ({changed})" if changed else "")
        variant += " (true-sequential)" if self.true_sequential else ""
        return variant + (" + OWL" if self.owl else "")

    @property
    def label(self) -> str:
        """The name of the pruned model in tables: e.g. "wanda 50%", "wanda (true-sequential) 2:4"."""
        return f"{self.variant} {self.target.label}"

    @property
    def slug(self) -> str:
        """The same in a folder name: "wanda-50", "wanda-ts-2-4", "magnitude-owl-70", "ria-alpha1-50"."""
        changed = "".join(f"-{k}{_short(v)}" for k, v in self.changed_params.items())
        variant = self.method + changed + ("-ts" if self.true_sequential else "") + ("-owl" if self.owl else "")
        return f"{variant}-{self.target.label.replace(':', '-').rstrip('%')}"

    def to_dict(self) -> dict:
        """The spec as plain values for a report: method, target, params, true_sequential, owl."""
        owl = None if self.owl is None else {"M": self.owl.m, "lambda": self.owl.lam}
        return {"method": self.method, "target": self.target.label, "params": dict(self.params),
                "true_sequential": self.true_sequential, "owl": owl}


def check_spec(value, name: str = "spec") -> PruneSpec:
    """``value`` if it is a PruneSpec, else BadInput naming ``name`` and what was given: the one check at every
    entry point that takes a spec."""
    if not isinstance(value, PruneSpec):
        raise BadInput(f"{name} must be a PruneSpec, e.g. lu.PruneSpec('wanda', 0.5); got {describe(value)}")
    return value


def _short(value) -> str:
    """A parameter's value in a label: 1.0 → "1", 0.05 → "0.05", "row" → "row"."""
    return value if isinstance(value, str) else f"{value:g}"
