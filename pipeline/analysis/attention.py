"""Why the heads of a circuit attend where they do: the top edges of a pruned graph split across
attention heads (head loadings), and for the heads that carry most of them, one QK attribution
each, at the (query, key) pair that carries most of the head's loading.

The result is the attention file ``results/<id>/attention/attention.json`` (format
"circuit-pipeline/attention", version 1), with every node named by the export's node ids.
Spec: ``docs/qk-attributions.md`` ("In the pipeline"); head loadings: ``docs/head-loadings.md``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from pipeline.analysis.export import error_node_id, feature_node_id, logit_node_id, token_node_id
from pipeline.engine.head_loadings import graph_capture, read_head_loadings, top_edges, write_head_loadings
from pipeline.engine.qk import QKNode, qk_attribution
from pipeline.engine.replacement import ReplacementModel
from pipeline.graph.pruned import PrunedGraph, selected_feature_table
from pipeline.graph.pruning import PruneResult
from pipeline.graph.store import Graph

__all__ = ["FORMAT", "VERSION", "choose_heads", "explain_attention", "graph_node_ids", "qk_node_record"]

FORMAT = "circuit-pipeline/attention"
VERSION = 1


def graph_node_ids(graph: Graph) -> list[str]:
    """The export's node id (``pipeline.analysis.export``) of every graph-order node of ``graph``:
    features ``<layer>_<feature>_<pos>``, errors ``0_<layer>_<pos>``, tokens ``E_<token>_<pos>``,
    logits ``<n_layers + 1>_<token>_<n_pos - 1>``."""
    n_layers, n_pos = int(graph.n_layers), int(graph.n_pos)
    info, _ = selected_feature_table(graph)
    ids = [feature_node_id(layer, f, pos) for layer, pos, f in info.tolist()]
    ids += [error_node_id(layer, pos) for layer in range(n_layers) for pos in range(n_pos)]
    ids += [token_node_id(tok, pos) for pos, tok in enumerate(np.asarray(graph.input_tokens).tolist())]
    ids += [logit_node_id(n_layers, tok, n_pos) for tok in np.asarray(graph.logit_tokens).tolist()]
    return ids


def qk_node_record(
    node: QKNode, ids: list[str], kept: np.ndarray, labels: Mapping[tuple[int, int], str] | None = None
) -> dict:
    """A QK row or column as the attention file's NODE: its kind, layer, position, feature, the
    export's node id when the pruned graph holds it (``kept``: the pruned node mask), else None,
    and its label; ``clerp`` too for a feature ``labels`` names ((layer, feature) -> text)."""
    g = node.graph_node
    record = {
        "kind": node.kind,
        "layer": node.layer,
        "pos": node.pos,
        "feature": node.feature,
        "node_id": ids[g] if g is not None and bool(kept[g]) else None,
        "label": node.label(),
    }
    if labels is not None and node.kind == "feature" and node.layer is not None and node.feature is not None:
        key = (node.layer, node.feature)
        if key in labels:
            record["clerp"] = labels[key]
    return record


def choose_heads(heads: np.ndarray, n: int) -> list[tuple[int, int, float]]:
    """The ``n`` heads carrying the most loading over the edges: (layer, head, loading), the
    loading ``sum over edges of |heads[e, layer, head]|``, largest first (ties: lower layer, then
    lower head); heads with no loading are left out.

    heads: (E, n_layers, n_heads) per-edge head loadings (zero off an edge's way)
    """
    total = np.abs(heads).sum(axis=0)  # (n_layers, n_heads)
    layer, head = np.meshgrid(np.arange(total.shape[0]), np.arange(total.shape[1]), indexing="ij")
    order = np.lexsort((head.ravel(), layer.ravel(), -total.ravel()))
    chosen = [(int(layer.ravel()[i]), int(head.ravel()[i]), float(total.ravel()[i])) for i in order]
    return [c for c in chosen if c[2] > 0][: int(n)]


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _clean_patterns(model: ReplacementModel, tokens: torch.Tensor) -> list[np.ndarray]:
    """The attention patterns of the clean run, per layer (n_heads, n_pos, n_pos)."""
    patterns: dict[int, np.ndarray] = {}

    def keep(layer: int):
        def hook(tensor, *, hook) -> None:
            patterns[layer] = tensor[0].detach().double().cpu().numpy()

        return hook

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep(layer)) for layer in range(model.n_layers)]
    with torch.no_grad(), model.hooks(hooks):
        model.bridge(tokens[None])
    return [patterns[layer] for layer in range(model.n_layers)]


def _top(values: np.ndarray, nodes: list[dict], n: int) -> list[dict]:
    """The ``n`` entries of ``values`` with the largest |value|, largest first (ties: lower index)."""
    order = np.lexsort((np.arange(len(values)), -np.abs(values)))[:n]
    return [{"node": nodes[i], "value": float(values[i])} for i in order]


def explain_attention(
    graph: Graph,
    pruned: PruneResult | PrunedGraph,
    model: ReplacementModel,
    *,
    edges: int,
    heads: int,
    terms: int,
    expand_attention: bool = False,
    labels: Mapping[tuple[int, int], str] | None = None,
    progress: bool = True,
    store: str | Path | None = None,
    chunk_size: int = 512,
    prompt_id: str | None = None,
) -> dict:
    """The attention file (a dict, see ``docs/qk-attributions.md``) of ``graph`` and its pruning.

    1. ``edges``: the top ``edges`` kept edges of ``pruned`` by edge score (``top_edges``), each
       split across the heads of every attention layer on its way (``write_head_loadings`` with
       positions, streamed into the Zarr store ``store``: resumable, a rerun skips finished
       chunks; None: a temporary directory). ``heads[L][h] + ... + bypass == edge`` per layer.
    2. ``heads``: the ``heads`` heads with the largest sum over those edges of |loading|.
    3. For each, one QK attribution (``qk_attribution``, top ``terms`` terms and marginals) at
       the (query_pos, key_pos) pair with the largest ``sum over edges of |share[p, k]|``, where
       ``share[p, k] = A[p, k] * (d target / d z[p]) . dv[k]`` is the part of an edge's loading
       of the head that the head moved from key position k into its output at query position p
       (``pair_shares``; summed over p and k it is the loading). Ties: lower p, then lower k.

    model: the weights the graph was attributed with (checked by digest). labels: optional
    (layer, feature) -> text, added to feature nodes as ``clerp``. Nodes are named by the
    export's node ids (:func:`graph_node_ids`), None for those the pruned graph does not keep.
    """
    n_edges, n_heads_wanted, n_terms = (
        _positive(k, v) for k, v in (("edges", edges), ("heads", heads), ("terms", terms))
    )
    result = pruned.result if isinstance(pruned, PrunedGraph) else pruned
    if result.n_nodes != int(graph.n_nodes) or result.n_features != int(graph.n_selected):
        raise ValueError(
            "the pruning result does not belong to this graph (node counts differ): prune this graph "
            "(pipeline.graph.pruning.prune_graph) or pass the graph it was pruned from"
        )
    say = print if progress else (lambda *a, **k: None)
    ids = graph_node_ids(graph)
    kept = np.asarray(result.node_mask, dtype=bool)
    chosen_edges = top_edges(result, n_edges)
    if not len(chosen_edges):
        raise ValueError("the pruned graph keeps no edges: prune with a higher edge_threshold")
    capture = graph_capture(graph, model)
    temp = None if store is not None else Path(tempfile.mkdtemp(prefix="head_loadings."))
    path = Path(store) if store is not None else temp / "head_loadings.zarr"  # type: ignore[operator]
    try:
        say(f"head loadings of {len(chosen_edges)} edges -> {path}")
        write_head_loadings(
            graph, chosen_edges, model=model, chunk_size=chunk_size, capture=capture, out=path, positions=True
        )
        table = read_head_loadings(graph, out=path)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    assert table.pair_abs is not None  # written with positions=True
    patterns = _clean_patterns(model, capture.tokens)

    edge_records = []
    for i in range(len(table)):
        hl = table[i]
        edge_records.append(
            {
                "source": ids[hl.source],
                "target": ids[hl.target],
                "weight": float(hl.graph_edge),
                "edge": float(hl.edge),
                "layers": [
                    {"layer": int(layer), "heads": [float(v) for v in row], "bypass": float(b)}
                    for layer, row, b in zip(hl.layers.tolist(), hl.heads, hl.bypass)
                ],
            }
        )

    head_records = []
    for layer, head, loading in choose_heads(table.heads, n_heads_wanted):
        shares = table.pair_abs[layer, head]  # (n_pos, n_pos)
        query_pos, key_pos = (int(v) for v in np.unravel_index(int(np.argmax(shares)), shares.shape))
        say(f"QK attribution of layer {layer} head {head} at query {query_pos} -> key {key_pos}")
        qk = qk_attribution(
            model, capture, layer, head, query_pos, key_pos, top=n_terms, graph=graph, expand_attention=expand_attention
        )
        q_nodes = [qk_node_record(n, ids, kept, labels) for n in qk.query_nodes]
        k_nodes = [qk_node_record(n, ids, kept, labels) for n in qk.key_nodes]
        q_index = {n: i for i, n in enumerate(qk.query_nodes)}
        k_index = {n: i for i, n in enumerate(qk.key_nodes)}
        head_records.append(
            {
                "layer": layer,
                "head": head,
                "loading": loading,
                "edges": [int(e) for e in np.nonzero(np.abs(table.heads[:, layer, head]) > 0)[0]],
                "query_pos": query_pos,
                "key_pos": key_pos,
                "pattern": float(patterns[layer][head, query_pos, key_pos]),
                "score": float(qk.total),
                "terms_sum": float(qk.terms_sum),
                "terms": [
                    {"query": q_nodes[q_index[t.query]], "key": k_nodes[k_index[t.key]], "value": float(t.value)}
                    for t in qk.terms
                ],
                "query_marginals": _top(qk.query_marginals.numpy(), q_nodes, n_terms),
                "key_marginals": _top(qk.key_marginals.numpy(), k_nodes, n_terms),
            }
        )

    tokens = [model.tokenizer.decode([int(t)]) for t in np.asarray(graph.input_tokens).tolist()]
    prompt = (graph.attrs or {}).get("prompt")
    return {
        "format": FORMAT,
        "version": VERSION,
        "prompt_id": prompt_id,
        "prompt": "".join(tokens) if prompt is None else str(prompt),
        "tokens": tokens,
        "n_layers": int(model.n_layers),
        "n_heads": int(model.bridge.cfg.n_heads),
        "config": {
            "edges": n_edges,
            "heads": n_heads_wanted,
            "terms": n_terms,
            "expand_attention": bool(expand_attention),
        },
        "edges": edge_records,
        "heads": head_records,
    }
