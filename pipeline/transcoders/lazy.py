"""Read tensors, or only some rows of them, straight from safetensors / npz files.

A ``TensorFile`` parses the file's index once (the safetensors JSON header, or the zip
directory and ``.npy`` headers of an ``.npz``) and validates it against the file size, so a
truncated or foreign file fails at load time with a one-line error, before any data is read.

Row reads use positional reads (``os.pread``) of the requested rows only, merged into runs
of consecutive rows. Nothing is memory-mapped, so reading decoder rows leaves the process's
resident set where it was (a memory map would count every page it ever touched).

Encoders can be lazy too (``EncoderRows``): attribution needs each encoder once, for the
forward that finds the active features, and then only the rows of active features, so
keeping every W_enc resident (half the transcoders' bytes) would only raise peak memory.

Layouts handled lazily: safetensors (any dtype safetensors stores, bf16 included) and
uncompressed (``np.savez``) ``.npz`` members in C order. A compressed or Fortran-order
``.npz`` member is read whole on first access and kept in memory.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import TranscoderConfigError, TranscoderFileNotFoundError

# safetensors dtype code -> (numpy dtype used to read the raw bytes, torch dtype of the tensor)
_ST_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "F64": (np.dtype("<f8"), torch.float64),
    "F32": (np.dtype("<f4"), torch.float32),
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<i2"), torch.bfloat16),
    "I64": (np.dtype("<i8"), torch.int64),
    "I32": (np.dtype("<i4"), torch.int32),
    "I16": (np.dtype("<i2"), torch.int16),
    "I8": (np.dtype("i1"), torch.int8),
    "U8": (np.dtype("u1"), torch.uint8),
    "BOOL": (np.dtype("?"), torch.bool),
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in its file. ``offset`` is absolute; None = not lazily readable."""

    name: str
    shape: tuple[int, ...]
    np_dtype: np.dtype
    torch_dtype: torch.dtype
    offset: int | None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize


