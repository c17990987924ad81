"""Exact attribution graphs, streamed row batch by row batch into a Zarr graph store.

The algorithm (DESIGN.md section 2; circuit-tracer's ``attribute``):

1. Precompute: one clean forward pass gives the active features (value > 0, BOS excluded),
   their activations, the error vector of every (layer, pos) and the token embeddings.
2. Logit targets: the top next-token logits (at most ``max_n_logits``, stopping at
   cumulative probability ``desired_logit_prob``) or the targets the user gives. Their
   vectors are de-meaned unembedding columns, read at the unembedding's input.
3. Frozen forward: the prompt through the linearised model (attention patterns and norm
   scales frozen, MLPs replaced by their skip path); each row batch is one vmapped backward
   pass of it, ``batch_size`` targets at once.
4. Logit rows: inject each logit vector as the gradient at the last position of the
   unembedding's input; the gradient at every write location, dotted with each source's
   output vector, is that source's direct effect on the logit.
5. Feature rows: the same with each feature's encoder row injected at its layer's read
   location. All active features, or — with ``max_feature_nodes`` — the most influential
   ones first, re-ranked every ``update_interval`` batches.
6. Finalize: record which features have rows and mark the store finished.

Only structurally possible edges are computed and stored: a target at (layer l, pos p)
has sources at layers < l and positions <= p (tokens: positions <= p). A batch holds targets
of one layer whenever the visiting order allows it, and its backward pass starts at that
layer, so no work is spent above it; and it differentiates only the prompt prefix that ends
at its last target's position (the model is causal), so no work is spent after it.

Every row batch is durably recorded in the store as it finishes: a killed run, rerun with
the same inputs, resumes from the last finished batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.engine.replacement import Capture, FrozenForward, ReplacementModel
from pipeline.graph.store import Graph, GraphStoreWriter

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- config
# The Hydra schema's attribution node extends this class: not frozen (OmegaConf makes frozen
# nodes read-only), and typing.Optional, the form OmegaConf 2.3 documents, not ``int | None``.
@dataclass
class AttributionConfig:
    """The options of :func:`attribute`, the one definition of their names, defaults, help
    (``metadata["help"]``, the command line's) and checks. ``asdict`` of it is hashed into
    every graph store's fingerprint, so a new field changes every key."""

    max_n_logits: int = field(default=10, metadata={"help": "at most this many logit nodes: the top next-token logits"})
    desired_logit_prob: float = field(
        default=0.95, metadata={"help": "no more logit nodes once their cumulative probability reaches this"}
    )
    batch_size: int = field(default=256, metadata={"help": "targets per backward pass"})
    max_feature_nodes: Optional[int] = field(  # noqa: UP045
        default=None, metadata={"help": "rows for the N most influential features only (default: every active one)"}
    )
    update_interval: int = field(
        default=4, metadata={"help": "batches between influence re-rankings (with max_feature_nodes)"}
    )
    zero_bos_errors: bool = field(
        default=False,
        metadata={"help": "no edges out of the BOS-position error nodes (circuit-tracer 0.5.0's graphs)"},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.max_n_logits <= 0:
            raise ValueError(f"max_n_logits must be positive, got {self.max_n_logits!r}")
        if not 0.0 < self.desired_logit_prob <= 1.0:
            raise ValueError(f"desired_logit_prob must be in (0, 1], got {self.desired_logit_prob!r}")
        if self.max_feature_nodes is not None and self.max_feature_nodes <= 0:
            raise ValueError(
                f"max_feature_nodes must be positive or None (all features), got {self.max_feature_nodes!r}"
            )
        if self.update_interval <= 0:
            raise ValueError(f"update_interval must be positive, got {self.update_interval!r}")

    @classmethod
    def of(cls, config: AttributionConfig | None = None, **changes: Any) -> AttributionConfig:
        """The options of ``config`` (the defaults when None) with ``changes``, as this class:
        fields a subclass adds (the schema's load ``dtype``) are not attribution options and
        must stay out of the fingerprint."""
        values = {f.name: getattr(config, f.name) for f in fields(cls)} if config is not None else {}
        return cls(**{**values, **changes})


# ---------------------------------------------------------------------------- logit targets
@dataclass
class LogitTarget:
    """One logit node: what it is called, which token it stands for, and its read vector.

    vector: (d_model,) read at the unembedding's input, last position
    probability: the weight of the node in influence computations (the token's probability
    for token targets)
    """

    label: str
    token_id: int
    probability: float
    vector: Tensor = field(repr=False)


def salient_logit_targets(
    model: ReplacementModel, logits: Tensor, max_n_logits: int, desired_logit_prob: float
) -> list[LogitTarget]:
    """The top next-token logits: at most ``max_n_logits``, until ``desired_logit_prob``.

    logits: (d_vocab,) at the last position
    """
    probs = torch.softmax(logits.double(), dim=-1)
    top_p, top_idx = torch.topk(probs, min(max_n_logits, probs.numel()))
    cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), desired_logit_prob)) + 1
    W_U = model.W_U
    mean = W_U.mean(dim=-1)
    return [
        LogitTarget(
            label=_token_str(model, int(t)),
            token_id=int(t),
            probability=float(p),
            vector=(W_U[:, int(t)] - mean).detach(),
        )
        for p, t in zip(top_p[:cutoff], top_idx[:cutoff])
    ]


