"""Pruning: brute-force dense reference (written here from the definitions), the dense path,
the out-of-core block path, the real graph store, and the saved artifact."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.graph import pruning
from pipeline.graph.pruned import load_pruned_graph, save_pruned_graph
from pipeline.graph.pruning import (
    PruneResult,
    compute_graph_scores,
    compute_influence,
    find_threshold,
    logit_weights_for,
    normalize_matrix,
    prune_graph,
    prune_graph_dense,
)
from pipeline.graph.streaming import streaming_threshold
from tests.graph_fixtures import hand_graph, layout_of, make_graph, write_store

# ----------------------------------------------------------------------------------------------
# Brute-force reference, straight from the definitions (no code shared with pipeline.graph.pruning)
# ----------------------------------------------------------------------------------------------


def ref_normalize(A):
    A = np.abs(np.asarray(A, dtype=np.float64))
    out = np.zeros_like(A)
    for t in range(A.shape[0]):
        s = max(math.fsum(A[t]), 1e-10)
        out[t] = A[t] / s
    return out


def ref_total_influence(N, w):
    """w @ (N + N^2 + ... ) via explicit matrix powers (N is nilpotent)."""
    n = N.shape[0]
    B = np.zeros_like(N)
    P = N.copy()
    for _ in range(n + 1):
        if not P.any():
            break
        B += P
        P = P @ N
    assert not P.any(), "reference series did not vanish: not nilpotent"
    return w @ B


def ref_threshold(scores, frac):
    vals = sorted((float(x) for x in np.ravel(scores)), reverse=True)
    total = math.fsum(vals)
    if total <= 0:
        return 0.0
    running = 0.0
    for v in vals:
        running += v
        if running / total >= frac:
            return v
    return vals[-1]


def ref_prune(A, n_features, n_errors, n_tokens, n_logits, w, node_frac, edge_frac):
    A = np.asarray(A, dtype=np.float64)
    n = A.shape[0]
    fe_end = n_features + n_errors
    infl = ref_total_influence(ref_normalize(A), w)
    node_mask = infl >= ref_threshold(infl, node_frac)
    node_mask[fe_end:] = True
    P = A.copy()
    P[~node_mask, :] = 0
    P[:, ~node_mask] = 0
    NP = ref_normalize(P)
    infl_p = ref_total_influence(NP, w)
    scores = NP * (infl_p + w)[:, None]
    edge_mask = (scores >= ref_threshold(scores, edge_frac)) & (A != 0)
    while True:
        old = node_mask.copy()
        edge_mask[~node_mask, :] = False
        edge_mask[:, ~node_mask] = False
        for s in range(fe_end):  # features and errors need an outgoing edge
            if not edge_mask[:, s].any():
                node_mask[s] = False
        for t in range(n_features):  # features need an incoming edge
            if not edge_mask[t, :].any():
                node_mask[t] = False
        if (node_mask == old).all():
            break
    edge_mask[~node_mask, :] = False
    edge_mask[:, ~node_mask] = False
    order = sorted(range(n), key=lambda i: (-infl[i], i))
    cum = np.zeros(n)
    running, total = 0.0, math.fsum(infl)
    for i in order:
        running += infl[i]
        cum[i] = running / total
    return node_mask, edge_mask, cum, infl


def ref_scores(A, n_features, n_errors, n_tokens, w):
    N = ref_normalize(A)
    infl = ref_total_influence(N, w)
    err = slice(n_features, n_features + n_errors)
    tok = slice(n_features + n_errors, n_features + n_errors + n_tokens)
    replacement = infl[tok].sum() / (infl[tok].sum() + infl[err].sum())
    out = infl + w
    completeness = ((1 - N[:, err].sum(1)) * out).sum() / out.sum()
    return replacement, completeness


def assert_same_result(a: PruneResult, b: PruneResult, *, exact_floats=False):
    np.testing.assert_array_equal(a.node_mask, b.node_mask)
    assert (a.edge_mask != b.edge_mask).nnz == 0
    np.testing.assert_array_equal(a.edge_weights.toarray(), b.edge_weights.toarray())
    rtol = 0 if exact_floats else 1e-12
    np.testing.assert_allclose(a.node_influence, b.node_influence, rtol=rtol, atol=0)
    np.testing.assert_allclose(a.cumulative_scores, b.cumulative_scores, rtol=rtol, atol=1e-15)
    np.testing.assert_allclose(a.edge_scores.toarray(), b.edge_scores.toarray(), rtol=rtol, atol=0)
    assert a.replacement_score == pytest.approx(b.replacement_score, rel=1e-12)
    assert a.completeness_score == pytest.approx(b.completeness_score, rel=1e-12)
    assert a.node_score_threshold == pytest.approx(b.node_score_threshold, rel=1e-12)
    assert a.edge_score_threshold == pytest.approx(b.edge_score_threshold, rel=1e-12)
    assert a.depth == b.depth


def test_hand_computed_influence_and_scores():
    g = hand_graph()
    w = logit_weights_for(g)
    np.testing.assert_array_equal(w, [0, 0, 0, 0, 0, 0, 1])
    infl, depth = compute_influence(normalize_matrix(g.dense), w, return_depth=True)
    np.testing.assert_allclose(infl, [0.75, 0.25, 0.375, 0, 0.1875, 0.4375, 0], atol=0)
    assert depth == 2
    rep, comp = compute_graph_scores(g)
    assert rep == pytest.approx(0.625) and comp == pytest.approx(0.875)

    r = prune_graph(g, 0.8, 0.98)
    # cum .375 .59375 .78125 .90625 1 -> first >= .8 is f1's .25: every feature kept, e01 dropped
    np.testing.assert_array_equal(r.node_mask, [1, 1, 1, 0, 1, 1, 1])
    np.testing.assert_allclose(r.cumulative_scores, [0.375, 0.90625, 0.78125, 1, 1, 0.59375, 1])

    r = prune_graph(g, 0.7, 0.7)
    # node threshold .375 drops f1; edge scores 1 (logit<-f0), .5 (f0<-e00), .25, .25 (tokens)
    assert r.node_score_threshold == 0.375 and r.edge_score_threshold == 0.5
    np.testing.assert_array_equal(r.node_mask, [1, 0, 1, 0, 1, 1, 1])
    assert sorted(zip(*r.edge_mask.nonzero())) == [(0, 2), (6, 0)]
    assert r.edge_weights[6, 0] == 3 and r.edge_weights[0, 2] == 2

    r = prune_graph(g, 0.7, 0.8)  # threshold lands on the tied .25 scores: both token edges
    assert sorted(zip(*r.edge_mask.nonzero())) == [(0, 2), (0, 4), (0, 5), (6, 0)]

    r = prune_graph(g, 0.7, 0.5)
    # only logit<-f0 survives; f0 has no incoming edge -> dropped; then its edge goes and e00
    # has no outgoing edge -> dropped.  Tokens and logits stay.
    np.testing.assert_array_equal(r.node_mask, [0, 0, 0, 0, 1, 1, 1])
    assert r.edge_mask.nnz == 0
    # circuit-tracer unpacking
    node_mask, edge_mask, cum = r
    assert node_mask is r.node_mask and edge_mask is r.edge_mask and cum is r.cumulative_scores


# ----------------------------------------------------------------------------------------------
# Random graphs vs the brute-force reference
# ----------------------------------------------------------------------------------------------

CASES = [(kind, seed, ties) for kind in ("plt", "clt") for seed in (0, 1, 2) for ties in (False, True)]


@pytest.mark.parametrize("kind,seed,ties", CASES)
@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.6, 0.85)])
def test_matches_bruteforce_reference(kind, seed, ties, thresholds):
    g = make_graph(seed, kind, ties=ties)
    lay = layout_of(g)
    w = logit_weights_for(g)
    nm, em, cum, infl = ref_prune(
        g.dense, lay["n_features"], lay["n_errors"], lay["n_tokens"], lay["n_logits"], w, *thresholds
    )
    for method in ("dense", "blocks"):
        r = prune_graph(g, *thresholds, method=method)
        np.testing.assert_array_equal(r.node_mask, nm)
        np.testing.assert_array_equal(r.edge_mask.toarray(), em)
        np.testing.assert_allclose(r.node_influence, infl, rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(r.cumulative_scores, cum, rtol=1e-12)
        rep, comp = ref_scores(g.dense, lay["n_features"], lay["n_errors"], lay["n_tokens"], w)
        assert r.replacement_score == pytest.approx(rep, rel=1e-12)
        assert r.completeness_score == pytest.approx(comp, rel=1e-12)
        assert r.node_mask[g.token_slice].all() and r.node_mask[g.logit_slice].all()
        # edges only between kept nodes, weights are A[target, source]
        t, s = r.edge_mask.nonzero()
        assert r.node_mask[t].all() and r.node_mask[s].all()
        np.testing.assert_array_equal(np.asarray(r.edge_weights[t, s]).ravel(), g.dense[t, s])
    # something non-trivial was pruned at these thresholds
    assert 0 < nm[: lay["n_features"]].sum() < lay["n_features"] or em.sum() < (g.dense != 0).sum()


def test_graph_scores_match_reference():
    for seed in range(3):
        g = make_graph(seed, "clt")
        lay = layout_of(g)
        rep, comp = ref_scores(g.dense, lay["n_features"], lay["n_errors"], lay["n_tokens"], logit_weights_for(g))
        got = compute_graph_scores(g, cache_bytes=0)
        assert got == pytest.approx((rep, comp), rel=1e-12)
        assert 0 < got[0] < 1 and 0 < got[1] < 1
    # no error contributions at all -> both scores are exactly 1
    g = make_graph(5, "plt")
    g.dense[:, g.error_slice] = 0
    assert compute_graph_scores(g) == (1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Out of core == in memory
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_blocks_path_equals_dense_path(kind):
    for seed in range(4):
        g = make_graph(10 + seed, kind, n_layers=4, n_pos=6, ties=seed % 2 == 1)
        dense = prune_graph_dense(g.adjacency_dense(), logit_weights=logit_weights_for(g), **layout_of(g))
        for batch_size, cache_bytes, max_candidates in [(1, 0, 1 << 22), (7, 1 << 30, 1 << 22), (64, 0, 3), (5, 0, 40)]:
            g.batch_size, g.block_seed = batch_size, seed + batch_size
            g.reads = 0
            r = prune_graph(g, method="blocks", cache_bytes=cache_bytes, max_candidates=max_candidates)
            assert_same_result(r, dense)
            assert r.extra["cached"] == (cache_bytes > 0)
            assert g.reads == (1 if cache_bytes else r.extra["passes"])


def test_streaming_threshold_equals_find_threshold():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 400))
        x = rng.lognormal(0, 3, n)
        if trial % 3 == 0:
            x = rng.choice([0.0, 0.25, 0.5, 1.0, 3.0], n)  # ties and explicit zeros
        if trial % 5 == 0:
            x[rng.random(n) < 0.5] = 0.0
        chunks = np.array_split(x, int(rng.integers(1, 9)))
        for frac in (0.0, 0.3, 0.8, 0.98, 1.0):
            for zeros in (0, 17):
                want = find_threshold(np.concatenate([x, np.zeros(zeros)]), frac)
                assert want == find_threshold(x, frac, n_implicit_zeros=zeros)
                for cap in (1, 4, 1000):
                    got = streaming_threshold(lambda chunks=chunks: iter(chunks), frac, zeros, cap)
                    assert got == want, (trial, frac, zeros, cap)


def test_find_threshold_semantics():
    s = np.array([1.0, 3.0, 2.0, 2.0, 0.0])  # sorted 3 2 2 1 0, cum/8 .375 .625 .875 1 1
    assert find_threshold(s, 0.3) == 3.0
    assert find_threshold(s, 0.5) == 2.0
    assert find_threshold(s, 0.875) == 2.0
    assert find_threshold(s, 0.9) == 1.0
    assert find_threshold(s, 1.0) == 1.0
    assert find_threshold(np.zeros(4), 0.8) == 0.0
    assert find_threshold(np.zeros(0), 0.8) == 0.0
    # a fraction of 1.0 keeps every positive score, whatever the rounding
    assert find_threshold([0.0, 5.0, 1e-300, 2.0], 1.0, n_implicit_zeros=3) == 1e-300
    # rounding keeps the running sum below a fraction just under 1: circuit-tracer then lands on
    # the zeros after the scores (0.0), or clamps to the last score when there are none
    x = np.sort(np.random.default_rng(0).random(170))[::-1]
    frac = np.nextafter(1.0, 0)
    assert (np.cumsum(x) / np.sum(x))[-1] < frac
    assert find_threshold(x, frac, n_implicit_zeros=3) == 0.0
    assert find_threshold(x, frac) == x[-1]
    assert streaming_threshold(lambda: iter(np.array_split(x, 3)), frac, 3, 4) == 0.0
    for frac in np.linspace(0, 1, 21):
        assert find_threshold(s, frac) == ref_threshold(s, frac)


# ----------------------------------------------------------------------------------------------
# Truncation of the series (nilpotency)
# ----------------------------------------------------------------------------------------------


def longest_path_from_logits(A, n_logits):
    """Longest path (in edges) starting at a logit, by memoised DFS over the DAG."""
    n = A.shape[0]
    succ = [np.flatnonzero(A[t]) for t in range(n)]  # t reads from succ[t]
    memo = {}

    def depth(v):
        if v not in memo:
            memo[v] = max((1 + depth(int(u)) for u in succ[v]), default=0)
        return memo[v]

    return max(depth(v) for v in range(n - n_logits, n))


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_series_truncates_exactly(kind):
    for seed in range(3):
        g = make_graph(20 + seed, kind, n_layers=5, n_pos=5, density=0.8, empty_frac=0.0)
        N = normalize_matrix(g.dense)
        w = logit_weights_for(g)
        infl, depth = compute_influence(N, w, return_depth=True)
        # the term after the last is exactly zero: w N^(depth+1) == 0, w N^depth != 0
        v = w.copy()
        for _ in range(depth):
            v = v @ N
        assert v.any() and not (v @ N).any()
        assert depth == longest_path_from_logits(g.dense, g.n_logits)
        assert depth <= g.n_layers + 1  # logit -> layers L-1 .. 0 -> token
        # equals the closed form w ((I - N)^-1 - I)
        closed = w @ (np.linalg.inv(np.eye(len(w)) - N) - np.eye(len(w)))
        np.testing.assert_allclose(infl, closed, rtol=1e-10, atol=1e-13)
        r = prune_graph(g, method="blocks", cache_bytes=0)
        assert r.depth == depth


def test_cycle_is_rejected():
    A = np.zeros((3, 3))
    A[0, 1] = A[1, 0] = 1.0
    A[2, 0] = 1.0
    with pytest.raises(RuntimeError, match="nilpotent"):
        compute_influence(normalize_matrix(A), np.array([0, 0, 1.0]))
    with pytest.raises(RuntimeError, match="nilpotent"):
        compute_influence(normalize_matrix(A), np.array([0, 0, 1.0]), max_iter=10)


# ----------------------------------------------------------------------------------------------
# Always-kept nodes, validation
# ----------------------------------------------------------------------------------------------


def test_tokens_and_logits_always_kept_and_validation():
    g = make_graph(3, "plt")
    for nt, et in [(0.0, 0.0), (0.0, 0.5), (0.5, 0.98), (1.0, 1.0)]:
        for method in ("dense", "blocks"):
            r = prune_graph(g, nt, et, method=method)
            assert r.node_mask[g.token_slice].all() and r.node_mask[g.logit_slice].all()
            t, s = r.edge_mask.nonzero()
            assert r.node_mask[t].all() and r.node_mask[s].all()
            # every kept feature/error has an outgoing edge, every kept feature an incoming one
            fe = np.flatnonzero(r.node_mask[: g.token_slice.start])
            assert np.isin(fe, s).all()
            assert np.isin(np.flatnonzero(r.node_mask[: g.n_selected]), t).all()
    r0 = prune_graph(g, 0.0, 0.98)
    feats_errs = r0.node_mask[: g.token_slice.start]
    assert feats_errs.sum() <= 1  # only the single most influential node can survive
    for bad in [(-0.1, 0.9), (0.8, 1.1)]:
        with pytest.raises(ValueError):
            prune_graph(g, *bad)


# ----------------------------------------------------------------------------------------------
# Saved artifact
# ----------------------------------------------------------------------------------------------


def test_save_load_roundtrip_and_determinism(tmp_path):
    g = make_graph(7, "clt")
    r = prune_graph(g, method="blocks")
    p1 = save_pruned_graph(g, r, tmp_path / "a" / "pruned.npz")
    p2 = save_pruned_graph(g, prune_graph(g, method="blocks"), tmp_path / "b" / "pruned.npz")
    assert p1.read_bytes() == p2.read_bytes()
    save_pruned_graph(g, r, p1)  # overwrite in place, atomically
    assert p1.read_bytes() == p2.read_bytes()
    assert sorted(os.listdir(p1.parent)) == ["pruned.npz"]  # no temp files left
    loaded = load_pruned_graph(p1)
    assert_same_result(loaded.result, r, exact_floats=True)
    assert loaded.result.n_features == r.n_features and loaded.n_layers == g.n_layers
    assert loaded.n_nodes == g.n_nodes and loaded.n_logits == g.n_logits
    np.testing.assert_array_equal(loaded.input_tokens, g.input_tokens)
    np.testing.assert_array_equal(loaded.logit_tokens, g.logit_tokens)
    np.testing.assert_array_equal(loaded.logit_probabilities, g.logit_probabilities)
    np.testing.assert_array_equal(loaded.feature_info, g.active_features[g.selected_features])
    np.testing.assert_array_equal(loaded.feature_activations, g.activation_values[g.selected_features])
    assert loaded.attrs == g.attrs
    assert loaded.result.edge_weights.dtype == np.float32
    # plain numpy can read it
    with np.load(p1) as z:
        assert "edge_targets" in z.files and z["kept_nodes"].tolist() == np.flatnonzero(r.node_mask).tolist()


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_real_graph_store(tmp_path, kind):
    g = make_graph(30, kind, n_layers=3, n_pos=5)
    store = write_store(g, tmp_path / "graph.zarr")
    assert store.n_nodes == g.n_nodes
    np.testing.assert_array_equal(store.adjacency_dense(), g.dense)
    ref = prune_graph(g, method="dense")
    for cache_bytes, max_candidates in [(0, 1 << 22), (1 << 30, 1 << 22), (0, 5)]:
        r = prune_graph(store, method="blocks", cache_bytes=cache_bytes, max_candidates=max_candidates)
        assert_same_result(r, ref)
    assert prune_graph(store).node_mask.tolist() == ref.node_mask.tolist()
    assert compute_graph_scores(store) == pytest.approx((ref.replacement_score, ref.completeness_score), rel=1e-12)
    p = save_pruned_graph(store, ref, tmp_path / "pruned.npz")
    q = save_pruned_graph(g, ref, tmp_path / "pruned2.npz")
    with np.load(p) as from_store, np.load(q) as from_memory:
        # a store adds the first logit's full row over the selected features
        assert set(from_store.files) - set(from_memory.files) <= {"target_feature_edges", "target_vector"}
        assert "target_feature_edges" in from_store.files
        for name in from_memory.files:
            np.testing.assert_array_equal(from_store[name], from_memory[name])
        logit0 = ref.n_nodes - ref.n_logits
        np.testing.assert_array_equal(from_store["target_feature_edges"], g.dense[logit0, : ref.n_features])


def test_module_docstring_states_semantics():
    doc = pruning.__doc__
    for phrase in ("1e-10", "exactly zero", "stable sort", "RuntimeError", "n_layers + 1"):
        assert phrase in doc


def test_streaming_threshold_many_ties():
    x = np.concatenate([np.full(500, 0.5), np.full(300, 2.0), np.full(50, 1e-3), np.zeros(20)])
    chunks = np.array_split(np.random.default_rng(1).permutation(x), 7)
    for frac in (0.1, 0.5, 0.9, 0.99, 0.9999):
        want = find_threshold(x, frac, n_implicit_zeros=5)
        assert streaming_threshold(lambda: iter(chunks), frac, 5, max_candidates=10) == want


def test_pure_functions_dense_and_sparse_agree():
    g = make_graph(8, "clt")
    A = g.dense.astype(np.float64)
    w = logit_weights_for(g)
    np.testing.assert_allclose(pruning.normalize_matrix(sp.csr_matrix(A)).toarray(), normalize_matrix(A), rtol=1e-15)
    dense_scores = pruning.compute_edge_influence(A, w)
    sparse_scores = pruning.compute_edge_influence(sp.csr_matrix(A), w)
    assert sp.issparse(sparse_scores)
    np.testing.assert_allclose(sparse_scores.toarray(), dense_scores, rtol=1e-12)
    np.testing.assert_allclose(pruning.compute_node_influence(A, w), compute_influence(normalize_matrix(A), w), rtol=0)
    # hand graph, node-pruned to {f0, e00, tokens, logit}: scores 1 (logit<-f0), .5, .25, .25
    h = hand_graph().dense.astype(np.float64)
    h[1, :] = 0
    h[:, 1] = 0
    h[:, 3] = 0
    s = pruning.compute_edge_influence(h, logit_weights_for(hand_graph()))
    assert s[6, 0] == 1.0 and s[0, 2] == 0.5 and s[0, 4] == s[0, 5] == 0.25
    assert np.count_nonzero(s) == 4
