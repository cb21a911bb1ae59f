"""The masks' one vocabulary and one home for bit packing (issue H2, item 1): ``core.sparse.bits`` packs every mask
(kept bits, N:M position numbers, the mask fingerprint's zeros) byte for byte as the code before the refactor did —
the SHA-256 values below were computed with that code — and ``KeptMasks`` collects the driver's masks layer by
layer (what ``KeptBits`` did) and records them on the model."""
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny, random_tokens

import labutils as lu
from labutils.core.sparse.bits import (
    KeptMasks,
    pack_fields,
    pack_mask,
    pack_mask_numpy,
    pack_mask_torch,
    record_kept,
    unpack_fields,
    unpack_mask,
)
from labutils.core.sparse.files import read_sparse_folder, write_sparse

# SHA-256 of the packed bytes of the masks ``seeded_masks`` draws, as the torch and the numpy packer packed them
# before the refactor (commit 8e28f77, when they lived in prune/sparsity and core/kept_masks).
PACKED_SHA256 = {
    (7,): "281c93990bac2c69cf372c9a3b66c406c86cca826d6407b68e644da22eef8186",
    (3, 13): "102a6e0c49d920948ae1d119fe1f5024e195cccef8a14087078a80f4dc57a138",
    (16, 24): "141d6421489bfcd73d3aff218cc4f752816aeef8987eaafd37996eab8e2d03b2",
    (2, 5, 11): "af6e9aff8598d2f57bf2199addad266b9689ef3f2d5927cf19f34f7511a80582",
}
# SHA-256 of the sparse file ``write_sparse`` wrote for ``hand_made_state`` before the refactor (commit 8e28f77),
# and of the packed kept bits read back from it (the same for both layouts).
FILE_SHA256 = {None: "5f92efa30653de2ebcf6e185f380fc1660b4e9c94494af472173385e4d56694d",
               (2, 4): "8f632fab19ed4fdd1b83b41d2f6edddc512906b4bbb67473896db16c5c3220d7"}
DECODED_SHA256 = "a463fb3e9544d6efc792845bcee53cbccecd0b139ef3a7c2f84c39ca942261f2"