def all_finite(t: Tensor, chunk: int = 1 << 20) -> bool:
    """No NaN/inf in ``t``, without a tensor-sized temporary: a NaN or inf makes the sum
    non-finite, so a finite sum proves it (float32 accumulation: half the time of float64); a
    non-finite sum (also a rare overflow) is settled chunk by chunk."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _corrupt(path: Path, why: str) -> TranscoderConfigError:
    return TranscoderConfigError(
        f"{str(path)!r} is truncated or not a valid weight file ({why}); re-download or re-save it"
    )


def _read_safetensors_index(path: Path, size: int) -> dict[str, TensorInfo]:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise _corrupt(path, f"header length {n} does not fit a file of {size} bytes")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_start = 8 + n
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad header entry for {name!r}") from None
        if code not in _ST_DTYPES:
            raise _corrupt(path, f"tensor {name!r} has unsupported dtype {code}")
        np_dtype, torch_dtype = _ST_DTYPES[code]
        info = TensorInfo(name, shape, np_dtype, torch_dtype, data_start + begin)
        if end < begin or end - begin != info.nbytes:
            raise _corrupt(path, f"tensor {name!r} has inconsistent offsets")
        if end > data_size:
            raise _corrupt(path, f"tensor {name!r} ends at byte {data_start + end} but the file has {size}")
        end_max = max(end_max, end)
        infos[name] = info
    if end_max != data_size:
        raise _corrupt(path, f"data section holds {data_size} bytes, tensors cover {end_max}")
    return infos


def _read_npz_index(path: Path) -> dict[str, TensorInfo]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _corrupt(path, f"not a zip archive: {exc}") from None
    infos: dict[str, TensorInfo] = {}
    with zf, open(path, "rb") as fh:
        for member in zf.infolist():
            if not member.filename.endswith(".npy"):
                continue
            name = member.filename[: -len(".npy")]
            if member.compress_type == zipfile.ZIP_STORED:
                fh.seek(member.header_offset)
                local = fh.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise _corrupt(path, f"bad local header for {member.filename!r}")
                n_name, n_extra = struct.unpack("<HH", local[26:30])
                fh.seek(member.header_offset + 30 + n_name + n_extra)
                try:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                except ValueError as exc:
                    raise _corrupt(path, f"bad .npy header in {member.filename!r}: {exc}") from None
                offset = fh.tell()
                data_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if offset - (member.header_offset + 30 + n_name + n_extra) + data_bytes != member.file_size:
                    raise _corrupt(path, f"member {member.filename!r} has an inconsistent size")
                lazy_ok = not fortran and dtype.kind in "fiub" and not dtype.hasobject
                infos[name] = TensorInfo(
                    name, tuple(shape), dtype, _torch_dtype_of(dtype, path), offset if lazy_ok else None
                )
            else:
                with zf.open(member) as mf:
                    version = np.lib.format.read_magic(mf)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(mf)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(mf)
                infos[name] = TensorInfo(name, tuple(shape), dtype, _torch_dtype_of(dtype, path), None)
    return infos


def _torch_dtype_of(dtype: np.dtype, path: Path) -> torch.dtype:
    try:
        return torch.from_numpy(np.zeros(0, dtype=dtype.newbyteorder("="))).dtype
    except TypeError:
        raise _corrupt(path, f"unsupported array dtype {dtype}") from None


class TensorFile:
    """Index of one weight file; reads whole tensors or selected rows on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()  # lazy reads must not depend on the cwd
        if not self.path.is_file():
            raise TranscoderFileNotFoundError(
                f"transcoder weight file {str(self.path)!r} not found; check the 'transcoders' "
                "entries of config.yaml or re-download the transcoders"
            )
        self.size = self.path.stat().st_size
        self.format = "npz" if self.path.suffix == ".npz" else "safetensors"
        if self.format == "npz":
            self.infos = _read_npz_index(self.path)
        else:
            self.infos = _read_safetensors_index(self.path, self.size)
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._resident: dict[str, np.ndarray] = {}

    # --- index -----------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def is_lazy(self, name: str) -> bool:
        return self.infos[name].offset is not None

    # --- raw reads -------------------------------------------------------------------
    def _pread(self, n: int, offset: int) -> np.ndarray:
        """``n`` bytes at ``offset`` into a fresh uint8 array (one allocation, no copies)."""
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        out = np.empty(n, dtype=np.uint8)
        done = 0
        view = out.data  # a memoryview of its buffer
        while done < n:
            if hasattr(os, "preadv"):
                got = os.preadv(self._fd, [view[done:]], offset + done)
            else:  # pragma: no cover - no preadv (Windows)
                with self._lock:
                    os.lseek(self._fd, offset + done, os.SEEK_SET)
                    chunk = os.read(self._fd, n - done)
                got = len(chunk)
                out[done : done + got] = np.frombuffer(chunk, dtype=np.uint8)
            if got <= 0:
                raise _corrupt(self.path, f"short read at byte {offset + done}; the file changed")
            done += got
        return out

    def _to_torch(self, arr: np.ndarray, info: TensorInfo) -> Tensor:
        if info.torch_dtype == torch.bfloat16:
            return torch.from_numpy(np.ascontiguousarray(arr)).view(torch.bfloat16)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(arr))

    def _eager(self, name: str) -> np.ndarray:
        """Whole array for members that cannot be read lazily (kept in memory)."""
        arr = self._resident.get(name)
        if arr is None:
            with np.load(self.path, allow_pickle=False) as npz:
                arr = np.ascontiguousarray(npz[name])
            self._resident[name] = arr
        return arr

    def load(self, name: str) -> Tensor:
        """The whole tensor, copied into memory (torch dtype as stored)."""
        info = self.infos[name]
        if info.offset is None:
            return self._to_torch(self._eager(name), info)
        if info.nbytes == 0:
            arr = np.zeros(info.shape, dtype=info.np_dtype)
        else:
            arr = self._pread(info.nbytes, info.offset).view(info.np_dtype).reshape(info.shape)
        return self._to_torch(arr, info)

    def row_range(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of tensor ``name`` along its first axis, in one read."""
        info = self.infos[name]
        n_rows = info.shape[0] if info.shape else 0
        if not 0 <= start <= stop <= n_rows:
            raise IndexError(f"rows {start}:{stop} out of range for {name!r} with {n_rows} rows")
        if info.offset is None:
            return self._to_torch(np.array(self._eager(name)[start:stop]), info)
        rest = info.shape[1:]
        stride = int(np.prod(rest, dtype=np.int64)) * info.np_dtype.itemsize
        n = stop - start
        arr = self._pread(n * stride, info.offset + start * stride) if n and stride else np.zeros(0, dtype=np.uint8)
        return self._to_torch(arr.view(info.np_dtype).reshape((n, *rest)), info)

    def rows(self, name: str, index: np.ndarray, sub: int | None = None) -> Tensor:
        """Rows ``index`` (1-D int array) of tensor ``name`` along its first axis.

        sub: if given, only ``tensor[index, sub]`` (for (d_transcoder, n_out, d_model) CLT
        decoders: one output layer's slice). Returns (len(index), *rest) in the stored dtype.
        """
        info = self.infos[name]
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        n_rows = info.shape[0] if info.shape else 0
        if index.size and (index.min() < 0 or index.max() >= n_rows):
            bad = int(index[(index < 0) | (index >= n_rows)][0])
            raise IndexError(f"feature index {bad} out of range for {name!r} with {n_rows} rows")
        rest = info.shape[1:]
        if sub is not None:
            if not rest or not 0 <= sub < rest[0]:
                raise IndexError(f"slice {sub} out of range for {name!r} of shape {info.shape}")
        if info.offset is None:
            arr = self._eager(name)
            out = arr[index] if sub is None else arr[index, sub]
            return self._to_torch(np.array(out), info)

        itemsize = info.np_dtype.itemsize
        row_elems = int(np.prod(rest, dtype=np.int64))
        stride = row_elems * itemsize  # bytes between consecutive rows
        if sub is None:
            piece_shape: tuple[int, ...] = tuple(rest)
            piece_off, piece_bytes = 0, stride
        else:
            piece_shape = tuple(rest[1:])
            piece_bytes = int(np.prod(piece_shape, dtype=np.int64)) * itemsize
            piece_off = sub * piece_bytes
        out = np.empty((index.size, piece_bytes), dtype=np.uint8)
        if index.size and piece_bytes:
            uniq = np.unique(index)
            if piece_bytes == stride or stride < 4 * piece_bytes:
                # runs of consecutive feature ids -> one read each
                breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
            else:  # one narrow slice of wide rows: read each row's slice alone
                breaks = np.arange(1, uniq.size)
            starts = np.concatenate(([0], breaks))
            ends = np.concatenate((breaks, [uniq.size]))
            uniq_rows = np.empty((uniq.size, piece_bytes), dtype=np.uint8)
            for s, e in zip(starts.tolist(), ends.tolist()):
                r0 = int(uniq[s])
                n = e - s
                span = (n - 1) * stride + piece_bytes
                chunk = self._pread(span, info.offset + r0 * stride + piece_off)
                if piece_bytes == stride:
                    uniq_rows[s:e] = chunk.reshape(n, stride)
                else:
                    padded = np.empty(n * stride, dtype=np.uint8)
                    padded[:span] = chunk
                    uniq_rows[s:e] = padded.reshape(n, stride)[:, :piece_bytes]
            # map every requested index back to its unique row
            inverse = np.searchsorted(uniq, index)
            out = uniq_rows[inverse]
        arr = out.view(info.np_dtype).reshape((index.size, *piece_shape))
        return self._to_torch(arr, info)

    # --- bookkeeping -----------------------------------------------------------------
    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _feature_index(features: Tensor | np.ndarray) -> np.ndarray:
    """Feature ids as a flat int64 numpy array (from a tensor on any device, or array-like)."""
    if isinstance(features, Tensor):
        return features.detach().to("cpu", torch.int64).numpy().reshape(-1)
    return np.asarray(features, dtype=np.int64).reshape(-1)


def _check_rows(file: TensorFile, name: str, t: Tensor, features: np.ndarray | int) -> None:
    """Rows ``t`` of tensor ``name`` hold no NaN/inf; otherwise one line naming the first bad
    feature (row i is ``features[i]``, or feature ``features + i`` for a block from that row)."""
    if all_finite(t):
        return
    bad = int((~torch.isfinite(t.reshape(t.shape[0], -1))).any(dim=1).nonzero()[0])
    feature = features + bad if isinstance(features, int) else int(features[bad])
    raise TranscoderConfigError(
        f"{str(file.path)!r}: {name} holds NaN or inf (feature {feature}); the weights are "
        "corrupt, re-download or retrain them"
    )


class DecoderRows:
    """One layer's decoder, lazy (rows read from the file) or resident.

    The tensor is (d_transcoder, d_model) for a PLT or (d_transcoder, n_out, d_model) for a
    CLT. ``rows`` always returns (k, n_out, d_model) (n_out = 1 for a PLT) and checks the rows
    it read for NaN/inf, so a corrupt decoder fails on first use with the file named.
    """

    def __init__(
        self,
        file: TensorFile,
        name: str,
        *,
        lazy: bool,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.file = file
        self.name = name
        self.dtype = dtype
        self.device = device
        shape = file.shape(name)
        self.n_out = 1 if len(shape) == 2 else shape[1]
        self._plt = len(shape) == 2
        self._resident: Tensor | None = None
        if not lazy:
            full = file.load(name).to(device=device, dtype=dtype)
            if self._plt:
                full = full.unsqueeze(1)
            _check_rows(file, name, full, 0)
            self._resident = full

    @property
    def lazy(self) -> bool:
        return self._resident is None

    def rows(self, features: Tensor | np.ndarray, out_index: int | None = None) -> Tensor:
        """(k,) feature ids -> (k, n_out, d_model), or (k, d_model) for one output slice."""
        index = _feature_index(features)
        if self._resident is not None:
            idx = torch.from_numpy(index).to(self._resident.device)
            if index.size and (index.min() < 0 or index.max() >= self._resident.shape[0]):
                raise IndexError(f"feature index out of range for {self.name!r} with {self._resident.shape[0]} rows")
            out = self._resident[idx]
            return out if out_index is None else out[:, out_index]
        if self._plt:
            if out_index not in (None, 0):
                raise IndexError(f"output slice {out_index} out of range for a per-layer decoder")
            t = self.file.rows(self.name, index)
            t = t.unsqueeze(1) if out_index is None else t
        else:
            t = self.file.rows(self.name, index, out_index)
        _check_rows(self.file, self.name, t, index)
        return t.to(device=self.device, dtype=self.dtype)

    def scan(self, chunk_rows: int = 4096) -> None:
        """Stream the whole decoder through the NaN/inf check (bounded memory)."""
        if self._resident is not None:
            return
        n = self.file.shape(self.name)[0]
        for start in range(0, n, chunk_rows):
            block = self.file.row_range(self.name, start, min(n, start + chunk_rows))
            _check_rows(self.file, self.name, block, start)


class EncoderRows:
    """One layer's encoder W_enc, (d_transcoder, d_model), lazy or resident.

    Resident: the whole matrix in ``dtype`` on ``device``, checked for NaN/inf at load.
    Lazy: nothing is kept; ``linear`` streams the matrix from the file in blocks of
    ``block_rows`` rows and ``rows`` reads only the rows asked for, each checked on read.
    A file that stores the matrix transposed, (d_model, d_transcoder) as GemmaScope does, has
    no contiguous feature rows and is always loaded resident.
    """

    def __init__(
        self,
        file: TensorFile,
        name: str,
        *,
        lazy: bool,
        transposed: bool = False,
        dtype: torch.dtype,
        device: torch.device,
        block_rows: int = 4096,
    ):
        self.file = file
        self.name = name
        self.dtype = dtype
        self.device = device
        self.block_rows = block_rows
        shape = tuple(file.shape(name))
        if len(shape) != 2:
            raise TranscoderConfigError(
                f"{str(file.path)!r}: {name} has shape {shape}, expected (d_transcoder, d_model)"
            )
        self.shape: tuple[int, int] = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        self._resident: Tensor | None = None
        if not lazy or transposed or not file.is_lazy(name):
            full = file.load(name)
            if transposed:
                full = full.T
            full = full.to(device=device, dtype=dtype).contiguous()
            _check_rows(file, name, full, 0)
            self._resident = full

    @property
    def lazy(self) -> bool:
        return self._resident is None

    def rows(self, features: Tensor | np.ndarray) -> Tensor:
        """(k,) feature ids -> (k, d_model): the directions those features read."""
        index = _feature_index(features)
        if index.size and (index.min() < 0 or index.max() >= self.shape[0]):
            raise IndexError(f"feature index out of range for d_transcoder={self.shape[0]}")
        if self._resident is not None:
            return self._resident[torch.from_numpy(index).to(self._resident.device)]
        t = self.file.rows(self.name, index)
        _check_rows(self.file, self.name, t, index)
        return t.to(device=self.device, dtype=self.dtype)

    def linear(self, x: Tensor, bias: Tensor) -> Tensor:
        """x @ W_enc.T + bias: (..., d_model) -> (..., d_transcoder) in ``dtype``."""
        x = x.to(self.dtype)
        if self._resident is not None:
            return F.linear(x, self._resident, bias)
        n = self.shape[0]
        out = torch.empty((*x.shape[:-1], n), dtype=self.dtype, device=x.device)
        for start in range(0, n, self.block_rows):
            stop = min(n, start + self.block_rows)
            block = self.file.row_range(self.name, start, stop)
            _check_rows(self.file, self.name, block, start)
            out[..., start:stop] = F.linear(x, block.to(device=x.device, dtype=self.dtype), bias[start:stop])
        return out
