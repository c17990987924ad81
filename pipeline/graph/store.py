"""The on-disk attribution graph: a Zarr v3 store written batch by batch while attribution runs.

Two node orders
---------------
*Compute order* is what the attribution engine writes and what the store holds::

    [active features (n_active, sorted by (layer, pos, feature)),
     error nodes (n_layers * n_pos, index layer * n_pos + pos),
     token nodes (n_pos),
     logit nodes (n_logits)]

*Graph order* is circuit-tracer's adjacency order, which :class:`Graph` exposes::

    [selected features (n_selected, sorted by active-feature index),
     error nodes (n_layers * n_pos, layer-major), token nodes (n_pos), logit nodes (n_logits)]

``A[target, source]`` is the direct effect of ``source`` on ``target``. Rows exist only for
targets whose rows were computed (the selected features and the logits); error and token rows
are zero and never stored. In graph order the columns of unselected active features are dropped.
:class:`NodeLayout` defines both orders and every index helper, once.

On-disk layout (``<out>/`` is a Zarr v3 group, LocalStore; every array is one chunk, Blosc-zstd
with byte shuffle, "v2" chunk keys, so an array is a directory with ``zarr.json`` and ``0``)::

    zarr.json                         group; attributes (JSON, keys sorted):
                                        graph_store: {format, version, fingerprint, layout,
                                                      finished, summary (once finished)}
                                        attrs:       the caller's attributes
    nodes/zarr.json                   group
    nodes/<table>/                    one array per node table, written once at creation
                                      (active_features (n_active, 3), activation_values,
                                      input_tokens, logit_tokens, ...), plus
                                      selected_features (n_selected,) int64, written by finalize
    adjacency/zarr.json               group
    adjacency/batch_{i:06d}/          one group per batch of rows (CSR, compute order):
        targets  (B,)    int64          compute-order node id of each row
        indptr   (B+1,)  int64          row r holds entries indptr[r]:indptr[r+1]
        indices  (nnz,)  int32          compute-order column ids (int64 if n_compute >= 2**31)
        values   (nnz,)  float32
        extra_<name>                    optional per-batch arrays from the engine
    adjacency/row_index/              (n_rows, 3) int64 [target, batch, row in batch], sorted by
                                      target; written by finalize
    progress/batch_{i:06d}.json       the batch's "done" record: {batch, n_rows, nnz, files:
                                      {relative path: {size, sha256}}}

A store holds 10 files and 5 directories per batch (25k selected features in batches of 256:
~1000 files), plus 2 files per node table.

Durability and crash safety
---------------------------
Every file is written through :func:`_write_bytes` (temp file, fsync, ``os.replace``).
A batch is written as: remove any stale ``adjacency/batch_i`` left by a crash, write its
arrays, fsync its directories, then write ``progress/batch_i.json`` atomically and fsync
``progress/``. A batch is done if and only if its record exists, so a crash at any point (kill
-9, full disk) leaves it either recorded with complete, fsynced chunks or not recorded; the next
``GraphStoreWriter.open`` removes the unrecorded leftovers and temp files, and the engine
rewrites that batch. ``finished`` is a flag in the root ``zarr.json``, which is replaced
atomically by ``finalize`` after everything else is durable. Store creation happens in a sibling
directory ``.<name>.creating`` renamed into place. Content is deterministic (no timestamps, JSON
with sorted keys, deterministic compression): the same inputs give byte-identical files,
whether or not the run was interrupted. One writer per store at a time (no locking).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from pipeline.graph.layout import NodeLayout

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Graph",
    "GraphStoreError",
    "GraphStoreIncompleteError",
    "GraphStoreMismatchError",
    "GraphStoreWriter",
    "NodeLayout",
    "write_graph_from_dense",
]

FORMAT = "circuit-pipeline/attribution-graph"
FORMAT_VERSION = 1

_META_KEY = "graph_store"
_NODES = "nodes"
_ADJ = "adjacency"
_PROGRESS = "progress"
_ROW_INDEX = f"{_ADJ}/row_index"
_SELECTED = "selected_features"
_TMP_SUFFIX = ".tmp"
_STAGING = ".staging"  # inside the store; only during an atomic table write
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class GraphStoreError(RuntimeError):
    """Base class for graph-store errors that are not mismatches."""


class GraphStoreMismatchError(ValueError):
    """The output path holds a store written for other inputs (or no graph store at all)."""


class GraphStoreIncompleteError(GraphStoreError):
    """The store exists but attribution has not finished writing it."""


# ---------------------------------------------------------------------------------------------
# Low-level durable I/O. Every byte of a store is written by _write_bytes (tests monkeypatch it
# to inject ENOSPC or a kill); _hook marks the points between the phases of a batch.
# ---------------------------------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename).

    The parent directory is not fsynced here; callers fsync directories once per batch.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _hook(event: str, batch_index: int) -> None:
    """No-op extension point for tests ("before_record", "recorded" for each batch)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree_dirs(root: Path) -> None:
    """fsync every directory under ``root`` (deepest first), then ``root`` and its parent."""
    dirs = [Path(d) for d, _, _ in os.walk(root)]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(d)
    _fsync_dir(root.parent)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def _jsonable(obj: Any) -> Any:
    """A JSON-able copy of ``obj`` with keys sorted at every level (numpy scalars/arrays ok)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"attribute value {o!r} of type {type(o).__name__} is not JSON-able")

    return json.loads(json.dumps(obj, sort_keys=True, default=default))


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "size": size}


class _DurableLocalStore(LocalStore):
    """A zarr LocalStore whose writes go through :func:`_write_bytes` (atomic + fsynced)."""

    async def _set(self, key: str, value: Any, exclusive: bool = False) -> None:
        if not self._is_open:
            await self._open()
        self._write(key, value, exclusive)

    def set_sync(self, key: str, value: Any) -> None:
        self._ensure_open_sync()
        self._write(key, value, False)

    def _write(self, key: str, value: Any, exclusive: bool) -> None:
        self._check_writable()
        path = self.root / key
        if exclusive and path.exists():
            raise FileExistsError(path)
        _write_bytes(path, value.as_buffer_like())


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


def _create_array(store: LocalStore, name: str | None, data: np.ndarray) -> None:
    """Write ``data`` as a one-chunk compressed array at ``name`` (``None``: the store root)."""
    data = np.ascontiguousarray(data)
    if data.dtype.hasobject or data.dtype.kind not in "biufc":
        raise TypeError(f"array {name!r}: only numeric/bool dtypes are stored, got {data.dtype}")
    chunks = tuple(max(int(s), 1) for s in data.shape)
    arr = zarr.create_array(
        store,
        name=name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        compressors=_compressor(),
        fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "."},  # chunk file <array>/0: no c/ dirs
        config={"write_empty_chunks": True},
    )
    if data.size:
        arr[...] = data


def _read_array(store: LocalStore, name: str) -> np.ndarray:
    return np.asarray(zarr.open_array(store, path=name, mode="r")[...])


def _batch_name(batch_index: int) -> str:
    return f"batch_{batch_index:06d}"


def _index_of_batch_name(name: str) -> int | None:
    m = re.fullmatch(r"batch_(\d{6,})(\.json)?", name)
    return int(m.group(1)) if m else None


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.startswith("__"):
        raise ValueError(f"invalid {what} name {name!r}: use letters, digits, '_', '.', '-'")


def _root_meta(path: Path) -> dict[str, Any] | None:
    """The store's own metadata from the root zarr.json, or None if it is not a graph store."""
    try:
        doc = _read_json(path / "zarr.json")
    except (OSError, ValueError):
        return None
    meta = doc.get("attributes", {}).get(_META_KEY) if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    return meta


