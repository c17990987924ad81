"""Writing an attribution graph store batch by batch, resumable after any crash.

The engine opens a :class:`GraphStoreWriter`, writes every batch of rows not yet recorded, and
finalizes; :func:`write_graph_from_dense` does the same from a dense matrix (for tests).

Crash safety: every file is written atomically (:func:`write_file`); a batch is done if and
only if its ``progress/`` record exists, written after its fsynced arrays. ``open`` removes what
a crash left unrecorded and the engine rewrites that batch; ``finalize`` indexes the rows and
flips ``finished`` in the root ``zarr.json`` last. The same inputs give byte-identical files,
interrupted or not. One writer per store at a time: ``open`` takes the store's lock
(:class:`pipeline._io.StoreLock`) and fails fast if another process holds it. A full disk
raises :class:`GraphStoreDiskFullError` naming the store; the run resumes from the last recorded
batch once there is space. Protocol: ``docs/formats.md``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import LocalStore

from pipeline import _io
from pipeline._io import StoreLock
from pipeline.graph.layout import NodeLayout
from pipeline.graph.store import (
    ADJ,
    FORMAT,
    FORMAT_VERSION,
    META_KEY,
    NODES,
    PROGRESS,
    READABLE_VERSIONS,
    ROW_INDEX,
    SELECTED,
    TABLE_ROWS,
    Graph,
    GraphStoreError,
    GraphStoreMismatchError,
    batch_index_of,
    batch_name,
    done_records,
    read_array,
    read_batch_arrays,
    root_meta,
)

__all__ = ["GraphStoreDiskFullError", "GraphStoreWriter", "write_graph_from_dense"]

_STAGING = ".staging"  # inside the store; only during an atomic table write
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------
# Crash-test seams: the crash tests replace these two module attributes to inject a full disk
# or a kill -9 at an exact point of a write.
# ---------------------------------------------------------------------------------------------


def write_file(path: Path, data: bytes | memoryview) -> None:
    """Write one file of a store atomically and durably; every byte of a store goes through here.

    The parent directory is not fsynced: callers fsync directories once per batch.
    """
    _io.atomic_write_bytes(path, data, sync_dir=False)


def batch_phase(event: str, batch_index: int) -> None:
    """No-op marker between the phases of a batch: "before_record", then "recorded"."""


# ---------------------------------------------------------------------------------------------
# Arrays: one chunk each, Blosc-zstd with byte shuffle then a CRC32C checksum, written durably
# ---------------------------------------------------------------------------------------------


class _DurableLocalStore(LocalStore):
    """A zarr LocalStore whose every write goes through :func:`write_file` (zarr 3 writes
    through ``_set`` and ``set_sync``)."""

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
        write_file(path, value.as_buffer_like())


def _compressors() -> tuple[BloscCodec, Crc32cCodec]:
    """Every chunk is compressed, then checksummed: a damaged chunk fails its read."""
    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec()


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
        compressors=_compressors(),
        fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "."},  # chunk file <array>/0: no c/ dirs
        config={"write_empty_chunks": True},
    )
    if data.size:
        arr[...] = data


# ---------------------------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------------------------

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class GraphStoreDiskFullError(OSError):
    """The disk (or quota) filled up while writing a store; ``errno`` is ENOSPC (or EDQUOT)."""


@contextlib.contextmanager
def _disk_full_guard(path: Path, what: str, partial: Path | None = None) -> Iterator[None]:
    """Re-raise a full disk inside the block as :class:`GraphStoreDiskFullError` naming the
    store and the fix; ``partial`` (an unrecorded batch directory) is removed to free space."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL or isinstance(exc, GraphStoreDiskFullError):
            raise
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise GraphStoreDiskFullError(
            exc.errno,
            f"no space left on device while writing {what} of the graph store {path} "
            f"({exc.filename or exc.strerror}): free space and rerun: the run resumes from the "
            f"last finished batch",
        ) from exc


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

    def __init__(
        self, path: Path, layout: NodeLayout, fingerprint: str, finished: bool, lock: StoreLock | None = None
    ) -> None:
        self.path = path
        self.layout = layout
        self.fingerprint = fingerprint
        self.finished = finished
        self._records = done_records(path)
        self.done_batches = set(self._records)
        self._store = _DurableLocalStore(path, read_only=finished)
        self._lock = lock

    def close(self) -> None:
        """Release the store's writer lock (``finalize`` does too); idempotent."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> GraphStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        layout, other tables, or anything that is not a graph store; StoreBusyError if another
        process is writing it. An unfinished writer holds the store's lock until ``finalize`` or
        ``close``.
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

        lock = StoreLock(path)
        try:
            with _disk_full_guard(path, "the store's metadata"):
                writer = cls._open_locked(path, fingerprint, layout, tables, attributes, lock)
        except BaseException:
            lock.release()
            raise
        if writer.finished:
            writer.close()
        return writer

    @classmethod
    def _open_locked(
        cls,
        path: Path,
        fingerprint: str,
        layout: NodeLayout,
        tables: Mapping[str, np.ndarray],
        attributes: dict[str, Any],
        lock: StoreLock,
    ) -> GraphStoreWriter:
        creating = path.with_name(f".{path.name}.creating")
        if creating.exists():  # a crashed creation: it never became the store
            shutil.rmtree(creating)
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            _create_store(path, creating, attributes, tables)
            return cls(path, layout, fingerprint, finished=False, lock=lock)

        meta = root_meta(path)
        if meta is None:
            raise GraphStoreMismatchError(
                _mismatch_message(path, "exists and is not a circuit-pipeline attribution graph")
            )
        version = meta.get("version")
        if version != FORMAT_VERSION and not (meta.get("finished") and version in READABLE_VERSIONS):
            state = "an unfinished store" if not meta.get("finished") else "a store"
            raise GraphStoreMismatchError(
                _mismatch_message(
                    path,
                    f"is {state} in format version {version}; this version writes format "
                    f"{FORMAT_VERSION} (and reads finished stores of versions {list(READABLE_VERSIONS)})",
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
        writer = cls(path, layout, fingerprint, finished=False, lock=lock)
        writer._check_tables(tables)
        current = _io.read_json(path / "zarr.json").get("attributes")
        if current != attributes:  # same inputs, other description: the latest run's wins
            writer._write_root_attributes(attributes)
        return writer

    def _check_tables(self, tables: Mapping[str, np.ndarray]) -> None:
        for name, array in tables.items():
            try:
                stored = read_array(self._store, f"{NODES}/{name}")
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
        and entry counts must match). A full disk raises GraphStoreDiskFullError (an OSError),
        the batch unrecorded and its partial files removed.
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

        name = batch_name(batch_index)
        batch_dir = self.path / ADJ / name
        with _disk_full_guard(self.path, f"batch {batch_index}", partial=batch_dir):
            self._write_batch_files(batch_index, batch_dir, targets, indptr, indices, values, extra)

    def _write_batch_files(
        self,
        batch_index: int,
        batch_dir: Path,
        targets: np.ndarray,
        indptr: np.ndarray,
        indices: np.ndarray,
        values: np.ndarray,
        extra: Mapping[str, np.ndarray],
    ) -> None:
        name = batch_dir.name
        if batch_dir.exists():  # left by a crash or a failed write: start it over
            shutil.rmtree(batch_dir)
        zarr.create_group(self._store, path=f"{ADJ}/{name}")
        arrays = {"targets": targets, "indptr": indptr, "indices": indices, "values": values}
        arrays.update({f"extra_{k}": v for k, v in sorted(extra.items())})
        for key, array in arrays.items():
            _create_array(self._store, f"{ADJ}/{name}/{key}", array)
        _io.fsync_tree(batch_dir)

        files = {}
        for file in sorted(p for p in batch_dir.rglob("*") if p.is_file()):
            files[file.relative_to(self.path).as_posix()] = _io.file_digest(file)
        record = {"batch": batch_index, "n_rows": int(len(targets)), "nnz": int(len(indices)), "files": files}
        batch_phase("before_record", batch_index)
        write_file(self.path / PROGRESS / f"{name}.json", _io.json_bytes(record))
        _io.fsync_dir(self.path / PROGRESS)
        self._records[batch_index] = record
        self.done_batches.add(batch_index)
        batch_phase("recorded", batch_index)

    def read_batch(self, batch_index: int) -> dict[str, np.ndarray]:
        """A recorded batch as written: targets, indptr, indices, values, extra_<name>."""
        if batch_index not in self.done_batches:
            raise KeyError(f"batch {batch_index} is not recorded in {self.path}")
        return read_batch_arrays(self._store, batch_index, with_extra=True)

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
        if name == SELECTED:
            array = _check_selected(array, self.layout.n_active)
        _check_table_shape(name, array, self.layout)
        with _disk_full_guard(self.path, f"node table {name!r}"):
            self._write_array_atomic(f"{NODES}/{name}", array)

    def _write_array_atomic(self, rel: str, array: np.ndarray) -> None:
        staging = self.path / _STAGING
        new, old = staging / "new", staging / "old"
        if staging.exists():
            shutil.rmtree(staging)
        _create_array(_DurableLocalStore(new), None, array)
        old.mkdir(parents=True)
        _io.fsync_tree(staging)
        target = self.path / rel
        if target.exists():  # moved aside; _recover moves it back if we crash before the swap
            (old / target.parent.name).mkdir()
            os.replace(target, old / target.parent.name / target.name)
        os.replace(new, target)
        _io.fsync_dir(target.parent)
        shutil.rmtree(staging)
        _io.fsync_dir(self.path)

    def finalize(self, attrs: Mapping[str, Any] | None = None) -> Graph:
        """Check and index the rows, mark the store finished (atomically), return the Graph.

        attrs: extra attributes merged into the caller's attributes. If no
        ``selected_features`` table was written, the features whose rows are stored are used.
        """
        if self.finished:
            return Graph.open(self.path)
        with _disk_full_guard(self.path, "the row index"):
            self._finalize(attrs)
        self.close()
        return Graph.open(self.path)

    def _finalize(self, attrs: Mapping[str, Any] | None) -> None:
        _recover(self.path)
        parts = [np.zeros((0, 3), dtype=np.int64)]
        for b in sorted(self.done_batches):
            t = read_array(self._store, f"{ADJ}/{batch_name(b)}/targets")
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
        if not (self.path / NODES / SELECTED).exists():
            self.write_table(SELECTED, features)
        else:
            selected = read_array(self._store, f"{NODES}/{SELECTED}")
            hidden = np.setdiff1d(features, selected)
            if len(hidden):
                warnings.warn(
                    f"{self.path}: {len(hidden)} stored feature rows (active features "
                    f"{hidden[:5].tolist()}...) are not in selected_features; graph-order reads "
                    f"leave them out (iter_compute_rows still has them)",
                    stacklevel=2,
                )
        self._write_array_atomic(ROW_INDEX, row_index)

        current = _io.read_json(self.path / "zarr.json")["attributes"]
        meta = dict(current[META_KEY])
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

    def _write_root_attributes(self, attributes: dict[str, Any]) -> None:
        doc = {"attributes": attributes, "node_type": "group", "zarr_format": 3}
        write_file(self.path / "zarr.json", _io.json_bytes(doc))
        _io.fsync_dir(self.path)

    def _check_writable(self) -> None:
        if self.finished:
            raise GraphStoreError(f"{self.path} is a finished graph store; it is read-only")

    def __repr__(self) -> str:
        state = "finished" if self.finished else f"{len(self.done_batches)} batches done"
        return f"GraphStoreWriter({str(self.path)!r}, {state})"


# ---------------------------------------------------------------------------------------------
# Creation and recovery
# ---------------------------------------------------------------------------------------------


def _create_store(path: Path, creating: Path, attributes: dict[str, Any], tables: Mapping[str, np.ndarray]) -> None:
    creating.parent.mkdir(parents=True, exist_ok=True)
    store = _DurableLocalStore(creating)
    root = zarr.create_group(store, attributes=attributes)
    root.create_group(NODES)
    root.create_group(ADJ)
    for name in sorted(tables):
        _create_array(store, f"{NODES}/{name}", tables[name])
    (creating / PROGRESS).mkdir()
    write_file(  # written again by us so that its bytes never depend on zarr's JSON style
        creating / "zarr.json",
        _io.json_bytes({"attributes": attributes, "node_type": "group", "zarr_format": 3}),
    )
    _io.fsync_tree(creating)
    if path.exists():
        path.rmdir()  # an empty directory (checked by the caller)
    os.replace(creating, path)
    _io.fsync_dir(path.parent)


def _recover(path: Path) -> None:
    """Bring an unfinished store back to its last durable state: finish or undo a half-done
    table swap, delete temp files, and delete every batch that is not both recorded and
    complete (with its record)."""
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
            if f.startswith(".") and f.endswith(_io.TMP_SUFFIX):
                os.unlink(os.path.join(d, f))
    records = done_records(path)
    adjacency = path / ADJ
    for name in sorted(os.listdir(adjacency)) if adjacency.is_dir() else []:
        index = batch_index_of(name)
        if index is None:
            continue
        record = records.get(index)
        if record is None or not _record_files_present(path, record):
            shutil.rmtree(adjacency / name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path / PROGRESS / f"{name}.json")
    for index in records:  # a record without its batch: not done
        if not (adjacency / batch_name(index)).is_dir():
            os.unlink(path / PROGRESS / f"{batch_name(index)}.json")
    for directory in (path / PROGRESS, adjacency, path / NODES, path):
        if directory.is_dir():
            _io.fsync_dir(directory)


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


# ---------------------------------------------------------------------------------------------
# Input checks and attributes
# ---------------------------------------------------------------------------------------------


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.startswith("__"):
        raise ValueError(f"invalid {what} name {name!r}: use letters, digits, '_', '.', '-'")


def _mismatch_message(path: Path, why: str) -> str:
    return f"{path} {why}. Delete it (rm -r '{path}') to recompute the graph, or choose another output path (--out)."


def _root_attributes(meta: dict[str, Any], attrs: Mapping[str, Any]) -> dict[str, Any]:
    return _jsonable({META_KEY: meta, "attrs": dict(attrs)})


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
    array = _as_int_array(array, SELECTED, np.int64)
    if array.size and (array[0] < 0 or array[-1] >= n_active or np.any(np.diff(array) <= 0)):
        raise ValueError(f"{SELECTED} must be sorted, unique indices into the {n_active} active features")
    return array


def _check_table_shape(name: str, array: np.ndarray, layout: NodeLayout) -> None:
    """Known tables must have one row per node of their kind."""
    field = TABLE_ROWS.get(name)
    if field is None:
        return
    expected = getattr(layout, field)
    if array.ndim == 0 or array.shape[0] != expected:
        raise ValueError(f"table {name!r} has shape {array.shape}; expected {field}={expected} rows")
    if name == "active_features" and (array.ndim != 2 or array.shape[1] != 3):
        raise ValueError(f"table 'active_features' must be (n_active, 3), got {array.shape}")


# ---------------------------------------------------------------------------------------------
# A store from a dense matrix (tests and small examples)
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
        h.update(_io.json_bytes(layout.to_dict()))
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
    writer.write_table(SELECTED, selected_features)
    return writer.finalize()
