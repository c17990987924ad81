"""Graph export with the attention file: head loadings on links, the heads' QK attributions at
the top level, and the file staying loadable by Neuronpedia and circuit-tracer.

The two loaders' rules are written down here from reading their code (Neuronpedia's
``apps/webapp/app/api/graph/graph-schema.json``, checked with ajv on upload;
circuit-tracer 0.5.0's ``circuit_tracer/frontend/graph_models.py``, pydantic models), not copied:

* Neuronpedia: the top level needs ``metadata``, ``qParams``, ``nodes``, ``links``; metadata
  needs the strings ``slug``, ``scan``, ``prompt`` and the string list ``prompt_tokens``; a node
  needs ``node_id``, ``feature`` (integer or null), ``layer`` (string or integer), ``ctx_idx``
  (integer), ``feature_type``, ``jsNodeId``, ``clerp`` (strings), and ``influence`` /
  ``activation`` are numbers or null when present; a link needs the strings ``source``,
  ``target`` and the number ``weight``. No object of the schema closes its keys (none says
  ``additionalProperties: false``): unknown keys pass at every level. A few optional names carry
  a meaning of their own and must not be reused in another shape: ``qk_only_nodes`` (top level),
  ``qk_tracing_results`` (nodes), ``feature_details`` / ``info`` / ``generation_settings`` /
  ``pruning_settings`` (metadata). Its upload also refuses a slug or scan with characters
  other than letters, digits, ``_ . -``.
* circuit-tracer: metadata needs ``slug``, ``scan``, ``prompt`` (strings), ``transcoder_list``
  and ``prompt_tokens`` (string lists), ``node_threshold`` a number or null, ``schema_version``
  an integer or null; qParams needs all of ``pinnedIds`` (strings), ``supernodes`` (lists of
  strings), ``linkType``, ``clickedId``, ``sg_pos`` (strings); a node needs ``node_id``,
  ``feature`` (an integer, not null), ``layer`` (a string: its model does not turn integers
  into strings), ``ctx_idx`` (integer), ``feature_type``; links are free-form objects. Its
  models keep pydantic's default for unknown keys: ignored (dropped on load), never refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from pipeline.analysis.export import create_graph_files
from tests.attention_fixtures import (
    E00,
    F0,
    F1,
    LABELS,
    T1,
    attention_file,
    attention_graph,
)

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"[A-Za-z0-9_.-]+")
RESERVED = {
    "top": {"qk_only_nodes"},
    "node": {"qk_tracing_results"},
    "metadata": {"feature_details", "info", "generation_settings", "pruning_settings"},
}


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _str_list(x):
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def neuronpedia_problems(doc) -> list[str]:
    """What Neuronpedia's upload would refuse in ``doc`` (the rules in the module docstring)."""
    out = []
    for key in ("metadata", "qParams", "nodes", "links"):
        if key not in doc:
            out.append(f"missing {key}")
    meta = doc.get("metadata", {})
    for key in ("slug", "scan", "prompt"):
        if not isinstance(meta.get(key), str):
            out.append(f"metadata.{key} is not a string")
    if not _str_list(meta.get("prompt_tokens")):
        out.append("metadata.prompt_tokens is not a list of strings")
    if "node_threshold" in meta and not _is_num(meta["node_threshold"]):
        out.append("metadata.node_threshold is not a number")
    for key in ("slug", "scan"):
        if isinstance(meta.get(key), str) and not NAME.fullmatch(meta[key]):
            out.append(f"metadata.{key} has characters the upload refuses")
    q = doc.get("qParams", {})
    if not isinstance(q, dict) or ("pinnedIds" in q and not _str_list(q["pinnedIds"])):
        out.append("qParams.pinnedIds")
    for i, n in enumerate(doc.get("nodes", [])):
        for key in ("node_id", "feature_type", "jsNodeId", "clerp"):
            if not isinstance(n.get(key), str):
                out.append(f"nodes[{i}].{key} is not a string")
        if "feature" not in n or not (n["feature"] is None or _is_int(n["feature"])):
            out.append(f"nodes[{i}].feature")
        if not (isinstance(n.get("layer"), str) or _is_int(n.get("layer"))):
            out.append(f"nodes[{i}].layer")
        if not _is_int(n.get("ctx_idx")):
            out.append(f"nodes[{i}].ctx_idx")
        for key in ("influence", "activation"):
            if key in n and not (n[key] is None or _is_num(n[key])):
                out.append(f"nodes[{i}].{key}")
        out += [f"nodes[{i}] reuses {k}" for k in RESERVED["node"] & set(n)]
    for i, lk in enumerate(doc.get("links", [])):
        if not (isinstance(lk.get("source"), str) and isinstance(lk.get("target"), str) and _is_num(lk.get("weight"))):
            out.append(f"links[{i}] needs string source / target and a number weight")
    out += [f"top level reuses {k}" for k in RESERVED["top"] & set(doc)]
    out += [f"metadata reuses {k}" for k in RESERVED["metadata"] & set(meta)]
    return out


