"""Cross-prompt aggregation: counts equal a brute-force count over the pruned graphs, the task
circuit speaks the graph JSON schema, figures are byte-identical across runs."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from pipeline.analysis.aggregate import aggregate_study
from pipeline.analysis.aggregate_figures import render_figures
from pipeline.analysis.export import LINK_FIELDS, METADATA_FIELDS, NODE_FIELDS, QPARAMS_FIELDS
from pipeline.analysis.study_files import load_study
from pipeline.engine.options import AttributionConfig
from pipeline.graph.pruned import load_pruned_graph
from pipeline.run.config import LauncherConfig
from pipeline.run.prompt_sets import expand_templates, prompt_set_from_records
from pipeline.run.study import StudySettings, run_study

STATES = ("texas", "california", "florida", "ohio")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, tiny_gpt2_dir, plt_dir):
    """A finished tiny study of one template over four fillers, plus one failed prompt."""
    recs = expand_templates(
        ["the capital of {state} is"], {"state": list(STATES)}, id="capital_{state}", tags=["state={state}"]
    )
    ps = prompt_set_from_records([*recs, {"id": "too_long", "prompt": " ".join(["the"] * 40)}], "capitals_tiny")
    out = tmp_path_factory.mktemp("study") / "capitals_tiny"
    settings = StudySettings(
        model=str(tiny_gpt2_dir), transcoders=str(plt_dir), attribution=AttributionConfig(batch_size=32)
    )
    result = run_study(ps, settings, out, LauncherConfig(name="sequential", threads=1), log=None)
    assert result.count("done") == 4 and result.count("failed") == 1
    return out


@pytest.fixture(scope="module")
def aggregated(study_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("agg")
    return out, aggregate_study(study_dir, out, top=10)


def _pruned(study_dir):
    doc = load_study(study_dir)
    for p in doc["prompts"]:
        if p["status"] in ("done", "skipped"):
            yield p["id"], load_pruned_graph(Path(doc["graphs_dir"]) / p["key"] / "pruned.npz")


def test_recurring_feature_counts_equal_a_brute_force_count(study_dir, aggregated):
    _, agg = aggregated
    prompts, influence = defaultdict(set), defaultdict(dict)
    slot_prompts = defaultdict(set)
    for pid, pg in _pruned(study_dir):
        r = pg.result
        for i in range(r.n_features):
            if r.node_mask[i]:
                layer, pos, feat = (int(v) for v in pg.feature_info[i])
                prompts[(layer, feat)].add(pid)
                influence[(layer, feat)][pid] = influence[(layer, feat)].get(pid, 0.0) + r.node_influence[i]
                slot_prompts[(layer, feat, pos - pg.n_pos)].add(pid)
    assert agg["n_prompts"] == 4
    table = {(r["layer"], r["feature"]): r for r in agg["features"]}
    assert set(table) == set(prompts)
    for k, ids in prompts.items():
        vals = list(influence[k].values())
        assert table[k]["n_prompts"] == len(ids)
        assert table[k]["mean_influence"] == pytest.approx(np.mean(vals), rel=1e-5, abs=1e-12)
        assert table[k]["max_influence"] == pytest.approx(max(vals), rel=1e-5, abs=1e-12)
    slots = {(r["layer"], r["feature"], r["slot"]): r["n_prompts"] for r in agg["slot_features"]}
    assert slots == {k: len(v) for k, v in slot_prompts.items()}
    counts = [r["n_prompts"] for r in agg["features"]]
    assert counts == sorted(counts, reverse=True)


def test_slots_are_labelled_by_shared_token_or_tag(aggregated):
    _, agg = aggregated
    labels = {s["slot"]: s["label"] for s in agg["slots"]}
    # "the capital of {state} is": BOS, the, capital, of, {state}, is
    assert [labels[s] for s in sorted(labels)] == ["<bos>", "the", "capital", "of", "{state}", "is"]


def test_heatmap_holds_each_prompts_influence_of_the_top_features(study_dir, aggregated):
    _, agg = aggregated
    hm = agg["heatmap"]
    assert hm["prompts"] == [f"capital_{s}" for s in STATES]
    top = agg["features"][: len(hm["features"])]
    by_prompt = dict(_pruned(study_dir))
    for row, feat in zip(hm["values"], top):
        for pid, value in zip(hm["prompts"], row):
            pg = by_prompt[pid]
            r = pg.result
            expect = sum(
                r.node_influence[i]
                for i in range(r.n_features)
                if r.node_mask[i]
                and (int(pg.feature_info[i, 0]), int(pg.feature_info[i, 2])) == (feat["layer"], feat["feature"])
            )
            assert value == pytest.approx(expect, rel=1e-5, abs=1e-12)


def test_heatmap_columns_group_by_a_tag(study_dir, aggregated, tmp_path):
    _, agg = aggregated
    grouped = aggregate_study(study_dir, tmp_path, top=10, figures=False, group_by="state")
    assert grouped["heatmap"]["groups"] == sorted(STATES)
    assert grouped["heatmap"]["prompts"] == [f"capital_{s}" for s in sorted(STATES)]
    column = {p: [row[i] for row in agg["heatmap"]["values"]] for i, p in enumerate(agg["heatmap"]["prompts"])}
    for i, p in enumerate(grouped["heatmap"]["prompts"]):
        assert [row[i] for row in grouped["heatmap"]["values"]] == column[p]


def test_task_circuit_is_graph_json_with_mean_edge_weights(study_dir, aggregated):
    out, agg = aggregated
    doc = json.loads((out / "graph" / f"{agg['task_circuit']['slug']}.json").read_text())
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    assert set(METADATA_FIELDS) <= set(doc["metadata"]) and set(QPARAMS_FIELDS) == set(doc["qParams"])
    assert doc["metadata"]["prompt_tokens"] == ["<bos>", "the", "capital", "of", "{state}", "is"]
    ids = [n["node_id"] for n in doc["nodes"]]
    for n in doc["nodes"]:
        assert set(NODE_FIELDS) <= set(n)
    for link in doc["links"]:
        assert set(LINK_FIELDS) <= set(link) and link["source"] in ids and link["target"] in ids
    index = json.loads((out / "graph" / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == [agg["task_circuit"]["slug"]]
    # brute force: an edge between two feature nodes, mean over the 4 prompts (absent = 0)
    weights = defaultdict(float)
    for _, pg in _pruned(study_dir):
        r = pg.result
        t, s, w = r.kept_edges()
        for ti, si, wi in zip(t, s, w):
            if ti < r.n_features and si < r.n_features:
                lt, pt, ft = (int(v) for v in pg.feature_info[ti])
                ls, ps, fs = (int(v) for v in pg.feature_info[si])
                frame = 6  # all prompts have 6 tokens
                weights[(f"{ls}_{fs}_{ps - pg.n_pos + frame}", f"{lt}_{ft}_{pt - pg.n_pos + frame}")] += float(wi)
    links = {(lk["source"], lk["target"]): lk["weight"] for lk in doc["links"]}
    assert weights, "the tiny study has no feature-to-feature edge"
    for k, total in weights.items():
        assert links[k] == pytest.approx(total / 4, rel=1e-5, abs=1e-9)


def test_min_prompts_keeps_only_recurring_features(study_dir, tmp_path):
    agg = aggregate_study(study_dir, tmp_path, min_prompts=3, figures=False)
    doc = json.loads((tmp_path / "graph" / f"{agg['task_circuit']['slug']}.json").read_text())
    feats = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert all(n["n_prompts"] >= 3 for n in feats)
    assert all(n["n_prompts"] >= 3 for n in doc["nodes"] if n["feature_type"] == "mlp reconstruction error")


def test_figures_are_byte_identical_across_runs(study_dir, aggregated, tmp_path):
    out, agg = aggregated
    again = aggregate_study(study_dir, tmp_path, top=10)
    for name in ("heatmap.png", "heatmap.svg", "top_features.png", "top_features.svg"):
        assert (out / "figures" / name).read_bytes() == (tmp_path / "figures" / name).read_bytes(), name
    for name in ("aggregate.json", "features.csv"):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes()
    assert render_figures(again) == render_figures(agg)
    svg = (out / "figures" / "heatmap.svg").read_text()
    assert "<dc:date>" not in svg and "Matplotlib v" not in svg
    assert b"Software" not in (out / "figures" / "heatmap.png").read_bytes()[:200]


def test_labels_file_names_features_in_tables_and_circuit(study_dir, aggregated, tmp_path):
    _, agg = aggregated
    top = agg["features"][0]
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"layer": top["layer"], "feature": top["feature"], "label": "state feature"}]))
    agg2 = aggregate_study(study_dir, tmp_path / "agg", labels=labels, figures=False)
    assert agg2["features"][0]["label"] == "state feature"
    doc = json.loads((tmp_path / "agg" / "graph" / f"{agg2['task_circuit']['slug']}.json").read_text())
    assert any(n["clerp"] == "state feature" for n in doc["nodes"])


def test_aggregating_a_study_without_finished_prompts_is_an_error(tmp_path, tiny_gpt2_dir, plt_dir):
    ps = prompt_set_from_records([{"id": "too_long", "prompt": " ".join(["the"] * 40)}], "bad")
    run_study(
        ps,
        StudySettings(model=str(tiny_gpt2_dir), transcoders=str(plt_dir)),
        tmp_path,
        LauncherConfig(name="sequential", threads=1),
        log=None,
    )
    with pytest.raises(ValueError, match="no finished prompt"):
        aggregate_study(tmp_path)
    with pytest.raises(FileNotFoundError, match="study.json"):
        aggregate_study(tmp_path / "nowhere")
