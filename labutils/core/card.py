"""The model card of a saved pruned model: ``README.md`` in its folder, with the metadata block the Hugging Face Hub
reads (base model, licence, tags), what was done, what it measured, and how to load it (02-Prune).
"""
from __future__ import annotations

import re
from pathlib import Path

from .sparse.files import SPARSE_FILE, SPARSE_INDEX

CARD_FILE = "README.md"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def folder_card_fields(folder: str | Path) -> dict[str, str]:
    """``license`` and ``base_model`` from the metadata block of a model folder's README.md, where it has them."""
    card = Path(folder).expanduser() / CARD_FILE
    text = card.read_text(errors="replace") if card.is_file() else ""
    block = re.match(r"^---\n(.*?)\n---", text, re.S)
    fields = {}
    for line in block.group(1).splitlines() if block else ():
        key, _, value = line.partition(":")
        if key.strip() in ("license", "base_model") and value.strip():
            fields[key.strip()] = value.strip().strip("'\"")
    return fields


def model_card(report: dict, disk: dict, folder: str = "THIS_FOLDER") -> str:
    """The README.md of a saved model from its report (whatever it holds), its ``disk`` sizes and the folder it
    was saved to (for the loading snippets)."""
    base, licence = report.get("base_model"), report.get("license") or "unknown"
    front = ["---", *([f"base_model: {base}"] if base and HUB_ID.match(base) else []), f"license: {licence}",
             "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", *[f"- {t}" for t in ("pruned", "sparse", report.get("method") or "pruning", "wanda-lab")], "---"]
    label = report.get("label") or "pruned"
    lines = [*front, "", f"# {base or report.get('model') or 'A model'} — {label}", ""]
    if report.get("quality_warning"):
        lines += [f"**Warning:** {report['quality_warning']}", ""]
    lines += ["Pruned with the Wanda pruning lab (Sun et al. 2023, arXiv 2306.11695, and the baselines it compares "
              "with). Every weight it removed is exactly zero; embeddings, norms and the output head are dense.", "",
              "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in _facts(report, disk)], ""]
    lines += [line.replace("THIS_FOLDER", folder) for line in _how_to_load(disk.get("format", "dense"))]
    lines += ["", "## Licence", "",
              f"These weights are derived from {base or 'the base model'} and are under its licence: {licence}."
              if licence != "unknown" else
              "The lab does not know the base model's licence: check it before you share these weights."]
    return "\n".join(lines) + "\n"


def _facts(report: dict, disk: dict) -> list[tuple[str, str]]:
    model = report.get("model")
    facts = [("base model", report.get("base_model") or model),
             ("weights pruned", model if model and model != report.get("base_model") else None),
             ("method", report.get("method")),
             ("parameters", ", ".join(f"{k}={v}" for k, v in (report.get("params") or {}).items()) or None),
             ("target", report.get("target"))]
    if isinstance(report.get("measured_sparsity"), float):
        facts.append(("measured sparsity", f"{report['measured_sparsity']:.2%} of the pruned linears' weights"))
    if report.get("nsamples"):
        source = report.get("calibration")
        facts.append(("calibration", f"{report['nsamples']} windows × {report.get('seqlen')} tokens, seed "
                                     f"{report.get('seed')}" + (f", from {source}" if source not in (None, "wiki")
                                                                else "")))
    ppl = report.get("perplexity") or {}
    if "dense" in ppl and "pruned" in ppl:
        facts.append(("perplexity, dense → pruned", f"{ppl['dense']:.3f} → {ppl['pruned']:.3f} "
                                                     f"({report.get('eval_tokens')} test tokens)"))
    if report.get("quant") and "quantized" in ppl:
        facts.append(("quantized", f"{report['quant']} (llama.cpp's blocks of 32; linears and embedding), "
                                   f"perplexity {ppl['quantized']:.3f}"))
    if disk:
        files = (f"{SPARSE_INDEX} and {disk['shards']} shards" if disk.get("shards") else
                 SPARSE_FILE if disk["format"] == "sparse" else "model.safetensors")
        facts.append(("saved as", f"{disk['format']} ({files})"))
        for part in ("model", "pruned linears"):
            dense, sparse = disk[part]["dense"], disk[part]["sparse"]
            facts.append((f"bytes, {part}", f"dense {dense:,}, sparse {sparse:,} ({sparse / dense:.1%})"
                          if dense else "none"))
    return [(k, str(v)) for k, v in facts if v is not None]


def _how_to_load(fmt: str) -> list[str]:
    lines = ["## How to load", ""]
    if fmt == "sparse":
        return lines + ["The weights are in the lab's sparse format (kept values and their masks; the lab's README "
                        "gives the layout and a numpy decoder). With the lab installed:", "", "```python",
                        "import labutils as lu", "model, tokenizer, report = lu.load_pruned(\"THIS_FOLDER\")", "```", "",
                        "For tools that know nothing of the lab (transformers' `from_pretrained`, vLLM, llama.cpp's "
                        "converter), write an ordinary dense copy first:", "", "```bash",
                        "python -m labutils export THIS_FOLDER THIS_FOLDER-dense", "```"]
    return lines + ["An ordinary transformers folder:", "", "```python",
                    "from transformers import AutoModelForCausalLM, AutoTokenizer",
                    "model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\")",
                    "tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\")", "```", "",
                    "or `lu.load_pruned(\"THIS_FOLDER\")` with the lab installed."]
