"""Influence-based pruning of attribution graphs (circuit-tracer semantics, out of core).

Node order (circuit-tracer's): ``[selected features (n_features), errors layer-major
(n_layers * n_pos), tokens (n_pos), logits (n_logits)]``.  ``A[t, s]`` is the direct effect
of source ``s`` on target ``t`` (rows are targets, columns sources).

The semantics mirror ``circuit_tracer/graph.py`` (decoderesearch/circuit-tracer, functions
``normalize_matrix``, ``compute_influence``, ``compute_node_influence``,
``compute_edge_influence``, ``find_threshold``, ``prune_graph``, ``compute_graph_scores``):

* logit weights: a length-``n_nodes`` vector, zero except the last ``n_logits`` entries, which
  hold the graph's ``logit_probabilities`` as stored (not renormalised).
* ``normalize_matrix``: ``|A|`` divided by its row sums clamped below at ``1e-10``.
* influence: ``w @ (A + A^2 + ...)``, accumulated term by term until the term is exactly zero.
* node pruning: keep nodes whose influence is ``>= find_threshold(influence, node_threshold)``,
  then force every token and logit node on.
* edge scores: the adjacency with pruned nodes' rows *and* columns zeroed is normalised again,
  its influence recomputed, and ``score[t, s] = normalized_pruned[t, s] * (influence_pruned[t]
  + logit_weight[t])``; keep edges with ``score >= find_threshold(all n_nodes**2 scores,
  edge_threshold)``.
* dangling nodes: a feature or error node with no kept outgoing edge (column) is dropped, a
  feature node with no kept incoming edge (row) is dropped, the dropped nodes' edges removed,
  repeated until the node mask is stable (tokens and logits are never dropped).
* ``cumulative_scores``: nodes sorted by influence (descending) get the running fraction of the
  total influence.
* ``compute_graph_scores``: replacement = token influence / (token + error influence);
  completeness = sum_t (1 - sum_{s in errors} normalized[t, s]) * (influence[t] + w[t]) /
  sum_t (influence[t] + w[t]), on the *unpruned* graph.

Deliberate, documented differences:

* Arithmetic is float64 (circuit-tracer uses the adjacency dtype, usually float32).
* Only stored non-zero entries of ``A`` can be edges.  circuit-tracer's dense boolean edge mask
  also turns on zero entries when the edge score threshold itself is 0 (possible only for
  ``edge_threshold`` so close to 1 that the cumulative mass never reaches it in floating point);
  a zero-weight entry is not an edge here.  For every threshold value > 0 (all ordinary
  settings) the masks are identical.
* The series is cut at ``max_iter = n_nodes`` terms (circuit-tracer: 1000).  The graph is a DAG
  (edges go from earlier layers / positions to later ones), so the normalised adjacency is
  nilpotent and the term becomes exactly zero after at most ``depth + 1`` products, ``depth``
  being the longest path (``<= n_layers + 1``: logit -> features of layers L-1 ... 0 -> token).
  Reaching ``max_iter`` means the adjacency has a cycle: ``RuntimeError``.
* ``find_threshold`` with a fraction of exactly 1.0 returns the smallest positive score (keep
  everything that carries mass).  circuit-tracer's answer there depends on rounding: the
  float32 cumulative sum may or may not reach the separately computed total, giving either the
  smallest positive score or 0 (which turns on every entry of its dense mask).
* Ties: ``find_threshold`` returns a score *value* and masks keep every score ``>=`` it, so
  ties never depend on the sort order (tied values contribute identical cumulative sums).
  ``cumulative_scores`` do depend on the order among tied nodes: we use a stable sort by
  descending influence, ties in ascending node index (``np.argsort(-x, kind="stable")``).
  If the total influence is 0 the cumulative scores are 0 (circuit-tracer: NaN).

Out of core: :func:`prune_graph` reads the graph one stored row block at a time with the
primitives of :mod:`pipeline.graph.streaming` (O(n_nodes) vectors plus one block, an optional
block cache bounded by ``cache_bytes``, one pass per power-series term, an exact streaming
selection of the edge-score threshold).  The results equal :func:`prune_graph_dense` up to
floating-point summation order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from pipeline.graph.streaming import (
    RowBlocks,
    influence_series,
    normalized_data,
    row_ids,
    row_stats,
    row_sums,
    streaming_threshold,
)

__all__ = [
    "NORMALIZE_EPS",
    "PruneResult",
    "compute_edge_influence",
    "compute_graph_scores",
    "compute_influence",
    "compute_node_influence",
    "cumulative_influence_scores",
    "edge_matrices",
    "find_threshold",
    "logit_weights_for",
    "normalize_matrix",
    "prune_graph",
    "prune_graph_dense",
]

NORMALIZE_EPS = 1e-10  # circuit-tracer clamps row sums below at this value


# --------------------------------------------------------------------------------------------
# Pure (in-memory) functions
# --------------------------------------------------------------------------------------------


def normalize_matrix(matrix):
    """``|A|`` with each row divided by its sum (sums clamped below at 1e-10), in float64.

    Accepts a dense array or a scipy sparse matrix (returns CSR for sparse input).
    """
    if sp.issparse(matrix):
        m = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
        m.data = np.abs(m.data)
        sums = np.asarray(m.sum(axis=1)).ravel()
        denom = np.maximum(sums, NORMALIZE_EPS)
        m.data = m.data / np.repeat(denom, np.diff(m.indptr))
        return m
    a = np.abs(np.asarray(matrix, dtype=np.float64))
    return a / np.maximum(a.sum(axis=1, keepdims=True), NORMALIZE_EPS)


def compute_influence(A, logit_weights, max_iter: int | None = None, *, return_depth=False):
    """``w @ (A + A^2 + ...)`` accumulated term by term until a term is exactly zero.

    ``max_iter`` (default ``n_nodes``) bounds the number of non-zero terms; a nilpotent ``A``
    (a DAG) never needs more than ``n_nodes - 1``.  ``RuntimeError`` if it is exceeded.
    With ``return_depth`` also returns the number of non-zero terms.
    """
    w = np.asarray(logit_weights, dtype=np.float64)
    if max_iter is None:
        max_iter = max(int(w.shape[0]), 1)
    current = np.asarray(w @ A, dtype=np.float64).ravel()
    influence = np.zeros_like(current)
    depth = 0
    while current.any():
        depth += 1
        if depth > max_iter:
            raise RuntimeError(
                f"influence series did not terminate after {max_iter} terms: "
                "the adjacency is not nilpotent (does the graph have a cycle?)"
            )
        influence += current
        current = np.asarray(current @ A, dtype=np.float64).ravel()
    return (influence, depth) if return_depth else influence


def compute_node_influence(adjacency, logit_weights):
    """Influence of every node on the logits: ``compute_influence(normalize_matrix(A), w)``."""
    return compute_influence(normalize_matrix(adjacency), logit_weights)


def compute_edge_influence(pruned_matrix, logit_weights):
    """Edge scores ``normalize(P)[t, s] * (influence_P[t] + w[t])`` of an (already node-pruned)
    adjacency ``P``.  Dense in, dense out; sparse in, CSR out."""
    normalized = normalize_matrix(pruned_matrix)
    target_weight = compute_influence(normalized, logit_weights) + np.asarray(logit_weights, dtype=np.float64)
    if sp.issparse(normalized):
        return sp.csr_matrix(sp.diags(target_weight) @ normalized)
    return normalized * target_weight[:, None]


def find_threshold(scores, threshold: float, n_implicit_zeros: int = 0) -> float:
    """The score value that keeps ``threshold`` of the total score mass (circuit-tracer).

    Scores sorted descending; ``cum = cumsum(sorted) / sum(sorted)``; the value at the first
    index with ``cum >= threshold`` (clamped to the last element).  ``n_implicit_zeros`` counts
    zero scores that are not in ``scores`` (a sparse matrix's structural zeros): they sit at the
    end of the sorted order, so landing among them gives 0.0.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        return 0.0
    if threshold >= 1.0:  # keep every positive score (see module docstring)
        positive = s[s > 0]
        return float(positive.min()) if positive.size else 0.0
    sorted_scores = np.sort(s)[::-1]
    total = np.sum(sorted_scores)
    if not total > 0:  # all zero: every index holds 0
        return 0.0
    cumulative = np.cumsum(sorted_scores) / total
    idx = int(np.searchsorted(cumulative, threshold, side="left"))
    if idx >= sorted_scores.size:
        return 0.0 if n_implicit_zeros > 0 else float(sorted_scores[-1])
    return float(sorted_scores[idx])


def cumulative_influence_scores(node_influence) -> np.ndarray:
    """Running fraction of total influence, nodes in descending influence (ties: lower index
    first, stable sort), scattered back to node order."""
    x = np.asarray(node_influence, dtype=np.float64)
    order = np.argsort(-x, kind="stable")
    sorted_x = x[order]
    total = np.sum(sorted_x)
    out = np.zeros_like(x)
    if total > 0:
        out[order] = np.cumsum(sorted_x) / total
    return out


def logit_weights_for(graph) -> np.ndarray:
    """Length-``n_nodes`` vector, the logit probabilities on the logit nodes, 0 elsewhere."""
    n_nodes = int(graph.n_nodes)
    n_logits = int(graph.n_logits)
    w = np.zeros(n_nodes, dtype=np.float64)
    if n_logits:
        w[n_nodes - n_logits :] = np.asarray(graph.logit_probabilities, dtype=np.float64)
    return w


# --------------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PruneResult:
    """Pruning result.  Unpacks like circuit-tracer's ``PruneResult``:
    ``node_mask, edge_mask, cumulative_scores = result``.

    ``edge_mask`` is a boolean CSR ``(n_nodes, n_nodes)`` (rows = targets, columns = sources,
    canonical: sorted indices, no duplicates); ``edge_weights`` / ``edge_scores`` are CSR
    matrices with exactly the same structure holding ``A[t, s]`` (the adjacency's dtype) and the
    edge score (float64).
    """

    node_mask: np.ndarray
    edge_mask: sp.csr_matrix
    cumulative_scores: np.ndarray
    node_influence: np.ndarray
    edge_weights: sp.csr_matrix
    edge_scores: sp.csr_matrix
    node_threshold: float
    edge_threshold: float
    node_score_threshold: float
    edge_score_threshold: float
    replacement_score: float
    completeness_score: float
    n_features: int
    n_errors: int
    n_tokens: int
    n_logits: int
    depth: int  # number of non-zero terms of the node-influence series
    extra: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.node_mask, self.edge_mask, self.cumulative_scores))

    @property
    def n_nodes(self) -> int:
        return int(self.node_mask.shape[0])

    def kept_edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(targets, sources, weights)`` of the kept edges, row-major order."""
        coo = self.edge_weights.tocoo()
        return coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data


def _validate_thresholds(node_threshold: float, edge_threshold: float) -> None:
    if not 0.0 <= node_threshold <= 1.0:
        raise ValueError("node_threshold must be between 0.0 and 1.0")
    if not 0.0 <= edge_threshold <= 1.0:
        raise ValueError("edge_threshold must be between 0.0 and 1.0")


def _prune_dangling(node_mask, rows, cols, n_features, fe_end):
    """circuit-tracer's iterative removal on an explicit edge list (modifies ``node_mask``).

    Returns the boolean selector of surviving edges."""
    n = node_mask.shape[0]
    alive = np.ones(rows.shape[0], dtype=bool)

    def step():
        has_out = np.bincount(cols[alive], minlength=n) > 0
        has_in = np.bincount(rows[alive], minlength=n) > 0
        node_mask[:fe_end] &= has_out[:fe_end]
        node_mask[:n_features] &= has_in[:n_features]

    old = node_mask.copy()
    step()
    while not np.array_equal(node_mask, old):
        old[:] = node_mask
        alive &= node_mask[rows] & node_mask[cols]
        step()
    return alive


def edge_matrices(n, rows, cols, weights, scores) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
    """``(edge_mask, edge_weights, edge_scores)`` of an edge list (rows = targets): canonical
    (n, n) CSR matrices with one structure, bool, the weights' float dtype, float64."""
    weights = np.asarray(weights)
    wdtype = weights.dtype if weights.dtype.kind == "f" else np.float64
    edge_weights = _edge_csr(n, rows, cols, weights, wdtype)
    edge_scores = _edge_csr(n, rows, cols, scores, np.float64)
    edge_mask = sp.csr_matrix(
        (np.ones(edge_weights.nnz, dtype=bool), edge_weights.indices, edge_weights.indptr),
        shape=(n, n),
    )
    return edge_mask, edge_weights, edge_scores


