"""The engines a study's jobs run on: this process, a local process pool, submitit (a local
job runner or SLURM) or Ray, chosen by a :class:`~pipeline.run.config.LauncherConfig`.

:func:`launch` runs a job function over a list of payloads and yields each payload with its
outcome: the function's result, or the exception that ended the job (killed, timed out,
cannot start); one failed job never stops the others. Job processes inherit the repository on
``PYTHONPATH`` and their thread count in ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from pipeline.devices import DeviceError, check_device_dtype, parse_device
from pipeline.run.config import LauncherConfig

T = TypeVar("T")
Job = Callable[[T], Any]
Outcome = tuple[T, Any]  # (payload, the job's result or the exception that ended it)

_ROOT = Path(__file__).resolve().parents[2]  # put on PYTHONPATH of job processes


class LauncherError(ValueError):
    """The chosen engine cannot start here (not installed, no SLURM, bad settings)."""


def launch(job: Job, payloads: Sequence[T], cfg: LauncherConfig, folder: Path) -> Iterator[Outcome]:
    """Run ``job(payload)`` for every payload on the engine ``cfg`` names, yielding outcomes as
    they finish. ``job`` must be a module-level function (process engines pickle it);
    ``folder``: submitit's job files."""
    engines = {
        "sequential": _run_sequential,
        "local": _run_local,
        "submitit_local": lambda j, p, c: _run_submitit(j, p, c, folder, "local"),
        "submitit_slurm": lambda j, p, c: _run_submitit(j, p, c, folder, "slurm"),
        "ray": _run_ray,
    }
    return engines[cfg.name](job, payloads, cfg)


#: engines whose jobs run on this machine, whose device is checked here before any work
LOCAL_ENGINES = ("sequential", "local", "submitit_local")


def check_launcher(cfg: LauncherConfig, dtype: str = "float32") -> None:
    """Fail before any work when the engine cannot start here, or when its jobs would run on
    this machine and it lacks their device (or that device cannot compute in ``dtype``)."""
    if cfg.name in LOCAL_ENGINES:
        try:
            check_device_dtype(cfg.device, dtype)
        except DeviceError as exc:
            raise LauncherError(f"launcher {cfg.name}: {exc}") from None
    if cfg.name.startswith("submitit"):
        submitit_executor(cfg, Path(tempfile.gettempdir()) / "circuit-study-check", cfg.name.split("_")[1])
    elif cfg.name == "ray":
        _import_ray()


def shard(items: list[T], cfg: LauncherConfig) -> list[list[T]]:
    """``items`` in jobs of ``cfg.prompts_per_job``; by default one per job, except for
    submitit_local, whose job processes do not outlive a job: ``ceil(len / jobs)`` there."""
    if not items:
        return []
    size = cfg.prompts_per_job
    if size is None:
        size = math.ceil(len(items) / cfg.jobs) if cfg.name == "submitit_local" else 1
    return [items[i : i + size] for i in range(0, len(items), size)]


def one_line(exc: BaseException, limit: int = 240) -> str:
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


def _run_sequential(job: Job, payloads: Sequence[T], cfg: LauncherConfig) -> Iterator[Outcome]:
    for p in payloads:
        try:
            yield p, job(p)
        except Exception as exc:  # noqa: BLE001
            yield p, exc


def _start_method(cfg: LauncherConfig) -> str:
    """``fork`` on Linux for CPU jobs (workers inherit the imported modules and the model the
    study loaded for planning: no per-worker start-up), else ``spawn`` (CUDA must not be
    initialised before a fork; other systems do not fork safely)."""
    if cfg.start_method is not None:
        return cfg.start_method
    return "fork" if sys.platform.startswith("linux") and cfg.device == "cpu" else "spawn"


