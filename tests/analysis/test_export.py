"""Graph JSON export: schema, node ids, links, labels, determinism, graph-metadata.json."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline.analysis.export import (
    NODE_FIELDS,
    build_graph_json,
    cantor_pairing,
    create_graph_files,
    load_labels,
    update_graph_metadata,
)
from pipeline.graph.pruned import save_pruned_graph
from pipeline.graph.pruning import prune_graph
from tests.graph_fixtures import FakeGraph, hand_graph, make_graph, write_store  # noqa: E402

FEATURE_TYPES = {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}


class Tok:
    """A tokenizer-like object: decode([id]) -> string."""

    def decode(self, ids):
        assert isinstance(ids, list) and len(ids) == 1
        return f"tok{ids[0]}\n"


def read(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def node_index(g):
    """node id -> graph-order index, computed independently of pipeline.analysis.export."""
    ids = {}
    info = g.active_features[g.selected_features]
    for i, (layer, pos, feat) in enumerate(info):
        ids[f"{layer}_{feat}_{pos}"] = i
    base = g.n_selected
    for layer in range(g.n_layers):
        for pos in range(g.n_pos):
            ids[f"0_{layer}_{pos}"] = base + layer * g.n_pos + pos
    base += g.n_layers * g.n_pos
    for pos, tok in enumerate(g.input_tokens):
        ids[f"E_{tok}_{pos}"] = base + pos
    base += g.n_pos
    for i, tok in enumerate(g.logit_tokens):
        ids[f"{g.n_layers + 1}_{tok}_{g.n_pos - 1}"] = base + i
    return ids


@pytest.fixture
def graph():
    return make_graph(4, "clt", n_layers=3, n_pos=5, d_transcoder=40)


def test_schema_every_field_and_type(graph, tmp_path):
    path = create_graph_files(graph, "toy-clt", tmp_path, tokenizer=Tok())
    assert path == tmp_path / "toy-clt.json"
    doc = read(path)
    assert list(doc) == ["metadata", "qParams", "nodes", "links"]
    meta = doc["metadata"]
    assert list(meta) == [
        "slug",
        "scan",
        "transcoder_list",
        "prompt_tokens",
        "prompt",
        "node_threshold",
        "schema_version",
    ]
    assert meta["slug"] == "toy-clt" and meta["scan"] == "toy-clt"
    assert meta["transcoder_list"] == []
    assert meta["prompt_tokens"] == [f"tok{t}\n" for t in graph.input_tokens]
    assert meta["prompt"] == graph.attrs["prompt"]
    assert meta["node_threshold"] == 0.8 and isinstance(meta["node_threshold"], float)
    assert meta["schema_version"] == 1
    assert doc["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    assert list(doc["qParams"]) == ["pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"]

    assert doc["nodes"] and doc["links"]
    for node in doc["nodes"]:
        assert tuple(node) == NODE_FIELDS
        assert isinstance(node["node_id"], str) and isinstance(node["jsNodeId"], str)
        assert type(node["feature"]) is int and type(node["ctx_idx"]) is int
        assert isinstance(node["layer"], str)
        assert node["feature_type"] in FEATURE_TYPES
        assert type(node["token_prob"]) is float
        assert type(node["is_target_logit"]) is bool
        assert node["run_idx"] == 0 and node["reverse_ctx_idx"] == 0
        assert isinstance(node["clerp"], str)
        if node["feature_type"] == "logit":
            assert node["influence"] is None and node["activation"] is None
        else:
            assert type(node["influence"]) is float and 0 < node["influence"] <= 1
        if node["feature_type"] == "cross layer transcoder":
            assert type(node["activation"]) is float and node["activation"] > 0
        else:
            assert node["activation"] is None
        if node["feature_type"] != "logit":
            assert node["token_prob"] == 0.0 and node["is_target_logit"] is False
    for link in doc["links"]:
        assert list(link) == ["source", "target", "weight"]
        assert isinstance(link["source"], str) and isinstance(link["target"], str)
        assert type(link["weight"]) is float and link["weight"] != 0


def test_node_ids_and_fields_match_the_graph(graph, tmp_path):
    doc = read(create_graph_files(graph, "g", tmp_path))
    by_type = {}
    for node in doc["nodes"]:
        by_type.setdefault(node["feature_type"], []).append(node)
    info = {tuple(map(int, r)): i for i, r in enumerate(graph.active_features[graph.selected_features])}
    acts = graph.activation_values[graph.selected_features]
    for node in by_type["cross layer transcoder"]:
        m = re.fullmatch(r"(\d+)_(\d+)_(\d+)", node["node_id"])
        layer, feat, pos = map(int, m.groups())
        assert (layer, pos, feat) in info
        assert node["feature"] == (layer + feat) * (layer + feat + 1) // 2 + feat
        assert node["layer"] == str(layer) and node["ctx_idx"] == pos
        assert node["jsNodeId"] == f"{layer}_{feat}-0"
        assert node["activation"] == float(str(np.float32(acts[info[(layer, pos, feat)]])))
    for node in by_type.get("mlp reconstruction error", []):
        m = re.fullmatch(r"0_(\d+)_(\d+)", node["node_id"])
        layer, pos = map(int, m.groups())
        assert layer < graph.n_layers and pos < graph.n_pos
        assert node["feature"] == -1 and node["layer"] == str(layer) and node["ctx_idx"] == pos
        assert node["jsNodeId"] == f"{layer}_{pos}-0"
    tokens = by_type["embedding"]
    assert [n["node_id"] for n in tokens] == [f"E_{t}_{p}" for p, t in enumerate(graph.input_tokens)]
    for pos, node in enumerate(tokens):  # every token node, in order
        tok = graph.input_tokens[pos]
        assert node["feature"] == pos and node["layer"] == "E" and node["ctx_idx"] == pos
        assert node["jsNodeId"] == f"E_{tok}-{pos}"
    logits = by_type["logit"]
    last = graph.n_pos - 1
    assert [n["node_id"] for n in logits] == [f"{graph.n_layers + 1}_{t}_{last}" for t in graph.logit_tokens]
    for i, node in enumerate(logits):
        tok, prob = int(graph.logit_tokens[i]), float(str(graph.logit_probabilities[i]))
        assert node["feature"] == tok and node["layer"] == str(graph.n_layers + 1)
        assert node["ctx_idx"] == last and node["jsNodeId"] == f"L_{tok}-{last}"
        assert node["token_prob"] == prob and node["is_target_logit"] == (i == 0)
        assert node["clerp"] == f'Output "<{tok}>" (p={prob:.3f})'
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids))
    # nodes come in graph order (features, errors, tokens, logits)
    index = node_index(graph)
    assert [index[i] for i in ids] == sorted(index[i] for i in ids)


def test_cantor_pairing():
    expected = {(0, 0): 0, (1, 0): 1, (0, 1): 2, (2, 0): 3, (1, 1): 4, (0, 2): 5, (3, 7): 62}
    for (x, y), v in expected.items():
        assert cantor_pairing(x, y) == v
    values = {cantor_pairing(x, y) for x in range(40) for y in range(40)}
    assert len(values) == 1600  # injective
    assert cantor_pairing(25, 16383) == (25 + 16383) * (25 + 16384) // 2 + 16383


def test_links_reference_nodes_and_carry_weights(graph, tmp_path):
    result = prune_graph(graph)
    doc = read(create_graph_files(graph, "g", tmp_path, pruned=result))
    index = node_index(graph)
    node_ids = {n["node_id"] for n in doc["nodes"]}
    pairs = []
    for link in doc["links"]:
        assert link["source"] in node_ids and link["target"] in node_ids
        t, s = index[link["target"]], index[link["source"]]
        assert link["weight"] == float(str(graph.dense[t, s]))  # weight = A[target, source]
        assert result.edge_mask[t, s]
        pairs.append((t, s))
    assert pairs == sorted(pairs)  # row-major: by target, then source
    assert len(pairs) == result.edge_mask.nnz
    # every feature/error node in the file touches a link; tokens and logits are all there
    touched = {link["source"] for link in doc["links"]} | {link["target"] for link in doc["links"]}
    for node in doc["nodes"]:
        if node["feature_type"] in ("cross layer transcoder", "mlp reconstruction error"):
            assert node["node_id"] in touched
    kept = {i for i in np.flatnonzero(result.node_mask)}
    assert {index[i] for i in node_ids} == kept


def test_deterministic_bytes_and_metadata_index(graph, tmp_path):
    other = make_graph(5, "plt")
    a = create_graph_files(graph, "alpha", tmp_path / "x")
    b = create_graph_files(other, "beta", tmp_path / "x", 0.7, 0.9)
    # the same graphs written in the other order, into another folder
    b2 = create_graph_files(other, "beta", tmp_path / "y", 0.7, 0.9)
    a2 = create_graph_files(graph, "alpha", tmp_path / "y")
    assert a.read_bytes() == a2.read_bytes() and b.read_bytes() == b2.read_bytes()
    mx, my = tmp_path / "x" / "graph-metadata.json", tmp_path / "y" / "graph-metadata.json"
    assert mx.read_bytes() == my.read_bytes()
    index = read(mx)
    assert [g["slug"] for g in index["graphs"]] == ["alpha", "beta"]
    assert index["graphs"][0] == read(a)["metadata"]
    assert index["graphs"][1] == read(b)["metadata"]
    assert index["graphs"][1]["node_threshold"] == 0.7
    # re-exporting a slug replaces its entry
    create_graph_files(other, "beta", tmp_path / "x", 0.5, 0.9)
    index = read(mx)
    assert [g["slug"] for g in index["graphs"]] == ["alpha", "beta"]
    assert index["graphs"][1]["node_threshold"] == 0.5
    # rewriting is byte-identical; no temp files left behind
    before = a.read_bytes()
    create_graph_files(graph, "alpha", tmp_path / "x")
    assert a.read_bytes() == before
    visible = sorted(p.name for p in (tmp_path / "x").iterdir() if not p.name.startswith("."))
    assert visible == ["alpha.json", "beta.json", "graph-metadata.json"]
    assert not list((tmp_path / "x").glob("*.tmp"))
    # the file is UTF-8 with non-ASCII kept
    g = make_graph(4, "clt", n_layers=3, n_pos=5, d_transcoder=40)
    g.attrs["prompt"] = "Die Hauptstadt von Bayern ist München ⏎"
    doc = read(create_graph_files(g, "umlaut", tmp_path / "z"))
    assert doc["metadata"]["prompt"].endswith("München ⏎")
    assert "München".encode() in (tmp_path / "z" / "umlaut.json").read_bytes()


def test_update_graph_metadata_rejects_garbage(tmp_path):
    (tmp_path / "graph-metadata.json").write_text('{"not": "an index"}')
    with pytest.raises(ValueError):
        update_graph_metadata(tmp_path, {"slug": "a", "scan": "s"})


def test_labels(graph, tmp_path):
    result = prune_graph(graph)
    info = graph.active_features[graph.selected_features]
    kept = [i for i in np.flatnonzero(result.node_mask) if i < graph.n_selected]
    (l0, p0, f0), (l1, p1, f1) = info[kept[0]], info[kept[1]]
    err = next(i for i in np.flatnonzero(result.node_mask) if graph.n_selected <= i < graph.token_slice.start)
    el, ep = divmod(int(err) - graph.n_selected, graph.n_pos)
    logit_id = f"{graph.n_layers + 1}_{graph.logit_tokens[0]}_{graph.n_pos - 1}"
    labels = {
        f"{l0}_{f0}_{p0}": "Texas",
        (int(l1), int(f1)): {"clerp": "capital"},
        f"0_{el}_{ep}": "residual junk",
        logit_id: "Austin!",
    }
    doc = read(create_graph_files(graph, "g", tmp_path, pruned=result, labels=labels))
    clerps = {n["node_id"]: n["clerp"] for n in doc["nodes"]}
    assert clerps[f"{l0}_{f0}_{p0}"] == "Texas"
    assert clerps[f"{l1}_{f1}_{p1}"] == "capital"
    assert clerps[f"0_{el}_{ep}"] == "residual junk"
    assert clerps[logit_id] == "Austin!"
    other_logit = f"{graph.n_layers + 1}_{graph.logit_tokens[1]}_{graph.n_pos - 1}"
    assert clerps[other_logit].startswith('Output "')
    # a (layer, feature) label applies at every position of that feature
    same = [
        n
        for n in doc["nodes"]
        if n["feature_type"] == "cross layer transcoder"
        and n["layer"] == str(l1)
        and n["node_id"].split("_")[1] == str(f1)
    ]
    assert same and all(n["clerp"] == "capital" for n in same)
    unlabeled = [
        n
        for n in doc["nodes"]
        if n["feature_type"] == "cross layer transcoder"
        and n["node_id"] not in (f"{l0}_{f0}_{p0}",)
        and n["clerp"] == ""
    ]
    assert unlabeled  # the rest stay empty
    # a JSON file of records
    records = [
        {"layer": int(l0), "feature": int(f0), "label": "from file"},
        {"node_id": logit_id, "description": "Austin"},
    ]
    lf = tmp_path / "labels.json"
    lf.write_text(json.dumps(records))
    doc = read(create_graph_files(graph, "g2", tmp_path, pruned=result, labels=lf))
    clerps = {n["node_id"]: n["clerp"] for n in doc["nodes"]}
    assert clerps[f"{l0}_{f0}_{p0}"] == "from file" and clerps[logit_id] == "Austin"
    assert load_labels(None) == ({}, {})
    with pytest.raises(ValueError):
        load_labels([{"feature": 3}])


def test_tokenizer_variants(graph):
    result = prune_graph(graph)
    vocab = [f"v{i}" for i in range(60)]
    for tok, expect in [
        (Tok(), lambda i: f"tok{i}\n"),
        (vocab, lambda i: f"v{i}"),
        ({i: f"m{i}" for i in range(60)}, lambda i: f"m{i}"),
        (lambda i: f"c{i}", lambda i: f"c{i}"),
        (None, lambda i: f"<{i}>"),
    ]:
        doc = build_graph_json(graph, "g", result, tokenizer=tok)
        assert doc["metadata"]["prompt_tokens"] == [expect(int(t)) for t in graph.input_tokens]
        logit = [n for n in doc["nodes"] if n["feature_type"] == "logit"][0]
        assert logit["clerp"].startswith(f'Output "{expect(int(graph.logit_tokens[0]))}" (p=')
    g = make_graph(4, "clt", n_layers=3, n_pos=5, d_transcoder=40)
    g.attrs["prompt_tokens"] = ["<bos>", "a", "b", "c", "d"]
    g.attrs["logit_token_strings"] = [" x", " y", " z"]
    doc = build_graph_json(g, "g", result)
    assert doc["metadata"]["prompt_tokens"] == ["<bos>", "a", "b", "c", "d"]
    assert [n["clerp"][:11] for n in doc["nodes"] if n["feature_type"] == "logit"] == [
        'Output " x"',
        'Output " y"',
        'Output " z"',
    ]


def test_scan_handling(graph, tmp_path):
    result = prune_graph(graph)
    doc = build_graph_json(graph, "g", result, scan=["tc-layer0", "tc-layer1"])
    assert doc["metadata"]["transcoder_list"] == ["tc-layer0", "tc-layer1"]
    assert re.fullmatch(r"custom-[0-9a-f]{16}", doc["metadata"]["scan"])
    assert doc == build_graph_json(graph, "g", result, scan=["tc-layer0", "tc-layer1"])
    g = make_graph(4, "clt", n_layers=3, n_pos=5, d_transcoder=40)
    g.attrs["transcoder_list"] = ["a", "b"]
    assert build_graph_json(g, "g", result)["metadata"]["transcoder_list"] == ["a", "b"]
    del g.attrs["scan"]
    with pytest.raises(ValueError, match="scan"):
        build_graph_json(g, "g", result)
    assert build_graph_json(g, "g", result, scan="gemma-2-2b")["metadata"]["scan"] == "gemma-2-2b"


def test_argument_checks(graph, tmp_path):
    result = prune_graph(graph, 0.8, 0.98)
    with pytest.raises(ValueError, match="node_threshold"):
        create_graph_files(graph, "g", tmp_path, 0.5, pruned=result)
    create_graph_files(graph, "g", tmp_path, 0.8, 0.98, pruned=result)  # consistent: fine
    for bad in ["", "a/b", "../x", ".hidden"]:
        with pytest.raises(ValueError, match="slug"):
            create_graph_files(graph, bad, tmp_path, pruned=result)
    with pytest.raises(ValueError, match="belong"):
        create_graph_files(make_graph(9, "plt"), "g", tmp_path, pruned=result)
    with pytest.raises(ValueError):
        create_graph_files(None, "g", tmp_path)


def test_export_from_saved_pruned_graph(graph, tmp_path):
    result = prune_graph(graph, 0.7, 0.95)
    saved = save_pruned_graph(graph, result, tmp_path / "pruned.npz")
    direct = create_graph_files(graph, "g", tmp_path / "a", pruned=result, tokenizer=Tok())
    from_file = create_graph_files(None, "g", tmp_path / "b", pruned=saved, tokenizer=Tok())
    assert direct.read_bytes() == from_file.read_bytes()
    with_graph = create_graph_files(graph, "g", tmp_path / "c", pruned=saved, tokenizer=Tok())
    assert direct.read_bytes() == with_graph.read_bytes()


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_export_stage_labels_cover_exactly_the_exported_features(kind, tmp_path):
    """The export stage labels the pruned graph's features (stages.export.kept_features) before
    writing; those are exactly the feature nodes of the graph JSON, each with its label."""
    from pipeline.analysis.dashboards import graph_features
    from pipeline.graph.pruned import load_pruned_graph
    from stages.export import kept_features

    g = make_graph(11, kind, n_layers=3, n_pos=5, d_transcoder=40)
    saved = save_pruned_graph(g, prune_graph(g, 0.8, 0.98), tmp_path / "pruned.npz")
    pruned = load_pruned_graph(saved)
    pairs = kept_features(pruned)
    labels = {key: f"L{key[0]} F{key[1]} <b>" for key in pairs}
    doc = read(create_graph_files(None, "g", tmp_path, pruned=pruned, tokenizer=Tok(), labels=labels))
    assert graph_features(doc) == pairs
    for node in doc["nodes"]:
        if node["feature_type"] == "cross layer transcoder":
            layer, feature, _ = node["node_id"].split("_")
            assert node["clerp"] == f"L{layer} F{feature} <b>"


def test_hand_graph_file_exactly(tmp_path):
    g = hand_graph()
    doc = read(create_graph_files(g, "hand", tmp_path, 0.7, 0.7, tokenizer=list("abcdefghiX")))
    assert doc["metadata"]["prompt_tokens"] == ["c", "X"]
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    # f0 = (layer 0, pos 1, feature 5) kept; f1 dropped; e(0,0) kept; tokens; logit
    assert list(nodes) == ["0_5_1", "0_0_0", "E_2_0", "E_9_1", "2_4_1"]
    assert nodes["0_5_1"]["feature"] == 20 and nodes["0_5_1"]["activation"] == 1.5
    assert nodes["0_5_1"]["influence"] == 0.375
    assert nodes["0_0_0"]["influence"] == 0.78125
    assert nodes["2_4_1"] == {
        "node_id": "2_4_1",
        "feature": 4,
        "layer": "2",
        "ctx_idx": 1,
        "feature_type": "logit",
        "token_prob": 1.0,
        "is_target_logit": True,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": "L_4-1",
        "clerp": 'Output "e" (p=1.000)',
        "influence": None,
        "activation": None,
    }
    assert doc["links"] == [
        {"source": "0_0_0", "target": "0_5_1", "weight": 2.0},
        {"source": "0_5_1", "target": "2_4_1", "weight": 3.0},
    ]


def test_error_id_collision_warns(tmp_path):
    # a layer-0 feature with index 1 at position 1 has id "0_1_1", as does the error (1, 1)
    # nodes: feature 0, errors 1..4 (layer-major: (0,0) (0,1) (1,0) (1,1)), tokens 5 6, logit 7
    g = FakeGraph(
        np.zeros((8, 8), np.float32),
        n_layers=2,
        n_pos=2,
        n_logits=1,
        active_features=[[0, 1, 1]],
        activation_values=[1.0],
        selected_features=[0],
        input_tokens=[3, 4],
        logit_tokens=[5],
        logit_probabilities=[1.0],
        attrs={"scan": "s"},
    )
    g.dense[7, 0] = 1.0  # logit <- feature
    g.dense[7, 4] = 1.0  # logit <- error (1, 1)
    g.dense[0, 6] = 1.0  # feature <- token 1
    result = prune_graph(g, 1.0, 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_graph_files(g, "c", tmp_path, pruned=result)
    assert any("0_1_1" in str(w.message) for w in caught)


def test_real_graph_store_export(tmp_path):
    g = make_graph(31, "plt", n_layers=3, n_pos=5, d_transcoder=40)
    store = write_store(g, tmp_path / "graph.zarr")
    a = create_graph_files(store, "s", tmp_path / "a", tokenizer=Tok())
    b = create_graph_files(g, "s", tmp_path / "b", tokenizer=Tok())
    assert a.read_bytes() == b.read_bytes()


def test_graph_metadata_concurrent_updates(tmp_path):
    import threading

    def write(i):
        for k in range(5):
            update_graph_metadata(tmp_path, {"slug": f"g{i}", "scan": "s", "node_threshold": k})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    graphs = read(tmp_path / "graph-metadata.json")["graphs"]
    assert [g["slug"] for g in graphs] == [f"g{i}" for i in range(8)]
    assert all(g["node_threshold"] == 4 for g in graphs)


def test_scan_and_slug_follow_neuronpedias_rule(graph, tmp_path):
    """Neuronpedia's upload takes scan and slug from [A-Za-z0-9_.-] only: a scan derived from
    the transcoders' source is made valid, a scan or slug the user gives must already be."""
    from pipeline.analysis.export import neuronpedia_name

    assert neuronpedia_name("models/organism/plt") == "models_organism_plt"
    assert neuronpedia_name("mntss/clt-gemma-2-2b-426k@v1") == "mntss_clt-gemma-2-2b-426k_v1"
    assert neuronpedia_name("gemma-2-2b") == "gemma-2-2b"
    result = prune_graph(graph, 0.8, 0.98)
    g = copy.copy(graph)
    g.attrs = {**graph.attrs, "scan": "models/organism/plt"}  # what a local transcoder directory records
    assert build_graph_json(g, "g", result)["metadata"]["scan"] == "models_organism_plt"
    with pytest.raises(ValueError, match=r"invalid scan 'org/repo': Neuronpedia accepts only letters, digits"):
        build_graph_json(graph, "g", result, scan="org/repo")
    for bad in ["my graph", "a:b", "caf\u00e9"]:
        with pytest.raises(ValueError, match=r"invalid slug .*Neuronpedia, which accepts only letters, digits"):
            create_graph_files(graph, bad, tmp_path, pruned=result)


def test_export_config_refuses_names_neuronpedia_refuses():
    from pipeline.run.config import ExportSpec

    with pytest.raises(ValueError, match=r"export.scan 'org/repo' may hold only letters"):
        ExportSpec(scan="org/repo")
    with pytest.raises(ValueError, match=r"export.slug_prefix 'my set/' may hold only letters"):
        ExportSpec(slug_prefix="my set/")
    assert ExportSpec(slug_prefix="run1-", scan="gemma-2-2b").scan == "gemma-2-2b"
