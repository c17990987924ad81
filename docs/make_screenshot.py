"""Regenerate docs/viewer.png: the viewer on an organism graph, a feature's dashboard open.

    python docs/make_screenshot.py                      # organism from models/organism, else built
    python docs/make_screenshot.py --organism /tmp/org  # reuse (or build there) an organism

Steps, all offline and on CPU:

1. the model organism: ``--organism DIR`` (or ``models/organism`` when it holds ``model/``)
   with ``model/`` and ``plt/`` / ``clt/`` (``--kind``, default ``clt``); when ``DIR/model``
   is missing it is built there as ``python -m pipeline.organism DIR`` does (a few minutes);
2. the attribution graph of the prompt (default: ``two_hop_dallas_en`` of
   ``conf/prompts/organism.yaml``, "the capital of the state containing Dallas is");
3. feature dashboards of the transcoders over the organism's corpus
   (``pipeline.analysis.dashboards.compute_dashboards``; resumable, reused when already complete);
4. prune (0.8 / 0.98) and export the graph files with the dashboards' labels as ``clerp``,
   then ``export_feature_json`` for the graph's features;
5. serve the folder (``pipeline.viewer.server``), open it in headless Chromium (Debian's
   ``/usr/bin/chromium`` driven by playwright, no browser download) at 1400 x 900, click a
   feature node (``--node``, default: the feature with the largest direct effect on the top
   logit) and save the screenshot.

Everything but the PNG goes under ``--work`` (default ``/tmp/circuit-pipeline-screenshot``);
serve it yourself with ``circuit-pipeline serve WORK/graph``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
FEATURE = "cross layer transcoder"


def default_prompt(prompt_id: str) -> str:
    import yaml

    doc = yaml.safe_load((REPO / "conf" / "prompts" / "organism.yaml").read_text(encoding="utf-8"))
    return doc["items"][prompt_id]["prompt"]


def organism_dir(arg: str | None, work: Path, threads: int) -> Path:
    if arg is None:
        default = REPO / "models" / "organism"
        path = default if (default / "model").is_dir() else work / "organism"
    else:
        path = Path(arg)
    if not (path / "model").is_dir():
        from pipeline.organism.build import OrganismConfig, build_organism

        print(f"building the organism in {path} (python -m pipeline.organism {path}) ...", flush=True)
        build_organism(path, OrganismConfig(threads=threads), progress=True)
    return path


def world_of(org: Path):
    """The organism's world config: the DVC stage's world.json, else the model's organism.json."""
    candidates = [org / "world.json"]
    if org.parent.name == "models":  # a DVC checkout: models/organism next to data/organism
        candidates.insert(0, org.parent.parent / "data" / "organism" / "world.json")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return json.loads((org / "model" / "organism.json").read_text(encoding="utf-8"))["world"]


def pick_node(doc: dict) -> str:
    """The feature node with the largest direct (positive) edge into the most likely logit."""
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    logits = sorted(
        (n for n in doc["nodes"] if n["feature_type"] == "logit"), key=lambda n: -float(n.get("token_prob") or 0)
    )
    for logit in logits:
        edges = [
            lk
            for lk in doc["links"]
            if lk["target"] == logit["node_id"] and nodes[lk["source"]]["feature_type"] == FEATURE
        ]
        if edges:
            return max(edges, key=lambda lk: lk["weight"])["source"]
    feats = [n for n in doc["nodes"] if n["feature_type"] == FEATURE]
    if not feats:
        raise SystemExit("the pruned graph has no feature node to click")
    return min(feats, key=lambda n: n["influence"])["node_id"]


