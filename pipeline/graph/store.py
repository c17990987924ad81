"""The on-disk attribution graph, a Zarr v3 store, and its reader :class:`Graph`.

A store holds its rows in *compute order*, the order the attribution engine writes::

    [active features (n_active, sorted by (layer, pos, feature)),
     error nodes (n_layers * n_pos, layer-major), token nodes (n_pos), logit nodes (n_logits)]

:class:`Graph` exposes *graph order*, circuit-tracer's adjacency order::

    [selected features (n_selected, sorted by active-feature index),
     error nodes (n_layers * n_pos, layer-major), token nodes (n_pos), logit nodes (n_logits)]

``A[target, source]`` is the direct effect of ``source`` on ``target``. Only the rows of the
selected features and the logits are stored (error and token rows are zero); graph order drops
the columns of unselected active features. :class:`~pipeline.graph.layout.NodeLayout` holds the
index arithmetic of both orders. This module holds the format's names and read primitives;
:mod:`pipeline.graph.writer` writes stores. File layout and crash safety: ``docs/formats.md``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr
from zarr.storage import LocalStore

from pipeline import _io
from pipeline.graph.layout import NodeLayout

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Graph",
    "GraphStoreCorruptError",
    "GraphStoreError",
    "GraphStoreIncompleteError",
    "GraphStoreMismatchError",
    "verify_store",
]

FORMAT = "circuit-pipeline/attribution-graph"
FORMAT_VERSION = 2  # 2: every chunk carries a CRC32C checksum (1: none; still read)
READABLE_VERSIONS = (1, 2)

# Names inside a store (see docs/formats.md)
META_KEY = "graph_store"  # the store's own metadata in the root zarr.json attributes
NODES = "nodes"  # group of node tables
ADJ = "adjacency"  # group of batches of rows
PROGRESS = "progress"  # directory of the batches' done records
ROW_INDEX = f"{ADJ}/row_index"
SELECTED = "selected_features"  # node table written by finalize


class GraphStoreError(RuntimeError):
    """Base class for graph-store errors that are not mismatches."""


class GraphStoreMismatchError(ValueError):
    """The output path holds a store written for other inputs (or no graph store at all)."""


class GraphStoreIncompleteError(GraphStoreError):
    """The store exists but attribution has not finished writing it."""


class GraphStoreCorruptError(GraphStoreError, ValueError):
    """A finished store is damaged: a chunk fails its checksum or cannot be decoded, a file or a
    progress record is missing, or an array has the wrong shape."""


def fix_hint(path: Path) -> str:
    """What to do about a damaged store."""
    return (
        f"The store cannot be trusted: delete it (rm -r '{path}') and re-run attribute with the "
        f"same inputs to recompute it (`circuit-pipeline verify {path}` lists every problem)."
    )


# ---------------------------------------------------------------------------------------------
# Format primitives, shared by the reader and the writer
# ---------------------------------------------------------------------------------------------


def batch_name(batch_index: int) -> str:
    """Directory name of a batch under ``adjacency/`` (its done record adds ``.json``)."""
    return f"batch_{batch_index:06d}"


def batch_index_of(name: str) -> int | None:
    """The batch index of a batch directory or record name; None for any other name."""
    m = re.fullmatch(r"batch_(\d{6,})(\.json)?", name)
    return int(m.group(1)) if m else None


def root_meta(path: Path) -> dict[str, Any] | None:
    """The store's own metadata from the root zarr.json, or None if it is not a graph store."""
    try:
        doc = _io.read_json(path / "zarr.json")
    except (OSError, ValueError):
        return None
    meta = doc.get("attributes", {}).get(META_KEY) if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    return meta


def done_records(path: Path) -> dict[int, dict[str, Any]]:
    """The done record of every recorded batch, by batch index ({} for an unreadable record)."""
    records: dict[int, dict[str, Any]] = {}
    progress = path / PROGRESS
    if not progress.is_dir():
        return records
    for entry in os.listdir(progress):
        if not entry.endswith(".json") or entry.startswith("."):
            continue
        index = batch_index_of(entry)
        if index is None:
            continue
        try:
            records[index] = _io.read_json(progress / entry)
        except (OSError, ValueError):
            records[index] = {}
    return dict(sorted(records.items()))


def chunk_key(ndim: int) -> str:
    """File name of an array's one chunk ("v2" chunk keys: ``0``, ``0.0``, ...)."""
    return ".".join(["0"] * max(ndim, 1))


