"""08-Deploy's measurements: the engine table (PyTorch against llama.cpp at 16 and 4 bits, on the lab's own test
windows and one fixed prompt) and the deployment checklist of the lab description (section 8.3), each item measured.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..core.errors import BadInput
from ..core.validation import check_choice, check_positive_int
from ..deploy.engine import decode_speeds, default_threads, gguf_generate, gguf_perplexity
from ..deploy.gguf import QUANTS, export_gguf
from ..deploy.loadtest import LoadTestResult
from ..evaluate.generation import repeated_ngram_ratio
from ..evaluate.perplexity import perplexity
from ..speed.latency import latency_table, random_token_ids

PYTORCH, LLAMA_CPP = "PyTorch", "llama.cpp"
PERPLEXITY_TOLERANCE = 0.005  # llama.cpp at f16 against PyTorch at float32, same windows: measured ≤ 0.02 %
MEMORY_GROWTH = 0.05  # "flat": the server's memory at the end of a load test within 5 % of its start


@dataclass(frozen=True)
class DeploySettings:
    """Where 08-Deploy writes its GGUF files, the test windows' length, the quantizations compared, and the fixed
    prompt (``prompt_len`` random ids, seed 0) each engine decodes ``new_tokens`` after, ``repeats`` times."""

    out: str
    eval_seqlen: int
    quants: tuple[str, ...] = ("f16", "q4_0")
    prompt_len: int = 64
    new_tokens: int = 64
    repeats: int = 3
    threads: int | None = None

    def __post_init__(self) -> None:
        for quant in self.quants:
            check_choice("quant", quant, QUANTS)
        for name in ("eval_seqlen", "prompt_len", "new_tokens", "repeats"):
            check_positive_int(name, getattr(self, name))


def gguf_files(sources: dict[str, str | os.PathLike], settings: DeploySettings) -> dict[tuple[str, str], Path]:
    """{(label, quant): file}: every source (a lab output folder, or "default" for the embedded dense model)
    exported to GGUF at every quantization of ``settings``, into ``settings.out``."""
    files = {}
    for label, source in sources.items():
        for quant in settings.quants:
            slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
            files[label, quant] = export_gguf(source, Path(settings.out) / f"{slug}-{quant}.gguf", quant)
    return files


def pytorch_rows(models: dict[str, nn.Module], test: torch.Tensor, settings: DeploySettings,
                 progress: bool = True) -> pd.DataFrame:
    """The PyTorch rows of the engine table: each model (float32) with its parameter bytes, its perplexity on
    ``test`` (``lu.perplexity``) and the speed of greedy decoding after ``settings``' fixed prompt
    (``lu.latency_table``), on ``settings.threads`` threads for this call only."""
    threads = settings.threads or default_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        speed = latency_table(models, prompt_len=settings.prompt_len, new_tokens=settings.new_tokens,
                              warmup=1, repeats=settings.repeats, progress=progress)
        rows = [{"engine": PYTORCH, "weights": "float32", "model": label,
                 "weights MB": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6,
                 "perplexity": perplexity(model, test, settings.eval_seqlen, progress=False),
                 "prefill tok/s": settings.prompt_len * 1e3 / speed.loc[label, "prefill ms P50"],
                 "decode tok/s": 1e3 / speed.loc[label, "decode ms/token P50"]} for label, model in models.items()]
    finally:
        torch.set_num_threads(before)
    return pd.DataFrame(rows).set_index(["engine", "weights", "model"])


def llama_cpp_rows(files: dict[tuple[str, str], Path], test: torch.Tensor, settings: DeploySettings,
                   vocab_size: int, progress: bool = True) -> pd.DataFrame:
    """The llama.cpp rows: each GGUF file of ``gguf_files`` with its bytes, its perplexity from llama.cpp's logits
    (``lu.gguf_perplexity``) and its decode speed after the same fixed prompt as ``pytorch_rows`` (``random_prompt``
    of ``vocab_size``), every file timed in rotated rounds (``lu.decode_speeds``)."""
    threads = settings.threads or default_threads()
    prompt = random_token_ids(vocab_size, settings.prompt_len)[0].tolist()
    ordered = sorted(files.items(), key=lambda item: settings.quants.index(item[0][1]))
    speeds = decode_speeds({f"{label} {quant}": path for (label, quant), path in ordered}, prompt,
                           settings.new_tokens, repeats=settings.repeats, threads=threads, progress=progress)
    rows = [{"engine": LLAMA_CPP, "weights": quant, "model": label, "weights MB": path.stat().st_size / 1e6,
             "perplexity": gguf_perplexity(path, test, settings.eval_seqlen, threads=threads, progress=False),
             "prefill tok/s": speeds[f"{label} {quant}"].prefill_tokens_per_s,
             "decode tok/s": speeds[f"{label} {quant}"].decode_tokens_per_s} for (label, quant), path in ordered]
    return pd.DataFrame(rows).set_index(["engine", "weights", "model"])


def engine_table(*parts: pd.DataFrame, dense: str = "dense") -> pd.DataFrame:
    """The engine table from ``pytorch_rows`` and ``llama_cpp_rows``: one row per (engine, weights, model), plus
    ``vs PyTorch`` (perplexity ÷ the same model's in PyTorch, − 1) and ``decode × dense`` (decode speed ÷ the
    ``dense`` model's on the same engine and weights)."""
    table = pd.concat(parts)
    pytorch = table.xs(PYTORCH, level="engine")["perplexity"].droplevel("weights")
    table["vs PyTorch"] = [row.perplexity / pytorch[model] - 1 for (_, _, model), row in table.iterrows()]
    table["decode × dense"] = [row["decode tok/s"] / table.loc[(engine, weights, dense), "decode tok/s"]
                               for (engine, weights, _), row in table.iterrows()]
    return table


def generation_table(files: dict[str, Path], texts: list[str], new_tokens: int = 32,
                     threads: int | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """Greedy continuations of ``texts`` by each GGUF model in llama.cpp ({label: file}): a table (one row per
    prompt, one column per model) and each model's share of repeated 3-grams (``repeated_ngram_ratio``: 0 never
    repeats, near 1 a loop)."""
    answers = {label: gguf_generate(path, texts, new_tokens, threads=threads) for label, path in files.items()}
    table = pd.DataFrame({label: [text for text, _ in out] for label, out in answers.items()},
                         index=pd.Index(texts, name="prompt"))
    return table, {label: repeated_ngram_ratio([ids for _, ids in out]) for label, out in answers.items()}


@dataclass
class DeployEvidence:
    """What 08-Deploy measured for the checklist: the engine table, the model served and its quantization, the
    sparsity measured in the served file and the target, the repeated-3-gram ratio of its generations and of the
    dense model's, the load test of the served model and the load test with a damaged pruned file."""

    engines: pd.DataFrame
    pruned: str
    quant: str
    sparsity: float
    target: float
    repeats: dict[str, float]
    load: LoadTestResult
    fallback: LoadTestResult
    sla: dict[str, float] = field(default_factory=lambda: {"p50 s": 5.0, "p95 s": 10.0})
    accuracy: float = 3.0  # allowed perplexity ÷ dense


def checklist(evidence: DeployEvidence, dense: str = "dense") -> pd.DataFrame:
    """The eight items of the lab description's deployment checklist, each with what was measured, what is
    required, and whether it passed."""
    e, table = evidence, evidence.engines
    row = table.loc[(LLAMA_CPP, e.quant, e.pruned)]
    dense_row = table.loc[(LLAMA_CPP, e.quant, dense)]
    load, fb = e.load.summary(), e.fallback.summary()
    growth = load["server MiB at end"] / load["server MiB at start"] - 1
    items = [
        ("accuracy", (f"perplexity {row.perplexity:.2f} vs dense {dense_row.perplexity:.2f} "
                      f"({row.perplexity / dense_row.perplexity:.2f}×)"), f"≤ {e.accuracy:g}× dense",
         row.perplexity / dense_row.perplexity <= e.accuracy),
        ("sparsity", f"{e.sparsity:.2%} zeros in the served file's linears", f"{e.target:.0%} ± 0.5 %",
         abs(e.sparsity - e.target) <= 0.005),
        ("output quality", f"repeated 3-grams {e.repeats[e.pruned]:.2f} (dense {e.repeats[dense]:.2f})",
         "≤ dense + 0.10", e.repeats[e.pruned] <= e.repeats[dense] + 0.10),
        ("sparse acceleration", f"decode {row['decode × dense']:.2f}× the dense model in llama.cpp {e.quant}",
         "≥ 1.10×", row["decode × dense"] >= 1.10),
        ("memory below dense", f"{row['weights MB']:.1f} MB of weights vs {dense_row['weights MB']:.1f} MB dense",
         f"< the dense model at {e.quant}", row["weights MB"] < dense_row["weights MB"]),
        ("latency SLA", f"P50 {load['p50 s']:.2f} s, P95 {load['p95 s']:.2f} s at {e.load.clients} clients",
         f"P50 ≤ {e.sla['p50 s']:g} s, P95 ≤ {e.sla['p95 s']:g} s",
         load["p50 s"] <= e.sla["p50 s"] and load["p95 s"] <= e.sla["p95 s"]),
        ("stress test", (f"{e.load.errors} errors, {e.load.not_sent} not sent of {e.load.requests}; memory "
                         f"{growth:+.1%} start → end"), f"0 errors, memory within ±{MEMORY_GROWTH:.0%}",
         e.load.errors == 0 and e.load.not_sent == 0 and abs(growth) <= MEMORY_GROWTH),
        ("fallback", f"damaged pruned file: {fb['answered by']}, {e.fallback.errors} errors",
         "every request answered by the dense model",
         e.fallback.errors == 0 and e.fallback.by_model == {dense: e.fallback.requests}),
    ]
    return pd.DataFrame(items, columns=["item", "measured", "required", "passed"]).set_index("item")


def damaged_copy(path: str | os.PathLike, out: str | os.PathLike, tensor: str = "blk.3.ffn_down.weight") -> Path:
    """A copy of the GGUF file ``path`` at ``out`` with every byte of one tensor set to 0xFF (a float16 NaN, and a
    garbage q4_0 block): a file that still loads but computes nonsense, as a bad disk or a broken export would give.
    08-Deploy serves it to see the fallback work."""
    import gguf

    found = [t for t in gguf.GGUFReader(path).tensors if t.name == tensor]
    if not found:
        raise BadInput(f"tensor {tensor!r} is not in {str(path)!r}")
    out = Path(out)
    out.write_bytes(Path(path).read_bytes())
    with open(out, "r+b") as f:
        f.seek(found[0].data_offset)
        f.write(b"\xff" * found[0].n_bytes)
    return out
