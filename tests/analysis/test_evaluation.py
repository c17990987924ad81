"""The intervention report: its fields, that direct-effect ablations match the attribution's
prediction, faithfulness, pruned graphs as input, and that the files it writes are byte-stable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.analysis.evaluation import evaluate, faithfulness_scores
from pipeline.analysis.evaluation_spec import EvaluationSpec
from pipeline.analysis.report import render_markdown, write_report
from pipeline.engine.intervened_forward import clean_run, feature_intervention
from pipeline.graph.pruned import load_pruned_graph, save_pruned_graph, selected_feature_table
from pipeline.graph.pruning import prune_graph
from tests.analysis.evaluation_fixtures import spec_for, tiny_setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir, plt_dir, tmp_path_factory):
    """A float64 model, a prompt, its attribution graph and a donor prompt."""
    return tiny_setup(tiny_gpt2_dir, plt_dir, tmp_path_factory.mktemp("eval") / "g.zarr")


def test_report_has_its_fields_and_direct_ablations_match_attribution(setup):
    model, prompt, donor, graph = setup
    report = evaluate(model, graph, spec_for(model, prompt, donor))
    for key in ("prompt", "tokens", "target", "clean", "top_features", "faithfulness", "experiments", "summary"):
        assert key in report
    assert report["prompt"] == prompt and len(report["tokens"]) == graph.n_pos
    rows = report["top_features"]["rows"]
    assert len(rows) == min(6, graph.n_selected)
    influences = [r["influence"] for r in rows]
    assert influences == sorted(influences, reverse=True)
    for r in rows:  # direct-effect ablation = minus the edge to the target
        assert abs(r["direct"] - r["predicted"]) <= 1e-5 * max(abs(r["predicted"]), 1e-3)
    assert report["top_features"]["correlation_direct"] > 0.9999
    f = report["faithfulness"]
    conds = f["conditions"]
    assert list(conds) == ["clean", "circuit_only", "circuit_ablated", "all_ablated"]
    assert (
        conds["clean"]["kl_from_clean"] == 0 and conds["clean"]["demeaned_logit"] == report["target"]["demeaned_logit"]
    )
    assert conds["all_ablated"]["n_ablated"] == f["n_active_features"]
    assert conds["circuit_only"]["n_ablated"] + conds["circuit_ablated"]["n_ablated"] == f["n_active_features"]
    assert f["faithfulness"] is not None
    s = report["summary"]
    assert s["n_experiments"] == 3 and s["n_checked"] == 0 and s["flip_rate"] is None
    for e in report["experiments"]:
        assert len(e["before"]) == len(e["after"]) == 5
        assert e["generation"]["max_new_tokens"] == 3


def test_report_files_are_byte_identical_across_runs(setup, tmp_path):
    model, prompt, donor, graph = setup
    spec = spec_for(model, prompt, donor)
    a = evaluate(model, graph, spec)
    b = evaluate(model, graph, EvaluationSpec.from_dict(spec))
    write_report(a, tmp_path / "a")
    write_report(b, tmp_path / "b")
    names = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert names == [
        "figures/baselines.png",
        "figures/baselines.svg",
        "figures/experiments.png",
        "figures/experiments.svg",
        "figures/faithfulness.png",
        "figures/faithfulness.svg",
        "figures/top_features.png",
        "figures/top_features.svg",
        "metrics.json",
        "report.json",
        "report.md",
    ]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    doc = json.loads((tmp_path / "a" / "report.json").read_text())
    assert doc["summary"] == json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert list(doc) == sorted(doc)
    md = (tmp_path / "a" / "report.md").read_text()
    assert md == render_markdown(a) and "## Faithfulness" in md and "swap A to B" in md
    assert b"Date" not in (tmp_path / "a" / "figures/faithfulness.svg").read_bytes()


def test_pruned_graph_artifact_is_evaluated_with_its_kept_edges(setup, tmp_path):
    model, prompt, donor, graph = setup
    result = prune_graph(graph)
    path = save_pruned_graph(graph, result, tmp_path / "pruned.npz")
    pruned = load_pruned_graph(path)
    pruned.target_feature_edges = pruned.target_vector = None  # as an artifact without the row
    report = evaluate(model, pruned, {"top_k": 4, "max_new_tokens": 0}, prompt=prompt)
    full = evaluate(model, graph, {"top_k": 4, "max_new_tokens": 0})
    assert [r["node"] for r in report["top_features"]["rows"]] == [r["node"] for r in full["top_features"]["rows"]]
    assert report["faithfulness"] == full["faithfulness"]
    kept = result.edge_weights.tocsr()
    logit0 = result.n_nodes - result.n_logits
    for r in report["top_features"]["rows"]:
        assert r["predicted"] == pytest.approx(-float(kept[logit0, r["node"]]), rel=1e-5, abs=1e-12)
    # with the unpruned store as edges: the full row, so the same predictions as the Graph's
    with_edges = evaluate(model, pruned, {"top_k": 4, "max_new_tokens": 0}, prompt=prompt, edges=graph)
    assert with_edges["top_features"] == full["top_features"]


def test_pruned_graph_saved_from_a_store_carries_the_target_full_row(setup, tmp_path):
    """prune saves the first logit's edge from every selected feature, pruned or not, so the
    intervene stage predicts from the full row without reading the graph store."""
    model, prompt, donor, graph = setup
    result = prune_graph(graph)
    pruned = load_pruned_graph(save_pruned_graph(graph, result, tmp_path / "pruned.npz"))
    cols, vals = graph.row(graph.logit_node(0))
    n_f = result.n_features
    want = np.zeros(n_f, np.float32)
    want[cols[cols < n_f]] = vals[cols < n_f]
    assert np.array_equal(pruned.target_feature_edges, want)
    kept = result.edge_weights.tocsr()[result.n_nodes - result.n_logits].toarray()[0, :n_f]
    assert np.count_nonzero(want) > np.count_nonzero(kept), "the fixture prunes no target edge"
    assert np.array_equal(pruned.target_vector, np.asarray(graph.table("logit_vectors")[0]))
    spec = {"top_k": 4, "max_new_tokens": 0}
    assert evaluate(model, pruned, spec, prompt=prompt)["top_features"] == evaluate(model, graph, spec)["top_features"]


def test_prompt_that_is_not_the_graphs_is_refused(setup):
    model, prompt, donor, graph = setup
    with pytest.raises(ValueError, match="other tokens than the graph"):
        evaluate(model, graph, {"top_k": 1, "max_new_tokens": 0}, prompt=donor)


# ------------------------------------------------------------------------------------ faithfulness
def test_faithfulness_formula_on_known_numbers():
    scores = faithfulness_scores({"clean": 10.0, "circuit_only": 8.0, "circuit_ablated": 4.0, "all_ablated": 2.0})
    assert scores == {"faithfulness": 0.75, "circuit_ablation_effect": 0.75}
    flat = faithfulness_scores({"clean": 3.0, "circuit_only": 1.0, "circuit_ablated": 2.0, "all_ablated": 3.0})
    assert flat == {"faithfulness": None, "circuit_ablation_effect": None}


def test_faithfulness_of_a_tiny_graph_is_the_formula_on_independently_measured_logits(setup):
    """The four conditions rerun by hand with feature_intervention: the target's de-meaned logit
    (logit minus the mean logit: the read vector is W_U[:, t] minus W_U's mean) under each, and
    the report's faithfulness equal to the formula on them."""
    model, prompt, donor, graph = setup
    report = evaluate(model, graph, {"top_k": 0, "max_new_tokens": 0})
    target = report["target"]["id"]
    active = [tuple(f) for f in clean_run(model, prompt).activations.nonzero().tolist()]
    result = prune_graph(graph)
    table, _ = selected_feature_table(graph)
    table = np.asarray(table).reshape(-1, 3)
    circuit = {tuple(int(v) for v in f) for f in table[result.node_mask[: len(table)]]}
    conditions = {
        "clean": [],
        "circuit_only": [f for f in active if f not in circuit],
        "circuit_ablated": sorted(circuit),
        "all_ablated": active,
    }
    values = {}
    for name, feats in conditions.items():
        logits, _ = feature_intervention(model, prompt, [(l, p, f, 0.0) for l, p, f in feats])
        values[name] = float(logits[-1, target] - logits[-1].mean())
        got = report["faithfulness"]["conditions"][name]
        assert got["n_ablated"] == len(feats)
        assert got["demeaned_logit"] == pytest.approx(values[name], rel=1e-5, abs=1e-9)
    want = faithfulness_scores(values)
    assert 0 < len(circuit) < len(active)
    assert report["faithfulness"]["faithfulness"] == pytest.approx(want["faithfulness"], rel=1e-5)
    assert report["faithfulness"]["circuit_ablation_effect"] == pytest.approx(want["circuit_ablation_effect"], rel=1e-5)
