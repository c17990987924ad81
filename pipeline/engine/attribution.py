"""Exact attribution graphs, streamed row batch by row batch into a Zarr graph store.

:func:`attribute` runs in six phases (``docs/algorithm.md``; circuit-tracer's ``attribute``):

1. precompute: active features, error vectors and token embeddings of one clean forward pass;
2. logit targets (:mod:`pipeline.engine.targets`);
3. the frozen forward passes that row batches differentiate (:mod:`pipeline.engine.rows`);
4. logit rows;
5. feature rows: all active features, or (``max_feature_nodes``) the most influential first,
   re-ranked every ``update_interval`` batches by :func:`partial_influences`;
6. finalize: record which features have rows and mark the store finished.

Every row batch is durably recorded in the store as it finishes: a killed run, rerun with
the same inputs, resumes from the last finished batch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pipeline._io import digest_json
from pipeline.engine.options import AttributionConfig, fingerprinted
from pipeline.engine.replacement import Capture, ReplacementModel
from pipeline.engine.rows import (
    ActiveFeatures,
    FrozenPrefixes,
    RowBatch,
    build_sources,
    compute_rows,
    feature_batch,
    logit_batch,
    to_csr,
)
from pipeline.engine.targets import LogitTarget, custom_logit_targets, parse_logit_targets, salient_logit_targets
from pipeline.engine.tokens import check_unknown_tokens
from pipeline.graph.layout import NodeLayout
from pipeline.graph.store import Graph
from pipeline.graph.writer import GraphStoreWriter

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- ranking
def partial_influences(
    blocks: list[sp.csr_matrix],
    row_nodes: list[np.ndarray],
    logit_weights: np.ndarray,
    logit_start: int,
    n_cols: int,
    max_iter: int = 1024,
) -> np.ndarray:
    """Influence (n_cols,) of every column on the logits through the rows computed so far.

    blocks: computed row blocks (k_i, n_cols) with row_nodes[i] (k_i,) their compute-order nodes;
    logit_weights: (n_logits,) for the logit columns from ``logit_start``.
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
        "config": fingerprinted(cfg),
        "dtype": str(model.dtype),
        "logit_targets": _spec_digest(targets_spec),
    }
    return digest_json(payload)


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

    A prompt or a token logit target the tokenizer encodes as its unknown token (a misspelt
    word) is refused (``PromptError``, naming the words) unless ``allow_unknown_tokens``.

    The options are :class:`AttributionConfig`'s fields, given as ``config``, as keywords
    (circuit-tracer's spelling: ``attribute(prompt, model, max_n_logits=5, store=...)``), or
    both (keywords win). ``zero_bos_errors``: give the error nodes at the BOS position zero
    output vectors, as circuit-tracer 0.5.0 does, so every edge out of them is 0. By default
    they keep their true error vectors, whose edges are exact direct effects like any other
    (docs/differences-from-circuit-tracer.md).
    """
    cfg = AttributionConfig.of(config, **options)
    t0 = time.perf_counter()
    if not cfg.allow_unknown_tokens:  # a misspelt word would silently be attributed as <unk>
        check_unknown_tokens(model.tokenizer, model.tokenize(prompt), prompt if isinstance(prompt, str) else None)
    if logit_targets is not None:  # before the forward pass: a bad target fails at once
        parse_logit_targets(model, logit_targets, allow_unknown_tokens=cfg.allow_unknown_tokens)

    # Phase 1: precompute activations, error vectors and token vectors
    capture = model.capture(prompt)
    errors = capture.errors
    if cfg.zero_bos_errors:
        errors = errors.clone()
        errors[:, 0] = 0
    active, values = capture.active_features()
    active_np = active.cpu().numpy()

    # Phase 2: logit targets
    last_logits = capture.logits[-1]
    if logit_targets is None:
        targets = salient_logit_targets(model, last_logits, cfg.max_n_logits, cfg.desired_logit_prob)
    else:
        targets = custom_logit_targets(model, last_logits, logit_targets, allow_unknown_tokens=cfg.allow_unknown_tokens)
    layout = NodeLayout(n_layers=model.n_layers, n_pos=capture.n_pos, n_active=len(active_np), n_logits=len(targets))
    features = ActiveFeatures(layout, active_np)
    n_features_to_visit = (
        layout.n_active if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, layout.n_active)
    )

    writer = GraphStoreWriter.open(
        store,
        fingerprint=fingerprint(model, capture.tokens, cfg, logit_targets),
        layout=layout,
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

    with writer:  # holds the store's lock until it finalizes or this run fails
        # Phase 3: the frozen forward passes that row batches differentiate (one per prefix length)
        sources = build_sources(model, capture, features, values, errors)
        frozen = FrozenPrefixes(model, capture)  # each row batch is one vmapped backward of one
        row_batch = cfg.batch_size
        n_compute = layout.n_compute
        logit_start = layout.compute_logit_slice.start

        n_logit_batches = -(-len(targets) // row_batch)
        n_feature_batches = _count_feature_batches(features, n_features_to_visit, row_batch)
        progress = tqdm(
            total=n_logit_batches + n_feature_batches, desc="attribution", unit="batch", disable=not verbose
        )
        # the rows computed so far, kept for influence re-ranking when not every feature is visited
        blocks: list[sp.csr_matrix] = []
        block_nodes: list[np.ndarray] = []
        keep_rows = cfg.max_feature_nodes is not None and n_features_to_visit < layout.n_active

        def run(batch_index: int, batch: RowBatch) -> None:
            """Compute and store one row batch, or read it back when a previous run stored it."""
            if batch_index in writer.done_batches:
                if keep_rows:
                    rec = writer.read_batch(batch_index)
                    shape = (len(rec["targets"]), n_compute)
                    blocks.append(sp.csr_matrix((rec["values"], rec["indices"], rec["indptr"]), shape=shape))
                    block_nodes.append(rec["targets"])
            else:
                dense = compute_rows(frozen.covering(batch), batch, layout, sources)
                mask = features.structural_mask(batch.layer, batch.pos)
                indptr, indices, vals = to_csr(dense, mask)
                writer.write_batch(batch_index, batch.nodes, indptr, indices, vals)
                if keep_rows:
                    blocks.append(sp.csr_matrix((vals, indices, indptr), shape=(len(batch.nodes), n_compute)))
                    block_nodes.append(batch.nodes)
            progress.update(1)

        try:
            # Phase 4: logit rows
            batch_index = 0
            logit_vecs = torch.stack([t.vector for t in targets]).to(capture.errors.dtype)
            for start in range(0, len(targets), row_batch):
                idx = np.arange(start, min(start + row_batch, len(targets)))
                run(batch_index, logit_batch(layout, logit_vecs, idx))
                batch_index += 1

            # Phase 5: feature rows
            visited = np.zeros(layout.n_active, dtype=bool)
            n_visited = 0
            logit_weights = np.array([t.probability for t in targets], dtype=np.float32)
            while n_visited < n_features_to_visit:
                if not keep_rows:
                    pending = np.arange(layout.n_active)
                else:
                    influence = partial_influences(blocks, block_nodes, logit_weights, logit_start, n_compute)[
                        : layout.n_active
                    ]
                    rank = np.argsort(-influence, kind="stable")
                    pending = rank[~visited[rank]][
                        : min(cfg.update_interval * row_batch, n_features_to_visit - n_visited)
                    ]
                for ids in _layer_grouped_batches(pending, features, row_batch):
                    run(batch_index, feature_batch(model, features, ids, capture.errors.dtype))
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


def _layer_grouped_batches(ids: np.ndarray, features: ActiveFeatures, batch_size: int) -> list[np.ndarray]:
    """Split ``ids`` (one queue of the visiting order) into batches that do not straddle layers.

    Within one queue the order of rows does not change any row, so sorting the queue by
    (layer, position) lets each backward pass stop at its layer and run over the shortest
    prompt prefix that holds its targets.
    """
    ids = ids[np.lexsort((features.pos[ids], features.layer[ids]))]
    layers = features.layer[ids]
    batches: list[np.ndarray] = []
    for layer in np.unique(layers):
        chunk = ids[layers == layer]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return batches


def _count_feature_batches(features: ActiveFeatures, n_visit: int, batch: int) -> int:
    """The number of feature row batches, for the progress bar."""
    if n_visit == features.layout.n_active:
        counts = np.bincount(features.layer, minlength=features.layout.n_layers)
        return int(sum(-(-int(c) // batch) for c in counts))
    return -(-n_visit // batch)  # an estimate: layer grouping may add a few


def _store_attrs(
    model: ReplacementModel, prompt, capture: Capture, cfg: AttributionConfig, targets: list[LogitTarget]
) -> dict:
    """The store's descriptive attributes (not part of the fingerprint)."""
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
        "config": fingerprinted(cfg),
        "logit_labels": [t.label for t in targets],
        "dtype": str(model.dtype),  # the compute dtype (also in the fingerprint); values are stored as float32
        "device": str(model.device),  # where the rows were computed: a description, not a key input
    }
