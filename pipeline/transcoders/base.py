"""The one transcoder contract the replacement model and attribution rely on.

A transcoder set has one encoder per layer. Layer ``l``'s encoder reads the MLP input
``x_l`` (the tensor at ``feature_input_hook`` of block ``l``) and its features write to
the MLP output (``feature_output_hook``) of one layer (per-layer transcoders, PLT) or of
every layer ``l' >= l`` (cross-layer transcoders, CLT)::

    pre_l  = x_l @ W_enc_l.T + b_enc_l                       (n_pos, d_transcoder)
    a_l    = f(pre_l)                                        ReLU | JumpReLU | TopK
    y_l'   = sum_{l <= l'} a_l @ W_dec_l[:, l' - l] + b_dec_l' (+ x_l' @ W_skip_l')

Encoders and decoders may be lazy (rows read from safetensors on demand, onto ``device``), so
every decoder access goes through ``decoder_vectors`` / ``reconstruct``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import numpy as np
import torch
from torch import Tensor

TranscoderKind = Literal["transcoder_set", "cross_layer_transcoder"]


class Transcoders(ABC):
    """Per-layer (PLT) or cross-layer (CLT) transcoders for every layer of one model."""

    kind: TranscoderKind
    n_layers: int
    d_model: int
    d_transcoder: int
    feature_input_hook: str  # TransformerLens-2 name relative to a block, as in config.yaml
    feature_output_hook: str
    scan: str | None
    dtype: torch.dtype
    device: torch.device

    # --- encoders ------------------------------------------------------------------------
    @abstractmethod
    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Pre-activations. x: (..., d_model) -> (..., d_transcoder)."""

    @abstractmethod
    def activation_function(self, layer: int, pre: Tensor) -> Tensor:
        """Apply the layer's nonlinearity (ReLU, JumpReLU with its threshold, TopK)."""

    def activations(self, layer: int, x: Tensor) -> Tensor:
        """Feature activations. x: (..., d_model) -> (..., d_transcoder)."""
        return self.activation_function(layer, self.encode(layer, x))

    @abstractmethod
    def encoder_vectors(self, layer: int, features: Tensor | np.ndarray) -> Tensor:
        """Rows of W_enc for ``features`` (k,) -> (k, d_model) on ``device``: the direction a
        feature reads. ``features``: ids as a tensor on any device or an integer array."""

    @abstractmethod
    def encoder_bias(self, layer: int, features: Tensor) -> Tensor:
        """b_enc for ``features`` (k,) -> (k,)."""

    # --- decoders ------------------------------------------------------------------------
    @abstractmethod
    def output_layers(self, layer: int) -> range:
        """Layers whose MLP output a feature of ``layer`` writes to (PLT: [layer]; CLT: layer..L-1)."""

    @abstractmethod
    def decoder_vectors(self, layer: int, features: Tensor | np.ndarray) -> Tensor:
        """Decoder rows of ``features`` (k,) of ``layer``: (k, len(output_layers(layer)), d_model)
        on ``device``, read from disk when lazy. ``features``: as for ``encoder_vectors``."""

    @abstractmethod
    def decoder_bias(self, layer: int) -> Tensor:
        """b_dec of output layer ``layer``: (d_model,)."""

    @abstractmethod
    def reconstruct(self, out_layer: int, acts: list[Tensor], x: Tensor | None = None) -> Tensor:
        """Transcoder output at ``out_layer`` (bias and skip included).

        acts[l]: (n_pos, d_transcoder) activations of layer l, for every l <= out_layer
        (dense, mostly zero; only the rows of active features are read from the decoders).
        x: (n_pos, d_model) the MLP input of ``out_layer``, needed for the skip term.
        returns (n_pos, d_model)
        """

    # --- skip connection -----------------------------------------------------------------
    @property
    @abstractmethod
    def has_skip(self) -> bool:
        """Whether any layer has a linear skip term x @ W_skip."""

    @abstractmethod
    def skip(self, layer: int, x: Tensor) -> Tensor | None:
        """x @ W_skip of ``layer`` (..., d_model), or None when the layer has no skip."""

    # --- bookkeeping ---------------------------------------------------------------------
    @abstractmethod
    def digest(self) -> str:
        """A content digest (hex sha256) of every weight file, for caches and graph stores."""

    def check_compatible(self, n_layers: int, d_model: int) -> None:
        """Raise ValueError unless these transcoders fit a model with ``n_layers`` and ``d_model``."""
        if d_model != self.d_model:
            raise ValueError(
                f"transcoders have d_model={self.d_model} but the model has d_model={d_model}; "
                "load the transcoders trained for this model"
            )
        if n_layers != self.n_layers:
            raise ValueError(
                f"transcoders cover {self.n_layers} layers but the model has {n_layers}; load "
                "transcoders with one layer per model block"
            )