def _run_local(job: Job, payloads: Sequence[T], cfg: LauncherConfig) -> Iterator[Outcome]:
    """concurrent.futures process pool. A worker that dies breaks the pool: the payloads it took
    down are retried, each alone in a fresh one-process pool, so only the culprit fails."""
    ctx = multiprocessing.get_context(_start_method(cfg))
    broken: list[T] = []
    with _job_environment(cfg.threads):
        with ProcessPoolExecutor(max_workers=min(cfg.jobs, len(payloads)), mp_context=ctx) as pool:
            futures = {pool.submit(job, p): p for p in payloads}
            for fut in as_completed(futures):
                p = futures[fut]
                try:
                    yield p, fut.result()
                except BrokenProcessPool:
                    broken.append(p)
                except Exception as exc:  # noqa: BLE001
                    yield p, exc
        for p in broken:
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                try:
                    yield p, pool.submit(job, p).result()
                except BrokenProcessPool:
                    yield p, RuntimeError("the worker process died (killed, out of memory or crashed)")
                except Exception as exc:  # noqa: BLE001
                    yield p, exc


def submitit_executor(cfg: LauncherConfig, folder: Path, cluster: str):
    """submitit's executor for ``cluster`` (``local`` or ``slurm``) with ``cfg``'s settings as
    its parameters (sbatch options for SLURM)."""
    try:
        import submitit  # optional dependency: only the submitit launchers need it
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
    if cluster == "local" and parse_device(cfg.device).type == "cuda":
        # submitit's local jobs see only the GPUs they request (CUDA_VISIBLE_DEVICES): all of
        # this machine's, so that cuda:N means here what it means in the job
        params["gpus_per_node"] = max(1, _gpu_count())
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


def _run_submitit(
    job: Job, payloads: Sequence[T], cfg: LauncherConfig, folder: Path, cluster: str
) -> Iterator[Outcome]:
    ex = submitit_executor(cfg, folder, cluster)
    with _job_environment(cfg.threads):
        try:
            jobs = ex.map_array(job, payloads)
        except Exception as exc:
            raise LauncherError(f"launcher {cfg.name}: submission failed: {one_line(exc)}") from exc
    print(f"submitted {len(jobs)} job(s) to {cluster}; logs in {folder}", flush=True)
    pending = dict(zip((j.job_id for j in jobs), zip(jobs, payloads)))
    while pending:
        finished = [jid for jid, (j, _) in pending.items() if j.done()]
        if not finished:
            time.sleep(0.5)
            continue
        for jid in finished:
            submitted, p = pending.pop(jid)
            try:
                yield p, submitted.result()
            except Exception as exc:  # noqa: BLE001 - FailedJobError, UncompletedJobError, ...
                yield p, exc


def _gpu_count() -> int:
    import torch  # only a GPU study gets here; the launcher module itself stays light

    return torch.cuda.device_count()


def _import_ray():
    try:
        import ray  # optional dependency: only the ray launcher needs it
    except ImportError:
        raise LauncherError("launcher ray needs Ray: pip install 'ray>=2.9'") from None
    return ray


def _run_ray(job: Job, payloads: Sequence[T], cfg: LauncherConfig) -> Iterator[Outcome]:
    ray = _import_ray()
    started = False
    with _job_environment(cfg.threads) as env:
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
            if cfg.ray_address is None:
                kwargs.update(num_cpus=cfg.jobs, object_store_memory=128 * 1024**2)
            try:
                ray.init(address=cfg.ray_address, **kwargs)
            except Exception as exc:
                raise LauncherError(f"launcher ray could not start: {one_line(exc)}") from exc
            started = True
    try:
        # a job that reserves no GPU is hidden from all of them: cuda jobs reserve one by default
        remote = ray.remote(num_cpus=1, num_gpus=cfg.gpus_per_job(), max_retries=0)(job)
        refs = {remote.remote(p): p for p in payloads}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            p = refs[ready[0]]
            try:
                yield p, ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, ...
                yield p, exc
    finally:
        if started:
            ray.shutdown()
