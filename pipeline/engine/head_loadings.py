"""Head loadings: one edge of an attribution graph split across the attention heads on its way.

The frozen replacement model is linear in every source's output vector, so an edge is a sum over
paths. At an attention layer L between source and target, the paths through head h carry
``(d target / d z[L, h]) . dz[L, h]`` (z: the heads' outputs before W_O) and the others bypass
L's attention, so ``bypass = edge - heads.sum()``. One frozen forward serves a whole batch of
edges: a backward pass vmapped over the targets gives ``d target / d z`` and the edges, and a
double backward vmapped over the sources gives every ``dz`` (``pipeline.engine.edge_sweeps``).
Spec: ``docs/head-loadings.md``.
"""

from __future__ import annotations

import hashlib
import operator
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import Tensor
from zarr.storage import LocalStore

from pipeline import _io
from pipeline._io import StoreLock
from pipeline.engine.edge_sweeps import (
    NO_VALUE_HOOKS,
    EdgeSweeper,
    HeadLoadingsError,
    SourceVector,
    TargetVector,
    layers_on_the_way,
    position_shares,
)
from pipeline.engine.replacement import Capture, ReplacementModel
from pipeline.graph.pruning import PruneResult
from pipeline.graph.store import Graph, read_array
from pipeline.graph.writer import _create_array

__all__ = [
    "HeadLoadings",
    "HeadLoadingsError",
    "HeadLoadingsTable",
    "check_edge",
    "check_same_weights",
    "describe",
    "graph_capture",
    "head_loadings",
    "read_head_loadings",
    "source_vector",
    "target_vector",
    "top_edges",
    "write_head_loadings",
]


# ---------------------------------------------------------------------------- graph nodes
def _node_id(graph: Graph, node, role: str) -> int:
    """``node`` as a graph-order id of ``graph``, or a one-line error naming the valid range."""
    try:
        node = operator.index(node)
    except TypeError:
        raise HeadLoadingsError(f"{role} node {node!r} is not an integer: pass a graph-order node id") from None
    if not 0 <= node < graph.n_nodes:
        raise HeadLoadingsError(
            f"{role} node {node} is out of range: {graph.path} has graph-order nodes 0 to {graph.n_nodes - 1} "
            "(features, errors, tokens, logits); get ids from Graph.feature_node / error_node / token_node / logit_node"
        )
    return node


def describe(graph: Graph, node: int) -> str:
    """``node`` in words: its kind, layer and position (for error messages and reports)."""
    kind = graph.node_kind(node)
    if kind == "feature":
        layer, pos, f = (int(v) for v in graph.active_features[graph.node_active_index(node)])
        return f"feature node {node} (layer {layer}, position {pos}, feature {f})"
    if kind == "error":
        layer, pos = divmod(node - graph.error_slice.start, graph.n_pos)
        return f"error node {node} (layer {layer}, position {pos})"
    if kind == "token":
        return f"token node {node} (position {node - graph.token_slice.start})"
    return f"logit node {node} (token id {int(graph.logit_tokens[node - graph.logit_slice.start])})"


def source_vector(graph: Graph, node: int, model: ReplacementModel, capture: Capture) -> SourceVector:
    """The output vector of graph-order source ``node``, from the model's own run in its dtype
    (the store keeps float32 copies only)."""
    node = _node_id(graph, node, "source")
    kind = graph.node_kind(node)
    if kind == "feature":
        layer, pos, f = (int(v) for v in graph.active_features[graph.node_active_index(node)])
        tc = model.transcoders
        dec = tc.decoder_vectors(layer, np.array([f]))[0].to(capture.errors)  # (n_out, d_model)
        act = capture.activations[layer, pos, f]
        writes = {out: act * dec[j] for j, out in enumerate(tc.output_layers(layer))}
        return SourceVector(kind, layer, pos, writes)
    if kind == "error":
        layer, pos = divmod(node - graph.error_slice.start, graph.n_pos)
        vector = capture.errors[layer, pos]
        if pos == 0 and graph.attrs.get("config", {}).get("zero_bos_errors"):
            vector = torch.zeros_like(vector)  # the graph gave BOS errors no edges
        return SourceVector(kind, layer, pos, {layer: vector})
    if kind == "token":
        pos = node - graph.token_slice.start
        return SourceVector(kind, -1, pos, {}, embed=capture.token_embeddings[pos])
    raise HeadLoadingsError(
        f"source {describe(graph, node)} is a logit: logits have no outgoing edges; pass it as the target"
    )