def custom_logit_targets(model: ReplacementModel, logits: Tensor, specs: Sequence) -> list[LogitTarget]:
    """Logit targets the user names.

    Each spec is a token string (" Austin"), a pair of token strings (" Austin", " Dallas")
    for the difference of two logits, or a dict ``{"label", "vector" (d_model,),
    "probability"?}`` for any direction in the residual stream.
    """
    if len(specs) == 0:
        raise ValueError("logit_targets is empty: give at least one target, or None for the top logits")
    probs = torch.softmax(logits.double(), dim=-1)
    W_U = model.W_U
    mean = W_U.mean(dim=-1)
    targets = []
    for spec in specs:
        if isinstance(spec, str):
            tok = _single_token(model, spec)
            targets.append(LogitTarget(spec, tok, float(probs[tok]), (W_U[:, tok] - mean).detach()))
        elif isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(s, str) for s in spec):
            a, b = (_single_token(model, s) for s in spec)
            targets.append(LogitTarget(f"{spec[0]} - {spec[1]}", a, float(probs[a]), (W_U[:, a] - W_U[:, b]).detach()))
        elif isinstance(spec, dict) and "vector" in spec:
            vec = torch.as_tensor(spec["vector"], dtype=W_U.dtype, device=W_U.device).flatten()
            if vec.numel() != model.d_model:
                raise ValueError(
                    f"custom logit target {spec.get('label', '?')!r} has dimension {vec.numel()}, "
                    f"but the residual stream has d_model={model.d_model}"
                )
            prob = float(spec.get("probability", 1.0 / len(specs)))
            targets.append(LogitTarget(str(spec.get("label", "custom")), -1, prob, vec))
        else:
            raise ValueError(
                f"logit target {spec!r} not understood: give a token string, a pair of token "
                "strings, or {'label': ..., 'vector': [...]}"
            )
    return targets


def _single_token(model: ReplacementModel, text: str) -> int:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"logit target {text!r} is {len(ids)} tokens ({ids}), not one: give a single token")
    return int(ids[0])


def _token_str(model: ReplacementModel, token_id: int) -> str:
    return model.tokenizer.decode([token_id])


