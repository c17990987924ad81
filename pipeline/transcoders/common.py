"""What per-layer and cross-layer transcoders share: encoders, the nonlinearity,
skip terms, checks of eagerly loaded weights and the content digest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.digests import file_sha256

from .base import Transcoders
from .config import TranscoderConfig, TranscoderConfigError
from .lazy import DecoderRows, EncoderRows, TensorFile, all_finite


@dataclass
class LayerWeights:
    """Weights of one encoder layer and its decoder (each lazy or resident).

    encoder: W_enc (d_transcoder, d_model); b_enc: (d_transcoder,); b_dec: (d_model,) of the output
    layer with the same index; threshold: (d_transcoder,) for JumpReLU; k for TopK;
    W_skip: (d_model, d_model) stored like an nn.Linear weight, skip(x) = x @ W_skip.T.
    """

    encoder: EncoderRows
    b_enc: Tensor
    b_dec: Tensor
    decoder: DecoderRows
    threshold: Tensor | None = None
    k: int | None = None
    W_skip: Tensor | None = None


def check_finite(t: Tensor, what: str, path: Path) -> None:
    if not all_finite(t):
        raise TranscoderConfigError(
            f"{str(path)!r}: {what} holds NaN or inf; the weights are corrupt, re-download or retrain them"
        )


def check_threshold(t: Tensor, what: str, path: Path) -> None:
    check_finite(t, what, path)
    if bool((t < 0).any()):
        raise TranscoderConfigError(
            f"{str(path)!r}: {what} has negative JumpReLU thresholds (min {float(t.min()):.4g}); "
            "thresholds must be >= 0 (a log-threshold file must be exponentiated first)"
        )


def expect_shape(t: Tensor, shape: tuple[int, ...], what: str, path: Path) -> None:
    if tuple(t.shape) != shape:
        raise TranscoderConfigError(
            f"{str(path)!r}: {what} has shape {tuple(t.shape)}, expected {shape}; all layers "
            "must share d_model and d_transcoder"
        )


def resolve_activation(
    config: TranscoderConfig,
    has_threshold: bool,
    file_k: int | None,
    where: Path,
    threshold_key: str = "activation_function.threshold",
) -> tuple[str, int | None]:
    """The activation of one layer from config.yaml and what its file stores."""
    if config.activation == "relu":
        return "relu", None
    if config.activation == "topk":
        return "topk", config.k
    if config.activation == "jump_relu":
        if not has_threshold:
            raise TranscoderConfigError(
                f"{str(where)!r}: config.yaml says activation jump_relu but the file stores no "
                f"threshold; add {threshold_key!r} or set activation: relu"
            )
        return "jump_relu", None
    if has_threshold:
        return "jump_relu", None
    if file_k is not None:
        return "topk", file_k
    return "relu", None


@dataclass(frozen=True)
class WeightLoader:
    """How a set's weights are loaded: resident tensors as ``dtype`` on ``device``; decoders
    and encoders read from their files on demand (``lazy_decoder`` / ``lazy_encoder``) or
    loaded whole. Its methods load one layer's weights of either layout, checked."""

    dtype: torch.dtype
    device: torch.device
    lazy_decoder: bool
    lazy_encoder: bool

    def resident(self, t: Tensor) -> Tensor:
        return t.to(device=self.device, dtype=self.dtype)

    def encoder(self, tf: TensorFile, name: str, *, transposed: bool = False) -> EncoderRows:
        return EncoderRows(
            tf, name, lazy=self.lazy_encoder, transposed=transposed, dtype=self.dtype, device=self.device
        )

    def decoder(self, tf: TensorFile, name: str) -> DecoderRows:
        return DecoderRows(tf, name, lazy=self.lazy_decoder, dtype=self.dtype, device=self.device)

    def threshold(self, tf: TensorFile, name: str, d_transcoder: int, path: Path) -> Tensor:
        """JumpReLU thresholds (d_transcoder,), stored as a vector or any shape of that size."""
        threshold = self.resident(tf.load(name))
        if threshold.numel() == d_transcoder:
            threshold = threshold.reshape(d_transcoder)
        expect_shape(threshold, (d_transcoder,), name, path)
        check_threshold(threshold, name, path)
        return threshold

    def skip(self, tf: TensorFile, name: str, d_model: int, path: Path, *, transposed: bool = False) -> Tensor:
        """W_skip (d_model, d_model) as skip(x) = x @ W_skip.T; ``transposed``: stored as W_skip.T."""
        W_skip = tf.load(name)
        if transposed:
            W_skip = W_skip.T
        W_skip = self.resident(W_skip).contiguous()
        expect_shape(W_skip, (d_model, d_model), name, path)
        check_finite(W_skip, name, path)
        return W_skip


