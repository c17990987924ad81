"""Small shared helpers: thread/determinism scope, atomic directory writes, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.devices import pin_cpu_arithmetic


@contextlib.contextmanager
def torch_scope(threads: int, deterministic: bool = True) -> Iterator[None]:
    """Set torch's thread count and deterministic mode for the block; restore them after.
    MKL's reproducible mode (:func:`pipeline.devices.pin_cpu_arithmetic`) stays for the process."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    pin_cpu_arithmetic()
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir``.

    On error the temporary directory is removed and ``out_dir`` is left untouched.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: object) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
