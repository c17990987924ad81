"""Attribution engine vs a dense in-memory baseline, and a scale case; one command.

    python bench/attribution.py [--quick] [--workdir DIR] [--threads N] [--keep-stores]

Main case (issue 4's benchmark), side by side in one run, each in its own subprocess:
  ours   ``pipeline.engine.attribution.attribute`` (all features, batch 256) streaming into a Zarr
         store: structural zeros skipped, rows grouped by layer, backward passes truncated at
         the batch's layer.
  dense  the same computation written here with the library's pieces, the way a dense
         implementation does it: every row into one (n_nodes x n_nodes) float32 matrix held in
         memory, every column computed for every row (no structural-zero skipping), every
         backward pass from the top of the model (``unembed_in`` is among the outputs of
         ``torch.autograd.grad`` with a zero gradient, so autograd traverses all layers), and
         batches in plain node-index order, ignoring layers.
The dense child then checks both adjacencies are equal (max |ours - dense| over every entry
of every computed row, and max |dense| where ours stores nothing, i.e. structural zeros).

Scale: our engine alone on graphs of growing size, to show that its peak RSS does not grow
with the number of nodes, up to a case whose dense adjacency would take >= 48 GB.

``--quick`` (< 2 min): the same on the small scale-case model with a 48-token prompt.
Results: tables on stdout and ``bench/results/attribution[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402
from bench import fixtures as F  # noqa: E402

DENSE_48GB_NODES = 109_545  # n_nodes**2 * 4 bytes >= 48e9


# ============================================================================ dense baseline
def dense_rows(ff, batch, layout, sources):
    """(B, n_cols) direct effects, computed the dense way.

    The same arithmetic as ``pipeline.engine.rows.compute_rows`` (a single-copy frozen forward
    with one vmapped backward per batch, ``is_grads_batched``), except in the two respects the
    baseline exists to measure: (1) the backward pass always starts at the top of the model (``ff.unembed_in`` is
    an output, with a zero gradient unless the batch holds logit rows), so it runs through
    every layer, and (2) every column is computed for every row, including those at later
    layers / positions (structural zeros).
    """
    import torch

    B = len(batch.nodes)
    n_layers = layout.n_layers

    def zeros_for(read):
        return read.new_zeros((B, *read.shape))

    def inject(g, rows, vecs):
        g[torch.as_tensor(rows), 0, torch.as_tensor(batch.pos[rows])] = vecs.to(g.dtype)

    g_unembed = zeros_for(ff.unembed_in)
    outputs, grad_outputs = [ff.unembed_in], [g_unembed]
    for layer in sorted(set(batch.layer.tolist())):
        rows = np.nonzero(batch.layer == layer)[0]
        if layer == n_layers:
            inject(g_unembed, rows, batch.vectors[rows])
            continue
        read = ff.mlp_inputs[layer]
        g = zeros_for(read)
        inject(g, rows, batch.vectors[rows])
        outputs.append(read)
        grad_outputs.append(g)
    grads = torch.autograd.grad(
        outputs,
        list(ff.mlp_outputs) + [ff.embed],
        grad_outputs,
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )
    grads = [g[:, 0] for g in grads]
    g_out, g_embed = grads[:-1], grads[-1]

    values = torch.zeros(B, layout.n_compute, dtype=ff.embed.dtype)
    for src_layer in range(n_layers):
        dec = sources.decoders[src_layer]  # (n_pos, k_max, n_out, d_model)
        effect = None
        for j, out_layer in enumerate(sources.out_layers[src_layer]):
            g = g_out[out_layer].transpose(0, 1)  # (n_pos, B, d_model)
            term = torch.bmm(g, dec[:, :, j].transpose(1, 2))
            effect = term if effect is None else effect + term
        cols = sources.columns[src_layer]
        valid = cols >= 0
        values[:, cols[valid]] = effect.transpose(0, 1).reshape(B, -1)[:, valid]
        err = (g_out[src_layer] * sources.errors[src_layer][None]).sum(-1)
        start = layout.compute_error_node(src_layer, 0)
        values[:, start : start + layout.n_pos] = err
    tok = (g_embed * sources.tokens[None]).sum(-1)
    tok_start = layout.compute_token_slice.start
    values[:, tok_start : tok_start + layout.n_pos] = tok
    return values.numpy()


def dense_attribution(model, prompt: str, batch_size: int) -> tuple[np.ndarray, dict]:
    """All rows of the attribution graph into one dense matrix (compute order = graph order
    when every feature is selected)."""
    import torch

    from pipeline.engine import rows as R
    from pipeline.engine.targets import salient_logit_targets
    from pipeline.graph.layout import NodeLayout

    times, cpu = {}, {}
    t, c = time.perf_counter(), time.process_time()
    capture = model.capture(prompt)
    active, values = capture.active_features()
    act = active.cpu().numpy()
    targets = salient_logit_targets(model, capture.logits[-1], 10, 0.95)
    layout = NodeLayout(model.n_layers, capture.n_pos, len(act), len(targets))
    features = R.ActiveFeatures(layout, act)
    sources = R.build_sources(model, capture, features, values)
    times["precompute"], cpu["precompute"] = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    ff = model.frozen_forward(capture, batch=1)  # as the engine does: one vmapped backward per batch
    times["frozen_forward"], cpu["frozen_forward"] = time.perf_counter() - t, time.process_time() - c

    t, c = time.perf_counter(), time.process_time()
    n = layout.n_compute
    logit_start = layout.compute_logit_slice.start
    dense = np.zeros((n, n), dtype=np.float32)
    dtype = capture.errors.dtype
    logit_vecs = torch.stack([tg.vector for tg in targets]).to(dtype)
    row_nodes = np.concatenate([np.arange(layout.n_active), logit_start + np.arange(len(targets))])
    n_batches = 0
    for start in range(0, len(row_nodes), batch_size):  # plain index order, layers mixed
        nodes = row_nodes[start : start + batch_size]
        is_feat = nodes < layout.n_active
        feats = nodes[is_feat]
        layer = np.where(is_feat, features.layer[np.where(is_feat, nodes, 0)], model.n_layers)
        pos = np.where(is_feat, features.pos[np.where(is_feat, nodes, 0)], capture.n_pos - 1)
        vecs = torch.empty(len(nodes), model.d_model, dtype=dtype)
        for lay in np.unique(features.layer[feats]):
            sel = np.nonzero(is_feat & (layer == lay))[0]
            f_idx = torch.as_tensor(features.index[nodes[sel]], dtype=torch.long)
            vecs[torch.as_tensor(sel)] = model.transcoders.encoder_vectors(int(lay), f_idx).to(dtype)
        logit_rows = np.nonzero(~is_feat)[0]
        if len(logit_rows):
            vecs[torch.as_tensor(logit_rows)] = logit_vecs[torch.as_tensor(nodes[logit_rows] - logit_start)]
        batch = R.RowBatch(layer.astype(np.int64), pos.astype(np.int64), vecs, nodes.astype(np.int64))
        dense[nodes] = dense_rows(ff, batch, layout, sources)
        n_batches += 1
    times["rows"], cpu["rows"] = time.perf_counter() - t, time.process_time() - c
    info = {
        "n_nodes": int(n),
        "n_active": int(layout.n_active),
        "n_logits": len(targets),
        "n_rows": int(len(row_nodes)),
        "n_batches": n_batches,
        "batch": batch_size,
        "frozen_forward_copies": ff.batch,
        "phase_seconds": {k: round(v, 2) for k, v in times.items()},
        "phase_cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
        "active_features": act,
    }
    return dense, info


def compare(dense: np.ndarray, store: Path, active: np.ndarray) -> dict:
    """Compare our store (graph order) to the dense matrix, one stored batch at a time."""
    from pipeline.graph.store import Graph

    g = Graph.open(store)
    if g.n_nodes != dense.shape[0]:
        return {"equal_layout": False, "why": f"n_nodes {g.n_nodes} vs {dense.shape[0]}"}
    if g.n_selected != g.n_active or not np.array_equal(g.active_features, active):
        return {"equal_layout": False, "why": "active features differ"}
    max_diff = max_outside = max_abs = 0.0
    rows_seen = np.zeros(g.n_nodes, dtype=bool)
    for rows, block in g.iter_row_blocks():
        d = dense[rows]
        s = block.toarray()
        pattern = block.copy()
        pattern.data = np.ones_like(pattern.data)
        stored = pattern.toarray().astype(bool)
        max_diff = max(max_diff, float(np.abs(d - s).max()))
        max_outside = max(max_outside, float(np.abs(d[~stored]).max(initial=0.0)))
        max_abs = max(max_abs, float(np.abs(d).max()))
        rows_seen[rows] = True
    # rows ours does not store (error and token nodes) must be zero in the dense matrix too
    unstored = np.nonzero(~rows_seen)[0]
    max_unstored = float(np.abs(dense[unstored]).max(initial=0.0)) if len(unstored) else 0.0
    return {
        "equal_layout": True,
        "max_abs_diff": max_diff,
        "max_abs_value": max_abs,
        "max_abs_dense_where_ours_stores_nothing": max(max_outside, max_unstored),
        "dense_nonzeros": int(np.count_nonzero(dense)),
        "ours_stored_edges": int(g.summary["nnz"]),
        "rows_compared": int(rows_seen.sum()),
    }


# ============================================================================ children
def _load(params):
    from pipeline.engine.replacement import ReplacementModel

    t = time.perf_counter()
    model = ReplacementModel.from_pretrained(params["model_dir"], params["transcoder_dir"])
    return model, time.perf_counter() - t


def child(params: dict) -> None:
    C.set_threads(params["threads"])
    import torch  # noqa: F401

    from pipeline.engine.attribution import attribute

    load_start = C.loadavg()
    model, load_s = _load(params)
    out = {
        "case": params["case"],
        "load_seconds": round(load_s, 2),
        "pipeline": C.pipeline_version(),
        "rss_after_load_mib": round(C.current_rss_mib(), 1),
        "loadavg_start": load_start,
    }
    prompt = F.prompt(params["prompt_tokens"])
    if params["case"] == "ours":
        store = Path(params["store"])
        if store.exists():
            shutil.rmtree(store)
        t, c = time.perf_counter(), time.process_time()
        graph = attribute(prompt, model, batch_size=params["batch_size"], store=store, verbose=False)
        out["seconds"] = round(time.perf_counter() - t, 2)
        out["cpu_seconds"] = round(time.process_time() - c, 2)
        out["peak_rss_mib"] = round(C.peak_rss_mib(), 1)
        out.update(
            {
                "n_pos": graph.n_pos,
                "n_nodes": graph.n_nodes,
                "n_active": graph.n_active,
                "n_logits": graph.n_logits,
                "stored_edges": int(graph.summary["nnz"]),
                "n_batches": int(graph.summary["n_batches"]),
                "batch": params["batch_size"],
                "store": C.dir_usage(store),
            }
        )
    else:
        t, c = time.perf_counter(), time.process_time()
        dense, info = dense_attribution(model, prompt, params["batch_size"])
        out["seconds"] = round(time.perf_counter() - t, 2)
        out["cpu_seconds"] = round(time.process_time() - c, 2)
        out["peak_rss_mib"] = round(C.peak_rss_mib(), 1)  # before the comparison
        active = info.pop("active_features")
        out.update(info)
        out["dense_matrix_bytes"] = int(dense.nbytes)
        if params.get("compare_store"):
            t = time.perf_counter()
            out["comparison"] = compare(dense, Path(params["compare_store"]), active)
            out["comparison"]["seconds"] = round(time.perf_counter() - t, 2)
    out["loadavg_end"] = C.loadavg()
    C.emit(out)


# ============================================================================ parent
def plan(quick: bool) -> dict:
    if quick:
        return {
            "main": {"spec": F.SCALE, "prompt_tokens": 48, "batch_size": 128},
            "scale": [(F.scale_spec(d), 32, 128) for d in (0.002, 0.008)],
        }
    return {
        "main": {"spec": F.GPT2_SMALL, "prompt_tokens": 32, "batch_size": 256},
        # growing graphs at fixed model size; the last (~123k nodes) is the >= 48 GB
        # dense-equivalent case
        "scale": [(F.GPT2_SMALL, 16, 256)] + [(F.scale_spec(d), 500, 128) for d in (0.002, 0.008)],
    }


def _params(case, fx, prompt_tokens, batch_size, threads, **kw):
    return {
        "case": case,
        "spec": fx.spec.name,
        "model_dir": str(fx.model_dir),
        "transcoder_dir": str(fx.transcoder_dir),
        "prompt_tokens": prompt_tokens,
        "batch_size": batch_size,
        "threads": threads,
        **kw,
    }


def print_main(res: dict) -> None:
    spec, ours, dense, cmp_ = res["fixture"], res["ours"], res["dense"], res["dense"]["comparison"]
    n = ours["n_nodes"]
    print(
        f"\nmain case: {spec['name']} ({spec['n_layers']} layers, d_model {spec['d_model']}, "
        f"vocab {spec['vocab_size']}), PLT {spec['d_transcoder']} features {spec['activation']} "
        f"at density {spec['density']}, {res['prompt_tokens']}-token prompt (BOS included), "
        f"batch {res['batch_size']}, torch threads {res.get('machine', {}).get('torch_threads')}"
    )
    print(
        f"{'variant':8s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MiB':>13s} {'RSS after load':>15s}"
        f" {'load avg start/end':>19s}  notes"
    )
    for name, r in (("ours", ours), ("dense", dense)):
        if name == "ours":
            note = (
                f"{r['n_batches']} batches, store {C.fmt_bytes(r['store']['allocated_bytes'])} "
                f"on disk ({r['store']['files']} files)"
            )
        else:
            note = (
                f"{r['n_batches']} batches, dense matrix {C.fmt_bytes(r['dense_matrix_bytes'])}; "
                f"phases wall {r['phase_seconds']} CPU {r.get('phase_cpu_seconds')}"
            )
        print(
            f"{name:8s} {r['seconds']:8.1f} {r.get('cpu_seconds', float('nan')):8.1f} "
            f"{r['peak_rss_mib']:13.0f} {r['rss_after_load_mib']:15.0f} "
            f"{r['loadavg_start'][0]:9.2f} /{r['loadavg_end'][0]:6.2f}   {note}"
        )
    ratio = res["time_ratio_ours_over_dense"]
    cpu_ratio = res.get("cpu_time_ratio_ours_over_dense")
    met = max(ratio, cpu_ratio or ratio) <= 0.5
    print(
        f"ours/dense time ratio: wall {ratio:.3f}, CPU {cpu_ratio if cpu_ratio is None else round(cpu_ratio, 3)}"
        f" (target <= 0.5: {'met' if met else 'NOT met'}; torch single-threaded, so CPU time is "
        f"the figure that the machine's load does not distort)"
    )
    print(
        f"nodes {n} ({ours['n_active']} active features = "
        f"{ours['n_active'] / (ours['n_pos'] - 1) / spec['n_layers']:.1f} per token per layer, "
        f"{spec['n_layers'] * ours['n_pos']} errors, {ours['n_pos']} tokens, {ours['n_logits']} "
        f"logits); stored edges {ours['stored_edges']} ({ours['stored_edges'] / n**2:.1%} of "
        f"n^2); dense nonzeros {cmp_.get('dense_nonzeros')}"
    )
    print(
        f"equality: max |ours - dense| = {cmp_.get('max_abs_diff'):.3g} "
        f"(max |A| = {cmp_.get('max_abs_value'):.3g}); max |dense| where ours stores nothing "
        f"= {cmp_.get('max_abs_dense_where_ours_stores_nothing'):.3g}; rows compared "
        f"{cmp_.get('rows_compared')}"
    )


def print_scale(rows: list[dict]) -> None:
    print("\nscale: our engine alone on growing graphs (peak RSS should not follow n_nodes)")
    print(
        f"{'model':14s} {'L':>2s} {'d':>4s} {'dens':>6s} {'tok':>4s} {'B':>4s} {'nodes':>7s} "
        f"{'feat/tok/L':>10s} {'dense-eq':>9s} {'stored edges':>13s} {'store disk':>10s} "
        f"{'wall s':>8s} {'CPU s':>8s} {'peak MiB':>9s} {'after load':>10s} {'load':>5s}"
    )
    for r in rows:
        s = r["fixture"]
        print(
            f"{s['name']:14s} {s['n_layers']:2d} {s['d_model']:4d} {s['density']:6g} {r['n_pos']:4d} "
            f"{r['batch']:4d} {r['n_nodes']:7d} "
            f"{r['n_active'] / (r['n_pos'] - 1) / s['n_layers']:10.1f} "
            f"{C.fmt_bytes(r['dense_equivalent_bytes']):>9s} {r['stored_edges']:13d} "
            f"{C.fmt_bytes(r['store']['allocated_bytes']):>10s} {r['seconds']:8.1f} "
            f"{r.get('cpu_seconds', float('nan')):8.1f} {r['peak_rss_mib']:9.0f} "
            f"{r['rss_after_load_mib']:10.0f} {r['loadavg_start'][0]:5.1f}"
        )
    big = [r for r in rows if r["n_nodes"] >= DENSE_48GB_NODES]
    if big:
        r = big[-1]
        ok = r["peak_rss_mib"] <= 4096
        print(
            f">= 48 GB dense-equivalent case: {r['n_nodes']} nodes "
            f"({C.fmt_bytes(r['dense_equivalent_bytes'])} dense float32), all "
            f"{r['n_active']} feature rows computed, peak RSS {r['peak_rss_mib']:.0f} MiB "
            f"({'<=' if ok else '>'} 4 GiB), {r['seconds']:.0f} s wall, store "
            f"{C.fmt_bytes(r['store']['allocated_bytes'])} on disk"
        )
    else:
        print("no case reached 48 GB dense-equivalent (n_nodes >= 109545) in this run")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Attribution engine vs dense baseline; scale case.")
    ap.add_argument("--quick", action="store_true", help="small model, short prompt (< 2 min)")
    ap.add_argument("--workdir", type=Path, default=F.DEFAULT_WORKDIR)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: bench/README.md)",
    )
    ap.add_argument("--keep-stores", action="store_true", help="keep the graph stores written")
    ap.add_argument("--skip-main", action="store_true", help="keep the saved main-case results")
    ap.add_argument("--skip-scale", action="store_true", help="keep the saved scale results")
    ap.add_argument("--report", action="store_true", help="print the saved results; run nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return

    name = "attribution_quick.json" if args.quick else "attribution.json"
    saved = C.RESULTS_DIR / name
    result = json.loads(saved.read_text()) if saved.exists() else {}
    if args.report:
        if "main" in result:
            print_main(result["main"])
        if "scale" in result:
            print_scale(result["scale"]["cases"])
        return
    result.update({"benchmark": "attribution", "quick": args.quick})

    p = plan(args.quick)
    stores = args.workdir / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    info = C.machine_info(args.threads)
    script = Path(__file__)
    print(
        f"attribution benchmark ({'quick' if args.quick else 'full'}); threads {args.threads}; "
        f"{info['cpu_count']} CPUs; load average {info['loadavg_start']}"
    )

    if not args.skip_main:
        m = p["main"]
        spec = m["spec"]
        fx = F.build(spec, args.workdir)
        store = stores / f"main_{spec.name}.zarr"
        ours = C.run_child(
            script,
            _params("ours", fx, m["prompt_tokens"], m["batch_size"], args.threads, store=str(store)),
            threads=args.threads,
            label="ours",
        )
        dense = C.run_child(
            script,
            _params("dense", fx, m["prompt_tokens"], m["batch_size"], args.threads, compare_store=str(store)),
            threads=args.threads,
            label="dense",
        )
        if not args.keep_stores:
            shutil.rmtree(store, ignore_errors=True)
        if ours["pipeline"]["engine_sources_sha256"] != dense["pipeline"]["engine_sources_sha256"]:
            print(
                f"WARNING: the engine's sources changed between the two cases: {ours['pipeline']} vs "
                f"{dense['pipeline']}",
                flush=True,
            )
        result["main"] = {
            "fixture": spec.__dict__,
            "prompt_tokens": m["prompt_tokens"],
            "batch_size": m["batch_size"],
            "machine": {**info, "loadavg_end": C.loadavg()},
            "ours": ours,
            "dense": dense,
            "time_ratio_ours_over_dense": round(ours["seconds"] / dense["seconds"], 4),
            "cpu_time_ratio_ours_over_dense": round(ours["cpu_seconds"] / dense["cpu_seconds"], 4),
        }
        C.save_json(name, result)
        print_main(result["main"])

    if not args.skip_scale:
        rows = []
        for spec, n_tok, bs in p["scale"]:
            fx = F.build(spec, args.workdir)
            store = stores / f"scale_{spec.name}_{n_tok}.zarr"
            r = C.run_child(
                script,
                _params("ours", fx, n_tok, bs, args.threads, store=str(store)),
                threads=args.threads,
                label=f"{spec.name} {n_tok} tok",
            )
            if not args.keep_stores:
                shutil.rmtree(store, ignore_errors=True)
            r["fixture"] = spec.__dict__
            r["dense_equivalent_bytes"] = r["n_nodes"] ** 2 * 4
            rows.append(r)
            result["scale"] = {"machine": {**info, "loadavg_end": C.loadavg()}, "cases": rows}
            C.save_json(name, result)
        print_scale(rows)

    path = C.save_json(name, result)
    print(f"\nload average {info['loadavg_start']} -> {C.loadavg()}; saved {path}")


if __name__ == "__main__":
    main()
