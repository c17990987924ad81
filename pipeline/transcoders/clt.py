"""Cross-layer transcoders (``model_kind: cross_layer_transcoder``), circuit-tracer's layout.

Next to config.yaml, for every layer i of n_layers (n_layers = number of W_enc_* files):

* ``W_enc_{i}.safetensors``: ``W_enc_{i}`` (d_transcoder, d_model), ``b_enc_{i}``
  (d_transcoder,), ``b_dec_{i}`` (d_model,) = the decoder bias of output layer i, optional
  ``threshold_{i}`` (d_transcoder,) -> JumpReLU (absent in every file -> ReLU);
  optional ``W_skip_{i}`` (d_model, d_model), applied as ``x @ W_skip_i.T`` like a PLT's
  ``W_skip`` (our extension: circuit-tracer's loader reads no skip for this layout).
* ``W_dec_{i}.safetensors``: ``W_dec_{i}`` (d_transcoder, n_layers - i, d_model); slice j is
  what layer i's features write to output layer i + j.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from .common import (
    LayeredTranscoders,
    LayerWeights,
    WeightLoader,
    check_finite,
    expect_shape,
    resolve_activation,
)
from .config import TranscoderConfig, TranscoderConfigError, TranscoderFileNotFoundError
from .lazy import TensorFile

_ENC_RE = re.compile(r"^W_enc_(\d+)\.safetensors$")


def clt_layer_count(directory: Path) -> int:
    """Number of layers from the W_enc_{i}.safetensors files; checks they run 0..n-1."""
    found = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _ENC_RE.match(p.name)))
    if not found:
        raise TranscoderFileNotFoundError(
            f"no W_enc_0.safetensors in {str(directory)!r}; a cross_layer_transcoder directory "
            "needs W_enc_{i}.safetensors and W_dec_{i}.safetensors for every layer"
        )
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise TranscoderFileNotFoundError(
            f"{str(directory / f'W_enc_{missing[0]}.safetensors')!r} not found (found layers "
            f"{found[0]}..{found[-1]} with gaps); every layer 0..{max(found)} needs its files"
        )
    return len(found)


def _require(tf: TensorFile, name: str) -> str:
    """``name``, after checking ``tf`` holds it (one line naming the keys it does hold)."""
    if name not in tf:
        raise TranscoderConfigError(
            f"{str(tf.path)!r} has no tensor {name!r} (keys: {', '.join(sorted(tf.keys()))}); "
            "re-save the cross-layer transcoder"
        )
    return name


def _get(tf: TensorFile, name: str) -> Tensor:
    return tf.load(_require(tf, name))


class CrossLayerTranscoder(LayeredTranscoders):
    """Cross-layer transcoders: layer l's features write to every output layer l' >= l."""

    kind = "cross_layer_transcoder"

    def __init__(self, config: TranscoderConfig, directory: Path, load: WeightLoader, scan: str | None = None):
        directory = Path(directory)
        n_layers = clt_layer_count(directory)
        layers: list[LayerWeights] = []
        files: list[TensorFile] = []
        activation = None
        for i in range(n_layers):
            enc_path = directory / f"W_enc_{i}.safetensors"
            dec_path = directory / f"W_dec_{i}.safetensors"
            enc = TensorFile(enc_path)
            dec = TensorFile(dec_path)
            encoder = load.encoder(enc, _require(enc, f"W_enc_{i}"))
            b_enc = load.resident(_get(enc, f"b_enc_{i}"))
            b_dec = load.resident(_get(enc, f"b_dec_{i}"))
            if i == 0:
                d_transcoder, d_model = encoder.shape
            if encoder.shape != (d_transcoder, d_model):
                raise TranscoderConfigError(
                    f"{str(enc_path)!r}: W_enc_{i} has shape {encoder.shape}, expected "
                    f"{(d_transcoder, d_model)}; all layers must share d_model and d_transcoder"
                )
            expect_shape(b_enc, (d_transcoder,), f"b_enc_{i}", enc_path)
            expect_shape(b_dec, (d_model,), f"b_dec_{i}", enc_path)
            for t, what in ((b_enc, f"b_enc_{i}"), (b_dec, f"b_dec_{i}")):
                check_finite(t, what, enc_path)
            threshold = None
            if f"threshold_{i}" in enc:
                threshold = load.threshold(enc, f"threshold_{i}", d_transcoder, enc_path)
            W_skip = None
            if f"W_skip_{i}" in enc:
                W_skip = load.skip(enc, f"W_skip_{i}", d_model, enc_path)
            if f"W_dec_{i}" not in dec:
                raise TranscoderConfigError(
                    f"{str(dec_path)!r} has no tensor 'W_dec_{i}' (keys: "
                    f"{', '.join(sorted(dec.keys()))}); re-save the cross-layer transcoder"
                )
            want = (d_transcoder, n_layers - i, d_model)
            if dec.shape(f"W_dec_{i}") != want:
                raise TranscoderConfigError(
                    f"{str(dec_path)!r}: W_dec_{i} has shape {dec.shape(f'W_dec_{i}')}, expected "
                    f"{want} = (d_transcoder, n_layers - {i}, d_model)"
                )
            layer_activation, k = resolve_activation(config, threshold is not None, None, enc_path, f"threshold_{i}")
            if activation is None:
                activation = layer_activation
            elif layer_activation != activation:
                raise TranscoderConfigError(
                    f"{str(enc_path)!r} uses {layer_activation} but layer 0 uses {activation}; "
                    "store threshold_{i} in every W_enc file or in none"
                )
            if activation != "jump_relu":
                threshold = None
            decoder = load.decoder(dec, f"W_dec_{i}")
            layers.append(
                LayerWeights(
                    encoder=encoder, b_enc=b_enc, b_dec=b_dec, decoder=decoder, threshold=threshold, k=k, W_skip=W_skip
                )
            )
            files.extend((enc, dec))
        assert activation is not None
        super().__init__(config, layers, files, activation, scan, load)

    def output_layers(self, layer: int) -> range:
        self._layer(layer)
        return range(layer, self.n_layers)

    def decode(self, layer: int, acts: Tensor, out_layer: int) -> Tensor:
        """What layer ``layer``'s features write to ``out_layer`` (no bias, no skip).

        acts: (..., d_transcoder) -> (..., d_model); reads only active features' slices.
        """
        self._layer(layer)
        if not layer <= out_layer < self.n_layers:
            raise IndexError(f"layer {layer} features do not write to layer {out_layer}")
        return self._decode_slice(layer, acts, out_layer - layer)

    def reconstruct(self, out_layer: int, acts: list[Tensor], x: Tensor | None = None) -> Tensor:
        self._layer(out_layer)
        if len(acts) <= out_layer:
            raise ValueError(f"reconstruct({out_layer}) needs activations for layers 0..{out_layer}, got {len(acts)}")
        y = self.decode(0, acts[0], out_layer)
        for layer in range(1, out_layer + 1):
            y = y + self.decode(layer, acts[layer], out_layer)
        return self._add_bias_and_skip(out_layer, y, x)

    def reconstruct_all(self, acts: list[Tensor], xs: list[Tensor] | None = None) -> list[Tensor]:
        """reconstruct(l, acts, xs[l]) for every layer, reading each active row once."""
        if len(acts) != self.n_layers:
            raise ValueError(f"reconstruct_all needs {self.n_layers} activation tensors")
        outs: list[Tensor | None] = [None] * self.n_layers
        for layer in range(self.n_layers):
            a = acts[layer]
            active = self._active(a)
            if active.numel() == 0:
                continue
            rows = self._layer(layer).decoder.rows(active).to(device=a.device, dtype=a.dtype)
            sel = a.index_select(-1, active.to(a.device))
            for j, out_layer in enumerate(range(layer, self.n_layers)):
                contrib = sel @ rows[:, j]
                prev = outs[out_layer]
                outs[out_layer] = contrib if prev is None else prev + contrib
        result = []
        for out_layer in range(self.n_layers):
            y = outs[out_layer]
            if y is None:
                a = acts[out_layer]
                y = torch.zeros((*a.shape[:-1], self.d_model), dtype=a.dtype, device=a.device)
            result.append(self._add_bias_and_skip(out_layer, y, None if xs is None else xs[out_layer]))
        return result
