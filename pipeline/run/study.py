"""Batch studies: one prompt set through attribution, pruning and export, fanned out on an
existing engine (local processes, SLURM or a local job runner through submitit, Ray).

The steps of :func:`run_study`:

1. Plan (in the calling process). Load the replacement model once (CPU; the transcoders'
   decoders are read lazily, so this costs about the model's weights), tokenize every
   prompt and compute its **key**: the first 32 hex digits of the graph store's own
   fingerprint (:func:`pipeline.engine.attribution.fingerprint`: digests of the model weights and
   the transcoders, the prompt's tokens, the attribution options, the dtype and the logit
   targets). A prompt that cannot run (longer than the context, ...) fails here, alone.
   Prompts with equal keys share one computation.
2. Skip every key already done in the graph cache ``graphs/<key>/`` (see below), whichever
   study computed it; the rest are pending.
3. Launch: pending keys, in shards of ``prompts_per_job``, become jobs of the chosen engine
   (``sequential`` in this process, ``local`` a process pool, ``submitit_local`` /
   ``submitit_slurm`` through submitit, ``ray`` through Ray). A job computes its prompts one
   by one and reports each prompt's outcome; an error in one prompt is that prompt's failure,
   an error of the whole job (killed, timed out, cannot start) fails its prompts, and
   neither stops the other jobs.
4. Report: ``STUDY_DIR/study.json`` (every prompt's key, status, reason and time), the
   viewer folder ``STUDY_DIR/viewer/`` (each prompt's graph JSON under its id, with
   ``graph-metadata.json``), and a table of done / skipped / failed with each failure's
   one-line reason and the exact command that reruns only the failed prompts.

The graph cache (``STUDY_DIR/graphs`` unless ``graphs_dir`` points several studies at one)::

    graphs/<key>/graph.zarr          the attribution graph store (resumable; finished flag)
    graphs/<key>/pruned.npz          the pruned graph (pruning thresholds in done.json)
    graphs/<key>/graph/<key>.json    graph JSON (+ graph-metadata.json), slug = key
    graphs/<key>/done.json           written last, atomically: the key is done
    graphs/.<key>.lock               held (flock) while a job works on the key

A key is done when ``done.json`` exists, names the same pruning thresholds, and the store,
the pruned graph and the graph JSON it lists exist with the store marked finished. A job
killed half-way leaves no ``done.json``; its store resumes from its last finished batch.
Changing only the pruning thresholds re-prunes and re-exports without recomputing the graph.

Every job sets its torch thread count (``threads``, default 1) and ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline._io import atomic_write_bytes
from pipeline.analysis.study_files import DONE_FORMAT, STUDY_FORMAT, graph_done
from pipeline.run.prompt_sets import PromptRecord, PromptSet

__all__ = [
    "KEY_LENGTH",
    "LAUNCHERS",
    "LauncherConfig",
    "LauncherError",
    "SlurmSettings",
    "StudyResult",
    "StudySettings",
    "conf_choice",
    "load_launcher",
    "run_study",
    "run_task",
    "study_overrides",
]

KEY_LENGTH = 32
LAUNCHERS = ("sequential", "local", "submitit_local", "submitit_slurm", "ray")
CONF_LAUNCHER = Path(__file__).resolve().parents[2] / "conf" / "launcher"
FORMAT_VERSION = 1
_ROOT = Path(__file__).resolve().parents[2]  # put on PYTHONPATH of job processes


class LauncherError(ValueError):
    """The chosen engine cannot start here (not installed, no SLURM, bad settings)."""


# ------------------------------------------------------------------------------- configuration
@dataclass
class SlurmSettings:
    """sbatch settings of ``submitit_slurm`` (submitit's names; see conf/launcher/).

    partition: ``--partition``; gpus_per_node: ``--gpus-per-node``; cpus_per_task:
    ``--cpus-per-task``; mem_gb: ``--mem``; account / qos / constraint: the same sbatch
    options; array_parallelism: at most this many array tasks run at once; setup: shell lines
    run before each job (``module load``, activating the environment); additional: any other
    sbatch option as ``{name: value}``.
    """

    partition: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 8.0
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = 64
    setup: list[str] = field(default_factory=list)
    additional: dict[str, Any] = field(default_factory=dict)


@dataclass
class LauncherConfig:
    """Where and how the jobs of a study run (``conf/launcher/<name>.yaml``).

    name: sequential | local | submitit_local | submitit_slurm | ray.
    jobs: jobs running at once (local: worker processes; submitit_local: job processes; ray:
        CPUs of the local Ray instance; submitit_slurm: ignored, see slurm.array_parallelism).
    prompts_per_job: prompts per job; None: 1 where workers keep the model loaded between
        jobs (local, ray, sequential), ``ceil(pending / jobs)`` for submitit_local, 1 for SLURM.
    threads: torch threads of each job. device: where jobs run the model (cpu, cuda).
    timeout_min: wall-time limit of a submitit job (SLURM ``--time``).
    ray_address: None starts a local Ray instance; "auto" or "ray://host:port" joins a cluster.
    ray_gpus_per_job: GPUs Ray reserves per job.
    start_method: local: how worker processes start (fork, spawn, forkserver); None: fork on
        Linux for CPU jobs (workers inherit the planning process's loaded model), else spawn.
    folder: submitit's job folder (logs, pickles); None: ``STUDY_DIR/submitit``.
    """

    name: str = "local"
    jobs: int = 2
    prompts_per_job: int | None = None
    threads: int = 1
    device: str = "cpu"
    timeout_min: float = 60.0
    ray_address: str | None = None
    ray_gpus_per_job: float = 0.0
    folder: str | None = None
    start_method: str | None = None
    slurm: SlurmSettings = field(default_factory=SlurmSettings)

    def __post_init__(self) -> None:
        if isinstance(self.slurm, Mapping):
            self.slurm = _from_mapping(SlurmSettings, self.slurm, "launcher.slurm")
        if not isinstance(self.slurm, SlurmSettings):
            raise ValueError(f"launcher.slurm must be a mapping of sbatch settings, got {self.slurm!r}")
        if self.name not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.name!r}")
        for name in ("jobs", "threads", "prompts_per_job"):
            value = getattr(self, name)
            if value is None and name == "prompts_per_job":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"launcher.{name} must be an integer >= 1, got {value!r}")
        if self.start_method not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(
                f"launcher.start_method must be fork, spawn, forkserver or null, got {self.start_method!r}"
            )
        if isinstance(self.timeout_min, bool) or not isinstance(self.timeout_min, (int, float)):
            raise ValueError(f"launcher.timeout_min must be a number, got {self.timeout_min!r}")
        if self.timeout_min <= 0:
            raise ValueError(f"launcher.timeout_min must be positive, got {self.timeout_min}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _from_mapping(cls, data: Mapping[str, Any], what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {unknown}; known: {sorted(names)}")
    return cls(**dict(data))


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def load_launcher(
    name_or_path: str | os.PathLike, overrides: Sequence[str] = (), *, conf_dir: str | os.PathLike | None = None
) -> LauncherConfig:
    """``conf/launcher/<name>.yaml`` (or a YAML file) with ``key=value`` overrides
    (``jobs=4``, ``slurm.partition=gpu``) as a checked :class:`LauncherConfig`."""
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(conf_dir or CONF_LAUNCHER) / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(conf_dir or CONF_LAUNCHER).glob("*.yaml"))
        raise ValueError(f"no launcher {str(name_or_path)!r} (conf/launcher has {known})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a launcher file is a mapping")
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"launcher override {ov!r} is not key=value")
        key, value = ov.split("=", 1)
        key = key.removeprefix("launcher.")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"launcher override {ov!r}: {p} is not a group")
        node[parts[-1]] = _parse_value(value)
    try:
        return _from_mapping(LauncherConfig, data, str(path))
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from None


_CONF = Path(__file__).resolve().parents[2] / "conf"


def conf_choice(group: str, choice: str, *, conf_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a ``conf/<group>/<choice>.yaml`` of the DVC pipeline names, for the study command:
    ``model``: ``{"model": name, "revision", "transcoders": its default transcoders choice}``;
    ``transcoders``: ``{"transcoders": source, "revision"}``."""
    path = Path(conf_dir or _CONF) / group / f"{choice}.yaml"
    if not path.is_file():
        known = sorted(q.stem for q in path.parent.glob("*.yaml"))
        raise ValueError(f"no {group} choice {choice!r} (conf/{group} has {known})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if group == "model":
        default_tc = None
        for entry in data.get("defaults", []) or []:
            if isinstance(entry, dict):
                for k, v in entry.items():
                    if "transcoders" in k:
                        default_tc = v
        return {"model": data["name"], "revision": data.get("revision"), "transcoders": default_tc}
    if group == "transcoders":
        if data.get("source") in (None, "???"):
            raise ValueError(f"conf/transcoders/{choice}.yaml needs a source: give --transcoders DIR")
        return {"transcoders": data["source"], "revision": data.get("revision")}
    raise ValueError(f"conf_choice reads model or transcoders, not {group!r}")


def study_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Hydra-style words of the study command (``prompts=capitals launcher=submitit_slurm
    launcher.slurm.partition=gpu model=organism transcoders=organism_plt out=DIR``;
    ``hydra/launcher=NAME`` is read as ``launcher=NAME``) as ``{prompts, launcher,
    launcher_opts, model, transcoders, model_revision, transcoders_revision, out}`` (only
    the keys given, model and transcoders resolved through ``conf/``)."""
    out: dict[str, Any] = {}
    opts: list[str] = []
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"{ov!r} is not key=value (e.g. prompts=capitals launcher=local)")
        key, value = ov.split("=", 1)
        key = key.removeprefix("+")
        if key in ("launcher", "hydra/launcher"):
            out["launcher"] = value
        elif key.startswith("launcher."):
            opts.append(f"{key.removeprefix('launcher.')}={value}")
        elif key in ("prompts", "out"):
            out[key] = value
        elif key == "model":
            m = conf_choice("model", value)
            out["model"], out["model_revision"] = m["model"], m["revision"]
            if m["transcoders"]:
                out.setdefault("_model_transcoders", m["transcoders"])
        elif key == "transcoders":
            t = conf_choice("transcoders", value)
            out["transcoders"], out["transcoders_revision"] = t["transcoders"], t["revision"]
        else:
            raise ValueError(
                f"unknown study setting {key!r}: give prompts=, launcher=, launcher.KEY=, model=, transcoders= or out="
            )
    if "transcoders" not in out and "_model_transcoders" in out:
        t = conf_choice("transcoders", out["_model_transcoders"])
        out["transcoders"], out["transcoders_revision"] = t["transcoders"], t["revision"]
    out.pop("_model_transcoders", None)
    if opts:
        out["launcher_opts"] = opts
    return out


@dataclass
class StudySettings:
    """Everything that decides a study's outputs (besides the prompts).

    model / transcoders: what ``ReplacementModel.from_pretrained`` receives (local
    directories or hub ids); dtype: float32 | float64 | bfloat16 | float16; attribution: the
    options of :func:`pipeline.engine.attribution.attribute`; node_threshold / edge_threshold:
    pruning; scan: the transcoders' name in graph JSON (None: the store's, else the
    transcoders' source).
    """

    model: str
    transcoders: str
    dtype: str = "float32"
    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    batch_size: int = 256
    max_feature_nodes: int | None = None
    update_interval: int = 4
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    model_revision: str | None = None
    transcoders_revision: str | None = None
    scan: str | None = None

    def attribution(self) -> dict[str, Any]:
        return {
            "max_n_logits": self.max_n_logits,
            "desired_logit_prob": self.desired_logit_prob,
            "batch_size": self.batch_size,
            "max_feature_nodes": self.max_feature_nodes,
            "update_interval": self.update_interval,
        }

    def pruning(self) -> dict[str, float]:
        return {"node_threshold": float(self.node_threshold), "edge_threshold": float(self.edge_threshold)}


# ---------------------------------------------------------------------------------- job payload
@dataclass
class TaskItem:
    """One key to compute: the prompt (of the first id that has it) and its logit targets."""

    key: str
    prompt_id: str
    prompt: str
    logit_targets: tuple[str, ...] = ()


@dataclass
class Task:
    """One job: a shard of keys, computed one by one in one process with one loaded model."""

    index: int
    items: list[TaskItem]
    settings: StudySettings
    graphs_dir: str
    device: str = "cpu"
    threads: int = 1


def _logit_targets(specs: Sequence[str]):
    """``"A"`` -> token A; ``"A,B"`` -> the difference A - B; none -> the top logits."""
    if not specs:
        return None
    return [tuple(s.split(",", 1)) if "," in s else s for s in specs]


def _dtype(name: str):
    import torch

    if name not in ("float32", "float64", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, float64, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


_MODELS: dict[tuple, Any] = {}  # one loaded model per process, reused by later jobs


def _model(settings: StudySettings, device: str):
    from pipeline.engine.replacement import ReplacementModel
    from pipeline.transcoders import load_transcoders

    ident = (
        settings.model,
        settings.transcoders,
        settings.dtype,
        device,
        settings.model_revision,
        settings.transcoders_revision,
    )
    if ident not in _MODELS:
        _MODELS.clear()
        dtype = _dtype(settings.dtype)
        # a study attributes each prompt (one encode each): encoders stay on disk
        tc = load_transcoders(
            settings.transcoders, revision=settings.transcoders_revision, device=device, dtype=dtype, lazy_encoder=True
        )
        _MODELS[ident] = ReplacementModel.from_pretrained(
            settings.model, tc, dtype=dtype, device=device, revision=settings.model_revision
        )
    return _MODELS[ident]


def _set_threads(threads: int) -> None:
    import torch

    from pipeline.memory import release_freed_buffers

    release_freed_buffers()

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ the cache
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


@contextlib.contextmanager
def _key_lock(graphs_dir: Path, key: str) -> Iterator[None]:
    graphs_dir.mkdir(parents=True, exist_ok=True)
    with open(graphs_dir / f".{key}.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _compute_key(model, item: TaskItem, settings: StudySettings, graphs_dir: Path) -> dict[str, Any]:
    """Attribute, prune and export one key into ``graphs_dir/<key>/``; return its outcome."""
    from pipeline.analysis.export import create_graph_files
    from pipeline.engine.attribution import AttributionConfig, attribute, fingerprint
    from pipeline.graph.pruned import save_pruned_graph
    from pipeline.graph.pruning import prune_graph

    key_dir = graphs_dir / item.key
    pruning = settings.pruning()
    with _key_lock(graphs_dir, item.key):
        if graph_done(key_dir, pruning) is not None:  # another job or study finished it meanwhile
            return {"status": "skipped", "reason": "done by another job"}
        tokens = model.tokenize(item.prompt)
        targets = _logit_targets(item.logit_targets)
        attr = settings.attribution()
        fp = fingerprint(model, tokens, AttributionConfig(**attr), targets)
        if fp[:KEY_LENGTH] != item.key:
            raise RuntimeError(
                f"the job computes key {fp[:KEY_LENGTH]} but the study planned {item.key}: the "
                "model or transcoders changed since planning (rerun the study)"
            )
        key_dir.mkdir(parents=True, exist_ok=True)
        (key_dir / "done.json").unlink(missing_ok=True)
        graph = attribute(
            item.prompt, model, store=key_dir / "graph.zarr", logit_targets=targets, verbose=False, **attr
        )
        result = prune_graph(graph, pruning["node_threshold"], pruning["edge_threshold"])
        save_pruned_graph(graph, result, key_dir / "pruned.npz")
        scan = settings.scan or graph.attrs.get("scan") or settings.transcoders
        json_dir = key_dir / "graph"
        if json_dir.exists():
            shutil.rmtree(json_dir)
        path = create_graph_files(
            None, item.key, json_dir, pruned=key_dir / "pruned.npz", tokenizer=model.tokenizer, scan=scan
        )
        (json_dir / ".graph-metadata.json.lock").unlink(missing_ok=True)
        rows, _, _ = result.kept_edges()
        ids = graph.input_tokens.tolist()
        done = {
            "format": DONE_FORMAT,
            "version": FORMAT_VERSION,
            "key": item.key,
            "fingerprint": fp,
            "prompt": item.prompt,
            "tokens": [int(t) for t in ids],
            "prompt_tokens": [model.tokenizer.decode([int(t)]) for t in ids],
            "logit_tokens": [int(t) for t in graph.logit_tokens.tolist()],
            "logit_labels": list(graph.attrs.get("logit_labels", [])),
            "logit_targets": list(item.logit_targets),
            "model": settings.model,
            "transcoders": settings.transcoders,
            "dtype": settings.dtype,
            "attribution": attr,
            "pruning": pruning,
            "scores": {
                "replacement_score": _finite(result.replacement_score),
                "completeness_score": _finite(result.completeness_score),
                "nodes": int(result.n_nodes),
                "kept_nodes": int(result.node_mask.sum()),
                "kept_edges": int(len(rows)),
            },
            "files": {"graph": "graph.zarr", "pruned": "pruned.npz", "json": f"graph/{path.name}"},
        }
        atomic_write_bytes(key_dir / "done.json", _json_bytes(done))
    return {"status": "done", "reason": "", "scores": done["scores"]}


def _one_line(exc: BaseException, limit: int = 240) -> str:
    """A one-line reason: for errors that carry a remote traceback (submitit, Ray), its last
    ``SomeError: message`` line."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pattern = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b:?")
    errors = [ln for ln in lines if pattern.match(ln)]
    line = errors[-1] if errors else (lines[0] if lines else "")
    if not pattern.match(line):
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def run_task(task: Task) -> list[dict[str, Any]]:
    """A job's body: compute every key of ``task``; one outcome dict per item.

    A failing item is reported (``status: failed`` with a one-line reason) and the next item
    runs. Runs in whatever process the engine gives it; keeps the model loaded for later jobs.
    """
    _set_threads(task.threads)
    graphs_dir = Path(task.graphs_dir)
    outcomes = []
    try:
        model = _model(task.settings, task.device)
    except Exception as exc:  # noqa: BLE001 - every item fails with the load error
        reason = f"loading the model failed: {_one_line(exc)}"
        return [{"key": it.key, "status": "failed", "reason": reason, "seconds": 0.0} for it in task.items]
    for item in task.items:
        t0 = time.perf_counter()
        try:
            out = _compute_key(model, item, task.settings, graphs_dir)
        except Exception as exc:  # noqa: BLE001 - isolate the item
            out = {"status": "failed", "reason": _one_line(exc)}
        out.update(key=item.key, seconds=round(time.perf_counter() - t0, 3))
        outcomes.append(out)
    return outcomes


# ------------------------------------------------------------------------------------- engines
@contextlib.contextmanager
def _job_environment(threads: int) -> Iterator[dict[str, str]]:
    """Environment job processes inherit: the package importable, BLAS threads pinned."""
    env = {
        "PYTHONPATH": os.pathsep.join([str(_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


Outcome = tuple[Task, "list[dict[str, Any]] | BaseException"]


def _run_sequential(tasks: list[Task], cfg: LauncherConfig, folder: Path) -> Iterator[Outcome]:
    for t in tasks:
        try:
            yield t, run_task(t)
        except Exception as exc:  # noqa: BLE001
            yield t, exc


def _start_method(cfg: LauncherConfig) -> str:
    """``fork`` on Linux for CPU jobs (workers inherit the imported modules and the model the
    study loaded for planning: no per-worker start-up), else ``spawn`` (CUDA must not be
    initialised before a fork; other systems do not fork safely)."""
    if cfg.start_method is not None:
        return cfg.start_method
    return "fork" if sys.platform.startswith("linux") and cfg.device == "cpu" else "spawn"


def _run_local(tasks: list[Task], cfg: LauncherConfig, folder: Path) -> Iterator[Outcome]:
    """concurrent.futures process pool. A worker that dies breaks the pool: the tasks it took
    down are retried, each alone in a fresh one-process pool, so only the culprit fails."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context(_start_method(cfg))
    broken: list[Task] = []
    with _job_environment(cfg.threads):
        with ProcessPoolExecutor(max_workers=min(cfg.jobs, len(tasks)), mp_context=ctx) as pool:
            futures = {pool.submit(run_task, t): t for t in tasks}
            for fut in as_completed(futures):
                t = futures[fut]
                try:
                    yield t, fut.result()
                except BrokenProcessPool:
                    broken.append(t)
                except Exception as exc:  # noqa: BLE001
                    yield t, exc
        for t in broken:
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                try:
                    yield t, pool.submit(run_task, t).result()
                except BrokenProcessPool:
                    yield t, RuntimeError("the worker process died (killed, out of memory or crashed)")
                except Exception as exc:  # noqa: BLE001
                    yield t, exc


def _submitit_executor(cfg: LauncherConfig, folder: Path, cluster: str):
    try:
        import submitit
    except ImportError:
        raise LauncherError(f"launcher {cfg.name} needs submitit: pip install submitit") from None
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None] if cluster == "slurm" else []
    if missing:
        raise LauncherError(
            f"launcher submitit_slurm: no {' or '.join(f'`{c}`' for c in missing)} on this machine, so no SLURM "
            "cluster to submit to. Run the study on a SLURM login node, or use --launcher submitit_local "
            "(the same submitit code path, jobs run here) or --launcher local"
        )
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = {"timeout_min": int(math.ceil(cfg.timeout_min)), "name": "circuit-study"}
    if cluster == "slurm":
        s = cfg.slurm
        params.update(
            gpus_per_node=s.gpus_per_node,
            cpus_per_task=max(s.cpus_per_task, cfg.threads),
            mem_gb=s.mem_gb,
            slurm_array_parallelism=s.array_parallelism,
        )
        for k in ("partition", "account", "qos", "constraint"):
            if getattr(s, k):
                params[f"slurm_{k}"] = getattr(s, k)
        if s.setup:
            params["slurm_setup"] = list(s.setup)
        if s.additional:
            params["slurm_additional_parameters"] = dict(s.additional)
    ex.update_parameters(**params)
    return ex


def _run_submitit(tasks: list[Task], cfg: LauncherConfig, folder: Path, cluster: str) -> Iterator[Outcome]:
    ex = _submitit_executor(cfg, folder, cluster)
    with _job_environment(cfg.threads):
        try:
            jobs = ex.map_array(run_task, tasks)
        except Exception as exc:
            raise LauncherError(f"launcher {cfg.name}: submission failed: {_one_line(exc)}") from exc
    print(f"submitted {len(jobs)} job(s) to {cluster}; logs in {folder}", flush=True)
    pending = dict(zip((j.job_id for j in jobs), zip(jobs, tasks)))
    while pending:
        finished = [jid for jid, (j, _) in pending.items() if j.done()]
        if not finished:
            time.sleep(0.5)
            continue
        for jid in finished:
            job, t = pending.pop(jid)
            try:
                yield t, job.result()
            except Exception as exc:  # noqa: BLE001 - FailedJobError, UncompletedJobError, ...
                yield t, exc


def _run_ray(tasks: list[Task], cfg: LauncherConfig, folder: Path) -> Iterator[Outcome]:
    try:
        import ray
    except ImportError:
        raise LauncherError("launcher ray needs Ray: pip install 'ray>=2.9'") from None
    started = False
    with _job_environment(cfg.threads) as env:
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
            if cfg.ray_address is None:
                kwargs.update(num_cpus=cfg.jobs, object_store_memory=128 * 1024**2)
            try:
                ray.init(address=cfg.ray_address, **kwargs)
            except Exception as exc:
                raise LauncherError(f"launcher ray could not start: {_one_line(exc)}") from exc
            started = True
    try:
        remote = ray.remote(num_cpus=1, num_gpus=cfg.ray_gpus_per_job, max_retries=0)(run_task)
        refs = {remote.remote(t): t for t in tasks}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            t = refs[ready[0]]
            try:
                yield t, ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, ...
                yield t, exc
    finally:
        if started:
            ray.shutdown()


def _engine(cfg: LauncherConfig) -> Callable[[list[Task], LauncherConfig, Path], Iterator[Outcome]]:
    return {
        "sequential": _run_sequential,
        "local": _run_local,
        "submitit_local": lambda t, c, f: _run_submitit(t, c, f, "local"),
        "submitit_slurm": lambda t, c, f: _run_submitit(t, c, f, "slurm"),
        "ray": _run_ray,
    }[cfg.name]


def _check_engine(cfg: LauncherConfig) -> None:
    """Fail before planning when the engine cannot start here."""
    if cfg.name.startswith("submitit"):
        _submitit_executor(cfg, Path(tempfile.gettempdir()) / "circuit-study-check", cfg.name.split("_")[1])
    elif cfg.name == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise LauncherError("launcher ray needs Ray: pip install 'ray>=2.9'") from None


def _shard(items: list[TaskItem], cfg: LauncherConfig) -> list[list[TaskItem]]:
    if not items:
        return []
    size = cfg.prompts_per_job
    if size is None:
        size = math.ceil(len(items) / cfg.jobs) if cfg.name == "submitit_local" else 1
    return [items[i : i + size] for i in range(0, len(items), size)]


# ------------------------------------------------------------------------------------- the study
@dataclass
class PromptStatus:
    """One prompt's line of the study table."""

    id: str
    prompt: str
    key: str | None = None
    status: str = "pending"  # done | skipped | failed | pending (not selected by --only, not done)
    reason: str = ""
    seconds: float | None = None
    n_tokens: int | None = None
    scores: dict[str, Any] | None = None


@dataclass
class StudyResult:
    """What :func:`run_study` did; ``study.json`` holds the same."""

    name: str
    out: Path
    prompts: list[PromptStatus]
    wall_time_s: float
    rerun_command: str | None

    def count(self, status: str) -> int:
        return sum(p.status == status for p in self.prompts)

    @property
    def failed(self) -> list[PromptStatus]:
        return [p for p in self.prompts if p.status == "failed"]

    def table(self) -> str:
        """The done / skipped / failed table, each failure's one-line reason, and the rerun."""
        head = (
            f"study {self.name!r}: {len(self.prompts)} prompts: done {self.count('done')}, skipped "
            f"{self.count('skipped')}, failed {self.count('failed')}"
            + (f", pending {self.count('pending')}" if self.count("pending") else "")
            + f"  (wall {self.wall_time_s:.1f} s)"
        )
        w = max([len(p.id) for p in self.prompts] + [2])
        lines = [head, f"  {'id':<{w}}  {'status':<7}  {'seconds':>7}  {'key':<12}  reason"]
        for p in self.prompts:
            secs = f"{p.seconds:7.1f}" if p.seconds is not None else f"{'-':>7}"
            key = (p.key or "-")[:12]
            lines.append(f"  {p.id:<{w}}  {p.status:<7}  {secs}  {key:<12}  {p.reason}".rstrip())
        if self.failed:
            lines.append(f"rerun only the failed ones: {self.rerun_command or 'run_study(..., only=[...failed ids])'}")
        return "\n".join(lines)


def _plan(
    prompt_set: PromptSet, settings: StudySettings, graphs_dir: Path, statuses: dict[str, PromptStatus]
) -> dict[str, TaskItem]:
    """Keys of every prompt (in this process); returns the pending keys' items."""
    from pipeline.engine.attribution import AttributionConfig, fingerprint
    from pipeline.engine.replacement import PromptError

    model = _model(settings, "cpu")
    attr_cfg = AttributionConfig(**settings.attribution())
    pruning = settings.pruning()
    pending: dict[str, TaskItem] = {}
    for rec in prompt_set:
        st = statuses[rec.id]
        try:
            tokens = model.tokenize(rec.prompt)
        except PromptError as exc:  # too long, empty: this prompt fails, the others go on
            st.status, st.reason = "failed", f"PromptError: {exc}"
            continue
        except Exception as exc:  # noqa: BLE001 - isolate the prompt
            st.status, st.reason = "failed", _one_line(exc)
            continue
        st.n_tokens = int(tokens.numel())
        st.key = fingerprint(model, tokens, attr_cfg, _logit_targets(rec.logit_targets))[:KEY_LENGTH]
        done = graph_done(graphs_dir / st.key, pruning)
        if done is not None:
            st.status, st.scores = "skipped", done.get("scores")
        elif st.key not in pending:
            pending[st.key] = TaskItem(st.key, rec.id, rec.prompt, tuple(rec.logit_targets))
    return pending


def _rerun_command(command: Sequence[str] | None, failed: list[str]) -> str | None:
    if not command or not failed:
        return None
    args, skip = [], False
    for a in command:
        if skip:
            skip = False
            continue
        if a == "--only":
            skip = True
            continue
        if a.startswith("--only="):
            continue
        args.append(a)
    return shlex.join([*args, "--only", ",".join(failed)])


def _write_viewer(out: Path, statuses: list[PromptStatus], graphs_dir: Path) -> None:
    """``out/viewer/<id>.json`` (slug = prompt id) for every finished prompt, + its index."""
    from pipeline.analysis.export import update_graph_metadata

    viewer = out / "viewer"
    tmp = Path(tempfile.mkdtemp(prefix=".viewer.", dir=out))
    os.chmod(tmp, 0o755)
    try:
        for p in statuses:
            if p.status not in ("done", "skipped") or p.key is None:
                continue
            done = graph_done(graphs_dir / p.key)
            if done is None:
                continue
            doc = _read_json(graphs_dir / p.key / done["files"]["json"])
            doc["metadata"]["slug"] = p.id
            atomic_write_bytes(
                tmp / f"{p.id}.json",
                (json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"),
            )
            update_graph_metadata(tmp, doc["metadata"])
        (tmp / ".graph-metadata.json.lock").unlink(missing_ok=True)
        if viewer.exists():
            shutil.rmtree(viewer)
        os.replace(tmp, viewer)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_study(
    prompt_set: PromptSet,
    settings: StudySettings,
    out: str | os.PathLike,
    launcher: LauncherConfig | None = None,
    *,
    graphs_dir: str | os.PathLike | None = None,
    only: Sequence[str] | None = None,
    command: Sequence[str] | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
) -> StudyResult:
    """Run ``prompt_set`` through attribution, pruning and export on ``launcher`` (see the
    module docstring). ``log``: where progress and the table go (None: nowhere); ``progress``:
    a line per finished key. ``only``: run just these ids (the others are still planned and
    reported: skipped when done, else pending). ``command``: the command line that started
    the study, from which the rerun command of the failed prompts is made.
    Raises :class:`LauncherError` when the engine cannot start, before any work.
    """
    t0 = time.perf_counter()
    launcher = launcher or LauncherConfig(name="sequential")
    _check_engine(launcher)  # before anything is written
    if only is not None:
        prompt_set.subset(only)  # unknown ids are an error
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    graphs = Path(graphs_dir) if graphs_dir is not None else out / "graphs"
    graphs.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _m: None)
    _set_threads(launcher.threads)
    selected = set(prompt_set.ids if only is None else only)

    statuses = {r.id: PromptStatus(r.id, r.prompt) for r in prompt_set}
    pending = _plan(prompt_set, settings, graphs, statuses)
    by_key: dict[str, list[PromptStatus]] = {}
    for st in statuses.values():
        if st.key is not None:
            by_key.setdefault(st.key, []).append(st)
    run_items = [it for k, it in pending.items() if any(s.id in selected for s in by_key[k])]
    n_skipped = sum(s.status == "skipped" for s in statuses.values())
    say(
        f"study {prompt_set.name!r}: {len(statuses)} prompts, {len({*by_key})} keys: {n_skipped} prompt(s) done "
        f"already, {len(run_items)} key(s) to compute on {launcher.name}"
    )

    tasks = [
        Task(i, shard, settings, str(graphs.resolve()), launcher.device, launcher.threads)
        for i, shard in enumerate(_shard(run_items, launcher))
    ]
    folder = Path(launcher.folder) if launcher.folder else out / "submitit"
    n_done = 0
    if tasks:
        for task, result in _engine(launcher)(tasks, launcher, folder):
            if isinstance(result, BaseException):
                reason = f"job {task.index} failed: {_one_line(result)}"
                result = [{"key": it.key, "status": "failed", "reason": reason, "seconds": None} for it in task.items]
            for res in result:
                for st in by_key.get(res["key"], []):
                    st.status = res["status"]
                    st.reason, st.seconds = res.get("reason", ""), res.get("seconds")
                    st.scores = res.get("scores")
                n_done += 1
                if progress:
                    ids = ",".join(st.id for st in by_key.get(res["key"], []))
                    secs = f" {res['seconds']:.1f} s" if res.get("seconds") is not None else ""
                    say(
                        f"  [{n_done}/{len(run_items)}] {ids} {res['status']}{secs}"
                        + (f" ({res['reason']})" if res.get("reason") else "")
                    )

    ordered = [statuses[i] for i in prompt_set.ids]
    failed = [p.id for p in ordered if p.status == "failed"]
    result = StudyResult(prompt_set.name, out, ordered, time.perf_counter() - t0, _rerun_command(command, failed))
    _write_viewer(out, ordered, graphs)
    _write_study_json(result, prompt_set, settings, launcher, graphs)
    say(result.table())
    return result


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:
        return str(path.resolve())


def _write_study_json(
    result: StudyResult, prompt_set: PromptSet, settings: StudySettings, launcher: LauncherConfig, graphs: Path
) -> None:
    records = {r.id: r for r in prompt_set}
    prompts = []
    for p in result.prompts:
        rec: PromptRecord = records[p.id]
        prompts.append(
            {
                **rec.to_dict(),
                "key": p.key,
                "status": p.status,
                "reason": p.reason,
                "seconds": p.seconds,
                "n_tokens": p.n_tokens,
                "scores": p.scores,
            }
        )
    doc = {
        "format": STUDY_FORMAT,
        "version": FORMAT_VERSION,
        "name": result.name,
        "prompt_set": prompt_set.source,
        "settings": asdict(settings),
        "launcher": launcher.to_dict(),
        "graphs_dir": _rel(graphs, result.out),
        "counts": {s: result.count(s) for s in ("done", "skipped", "failed", "pending")},
        "wall_time_s": round(result.wall_time_s, 3),
        "rerun_command": result.rerun_command,
        "prompts": prompts,
    }
    atomic_write_bytes(result.out / "study.json", _json_bytes(doc))
