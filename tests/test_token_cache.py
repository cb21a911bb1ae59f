"""The tokenized corpus splits are kept on disk (``data.split_tokens``): a later process loads them instead of
tokenizing 3.9 MB of text again (seconds, and ~0.5 GB of memory while the tokenizer runs)."""
import numpy as np
import torch
from conftest import raiser
from transformers import AutoTokenizer

from labutils.core import data


def test_split_tokens_are_kept_on_disk_and_a_damaged_file_is_redone(tmp_path, monkeypatch, tiny_with_tokenizer):
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(data, "_TOKEN_CACHE", {})
    tokenizer = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
    fresh = torch.tensor(tokenizer(data.split_text("test"))["input_ids"])
    assert torch.equal(data.split_tokens(tokenizer, "test"), fresh)
    [path] = (tmp_path / "tokens").glob("test-*.npy")

    monkeypatch.setattr(data, "_TOKEN_CACHE", {})  # a new process: only the file remains
    with monkeypatch.context() as patched:
        patched.setattr(type(tokenizer), "__call__", raiser(AssertionError("tokenized again")))
        assert torch.equal(data.split_tokens(tokenizer, "test"), fresh)

    path.write_bytes(b"not numpy")
    monkeypatch.setattr(data, "_TOKEN_CACHE", {})
    assert torch.equal(data.split_tokens(tokenizer, "test"), fresh)  # tokenized again, and the file rewritten
    assert path.stat().st_size > 100


def test_token_ids_changed_in_range_are_caught_by_their_digest(tmp_path, monkeypatch, tiny_with_tokenizer, capsys):
    """A damaged cache whose ids are all valid (other ids, all zeros, a shorter array) never reaches a window or a
    perplexity: its xxh3 digest differs, the split is tokenized again and a line on stderr says so."""
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
    monkeypatch.setattr(data, "_TOKEN_CACHE", {})
    fresh = data.split_tokens(tokenizer, "test").clone()
    [path] = (tmp_path / "tokens").glob("test-*.npy")
    for damage in (lambda a: a[::-1].copy(), np.zeros_like, lambda a: a[:600].copy()):
        np.save(path, damage(fresh.numpy()), allow_pickle=False)  # a valid array, in range, digest unchanged
        monkeypatch.setattr(data, "_TOKEN_CACHE", {})
        assert torch.equal(data.split_tokens(tokenizer, "test"), fresh)
        assert "xxh3 mismatch): tokenizing the split again" in capsys.readouterr().err
    monkeypatch.setattr(data, "_TOKEN_CACHE", {})
    data.split_tokens(tokenizer, "test")
    assert capsys.readouterr().err == ""  # rewritten with its digest: read from the cache again


def test_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch, tiny_with_tokenizer):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("LAB_CACHE_DIR", str(blocked))
    monkeypatch.setattr(data, "_TOKEN_CACHE", {})
    tokenizer = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
    assert data.split_tokens(tokenizer, "test").numel() > 0
