"""Benchmark: head loadings and QK attributions (the qk stage) against the graph's own attribution.

    python bench/attention.py [--quick] [--tokens 32] [--edges 1000] [--heads 8] [--mfn 256] [--threads 1]
    python bench/attention.py --mfn 7500 --out attention-mfn7500.json    # conf/attribution/large.yaml's graph
    python bench/attention.py --mfn 0 --out attention-all.json           # the default: every active feature

At the GPT-2-small shape (``bench/fixtures.py``: 12 layers, d_model 768, 12 heads, 16384-feature
JumpReLU PLTs at density 0.004), on a ``tokens``-token prompt, four steps, each in a fresh
subprocess:

``attribute``: ``attribute`` of the prompt (``max_feature_nodes`` = ``--mfn``, as
``bench/compare.py``'s speed section; ``--mfn 0``: every active feature), store kept.
``prune`` (untimed, not compared): prune the stored graph (0.8 / 0.98) into ``pruned.npz``, as
the prune stage does; the qk stage reads that file and never prunes.
``head_loadings``: ``write_head_loadings`` of the pruned graph's top ``edges`` kept edges with
positions (what the qk stage computes), into a fresh store.
``qk``: ``explain_attention`` on that finished store (its chunks are skipped): ranking the heads
and one QK attribution per top head, i.e. the stage's cost beyond the head loadings.

Reported: each measured call's wall time and peak RSS (the high-water mark reset just before the
call, so loading the model or the pruned graph is not counted twice), both as a multiple of the
attribution's (goal <= 0.5x), and the RSS the call adds to what it started from (model loaded,
store open) as a multiple of what attribution adds (``rss_above_start_x``).
``--quick``: the tiny GPT-2 fixture (2 layers, d_model 64), 16 tokens, 100 edges (seconds).
``--profile``: cProfile the head-loadings case, top functions by cumulative time.

The ratio depends on the graph: head loadings cost about one sweep per distinct source and target
of the top edges, whatever the graph's size, while attribution costs one row per visited
feature. ``--mfn 256`` is the hard case (a graph smaller than any config attributes); the
default config visits every active feature, ``large`` 7500.

Results: ``bench/results/attention[_quick].json`` (``--out``: another name).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for p in (str(REPO), str(BENCH_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from _common import (  # noqa: E402
    current_rss_mib,
    emit,
    loadavg,
    machine_info,
    peak_rss_mib,
    reset_peak_rss,
    run_child,
    save_json,
    set_threads,
)

WORKDIR = BENCH_DIR / ".work" / "attention"


# ----------------------------------------------------------------------------- child side
def _model(spec_name: str):
    import torch
    from fixtures import SPECS, build

    from pipeline.engine.replacement import ReplacementModel

    fx = build(SPECS[spec_name], BENCH_DIR / ".work", verbose=False)
    return ReplacementModel.from_pretrained(fx.model_dir, fx.transcoder_dir, dtype=torch.float32)


def _start_measuring(out: dict) -> float:
    """Reset the peak-RSS mark and record the RSS the measured call starts from; the start time."""
    out["peak_rss_reset"] = reset_peak_rss()
    out["rss_before_call_mb"] = round(current_rss_mib(), 1)
    return time.perf_counter()


def child(params: dict) -> dict:
    set_threads(params["threads"])
    from fixtures import prompt

    from pipeline.graph.store import Graph

    if params["case"] == "prune":  # untimed: the qk stage reads the prune stage's pruned.npz
        from pipeline.graph.pruned import save_pruned_graph
        from pipeline.graph.pruning import prune_graph

        work = Path(params["work"])
        graph = Graph.open(work / "graph.zarr")
        t0 = time.perf_counter()
        result = prune_graph(graph, 0.8, 0.98)
        save_pruned_graph(graph, result, work / "pruned.npz")
        return {"case": "prune", "seconds": round(time.perf_counter() - t0, 3), "kept_edges": int(result.edge_mask.nnz)}

    model = _model(params["spec"])
    rss_loaded = current_rss_mib()
    work = Path(params["work"])
    case = params["case"]
    out: dict = {"case": case, "rss_after_load_mb": round(rss_loaded, 1)}
    if case == "attribute":
        from pipeline.engine.attribution import attribute

        store = work / "graph.zarr"
        shutil.rmtree(store, ignore_errors=True)
        text = prompt(params["tokens"])
        model.digest(), model.transcoders.digest()  # hashed once, untimed (bench/compare.py does the same)
        t0 = _start_measuring(out)
        graph = attribute(
            text,
            model,
            store=store,
            max_feature_nodes=params["mfn"] or None,
            batch_size=params["batch_size"],
            verbose=False,
        )
        out["seconds"] = time.perf_counter() - t0
        out.update(n_pos=int(graph.n_pos), n_nodes=int(graph.n_nodes), n_selected=int(graph.n_selected))
    elif case == "head_loadings":
        from pipeline.engine.head_loadings import top_edges, write_head_loadings
        from pipeline.graph.pruned import load_pruned_graph

        graph = Graph.open(work / "graph.zarr")
        edges = top_edges(load_pruned_graph(work / "pruned.npz").result, params["edges"])
        store = work / "head_loadings.zarr"
        shutil.rmtree(store, ignore_errors=True)
        model.digest(), model.transcoders.digest()
        prof = None
        if params.get("profile"):
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t0 = _start_measuring(out)
        write_head_loadings(graph, edges, model=model, chunk_size=params["chunk_size"], out=store, positions=True)
        out["seconds"] = time.perf_counter() - t0
        if prof is not None:
            import io
            import pstats

            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
            out["profile"] = buf.getvalue()
        out.update(
            n_edges=len(edges),
            n_sources=len(set(edges[:, 0].tolist())),
            n_targets=len(set(edges[:, 1].tolist())),
        )
    else:  # qk: the stage's call on the finished store
        from pipeline.analysis.attention import explain_attention
        from pipeline.graph.pruned import load_pruned_graph

        graph = Graph.open(work / "graph.zarr")
        pruned = load_pruned_graph(work / "pruned.npz")
        model.digest(), model.transcoders.digest()
        t0 = _start_measuring(out)
        doc = explain_attention(
            graph,
            pruned,
            model,
            edges=params["edges"],
            heads=params["heads"],
            terms=20,
            store=work / "head_loadings.zarr",
            chunk_size=params["chunk_size"],
            progress=False,
        )
        out["seconds"] = time.perf_counter() - t0
        out["heads"] = [(h["layer"], h["head"], h["query_pos"], h["key_pos"]) for h in doc["heads"]]
    out["seconds"] = round(out["seconds"], 3)
    out["peak_rss_mb"] = round(peak_rss_mib(), 1)
    return out


# ----------------------------------------------------------------------------- parent side
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Head loadings and QK attributions vs attribution")
    ap.add_argument("--quick", action="store_true", help="tiny GPT-2 fixture, 16 tokens, 100 edges (seconds)")
    ap.add_argument("--tokens", type=int, default=None, help="prompt length (default 32; quick 16)")
    ap.add_argument("--edges", type=int, default=None, help="top pruned edges (default 1000; quick 100)")
    ap.add_argument("--heads", type=int, default=8, help="heads given a QK attribution")
    ap.add_argument("--mfn", type=int, default=256, help="attribution's max_feature_nodes (0: every active feature)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile the head-loadings case")
    ap.add_argument("--out", help="result file name in bench/results (default attention[_quick].json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        emit(child(json.loads(args.child)))
        return
    spec = "tiny_gpt2" if args.quick else "gpt2small"
    from fixtures import SPECS, build

    build(SPECS[spec], BENCH_DIR / ".work")  # outside the timed children
    work = WORKDIR / spec
    work.mkdir(parents=True, exist_ok=True)
    params = {
        "spec": spec,
        "work": str(work),
        "tokens": args.tokens or (16 if args.quick else 32),
        "edges": args.edges or (100 if args.quick else 1000),
        "heads": args.heads,
        "mfn": args.mfn,
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "threads": args.threads,
        "profile": args.profile,
    }
    report = {"machine": machine_info(args.threads), "settings": params, "cases": {}}
    t_all = time.perf_counter()
    for case in ("attribute", "prune", "head_loadings", "qk"):
        report["cases"][case] = run_child(Path(__file__), {**params, "case": case}, threads=args.threads, label=case)
    base = report["cases"]["attribute"]
    ratios = {}
    for case in ("head_loadings", "qk"):
        r = report["cases"][case]
        ratios[case] = {
            "time_x": round(r["seconds"] / base["seconds"], 3),
            "peak_rss_x": round(r["peak_rss_mb"] / base["peak_rss_mb"], 3),
            # what the call adds to the RSS it started from (the model loaded, the store open)
            "rss_above_start_x": round(
                (r["peak_rss_mb"] - r["rss_before_call_mb"])
                / max(base["peak_rss_mb"] - base["rss_before_call_mb"], 1.0),
                3,
            ),
        }
    both = report["cases"]["head_loadings"]["seconds"] + report["cases"]["qk"]["seconds"]
    ratios["stage"] = {"time_x": round(both / base["seconds"], 3)}
    report["ratios"] = ratios
    report["goal"] = "time and peak RSS of head loadings + QK attributions <= 0.5x the attribution's"
    report["loadavg_end"] = loadavg()
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    profile = report["cases"]["head_loadings"].pop("profile", None)
    path = save_json(args.out or ("attention_quick.json" if args.quick else "attention.json"), report)
    print(json.dumps({k: {kk: v for kk, v in c.items()} for k, c in report["cases"].items()}, indent=1))
    print(json.dumps(ratios, indent=1))
    if profile:
        print(profile)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