def _edge_csr(n, rows, cols, values, dtype) -> sp.csr_matrix:
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    values = np.asarray(values)[order]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return sp.csr_matrix((values.astype(dtype, copy=False), cols.astype(np.int64), indptr), shape=(n, n))


@dataclass(frozen=True)
class _NodeStage:
    """What both paths compute before the edges: the layout (n, n_features, n_errors, n_tokens,
    n_logits), the node influence on the full graph and its series depth, both graph scores,
    and the node threshold, score threshold and mask."""

    layout: tuple[int, int, int, int, int]
    influence: np.ndarray
    depth: int
    replacement: float
    completeness: float
    threshold: float
    score_threshold: float
    mask: np.ndarray


def _prune_nodes(layout, influence, depth, logit_weights, non_error_fraction, node_threshold) -> _NodeStage:
    """Graph scores and the node mask (error, token and logit nodes always kept)."""
    _, n_features, n_errors, n_tokens, _ = layout
    replacement, completeness = _scores_from(
        influence, logit_weights, non_error_fraction, n_features, n_errors, n_tokens
    )
    node_thr = find_threshold(influence, node_threshold)
    mask = influence >= node_thr
    mask[n_features + n_errors :] = True
    return _NodeStage(layout, influence, depth, replacement, completeness, node_threshold, node_thr, mask)