def target_vector(
    graph: Graph, node: int, model: ReplacementModel, *, unembed_mean: Tensor | None = None
) -> TargetVector:
    """Where graph-order target ``node`` reads, and its read vector in the model's dtype.

    unembed_mean: ``model.W_U.mean(dim=-1)`` when the caller has it (a mean over the vocabulary:
    worth computing once for many logit targets)."""
    node = _node_id(graph, node, "target")
    kind = graph.node_kind(node)
    dtype, device = model.dtype, model.device
    if kind == "feature":
        layer, pos, f = (int(v) for v in graph.active_features[graph.node_active_index(node)])
        vector = model.transcoders.encoder_vectors(layer, np.array([f]))[0].to(device=device, dtype=dtype)
        return TargetVector(kind, layer, pos, vector)
    if kind == "logit":
        i = node - graph.logit_slice.start
        stored = graph.table("logit_vectors")[i]
        vector = torch.as_tensor(stored, device=device, dtype=dtype)
        token = int(graph.logit_tokens[i])
        if token >= 0:
            # a token target's vector is its de-meaned unembedding column: recomputed in the model's
            # dtype when it is the one stored (a pair or custom direction keeps the stored float32)
            W_U = model.W_U
            mean = W_U.mean(dim=-1) if unembed_mean is None else unembed_mean
            exact = (W_U[:, token] - mean).detach()
            if np.array_equal(exact.float().cpu().numpy(), stored):
                vector = exact.to(dtype)
        return TargetVector(kind, graph.n_layers, graph.n_pos - 1, vector)
    raise HeadLoadingsError(
        f"target {describe(graph, node)} has no incoming edges (only features and logits have rows): "
        "pass a feature or logit node as the target"
    )


def check_same_weights(graph: Graph, model: ReplacementModel) -> None:
    """The graph was attributed with this model's weights and transcoders: the digests its
    store records equal ``model.digest()`` and ``model.transcoders.digest()``."""
    for what, key, loaded in (
        ("model", "model_digest", model.digest),
        ("transcoders", "transcoders_digest", model.transcoders.digest),
    ):
        stored = graph.attrs.get(key)
        if stored is None:
            raise HeadLoadingsError(
                f"graph {graph.path} records no {what} digest ({key}), so its weights cannot be checked: "
                "re-attribute the prompt with this version of circuit-pipeline"
            )
        if stored != loaded():
            raise HeadLoadingsError(
                f"graph {graph.path} was attributed with other {what} weights ({key} {stored[:12]}... in the "
                f"store, {loaded()[:12]}... loaded): load the {what} the graph was made with, or re-attribute "
                "the prompt with these"
            )


def graph_capture(graph: Graph, model: ReplacementModel) -> Capture:
    """The clean run of the graph's prompt, checked to have the graph's active features."""
    check_same_weights(graph, model)
    tokens = torch.as_tensor(np.asarray(graph.input_tokens), dtype=torch.long)
    capture = model.capture(tokens)
    active = capture.active_features()[0].cpu().numpy()
    if not np.array_equal(active, np.asarray(graph.active_features, dtype=active.dtype)):
        raise HeadLoadingsError(
            f"on the prompt of {graph.path} the model has {len(active)} active features, the graph "
            f"{graph.n_active} (other ones): the graph was attributed in {graph.attrs.get('dtype')}, "
            f"the model runs in {model.dtype}; load the model in the graph's dtype"
        )
    return capture


def _location(graph: Graph, node: int) -> tuple[int, int]:
    """(layer, position) of a graph-order node as the structural mask sees it: tokens at layer
    -1, logits at layer n_layers and the last position."""
    kind = graph.node_kind(node)
    if kind == "feature":
        layer, pos, _ = (int(v) for v in graph.active_features[graph.node_active_index(node)])
        return layer, pos
    if kind == "error":
        return divmod(node - graph.error_slice.start, graph.n_pos)
    if kind == "token":
        return -1, node - graph.token_slice.start
    return graph.n_layers, graph.n_pos - 1