# ---------------------------------------------------------------------------- node layout
@dataclass
class NodeLayout:
    """Columns in compute order: [active features, errors (layer-major), tokens, logits].

    feature_layer, feature_pos, feature_index: (n_active,) in (layer, pos, feature) order
    col_layer, col_pos: (n_cols,) the location of every column, for the structural mask
    (tokens sit below layer 0; logits above the last layer, never a source)
    """

    n_layers: int
    n_pos: int
    n_logits: int
    feature_layer: np.ndarray
    feature_pos: np.ndarray
    feature_index: np.ndarray

    def __post_init__(self) -> None:
        self.n_active = int(self.feature_layer.shape[0])
        self.error_start = self.n_active
        self.token_start = self.error_start + self.n_layers * self.n_pos
        self.logit_start = self.token_start + self.n_pos
        self.n_cols = self.logit_start + self.n_logits
        pos = np.arange(self.n_pos)
        self.col_layer = np.concatenate(
            [
                self.feature_layer,
                np.repeat(np.arange(self.n_layers), self.n_pos),
                np.full(self.n_pos, -1),
                np.full(self.n_logits, self.n_layers + 1),
            ]
        ).astype(np.int64)
        self.col_pos = np.concatenate(
            [self.feature_pos, np.tile(pos, self.n_layers), pos, np.full(self.n_logits, self.n_pos)]
        ).astype(np.int64)
        # feature columns of (layer, pos) are contiguous: [seg_start[l, p], seg_start[l, p + 1])
        keys = self.feature_layer.astype(np.int64) * self.n_pos + self.feature_pos
        bounds = np.searchsorted(keys, np.arange(self.n_layers * self.n_pos + 1))
        self.segments = bounds

    def feature_segment(self, layer: int, pos: int) -> slice:
        k = layer * self.n_pos + pos
        return slice(int(self.segments[k]), int(self.segments[k + 1]))

    def layer_features(self, layer: int) -> slice:
        return slice(int(self.segments[layer * self.n_pos]), int(self.segments[(layer + 1) * self.n_pos]))

    def error_col(self, layer: int, pos: int) -> int:
        return self.error_start + layer * self.n_pos + pos

    def logit_col(self, i: int) -> int:
        return self.logit_start + i

    def structural_mask(self, row_layer: np.ndarray, row_pos: np.ndarray) -> np.ndarray:
        """(B, n_cols) True where a target at (row_layer, row_pos) can have a direct edge."""
        return (self.col_layer[None, :] < row_layer[:, None]) & (self.col_pos[None, :] <= row_pos[:, None])


# ---------------------------------------------------------------------------- sources
@dataclass
class Sources:
    """Output vectors of every source node, laid out for one batched matmul per layer pair.

    decoders[l]: (n_pos, k_max, n_out_l, d_model) activation × decoder rows of layer l's active
    features grouped by position and zero-padded to k_max per position (n_out_l output layers:
    1 for a PLT, n_layers - l for a CLT)
    columns[l]: (n_pos * k_max,) compute-order column of each padded slot, -1 for padding
    errors: (n_layers, n_pos, d_model); tokens: (n_pos, d_model)
    """

    decoders: list[Tensor]
    columns: list[Tensor]
    out_layers: list[range]
    errors: Tensor
    tokens: Tensor


def build_sources(
    model: ReplacementModel, capture: Capture, layout: NodeLayout, values: Tensor, errors: Tensor | None = None
) -> Sources:
    """``errors``: the error nodes' output vectors (default: the capture's)."""
    tc = model.transcoders
    decoders, columns, out_layers = [], [], []
    for layer in range(layout.n_layers):
        seg = layout.layer_features(layer)
        feats = torch.as_tensor(layout.feature_index[seg], dtype=torch.long)
        dec = tc.decoder_vectors(layer, feats).to(capture.errors.dtype)  # (k, n_out, d_model)
        dec = dec * values[seg, None, None].to(dec.dtype)
        counts = [layout.feature_segment(layer, p) for p in range(layout.n_pos)]
        k_max = max([c.stop - c.start for c in counts] + [1])
        padded = dec.new_zeros(layout.n_pos, k_max, dec.shape[1], dec.shape[2])
        cols = torch.full((layout.n_pos, k_max), -1, dtype=torch.long)
        for pos, c in enumerate(counts):
            n = c.stop - c.start
            padded[pos, :n] = dec[c.start - seg.start : c.stop - seg.start]
            cols[pos, :n] = torch.arange(c.start, c.stop)
        decoders.append(padded)
        columns.append(cols.flatten())
        out_layers.append(tc.output_layers(layer))
    errors = capture.errors if errors is None else errors
    return Sources(decoders, columns, out_layers, errors, capture.token_embeddings)


# ---------------------------------------------------------------------------- one row batch
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