def _finish(nodes: _NodeStage, edge_threshold, edge_thr, rows, cols, weights, scores, extra=None) -> PruneResult:
    """The tail both paths share: drop dangling nodes and their edges, build the result."""
    n, n_features, n_errors, n_tokens, n_logits = nodes.layout
    alive = _prune_dangling(nodes.mask, rows, cols, n_features, n_features + n_errors)
    rows, cols, weights, scores = rows[alive], cols[alive], weights[alive], scores[alive]
    edge_mask, edge_weights, edge_scores = edge_matrices(n, rows, cols, weights, scores)
    return PruneResult(
        node_mask=nodes.mask,
        edge_mask=edge_mask,
        cumulative_scores=cumulative_influence_scores(nodes.influence),
        node_influence=nodes.influence,
        edge_weights=edge_weights,
        edge_scores=edge_scores,
        node_threshold=float(nodes.threshold),
        edge_threshold=float(edge_threshold),
        node_score_threshold=float(nodes.score_threshold),
        edge_score_threshold=float(edge_thr),
        replacement_score=float(nodes.replacement),
        completeness_score=float(nodes.completeness),
        n_features=int(n_features),
        n_errors=int(n_errors),
        n_tokens=int(n_tokens),
        n_logits=int(n_logits),
        depth=int(nodes.depth),
        extra=dict(extra or {}),
    )


