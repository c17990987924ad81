"""Transcoders: load circuit-tracer-format transcoder sets (local or Hugging Face), write them.

    tc = load_transcoders("path/to/dir")                 # or "org/repo", "org/repo//sub"
    acts = tc.activations(layer, x)                       # (n_pos, d_transcoder)
    y = tc.reconstruct(layer, acts_per_layer, x)          # reads only active decoder rows

Validation policy: config.yaml, file headers (truncation, foreign files), shapes, encoders,
biases, thresholds and skip matrices are checked eagerly at load. Lazy decoders are checked
for NaN/inf on every row read (the first read of a corrupt row raises, naming file and
feature); ``validate_decoders()`` streams all of them through the same check on demand.
With ``lazy_decoder=False`` decoders are loaded and checked at load time. Lazy encoders
(``lazy_encoder=True``) are checked the same way, block by block as they are read.
"""

from __future__ import annotations

import os

import torch

from pipeline.devices import check_device_dtype, parse_dtype

from .base import Transcoders
from .clt import CrossLayerTranscoder
from .common import WeightLoader
from .config import (
    SUPPORTED_HOOKS,
    TranscoderConfig,
    TranscoderConfigError,
    TranscoderFileNotFoundError,
    TranscoderSourceError,
    read_config,
)
from .hub import fetch_weight_files, resolve_files, resolve_source
from .io import save_cross_layer_transcoder, save_transcoder_set
from .plt import TranscoderSet

__all__ = [
    "SUPPORTED_HOOKS",
    "CrossLayerTranscoder",
    "TranscoderConfig",
    "TranscoderConfigError",
    "TranscoderFileNotFoundError",
    "TranscoderSet",
    "TranscoderSourceError",
    "Transcoders",
    "load_transcoders",
    "save_cross_layer_transcoder",
    "save_transcoder_set",
]


def _plt_paths(config: TranscoderConfig):
    directory = config.directory
    if config.transcoders is not None:
        return resolve_files(config.transcoders, directory)
    # circuit-tracer's fallback (and its cache layout): layer_{i}.safetensors next to config
    n = 0
    while (directory / f"layer_{n}.safetensors").is_file():
        n += 1
    if n == 0:
        raise TranscoderFileNotFoundError(
            f"config.yaml in {str(directory)!r} has no 'transcoders' list and there is no "
            "layer_0.safetensors; list one file per layer under 'transcoders'"
        )
    return [directory / f"layer_{i}.safetensors" for i in range(n)]


def load_transcoders(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    revision: str | None = None,
    subfolder: str | None = None,
    lazy_decoder: bool = True,
    lazy_encoder: bool = False,
) -> Transcoders:
    """Load per-layer or cross-layer transcoders from a directory or a Hugging Face repo.

    source: a local directory holding config.yaml, or "org/repo", "org/repo//subfolder",
    "org/repo/subfolder", optionally "...@revision". Encoders, biases, thresholds and skip
    matrices become resident tensors of ``dtype`` on ``device``; decoders stay on disk and are
    read row by row unless ``lazy_decoder=False`` (each read lands on ``device``). A device this
    machine lacks, or a dtype it cannot run, is a ``DeviceError`` naming the fix. ``lazy_encoder=True`` leaves the encoders
    on disk too (streamed in blocks per forward, rows read on demand): for attribution, which
    encodes once, it halves the transcoders' share of peak memory; keep them resident for
    work that encodes many batches (dashboards, interventions).

    Raises TranscoderConfigError (a ValueError) or its FileNotFoundError subclasses with a
    one-line message naming the problem and the fix.
    """
    dtype = parse_dtype(dtype)
    device = check_device_dtype(device, dtype)  # before any download or read
    directory, ref = resolve_source(source, revision=revision, subfolder=subfolder)
    config = read_config(directory)
    if ref is not None:
        fetch_weight_files(ref, config)
    scan = config.scan if config.scan is not None else (ref.describe() if ref else None)
    load = WeightLoader(dtype, device, lazy_decoder, lazy_encoder)
    if config.model_kind == "transcoder_set":
        return TranscoderSet(config, _plt_paths(config), load, scan)
    return CrossLayerTranscoder(config, directory, load, scan)