def compute_rows(ff: FrozenForward, batch: RowBatch, layout: NodeLayout, sources: Sources) -> np.ndarray:
    """Direct effects of every source on each target of ``batch``: (B, n_cols) float32.

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
    for layer in sorted(set(batch.layer.tolist())):
        rows = np.nonzero(batch.layer == layer)[0]
        read = ff.unembed_in if layer == n_layers else ff.mlp_inputs[layer]
        g = read.new_zeros((B, *read.shape))
        g[torch.as_tensor(rows), 0, torch.as_tensor(batch.pos[rows])] = batch.vectors[rows].to(g.dtype)
        outputs.append(read)
        grad_outputs.append(g)
    writes = ff.mlp_outputs[: min(top, n_layers)]
    grads = torch.autograd.grad(
        outputs,
        writes + [ff.embed],
        grad_outputs,
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )
    grads = [None if g is None else g[:, 0] for g in grads]
    g_out = grads[:-1]  # (B, n, d_model) per write layer
    g_embed = grads[-1]

    # accumulate in the model's dtype; the store keeps float32
    values = torch.zeros(B, layout.n_cols, dtype=ff.embed.dtype)
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
            start = layout.error_col(src_layer, 0)
            values[:, start : start + n] = err
    if g_embed is not None:
        tok = (g_embed * sources.tokens[None, :n]).sum(-1)
        values[:, layout.token_start : layout.token_start + n] = tok
    return values.numpy()


class FrozenPrefixes:
    """Frozen forwards of prompt prefixes, built on demand and kept for a few batches.

    Batches visit targets in (layer, position) order, so consecutive batches mostly share a
    prefix length; a forward of one copy costs little next to a batched backward.
    """

    def __init__(self, model: ReplacementModel, capture: Capture, keep: int = 4):
        self.model, self.capture, self.keep = model, capture, keep
        self._cache: dict[int, FrozenForward] = {}

    def covering(self, batch: RowBatch) -> FrozenForward:
        n = int(batch.pos.max()) + 1
        ff = self._cache.pop(n, None)
        if ff is None:
            ff = self.model.frozen_forward(self.capture, batch=1, n_pos=n)
        self._cache[n] = ff  # most recently used last
        while len(self._cache) > self.keep:
            self._cache.pop(next(iter(self._cache)))
        return ff


def to_csr(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, indices, values) of ``values`` restricted to ``mask`` (both (B, n_cols))."""
    counts = mask.sum(axis=1)
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    rows, cols = np.nonzero(mask)
    return indptr, cols.astype(np.int64), values[rows, cols].astype(np.float32)


# ---------------------------------------------------------------------------- ranking
def partial_influences(
    blocks: list[sp.csr_matrix],
    row_nodes: list[np.ndarray],
    logit_weights: np.ndarray,
    logit_start: int,
    n_cols: int,
    max_iter: int = 1024,
) -> np.ndarray:
    """Influence of every column on the logits through the rows computed so far.

    With A the computed rows, |A| normalised by row sums: w · (A + A² + …), where w holds the
    logit weights. Rows of nodes not yet visited are zero, so the series ends: the graph is
    acyclic (edges go to later layers or positions).
    """
    A = sp.vstack(blocks).tocsr().astype(np.float32)
    A.data = np.abs(A.data)
    sums = np.asarray(A.sum(axis=1)).ravel()
    A = sp.diags((1.0 / np.maximum(sums, 1e-8)).astype(np.float32)) @ A
    nodes = np.concatenate(row_nodes)
    prod = np.zeros(n_cols, dtype=np.float32)
    prod[logit_start : logit_start + len(logit_weights)] = logit_weights
    influence = np.zeros(n_cols, dtype=np.float32)
    AT = A.T.tocsr()
    for _ in range(max_iter):
        prod = AT @ prod[nodes]
        if not prod.any():
            return influence
        influence += prod
    raise RuntimeError("influence series did not terminate: the graph has a cycle")


