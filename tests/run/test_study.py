"""Batch studies: the real engines on a tiny study, reruns that skip work, launcher settings.

Each engine runs the same tiny study (the conftest's tiny GPT-2 and ReLU PLT): three good
prompts, one longer than the model's context (fails when the study plans it) and one whose
logit target is two tokens (fails inside its job). The good prompts must finish, the bad
ones be reported with their reason, and a rerun must recompute nothing.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import testing
from pipeline.analysis.study_files import graph_done, load_study
from pipeline.engine.options import AttributionConfig
from pipeline.graph.pruned import load_pruned_graph
from pipeline.graph.store import Graph
from pipeline.run import launchers
from pipeline.run import study as S
from pipeline.run.cli import main
from pipeline.run.compose import ConfigError, compose_study
from pipeline.run.config import LauncherConfig, PruningSpec
from pipeline.run.launchers import LauncherError, submitit_executor
from pipeline.run.prompt_sets import PromptSetError, prompt_set_from_records
from pipeline.run.study import StudySettings, run_study

ROOT = Path(__file__).resolve().parents[2]
GOOD = ("p0", "p1", "p2")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def words(tiny_gpt2_dir):
    return testing.vocabulary_words(tiny_gpt2_dir)


@pytest.fixture(scope="module")
def tiny_set(words):
    recs = [{"id": f"p{i}", "prompt": " ".join(words[3 * i : 3 * i + 5]), "tags": [f"i={i}"]} for i in range(3)]
    recs.append({"id": "too_long", "prompt": " ".join(words[:40])})  # 41 tokens > n_ctx 32
    recs.append({"id": "bad_target", "prompt": " ".join(words[20:24]), "logit_targets": ["the capital"]})
    return prompt_set_from_records(recs, "tiny")


@pytest.fixture(scope="module")
def settings(tiny_gpt2_dir, plt_dir):
    return StudySettings(
        model=str(tiny_gpt2_dir), transcoders=str(plt_dir), attribution=AttributionConfig(batch_size=32)
    )


def load_launcher(name: str, *overrides: str) -> LauncherConfig:
    """``conf/launcher/<name>.yaml`` with ``launcher.KEY=VALUE`` overrides, as a study composes it."""
    cfg, _ = compose_study([f"launcher={name}", *(f"launcher.{o}" for o in overrides)])
    return cfg.launcher


def _by_id(result):
    return {p.id: p for p in result.prompts}


def _check_tiny_outcome(result, out: Path):
    st = _by_id(result)
    assert all(st[i].status in ("done", "skipped") for i in GOOD), result.table()
    assert st["too_long"].status == "failed" and "41 tokens" in st["too_long"].reason
    assert "context is 32" in st["too_long"].reason and st["too_long"].key is None
    assert st["bad_target"].status == "failed" and "2 tokens" in st["bad_target"].reason
    doc = load_study(out)
    graphs = Path(doc["graphs_dir"])
    for i in GOOD:
        key_dir = graphs / st[i].key
        done = graph_done(key_dir, {"node_threshold": 0.8, "edge_threshold": 0.98})
        assert done is not None and done["key"] == st[i].key
        assert Graph.open(key_dir / "graph.zarr").fingerprint.startswith(st[i].key)
        assert (out / "viewer" / f"{i}.json").is_file()
    assert graph_done(graphs / st["bad_target"].key) is None  # a failed job's outputs never count
    index = json.loads((out / "viewer" / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == list(GOOD)
    assert doc["counts"]["failed"] == 2
    table = result.table()
    for i in ("too_long", "bad_target"):
        assert i in table
    assert "--only too_long,bad_target" in result.rerun_command


# ------------------------------------------------------------------------------------ engines
def test_sequential_study_finishes_good_prompts_and_reports_bad_ones(tmp_path, tiny_set, settings):
    out = tmp_path / "study"
    result = run_study(
        tiny_set,
        settings,
        out,
        LauncherConfig(name="sequential", threads=1),
        command=["circuit-pipeline", "study", "--out", str(out)],
        log=None,
    )
    _check_tiny_outcome(result, out)
    assert {p.id: p.status for p in result.prompts if p.id in GOOD} == dict.fromkeys(GOOD, "done")


@pytest.mark.parametrize("start_method", [None, pytest.param("spawn", marks=pytest.mark.slow)])
def test_local_process_pool_runs_the_study(tmp_path, tiny_set, settings, start_method):
    # None: fork on Linux (workers inherit the planning model); spawn: each worker loads it
    out = tmp_path / "study"
    result = run_study(
        tiny_set,
        settings,
        out,
        LauncherConfig(name="local", jobs=2, threads=1, start_method=start_method),
        command=["circuit-pipeline", "study"],
        log=None,
    )
    _check_tiny_outcome(result, out)


def test_a_worker_that_dies_fails_only_its_own_prompt(tmp_path, tiny_set, settings, monkeypatch):
    # fork: the workers inherit this patch; the job of p1 kills its worker process outright
    import os

    real = S._compute_key

    def crash_on_p1(model, item, *a):
        if item.prompt_id == "p1":
            os._exit(3)
        return real(model, item, *a)

    monkeypatch.setattr(S, "_compute_key", crash_on_p1)
    out = tmp_path / "study"
    result = run_study(
        tiny_set.subset(GOOD),
        settings,
        out,
        LauncherConfig(name="local", jobs=2, threads=1, start_method="fork"),
        log=None,
    )
    st = _by_id(result)
    assert st["p1"].status == "failed" and "worker process died" in st["p1"].reason
    assert st["p0"].status == "done" and st["p2"].status == "done"


def test_submitit_local_executor_runs_the_study(tmp_path, tiny_set, settings):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install submitit)")
    out = tmp_path / "study"
    result = run_study(
        tiny_set,
        settings,
        out,
        LauncherConfig(name="submitit_local", jobs=1, threads=1, timeout_min=10),
        command=["circuit-pipeline", "study"],
        log=None,
    )
    _check_tiny_outcome(result, out)
    assert list((out / "submitit").glob("*_result.pkl")), "submitit wrote no job results"


@pytest.mark.slow
def test_ray_local_cluster_runs_the_study(tmp_path, tiny_set, settings):
    pytest.importorskip("ray", reason="ray is not installed (pip install ray)")
    out = tmp_path / "study"
    result = run_study(
        tiny_set,
        settings,
        out,
        LauncherConfig(name="ray", jobs=2, threads=1),
        command=["circuit-pipeline", "study"],
        log=None,
    )
    _check_tiny_outcome(result, out)


def test_submitit_slurm_without_sbatch_is_a_clear_error_before_any_work(tmp_path, tiny_set, settings, monkeypatch):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install submitit)")
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "sbatch" else real_which(name))
    out = tmp_path / "study"
    with pytest.raises(LauncherError, match="no `sbatch`") as info:
        run_study(tiny_set, settings, out, load_launcher("submitit_slurm"), log=None)
    assert "submitit_local" in str(info.value)
    assert not out.exists()  # nothing written


def test_slurm_settings_become_sbatch_options(tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install submitit)")
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}" if name in ("sbatch", "srun") else real_which(name)
    )
    cfg = load_launcher("submitit_slurm", "slurm.partition=a100", "slurm.account=lab", "timeout_min=90")
    ex = submitit_executor(cfg, tmp_path / "jobs", "slurm")
    text = ex._executor._make_submission_file_text("echo job", "uid")
    for line in (
        "#SBATCH --partition=a100",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --time=90",
        "#SBATCH --mem=32GB",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --account=lab",
    ):
        assert line in text, text


# ------------------------------------------------------------------------------------- GPUs
@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("ray", ["device=cuda", "ray_gpus_per_job=0"], "launcher.ray_gpus_per_job is 0 with launcher.device cuda"),
        ("submitit_slurm", ["slurm.gpus_per_node=0"], "launcher.slurm.gpus_per_node is 0 with launcher.device cuda"),
        ("submitit_slurm", ["device=cuda:1"], "submitit_slurm gives each job its own GPU, which the job sees as cuda"),
        ("local", ["device=gpu"], "launcher.device: device 'gpu' is not a device name"),
    ],
)
def test_gpu_settings_that_would_leave_jobs_without_their_gpu_are_refused(name, overrides, match):
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        load_launcher(name, *overrides)
    assert "\n" not in str(info.value)


def test_ray_reserves_one_gpu_per_cuda_job_unless_told_otherwise(monkeypatch):
    assert load_launcher("ray").gpus_per_job() == 0
    assert load_launcher("ray", "device=cuda").gpus_per_job() == 1
    assert load_launcher("ray", "device=cuda", "ray_gpus_per_job=0.5").gpus_per_job() == 0.5
    reserved = []

    class FakeRay:  # what _run_ray asks of Ray, recording the reservation
        def is_initialized(self):
            return True

        def remote(self, **options):
            reserved.append(options["num_gpus"])
            return lambda job: type("Remote", (), {"remote": staticmethod(lambda p: p)})

        def wait(self, pending, num_returns):
            return pending[:1], pending[1:]

        def get(self, ref):
            return ref

    monkeypatch.setattr(launchers, "_import_ray", FakeRay)
    cfg = load_launcher("ray", "device=cuda")
    assert list(launchers.launch(str, ["a"], cfg, Path("unused"))) == [("a", "a")]
    assert reserved == [1.0]


def test_submitit_local_jobs_of_a_cuda_study_see_this_machines_gpus(tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install submitit)")
    monkeypatch.setattr(launchers, "_gpu_count", lambda: 2)
    cuda = submitit_executor(load_launcher("submitit_local", "device=cuda"), tmp_path / "jobs", "local")
    assert cuda._executor.parameters["gpus_per_node"] == 2  # CUDA_VISIBLE_DEVICES=0,1 in each job
    cpu = submitit_executor(load_launcher("submitit_local"), tmp_path / "jobs", "local")
    assert "gpus_per_node" not in cpu._executor.parameters


def test_a_study_on_a_device_this_machine_lacks_fails_before_any_work(tmp_path, tiny_set, settings, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "study"
    for name in ("sequential", "local", "submitit_local"):
        with pytest.raises(LauncherError, match=f"launcher {name}: device 'cuda' asked for, but") as info:
            run_study(tiny_set, settings, out, LauncherConfig(name=name, device="cuda"), log=None)
        assert "\n" not in str(info.value) and not out.exists()


# ------------------------------------------------------------------------------------- reruns
def _files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


def test_rerun_skips_done_keys_and_recomputes_nothing(tmp_path, tiny_set, settings, monkeypatch):
    out = tmp_path / "study"
    seq = LauncherConfig(name="sequential", threads=1)
    good = tiny_set.subset(GOOD)
    first = run_study(good, settings, out, seq, log=None)
    assert [p.status for p in first.prompts] == ["done"] * 3
    before = _files(out / "graphs")

    def fail(*a, **k):
        raise AssertionError("a done key was computed again")

    monkeypatch.setattr(S, "_compute_key", fail)
    second = run_study(good, settings, out, seq, log=None)
    assert [p.status for p in second.prompts] == ["skipped"] * 3
    assert _files(out / "graphs") == before  # not one file rewritten


def test_adding_a_prompt_or_a_second_study_computes_only_new_keys(tmp_path, tiny_set, settings, words, monkeypatch):
    seq = LauncherConfig(name="sequential", threads=1)
    shared = tmp_path / "graphs"
    good = tiny_set.subset(GOOD)
    run_study(good, settings, tmp_path / "a", seq, graphs_dir=shared, log=None)
    computed = []
    real = S._compute_key
    monkeypatch.setattr(
        S, "_compute_key", lambda model, item, *a: computed.append(item.prompt_id) or real(model, item, *a)
    )
    grown = prompt_set_from_records(
        [
            *(r.to_dict() for r in good),
            {"id": "new", "prompt": " ".join(words[30:34])},
            {"id": "same_as_p0", "prompt": good["p0"].prompt},
        ],
        "grown",
    )
    result = run_study(grown, settings, tmp_path / "b", seq, graphs_dir=shared, log=None)
    assert computed == ["new"]
    st = _by_id(result)
    assert st["new"].status == "done" and st["same_as_p0"].key == st["p0"].key
    assert [st[i].status for i in (*GOOD, "same_as_p0")] == ["skipped"] * 4


def test_partial_outputs_of_a_killed_job_are_not_done_and_resume(tmp_path, tiny_set, settings):
    out = tmp_path / "study"
    seq = LauncherConfig(name="sequential", threads=1)
    one = tiny_set.subset(["p0"])
    first = run_study(one, settings, out, seq, log=None)
    key_dir = out / "graphs" / first.prompts[0].key
    (key_dir / "done.json").unlink()  # as if the job died after attribution
    (key_dir / "pruned.npz").unlink()
    assert graph_done(key_dir) is None
    again = run_study(one, settings, out, seq, log=None)
    assert again.prompts[0].status == "done" and graph_done(key_dir) is not None
    # changing only the pruning re-prunes the same graph store
    stamp = (key_dir / "graph.zarr" / "zarr.json").stat().st_mtime_ns
    other = dataclasses.replace(settings, pruning=PruningSpec(node_threshold=0.5))
    assert run_study(one, other, out, seq, log=None).prompts[0].status == "done"
    assert (key_dir / "graph.zarr" / "zarr.json").stat().st_mtime_ns == stamp
    assert load_pruned_graph(key_dir / "pruned.npz").result.node_threshold == 0.5


def test_only_runs_the_named_prompts_and_reports_the_rest(tmp_path, tiny_set, settings):
    out = tmp_path / "study"
    result = run_study(tiny_set, settings, out, LauncherConfig(name="sequential", threads=1), only=["p1"], log=None)
    assert {p.id: p.status for p in result.prompts} == {
        "p0": "pending",
        "p1": "done",
        "p2": "pending",
        "too_long": "failed",
        "bad_target": "pending",
    }
    with pytest.raises(PromptSetError, match="no_such"):
        run_study(tiny_set, settings, out, LauncherConfig(name="sequential"), only=["no_such"], log=None)


def test_study_command_prints_the_table_and_the_rerun_command(tmp_path, tiny_set, tiny_gpt2_dir, plt_dir, capsys):
    prompts = tmp_path / "tiny.jsonl"
    prompts.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in tiny_set.subset(["p0", "too_long"])))
    out = tmp_path / "study"
    argv = [
        "-q",
        "study",
        "--prompts",
        str(prompts),
        "--model",
        str(tiny_gpt2_dir),
        "--transcoders",
        str(plt_dir),
        "--out",
        str(out),
        "--launcher",
        "sequential",
        "--threads",
        "1",
        "--batch-size",
        "32",
    ]
    assert main(argv) == 1  # a prompt failed
    printed = capsys.readouterr().out
    assert "done 1, skipped 0, failed 1" in printed and "41 tokens" in printed
    rerun = next(line for line in printed.splitlines() if line.startswith("rerun only the failed ones:"))
    assert rerun.endswith("--only too_long") and "--batch-size 32" in rerun and "--threads 1" in rerun
    assert main(["-q", "aggregate", str(out), "--no-figures"]) == 0
    assert (out / "aggregate" / "aggregate.json").is_file()


# ------------------------------------------------------------------------------------ launchers
def test_study_command_takes_hydra_style_words(tmp_path, tiny_gpt2_dir, plt_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["-q", "study", "prompts=capitals", "launcher=submitit_slurm", "launcher.slurm.partition=gpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "no `sbatch`" in err and "\n" not in err.strip()  # the organism is the default model
    assert not (tmp_path / "studies").exists()
    prompts = tmp_path / "one.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "the capital of texas is"}) + "\n")
    rc = main(
        [
            "-q",
            "study",
            "launcher=sequential",
            "launcher.threads=1",
            "attribution.batch_size=32",
            "--prompts",
            str(prompts),
            "--model",
            str(tiny_gpt2_dir),
            "--transcoders",
            str(plt_dir),
        ]
    )
    assert rc == 0 and (tmp_path / "studies" / "one" / "study.json").is_file()
    assert load_study(tmp_path / "studies" / "one")["settings"]["attribution"]["batch_size"] == 32
    for bad, match in (
        (["prompts=capitals", "--prompts", "capitals"], "prompts given twice"),
        (["attribution.batch_size=8", "--batch-size", "16"], "attribution.batch_size given twice"),
        (["prompts=capitals", "colour=red"], "colour: Key 'colour' not in 'StudyConfig'"),
        (["prompts=capitals", "attribution.batch_sise=3"], "attribution.batch_sise"),
        (["prompts=capitals", "attribution.batch_size=many"], "attribution.batch_size: Value 'many'"),
        (["prompts=capitals", "model=no_such_model"], "conf/model has no 'no_such_model' (choices: gemma-2-2b"),
        (["prompts=no_such_set"], "conf/prompts has no 'no_such_set' (choices: capitals"),
    ):
        assert main(["-q", "study", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err, err


def test_study_composes_model_and_transcoders_as_dvc_exp_run_does():
    """The words are Hydra overrides of conf/study.yaml: a model choice brings its transcoders by
    its defaults list (the organism: config.yaml's organism_plt), a transcoders choice replaces
    them, and the composed config becomes the study's settings."""
    organism = StudySettings.from_config(compose_study(["model=organism"])[0])
    assert (organism.model, organism.transcoders) == ("models/organism/model", "models/organism/plt")
    assert organism.model_revision is None and organism.attribution == AttributionConfig()
    cfg, choices = compose_study(
        ["model=gemma-2-2b", "prompts=capitals", "attribution=large", "pruning.node_threshold=0.7"]
    )
    gemma = StudySettings.from_config(cfg)
    assert (gemma.model, gemma.transcoders, gemma.model_revision) == (
        "google/gemma-2-2b",
        "mntss/gemma-scope-transcoders",
        "main",
    )
    assert (gemma.dtype, gemma.attribution.max_feature_nodes, gemma.pruning.node_threshold) == ("bfloat16", 7500, 0.7)
    assert choices["prompts"] == "capitals" and cfg.prompts.name == "capitals" and cfg.launcher.name == "local"
    clt = compose_study(["model=gemma-2-2b", "transcoders=gemma_clt_426k"])[0]
    assert clt.transcoders.source == "mntss/clt-gemma-2-2b-426k"
    with pytest.raises(ConfigError, match=r"^attribution\.batch_sise: "):
        compose_study(["attribution.batch_sise=3"])
    with pytest.raises(ConfigError, match=r"^launcher\.jbos: "):
        compose_study(["+launcher.jbos=3"])  # added keys are refused too


def test_zero_bos_errors_of_a_study_reach_attribute(tmp_path, tiny_gpt2_dir, plt_dir, words):
    """attribution.zero_bos_errors=true, a word of the study command, is an option of every graph
    it computes: in the graph store's config, and in the key (a new fingerprint)."""
    prompts = tmp_path / "one.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": " ".join(words[3:8])}) + "\n")
    common = ["-q", "study", "launcher=sequential", "launcher.threads=1", "attribution.batch_size=32"]
    paths = ["--prompts", str(prompts), "--model", str(tiny_gpt2_dir), "--transcoders", str(plt_dir)]
    assert main([*common, "attribution.zero_bos_errors=true", *paths, "--out", str(tmp_path / "zero")]) == 0
    assert main([*common, *paths, "--out", str(tmp_path / "default")]) == 0
    keys = {}
    for name, zero in (("zero", True), ("default", False)):
        doc = load_study(tmp_path / name)
        assert doc["settings"]["attribution"]["zero_bos_errors"] is zero
        keys[name] = doc["prompts"][0]["key"]
        graph = Graph.open(Path(doc["graphs_dir"]) / keys[name] / "graph.zarr")
        assert graph.attrs["config"]["zero_bos_errors"] is zero
    assert keys["zero"] != keys["default"]