def check_edge(graph: Graph, source, target) -> tuple[int, int]:
    """``(source, target)`` as graph-order ids of a pair that can have an edge, or a one-line
    HeadLoadingsError: an id out of range, a logit source, an error or token target, or a source
    that cannot reach the target. Reads only the graph."""
    source = _node_id(graph, source, "source")
    target = _node_id(graph, target, "target")
    if graph.node_kind(source) == "logit":
        raise HeadLoadingsError(
            f"source {describe(graph, source)} is a logit: logits have no outgoing edges; pass it as the target"
        )
    if graph.node_kind(target) in ("error", "token"):
        raise HeadLoadingsError(
            f"target {describe(graph, target)} has no incoming edges (only features and logits have rows): "
            "pass a feature or logit node as the target"
        )
    (src_layer, src_pos), (tgt_layer, tgt_pos) = _location(graph, source), _location(graph, target)
    if not (src_layer < tgt_layer and src_pos <= tgt_pos):
        raise HeadLoadingsError(
            f"source {describe(graph, source)} cannot reach target {describe(graph, target)}: edges run from an "
            "earlier layer (tokens: below layer 0) at the same or an earlier position, so there is no such "
            "edge; pick a source upstream of the target (Graph.row(target) lists its sources)"
        )
    return source, target


# ---------------------------------------------------------------------------- the API
@dataclass(frozen=True)
class HeadLoadings:
    """One edge split across the attention heads of every layer on its way.

    source, target: graph-order nodes
    layers: (k,) the attention layers on the way (source layer < L <= target's read layer)
    heads: (k, n_heads) the part of the edge through each head of each layer
    bypass: (k,) the part of the edge that avoids that layer's attention (residual stream,
    transcoder skip terms, writes of a cross-layer feature into later layers)
    edge: the edge, recomputed in the model's dtype; for every i, heads[i].sum() + bypass[i]
    equals it up to rounding (:meth:`sum_error`)
    graph_edge: the edge as the graph stores it (float32; 0.0 when not stored)
    """

    source: int
    target: int
    layers: np.ndarray
    heads: np.ndarray
    bypass: np.ndarray
    edge: float
    graph_edge: float

    def sum_error(self) -> float:
        """max over layers of |heads.sum() + bypass - edge| (0.0 with no layer on the way)."""
        if not len(self.layers):
            return 0.0
        return float(np.abs(self.heads.sum(axis=1) + self.bypass - self.edge).max())


def head_loadings(
    graph: Graph, source: int, target: int, *, model: ReplacementModel, capture: Capture | None = None
) -> HeadLoadings:
    """Split the edge ``source -> target`` (graph-order node ids) of ``graph`` across the
    attention heads of every layer on its way.

    model: the replacement model the graph was attributed with (checked by digest; any dtype
    with the same active features, float64 for exact checks). capture: the clean run of the
    graph's prompt (``graph_capture``), to reuse across calls.
    Raises HeadLoadingsError for a node id out of range, a logit source or an error/token
    target, a source that cannot reach the target, or a graph of other weights.
    """
    source, target = check_edge(graph, source, target)
    if capture is None:
        capture = graph_capture(graph, model)  # checks the weights too
    else:
        check_same_weights(graph, model)
    chunk = _compute_chunk(graph, model, capture, np.array([[source, target]], dtype=np.int64))
    on_way = chunk["on_way"][0]
    return HeadLoadings(
        source=source,
        target=target,
        layers=np.nonzero(on_way)[0].astype(np.int64),
        heads=chunk["heads"][0, on_way],
        bypass=chunk["bypass"][0, on_way],
        edge=float(chunk["edge"][0]),
        graph_edge=float(chunk["graph_edge"][0]),
    )


# ---------------------------------------------------------------------------- many edges, streamed
GROUP = "head_loadings"  # the group inside a graph store
GROUP_FORMAT = "circuit-pipeline/head-loadings"
GROUP_VERSION = 1


