"""Loading the replacement model a per-prompt stage needs, from the validated config."""

from __future__ import annotations

from pipeline.config import PipelineConfig


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def load_replacement_model(cfg: PipelineConfig):
    """``ReplacementModel`` for ``cfg.model`` + ``cfg.transcoders`` (dtype from attribution)."""
    from pipeline.replacement import ReplacementModel
    from pipeline.transcoders import CrossLayerTranscoder, load_transcoders

    dtype = torch_dtype(cfg.attribution.dtype)
    tc = load_transcoders(cfg.transcoders.source, revision=cfg.transcoders.revision,
                          device=cfg.runtime.device, dtype=dtype)
    is_clt = isinstance(tc, CrossLayerTranscoder)
    if is_clt != (cfg.transcoders.kind == "clt"):
        raise ValueError(f"transcoders.kind is {cfg.transcoders.kind!r} but {cfg.transcoders.source} holds "
                         f"{'a cross-layer transcoder' if is_clt else 'per-layer transcoders'}")
    return ReplacementModel.from_pretrained(cfg.model.name, tc, dtype=dtype, device=cfg.runtime.device,
                                            revision=cfg.model.revision)


def read_tokens(path):
    """The prompt's token ids (n_pos,) as the tokenize stage wrote them."""
    from safetensors.torch import load_file

    return load_file(str(path))["tokens"]
