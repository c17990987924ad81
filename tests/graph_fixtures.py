"""Small attribution graphs for the graph-format and analysis tests: an in-memory stand-in for
``pipeline.graph.store.Graph`` (random, graph order, dense), a hand-computed example, and a
writer that turns one into a real graph store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from pipeline.graph.writer import write_graph_from_dense


class FakeGraph:
    """In-memory stand-in for ``pipeline.graph.store.Graph`` (graph order, dense)."""

    def __init__(
        self,
        dense,
        *,
        n_layers,
        n_pos,
        n_logits,
        active_features,
        activation_values,
        selected_features,
        input_tokens,
        logit_tokens,
        logit_probabilities,
        attrs=None,
        batch_size=5,
        block_seed=0,
        compute_dense=None,
    ):
        self.dense = np.asarray(dense, dtype=np.float32)
        self.n_layers, self.n_pos, self.n_logits = n_layers, n_pos, n_logits
        self.active_features = np.asarray(active_features, dtype=np.int64)
        self.activation_values = np.asarray(activation_values, dtype=np.float32)
        self.selected_features = np.asarray(selected_features, dtype=np.int64)
        self.n_selected = len(self.selected_features)
        self.n_nodes = self.n_selected + n_layers * n_pos + n_pos + n_logits
        assert self.dense.shape == (self.n_nodes, self.n_nodes)
        self.input_tokens = np.asarray(input_tokens, dtype=np.int64)
        self.logit_tokens = np.asarray(logit_tokens, dtype=np.int64)
        self.logit_probabilities = np.asarray(logit_probabilities, dtype=np.float32)
        self.attrs = dict(attrs or {})
        f, e = self.n_selected, n_layers * n_pos
        self.feature_slice = slice(0, f)
        self.error_slice = slice(f, f + e)
        self.token_slice = slice(f + e, f + e + n_pos)
        self.logit_slice = slice(f + e + n_pos, self.n_nodes)
        self.batch_size, self.block_seed = batch_size, block_seed
        self.compute_dense = compute_dense  # same graph in the store's compute order
        self.reads = 0

    def iter_row_blocks(self):
        """Logit rows first, then feature rows in a shuffled order, ``batch_size`` per block."""
        self.reads += 1
        logits = np.arange(self.logit_slice.start, self.n_nodes)
        feats = np.random.default_rng(self.block_seed).permutation(self.n_selected)
        order = np.concatenate([logits, feats]).astype(np.int64)
        for i in range(0, len(order), self.batch_size):
            rows = order[i : i + self.batch_size]
            yield rows, sp.csr_matrix(self.dense[rows])

    def to_scipy_sparse(self):
        return sp.csr_matrix(self.dense)

    def adjacency_dense(self):
        return self.dense.copy()


def make_graph(
    seed,
    kind="plt",
    *,
    n_layers=3,
    n_pos=4,
    n_logits=3,
    d_transcoder=12,
    per_site=(1, 3),
    select_frac=0.8,
    density=0.6,
    ties=False,
    empty_frac=0.1,
    **kw,
) -> FakeGraph:
    """Random graph with circuit-tracer's structure.

    Feature at (l, p) reads features/errors at layers < l and positions <= p and tokens at
    positions <= p; logits read everything.  ``plt``: mostly the previous layer and the same
    position (sparser); ``clt``: every earlier layer and position (denser, long-range).
    BOS (position 0) has no active features.  ``ties``: weights from {±0.5, ±1, ±2}.
    """
    rng = np.random.default_rng(seed)
    active = []
    for layer in range(n_layers):
        for pos in range(1, n_pos):
            k = rng.integers(per_site[0], per_site[1] + 1)
            for feat in sorted(rng.choice(d_transcoder, size=k, replace=False)):
                active.append((layer, pos, int(feat)))
    active = np.array(sorted(active), dtype=np.int64)
    n_active = len(active)
    n_err = n_layers * n_pos
    n_compute = n_active + n_err + n_pos + n_logits
    selected = np.sort(rng.choice(n_active, size=max(1, int(round(select_frac * n_active))), replace=False))

    # compute-order sources: (kind, layer, pos) per node
    src_layer = np.concatenate(
        [active[:, 0], np.repeat(np.arange(n_layers), n_pos), np.full(n_pos, -1), np.full(n_logits, n_layers + 1)]
    )
    src_pos = np.concatenate(
        [active[:, 1], np.tile(np.arange(n_pos), n_layers), np.arange(n_pos), np.full(n_logits, n_pos - 1)]
    )
    is_logit = np.arange(n_compute) >= n_compute - n_logits

    def weights(size):
        if ties:
            return rng.choice([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], size=size)
        return rng.standard_normal(size) * rng.lognormal(0, 1, size)

    C = np.zeros((n_compute, n_compute))
    targets = list(selected) + list(range(n_compute - n_logits, n_compute))
    for t in targets:
        if not is_logit[t] and rng.random() < empty_frac:
            continue  # a feature row with no inputs
        tl, tp = src_layer[t], src_pos[t]
        allowed = (src_layer < tl) & (src_pos <= tp) & ~is_logit
        if kind == "plt" and not is_logit[t]:
            near = (src_layer >= tl - 1) | (src_layer == -1)
            allowed &= near & ((src_pos == tp) | (rng.random(n_compute) < 0.3))
        allowed[t] = False
        cand = np.flatnonzero(allowed & (rng.random(n_compute) < density))
        C[t, cand] = weights(len(cand))
    C = C.astype(np.float32)

    order = np.concatenate([selected, np.arange(n_active, n_compute)])
    G = C[np.ix_(order, order)]
    probs = np.sort(rng.dirichlet(np.ones(n_logits + 1)))[::-1][:n_logits]
    return FakeGraph(
        G,
        n_layers=n_layers,
        n_pos=n_pos,
        n_logits=n_logits,
        active_features=active,
        activation_values=rng.uniform(0.1, 5, n_active),
        selected_features=selected,
        input_tokens=rng.integers(0, 50, n_pos),
        logit_tokens=rng.choice(50, n_logits, replace=False),
        logit_probabilities=probs,
        attrs={
            "prompt": "the capital of Texas is",
            "scan": f"toy-{kind}",
            "kind": "transcoder_set" if kind == "plt" else "cross_layer_transcoder",
        },
        compute_dense=C,
        **kw,
    )


def layout_of(g):
    return dict(n_logits=g.n_logits, n_tokens=g.n_pos, n_errors=g.n_layers * g.n_pos, n_features=g.n_selected)


def hand_graph():
    """1 layer, 2 positions, 2 features (both at pos 1), 1 logit.

    nodes: f0=0 f1=1 e(0,0)=2 e(0,1)=3 t0=4 t1=5 logit=6
    logit <- f0: 3, f1: -1;  f0 <- t0: 1, t1: 1, e00: 2;  f1 <- t1: 1
    influence: f0 .75, f1 .25, e00 .375, e01 0, t0 .1875, t1 .4375, logit 0
    """
    A = np.zeros((7, 7), dtype=np.float32)
    A[6, 0], A[6, 1] = 3, -1
    A[0, 4], A[0, 5], A[0, 2] = 1, 1, 2
    A[1, 5] = 1
    return FakeGraph(
        A,
        n_layers=1,
        n_pos=2,
        n_logits=1,
        active_features=[[0, 1, 5], [0, 1, 7]],
        activation_values=[1.5, 2.5],
        selected_features=[0, 1],
        input_tokens=[2, 9],
        logit_tokens=[4],
        logit_probabilities=[1.0],
        attrs={"prompt": "ab", "scan": "hand"},
        batch_size=2,
    )


def write_store(g: FakeGraph, path: Path, batch_size=8):
    n_active = len(g.active_features)
    layout = dict(n_layers=g.n_layers, n_pos=g.n_pos, n_active=n_active, n_logits=g.n_logits)
    tables = dict(
        active_features=g.active_features,
        activation_values=g.activation_values,
        input_tokens=g.input_tokens,
        logit_tokens=g.logit_tokens,
        logit_probabilities=g.logit_probabilities,
    )
    return write_graph_from_dense(
        path,
        g.compute_dense,
        layout,
        tables,
        attrs=g.attrs,
        batch_size=batch_size,
        selected_features=g.selected_features,
    )
