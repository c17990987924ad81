"""The pruned-graph file: a small, deterministic ``.npz`` holding a :class:`PruneResult` and
the node tables export needs, so later stages need not read the graph store.

:func:`save_pruned_graph` writes it (atomically), :func:`load_pruned_graph` reads it back as a
:class:`PrunedGraph`; members and metadata are listed in ``docs/formats.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import _io
from pipeline.graph.pruning import PruneResult, edge_matrices

__all__ = [
    "PrunedGraph",
    "first_logit_feature_row",
    "load_pruned_graph",
    "save_pruned_graph",
    "selected_feature_table",
]

PRUNED_FORMAT = "circuit-pipeline/pruned-graph"
PRUNED_FORMAT_VERSION = 1
#: the PruneResult fields the metadata holds, under their own names
RESULT_METADATA = (
    "n_features",
    "n_errors",
    "n_tokens",
    "n_logits",
    "node_threshold",
    "edge_threshold",
    "node_score_threshold",
    "edge_score_threshold",
    "replacement_score",
    "completeness_score",
    "depth",
)
#: the PrunedGraph fields stored as members of the same name
GRAPH_MEMBERS = ("input_tokens", "logit_tokens", "logit_probabilities", "feature_info", "feature_activations")


@dataclass(eq=False)
class PrunedGraph:
    """A loaded pruned-graph artifact.  Offers the parts of the graph protocol that export
    needs (``n_layers``, ``n_pos``, ``n_logits``, ``n_selected``, ``n_nodes``, ``input_tokens``,
    ``logit_tokens``, ``logit_probabilities``, ``attrs``) plus ``feature_info`` (layer, pos,
    feature) and ``feature_activations`` of every selected feature, and ``result``."""

    result: PruneResult
    n_layers: int
    n_pos: int
    input_tokens: np.ndarray
    logit_tokens: np.ndarray
    logit_probabilities: np.ndarray
    feature_info: np.ndarray
    feature_activations: np.ndarray
    attrs: dict
    #: the first logit target's edge from every selected feature, from the unpruned graph
    #: (n_selected,), and the direction it reads (d_model,); None when not saved
    target_feature_edges: np.ndarray | None = None
    target_vector: np.ndarray | None = None

    @property
    def n_logits(self) -> int:
        return self.result.n_logits

    @property
    def n_selected(self) -> int:
        return self.result.n_features

    @property
    def n_nodes(self) -> int:
        return self.result.n_nodes


def selected_feature_table(graph) -> tuple[np.ndarray, np.ndarray]:
    """``(layer, pos, feature)`` (n_selected, 3) and activation of every selected feature, in
    graph order, for a graph-store ``Graph`` or a :class:`PrunedGraph`."""
    if hasattr(graph, "feature_info"):
        return np.asarray(graph.feature_info, np.int64), np.asarray(graph.feature_activations)
    sel = np.asarray(graph.selected_features, dtype=np.int64)
    info = np.asarray(graph.active_features, dtype=np.int64).reshape(-1, 3)[sel]
    acts = np.asarray(graph.activation_values)[sel]
    return info, acts


def first_logit_feature_row(graph, n_features: int) -> tuple[np.ndarray, np.ndarray | None]:
    """From a graph store: the first logit's edge from each of the first ``n_features`` nodes
    (the selected features), (n_features,) in the store's dtype, and the direction that logit
    reads (d_model,), or None when the store holds no logit vectors."""
    cols, vals = graph.row(graph.logit_node(0))
    edge = np.zeros(n_features, dtype=np.asarray(vals).dtype)
    sel = cols < n_features
    edge[cols[sel]] = vals[sel]
    has_vectors = "logit_vectors" in getattr(graph, "table_names", ())
    vector = np.asarray(graph.table("logit_vectors")[0]) if has_vectors else None
    return edge, vector


def save_pruned_graph(graph, result: PruneResult, path) -> Path:
    """Write the pruned graph as a small deterministic compressed ``.npz``, atomically.

    Members: ``node_mask``, ``node_influence``, ``cumulative_scores`` (all nodes);
    ``edge_targets``, ``edge_sources``, ``edge_weights``, ``edge_scores`` (kept edges,
    row-major); ``kept_nodes``; ``input_tokens``, ``logit_tokens``, ``logit_probabilities``;
    ``feature_info`` (n_selected, 3) and ``feature_activations``; ``metadata`` (UTF-8 JSON,
    sorted keys: layout, thresholds, score thresholds, graph scores, depth, graph attrs).
    From a graph store, also ``target_feature_edges``: the first logit's full row of edges
    from the selected features (kept or not; interventions predict ablation effects from it,
    so they need not read the store), and ``target_vector``, the direction it reads, when
    the store holds logit vectors.
    """
    rows, cols, weights = result.kept_edges()
    scores = result.edge_scores.tocoo().data
    info, acts = selected_feature_table(graph)
    meta = {
        "format": PRUNED_FORMAT,
        "format_version": PRUNED_FORMAT_VERSION,
        "n_layers": int(graph.n_layers),
        "n_pos": int(graph.n_pos),
        "n_nodes": result.n_nodes,
        **{name: getattr(result, name) for name in RESULT_METADATA},
        "attrs": _jsonable_attrs(getattr(graph, "attrs", {})),
    }
    # the member's own encoding, fixed since format version 1 (not _io's): compact, and NaN
    # allowed, as the graph scores are NaN where undefined
    meta_bytes = json.dumps(meta, sort_keys=True, allow_nan=True).encode("utf-8")
    arrays = {
        "node_mask": np.asarray(result.node_mask, dtype=bool),
        "node_influence": np.asarray(result.node_influence, dtype=np.float64),
        "cumulative_scores": np.asarray(result.cumulative_scores, dtype=np.float64),
        "kept_nodes": np.flatnonzero(result.node_mask).astype(np.int64),
        "edge_targets": rows.astype(np.int64),
        "edge_sources": cols.astype(np.int64),
        "edge_weights": np.asarray(weights),
        "edge_scores": np.asarray(scores, dtype=np.float64),
        "input_tokens": np.asarray(graph.input_tokens, dtype=np.int64),
        "logit_tokens": np.asarray(graph.logit_tokens, dtype=np.int64),
        "logit_probabilities": np.asarray(graph.logit_probabilities),
        "feature_info": info.astype(np.int64).reshape(-1, 3),
        "feature_activations": np.asarray(acts),
        "metadata": np.frombuffer(meta_bytes, dtype=np.uint8),
    }
    if hasattr(graph, "row") and hasattr(graph, "logit_node") and result.n_logits > 0:
        edge, vector = first_logit_feature_row(graph, result.n_features)
        arrays["target_feature_edges"] = edge
        if vector is not None:
            arrays["target_vector"] = vector
    path = Path(path)
    _io.atomic_write_bytes(path, _io.npz_bytes(arrays))
    return path


def load_pruned_graph(path) -> PrunedGraph:
    """Read an artifact written by :func:`save_pruned_graph`."""
    with np.load(Path(path), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["metadata"].tobytes().decode("utf-8"))
    if meta.get("format") != PRUNED_FORMAT:
        raise ValueError(f"{path} is not a pruned-graph artifact")
    if meta.get("format_version") != PRUNED_FORMAT_VERSION:
        raise ValueError(f"unsupported pruned-graph format_version {meta.get('format_version')}")
    n = int(meta["n_nodes"])
    edge_mask, edge_weights, edge_scores = edge_matrices(
        n, arrays["edge_targets"], arrays["edge_sources"], arrays["edge_weights"], arrays["edge_scores"]
    )
    result = PruneResult(
        node_mask=arrays["node_mask"],
        edge_mask=edge_mask,
        cumulative_scores=arrays["cumulative_scores"],
        node_influence=arrays["node_influence"],
        edge_weights=edge_weights,
        edge_scores=edge_scores,
        **{name: meta[name] for name in RESULT_METADATA},
    )
    return PrunedGraph(
        result=result,
        n_layers=int(meta["n_layers"]),
        n_pos=int(meta["n_pos"]),
        **{name: arrays[name] for name in GRAPH_MEMBERS},
        attrs=meta["attrs"],
        target_feature_edges=arrays.get("target_feature_edges"),
        target_vector=arrays.get("target_vector"),
    )


def _jsonable_attrs(attrs) -> dict:
    """The graph attributes JSON can encode (without NaN or infinity), keys sorted; the rest is
    left out."""
    out = {}
    for key in sorted(attrs or {}):
        value = attrs[key]
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        out[str(key)] = value
    return out