# ---------------------------------------------------------------------------- fingerprint
def fingerprint(model: ReplacementModel, tokens: Tensor, cfg: AttributionConfig, targets_spec) -> str:
    """Digest of every input that decides the store's contents."""
    payload = {
        "model": model.digest(),
        "transcoders": model.transcoders.digest(),
        "tokens": tokens.tolist(),
        "config": asdict(cfg),
        "dtype": str(model.dtype),
        "logit_targets": _spec_digest(targets_spec),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _spec_digest(spec) -> str | None:
    if spec is None:
        return None
    h = hashlib.sha256()
    for item in spec:
        if isinstance(item, dict):
            h.update(str(item.get("label")).encode())
            h.update(np.asarray(torch.as_tensor(item["vector"]).detach().cpu(), dtype=np.float64).tobytes())
        else:
            h.update(repr(item).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- attribute
def attribute(
    prompt: str | Tensor,
    model: ReplacementModel,
    *,
    config: AttributionConfig | None = None,
    logit_targets: Sequence | None = None,
    store,
    verbose: bool = True,
    **options: Any,
) -> Graph:
    """Compute the attribution graph of ``prompt`` into the Zarr store at ``store``.

    Returns the finished ``Graph`` (circuit-tracer's node order). Rerunning with the same
    inputs on an interrupted store resumes it; on a finished store returns it at once.

    The options are :class:`AttributionConfig`'s fields, given as ``config``, as keywords
    (circuit-tracer's spelling: ``attribute(prompt, model, max_n_logits=5, store=...)``), or
    both (keywords win). ``zero_bos_errors``: give the error nodes at the BOS position zero
    output vectors, as circuit-tracer 0.5.0 does, so every edge out of them is 0. By default
    they keep their true error vectors, whose edges are exact direct effects like any other
    (README, "Differences from circuit-tracer").
    """
    cfg = AttributionConfig.of(config, **options)
    t0 = time.perf_counter()

    # Phase 1: precompute activations, error vectors and token vectors
    capture = model.capture(prompt)
    errors = capture.errors
    if cfg.zero_bos_errors:
        errors = errors.clone()
        errors[:, 0] = 0
    active, values = capture.active_features()
    active_np = active.cpu().numpy()
    layout = NodeLayout(
        n_layers=model.n_layers,
        n_pos=capture.n_pos,
        n_logits=0,  # set below, once the targets are known
        feature_layer=active_np[:, 0],
        feature_pos=active_np[:, 1],
        feature_index=active_np[:, 2],
    )

    # Phase 2: logit targets
    last_logits = capture.logits[-1]
    if logit_targets is None:
        targets = salient_logit_targets(model, last_logits, cfg.max_n_logits, cfg.desired_logit_prob)
    else:
        targets = custom_logit_targets(model, last_logits, logit_targets)
    layout = NodeLayout(
        model.n_layers, capture.n_pos, len(targets), layout.feature_layer, layout.feature_pos, layout.feature_index
    )
    n_features_to_visit = (
        layout.n_active if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, layout.n_active)
    )

    writer = GraphStoreWriter.open(
        store,
        fingerprint=fingerprint(model, capture.tokens, cfg, logit_targets),
        layout={
            "n_layers": model.n_layers,
            "n_pos": capture.n_pos,
            "n_active": layout.n_active,
            "n_logits": len(targets),
        },
        tables={
            "active_features": active_np.astype(np.int32),
            "activation_values": values.float().cpu().numpy(),
            "input_tokens": capture.tokens.cpu().numpy().astype(np.int64),
            "logit_tokens": np.array([t.token_id for t in targets], dtype=np.int64),
            "logit_probabilities": np.array([t.probability for t in targets], dtype=np.float32),
            "logit_vectors": torch.stack([t.vector for t in targets]).float().cpu().numpy(),
            "error_vectors": errors.float().cpu().numpy(),
            "token_embeddings": capture.token_embeddings.float().cpu().numpy(),
        },
        attrs=_store_attrs(model, prompt, capture, cfg, targets),
    )
    if writer.finished:
        log.info("graph store %s is already finished: nothing to compute", store)
        return Graph.open(store)

    # Phase 3: the frozen forward passes that row batches differentiate (one per prefix length)
    sources = build_sources(model, capture, layout, values, errors)
    frozen = FrozenPrefixes(model, capture)  # each row batch is one vmapped backward of one
    row_batch = cfg.batch_size

    def feature_batch(ids: np.ndarray) -> RowBatch:
        layers = layout.feature_layer[ids]
        vecs = torch.empty(len(ids), model.d_model, dtype=capture.errors.dtype)
        for layer in np.unique(layers):
            sel = np.nonzero(layers == layer)[0]
            feats = torch.as_tensor(layout.feature_index[ids[sel]], dtype=torch.long)
            vecs[torch.as_tensor(sel)] = model.transcoders.encoder_vectors(int(layer), feats).to(vecs.dtype)
        return RowBatch(layers.astype(np.int64), layout.feature_pos[ids].astype(np.int64), vecs, ids.astype(np.int64))

    n_logit_batches = -(-len(targets) // row_batch)
    n_feature_batches = _count_feature_batches(layout, n_features_to_visit, row_batch, cfg)
    progress = tqdm(total=n_logit_batches + n_feature_batches, desc="attribution", unit="batch", disable=not verbose)
    blocks: list[sp.csr_matrix] = []
    block_nodes: list[np.ndarray] = []
    keep_rows = cfg.max_feature_nodes is not None and n_features_to_visit < layout.n_active

    def run(batch_index: int, batch: RowBatch) -> None:
        if batch_index in writer.done_batches:
            if keep_rows:
                rec = writer.read_batch(batch_index)
                shape = (len(rec["targets"]), layout.n_cols)
                blocks.append(sp.csr_matrix((rec["values"], rec["indices"], rec["indptr"]), shape=shape))
                block_nodes.append(rec["targets"])
        else:
            dense = compute_rows(frozen.covering(batch), batch, layout, sources)
            mask = layout.structural_mask(batch.layer, batch.pos)
            indptr, indices, vals = to_csr(dense, mask)
            writer.write_batch(batch_index, batch.nodes, indptr, indices, vals)
            if keep_rows:
                blocks.append(sp.csr_matrix((vals, indices, indptr), shape=(len(batch.nodes), layout.n_cols)))
                block_nodes.append(batch.nodes)
        progress.update(1)

    try:
        # Phase 4: logit rows
        batch_index = 0
        logit_vecs = torch.stack([t.vector for t in targets]).to(capture.errors.dtype)
        for start in range(0, len(targets), row_batch):
            idx = np.arange(start, min(start + row_batch, len(targets)))
            run(
                batch_index,
                RowBatch(
                    np.full(len(idx), model.n_layers, dtype=np.int64),
                    np.full(len(idx), capture.n_pos - 1, dtype=np.int64),
                    logit_vecs[idx],
                    layout.logit_start + idx,
                ),
            )
            batch_index += 1

        # Phase 5: feature rows
        visited = np.zeros(layout.n_active, dtype=bool)
        n_visited = 0
        logit_weights = np.array([t.probability for t in targets], dtype=np.float32)
        while n_visited < n_features_to_visit:
            if not keep_rows:
                pending = np.arange(layout.n_active)
            else:
                influence = partial_influences(blocks, block_nodes, logit_weights, layout.logit_start, layout.n_cols)[
                    : layout.n_active
                ]
                rank = np.argsort(-influence, kind="stable")
                pending = rank[~visited[rank]][: min(cfg.update_interval * row_batch, n_features_to_visit - n_visited)]
            for ids in _layer_grouped_batches(pending, layout.feature_layer, layout.feature_pos, row_batch):
                run(batch_index, feature_batch(ids))
                visited[ids] = True
                n_visited += len(ids)
                batch_index += 1
    finally:
        progress.close()

    # Phase 6: finalize
    writer.write_table("selected_features", np.sort(np.nonzero(visited)[0]).astype(np.int64))
    graph = writer.finalize()
    log.info("attribution of %d tokens: %d nodes in %.1f s", capture.n_pos, graph.n_nodes, time.perf_counter() - t0)
    return graph


def _layer_grouped_batches(
    ids: np.ndarray, feature_layer: np.ndarray, feature_pos: np.ndarray, batch_size: int
) -> list[np.ndarray]:
    """Split ``ids`` (one queue of the visiting order) into batches that do not straddle layers.

    Within one queue the order of rows does not change any row, so sorting the queue by
    (layer, position) lets each backward pass stop at its layer and run over the shortest
    prompt prefix that holds its targets.
    """
    ids = ids[np.lexsort((feature_pos[ids], feature_layer[ids]))]
    layers = feature_layer[ids]
    batches = []
    for layer in np.unique(layers):
        chunk = ids[layers == layer]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return batches


def _count_feature_batches(layout: NodeLayout, n_visit: int, batch: int, cfg: AttributionConfig) -> int:
    if n_visit == layout.n_active:
        counts = np.bincount(layout.feature_layer, minlength=layout.n_layers)
        return int(sum(-(-int(c) // batch) for c in counts))
    return -(-n_visit // batch)  # an estimate: layer grouping may add a few


def _store_attrs(model: ReplacementModel, prompt, capture: Capture, cfg: AttributionConfig, targets) -> dict:
    tc = model.transcoders
    return {
        "prompt": prompt if isinstance(prompt, str) else None,
        "model": model.model_name,
        "model_digest": model.digest(),
        "transcoders_digest": tc.digest(),
        "transcoder_kind": tc.kind,
        "scan": tc.scan,
        "d_transcoder": tc.d_transcoder,
        "feature_input_hook": tc.feature_input_hook,
        "feature_output_hook": tc.feature_output_hook,
        "config": asdict(cfg),
        "logit_labels": [t.label for t in targets],
        "dtype": str(model.dtype),
    }