def _scores_from(node_influence, logit_weights, non_error_fraction, n_features, n_errors, n_tokens):
    """(replacement, completeness) from the node influence and each row's normalised mass
    outside the error columns (circuit-tracer's ``compute_graph_scores``)."""
    error_end = n_features + n_errors
    token_end = error_end + n_tokens
    token_influence = node_influence[error_end:token_end].sum()
    error_influence = node_influence[n_features:error_end].sum()
    denom = token_influence + error_influence
    replacement = token_influence / denom if denom != 0 else float("nan")
    output_influence = node_influence + logit_weights
    total = output_influence.sum()
    completeness = (non_error_fraction * output_influence).sum() / total if total != 0 else float("nan")
    return float(replacement), float(completeness)


# --------------------------------------------------------------------------------------------
# Dense path (small graphs; the reference the out-of-core path must equal)
# --------------------------------------------------------------------------------------------


def prune_graph_dense(
    adjacency,
    n_logits: int,
    n_tokens: int,
    n_errors: int,
    n_features: int,
    logit_weights,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> PruneResult:
    """circuit-tracer's ``prune_graph`` on a dense ``(n_nodes, n_nodes)`` adjacency, float64.

    ``logit_weights`` is the full length-``n_nodes`` vector (see :func:`logit_weights_for`).
    """
    _validate_thresholds(node_threshold, edge_threshold)
    A = np.asarray(adjacency)
    n = A.shape[0]
    if A.shape != (n, n):
        raise ValueError(f"adjacency must be square, got {A.shape}")
    if n != n_features + n_errors + n_tokens + n_logits:
        raise ValueError("n_features + n_errors + n_tokens + n_logits != n_nodes")
    w = np.asarray(logit_weights, dtype=np.float64)
    fe_end = n_features + n_errors

    normalized = normalize_matrix(A)
    node_influence, depth = compute_influence(normalized, w, return_depth=True)
    nef = 1.0 - normalized[:, n_features:fe_end].sum(axis=-1)
    nodes = _prune_nodes((n, n_features, n_errors, n_tokens, n_logits), node_influence, depth, w, nef, node_threshold)

    pruned = np.array(A, dtype=np.float64)
    pruned[~nodes.mask] = 0
    pruned[:, ~nodes.mask] = 0
    edge_scores = compute_edge_influence(pruned, w)
    edge_thr = find_threshold(edge_scores.ravel(), edge_threshold)
    # only stored non-zero entries of A can be edges (see module docstring)
    rows, cols = np.nonzero((edge_scores >= edge_thr) & (A != 0))
    weights, scores = A[rows, cols], edge_scores[rows, cols]
    return _finish(nodes, edge_threshold, edge_thr, rows.astype(np.int64), cols.astype(np.int64), weights, scores)


# --------------------------------------------------------------------------------------------
# Out-of-core path (any size; reads the graph's row blocks, see pipeline.graph.streaming)
# --------------------------------------------------------------------------------------------


def _graph_layout(graph):
    n_layers, n_pos = int(graph.n_layers), int(graph.n_pos)
    n_features, n_logits = int(graph.n_selected), int(graph.n_logits)
    n_errors, n_tokens = n_layers * n_pos, n_pos
    n = int(graph.n_nodes)
    if n != n_features + n_errors + n_tokens + n_logits:
        raise ValueError("graph.n_nodes != n_selected + n_layers*n_pos + n_pos + n_logits")
    return n, n_features, n_errors, n_tokens, n_logits


def compute_graph_scores(graph, *, cache_bytes: int = 512 << 20) -> tuple[float, float]:
    """(replacement_score, completeness_score) of the unpruned graph, out of core."""
    n, n_features, n_errors, n_tokens, _ = _graph_layout(graph)
    blocks = RowBlocks(graph, cache_bytes)
    sums, err, _ = row_stats(blocks, n_features, n_features + n_errors, NORMALIZE_EPS)
    w = logit_weights_for(graph)
    influence, _ = influence_series(blocks, np.maximum(sums, NORMALIZE_EPS), w)
    return _scores_from(influence, w, 1.0 - err, n_features, n_errors, n_tokens)


def prune_graph(
    graph,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    *,
    method: str = "auto",
    cache_bytes: int = 512 << 20,
    max_candidates: int = 1 << 22,
    dense_max_nodes: int = 2048,
) -> PruneResult:
    """Prune a graph (circuit-tracer semantics; see the module docstring).

    ``method``: ``"dense"`` (``graph.adjacency_dense()`` + :func:`prune_graph_dense`),
    ``"blocks"`` (out of core, reading ``graph.iter_row_blocks()``), or ``"auto"`` (dense when
    ``n_nodes <= dense_max_nodes``).  The blocks path caches blocks in memory up to
    ``cache_bytes`` (0 = never: O(n_nodes) vectors plus one block) and sorts at most
    ``max_candidates`` edge scores at once.
    """
    _validate_thresholds(node_threshold, edge_threshold)
    n, n_features, n_errors, n_tokens, n_logits = _graph_layout(graph)
    w = logit_weights_for(graph)
    if method == "auto":
        method = "dense" if n <= dense_max_nodes else "blocks"
    if method == "dense":
        return prune_graph_dense(
            graph.adjacency_dense(),
            n_logits,
            n_tokens,
            n_errors,
            n_features,
            w,
            node_threshold,
            edge_threshold,
        )
    if method != "blocks":
        raise ValueError(f"unknown method {method!r}")
    return _prune_blocks(graph, w, node_threshold, edge_threshold, cache_bytes, max_candidates)


def _prune_blocks(graph, w, node_threshold, edge_threshold, cache_bytes, max_candidates) -> PruneResult:
    """:func:`prune_graph`'s out-of-core path, in passes over the graph's row blocks."""
    layout = _graph_layout(graph)
    n, n_features, n_errors, _, _ = layout
    blocks = RowBlocks(graph, cache_bytes)

    # 1. node influence on the full graph (+ both graph scores, which share it)
    sums, err, nnz = row_stats(blocks, n_features, n_features + n_errors, NORMALIZE_EPS)
    node_influence, depth = influence_series(blocks, np.maximum(sums, NORMALIZE_EPS), w)
    nodes = _prune_nodes(layout, node_influence, depth, w, 1.0 - err, node_threshold)

    # 2. influence on the node-pruned graph, edge scores, threshold
    keep = nodes.mask.copy()
    denom_p = np.maximum(row_sums(blocks, keep), NORMALIZE_EPS)
    infl_p, _ = influence_series(blocks, denom_p, w, keep)
    target_weight = infl_p + w

    def block_scores():
        for rows, m in blocks:
            data = normalized_data(rows, m, denom_p, keep)
            yield rows, m, data * np.repeat(target_weight[rows], np.diff(m.indptr))

    def score_chunks():
        for _, _, s in block_scores():
            yield s

    n_implicit_zeros = n * n - nnz
    if blocks.cache is not None or nnz <= max_candidates:
        chunks = list(score_chunks())
        edge_thr = find_threshold(np.concatenate(chunks) if chunks else np.zeros(0), edge_threshold, n_implicit_zeros)
    else:
        edge_thr = streaming_threshold(score_chunks, edge_threshold, n_implicit_zeros, max_candidates)

    # 3. collect the kept edges (output-sized)
    r_parts, c_parts, w_parts, s_parts = [], [], [], []
    for rows, m, s in block_scores():
        sel = s >= edge_thr
        if sel.any():
            r_parts.append(rows[row_ids(m)[sel]])
            c_parts.append(m.indices[sel].astype(np.int64))
            w_parts.append(m.data[sel])
            s_parts.append(s[sel])

    def cat(parts, dtype):
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return _finish(
        nodes,
        edge_threshold,
        edge_thr,
        cat(r_parts, np.int64),
        cat(c_parts, np.int64),
        cat(w_parts, np.float32),
        cat(s_parts, np.float64),
        extra={"passes": blocks.passes, "cached": blocks.cache is not None},
    )