def read_array(store: LocalStore, name: str) -> np.ndarray:
    """The whole one-chunk array ``name``; GraphStoreCorruptError naming the store, the array
    and its chunk file if the chunk is missing, fails its checksum or cannot be decoded."""
    root = Path(store.root)
    if not (root / name / "zarr.json").is_file():  # no such array: zarr's own error
        return np.asarray(zarr.open_array(store, path=name, mode="r")[...])
    chunk = f"{name}/<chunk>"
    try:
        arr = zarr.open_array(store, path=name, mode="r")
        chunk = f"{name}/{chunk_key(arr.ndim)}"
        if arr.size and not (root / chunk).is_file():  # zarr would read the fill value
            raise FileNotFoundError(f"chunk file {chunk} is missing")
        return np.asarray(arr[...])
    except Exception as exc:
        raise GraphStoreCorruptError(
            f"{root}: array {name!r} is damaged (chunk file {chunk}): {type(exc).__name__}: "
            f"{str(exc).rstrip('.')}. {fix_hint(root)}"
        ) from exc


def read_batch_arrays(store: LocalStore, batch_index: int, *, with_extra: bool = False) -> dict[str, np.ndarray]:
    """One stored batch: targets (B,), indptr (B+1,), indices (nnz,), values (nnz,), and with
    ``with_extra`` its ``extra_<name>`` arrays. Every read of a batch's rows goes through here."""
    prefix = f"{ADJ}/{batch_name(batch_index)}"
    out = {k: read_array(store, f"{prefix}/{k}") for k in ("targets", "indptr", "indices", "values")}
    if with_extra:
        batch_dir = Path(store.root) / prefix
        for entry in sorted(os.listdir(batch_dir)):
            if entry.startswith("extra_"):
                out[entry] = read_array(store, f"{prefix}/{entry}")
    return out


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


def _node_table(name: str, doc: str) -> cached_property[np.ndarray]:
    """A cached property of :class:`Graph`: its node table ``name``."""

    def read(graph: Graph) -> np.ndarray:
        return graph.table(name)

    read.__doc__ = doc
    return cached_property(read)


