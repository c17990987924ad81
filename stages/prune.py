"""Stage prune@<prompt id>: the pruned circuit -> results/<id>/pruned.npz, scores.json.

scores.json (a DVC metric): replacement and completeness scores, kept nodes and edges.
"""

from __future__ import annotations

from pathlib import Path

from pipeline._io import finite_or_none, write_json
from pipeline.graph.pruned import save_pruned_graph
from pipeline.graph.pruning import prune_graph
from pipeline.graph.store import Graph
from pipeline.run.compose import load_config
from stages._stage import parse_args, prompt_dir, remove_stale_temps


def outputs(prompt_id: str) -> tuple[Path, ...]:
    """What this stage writes (dvc.yaml's outs and metrics)."""
    run = prompt_dir(prompt_id)
    return run / "pruned.npz", run / "scores.json"


def main(argv=None) -> None:
    args = parse_args(__doc__, prompt=True, argv=argv)
    remove_stale_temps(*outputs(args.prompt_id))
    cfg = load_config(args.params)
    run = prompt_dir(args.prompt_id)
    graph = Graph.open(run / "graph.zarr")
    result = prune_graph(graph, cfg.pruning.node_threshold, cfg.pruning.edge_threshold)
    save_pruned_graph(graph, result, run / "pruned.npz")  # atomic
    rows, _, _ = result.kept_edges()
    scores = {
        "replacement_score": result.replacement_score,
        "completeness_score": result.completeness_score,
        "kept_nodes": int(result.node_mask.sum()),
        "kept_edges": int(len(rows)),
        "nodes": int(result.n_nodes),
    }
    write_json(run / "scores.json", finite_or_none(scores))
    print(
        f"pruned: {run / 'pruned.npz'}  replacement {result.replacement_score:.3f}  "
        f"completeness {result.completeness_score:.3f}"
    )


if __name__ == "__main__":
    main()
