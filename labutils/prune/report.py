"""What ``prune_model`` did (02-Prune): one row per pruned linear, the weights left dense and why, the times and
the mask fingerprint (``PruneReport``; ``report.json``'s "prune" part)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import nn

from ..core.anatomy import find_routers
from .spec import PruneSpec


@dataclass
class SublayerReport:
    """One pruned linear (or routed expert's matrix) of one decoder layer: its shape and how much was pruned."""

    layer: int
    sublayer: str
    out_features: int
    in_features: int
    pruned: int
    sparsity: float
    tokens: int | None = None  # a routed expert's: calibration tokens its router sent to it (0: pruned by |W|)


@dataclass
class DenseReport:
    """A weight matrix of a decoder layer that was left dense on purpose, and why."""

    layer: int
    weight: str
    shape: tuple[int, ...]
    reason: str


ROUTER_REASON = "router: weighs the experts for each token; never pruned"


@dataclass
class PruneReport:
    """What ``prune_model`` did: the spec it ran, one row per pruned linear, the times and the mask fingerprint."""

    spec: PruneSpec
    nsamples: int = 0
    seqlen: int = 0
    layer_sparsity: list[float] | None = None  # OWL: each layer's own sparsity
    outlier_ratios: list[float] | None = None  # OWL: what they were computed from
    low_memory: bool = False  # the model stayed in CPU memory; layers and activations visited ``device``
    device: str = ""  # where the layers computed
    seconds: float = 0.0  # wall time of the whole call
    method_seconds: float = 0.0  # time inside the method's score / mask / update, without forward passes
    layer_seconds: list[float] = field(default_factory=list)  # each layer's passes and pruning (GPU time on CUDA)
    sublayers: list[SublayerReport] = field(default_factory=list)
    left_dense: list[DenseReport] = field(default_factory=list)  # weights of decoder layers not pruned, and why
    mask_sha256: str = ""

    method = property(lambda self: self.spec.method)
    params = property(lambda self: dict(self.spec.params))
    true_sequential = property(lambda self: self.spec.true_sequential)
    label = property(lambda self: self.spec.label, doc='e.g. "wanda 50%", "magnitude + OWL 70%"')
    target = property(lambda self: self.spec.target.label, doc='the target\'s label: "50%", "2:4"')
    target_sparsity = property(lambda self: self.spec.target.fraction)

    nm = property(lambda self: self.spec.target.nm, doc="(n, m) of an N:M target, else None")

    @property
    def owl(self) -> dict | None:
        """OWL's parameters and the measured outlier ratios; None without OWL."""
        if self.spec.owl is None:
            return None
        return {**self.spec.to_dict()["owl"], "outlier_ratios": self.outlier_ratios}

    @property
    def measured_sparsity(self) -> float:
        """Share of pruned weights over all pruned linears (and experts)."""
        total = sum(s.out_features * s.in_features for s in self.sublayers)
        return sum(s.pruned for s in self.sublayers) / total if total else 0.0

    @property
    def empty_experts(self) -> list[str]:
        """"layers.{i}.{sublayer}" of every routed expert matrix that received no calibration token."""
        return [f"layers.{s.layer}.{s.sublayer}" for s in self.sublayers if s.tokens == 0]

    def to_frame(self) -> pd.DataFrame:
        """One row per pruned linear; the ``tokens`` column only when the model has routed experts."""
        frame = pd.DataFrame(self.records())
        return frame.astype({"tokens": "Int64"}) if "tokens" in frame else frame

    def records(self) -> list[dict]:
        """The sublayer rows as dicts (report.json); "tokens" only on routed experts' rows."""
        return [{k: v for k, v in asdict(s).items() if k != "tokens" or v is not None} for s in self.sublayers]

    def layer_table(self) -> pd.DataFrame:
        """One row per decoder layer: what was pruned (matrices: linears and routed experts' matrices, their weights,
        how many were pruned, experts that received no calibration token) and what was left dense, and why."""
        rows: dict[int, dict] = {}
        for s in self.sublayers:
            row = rows.setdefault(s.layer, {"matrices": 0, "weights": 0, "pruned": 0, "experts without tokens": 0,
                                            "left dense": ""})
            row["matrices"] += 1
            row["weights"] += s.out_features * s.in_features
            row["pruned"] += s.pruned
            row["experts without tokens"] += s.tokens == 0
        for d in self.left_dense:
            row = rows[d.layer]
            row["left dense"] = "; ".join(filter(None, [row["left dense"], f"{d.weight} ({d.reason})"]))
        frame = pd.DataFrame.from_dict(rows, orient="index").rename_axis("layer")
        frame.insert(3, "sparsity", frame["pruned"] / frame["weights"])
        return frame


def routers_left_dense(layer: nn.Module, index: int) -> list[DenseReport]:
    """One row per weight matrix of the layer's routers (never pruned)."""
    return [DenseReport(index, f"{name}.{param_name}", tuple(param.shape), ROUTER_REASON)
            for name, router in find_routers(layer).items()
            for param_name, param in router.named_parameters() if param.dim() > 1]


def sublayer_reports(pruned: list[tuple[int, str, torch.Size, torch.Tensor, int | None]]) -> list[SublayerReport]:
    """One row per pruned linear; the counts cross from the device in one sync."""
    if not pruned:
        return []
    counts = torch.stack([count for _, _, _, count, _ in pruned]).tolist()
    return [SublayerReport(i, name, *shape, n, n / shape.numel(), tokens)
            for (i, name, shape, _, tokens), n in zip(pruned, counts)]
