"""Stage attribute@<prompt id>: the attribution graph -> results/<id>/graph.zarr.

The graph store is written under tmp/partial/<id>/graph.zarr (never a DVC output) and moved
into place only when finished: a killed run leaves no graph.zarr, and the rerun resumes the
partial store from its last finished batch (a partial store for other inputs is discarded).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from pipeline.engine.attribution import attribute
from pipeline.graph.store import GraphStoreMismatchError
from pipeline.run.compose import load_config
from pipeline.run.prompt_sets import logit_targets
from stages._model import load_replacement_model, read_tokens
from stages._stage import PARTIAL, parse_args, prompt_dir, remove_stale_temps, setup_torch


def main(argv=None) -> None:
    args = parse_args(__doc__, prompt=True, argv=argv)
    remove_stale_temps(prompt_dir(args.prompt_id) / "graph.zarr")
    cfg = load_config(args.params)
    setup_torch(cfg.runtime)
    model = load_replacement_model(cfg, lazy_encoder=True)  # attribution encodes once
    run = prompt_dir(args.prompt_id)
    tokens = read_tokens(run / "tokens.safetensors")
    partial = PARTIAL / args.prompt_id / "graph.zarr"
    partial.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = dict(
        config=cfg.attribution,  # its load dtype is no attribution option: attribute() leaves it out
        logit_targets=logit_targets(cfg.prompts.items[args.prompt_id].logit_targets),
        verbose=False,
    )
    if partial.exists():
        print(f"resuming the partial graph store {partial}")
    try:
        graph = attribute(tokens, model, store=partial, **options)
    except GraphStoreMismatchError:  # left by a run with other inputs: start afresh
        shutil.rmtree(partial)
        graph = attribute(tokens, model, store=partial, **options)
    out = run / "graph.zarr"
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    print(f"graph: {out}  nodes {graph.n_nodes}  features with rows {graph.n_selected}")


if __name__ == "__main__":
    main()
