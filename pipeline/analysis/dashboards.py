"""Feature dashboards computed locally from a corpus: what makes each feature fire, what it writes.

``compute_dashboards(model, corpus, out)`` streams a corpus through the clean base model, reads
every transcoder feature's activations, and writes one compressed Zarr v3 store per transcoder
set. ``Dashboards.open(out).feature(layer, index)`` answers one feature as a JSON-able dict;
``.labels()`` gives the automatic labels for graph export (``create_graph_files(labels=...)``);
``export_feature_json`` writes the small per-feature JSON files a viewer fetches for one graph.

Steps
-----
1. **Sequences.** Each document is tokenized as the replacement model tokenizes prompts (BOS
   first), and split into sequences of at most ``seq_len`` tokens, each starting with BOS.
   Sequences are numbered in corpus order; a token's id is ``seq_id << 24 | pos``. Position 0
   (BOS) never counts: its activations are zero, as in ``ReplacementModel.capture``.
   Sequences are packed greedily into right-padded batches of at most ``batch_tokens`` tokens
   (right padding does not change a causal model's real positions). ``max_tokens`` stops the
   stream after that many counted (non-BOS) tokens.
2. **Stream.** One clean forward pass per batch, stopped right after the last layer's
   transcoder input; then per layer ``a = transcoders.activations(layer, x)`` on the real
   positions, and for every firing entry ``(token, feature, a > 0)``:
   firing count and sum; a histogram over log-spaced bins (``hist_bins`` between ``hist_min``
   and ``hist_max``, plus an underflow and an overflow bin); the top-k entries ordered by
   (activation desc, token id asc); and, per histogram bin, a reservoir: the
   ``examples_per_quantile`` entries with the smallest seeded hash key (a uniform sample
   without replacement). Every merge is a vectorised sort (``np.lexsort``) over the affected
   rows of dense ``(n_features, k)`` tables, so results do not depend on the batching and
   memory is bounded by the config, not by the corpus.
3. **Checkpoint.** Every ``checkpoint_every`` batches the state is written atomically
   (one file, Blosc-zstd) to ``.<out>.partial/``; a rerun with the same model, transcoders,
   config and corpus resumes after the last checkpoint (the corpus prefix is re-tokenized and
   checked against a running hash), and gives a byte-identical store.
4. **Quantile groups.** Group q of ``n_quantiles`` is a run of histogram bins: its boundaries
   are the bin edges whose cumulative firing count is nearest ``q / n_quantiles`` of the
   total. Its activation range, exact CDF range and count follow from the histogram; its
   examples are the ``examples_per_quantile`` smallest keys over its bins' reservoirs - a
   uniform sample of the group, every example truly inside the group's range.
5. **Contexts.** A second pass over the corpus re-runs only the sequences that hold a top-k
   or quantile example and records each example's token window (``context_before`` and
   ``context_after`` tokens around it) with the feature's activation on every window token.
6. **Logits.** ``W_dec @ W_U`` per feature in chunks: top and bottom ``n_logits`` entries of
   the feature's total decoder direction (summed over output layers), and for a CLT also per
   output layer. Checkpointed per layer.
7. **Labels.** ``"<top input tokens> → <top output tokens>"`` from the top-k examples' tokens
   and the top logits.
8. **Store.** Written to ``.<out>.creating`` and renamed into place; deterministic bytes.

On-disk layout (``L`` layers, ``F`` features, ``K`` top_k, ``W`` window, ``Q`` quantiles,
``M`` examples per quantile, ``H`` histogram bins, ``V`` n_logits, ``S`` stored sequences).
Per-feature arrays have one shard file per layer (``shards=(1, F, ...)``) holding inner chunks
of 256 features, so a store has about 16 x L + 10 files whatever ``F`` and the corpus size::

    zarr.json                 group; attributes["dashboards"] = {format, version, fingerprint,
                              config, kind, n_layers, d_transcoder, d_vocab, n_tokens,
                              n_documents, n_sequences, hist_edges, model, transcoders, ...}
    stats/count      (L,F)      int64    firing tokens
    stats/sum        (L,F)      float64  sum of activations over firing tokens
    stats/hist       (L,F,H)    int64    firing tokens per histogram bin
    top/value        (L,F,K)    float32  activation (0 where fewer than K firings)
    top/seq          (L,F,K)    int64    row in sequences/ (-1: empty)
    top/pos          (L,F,K)    int32    position in the sequence (BOS = 0)
    top/window       (L,F,K,W)  float32  activation on the window tokens pos-before..pos+after
    quantiles/bins   (L,F,Q+1)  int32    group q = histogram bins [bins[q], bins[q+1])
    quantiles/value, seq, pos (L,F,Q,M) and window (L,F,Q,M,W): as top/
    logits/{top,bottom}_{id,value}        (L,F,V)    int32/float32, total decoder direction
    logits/layer_{top,bottom}_{id,value}  (L,L,F,V)  CLT only: [source layer, output layer]
    labels/bytes, labels/offsets          UTF-8 of the L*F labels (feature l*F+f)
    vocab/bytes, vocab/offsets            UTF-8 of every token's string (tokenizer.decode)
    sequences/tokens (sum of lengths,) int32; sequences/offsets (S+1,) int64;
    sequences/id, sequences/doc, sequences/start (S,) int64: global sequence id, document
        index in the corpus, offset of the sequence's first non-BOS token in the document
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DashboardConfig",
    "Dashboards",
    "TextFileCorpus",
    "auto_label",
    "compute_dashboards",
    "decoder_logits",
    "export_feature_json",
    "graph_features",
    "hf_dataset_corpus",
    "mlp_inputs",
    "organism_corpus",
    "quantile_bins",
    "read_corpus",
]

log = logging.getLogger(__name__)

FORMAT = "circuit-pipeline/feature-dashboards"
FORMAT_VERSION = 1
POS_BITS = 24  # token id = seq_id << POS_BITS | pos
MAX_SEQ_LEN = 1 << POS_BITS
FEATURE_CHUNK = 256  # inner chunk (features) of the sharded per-feature arrays
_META = "dashboards"
_STATE_MAGIC = b"CPDASH-STATE-1\n"
_SNIFF_BYTES = 1 << 16
_SPAN_CHUNK = 1 << 16  # chunk of the 1-D tables (sequences, labels, vocab)
_CACHE_BLOCKS = 128  # blocks a reader keeps decoded


# ============================================================================================
# Configuration
# ============================================================================================


@dataclass
class DashboardConfig:
    """What a dashboard records and how the corpus is streamed.

    top_k: top activating examples kept per feature.
    context_before / context_after: window of tokens shown around an example's token.
    n_quantiles / examples_per_quantile: quantile groups of the firing distribution and
        examples sampled (uniformly, seeded) from each.
    hist_bins / hist_min / hist_max: log-spaced histogram bins between hist_min and hist_max,
        plus an underflow (0, hist_min) and an overflow [hist_max, inf) bin.
    n_logits: top and bottom output logits kept per feature (and per output layer for a CLT).
    batch_tokens: padded tokens per forward pass (memory: batch_tokens x d_transcoder floats).
    seq_len: tokens per sequence, BOS included; longer documents are split (default
        min(model context, 128)).
    max_tokens: stop after this many counted (non-BOS) tokens; None: the whole corpus.
    seed: seed of the quantile sampling.
    checkpoint_every: batches between checkpoints (does not change the result).
    logits_chunk: features per W_dec @ W_U product.
    label_inputs / label_outputs: tokens shown on each side of an automatic label.
    """

    top_k: int = 20
    context_before: int = 8
    context_after: int = 4
    n_quantiles: int = 5
    examples_per_quantile: int = 4
    hist_bins: int = 36
    hist_min: float = 1e-3
    hist_max: float = 1e3
    n_logits: int = 10
    batch_tokens: int = 2048
    seq_len: int | None = None
    max_tokens: int | None = None
    seed: int = 0
    checkpoint_every: int = 20
    logits_chunk: int = 512
    label_inputs: int = 3
    label_outputs: int = 3

    def __post_init__(self) -> None:
        positive = (
            "top_k",
            "n_quantiles",
            "examples_per_quantile",
            "hist_bins",
            "n_logits",
            "batch_tokens",
            "checkpoint_every",
            "logits_chunk",
        )
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DashboardConfig.{name} must be a positive integer, got {v!r}")
        for name in ("context_before", "context_after", "label_inputs", "label_outputs", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"DashboardConfig.{name} must be a non-negative integer, got {v!r}")
        if not (0 < float(self.hist_min) < float(self.hist_max) < math.inf):
            raise ValueError(
                f"DashboardConfig needs 0 < hist_min < hist_max < inf, got {self.hist_min}, {self.hist_max}"
            )
        self.hist_min, self.hist_max = float(self.hist_min), float(self.hist_max)
        if self.seq_len is not None and not 2 <= int(self.seq_len) <= MAX_SEQ_LEN:
            raise ValueError(f"DashboardConfig.seq_len must be in 2..{MAX_SEQ_LEN}, got {self.seq_len}")
        if self.max_tokens is not None and int(self.max_tokens) < 1:
            raise ValueError(f"DashboardConfig.max_tokens must be positive or None, got {self.max_tokens}")

    @property
    def window(self) -> int:
        return self.context_before + 1 + self.context_after

    @property
    def n_bins(self) -> int:
        """Histogram bins including the underflow and overflow bins."""
        return self.hist_bins + 2

    def hist_edges(self) -> np.ndarray:
        """(n_bins + 1,) float64 bin edges: 0, hist_min .. hist_max (log-spaced), inf."""
        inner = np.geomspace(self.hist_min, self.hist_max, self.hist_bins + 1)
        inner = inner.astype(np.float32).astype(np.float64)  # exact in float32 and in JSON
        return np.concatenate([[0.0], inner, [np.inf]])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DashboardConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DashboardConfig keys: {', '.join(unknown)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def result_dict(self) -> dict[str, Any]:
        """The fields that determine the result (checkpoint_every does not)."""
        d = self.to_dict()
        d.pop("checkpoint_every")
        return d


# ============================================================================================
# Corpora
# ============================================================================================


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
        ident = json.dumps([self.name, self.config, self.split, self.field, fp])
        return hashlib.sha256(ident.encode()).hexdigest()


def hf_dataset_corpus(
    name: str, split: str = "train", field: str = "text", *, config: str | None = None, streaming: bool = True
):
    """A Hugging Face dataset as a corpus (needs the ``datasets`` package and the hub).

    Raises ImportError when ``datasets`` is not installed and OSError when the dataset cannot
    be loaded (hub unreachable, unknown name or split).
    """
    try:
        import datasets
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
    from pipeline.organism.world import WorldConfig, make_world

    if not isinstance(world, Mapping):
        world = json.loads(Path(world).read_text(encoding="utf-8"))
    cfg = world.get("config", world)
    d = dict(cfg)
    for key in ("templates_per_kind", "kind_weights", "pinned_trained"):
        if key in d:
            d[key] = tuple(d[key])
    return make_world(WorldConfig.from_dict(d)).corpus(int(n), seed=seed)


def _corpus_iterable(corpus) -> Callable[[], Iterator[str]]:
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


def _corpus_fingerprint(corpus) -> str | None:
    fp = getattr(corpus, "fingerprint", None)
    return fp() if callable(fp) else None


# ============================================================================================
# Sequences and batches
# ============================================================================================


@dataclass
class _Seq:
    seq_id: int
    doc: int
    start: int  # offset of tokens[1] in the document's tokens (BOS excluded)
    tokens: np.ndarray  # (n,) int64, BOS first


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


def _sequences(model, corpus_iter: Callable[[], Iterator[str]], seq_len: int, max_tokens: int | None) -> Iterator[_Seq]:
    """Every sequence of the corpus in order (see module docstring, step 1)."""
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
            yield _Seq(seq_id, doc, start, np.concatenate([bos, piece]))
            seq_id += 1
            counted += piece.size
            if max_tokens is not None and counted >= max_tokens:
                return


def _batches(seqs: Iterable[_Seq], batch_tokens: int) -> Iterator[list[_Seq]]:
    """Greedy batches: add sequences while (count x longest) <= batch_tokens (at least one)."""
    batch: list[_Seq] = []
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
class _Batch:
    tokens: Tensor  # (B, T) right-padded
    lengths: np.ndarray  # (B,)
    seq_ids: np.ndarray  # (B,)
    valid: Tensor  # (B, T) bool: counted positions (1 <= pos < length)
    tids: np.ndarray  # (n_valid,) token ids of the valid positions, row-major

    @property
    def n_tokens(self) -> int:
        return int(self.tids.size)


def _make_batch(seqs: list[_Seq], pad_id: int, device) -> _Batch:
    lengths = np.array([s.tokens.size for s in seqs], dtype=np.int64)
    T = int(lengths.max())
    tokens = np.full((len(seqs), T), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        tokens[i, : s.tokens.size] = s.tokens
    pos = np.arange(T)[None, :]
    valid = (pos >= 1) & (pos < lengths[:, None])
    seq_ids = np.array([s.seq_id for s in seqs], dtype=np.int64)
    tid_grid = (seq_ids[:, None] << POS_BITS) | pos
    return _Batch(
        tokens=torch.from_numpy(tokens).to(device),
        lengths=lengths,
        seq_ids=seq_ids,
        valid=torch.from_numpy(valid).to(device),
        tids=tid_grid[valid],
    )


class _StopForward(Exception):
    """Raised from the last transcoder-input hook: nothing after it is needed."""


@torch.no_grad()
def mlp_inputs(model, tokens: Tensor) -> list[Tensor]:
    """Transcoder inputs of every layer on a batch, from one clean forward pass.

    tokens: (B, T) input ids (right padding is harmless: the model is causal)
    returns n_layers tensors (B, T, d_model), the tensors at the transcoders'
    ``feature_input_hook`` (what ``ReplacementModel.capture`` records per prompt). The forward
    pass stops right after the last layer's input (no final MLP, no unembedding).
    """
    store: dict[int, Tensor] = {}
    last = model.n_layers - 1

    def save(layer: int):
        def hook(tensor: Tensor, *, hook) -> None:
            store[layer] = tensor.detach()
            if layer == last:
                raise _StopForward

        return hook

    fwd = [(model.input_hooks[layer], save(layer)) for layer in range(model.n_layers)]
    try:
        with model.hooks(fwd):
            model.bridge(tokens)
    except _StopForward:
        pass
    missing = [layer for layer in range(model.n_layers) if layer not in store]
    if missing:
        raise RuntimeError(f"the forward pass did not reach the transcoder input of layers {missing}")
    return [store[layer] for layer in range(model.n_layers)]


# ============================================================================================
# Streaming statistics (vectorised merges)
# ============================================================================================

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _hash_keys(tids: np.ndarray, layer: int, features: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 key per (token, layer, feature) (splitmix64)."""
    with np.errstate(over="ignore"):
        x = tids.astype(np.uint64) * _GOLD
        x ^= (features.astype(np.uint64) + np.uint64(layer) * np.uint64(1 << 32)) * _M2
        x ^= np.uint64(seed) * _M1 + _GOLD
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def _rank_in_group(groups: np.ndarray) -> np.ndarray:
    """Rank of each element within its run of equal values (``groups`` sorted)."""
    first = np.searchsorted(groups, groups, side="left")
    return np.arange(groups.size) - first


