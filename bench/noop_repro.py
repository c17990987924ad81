"""How long `dvc repro` and `dvc status` take when nothing changed, for a prompt set.

A no-op `dvc repro` still checks every stage: the hashes of its deps and outs, its command,
and its params (DVC parses params.yaml once for every stage that lists params). The pipeline
issue asks for under 5 s, also with 20 prompts. This script measures it on a real run:

1. clone this repository (HEAD) into the work folder, compose params.yaml with the prompt
   set (``--prompts``; the same composition `dvc exp run -S prompts=...` writes);
2. run the whole pipeline once (`dvc repro`: organism, features, every prompt's stages);
3. time `dvc repro` and `dvc status dvc.yaml` ``--repeats`` times each: wall time, and the CPU time
   of the dvc process (user + system, which the machine's other load distorts less).

    python bench/noop_repro.py                       # capitals: 20 prompts
    python bench/noop_repro.py --prompts organism    # the default set: 8 prompts, with experiments
    python bench/noop_repro.py --prompts organism --n-prompts 20   # the same kind of prompts, 20
    python bench/noop_repro.py --reuse               # skip 1-2 when the work folder has a run

Results: bench/results/noop_repro-<prompts>.json (machine, git head, load averages).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, loadavg, machine_info, save_json  # noqa: E402

WORK = REPO / "bench" / ".work" / "noop_repro"


def _env() -> dict:
    env = dict(os.environ)
    env.update(DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)  # the clone's own stages/ and pipeline/ (cwd) are used
    return env


def dvc(repo: Path, *args: str) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``dvc args`` in ``repo``; (wall s, CPU s of the child, process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc


def cycled_prompt_set(src: Path, dst: Path, name: str, n: int) -> None:
    """Write a prompt set of ``n`` prompts cycling through the items of ``src`` (ids of the
    repeats suffixed ``_r2``, ``_r3``...): a larger set of the same kind, for timing only."""
    import yaml

    doc = yaml.safe_load(src.read_text())
    items = list(doc["items"].items())
    out = {}
    for i in range(n):
        pid, item = items[i % len(items)]
        out[pid if i < len(items) else f"{pid}_r{i // len(items) + 1}"] = item
    dst.write_text(yaml.safe_dump({"name": name, "items": out}, sort_keys=False))


def prepare(repo: Path, prompts: str, n_prompts: int | None) -> str:
    """Clone HEAD into ``repo`` and compose params.yaml with the prompt set; returns its name."""
    if repo.exists():
        shutil.rmtree(repo)
    repo.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    if n_prompts:
        src = repo / "conf" / "prompts" / f"{prompts}.yaml"
        prompts = f"{prompts}_n{n_prompts}"
        cycled_prompt_set(src, repo / "conf" / "prompts" / f"{prompts}.yaml", prompts, n_prompts)
    code = (
        "from dvc.utils.hydra import compose_and_dump; import sys; "
        "compose_and_dump('params.yaml', sys.argv[1], None, 'config', sys.argv[2], [sys.argv[3]])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(repo / "conf"), str(repo / "stages"), f"prompts={prompts}"],
        cwd=repo,
        env=_env(),
        check=True,
    )
    return prompts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default="capitals", help="prompt set (conf/prompts/<name>.yaml)")
    ap.add_argument(
        "--n-prompts",
        type=int,
        default=None,
        help="cycle the set's prompts up to this many (e.g. the 8 organism prompts, with their experiments, to 20)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=WORK)
    ap.add_argument("--reuse", action="store_true", help="time the run already in the work folder")
    args = ap.parse_args(argv)

    label = f"{args.prompts}_n{args.n_prompts}" if args.n_prompts else args.prompts
    repo = args.workdir / label
    report: dict = {"benchmark": "noop_repro", "prompts": label, "machine": machine_info(1)}
    if not args.reuse:
        print(f"[noop] cloning into {repo} and composing prompts={label} ...", flush=True)
        prepare(repo, args.prompts, args.n_prompts)
        print("[noop] full `dvc repro` (the whole pipeline, minutes) ...", flush=True)
        wall, cpu, proc = dvc(repo, "repro", "-q")
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
            return 1
        report["full_repro_s"] = round(wall, 1)
        print(f"[noop] full repro {wall:.0f} s", flush=True)
    elif not (repo / "dvc.lock").is_file():
        ap.error(f"--reuse: {repo} holds no finished run; run without --reuse first")

    import yaml

    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    report["n_stages"] = len(stages)
    report["n_prompts"] = len(yaml.safe_load((repo / "params.yaml").read_text())["prompts"]["items"])
    report["params_yaml_lines"] = len((repo / "params.yaml").read_text().splitlines())
    for command in ("repro", "status"):
        walls, cpus = [], []
        for i in range(args.repeats):
            load = loadavg()
            # status of this pipeline only: a bare `dvc status` also walks studies/dvc.yaml
            wall, cpu, proc = dvc(repo, command, "-q", *(("dvc.yaml",) if command == "status" else ()))
            if command == "repro" and proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            if command == "repro" and proc.stdout.strip():
                print(f"[noop] warning: `dvc repro` printed output (did it run something?):\n{proc.stdout[-500:]}")
            walls.append(wall)
            cpus.append(cpu)
            print(f"[noop] dvc {command} #{i + 1}: {wall:.2f} s wall, {cpu:.2f} s CPU (load {load})", flush=True)
        report[command] = {
            "wall_s": [round(w, 3) for w in walls],
            "cpu_s": [round(c, 3) for c in cpus],
            "median_wall_s": round(statistics.median(walls), 3),
            "median_cpu_s": round(statistics.median(cpus), 3),
        }
    report["loadavg_end"] = loadavg()
    out = save_json(f"noop_repro-{label}.json", report)
    r, s = report["repro"], report["status"]
    print(
        f"\n{report['n_prompts']} prompts, {report['n_stages']} stages, params.yaml {report['params_yaml_lines']} "
        f"lines: no-op `dvc repro` median {r['median_wall_s']:.2f} s wall / {r['median_cpu_s']:.2f} s CPU; "
        f"`dvc status` {s['median_wall_s']:.2f} s / {s['median_cpu_s']:.2f} s (goal < 5 s)\nresults: {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
