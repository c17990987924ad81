"""A small graph and a hand-written attention file for it (format "circuit-pipeline/attention",
version 1: what the qk stage writes to results/<id>/attention/attention.json), for the export,
viewer and figure tests.

The graph: 2 layers, 2 positions, two features, f0 = layer 0 pos 0 feature 3 and f1 = layer 1
pos 1 feature 5, one logit (token 4)::

    nodes: f0=0 f1=1 e(0,0)=2 e(0,1)=3 e(1,0)=4 e(1,1)=5 t0=6 t1=7 logit=8
    f0 <- t0: 1.5
    f1 <- f0: 2.0 (crosses layer 1's attention), t1: 1.0 (layers 0 and 1), e(0,0): 0.25
    logit <- f1: 3.0, e(1,1): 0.5

Node ids: f0 "0_3_0", f1 "1_5_1", e(0,0) "0_0_0", e(1,1) "0_1_1", t0 "E_10_0", t1 "E_11_1",
logit "3_4_1".
"""

from __future__ import annotations

import copy

import numpy as np

from tests.graph_fixtures import FakeGraph

F0, F1, E00, E11, T0, T1, LOGIT = "0_3_0", "1_5_1", "0_0_0", "0_1_1", "E_10_0", "E_11_1", "3_4_1"
LABELS = {(0, 3): "Dallas", (1, 5): "Texas", (0, 9): "city (not in the graph)"}


def attention_graph() -> FakeGraph:
    A = np.zeros((9, 9), dtype=np.float32)
    A[0, 6] = 1.5
    A[1, 0], A[1, 7], A[1, 2] = 2.0, 1.0, 0.25
    A[8, 1], A[8, 5] = 3.0, 0.5
    return FakeGraph(
        A,
        n_layers=2,
        n_pos=2,
        n_logits=1,
        active_features=[[0, 0, 3], [1, 1, 5]],
        activation_values=[1.25, 2.5],
        selected_features=[0, 1],
        input_tokens=[10, 11],
        logit_tokens=[4],
        logit_probabilities=[0.75],
        attrs={"prompt": "Dallas is", "scan": "attn-toy", "prompt_tokens": ["Dallas", " is"]},
    )


def _node(kind, layer, pos, feature, node_id):
    parts = [kind] + [f"L{layer}"] * (layer is not None) + [f"p{pos}"] * (pos is not None)
    parts += [f"#{feature}"] * (feature is not None)
    return {"kind": kind, "layer": layer, "pos": pos, "feature": feature, "node_id": node_id, "label": " ".join(parts)}


TOKEN_P1 = _node("token", None, 1, None, T1)
FEATURE_F0 = _node("feature", 0, 0, 3, F0)
FEATURE_OUT = _node("feature", 0, 1, 9, None)  # a feature the pruned graph does not hold
ERROR_00 = _node("error", 0, 0, None, E00)
POSITION_P1 = _node("position", None, 1, None, None)
BIAS = _node("bias", None, None, None, None)

ATTENTION = {
    "format": "circuit-pipeline/attention",
    "version": 1,
    "prompt_id": "attn-toy",
    "prompt": "Dallas is",
    "tokens": ["Dallas", " is"],
    "n_layers": 2,
    "n_heads": 2,
    "config": {"edges": 2, "heads": 2, "terms": 3, "expand_attention": False},
    "edges": [
        {
            "source": F0,
            "target": F1,
            "weight": 2.0,
            "edge": 2.0000001,
            "layers": [{"layer": 1, "heads": [1.5, -0.25], "bypass": 0.7500001}],
        },
        {
            "source": T1,
            "target": F1,
            "weight": 1.0,
            "edge": 1.0,
            "layers": [
                {"layer": 0, "heads": [0.5, 0.0], "bypass": 0.5},
                {"layer": 1, "heads": [0.125, 0.25], "bypass": 0.625},
            ],
        },
    ],
    "heads": [
        {
            "layer": 1,
            "head": 0,
            "loading": 1.625,
            "edges": [0, 1],
            "query_pos": 1,
            "key_pos": 0,
            "pattern": 0.75,
            "score": 2.5,
            "terms_sum": 2.5,
            "terms": [
                {"query": TOKEN_P1, "key": FEATURE_F0, "value": 2.0},
                {"query": FEATURE_OUT, "key": ERROR_00, "value": -0.75},
                {"query": BIAS, "key": FEATURE_F0, "value": 0.5},
            ],
            "query_marginals": [{"node": TOKEN_P1, "value": 2.25}, {"node": FEATURE_OUT, "value": -0.5}],
            "key_marginals": [{"node": FEATURE_F0, "value": 3.0}, {"node": ERROR_00, "value": -0.5}],
        },
        {
            "layer": 0,
            "head": 0,
            "loading": 0.5,
            "edges": [1],
            "query_pos": 1,
            "key_pos": 1,
            "pattern": 1.0,
            "score": 0.375,
            "terms_sum": 0.375,
            "terms": [{"query": TOKEN_P1, "key": POSITION_P1, "value": 0.375}],
            "query_marginals": [{"node": TOKEN_P1, "value": 0.375}],
            "key_marginals": [{"node": POSITION_P1, "value": 0.375}],
        },
    ],
}


def attention_file() -> dict:
    """A fresh copy of the hand-written attention file."""
    return copy.deepcopy(ATTENTION)
