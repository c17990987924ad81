"""Stage export@<prompt id>: graph files for the viewer -> results/<id>/graph/.

The folder holds ``<slug>.json`` (circuit-tracer / Neuronpedia graph JSON) and its
``graph-metadata.json`` index; serve it with circuit-tracer's viewer or upload to Neuronpedia.
Everything comes from the pruned graph; the tokenizer only names the tokens.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.export import GRAPH_METADATA_FILE, create_graph_files
from pipeline.pruning import load_pruned_graph
from stages._config import load_config, parse_args
from stages._io import atomic_path, prompt_dir


class TokenDecoder:
    """Names token ids as the model's Hugging Face tokenizer does (``decode([id])``, special
    tokens kept), read from its ``tokenizer.json`` with the light ``tokenizers`` library."""

    def __init__(self, tokenizer_json: str | Path):
        from tokenizers import Tokenizer

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
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return TokenDecoder(hf_hub_download(cfg.model.name, "tokenizer.json", revision=cfg.model.revision))
        except EntryNotFoundError:
            pass
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.name, revision=cfg.model.revision)


def main(argv=None) -> None:
    args = parse_args(__doc__, prompt=True, argv=argv)
    cfg = load_config(args.params)
    run = prompt_dir(args.prompt_id)
    pruned = load_pruned_graph(run / "pruned.npz")
    scan = cfg.export.scan or pruned.attrs.get("scan") or cfg.transcoders.source
    slug = f"{cfg.export.slug_prefix}{args.prompt_id}"
    out = run / "graph"
    with atomic_path(out) as tmp:
        path = create_graph_files(None, slug, tmp, pruned=pruned, tokenizer=load_tokenizer(cfg), scan=scan)
        for extra in tmp.iterdir():  # keep only the graph and its index (the library's lock file goes)
            if extra.name not in (path.name, GRAPH_METADATA_FILE):
                extra.unlink()
    print(f"graph files: {out / path.name}")


if __name__ == "__main__":
    main()
