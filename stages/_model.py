"""Loading what a per-prompt stage needs from the validated config: the replacement model
(model + transcoders), and the token ids the tokenize stage wrote."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from pipeline.engine.replacement import ReplacementModel
from pipeline.run.config import PipelineConfig
from pipeline.transcoders import CrossLayerTranscoder, load_transcoders


def load_replacement_model(cfg: PipelineConfig, dtype: str | None = None, lazy_encoder: bool = False):
    """``ReplacementModel`` for ``cfg.model`` + ``cfg.transcoders`` (dtype: ``attribution.dtype``
    unless given; lazy_encoder for stages that encode once)."""
    torch_dtype = getattr(torch, dtype or cfg.attribution.dtype)
    tc = load_transcoders(
        cfg.transcoders.source,
        revision=cfg.transcoders.revision,
        device=cfg.runtime.device,
        dtype=torch_dtype,
        lazy_encoder=lazy_encoder,
    )
    is_clt = isinstance(tc, CrossLayerTranscoder)
    if is_clt != (cfg.transcoders.kind == "clt"):
        raise ValueError(
            f"transcoders.kind is {cfg.transcoders.kind!r} but {cfg.transcoders.source} holds "
            f"{'a cross-layer transcoder' if is_clt else 'per-layer transcoders'}"
        )
    return ReplacementModel.from_pretrained(
        cfg.model.name, tc, dtype=torch_dtype, device=cfg.runtime.device, revision=cfg.model.revision
    )


def read_tokens(path):
    """The prompt's token ids (n_pos,) as the tokenize stage wrote them."""
    return load_file(str(path))["tokens"]
