"""The DVC + Hydra pipeline, with real DVC and Hydra.

Fast tests check the configuration: the committed params.yaml is DVC's composition of conf/,
bad overrides fail at composition naming the key, the schema mirrors the library's config
classes, the default prompt set is the organism world's. Slow tests build a temporary git
repository holding conf/, stages/, pipeline/ and dvc.yaml, compose the tiny configuration
(``experiment=tiny``: a tiny organism, three prompts) and run ``dvc`` in subprocesses.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dvc.utils.hydra import compose_and_dump  # noqa: E402

from pipeline.run.compose import ConfigError, load_config, register_configs  # noqa: E402

TINY = ["experiment=tiny"]
PROMPTS = ("two_hop_dallas_en", "capital_texas_en", "state_dallas_toy")
PER_PROMPT = ("tokenize", "capture", "attribute", "prune", "qk", "export", "intervene")
AFTER_PRUNE = ("prune", "qk", "export", "intervene")  # what a pruning parameter reruns
#: stages over all prompts: dashboards (before export), selectivity (before intervene) and the
#: interventions' summary (after)
GLOBAL = ("split_params", "features", "selectivity", "intervene_summary")
#: rerun by any change of params.yaml (cheap; its unchanged files keep the stages below idle)
#: and by any change of prompt results, respectively
ALWAYS = {"split_params", "intervene_summary"}


def dvc_compose(out: Path, overrides: list[str], conf: Path = ROOT / "conf") -> str:
    """Compose exactly as ``dvc exp run`` does (DVC's own function), return the text."""
    register_configs()  # the plugin scan imports it only once per process
    compose_and_dump(out, str(conf), None, "config", str(conf.parent / "stages"), overrides)
    return out.read_text()


# ------------------------------------------------------------------------------------ fast
def test_committed_params_equal_composition_of_conf(tmp_path):
    assert dvc_compose(tmp_path / "params.yaml", []) == (ROOT / "params.yaml").read_text()


def test_committed_split_params_equal_the_split_of_params_yaml(tmp_path, monkeypatch):
    """data/params is committed (a `cache: false` output, so `dvc params diff` compares it
    with HEAD): it must be what split_params writes from the committed params.yaml."""
    from stages import split_params

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    split_params.main([])
    committed = ROOT / "data" / "params"
    written = tmp_path / "data" / "params"
    names = sorted(str(p.relative_to(written)) for p in written.rglob("*.json"))
    assert names == sorted(str(p.relative_to(committed)) for p in committed.rglob("*.json"))
    for name in names:
        assert (written / name).read_bytes() == (committed / name).read_bytes(), name


@pytest.mark.parametrize(
    "override, names",
    [
        ("attribution.batch_sise=3", "attribution.batch_sise"),
        ("attribution.batch_size=abc", "attribution.batch_size"),
        ("pruning.node_threshold=high", "pruning.node_threshold"),
        ("prompts=no_such_set", "prompts/no_such_set"),
        ("model=no_such_model", "model/no_such_model"),
        ("transcoders=no_such_set", "transcoders/no_such_set"),
    ],
)
def test_bad_override_fails_at_composition_naming_the_key(tmp_path, override, names):
    with pytest.raises(Exception) as info:
        dvc_compose(tmp_path / "params.yaml", [override])
    text = " ".join(str(e) for e in _chain(info.value))
    assert names in text
    assert not (tmp_path / "params.yaml").exists()


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_added_unknown_key_fails_when_a_stage_loads_it(tmp_path):
    # `+key=value` asks Hydra to add a key; the schema then refuses it at load time
    path = tmp_path / "params.yaml"
    dvc_compose(path, ["+attribution.batch_sise=3"])
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(path)


def test_real_model_choice_brings_its_transcoders(tmp_path):
    cfg = yaml.safe_load(dvc_compose(tmp_path / "p.yaml", ["model=gemma-2-2b"]))
    assert cfg["transcoders"]["source"] == "mntss/gemma-scope-transcoders"
    cfg = yaml.safe_load(dvc_compose(tmp_path / "p.yaml", ["model=gemma-2-2b", "transcoders=gemma_clt_426k"]))
    assert cfg["transcoders"]["source"] == "mntss/clt-gemma-2-2b-426k"


def test_missing_required_value_is_named_when_loaded(tmp_path):
    path = tmp_path / "params.yaml"
    dvc_compose(path, ["transcoders=local"])
    with pytest.raises(ConfigError, match="transcoders.source"):
        load_config(path)


@pytest.mark.parametrize("part", ["world", "model", "train", "plt", "clt"])
def test_organism_schema_is_the_librarys_configs_at_their_defaults(part):
    """The schema's organism nodes are the library's config classes (less the training
    ``threads``, which come from runtime.threads), and the committed params.yaml holds the
    library's defaults (``pipeline.organism.OrganismConfig``)."""
    from pipeline.organism.build import OrganismConfig

    lib = getattr(OrganismConfig(), part)
    composed = getattr(load_config(ROOT / "params.yaml").organism, part)
    assert isinstance(lib, type(composed))
    assert dataclasses.asdict(composed) == {k: v for k, v in dataclasses.asdict(lib).items() if k != "threads"}


def test_default_prompt_set_is_the_organism_worlds():
    from pipeline.organism.world import make_world

    cfg = load_config(ROOT / "params.yaml")
    world = make_world(cfg.organism.world)
    expected = {p["id"]: p for p in world.prompt_set()}
    assert list(cfg.prompts.items) == list(expected)
    for pid, p in cfg.prompts.items.items():
        assert (p.prompt, p.answer, p.kind, p.language, p.tags) == (
            expected[pid]["prompt"],
            expected[pid]["answer"],
            expected[pid]["kind"],
            expected[pid]["language"],
            expected[pid]["tags"],
        )


GLOBAL_PARAMS = "data/params/global.json"
PROMPT_PARAMS = "data/params/prompts/${key}.json"


def stage_params(body: dict) -> dict[str, list[str]]:
    """A stage's ``params:`` as {params file: [keys]} (a bare key is from params.yaml)."""
    out: dict[str, list[str]] = {}
    for entry in body.get("params", []):
        if isinstance(entry, str):
            out.setdefault("params.yaml", []).append(entry)
        else:
            for file, keys in entry.items():
                out.setdefault(file, []).extend(keys or [])
    return out


def test_dvc_yaml_stage_params_exist_in_params():
    """Every params key a stage lists resolves in params.yaml (a typo would make DVC fail), and
    comes from split_params's file that holds it: a prompt's own keys from its prompt file,
    the rest from global.json; only split_params (all of it) and intervene_summary (every
    prompt) parse params.yaml itself."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stage_params(stages["split_params"]) == {"params.yaml": []}
    assert stage_params(stages["intervene_summary"]) == {"params.yaml": ["prompts"]}
    first = next(iter(params["prompts"]["items"]))
    for name, stage in stages.items():
        body = stage.get("do", stage)
        for file, keys in stage_params(body).items():
            assert file in ("params.yaml", GLOBAL_PARAMS, PROMPT_PARAMS), f"{name}: {file}"
            if name not in ("split_params", "intervene_summary"):
                assert file != "params.yaml", f"{name} parses all of params.yaml"
            for key in keys:
                assert key.startswith("prompts.items.${key}.") == (file == PROMPT_PARAMS), f"{name}: {key}"
                node = params
                for part in key.replace("${item}", "plt").replace("${key}", first).split("."):
                    assert isinstance(node, dict) and part in node, f"{name}: params key {key}"
                    node = node[part]


def test_split_params_writes_params_yaml_per_prompt_and_global(tmp_path, monkeypatch):
    """data/params holds params.yaml's values (as every stage loads them) under the same keys:
    global.json all but the prompts' items, prompts/<id>.json one prompt each; rewriting
    gives the same bytes; a schema error fails before anything is written."""
    from omegaconf import OmegaConf

    from stages import split_params

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    split_params.main([])
    params = OmegaConf.to_container(OmegaConf.load(tmp_path / "params.yaml"))
    out = tmp_path / "data" / "params"
    glob = json.loads((out / "global.json").read_text())
    assert glob == {**params, "prompts": {"name": params["prompts"]["name"]}}
    files = sorted(p.name for p in (out / "prompts").iterdir())
    assert files == sorted(f"{pid}.json" for pid in params["prompts"]["items"])
    for pid, item in params["prompts"]["items"].items():
        assert json.loads((out / "prompts" / f"{pid}.json").read_text()) == {"prompts": {"items": {pid: item}}}
    before = {p: p.read_bytes() for p in out.rglob("*.json")}
    split_params.main([])
    assert {p: p.read_bytes() for p in out.rglob("*.json")} == before
    bad = yaml.safe_load((tmp_path / "params.yaml").read_text())
    bad["pruning"]["node_threshold"] = "high"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    shutil.rmtree(out)
    with pytest.raises(ConfigError, match="node_threshold"):
        split_params.main([])
    assert not out.exists()


def test_tokenize_stage_tokenizer_refuses_unknown_words_unless_allowed(tiny_gpt2_dir):
    """The tokenize stage applies attribution.allow_unknown_tokens: a misspelt word is an error
    naming it, not a silent <unk> in every later stage."""
    from pipeline.engine.tokens import PromptError, PromptTokenizer

    tok = PromptTokenizer(str(tiny_gpt2_dir))
    with pytest.raises(PromptError, match=r"does not know the prompt's word 'Austn' \(tokenized as <unk>\)"):
        tok.tokenize("the Austn river")
    ids = tok.tokenize("the Austn river", allow_unknown_tokens=True)
    assert ids.tolist().count(tok.tokenizer.unk_token_id) == 1


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir", "gpt2_adds_bos"])
def test_tokenize_stage_tokenizer_gives_the_replacement_models_ids(fixture, request, plt_dir, tmp_path):
    """The tokenize stage reads only the tokenizer and config, yet gives the ids (BOS handling,
    errors) of ``ReplacementModel.tokenize``, for tokenizers that add BOS and ones that do not."""
    from pipeline import testing
    from pipeline.engine.replacement import ReplacementModel
    from pipeline.engine.tokens import PromptError, PromptTokenizer

    if fixture == "gpt2_adds_bos":
        model_dir = testing.make_tiny_gpt2(tmp_path / "gpt2_bos", n_layers=2, d_model=16, tokenizer_adds_bos=True)
    else:
        model_dir = request.getfixturevalue(fixture)
    tok = PromptTokenizer(str(model_dir))
    model = ReplacementModel.from_pretrained(model_dir, plt_dir)
    for prompt in ("the a of is in and", "the", " river  lake "):
        assert tok.tokenize(prompt).tolist() == model.tokenize(prompt).cpu().tolist()
    assert tok.tokenize("the")[0].item() == model.tokenizer.bos_token_id
    assert tok.n_ctx == model.n_ctx
    for bad in ("", "   ", "the " * model.n_ctx):
        with pytest.raises(PromptError):
            tok.tokenize(bad)


def test_tokenize_stage_runs_without_the_transcoders(tiny_gpt2_dir, tmp_path, monkeypatch):
    """No transcoders on disk: the stage still writes the tokens (it never loads them)."""
    from safetensors.torch import load_file

    from stages import tokenize

    text = (ROOT / "params.yaml").read_text()
    params = yaml.safe_load(text)
    params["model"].update(name=str(tiny_gpt2_dir), dep=str(tiny_gpt2_dir))
    params["transcoders"].update(source=str(tmp_path / "absent"), dep=str(tmp_path / "absent"))
    params["prompts"]["items"] = {"p": {"prompt": "the river"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    tokenize.main(["--prompt-id", "p"])
    from pipeline.engine.tokens import PromptTokenizer

    expected = PromptTokenizer(str(tiny_gpt2_dir)).tokenize("the river").tolist()
    assert load_file("results/p/tokens.safetensors")["tokens"].tolist() == expected and len(expected) == 3


def test_tokenize_stage_deps_leave_out_the_transcoders():
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["tokenize"]["do"]
    assert "${transcoders.dep}" not in body["deps"] and "pipeline/transcoders" not in body["deps"]
    # of the attribution options only the one the stage applies (whether unknown words may pass)
    keys = [p for keys in stage_params(body).values() for p in keys]
    assert not any(p.startswith("transcoders") for p in keys)
    assert [p for p in keys if p.startswith("attribution")] == ["attribution.allow_unknown_tokens"]


def test_organism_training_saves_no_wall_time(tmp_path):
    """Same params -> byte-identical outputs: the wall time is returned (the stages log it) but
    never written into a saved metrics.json."""
    import json

    from pipeline.organism.config import ModelConfig, TrainConfig, TranscoderTrainConfig
    from pipeline.organism.train_model import train_model
    from pipeline.organism.train_transcoders import train_plt
    from pipeline.organism.world import WorldConfig, make_world

    world = make_world(WorldConfig(n_states=2, cities_per_state=3, held_out_per_state=1, seed=1))
    m = train_model(
        world,
        ModelConfig(n_layers=1, d_model=16, n_heads=2, n_ctx=16),
        TrainConfig(steps=3, batch_size=8, warmup_steps=1, threads=1),
        tmp_path / "model",
        progress=False,
    )
    t = train_plt(
        tmp_path / "model",
        world,
        TranscoderTrainConfig(d_transcoder=8, steps=3, batch_size=32, warmup_steps=1, threads=1),
        tmp_path / "plt",
        progress=False,
    )
    for returned, saved in ((m, tmp_path / "model" / "metrics.json"), (t, tmp_path / "plt" / "metrics.json")):
        assert returned["wall_time_s"] > 0
        assert not [k for k in json.loads(saved.read_text()) if "time" in k]


# The per-prompt chain run in-process on tiny fixtures (no DVC): tokenize -> attribute -> prune,
# features -> export (graph files and figures), in a temporary working directory.
@pytest.fixture(scope="module")
def stage_run(tmp_path_factory, tiny_gpt2_dir, plt_dir):
    import numpy as np

    from pipeline.testing import DEFAULT_WORDS
    from stages import attribute, export, features, prune, tokenize

    work = tmp_path_factory.mktemp("stage_run")
    rng = np.random.default_rng(0)
    corpus = work / "corpus.txt"
    corpus.write_text(
        "".join(" ".join(rng.choice(DEFAULT_WORDS, size=int(rng.integers(3, 12)))) + "\n" for _ in range(120))
    )
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(name=str(tiny_gpt2_dir), dep=str(tiny_gpt2_dir), revision=None)
    params["transcoders"].update(source=str(plt_dir), kind="plt", dep=str(plt_dir), revision=None)
    params["prompts"]["items"] = {"p": {"prompt": "the capital of the state is in"}}
    params["features"].update(source="file", corpus=str(corpus), dep=str(corpus), top_k=5, batch_tokens=256)
    params["runtime"]["threads"] = 1
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for stage in (tokenize, attribute, prune, features, export):
            stage.main(["--prompt-id", "p"] if stage is not features else [])
    finally:
        os.chdir(cwd)
    return work


def test_features_stage_writes_one_store_named_after_the_transcoders(stage_run):
    from pipeline.analysis.dashboards import Dashboards

    assert load_config(ROOT / "params.yaml").features.name == load_config(ROOT / "params.yaml").transcoders.kind
    stores = sorted(p.name for p in (stage_run / "data" / "dashboards").iterdir())
    assert stores == ["plt.zarr"]  # no partial checkpoint left behind
    dash = Dashboards.open(stage_run / "data" / "dashboards" / "plt.zarr")
    assert dash.n_layers == 2 and dash.config.top_k == 5 and dash.n_tokens > 0


def test_export_stage_labels_and_feature_files_come_from_the_dashboards(stage_run):
    from pipeline.analysis.dashboards import Dashboards, feature_json_bytes, graph_features

    dash = Dashboards.open(stage_run / "data" / "dashboards" / "plt.zarr")
    folder = stage_run / "results" / "p" / "graph"
    doc = json.loads((folder / "p.json").read_text())
    feats = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feats, "the tiny graph should keep some features"
    for node in feats:
        layer, feature, _ = (int(v) for v in node["node_id"].split("_"))
        assert node["clerp"] == dash.label(layer, feature) != ""
    assert sorted(p.name for p in folder.iterdir()) == ["features", "graph-metadata.json", "p.json"]
    pairs = graph_features(doc)
    assert sorted(p.name for p in (folder / "features").iterdir()) == sorted(f"{l}_{f}.json" for l, f in pairs)
    for l, f in pairs:
        assert (folder / "features" / f"{l}_{f}.json").read_bytes() == feature_json_bytes(dash.feature(l, f))


def test_export_stage_draws_the_pruned_graph_deterministically(stage_run):
    from pipeline.analysis.figures import draw_graph, render_graph
    from stages import export

    run = stage_run / "results" / "p"
    kept = json.loads((run / "scores.json").read_text())["kept_nodes"]
    assert draw_graph(run / "graph" / "p.json").n_nodes == kept
    before = {ext: (run / f"graph.{ext}").read_bytes() for ext in ("png", "svg")}
    assert before == render_graph(run / "graph" / "p.json")
    graph_json = (run / "graph" / "p.json").read_bytes()
    cwd = os.getcwd()
    os.chdir(stage_run)
    try:
        export.main(["--prompt-id", "p"])
    finally:
        os.chdir(cwd)
    assert {ext: (run / f"graph.{ext}").read_bytes() for ext in ("png", "svg")} == before
    assert (run / "graph" / "p.json").read_bytes() == graph_json


def test_export_stage_takes_the_attention_file_when_present(stage_run):
    """results/<id>/attention/attention.json (the qk stage's) goes into the graph JSON's optional
    fields and the figure's panel; removed again, the export is byte for byte what it was."""
    from stages import export

    run = stage_run / "results" / "p"
    files = [run / "graph" / "p.json", run / "graph.png", run / "graph.svg"]
    before = [f.read_bytes() for f in files]
    doc = json.loads(before[0])
    n_layers = next(int(n["layer"]) for n in doc["nodes"] if n["feature_type"] == "logit") - 1
    links = sorted(doc["links"], key=lambda lk: -abs(lk["weight"]))[:2]
    ref = {"kind": "token", "layer": None, "pos": 0, "feature": None, "node_id": None, "label": "token p0"}
    attention = {
        "format": "circuit-pipeline/attention",
        "version": 1,
        "n_layers": n_layers,
        "n_heads": 2,
        "config": {"edges": 2, "heads": 1, "terms": 1, "expand_attention": False},
        "edges": [
            {**{k: lk[k] for k in ("source", "target", "weight")}, "edge": lk["weight"], "layers": []} for lk in links
        ],
        "heads": [
            {
                "layer": 0,
                "head": 1,
                "loading": 0.5,
                "edges": [0],
                "query_pos": 0,
                "key_pos": 0,
                "pattern": 1.0,
                "score": 0.25,
                "terms_sum": 0.25,
                "terms": [{"query": ref, "key": ref, "value": 0.25}],
                "query_marginals": [{"node": ref, "value": 0.25}],
                "key_marginals": [{"node": ref, "value": 0.25}],
            }
        ],
    }
    path = export.attention_path("p")
    assert path == Path("results") / "p" / "attention" / "attention.json"
    (stage_run / path).parent.mkdir(parents=True)
    (stage_run / path).write_text(json.dumps(attention))
    cwd = os.getcwd()
    os.chdir(stage_run)
    try:
        export.main(["--prompt-id", "p"])
        with_attention = json.loads(files[0].read_text())
        after = [f.read_bytes() for f in files]
        (stage_run / path).unlink()
        export.main(["--prompt-id", "p"])
    finally:
        os.chdir(cwd)
        (stage_run / path).unlink(missing_ok=True)
    carried = [(lk["source"], lk["target"]) for lk in with_attention["links"] if "head_loadings" in lk]
    assert sorted(carried) == sorted((lk["source"], lk["target"]) for lk in links)
    assert [h["edges"] for h in with_attention["attention_heads"]["heads"]] == [
        [[links[0]["source"], links[0]["target"]]]
    ]
    assert all(a != b for a, b in zip(after, before))  # graph JSON and both figures (the panel)
    assert [f.read_bytes() for f in files] == before


def test_dvc_yaml_features_export_intervene_dependencies():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    feat = stages["features"]
    for dep in ("${model.dep}", "${transcoders.dep}", "${features.dep}", "pipeline/analysis/dashboards"):
        assert dep in feat["deps"]
    assert stage_params(feat) == {GLOBAL_PARAMS: ["features", "model", "transcoders", "runtime"]}  # not attribution...
    assert feat["outs"] == ["data/dashboards/${features.name}.zarr"]
    export = stages["export"]["do"]
    assert (
        "data/dashboards/${features.name}.zarr" in export["deps"]
        and "features.name" in stage_params(export)[GLOBAL_PARAMS]
    )
    assert "pipeline/analysis/figures.py" in export["deps"]
    assert export["outs"] == ["results/${key}/graph", "results/${key}/graph.png", "results/${key}/graph.svg"]
    assert "figures" not in stages  # drawn by export: one stage less per prompt for a no-op repro
    # intervene predicts from the full target row pruned.npz carries, not from the graph store
    assert not any("graph.zarr" in d for d in stages["intervene"]["do"]["deps"])
    # its selection rules read the selectivity table, counted on the world's labeled prompts
    sel = stages["selectivity"]
    assert sel["outs"] == ["data/selectivity/${selectivity.name}.npz"]
    assert {"${model.dep}", "${transcoders.dep}", "${selectivity.world}"} <= set(sel["deps"])
    assert "selectivity" in stage_params(sel)[GLOBAL_PARAMS]
    assert {"data/selectivity/${selectivity.name}.npz", "${selectivity.world}"} <= set(
        stages["intervene"]["do"]["deps"]
    )


# ------------------------------------------------------------------------------------ slow
def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("PYTHONPATH", None)
    return env


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=_env(), capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def ran(proc: subprocess.CompletedProcess) -> set[str]:
    """Stages whose command ran (not skipped, not restored from the run cache)."""
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout))


