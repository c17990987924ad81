"""``circuit-pipeline``: the command line.

Subcommands call library functions; they parse arguments and print where results are. The
attribution and pruning options are generated from the config dataclasses (names, types,
defaults, help), and the study's ``key=value`` words are Hydra overrides of ``conf/study.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import resource
import sys
import time
import typing
from collections.abc import Iterable
from pathlib import Path

import torch

from pipeline.devices import check_device_dtype, pin_cpu_arithmetic
from pipeline.run.config import DTYPES, AttributionSpec, PruningSpec

# A subcommand imports the library modules it runs inside its function: building the parser
# needs only the config dataclasses, `serve`, `aggregate` or `--help` should not start by
# importing the models, the dashboards, matplotlib, Hydra or the study engines, and a DVC stage
# that runs one subcommand depends on what that one imports, not on every subcommand's code.


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: give a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive: give an integer >= 1")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give one in (0, 1]") from None
    if not 0.0 < value <= 1.0:  # False for NaN too
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]: give a number above 0 and at most 1")
    return value


def port(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number: give 0-65535")
    return value


def existing_path(text: str) -> str:
    """argparse type: a file or folder that exists."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def existing_dir(text: str) -> str:
    """argparse type: a folder that exists."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder" if Path(text).exists() else f"{text} does not exist")
    return text


#: a dataclass field's ``metadata["check"]``: its argparse type
CHECKS = {"positive": positive_int, "probability": probability}


def add_options(parser: argparse.ArgumentParser, cls: type, *, defaults: bool = True) -> None:
    """One ``--option`` per field of the dataclass ``cls``, with the field's type, default and
    ``metadata`` (``help``, ``choices``, ``check``: the argparse type in :data:`CHECKS`); a bool is
    ``--name / --no-name``. ``defaults=False``: every option is None unless given, for options
    that override a composed config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        options: dict = {"default": f.default if defaults else None, "help": f.metadata.get("help")}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = CHECKS.get(str(f.metadata.get("check"))) or next(
                (t for t in typing.get_args(kind) if t is not type(None)), kind
            )  # Optional[X]: X
            options["choices"] = f.metadata.get("choices")
        parser.add_argument(f"--{f.name.replace('_', '-')}", **options)


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the model computes (checked before anything loads)."""
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the model computes: cpu (default), cuda, cuda:N, mps; a device this machine lacks is an error",
    )


def count_edges(graph) -> int:
    """Stored edges among the graph's nodes, counted one row batch at a time."""
    return sum(block.nnz for _, block in graph.iter_row_blocks())