class LayeredTranscoders(Transcoders):
    """Shared implementation; subclasses set ``kind``, read the files and define the decoders'
    layout."""

    def __init__(
        self,
        config: TranscoderConfig,
        layers: list[LayerWeights],
        files: list[TensorFile],
        activation: str,
        scan: str | None,
        load: WeightLoader,
    ):
        self.layers = layers
        self.files = files
        self.activation = activation
        self.n_layers = len(layers)
        self.d_transcoder, self.d_model = layers[0].encoder.shape
        self.config = config
        self.directory = config.directory
        self.feature_input_hook = config.feature_input_hook
        self.feature_output_hook = config.feature_output_hook
        self.model_name = config.model_name
        self.scan = scan
        self.dtype = load.dtype
        self.device = load.device
        self._digest: str | None = None

    # --- helpers ---------------------------------------------------------------------
    def _layer(self, layer: int) -> LayerWeights:
        if not isinstance(layer, int) or isinstance(layer, bool):
            layer = int(layer)
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for {self.n_layers} transcoder layers")
        return self.layers[layer]

    def _features(self, features: Tensor, device: torch.device) -> Tensor:
        features = torch.as_tensor(features, device=device).long().reshape(-1)
        if features.numel() and (features.min() < 0 or features.max() >= self.d_transcoder):
            raise IndexError(f"feature index out of range for d_transcoder={self.d_transcoder}")
        return features

    @staticmethod
    def _active(a: Tensor) -> Tensor:
        """Features with any nonzero activation: a (..., d_transcoder) -> (k,) ids."""
        return (a.detach().reshape(-1, a.shape[-1]) != 0).any(dim=0).nonzero().reshape(-1)

    # --- encoders --------------------------------------------------------------------
    def encode(self, layer: int, x: Tensor) -> Tensor:
        w = self._layer(layer)
        return w.encoder.linear(x, w.b_enc)

    def activation_function(self, layer: int, pre: Tensor) -> Tensor:
        w = self._layer(layer)
        if self.activation == "relu":
            return F.relu(pre)
        if self.activation == "jump_relu":
            assert w.threshold is not None
            return pre * (pre > w.threshold).to(pre.dtype)
        # TopK: keep the k largest pre-activations per position, then ReLU (circuit-tracer's TopK)
        k = min(int(w.k or 0), pre.shape[-1])
        idx = pre.topk(k, dim=-1).indices
        gate = torch.zeros_like(pre).scatter_(-1, idx, 1.0)
        return F.relu(pre * gate)

    def encoder_vectors(self, layer: int, features: Tensor | np.ndarray) -> Tensor:
        return self._layer(layer).encoder.rows(features)  # checks the ids' range

    def encoder_bias(self, layer: int, features: Tensor) -> Tensor:
        w = self._layer(layer)
        return w.b_enc[self._features(features, w.b_enc.device)]

    def threshold(self, layer: int) -> Tensor | None:
        """JumpReLU thresholds of ``layer`` (d_transcoder,), or None."""
        return self._layer(layer).threshold

    def top_k(self, layer: int) -> int | None:
        """k of a TopK layer, or None."""
        return self._layer(layer).k

    # --- decoders --------------------------------------------------------------------
    def decoder_vectors(self, layer: int, features: Tensor | np.ndarray) -> Tensor:
        return self._layer(layer).decoder.rows(features)

    def decoder_bias(self, layer: int) -> Tensor:
        return self._layer(layer).b_dec

    def _decode_slice(self, layer: int, acts: Tensor, j: int) -> Tensor:
        """What ``layer``'s features write through decoder slice ``j`` (no bias, no skip).

        acts: (..., d_transcoder) -> (..., d_model); reads only active features' rows.
        """
        w = self._layer(layer)
        active = self._active(acts)
        out_shape = (*acts.shape[:-1], self.d_model)
        if active.numel() == 0:
            return torch.zeros(out_shape, dtype=acts.dtype, device=acts.device)
        rows = w.decoder.rows(active, j).to(device=acts.device, dtype=acts.dtype)
        return acts.index_select(-1, active.to(acts.device)) @ rows

    # --- skip --------------------------------------------------------------------------
    @property
    def has_skip(self) -> bool:
        return any(w.W_skip is not None for w in self.layers)

    def skip(self, layer: int, x: Tensor) -> Tensor | None:
        w = self._layer(layer)
        if w.W_skip is None:
            return None
        return x.to(w.W_skip.dtype) @ w.W_skip.T

    def _add_bias_and_skip(self, out_layer: int, y: Tensor, x: Tensor | None) -> Tensor:
        w = self._layer(out_layer)
        y = y + w.b_dec
        if w.W_skip is not None:
            if x is None:
                raise ValueError(f"layer {out_layer} has a skip connection; pass its MLP input x to reconstruct")
            y = y + x.to(w.W_skip.dtype) @ w.W_skip.T  # the skip term, as self.skip computes it
        return y

    # --- bookkeeping -----------------------------------------------------------------
    def digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            cfg = self.config.to_dict()
            cfg.pop("transcoders", None)  # where files live is not content
            cfg["activation"] = self.activation
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            for tf in self.files:
                h.update(b"\0" + tf.path.name.encode() + b"\0")
                h.update(file_sha256(tf.path).encode())
            self._digest = h.hexdigest()
        return self._digest

    def validate_decoders(self, chunk_rows: int = 4096) -> None:
        """Stream every lazy decoder through the NaN/inf check (reads each file once)."""
        for w in self.layers:
            w.decoder.scan(chunk_rows)

    def close(self) -> None:
        """Close the weight files' descriptors (they reopen on the next lazy read)."""
        for tf in self.files:
            tf.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_layers={self.n_layers}, d_model={self.d_model}, "
            f"d_transcoder={self.d_transcoder}, activation={self.activation!r}, "
            f"skip={self.has_skip}, {self.feature_input_hook!r} -> "
            f"{self.feature_output_hook!r}, lazy_encoder={self.layers[0].encoder.lazy}, "
            f"lazy_decoder={self.layers[0].decoder.lazy}, "
            f"directory={str(self.directory)!r})"
        )