def lock_outs(repo: Path) -> dict[str, str]:
    """{out path: md5} from dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}


def per_prompt(pid: str, stages=PER_PROMPT) -> set[str]:
    return {f"{s}@{pid}" for s in stages}


def set_params(repo: Path, overrides: list[str]) -> None:
    dvc_compose(repo / "params.yaml", TINY + overrides, conf=repo / "conf")


def restore(repo: Path) -> None:
    """Back to the tiny baseline: conf/ and params.yaml as committed, outputs from the cache."""
    subprocess.run(["git", "checkout", "--", "conf", "params.yaml"], cwd=repo, check=True)
    dvc(repo, "repro")
    assert "Data and pipelines are up to date" in dvc(repo, "status").stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git repo with the pipeline, the tiny config composed into params.yaml, reproduced once."""
    repo = tmp_path_factory.mktemp("study")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("conf", "stages", "pipeline"):
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(ROOT / ".dvc" / ".gitignore", repo / ".dvc" / ".gitignore")
    (repo / ".gitignore").write_text("__pycache__/\n/tmp/\n")
    set_params(repo, [])
    for cmd in (
        ["init", "-q"],
        ["config", "user.name", "test"],
        ["config", "user.email", "test@example.com"],
        ["add", "-A"],
        ["commit", "-q", "-m", "tiny study"],
    ):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    first = dvc(repo, "repro")
    expected = {"organism_world", "organism_model", "organism_transcoders@plt", "organism_transcoders@clt"}
    expected |= {s for pid in PROMPTS for s in per_prompt(pid)} | set(GLOBAL)
    assert ran(first) == expected
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "reproduced"], cwd=repo, check=True)
    return repo