def cmd_attribute(args: argparse.Namespace) -> int:
    # this subcommand's own code (see the top of the module)
    from pipeline.engine.attribution import attribute
    from pipeline.engine.replacement import ReplacementModel
    from pipeline.memory import release_freed_buffers
    from pipeline.run.prompt_sets import logit_targets

    release_freed_buffers()
    spec = AttributionSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AttributionSpec)})
    t0 = time.perf_counter()
    model = ReplacementModel.from_pretrained(
        args.model, args.transcoders, dtype=spec.dtype, device=args.device, lazy_encoder=True
    )  # attribution encodes once
    graph = attribute(
        args.prompt,
        model,
        config=spec,
        logit_targets=logit_targets(args.logit_target),
        store=args.out,
        verbose=not args.quiet,
    )
    print(
        f"graph: {args.out}  nodes={graph.n_nodes} edges={count_edges(graph)} "
        f"wall={time.perf_counter() - t0:.1f}s peak_rss={peak_rss_mib():.0f}MiB"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Read every chunk of a graph store and check it against its checksums and records."""
    from pipeline.graph.store import fix_hint, root_meta, verify_store  # this subcommand's own code

    path = Path(args.store)
    problems = verify_store(path)
    if problems:
        print(f"damaged: {path}: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  - {problem}")
        if root_meta(path) is not None:
            print(fix_hint(path))
        return 1
    meta = root_meta(path) or {}
    summary = meta.get("summary", {})
    checksums = "every chunk checksummed (CRC32C)" if meta.get("version", 0) >= 2 else "no chunk checksums (format 1)"
    print(
        f"ok: {path}: format {meta.get('version')}, {summary.get('n_batches')} batches, "
        f"{summary.get('n_rows')} rows, {summary.get('nnz')} entries; every array read, every batch "
        f"matches its progress record; {checksums}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a tiny GPT-2 and transcoders, then attribute a prompt: a smoke run of the engine."""
    # this subcommand's own code (see the top of the module)
    from pipeline import testing
    from pipeline.engine.attribution import attribute
    from pipeline.engine.replacement import ReplacementModel

    check_device_dtype(args.device, args.dtype)  # before building anything
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = testing.make_tiny_gpt2(out / "model", n_layers=4, d_model=64, n_heads=4, n_ctx=64)
    tc_dir = testing.make_random_plt(
        out / "transcoders", n_layers=4, d_model=64, d_transcoder=512, activation="jump_relu", skip=True
    )
    model = ReplacementModel.from_pretrained(model_dir, tc_dir, device=args.device, dtype=args.dtype)
    words = testing.vocabulary_words(model_dir)[:12]
    prompt = " ".join(words)
    t0 = time.perf_counter()
    graph = attribute(prompt, model, batch_size=64, store=out / "graph.zarr", verbose=not args.quiet)
    print(
        f"demo graph of {prompt!r}: {out / 'graph.zarr'}  nodes={graph.n_nodes} "
        f"edges={count_edges(graph)} device={model.device} dtype={args.dtype} "
        f"wall={time.perf_counter() - t0:.1f}s peak_rss={peak_rss_mib():.0f}MiB"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the graph viewer for the graph JSON files of a folder (see pipeline.viewer.server)."""
    from pipeline.viewer.server import limits_from_args, serve  # this subcommand's own code (see the top of the module)

    return serve(
        args.graph_dir, args.host, args.port, open_browser=args.open, quiet=args.quiet, limits=limits_from_args(args)
    )


#: the DashboardConfig fields `features` takes as options of the same names
DASHBOARD_OPTIONS = ("top_k", "max_tokens", "batch_tokens", "seq_len", "n_quantiles", "seed", "checkpoint_every")


def cmd_features(args: argparse.Namespace) -> int:
    """Feature dashboards of every transcoder feature from a corpus (see pipeline.analysis.dashboards)."""
    # this subcommand's own code (see the top of the module)
    from pipeline.analysis import dashboards as D
    from pipeline.engine.replacement import ReplacementModel

    check_device_dtype(args.device, args.dtype)  # before a corpus download
    corpus: Iterable[str]  # re-iterable: dashboards read it twice
    if args.corpus:
        corpus = D.read_corpus(args.corpus, field=args.field)
    elif args.hf_dataset:
        corpus = D.hf_dataset_corpus(args.hf_dataset, args.split, args.field, config=args.hf_config)
    else:
        corpus = D.organism_corpus(args.world, args.n_documents)
    cfg = D.DashboardConfig(**{name: getattr(args, name) for name in DASHBOARD_OPTIONS})
    t0 = time.perf_counter()
    model = ReplacementModel.from_pretrained(args.model, args.transcoders, dtype=args.dtype, device=args.device)
    out = D.compute_dashboards(model, corpus, args.out, cfg, progress=not args.quiet, overwrite=args.overwrite)
    dash = D.Dashboards.open(out)
    print(
        f"dashboards: {out}  layers={dash.n_layers} features={dash.d_transcoder} "
        f"tokens={dash.n_tokens} wall={time.perf_counter() - t0:.1f}s peak_rss={peak_rss_mib():.0f}MiB"
    )
    return 0


#: the study's flags and the config keys they set, as Hydra overrides (``--jobs 4``:
#: ``launcher.jobs=4``) or, for paths and names, on the composed result
STUDY_FLAGS = {
    "prompts": "prompts",
    "model": "model",
    "transcoders": "transcoders",
    "out": "out",
    "scan": "export.scan",
    "launcher": "launcher",
    "jobs": "launcher.jobs",
    "threads": "launcher.threads",
    "device": "launcher.device",
    **{f.name: f"attribution.{f.name}" for f in dataclasses.fields(AttributionSpec)},
    **{f.name: f"pruning.{f.name}" for f in dataclasses.fields(PruningSpec)},
}
_APPLIED_AFTER = ("prompts", "model", "transcoders", "out", "scan")  # paths: no override quoting


def _study_overrides(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` words, then the flags given as Hydra overrides; a key both give is an
    error."""
    words = list(args.overrides)
    keys = {w.split("=", 1)[0].lstrip("+~") for w in words}
    given = {name: key for name, key in STUDY_FLAGS.items() if getattr(args, name) is not None}
    for name, key in given.items():
        if any(k == key or k.startswith(f"{key}.") for k in keys):
            raise ValueError(f"{key} given twice (--{name.replace('_', '-')} and {key}=)")
    for name, key in given.items():
        if name not in _APPLIED_AFTER:
            value = getattr(args, name)
            words.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return [*words, *(f"launcher.{opt}" for opt in args.launcher_opt or ())]


def cmd_study(args: argparse.Namespace) -> int:
    """Run a prompt set as a batch study on a launcher (see pipeline.run.study)."""
    # this subcommand's own code (see the top of the module)
    from pipeline.run.compose import compose_study
    from pipeline.run.prompt_sets import CONF_PROMPTS, load_prompt_set, prompt_set_from_spec
    from pipeline.run.study import StudySettings, run_study

    cfg, choices = compose_study(_study_overrides(args))
    if args.prompts:
        prompt_set = load_prompt_set(args.prompts)
    else:
        prompt_set = prompt_set_from_spec(cfg.prompts, source=str(CONF_PROMPTS / f"{choices['prompts']}.yaml"))
    settings = StudySettings.from_config(cfg)
    if args.model:
        settings = dataclasses.replace(settings, model=args.model, model_revision=None)
    if args.transcoders:
        settings = dataclasses.replace(settings, transcoders=args.transcoders, transcoders_revision=None)
    if args.scan:
        settings = dataclasses.replace(settings, scan=args.scan)
    out = args.out or cfg.out or str(Path("studies") / prompt_set.name)
    only = [i for i in args.only.split(",") if i] if args.only else None
    result = run_study(
        prompt_set,
        settings,
        out,
        cfg.launcher,
        graphs_dir=args.graphs,
        only=only,
        command=["circuit-pipeline", *args.argv],  # the rerun of the failed prompts appends --only
        progress=not args.quiet,
    )
    print(
        f"study: {Path(out) / 'study.json'}  graphs: {Path(out) / 'viewer'} "
        f"(circuit-pipeline serve {Path(out) / 'viewer'})"
    )
    return 1 if result.failed else 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    """Recurring features, the union task circuit and figures of a study (see pipeline.analysis.aggregate)."""
    # this subcommand's own code (see the top of the module)
    from pipeline.analysis.aggregate import aggregate_study

    out = Path(args.out) if args.out else Path(args.study_dir) / "aggregate"
    agg = aggregate_study(
        args.study_dir,
        out,
        align=args.align,
        min_prompts=args.min_prompts,
        top=args.top,
        labels=args.labels,
        figures_dir=args.figures_dir,
        figures=not args.no_figures,
        group_by=args.group_by,
    )
    top = agg["features"][:5]
    print(
        f"aggregate of {agg['n_prompts']} prompts: {out / 'aggregate.json'}  task circuit "
        f"{out / 'graph'} ({agg['task_circuit']['nodes']} nodes, {agg['task_circuit']['links']} links)"
    )
    for r in top:
        print(
            f"  L{r['layer']} F{r['feature']}: {r['n_prompts']}/{agg['n_prompts']} prompts, mean influence "
            f"{r['mean_influence']:.3g}  {r['label']}".rstrip()
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
    add_options(p, AttributionSpec)
    p.add_argument(
        "--logit-target",
        action="append",
        default=None,
        metavar="TOKEN[,TOKEN]",
        help="a token to attribute from (repeatable); 'A,B' attributes the difference A - B",
    )
    add_device(p)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("verify", help="check a graph store: read every chunk, exit 1 if anything is damaged")
    p.add_argument("store", help="graph store (Zarr directory) written by attribute")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="attribute a prompt on a tiny built-in model (no downloads)")
    p.add_argument("--out", default="demo")
    add_device(p)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="load dtype of model and transcoders")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="open exported graph JSON files in the local viewer")
    p.add_argument("graph_dir", type=existing_dir, help="folder with graph-metadata.json and {slug}.json files")
    p.add_argument("--port", type=port, default=8000, help="TCP port (0: any free one)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds a silent connection is kept open (default 20)")
    p.add_argument("--workers", type=int, default=32, help="threads answering requests (default 32)")
    p.add_argument("--backlog", type=int, default=128, help="listen queue length (default 128)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("features", help="compute feature dashboards (top examples, logits, labels) from a corpus")
    p.add_argument("--model", required=True, help="Hugging Face model name or local directory")
    p.add_argument("--transcoders", required=True, help="transcoder directory or HF repo id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="local corpus: .txt (one document per line) or .jsonl")
    src.add_argument("--hf-dataset", help="Hugging Face dataset name (needs `datasets` and the hub)")
    src.add_argument("--world", type=existing_path, help="the organism's world.json: use its corpus (World.corpus)")
    p.add_argument("--field", default="text", help="text field of .jsonl / dataset records")
    p.add_argument("--split", default="train", help="dataset split (--hf-dataset)")
    p.add_argument("--hf-config", default=None, help="dataset config name (--hf-dataset)")
    p.add_argument("--n-documents", type=positive_int, default=4096, help="sentences drawn from --world")
    p.add_argument("--out", required=True, help="dashboards store to write (Zarr directory)")
    p.add_argument("--top-k", type=positive_int, default=20)
    p.add_argument("--max-tokens", type=positive_int, default=None)
    p.add_argument("--batch-tokens", type=positive_int, default=2048)
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default min(n_ctx, 128))")
    p.add_argument("--n-quantiles", type=positive_int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=positive_int, default=20, help="batches between checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dashboards store")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="load dtype of model and transcoders")
    add_device(p)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("study", help="run a prompt set (batch study) on local processes, SLURM or Ray")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Hydra overrides of conf/study.yaml: prompts=capitals launcher=submitit_slurm "
        "launcher.slurm.partition=gpu model=<conf/model choice> transcoders=<conf/transcoders choice> "
        "attribution.batch_size=64 pruning.node_threshold=0.7 out=DIR",
    )
    p.add_argument("--prompts", default=None, help="prompt set: a .yaml/.jsonl/.csv file or a conf/prompts name")
    p.add_argument("--model", default=None, help="Hugging Face model name or local directory (default: the organism)")
    p.add_argument("--transcoders", default=None, help="transcoder directory or HF repo id (default: the model's)")
    p.add_argument("--out", default=None, help="study folder (study.json, viewer/, graphs/); default studies/<set>")
    p.add_argument(
        "--launcher",
        default=None,
        help="conf/launcher choice: sequential, local (default), submitit_local, submitit_slurm, ray",
    )
    p.add_argument("--jobs", type=positive_int, default=None, help="jobs at once (overrides the launcher's)")
    p.add_argument(
        "--launcher-opt",
        action="append",
        metavar="KEY=VALUE",
        help="launcher setting, repeatable (e.g. slurm.partition=gpu, prompts_per_job=4)",
    )
    p.add_argument("--graphs", default=None, help="graph cache shared by studies (default OUT/graphs)")
    p.add_argument("--only", default=None, metavar="ID[,ID]", help="run only these prompt ids (e.g. the failed ones)")
    p.add_argument(
        "--scan",
        default=None,
        help="transcoder set name in graph JSON: letters, digits, _ . - only, as Neuronpedia requires "
        "(default: the source, other characters replaced by _)",
    )
    add_options(p, PruningSpec, defaults=False)
    add_options(p, AttributionSpec, defaults=False)
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads per job (overrides the launcher's)"
    )
    p.add_argument(
        "--device", default=None, help="where the jobs run the model: cpu, cuda (overrides the launcher's device)"
    )
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("aggregate", help="recurring features, union task circuit and figures of a study")
    p.add_argument("study_dir", type=existing_dir, help="a study folder (with study.json)")
    p.add_argument("--out", default=None, help="output folder (default STUDY_DIR/aggregate)")
    p.add_argument(
        "--align", choices=["end", "start"], default="end", help="align positions at the prompt's end or start"
    )
    p.add_argument(
        "--min-prompts", type=positive_int, default=1, help="task circuit: features in at least this many prompts"
    )
    p.add_argument("--top", type=positive_int, default=30, help="features in the heatmap")
    p.add_argument(
        "--labels", type=existing_path, default=None, help="feature labels: a dashboards store or a labels JSON file"
    )
    p.add_argument("--figures-dir", default=None, help="where figures go (default OUT/figures)")
    p.add_argument(
        "--group-by", default=None, metavar="TAG", help="order the heatmap's prompts by this tag (e.g. state)"
    )
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(func=cmd_aggregate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    pin_cpu_arithmetic()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