def _root_attributes(meta: dict[str, Any], attrs: Mapping[str, Any]) -> dict[str, Any]:
    return _jsonable({_META_KEY: meta, "attrs": dict(attrs)})


def _done_records(path: Path) -> dict[int, dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    progress = path / _PROGRESS
    if not progress.is_dir():
        return records
    for entry in os.listdir(progress):
        if not entry.endswith(".json") or entry.startswith("."):
            continue
        index = _index_of_batch_name(entry)
        if index is None:
            continue
        try:
            records[index] = _read_json(progress / entry)
        except (OSError, ValueError):
            records[index] = {}
    return dict(sorted(records.items()))


def _mismatch_message(path: Path, why: str) -> str:
    return f"{path} {why}. Delete it (rm -r '{path}') to recompute the graph, or choose another output path (--out)."


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


class GraphStoreWriter:
    """Writes an attribution graph batch by batch; resumable after any crash.

    Use :meth:`open`; then ``write_batch`` for every batch not in ``done_batches``, then
    ``finalize``. If ``finished`` is True after ``open`` the store is complete and read-only.
    """

    done_batches: set[int]
    finished: bool

    def __init__(self, path: Path, layout: NodeLayout, fingerprint: str, finished: bool) -> None:
        self.path = path
        self.layout = layout
        self.fingerprint = fingerprint
        self.finished = finished
        self._records = _done_records(path)
        self.done_batches = set(self._records)
        self._store = _DurableLocalStore(path, read_only=finished)

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        fingerprint: str,
        layout: Mapping[str, int] | NodeLayout,
        tables: Mapping[str, np.ndarray],
        attrs: Mapping[str, Any],
    ) -> GraphStoreWriter:
        """Create the store at ``path``, or resume/open the store already there.

        layout: {"n_layers", "n_pos", "n_active", "n_logits"}; tables: node tables stored under
        ``nodes/`` (written once); attrs: JSON-able group attributes.
        Raises GraphStoreMismatchError if ``path`` holds a store for another fingerprint or
        layout, other tables, or anything that is not a graph store.
        """
        path = Path(path)
        if not path.name:  # "." or "/..."
            path = path.resolve()
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("fingerprint must be a non-empty string")
        layout = layout if isinstance(layout, NodeLayout) else NodeLayout.from_dict(layout)
        tables = {name: np.ascontiguousarray(array) for name, array in tables.items()}
        for name, array in tables.items():
            _check_name(name, "table")
            _check_table_shape(name, array, layout)
        attributes = _root_attributes(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "layout": layout.to_dict(),
                "finished": False,
            },
            attrs,
        )

        creating = path.with_name(f".{path.name}.creating")
        if creating.exists():  # a crashed creation: it never became the store
            shutil.rmtree(creating)
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            _create_store(path, creating, attributes, tables)
            return cls(path, layout, fingerprint, finished=False)

        meta = _root_meta(path)
        if meta is None:
            raise GraphStoreMismatchError(
                _mismatch_message(path, "exists and is not a circuit-pipeline attribution graph")
            )
        if meta.get("version") != FORMAT_VERSION:
            raise GraphStoreMismatchError(
                _mismatch_message(
                    path, f"was written in store format version {meta.get('version')}, not {FORMAT_VERSION}"
                )
            )
        if meta.get("fingerprint") != fingerprint:
            raise GraphStoreMismatchError(
                _mismatch_message(
                    path,
                    f"holds an attribution graph for other inputs (fingerprint "
                    f"{meta.get('fingerprint')!r}, this run {fingerprint!r})",
                )
            )
        if meta.get("layout") != layout.to_dict():
            raise GraphStoreMismatchError(
                _mismatch_message(path, f"has node layout {meta.get('layout')}, this run {layout.to_dict()}")
            )
        if meta.get("finished"):
            return cls(path, layout, fingerprint, finished=True)

        _recover(path)
        writer = cls(path, layout, fingerprint, finished=False)
        writer._check_tables(tables)
        current = _read_json(path / "zarr.json").get("attributes")
        if current != attributes:  # same inputs, other description: the latest run's wins
            writer._write_root_attributes(attributes)
        return writer

    def _check_tables(self, tables: Mapping[str, np.ndarray]) -> None:
        for name, array in tables.items():
            try:
                stored = _read_array(self._store, f"{_NODES}/{name}")
            except (FileNotFoundError, KeyError, ValueError) as exc:
                raise GraphStoreMismatchError(_mismatch_message(self.path, f"has no node table {name!r}")) from exc
            if stored.dtype != array.dtype or not np.array_equal(stored, array):
                raise GraphStoreMismatchError(
                    _mismatch_message(self.path, f"has a different node table {name!r} under the same fingerprint")
                )

    # -- batches ------------------------------------------------------------------------------
    def write_batch(
        self,
        batch_index: int,
        target_nodes: np.ndarray,
        indptr: np.ndarray,
        indices: np.ndarray,
        values: np.ndarray,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Durably write one batch of rows (CSR, compute order) and record it as done.

        target_nodes: (B,) compute-order ids of the rows (features or logits); indptr: (B+1,);
        indices: (nnz,) compute-order column ids; values: (nnz,) float32; extra: optional
        per-batch arrays stored beside them. A batch already recorded is not rewritten (its row
        and entry counts must match). Raises OSError (e.g. ENOSPC) with the batch unrecorded.
        """
        self._check_writable()
        batch_index = _check_batch_index(batch_index)
        targets, indptr, indices, values = self._check_batch(target_nodes, indptr, indices, values)
        extra = {k: np.ascontiguousarray(v) for k, v in (extra or {}).items()}
        for name in extra:
            _check_name(name, "extra array")
        if batch_index in self.done_batches:
            record = self._records[batch_index]
            if record.get("n_rows") != len(targets) or record.get("nnz") != len(indices):
                raise ValueError(
                    f"batch {batch_index} is already recorded in {self.path} with "
                    f"{record.get('n_rows')} rows / {record.get('nnz')} entries, but was given "
                    f"{len(targets)} rows / {len(indices)} entries: batches must be deterministic"
                )
            return

        name = _batch_name(batch_index)
        batch_dir = self.path / _ADJ / name
        if batch_dir.exists():  # left by a crash or a failed write: start it over
            shutil.rmtree(batch_dir)
        zarr.create_group(self._store, path=f"{_ADJ}/{name}")
        arrays = {"targets": targets, "indptr": indptr, "indices": indices, "values": values}
        arrays.update({f"extra_{k}": v for k, v in sorted(extra.items())})
        for key, array in arrays.items():
            _create_array(self._store, f"{_ADJ}/{name}/{key}", array)
        _fsync_tree_dirs(batch_dir)

        files = {}
        for file in sorted(p for p in batch_dir.rglob("*") if p.is_file()):
            files[file.relative_to(self.path).as_posix()] = _file_digest(file)
        record = {"batch": batch_index, "n_rows": int(len(targets)), "nnz": int(len(indices)), "files": files}
        _hook("before_record", batch_index)
        _write_bytes(self.path / _PROGRESS / f"{name}.json", _json_bytes(record))
        _fsync_dir(self.path / _PROGRESS)
        self._records[batch_index] = record
        self.done_batches.add(batch_index)
        _hook("recorded", batch_index)

    def read_batch(self, batch_index: int) -> dict[str, np.ndarray]:
        """A recorded batch as written: targets, indptr, indices, values, extra_<name>."""
        if batch_index not in self.done_batches:
            raise KeyError(f"batch {batch_index} is not recorded in {self.path}")
        return _read_batch(self._store, batch_index, with_extra=True)

    def _check_batch(
        self, targets: Any, indptr: Any, indices: Any, values: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        lay = self.layout
        targets = _as_int_array(targets, "target_nodes", np.int64)
        indptr = _as_int_array(indptr, "indptr", np.int64)
        index_dtype = np.int32 if lay.n_compute < 2**31 else np.int64
        indices = _as_int_array(indices, "indices", np.int64)
        values = np.asarray(values)
        if values.ndim != 1 or not (values.dtype.kind == "f" or values.size == 0):
            raise ValueError(f"values must be a 1-D float array, got {values.dtype} {values.shape}")
        values = np.ascontiguousarray(values, dtype=np.float32)
        n_rows, nnz = len(targets), len(indices)
        if len(indptr) != n_rows + 1:
            raise ValueError(f"indptr has length {len(indptr)}, expected {n_rows + 1} (B+1)")
        if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
            raise ValueError(f"indptr must rise from 0 to nnz={nnz}")
        if len(values) != nnz:
            raise ValueError(f"values has length {len(values)}, indices {nnz}")
        bad = ~lay.is_compute_row_target(targets)
        if bad.any():
            raise ValueError(
                f"target nodes {targets[bad][:5].tolist()} are not feature or logit nodes in "
                f"compute order (n_active={lay.n_active}, logits from "
                f"{lay.compute_logit_slice.start} to {lay.n_compute})"
            )
        if len(np.unique(targets)) != n_rows:
            raise ValueError("target_nodes repeat a node within the batch")
        if nnz and (indices.min() < 0 or indices.max() >= lay.n_compute):
            raise ValueError(f"column indices must lie in [0, {lay.n_compute})")
        return targets, indptr, indices.astype(index_dtype), values

    # -- tables and finishing -----------------------------------------------------------------
    def write_table(self, name: str, array: np.ndarray) -> None:
        """Write (or replace) node table ``nodes/<name>`` atomically and durably."""
        self._check_writable()
        _check_name(name, "table")
        array = np.ascontiguousarray(array)
        if name == _SELECTED:
            array = _check_selected(array, self.layout.n_active)
        _check_table_shape(name, array, self.layout)
        self._write_array_atomic(f"{_NODES}/{name}", array)

    def _write_array_atomic(self, rel: str, array: np.ndarray) -> None:
        staging = self.path / _STAGING
        new, old = staging / "new", staging / "old"
        if staging.exists():
            shutil.rmtree(staging)
        _create_array(_DurableLocalStore(new), None, array)
        old.mkdir(parents=True)
        _fsync_tree_dirs(staging)
        target = self.path / rel
        if target.exists():  # moved aside; _recover moves it back if we crash before the swap
            (old / target.parent.name).mkdir()
            os.replace(target, old / target.parent.name / target.name)
        os.replace(new, target)
        _fsync_dir(target.parent)
        shutil.rmtree(staging)
        _fsync_dir(self.path)

    def finalize(self, attrs: Mapping[str, Any] | None = None) -> Graph:
        """Check and index the rows, mark the store finished (atomically), return the Graph.

        attrs: extra attributes merged into the caller's attributes. If no
        ``selected_features`` table was written, the features whose rows are stored are used.
        """
        if self.finished:
            return Graph.open(self.path)
        _recover(self.path)
        parts = [np.zeros((0, 3), dtype=np.int64)]
        for b in sorted(self.done_batches):
            t = _read_array(self._store, f"{_ADJ}/{_batch_name(b)}/targets")
            parts.append(np.stack([t, np.full(len(t), b), np.arange(len(t))], axis=1))
        row_index = np.concatenate(parts).astype(np.int64)
        row_index = row_index[np.argsort(row_index[:, 0], kind="stable")]
        dup = row_index[1:, 0] == row_index[:-1, 0]
        if dup.any():
            nodes = np.unique(row_index[1:, 0][dup])
            raise ValueError(
                f"{self.path}: compute-order nodes {nodes[:10].tolist()} have rows in more than "
                f"one batch; each target must be written once"
            )
        features = row_index[row_index[:, 0] < self.layout.n_active, 0]
        if not (self.path / _NODES / _SELECTED).exists():
            self.write_table(_SELECTED, features)
        else:
            selected = _read_array(self._store, f"{_NODES}/{_SELECTED}")
            hidden = np.setdiff1d(features, selected)
            if len(hidden):
                warnings.warn(
                    f"{self.path}: {len(hidden)} stored feature rows (active features "
                    f"{hidden[:5].tolist()}...) are not in selected_features; graph-order reads "
                    f"leave them out (iter_compute_rows still has them)",
                    stacklevel=2,
                )
        self._write_array_atomic(_ROW_INDEX, row_index)

        current = _read_json(self.path / "zarr.json")["attributes"]
        meta = dict(current[_META_KEY])
        meta["finished"] = True
        meta["summary"] = {
            "n_batches": len(self.done_batches),
            "n_rows": int(len(row_index)),
            "nnz": int(sum(r["nnz"] for r in self._records.values())),
        }
        merged = dict(current.get("attrs", {}))
        merged.update(attrs or {})
        self._write_root_attributes(_root_attributes(meta, merged))
        self.finished = True
        self._store = _DurableLocalStore(self.path, read_only=True)
        return Graph.open(self.path)

    def _write_root_attributes(self, attributes: dict[str, Any]) -> None:
        doc = {"attributes": attributes, "node_type": "group", "zarr_format": 3}
        _write_bytes(self.path / "zarr.json", _json_bytes(doc))
        _fsync_dir(self.path)

    def _check_writable(self) -> None:
        if self.finished:
            raise GraphStoreError(f"{self.path} is a finished graph store; it is read-only")

    def __repr__(self) -> str:
        state = "finished" if self.finished else f"{len(self.done_batches)} batches done"
        return f"GraphStoreWriter({str(self.path)!r}, {state})"


def _create_store(path: Path, creating: Path, attributes: dict[str, Any], tables: Mapping[str, np.ndarray]) -> None:
    creating.parent.mkdir(parents=True, exist_ok=True)
    store = _DurableLocalStore(creating)
    root = zarr.create_group(store, attributes=attributes)
    root.create_group(_NODES)
    root.create_group(_ADJ)
    for name in sorted(tables):
        _create_array(store, f"{_NODES}/{name}", tables[name])
    (creating / _PROGRESS).mkdir()
    _write_bytes(  # written again by us so that its bytes never depend on zarr's JSON style
        creating / "zarr.json",
        _json_bytes({"attributes": attributes, "node_type": "group", "zarr_format": 3}),
    )
    _fsync_tree_dirs(creating)
    if path.exists():
        path.rmdir()  # an empty directory (checked by the caller)
    os.replace(creating, path)
    _fsync_dir(path.parent)


def _recover(path: Path) -> None:
    """Bring an unfinished store back to its last durable state (see module docstring)."""
    staging = path / _STAGING
    if staging.exists():
        old = staging / "old"
        if old.is_dir():  # crashed between moving an array aside and moving its successor in
            for parent in old.iterdir():
                for entry in parent.iterdir():
                    if not (path / parent.name / entry.name).exists():
                        os.replace(entry, path / parent.name / entry.name)
        shutil.rmtree(staging)
    for d, _, files in os.walk(path):
        for f in files:
            if f.startswith(".") and f.endswith(_TMP_SUFFIX):
                os.unlink(os.path.join(d, f))
    records = _done_records(path)
    adjacency = path / _ADJ
    for entry in sorted(os.listdir(adjacency)) if adjacency.is_dir() else []:
        index = _index_of_batch_name(entry)
        if index is None:
            continue
        record = records.get(index)
        if record is None or not _record_files_present(path, record):
            shutil.rmtree(adjacency / entry)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path / _PROGRESS / f"{entry}.json")
    for index in records:  # a record without its batch: not done
        if not (adjacency / _batch_name(index)).is_dir():
            os.unlink(path / _PROGRESS / f"{_batch_name(index)}.json")
    for d in (path / _PROGRESS, adjacency, path / _NODES, path):
        if d.is_dir():
            _fsync_dir(d)


def _record_files_present(path: Path, record: Mapping[str, Any]) -> bool:
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, info in files.items():
        try:
            if os.path.getsize(path / rel) != info["size"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def _check_batch_index(batch_index: Any) -> int:
    if isinstance(batch_index, bool) or not isinstance(batch_index, (int, np.integer)):
        raise TypeError(f"batch_index must be an int, got {batch_index!r}")
    if batch_index < 0:
        raise ValueError(f"batch_index must be >= 0, got {batch_index}")
    return int(batch_index)


def _as_int_array(a: Any, what: str, dtype: type) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1 or not (a.dtype.kind in "iu" or a.size == 0):
        raise ValueError(f"{what} must be a 1-D integer array, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a, dtype=dtype)


def _check_selected(array: np.ndarray, n_active: int) -> np.ndarray:
    array = _as_int_array(array, _SELECTED, np.int64)
    if array.size and (array[0] < 0 or array[-1] >= n_active or np.any(np.diff(array) <= 0)):
        raise ValueError(f"{_SELECTED} must be sorted, unique indices into the {n_active} active features")
    return array


_TABLE_ROWS = {
    "active_features": "n_active",
    "activation_values": "n_active",
    "input_tokens": "n_pos",
    "logit_tokens": "n_logits",
    "logit_probabilities": "n_logits",
    "logit_vectors": "n_logits",
}


def _check_table_shape(name: str, array: np.ndarray, layout: NodeLayout) -> None:
    """Known tables must have one row per node of their kind."""
    field = _TABLE_ROWS.get(name)
    if field is None:
        return
    expected = getattr(layout, field)
    if array.ndim == 0 or array.shape[0] != expected:
        raise ValueError(f"table {name!r} has shape {array.shape}; expected {field}={expected} rows")
    if name == "active_features" and (array.ndim != 2 or array.shape[1] != 3):
        raise ValueError(f"table 'active_features' must be (n_active, 3), got {array.shape}")


def _read_batch(store: LocalStore, batch_index: int, *, with_extra: bool = False) -> dict:
    prefix = f"{_ADJ}/{_batch_name(batch_index)}"
    out = {k: _read_array(store, f"{prefix}/{k}") for k in ("targets", "indptr", "indices", "values")}
    if with_extra:
        batch_dir = Path(store.root) / prefix
        for entry in sorted(os.listdir(batch_dir)):
            if entry.startswith("extra_"):
                out[entry] = _read_array(store, f"{prefix}/{entry}")
    return out


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


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
        self.batches: list[int] = list(_done_records(path))
        self.selected_features = _read_array(self._store, f"{_NODES}/{_SELECTED}").astype(np.int64)
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
        meta = _root_meta(path)
        if meta is None:
            raise ValueError(f"{path} is not a circuit-pipeline attribution graph store")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: store format version {meta.get('version')} is not supported "
                f"(this reader reads version {FORMAT_VERSION})"
            )
        if not meta.get("finished"):
            n_done = len(_done_records(path))
            raise GraphStoreIncompleteError(
                f"{path} is an unfinished attribution graph ({n_done} batches written): rerun "
                f"attribution with the same inputs to resume it (or delete it to start over)"
            )
        attrs = _read_json(path / "zarr.json")["attributes"].get("attrs", {})
        return cls(path, meta, attrs)

    # -- node tables --------------------------------------------------------------------------
    @property
    def table_names(self) -> list[str]:
        nodes = self.path / _NODES
        return sorted(e for e in os.listdir(nodes) if (nodes / e / "zarr.json").is_file())

    def table(self, name: str) -> np.ndarray:
        """Node table ``nodes/<name>`` (e.g. "active_features", "logit_vectors")."""
        if name not in self.table_names:
            raise KeyError(f"{self.path} has no node table {name!r}; it has {self.table_names}")
        return _read_array(self._store, f"{_NODES}/{name}")

    @cached_property
    def active_features(self) -> np.ndarray:
        """(n_active, 3) int: (layer, pos, feature) of every active feature, compute order."""
        return self.table("active_features")

    @cached_property
    def activation_values(self) -> np.ndarray:
        """(n_active,) activation of every active feature."""
        return self.table("activation_values")

    @cached_property
    def input_tokens(self) -> np.ndarray:
        """(n_pos,) token ids of the prompt."""
        return self.table("input_tokens")

    @cached_property
    def logit_tokens(self) -> np.ndarray:
        """(n_logits,) token ids of the logit nodes."""
        return self.table("logit_tokens")

    @cached_property
    def logit_probabilities(self) -> np.ndarray:
        """(n_logits,) probabilities of the logit nodes."""
        return self.table("logit_probabilities")

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
        self.layout.check_layer_pos(layer, pos)
        return self.error_slice.start + layer * self.n_pos + pos

    def token_node(self, pos: int) -> int:
        self.layout.check_layer_pos(0, pos)
        return self.token_slice.start + pos

    def logit_node(self, i: int) -> int:
        if not 0 <= i < self.n_logits:
            raise IndexError(f"logit {i} out of range [0, {self.n_logits})")
        return self.logit_slice.start + i

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

    def _check_node(self, node: int) -> None:
        if not 0 <= node < self.n_nodes:
            raise IndexError(f"node {node} out of range [0, {self.n_nodes})")

    # -- adjacency ----------------------------------------------------------------------------
    @cached_property
    def _row_index(self) -> np.ndarray:
        """(n_rows, 3) int64 [compute target, batch, row in batch], sorted by target."""
        return _read_array(self._store, _ROW_INDEX)

    def _batch(self, batch_index: int) -> dict[str, np.ndarray]:
        if self._cached_batch is None or self._cached_batch[0] != batch_index:
            self._cached_batch = (batch_index, _read_batch(self._store, batch_index))
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
        return _read_batch(self._store, batch_index, with_extra=True)

    def iter_compute_rows(self) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Per stored batch: (compute-order target ids (B,), csr (B, n_compute))."""
        n = self.layout.n_compute
        for b in self.batches:
            batch = _read_batch(self._store, b)
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
            batch = _read_batch(self._store, b)
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
        """Re-hash every batch's files against its done record; raises ValueError on damage."""
        for b, record in _done_records(self.path).items():
            for rel, info in record.get("files", {}).items():
                try:
                    actual = _file_digest(self.path / rel)
                except OSError as exc:
                    raise ValueError(f"{self.path}: batch {b} file {rel} unreadable: {exc}") from exc
                if actual != info:
                    raise ValueError(f"{self.path}: batch {b} file {rel} does not match its record")

    def __repr__(self) -> str:
        return (
            f"Graph({str(self.path)!r}, n_nodes={self.n_nodes}, n_selected={self.n_selected}, "
            f"n_active={self.n_active}, n_layers={self.n_layers}, n_pos={self.n_pos}, "
            f"n_logits={self.n_logits})"
        )


# ---------------------------------------------------------------------------------------------
# Test helper for other modules
# ---------------------------------------------------------------------------------------------


def write_graph_from_dense(
    path: str | os.PathLike[str],
    dense_compute_order: np.ndarray,
    layout: Mapping[str, int] | NodeLayout,
    tables: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    *,
    selected_features: np.ndarray | None = None,
    fingerprint: str | None = None,
) -> Graph:
    """Make a finished store from a dense (n_compute, n_compute) matrix in compute order.

    Rows are written for the logits (first) and the ``selected_features`` (default: every
    active feature), ``batch_size`` rows per batch; every nonzero of those rows is stored.
    """
    layout = layout if isinstance(layout, NodeLayout) else NodeLayout.from_dict(layout)
    dense = np.asarray(dense_compute_order)
    n = layout.n_compute
    if dense.shape != (n, n):
        raise ValueError(f"dense matrix has shape {dense.shape}, layout needs ({n}, {n})")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if selected_features is None:
        selected_features = np.arange(layout.n_active, dtype=np.int64)
    selected_features = _check_selected(np.asarray(selected_features), layout.n_active)
    if fingerprint is None:
        h = hashlib.sha256(np.ascontiguousarray(dense, dtype=np.float32).tobytes())
        h.update(_json_bytes(layout.to_dict()))
        h.update(selected_features.tobytes())
        fingerprint = "dense:" + h.hexdigest()
    writer = GraphStoreWriter.open(
        path,
        fingerprint=fingerprint,
        layout=layout,
        tables=dict(tables or {}),
        attrs=dict(attrs or {}),
    )
    if writer.finished:
        return Graph.open(path)
    logits = np.arange(layout.compute_logit_slice.start, n, dtype=np.int64)
    targets = np.concatenate([logits, selected_features])
    for b, start in enumerate(range(0, len(targets), batch_size)):
        if b in writer.done_batches:
            continue
        rows = targets[start : start + batch_size]
        block = sp.csr_matrix(np.asarray(dense[rows], dtype=np.float32))
        block.eliminate_zeros()
        writer.write_batch(b, rows, block.indptr.astype(np.int64), block.indices, block.data)
    writer.write_table(_SELECTED, selected_features)
    return writer.finalize()
