"""Where our attribution engine spends its time: cProfile of one ``attribute`` call.

    python bench/profile_attribution.py [--quick] [--prompt-tokens N] [--batch-size B] [--device cuda --dtype bfloat16]

Default: the GPT-2-small-shaped main case of ``bench/attribution.py`` (32-token prompt,
batch 256). ``--quick``: the small scale-case model (< 2 min). Prints a phase breakdown
(frozen forward, backward, row assembly, sparsification, store writes, ...) and the top
functions by own time, and saves ``bench/results/profile[_quick].json`` and the raw
``.prof`` file under the work directory. ``--device cuda``: where the host (row conversion,
store writes) and the GPU spend a GPU run's time; CUDA kernels run asynchronously, so their
time shows in the next call that waits for them (the copy of a batch's rows to the host, in
``compute_rows``). Results then go to ``profile_<device>[_quick].json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402
from bench import fixtures as F  # noqa: E402

# phase -> (path suffix of the file, function name); cumulative time of that function
PHASES = [
    ("attribute (total)", "pipeline/engine/attribution.py", "attribute"),
    ("capture (clean forward)", "pipeline/engine/replacement.py", "capture"),
    ("fingerprint (weight digests)", "pipeline/engine/attribution.py", "fingerprint"),
    ("store open/create", "pipeline/graph/writer.py", "open"),
    ("build_sources (decoder rows)", "pipeline/engine/rows.py", "build_sources"),
    ("frozen_forward", "pipeline/engine/replacement.py", "frozen_forward"),
    ("feature_batch (encoder rows)", "pipeline/engine/rows.py", "feature_batch"),
    ("compute_rows (total)", "pipeline/engine/rows.py", "compute_rows"),
    ("  torch.autograd.grad (backward)", "torch/autograd/__init__.py", "grad"),
    ("  torch.bmm (feature effects)", "~", "<built-in method torch.bmm>"),
    ("structural_mask", "pipeline/engine/rows.py", "structural_mask"),
    ("to_csr", "pipeline/engine/rows.py", "to_csr"),
    ("write_batch (store)", "pipeline/graph/writer.py", "write_batch"),
    ("  _create_array (zarr encode+write)", "pipeline/graph/writer.py", "_create_array"),
    ("  write_file (tmp+fsync+rename)", "pipeline/graph/writer.py", "write_file"),
    ("  fsync_tree", "pipeline/_io.py", "fsync_tree"),
    ("  file_digest (sha256 of chunks)", "pipeline/_io.py", "file_digest"),
    ("  _check_batch", "pipeline/graph/writer.py", "_check_batch"),
    ("finalize", "pipeline/graph/writer.py", "finalize"),
]


def _lookup(stats: pstats.Stats, suffix: str, name: str) -> tuple[float, float, int]:
    """(cumulative s, own s, calls) summed over matching functions."""
    cum = own = 0.0
    calls = 0
    for (filename, _line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():
        if suffix == "~":
            hit = filename == "~" and func.startswith(name)
        else:
            hit = filename.endswith(suffix) and func == name
        if hit:
            cum += ct
            own += tt
            calls += nc
    return cum, own, calls


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="cProfile one attribute() call.")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", type=Path, default=F.DEFAULT_WORKDIR)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: bench/README.md)",
    )
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    ap.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    args = ap.parse_args(argv)

    spec = F.SCALE if args.quick else F.GPT2_SMALL
    n_tok = args.prompt_tokens or (24 if args.quick else 32)
    bs = args.batch_size or (128 if args.quick else 256)
    C.set_threads(args.threads)
    info = C.machine_info(args.threads)
    fx = F.build(spec, args.workdir)

    from pipeline.engine.attribution import attribute
    from pipeline.engine.replacement import ReplacementModel

    model = ReplacementModel.from_pretrained(
        str(fx.model_dir), str(fx.transcoder_dir), device=args.device, dtype=args.dtype
    )
    store = args.workdir / "stores" / f"profile_{spec.name}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    print(
        f"profiling attribute() on {spec.name}, {n_tok}-token prompt, batch {bs}, {model.device}, {args.dtype}, "
        f"threads {args.threads}, load {info['loadavg_start']}",
        flush=True,
    )
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    graph = attribute(F.prompt(n_tok), model, batch_size=bs, store=store, verbose=False)
    prof.disable()
    wall = time.perf_counter() - t
    info["loadavg_end"] = C.loadavg()
    raw = args.workdir / f"profile_{'quick' if args.quick else 'full'}.prof"
    prof.dump_stats(raw)
    stats = pstats.Stats(prof)

    total = _lookup(stats, "pipeline/engine/attribution.py", "attribute")[0]
    print(
        f"\nwall {wall:.1f} s (profiled); {graph.n_nodes} nodes, {graph.summary['nnz']} stored "
        f"edges, {graph.summary['n_batches']} batches; load {info['loadavg_start']} -> "
        f"{info['loadavg_end']}\n"
    )
    print(f"{'phase':40s} {'cum s':>9s} {'% total':>8s} {'calls':>7s}")
    phases = {}
    for label, suffix, name in PHASES:
        cum, own, calls = _lookup(stats, suffix, name)
        phases[label.strip()] = {"cumulative_s": round(cum, 3), "own_s": round(own, 3), "calls": calls}
        print(f"{label:40s} {cum:9.2f} {100 * cum / total:7.1f}% {calls:7d}")
    rows = phases["compute_rows (total)"]["cumulative_s"]
    back = phases["torch.autograd.grad (backward)"]["cumulative_s"]
    print(f"{'  row assembly (compute_rows - grad)':40s} {rows - back:9.2f} {100 * (rows - back) / total:7.1f}%")

    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
    top = buf.getvalue()
    print("\ntop functions by own time:")
    print(top[top.index("ncalls") :] if "ncalls" in top else top)
    shutil.rmtree(store, ignore_errors=True)
    name = "profile" if args.device == "cpu" else f"profile_{args.device.replace(':', '')}"
    path = C.save_json(
        f"{name}_quick.json" if args.quick else f"{name}.json",
        {
            "benchmark": "profile",
            "quick": args.quick,
            "fixture": spec.__dict__,
            "prompt_tokens": n_tok,
            "batch_size": bs,
            "device": str(model.device),
            "dtype": args.dtype,
            "wall_seconds": round(wall, 2),
            "n_nodes": graph.n_nodes,
            "stored_edges": graph.summary["nnz"],
            "n_batches": graph.summary["n_batches"],
            "machine": info,
            "pipeline": C.pipeline_version(),
            "phases": phases,
            "top_by_own_time": top.splitlines()[-(args.top + 3) :],
        },
    )
    print(f"saved {path} and {raw}")


if __name__ == "__main__":
    main()
