"""GPU benchmark: our attribution against circuit-tracer 0.5.0 on GPT-2-small and Gemma-2-2B shapes, in one run.

    python bench/gpu.py                          # on a CUDA machine: every case, both engines
    python bench/gpu.py --only gemma2-64         # some cases (names below)
    python bench/gpu.py --device cpu --quick     # our side alone, tiny shapes, bfloat16: < 1 minute (CI runs it)

Run it from the repository root with the project's venv active, on a machine whose torch is a
CUDA build (``pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu<NNN>``).
circuit-tracer runs in its own venv (``bench/circuit_tracer_env.sh``, made on first use;
see bench/README.md), through ``bench/ct_runner.py``; our engine through ``bench/compare.py
--worker``. Each engine runs every case in a fresh subprocess, one after the other, on the
same token ids, device, dtype and settings. Results: ``bench/results/gpu.json``
(``gpu_quick.json`` for ``--quick``), with the GPU, the versions and the date.

Cases (``--only``), each at ``--dtype`` (default bfloat16, what researchers run), batch size
``--batch-size`` (256), ``max_feature_nodes`` ``--max-feature-nodes`` (8192, circuit-tracer's
demos' setting):

=====================  ====================================================  ======  =================
case                   fixture (``bench/fixtures.py``)                       tokens  notes
=====================  ====================================================  ======  =================
``exact-gpt2small-32`` GPT-2 small shape: 12 layers, d_model 768, 16384-     32      float32, 512 rows:
                       feature JumpReLU PLTs at density 0.004                        the edges check
``gpt2small-64``       the same                                              64      goal below
``gemma2-64``          Gemma-2-2B shape: 26 layers, d_model 2304, 2.6 B      64      goal below
                       parameters, bfloat16 checkpoint; 16384-feature
                       JumpReLU PLTs at density 0.005, circuit-tracer's
                       layout, bfloat16
``gemma2-1024``        the same                                              1024    ``--long-max-feature-nodes``
                                                                                     (1024) rows, batch
                                                                                     ``--long-batch-size`` (64)
=====================  ====================================================  ======  =================

Measured per engine and case: ``attribute``'s wall time (CUDA synchronised), its peak GPU
memory (``torch.cuda.max_memory_allocated`` over the call, the resident weights included),
the process's peak RSS, nodes; and whether the edges are equal: compare.py's
``compare_graphs`` over the nodes both graphs hold, ``max |ours - theirs| / max |theirs|``
within the dtype's tolerance (:data:`EDGE_TOLERANCE`). Our side runs with
``zero_bos_errors=True`` (circuit-tracer's zeroed BOS-position error vectors), so that the
edges can be equal; it changes no timing. In bfloat16 the two engines' forward passes
(TransformerLens 2 and 4) may round a feature across its threshold, and then the graphs have
other nodes and are not compared: ``exact-gpt2small-32`` checks the edges in float32.

Goals (issue 18): at 64 tokens ours takes <= 0.5x circuit-tracer's time and <= 0.5x its peak
GPU memory; ``gemma2-1024`` completes in <= 40 GB of GPU memory where circuit-tracer runs out.
The batch sizes and row counts of ``gemma2-1024`` are a first guess, to be tuned on the first
GPU run; no GPU run has been made yet (docs/performance.md).

``--quick`` builds 2-layer, d_model 64 models of the same two layouts (``tiny_gpt2``,
``tiny_gemma2``) and attributes 32 tokens; with ``--device cpu`` only our engine runs, so
the script and the fixtures' formats cannot rot unseen on a CPU-only CI.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import compare as C  # noqa: E402
from bench import fixtures as F  # noqa: E402
from bench._common import machine_info  # noqa: E402

DEFAULT_WORKDIR = BENCH / ".work" / "gpu"
#: max |ours - theirs| / max |theirs| for the edges to count as equal: float32 to rounding, and
#: in low precision twice the tolerance of each engine against float32 (tests/engine/test_devices.py)
EDGE_TOLERANCE = {"float32": 1e-4, "bfloat16": 4e-2, "float16": 6e-3}
GOAL_RATIO = 0.5  # ours / circuit-tracer's, time and peak GPU memory, at 64 tokens
GOAL_LONG_BYTES = 40e9  # gemma2-1024's peak GPU memory


@dataclass(frozen=True)
class Case:
    """One attribution, run by each engine in its own process.

    fixture: a ``bench/fixtures.py`` spec name; dtype / max_feature_nodes / batch_size: None
    takes the command line's; goal: "ratio" (ours <= 0.5x theirs), "long" (ours <= 40 GB,
    theirs runs out) or None.
    """

    name: str
    fixture: str
    n_tokens: int
    dtype: str | None = None
    max_feature_nodes: int | None = None
    batch_size: int | None = None
    compare_edges: bool = True
    goal: str | None = None


CASES = [
    Case("exact-gpt2small-32", "gpt2small", 32, dtype="float32", max_feature_nodes=512),
    Case("gpt2small-64", "gpt2small", 64, goal="ratio"),
    Case("gemma2-64", "gemma2_2b", 64, goal="ratio"),
    Case("gemma2-1024", "gemma2_2b", 1024, compare_edges=False, goal="long"),
]
QUICK_CASES = [
    Case("tiny-gpt2-32", "tiny_gpt2", 32),
    Case("tiny-gemma2-32", "tiny_gemma2", 32, max_feature_nodes=64),
]


def gpu_info() -> dict | None:
    """The GPUs as nvidia-smi reports them (this process never initialises CUDA: its context
    would take GPU memory beside the measured processes)."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,memory.total,driver_version"
    proc = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    return {"gpus": [line.strip() for line in proc.stdout.splitlines() if line.strip()]}


