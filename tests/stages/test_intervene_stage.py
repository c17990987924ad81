"""The intervene / intervene_summary DVC stages on a tiny fixture (no DVC, no organism build):
the report and the study metrics they write, byte-identical on a rerun, and config errors
that name the key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pipeline import testing  # noqa: E402
from pipeline._io import write_json  # noqa: E402
from pipeline.analysis.evaluation_spec import EvaluationSpec, Experiment  # noqa: E402
from pipeline.analysis.selectivity import SelectivityTable  # noqa: E402
from pipeline.engine.attribution import attribute  # noqa: E402
from pipeline.engine.intervened_forward import clean_run  # noqa: E402
from pipeline.engine.replacement import ReplacementModel  # noqa: E402
from pipeline.graph.pruned import save_pruned_graph  # noqa: E402
from pipeline.graph.pruning import prune_graph  # noqa: E402
from pipeline.organism.world import WorldConfig, make_world  # noqa: E402
from pipeline.run.compose import ConfigError, load_config, register_configs  # noqa: E402
from pipeline.run.config import ExperimentSpec, InterventionSpec  # noqa: E402
from stages import intervene, intervene_summary  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def selectivity_table(n_layers: int, d_transcoder: int) -> SelectivityTable:
    """A hand-made table: every layer-0 feature selective for state s1, every layer-1 feature
    for s2, at every role (two prompts each, always firing for their state, never for the other)."""
    counts = np.zeros((2, n_layers, d_transcoder), np.int64)
    counts[0, 0], counts[1, 1] = 2, 2
    keys = [(role, "state") for role in ("city", "last", "any")]
    return SelectivityTable(
        {"state": ["s1", "s2"]},
        ["city", "last", "any"],
        {k: counts for k in keys},
        {k: np.array([2, 2]) for k in keys},
    )


@pytest.fixture(scope="module")
def study(tiny_gpt2_dir, plt_dir, tmp_path_factory):
    """A study folder: params.yaml (tiny model + PLTs, two prompts with experiments), each
    prompt's pruned graph, as the prune stage leaves them, a world.json and a selectivity table."""
    root = tmp_path_factory.mktemp("intervene_study")
    words = testing.vocabulary_words(tiny_gpt2_dir)
    prompts = {"a": " ".join(words[3:9]), "b": " ".join(words[10:16])}  # same length: end-aligned swap
    tags = {"a": ["state=s1", f"city={words[6]}"], "b": ["state=s2", f"city={words[13]}"]}  # cities at position 4
    model = ReplacementModel.from_pretrained(tiny_gpt2_dir, plt_dir, dtype=torch.float32)
    tops = {}
    for pid, text in prompts.items():
        graph = attribute(text, model, store=root / "results" / pid / "graph.zarr", verbose=False)
        save_pruned_graph(graph, prune_graph(graph, 0.8, 0.98), root / "results" / pid / "pruned.npz")
        clean = clean_run(model, text)
        tops[pid] = model.tokenizer.decode([int(torch.argmax(clean.logits[-1]))])
    inactive = [1, 1, int(torch.nonzero(clean.activations[1, 1] == 0)[0])]  # a feature of b that is off
    world = make_world(WorldConfig(n_states=2, cities_per_state=3, held_out_per_state=1))
    write_json(root / "data" / "organism" / "world.json", {"config": world.config.to_dict()})
    selectivity_table(model.n_layers, model.transcoders.d_transcoder).save(root / "data" / "selectivity" / "plt.npz")
    experiments = {
        "a": [
            {
                "name": "swap last position from b",
                "group": "swap_last",
                "kind": "swap",
                "source": [{"pos": -1}],
                "target": [{"pos": -1}],
                "donor_prompt": prompts["b"],
            },
            {
                "name": "ablate a-only features",
                "group": "ablation",
                "kind": "ablate",
                "source": [{"pos": -1, "not_on_donor": True, "layers": [0]}],
                "donor_prompt": prompts["b"],
                "expected_after": "no such answer",
            },
            {
                "name": "rule swap from b",
                "group": "state_swap",
                "kind": "swap",
                "source": [{"select": "selective", "label": "state", "role": "city"}],
                "target": [{"select": "selective", "label": "state", "role": "city"}],
                "donor": "b",
                "source_factor": -4,
                "target_factor": 10,
                "expected_after": "no such answer",
            },
        ],
        "b": [
            {
                "name": "no-op",
                "group": "ablation",
                "kind": "ablate",
                "source": [inactive],
                "expected_after": tops["b"].strip(),
            },
        ],
    }
    params = {
        "model": {"name": str(tiny_gpt2_dir), "dep": str(tiny_gpt2_dir), "revision": None},
        "transcoders": {"source": str(plt_dir), "kind": "plt", "dep": str(plt_dir), "revision": None},
        "prompts": {
            "name": "tiny",
            "items": {
                pid: {
                    "prompt": text,
                    "kind": {"a": "two_hop", "b": "language"}[pid],
                    "tags": tags[pid],
                    "experiments": experiments[pid],
                }
                for pid, text in prompts.items()
            },
        },
        "runtime": {"threads": 1, "device": "cpu"},
        "intervention": {"top_k": 4, "max_new_tokens": 2, "n_random": 4},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run_stages(root: Path, monkeypatch) -> dict[str, str]:
    """Run intervene@a, intervene@b and intervene_summary in ``root``; {file: sha256} of what they wrote."""
    monkeypatch.chdir(root)
    for pid in ("a", "b"):
        intervene.main(["--prompt-id", pid])
    intervene_summary.main([])
    files = sorted([*Path("results").glob("*/report/**/*"), *Path("metrics").rglob("*")])
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def test_stages_write_report_and_study_metrics_byte_identical_on_rerun(study, monkeypatch):
    first = run_stages(study, monkeypatch)
    for pid in ("a", "b"):
        for name in (
            "report.json",
            "report.md",
            "metrics.json",
            "figures/top_features.png",
            "figures/faithfulness.png",
            "figures/experiments.png",
        ):
            assert f"results/{pid}/report/{name}" in first
        assert f"metrics/interventions/{pid}.json" in first
    assert not any(name.endswith(".svg") for name in first)
    report = json.loads((study / "results/a/report/report.json").read_text())
    assert report["spec"]["top_k"] == 4 and len(report["top_features"]["rows"]) == 4
    # predictions from the full attribution row: direct-effect ablations match them
    assert report["top_features"]["max_abs_error_direct"] < 1e-4
    swap = report["experiments"][0]
    assert swap["n_interventions"] > 0 and swap["flipped"] is None and swap["group"] == "swap_last"
    assert swap["baselines"] == {}  # nothing expected: no baseline
    assert report["experiments"][1]["flipped"] is False
    assert len(report["experiments"][1]["generation"]["steered"]) > 0
    # the rule swap: read from the table, the circuit and b's tags (donor by id), city to city
    rule = report["experiments"][2]
    acts_a = clean_run(load_replacement(study), report["prompt"]).activations
    want = {(0, 4, int(f)) for f in torch.nonzero(acts_a[0, 4]).reshape(-1)}  # layer 0: s1 (a's state)
    assert {(r["layer"], r["pos"], r["feature"]) for r in rule["selected"]["source"]} == want
    assert {(r["layer"], r["pos"], r["at"]) for r in rule["selected"]["target"]} == {(1, 4, 4)}  # layer 1: s2
    assert rule["donor"] == {"id": "b", "prompt": report["experiments"][0]["donor"]["prompt"]}
    b = rule["baselines"]
    assert b["random"]["n_runs"] == 4 and b["wrong_position"]["moves"][0]["to"] == 3
    assert b["same_state"]["n_runs"] == 0 and "no prompt of the bank" in b["same_state"]["note"]
    b_report = json.loads((study / "results/b/report/report.json").read_text())
    assert b_report["experiments"][0]["flipped"] is False  # the no-op: its top token never changed

    m = json.loads((study / "metrics/interventions.json").read_text())
    assert (m["n_prompts"], m["n_experiments"], m["n_checked"], m["n_flipped"], m["flip_rate"]) == (2, 4, 3, 0, 0.0)
    assert m["by_kind"]["ablate"]["n_checked"] == 2 and m["by_kind"]["ablate"]["flip_rate"] == 0.0
    assert m["by_kind"]["swap"]["n_checked"] == 1 and m["by_kind"]["swap"]["n_experiments"] == 2
    assert m["by_group"]["ablation"]["flip_rate"] == 0.0
    assert m["by_prompt_kind"]["language"]["flip_rate"] == 0.0
    random = m["baselines"]["random"]
    assert (random["n_experiments"], random["n_runs"]) == (3, 12)
    assert m["by_group"]["state_swap"]["baselines"]["wrong_position"]["n_runs"] == 1
    assert m["by_kind"]["swap"]["baselines"]["same_state"]["n_runs"] == 0
    assert m["mean_faithfulness"] is not None

    shutil.rmtree(study / "results/a/report")
    shutil.rmtree(study / "metrics")
    assert run_stages(study, monkeypatch) == first


def load_replacement(root: Path) -> ReplacementModel:
    cfg = load_config(root / "params.yaml")
    return ReplacementModel.from_pretrained(cfg.model.name, cfg.transcoders.source, dtype=torch.float32)


def test_schema_and_library_agree_on_experiments_and_baselines():
    lib = {f.name for f in dataclasses.fields(Experiment)}
    assert {f.name for f in dataclasses.fields(ExperimentSpec)} == lib
    # the intervention group's settings are defined once: the library's spec extends them
    assert issubclass(EvaluationSpec, InterventionSpec)


def test_summary_refuses_a_missing_prompt(study, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    shutil.copy(study / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(SystemExit, match="no intervention metrics for \\['a', 'b'\\]"):
        intervene_summary.main([])


def test_bad_experiment_is_refused_before_the_model_loads(study, monkeypatch, tmp_path):
    params = yaml.safe_load((study / "params.yaml").read_text())
    params["prompts"]["items"]["b"]["experiments"] = [{"name": "s", "kind": "swap", "source": [{"pos": -1}]}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="prompts.items.b.experiments: .*needs target features"):
        intervene.main(["--prompt-id", "b"])


def test_a_pruned_graph_without_the_target_row_asks_for_a_rerun_of_prune(study, monkeypatch, tmp_path):
    import numpy as np

    shutil.copy(study / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "results" / "b").mkdir(parents=True)
    with np.load(study / "results" / "b" / "pruned.npz") as z:
        arrays = {k: z[k] for k in z.files if k not in ("target_feature_edges", "target_vector")}
    np.savez(tmp_path / "results" / "b" / "pruned.npz", **arrays)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no target_feature_edges .*dvc repro -f prune@b"):
        intervene.main(["--prompt-id", "b"])
    assert not (tmp_path / "results" / "b" / "report").exists()


def _compose(conf: Path, out: Path, overrides: list[str]) -> str:
    from dvc.utils.hydra import compose_and_dump

    register_configs()
    compose_and_dump(out, str(conf), None, "config", str(ROOT / "stages"), overrides)
    return out.read_text()


def _messages(exc):
    while exc is not None:
        yield str(exc)
        exc = exc.__cause__ or exc.__context__


@pytest.mark.parametrize(
    "override, names",
    [
        ("intervention.top_kk=3", "intervention.top_kk"),
        ("intervention.top_k=many", "intervention.top_k"),
        ("intervention=no_such_choice", "intervention/no_such_choice"),
    ],
)
def test_intervention_typos_fail_at_composition_naming_the_key(tmp_path, override, names):
    with pytest.raises(Exception) as info:
        _compose(ROOT / "conf", tmp_path / "params.yaml", [override])
    assert names in " ".join(_messages(info.value))


def test_experiment_key_typo_in_the_prompt_set_fails_at_composition(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    path = conf / "prompts" / "organism_small.yaml"
    text = path.read_text()
    assert "expected_after:" in text
    path.write_text(text.replace("expected_after:", "expected_aftr:", 1))
    with pytest.raises(Exception) as info:
        _compose(conf, tmp_path / "params.yaml", ["prompts=organism_small"])
    assert "expected_aftr" in " ".join(_messages(info.value))


def test_unknown_experiment_kind_fails_when_loaded(tmp_path):
    out = tmp_path / "params.yaml"
    _compose(ROOT / "conf", out, ["prompts=organism_small"])
    params = yaml.safe_load(out.read_text())
    params["prompts"]["items"]["two_hop_dallas_en"]["experiments"][0]["kind"] = "flip"
    out.write_text(yaml.safe_dump(params))
    with pytest.raises((ConfigError, ValueError), match="kind must be one of"):
        load_config(out)


def test_default_prompt_sets_have_the_organism_experiments():
    """The default organism prompts carry the paper's recipes on graph-selected features: every
    prompt with a city a constrained state swap at the city (its own state's circuit features
    x-4, a labeled donor's x10), every toy-language prompt the open-ended x-2 steer of its
    toy-language features measured on the continuation; no experiment names positions."""
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.intervention.top_k > 0 and cfg.intervention.n_random >= 100
    labeled = {p.prompt for p in cfg.prompts.items.values()} | {
        p["prompt"] for p in make_world(cfg.organism.world).labeled_prompts()
    }
    for pid, item in cfg.prompts.items.items():
        tags = dict(t.split("=", 1) for t in item.tags)
        kinds = {e.group: e for e in item.experiments}
        assert ("state_swap" in kinds) == ("city" in tags), pid
        assert ("language_steer" in kinds) == (item.language == "toy"), pid
        for e in item.experiments:
            assert e.expected_before == item.answer, (pid, e.name)
            # features named by rules, never by index
            assert all(isinstance(x, dict) and x["select"] in ("selective", "contrast") for x in e.source + e.target), (
                pid,
                e.name,
            )
        if "state_swap" in kinds:
            e = kinds["state_swap"]
            assert (e.source_factor, e.target_factor, e.constrained_layers) == (-4, 10, [0])
            assert e.source[0]["role"] == e.target[0]["role"] == "city" and e.source[0]["in_graph"]
            assert e.source[0]["select"] == e.target[0]["select"] == "contrast"  # what tells the states apart
            donor = cfg.prompts.items[e.donor].prompt if e.donor else e.donor_prompt
            assert donor in labeled and e.expected_after, (pid, e.name)
        if "language_steer" in kinds:
            e = kinds["language_steer"]
            assert (e.source_factor, e.open_ended, e.expected_language) == (-2, True, "en")
            # the toy-language features active on the prompt (the pruned circuit keeps too few of
            # the tag's features to steer: docs/interventions.md)
            assert e.source[0] == {"select": "selective", "label": "language", "value": "toy", "role": "any"}
