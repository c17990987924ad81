"""Peak RSS of loading the model, the replacement model (lazy / eager decoders), and a forward.

Issue 3's measurement: each case runs in a fresh subprocess and reports
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak) and VmRSS (resident at the end).

    python bench/memory.py [--quick] [--workdir DIR] [--threads N]

Cases (GPT-2-small-shaped random model, 16k-feature JumpReLU PLTs, density 0.004):
  (0) imports only          python + torch + transformer_lens + pipeline imported
  (a) bridge                TransformerBridge.boot_transformers(model_dir)
  (b) replacement, lazy     ReplacementModel.from_pretrained(model_dir, transcoder_dir)
  (c) replacement, eager    ... with load_transcoders(transcoder_dir, lazy_decoder=False)
  (d) (b) + get_activations on a 32-token prompt
``--quick`` runs the same cases on the small scale-case model (a smoke test, < 2 min).
Results: a table on stdout and ``bench/results/memory[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402
from bench import fixtures as F  # noqa: E402

CASES = [
    ("imports", "(0) imports only"),
    ("bridge", "(a) bridge model alone"),
    ("lazy", "(b) ReplacementModel, lazy decoders"),
    ("eager", "(c) ReplacementModel, eager decoders"),
    ("lazy_forward", "(d) (b) + get_activations (32 tok)"),
]


def child(params: dict) -> None:
    C.set_threads(params["threads"])
    import torch  # noqa: F401
    import transformer_lens  # noqa: F401

    from pipeline.engine.replacement import ReplacementModel
    from pipeline.transcoders import load_transcoders

    case = params["case"]
    fx = F.Fixture(F.SPECS[params["spec"]], Path(params["model_dir"]), Path(params["transcoder_dir"]))
    out: dict = {"case": case, "pipeline": C.pipeline_version()}
    t0 = time.perf_counter()
    if case == "bridge":
        from transformer_lens import TransformerBridge

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(str(fx.model_dir), device="cpu", dtype=torch.float32)
        out["n_params"] = sum(p.numel() for p in bridge.original_model.parameters())
    elif case in ("lazy", "lazy_forward"):
        model = ReplacementModel.from_pretrained(str(fx.model_dir), str(fx.transcoder_dir))
    elif case == "eager":
        tc = load_transcoders(str(fx.transcoder_dir), lazy_decoder=False)
        model = ReplacementModel.from_pretrained(str(fx.model_dir), tc)
    out["load_seconds"] = round(time.perf_counter() - t0, 2)
    out["rss_after_load_mib"] = round(C.current_rss_mib(), 1)
    if case == "lazy_forward":
        t1 = time.perf_counter()
        logits, acts = model.get_activations(fx.prompt(params["prompt_tokens"]))
        out["forward_seconds"] = round(time.perf_counter() - t1, 2)
        out["n_pos"] = int(logits.shape[0])
        n_active = int(acts._nnz())
        out["active_features"] = n_active
        out["active_per_token_layer"] = round(n_active / (logits.shape[0] - 1) / acts.shape[0], 1)
    out["rss_end_mib"] = round(C.current_rss_mib(), 1)
    out["peak_rss_mib"] = round(C.peak_rss_mib(), 1)
    C.emit(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Peak RSS of model / replacement-model loading.")
    ap.add_argument("--quick", action="store_true", help="small model, smoke test (< 2 min)")
    ap.add_argument("--workdir", type=Path, default=F.DEFAULT_WORKDIR)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: bench/README.md)",
    )
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return

    spec = F.SCALE if args.quick else F.GPT2_SMALL
    fx = F.build(spec, args.workdir)
    info = C.machine_info(args.threads)
    print(
        f"memory benchmark on {spec.name}: {spec.n_layers} layers, d_model {spec.d_model}, "
        f"vocab {spec.vocab_size}; PLT {spec.d_transcoder} features ({spec.activation}, "
        f"density {spec.density}); threads {args.threads}; load {info['loadavg_start']}"
    )
    results = {}
    for case, _label in CASES:
        params = {
            "case": case,
            "spec": spec.name,
            "model_dir": str(fx.model_dir),
            "transcoder_dir": str(fx.transcoder_dir),
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
        }
        results[case] = C.run_child(Path(__file__), params, threads=args.threads, label=case)
    info["loadavg_end"] = C.loadavg()

    base = results["bridge"]["peak_rss_mib"]
    print()
    print(f"{'case':40s} {'peak RSS MiB':>13s} {'x (a)':>7s} {'RSS at end MiB':>15s} {'load s':>7s}")
    for case, label in CASES:
        r = results[case]
        print(
            f"{label:40s} {r['peak_rss_mib']:13.0f} {r['peak_rss_mib'] / base:7.2f} "
            f"{r['rss_end_mib']:15.0f} {r.get('load_seconds', 0):7.1f}"
        )
    fwd = results["lazy_forward"]
    print(
        f"\n(d): {fwd['n_pos']} positions, {fwd['active_features']} active features "
        f"({fwd['active_per_token_layer']} per token per layer), forward {fwd['forward_seconds']} s"
    )
    tc_bytes = json.loads((args.workdir / spec.name / "fixture.json").read_text())
    print(
        f"files: model {C.fmt_bytes(tc_bytes['model_bytes'])}, transcoders "
        f"{C.fmt_bytes(tc_bytes['transcoder_bytes'])}; load average {info['loadavg_start']} -> "
        f"{info['loadavg_end']}"
    )
    path = C.save_json(
        "memory_quick.json" if args.quick else "memory.json",
        {
            "benchmark": "memory",
            "quick": args.quick,
            "fixture": {
                **tc_bytes["spec"],
                "model_bytes": tc_bytes["model_bytes"],
                "transcoder_bytes": tc_bytes["transcoder_bytes"],
            },
            "prompt_tokens": args.prompt_tokens,
            "machine": info,
            "cases": {
                case: {
                    "label": label,
                    **results[case],
                    "peak_ratio_to_bridge": round(results[case]["peak_rss_mib"] / base, 3),
                }
                for case, label in CASES
            },
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