def seeded_masks() -> dict[tuple[int, ...], torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return {shape: torch.rand(shape, generator=gen) < 0.37 for shape in PACKED_SHA256}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_packing_gives_the_bytes_it_gave_before_the_refactor():
    for shape, mask in seeded_masks().items():
        expected = np.packbits(mask.reshape(-1).numpy()).tobytes()
        for pack in (pack_mask, pack_mask_numpy, pack_mask_torch):
            packed = pack(mask)
            assert packed.dtype == torch.uint8 and packed.shape == (-(-mask.numel() // 8),), (pack.__name__, shape)
            assert packed.numpy().tobytes() == expected, (pack.__name__, shape)
        assert sha256(expected) == PACKED_SHA256[shape], shape
        unpacked = unpack_mask(pack_mask(mask).numpy(), mask.numel())
        assert unpacked.dtype == np.bool_ and np.array_equal(unpacked, mask.reshape(-1).numpy())


@pytest.mark.parametrize("numbers, width, expected", [
    ([0, 5, 3, 7, 1, 2, 6], 3, [21, 242, 176]),  # 2:4: 000 101 011 111 001 010 110, then zeros to a whole byte
    ([0, 127, 64, 1, 33], 7, [1, 254, 0, 20, 32]),  # 4:8
])
def test_position_numbers_pack_most_significant_bit_first(numbers, width, expected):
    packed = pack_fields(torch.tensor(numbers), width)
    assert packed.tolist() == expected
    assert unpack_fields(packed.numpy(), len(numbers), width).tolist() == numbers


def hand_made_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state, kept masks): a bitmask weight, a 2:4 one, a float16 4:8 one, an unpruned tensor and a tied alias."""
    gen = torch.Generator().manual_seed(7)
    w = torch.rand((6, 16), generator=gen) - 0.5
    kept_w = torch.rand((6, 16), generator=gen) < 0.4
    v = torch.rand((4, 16), generator=gen) - 0.5
    order = torch.rand((4, 4, 4), generator=gen).argsort(-1)
    kept_v = torch.zeros(4, 4, 4, dtype=torch.bool).scatter_(-1, order[..., :2], True).reshape(4, 16)
    u = (torch.rand((3, 16), generator=gen) - 0.5).to(torch.float16)
    order = torch.rand((3, 2, 8), generator=gen).argsort(-1)
    kept_u = torch.zeros(3, 2, 8, dtype=torch.bool).scatter_(-1, order[..., :4], True).reshape(3, 16)
    w, v, u = w * kept_w, v * kept_v, u * kept_u
    state = {"a.weight": w, "b.weight": v, "c.weight": u, "norm": torch.rand(5, generator=gen), "tied": w}
    return state, {"a.weight": kept_w, "b.weight": kept_v, "c.weight": kept_u}


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["bitmask", "2:4"])
def test_sparse_file_is_byte_identical_to_the_one_before_the_refactor(nm, tmp_path):
    state, kept = hand_made_state()
    write_sparse(tmp_path / "sparse-model.safetensors", state, kept, nm)
    assert sha256((tmp_path / "sparse-model.safetensors").read_bytes()) == FILE_SHA256[nm]
    decoded, packed, _, _ = read_sparse_folder(tmp_path)
    assert sha256(b"".join(packed[k].numpy().tobytes() for k in sorted(packed))) == DECODED_SHA256
    for name, mask in kept.items():
        assert torch.equal(decoded[name], state[name]) and torch.equal(packed[name], pack_mask(mask)), name


def test_kept_masks_collects_layers_and_pops_them_on_the_host():
    model = make_tiny()
    layer = lu.find_decoder_layers(model)[0]
    linears = lu.find_linears(layer)
    gen = torch.Generator().manual_seed(0)
    pruned = {name: torch.rand(lin.weight.shape, generator=gen) < 0.5 for name, lin in linears.items()}
    masks = KeptMasks()
    masks.add_layer("model.layers.0", layer, linears, pruned)
    name = "mlp.up_proj"
    assert set(masks.packed) == {f"model.layers.0.{n}.weight" for n in linears}
    assert torch.equal(masks.kept(f"model.layers.0.{name}.weight"), ~pruned[name])  # kept = ~pruned
    one = masks.pop_layer("model.layers.0")
    assert not masks.packed and not masks.shapes and set(one.packed) == {f"{n}.weight" for n in linears}
    assert all(bits.device.type == "cpu" for bits in one.packed.values())
    assert torch.equal(one.kept(f"{name}.weight"), ~pruned[name])


def test_record_keeps_what_every_pruning_kept_and_the_pattern_only_if_all_had_it():
    model, shape = torch.nn.Linear(4, 6), (6, 4)
    first = torch.tensor([True, False] * 12).reshape(shape)
    second = torch.tensor([True, True, False] * 8).reshape(shape)
    record_kept(model, KeptMasks({"weight": pack_mask(first)}, {"weight": shape}, (2, 4)))
    assert lu.kept_masks(model).nm == (2, 4)
    record = record_kept(model, KeptMasks({"weight": pack_mask(second)}, {"weight": shape}, None))
    assert record is lu.kept_masks(model) and record.nm is None
    assert torch.equal(record.kept("weight"), first & second)


def test_the_driver_records_the_kept_masks_it_applied():
    model = make_tiny()
    lu.prune_model(model, lu.PruneSpec("magnitude", 0.5), random_tokens((2, 8)), progress=False)
    record = lu.kept_masks(model)
    state = model.state_dict()
    assert record.packed and record.nm is None
    for name in record.packed:  # random weights hold no exact zero: kept is exactly non-zero
        assert record.packed[name].numpy().tobytes() == np.packbits((state[name] != 0).reshape(-1).numpy()).tobytes()


def test_bit_packing_lives_in_one_module():
    root = Path(lu.__file__).parent
    calls = {str(p.relative_to(root)) for p in root.rglob("*.py") if re.search(r"np\.(un)?packbits\(", p.read_text())}
    assert calls == {"core/sparse/bits.py"}


def test_the_driver_packs_on_a_gpu_as_on_the_cpu(monkeypatch):
    """On a GPU the kept bits are packed by torch where the layer computes: forced here on the CPU, the record is
    byte for byte the numpy one."""
    from labutils.core.sparse import bits
    spec, tokens = lu.PruneSpec("wanda", "2:4"), random_tokens((2, 8))
    a, b = make_tiny(), make_tiny()
    lu.prune_model(a, spec, tokens, progress=False)
    monkeypatch.setattr(bits, "pack_mask_numpy", lambda mask: pytest.fail("packed by numpy"))
    monkeypatch.setattr(bits, "pack_mask", pack_mask_torch)
    lu.prune_model(b, spec, tokens, progress=False, fingerprint=False)
    ka, kb = lu.kept_masks(a), lu.kept_masks(b)
    assert ka.nm == kb.nm == (2, 4) and ka.packed.keys() == kb.packed.keys()
    assert all(torch.equal(ka.packed[n], kb.packed[n]) and kb.packed[n].device.type == "cpu" for n in ka.packed)


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 5), (13, 7), (2, 3, 5), (77, 36)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_pack_bits_is_numpys_packbits(shape, density):
    bits = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) < density
    packed = pack_mask_torch(bits)
    assert packed.dtype == torch.uint8
    np.testing.assert_array_equal(packed.numpy(), np.packbits(bits.numpy()))
