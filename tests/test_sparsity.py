"""The masks' fingerprint (prune/sparsity.py): one digest whatever the device, packed where the masks are and copied
once, left to the caller when asked."""
import hashlib

import numpy as np
import pytest
import torch
from conftest import make_tiny

import labutils as lu
from labutils.core.sparse.bits import pack_mask_torch
from labutils.prune import driver, sparsity
from labutils.prune.sparsity import prunable_linears


def reference_mask_sha256(model) -> str:
    """The fingerprint as it was first written: one numpy ``packbits`` per linear, on the host."""
    digest = hashlib.sha256()
    for name, lin in prunable_linears(model).items():
        zeros = (lin.weight.detach() == 0).cpu().numpy()
        digest.update(f"{name}:{zeros.shape}".encode())
        digest.update(np.packbits(zeros).tobytes())
    return digest.hexdigest()


def odd_model():
    """Linears whose sizes are not multiples of 8 (30 × 30, 10 × 30, 77 × 30 …) with random zeros: no linear ends on a
    byte boundary."""
    model = make_tiny(hidden_size=30, intermediate_size=77, num_attention_heads=3, num_key_value_heads=1)
    gen = torch.Generator().manual_seed(3)
    for lin in prunable_linears(model).values():
        lin.weight.data[torch.rand(lin.weight.shape, generator=gen) < 0.5] = 0
    return model


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: packing on the device, "
                                "pinned memory, streams")


def test_mask_sha256_is_the_reference_digest_in_one_transfer(monkeypatch):
    model = odd_model()
    expected = reference_mask_sha256(model)
    assert lu.mask_sha256(model) == expected
    # The device path (what runs on a GPU): packed by torch, then one copy to the host for all linears.
    monkeypatch.setattr(sparsity, "pack_mask", pack_mask_torch)
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(t.shape) or real_cpu(t, *a, **k))
    assert lu.mask_sha256(model) == expected
    assert len(copies) == 1 and len(prunable_linears(model)) == 14


def test_prune_model_can_leave_the_fingerprint_to_the_caller(monkeypatch, calib_tokens):
    a, b = make_tiny(), make_tiny()
    spec = lu.PruneSpec("wanda", 0.5)
    full = lu.prune_model(a, spec, calib_tokens, progress=False)
    assert full.mask_sha256 == reference_mask_sha256(a)
    monkeypatch.setattr(driver, "mask_sha256", lambda model: pytest.fail("hashed although fingerprint=False"))
    bare = lu.prune_model(b, spec, calib_tokens, progress=False, fingerprint=False)
    assert bare.mask_sha256 == "" and lu.mask_sha256(b) == full.mask_sha256


@needs_cuda
def test_gpu_mask_sha256_packs_on_the_device_to_the_same_digest():
    model = odd_model()
    expected = reference_mask_sha256(model)
    assert lu.mask_sha256(model.to("cuda")) == expected


def test_fingerprint_must_be_a_flag(tiny_model, calib_tokens):
    with pytest.raises(lu.BadInput, match="fingerprint must be True or False; got 'no'"):
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", 0.5), calib_tokens, progress=False, fingerprint="no")