def build_fixtures(names: list[str], workdir: Path) -> dict[str, F.Fixture]:
    """The fixtures ``names``, built (or found cached) by ``bench/fixtures.py`` in its own
    process: building the Gemma-2-2B shape takes about 25 GB that this process should not keep."""
    subprocess.run(
        [sys.executable, str(BENCH / "fixtures.py"), "--workdir", str(workdir), "--only", *names], check=True
    )
    return {n: F.Fixture(F.SPECS[n], workdir / n / "model", workdir / n / "transcoders") for n in names}


def settings_of(case: Case, args: argparse.Namespace) -> dict:
    """The case's dtype, max_feature_nodes and batch size, the command line's where it sets none."""
    long = case.goal == "long"
    return {
        "dtype": case.dtype or args.dtype,
        "max_feature_nodes": case.max_feature_nodes
        or (args.long_max_feature_nodes if long else args.max_feature_nodes),
        "batch_size": case.batch_size or (args.long_batch_size if long else args.batch_size),
    }


def run_case(case: Case, fixture: F.Fixture, args: argparse.Namespace, engines: list[str]) -> dict:
    """Each engine's run of ``case``: its measurements, and the edges compared."""
    settings = settings_of(case, args)
    tokens, _ = C.token_ids(str(fixture.model_dir), case.n_tokens)
    spec = C._run_spec(
        case.name,
        tokens,
        None,
        batch_size=settings["batch_size"],
        max_feature_nodes=settings["max_feature_nodes"],
        save="full" if case.compare_edges and len(engines) == 2 else "none",
        prune=False,
        export=False,
    )
    setup = {
        "name": fixture.spec.name,
        "model_dir": str(fixture.model_dir),
        "transcoder_dir": str(fixture.transcoder_dir),
        "check_hf_logits": False,
        "runs": [spec],
    }
    row: dict = {"case": case.name, "fixture": fixture.spec.name, "n_pos": case.n_tokens, **settings}
    work = args.workdir / "runs" / case.name
    for engine in engines:
        print(f"[gpu] {case.name}: {engine} on {args.device} ({settings['dtype']}) ...", flush=True)
        result = C.run_engine(
            engine,
            [setup],
            work / engine,
            threads=args.threads,
            timeout_s=args.cap_s,
            mem_cap_gb=None,
            zero_bos_errors=True,
            device=args.device,
            dtype=settings["dtype"],
        )
        info = C._single(result, fixture.spec.name, case.name)
        row[engine] = {
            "status": info.get("status", "ok"),
            **{k: info.get(k) for k in ("attribute_s", "gpu_peak_mb", "peak_rss_mb", "n_nodes", "n_active")},
        }
        if row[engine]["status"] != "ok":
            row[engine]["log_tail"] = result.get("log_tail", "")[-800:]
    if spec["save"] == "full" and all(row[e]["status"] == "ok" for e in engines):
        row["edges"] = compare_edges(work, fixture, case.name, settings["dtype"])
    row["goal"] = goal_of(case, row, engines)
    return row


