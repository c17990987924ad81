"""The attention file (explain_attention) on a tiny float64 GPT-2 with random PLTs: each part
checked against an independent computation (single-edge head loadings, a brute-force head
ranking, pair shares edge by edge, the run's own scores and patterns, the export's node ids)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline import testing
from pipeline.analysis import attention as A
from pipeline.analysis.export import build_graph_json
from pipeline.engine import edge_sweeps as ES
from pipeline.engine import head_loadings as HL
from pipeline.engine.attribution import attribute
from pipeline.engine.replacement import ReplacementModel
from pipeline.graph.pruning import prune_graph

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_LAYERS, N_HEADS, N_EDGES = 3, 4, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, graph, pruning, attention dict, head-loadings store) of a 7-word prompt."""
    root = tmp_path_factory.mktemp("attention")
    model_dir = testing.make_tiny_gpt2(root / "gpt2", n_layers=N_LAYERS, d_model=16, n_heads=N_HEADS, n_ctx=32)
    tc_dir = testing.make_random_plt(
        root / "plt", n_layers=N_LAYERS, d_model=16, d_transcoder=24, activation="relu", density=0.3
    )
    model = ReplacementModel.from_pretrained(model_dir, tc_dir, dtype=torch.float64)
    prompt = " ".join(testing.vocabulary_words(model_dir)[3:10])
    graph = attribute(prompt, model, batch_size=16, store=root / "g.zarr", verbose=False)
    pruned = prune_graph(graph, node_threshold=0.95, edge_threshold=0.99)
    store = root / "attention" / "head_loadings.zarr"
    doc = A.explain_attention(
        graph, pruned, model, edges=N_EDGES, heads=5, terms=10_000, store=store, chunk_size=5, progress=False
    )
    return model, graph, pruned, doc, store


def test_the_file_has_the_agreed_fields(setup):
    model, graph, _, doc, _ = setup
    assert doc["format"] == "circuit-pipeline/attention" and doc["version"] == 1
    assert (doc["n_layers"], doc["n_heads"]) == (N_LAYERS, N_HEADS)
    assert doc["config"] == {"edges": N_EDGES, "heads": 5, "terms": 10_000, "expand_attention": False}
    assert doc["tokens"] == [model.tokenizer.decode([int(t)]) for t in graph.input_tokens]
    assert len(doc["edges"]) == N_EDGES and 0 < len(doc["heads"]) <= 5
    json.dumps(doc, allow_nan=False)  # plain JSON values only


def test_every_edge_is_split_exactly_and_is_the_graphs_edge(setup):
    _, graph, pruned, doc, _ = setup
    ids = A.graph_node_ids(graph)
    expected = HL.top_edges(pruned, N_EDGES)
    layers_seen = set()
    for rec, (s, t) in zip(doc["edges"], expected.tolist()):
        assert (rec["source"], rec["target"]) == (ids[s], ids[t])
        cols, vals = graph.row(t)
        assert rec["weight"] == float(vals[cols == s][0])  # the stored float32 edge
        assert abs(rec["edge"] - rec["weight"]) <= 1e-6 * abs(rec["edge"])
        for layer in rec["layers"]:
            assert len(layer["heads"]) == N_HEADS
            assert abs(sum(layer["heads"]) + layer["bypass"] - rec["edge"]) <= 1e-9 * max(1.0, abs(rec["edge"]))
            layers_seen.add(layer["layer"])
    assert layers_seen  # some edge crosses attention


def test_the_heads_are_a_brute_force_ranking_of_single_edge_loadings(setup):
    model, graph, pruned, doc, _ = setup
    capture = HL.graph_capture(graph, model)
    total = np.zeros((N_LAYERS, N_HEADS))
    carried: dict[tuple[int, int], list[int]] = {}
    for i, (s, t) in enumerate(HL.top_edges(pruned, N_EDGES).tolist()):
        hl = HL.head_loadings(graph, s, t, model=model, capture=capture)
        for layer, row in zip(hl.layers.tolist(), hl.heads):
            for h in range(N_HEADS):
                total[layer, h] += abs(row[h])
                if row[h] != 0:
                    carried.setdefault((layer, h), []).append(i)
    ranking = sorted((-total[l, h], l, h) for l in range(N_LAYERS) for h in range(N_HEADS) if total[l, h] > 0)
    got = [(rec["layer"], rec["head"]) for rec in doc["heads"]]
    assert got == [(l, h) for _, l, h in ranking[: len(got)]] and len(got) == min(5, len(ranking))
    for rec in doc["heads"]:
        assert abs(rec["loading"] - total[rec["layer"], rec["head"]]) <= 1e-9 * total.max()
        assert rec["edges"] == carried[rec["layer"], rec["head"]]


