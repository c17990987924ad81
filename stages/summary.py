"""Where the results of the last ``dvc repro`` are: ``python -m stages.summary``.

Not a DVC stage (it writes nothing): it reads params.yaml and the stage outputs and prints
the organism's metrics, the feature dashboards, per prompt the graph files, the pruned graph
and its scores, the static figure and the intervention report, and the study's flip rates.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline._io import read_json
from pipeline.devices import arithmetic_in_force
from pipeline.run.compose import load_config
from stages._stage import dashboards_path, parse_args, prompt_dir, shown

ORGANISM_METRICS = {
    "model": ("one_hop_accuracy", "two_hop_trained_accuracy", "two_hop_heldout_accuracy", "prompt_set_accuracy"),
    "plt": ("fve", "l0_total", "dead_share", "agreement_answer_positions"),
    "clt": ("fve", "l0_total", "dead_share", "agreement_answer_positions"),
}


def shown_if(path: Path) -> str:
    return str(path) if path.exists() else "(missing)"


def flips(metrics: Path) -> str:
    """The report's experiment outcome in a few words."""
    if not metrics.exists():
        return "(missing)"
    m = read_json(metrics)
    n, k = m.get("n_checked"), m.get("n_flipped")
    return f"(experiments: {k}/{n} flipped)" if n else ""


def heads_line(path: Path) -> str:
    """The heads that carry the most of the top edges, as the qk stage ranked them."""
    if not path.is_file():
        return "(missing: run dvc repro)"
    heads = read_json(path)["heads"][:3]
    return (
        "(top heads: " + ", ".join(f"L{h['layer']}H{h['head']} {h['query_pos']}->{h['key_pos']}" for h in heads) + ")"
    )


def main(argv=None) -> int:
    args = parse_args(__doc__, argv=argv)
    cfg = load_config(args.params)
    missing = 0
    if cfg.model.name == "models/organism/model":
        for name, keys in ORGANISM_METRICS.items():
            path = Path("metrics/organism") / f"{name}.json"
            if path.exists():
                print(f"organism {name:5s} {path}  {shown(read_json(path), keys)}")
            else:
                print(f"organism {name:5s} {path}  (missing: run dvc repro)")
                missing += 1
        a = arithmetic_in_force()
        # the organism's bytes, and the rates measured on it, depend on the CPU unless portable
        if cfg.runtime.arithmetic == "portable":
            print(f"organism arithmetic: portable (the code every x86-64 CPU runs), on {a['cpu']}")
        else:
            print(
                f"organism arithmetic: {cfg.runtime.arithmetic}, on {a['cpu']} with torch kernels {a['kernels']}: "
                "another CPU may train another organism (runtime.arithmetic=portable runs the code every x86-64 CPU runs)"
            )
    print(f"\nprompt set {cfg.prompts.name!r}: model {cfg.model.name}, transcoders {cfg.transcoders.source}")
    for pid in cfg.prompts.items:
        run = prompt_dir(pid)
        graph = run / "graph" / f"{cfg.export.slug_prefix}{pid}.json"
        scores = run / "scores.json"
        if not graph.exists() or not scores.exists():
            print(f"  {pid}: incomplete (run dvc repro)")
            missing += 1
            continue
        s = read_json(scores)
        print(
            f"  {pid}: replacement {s['replacement_score']:.3f}  completeness {s['completeness_score']:.3f}  "
            f"kept {s['kept_nodes']}/{s['nodes']} nodes"
        )
        print(f"      graph      {graph}")
        print(f"      figure     {run / 'graph.png'}  {shown_if(run / 'graph.svg')}")
        print(f"      report     {run / 'report' / 'report.md'}  {flips(run / 'report' / 'metrics.json')}")
        print(f"      pruned     {run / 'pruned.npz'}  (full graph {run / 'graph.zarr'})")
        print(f"      capture    {run / 'capture.safetensors'}")
        print(
            f"      attention  {run / 'attention' / 'attention.json'}  {heads_line(run / 'attention' / 'attention.json')}"
        )
    dashboards = dashboards_path(cfg.features)
    print(f"\nfeature dashboards: {dashboards}{'' if dashboards.exists() else '  (missing: run dvc repro)'}")
    summary = Path("metrics/interventions.json")
    if summary.exists():
        m = read_json(summary)
        print(
            f"interventions: {summary}  {m['n_flipped']}/{m['n_checked']} expected flips happened "
            f"({m['flip_rate']:.0%}); by kind "
            + ", ".join(f"{k} {v['n_flipped']}/{v['n_checked']}" for k, v in sorted(m.get("by_kind", {}).items()))
        )
    else:
        print(f"interventions: {summary}  (missing: run dvc repro)")
        missing += 1
    print(
        "\nView a graph: circuit-pipeline serve results/<id>/graph  (or any circuit-tracer / Neuronpedia "
        "viewer: each graph folder holds graph-metadata.json)"
    )
    figures = Path("studies/figures")
    if figures.is_dir():
        print(f"Study figures: {figures}/ (dvc repro studies/dvc.yaml:figures)")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
