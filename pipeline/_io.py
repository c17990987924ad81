"""Files a crash cannot leave half written, and the project's one JSON encoding.

Every writer in the package goes through this module. A file or a directory is built beside
its final path under a hidden temporary name (``.{name}.<pid>.<random>.tmp``: the writer's
process id is part of the name), flushed to disk, and renamed into place with ``os.replace``
(atomic on POSIX); the parent directory is then fsynced so the rename itself is durable. A
reader therefore sees the previous complete version or the new complete version, never a
partial one, and a killed writer leaves only a temporary name that :func:`remove_stale_temps`
recognises (and removes once no live process has that id).

JSON files are UTF-8, ``ensure_ascii=False``, no NaN or infinity, one trailing newline; keys
are sorted unless a format fixes their order (``sort_keys=False``), and ``indent=None`` gives
the compact form. ``.npz`` files (:func:`npz_bytes`) have fixed member order and
timestamps, so the same arrays give the same bytes. Content digests hash :func:`digest_json`'s encoding instead, which never
changes: a stored fingerprint stays valid across releases.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

#: suffix of every temporary file or directory this module creates
TMP_SUFFIX = ".tmp"


def temp_prefix(path: str | os.PathLike[str]) -> str:
    """The hidden prefix of temporaries for ``path``: ``.{name}.``."""
    return f".{Path(path).name}."


def _own_prefix(path: str | os.PathLike[str]) -> str:
    """The prefix of the temporaries this process makes for ``path``: ``.{name}.{pid}.``."""
    return f"{temp_prefix(path)}{os.getpid()}."


def _temp_pattern(path: str | os.PathLike[str]) -> re.Pattern[str]:
    # .{name}.{pid}.{random}[.old].tmp, or without the pid (written before pids were in names);
    # the random part is tempfile's (8 of [a-z0-9_]), so ".graph.png.<pid>.<random>.tmp" is no
    # temporary of "graph", nor is ".graph.json.tmp"
    return re.compile(re.escape(temp_prefix(path)) + r"(?:(\d+)\.)?[a-z0-9_]{8}(?:\.old)?" + re.escape(TMP_SUFFIX))


def temp_owner(temp: str | os.PathLike[str], path: str | os.PathLike[str]) -> int | None:
    """The process id in the name of ``temp``, a temporary of ``path``; None when its name has
    none (an older writer's). ValueError if ``temp`` is no temporary of ``path``."""
    m = _temp_pattern(path).fullmatch(Path(temp).name)
    if m is None or Path(temp).parent != Path(path).parent:
        raise ValueError(f"{temp} is not a temporary of {path}")
    return None if m.group(1) is None else int(m.group(1))


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every directory under ``root`` (deepest first), then ``root``'s parent."""
    root = Path(root)
    dirs = [Path(d) for d, _, _ in os.walk(root)]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)
    fsync_dir(root.parent)


def fsync_files(root: str | os.PathLike[str]) -> None:
    """fsync every file under directory ``root``: for writers (zarr) that do not sync their own."""
    for d, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview, *, sync_dir: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename).

    ``sync_dir=False`` leaves the parent directory's fsync to the caller (who syncs once
    after many files). The file gets mode 0o644, whatever the umask of ``mkstemp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_own_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _mkdtemp_beside(target: Path) -> Path:
    """A new empty temporary directory beside ``target``, with the mode a plain ``mkdir`` would
    give (``mkdtemp`` makes it 0o700, which would become the final directory's mode)."""
    tmp = Path(tempfile.mkdtemp(prefix=_own_prefix(target), suffix=TMP_SUFFIX, dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move directory ``tmp`` to ``target``; a previous ``target`` is moved aside first, then
    removed, so ``target`` is always either the old or the new complete version."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory: move it away and rerun")
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=_own_prefix(target), suffix=".old" + TMP_SUFFIX, dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; when the block succeeds it replaces
    ``path``. On error it is removed and ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdtemp_beside(target)
    try:
        yield tmp
        fsync_files(tmp)
        fsync_tree(tmp)
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a path, inside a temporary directory beside ``path``, to write a file *or* a
    directory to; when the block succeeds it replaces ``path``. On error nothing changes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = _mkdtemp_beside(target)
    tmp = tmp_dir / target.name
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp}")
        if tmp.is_dir():
            fsync_files(tmp)
            fsync_tree(tmp)
            _replace_dir(tmp, target)
        else:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(tmp, target)
            fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries a killed writer of ``path`` left beside it; return them.

    Only ``path``'s own temporaries (``.{name}.<pid>.<random>.tmp``, ``.{name}.<pid>.<random>.old.tmp``)
    are touched, never another file's, and only those whose process is gone: a temporary whose
    pid is a live process (this one included) is being written and stays. A name without a
    pid comes from a writer older than pids in names and counts as stale.
    """
    target = Path(path)
    if not target.parent.is_dir():
        return []
    pattern = _temp_pattern(target)
    stale = []
    for p in sorted(target.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m is None or (m.group(1) is not None and pid_alive(int(m.group(1)))):
            continue
        stale.append(p)
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return stale


# JSON
# --------------------------------------------------------------------------------------------


def finite_or_none(obj: Any) -> Any:
    """A copy of ``obj`` with NaN and infinities replaced by None (JSON has no such numbers),
    dict keys turned into strings, tuples into lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def json_text(obj: Any, *, sort_keys: bool = True, indent: int | None = 2) -> str:
    """The project's JSON text of ``obj`` (see the module docstring); ``indent=None``: compact."""
    separators = (",", ":") if indent is None else None
    return (
        json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False, separators=separators)
        + "\n"
    )


