"""Intermediate hops in a pruned circuit, on the hand-computed graph of tests/graph_fixtures.py:
nodes f0=(0,1,5) f1=(0,1,7), errors, tokens t0 t1, one logit (token 4);
edges logit <- f0, f1;  f0 <- t0, t1, e00;  f1 <- t1."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.hops import intermediate_hop, reachable
from pipeline.graph.pruned import load_pruned_graph, save_pruned_graph
from pipeline.graph.pruning import prune_graph
from tests.graph_fixtures import hand_graph

F0, F1 = (0, 1, 5), (0, 1, 7)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    graph = hand_graph()
    path = tmp_path_factory.mktemp("hops") / "pruned.npz"
    save_pruned_graph(graph, prune_graph(graph, 1.0, 1.0), path)  # keep every node and edge
    return load_pruned_graph(path)


def none_write(nodes):
    return set()


def test_reachable_follows_kept_edges_both_ways():
    targets, sources = np.array([1, 2, 2]), np.array([0, 1, 3])
    assert reachable((targets, sources), 0, forward=True) == {0, 1, 2}
    assert reachable((targets, sources), 2, forward=False) == {0, 1, 2, 3}


def test_a_selective_feature_between_token_and_answer_is_a_hop(pruned):
    hop = intermediate_hop(pruned, source_pos=0, answer_token=4, candidates=[F0], writes_answer=none_write)
    assert hop.found and hop.nodes == [F0] and hop.candidates_kept == 1


def test_a_feature_the_source_token_does_not_reach_is_no_hop(pruned):
    hop = intermediate_hop(pruned, source_pos=0, answer_token=4, candidates=[F1], writes_answer=none_write)
    assert not hop.found and "path" in hop.reason
    # from token 1, f1 is on a path to the logit
    assert intermediate_hop(pruned, source_pos=1, answer_token=4, candidates=[F1], writes_answer=none_write).found


def test_a_feature_that_writes_the_answer_is_no_intermediate(pruned):
    hop = intermediate_hop(pruned, source_pos=0, answer_token=4, candidates=[F0], writes_answer=lambda ns: set(ns))
    assert not hop.found and "write the answer" in hop.reason


def test_missing_candidates_and_answers_say_why(pruned):
    assert (
        "no selective feature"
        in intermediate_hop(
            pruned, source_pos=0, answer_token=4, candidates=[(0, 0, 99)], writes_answer=none_write
        ).reason
    )
    assert (
        "not a logit node"
        in intermediate_hop(pruned, source_pos=0, answer_token=9, candidates=[F0], writes_answer=none_write).reason
    )