def circuit_tracer_problems(doc) -> list[str]:
    """What circuit-tracer's graph models would refuse in ``doc`` (the rules above)."""
    out = []
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return ["metadata"]
    for key in ("slug", "scan", "prompt"):
        if not isinstance(meta.get(key), str):
            out.append(f"metadata.{key}")
    for key in ("transcoder_list", "prompt_tokens"):
        if not _str_list(meta.get(key)):
            out.append(f"metadata.{key}")
    if meta.get("node_threshold") is not None and not _is_num(meta["node_threshold"]):
        out.append("metadata.node_threshold")
    if meta.get("schema_version") is not None and not _is_int(meta["schema_version"]):
        out.append("metadata.schema_version")
    q = doc.get("qParams")
    if not isinstance(q, dict):
        return [*out, "qParams"]
    if not _str_list(q.get("pinnedIds")):
        out.append("qParams.pinnedIds")
    if not (isinstance(q.get("supernodes"), list) and all(_str_list(s) for s in q["supernodes"])):
        out.append("qParams.supernodes")
    for key in ("linkType", "clickedId", "sg_pos"):
        if not isinstance(q.get(key), str):
            out.append(f"qParams.{key}")
    for i, n in enumerate(doc.get("nodes", [])):
        for key in ("node_id", "layer", "feature_type"):
            if not isinstance(n.get(key), str):
                out.append(f"nodes[{i}].{key}")
        for key in ("feature", "ctx_idx"):
            if not _is_int(n.get(key)):
                out.append(f"nodes[{i}].{key}")
    if not (isinstance(doc.get("links"), list) and all(isinstance(lk, dict) for lk in doc["links"])):
        out.append("links")
    return out


def export(tmp_path, name, attention=None, labels=LABELS):
    path = create_graph_files(
        attention_graph(), "attn-toy", tmp_path / name, 1.0, 1.0, labels=labels, attention=attention
    )
    return path, json.loads(path.read_text(encoding="utf-8"))


def without_attention_fields(doc):
    doc = json.loads(json.dumps(doc))
    doc.pop("attention_heads", None)
    for lk in doc["links"]:
        lk.pop("head_loadings", None)
    return doc


def ref(node_id, label, clerp=""):
    return {"node_id": node_id, "label": label, "clerp": clerp}


# --------------------------------------------------------------------------------------------


def test_the_loader_rules_can_fail(tmp_path):
    _, doc = export(tmp_path, "a")
    assert neuronpedia_problems(doc) == [] and circuit_tracer_problems(doc) == []
    broken = json.loads(json.dumps(doc))
    del broken["nodes"][0]["clerp"]
    broken["nodes"][1]["layer"] = 1  # Neuronpedia takes an integer layer, circuit-tracer does not
    broken["links"][0]["weight"] = "2"
    broken["qk_only_nodes"] = []
    broken["qParams"]["supernodes"] = [["a", 1]]
    assert neuronpedia_problems(broken) == [
        "nodes[0].clerp is not a string",
        "links[0] needs string source / target and a number weight",
        "top level reuses qk_only_nodes",
    ]
    assert circuit_tracer_problems(broken) == ["qParams.supernodes", "nodes[1].layer"]


def test_export_with_and_without_attention_is_valid_for_both_loaders(tmp_path):
    plain_path, plain = export(tmp_path, "plain")
    path, doc = export(tmp_path, "attn", attention_file())
    for d in (plain, doc):
        assert neuronpedia_problems(d) == []
        assert circuit_tracer_problems(d) == []
    # the new fields only: everything else as without the file
    assert "attention_heads" not in plain and not any("head_loadings" in lk for lk in plain["links"])
    assert without_attention_fields(doc) == plain
    assert list(doc) == ["metadata", "qParams", "nodes", "links", "attention_heads"]
    assert json.loads(json.dumps(doc["metadata"])) == plain["metadata"]
    # the same inputs give the same bytes; the index (graph-metadata.json) does not change
    again, _ = export(tmp_path, "again", attention_file())
    assert again.read_bytes() == path.read_bytes()
    assert (path.parent / "graph-metadata.json").read_bytes() == (
        plain_path.parent / "graph-metadata.json"
    ).read_bytes()


