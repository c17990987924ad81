"""Benchmark: feature dashboards (``pipeline.analysis.dashboards``): tokens per second and peak RSS.

    python bench/dashboards.py [--quick] [--threads 2] [--cases organism,gpt2small] [--tokens N]

Cases (each in a fresh subprocess, so its peak RSS is its own):

``organism``: an organism-shaped random model (GPT-2 layout, 2 layers, d_model 128, 4 heads,
n_ctx 16, the toy world's vocabulary) with per-layer JumpReLU transcoders (512 features, skip,
density 0.02), on the organism's corpus (``World.corpus``): the whole ``compute_dashboards``
run, phase by phase.

``gpt2small``: GPT-2 small's shape (12 layers, d_model 768, vocabulary 50257) with 16384-feature
JumpReLU PLTs at density 0.004 (``bench/fixtures.py``), on random sentences of its vocabulary.
The stream phase (forward + encoders + statistics) is measured on ``tokens`` tokens; the
logits phase (``W_dec @ W_U``, 16384 x 768 x 50257 per layer) on ``logit_features`` features of
one layer and extrapolated to all layers (``--quick``), or run in full with the rest of
``compute_dashboards`` (default).

Every case also times, in the same run and on the same batches, a bare forward pass plus every
layer's encoder (``mlp_inputs`` and ``activations`` on the counted positions, nothing else):
the stream's limit. It is interleaved batch by batch with the stream's own processing (see
``_Limit``), after one untimed warm-up batch, and left out of the stream's time;
``stream_vs_limit`` is the stream's tokens/s over the limit's.

``--tokens`` sets the gpt2small case's stream tokens (default: 8192 quick, 16384 full).

Results: ``bench/results/dashboards[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for p in (str(REPO), str(BENCH_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from _common import dir_usage, emit, machine_info, peak_rss_mib, run_child, save_json, set_threads  # noqa: E402

WORKDIR = BENCH_DIR / ".work" / "dashboards"

ORGANISM = dict(n_layers=2, d_model=128, n_heads=4, n_ctx=16, d_transcoder=512, density=0.02)
SIZES = {
    True: {"organism_sentences": 2000, "gpt2_tokens": 8192, "gpt2_logit_features": 2048},
    False: {"organism_sentences": 20000, "gpt2_tokens": 16384, "gpt2_logit_features": None},
}


# ----------------------------------------------------------------------------- child side
class _Timers:
    """Wall time of each compute_dashboards phase (wraps DashboardRun's phases and write_store)."""

    def __init__(self):
        from pipeline.analysis.dashboards import compute

        self.seconds: dict[str, float] = {}
        for owner, name, label in (
            (compute.DashboardRun, "stream", "stream"),
            (compute.DashboardRun, "logits", "logits"),
            (compute.DashboardRun, "contexts", "contexts"),
            (compute, "write_store", "write"),
        ):
            setattr(owner, name, self._wrap(getattr(owner, name), label))

    def _wrap(self, fn, label):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = round(self.seconds.get(label, 0.0) + time.perf_counter() - t0, 2)

        return timed


class _Limit:
    """Interleaves a bare forward + encode of every batch with the stream's own processing.

    While installed, ``DashboardRun._process`` also runs, on the same batch, the forward pass up
    to the last transcoder input and every layer's activations on the counted positions, and
    nothing else (the stream's limit), timing both; which of the two goes first alternates
    from batch to batch. Paired this way, both see the same machine load. ``warm_up`` runs the
    bare pass once, untimed, on the stream's first batch.
    """

    def __init__(self, model):
        from pipeline.analysis.dashboards.compute import DashboardRun

        self.model = model
        self.seconds = 0.0  # in the bare passes
        self.tokens = 0
        self._real = DashboardRun._process
        limit = self

        def paired(run, batch):
            for which in ("bare", "ours") if limit.tokens % 2 else ("ours", "bare"):
                if which == "ours":
                    limit._real(run, batch)
                else:
                    t0 = time.perf_counter()
                    limit.forward_encode(run, batch)
                    limit.seconds += time.perf_counter() - t0
            limit.tokens += batch.n_tokens

        DashboardRun._process = paired  # type: ignore[method-assign]

    def forward_encode(self, run, batch) -> None:
        import torch

        from pipeline.analysis.dashboards.compute import mlp_inputs

        with torch.no_grad():
            for layer, x in enumerate(mlp_inputs(self.model, batch.tokens)):
                run.tc.activations(layer, x[batch.valid])
        if torch.device(run.device).type == "cuda":
            torch.cuda.synchronize(run.device)

    def warm_up(self, corpus, cfg) -> None:
        from pipeline.analysis.dashboards.compute import DashboardRun
        from pipeline.analysis.dashboards.corpus import batches, make_batch, sequences

        run = DashboardRun(self.model, corpus, WORKDIR / "warm-up.zarr", cfg, progress=False)
        first = next(batches(sequences(self.model, run.corpus_iter, run.seq_len, cfg.max_tokens), cfg.batch_tokens))
        self.forward_encode(run, make_batch(first, run.pad_id, run.device))

    def report(self, tokens: int, phases: dict[str, float]) -> dict:
        """``phases["stream"]``: the stream phase's wall time; the bare passes are taken out of it."""
        assert tokens == self.tokens, (tokens, self.tokens)
        ours = phases["stream"] - self.seconds
        phases["stream"] = round(ours, 2)
        return {
            "tokens": tokens,
            "stream_seconds": round(ours, 2),
            "stream_tokens_per_s": round(tokens / ours, 1),
            "limit_seconds": round(self.seconds, 2),
            "limit_tokens_per_s": round(tokens / self.seconds, 1),
            "stream_vs_limit": round(self.seconds / ours, 3),
        }


def _organism_fixture(root: Path):
    from pipeline.organism.world import make_world
    from pipeline.testing import make_random_plt, make_tiny_gpt2

    world = make_world()
    model_dir, tc_dir = root / "model", root / "plt"
    marker = root / "fixture.json"
    spec = json.dumps(ORGANISM, sort_keys=True)
    if not (marker.exists() and marker.read_text() == spec):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        make_tiny_gpt2(
            model_dir,
            n_layers=ORGANISM["n_layers"],
            d_model=ORGANISM["d_model"],
            n_heads=ORGANISM["n_heads"],
            n_ctx=ORGANISM["n_ctx"],
            vocab_words=world.vocabulary(),
        )
        make_random_plt(
            tc_dir,
            n_layers=ORGANISM["n_layers"],
            d_model=ORGANISM["d_model"],
            d_transcoder=ORGANISM["d_transcoder"],
            activation="jump_relu",
            skip=True,
            density=ORGANISM["density"],
        )
        marker.write_text(spec)
    return world, model_dir, tc_dir


def child_organism(params: dict) -> dict:
    from pipeline.analysis import dashboards as D
    from pipeline.engine.replacement import ReplacementModel

    set_threads(params["threads"])
    world, model_dir, tc_dir = _organism_fixture(WORKDIR / "organism")
    corpus = world.corpus(params["organism_sentences"])
    model = ReplacementModel.from_pretrained(model_dir, tc_dir)
    timers = _Timers()
    out = WORKDIR / "organism.zarr"
    shutil.rmtree(out, ignore_errors=True)
    cfg = D.DashboardConfig()
    limit = _Limit(model)
    limit.warm_up(corpus, cfg)
    t0 = time.perf_counter()
    D.compute_dashboards(model, corpus, out, cfg, progress=False)
    total = time.perf_counter() - t0 - limit.seconds
    dash = D.Dashboards.open(out)
    n = dash.n_tokens
    t1 = time.perf_counter()
    rec = dash.feature(1, 7)
    query = time.perf_counter() - t1
    return {
        "case": "organism",
        "fixture": ORGANISM,
        "documents": len(corpus),
        **limit.report(n, timers.seconds),
        "phase_seconds": timers.seconds,
        "total_seconds": round(total, 2),
        "end_to_end_tokens_per_s": round(n / total, 1),
        "feature_query_seconds": round(query, 4),
        "example_label": rec["label"],
        "store": dir_usage(out),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def _gpt2_corpus(n_docs: int, words: list[str]) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) for _ in range(n_docs)]