def _merge_best(
    slot_id: np.ndarray,
    slot_key: np.ndarray,
    slot_val: np.ndarray | None,
    slots: np.ndarray,
    ids: np.ndarray,
    keys: np.ndarray,
    vals: np.ndarray | None,
    keep: int,
) -> None:
    """Merge candidates into per-slot tables keeping the ``keep`` smallest (key, id).

    slot_id: (n_slots, keep) int64 ids, -1 for empty, rows sorted by (key, id)
    slot_key: (n_slots, keep) sort key of the entries (+inf / max for empty)
    slot_val: optional (n_slots, keep) payload carried along (or None)
    slots, ids, keys, vals: (n,) candidates
    Updates the tables in place; only the rows of slots that have candidates are touched.
    """
    if slots.size == 0:
        return
    u, inv = np.unique(slots, return_inverse=True)
    e_id = slot_id[u].reshape(-1)
    e_key = slot_key[u].reshape(-1)
    e_grp = np.repeat(np.arange(u.size), keep)
    full = e_id >= 0
    grp = np.concatenate([e_grp[full], inv])
    kk = np.concatenate([e_key[full], keys])
    ii = np.concatenate([e_id[full], ids])
    order = np.lexsort((ii, kk, grp))
    grp, kk, ii = grp[order], kk[order], ii[order]
    rank = _rank_in_group(grp)
    sel = rank < keep
    g, r = grp[sel], rank[sel]
    new_id = np.full((u.size, keep), -1, dtype=slot_id.dtype)
    new_key = np.full((u.size, keep), _empty_key(slot_key.dtype), dtype=slot_key.dtype)
    new_id[g, r] = ii[sel]
    new_key[g, r] = kk[sel]
    slot_id[u] = new_id
    slot_key[u] = new_key
    if slot_val is not None:
        e_val = slot_val[u].reshape(-1)
        vv = np.concatenate([e_val[full], vals])[order]
        new_val = np.zeros((u.size, keep), dtype=slot_val.dtype)
        new_val[g, r] = vv[sel]
        slot_val[u] = new_val