def _node_ids(g: dict, n_layers: int) -> list[tuple]:
    """What each graph-order node of a saved graph is: ("f", layer, pos, feature), ("e", layer,
    pos), ("t", pos), ("l", token): the same node in both engines' graphs has the same id."""
    n_pos = len(g["input_tokens"])
    ids: list[tuple] = [("f", *map(int, g["active_features"][i])) for i in g["selected_features"]]
    ids += [("e", layer, pos) for layer in range(n_layers) for pos in range(n_pos)]
    ids += [("t", pos) for pos in range(n_pos)] + [("l", int(t)) for t in g["logit_tokens"]]
    return ids


def compare_edges(work: Path, fixture: F.Fixture, run: str, dtype: str) -> dict:
    """Both graphs' edges over the nodes both hold, and the verdict at the dtype's tolerance.

    In low precision the engines may round a feature across its threshold (the graphs then
    have other nodes) or rank two logits the other way; the comparison is over the shared
    nodes, leaving out the error nodes at a (layer, position) whose active features differ (a
    feature missing on one side moved its output into that error node). ``rel``: max |ours -
    theirs| / max |theirs| over those edges; ``active_agreement``: active features both found,
    over those either found. Equal: rel within the tolerance, >= 97 % of the active features
    and >= 90 % of the selected ones shared (tests/engine/test_devices.py's bounds).
    """
    import numpy as np

    n_layers = fixture.spec.n_layers
    ours = C._load_npz(work / "ours" / fixture.spec.name / f"{run}.npz")
    theirs = C._load_npz(work / "theirs" / fixture.spec.name / f"{run}.npz")
    active = [{tuple(map(int, r)) for r in g["active_features"]} for g in (ours, theirs)]
    selected = [{tuple(map(int, g["active_features"][i])) for i in g["selected_features"]} for g in (ours, theirs)]
    flipped = {(layer, pos) for layer, pos, _ in active[0] ^ active[1]}
    ids_o, ids_t = _node_ids(ours, n_layers), _node_ids(theirs, n_layers)
    index_t = {n: i for i, n in enumerate(ids_t)}
    shared = [(i, index_t[n]) for i, n in enumerate(ids_o) if n in index_t]
    io, it = (np.array(x) for x in zip(*shared))
    keep = np.array([not (ids_o[i][0] == "e" and ids_o[i][1:] in flipped) for i in io])
    A_o, A_t = C._dense(ours, len(ids_o)), C._dense(theirs, len(ids_t))
    diff = np.abs(A_o[np.ix_(io, io[keep])].astype(np.float64) - A_t[np.ix_(it, it[keep])])
    rel = float(diff.max(initial=0) / max(float(np.abs(A_t).max(initial=0)), 1e-30))
    out = {
        "rel": rel,
        "tolerance": EDGE_TOLERANCE[dtype],
        "active_agreement": len(active[0] & active[1]) / max(len(active[0] | active[1]), 1),
        "selected_agreement": len(selected[0] & selected[1]) / max(len(selected[1]), 1),
        "same_logit_tokens": bool(np.array_equal(ours["logit_tokens"], theirs["logit_tokens"])),
        "n_active": [len(a) for a in active],
    }
    out["equal"] = rel <= out["tolerance"] and out["active_agreement"] >= 0.97 and out["selected_agreement"] >= 0.9
    return out


def goal_of(case: Case, row: dict, engines: list[str]) -> dict | None:
    """The issue's goal for this case, where both sides of it were measured."""
    ours = row.get("ours", {})
    if case.goal == "long":
        peak = ours.get("gpu_peak_mb")
        out: dict = {
            "ours_completes_within_40GB": ours.get("status") == "ok"
            and peak is not None
            and peak * 2**20 <= GOAL_LONG_BYTES
        }
        if "theirs" in engines:
            out["theirs_runs_out"] = "out of memory" in str(row["theirs"].get("status"))
        return out
    if case.goal == "ratio" and "theirs" in engines and ours.get("status") == row["theirs"].get("status") == "ok":
        theirs = row["theirs"]
        out = {"time_ratio": ours["attribute_s"] / theirs["attribute_s"]}
        if ours.get("gpu_peak_mb") and theirs.get("gpu_peak_mb"):
            out["gpu_memory_ratio"] = ours["gpu_peak_mb"] / theirs["gpu_peak_mb"]
        out["met"] = all(v <= GOAL_RATIO for k, v in out.items() if k.endswith("ratio"))
        return out
    return None


