"""Out-of-core pruning: time and peak RSS of prune_graph + compute_graph_scores per graph store.

    python bench/pruning.py [STORE.zarr ...]

Without arguments: every finished store that ``python bench/attribution.py --keep-stores``
left under ``bench/.work/stores/`` (the scale cases, up to the >= 48 GB dense-equivalent one).
Each store is pruned in a fresh process (circuit-tracer's defaults: node threshold 0.8, edge
threshold 0.98; the blocks path, reading the store chunk by chunk), so the peak RSS printed is
that of pruning alone next to the size of the graph it pruned. Saves
``bench/results/pruning.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402
from bench import fixtures as F  # noqa: E402


def child(params: dict) -> None:
    C.set_threads(params["threads"])
    # imported after set_threads: numpy's BLAS reads its thread count when it loads
    from pipeline.graph.pruning import compute_graph_scores, prune_graph
    from pipeline.graph.store import Graph
    from pipeline.run.cli import count_edges

    graph = Graph.open(params["store"])
    rss_open = C.current_rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    result = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    t_prune = time.perf_counter() - t0
    t1 = time.perf_counter()
    replacement, completeness = compute_graph_scores(graph)
    t_scores = time.perf_counter() - t1
    C.emit(
        {
            "store": params["store"],
            "n_nodes": int(graph.n_nodes),
            "n_pos": int(graph.n_pos),
            "stored_edges": count_edges(graph),  # one more pass over the store, after the timings
            "store_bytes": C.dir_usage(Path(params["store"]))["allocated_bytes"],
            "rss_after_open_mib": round(rss_open, 1),
            "prune_seconds": round(t_prune, 2),
            "scores_seconds": round(t_scores, 2),
            "prune_and_scores_seconds": round(t_prune + t_scores, 2),
            "cpu_seconds": round(time.process_time() - c0, 2),
            "peak_rss_mib": round(C.peak_rss_mib(), 1),
            "kept_nodes": int(result.node_mask.sum()),
            "kept_edges": int(result.edge_mask.nnz),
            "replacement_score": round(float(replacement), 6),
            "completeness_score": round(float(completeness), 6),
        }
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Out-of-core pruning: time and peak RSS per store.")
    ap.add_argument("stores", nargs="*", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    stores = args.stores or sorted((F.DEFAULT_WORKDIR / "stores").glob("*.zarr"))
    stores = [s for s in stores if (s / "zarr.json").exists()]
    if not stores:
        sys.exit("no graph stores: run `python bench/attribution.py --keep-stores` first, or name stores")
    info = C.machine_info(args.threads)
    rows = []
    for store in stores:
        rows.append(
            C.run_child(
                Path(__file__), {"store": str(store), "threads": args.threads}, threads=args.threads, label=store.name
            )
        )
        C.save_json("pruning.json", {"machine": {**info, "loadavg_end": C.loadavg()}, "cases": rows})
    print(
        f"\n{'store':34s} {'nodes':>7s} {'dense-eq':>9s} {'edges':>12s} {'on disk':>9s} "
        f"{'prune s':>8s} {'CPU s':>7s} {'peak MiB':>9s} {'kept nodes':>10s}"
    )
    for r in rows:
        print(
            f"{Path(r['store']).name:34s} {r['n_nodes']:7d} {C.fmt_bytes(4 * r['n_nodes'] ** 2):>9s} "
            f"{r['stored_edges']:12d} {C.fmt_bytes(r['store_bytes']):>9s} {r['prune_and_scores_seconds']:8.1f} "
            f"{r['cpu_seconds']:7.1f} {r['peak_rss_mib']:9.0f} {r['kept_nodes']:10d}"
        )
    print(f"\nload average {info['loadavg_start']} -> {C.loadavg()}; saved bench/results/pruning.json")


if __name__ == "__main__":
    main()
