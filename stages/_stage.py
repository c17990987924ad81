"""What every stage does around its one library call: its arguments, torch's threads and
seed, where outputs go, and the metrics it logs.

Outputs are written through ``pipeline._io``: beside their final path, moved into place only
when complete (a stage killed half-way leaves the previous complete output or none, never a
partial file DVC could hash as the result), JSON with sorted keys and no timestamps (the same
inputs give the same bytes). A killed stage leaves hidden temporaries beside its outputs
(``.{name}.<pid>.<random>.tmp``, ``.{name}.<pid>.<random>.old.tmp``): every stage removes its
own outputs' ones when it next starts (:func:`remove_stale_temps`), those of processes still
alive excepted, so a concurrently running stage's temporaries are never touched.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline import _io
from pipeline._io import read_json
from pipeline.devices import pin_cpu_arithmetic
from pipeline.memory import release_freed_buffers
from pipeline.organism.world import World, WorldConfig, make_world
from pipeline.run.compose import PARAMS_FILE
from pipeline.run.config import FeaturesSpec, RuntimeConfig, SelectivitySpec

#: Where the per-prompt artifacts go: results/<prompt id>/<file>. dvc.yaml spells the same paths.
RESULTS = Path("results")
#: Resumable work in progress (an attribution store being written); gitignored, never a DVC out.
PARTIAL = Path("tmp") / "partial"
#: The features stage's stores: data/dashboards/<features.name>.zarr (dvc.yaml spells the same).
DASHBOARDS = Path("data/dashboards")
#: The selectivity stage's tables: data/selectivity/<selectivity.name>.npz (dvc.yaml spells the same).
SELECTIVITY = Path("data/selectivity")


def prompt_dir(prompt_id: str) -> Path:
    return RESULTS / prompt_id


def dashboards_path(features: FeaturesSpec) -> Path:
    return DASHBOARDS / f"{features.name}.zarr"


def selectivity_path(spec: SelectivitySpec) -> Path:
    return SELECTIVITY / f"{spec.name}.npz"


def remove_stale_temps(*outputs: str | Path) -> list[Path]:
    """Remove the temporaries killed earlier runs left beside ``outputs`` (this stage's own
    outputs: nothing of another file's), skipping those of live processes; return them.
    Every stage calls it first, so they never accumulate (nor show in ``git status``)."""
    removed = [p for out in outputs for p in _io.remove_stale_temps(out)]
    if removed:
        print(f"removed {len(removed)} stale temporaries of a killed run: {', '.join(str(p) for p in removed)}")
    return removed


def load_world(path: str | Path) -> World:
    """The organism's world from the world.json the organism_world stage wrote (its config)."""
    return make_world(WorldConfig.from_dict(read_json(path)["config"]))


def parse_args(
    description: str | None, *, prompt: bool = False, argv: Sequence[str] | None = None, **extra: str
) -> argparse.Namespace:
    """Common stage arguments: ``--params`` (default params.yaml), ``--prompt-id`` for a
    per-prompt stage, plus ``extra`` required string options (name -> help)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=PARAMS_FILE, help="composed config (default: params.yaml)")
    if prompt:
        parser.add_argument("--prompt-id", required=True, help="key of the prompt in prompts.items")
    for name, help_text in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", required=True, help=help_text)
    return parser.parse_args(argv)


def setup_torch(runtime: RuntimeConfig, seed: int = 0) -> None:
    """Fix torch's thread count, seed and deterministic mode for this process, and let freed
    buffers leave its resident set (pipeline.memory)."""
    release_freed_buffers()
    # deterministic cuBLAS on a GPU (runtime.device: cuda) needs a fixed workspace, set before
    # the first CUDA call; a CPU run ignores it
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    pin_cpu_arithmetic(runtime.arithmetic)  # the same bytes from a forced rerun (portable: on any x86-64 CPU)
    torch.set_num_threads(runtime.threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


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