def top_edges(result: PruneResult, n: int) -> np.ndarray:
    """The ``n`` kept edges of a pruned graph with the highest edge scores: (k, 2) graph-order
    [source, target] rows, best first (ties by target, then source: deterministic)."""
    coo = result.edge_scores.tocoo()
    order = np.lexsort((coo.col, coo.row, -coo.data))[: int(n)]
    return np.stack([coo.col[order], coo.row[order]], axis=1).astype(np.int64)


def _chunk_name(index: int) -> str:
    return f"chunk_{index:06d}"


def _compute_chunk(
    graph: Graph,
    model: ReplacementModel,
    capture: Capture,
    edges: np.ndarray,
    positions: bool = False,
    sweeper: EdgeSweeper | None = None,
) -> dict[str, np.ndarray]:
    """The loadings of ``edges`` (B, 2) from one sweep over their distinct sources and targets:
    each on-the-way layer's heads are ``grad . dz`` summed over positions and head dimensions,
    its bypass the rest of the edge. sweeper: the prompt's :class:`EdgeSweeper` (with values
    when ``positions``), shared by a caller's chunks; built here when None.

    returns heads (B, n_layers, n_heads), bypass (B, n_layers), on_way (B, n_layers) bool
    (layers off an edge's way hold zeros), edge (B,) float64, graph_edge (B,) float32; with
    ``positions`` also pair_abs (n_layers, n_heads, n_pos, n_pos): the sum over the chunk's
    edges of |their loadings split by query and key position| (as :func:`pair_shares`), checked to
    add up to the loadings
    """
    n_layers = model.n_layers
    source_ids, si = np.unique(edges[:, 0], return_inverse=True)
    target_ids, ti = np.unique(edges[:, 1], return_inverse=True)
    sources = [source_vector(graph, int(s), model, capture) for s in source_ids]
    mean = model.W_U.mean(dim=-1).detach() if any(graph.node_kind(int(t)) == "logit" for t in target_ids) else None
    targets = [target_vector(graph, int(t), model, unembed_mean=mean) for t in target_ids]
    if sweeper is None:
        n = max(t.pos for t in targets) + 1  # causal: nothing after the last target's position matters
        sweeper = EdgeSweeper(model, capture, n, values=positions)
    if positions and not sweeper.values:
        raise HeadLoadingsError(NO_VALUE_HOOKS)
    B, n_heads = len(edges), int(model.bridge.cfg.n_heads)
    on_way = np.zeros((B, n_layers), dtype=bool)
    for i in range(B):
        on_way[i, layers_on_the_way(sources[si[i]].layer, targets[ti[i]].layer, n_layers)] = True
    heads = np.zeros((B, n_layers, n_heads))
    edge = np.zeros(B)
    pair_abs = np.zeros((n_layers, n_heads, capture.n_pos, capture.n_pos)) if positions else None
    # the targets' gradients are kept for a group at a time; each group sweeps the sources it needs
    for first in range(0, len(targets), TARGET_GROUP):
        group = np.arange(first, min(first + TARGET_GROUP, len(targets)))
        rows = np.nonzero(np.isin(ti, group))[0]
        used, s_group = np.unique(si[rows], return_inverse=True)
        heads[rows], edge[rows], shares = _group_loadings(
            sweeper,
            model,
            [sources[k] for k in used],
            [targets[k] for k in group],
            s_group,
            ti[rows] - first,
            on_way[rows],
            positions,
        )
        if pair_abs is not None and shares is not None:
            pair_abs[:, :, : sweeper.n, : sweeper.n] += shares
    out = {
        "heads": heads,
        "bypass": (edge[:, None] - heads.sum(axis=2)) * on_way,
        "on_way": on_way,
        "edge": edge,
        "graph_edge": np.zeros(B, dtype=np.float32),
    }
    if pair_abs is not None:
        out["pair_abs"] = pair_abs
    for t in target_ids.tolist():
        cols, vals = graph.row(int(t))
        stored = dict(zip(cols.tolist(), vals.tolist()))
        for row in np.nonzero(edges[:, 1] == t)[0].tolist():
            out["graph_edge"][row] = stored.get(int(edges[row, 0]), 0.0)
    return out


