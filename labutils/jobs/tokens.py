"""What every pruning job does once its model (whole, or a skeleton streamed from disk) is there: check it against
the profile and the spec, then make the test and calibration tokens."""
from __future__ import annotations

import torch

from ..core import data
from ..core.anatomy import check_seqlen
from ..core.config import Profile
from ..core.sources import CalibrationSourceSpec
from ..prune.driver import check_prunable
from ..prune.spec import PruneSpec


def job_tokens(profile: Profile, spec: PruneSpec, model, tokenizer, seed: int,
               calibration: CalibrationSourceSpec | str = "wiki") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(test tokens (N,), calibration tokens (nsamples, seqlen) from the ``calibration`` source, or None when the
    method needs none), after refusing windows longer than the model takes and an N:M that some input size cannot
    hold."""
    check_seqlen(model, "seqlen", profile.seqlen)
    check_seqlen(model, "eval seqlen", profile.eval_seqlen)
    check_prunable(model, spec.target)
    vocab = model.config.vocab_size
    test = data.test_tokens(profile, tokenizer, profile.eval_tokens, vocab_size=vocab, seed=seed)
    calib = None
    if spec.needs_calibration:
        calib = data.calibration_data(profile, tokenizer, profile.nsamples, profile.seqlen, seed, vocab_size=vocab,
                                      source=calibration)
    return test, calib
