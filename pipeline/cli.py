"""``circuit-pipeline``: the command line.

Subcommands call library functions; they parse arguments and print where results are.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _add_attribution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--update-interval", type=int, default=4)
    p.add_argument(
        "--logit-target",
        action="append",
        default=None,
        metavar="TOKEN[,TOKEN]",
        help="a token to attribute from (repeatable); 'A,B' attributes the difference A - B",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _logit_targets(values: list[str] | None):
    if not values:
        return None
    return [tuple(v.split(",", 1)) if "," in v else v for v in values]


def count_edges(graph) -> int:
    """Stored edges among the graph's nodes, counted one row batch at a time."""
    return sum(block.nnz for _, block in graph.iter_row_blocks())


def cmd_attribute(args: argparse.Namespace) -> int:
    from pipeline.attribution import attribute
    from pipeline.replacement import ReplacementModel

    t0 = time.perf_counter()
    model = ReplacementModel.from_pretrained(args.model, args.transcoders, dtype=DTYPES[args.dtype])
    graph = attribute(
        args.prompt,
        model,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
        update_interval=args.update_interval,
        logit_targets=_logit_targets(args.logit_target),
        store=args.out,
        verbose=not args.quiet,
    )
    print(
        f"graph: {args.out}  nodes={graph.n_nodes} edges={count_edges(graph)} "
        f"wall={time.perf_counter() - t0:.1f}s peak_rss={peak_rss_mib():.0f}MiB"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a tiny GPT-2 and transcoders, then attribute a prompt: a smoke run of the engine."""
    from pipeline import testing
    from pipeline.attribution import attribute
    from pipeline.replacement import ReplacementModel

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = testing.make_tiny_gpt2(out / "model", n_layers=4, d_model=64, n_heads=4, n_ctx=64)
    tc_dir = testing.make_random_plt(
        out / "transcoders", n_layers=4, d_model=64, d_transcoder=512, activation="jump_relu", skip=True
    )
    model = ReplacementModel.from_pretrained(model_dir, tc_dir)
    words = testing.vocabulary_words(model_dir)[:12]
    prompt = " ".join(words)
    t0 = time.perf_counter()
    graph = attribute(prompt, model, batch_size=64, store=out / "graph.zarr", verbose=not args.quiet)
    print(
        f"demo graph of {prompt!r}: {out / 'graph.zarr'}  nodes={graph.n_nodes} "
        f"edges={count_edges(graph)} wall={time.perf_counter() - t0:.1f}s peak_rss={peak_rss_mib():.0f}MiB"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the graph viewer for the graph JSON files of a folder (see pipeline.viewer.server)."""
    from pipeline.viewer.server import serve

    return serve(args.graph_dir, args.host, args.port, open_browser=args.open, quiet=args.quiet)


def cmd_features(args: argparse.Namespace) -> int:
    """Feature dashboards of every transcoder feature from a corpus (see pipeline.dashboards)."""
    from pipeline import dashboards as D
    from pipeline.replacement import ReplacementModel

    if args.corpus:
        corpus = D.read_corpus(args.corpus, field=args.field)
    elif args.hf_dataset:
        corpus = D.hf_dataset_corpus(args.hf_dataset, args.split, args.field, config=args.hf_config)
    else:
        corpus = D.organism_corpus(args.world, args.n_documents)
    cfg = D.DashboardConfig(
        top_k=args.top_k, max_tokens=args.max_tokens, batch_tokens=args.batch_tokens,
        seq_len=args.seq_len, n_quantiles=args.n_quantiles, seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    t0 = time.perf_counter()
    model = ReplacementModel.from_pretrained(args.model, args.transcoders, dtype=DTYPES[args.dtype])
    out = D.compute_dashboards(model, corpus, args.out, cfg, progress=not args.quiet,
                               overwrite=args.overwrite)
    dash = D.Dashboards.open(out)
    print(
        f"dashboards: {out}  layers={dash.n_layers} features={dash.d_transcoder} "
        f"tokens={dash.n_tokens} wall={time.perf_counter() - t0:.1f}s peak_rss={peak_rss_mib():.0f}MiB"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuit-pipeline", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("attribute", help="compute the attribution graph of one prompt")
    p.add_argument("--model", required=True, help="Hugging Face model name or local directory")
    p.add_argument("--transcoders", required=True, help="transcoder directory or HF repo id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="graph store to write (Zarr directory)")
    _add_attribution_args(p)
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("demo", help="attribute a prompt on a tiny built-in model (no downloads)")
    p.add_argument("--out", default="demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="open exported graph JSON files in the local viewer")
    p.add_argument("graph_dir", help="folder with graph-metadata.json and {slug}.json files")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("features", help="compute feature dashboards (top examples, logits, labels) from a corpus")
    p.add_argument("--model", required=True, help="Hugging Face model name or local directory")
    p.add_argument("--transcoders", required=True, help="transcoder directory or HF repo id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="local corpus: .txt (one document per line) or .jsonl")
    src.add_argument("--hf-dataset", help="Hugging Face dataset name (needs `datasets` and the hub)")
    src.add_argument("--world", help="the organism's world.json: use its corpus (World.corpus)")
    p.add_argument("--field", default="text", help="text field of .jsonl / dataset records")
    p.add_argument("--split", default="train", help="dataset split (--hf-dataset)")
    p.add_argument("--hf-config", default=None, help="dataset config name (--hf-dataset)")
    p.add_argument("--n-documents", type=int, default=4096, help="sentences drawn from --world")
    p.add_argument("--out", required=True, help="dashboards store to write (Zarr directory)")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default min(n_ctx, 128))")
    p.add_argument("--n-quantiles", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=20, help="batches between checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dashboards store")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_features)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
