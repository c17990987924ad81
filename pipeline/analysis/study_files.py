"""Reading a study folder: ``study.json`` and the graph cache's finished keys.

:mod:`pipeline.run.study` writes these files; aggregation and the study runner read them
through this module (the folder layout is in docs/pipeline.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline._io import read_json

__all__ = ["DONE_FORMAT", "STUDY_FORMAT", "graph_done", "load_study"]

STUDY_FORMAT = "circuit-pipeline/study"
DONE_FORMAT = "circuit-pipeline/study-graph"


def graph_done(key_dir: str | os.PathLike, pruning: Mapping[str, float] | None = None) -> dict | None:
    """``done.json`` of a finished key (None when the key is not done, or was pruned with other
    thresholds than ``pruning``)."""
    key_dir = Path(key_dir)
    try:
        done = read_json(key_dir / "done.json")
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("format") != DONE_FORMAT:
        return None
    if pruning is not None and done.get("pruning") != dict(pruning):
        return None
    files = done.get("files", {})
    if not all((key_dir / files.get(k, "\0")).exists() for k in ("graph", "pruned", "json")):
        return None
    try:
        meta = read_json(key_dir / files["graph"] / "zarr.json")
        if not meta["attributes"]["graph_store"]["finished"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return done


def load_study(study_dir: str | os.PathLike) -> dict[str, Any]:
    """``study.json`` of a study folder, with ``graphs_dir`` resolved to a path."""
    study_dir = Path(study_dir)
    path = study_dir / "study.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `circuit-pipeline study ... --out {study_dir}` first")
    doc = read_json(path)
    if doc.get("format") != STUDY_FORMAT:
        raise ValueError(f"{path} is not a study file ({STUDY_FORMAT})")
    doc["graphs_dir"] = str((study_dir / doc["graphs_dir"]).resolve())
    return doc