#: targets whose gradients ``d target / d z`` one sweep keeps at once (at most TARGET_GROUP x
#: n_layers x n_pos x d_model numbers: 75 MB in float32 at the GPT-2-small shape and 32 tokens);
#: a chunk with more distinct targets sweeps its sources once per group of them
TARGET_GROUP = 64


def _group_loadings(
    sweeper: EdgeSweeper,
    model: ReplacementModel,
    sources: list[SourceVector],
    targets: list[TargetVector],
    si: np.ndarray,
    ti: np.ndarray,
    on_way: np.ndarray,
    positions: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The loadings of E edges, edge e from ``sources[si[e]]`` into ``targets[ti[e]]``: one
    target side and one pass over the sources' blocks. on_way: (E, n_layers).

    returns heads (E, n_layers, n_heads) (zero off the way), edge (E,) float64 and, with
    ``positions``, the sum over the edges of |their (query, key) shares|: (n_layers, n_heads, n, n)
    """
    n_layers = model.n_layers
    side = sweeper.target_side(targets, sources)
    E, n, n_heads = len(si), sweeper.n, int(side.grads[0].shape[2])
    heads = np.zeros((E, n_layers, n_heads))
    pair_abs = np.zeros((n_layers, n_heads, n, n)) if positions else None
    grads = [g.permute(2, 0, 1, 3).flatten(2) for g in side.grads]  # per layer (n_heads, T_L, n * d_head)
    slots = [side.slots(layer).numpy() for layer in range(n_layers)]  # target -> row of grads[layer], or -1
    local = np.full(len(sources), -1)
    for blk in sweeper.source_blocks(sources):
        local[blk.index.numpy()] = np.arange(len(blk.index))
        rows = np.nonzero(np.isin(si, blk.index.numpy()))[0]  # this block's edges
        for layer, block_dz in enumerate(blk.dz):
            way = rows[on_way[rows, layer]]  # this block's edges through this layer (their targets read at or above it)
            if block_dz is None or not len(way):
                continue
            s_local, t_slot = torch.as_tensor(local[si[way]]), torch.as_tensor(slots[layer][ti[way]])
            # every (source, target) pair of the block at once, head by head: (n_heads, k, T_L)
            dz = block_dz.permute(2, 0, 1, 3).flatten(2)
            pairs = torch.bmm(dz, grads[layer].to(dz.dtype).transpose(1, 2))
            heads[way, layer] = pairs[:, s_local, t_slot].T.double().cpu().numpy()
        if pair_abs is None:
            continue
        step = max(1, 2**20 // (n_heads * n * n))  # edges per einsum: about 1M shares at a time
        for layer, block_dv in enumerate(blk.dv):
            way = rows[on_way[rows, layer]]
            if block_dv is None or not len(way):
                continue
            for start in range(0, len(way), step):
                e = way[start : start + step]
                g = side.grads[layer][torch.as_tensor(slots[layer][ti[e]])]
                shares = position_shares(sweeper.patterns[layer], g, block_dv[torch.as_tensor(local[si[e]])])
                share = shares.double().cpu().numpy()
                _check_pair_sums(share, heads[e, layer], model)
                pair_abs[layer] += np.abs(share).sum(axis=0)
    edge = side.edges[torch.as_tensor(si), torch.as_tensor(ti)].double().cpu().numpy()
    return heads, edge, pair_abs


def _check_pair_sums(share: np.ndarray, heads: np.ndarray, model: ReplacementModel) -> None:
    """The exactness anchor of the position shares: each head's (query, key) shares add up to
    its loading, which came from ``dz`` rather than ``dv`` (a RuntimeError otherwise: an
    attention this module does not describe). share: (E, n_heads, n, n); heads: (E, n_heads)."""
    rtol = 1e-6 if model.dtype == torch.float64 else 1e-3
    # rounding scales with everything the edge's layer moved, not with one head's (maybe tiny) part
    scale = (np.abs(share).sum(axis=(1, 2, 3)) + np.abs(heads).sum(axis=1))[:, None] + 1e-30
    gap = np.abs(share.sum(axis=(2, 3)) - heads)
    if (gap > rtol * scale).any():
        raise RuntimeError(
            f"a head's (query, key) position shares do not add up to its loading (gap {gap.max():.3g}): this "
            "model's attention is not z = pattern @ v with a frozen pattern; compute loadings without positions"
        )


def _write_group_dir(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A zarr group of one-chunk checksummed arrays at ``path``, complete or absent: written
    into a temporary directory beside it and renamed into place."""
    _io.remove_stale_temps(path)
    with _io.atomic_directory(path) as tmp:
        store = LocalStore(tmp)
        zarr.create_group(store)
        for name, array in arrays.items():
            _create_array(store, name, array)  # the graph store's codecs: Blosc-zstd, then CRC32C


def write_head_loadings(
    graph: Graph,
    edges,
    *,
    model: ReplacementModel,
    chunk_size: int = 512,
    capture: Capture | None = None,
    out: str | Path | None = None,
    positions: bool = False,
) -> Path:
    """Head loadings of every [source, target] row of ``edges`` ((k, 2) graph-order ids, e.g.
    :func:`top_edges`), streamed into ``<store>/head_loadings/`` one chunk of ``chunk_size``
    edges at a time; read them back with :func:`read_head_loadings`. Returns the group's path.

    out: write the group as a Zarr store of its own at this path instead (the graph's store is
    then only read: it may be another process's output). positions: also store, per chunk,
    ``pair_abs`` (n_layers, n_heads, n_pos, n_pos): the sum over its edges of |each head's
    loading split by query and key position| (:func:`pair_shares`).

    Resumable: each chunk appears complete (renamed into place) or not at all, so a rerun with
    the same request skips the chunks already written. A group left by another request (other
    edges, chunk size, weights or dtype) is refused, naming the fix. Holds the store's writer
    lock while it runs. Every edge is checked (:func:`check_edge`) before anything is computed.
    """
    edges = np.asarray(edges, dtype=np.int64)
    if edges.ndim != 2 or edges.shape[1] != 2 or not len(edges):
        raise HeadLoadingsError(f"edges must be a non-empty (k, 2) array of [source, target] rows, got {edges.shape}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise HeadLoadingsError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    for i, (s, t) in enumerate(edges.tolist()):
        try:
            check_edge(graph, s, t)
        except HeadLoadingsError as exc:
            raise HeadLoadingsError(f"edges[{i}]: {exc}") from None
    check_same_weights(graph, model)
    group = graph.path / GROUP if out is None else Path(out)
    request = {
        "graph": graph.fingerprint,
        "model": model.digest(),
        "transcoders": model.transcoders.digest(),
        "dtype": str(model.dtype),
        "edges": hashlib.sha256(edges.tobytes()).hexdigest(),
        "chunk_size": chunk_size,
    }
    if positions:  # only then: the fingerprints of requests without it stay as they were
        request["positions"] = True
    meta = {
        "format": GROUP_FORMAT,
        "version": GROUP_VERSION,
        "fingerprint": _io.digest_json(request),
        "n_edges": len(edges),
        "chunk_size": chunk_size,
        "n_layers": model.n_layers,
        "n_heads": int(model.bridge.cfg.n_heads),
        "dtype": str(model.dtype),
    }
    if positions:
        meta["positions"] = True
    n_chunks = -(-len(edges) // chunk_size)
    sweeper: EdgeSweeper | None = None
    with StoreLock(graph.path if out is None else group):
        found = _group_meta(group)
        if found is None:
            if group.exists():  # a crash before its metadata: nothing in it is recorded
                shutil.rmtree(group)
            group.mkdir(parents=True)
            _write_group_dir(group / "edges", {"edges": edges})
            # the metadata last: its presence says the edges beside it are the request's
            _io.atomic_write_bytes(
                group / "zarr.json",
                _io.json_bytes({"zarr_format": 3, "node_type": "group", "attributes": {GROUP: meta}}),
            )
        elif found.get("fingerprint") != meta["fingerprint"]:
            raise HeadLoadingsError(
                f"{group} holds the head loadings of another request (other edges, chunk size, weights or "
                f"dtype): delete it (rm -r '{group}') to compute these, or pass the same edges and chunk_size"
            )
        for k in range(n_chunks):
            path = group / _chunk_name(k)
            if (path / "zarr.json").is_file():
                continue  # written by an earlier run: a chunk is renamed into place complete
            if capture is None:
                capture = graph_capture(graph, model)
            if sweeper is None:  # one frozen forward for every chunk of this run
                n = max(_location(graph, int(t))[1] for t in edges[:, 1]) + 1
                sweeper = EdgeSweeper(model, capture, n, values=positions)
            chunk = edges[k * chunk_size : (k + 1) * chunk_size]
            _write_group_dir(path, _compute_chunk(graph, model, capture, chunk, positions, sweeper))
    return group


def _group_meta(group: Path) -> dict | None:
    """The head-loadings group's metadata, or None when it has none (absent, or cut short)."""
    try:
        meta = _io.read_json(group / "zarr.json")["attributes"][GROUP]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == GROUP_FORMAT else None


@dataclass(frozen=True)
class HeadLoadingsTable:
    """The head loadings of many edges, as :func:`write_head_loadings` stored them.

    edges: (E, 2) [source, target]; on_way: (E, n_layers) the layers on each edge's way
    heads: (E, n_layers, n_heads) and bypass: (E, n_layers), zero off the way
    edge: (E,) recomputed in the model's dtype; graph_edge: (E,) as the graph stores it
    pair_abs: (n_layers, n_heads, n_pos, n_pos) the sum over the edges of |pair_shares| when
    written with ``positions=True``, else None
    """

    edges: np.ndarray
    on_way: np.ndarray
    heads: np.ndarray
    bypass: np.ndarray
    edge: np.ndarray
    graph_edge: np.ndarray
    pair_abs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.edges)

    def __getitem__(self, i: int) -> HeadLoadings:
        """Edge ``i`` as :func:`head_loadings` returns it."""
        layers = np.nonzero(self.on_way[i])[0]
        return HeadLoadings(
            source=int(self.edges[i, 0]),
            target=int(self.edges[i, 1]),
            layers=layers.astype(np.int64),
            heads=self.heads[i, layers],
            bypass=self.bypass[i, layers],
            edge=float(self.edge[i]),
            graph_edge=float(self.graph_edge[i]),
        )


def read_head_loadings(graph: Graph, out: str | Path | None = None) -> HeadLoadingsTable:
    """The head loadings stored in ``graph``'s store, or in the store ``out`` that
    ``write_head_loadings(..., out=out)`` wrote (every chunk checksummed on read); an error
    naming the fix when there are none or a run has not finished them."""
    group = graph.path / GROUP if out is None else Path(out)
    meta = _group_meta(group)
    if meta is None:
        raise HeadLoadingsError(f"{group} holds no head loadings: compute them with write_head_loadings")
    store = LocalStore(group, read_only=True)
    n_chunks = -(-int(meta["n_edges"]) // int(meta["chunk_size"]))
    missing = [k for k in range(n_chunks) if not (group / _chunk_name(k) / "zarr.json").is_file()]
    if missing:
        raise HeadLoadingsError(
            f"the head loadings in {group} are unfinished ({len(missing)} of {n_chunks} chunks missing): rerun "
            "write_head_loadings with the same edges to resume"
        )
    names = ("heads", "bypass", "on_way", "edge", "graph_edge")
    chunks = [{k: read_array(store, f"{_chunk_name(c)}/{k}") for k in names} for c in range(n_chunks)]
    pair_abs = None
    if meta.get("positions"):
        pair_abs = read_array(store, f"{_chunk_name(0)}/pair_abs")
        for c in range(1, n_chunks):
            pair_abs = pair_abs + read_array(store, f"{_chunk_name(c)}/pair_abs")
    return HeadLoadingsTable(
        edges=read_array(store, "edges/edges"),
        **{k: np.concatenate([c[k] for c in chunks]) for k in names},
        pair_abs=pair_abs,
    )
