"""Shared helpers for the benchmark scripts: subprocess cases, memory, machine information.

Every measured case runs in a fresh Python subprocess, so that its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own and nothing is warm from another
case. A child prints one line ``@@RESULT@@ {json}`` on stdout; the parent collects it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
_MARK = "@@RESULT@@ "


def set_threads(n: int) -> None:
    """Pin torch (and BLAS/OpenMP, for children) to ``n`` threads."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, or since :func:`reset_peak_rss` (VmHWM;
    ru_maxrss, in KiB, where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Start the peak-RSS high-water mark afresh from now (Linux: ``/proc/self/clear_refs``), so
    that :func:`peak_rss_mib` covers only what follows; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mib() -> float:
    """Resident set size now (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def dir_usage(path: Path) -> dict:
    """Apparent bytes, allocated bytes and file count of everything under ``path``."""
    apparent = allocated = files = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(root, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += 1
    return {"apparent_bytes": apparent, "allocated_bytes": allocated, "files": files}


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None


def pipeline_version() -> dict:
    """git HEAD and a digest of the engine's sources as this process sees them (other people
    edit ``pipeline/`` while benchmarks run: each case records what it ran)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted([*(REPO / "pipeline" / "engine").glob("*.py"), *(REPO / "pipeline" / "graph").glob("*.py")]):
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    return {"git_head": _git("rev-parse", "--short", "HEAD"), "engine_sources_sha256": h.hexdigest()[:16]}


def machine_info(threads: int) -> dict:
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    dirty = _git("status", "--porcelain", "--", "pipeline")
    return {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_bytes": mem_total,
        "loadavg_start": loadavg(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {m: _version(m) for m in ("torch", "transformer-lens", "transformers", "numpy", "scipy", "zarr")},
        "git_head": _git("rev-parse", "--short", "HEAD"),
        "pipeline_dirty": bool(dirty) if dirty is not None else None,
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def load_organism_replacement(organism: Path, kind: str, threads: int):
    """An organism directory (``model/``, ``plt/``, ``clt/``) -> (its world, the float32
    ReplacementModel of its model with the ``kind`` transcoders), with this process's CPU
    arithmetic pinned (as the pipeline pins it) and torch on ``threads`` threads."""
    import torch

    from pipeline.devices import pin_cpu_arithmetic

    pin_cpu_arithmetic()
    torch.set_num_threads(threads)

    from pipeline.engine.replacement import ReplacementModel
    from pipeline.organism.train_model import load_organism
    from pipeline.transcoders import load_transcoders

    _, _, world = load_organism(organism / "model")
    model = ReplacementModel.from_pretrained(
        str(organism / "model"), load_transcoders(organism / kind), dtype=torch.float32
    )
    return world, model


def run_child(script: Path, params: dict, *, threads: int, label: str) -> dict:
    """Run ``script --child PARAMS`` in a fresh interpreter; return its result dict."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["TQDM_DISABLE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(script), "--child", json.dumps(params)]
    print(f"  [{label}] running (load {loadavg()}) ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            result = json.loads(line[len(_MARK) :])
    if proc.returncode != 0 or result is None:
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-5000:]).strip()
        raise RuntimeError(f"case {label} failed (exit {proc.returncode}):\n{tail}")
    result["process_seconds"] = round(elapsed, 2)
    print(f"  [{label}] done in {elapsed:.1f} s", flush=True)
    return result


def emit(result: dict) -> None:
    """Child side: hand ``result`` to the parent."""
    sys.stdout.write(_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def save_json(name: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def mib(x_bytes: float) -> float:
    return x_bytes / 2**20


def fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