def _cell(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(rows: list[dict], engines: list[str]) -> list[str]:
    head = (
        "| case | tokens | dtype | max_feature_nodes | "
        + " | ".join(f"{e}: time s, GPU peak MiB, RSS MiB, nodes" for e in engines)
        + " | edges equal | goal |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        cells = []
        for e in engines:
            i = r.get(e, {})
            if i.get("status", "ok") != "ok":
                cells.append(i["status"])
            else:
                cells.append(
                    f"{_cell(i.get('attribute_s'))}, {_cell(i.get('gpu_peak_mb'), '{:.0f}')}, "
                    f"{_cell(i.get('peak_rss_mb'), '{:.0f}')}, {i.get('n_nodes')}"
                )
        edges = r.get("edges")
        eq = "-" if edges is None else f"{'yes' if edges['equal'] else 'NO'} ({edges['rel']:.1e})"
        goal = r.get("goal")
        g = "-" if not goal else ", ".join(f"{k}={_cell(v) if isinstance(v, float) else v}" for k, v in goal.items())
        lines.append(
            f"| {r['case']} | {r['n_pos']} | {r['dtype']} | {r['max_feature_nodes']} | "
            + " | ".join(cells)
            + f" | {eq} | {g} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes only")
    ap.add_argument("--only", nargs="+", default=None, metavar="CASE", help="run these cases only")
    ap.add_argument(
        "--engines",
        nargs="+",
        choices=["ours", "theirs"],
        default=None,
        help="default: both on a GPU, ours alone on the CPU",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=list(EDGE_TOLERANCE))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-feature-nodes", type=int, default=8192)
    ap.add_argument("--long-batch-size", type=int, default=64)
    ap.add_argument("--long-max-feature-nodes", type=int, default=1024)
    ap.add_argument("--cap-s", type=float, default=1800, help="time cap of one engine's run of one case")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of each run")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/gpu[_quick].json")
    args = ap.parse_args(argv)

    from pipeline.devices import check_device_dtype

    engines = args.engines or (["ours", "theirs"] if args.device.startswith("cuda") else ["ours"])
    cases = QUICK_CASES if args.quick else CASES
    if args.only:
        unknown = set(args.only) - {c.name for c in cases}
        if unknown:
            ap.error(f"unknown case(s) {sorted(unknown)}: choose from {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in args.only]
    if args.device.startswith("cuda"):
        # in a subprocess: this process never touches CUDA (see gpu_info)
        check = (
            "import sys\nfrom pipeline.devices import DeviceError, check_device_dtype\n"
            f"try:\n    check_device_dtype({args.device!r}, {args.dtype!r})\n"
            "except DeviceError as exc:\n    sys.exit(f'error: {exc}')"
        )
        proc = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr.strip(), file=sys.stderr)
            return 2
    else:
        check_device_dtype(args.device, args.dtype)
    if "theirs" in engines:
        C.ensure_ct_venv()

    out = args.out or BENCH / "results" / ("gpu_quick.json" if args.quick else "gpu.json")
    report: dict = {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device,
        "gpu": gpu_info() if args.device.startswith("cuda") else None,
        "machine": machine_info(args.threads),  # versions, git commit, load
        "engines": engines,
        "edge_tolerance": EDGE_TOLERANCE,
        "rows": [],
    }
    t_all = time.perf_counter()
    fixtures = build_fixtures(sorted({c.fixture for c in cases}), args.workdir / "fixtures")
    report["fixtures_s"] = round(time.perf_counter() - t_all, 1)
    for case in cases:
        report["rows"].append(run_case(case, fixtures[case.fixture], args, engines))
        report["total_s"] = round(time.perf_counter() - t_all, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")  # after every case: a killed run keeps the rest
    lines = table(report["rows"], engines)
    print("\n".join(lines))
    print(f"results: {out}  ({report['total_s']:.0f} s)")
    failed = [r["case"] for r in report["rows"] if r["ours"]["status"] != "ok"]
    if failed:
        print(f"our engine failed on {', '.join(failed)}: see log_tail in {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