def json_bytes(obj: Any, *, sort_keys: bool = True, indent: int | None = 2) -> bytes:
    """:func:`json_text` encoded as UTF-8."""
    return json_text(obj, sort_keys=sort_keys, indent=indent).encode("utf-8")


def write_json(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = True, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return atomic_write_bytes(path, json_bytes(obj, sort_keys=sort_keys, indent=indent))


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def npz_bytes(arrays: Mapping[str, Any]) -> bytes:
    """A numpy-loadable compressed ``.npz`` of ``arrays`` ({name: array}) with deterministic
    bytes: members sorted by name, fixed timestamps and permissions, no pickles."""
    # numpy imported here: this module is on the config schema's start-up path
    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, member.getvalue(), compresslevel=6)
    return buf.getvalue()


def digest_json(obj: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """SHA-256 hex digest of ``obj``'s fixed hashing encoding (``json.dumps`` with sorted keys
    and otherwise default settings): the input of every stored fingerprint."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=default).encode()).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"sha256": hex, "size": bytes}`` of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "size": size}


# Writer locks
# --------------------------------------------------------------------------------------------


class StoreBusyError(BlockingIOError):
    """Another process holds the writer lock of a store."""


#: lock files this process holds: real path -> [open file, number of holders]
_HELD: dict[str, list[Any]] = {}
_HELD_GUARD = threading.Lock()


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file of the store at ``path``: ``.{name}.lock`` beside it (beside, so that it
    outlives the store's creation by rename). It exists while a writer holds it (and after a
    killed writer, until the next one releases it)."""
    target = Path(path)
    if not target.name:
        target = target.resolve()
    return target.parent / f".{target.name}.lock"


class StoreLock:
    """An exclusive ``fcntl.flock`` on the lock file of the store at ``path``, taken at once or
    never: :class:`StoreBusyError` ("another run is writing <path> (pid N)") when another process
    holds it. The OS releases it when the process dies, however it dies. Holders in one process
    share the lock (a writer reopened in the same process is not "another run"); it is released
    when the last of them calls :meth:`release` (or is garbage collected)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        file = lock_path(self.path)
        file.parent.mkdir(parents=True, exist_ok=True)
        self._key = os.path.realpath(file)
        self._held = False
        with _HELD_GUARD:
            entry = _HELD.get(self._key)
            if entry is not None:
                entry[1] += 1
                self._held = True
                return
            while True:
                f = open(file, "a+b")  # noqa: SIM115 - kept open while the lock is held
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    f.seek(0)
                    holder = f.read(64).decode("ascii", "replace").strip() or "unknown"
                    f.close()
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise StoreBusyError(
                            f"another run is writing {self.path} (pid {holder}): wait for it to "
                            f"finish or stop it, then rerun (lock file {file})"
                        ) from None
                    raise
                try:  # the holder we waited on may have deleted this file on release: lock the new one
                    if os.stat(file).st_ino == os.fstat(f.fileno()).st_ino:
                        break
                except FileNotFoundError:
                    pass
                f.close()
            f.truncate(0)
            f.write(f"{os.getpid()}\n".encode())
            f.flush()
            _HELD[self._key] = [f, 1]
            self._held = True

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        with _HELD_GUARD:
            if not self._held:
                return
            self._held = False
            entry = _HELD.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[self._key]
                with contextlib.suppress(OSError):
                    os.unlink(self._key)  # while still held: a later locker re-checks the inode
                entry[0].close()  # closing the descriptor releases the flock

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
