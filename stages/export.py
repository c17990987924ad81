"""Stage export@<prompt id>: graph files for the viewer -> results/<id>/graph/, and a static
picture of the graph -> results/<id>/graph.{png,svg}.

The folder holds ``<slug>.json`` (circuit-tracer / Neuronpedia graph JSON), its
``graph-metadata.json`` index, and ``features/<layer>_<feature>.json``: the dashboard of every
feature in the pruned graph (what the viewer's node pane fetches). Serve it with
``circuit-pipeline serve`` or circuit-tracer's viewer, or upload to Neuronpedia.
Everything comes from the pruned graph and the features stage's dashboards store (the
features' ``clerp`` labels: its automatic labels); the tokenizer only names the tokens. When the
``qk`` stage has written ``results/<id>/attention/attention.json``, its head loadings and QK
attributions go into the graph JSON's optional fields (``head_loadings`` on links,
``attention_heads``) and the picture gains a panel of the top heads; without it the files are
exactly what they were.

The picture is drawn from that graph JSON (``pipeline.analysis.figures``: layers bottom to top, tokens
left to right, nodes sized by influence, edges coloured by sign and sized by weight, the
prompt under it and the top logits above), for papers and CI: no browser needed, byte-identical
for the same graph. It is part of this stage rather than a stage of its own because every
per-prompt stage costs a no-op ``dvc repro`` its dependency checks (issue: < 5 s at 20 prompts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from pipeline._io import atomic_path, read_json
from pipeline.analysis.dashboards import Dashboards, export_feature_json
from pipeline.analysis.export import GRAPH_METADATA_FILE, create_graph_files, neuronpedia_name
from pipeline.analysis.figures import write_graph_figures
from pipeline.graph.pruned import load_pruned_graph
from pipeline.run.compose import load_config
from stages._stage import dashboards_path, parse_args, prompt_dir, remove_stale_temps


class TokenDecoder:
    """Names token ids as the model's Hugging Face tokenizer does (``decode([id])``, special
    tokens kept), read from its ``tokenizer.json`` with the light ``tokenizers`` library."""

    def __init__(self, tokenizer_json: str | Path):
        self._tok = Tokenizer.from_file(str(tokenizer_json))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(cfg):
    """A token decoder for the model: its tokenizer.json (local, or from the hub), else the
    full ``transformers`` tokenizer for models without one."""
    local = Path(cfg.model.name)
    if (local / "tokenizer.json").is_file():
        return TokenDecoder(local / "tokenizer.json")
    if not local.exists():
        try:
            return TokenDecoder(hf_hub_download(cfg.model.name, "tokenizer.json", revision=cfg.model.revision))
        except EntryNotFoundError:
            pass
    return AutoTokenizer.from_pretrained(cfg.model.name, revision=cfg.model.revision)


def kept_features(pruned) -> list[tuple[int, int]]:
    """(layer, feature) of every feature node the pruning kept, sorted, unique."""
    n = pruned.result.n_features
    keep = np.asarray(pruned.result.node_mask[:n], dtype=bool)
    info = np.asarray(pruned.feature_info, dtype=np.int64).reshape(-1, 3)[keep]
    return sorted({(int(l), int(f)) for l, _pos, f in info.tolist()})


def attention_path(prompt_id: str) -> Path:
    """The qk stage's per-prompt attention file (optional input)."""
    return prompt_dir(prompt_id) / "attention" / "attention.json"


def outputs(prompt_id: str) -> tuple[Path, ...]:
    """What this stage writes (dvc.yaml's outs)."""
    run = prompt_dir(prompt_id)
    return run / "graph", run / "graph.png", run / "graph.svg"


def main(argv=None) -> None:
    args = parse_args(__doc__, prompt=True, argv=argv)
    remove_stale_temps(*outputs(args.prompt_id))
    cfg = load_config(args.params)
    run = prompt_dir(args.prompt_id)
    pruned = load_pruned_graph(run / "pruned.npz")
    scan = cfg.export.scan or neuronpedia_name(pruned.attrs.get("scan") or cfg.transcoders.source)
    slug = f"{cfg.export.slug_prefix}{args.prompt_id}"
    dash = Dashboards.open(dashboards_path(cfg.features))
    labels = {key: dash.label(*key) for key in kept_features(pruned)}
    attention_file = attention_path(args.prompt_id)
    attention = read_json(attention_file) if attention_file.is_file() else None
    out = run / "graph"
    with atomic_path(out) as tmp:
        path = create_graph_files(
            None,
            slug,
            tmp,
            pruned=pruned,
            tokenizer=load_tokenizer(cfg),
            scan=scan,
            labels=labels,
            attention=attention,
        )
        features = export_feature_json(dash, path, tmp)  # the graph's feature nodes only
        for extra in tmp.iterdir():  # keep the graph, its index and features/ (the library's lock file goes)
            if extra.name not in (path.name, GRAPH_METADATA_FILE, "features"):
                extra.unlink()
    figures = write_graph_figures(out / path.name, run, stem="graph")  # atomic, deterministic
    print(f"graph files: {out / path.name}  ({len(features)} feature dashboards in {out / 'features'})")
    print(f"figures: {'  '.join(str(p) for p in figures.values())}")
    if attention is not None:
        print(f"attention: {len(attention.get('edges', []))} edges with head loadings, from {attention_file}")


if __name__ == "__main__":
    main()
