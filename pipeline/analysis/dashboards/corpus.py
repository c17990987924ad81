"""Corpora (a text file, a Hugging Face dataset, the organism's sentences) and how they become
BOS-first token sequences and right-padded batches (docs/dashboards.md, step 1)."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline._io import digest_json, read_json
from pipeline.organism.world import WorldConfig, make_world

from .config import POS_BITS

#: bytes read at the start of a corpus file to check that it is UTF-8 text
_SNIFF_BYTES = 1 << 16


# Corpora
# --------------------------------------------------------------------------------------------


class TextFileCorpus:
    """A re-iterable corpus read from a local file, one document per line.

    ``.txt`` (or any other suffix): every non-blank line is a document. ``.jsonl`` /
    ``.ndjson``: every non-blank line is a JSON object whose ``field`` holds the document.
    Fails early, naming the file, if it is not UTF-8 text.
    """

    def __init__(self, path: str | os.PathLike, *, field: str = "text", fmt: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"corpus file {str(self.path)!r} does not exist")
        if not self.path.is_file():
            raise ValueError(f"corpus {str(self.path)!r} is not a file: give a .txt or .jsonl file")
        self.field = field
        suffix = self.path.suffix.lower()
        self.format = fmt or ("jsonl" if suffix in (".jsonl", ".ndjson") else "txt")
        if self.format not in ("txt", "jsonl"):
            raise ValueError(f"corpus format {self.format!r} is unknown; use txt or jsonl")
        _sniff_text(self.path)

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(
                        f"corpus {str(self.path)!r} line {lineno} is not UTF-8 text ({exc.reason}); "
                        "give a text (.txt) or JSON-lines (.jsonl) file"
                    ) from None
                if "\x00" in line:
                    raise ValueError(f"corpus {str(self.path)!r} line {lineno} holds NUL bytes: not a text file")
                if not line.strip():
                    continue
                if self.format == "txt":
                    yield line.rstrip("\r\n")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"corpus {str(self.path)!r} line {lineno} is not JSON ({exc.msg}); a .jsonl "
                        f"corpus holds one object per line with a {self.field!r} field"
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get(self.field), str):
                    raise ValueError(f"corpus {str(self.path)!r} line {lineno} has no string field {self.field!r}")
                yield record[self.field]

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.format}\0{self.field}\0".encode())
        with open(self.path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"TextFileCorpus({str(self.path)!r}, format={self.format!r}, field={self.field!r})"


def _sniff_text(path: Path) -> None:
    """Raise ValueError if the start of ``path`` is not UTF-8 text (NUL bytes, bad bytes)."""
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if b"\x00" in head:
        raise ValueError(
            f"corpus {str(path)!r} is not a text file (it holds NUL bytes); give a UTF-8 .txt "
            "(one document per line) or .jsonl file"
        )
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"corpus {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); give a "
            "UTF-8 .txt (one document per line) or .jsonl file"
        ) from None


def read_corpus(path: str | os.PathLike, *, field: str = "text") -> TextFileCorpus:
    """A local corpus: ``.txt`` (one document per line) or ``.jsonl`` (``field`` per line)."""
    return TextFileCorpus(path, field=field)


class _HFCorpus:
    def __init__(self, dataset, name: str, split: str, field: str, config: str | None):
        self.dataset, self.name, self.split, self.field, self.config = dataset, name, split, field, config

    def __iter__(self) -> Iterator[str]:
        for i, record in enumerate(self.dataset):
            value = record.get(self.field) if isinstance(record, Mapping) else None
            if not isinstance(value, str):
                raise ValueError(f"dataset {self.name!r} record {i} has no string field {self.field!r}")
            yield value

    def fingerprint(self) -> str:
        fp = getattr(self.dataset, "_fingerprint", None)
        return digest_json([self.name, self.config, self.split, self.field, fp])


def hf_dataset_corpus(
    name: str, split: str = "train", field: str = "text", *, config: str | None = None, streaming: bool = True
):
    """A Hugging Face dataset as a corpus (needs the ``datasets`` package and the hub).

    Raises ImportError when ``datasets`` is not installed and OSError when the dataset cannot
    be loaded (hub unreachable, unknown name or split).
    """
    try:
        import datasets  # optional dependency
    except ImportError as exc:
        raise ImportError(
            "hf_dataset_corpus needs the 'datasets' package (pip install datasets); or export the "
            "texts to a .txt / .jsonl file and use read_corpus"
        ) from exc
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as exc:  # the hub client raises many types: one clear error
        raise OSError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{exc.__class__.__name__}: {exc}. Is the hub reachable? Offline, export the texts to "
            "a .txt / .jsonl file and use read_corpus"
        ) from exc
    return _HFCorpus(ds, name, split, field, config)


def organism_corpus(world: str | os.PathLike | Mapping, n: int = 4096, *, seed: int | None = None) -> list[str]:
    """``n`` sentences of the model organism's corpus (``World.corpus``), deterministic.

    world: the ``data/organism/world.json`` written by the organism_world stage (or its dict,
    or a ``WorldConfig`` dict under ``"config"``).
    """
    data = world if isinstance(world, Mapping) else read_json(world)
    cfg = data.get("config", data)
    d = dict(cfg)
    for key in ("templates_per_kind", "kind_weights", "pinned_trained"):
        if key in d:
            d[key] = tuple(d[key])
    return make_world(WorldConfig.from_dict(d)).corpus(int(n), seed=seed)


def corpus_iterable(corpus) -> Callable[[], Iterator[str]]:
    """A zero-argument factory of fresh iterators over ``corpus`` (it is read twice)."""
    if callable(corpus) and not hasattr(corpus, "__iter__"):
        return corpus
    if isinstance(corpus, (str, bytes)):
        raise TypeError(
            "corpus must be an iterable of texts (a list, read_corpus(path), hf_dataset_corpus(...)), "
            "not one string; for a file, pass read_corpus(path)"
        )
    if not hasattr(corpus, "__iter__"):
        raise TypeError(f"corpus must be an iterable of texts, got {type(corpus).__name__}")
    if iter(corpus) is corpus:
        raise ValueError(
            "corpus is a one-shot iterator (e.g. a generator); dashboards read the corpus twice "
            "and resume by re-reading it: pass a list, read_corpus(path), or a function returning "
            "a fresh iterator"
        )
    return lambda: iter(corpus)


def corpus_fingerprint(corpus) -> str | None:
    """The corpus's own ``fingerprint()`` (files, datasets), or None (lists, functions)."""
    fp = getattr(corpus, "fingerprint", None)
    return fp() if callable(fp) else None