def _empty_key(dtype) -> Any:
    return np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max


class _LayerState:
    """Streaming statistics of one layer's features (step 2)."""

    NAMES = ("count", "sum", "hist", "top_val", "top_id", "res_id", "res_val")

    def __init__(self, n_features: int, cfg: DashboardConfig, arrays: dict[str, np.ndarray] | None = None):
        F, H, K, M = n_features, cfg.n_bins, cfg.top_k, cfg.examples_per_quantile
        self.F, self.H, self.K, self.M = F, H, K, M
        if arrays is not None:
            for name in self.NAMES:
                setattr(self, name, arrays[name])
            return
        self.count = np.zeros(F, dtype=np.int64)
        self.sum = np.zeros(F, dtype=np.float64)
        self.hist = np.zeros((F, H), dtype=np.int64)
        self.top_val = np.full((F, K), -np.inf, dtype=np.float32)  # best first
        self.top_id = np.full((F, K), -1, dtype=np.int64)
        self.res_id = np.full((F * H, M), -1, dtype=np.int64)  # per (feature, bin), key order
        self.res_val = np.zeros((F * H, M), dtype=np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.NAMES}


def _update_layer(
    st: _LayerState,
    layer: int,
    tids: np.ndarray,
    feats: np.ndarray,
    vals: np.ndarray,
    inner_edges: np.ndarray,
    seed: int,
) -> None:
    """Fold one batch's firing entries of one layer into its state.

    tids, feats, vals: (n,) token id, feature, activation (> 0) of every firing entry
    """
    if vals.size == 0:
        return
    if not np.isfinite(vals).all():
        raise ValueError(f"layer {layer} has non-finite feature activations; check the model and transcoders")
    F, H = st.F, st.H
    st.count += np.bincount(feats, minlength=F)
    st.sum += np.bincount(feats, weights=vals.astype(np.float64), minlength=F)
    bins = np.searchsorted(inner_edges, vals.astype(np.float64), side="right")
    slots = feats * H + bins
    st.hist += np.bincount(slots, minlength=F * H).reshape(F, H)

    # top-k by (activation desc, token id asc); candidates below a full row's last entry drop
    last_val, last_id = st.top_val[feats, -1], st.top_id[feats, -1]
    cand = (vals > last_val) | ((vals == last_val) & (tids < last_id))
    if cand.any():
        f, v, t = feats[cand], vals[cand], tids[cand]
        neg = np.negative(st.top_val.astype(np.float64))
        _merge_best(st.top_id, neg, None, f, t, -v.astype(np.float64), None, st.K)
        st.top_val[:] = np.negative(neg).astype(np.float32)

    # reservoirs: per (feature, bin) the entries with the smallest hash key
    keys = _hash_keys(tids, layer, feats, seed)
    last = st.res_id[slots, -1]
    full = last >= 0
    cand = ~full
    if full.any():
        last_key = _hash_keys(last[full], layer, feats[full], seed)
        k_full, t_full = keys[full], tids[full]
        cand[full] = (k_full < last_key) | ((k_full == last_key) & (t_full < last[full]))
    if cand.any():
        s = slots[cand]
        res_key = _reservoir_keys(st, layer, np.unique(s), seed)
        _merge_reservoir(st, res_key, s, tids[cand], keys[cand], vals[cand])


