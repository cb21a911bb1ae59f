"""The calibration study of 06-Calibrate: how Wanda's result depends on its calibration windows.

Every run prunes a fresh copy of the dense model with the lab's own driver (``prune_model``, as the main job and
``--calibration`` do) from windows drawn by ``calibration_data`` — the same windows ``python -m labutils prune
--nsamples N --seqlen L --seed S --calibration SOURCE`` would use — and scores it on every held-out test set given
(Wikipedia leads, the standard library's held-out modules). Three families of runs:

- ``nsamples_runs``: the number of calibration windows, at a fixed window length, over several seeds (the seed picks
  which windows: for one seed, the first n of the 2n windows are the n windows, so the curve adds windows);
- ``seqlen_runs``: the window length at a fixed token budget (nsamples = budget / seqlen), so longer windows do not
  also mean more calibration tokens;
- ``domain_runs``: where the windows come from: "wiki", "code" or "mixed" (half each).

``CalibrationStudy`` keeps one table over all its runs (a run asked for twice is measured once), so a notebook can
grow it over several short cells; ``seed_spread`` summarises the seeds of each setting.
"""
from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.anatomy import check_seqlen
from ..core.config import Profile
from ..core.data import calibration_data
from ..core.errors import BadInput
from ..core.sources import check_calibration_source
from ..core.validation import check_model, check_number, check_positive_int, check_seed, describe
from ..evaluate.perplexity import perplexity
from ..prune.driver import prune_model
from ..prune.spec import PruneSpec

SETTING_COLUMNS = ["source", "nsamples", "seqlen", "seed"]  # what makes a run; the rest of a row is measured


@dataclass(frozen=True)
class CalibrationRun:
    """One calibration setting: ``nsamples`` windows of ``seqlen`` tokens from ``source`` (wiki, code, mixed or a
    folder), drawn with ``seed``."""

    source: str = "wiki"
    nsamples: int = 16
    seqlen: int = 128
    seed: int = 0

    def __post_init__(self):
        check_positive_int("nsamples", self.nsamples)
        check_positive_int("seqlen", self.seqlen)
        check_seed(self.seed)
        if not isinstance(self.source, str):
            raise BadInput(f"source must be wiki, code, mixed or a folder (a str); got {describe(self.source)}")

    @property
    def label(self) -> str:
        """"wiki 16×128 seed 0": the row's name in the study's table."""
        return f"{self.source} {self.nsamples}×{self.seqlen} seed {self.seed}"


def _ints(name: str, values: Sequence[int], check) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise BadInput(f"{name} must be a non-empty sequence of integers; got {describe(values)}")
    checked = tuple(check(name, v) for v in values)
    if len(set(checked)) != len(checked):
        raise BadInput(f"{name} must not repeat a value; got {list(checked)}")
    return checked


def _seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    return _ints("seeds", seeds, lambda name, v: check_seed(v))


def nsamples_runs(nsamples: Sequence[int], seeds: Sequence[int], seqlen: int = 128,
                  source: str = "wiki") -> list[CalibrationRun]:
    """Every number of windows in ``nsamples`` with every seed, at window length ``seqlen``; seed-major, so a
    notebook cell can take one seed."""
    counts = _ints("nsamples", nsamples, check_positive_int)
    return [CalibrationRun(source, n, seqlen, seed) for seed in _seeds(seeds) for n in counts]