def child_gpt2small(params: dict) -> dict:
    from fixtures import GPT2_SMALL, build, vocab_words

    from pipeline.analysis import dashboards as D
    from pipeline.analysis.dashboards.compute import DashboardRun
    from pipeline.analysis.dashboards.logits import decoder_logits
    from pipeline.engine.replacement import ReplacementModel

    set_threads(params["threads"])
    fx = build(GPT2_SMALL, verbose=False)
    t0 = time.perf_counter()
    model = ReplacementModel.from_pretrained(fx.model_dir, fx.transcoder_dir)
    load = time.perf_counter() - t0
    rss_loaded = peak_rss_mib()
    corpus = _gpt2_corpus(400, vocab_words(GPT2_SMALL.vocab_size)[:5000])
    cfg = D.DashboardConfig(max_tokens=params["gpt2_tokens"], batch_tokens=1024)
    out = WORKDIR / "gpt2small.zarr"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
    result = {
        "case": "gpt2small",
        "fixture": {**vars(GPT2_SMALL)},
        "load_seconds": round(load, 1),
        "rss_after_load_mib": round(rss_loaded, 1),
        "batch_tokens": cfg.batch_tokens,
    }
    if params["gpt2_logit_features"]:  # quick: the stream phase, and the logits of a slice
        limit = _Limit(model)
        limit.warm_up(corpus, cfg)
        run = DashboardRun(model, corpus, out, cfg, progress=False)
        run.reset_partial()
        t0 = time.perf_counter()
        run.stream()
        result.update(limit.report(int(run.meta["n_tokens"]), {"stream": time.perf_counter() - t0}))
        nf = params["gpt2_logit_features"]

        class Slice:  # the first nf features of layer 0
            kind, d_transcoder = model.transcoders.kind, nf
            output_layers = model.transcoders.output_layers
            decoder_vectors = model.transcoders.decoder_vectors

        t0 = time.perf_counter()
        decoder_logits(Slice, model.W_U, 0, cfg.n_logits, chunk=cfg.logits_chunk)
        logit_s = time.perf_counter() - t0
        per_feature = logit_s / nf
        shutil.rmtree(run.partial, ignore_errors=True)
        result.update(
            {
                "logits_features_timed": nf,
                "logits_features_per_s": round(nf / logit_s, 1),
                "logits_all_layers_seconds_estimate": round(
                    per_feature * GPT2_SMALL.d_transcoder * GPT2_SMALL.n_layers
                ),
            }
        )
    else:
        timers = _Timers()
        limit = _Limit(model)
        limit.warm_up(corpus, cfg)
        t0 = time.perf_counter()
        D.compute_dashboards(model, corpus, out, cfg, progress=False)
        total = time.perf_counter() - t0 - limit.seconds
        n = D.Dashboards.open(out).n_tokens
        result.update(limit.report(n, timers.seconds))
        result.update(
            {
                "phase_seconds": timers.seconds,
                "total_seconds": round(total, 1),
                "end_to_end_tokens_per_s": round(n / total, 2),
                "logits_features_per_s": round(
                    GPT2_SMALL.d_transcoder * GPT2_SMALL.n_layers / timers.seconds["logits"], 1
                ),
                "store": dir_usage(out),
            }
        )
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


# ----------------------------------------------------------------------------- parent side
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes; logits of GPT-2 extrapolated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="organism,gpt2small")
    ap.add_argument("--tokens", type=int, help="stream tokens of the gpt2small case")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        params = json.loads(args.child)
        emit({"organism": child_organism, "gpt2small": child_gpt2small}[params["case"]](params))
        return
    WORKDIR.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "dashboards", "quick": args.quick, "machine": machine_info(args.threads), "cases": {}}
    for case in args.cases.split(","):
        params = {"case": case, "threads": args.threads, **SIZES[args.quick]}
        if args.tokens:
            params["gpt2_tokens"] = args.tokens
        report["cases"][case] = run_child(Path(__file__), params, threads=args.threads, label=case)
        print(json.dumps(report["cases"][case], indent=1), flush=True)
    path = save_json(f"dashboards{'_quick' if args.quick else ''}.json", report)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
