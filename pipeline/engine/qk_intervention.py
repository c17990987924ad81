"""Removing QK nodes from one head's query and key, in the model's own forward.

The check of a QK attribution by intervention: the contributions of some query-side nodes (at
the query position) and key-side nodes (at the key position) are taken out of the head's query
and key vectors by hooks on the real forward of that layer's attention (the norm scales are
the run's, since the hooks sit after the norm), and the head's scores and pattern row at the
query position are compared with what ``qk_attribution`` predicts from its matrices.
``docs/qk-attributions.md`` (section "Removing nodes") gives the prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.engine import hooks as H
from pipeline.engine.qk import (
    QKAttribution,
    QKNode,
    _check_index,
    _record_run,
    _residual_terms,
    qk_attribution,
)
from pipeline.engine.replacement import Capture, ReplacementModel
from pipeline.graph.layout import NodeLayout


@dataclass
class QKRemoval:
    """One head's scores and pattern at ``query_pos`` before and after removing nodes.

    query_nodes, key_nodes: the removed nodes (as given). scores_*: (query_pos + 1,) float64, the
    head's pre-softmax scores from ``query_pos`` to every key ``0..query_pos``: ``before`` (the
    clean run), ``after`` (the hooked run), ``predicted`` (from the QK matrices: the removed
    query rows subtracted at every key, the removed key columns at ``key_pos``, their shared
    terms added back once). pattern_*: (n_pos,) float64, the attention row at ``query_pos``
    (zero past it): the run's before and after, and the softmax of the predicted scores.
    score_* / attention_*: the entries at ``key_pos``. attribution: the QKAttribution at
    (query_pos, key_pos). logits_before, logits_after: (d_vocab,) the model's logits at
    ``query_pos`` in the clean and the hooked run (the removal's effect downstream).
    """

    layer: int
    head: int
    query_pos: int
    key_pos: int
    query_nodes: list[QKNode]
    key_nodes: list[QKNode]
    scores_before: Tensor
    scores_after: Tensor
    scores_predicted: Tensor
    pattern_before: Tensor
    pattern_after: Tensor
    pattern_predicted: Tensor
    attribution: QKAttribution
    logits_before: Tensor
    logits_after: Tensor

    @property
    def score_before(self) -> float:
        return float(self.scores_before[self.key_pos])

    @property
    def score_after(self) -> float:
        return float(self.scores_after[self.key_pos])

    @property
    def score_predicted(self) -> float:
        return float(self.scores_predicted[self.key_pos])

    @property
    def attention_before(self) -> float:
        return float(self.pattern_before[self.key_pos])

    @property
    def attention_after(self) -> float:
        return float(self.pattern_after[self.key_pos])

    @property
    def attention_predicted(self) -> float:
        return float(self.pattern_predicted[self.key_pos])


def remove_qk_nodes(
    model: ReplacementModel,
    prompt_or_capture: str | Tensor | Capture,
    layer: int,
    head: int,
    query_pos: int,
    key_pos: int,
    *,
    query_nodes: Sequence[QKNode] = (),
    key_nodes: Sequence[QKNode] = (),
    attributions: Sequence[QKAttribution] | None = None,
) -> QKRemoval:
    """Remove ``query_nodes``' contributions from head ``head``'s query at ``query_pos`` and
    ``key_nodes``' from its key at ``key_pos`` (layer ``layer``), in the model's forward.

    The nodes are those ``qk_attribution`` lists at these positions (compared by kind, layer,
    position and feature; graph ids are ignored), the ``bias`` node included. A node's
    contribution is its residual vector through the layer's first norm with the run's scale
    (centred for LayerNorm, times the norm weight) and through W_Q (W_K of the head's key/value
    group); the bias node's is the norm's bias through it plus b_Q (b_K). It is subtracted at
    ``blocks.L.attn.hook_q`` / ``hook_k`` (before rotary: the model rotates what is left), for
    this head and position only. Returns a :class:`QKRemoval`.

    attributions: ``qk_attribution(model, capture, layer, head, query_pos, k)`` for every
    ``k`` in ``0..query_pos`` (in order), to reuse across many removals on the same capture;
    computed here when None.

    Bad input is a ValueError naming the fix: a layer, head or position out of range, a key after
    the query, a node that is not a term of the residual at that side's position.
    """
    _check_index("layer", layer, model.n_layers, "the model has {n} layers")
    n_heads = int(model.bridge.cfg.n_heads)
    _check_index("head", head, n_heads, "layer {layer} has {n} heads", layer=layer)
    capture = prompt_or_capture if isinstance(prompt_or_capture, Capture) else model.capture(prompt_or_capture)
    n_pos = capture.n_pos
    _check_index("query_pos", query_pos, n_pos, "the prompt has {n} tokens")
    _check_index("key_pos", key_pos, n_pos, "the prompt has {n} tokens")
    if key_pos > query_pos:
        raise ValueError(
            f"key_pos {key_pos} is after query_pos {query_pos}: attention is causal; pass key_pos <= query_pos"
        )

    # the QK matrices at (query_pos, k) for every key k <= query_pos: the prediction
    if attributions is None:
        attributions = [qk_attribution(model, capture, layer, head, query_pos, k, top=0) for k in range(query_pos + 1)]
    per_key = list(attributions)
    where = [(a.layer, a.head, a.query_pos, a.key_pos) for a in per_key]
    if where != [(layer, head, query_pos, k) for k in range(query_pos + 1)]:
        raise ValueError(
            f"attributions must be qk_attribution at layer {layer}, head {head}, query_pos {query_pos} and "
            f"key_pos 0..{query_pos} in order; got {where}"
        )
    at_key = per_key[key_pos]
    q_rows = _rows_of(query_nodes, at_key.query_nodes, "query", query_pos)
    k_cols = _rows_of(key_nodes, at_key.key_nodes, "key", key_pos)
    before = torch.tensor([a.total for a in per_key], dtype=torch.float64)
    predicted = before.clone()
    for k, a in enumerate(per_key):
        predicted[k] -= float(a.query_marginals[q_rows].sum())
    predicted[key_pos] -= float(at_key.key_marginals[k_cols].sum())
    predicted[key_pos] += float(at_key.matrix[q_rows][:, k_cols].sum())

    # the hooked forward of the real model
    run = _record_run(model, capture.tokens, layer)
    q_delta = _contribution(model, capture, run, layer, head, query_pos, q_rows, "Q")
    k_delta = _contribution(model, capture, run, layer, head, key_pos, k_cols, "K")
    group = n_heads // int(model.bridge.blocks[layer].attn.W_K.shape[0])
    clean = _hooked_run(model, capture.tokens, layer, [])
    edits = [(f"blocks.{layer}.attn.hook_q", query_pos, head, q_delta)]
    edits.append((f"blocks.{layer}.attn.hook_k", key_pos, head // group, k_delta))
    after = _hooked_run(model, capture.tokens, layer, edits)

    keys = slice(0, query_pos + 1)
    pattern_predicted = torch.zeros(n_pos, dtype=torch.float64)
    pattern_predicted[keys] = torch.softmax(predicted, dim=0)
    return QKRemoval(
        layer=layer,
        head=head,
        query_pos=query_pos,
        key_pos=key_pos,
        query_nodes=list(query_nodes),
        key_nodes=list(key_nodes),
        scores_before=clean["scores"][head, query_pos, keys].to("cpu", torch.float64),
        scores_after=after["scores"][head, query_pos, keys].to("cpu", torch.float64),
        scores_predicted=predicted,
        pattern_before=clean["pattern"][head, query_pos].to("cpu", torch.float64),
        pattern_after=after["pattern"][head, query_pos].to("cpu", torch.float64),
        pattern_predicted=pattern_predicted,
        attribution=at_key,
        logits_before=clean["logits"][query_pos].to("cpu", torch.float64),
        logits_after=after["logits"][query_pos].to("cpu", torch.float64),
    )


def _same(a: QKNode, b: QKNode) -> bool:
    return (a.kind, a.layer, a.pos, a.feature) == (b.kind, b.layer, b.pos, b.feature)


def _rows_of(wanted: Sequence[QKNode], nodes: list[QKNode], side: str, pos: int) -> list[int]:
    """The indices in ``nodes`` (one side's terms) of each wanted node; unknown ones refused."""
    rows: list[int] = []
    for node in wanted:
        if not isinstance(node, QKNode):
            raise ValueError(f"{side}_nodes must hold QKNode objects (from qk_attribution), got {node!r}")
        found = [i for i, n in enumerate(nodes) if _same(n, node)]
        if not found:
            where = f"at position {pos}" if node.pos in (None, pos) else f"at position {node.pos}, not {pos}"
            raise ValueError(
                f"{side} node {node.label()} is not a term of the residual stream {where}: pass nodes from "
                f"qk_attribution(...).{side}_nodes at these positions"
            )
        if found[0] in rows:
            raise ValueError(f"{side} node {node.label()} is given twice: pass each node once")
        rows.append(found[0])
    return rows


def _contribution(
    model: ReplacementModel, cap: Capture, run, layer: int, head: int, pos: int, rows: list[int], side: str
) -> Tensor:
    """(d_head,) the removed terms' sum through the frozen norm and W_Q (W_K of the head's
    group), before rotary, in the model's dtype; the bias node is the last row of its side."""
    idx, values = cap.active_features()
    cdt = torch.float32 if model.device.type == "mps" else torch.float64
    layout = NodeLayout(model.n_layers, cap.n_pos, int(idx.shape[0]), 0)
    _, vecs = _residual_terms(model, cap, run, layer, pos, idx, values, layout, cdt)
    block = model.bridge.blocks[layer]
    norm = block.ln1.original_component
    attn = block.attn
    W = attn.W_Q if side == "Q" else attn.W_K  # (n_heads or n_kv_heads, d_model, d_head)
    b = attn.b_Q if side == "Q" else attn.b_K
    g = head if side == "Q" else head // (int(model.bridge.cfg.n_heads) // int(W.shape[0]))
    W_g = W[g].to(cdt)
    total = torch.zeros(W_g.shape[-1], dtype=cdt, device=W_g.device)
    terms = [r for r in rows if r < len(vecs)]
    if terms:
        x = vecs[terms].sum(0)
        if model.normalization.startswith("LN"):
            x = x - x.mean()
        x = x / run.scale[pos].to(cdt)
        if getattr(norm, "weight", None) is not None:
            x = x * norm.weight.to(cdt)
        total = total + x @ W_g
    if len(vecs) in rows:  # the side's bias node
        if getattr(norm, "bias", None) is not None:
            total = total + norm.bias.to(cdt) @ W_g
        if b is not None:
            total = total + b[g].to(cdt)
    return total.to(model.dtype)


def _hooked_run(model: ReplacementModel, tokens: Tensor, layer: int, edits: list) -> dict[str, Tensor]:
    """One forward with each (hook, pos, head, delta) subtracted; the layer's scores and
    pattern (n_heads, n_pos, n_pos) and the logits (n_pos, d_vocab)."""
    out: dict[str, Tensor] = {}

    def subtract(pos: int, head: int, delta: Tensor):
        def hook(t: Tensor, *, hook) -> Tensor:
            if t.ndim != 4:
                raise RuntimeError(f"{hook.name} has shape {tuple(t.shape)}, not (batch, pos, heads, d_head)")
            t = t.clone()
            t[0, pos, head] -= delta
            return t

        return hook

    def keep(key: str):
        def hook(t: Tensor, *, hook) -> None:
            out[key] = t[0].detach().clone()

        return hook

    fwd = [(name, subtract(pos, head, delta)) for name, pos, head, delta in edits]
    fwd += [(H.attn_scores(layer), keep("scores")), (f"blocks.{layer}.attn.hook_pattern", keep("pattern"))]
    with torch.no_grad(), model.hooks(fwd):
        logits = model.bridge(tokens[None])
    out["logits"] = logits[0].detach()
    return out
