"""Wall time of a study on local processes vs in one process, and of a rerun after adding a prompt.

    python studies/bench_study.py --model models/organism/model --transcoders models/organism/plt \
        [--n 20] [--jobs 2] [--out studies/bench_study.json]

Each measurement is a fresh ``circuit-pipeline study`` subprocess (imports and model loading
included, as a user sees it) in a new temporary folder:

1. ``sequential``: the ``capitals`` set of ``n`` prompts in one process;
2. ``local``: the same on a pool of ``jobs`` worker processes (1 torch thread each);
3. ``rerun+1``: for each launcher, the study folder of (1) / (2) rerun with ``n + 1`` prompts:
   ``n`` keys are skipped, one is computed.

Prints and writes a JSON record (timings, load average before each run, CPU count).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> dict:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    head = next((ln for ln in proc.stdout.splitlines() if ln.startswith("study '")), "")
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return {"wall_s": round(wall, 2), "load_before": round(load, 2), "summary": head}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--transcoders", required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the JSON record here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
        tmp = Path(tmp)
        sets = {}
        for n in (args.n, args.n + 1):
            sets[n] = tmp / f"capitals{n}.yaml"
            generate = [sys.executable, "-m", "pipeline.run.prompt_generators", "capitals"]
            subprocess.run([*generate, "-n", str(n), "--out", str(sets[n])], check=True)
        record = {"n_prompts": args.n, "jobs": args.jobs, "cpu_count": os.cpu_count(), "runs": {}}
        for launcher in ("sequential", "local"):
            base = [
                "circuit-pipeline",
                "-q",
                "study",
                "--model",
                args.model,
                "--transcoders",
                args.transcoders,
                "--out",
                str(tmp / launcher),
                "--launcher",
                launcher,
                "--threads",
                "1",
            ]
            if launcher == "local":
                base += ["--jobs", str(args.jobs)]
            record["runs"][launcher] = run([*base, "--prompts", str(sets[args.n])])
            record["runs"][f"{launcher} rerun+1"] = run([*base, "--prompts", str(sets[args.n + 1])])
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