def test_head_loadings_on_exactly_the_files_edges(tmp_path):
    _, doc = export(tmp_path, "attn", attention_file())
    carried = {(lk["source"], lk["target"]): lk for lk in doc["links"] if "head_loadings" in lk}
    assert set(carried) == {(F0, F1), (T1, F1)}
    assert list(carried[(F0, F1)]) == ["source", "target", "weight", "head_loadings"]
    assert carried[(F0, F1)]["head_loadings"] == {
        "edge": 2.0000001,
        "layers": [{"layer": 1, "heads": [1.5, -0.25], "bypass": 0.7500001}],
    }
    assert carried[(T1, F1)]["head_loadings"] == {
        "edge": 1.0,
        "layers": [
            {"layer": 0, "heads": [0.5, 0.0], "bypass": 0.5},
            {"layer": 1, "heads": [0.125, 0.25], "bypass": 0.625},
        ],
    }
    assert carried[(F0, F1)]["weight"] == 2.0  # the graph's stored edge, unchanged


def test_attention_heads_field_labels_nodes_from_the_export(tmp_path):
    _, doc = export(tmp_path, "attn", attention_file())
    token, dallas = ref(T1, "token p1"), ref(F0, "feature L0 p0 #3", "Dallas")
    outside = ref(None, "feature L0 p1 #9", "city (not in the graph)")
    error, bias, position = ref(E00, "error L0 p0"), ref(None, "bias"), ref(None, "position p1")
    assert doc["attention_heads"] == {
        "n_layers": 2,
        "n_heads": 2,
        "config": {"edges": 2, "heads": 2, "terms": 3, "expand_attention": False},
        "heads": [
            {
                "layer": 1,
                "head": 0,
                "loading": 1.625,
                "edges": [[F0, F1], [T1, F1]],
                "query_pos": 1,
                "key_pos": 0,
                "pattern": 0.75,
                "score": 2.5,
                "terms_sum": 2.5,
                "terms": [
                    {"query": token, "key": dallas, "value": 2.0},
                    {"query": outside, "key": error, "value": -0.75},
                    {"query": bias, "key": dallas, "value": 0.5},
                ],
                "query_marginals": [{"node": token, "value": 2.25}, {"node": outside, "value": -0.5}],
                "key_marginals": [{"node": dallas, "value": 3.0}, {"node": error, "value": -0.5}],
            },
            {
                "layer": 0,
                "head": 0,
                "loading": 0.5,
                "edges": [[T1, F1]],
                "query_pos": 1,
                "key_pos": 1,
                "pattern": 1.0,
                "score": 0.375,
                "terms_sum": 0.375,
                "terms": [{"query": token, "key": position, "value": 0.375}],
                "query_marginals": [{"node": token, "value": 0.375}],
                "key_marginals": [{"node": position, "value": 0.375}],
            },
        ],
    }
    # the node's clerp in the graph and the term's label agree; without labels they are empty
    assert next(n for n in doc["nodes"] if n["node_id"] == F0)["clerp"] == "Dallas"
    _, bare = export(tmp_path, "bare", attention_file(), labels=None)
    assert {t["key"]["clerp"] for t in bare["attention_heads"]["heads"][0]["terms"]} == {""}


def test_attention_from_a_path_equals_from_a_dict(tmp_path):
    src = tmp_path / "attention.json"
    src.write_text(json.dumps(attention_file()))
    a, _ = export(tmp_path, "dict", attention_file())
    b, _ = export(tmp_path, "path", src)
    assert a.read_bytes() == b.read_bytes()


def _edit(fn):
    att = attention_file()
    fn(att)
    return att


