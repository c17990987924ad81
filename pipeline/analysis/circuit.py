"""What a graph says about its circuit, in the form the causal checks of
:mod:`pipeline.analysis.evaluation` need.

:func:`read_circuit` takes any of the artifacts evaluation meets, and gets the target logit's
edges from every feature (the attribution's predictions) from the best source it holds:

* a pruned graph with ``edges``, the unpruned graph store it was pruned from: the store's row;
* a pruned graph saved from a store: the row it carries (``target_feature_edges``);
* a pruned graph alone: its kept edges only (a feature whose edge to the target was pruned
  is predicted 0);
* a graph store: pruned here, its own row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.engine.replacement import ReplacementModel
from pipeline.graph.pruned import first_logit_feature_row, load_pruned_graph, selected_feature_table
from pipeline.graph.pruning import prune_graph
from pipeline.graph.store import Graph

__all__ = ["Circuit", "read_circuit"]


@dataclass
class Circuit:
    """Graph-order features and what the graph says about them."""

    features: np.ndarray  # (n_features, 3) layer, pos, feature
    activations: np.ndarray  # (n_features,)
    influence: np.ndarray  # (n_features,)
    in_circuit: np.ndarray  # (n_features,) bool
    edge_to_target: np.ndarray  # (n_features,) A[first logit, feature]
    target_token: int
    target_vector: Tensor  # (d_model,) the first logit's read vector
    tokens: np.ndarray  # (n_pos,) the graph's input tokens
    prompt: str | None
    pruning: dict[str, float]  # node_threshold, edge_threshold, replacement_score, completeness_score


def _load_graph(graph):
    """A path as a PrunedGraph (a file) or a Graph (a store directory); objects as they are."""
    if isinstance(graph, (str, os.PathLike)):
        path = Path(graph)
        return load_pruned_graph(path) if path.is_file() else Graph.open(path)
    return graph


def _full_row(edges, feats: np.ndarray, n_f: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The first logit's edges from every feature, and its read vector, from the unpruned store."""
    efeats, _ = selected_feature_table(edges)
    if efeats.shape != feats.shape or not np.array_equal(efeats, feats):
        raise ValueError(
            "edges: the graph store does not hold the pruned graph's features (same prompt, model and attribution run?)"
        )
    return first_logit_feature_row(edges, n_f)


def read_circuit(
    model: ReplacementModel, graph: Any, *, node_threshold: float, edge_threshold: float, edges: Any = None
) -> Circuit:
    """The :class:`Circuit` of ``graph`` (a Graph, a PrunedGraph, or the path of either; see the
    module docstring for ``edges``). A graph store is pruned with ``node_threshold`` /
    ``edge_threshold``; a pruned graph keeps its own."""
    graph = _load_graph(graph)
    edges = None if edges is None else _load_graph(edges)

    # 1. the features, the pruning and the target logit's row of edges from the features
    feats, acts = selected_feature_table(graph)
    n_f = len(feats)
    if hasattr(graph, "result") and edges is not None:  # pruned circuit, full attribution row
        result = graph.result
        edge, vector = _full_row(edges, np.asarray(feats, np.int64).reshape(-1, 3), n_f)
    elif getattr(graph, "target_feature_edges", None) is not None:  # full row saved by prune
        result = graph.result
        edge = np.asarray(graph.target_feature_edges, np.float64)
        if edge.shape != (n_f,):
            raise ValueError(f"the pruned graph's target_feature_edges has shape {edge.shape}, expected ({n_f},)")
        vector = graph.target_vector
    elif hasattr(graph, "result"):  # a pruned-graph artifact without it: its kept edges only
        result = graph.result
        logit0 = result.n_nodes - result.n_logits
        row = result.edge_weights.getrow(logit0).tocoo()
        edge = np.zeros(n_f)
        sel = row.col < n_f
        edge[row.col[sel]] = row.data[sel]
        vector = None
    else:
        result = prune_graph(graph, node_threshold, edge_threshold)
        edge, vector = first_logit_feature_row(graph, n_f)

    # 2. the target: the first logit's token and read vector (stored, or its unembedding column)
    if graph.n_logits == 0:
        raise ValueError("the graph has no logit nodes: nothing to measure interventions against")
    token = int(graph.logit_tokens[0])
    W_U = model.W_U
    if vector is not None:
        target_vector = torch.as_tensor(vector, dtype=model.dtype, device=W_U.device)
    else:
        if token < 0:
            raise ValueError(
                "the graph's first logit target is not a token and the graph stores no "
                "logit vectors: evaluate the unpruned graph store instead"
            )
        target_vector = W_U[:, token] - W_U.mean(-1)
    return Circuit(
        features=np.asarray(feats, np.int64).reshape(-1, 3),
        activations=np.asarray(acts, np.float64),
        influence=np.asarray(result.node_influence[:n_f], np.float64),
        in_circuit=np.asarray(result.node_mask[:n_f], bool),
        edge_to_target=edge.astype(np.float64),
        target_token=token,
        target_vector=target_vector.to(dtype=model.dtype, device=W_U.device),
        tokens=np.asarray(graph.input_tokens, np.int64),
        prompt=(getattr(graph, "attrs", {}) or {}).get("prompt"),
        pruning={
            "node_threshold": result.node_threshold,
            "edge_threshold": result.edge_threshold,
            "replacement_score": result.replacement_score,
            "completeness_score": result.completeness_score,
        },
    )