def test_every_launcher_file_loads_and_overrides_apply():
    for path in sorted((ROOT / "conf" / "launcher").glob("*.yaml")):
        cfg = load_launcher(path.stem)
        assert cfg.name == path.stem
    cfg = load_launcher("local", "jobs=3", "threads=1", "prompts_per_job=2")
    assert (cfg.jobs, cfg.threads, cfg.prompts_per_job) == (3, 1, 2)
    assert load_launcher("submitit_slurm", "slurm.partition=cpu").slurm.partition == "cpu"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["jbos=3"], "launcher.jbos: Key 'jbos' not in 'LauncherConfig'"),
        (["slurm.partiton=x"], "launcher.slurm.partiton: Key 'partiton' not in 'SlurmSettings'"),
        (["jobs=0"], "launcher.jobs must be an integer >= 1, got 0"),
        (["name=kubernetes"], "launcher must be one of"),
        (["jobs"], "Error parsing override 'launcher.jobs'"),
        (["start_method=thread"], "launcher.start_method must be"),
        (["slurm=3"], "launcher.slurm: Invalid type assigned"),
        (["jobs=many"], "launcher.jobs: Value 'many' of type 'str' could not be converted to Integer"),
    ],
)
def test_bad_launcher_settings_are_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        load_launcher("local", *overrides)
    assert "\n" not in str(info.value)


def test_unknown_launcher_name_lists_the_choices():
    with pytest.raises(ConfigError, match="conf/launcher has no 'no_such_launcher' .*submitit_slurm"):
        load_launcher("no_such_launcher")


def test_a_prompt_with_unknown_words_fails_at_planning_naming_them(tmp_path, words, settings):
    bad = prompt_set_from_records([{"id": "typo", "prompt": f"{words[3]} Austn {words[4]}"}], "typo")
    result = run_study(bad, settings, tmp_path / "study", LauncherConfig(name="sequential", threads=1), log=None)
    st = _by_id(result)["typo"]
    assert st.status == "failed" and st.key is None
    assert "does not know the prompt's word 'Austn'" in st.reason and "allow-unknown-tokens" in st.reason
    with pytest.raises(ValueError, match=r"invalid scan 'org/repo'"):
        StudySettings(model="m", transcoders="t", scan="org/repo")
