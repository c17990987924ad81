"""A static rendering of a pruned attribution graph, for papers and CI (no browser needed).

``render_graph(graph)`` draws a graph JSON (what ``pipeline.analysis.export.create_graph_files``
writes: metadata, nodes, links; a dict or a path) with matplotlib and returns the PNG and SVG
bytes; ``write_graph_figures(graph, out_dir)`` writes them. The picture follows the viewer's
conventions (``pipeline/viewer/static/viewer.js``):

* rows are layers, bottom to top: token embeddings, transcoder layers 0..L-1, the logits;
  columns are prompt positions, left to right; several nodes in one (layer, position) cell
  sit side by side, most influential first;
* node area grows with the node's own influence, derived from the cumulative influence the
  export writes (nodes sorted by cumulative influence; own = cumulative - previous); logits
  by their probability; markers: features circles, error nodes grey squares, tokens grey
  rounded squares, logits diamonds;
* edges are straight lines, blue positive / red negative, width and opacity by |weight|
  (relative to the graph's largest), drawn weakest first;
* the prompt's tokens are written under their columns, the output logits (token and
  probability) above them, the slug and node / edge counts in the title.

Every node of the graph JSON is drawn exactly once (``GraphDrawing.n_nodes``), and every
link whose ends are in it.

Optional panel: when the graph JSON carries the export's ``attention_heads`` field (the qk
stage's attention file was exported with it), a panel to the right lists the top heads (layer,
head, summed |loading| over the exported edges, the query -> key positions, score and pattern)
with each head's top query x key pairs, named by their labels. Without the field (or with
``attention_panel=False``) the figure is exactly the graph alone.

Determinism: the same graph gives byte-identical files. Figures are built on the Agg canvas
(no pyplot, no global state), with one font family (DejaVu Sans, bundled with matplotlib),
SVG text as paths with a fixed ``svg.hashsalt`` (``RC``), and saved by :func:`figure_bytes`
without software / date metadata; the study and report figures are saved the same way.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.typing import RcKeyType

from pipeline._io import atomic_write_bytes, read_json

__all__ = ["GraphDrawing", "draw_graph", "figure_bytes", "graph_layout", "render_graph", "write_graph_figures"]

FEATURE = "cross layer transcoder"
ERROR = "mlp reconstruction error"
EMBEDDING = "embedding"
LOGIT = "logit"

RC: dict[RcKeyType, Any] = {
    "svg.hashsalt": "circuit-pipeline",
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 9,
    "path.simplify": True,
    "svg.fonttype": "path",
}
SAVE_METADATA = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}}
FORMATS = ("png", "svg")

PANEL_HEADS = 4  # heads listed in the attention panel
PANEL_TERMS = 3  # query x key pairs per head
POSITIVE = "#2166ac"  # blue, as the viewer
NEGATIVE = "#b2182b"  # red
STYLE = {  # feature_type -> (marker, face colour, edge colour)
    FEATURE: ("o", "#f2a65a", "#8c510a"),
    ERROR: ("s", "#969696", "#525252"),
    EMBEDDING: ("s", "#d9d9d9", "#636363"),
    LOGIT: ("D", "#74c476", "#238b45"),
}
MIN_AREA, MAX_AREA = 12.0, 260.0  # marker area (points^2) of the least / most influential node
CELL_WIDTH = 0.9  # share of a column the nodes of one cell spread over
NODE_SPACING = 0.2  # horizontal distance between the nodes of one cell (a column is 1 wide)


@dataclass
class GraphDrawing:
    """A drawn graph: the figure, where each node went (by its index in ``graph["nodes"]``),
    and how many nodes and links were drawn."""

    figure: Any
    positions: list[tuple[float, float]] = field(default_factory=list)
    n_nodes: int = 0
    n_links: int = 0
    n_heads: int = 0  # heads listed in the attention panel (0: no panel)


def figure_bytes(fig: Figure, formats: Sequence[str], dpi: int) -> dict[str, bytes]:
    """``{format: bytes}`` of ``fig`` (``png`` and / or ``svg``) drawn on the Agg canvas, without
    software or date metadata: the same figure gives the same bytes. Every figure of the
    package is saved through here (each under its own ``matplotlib.rc_context``)."""
    unknown = [f for f in formats if f not in SAVE_METADATA]
    if unknown:
        raise ValueError(f"unsupported figure formats {unknown}; use {list(SAVE_METADATA)}")
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    out = {}
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=SAVE_METADATA[fmt])
        out[fmt] = buf.getvalue()
    return out


def _load(graph) -> Mapping[str, Any]:
    return graph if isinstance(graph, Mapping) else read_json(graph)


def _row(node: Mapping[str, Any], n_layers: int) -> int:
    kind = node.get("feature_type")
    if kind == EMBEDDING:
        return 0
    if kind == LOGIT:
        return n_layers + 1
    return int(node["layer"]) + 1


def _n_layers(nodes) -> int:
    for n in nodes:
        if n.get("feature_type") == LOGIT:
            return int(n["layer"]) - 1
    layers = [int(n["layer"]) for n in nodes if n.get("feature_type") in (FEATURE, ERROR)]
    return max(layers) + 1 if layers else 0


def _own_influence(nodes) -> list[float]:
    """Each node's own influence: cumulative minus the previous node's in cumulative order
    (as the viewer estimates it); 0 for nodes without one (logits)."""
    ranked = sorted(
        (float(n["influence"]), i)
        for i, n in enumerate(nodes)
        if isinstance(n.get("influence"), (int, float)) and math.isfinite(n["influence"])
    )
    own = [0.0] * len(nodes)
    prev = 0.0
    for value, i in ranked:
        own[i] = max(0.0, value - prev)
        prev = value
    return own


def graph_layout(graph) -> tuple[list[tuple[float, float]], list[float], float, int]:
    """``(positions, columns, width, n_layers)``: an (x, y) per node of ``graph["nodes"]``, the x
    of each prompt position's column, the total width (x from 0 to width). y is the row (0 tokens, 1..L layers, L+1 logits). A column
    is as wide as its most crowded cell needs (``NODE_SPACING`` per node, at least 1), and
    the nodes of a cell sit side by side, the most influential in the middle."""
    graph = _load(graph)
    nodes = list(graph.get("nodes", []))
    n_layers = _n_layers(nodes)
    n_pos = max(
        [len(graph.get("metadata", {}).get("prompt_tokens", []) or [])] + [int(n["ctx_idx"]) + 1 for n in nodes]
    )
    own = _own_influence(nodes)
    cells: dict[tuple[int, int], list[int]] = {}
    for i, n in enumerate(nodes):
        cells.setdefault((_row(n, n_layers), int(n["ctx_idx"])), []).append(i)
    widths = [1.0] * n_pos
    for (_, pos), members in cells.items():
        widths[pos] = max(widths[pos], NODE_SPACING * (len(members) + 1))
    edges = np.concatenate([[0.0], np.cumsum(widths)])
    columns = [float((edges[p] + edges[p + 1]) / 2) for p in range(n_pos)]
    positions: list[tuple[float, float]] = [(0.0, 0.0)] * len(nodes)
    for (row, pos), members in sorted(cells.items()):

        def rank(i):
            if nodes[i].get("feature_type") == LOGIT:
                return (-float(nodes[i].get("token_prob") or 0.0), str(nodes[i]["node_id"]))
            return (-own[i], str(nodes[i]["node_id"]))

        members.sort(key=rank)
        k = len(members)
        step = min(
            NODE_SPACING * (1.6 if nodes[members[0]].get("feature_type") == LOGIT else 1.0),
            CELL_WIDTH * widths[pos] / k,
        )
        # most influential in the middle, then alternating right / left
        order = sorted(range(k), key=lambda j: (abs(j - (k - 1) / 2), j))
        for slot, j in enumerate(order):
            positions[members[slot]] = (columns[pos] + step * (j - (k - 1) / 2), float(row))
    return positions, columns, float(edges[-1]), n_layers


_OUTPUT = re.compile(r'^Output "(.*)" \(p=[^)]*\)$', re.S)


def _logit_text(node: Mapping[str, Any]) -> str:
    m = _OUTPUT.match(str(node.get("clerp", "")))
    token = m.group(1) if m else str(node.get("feature", ""))
    return f"{_short(token)} {float(node.get('token_prob') or 0.0):.2f}"


def _short(text: str, limit: int = 14) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _panel_heads(graph: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    field_ = graph.get("attention_heads")
    heads = field_.get("heads") if isinstance(field_, Mapping) else None
    return [h for h in heads if isinstance(h, Mapping)][:PANEL_HEADS] if isinstance(heads, list) else []


def _ref_name(ref: Mapping[str, Any]) -> str:
    return _short(str(ref.get("clerp") or ref.get("label") or ref.get("node_id") or "?"), 26)


def _draw_attention_panel(ax, heads: Sequence[Mapping[str, Any]]) -> None:
    """The top heads and their top query x key pairs, as text (top to bottom)."""
    ax.axis("off")
    lines: list[tuple[str, str]] = [("Top heads: query × key (QK)", "bold")]
    for head in heads:
        lines.append(
            (
                f"L{head['layer']} H{head['head']}  |loading| {float(head['loading']):.3g}  "
                f"p{head['query_pos']}→p{head['key_pos']}  score {float(head['score']):.3g}  "
                f"pattern {float(head['pattern']):.2f}",
                "bold",
            )
        )
        for term in list(head.get("terms", []))[:PANEL_TERMS]:
            lines.append(
                (f"  {float(term['value']):+.3g}  {_ref_name(term['query'])} × {_ref_name(term['key'])}", "normal")
            )
    step = min(0.06, 1.0 / (len(lines) + 1))
    for i, (text, weight) in enumerate(lines):
        ax.text(0.0, 1.0 - i * step, text, transform=ax.transAxes, ha="left", va="top", fontsize=7, fontweight=weight)


def draw_graph(graph, *, title: str | None = None, attention_panel: bool = True) -> GraphDrawing:
    """Draw a graph JSON (dict or path) on a new matplotlib ``Figure`` (Agg canvas); with the
    attention panel when the graph carries ``attention_heads`` and ``attention_panel``."""
    graph = _load(graph)
    heads = _panel_heads(graph) if attention_panel else []
    nodes = list(graph.get("nodes", []))
    links = list(graph.get("links", []))
    meta = graph.get("metadata", {}) or {}
    positions, columns, width, n_layers = graph_layout(graph)
    n_pos = len(columns)
    own = _own_influence(nodes)

    graph_w = min(40.0, max(5.0, 1.0 * width + 1.5))
    fig_h = max(3.5, 0.9 * (n_layers + 2) + 2.0)
    if heads:
        panel_w = 4.5
        fig = Figure(figsize=(graph_w + panel_w, fig_h))
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(1, 2, width_ratios=[graph_w, panel_w])
        ax = fig.add_subplot(grid[0, 0])
        _draw_attention_panel(fig.add_subplot(grid[0, 1]), heads)
    else:
        fig = Figure(figsize=(graph_w, fig_h))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()

    # edges, weakest first so the strong ones are on top
    index: dict[str, int] = {}
    for i, n in enumerate(nodes):
        index.setdefault(str(n["node_id"]), i)
    segs, weights = [], []
    for link in links:
        s, t = index.get(str(link["source"])), index.get(str(link["target"]))
        w = link.get("weight")
        if s is None or t is None or not isinstance(w, (int, float)) or not math.isfinite(w):
            continue
        segs.append((positions[s], positions[t]))
        weights.append(float(w))
    if segs:
        w = np.asarray(weights)
        mag = np.abs(w) / max(float(np.abs(w).max()), 1e-30)
        order = np.lexsort((np.arange(len(w)), mag))
        colors = [(POSITIVE if w[i] >= 0 else NEGATIVE) for i in order]
        lc = LineCollection(
            [segs[i] for i in order], colors=colors, linewidths=0.3 + 2.7 * mag[order], alpha=None, zorder=1
        )
        lc.set_alpha(list(0.25 + 0.6 * mag[order]))
        ax.add_collection(lc)

    # nodes, one scatter per node type
    max_own = max([own[i] for i, n in enumerate(nodes) if n.get("feature_type") in (FEATURE, ERROR)] or [0.0])
    drawn = 0
    for kind, (marker, face, edge) in STYLE.items():
        members = [i for i, n in enumerate(nodes) if n.get("feature_type") == kind]
        if not members:
            continue
        if kind == LOGIT:
            scale = [float(nodes[i].get("token_prob") or 0.0) for i in members]
        elif kind == EMBEDDING:
            scale = [0.35] * len(members)
        else:
            scale = [own[i] / max_own if max_own > 0 else 0.5 for i in members]
        sizes = [MIN_AREA + (MAX_AREA - MIN_AREA) * math.sqrt(max(0.0, min(1.0, v))) for v in scale]
        xy = np.asarray([positions[i] for i in members], dtype=np.float64)
        ax.scatter(xy[:, 0], xy[:, 1], s=sizes, marker=marker, c=face, edgecolors=edge, linewidths=0.6, zorder=2)
        drawn += len(members)
        if kind == LOGIT:
            for i in members:
                x, y = positions[i]
                ax.text(
                    x,
                    y + 0.25,
                    _logit_text(nodes[i]),
                    rotation=40,
                    ha="left",
                    va="bottom",
                    fontsize=7,
                    rotation_mode="anchor",
                )

    # prompt tokens under their columns
    tokens = list(meta.get("prompt_tokens", []) or [])
    for pos in range(n_pos):
        text = _short(str(tokens[pos])) if pos < len(tokens) else ""
        ax.text(columns[pos], -0.35, text, rotation=35, ha="right", va="top", fontsize=7, rotation_mode="anchor")

    ax.set_xlim(0.0, max(width, 1.0) + 0.6)  # room for the last logit's label
    ax.set_ylim(-0.6, n_layers + 1.9)
    ax.set_yticks(range(n_layers + 2), ["tokens", *[f"L{l}" for l in range(n_layers)], "logits"])
    ax.set_xticks(columns, [""] * n_pos)
    ax.tick_params(axis="x", length=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="y", color="#eeeeee", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    n_links = len(segs)
    head = title if title is not None else str(meta.get("slug", ""))
    ax.set_title(f"{head}   ({drawn} nodes, {n_links} edges; blue +, red −)")
    handles = [
        Line2D(
            [], [], linestyle="none", marker=m, markersize=6, markerfacecolor=f, markeredgecolor=e, markeredgewidth=0.6
        )
        for m, f, e in STYLE.values()
    ]
    ax.legend(
        handles,
        ["feature", "error", "token", "logit"],
        loc="upper left",
        fontsize=7,
        frameon=False,
        ncols=4,
        bbox_to_anchor=(0.0, -0.12 if tokens else -0.05),
    )
    fig.tight_layout()
    return GraphDrawing(figure=fig, positions=positions, n_nodes=drawn, n_links=n_links, n_heads=len(heads))


def render_graph(
    graph, *, formats=FORMATS, dpi: int = 150, title: str | None = None, attention_panel: bool = True
) -> dict[str, bytes]:
    """``{format: bytes}`` of the graph's figure (``png`` and / or ``svg``), deterministic."""
    with matplotlib.rc_context(RC):
        return figure_bytes(draw_graph(graph, title=title, attention_panel=attention_panel).figure, formats, dpi)


def write_graph_figures(
    graph, out_dir: str | os.PathLike, stem: str = "graph", *, formats=FORMATS, dpi: int = 150
) -> dict[str, Path]:
    """Write ``out_dir/<stem>.<format>`` for each format, atomically; returns ``{format: path}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        fmt: atomic_write_bytes(out_dir / f"{stem}.{fmt}", data)
        for fmt, data in render_graph(graph, formats=formats, dpi=dpi).items()
    }
