"""Batch studies: one prompt set through attribution, pruning and export, fanned out on a
launcher (:mod:`pipeline.run.launchers`), into a content-addressed graph cache.

:func:`run_study` plans in the calling process (loads the model once, tokenizes every prompt
and computes its **key**, the first 32 hex digits of the graph store's fingerprint; a prompt
that cannot run fails here, alone), skips every key already done in the cache whichever study
computed it, runs the pending keys as jobs (an error fails its prompt, a dead job its prompts,
never the others), then writes ``STUDY_DIR/study.json``, the viewer folder
``STUDY_DIR/viewer/`` and a done / skipped / failed table with the command that reruns only
the failed prompts.

The cache (``STUDY_DIR/graphs`` unless ``graphs_dir`` points several studies at one) holds per
key ``graph.zarr`` (resumable), ``pruned.npz``, ``graph/<key>.json`` and, written last,
``done.json``; ``.<key>.lock`` is held while a job works on the key. A key is done when its
``done.json`` names the same pruning thresholds and its files exist with the store finished:
changing only the thresholds re-prunes without recomputing graphs (studies/README.md).
The command line builds :class:`StudySettings` from ``conf/study.yaml`` composed by Hydra.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline._io import atomic_directory, finite_or_none, read_json, write_json
from pipeline.analysis.export import check_scan, create_graph_files, neuronpedia_name, update_graph_metadata
from pipeline.analysis.study_files import DONE_FORMAT, STUDY_FORMAT, graph_done
from pipeline.engine.attribution import attribute, fingerprint
from pipeline.engine.options import AttributionConfig, fingerprinted
from pipeline.engine.replacement import ReplacementModel
from pipeline.engine.tokens import PromptError, check_unknown_tokens
from pipeline.graph.pruned import save_pruned_graph
from pipeline.graph.pruning import prune_graph
from pipeline.memory import release_freed_buffers
from pipeline.run.config import DTYPES, LauncherConfig, PruningSpec, StudyConfig
from pipeline.run.launchers import check_launcher, launch, one_line, shard
from pipeline.run.prompt_sets import PromptSet, logit_targets
from pipeline.transcoders import load_transcoders

KEY_LENGTH = 32
FORMAT_VERSION = 1


@dataclass
class StudySettings:
    """Everything that decides a study's outputs (besides the prompts).

    model / transcoders: what ``ReplacementModel.from_pretrained`` receives (local
    directories or hub ids), at ``model_revision`` / ``transcoders_revision``; dtype: their
    load dtype; attribution: the options of :func:`pipeline.engine.attribution.attribute`;
    pruning: the thresholds; scan: the transcoders' name in graph JSON (None: the store's,
    else the transcoders' source).
    """

    model: str
    transcoders: str
    dtype: str = "float32"
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    pruning: PruningSpec = field(default_factory=PruningSpec)
    model_revision: str | None = None
    transcoders_revision: str | None = None
    scan: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        self.attribution = AttributionConfig.of(self.attribution)  # the schema's dtype is no key input
        if self.scan is not None:
            check_scan(self.scan)  # fail before any prompt runs

    @classmethod
    def from_config(cls, cfg: StudyConfig) -> StudySettings:
        """The settings a composed ``conf/study.yaml`` gives."""
        return cls(
            model=cfg.model.name,
            transcoders=cfg.transcoders.source,
            dtype=cfg.attribution.dtype,
            attribution=cfg.attribution,
            pruning=cfg.pruning,
            model_revision=cfg.model.revision,
            transcoders_revision=cfg.transcoders.revision,
            scan=cfg.export.scan,
        )

    def pruning_thresholds(self) -> dict[str, float]:
        """The thresholds as ``done.json`` records them."""
        return {k: float(v) for k, v in asdict(self.pruning).items()}


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


_MODELS: dict[tuple, ReplacementModel] = {}  # one loaded model per process, reused by later jobs


def _model(settings: StudySettings, device: str) -> ReplacementModel:
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
        dtype = getattr(torch, settings.dtype)
        # a study attributes each prompt (one encode each): encoders stay on disk
        tc = load_transcoders(
            settings.transcoders, revision=settings.transcoders_revision, device=device, dtype=dtype, lazy_encoder=True
        )
        _MODELS[ident] = ReplacementModel.from_pretrained(
            settings.model, tc, dtype=dtype, device=device, revision=settings.model_revision
        )
    return _MODELS[ident]


def _set_threads(threads: int) -> None:
    release_freed_buffers()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ the cache
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
    key_dir = graphs_dir / item.key
    pruning = settings.pruning_thresholds()
    with _key_lock(graphs_dir, item.key):
        if graph_done(key_dir, pruning) is not None:  # another job or study finished it meanwhile
            return {"status": "skipped", "reason": "done by another job"}
        tokens = model.tokenize(item.prompt)
        targets = logit_targets(item.logit_targets)
        fp = fingerprint(model, tokens, settings.attribution, targets)
        if fp[:KEY_LENGTH] != item.key:
            raise RuntimeError(
                f"the job computes key {fp[:KEY_LENGTH]} but the study planned {item.key}: the "
                "model or transcoders changed since planning (rerun the study)"
            )
        key_dir.mkdir(parents=True, exist_ok=True)
        (key_dir / "done.json").unlink(missing_ok=True)
        graph = attribute(
            item.prompt,
            model,
            config=settings.attribution,
            store=key_dir / "graph.zarr",
            logit_targets=targets,
            verbose=False,
        )
        result = prune_graph(graph, pruning["node_threshold"], pruning["edge_threshold"])
        save_pruned_graph(graph, result, key_dir / "pruned.npz")
        scan = settings.scan or neuronpedia_name(graph.attrs.get("scan") or settings.transcoders)
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
            "attribution": fingerprinted(settings.attribution),
            "pruning": pruning,
            "scores": {
                "replacement_score": finite_or_none(result.replacement_score),
                "completeness_score": finite_or_none(result.completeness_score),
                "nodes": int(result.n_nodes),
                "kept_nodes": int(result.node_mask.sum()),
                "kept_edges": int(len(rows)),
            },
            "files": {"graph": "graph.zarr", "pruned": "pruned.npz", "json": f"graph/{path.name}"},
        }
        write_json(key_dir / "done.json", done)
    return {"status": "done", "reason": "", "scores": done["scores"]}


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
        reason = f"loading the model failed: {one_line(exc)}"
        return [{"key": it.key, "status": "failed", "reason": reason, "seconds": 0.0} for it in task.items]
    for item in task.items:
        t0 = time.perf_counter()
        try:
            out = _compute_key(model, item, task.settings, graphs_dir)
        except Exception as exc:  # noqa: BLE001 - isolate the item
            out = {"status": "failed", "reason": one_line(exc)}
        out.update(key=item.key, seconds=round(time.perf_counter() - t0, 3))
        outcomes.append(out)
    return outcomes


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
    model = _model(settings, "cpu")
    pruning = settings.pruning_thresholds()
    pending: dict[str, TaskItem] = {}
    for rec in prompt_set:
        st = statuses[rec.id]
        try:
            tokens = model.tokenize(rec.prompt)
            if not settings.attribution.allow_unknown_tokens:
                check_unknown_tokens(model.tokenizer, tokens, rec.prompt)
        except PromptError as exc:  # too long, empty: this prompt fails, the others go on
            st.status, st.reason = "failed", f"PromptError: {exc}"
            continue
        except Exception as exc:  # noqa: BLE001 - isolate the prompt
            st.status, st.reason = "failed", one_line(exc)
            continue
        st.n_tokens = int(tokens.numel())
        st.key = fingerprint(model, tokens, settings.attribution, logit_targets(rec.logit_targets))[:KEY_LENGTH]
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
    with atomic_directory(out / "viewer") as tmp:
        os.chmod(tmp, 0o755)
        for p in statuses:
            if p.status not in ("done", "skipped") or p.key is None:
                continue
            done = graph_done(graphs_dir / p.key)
            if done is None:
                continue
            doc = read_json(graphs_dir / p.key / done["files"]["json"])
            doc["metadata"]["slug"] = p.id
            write_json(tmp / f"{p.id}.json", doc, sort_keys=False)
            update_graph_metadata(tmp, doc["metadata"])
        (tmp / ".graph-metadata.json.lock").unlink(missing_ok=True)


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
    Raises :class:`~pipeline.run.launchers.LauncherError` when the engine cannot start, before any work.
    """
    t0 = time.perf_counter()
    launcher = launcher or LauncherConfig(name="sequential")
    check_launcher(launcher, settings.dtype)  # before anything is written
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
        Task(i, items, settings, str(graphs.resolve()), launcher.device, launcher.threads)
        for i, items in enumerate(shard(run_items, launcher))
    ]
    folder = Path(launcher.folder) if launcher.folder else out / "submitit"
    n_done = 0
    if tasks:
        for task, result in launch(run_task, tasks, launcher, folder):
            if isinstance(result, BaseException):
                reason = f"job {task.index} failed: {one_line(result)}"
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
    prompts = [
        {
            **records[p.id].to_dict(),
            "key": p.key,
            "status": p.status,
            "reason": p.reason,
            "seconds": p.seconds,
            "n_tokens": p.n_tokens,
            "scores": p.scores,
        }
        for p in result.prompts
    ]
    doc = {
        "format": STUDY_FORMAT,
        "version": FORMAT_VERSION,
        "name": result.name,
        "prompt_set": prompt_set.source,
        "settings": asdict(settings),
        "launcher": asdict(launcher),
        "graphs_dir": _rel(graphs, result.out),
        "counts": {s: result.count(s) for s in ("done", "skipped", "failed", "pending")},
        "wall_time_s": round(result.wall_time_s, 3),
        "rerun_command": result.rerun_command,
        "prompts": prompts,
    }
    write_json(result.out / "study.json", doc)