class Graph:
    """A finished attribution graph, read lazily from its store, in circuit-tracer's node order.

    Graph order: [selected features (n_selected), errors (n_layers * n_pos, layer-major),
    tokens (n_pos), logits (n_logits)]; ``A[target, source]``. Only the row index and the
    selected features are read on open; rows are read one stored batch at a time.
    """

    def __init__(self, path: Path, meta: dict[str, Any], attrs: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint: str = meta["fingerprint"]
        self.layout = NodeLayout.from_dict(meta["layout"])
        self.summary: dict[str, int] = meta.get("summary", {})
        self.attrs: dict[str, Any] = attrs
        self._store = LocalStore(path, read_only=True)
        self.batches: list[int] = list(done_records(path))
        self.selected_features = read_array(self._store, f"{NODES}/{SELECTED}").astype(np.int64)
        lay = self.layout
        self.n_layers, self.n_pos = lay.n_layers, lay.n_pos
        self.n_active, self.n_logits = lay.n_active, lay.n_logits
        self.n_selected = len(self.selected_features)
        self.n_nodes = self.n_selected + lay.n_errors + lay.n_pos + lay.n_logits
        self.feature_slice = slice(0, self.n_selected)
        self.error_slice = slice(self.n_selected, self.n_selected + lay.n_errors)
        self.token_slice = slice(self.error_slice.stop, self.error_slice.stop + lay.n_pos)
        self.logit_slice = slice(self.token_slice.stop, self.token_slice.stop + lay.n_logits)
        self._cached_batch: tuple[int, dict[str, np.ndarray]] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Graph:
        """Open a finished store; raises GraphStoreIncompleteError for an unfinished one."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no attribution graph at {path}")
        meta = root_meta(path)
        if meta is None:
            raise ValueError(f"{path} is not a circuit-pipeline attribution graph store")
        if meta.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{path}: store format version {meta.get('version')} is not supported "
                f"(this reader reads versions {list(READABLE_VERSIONS)}); recompute it with attribute"
            )
        if not meta.get("finished"):
            n_done = len(done_records(path))
            raise GraphStoreIncompleteError(
                f"{path} is an unfinished attribution graph ({n_done} batches written): rerun "
                f"attribution with the same inputs to resume it (or delete it to start over)"
            )
        problems = check_structure(path, meta)
        if problems:
            raise GraphStoreCorruptError(_problems_message(path, problems))
        attrs = _io.read_json(path / "zarr.json")["attributes"].get("attrs", {})
        return cls(path, meta, attrs)

    # -- node tables --------------------------------------------------------------------------
    @property
    def table_names(self) -> list[str]:
        nodes = self.path / NODES
        return sorted(e for e in os.listdir(nodes) if (nodes / e / "zarr.json").is_file())

    def table(self, name: str) -> np.ndarray:
        """Node table ``nodes/<name>`` (e.g. "active_features", "logit_vectors")."""
        if name not in self.table_names:
            raise KeyError(f"{self.path} has no node table {name!r}; it has {self.table_names}")
        return read_array(self._store, f"{NODES}/{name}")

    # the node tables every reader of a graph uses, each read on first use
    active_features = _node_table(
        "active_features", "(n_active, 3) int: (layer, pos, feature) of every active feature, compute order."
    )
    activation_values = _node_table("activation_values", "(n_active,) activation of every active feature.")
    input_tokens = _node_table("input_tokens", "(n_pos,) token ids of the prompt.")
    logit_tokens = _node_table("logit_tokens", "(n_logits,) token ids of the logit nodes.")
    logit_probabilities = _node_table("logit_probabilities", "(n_logits,) probabilities of the logit nodes.")

    # -- node index helpers (graph order) ------------------------------------------------------
    def feature_node(self, active_index: int) -> int:
        """Graph-order node of active feature ``active_index``; ValueError if not selected."""
        i = int(np.searchsorted(self.selected_features, active_index))
        if i == self.n_selected or self.selected_features[i] != active_index:
            raise ValueError(
                f"active feature {active_index} is not a selected feature of this graph (its row was not computed)"
            )
        return i

    def error_node(self, layer: int, pos: int) -> int:
        return self._graph_node_past_features(self.layout.compute_error_node(layer, pos))

    def token_node(self, pos: int) -> int:
        return self._graph_node_past_features(self.layout.compute_token_node(pos))

    def logit_node(self, i: int) -> int:
        return self._graph_node_past_features(self.layout.compute_logit_node(i))

    def node_kind(self, node: int) -> str:
        """ "feature" | "error" | "token" | "logit" for a graph-order node."""
        self._check_node(node)
        for kind, s in (("feature", self.feature_slice), ("error", self.error_slice), ("token", self.token_slice)):
            if node < s.stop:
                return kind
        return "logit"

    def node_active_index(self, node: int) -> int:
        """Active-feature index of a graph-order feature node."""
        if self.node_kind(node) != "feature":
            raise ValueError(f"node {node} is a {self.node_kind(node)} node, not a feature")
        return int(self.selected_features[node])

    def graph_to_compute(self, nodes: np.ndarray | int) -> np.ndarray:
        """Compute-order ids of graph-order nodes."""
        nodes = np.asarray(nodes, dtype=np.int64)
        if nodes.size and (nodes.min() < 0 or nodes.max() >= self.n_nodes):
            raise IndexError(f"graph nodes must lie in [0, {self.n_nodes})")
        is_feature = nodes < self.n_selected
        safe = np.where(is_feature, nodes, 0)
        features = self.selected_features[safe] if self.n_selected else safe
        return np.where(is_feature, features, nodes - self.n_selected + self.n_active)

    def compute_to_graph(self, nodes: np.ndarray | int) -> np.ndarray:
        """Graph-order ids of compute-order nodes; -1 for unselected active features."""
        nodes = np.asarray(nodes, dtype=np.int64)
        if nodes.size and (nodes.min() < 0 or nodes.max() >= self.layout.n_compute):
            raise IndexError(f"compute nodes must lie in [0, {self.layout.n_compute})")
        return self._compute_to_graph_map[nodes].astype(np.int64)

    @cached_property
    def _compute_to_graph_map(self) -> np.ndarray:
        """(n_compute,) graph-order id of each compute-order node, -1 if dropped (int32 unless
        the graph has 2**31 nodes, to keep per-batch temporaries small)."""
        dtype = np.int32 if self.layout.n_compute < 2**31 else np.int64
        m = np.full(self.layout.n_compute, -1, dtype=dtype)
        m[self.selected_features] = np.arange(self.n_selected)
        m[self.n_active :] = np.arange(self.n_selected, self.n_nodes)
        return m

    def _graph_node_past_features(self, compute_node: int) -> int:
        """Graph-order id of a compute-order error, token or logit node (both orders keep
        these nodes in the same order, after the features)."""
        return compute_node - self.n_active + self.n_selected

    def _check_node(self, node: int) -> None:
        if not 0 <= node < self.n_nodes:
            raise IndexError(f"node {node} out of range [0, {self.n_nodes})")

    # -- adjacency ----------------------------------------------------------------------------
    @cached_property
    def _row_index(self) -> np.ndarray:
        """(n_rows, 3) int64 [compute target, batch, row in batch], sorted by target."""
        return read_array(self._store, ROW_INDEX)

    def _batch(self, batch_index: int) -> dict[str, np.ndarray]:
        if self._cached_batch is None or self._cached_batch[0] != batch_index:
            self._cached_batch = (batch_index, read_batch_arrays(self._store, batch_index))
        return self._cached_batch[1]

    def compute_row(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """Row of compute-order node ``node``: (compute-order columns, values); empty if absent."""
        if not 0 <= node < self.layout.n_compute:
            raise IndexError(f"compute node {node} out of range [0, {self.layout.n_compute})")
        ri = self._row_index
        i = int(np.searchsorted(ri[:, 0], node))
        if i == len(ri) or ri[i, 0] != node:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        batch = self._batch(int(ri[i, 1]))
        lo, hi = batch["indptr"][ri[i, 2]], batch["indptr"][ri[i, 2] + 1]
        return batch["indices"][lo:hi].astype(np.int64), batch["values"][lo:hi]

    def row(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """Row of graph-order ``node``: (graph-order columns, values). Empty for errors/tokens."""
        self._check_node(node)
        cols, vals = self.compute_row(int(self.graph_to_compute(node)))
        mapped = self._compute_to_graph_map[cols].astype(np.int64)
        keep = mapped >= 0
        return mapped[keep], vals[keep]

    def read_batch(self, batch_index: int) -> dict[str, np.ndarray]:
        """A stored batch as written (compute order): targets, indptr, indices, values, extra_*."""
        if batch_index not in self.batches:
            raise KeyError(f"{self.path} has no batch {batch_index}")
        return read_batch_arrays(self._store, batch_index, with_extra=True)

    def iter_compute_rows(self) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Per stored batch: (compute-order target ids (B,), csr (B, n_compute))."""
        n = self.layout.n_compute
        for b in self.batches:
            batch = read_batch_arrays(self._store, b)
            csr = sp.csr_matrix(
                (batch["values"], batch["indices"].astype(np.int64), batch["indptr"]),
                shape=(len(batch["targets"]), n),
            )
            yield batch["targets"], csr

    def iter_row_blocks(self) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Per stored batch: (graph-order row ids (B,), csr (B, n_nodes) in graph order).

        Reads one batch at a time (bounded memory); rows of unselected features and columns of
        unselected features are dropped; batches left with no rows are skipped.
        """
        m = self._compute_to_graph_map
        for b in self.batches:
            batch = read_batch_arrays(self._store, b)
            targets, indptr = batch["targets"], batch["indptr"]
            rows = m[targets]
            keep_row = rows >= 0
            if not keep_row.any():
                continue
            row_of_entry = np.repeat(np.arange(len(targets), dtype=m.dtype), np.diff(indptr))
            cols = m[batch["indices"]]
            keep = (cols >= 0) & keep_row[row_of_entry]
            counts = np.bincount(row_of_entry[keep], minlength=len(targets))[keep_row]
            new_indptr = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=new_indptr[1:])
            csr = sp.csr_matrix(
                (batch["values"][keep], cols[keep], new_indptr),
                shape=(len(counts), self.n_nodes),
            )
            yield rows[keep_row].astype(np.int64), csr

    def to_scipy_sparse(self) -> sp.csr_matrix:
        """(n_nodes, n_nodes) csr adjacency in graph order."""
        ids, blocks = [], []
        for rows, block in self.iter_row_blocks():
            ids.append(rows)
            blocks.append(block)
        if not blocks:
            return sp.csr_matrix((self.n_nodes, self.n_nodes), dtype=np.float32)
        rows = np.concatenate(ids)
        order = np.argsort(rows, kind="stable")
        stacked = sp.vstack(blocks, format="csr")[order]
        indptr = np.zeros(self.n_nodes + 1, dtype=np.int64)
        indptr[rows[order] + 1] = np.diff(stacked.indptr)
        np.cumsum(indptr, out=indptr)
        return sp.csr_matrix((stacked.data, stacked.indices, indptr), shape=(self.n_nodes, self.n_nodes))

    def adjacency_dense(self, max_nodes: int = 20000) -> np.ndarray:
        """(n_nodes, n_nodes) float32 dense adjacency in graph order, for small graphs only."""
        if self.n_nodes > max_nodes:
            gib = self.n_nodes**2 * 4 / 2**30
            raise ValueError(
                f"{self.path}: {self.n_nodes} nodes is more than max_nodes={max_nodes} (a dense "
                f"matrix would take {gib:.1f} GiB); use to_scipy_sparse() or iter_row_blocks(), "
                f"or raise max_nodes"
            )
        dense = np.zeros((self.n_nodes, self.n_nodes), dtype=np.float32)
        for rows, block in self.iter_row_blocks():
            dense[rows] = block.toarray()
        return dense

    def verify(self) -> None:
        """The full check of :func:`verify_store` (every chunk read, every batch re-hashed);
        raises GraphStoreCorruptError listing every problem."""
        problems = verify_store(self.path)
        if problems:
            raise GraphStoreCorruptError(_problems_message(self.path, problems))

    def __repr__(self) -> str:
        return (
            f"Graph({str(self.path)!r}, n_nodes={self.n_nodes}, n_selected={self.n_selected}, "
            f"n_active={self.n_active}, n_layers={self.n_layers}, n_pos={self.n_pos}, "
            f"n_logits={self.n_logits})"
        )


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

#: node tables with one row per node of a kind, and the layout field that counts them
TABLE_ROWS = {
    "active_features": "n_active",
    "activation_values": "n_active",
    "input_tokens": "n_pos",
    "logit_tokens": "n_logits",
    "logit_probabilities": "n_logits",
    "logit_vectors": "n_logits",
    "error_vectors": "n_layers",
    "token_embeddings": "n_pos",
}


def _problems_message(path: Path, problems: list[str]) -> str:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return f"{path} is a damaged attribution graph store: {shown}. {fix_hint(path)}"


def _array_shape(path: Path, name: str) -> tuple[int, ...] | None:
    """An array's shape from its zarr.json; None if it has none or is unreadable."""
    try:
        doc = _io.read_json(path / name / "zarr.json")
        if doc.get("node_type") != "array":
            return None
        return tuple(int(n) for n in doc["shape"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_structure(path: Path, meta: dict[str, Any]) -> list[str]:
    """The cheap checks of a finished store (no chunk is read): the summary, a progress record
    for every batch and a batch for every record, the recorded files present with their recorded
    sizes, the node tables, the selection and the row index with the shapes the layout says.
    Returns the problems found (none: [])."""
    problems: list[str] = []
    try:
        layout = NodeLayout.from_dict(meta.get("layout", {}))
    except (ValueError, TypeError) as exc:
        return [f"metadata: bad layout ({exc})"]
    summary = meta.get("summary")
    if not isinstance(summary, dict) or not all(
        isinstance(summary.get(k), int) for k in ("n_batches", "n_rows", "nnz")
    ):
        return [f"metadata: the summary of a finished store is missing or malformed ({summary!r})"]
    records = done_records(path)
    for b, record in records.items():
        if not record:
            problems.append(f"progress record {PROGRESS}/{batch_name(b)}.json is unreadable")
    adjacency = path / ADJ
    batch_dirs = {
        i for i in (batch_index_of(e) for e in (os.listdir(adjacency) if adjacency.is_dir() else [])) if i is not None
    }
    for b in sorted(batch_dirs - set(records)):
        problems.append(f"batch {b} ({ADJ}/{batch_name(b)}) has no progress record ({PROGRESS}/{batch_name(b)}.json)")
    for b in sorted(set(records) - batch_dirs):
        problems.append(f"batch {b} is recorded but its directory {ADJ}/{batch_name(b)} is missing")
    if len(records) != summary["n_batches"]:
        problems.append(
            f"{len(records)} progress records, but the store was finished with {summary['n_batches']} batches"
        )
    good = [r for r in records.values() if r]
    n_rows = sum(int(r.get("n_rows", 0)) for r in good)
    nnz = sum(int(r.get("nnz", 0)) for r in good)
    if len(good) == len(records) and (n_rows, nnz) != (summary["n_rows"], summary["nnz"]):
        problems.append(
            f"the progress records count {n_rows} rows / {nnz} entries, the summary {summary['n_rows']} / {summary['nnz']}"
        )
    for b, record in records.items():
        for rel, info in (record.get("files") or {}).items():
            try:
                size = os.path.getsize(path / rel)
            except OSError:
                problems.append(f"batch {b}: file {rel} is missing")
                continue
            if not isinstance(info, dict) or size != info.get("size"):
                problems.append(f"batch {b}: file {rel} has {size} bytes, its record says {info.get('size')}")
    nodes = path / NODES
    for name in sorted(os.listdir(nodes)) if nodes.is_dir() else []:
        if not (nodes / name / "zarr.json").is_file():
            continue
        shape = _array_shape(path, f"{NODES}/{name}")
        field = TABLE_ROWS.get(name)
        if shape is None:
            problems.append(f"node table {NODES}/{name}: unreadable zarr.json")
        elif field is not None and (not shape or shape[0] != getattr(layout, field)):
            problems.append(
                f"node table {NODES}/{name} has shape {shape}; the layout needs {field}={getattr(layout, field)} rows"
            )
    for name, ok in (
        (f"{NODES}/{SELECTED}", lambda sh: len(sh) == 1 and sh[0] <= layout.n_active),
        (ROW_INDEX, lambda sh: sh == (summary["n_rows"], 3)),
    ):
        shape = _array_shape(path, name)
        if shape is None:
            problems.append(f"array {name} is missing or its zarr.json is unreadable")
        elif not ok(shape):
            problems.append(f"array {name} has the wrong shape {shape}")
    return problems


def _arrays(path: Path) -> list[str]:
    """Every array of a store, by its path inside the store."""
    out = []
    for d, dirs, files in os.walk(path):
        dirs[:] = sorted(e for e in dirs if not e.startswith("."))
        if d != str(path) and "zarr.json" in files and _array_shape(Path(d), "") is not None:
            out.append(Path(d).relative_to(path).as_posix())
    return sorted(out)


def verify_store(path: str | os.PathLike[str]) -> list[str]:
    """The full check of a store: :func:`check_structure`, every batch's files re-hashed against
    its progress record, every array read whole (so every chunk's checksum is checked), and
    the row index checked against the batches. Returns the problems found (none: [])."""
    path = Path(path)
    if not path.is_dir():
        return [f"no graph store at {path}"]
    meta = root_meta(path)
    if meta is None:
        return ["not a circuit-pipeline attribution graph store (root zarr.json missing or unreadable)"]
    if meta.get("version") not in READABLE_VERSIONS:
        return [
            f"store format version {meta.get('version')} is not supported (this reader reads {list(READABLE_VERSIONS)})"
        ]
    if not meta.get("finished"):
        return ["unfinished: attribution has not finished writing it (rerun attribute with the same inputs to resume)"]
    problems = check_structure(path, meta)
    records = done_records(path)
    for b, record in records.items():
        for rel, info in (record.get("files") or {}).items():
            try:
                actual = _io.file_digest(path / rel)
            except OSError:
                continue  # reported by check_structure
            if actual != info:
                problems.append(f"batch {b}: file {rel} does not match the SHA-256 in its progress record")
    store = LocalStore(path, read_only=True)
    data: dict[str, np.ndarray] = {}
    for name in _arrays(path):
        try:
            data[name] = read_array(store, name)
        except Exception as exc:
            problems.append(f"array {name} is unreadable ({str(exc).split('. The store cannot')[0]})")
    row_index = data.get(ROW_INDEX)
    if row_index is not None and row_index.ndim == 2 and row_index.shape[1] == 3:
        for b in np.unique(row_index[:, 1]).tolist():
            targets = data.get(f"{ADJ}/{batch_name(b)}/targets")
            if b not in records:
                problems.append(f"the row index points into batch {b}, which has no progress record")
            elif targets is not None:
                rows = row_index[row_index[:, 1] == b]
                if rows[:, 2].max() >= len(targets) or not np.array_equal(targets[rows[:, 2]], rows[:, 0]):
                    problems.append(f"the row index does not match the targets of batch {b}")
    return problems
