"""Load graph JSON files with circuit-tracer's own graph models (run in its venv).

    bench/.ct-venv/bin/python bench/ct_load_graph.py GRAPH.json [GRAPH.json ...]

For each file, ``circuit_tracer.frontend.graph_models.Model.model_validate`` on its JSON (what
circuit-tracer's ``create_graph_files`` builds before writing, and the shape its local viewer
serves). Prints a JSON list, one result per file: ``ok``, ``slug``, ``n_nodes``, ``n_links``,
how many links carry ``head_loadings`` after loading, the top-level keys the model ignored, or
``error``. Exit status 1 when a file is refused. Imports nothing from this project (circuit-tracer's
venv does not hold it); bench/circuit_tracer_env.sh makes the venv.
"""

from __future__ import annotations

import json
import sys


def load(path: str) -> dict:
    from circuit_tracer.frontend.graph_models import Model
    from pydantic import ValidationError

    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    try:
        model = Model.model_validate(raw)
    except ValidationError as exc:
        return {"path": path, "ok": False, "error": str(exc)}
    dumped = model.model_dump()
    return {
        "path": path,
        "ok": True,
        "slug": model.metadata.slug,
        "n_nodes": len(model.nodes),
        "n_links": len(model.links),
        "links_with_head_loadings": sum("head_loadings" in lk for lk in dumped["links"]),
        "ignored_top_level": sorted(set(raw) - set(dumped)),
    }


def main(paths: list[str]) -> int:
    results = [load(p) for p in paths]
    print(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
