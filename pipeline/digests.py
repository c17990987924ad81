"""Digests of weight files, remembered across processes.

Every graph store records the sha256 of the model's and the transcoders' weights, which is
gigabytes of hashing per attribution at real scale. As DVC's state database and git's index do,
a digest is remembered under its files' stat (device, inode, size, mtime, ctime) in a small
SQLite database and reused while that stat is unchanged. A file changed in the last
``RACY_SECONDS`` is hashed every time and never remembered: a rewrite within the same clock tick
could keep the stat (git's "racily clean" files).

``CIRCUIT_PIPELINE_CACHE`` names the cache directory (default ``$XDG_CACHE_HOME/circuit-pipeline``
or ``~/.cache/circuit-pipeline``); ``CIRCUIT_PIPELINE_CACHE=off`` turns remembering off. A cache
that cannot be opened or written (read-only home, a damaged database) is skipped, never an error.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline._io import file_digest

CACHE_ENV = "CIRCUIT_PIPELINE_CACHE"
RACY_SECONDS = 2.0

# in-process memo of what the database said, so a process asks it once per key
_MEMO: dict[str, str] = {}


def cache_dir() -> Path | None:
    """Where the digest database lives; None when remembering is off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "circuit-pipeline"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, remembered under its stat."""
    return remembered("sha256-file", [path], lambda: file_digest(path)["sha256"])


def remembered(kind: str, files: Sequence[str | os.PathLike[str]], compute: Callable[[], str], extra: str = "") -> str:
    """``compute()``, remembered under ``kind``, the stat of ``files`` and ``extra``.

    kind: what is computed (a new kind for a new definition: old entries are never reused);
    files: every file the value depends on; extra: anything else it depends on (a dtype, the
    versions of the libraries that read the files). Recomputed whenever a file's stat changed.
    """
    now = time.time()
    stats = []
    for f in files:
        st = os.stat(f)
        if max(st.st_mtime, st.st_ctime) > now - RACY_SECONDS:
            return compute()  # racy: the stat may not change with the next write
        stats.append(f"{os.path.realpath(f)}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    key = hashlib.sha256("\n".join([kind, extra, *stats]).encode()).hexdigest()
    if key in _MEMO:
        return _MEMO[key]
    value = _lookup(key)
    if value is None:
        value = compute()
        _store(key, value)
    _MEMO[key] = value
    return value


def _connect() -> sqlite3.Connection | None:
    directory = cache_dir()
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(directory / "digests.sqlite", timeout=10)
        con.execute("CREATE TABLE IF NOT EXISTS digests (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        return con
    except (OSError, sqlite3.Error):
        return None


def _lookup(key: str) -> str | None:
    con = _connect()
    if con is None:
        return None
    try:
        row = con.execute("SELECT value FROM digests WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])
    except sqlite3.Error:
        return None
    finally:
        con.close()


def _store(key: str, value: str) -> None:
    con = _connect()
    if con is None:
        return
    try:
        with con:
            con.execute("INSERT OR REPLACE INTO digests (key, value) VALUES (?, ?)", (key, value))
    except sqlite3.Error:
        pass
    finally:
        con.close()
