"""The intervention report: its fields, that direct-effect ablations match the attribution's
prediction, that experiments do what they say, and that the files it writes are byte-stable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import testing
from pipeline.analysis.evaluation import EvaluationSpec, Experiment, evaluate, study_metrics
from pipeline.analysis.report import render_markdown, write_report
from pipeline.engine.attribution import attribute
from pipeline.engine.intervened_forward import feature_intervention
from pipeline.engine.interventions import Scale
from pipeline.engine.replacement import ReplacementModel
from pipeline.graph.pruned import load_pruned_graph, save_pruned_graph
from pipeline.graph.pruning import prune_graph

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir, plt_dir, tmp_path_factory):
    """A float64 model, a prompt, its attribution graph and a donor prompt."""
    model = ReplacementModel.from_pretrained(tiny_gpt2_dir, plt_dir, dtype=torch.float64)
    words = testing.vocabulary_words(tiny_gpt2_dir)
    prompt = " ".join(words[3:9])
    donor = " ".join(words[10:14])
    graph = attribute(prompt, model, store=tmp_path_factory.mktemp("eval") / "g.zarr", verbose=False)
    return model, prompt, donor, graph


def spec_for(model, prompt, donor, **kw) -> dict:
    cap = model.capture(prompt)
    idx, _ = cap.active_features()
    dcap = model.capture(donor)
    didx, _ = dcap.active_features()
    return {
        "top_k": 6,
        "max_new_tokens": 3,
        "supernodes": {"A": [idx[0].tolist(), idx[1].tolist()], "B": [didx[-1].tolist(), didx[-2].tolist()]},
        "experiments": [
            {"name": "ablate A", "kind": "ablate", "source": ["A"]},
            {
                "name": "swap A to B",
                "kind": "swap",
                "source": ["A"],
                "target": ["B"],
                "donor_prompt": donor,
                "source_factor": -1.0,
                "target_factor": 4.0,
            },
            {
                "name": "steer",
                "kind": "steer",
                "source": [idx[2].tolist()],
                "value": 25.0,
                "mode": "direct",
                "open_ended": True,
            },
        ],
        **kw,
    }


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


def test_experiments_do_what_they_say_and_flips_are_checked(setup):
    model, prompt, donor, graph = setup
    spec = spec_for(model, prompt, donor)
    cap, dcap = model.capture(prompt), model.capture(donor)
    n, nd = cap.n_pos, dcap.n_pos
    A = spec["supernodes"]["A"]
    B = spec["supernodes"]["B"]
    # the swap by hand: A x -1, B at end-aligned positions set to 4 x its donor activation
    manual = [(l, p, f, Scale(-1.0)) for l, p, f in A]
    manual += [(l, p + n - nd, f, 4.0 * float(dcap.activations[l, p, f])) for l, p, f in B]
    logits, _ = feature_intervention(model, prompt, manual)
    expected = model.tokenizer.decode([int(torch.argmax(logits[-1]))])
    clean_top = model.tokenizer.decode([int(torch.argmax(cap.logits[-1]))])
    spec["experiments"][1].update(expected_before=clean_top, expected_after=expected)
    spec["experiments"][0].update(expected_after="<surely not this>")
    report = evaluate(model, graph, spec)
    swap = report["experiments"][1]
    assert swap["after"][0]["token"] == expected and swap["flipped"] is True
    assert swap["n_interventions"] == 4 and swap["n_target_inactive_on_donor"] == 0
    assert report["experiments"][0]["flipped"] is False
    assert report["summary"]["n_checked"] == 2 and report["summary"]["flip_rate"] == 0.5
    assert study_metrics([report, report])["flip_rate"] == 0.5


def test_report_files_are_byte_identical_across_runs(setup, tmp_path):
    model, prompt, donor, graph = setup
    spec = spec_for(model, prompt, donor)
    a = evaluate(model, graph, spec)
    b = evaluate(model, graph, EvaluationSpec.from_dict(spec))
    write_report(a, tmp_path / "a")
    write_report(b, tmp_path / "b")
    names = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert names == [
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


def test_selectors_pick_active_features_and_not_on_donor_excludes_the_donors(setup):
    model, prompt, donor, graph = setup
    from pipeline.engine.intervened_forward import clean_run

    acts, dacts = clean_run(model, prompt).activations, clean_run(model, donor).activations
    n, nd = acts.shape[1], dacts.shape[1]
    spec = {
        "top_k": 0,
        "max_new_tokens": 0,
        "faithfulness": False,
        "experiments": [
            {"name": "all last", "source": [{"pos": -1}]},
            {"name": "layer 1 at 2", "source": [{"pos": 2, "layers": [1]}]},
            {"name": "specific", "source": [{"pos": -1, "not_on_donor": True}], "donor_prompt": donor},
            {
                "name": "swap",
                "kind": "swap",
                "source": [{"pos": -1, "layers": [0]}],
                "target": [{"pos": -1, "layers": [0]}],
                "donor_prompt": donor,
            },
        ],
    }
    report = evaluate(model, graph, spec)
    e = {x["name"]: x for x in report["experiments"]}
    assert e["all last"]["n_source_features"] == int((acts[:, -1] != 0).sum())
    assert e["layer 1 at 2"]["n_source_features"] == int((acts[1, 2] != 0).sum())
    specific = int(((acts[:, -1] != 0) & (dacts[:, nd - 1] == 0)).sum())
    assert e["specific"]["n_source_features"] == specific
    assert e["swap"]["n_interventions"] == int((acts[0, -1] != 0).sum() + (dacts[0, -1] != 0).sum())
    assert report["faithfulness"] is None and "Not run" in render_markdown(report)
    with pytest.raises(ValueError, match="not a position"):
        evaluate(
            model, graph, {"top_k": 0, "max_new_tokens": 0, "experiments": [{"name": "x", "source": [{"pos": n}]}]}
        )
    with pytest.raises(ValueError, match="needs a donor_prompt"):
        evaluate(
            model,
            graph,
            {
                "top_k": 0,
                "max_new_tokens": 0,
                "experiments": [{"name": "x", "source": [{"pos": -1, "not_on_donor": True}]}],
            },
        )


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"experiments": [{"name": "x", "kind": "flip", "source": [[0, 1, 2]]}]}, "kind must be one of"),
        ({"experiments": [{"name": "x", "kind": "swap", "source": [[0, 1, 2]]}]}, "needs target features"),
        ({"experiments": [{"name": "x", "kind": "steer", "source": [[0, 1, 2]]}]}, "needs a value or a source_factor"),
        ({"experiments": [{"name": "x", "source": []}]}, "no source"),
        ({"experiments": [{"name": "x", "source": [[0, 1, 2]], "colour": 1}]}, "unknown keys \\['colour'\\]"),
        ({"experiments": [{"name": "x", "source": ["texas"]}]}, "unknown supernode 'texas'"),
        ({"experiments": [{"name": "x", "source": [[0, 1, 2]]}, {"name": "x", "source": [[0, 1, 2]]}]}, "unique"),
        ({"topk": 3}, "unknown keys \\['topk'\\]"),
        ({"errors": "live"}, "errors must be one of"),
    ],
)
def test_bad_specs_are_clear_errors(setup, spec, match):
    model, _, _, graph = setup
    with pytest.raises(ValueError, match=match):
        evaluate(model, graph, spec)


def test_prompt_that_is_not_the_graphs_is_refused(setup):
    model, prompt, donor, graph = setup
    with pytest.raises(ValueError, match="other tokens than the graph"):
        evaluate(model, graph, {"top_k": 1, "max_new_tokens": 0}, prompt=donor)


def test_spec_round_trips_and_experiment_defaults():
    spec = EvaluationSpec.from_dict({"top_k": 3, "experiments": [{"name": "a", "source": [[0, 1, 2]]}]})
    assert isinstance(spec.experiments[0], Experiment)
    assert EvaluationSpec.from_dict(spec.to_dict()) == spec
    assert spec.experiments[0].kind == "ablate" and spec.experiments[0].mode == "iterative"
    assert np.isfinite(spec.edge_threshold)