# Sequences and batches
# --------------------------------------------------------------------------------------------


@dataclass
class TokenSequence:
    seq_id: int
    doc: int
    start: int  # offset of tokens[1] in the document's tokens (BOS excluded)
    tokens: np.ndarray  # (n,) int64, BOS first

    def hash_bytes(self) -> bytes:
        """What the running corpus hash reads of this sequence (document index and tokens)."""
        return struct.pack("<qq", self.doc, self.tokens.size) + self.tokens.astype("<i8").tobytes()


class _Tokenizer:
    """Documents -> BOS-first token ids, as ``ReplacementModel.tokenize`` does for prompts."""

    def __init__(self, model):
        self.bridge = model.bridge

    def __call__(self, text: str, doc: int) -> np.ndarray:
        if not isinstance(text, str):
            raise ValueError(f"corpus document {doc} is a {type(text).__name__}, not a string")
        if not text.strip():
            return np.zeros(0, dtype=np.int64)
        return self.bridge.to_tokens(text, truncate=False)[0].cpu().numpy().astype(np.int64)


def sequences(
    model, corpus_iter: Callable[[], Iterator[str]], seq_len: int, max_tokens: int | None
) -> Iterator[TokenSequence]:
    """Every sequence of the corpus in order: each document split into pieces of at most
    ``seq_len - 1`` tokens after its BOS, each piece preceded by the BOS; numbered from 0."""
    tok = _Tokenizer(model)
    seq_id = 0
    counted = 0
    for doc, text in enumerate(corpus_iter()):
        ids = tok(text, doc)
        if ids.size < 2:
            continue
        # ids[0] is BOS (or, for a model without one, a token that is skipped like BOS)
        bos, body = ids[:1], ids[1:]
        step = seq_len - 1
        for start in range(0, body.size, step):
            piece = body[start : start + step]
            if max_tokens is not None:
                piece = piece[: max_tokens - counted]
            if piece.size == 0:
                break
            yield TokenSequence(seq_id, doc, start, np.concatenate([bos, piece]))
            seq_id += 1
            counted += piece.size
            if max_tokens is not None and counted >= max_tokens:
                return


def batches(seqs: Iterable[TokenSequence], batch_tokens: int) -> Iterator[list[TokenSequence]]:
    """Greedy batches: add sequences while (count x longest) <= batch_tokens (at least one)."""
    batch: list[TokenSequence] = []
    longest = 0
    for s in seqs:
        n = s.tokens.size
        if batch and (len(batch) + 1) * max(longest, n) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(s)
        longest = max(longest, n)
    if batch:
        yield batch


@dataclass
class TokenBatch:
    tokens: Tensor  # (B, T) right-padded
    lengths: np.ndarray  # (B,)
    seq_ids: np.ndarray  # (B,)
    valid: Tensor  # (B, T) bool: counted positions (1 <= pos < length)
    tids: np.ndarray  # (n_valid,) token ids of the valid positions, row-major

    @property
    def n_tokens(self) -> int:
        return int(self.tids.size)


def make_batch(seqs: list[TokenSequence], pad_id: int, device) -> TokenBatch:
    """Right-pad ``seqs`` with ``pad_id`` into one batch on ``device``."""
    lengths = np.array([s.tokens.size for s in seqs], dtype=np.int64)
    T = int(lengths.max())
    tokens = np.full((len(seqs), T), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        tokens[i, : s.tokens.size] = s.tokens
    pos = np.arange(T)[None, :]
    valid = (pos >= 1) & (pos < lengths[:, None])
    seq_ids = np.array([s.seq_id for s in seqs], dtype=np.int64)
    tid_grid = (seq_ids[:, None] << POS_BITS) | pos
    return TokenBatch(
        tokens=torch.from_numpy(tokens).to(device),
        lengths=lengths,
        seq_ids=seq_ids,
        valid=torch.from_numpy(valid).to(device),
        tids=tid_grid[valid],
    )