def test_each_head_is_attributed_at_the_pair_carrying_most_of_its_loading(setup):
    """Sum over edges of |pair shares|, recomputed edge by edge; its argmax is (query, key)."""
    model, graph, pruned, doc, _ = setup
    capture = HL.graph_capture(graph, model)
    pairs = np.zeros((N_LAYERS, N_HEADS, graph.n_pos, graph.n_pos))
    for s, t in HL.top_edges(pruned, N_EDGES).tolist():
        src, tgt = HL.source_vector(graph, s, model, capture), HL.target_vector(graph, t, model)
        n = tgt.pos + 1
        sweep = ES.source_sweep(model, capture, src, n)
        grads = [g[0] for g in ES.sweep_edges(model, capture, [src], [tgt], n).grads]
        for layer in ES.layers_on_the_way(src.layer, tgt.layer, N_LAYERS):
            pairs[layer, :, :n, :n] += np.abs(ES.pair_shares(sweep, grads, layer).numpy())
    for rec in doc["heads"]:
        m = pairs[rec["layer"], rec["head"]]
        assert m[rec["query_pos"], rec["key_pos"]] == pytest.approx(m.max(), rel=1e-12)
        assert rec["key_pos"] <= rec["query_pos"]


def test_each_heads_terms_add_up_to_the_runs_score_and_pattern(setup):
    """The run's own score (hook_attn_scores) and pattern, read here with plain hooks; with
    every term listed, the terms and each side's marginals add up to the score."""
    model, graph, _, doc, _ = setup
    seen = {}

    def keep(tensor, *, hook):
        seen[hook.name] = tensor[0].detach().clone()

    names = [f"blocks.{l}.attn.{k}" for l in range(N_LAYERS) for k in ("hook_attn_scores", "hook_pattern")]
    with torch.no_grad(), model.hooks([(n, keep) for n in names]):
        model.bridge(torch.as_tensor(graph.input_tokens)[None])
    for rec in doc["heads"]:
        layer, h, p, k = rec["layer"], rec["head"], rec["query_pos"], rec["key_pos"]
        score = float(seen[f"blocks.{layer}.attn.hook_attn_scores"][h, p, k])
        assert rec["score"] == pytest.approx(score, rel=1e-9, abs=1e-12)
        assert rec["pattern"] == pytest.approx(float(seen[f"blocks.{layer}.attn.hook_pattern"][h, p, k]), rel=1e-12)
        scale = sum(abs(t["value"]) for t in rec["terms"])
        assert abs(sum(t["value"] for t in rec["terms"]) - score) <= 1e-9 * scale
        assert abs(rec["terms_sum"] - score) <= 1e-9 * scale
        for side in ("query_marginals", "key_marginals"):
            assert abs(sum(m["value"] for m in rec[side]) - score) <= 1e-9 * scale
            values = [abs(m["value"]) for m in rec[side]]
            assert values == sorted(values, reverse=True)


def test_node_ids_are_the_exports(setup):
    """The edges' ids are the export's links; a QK node has the id of its graph node when the
    pruning keeps it, else None; feature ids spell its layer, feature and position."""
    _, graph, pruned, doc, _ = setup
    exported = build_graph_json(graph, "t", pruned, scan="tiny")
    links = {(link["source"], link["target"]) for link in exported["links"]}
    assert {(e["source"], e["target"]) for e in doc["edges"]} <= links
    ids = A.graph_node_ids(graph)
    targets, sources, _ = pruned.kept_edges()
    assert {(ids[s], ids[t]) for s, t in zip(sources.tolist(), targets.tolist())} == links
    assert {n["node_id"] for n in exported["nodes"]} <= {ids[i] for i in np.flatnonzero(pruned.node_mask)}
    named = unnamed = 0
    for rec in doc["heads"]:
        for term in rec["terms"]:
            for node in (term["query"], term["key"]):
                if node["kind"] in ("feature", "error", "token"):
                    if node["node_id"] is None:
                        unnamed += 1
                        continue
                    named += 1
                    if node["kind"] == "feature":
                        assert node["node_id"] == f"{node['layer']}_{node['feature']}_{node['pos']}"
                    elif node["kind"] == "error":
                        assert node["node_id"] == f"0_{node['layer']}_{node['pos']}"
                    else:
                        assert node["node_id"] == f"E_{int(graph.input_tokens[node['pos']])}_{node['pos']}"
                else:
                    assert node["node_id"] is None
    assert named > 0 and unnamed > 0  # the pruning drops some of the nodes the scores read


def test_a_rerun_resumes_the_head_loadings_and_gives_the_same_file(setup, monkeypatch):
    model, graph, pruned, doc, store = setup
    shutil.rmtree(store / "chunk_000001")  # as if killed before this chunk was renamed into place
    computed = []
    real = HL._compute_chunk
    monkeypatch.setattr(HL, "_compute_chunk", lambda *a: computed.append(len(a[3])) or real(*a))
    again = A.explain_attention(
        graph, pruned, model, edges=N_EDGES, heads=5, terms=10_000, store=store, chunk_size=5, progress=False
    )
    assert computed == [5] and again == doc
    with pytest.raises(HL.HeadLoadingsError, match="another request"):
        A.explain_attention(graph, pruned, model, edges=N_EDGES - 1, heads=5, terms=5, store=store, progress=False)


@pytest.mark.parametrize("name", ["edges", "heads", "terms"])
def test_a_bad_count_is_refused_naming_it(setup, name):
    model, graph, pruned, _, _ = setup
    counts = {"edges": 3, "heads": 2, "terms": 2, name: 0}
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
        A.explain_attention(graph, pruned, model, progress=False, **counts)
