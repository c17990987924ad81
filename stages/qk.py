"""Stage qk@<prompt id>: which attention heads carry the circuit, and why they attend where they
do -> results/<id>/attention/.

Reads the graph store (results/<id>/graph.zarr, only read: it is the attribute stage's output),
its pruning (results/<id>/pruned.npz) and the replacement model, and runs
``pipeline.analysis.attention.explain_attention`` with the ``qk`` config group: the top
``qk.edges`` kept edges split across the attention heads on their way (head loadings), and a QK
attribution of each of the ``qk.heads`` heads carrying the most of them.

Outputs:
  results/<id>/attention/attention.json      format "circuit-pipeline/attention" (docs/qk-attributions.md)
  results/<id>/attention/head_loadings.zarr  the head loadings (pipeline.engine.head_loadings)

The head loadings are computed into tmp/partial/<id>/attention/head_loadings.zarr (never a DVC
output), chunk by chunk, so a killed run resumes from its last finished chunk; the folder is
then moved into place whole.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from pipeline._io import atomic_path, json_bytes
from pipeline.analysis.attention import explain_attention
from pipeline.engine.head_loadings import HeadLoadingsError
from pipeline.graph.pruned import load_pruned_graph
from pipeline.graph.store import Graph
from pipeline.run.compose import load_config
from stages._model import load_replacement_model
from stages._stage import PARTIAL, parse_args, prompt_dir, remove_stale_temps, setup_torch


def outputs(prompt_id: str) -> tuple[Path, ...]:
    """What this stage writes (dvc.yaml's outs)."""
    return (prompt_dir(prompt_id) / "attention",)


def main(argv=None) -> None:
    args = parse_args(__doc__, prompt=True, argv=argv)
    remove_stale_temps(*outputs(args.prompt_id))
    cfg = load_config(args.params)
    setup_torch(cfg.runtime)
    model = load_replacement_model(cfg)
    run = prompt_dir(args.prompt_id)
    graph = Graph.open(run / "graph.zarr")
    pruned = load_pruned_graph(run / "pruned.npz")
    partial = PARTIAL / args.prompt_id / "attention" / "head_loadings.zarr"
    options = dict(
        edges=cfg.qk.edges,
        heads=cfg.qk.heads,
        terms=cfg.qk.terms,
        expand_attention=cfg.qk.expand_attention,
        chunk_size=cfg.qk.chunk_size,
        prompt_id=args.prompt_id,
    )
    if partial.exists():
        print(f"resuming the partial head loadings {partial}")
    try:
        doc = explain_attention(graph, pruned, model, store=partial, **options)
    except HeadLoadingsError as exc:
        if "another request" not in str(exc):
            raise
        shutil.rmtree(partial)  # left by a run with other inputs: start afresh
        doc = explain_attention(graph, pruned, model, store=partial, **options)
    with atomic_path(run / "attention") as tmp:
        tmp.mkdir()
        (tmp / "attention.json").write_bytes(json_bytes(doc))
        shutil.copytree(partial, tmp / "head_loadings.zarr")
    shutil.rmtree(partial.parent)
    with contextlib.suppress(OSError):  # the prompt's partial folder, when nothing else is in it
        partial.parent.parent.rmdir()
    heads = ", ".join(f"L{h['layer']}H{h['head']}" for h in doc["heads"])
    print(f"attention: {run / 'attention' / 'attention.json'}  {len(doc['edges'])} edges  heads {heads or '-'}")


if __name__ == "__main__":
    main()