@pytest.mark.slow
def test_second_repro_recomputes_nothing(repo):
    t0 = time.perf_counter()
    proc = dvc(repo, "repro")
    wall = time.perf_counter() - t0
    assert ran(proc) == set()
    assert "Data and pipelines are up to date" in proc.stdout
    assert "Data and pipelines are up to date" in dvc(repo, "status").stdout
    print(f"no-op dvc repro: {wall:.1f}s")


@pytest.mark.slow
def test_editing_one_prompt_reruns_only_that_prompts_stages(repo):
    conf = repo / "conf" / "prompts" / "organism_small.yaml"
    conf.write_text(conf.read_text().replace("prompt: lingvo Dallas is in", "prompt: lingvo Dallas is a city in"))
    set_params(repo, [])
    proc = dvc(repo, "repro")
    assert ran(proc) - ALWAYS == per_prompt("state_dallas_toy")
    restore(repo)


@pytest.mark.slow
def test_pruning_param_reruns_prune_and_export_not_attribution(repo):
    set_params(repo, ["pruning.node_threshold=0.7"])
    proc = dvc(repo, "repro")
    assert ran(proc) - ALWAYS == {s for pid in PROMPTS for s in per_prompt(pid, AFTER_PRUNE)}
    restore(repo)


@pytest.mark.slow
def test_attribution_param_reruns_attribution(repo):
    set_params(repo, ["attribution.max_n_logits=3"])
    changed = set(re.findall(r"^(\S+):$", dvc(repo, "status").stdout, re.M))
    assert changed == {"split_params"}  # params.yaml changed; its split files are not rewritten yet
    assert ran(dvc(repo, "repro", "split_params")) == {"split_params"}
    changed = set(re.findall(r"^(\S+):$", dvc(repo, "status").stdout, re.M))
    assert changed == {f"attribute@{pid}" for pid in PROMPTS}  # and nothing upstream
    pid = PROMPTS[0]
    proc = dvc(repo, "repro", f"export@{pid}")  # one prompt's chain is enough to see it rerun
    assert f"attribute@{pid}" in ran(proc)
    restore(repo)


