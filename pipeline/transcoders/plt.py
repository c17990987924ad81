"""Per-layer transcoders (``model_kind: transcoder_set``): one file per layer.

File layouts recognised (by key names and shapes, whatever the file is called):

* circuit-tracer: safetensors with ``W_enc`` (d_transcoder, d_model), ``W_dec`` (d_transcoder,
  d_model), ``b_enc`` (d_transcoder,), ``b_dec`` (d_model,), optional
  ``activation_function.threshold`` (d_transcoder,) -> JumpReLU, optional ``W_skip``
  (d_model, d_model) applied as ``x @ W_skip.T`` (circuit-tracer's ``compute_skip``), optional
  scalar ``k`` -> TopK (what circuit-tracer's ``to_safetensors`` writes for a TopK layer).
* GemmaScope (``params.npz`` or safetensors): ``W_enc`` stored transposed (d_model,
  d_transcoder) and the JumpReLU threshold under ``threshold``.
* GemmaScope 2 (safetensors): lower-case ``w_enc`` (d_model, d_transcoder), ``w_dec``,
  ``threshold`` and optional ``affine_skip_connection`` (d_in, d_out), i.e. ``W_skip.T``.

When d_model == d_transcoder the orientation of W_enc cannot be told from shapes; then the
GemmaScope key names (``threshold`` / ``w_enc``) mean transposed and anything else means
circuit-tracer's (d_transcoder, d_model).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .common import (
    LayeredTranscoders,
    LayerWeights,
    WeightLoader,
    check_finite,
    resolve_activation,
)
from .config import TranscoderConfig, TranscoderConfigError
from .lazy import TensorFile


def _pick(tf: TensorFile, *names: str) -> str | None:
    for name in names:
        if name in tf:
            return name
    return None


def _require(tf: TensorFile, *names: str) -> str:
    name = _pick(tf, *names)
    if name is None:
        raise TranscoderConfigError(
            f"{str(tf.path)!r} has no tensor {names[0]!r} (keys: {', '.join(sorted(tf.keys()))}); "
            "a per-layer transcoder file needs W_enc, W_dec, b_enc and b_dec"
        )
    return name


def read_plt_layer(path: Path, config: TranscoderConfig, load: WeightLoader) -> tuple[LayerWeights, TensorFile, str]:
    """Read one layer's file: resident encoder, biases, threshold, skip; decoder lazy or not.

    Returns the weights, the open file and the layer's activation name.
    """
    tf = TensorFile(path)
    enc_name = _require(tf, "W_enc", "w_enc")
    dec_name = _require(tf, "W_dec", "w_dec")
    b_enc_name = _require(tf, "b_enc")
    b_dec_name = _require(tf, "b_dec")
    thr_name = _pick(tf, "activation_function.threshold", "threshold")
    skip_name = _pick(tf, "W_skip", "affine_skip_connection")

    b_enc = tf.load(b_enc_name)
    b_dec = tf.load(b_dec_name)
    if b_enc.dim() != 1 or b_dec.dim() != 1:
        raise TranscoderConfigError(
            f"{str(path)!r}: b_enc and b_dec must be vectors, got shapes {tuple(b_enc.shape)} and {tuple(b_dec.shape)}"
        )
    d_transcoder, d_model = b_enc.shape[0], b_dec.shape[0]

    gemmascope_keys = enc_name == "w_enc" or thr_name == "threshold"
    enc_shape = tf.shape(enc_name)
    if enc_shape == (d_transcoder, d_model) and not (d_transcoder == d_model and gemmascope_keys):
        transposed = False
    elif enc_shape == (d_model, d_transcoder):
        transposed = True
    else:
        raise TranscoderConfigError(
            f"{str(path)!r}: {enc_name} has shape {enc_shape}, expected ({d_transcoder}, {d_model}) "
            f"(or ({d_model}, {d_transcoder}) for GemmaScope files) from b_enc and b_dec"
        )
    if tf.shape(dec_name) != (d_transcoder, d_model):
        raise TranscoderConfigError(
            f"{str(path)!r}: {dec_name} has shape {tf.shape(dec_name)}, expected "
            f"({d_transcoder}, {d_model}) = (d_transcoder, d_model)"
        )

    encoder = load.encoder(tf, enc_name, transposed=transposed)
    b_enc = load.resident(b_enc)
    b_dec = load.resident(b_dec)
    check_finite(b_enc, b_enc_name, path)
    check_finite(b_dec, b_dec_name, path)

    threshold = None if thr_name is None else load.threshold(tf, thr_name, d_transcoder, path)

    file_k = None
    if "k" in tf:
        k_tensor = tf.load("k")
        if k_tensor.numel() != 1 or int(k_tensor.reshape(-1)[0]) < 1:
            raise TranscoderConfigError(f"{str(path)!r}: 'k' must hold one positive integer")
        file_k = int(k_tensor.reshape(-1)[0])

    W_skip = None
    if skip_name is not None:
        W_skip = load.skip(tf, skip_name, d_model, path, transposed=skip_name == "affine_skip_connection")

    activation, k = resolve_activation(config, threshold is not None, file_k, path)
    if activation != "jump_relu":
        threshold = None
    decoder = load.decoder(tf, dec_name)
    return (
        LayerWeights(
            encoder=encoder, b_enc=b_enc, b_dec=b_dec, decoder=decoder, threshold=threshold, k=k, W_skip=W_skip
        ),
        tf,
        activation,
    )


class TranscoderSet(LayeredTranscoders):
    """Per-layer transcoders: layer l's features write to layer l's MLP output only."""

    kind = "transcoder_set"

    def __init__(self, config: TranscoderConfig, paths: list[Path], load: WeightLoader, scan: str | None = None):
        layers: list[LayerWeights] = []
        files: list[TensorFile] = []
        activations: list[str] = []
        for path in paths:
            weights, tf, activation = read_plt_layer(path, config, load)
            if layers:
                ref = layers[0]
                if weights.encoder.shape != ref.encoder.shape:
                    raise TranscoderConfigError(
                        f"{str(path)!r}: W_enc has shape {weights.encoder.shape}, expected "
                        f"{ref.encoder.shape}; all layers must share d_model and d_transcoder"
                    )
                if activation != activations[0]:
                    raise TranscoderConfigError(
                        f"{str(path)!r} uses {activation} but {str(paths[0])!r} uses "
                        f"{activations[0]}; all layers must share one activation function"
                    )
            layers.append(weights)
            files.append(tf)
            activations.append(activation)
        super().__init__(config, layers, files, activations[0], scan, load)
        self.paths = list(paths)

    def output_layers(self, layer: int) -> range:
        self._layer(layer)
        return range(layer, layer + 1)

    def decode(self, layer: int, acts: Tensor) -> Tensor:
        """sum_f acts[..., f] W_dec[f] over active features only (no bias, no skip)."""
        return self._decode_slice(layer, acts, 0)

    def reconstruct(self, out_layer: int, acts: list[Tensor], x: Tensor | None = None) -> Tensor:
        self._layer(out_layer)
        if len(acts) <= out_layer:
            raise ValueError(f"reconstruct({out_layer}) needs activations for layers 0..{out_layer}, got {len(acts)}")
        return self._add_bias_and_skip(out_layer, self.decode(out_layer, acts[out_layer]), x)

    def reconstruct_all(self, acts: list[Tensor], xs: list[Tensor] | None = None) -> list[Tensor]:
        """reconstruct(l, acts, xs[l]) for every layer l."""
        if len(acts) != self.n_layers:
            raise ValueError(f"reconstruct_all needs {self.n_layers} activation tensors")
        return [
            self._add_bias_and_skip(l, self.decode(l, acts[l]), None if xs is None else xs[l])
            for l in range(self.n_layers)
        ]