def screenshot(graph_dir: Path, slug: str, node_id: str, out: Path, width: int, height: int) -> None:
    from playwright.sync_api import sync_playwright

    from pipeline.viewer.server import make_server

    server = make_server(graph_dir, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    user_data = tempfile.mkdtemp(prefix="viewer-chromium-")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                user_data,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": width, "height": height},
            )
            ctx.route(lambda url: not url.startswith(server.url), lambda route: route.abort())
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}?slug={slug}")
            page.wait_for_selector('body[data-ready="1"]', timeout=20_000)
            page.locator(f'#graph g.node[data-id="{node_id}"]').dispatch_event("click")
            page.wait_for_selector('#feature-dashboard[data-state="ok"]', timeout=20_000)
            page.wait_for_selector('body[data-save-state="saved"]', state="attached", timeout=20_000)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            ctx.close()
            if errors:
                raise SystemExit(f"page errors: {errors}")
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(user_data, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organism", help="organism folder (model/, plt/, clt/); built there if missing")
    ap.add_argument(
        "--kind",
        choices=["plt", "clt"],
        default="clt",
        help="transcoders (default clt: its dashboards have per-output-layer logits)",
    )
    ap.add_argument("--prompt-id", default="two_hop_dallas_en", help="prompt of conf/prompts/organism.yaml")
    ap.add_argument("--prompt", help="any prompt instead of --prompt-id's")
    ap.add_argument("--node", help="node id to click (default: strongest direct feature on the top logit)")
    ap.add_argument("--work", default="/tmp/circuit-pipeline-screenshot", help="folder for everything but the PNG")
    ap.add_argument("--out", default=str(REPO / "docs" / "viewer.png"))
    ap.add_argument("--size", default="1400x900", help="viewport WIDTHxHEIGHT")
    ap.add_argument("--n-documents", type=int, default=4096, help="corpus sentences for the dashboards")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from pipeline.analysis import dashboards as D
    from pipeline.analysis.export import create_graph_files
    from pipeline.engine.attribution import attribute
    from pipeline.engine.replacement import ReplacementModel

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    org = organism_dir(args.organism, work, args.threads)
    prompt = args.prompt or default_prompt(args.prompt_id)
    slug = args.prompt_id if not args.prompt else "prompt"
    model = ReplacementModel.from_pretrained(org / "model", org / args.kind)

    store = work / f"dashboards_{args.kind}.zarr"
    dash = None
    if store.exists():  # reuse a finished store of the same model and transcoders
        try:
            dash = D.Dashboards.open(store)
        except (OSError, ValueError):
            dash = None
        if dash is not None and (
            dash.meta["model"]["digest"] != model.digest()
            or dash.meta["transcoders"]["digest"] != model.transcoders.digest()
            or dash.n_tokens == 0
        ):
            dash = None
    if dash is None:
        print(f"dashboards -> {store}", flush=True)
        D.compute_dashboards(
            model,
            D.organism_corpus(world_of(org), args.n_documents),
            store,
            D.DashboardConfig(),
            progress=True,
            overwrite=store.exists(),
        )
        dash = D.Dashboards.open(store)
    else:
        print(f"dashboards: reusing {store}", flush=True)

    graph_store = work / f"{slug}_{args.kind}.zarr"
    if graph_store.exists():
        shutil.rmtree(graph_store)
    print(f"attributing {prompt!r} -> {graph_store}", flush=True)
    graph = attribute(prompt, model, store=graph_store, verbose=False)

    graph_dir = work / "graph"
    if graph_dir.exists():
        shutil.rmtree(graph_dir)
    path = create_graph_files(
        graph,
        slug,
        graph_dir,
        0.8,
        0.98,
        tokenizer=dash.vocab,
        labels=dash.labels(),
        scan=graph.attrs.get("scan") or f"organism-{args.kind}",
    )
    features = D.export_feature_json(dash, path, graph_dir)
    doc = json.loads(path.read_text(encoding="utf-8"))
    node = args.node or pick_node(doc)
    print(
        f"graph: {path} ({len(doc['nodes'])} nodes, {len(doc['links'])} links, "
        f"{len(features)} feature dashboards); clicking {node}",
        flush=True,
    )

    width, height = (int(x) for x in args.size.lower().split("x"))
    out = Path(args.out)
    screenshot(graph_dir, slug, node, out, width, height)
    print(f"screenshot: {out}\nopen the graph yourself: circuit-pipeline serve {graph_dir}")


if __name__ == "__main__":
    main()