@pytest.mark.slow
def test_exp_run_applies_override_through_hydra(repo):
    proc = dvc(repo, "exp", "run", "-S", "experiment=tiny", "-S", "pruning.edge_threshold=0.9")
    assert ran(proc) - ALWAYS == {s for pid in PROMPTS for s in per_prompt(pid, AFTER_PRUNE)}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["pruning"]["edge_threshold"] == 0.9
    assert params["prompts"]["name"] == "organism_small"  # the whole of conf/ was composed
    shown = dvc(repo, "exp", "show", "--json").stdout
    assert '"edge_threshold": 0.9' in shown
    bad = dvc(repo, "exp", "run", "-S", "experiment=tiny", "-S", "attribution.batch_sise=3", check=False)
    assert bad.returncode != 0 and "attribution.batch_sise" in bad.stdout + bad.stderr
    restore(repo)


@pytest.mark.slow
def test_killed_stage_leaves_no_finished_output_and_rerun_completes(repo):
    pid = "two_hop_dallas_en"
    stage, out = f"attribute@{pid}", repo / "results" / pid / "graph.zarr"
    set_params(repo, ["attribution.batch_size=4"])  # many small batches: time to kill it
    progress = repo / "tmp" / "partial" / pid / "graph.zarr" / "progress"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", stage],
        cwd=repo,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (progress.is_dir() and any(progress.glob("*.json"))):
            assert proc.poll() is None, "the stage ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert stage in dvc(repo, "status", stage).stdout  # DVC does not take it as finished
    resumed = dvc(repo, "repro", stage)
    assert ran(resumed) == {stage} and "resuming" in resumed.stdout
    from pipeline.graph.store import Graph

    Graph.open(out).verify()
    restore(repo)