def seqlen_runs(seqlens: Sequence[int], seeds: Sequence[int], token_budget: int,
                source: str = "wiki") -> list[CalibrationRun]:
    """Every window length in ``seqlens`` with every seed, each run ``token_budget`` tokens in all (nsamples =
    token_budget / seqlen, so each seqlen must divide it)."""
    lengths = _ints("seqlens", seqlens, check_positive_int)
    budget = check_positive_int("token_budget", token_budget)
    uneven = [s for s in lengths if budget % s]
    if uneven:
        raise BadInput(f"token_budget {budget} is not a whole number of windows of seqlen {uneven}; allowed: "
                       "seqlens that divide it")
    return [CalibrationRun(source, budget // s, s, seed) for seed in _seeds(seeds) for s in lengths]


def domain_runs(sources: Sequence[str], seeds: Sequence[int], nsamples: int = 16,
                seqlen: int = 128) -> list[CalibrationRun]:
    """Every calibration source in ``sources`` (wiki, code, mixed, a folder) with every seed, same size."""
    if isinstance(sources, str) or not isinstance(sources, Sequence) or not sources:
        raise BadInput(f"sources must be a non-empty sequence such as ('wiki', 'code', 'mixed'); got "
                       f"{describe(sources)}")
    return [CalibrationRun(s, nsamples, seqlen, seed) for seed in _seeds(seeds) for s in sources]


def windows_sha256(windows: torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of the windows' token ids (int64): the same on every machine."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


class CalibrationStudy:
    """Wanda at ``sparsity`` on fresh copies of ``dense`` (never modified), one run per calibration setting, each
    scored on every test set of ``tests`` (name → (N,) token ids, e.g. {"wiki": …, "code": …}).

    ``CalibrationStudy(profile, dense, tokenizer, tests)`` scores the dense model first (``dense_perplexity``);
    ``add(runs)`` measures the runs not measured yet, with one text progress bar, and returns their rows;
    ``table`` holds every run: its setting, ``windows`` (the SHA-256 of its calibration windows), ``seconds``
    (pruning alone) and ``perplexity (<test>)`` per test set.
    """

    def __init__(self, profile: Profile, dense: nn.Module, tokenizer, tests: Mapping[str, torch.Tensor],
                 sparsity: float = 0.5, progress: bool = True):
        self.dense, self.profile, self.tokenizer = check_model(dense), profile, tokenizer
        if not isinstance(tests, Mapping) or not tests:
            raise BadInput(f"tests must be a non-empty dict of test-set name → token ids; got {describe(tests)}")
        for name, tokens in tests.items():
            if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.numel() < profile.eval_seqlen:
                raise BadInput(f"tests[{name!r}] must be a 1-D tensor of at least eval_seqlen = "
                               f"{profile.eval_seqlen} token ids; got {describe(tokens)}")
        self.tests = dict(tests)
        self.spec = PruneSpec("wanda", check_number("sparsity", sparsity, 0, 1, interval="()"))
        self.progress = progress
        self.dense_perplexity = pd.Series({f"perplexity ({name})": self._score(dense, tokens)
                                           for name, tokens in self.tests.items()}, name="dense")
        self._rows: dict[str, dict] = {}

    @property
    def table(self) -> pd.DataFrame:
        """One row per run measured so far, in the order measured, indexed by ``CalibrationRun.label``."""
        columns = SETTING_COLUMNS + ["tokens", "windows", "seconds"] + list(self.dense_perplexity.index)
        return pd.DataFrame(list(self._rows.values()), columns=columns,
                            index=pd.Index(list(self._rows), name="run"))

    def add(self, runs: Sequence[CalibrationRun]) -> pd.DataFrame:
        """Prune and score every run of ``runs`` not in ``table`` yet; the rows of all of ``runs``. Every run is
        checked (source, sizes against the model) before the first is pruned."""
        if isinstance(runs, CalibrationRun) or not isinstance(runs, Sequence) or not runs:
            raise BadInput(f"runs must be a non-empty list of CalibrationRun; got {describe(runs)}")
        for run in runs:
            if not isinstance(run, CalibrationRun):
                raise BadInput(f"each of runs must be a CalibrationRun; got {describe(run)}")
            check_calibration_source(run.source, self.profile, run.nsamples)
            check_seqlen(self.dense, "seqlen", run.seqlen)
        todo = list(dict.fromkeys(r for r in runs if r.label not in self._rows))
        for run in tqdm(todo, desc="calibration runs", unit="run", disable=not self.progress):
            self._rows[run.label] = self._measure(run)
        return self.table.loc[list(dict.fromkeys(r.label for r in runs))]

    def _measure(self, run: CalibrationRun) -> dict:
        windows = calibration_data(self.profile, self.tokenizer, run.nsamples, run.seqlen, run.seed,
                                   vocab_size=self.dense.config.vocab_size, source=run.source)
        model = copy.deepcopy(self.dense)  # a fresh dense copy for every run
        start = time.perf_counter()
        prune_model(model, self.spec, windows, self.profile.batch_size, progress=False, fingerprint=False)
        row = {"source": run.source, "nsamples": run.nsamples, "seqlen": run.seqlen, "seed": run.seed,
               "tokens": windows.numel(), "windows": windows_sha256(windows),
               "seconds": time.perf_counter() - start}
        for name, tokens in self.tests.items():
            row[f"perplexity ({name})"] = self._score(model, tokens)
        return row

    def _score(self, model: nn.Module, tokens: torch.Tensor) -> float:
        return perplexity(model, tokens, self.profile.eval_seqlen, self.profile.batch_size, progress=False)


def seed_spread(table: pd.DataFrame, by: str | Sequence[str], column: str) -> pd.DataFrame:
    """``column`` of a study's ``table`` summarised over the seeds of each setting ``by`` (e.g. "nsamples", or
    ["source"]): runs, mean, std (sample, ddof 1; NaN for one run), min, max, and max ÷ min."""
    keys = [by] if isinstance(by, str) else list(by)
    missing = [c for c in keys + [column] if c not in table.columns]
    if missing:
        raise BadInput(f"seed_spread: no column {missing} in the table; it has {list(table.columns)}")
    grouped = table.groupby(keys, sort=True)[column]
    out = grouped.agg(runs="count", mean="mean", std="std", min="min", max="max")
    out["max ÷ min"] = out["max"] / out["min"]
    return out
