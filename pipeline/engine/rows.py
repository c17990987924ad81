"""Adjacency rows: the direct effect of every source node on a batch of target nodes.

A batch of targets is one vmapped backward pass of the frozen forward (``docs/algorithm.md``):
each target's read vector is injected as the gradient at its read location, and the gradient
at every write location, dotted with each source's output vector, is that source's direct
effect on the target. Only structurally possible edges exist: a target at (layer l, pos p)
has sources at layers < l and positions <= p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.engine.replacement import Capture, FrozenForward, ReplacementModel
from pipeline.graph.layout import NodeLayout


class ActiveFeatures:
    """The active features of one prompt, and where every compute-order node sits.

    layout: the node counts and compute-order offsets
    layer, pos, index: (n_active,) each feature's layer, position and transcoder feature, in
    (layer, pos, feature) order, so the features of one (layer, pos) are contiguous
    node_layer, node_pos: (n_compute,) the location of every node, for the structural mask
    (tokens sit below layer 0; logits above the last layer and position, never a source)
    """

    def __init__(self, layout: NodeLayout, active: np.ndarray):
        """active: (n_active, 3) rows (layer, pos, feature), ordered as ``Capture.active_features``."""
        if active.shape != (layout.n_active, 3):
            raise ValueError(f"active features must have shape ({layout.n_active}, 3), got {active.shape}")
        self.layout = layout
        self.layer, self.pos, self.index = active[:, 0], active[:, 1], active[:, 2]
        n_layers, n_pos, n_logits = layout.n_layers, layout.n_pos, layout.n_logits
        positions = np.arange(n_pos)
        self.node_layer = np.concatenate(
            [self.layer, np.repeat(np.arange(n_layers), n_pos), np.full(n_pos, -1), np.full(n_logits, n_layers + 1)]
        ).astype(np.int64)
        self.node_pos = np.concatenate(
            [self.pos, np.tile(positions, n_layers), positions, np.full(n_logits, n_pos)]
        ).astype(np.int64)
        # features of (layer, pos) are [bounds[k], bounds[k + 1]) with k = layer * n_pos + pos
        keys = self.layer.astype(np.int64) * n_pos + self.pos
        self._bounds = np.searchsorted(keys, np.arange(n_layers * n_pos + 1))

    def at(self, layer: int, pos: int) -> slice:
        """The features at (layer, pos)."""
        k = layer * self.layout.n_pos + pos
        return slice(int(self._bounds[k]), int(self._bounds[k + 1]))

    def of_layer(self, layer: int) -> slice:
        """The features of ``layer``."""
        n_pos = self.layout.n_pos
        return slice(int(self._bounds[layer * n_pos]), int(self._bounds[(layer + 1) * n_pos]))

    def structural_mask(self, row_layer: np.ndarray, row_pos: np.ndarray) -> np.ndarray:
        """(B, n_compute) True where a target at (row_layer, row_pos) (both (B,)) can have a direct edge."""
        return (self.node_layer[None, :] < row_layer[:, None]) & (self.node_pos[None, :] <= row_pos[:, None])


# ---------------------------------------------------------------------------- sources
@dataclass
class Sources:
    """Output vectors of every source node, laid out for one batched matmul per layer pair.

    decoders[l]: (n_pos, k_max, n_out_l, d_model) activation × decoder rows of layer l's active
    features grouped by position and zero-padded to k_max per position (n_out_l output layers:
    1 for a PLT, n_layers - l for a CLT)
    columns[l]: (n_pos * k_max,) compute-order column of each padded slot, -1 for padding
    out_layers[l]: the layers layer l's features write to
    errors: (n_layers, n_pos, d_model); tokens: (n_pos, d_model)
    """

    decoders: list[Tensor]
    columns: list[Tensor]
    out_layers: list[range]
    errors: Tensor
    tokens: Tensor


def build_sources(
    model: ReplacementModel, capture: Capture, features: ActiveFeatures, values: Tensor, errors: Tensor | None = None
) -> Sources:
    """values: (n_active,) the features' activations; errors: (n_layers, n_pos, d_model) the
    error nodes' output vectors (default: the capture's)."""
    tc = model.transcoders
    layout = features.layout
    device = capture.errors.device  # every source lives where the backward passes run
    decoders, columns, out_layers = [], [], []
    for layer in range(layout.n_layers):
        seg = features.of_layer(layer)
        dec = tc.decoder_vectors(layer, features.index[seg]).to(device=device, dtype=capture.errors.dtype)
        dec = dec * values[seg, None, None].to(dec.dtype)  # (k, n_out, d_model)
        counts = [features.at(layer, p) for p in range(layout.n_pos)]
        k_max = max([c.stop - c.start for c in counts] + [1])
        padded = dec.new_zeros(layout.n_pos, k_max, dec.shape[1], dec.shape[2])
        # built on the CPU from the numpy layout, moved once
        cols = np.full((layout.n_pos, k_max), -1, dtype=np.int64)
        for pos, c in enumerate(counts):
            n = c.stop - c.start
            padded[pos, :n] = dec[c.start - seg.start : c.stop - seg.start]
            cols[pos, :n] = np.arange(c.start, c.stop)
        decoders.append(padded)
        columns.append(torch.from_numpy(cols.reshape(-1)).to(device))
        out_layers.append(tc.output_layers(layer))
    errors = capture.errors if errors is None else errors
    return Sources(decoders, columns, out_layers, errors, capture.token_embeddings)


# ---------------------------------------------------------------------------- row batches
@dataclass
class RowBatch:
    """Targets of one backward pass.

    layer: (B,) read layer of each target (n_layers for logits); pos: (B,)
    vectors: (B, d_model) injected gradients; nodes: (B,) compute-order node ids
    """

    layer: np.ndarray
    pos: np.ndarray
    vectors: Tensor
    nodes: np.ndarray


def logit_batch(layout: NodeLayout, vectors: Tensor, idx: np.ndarray) -> RowBatch:
    """The logit targets ``idx`` (k,), read at the unembedding's input, last position.

    vectors: (n_logits, d_model) every logit target's vector
    """
    return RowBatch(
        np.full(len(idx), layout.n_layers, dtype=np.int64),
        np.full(len(idx), layout.n_pos - 1, dtype=np.int64),
        vectors[idx],
        layout.compute_logit_slice.start + idx,
    )


def feature_batch(model: ReplacementModel, features: ActiveFeatures, ids: np.ndarray, dtype: torch.dtype) -> RowBatch:
    """The active features ``ids`` (k,), each read by its encoder row at its layer and position."""
    layers = features.layer[ids]
    vecs = torch.empty(len(ids), model.d_model, dtype=dtype, device=model.device)
    for layer in np.unique(layers):
        sel = np.nonzero(layers == layer)[0]
        rows = model.transcoders.encoder_vectors(int(layer), features.index[ids[sel]])
        vecs[torch.from_numpy(sel).to(vecs.device)] = rows.to(device=vecs.device, dtype=vecs.dtype)
    return RowBatch(layers.astype(np.int64), features.pos[ids].astype(np.int64), vecs, ids.astype(np.int64))


def compute_rows(ff: FrozenForward, batch: RowBatch, layout: NodeLayout, sources: Sources) -> np.ndarray:
    """Direct effects of every source on each target of ``batch``: (B, n_compute) float32.

    Computed on the frozen forward's device in its dtype; only the finished rows are copied
    to the host, as float32 (numpy has no bfloat16).

    One backward pass from the targets' read locations; columns that the structural mask
    excludes are left at zero (the caller never stores them). ``ff`` may be the frozen
    forward of a prefix of the prompt that holds every target's position: sources at later
    positions are structural zeros, so only the prefix is differentiated.
    """
    B = len(batch.nodes)
    top = int(batch.layer.max())  # layers >= top cannot reach any target of this batch
    n_layers = layout.n_layers
    n = int(ff.embed.shape[1])  # positions in the frozen forward
    if ff.batch != 1:
        raise ValueError(f"compute_rows needs a single-copy frozen forward (batch=1), got {ff.batch} copies")
    if int(batch.pos.max()) >= n:
        raise ValueError(f"a target at position {int(batch.pos.max())} is outside the {n}-token frozen forward")
    # one vmapped backward serves the whole batch: batch element i carries row i's gradient
    outputs, grad_outputs = [], []
    device = ff.embed.device
    for layer in sorted(set(batch.layer.tolist())):
        rows = np.nonzero(batch.layer == layer)[0]
        read = ff.unembed_in if layer == n_layers else ff.mlp_inputs[layer]
        g = read.new_zeros((B, *read.shape))
        at_rows, at_pos = torch.from_numpy(rows).to(device), torch.from_numpy(batch.pos[rows]).to(device)
        g[at_rows, 0, at_pos] = batch.vectors[rows].to(device=device, dtype=g.dtype)
        outputs.append(read)
        grad_outputs.append(g)
    writes = ff.mlp_outputs[: min(top, n_layers)]
    raw = torch.autograd.grad(
        outputs,
        writes + [ff.embed],
        grad_outputs,
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )
    grads = [None if g is None else g[:, 0] for g in raw]
    g_out = grads[:-1]  # (B, n, d_model) per write layer
    g_embed = grads[-1]

    # accumulate in the model's dtype; the store keeps float32
    values = torch.zeros(B, layout.n_compute, dtype=ff.embed.dtype, device=device)
    for src_layer in range(len(writes)):
        dec = sources.decoders[src_layer][:n]  # (n, k_max, n_out, d_model)
        effect = None  # (n, B, k_max): each padded feature slot's effect on each row
        for j, out_layer in enumerate(sources.out_layers[src_layer]):
            if out_layer >= len(writes) or g_out[out_layer] is None:
                continue
            g = g_out[out_layer].transpose(0, 1)  # (n, B, d_model)
            term = torch.bmm(g, dec[:, :, j].transpose(1, 2))
            effect = term if effect is None else effect + term
        if effect is not None:
            cols = sources.columns[src_layer][: n * dec.shape[1]]
            valid = cols >= 0
            flat = effect.transpose(0, 1).reshape(B, -1)
            values[:, cols[valid]] = flat[:, valid]
        if g_out[src_layer] is not None:
            err = (g_out[src_layer] * sources.errors[src_layer][None, :n]).sum(-1)  # (B, n)
            start = layout.compute_error_node(src_layer, 0)
            values[:, start : start + n] = err
    if g_embed is not None:
        tok = (g_embed * sources.tokens[None, :n]).sum(-1)
        start = layout.compute_token_slice.start
        values[:, start : start + n] = tok
    return values.to("cpu", torch.float32).numpy()


class FrozenPrefixes:
    """Frozen forwards of prompt prefixes, built on demand and kept for a few batches.

    Batches visit targets in (layer, position) order, so consecutive batches mostly share a
    prefix length; a forward of one copy costs little next to a batched backward.
    """

    def __init__(self, model: ReplacementModel, capture: Capture, keep: int = 4):
        self.model, self.capture, self.keep = model, capture, keep
        self._cache: dict[int, FrozenForward] = {}

    def covering(self, batch: RowBatch) -> FrozenForward:
        """The frozen forward of the shortest prefix that holds every target of ``batch``."""
        n = int(batch.pos.max()) + 1
        ff = self._cache.pop(n, None)
        if ff is None:
            ff = self.model.frozen_forward(self.capture, batch=1, n_pos=n)
        self._cache[n] = ff  # most recently used last
        while len(self._cache) > self.keep:
            self._cache.pop(next(iter(self._cache)))
        return ff


def to_csr(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, indices, values) of ``values`` restricted to ``mask`` (both (B, n_compute))."""
    counts = mask.sum(axis=1)
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    rows, cols = np.nonzero(mask)
    return indptr, cols.astype(np.int64), values[rows, cols].astype(np.float32)