@pytest.mark.slow
def test_rerunning_stages_gives_byte_identical_outputs(repo):
    before = lock_outs(repo)
    pid = "capital_texas_en"
    stages = ["organism_model", "organism_transcoders@plt", f"capture@{pid}", f"attribute@{pid}"]
    proc = dvc(repo, "repro", "--force", "--single-item", *stages)
    try:
        assert ran(proc) == set(stages)
        assert lock_outs(repo) == before
        assert "Data and pipelines are up to date" in dvc(repo, "status").stdout
    except AssertionError:
        dvc(repo, "repro")  # other bytes leave later stages stale: bring them up to date for the next tests
        raise


@pytest.mark.slow
def test_a_clone_pulls_the_study_from_the_remote(repo, tmp_path):
    remote = tmp_path / "remote"
    dvc(repo, "remote", "modify", "--local", "local", "url", str(remote))
    dvc(repo, "push")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "study"], cwd=repo, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    dvc(clone, "remote", "modify", "--local", "local", "url", str(remote))
    dvc(clone, "pull")
    assert "Data and pipelines are up to date" in dvc(clone, "status").stdout
    assert (clone / "results" / PROMPTS[0] / "graph" / f"{PROMPTS[0]}.json").is_file()


# ----------------------------------------------------------------------- code dependencies
def _module_file(module: str) -> Path | None:
    """The repository file of a ``pipeline.*`` / ``stages.*`` module (None for anything else)."""
    if module.split(".")[0] not in ("pipeline", "stages"):
        return None
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Every module an AST imports (at any depth: a function's imports run when it is called),
    with ``from x import y`` also yielding ``x.y`` in case ``y`` is a submodule."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _has_code(path: Path) -> bool:
    """Whether a module holds more than a docstring."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def _code_closure(files: list[Path]) -> set[Path]:
    """The repository files that importing ``files`` executes: their imports, transitively,
    with every parent package's ``__init__.py``."""
    seen: set[Path] = set()
    todo = list(files)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = ".".join(parts if path.name == "__init__.py" else parts[:-1])
        for i in range(1, len(parts)):
            init = ROOT.joinpath(*parts[:i], "__init__.py")
            if init.is_file():
                todo.append(init)
        if path.name == "__init__.py" and not _has_code(path):
            seen.discard(path)  # an empty package marker runs nothing
        for module in _imported_modules(ast.parse(path.read_text(encoding="utf-8")), package):
            found = _module_file(module)
            if found is not None:
                todo.append(found)
    return seen


def _stage_entry(cmd: str) -> list[Path]:
    """The code a stage's command runs: ``python -m stages X`` -> stages/X.py (stages/__main__.py
    only launches it, in this process or a warm fork: stages/_warm.py);
    ``circuit-pipeline SUB`` -> what the CLI module imports at its top and in its ``cmd_SUB``
    (pipeline/run/cli.py itself is checked apart: it holds every subcommand)."""
    if m := re.search(r"python -m stages (\w+)", cmd):
        return [_module_file(f"stages.{m.group(1)}")]
    m = re.search(r"circuit-pipeline(?: -q)? (\w+)", cmd)
    assert m, f"unknown stage command {cmd!r}"
    cli = ROOT / "pipeline" / "run" / "cli.py"
    tree = ast.parse(cli.read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    sub = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == f"cmd_{m.group(1)}"]
    assert sub, f"no cmd_{m.group(1)} in {cli}"
    modules = _imported_modules(ast.Module(body=top + sub, type_ignores=[]), "pipeline.run")
    return [f for f in map(_module_file, modules) if f is not None]


@pytest.mark.parametrize("dvc_file", ["dvc.yaml", "studies/dvc.yaml"])
def test_every_stage_lists_the_code_it_runs(dvc_file):
    """A stage reruns when code it runs changes only if dvc.yaml lists that code: every
    repository module its command imports (transitively, function-level imports included) is a
    dep, itself or through a listed folder."""
    base = (ROOT / dvc_file).parent
    stages = yaml.safe_load((ROOT / dvc_file).read_text())["stages"]
    unlisted = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        deps = [(base / d).resolve() for d in body.get("deps", []) if "${" not in d]
        code = _code_closure(_stage_entry(body["cmd"]))
        if "circuit-pipeline" in body["cmd"]:
            code.add(ROOT / "pipeline" / "run" / "cli.py")
        missing = sorted(str(f.relative_to(ROOT)) for f in code if not any(f == d or d in f.parents for d in deps))
        if missing:
            unlisted[name] = missing
    assert not unlisted, f"{dvc_file}: stages run code they do not list as deps: {unlisted}"
