"""Where the results of the last ``dvc repro`` are: ``python -m stages.summary``.

Not a DVC stage (it writes nothing): it reads params.yaml and the stage outputs and prints,
per prompt, the graph files, the pruned graph and its scores, and the organism's metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages._config import load_config, parse_args
from stages._io import prompt_dir, read_json, shown

ORGANISM_METRICS = {
    "model": ("one_hop_accuracy", "two_hop_trained_accuracy", "two_hop_heldout_accuracy", "prompt_set_accuracy"),
    "plt": ("fve", "l0_total", "dead_share", "agreement_answer_positions"),
    "clt": ("fve", "l0_total", "dead_share", "agreement_answer_positions"),
}


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
        print(f"  {pid}: replacement {s['replacement_score']:.3f}  completeness {s['completeness_score']:.3f}  "
              f"kept {s['kept_nodes']}/{s['nodes']} nodes")
        print(f"      graph      {graph}")
        print(f"      pruned     {run / 'pruned.npz'}  (full graph {run / 'graph.zarr'})")
        print(f"      capture    {run / 'capture.safetensors'}")
    print("\nEach graph folder holds graph-metadata.json: circuit-pipeline serve <folder>, or any "
          "circuit-tracer / Neuronpedia viewer.")
    figures = Path("studies/figures")
    if figures.is_dir():
        print(f"Study figures: {figures}/ (studies/dvc.yaml)")
    print("Intervention reports: not produced by the pipeline yet.")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
