"""What each feature writes: the top and bottom entries of ``W_dec @ W_U`` (docs/dashboards.md, step 6)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class DecoderLogits:
    """Top/bottom entries of W_dec @ W_U for one layer's features.

    top_id, top_value, bottom_id, bottom_value: (F, V) for the total decoder direction
    (summed over output layers); layer_*: (F, n_out, V) per output layer (CLT), else None.
    """

    top_id: np.ndarray
    top_value: np.ndarray
    bottom_id: np.ndarray
    bottom_value: np.ndarray
    layer_top_id: np.ndarray | None = None
    layer_top_value: np.ndarray | None = None
    layer_bottom_id: np.ndarray | None = None
    layer_bottom_value: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@torch.no_grad()
def decoder_logits(transcoders, W_U: Tensor, layer: int, n_logits: int, *, chunk: int = 512) -> DecoderLogits:
    """Top and bottom ``n_logits`` of every feature's decoder direction through the unembedding.

    W_U: (d_model, d_vocab). A feature's total direction is its decoder row summed over its
    output layers (PLT: the one row). float32 products, ``chunk`` features at a time.
    """
    F = int(transcoders.d_transcoder)
    n_out = len(transcoders.output_layers(layer))
    W = W_U.detach().to(torch.float32)
    V = min(int(n_logits), int(W.shape[1]))
    per_layer = transcoders.kind == "cross_layer_transcoder"
    out = {
        "top_id": np.zeros((F, V), np.int32),
        "top_value": np.zeros((F, V), np.float32),
        "bottom_id": np.zeros((F, V), np.int32),
        "bottom_value": np.zeros((F, V), np.float32),
    }
    if per_layer:
        for name in ("layer_top_id", "layer_bottom_id"):
            out[name] = np.zeros((F, n_out, V), np.int32)
        for name in ("layer_top_value", "layer_bottom_value"):
            out[name] = np.zeros((F, n_out, V), np.float32)
    for start in range(0, F, chunk):
        idx = np.arange(start, min(F, start + chunk))
        rows = transcoders.decoder_vectors(layer, idx).to(device=W.device, dtype=torch.float32)
        rows_out = slice(start, start + idx.size)
        total = rows.sum(dim=1) @ W  # (c, d_vocab)
        _topk_into(out, "", total, V, (rows_out,))
        if per_layer:
            for o in range(n_out):
                _topk_into(out, "layer_", rows[:, o] @ W, V, (rows_out, o))
    return DecoderLogits(**out)


def _topk_into(out: dict, prefix: str, logits: Tensor, V: int, where: tuple) -> None:
    top = logits.topk(V, dim=-1)
    bottom = logits.topk(V, dim=-1, largest=False)
    out[prefix + "top_id"][where] = top.indices.cpu().numpy()
    out[prefix + "top_value"][where] = top.values.cpu().numpy()
    out[prefix + "bottom_id"][where] = bottom.indices.cpu().numpy()
    out[prefix + "bottom_value"][where] = bottom.values.cpu().numpy()
