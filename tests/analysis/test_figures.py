"""Static rendering of a pruned graph (pipeline/analysis/figures.py): determinism, what is drawn, layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.analysis.export import build_graph_json
from pipeline.analysis.figures import draw_graph, graph_layout, render_graph, write_graph_figures
from pipeline.graph.pruning import prune_graph
from tests.graph_fixtures import make_graph  # noqa: E402


class Tok:
    def decode(self, ids):
        return f"t{ids[0]}"


@pytest.fixture(scope="module", params=["plt", "clt"])
def pruned_doc(request):
    graph = make_graph(7, request.param, n_layers=3, n_pos=5, d_transcoder=30)
    pruned = prune_graph(graph, 0.8, 0.98)
    return pruned, build_graph_json(graph, f"toy-{request.param}", pruned, tokenizer=Tok(), scan="toy")


def _drawn_points(fig) -> int:
    from matplotlib.collections import PathCollection

    return sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections if isinstance(c, PathCollection))


def test_render_twice_gives_the_same_bytes(pruned_doc):
    _, doc = pruned_doc
    a, b = render_graph(doc), render_graph(json.loads(json.dumps(doc)))
    assert set(a) == {"png", "svg"}
    assert a == b
    assert a["png"].startswith(b"\x89PNG") and b"matplotlib" not in a["png"].lower()
    assert b"<dc:date>" not in a["svg"] and b"Matplotlib v" not in a["svg"]


def test_every_pruned_node_and_kept_link_is_drawn_once(pruned_doc):
    pruned, doc = pruned_doc
    drawing = draw_graph(doc)
    assert drawing.n_nodes == len(doc["nodes"]) == int(pruned.node_mask.sum())
    assert _drawn_points(drawing.figure) == drawing.n_nodes
    assert drawing.n_links == len(doc["links"])


def test_layout_layers_bottom_to_top_tokens_left_to_right(pruned_doc):
    _, doc = pruned_doc
    positions, columns, width, n_layers = graph_layout(doc)
    assert n_layers == 3 and len(columns) == 5 and np.all(np.diff(columns) > 0) and width > columns[-1]
    for node, (x, y) in zip(doc["nodes"], positions):
        kind = node["feature_type"]
        row = 0 if kind == "embedding" else n_layers + 1 if kind == "logit" else int(node["layer"]) + 1
        assert y == row
        if kind != "logit":  # logits spread around the last column; others stay in their column
            pos = node["ctx_idx"]
            lo = columns[pos - 1] if pos else 0.0
            hi = columns[pos + 1] if pos + 1 < len(columns) else width
            assert lo < x < hi
    assert len(set(positions)) == len(positions)  # no two nodes on top of each other


def test_write_graph_figures_from_a_file(pruned_doc, tmp_path):
    _, doc = pruned_doc
    path = tmp_path / "g.json"
    path.write_text(json.dumps(doc))
    paths = write_graph_figures(path, tmp_path / "out", stem="graph")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["graph.png", "graph.svg"]
    assert paths["png"].read_bytes() == render_graph(doc)["png"]
    with pytest.raises(ValueError, match="pdf"):
        render_graph(doc, formats=("pdf",))


# --------------------------------------------------------------------------------------------
# The optional attention panel
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attention_docs():
    from tests.attention_fixtures import LABELS, attention_file, attention_graph

    graph = attention_graph()
    pruned = prune_graph(graph, 1.0, 1.0)
    plain = build_graph_json(graph, "attn-toy", pruned, labels=LABELS)
    with_heads = build_graph_json(graph, "attn-toy", pruned, labels=LABELS, attention=attention_file())
    return plain, with_heads


def test_attention_panel_only_with_attention_data(attention_docs):
    plain, with_heads = attention_docs
    bare = draw_graph(plain)
    assert bare.n_heads == 0 and len(bare.figure.axes) == 1
    drawing = draw_graph(with_heads)
    assert drawing.n_heads == 2 and len(drawing.figure.axes) == 2
    assert (drawing.n_nodes, drawing.n_links) == (bare.n_nodes, bare.n_links)
    lines = [t.get_text() for t in drawing.figure.axes[1].texts]
    assert lines == [
        "Top heads: query × key (QK)",
        "L1 H0  |loading| 1.62  p1→p0  score 2.5  pattern 0.75",
        "  +2  token p1 × Dallas",
        "  -0.75  city (not in the graph) × error L0 p0",
        "  +0.5  bias × Dallas",
        "L0 H0  |loading| 0.5  p1→p1  score 0.375  pattern 1.00",
        "  +0.375  token p1 × position p1",
    ]
    # the panel adds width, the graph keeps its own
    assert drawing.figure.get_figwidth() == pytest.approx(bare.figure.get_figwidth() + 4.5)


def test_attention_panel_bytes_deterministic_and_off_without_it(attention_docs):
    plain, with_heads = attention_docs
    a, b = render_graph(with_heads), render_graph(with_heads)
    assert a == b
    base = render_graph(plain)
    assert a["png"] != base["png"] and a["svg"] != base["svg"]
    # without the panel the other fields change nothing: the graph's own figure, byte for byte
    assert render_graph(with_heads, attention_panel=False) == base