def _reservoir_keys(st: _LayerState, layer: int, slots: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = st.res_id[slots]
    feats = np.repeat(slots // st.H, st.M).reshape(ids.shape)
    keys = _hash_keys(ids.reshape(-1), layer, feats.reshape(-1), seed).reshape(ids.shape)
    keys[ids < 0] = np.iinfo(np.uint64).max
    return slots, keys


def _merge_reservoir(
    st: _LayerState,
    res_key: tuple[np.ndarray, np.ndarray],
    slots: np.ndarray,
    ids: np.ndarray,
    keys: np.ndarray,
    vals: np.ndarray,
) -> None:
    touched, touched_keys = res_key
    local = np.searchsorted(touched, slots)
    sub_id = st.res_id[touched]
    sub_val = st.res_val[touched]
    sub_key = touched_keys.copy()
    _merge_best(sub_id, sub_key, sub_val, local, ids, keys, vals, st.M)
    st.res_id[touched] = sub_id
    st.res_val[touched] = sub_val


# ============================================================================================
# Quantile groups
# ============================================================================================


def quantile_bins(hist: np.ndarray, n_quantiles: int) -> np.ndarray:
    """Group boundaries over histogram bins: (F, H) counts -> (F, Q+1) int32 bin indices.

    Group q holds bins [b[q], b[q+1]); b[0] = 0, b[Q] = H, and b[q] is the bin edge whose
    cumulative count is nearest q / Q of the feature's total (the lowest such edge on ties),
    made non-decreasing. Groups can be empty when one bin holds more than 1/Q of the mass.
    """
    hist = np.asarray(hist, dtype=np.int64)
    F, H = hist.shape
    Q = int(n_quantiles)
    cum = np.concatenate([np.zeros((F, 1), dtype=np.int64), np.cumsum(hist, axis=1)], axis=1)
    total = cum[:, -1:]
    out = np.empty((F, Q + 1), dtype=np.int32)
    out[:, 0], out[:, Q] = 0, H
    for q in range(1, Q):
        dist = np.abs(cum * Q - total * q)  # exact integer |cum/total - q/Q| * Q * total
        out[:, q] = dist.argmin(axis=1)
    np.maximum.accumulate(out, axis=1, out=out)
    return out


def _group_of_bins(bounds: np.ndarray, n_bins: int) -> np.ndarray:
    """(F, Q+1) group boundaries -> (F, H) group index of every bin."""
    inner = bounds[:, 1:-1]
    return (inner[:, :, None] <= np.arange(n_bins)[None, None, :]).sum(axis=1)


def _choose_quantile_examples(
    st: _LayerState, layer: int, bounds: np.ndarray, n_quantiles: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The examples of each quantile group: (F, Q, M) token ids (-1 empty) and activations."""
    F, H, M, Q = st.F, st.H, st.M, n_quantiles
    ids = st.res_id.reshape(-1)
    vals = st.res_val.reshape(-1)
    slot = np.repeat(np.arange(F * H), M)
    full = ids >= 0
    ids, vals, slot = ids[full], vals[full], slot[full]
    feats, bins = slot // H, slot % H
    group = _group_of_bins(bounds, H)[feats, bins]
    gkey = feats * Q + group
    keys = _hash_keys(ids, layer, feats, seed)
    order = np.lexsort((ids, keys, gkey))
    gkey, ids, vals = gkey[order], ids[order], vals[order]
    rank = _rank_in_group(gkey)
    sel = rank < M
    q_id = np.full((F * Q, M), -1, dtype=np.int64)
    q_val = np.zeros((F * Q, M), dtype=np.float32)
    q_id[gkey[sel], rank[sel]] = ids[sel]
    q_val[gkey[sel], rank[sel]] = vals[sel]
    return q_id.reshape(F, Q, M), q_val.reshape(F, Q, M)


# ============================================================================================
# Output logits
# ============================================================================================


@dataclass
class DecoderLogits:
    """Top/bottom entries of W_dec @ W_U for one layer's features.

    top_id, top_value, bottom_id, bottom_value: (F, V) for the total decoder direction
    (summed over output layers); layer_*: (F, n_out, V) per output layer (CLT), else None.
    """

    top_id: np.ndarray
    top_value: np.ndarray
    bottom_id: np.ndarray
    bottom_value: np.ndarray
    layer_top_id: np.ndarray | None = None
    layer_top_value: np.ndarray | None = None
    layer_bottom_id: np.ndarray | None = None
    layer_bottom_value: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@torch.no_grad()
def decoder_logits(transcoders, W_U: Tensor, layer: int, n_logits: int, *, chunk: int = 512) -> DecoderLogits:
    """Top and bottom ``n_logits`` of every feature's decoder direction through the unembedding.

    W_U: (d_model, d_vocab). A feature's total direction is its decoder row summed over its
    output layers (PLT: the one row). float32 products, ``chunk`` features at a time.
    """
    F = int(transcoders.d_transcoder)
    n_out = len(transcoders.output_layers(layer))
    W = W_U.detach().to(torch.float32)
    V = min(int(n_logits), int(W.shape[1]))
    per_layer = transcoders.kind == "cross_layer_transcoder"
    out = {
        "top_id": np.zeros((F, V), np.int32),
        "top_value": np.zeros((F, V), np.float32),
        "bottom_id": np.zeros((F, V), np.int32),
        "bottom_value": np.zeros((F, V), np.float32),
    }
    if per_layer:
        for name in ("layer_top_id", "layer_bottom_id"):
            out[name] = np.zeros((F, n_out, V), np.int32)
        for name in ("layer_top_value", "layer_bottom_value"):
            out[name] = np.zeros((F, n_out, V), np.float32)
    for start in range(0, F, chunk):
        idx = torch.arange(start, min(F, start + chunk))
        rows = transcoders.decoder_vectors(layer, idx).to(device=W.device, dtype=torch.float32)
        rows_out = slice(start, start + idx.numel())
        total = rows.sum(dim=1) @ W  # (c, d_vocab)
        _topk_into(out, "", total, V, (rows_out,))
        if per_layer:
            for o in range(n_out):
                _topk_into(out, "layer_", rows[:, o] @ W, V, (rows_out, o))
    return DecoderLogits(**out)


def _topk_into(out: dict, prefix: str, logits: Tensor, V: int, where: tuple) -> None:
    top = logits.topk(V, dim=-1)
    bottom = logits.topk(V, dim=-1, largest=False)
    out[prefix + "top_id"][where] = top.indices.cpu().numpy()
    out[prefix + "top_value"][where] = top.values.cpu().numpy()
    out[prefix + "bottom_id"][where] = bottom.indices.cpu().numpy()
    out[prefix + "bottom_value"][where] = bottom.values.cpu().numpy()


# ============================================================================================
# Labels
# ============================================================================================


def _short(token: str, limit: int = 24) -> str:
    s = token.strip()
    if not s:
        s = repr(token) if token else "''"
    return s if len(s) <= limit else s[: limit - 1] + "…"


def auto_label(
    input_tokens: Sequence[str], output_tokens: Sequence[str], *, n_inputs: int = 3, n_outputs: int = 3
) -> str:
    """``"in1/in2/in3 → out1/out2/out3"``: the most common tokens where a feature fires most
    (in order of first appearance among ties) and its top output logits; ``(dead)`` inputs
    when it never fired."""
    return _compose_label([_short(t) for t in input_tokens], [_short(t) for t in output_tokens], n_inputs, n_outputs)


def _compose_label(ins: Sequence[str], outs: Sequence[str], n_inputs: int, n_outputs: int) -> str:
    counts = Counter(ins)
    order = {t: i for i, t in reversed(list(enumerate(ins)))}  # first appearance
    left = sorted(counts, key=lambda t: (-counts[t], order[t]))[:n_inputs]
    right = list(dict.fromkeys(outs))[:n_outputs]
    text = "/".join(left) if left else "(dead)"
    return f"{text} → {'/'.join(right)}" if right else text


# ============================================================================================
# Checkpoints (one file, atomic)
# ============================================================================================


def _blosc():
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)


def _pack(meta: dict, arrays: Mapping[str, np.ndarray]) -> bytes:
    codec = _blosc()
    blobs, index, offset = [], [], 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        blob = bytes(codec.encode(a)) if a.nbytes else b""
        index.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "size": len(blob)})
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps({"meta": meta, "arrays": index}, sort_keys=True).encode()
    return _STATE_MAGIC + struct.pack("<Q", len(header)) + header + b"".join(blobs)


def _unpack(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    if not data.startswith(_STATE_MAGIC):
        raise ValueError("not a dashboards checkpoint")
    pos = len(_STATE_MAGIC)
    (n,) = struct.unpack("<Q", data[pos : pos + 8])
    header = json.loads(data[pos + 8 : pos + 8 + n])
    base = pos + 8 + n
    codec = _blosc()
    arrays = {}
    for rec in header["arrays"]:
        dtype, shape = np.dtype(rec["dtype"]), tuple(rec["shape"])
        if rec["size"] == 0:
            arrays[rec["name"]] = np.zeros(shape, dtype=dtype)
            continue
        blob = data[base + rec["offset"] : base + rec["offset"] + rec["size"]]
        arrays[rec["name"]] = np.frombuffer(codec.decode(blob), dtype=dtype).reshape(shape).copy()
    return header["meta"], arrays


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ============================================================================================
# compute_dashboards
# ============================================================================================


def _fingerprint(model, cfg: DashboardConfig, corpus_fp: str | None, seq_len: int) -> str:
    ident = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": cfg.result_dict(),
        "seq_len": seq_len,
        "model": model.digest(),
        "transcoders": model.transcoders.digest(),
        "corpus": corpus_fp,
        "dtype": str(model.dtype),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _is_store(path: Path) -> bool:
    try:
        doc = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc.get("attributes", {}).get(_META), dict)


class _Run:
    """One dashboards computation: owns the checkpoint directory and the streaming state."""

    def __init__(self, model, corpus, out: Path, cfg: DashboardConfig, progress: bool):
        self.model = model
        self.tc = model.transcoders
        self.cfg = cfg
        self.out = out
        self.progress = progress
        self.corpus_iter = _corpus_iterable(corpus)
        self.seq_len = int(cfg.seq_len or min(int(model.n_ctx), 128))
        if self.seq_len > int(model.n_ctx):
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's context {model.n_ctx}")
        self.partial = out.parent / f".{out.name}.partial"
        self.state_path = self.partial / "state.bin"
        self.fingerprint = _fingerprint(model, cfg, _corpus_fingerprint(corpus), self.seq_len)
        self.inner_edges = cfg.hist_edges()[1:-1]
        tok = model.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (tok.eos_token_id or 0))
        self.device = model.bridge.cfg.device
        self.layers: list[_LayerState] = []
        self.meta = {
            "fingerprint": self.fingerprint,
            "n_batches": 0,
            "n_seqs": 0,
            "n_tokens": 0,
            "n_docs": 0,
            "token_hash": hashlib.sha256().hexdigest(),
            "stream_done": False,
        }

    # ------------------------------------------------------------------ checkpoint
    def load_checkpoint(self) -> bool:
        if not self.state_path.exists():
            return False
        try:
            meta, arrays = _unpack(self.state_path.read_bytes())
        except (ValueError, KeyError, OSError) as exc:
            log.warning("dashboards: unreadable checkpoint %s (%s); starting over", self.state_path, exc)
            return False
        if meta.get("fingerprint") != self.fingerprint:
            log.warning("dashboards: checkpoint %s is for other inputs; starting over", self.partial)
            return False
        self.meta = meta
        self.layers = [
            _LayerState(self.tc.d_transcoder, self.cfg, {n: arrays[f"{layer}/{n}"] for n in _LayerState.NAMES})
            for layer in range(self.model.n_layers)
        ]
        return True

    def save_checkpoint(self) -> None:
        arrays = {f"{layer}/{n}": a for layer, st in enumerate(self.layers) for n, a in st.arrays().items()}
        self.partial.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.state_path, _pack(self.meta, arrays))

    def reset_partial(self) -> None:
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self.layers = [_LayerState(self.tc.d_transcoder, self.cfg) for _ in range(self.model.n_layers)]

    # ------------------------------------------------------------------ step 2: stream
    def stream(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        skip = int(self.meta["n_seqs"])
        h = hashlib.sha256()
        seqs = _sequences(self.model, self.corpus_iter, self.seq_len, cfg.max_tokens)
        last_doc = -1
        for _ in range(skip):  # resume: re-read the consumed prefix and check it is unchanged
            s = next(seqs, None)
            if s is None:
                break
            h.update(_seq_bytes(s))
            last_doc = s.doc
        if h.hexdigest() != self.meta["token_hash"]:
            raise _CorpusChanged
        bar = tqdm(
            total=cfg.max_tokens,
            initial=int(self.meta["n_tokens"]),
            unit="tok",
            unit_scale=True,
            desc="dashboards: stream",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        t0, n0 = time.perf_counter(), int(self.meta["n_tokens"])
        try:
            since = 0
            for batch_seqs in _batches(seqs, cfg.batch_tokens):
                batch = _make_batch(batch_seqs, self.pad_id, self.device)
                self._process(batch)
                for s in batch_seqs:
                    h.update(_seq_bytes(s))
                last_doc = batch_seqs[-1].doc
                self.meta.update(
                    n_batches=int(self.meta["n_batches"]) + 1,
                    n_seqs=int(self.meta["n_seqs"]) + len(batch_seqs),
                    n_tokens=int(self.meta["n_tokens"]) + batch.n_tokens,
                    n_docs=last_doc + 1,
                    token_hash=h.hexdigest(),
                )
                bar.update(batch.n_tokens)
                since += 1
                if since >= cfg.checkpoint_every:
                    self.save_checkpoint()
                    since = 0
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        done = int(self.meta["n_tokens"]) - n0
        if int(self.meta["n_tokens"]) == 0:
            raise ValueError(
                "the corpus gave no tokens: it is empty or every document is blank; give a corpus "
                "with at least one non-empty document"
            )
        log.info(
            "dashboards: streamed %d tokens in %.1fs (%.0f tok/s)",
            done,
            elapsed,
            done / elapsed if elapsed > 0 else float("nan"),
        )
        self.meta["stream_done"] = True
        self.save_checkpoint()

    def _process(self, batch: _Batch) -> None:
        xs = mlp_inputs(self.model, batch.tokens)
        for layer, x in enumerate(xs):
            a = self.tc.activations(layer, x[batch.valid])  # (n_valid, F)
            nz = (a > 0).nonzero()
            rows = nz[:, 0].cpu().numpy()
            feats = nz[:, 1].cpu().numpy().astype(np.int64)
            vals = a[nz[:, 0], nz[:, 1]].float().cpu().numpy()
            _update_layer(self.layers[layer], layer, batch.tids[rows], feats, vals, self.inner_edges, self.cfg.seed)

    # ------------------------------------------------------------------ step 6: logits
    def logits(self) -> list[DecoderLogits]:
        from tqdm.auto import tqdm

        W_U = self.model.W_U
        out = []
        bar = tqdm(
            total=self.model.n_layers * self.tc.d_transcoder,
            unit="feat",
            unit_scale=True,
            desc="dashboards: logits",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            for layer in range(self.model.n_layers):
                path = self.partial / f"logits_{layer}.bin"
                if path.exists():
                    meta, arrays = _unpack(path.read_bytes())
                    if meta.get("fingerprint") == self.fingerprint:
                        out.append(DecoderLogits(**arrays))
                        bar.update(self.tc.d_transcoder)
                        continue
                res = decoder_logits(self.tc, W_U, layer, self.cfg.n_logits, chunk=self.cfg.logits_chunk)
                _atomic_write(path, _pack({"fingerprint": self.fingerprint}, res.arrays()))
                out.append(res)
                bar.update(self.tc.d_transcoder)
        finally:
            bar.close()
        return out

    # ------------------------------------------------------------------ steps 4-5: contexts
    def contexts(self, examples: list[dict[str, np.ndarray]]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """Windows of every example; examples[l]["tid"]: (E_l,) token ids (-1 empty).

        returns windows[l] (E_l, W) float32 and the stored sequences table.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        W = cfg.window
        offsets = np.arange(-cfg.context_before, cfg.context_after + 1)
        per_layer = []
        for ex in examples:
            tid = ex["tid"]
            slots = np.nonzero(tid >= 0)[0]
            seq = tid[slots] >> POS_BITS
            order = np.argsort(seq, kind="stable")
            per_layer.append((slots[order], seq[order], (tid[slots] & (MAX_SEQ_LEN - 1))[order]))
        ref = np.unique(np.concatenate([p[1] for p in per_layer] + [np.zeros(0, np.int64)]))
        windows = [np.zeros((ex["tid"].size, W), dtype=np.float32) for ex in examples]
        table = {"id": [], "doc": [], "start": [], "tokens": []}
        if ref.size == 0:
            return windows, _sequence_table(table)
        last_ref = int(ref[-1])

        def wanted() -> Iterator[_Seq]:
            h, n = hashlib.sha256(), 0
            for s in _sequences(self.model, self.corpus_iter, self.seq_len, cfg.max_tokens):
                h.update(_seq_bytes(s))
                n += 1
                if s.seq_id <= last_ref:
                    i = np.searchsorted(ref, s.seq_id)
                    if i < ref.size and ref[i] == s.seq_id:
                        yield s
            if n != int(self.meta["n_seqs"]) or h.hexdigest() != self.meta["token_hash"]:
                raise RuntimeError(
                    "the corpus changed between the two passes over it; give a corpus that reads the same every time"
                )

        bar = tqdm(
            total=int(ref.size), unit="seq", desc="dashboards: contexts", disable=not self.progress, dynamic_ncols=True
        )
        try:
            for batch_seqs in _batches(wanted(), cfg.batch_tokens):
                for s in batch_seqs:
                    table["id"].append(s.seq_id)
                    table["doc"].append(s.doc)
                    table["start"].append(s.start)
                    table["tokens"].append(s.tokens.astype(np.int32))
                batch = _make_batch(batch_seqs, self.pad_id, self.device)
                lo, hi = int(batch.seq_ids[0]), int(batch.seq_ids[-1])
                xs = mlp_inputs(self.model, batch.tokens)
                for layer, x in enumerate(xs):
                    slots, seq, pos = per_layer[layer]
                    a_lo, a_hi = np.searchsorted(seq, lo, "left"), np.searchsorted(seq, hi, "right")
                    if a_hi <= a_lo:
                        continue
                    acts = self.tc.activations(layer, x).float()  # (B, T, F)
                    acts[:, 0, :] = 0
                    s_slots, s_seq, s_pos = slots[a_lo:a_hi], seq[a_lo:a_hi], pos[a_lo:a_hi]
                    rows = np.searchsorted(batch.seq_ids, s_seq)
                    feats = examples[layer]["feature"][s_slots]
                    P = s_pos[:, None] + offsets[None, :]
                    ok = (P >= 0) & (P < batch.lengths[rows][:, None])
                    Pc = np.clip(P, 0, acts.shape[1] - 1)
                    got = acts[
                        torch.from_numpy(rows[:, None]),
                        torch.from_numpy(Pc),
                        torch.from_numpy(np.broadcast_to(feats[:, None], P.shape).copy()),
                    ]
                    windows[layer][s_slots] = np.where(ok, got.cpu().numpy(), 0.0)
                bar.update(len(batch_seqs))
        finally:
            bar.close()
        return windows, _sequence_table(table)


class _CorpusChanged(Exception):
    pass


def _seq_bytes(s: _Seq) -> bytes:
    return struct.pack("<qq", s.doc, s.tokens.size) + s.tokens.astype("<i8").tobytes()


def _sequence_table(t: dict[str, list]) -> dict[str, np.ndarray]:
    lengths = np.array([x.size for x in t["tokens"]], dtype=np.int64)
    return {
        "id": np.array(t["id"], dtype=np.int64),
        "doc": np.array(t["doc"], dtype=np.int64),
        "start": np.array(t["start"], dtype=np.int64),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "tokens": (np.concatenate(t["tokens"]) if t["tokens"] else np.zeros(0)).astype(np.int32),
    }


def compute_dashboards(
    model,
    corpus,
    out_path: str | os.PathLike,
    cfg: DashboardConfig | None = None,
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> Path:
    """Compute every feature's dashboard from ``corpus`` and write one store at ``out_path``.

    model: a ``ReplacementModel``. corpus: a re-iterable of texts (a list, ``read_corpus(path)``,
    ``hf_dataset_corpus(...)``, ``organism_corpus(...)``) or a function returning a fresh
    iterator; it is read twice (stream, then contexts) and again to resume.
    An interrupted run leaves ``.<out>.partial/``; rerunning with the same inputs resumes there.
    ``out_path`` must not exist unless ``overwrite`` (then a finished dashboards store there is
    replaced; anything else is refused). Returns ``out_path``.
    """
    cfg = cfg or DashboardConfig()
    out = Path(out_path)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; remove it or pass overwrite=True (--overwrite)")
        if not _is_store(out):
            raise ValueError(f"{out} exists and is not a dashboards store; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        run = _Run(model, corpus, out, cfg, progress)
        resumed = run.load_checkpoint()
        if not resumed:
            run.reset_partial()
        else:
            log.info("dashboards: resuming after %d tokens (%d batches)", run.meta["n_tokens"], run.meta["n_batches"])
        try:
            if not run.meta["stream_done"]:
                run.stream()
            break
        except _CorpusChanged:
            if attempt:
                raise RuntimeError("the corpus changes between reads; give a deterministic corpus") from None
            log.warning("dashboards: the corpus changed since the checkpoint; starting over")
            shutil.rmtree(run.partial)
    logits = run.logits()
    examples = _examples(run)
    windows, seqs = run.contexts([{"tid": e["tid"], "feature": e["feature"]} for e in examples])
    _write_store(run, examples, windows, seqs, logits)
    shutil.rmtree(run.partial, ignore_errors=True)
    return out


def _examples(run: _Run) -> list[dict[str, np.ndarray]]:
    """Per layer, every example slot: top-k (F*K) then quantile (F*Q*M), flattened."""
    cfg = run.cfg
    out = []
    for layer, st in enumerate(run.layers):
        bounds = quantile_bins(st.hist, cfg.n_quantiles)
        q_id, q_val = _choose_quantile_examples(st, layer, bounds, cfg.n_quantiles, cfg.seed)
        F, K = st.F, st.K
        tid = np.concatenate([st.top_id.reshape(-1), q_id.reshape(-1)])
        val = np.concatenate(
            [np.where(st.top_id >= 0, st.top_val, 0).reshape(-1).astype(np.float32), q_val.reshape(-1)]
        )
        feature = np.concatenate([np.repeat(np.arange(F), K), np.repeat(np.arange(F), q_id.shape[1] * q_id.shape[2])])
        out.append({"tid": tid, "value": val, "feature": feature, "bounds": bounds, "n_top": F * K})
    return out


# ============================================================================================
# Writing the store
# ============================================================================================


def _vocab_strings(model, d_vocab: int) -> list[str]:
    tok = model.tokenizer
    try:
        strings = tok.batch_decode([[i] for i in range(d_vocab)], clean_up_tokenization_spaces=False)
    except Exception:  # a tokenizer that cannot decode some ids (padded vocabularies)
        strings = []
        for i in range(d_vocab):
            try:
                strings.append(tok.decode([i], clean_up_tokenization_spaces=False))
            except Exception:
                strings.append(f"<{i}>")
    return [str(s) for s in strings]


def _encode_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in encoded])]).astype(np.int64)
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return data, offsets


def _decode_strings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = data.tobytes()
    return [raw[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(offsets.size - 1)]


def _labels(run: _Run, examples, seqs, logits: list[DecoderLogits], vocab: list[str]) -> list[str]:
    cfg = run.cfg
    short = [_short(t) for t in vocab]
    labels = []
    for layer, ex in enumerate(examples):
        F, K = run.tc.d_transcoder, cfg.top_k
        tid = ex["tid"][: F * K].reshape(F, K)
        seq_row = np.searchsorted(seqs["id"], tid >> POS_BITS).clip(0, max(seqs["id"].size - 1, 0))
        tok_at = np.full(tid.shape, -1, dtype=np.int64)
        has = tid >= 0
        if has.any():
            tok_at[has] = seqs["tokens"][seqs["offsets"][seq_row[has]] + (tid[has] & (MAX_SEQ_LEN - 1))]
        n_out = max(cfg.label_outputs * 3, cfg.label_outputs)  # enough to fill after de-duplication
        ins_all = tok_at.tolist()
        outs_all = logits[layer].top_id[:, :n_out].tolist()
        for f in range(F):
            ins = [short[t] for t in ins_all[f] if t >= 0]
            outs = [short[t] for t in outs_all[f]]
            labels.append(_compose_label(ins, outs, cfg.label_inputs, cfg.label_outputs))
    return labels


def _model_label(name: str) -> str:
    """A hub name as is; a local directory by its last component (no machine paths in the store)."""
    path = Path(str(name))
    return path.name if path.exists() else str(name)


def _write_store(run: _Run, examples, windows, seqs, logits: list[DecoderLogits]) -> None:
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.storage import LocalStore

    cfg, tc, model = run.cfg, run.tc, run.model
    L, F, K, Q, M, W = (
        model.n_layers,
        tc.d_transcoder,
        cfg.top_k,
        cfg.n_quantiles,
        cfg.examples_per_quantile,
        cfg.window,
    )
    d_vocab = int(model.W_U.shape[1])
    vocab = _vocab_strings(model, d_vocab)
    labels = _labels(run, examples, seqs, logits, vocab)

    creating = run.out.parent / f".{run.out.name}.creating"
    if creating.exists():
        shutil.rmtree(creating)
    store = LocalStore(str(creating))
    edges = cfg.hist_edges()
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": run.fingerprint,
        "config": cfg.result_dict(),
        "seq_len": run.seq_len,
        "kind": tc.kind,
        "n_layers": L,
        "d_transcoder": F,
        "d_vocab": d_vocab,
        "window": [cfg.context_before, cfg.context_after],
        "n_tokens": int(run.meta["n_tokens"]),
        "n_documents": int(run.meta["n_docs"]),
        "n_sequences": int(run.meta["n_seqs"]),
        "n_batches": int(run.meta["n_batches"]),
        "n_stored_sequences": int(seqs["id"].size),
        "hist_edges": [float(e) if np.isfinite(e) else None for e in edges],
        "model": {"name": _model_label(model.model_name), "digest": model.digest()},
        "transcoders": {
            "digest": tc.digest(),
            "kind": tc.kind,
            "scan": tc.scan,
            "feature_input_hook": tc.feature_input_hook,
            "feature_output_hook": tc.feature_output_hook,
        },
        "dtype": str(model.dtype),
    }
    zarr.create_group(store, attributes={_META: meta})
    compressor = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    fc = min(FEATURE_CHUNK, F)

    def create(name: str, shape: tuple, dtype, feature_axis: int | None):
        """Per-feature arrays (layer axis 0): chunks of ``fc`` features, one shard per layer
        holding every feature; 1-D tables: 64k-element chunks in one shard."""
        if 0 in shape:
            chunks, shards = tuple(max(1, s) for s in shape), None
        elif feature_axis is None:
            c = min(shape[0], _SPAN_CHUNK)
            chunks, shards = (c,), (-(-shape[0] // c) * c,)
        else:
            chunks = tuple(1 if i == 0 else fc if i == feature_axis else s for i, s in enumerate(shape))
            shards = tuple(1 if i == 0 else -(-s // fc) * fc if i == feature_axis else s for i, s in enumerate(shape))
        return zarr.create_array(
            store,
            name=name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            compressors=compressor,
            fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "."},
        )

    def put(name: str, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data)
        arr = create(name, data.shape, data.dtype, None)
        if data.size:
            arr[...] = data

    def put_layers(name: str, per_layer: list[np.ndarray], feature_axis: int = 1) -> None:
        """(L, ...) array written one layer (one shard) at a time, never stacked in memory."""
        first = per_layer[0]
        arr = create(name, (len(per_layer), *first.shape), first.dtype, feature_axis)
        for layer, data in enumerate(per_layer):
            arr[layer] = np.ascontiguousarray(data)

    n_top = F * K
    put_layers("stats/count", [st.count for st in run.layers])
    put_layers("stats/sum", [st.sum for st in run.layers])
    put_layers("stats/hist", [st.hist for st in run.layers])

    seq_index, pos = [], []
    for ex in examples:
        tid = ex["tid"]
        row = np.searchsorted(seqs["id"], tid >> POS_BITS)
        seq_index.append(np.where(tid >= 0, row, -1))
        pos.append(np.where(tid >= 0, tid & (MAX_SEQ_LEN - 1), 0).astype(np.int32))
    val = [ex["value"] for ex in examples]
    put_layers("top/value", [v[:n_top].reshape(F, K) for v in val])
    put_layers("top/seq", [x[:n_top].reshape(F, K) for x in seq_index])
    put_layers("top/pos", [x[:n_top].reshape(F, K) for x in pos])
    put_layers("top/window", [w[:n_top].reshape(F, K, W) for w in windows])
    put_layers("quantiles/bins", [ex["bounds"] for ex in examples])
    put_layers("quantiles/value", [v[n_top:].reshape(F, Q, M) for v in val])
    put_layers("quantiles/seq", [x[n_top:].reshape(F, Q, M) for x in seq_index])
    put_layers("quantiles/pos", [x[n_top:].reshape(F, Q, M) for x in pos])
    put_layers("quantiles/window", [w[n_top:].reshape(F, Q, M, W) for w in windows])

    for name in ("top_id", "top_value", "bottom_id", "bottom_value"):
        put_layers(f"logits/{name}", [getattr(lg, name) for lg in logits])
    if tc.kind == "cross_layer_transcoder":  # [source layer, output layer, feature, rank]
        for name in ("layer_top_id", "layer_top_value", "layer_bottom_id", "layer_bottom_value"):
            per_layer = []
            for layer, lg in enumerate(logits):
                arr = getattr(lg, name)  # (F, L - layer, V)
                full = np.full((L, F, arr.shape[2]), -1 if name.endswith("_id") else 0, dtype=arr.dtype)
                full[layer:] = np.moveaxis(arr, 1, 0)
                per_layer.append(full)
            put_layers(f"logits/{name}", per_layer, feature_axis=2)

    data, offsets = _encode_strings(labels)
    put("labels/bytes", data)
    put("labels/offsets", offsets)
    data, offsets = _encode_strings(vocab)
    put("vocab/bytes", data)
    put("vocab/offsets", offsets)
    for name in ("tokens", "offsets", "id", "doc", "start"):
        put(f"sequences/{name}", seqs[name])

    for root, _dirs, files in os.walk(creating):
        for name in files:
            with open(os.path.join(root, name), "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))
    if run.out.exists():
        shutil.rmtree(run.out)
    os.replace(creating, run.out)
    _fsync_dir(run.out.parent)


# ============================================================================================
# Reading: Dashboards
# ============================================================================================


def _f32(x) -> float | None:
    """A float32 value as the float of its shortest repr (deterministic JSON); None if not finite."""
    v = np.float32(x)
    if not np.isfinite(v):
        return None
    return float(str(v))


class Dashboards:
    """A finished dashboards store, opened read-only. Feature queries return JSON-able dicts."""

    def __init__(self, path: Path, meta: dict):
        import zarr
        from zarr.storage import LocalStore

        self.path = path
        self.meta = meta
        self._store = LocalStore(str(path), read_only=True)
        self._zarr = zarr
        self._arrays: dict[str, Any] = {}
        self._blocks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._vocab: list[str] | None = None
        self._labels: list[str] | None = None
        self.config = DashboardConfig.from_dict(meta["config"])
        self.n_layers: int = int(meta["n_layers"])
        self.d_transcoder: int = int(meta["d_transcoder"])
        self.kind: str = str(meta["kind"])
        self.n_tokens: int = int(meta["n_tokens"])

    @classmethod
    def open(cls, path: str | os.PathLike) -> Dashboards:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no dashboards store at {path}; compute it with `circuit-pipeline features`")
        try:
            doc = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ValueError(f"{path} is not a dashboards store (no readable zarr.json)") from None
        meta = doc.get("attributes", {}).get(_META)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a dashboards store ({FORMAT})")
        if int(meta.get("version", -1)) != FORMAT_VERSION:
            raise ValueError(
                f"{path} has dashboards format version {meta.get('version')}, this code reads "
                f"{FORMAT_VERSION}; recompute it"
            )
        return cls(path, meta)

    def __repr__(self) -> str:
        return (
            f"Dashboards({str(self.path)!r}, kind={self.kind!r}, n_layers={self.n_layers}, "
            f"d_transcoder={self.d_transcoder}, n_tokens={self.n_tokens})"
        )

    # ------------------------------------------------------------------ raw access
    def _array(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = self._zarr.open_array(self._store, path=name, mode="r")
        return self._arrays[name]

    def _cached(self, key: tuple, load: Callable[[], np.ndarray]) -> np.ndarray:
        block = self._blocks.get(key)
        if block is None:
            block = load()
            self._blocks[key] = block
            if len(self._blocks) > _CACHE_BLOCKS:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return block

    def _feat(self, name: str, layer: int, f: int) -> np.ndarray:
        """Feature f of ``layer`` from a per-feature array (one 64-feature block read, cached)."""
        c, r = divmod(f, FEATURE_CHUNK)
        sl = slice(c * FEATURE_CHUNK, (c + 1) * FEATURE_CHUNK)
        if name.startswith("logits/layer_"):  # (L, L, F, V): feature axis 2
            block = self._cached((name, layer, c), lambda: np.asarray(self._array(name)[layer, :, sl]))
            return block[:, r]
        block = self._cached((name, layer, c), lambda: np.asarray(self._array(name)[layer, sl]))
        return block[r]

    def _span(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of a 1-D table (read in cached 64k-element chunks)."""
        n = _SPAN_CHUNK
        parts = []
        for c in range(start // n, (max(stop, start + 1) - 1) // n + 1):
            block = self._cached((name, c), lambda c=c: np.asarray(self._array(name)[c * n : (c + 1) * n]))
            parts.append(block[max(start - c * n, 0) : max(min(stop - c * n, n), 0)])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    @property
    def vocab(self) -> list[str]:
        """Every token id's string (tokenizer.decode of the one id)."""
        if self._vocab is None:
            self._vocab = _decode_strings(
                np.asarray(self._array("vocab/bytes")[...]), np.asarray(self._array("vocab/offsets")[...])
            )
        return self._vocab

    def _check(self, layer, index) -> tuple[int, int]:
        for what, v in (("layer", layer), ("feature", index)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{what} must be an integer, got {v!r}")
        layer, index = int(layer), int(index)
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range: the store has layers 0..{self.n_layers - 1}")
        if not 0 <= index < self.d_transcoder:
            raise ValueError(f"feature {index} out of range: layer {layer} has features 0..{self.d_transcoder - 1}")
        return layer, index

    # ------------------------------------------------------------------ queries
    def labels(self) -> dict[tuple[int, int], str]:
        """Automatic label of every feature, keyed (layer, feature): ``create_graph_files(labels=...)``."""
        if self._labels is None:
            self._labels = _decode_strings(
                np.asarray(self._array("labels/bytes")[...]), np.asarray(self._array("labels/offsets")[...])
            )
        F = self.d_transcoder
        return {(i // F, i % F): s for i, s in enumerate(self._labels)}

    def label(self, layer: int, index: int) -> str:
        layer, index = self._check(layer, index)
        i = layer * self.d_transcoder + index
        offs = self._span("labels/offsets", i, i + 2)
        return self._span("labels/bytes", int(offs[0]), int(offs[1])).tobytes().decode("utf-8")

    def feature(self, layer: int, index: int) -> dict[str, Any]:
        """One feature's dashboard as a JSON-able dict (what ``export_feature_json`` writes)::

            {"layer", "feature", "label",
             "n_tokens", "n_firing", "density", "mean_activation", "max_activation",
             "histogram": {"edges": [H+1 floats], "counts": [H ints]},  # non-empty span only;
                          # log-spaced edges, the last one is max_activation for the overflow bin
             "top_examples": [EXAMPLE, ...],          # best first, at most top_k
             "quantiles": [{"index": q, "range": [lo, hi],  # [lo, hi); hi null = unbounded
                            "cdf": [p_lo, p_hi],            # exact share of firings below lo / hi
                            "count": n, "examples": [EXAMPLE, ...]}, ...],  # non-empty groups
             "logits": {"top": [LOGIT × n_logits], "bottom": [LOGIT × n_logits],  # most negative first
                        "per_output_layer": [{"layer", "top", "bottom"}, ...]}}  # CLT only
            EXAMPLE = {"value", "sequence", "document", "position", "doc_start", "max_index",
                       "token_ids": [...], "tokens": [...], "activations": [...]}
                       # the window around the token; tokens[max_index] is the example's token
            LOGIT = {"token", "token_id", "value"}

        Floats are float32 values written with their shortest repr.
        """
        layer, f = self._check(layer, index)
        cfg = self.config
        count = int(self._feat("stats/count", layer, f))
        total = float(self._feat("stats/sum", layer, f))
        hist = self._feat("stats/hist", layer, f)
        top_val = self._feat("top/value", layer, f)
        top_seq = self._feat("top/seq", layer, f)
        top_pos = self._feat("top/pos", layer, f)
        top_win = self._feat("top/window", layer, f)
        examples = [self._example(v, s, p, w) for v, s, p, w in zip(top_val, top_seq, top_pos, top_win) if s >= 0]

        edges = np.asarray([e if e is not None else np.inf for e in self.meta["hist_edges"]], dtype=np.float64)
        max_act = float(top_val[0]) if examples else 0.0
        bins = self._feat("quantiles/bins", layer, f)
        q_val = self._feat("quantiles/value", layer, f)
        q_seq = self._feat("quantiles/seq", layer, f)
        q_pos = self._feat("quantiles/pos", layer, f)
        q_win = self._feat("quantiles/window", layer, f)
        cum = np.concatenate([[0], np.cumsum(hist)])
        quantiles = []
        for q in range(cfg.n_quantiles):
            b0, b1 = int(bins[q]), int(bins[q + 1])
            n_q = int(cum[b1] - cum[b0])
            if n_q == 0:
                continue
            quantiles.append(
                {
                    "index": q,
                    "range": [_f32(edges[b0]), _f32(edges[b1])],  # [lo, hi); hi None: unbounded
                    "cdf": [float(cum[b0] / count), float(cum[b1] / count)],
                    "count": n_q,
                    "examples": [
                        self._example(v, s, p, w)
                        for v, s, p, w in zip(q_val[q], q_seq[q], q_pos[q], q_win[q])
                        if s >= 0
                    ],
                }
            )
        nz = np.nonzero(hist)[0]
        if nz.size:
            b0, b1 = int(nz[0]), int(nz[-1]) + 1
            hi_edges = [edges[b] if np.isfinite(edges[b]) else max_act for b in range(b0, b1 + 1)]
            histogram = {"edges": [_f32(e) for e in hi_edges], "counts": [int(c) for c in hist[b0:b1]]}
        else:
            histogram = {"edges": [], "counts": []}

        vocab = self.vocab
        logits = {
            "top": self._logit_list("top", layer, f, vocab),
            "bottom": self._logit_list("bottom", layer, f, vocab),
        }
        if self.kind == "cross_layer_transcoder":
            per = []
            for out_layer in range(layer, self.n_layers):
                per.append(
                    {
                        "layer": out_layer,
                        "top": self._logit_list("layer_top", layer, f, vocab, out_layer),
                        "bottom": self._logit_list("layer_bottom", layer, f, vocab, out_layer),
                    }
                )
            logits["per_output_layer"] = per
        return {
            "layer": layer,
            "feature": f,
            "label": self.label(layer, f),
            "n_tokens": self.n_tokens,
            "n_firing": count,
            "density": float(count / self.n_tokens) if self.n_tokens else 0.0,
            "mean_activation": _f32(total / count) if count else 0.0,
            "max_activation": _f32(max_act),
            "histogram": histogram,
            "top_examples": examples,
            "quantiles": quantiles,
            "logits": logits,
        }

    def _logit_list(self, prefix: str, layer: int, f: int, vocab: list[str], out_layer: int | None = None):
        ids = self._feat(f"logits/{prefix}_id", layer, f)
        vals = self._feat(f"logits/{prefix}_value", layer, f)
        if out_layer is not None:
            ids, vals = ids[out_layer], vals[out_layer]
        return [{"token": vocab[int(i)], "token_id": int(i), "value": _f32(v)} for i, v in zip(ids, vals)]

    def _sequence(self, row: int) -> tuple[np.ndarray, int, int, int]:
        offs = self._span("sequences/offsets", row, row + 2)
        tokens = self._span("sequences/tokens", int(offs[0]), int(offs[1]))
        return (
            tokens,
            int(self._span("sequences/id", row, row + 1)[0]),
            int(self._span("sequences/doc", row, row + 1)[0]),
            int(self._span("sequences/start", row, row + 1)[0]),
        )

    def _example(self, value, row, pos, window) -> dict[str, Any]:
        tokens, seq_id, doc, start = self._sequence(int(row))
        cfg = self.config
        pos = int(pos)
        lo = max(0, pos - cfg.context_before)
        hi = min(tokens.size, pos + cfg.context_after + 1)
        acts = window[lo - (pos - cfg.context_before) : hi - (pos - cfg.context_before)]
        vocab = self.vocab
        return {
            "value": _f32(value),
            "sequence": seq_id,
            "document": doc,
            "position": pos,
            "doc_start": start,
            "max_index": pos - lo,
            "token_ids": [int(t) for t in tokens[lo:hi]],
            "tokens": [vocab[int(t)] for t in tokens[lo:hi]],
            "activations": [_f32(a) for a in acts],
        }


# ============================================================================================
# Per-graph feature JSON for the viewer
# ============================================================================================


def graph_features(graph) -> list[tuple[int, int]]:
    """(layer, feature) of every feature node of a graph JSON (path or dict), sorted, unique."""
    if not isinstance(graph, Mapping):
        graph = json.loads(Path(graph).read_text(encoding="utf-8"))
    out = set()
    for node in graph.get("nodes", []):
        if node.get("feature_type") != "cross layer transcoder":
            continue
        layer, feature, _pos = str(node["node_id"]).split("_")
        out.add((int(layer), int(feature)))
    return sorted(out)


def feature_json_bytes(record: Mapping[str, Any]) -> bytes:
    """Deterministic bytes of one feature record (fixed key order, compact, UTF-8)."""
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def export_feature_json(
    dash: Dashboards, features: Iterable[tuple[int, int]] | Mapping | str | os.PathLike, out_dir: str | os.PathLike
) -> list[Path]:
    """Write ``out_dir/features/{layer}_{feature}.json`` for the given features only.

    features: (layer, feature) pairs, or a graph JSON (path or dict) whose feature nodes are
    taken. Each file is ``Dashboards.feature(layer, feature)``; bytes are deterministic and
    each file is written atomically. Returns the paths written, in (layer, feature) order.
    """
    if isinstance(features, (str, os.PathLike, Mapping)):
        features = graph_features(features)
    pairs = sorted({(int(l), int(f)) for l, f in features})
    for l, f in pairs:
        dash._check(l, f)
    folder = Path(out_dir) / "features"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for l, f in pairs:
        path = folder / f"{l}_{f}.json"
        data = feature_json_bytes(dash.feature(l, f))
        if not (path.exists() and path.read_bytes() == data):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        paths.append(path)
    return paths
