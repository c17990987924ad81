"""Stage prune@<prompt id>: the pruned circuit -> results/<id>/pruned.npz, scores.json.

scores.json (a DVC metric): replacement and completeness scores, kept nodes and edges.
"""

from __future__ import annotations

from pipeline.graph.pruned import save_pruned_graph
from pipeline.graph.pruning import prune_graph
from pipeline.graph.store import Graph
from stages._config import load_config, parse_args
from stages._io import prompt_dir, write_json


def main(argv=None) -> None:
    args = parse_args(__doc__, prompt=True, argv=argv)
    cfg = load_config(args.params)
    run = prompt_dir(args.prompt_id)
    graph = Graph.open(run / "graph.zarr")
    result = prune_graph(graph, cfg.pruning.node_threshold, cfg.pruning.edge_threshold)
    save_pruned_graph(graph, result, run / "pruned.npz")  # atomic
    rows, _, _ = result.kept_edges()
    write_json(
        run / "scores.json",
        {
            "replacement_score": result.replacement_score,
            "completeness_score": result.completeness_score,
            "kept_nodes": int(result.node_mask.sum()),
            "kept_edges": int(len(rows)),
            "nodes": int(result.n_nodes),
        },
    )
    print(
        f"pruned: {run / 'pruned.npz'}  replacement {result.replacement_score:.3f}  "
        f"completeness {result.completeness_score:.3f}"
    )


if __name__ == "__main__":
    main()
