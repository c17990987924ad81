"""The resumable checkpoint: one file holding a JSON ``meta`` dict and named numpy arrays.

Layout: a magic line, the header's length (uint64 little-endian), the JSON header
``{"meta": ..., "arrays": [{name, dtype, shape, offset, size}, ...]}``, then every array
Blosc-zstd compressed, in name order. Written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numcodecs import Blosc

from pipeline._io import atomic_write_bytes, json_bytes

_MAGIC = b"CPDASH-STATE-1\n"
_CODEC = Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)


def write_checkpoint(path: str | os.PathLike, meta: dict, arrays: Mapping[str, np.ndarray]) -> None:
    blobs, index, offset = [], [], 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        blob = bytes(_CODEC.encode(a)) if a.nbytes else b""
        index.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "size": len(blob)})
        blobs.append(blob)
        offset += len(blob)
    header = json_bytes({"meta": meta, "arrays": index}, indent=None)
    atomic_write_bytes(path, _MAGIC + struct.pack("<Q", len(header)) + header + b"".join(blobs))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a checkpoint; ValueError if ``path`` is not one."""
    data = Path(path).read_bytes()
    if not data.startswith(_MAGIC):
        raise ValueError("not a dashboards checkpoint")
    pos = len(_MAGIC)
    (n,) = struct.unpack("<Q", data[pos : pos + 8])
    header = json.loads(data[pos + 8 : pos + 8 + n])
    base = pos + 8 + n
    arrays = {}
    for rec in header["arrays"]:
        dtype, shape = np.dtype(rec["dtype"]), tuple(rec["shape"])
        if rec["size"] == 0:
            arrays[rec["name"]] = np.zeros(shape, dtype=dtype)
            continue
        blob = data[base + rec["offset"] : base + rec["offset"] + rec["size"]]
        arrays[rec["name"]] = np.frombuffer(_CODEC.decode(blob), dtype=dtype).reshape(shape).copy()
    return header["meta"], arrays