@pytest.mark.parametrize(
    "attention, match",
    [
        (_edit(lambda a: a.update(format="other")), r"format \('other', 1\) is not"),
        (_edit(lambda a: a.update(version=2)), r"format .* is not"),
        (_edit(lambda a: a.update(n_layers=3)), "n_layers 3 but the graph has 2"),
        (_edit(lambda a: a["edges"][0].update(target=T1)), f"edge 0 {F0} -> {T1} is not a link"),
        (_edit(lambda a: a["edges"][1].update(weight=1.5)), "edge 1 has weight 1.5 but the graph's link has 1.0"),
        (_edit(lambda a: a["edges"][0]["layers"][0].update(heads=[1.0])), "edge 0: layer 1 with 1 heads"),
        (_edit(lambda a: a["heads"][0].update(edges=[0, 2])), r"names an edge index outside 0..1"),
        (_edit(lambda a: a["heads"][1].update(head=2)), "head L0 H2 is out of range"),
        (_edit(lambda a: a["heads"][0]["terms"][0]["key"].update(node_id="0_9_9")), "node '0_9_9' is not a node"),
        (_edit(lambda a: a["heads"][0].pop("pattern")), "missing or malformed field .*pattern"),
        (_edit(lambda a: a["heads"][0].update(score=float("nan"))), "non-finite"),
        ([], "expected a JSON object"),
    ],
)
def test_bad_attention_files_are_refused(tmp_path, attention, match):
    with pytest.raises(ValueError, match=match) as info:
        export(tmp_path, "bad", attention)
    if "non-finite" not in match:
        assert "rerun qk@<id>, or export without it" in str(info.value)
    assert not (tmp_path / "bad" / "attn-toy.json").exists()


# --------------------------------------------------------------------------------------------
# circuit-tracer's own loader, run in its venv (bench/.ct-venv; bench/circuit_tracer_env.sh)
# --------------------------------------------------------------------------------------------


def _ct_python() -> str | None:
    python = os.environ.get("CIRCUIT_TRACER_PYTHON") or str(ROOT / "bench" / ".ct-venv" / "bin" / "python")
    if not os.access(python, os.X_OK):
        return None
    ok = subprocess.run([python, "-c", "import circuit_tracer.frontend.graph_models"], capture_output=True)
    return python if ok.returncode == 0 else None


def test_circuit_tracers_loader_reads_the_export_with_attention(tmp_path):
    python = _ct_python()
    if python is None:
        pytest.skip("circuit-tracer is not importable (bash bench/circuit_tracer_env.sh, or CIRCUIT_TRACER_PYTHON=...)")
    path, doc = export(tmp_path, "attn", attention_file())
    run = subprocess.run(
        [python, str(ROOT / "bench" / "ct_load_graph.py"), str(path)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    (result,) = json.loads(run.stdout)
    assert result["ok"] is True, result
    assert result["n_nodes"] == len(doc["nodes"]) and result["n_links"] == len(doc["links"])
    assert result["slug"] == "attn-toy"
    # links are free-form dicts there: head_loadings survives; the top-level field is ignored
    assert result["links_with_head_loadings"] == 2
    assert result["ignored_top_level"] == ["attention_heads"]


def test_ct_load_graph_script_reports_a_refused_file(tmp_path):
    python = _ct_python()
    if python is None:
        pytest.skip("circuit-tracer is not importable")
    path, doc = export(tmp_path, "attn", attention_file())
    doc["nodes"][0]["feature"] = None  # circuit-tracer's Node wants an integer
    path.write_text(json.dumps(doc))
    run = subprocess.run([python, str(ROOT / "bench" / "ct_load_graph.py"), str(path)], capture_output=True, text=True)
    assert run.returncode == 1
    (result,) = json.loads(run.stdout)
    assert result["ok"] is False and "feature" in result["error"]


def test_ct_load_graph_script_is_plain_python():
    # it runs in circuit-tracer's venv: no import of this project
    text = (ROOT / "bench" / "ct_load_graph.py").read_text()
    assert "pipeline" not in re.findall(r"^\s*(?:from|import)\s+(\w+)", text, re.M)


def test_edge_goes_to_the_link_with_its_weight_when_two_links_share_ids():
    # circuit-tracer's id format can give two nodes one id: their links then share a pair
    from pipeline.analysis.export import _attention_fields

    att = attention_file()
    att["heads"] = []
    first = {"source": F0, "target": F1, "weight": 0.5}
    second = {"source": F0, "target": F1, "weight": 2.0}
    other = {"source": T1, "target": F1, "weight": 1.0}
    _attention_fields(att, [second, first, other], set(), 2, lambda node_id: "")
    assert "head_loadings" not in first
    assert second["head_loadings"]["edge"] == 2.0000001
    # and with no link of that weight, the error lists the weights there are
    att["edges"][0]["weight"] = 3.0
    with pytest.raises(ValueError, match=r"edge 0 has weight 3.0 but the graph's link has 2.0, 0.5"):
        _attention_fields(att, [dict(second), dict(first), dict(other)], set(), 2, lambda node_id: "")
