"""What every stage does around its one library call: threads, atomic writes, paths.

Outputs are written beside their final path and moved into place with ``os.replace`` only
when complete, so a stage killed half-way leaves either nothing or the previous complete
output, never a partial file DVC could hash as the result. JSON is written with sorted keys
and no timestamps, so the same inputs give the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.run.config import RuntimeConfig

#: Where the per-prompt artifacts go: results/<prompt id>/<file>. dvc.yaml spells the same paths.
RESULTS = Path("results")
#: Resumable work in progress (an attribution store being written); gitignored, never a DVC out.
PARTIAL = Path("tmp") / "partial"


def prompt_dir(prompt_id: str) -> Path:
    return RESULTS / prompt_id


def setup_torch(runtime: RuntimeConfig, seed: int = 0) -> None:
    """Fix torch's thread count, seed and deterministic mode for this process, and let freed
    buffers leave its resident set (pipeline.memory)."""
    import torch

    from pipeline.memory import release_freed_buffers

    release_freed_buffers()

    torch.set_num_threads(runtime.threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (write a file or a directory there); on success
    it replaces ``path``; on error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the stage wrote nothing to {tmp}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _finite(obj: Any) -> Any:
    """NaN and infinities become None (JSON has no such numbers; DVC metrics must parse)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    return json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic, deterministic JSON (sorted keys, NaN -> null)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj), encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def scalars(metrics: dict, drop: tuple[str, ...] = ()) -> dict:
    """The numeric top-level entries of a metrics dict (what ``dvc metrics show`` tabulates)."""
    return {
        k: v
        for k, v in sorted(metrics.items())
        if k not in drop and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def shown(metrics: dict, keys: tuple[str, ...]) -> str:
    """``key value`` for those of ``keys`` the metrics hold as numbers (for a stage's log line)."""
    return "  ".join(
        f"{k} {metrics[k]:.3f}"
        for k in keys
        if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)
    )
