"""The figures of a study's aggregation, drawn from ``aggregate.json`` alone.

A feature × prompt heatmap of the most recurring features' influence, and the top recurring
features with their labels. Saved as the graph figures are
(:func:`pipeline.analysis.figures.figure_bytes`, the same ``RC``): the same ``aggregate.json``
gives byte-identical PNG and SVG files on one platform.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from pipeline._io import atomic_write_bytes
from pipeline.analysis.figures import FORMATS, RC, figure_bytes

__all__ = ["render_figures", "write_figures"]


def _feature_name(row: Mapping[str, Any], width: int = 38) -> str:
    name = f"L{row['layer']} F{row['feature']}"
    label = str(row.get("label") or "")
    if label:
        label = label if len(label) <= width else label[: width - 1] + "…"
        name = f"{name}  {label}"
    return name


def _fig_heatmap(agg: Mapping[str, Any]):
    hm = agg["heatmap"]
    values = np.asarray(hm["values"], dtype=np.float64).reshape(len(hm["features"]), len(hm["prompts"]))
    rows = agg["features"][: len(hm["features"])]
    fig = Figure(figsize=(max(4.0, 1.8 + 0.28 * len(hm["prompts"])), max(2.5, 1.2 + 0.22 * len(rows))))
    ax = fig.add_subplot()
    im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    groups = hm.get("groups") or [""] * len(hm["prompts"])
    ax.set_xticks(
        range(len(hm["prompts"])), [f"{p} ({g})" if g else p for p, g in zip(hm["prompts"], groups)], rotation=90
    )
    for i in range(1, len(groups)):
        if groups[i] != groups[i - 1]:
            ax.axvline(i - 0.5, color="white", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [_feature_name(r, 24) for r in rows])
    ax.set_xlabel("prompt")
    ax.set_title(f"Influence of the {len(rows)} most recurring features ({agg['study']}, {agg['n_prompts']} prompts)")
    fig.colorbar(im, ax=ax, label="influence on the logits")
    fig.tight_layout()
    return fig


def _fig_top_features(agg: Mapping[str, Any], top: int = 20):
    rows = agg["features"][:top]
    fig = Figure(figsize=(8.0, max(2.5, 1.0 + 0.25 * len(rows))))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [r["n_prompts"] for r in rows], color="#4c72b0")
    ax.set_yticks(y, [_feature_name(r) for r in rows])
    for yi, r in zip(y, rows):
        ax.text(r["n_prompts"], yi, f" {r['mean_influence']:.3g}", va="center", fontsize=7)
    ax.set_xlim(0, agg["n_prompts"] * 1.15)
    ax.set_xlabel(f"prompts whose pruned circuit keeps the feature (of {agg['n_prompts']})")
    ax.set_title(f"Top recurring features ({agg['study']}); at each bar its mean influence on the logits")
    fig.tight_layout()
    return fig


def render_figures(agg: Mapping[str, Any]) -> dict[str, bytes]:
    """``{"heatmap.png": bytes, "heatmap.svg": ..., "top_features.png": ..., ...}``."""
    out: dict[str, bytes] = {}
    with matplotlib.rc_context(RC):
        for name, make in (("heatmap", _fig_heatmap), ("top_features", _fig_top_features)):
            for fmt, data in figure_bytes(make(agg), FORMATS, dpi=100).items():
                out[f"{name}.{fmt}"] = data
    return out


def write_figures(agg: Mapping[str, Any], figures_dir: str | os.PathLike) -> dict[str, Path]:
    """Render and write the figures atomically; returns ``{name: path}``."""
    return {name: atomic_write_bytes(Path(figures_dir) / name, data) for name, data in render_figures(agg).items()}
