"""Stage features: feature dashboards of the configured transcoders -> data/dashboards/<name>.zarr.

Streams the corpus of ``features`` (the organism world's sentences by default; a text / JSONL
file or a Hugging Face dataset) through the replacement model and records, for every feature
of every layer, its top activating contexts, quantile examples, firing density and histogram,
output logits and an automatic label (``pipeline.analysis.dashboards``). One compressed Zarr store per
transcoder set; the export stage takes the graphs' ``clerp`` labels and the viewer's
per-feature files from it. Memory is bounded by the config, not the corpus; an interrupted
run resumes from its last checkpoint (``.<name>.zarr.partial`` beside the store) and gives the
same bytes. The log gets the token count and throughput.
"""

from __future__ import annotations

import time

from pipeline.analysis import dashboards as D
from pipeline.run.compose import load_config
from pipeline.run.config import FeaturesSpec
from stages._model import load_replacement_model
from stages._stage import dashboards_path, parse_args, remove_stale_temps, setup_torch


def load_corpus(spec: FeaturesSpec):
    """The corpus ``features`` names, as a re-iterable of texts."""
    if spec.source == "organism":
        return D.organism_corpus(spec.corpus, spec.n_documents)
    if spec.source == "file":
        return D.read_corpus(spec.corpus, field=spec.field)
    return D.hf_dataset_corpus(spec.corpus, spec.split, spec.field)


def main(argv=None) -> None:
    args = parse_args(__doc__, argv=argv)
    cfg = load_config(args.params)
    remove_stale_temps(dashboards_path(cfg.features))  # (the resumable .partial checkpoint stays)
    setup_torch(cfg.runtime)
    spec = cfg.features
    t0 = time.perf_counter()
    corpus = load_corpus(spec)
    model = load_replacement_model(cfg, dtype=spec.dtype)
    t1 = time.perf_counter()
    out = D.compute_dashboards(
        model, corpus, dashboards_path(spec), D.DashboardConfig.of(spec), progress=False, overwrite=True
    )  # DVC removed the old store; a finished one is replaced
    dash = D.Dashboards.open(out)
    wall = time.perf_counter() - t1
    print(
        f"features: {out}  {dash.kind} layers {dash.n_layers} x {dash.d_transcoder} features, "
        f"{dash.n_tokens} tokens in {wall:.1f} s ({dash.n_tokens / max(wall, 1e-9):.0f} tokens/s; "
        f"loading {t1 - t0:.1f} s)"
    )


if __name__ == "__main__":
    main()
