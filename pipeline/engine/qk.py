"""QK attribution: one attention score split into query-node × key-node terms.

For head h of layer L, the pre-softmax score between query position p and key position q is,
with the run's norm scales frozen, a bilinear form of the residual stream at p and at q. Each
of the two residuals is written as the sum of what reaches it (the graph's nodes: features,
errors, token embeddings; and the terms the graph does not name: the positional embedding,
earlier attention outputs, transcoder decoder biases and skip terms), so the score is exactly
the sum of a matrix of query-term × key-term products plus the norm/projection bias terms.
With ``expand_attention``, earlier attention outputs are traced through their OV circuits
(patterns frozen) into the nodes at the positions they read from.
``docs/qk-attributions.md`` gives the formula and what is not covered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.engine import hooks as H
from pipeline.engine.replacement import Capture, ReplacementModel
from pipeline.graph.layout import NodeLayout
from pipeline.graph.store import Graph

NODE_KINDS = ("token", "position", "feature", "error", "attention", "attention_bias", "decoder_bias", "skip", "bias")

# relative tolerance of the exactness anchors (sums checked against the run's own tensors),
# per model dtype: Hugging Face computes some norms in float32 even in a float64 model
_ANCHOR_RTOL = {torch.float64: 1e-5, torch.float32: 1e-4}
_ANCHOR_RTOL_LOW = 3e-2  # bfloat16 / float16 runs


@dataclass(frozen=True)
class QKNode:
    """One term of the residual stream at the query or the key position (a row or a column).

    kind: "token" (token embedding), "position" (learned positional embedding), "feature"
    (activation × its decoder rows into layers < L), "error" (the MLP error of ``layer``),
    "attention" (what layer ``layer``'s attention added), "decoder_bias" (b_dec of ``layer``),
    "skip" (the skip term of ``layer``'s transcoder), "bias" (the norm's bias times W_Q or W_K,
    plus b_Q or b_K: one per side, independent of the residual). With ``expand_attention``,
    "attention" terms are replaced by the upstream nodes they carry (a node's term then holds
    its direct part and what attention moved from its position to this one) plus
    "attention_bias" (what layer ``layer``'s attention adds at ``pos`` independent of the
    residual: b_O and the value biases, mixed by the pattern).
    layer: the feature's encoder layer, or the layer whose output the term is part of; None
    for token, position and bias. pos: where the term sits (None for bias). feature: the
    transcoder feature index (features only).
    compute_node: the compute-order id attribution gives this node (features, errors, tokens;
    ``docs/formats.md``), else None. graph_node: its graph-order id when a Graph was given and
    holds it (unselected features: None).
    """

    kind: str
    layer: int | None = None
    pos: int | None = None
    feature: int | None = None
    compute_node: int | None = None
    graph_node: int | None = None

    def label(self) -> str:
        """A short name: ``feature L0 p3 #12``, ``error L1 p3``, ``token p3``, ``bias``."""
        parts = [self.kind]
        if self.layer is not None:
            parts.append(f"L{self.layer}")
        if self.pos is not None:
            parts.append(f"p{self.pos}")
        if self.feature is not None:
            parts.append(f"#{self.feature}")
        return " ".join(parts)


@dataclass(frozen=True)
class QKTerm:
    """One query-node × key-node product: its share of the score (same units as the score)."""

    query: QKNode
    key: QKNode
    value: float


@dataclass
class QKAttribution:
    """The decomposition of one pre-softmax score ``S[head, query_pos, key_pos]`` of ``layer``.

    total: the score the run computed (after the model's scaling, 1/sqrt(d_head) on GPT-2 and
    Llama; a logit of the attention softmax).
    terms_sum: the sum of every entry of ``matrix``; equals ``total`` up to rounding.
    query_nodes, key_nodes: the rows and columns of ``matrix``; the last of each is the side's
    "bias" node.
    matrix: (n_query_nodes, n_key_nodes) float64 on the CPU, matrix[i, j] the product of query
    node i's and key node j's contributions to the score.
    query_marginals: (n_query_nodes,) row sums: the score change when that query-side term is
    removed (key side held). key_marginals: (n_key_nodes,) column sums, likewise.
    terms: the ``top`` entries of ``matrix`` by |value|, largest first (total, matrix and
    marginals are always complete).
    """

    layer: int
    head: int
    query_pos: int
    key_pos: int
    total: float
    terms_sum: float
    query_nodes: list[QKNode]
    key_nodes: list[QKNode]
    matrix: Tensor
    query_marginals: Tensor
    key_marginals: Tensor
    terms: list[QKTerm]

    def summary(self, n: int = 10) -> str:
        """The score, its decomposition's sum and the ``n`` largest terms, one per line."""
        lines = [
            f"layer {self.layer} head {self.head}, query {self.query_pos} -> key {self.key_pos}: "
            f"score {self.total:+.6g} (terms sum {self.terms_sum:+.6g})"
        ]
        for t in self.terms[:n]:
            lines.append(f"  {t.value:+.4g}  {t.query.label()}  x  {t.key.label()}")
        return "\n".join(lines)


@dataclass
class _Run:
    """What one hooked forward records for layer L (positions first, batch dropped).

    resid: (n_pos, d_model) residual entering L; scale: (n_pos,) ln1 scale of L;
    scores: (n_heads, n_pos, n_pos); attn: [l] (n_pos, d_model) attention outputs of l < L;
    pos_embed: (n_pos, d_model) or None; cos, sin: (n_pos, rotary_dim) or None.
    Recorded only to expand attention, for every l < L: resids[l] (n_pos, d_model) the residual
    entering l, patterns[l] (n_heads, n_pos, n_pos), scales[l] (n_pos,) ln1 scales.
    """

    resid: Tensor
    scale: Tensor
    scores: Tensor
    attn: list[Tensor]
    pos_embed: Tensor | None
    cos: Tensor | None
    sin: Tensor | None
    resids: list[Tensor]
    patterns: list[Tensor]
    scales: list[Tensor]


class _Stop(Exception):
    """Raised by the last hook a run needs, so layers past L are not computed."""


def qk_attribution(
    model: ReplacementModel,
    prompt_or_capture: str | Tensor | Capture,
    layer: int,
    head: int,
    query_pos: int,
    key_pos: int,
    *,
    top: int | None = 20,
    graph: Graph | None = None,
    expand_attention: bool = False,
) -> QKAttribution:
    """Split head ``head`` of ``layer``'s pre-softmax score from ``query_pos`` to ``key_pos``
    into query-node × key-node terms (see :class:`QKAttribution`).

    prompt_or_capture: a prompt (text or token ids) or the Capture of one (its tokens are rerun
    once to record the attention inputs). top: how many terms to list (None: all). graph: the
    attribution graph of the same prompt and transcoders, to name each node's graph id.
    expand_attention: replace each earlier layer's attention output by the nodes it carries
    through its OV circuit (patterns and norm scales frozen at the run's), recursively, so
    every term is a node at a position up to the query (key) position, or a bias.

    Bad input is a ValueError naming the fix: a layer, head or position out of range, a key
    after the query, a key the layer masks (sliding window), or a model whose score is not a
    plain bilinear form (attention logit soft-capping, query/key norms, ALiBi).
    """
    _check_index("layer", layer, model.n_layers, "the model has {n} layers")
    n_heads = int(model.bridge.cfg.n_heads)
    _check_index("head", head, n_heads, "layer {layer} has {n} heads", layer=layer)
    _check_plain_bilinear(model, layer)
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 0):
        raise ValueError(f"top must be a non-negative int or None (all terms), got {top!r}")
    capture = prompt_or_capture if isinstance(prompt_or_capture, Capture) else None
    tokens = capture.tokens if capture is not None else model.tokenize(prompt_or_capture)  # type: ignore[arg-type]
    n_pos = int(tokens.shape[0])
    _check_index("query_pos", query_pos, n_pos, "the prompt has {n} tokens")
    _check_index("key_pos", key_pos, n_pos, "the prompt has {n} tokens")
    if key_pos > query_pos:
        raise ValueError(
            f"key_pos {key_pos} is after query_pos {query_pos}: attention is causal, a query attends "
            f"only to keys at or before it; pass key_pos <= query_pos"
        )
    if capture is None:
        capture = model.capture(tokens)
    run = _record_run(model, capture.tokens, layer, expand_attention)
    actual = float(run.scores[head, query_pos, key_pos])
    if not np.isfinite(actual) or actual <= torch.finfo(run.scores.dtype).min / 2:
        raise ValueError(
            f"layer {layer} masks key position {key_pos} for query position {query_pos} (a sliding-window "
            "layer): pass a key_pos within the layer's window"
        )

    cdt = torch.float32 if model.device.type == "mps" else torch.float64  # mps has no float64
    idx, values = capture.active_features()
    layout = NodeLayout(model.n_layers, n_pos, int(idx.shape[0]), 0)
    if expand_attention:
        nodes, spread = _expanded_terms(model, capture, run, layer, idx, values, layout, cdt)
        q_nodes, q_vecs = _at_position(nodes, spread, query_pos)
        k_nodes, k_vecs = _at_position(nodes, spread, key_pos)
        _check_residual(model, run.resid[query_pos], q_vecs, layer, query_pos)
        _check_residual(model, run.resid[key_pos], k_vecs, layer, key_pos)
    else:
        q_nodes, q_vecs = _residual_terms(model, capture, run, layer, query_pos, idx, values, layout, cdt)
        k_nodes, k_vecs = _residual_terms(model, capture, run, layer, key_pos, idx, values, layout, cdt)
    Q = _project(model, run, layer, head, query_pos, q_vecs, "Q", cdt)  # (n_q + 1, d_head), bias last
    K = _project(model, run, layer, head, key_pos, k_vecs, "K", cdt)
    q_nodes.append(QKNode("bias"))
    k_nodes.append(QKNode("bias"))
    d_head = int(Q.shape[-1])
    matrix = (Q @ K.T) * _score_scaling(model, layer, d_head)
    terms_sum = float(matrix.sum())
    bound = _anchor_rtol(model) * (float(matrix.abs().sum()) + abs(actual)) + 1e-12
    if abs(terms_sum - actual) > bound:
        raise RuntimeError(
            f"layer {layer} head {head}: the QK terms sum to {terms_sum:.8g} but the run's score is "
            f"{actual:.8g}: this model's attention score is not the bilinear form QK attribution "
            "decomposes (another rotary convention or score scaling); it is not supported"
        )
    if graph is not None:
        q_nodes = _with_graph_ids(q_nodes, graph, capture, idx)
        k_nodes = _with_graph_ids(k_nodes, graph, capture, idx)
    matrix = matrix.to("cpu", torch.float64)
    return QKAttribution(
        layer=layer,
        head=head,
        query_pos=query_pos,
        key_pos=key_pos,
        total=actual,
        terms_sum=terms_sum,
        query_nodes=q_nodes,
        key_nodes=k_nodes,
        matrix=matrix,
        query_marginals=matrix.sum(1),
        key_marginals=matrix.sum(0),
        terms=_top_terms(matrix, q_nodes, k_nodes, top),
    )


# ---------------------------------------------------------------------------- checks
def _check_index(name: str, value, n: int, what: str, **fmt) -> None:
    """``value`` is an int in [0, n); otherwise one line naming the range (``what`` says why)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not 0 <= int(value) < n:
        reason = what.format(n=n, **fmt)
        raise ValueError(f"{name} {value} is out of range: {reason}; pass {name} in [0, {n})")


def _check_plain_bilinear(model: ReplacementModel, layer: int) -> None:
    """The score of ``layer`` is q·k times a constant, with q, k affine in the normalised
    residual (rotated by rotary tables where the model has them); otherwise a ValueError
    naming what breaks it."""
    name = model.model_name or "this model"
    attn = model.bridge.blocks[layer].attn.original_component
    hf_config = getattr(model.bridge.original_model, "config", None)
    cap = getattr(attn, "attn_logit_softcapping", None) or getattr(hf_config, "attn_logit_softcapping", None)
    if cap:
        raise ValueError(
            f"{name} soft-caps its attention logits (tanh at {cap}): the score is not a bilinear form of "
            "the residual stream, so QK attribution cannot split it; use a model without attention "
            "logit soft-capping"
        )
    for norm in ("q_norm", "k_norm"):
        if getattr(attn, norm, None) is not None:
            raise ValueError(
                f"{name} normalises its queries and keys ({norm}): QK attribution supports only "
                "attention whose queries and keys are affine in the first norm's output"
            )
    pe = str(getattr(model.bridge.cfg, "positional_embedding_type", "standard"))
    if pe not in ("standard", "rotary"):
        raise ValueError(
            f"{name} uses {pe!r} positional terms: QK attribution supports learned positional embeddings "
            "(GPT-2) and rotary attention (Llama)"
        )
    if model.normalization not in ("LN", "LNPre", "RMS", "RMSPre"):
        raise ValueError(
            f"{name} uses normalization {model.normalization!r}: QK attribution supports LayerNorm and RMSNorm"
        )


def _anchor_rtol(model: ReplacementModel) -> float:
    return _ANCHOR_RTOL.get(model.dtype, _ANCHOR_RTOL_LOW)


# ---------------------------------------------------------------------------- the run
def _record_run(model: ReplacementModel, tokens: Tensor, layer: int, expand: bool = False) -> _Run:
    """One forward of ``tokens`` that records what layer ``layer``'s scores are made of (with
    ``expand``, also every earlier layer's attention inputs), and stops at that layer's scores."""
    store: dict[object, Tensor] = {}
    rotary = str(model.bridge.cfg.positional_embedding_type) == "rotary"

    def keep(key: object, stop: bool = False):
        def hook(tensor: Tensor, *, hook) -> None:
            store[key] = tensor[0].detach().clone()
            if stop:
                raise _Stop

        return hook

    fwd = [
        (H.resid_pre(layer), keep("resid")),
        (H.ln1_scale(layer), keep("scale")),
        (H.attn_scores(layer), keep("scores", stop=True)),
    ]
    fwd += [(H.attn_out(src), keep(("attn", src))) for src in range(layer)]
    if expand:
        for src in range(layer):
            fwd += [(H.resid_pre(src), keep(("resid", src))), (H.ln1_scale(src), keep(("scale", src)))]
            fwd.append((f"blocks.{src}.attn.hook_pattern", keep(("pattern", src))))
    if rotary:
        cos, sin = H.rotary_cos_sin(layer)
        fwd += [(cos, keep("cos")), (sin, keep("sin"))]
    else:
        fwd.append((H.POS_EMBED, keep("pos")))
    try:
        with torch.no_grad(), model.hooks(fwd):
            model.bridge(tokens[None])
    except _Stop:
        pass
    n_pos = int(tokens.shape[0])
    for key in ("resid", "scale", "scores") + (("cos", "sin") if rotary else ("pos",)):
        if key not in store:
            raise RuntimeError(f"the bridge never fired the hook for {key!r} at layer {layer}: QK attribution needs it")
    cos_t, sin_t = (store["cos"].reshape(n_pos, -1), store["sin"].reshape(n_pos, -1)) if rotary else (None, None)
    return _Run(
        resid=store["resid"],
        scale=store["scale"].reshape(n_pos),
        scores=store["scores"],
        attn=[store[("attn", src)] for src in range(layer)],
        pos_embed=store.get("pos"),
        cos=cos_t,
        sin=sin_t,
        resids=[store[("resid", src)] for src in range(layer)] if expand else [],
        patterns=[store[("pattern", src)] for src in range(layer)] if expand else [],
        scales=[store[("scale", src)].reshape(n_pos) for src in range(layer)] if expand else [],
    )


# ---------------------------------------------------------------------------- residual terms
def _residual_terms(
    model: ReplacementModel,
    cap: Capture,
    run: _Run,
    layer: int,
    pos: int,
    idx: Tensor,
    values: Tensor,
    layout: NodeLayout,
    cdt: torch.dtype,
) -> tuple[list[QKNode], Tensor]:
    """The terms whose sum is the residual stream entering ``layer`` at ``pos``.

    returns (nodes, vectors (n_nodes, d_model) in ``cdt``); checked against the run's residual.
    A CLT feature of layer s writes to every layer from s on: its term is the sum of its
    decoder rows into the layers below ``layer`` (what the graph's node contributes there).
    """
    tc = model.transcoders
    nodes: list[QKNode] = [QKNode("token", pos=pos, compute_node=layout.compute_token_node(pos))]
    vecs: list[Tensor] = [cap.token_embeddings[pos]]
    if run.pos_embed is not None:
        nodes.append(QKNode("position", pos=pos))
        vecs.append(run.pos_embed[pos])
    here = ((idx[:, 1] == pos) & (idx[:, 0] < layer)).nonzero().reshape(-1)
    for src in range(layer):
        nodes.append(QKNode("attention", layer=src, pos=pos))
        vecs.append(run.attn[src][pos])
        mine = here[idx[here, 0] == src]
        if len(mine):
            out = [j for j, out_layer in enumerate(tc.output_layers(src)) if out_layer < layer]
            dec = tc.decoder_vectors(src, idx[mine, 2]).to(device=cap.errors.device, dtype=cdt)[:, out].sum(1)
            vecs.extend(values[mine].to(cdt)[:, None] * dec)
            nodes.extend(
                QKNode("feature", layer=src, pos=pos, feature=int(idx[i, 2]), compute_node=int(i)) for i in mine
            )
        nodes.append(QKNode("error", layer=src, pos=pos, compute_node=layout.compute_error_node(src, pos)))
        vecs.append(cap.errors[src, pos])
        nodes.append(QKNode("decoder_bias", layer=src, pos=pos))
        vecs.append(tc.decoder_bias(src))
        skip = tc.skip(src, cap.mlp_inputs[src, pos])
        if skip is not None:
            nodes.append(QKNode("skip", layer=src, pos=pos))
            vecs.append(skip)
    stacked = torch.stack([v.to(device=cap.errors.device, dtype=cdt) for v in vecs])
    _check_residual(model, run.resid[pos], stacked, layer, pos)
    return nodes, stacked


def _check_residual(model: ReplacementModel, resid: Tensor, terms: Tensor, layer: int, pos) -> None:
    """The exactness anchor: ``terms`` (n, d_model) add up to the run's ``resid`` (d_model,)
    entering ``layer`` at ``pos`` (a position, or "every position" for a whole layer)."""
    resid = resid.to(terms.dtype)
    err = float((terms.sum(0) - resid).abs().max())
    size = float(terms.abs().sum(0).max()) + float(resid.abs().max())
    if err > _anchor_rtol(model) * size + 1e-12:
        raise RuntimeError(
            f"the residual stream entering layer {layer} at position {pos} is not the sum of its embeddings, "
            f"attention outputs and MLP outputs (max difference {err:.3g}): the model adds something QK "
            "attribution does not model (post-attention/post-MLP norms, a scaled embedding), or the capture "
            "was made with other weights; recapture it with this model"
        )


def _expanded_terms(
    model: ReplacementModel,
    cap: Capture,
    run: _Run,
    layer: int,
    idx: Tensor,
    values: Tensor,
    layout: NodeLayout,
    cdt: torch.dtype,
) -> tuple[list[QKNode], Tensor]:
    """Every node's contribution to the residual stream entering ``layer``, at every position,
    with earlier attention outputs expanded through their OV circuits.

    Layer by layer from the embedding: each layer's attention (pattern and ln1 scale frozen at
    the run's) moves every node's contribution from its key positions to its query positions,
    and what it adds independent of the residual is that layer's "attention_bias" node; then
    the layer's MLP terms are added at their positions. returns (nodes, spread (n_nodes, n_pos,
    d_model)); memory n_nodes * n_pos * d_model.
    """
    tc = model.transcoders
    n_pos = cap.n_pos
    device = cap.errors.device
    zero = torch.zeros(n_pos, model.d_model, dtype=cdt, device=device)
    nodes: list[QKNode] = []
    first: list[Tensor] = []  # each node's contribution to the embedding (n_pos, d_model)
    for pos in range(n_pos):
        nodes.append(QKNode("token", pos=pos, compute_node=layout.compute_token_node(pos)))
        first.append(_at(cap.token_embeddings[pos].to(cdt), pos, n_pos))
        if run.pos_embed is not None:
            nodes.append(QKNode("position", pos=pos))
            first.append(_at(run.pos_embed[pos].to(cdt), pos, n_pos))
    # features below ``layer``: (row in nodes, layer, pos, activation x decoder rows (n_out, d_model)),
    # each row added at its output layer's MLP step below
    features: list[tuple[int, int, int, Tensor]] = []
    below = (idx[:, 0] < layer).nonzero().reshape(-1)
    for src in range(layer):
        mine = below[idx[below, 0] == src]
        if len(mine):
            rows = tc.decoder_vectors(src, idx[mine, 2]).to(device=device, dtype=cdt)
            rows = values[mine].to(cdt)[:, None, None] * rows
            for k, i in enumerate(mine.tolist()):
                pos = int(idx[i, 1])
                features.append((len(nodes), src, pos, rows[k]))
                nodes.append(QKNode("feature", layer=src, pos=pos, feature=int(idx[i, 2]), compute_node=i))
                first.append(zero)
    spread = torch.stack(first)
    for src in range(layer):
        block = model.bridge.blocks[src]
        _check_residual(model, run.resids[src].reshape(-1), spread.reshape(len(spread), -1), src, "every position")
        moved, bias = _through_ov(model, block, run, src, spread, cdt)
        _check_residual(
            model,
            run.attn[src].reshape(-1),
            torch.cat([moved, bias[None]]).reshape(len(spread) + 1, -1),
            src,
            "every position (attention output)",
        )
        spread = spread + moved
        new = []  # rows of the nodes this layer adds: attention biases, errors, b_dec, skip
        for pos in range(n_pos):
            nodes.append(QKNode("attention_bias", layer=src, pos=pos))
            new.append(_at(bias[pos], pos, n_pos))
        # MLP terms of layer src: features' rows into src, then error, b_dec and skip per position
        for row, f_layer, f_pos, dec in features:
            out_layers = tc.output_layers(f_layer)
            if src in out_layers:
                spread[row, f_pos] += dec[out_layers.index(src)]
        for pos in range(n_pos):
            nodes.append(QKNode("error", layer=src, pos=pos, compute_node=layout.compute_error_node(src, pos)))
            new.append(_at(cap.errors[src, pos].to(cdt), pos, n_pos))
            nodes.append(QKNode("decoder_bias", layer=src, pos=pos))
            new.append(_at(tc.decoder_bias(src).to(cdt), pos, n_pos))
            skip = tc.skip(src, cap.mlp_inputs[src, pos])
            if skip is not None:
                nodes.append(QKNode("skip", layer=src, pos=pos))
                new.append(_at(skip.to(cdt), pos, n_pos))
        spread = torch.cat([spread, torch.stack(new)])
    return nodes, spread


def _at(vec: Tensor, pos: int, n_pos: int) -> Tensor:
    """(n_pos, d_model): ``vec`` at ``pos``, zero elsewhere."""
    out = vec.new_zeros(n_pos, vec.shape[-1])
    out[pos] = vec
    return out


def _through_ov(model: ReplacementModel, block, run: _Run, src: int, spread: Tensor, cdt: torch.dtype):
    """What layer ``src``'s attention writes, per node: (moved (n_nodes, n_pos, d_model), bias
    (n_pos, d_model)), with its patterns and ln1 scales frozen at the run's."""
    norm = block.ln1.original_component
    weight, nbias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    x = spread
    if model.normalization.startswith("LN"):
        x = x - x.mean(-1, keepdim=True)
    x = x / run.scales[src].to(cdt)[None, :, None]
    if weight is not None:
        x = x * weight.to(cdt)
    attn = block.attn
    W_V, W_O = attn.W_V.to(cdt), attn.W_O.to(cdt)  # (n_kv, d_model, d_head), (n_heads, d_head, d_model)
    n_heads, group = W_O.shape[0], W_O.shape[0] // W_V.shape[0]
    pattern = run.patterns[src].to(cdt)  # (n_heads, n_query, n_key)
    moved = torch.zeros_like(spread)
    bias = spread.new_zeros(spread.shape[1], spread.shape[2])
    for h in range(n_heads):
        g = h // group
        v = x @ W_V[g]  # (n_nodes, n_pos, d_head)
        moved += torch.einsum("ts,nsd->ntd", pattern[h], v) @ W_O[h]
        v_bias = (nbias.to(cdt) @ W_V[g]) if nbias is not None else W_V.new_zeros(W_V.shape[-1])
        if attn.b_V is not None:
            v_bias = v_bias + attn.b_V[g].to(cdt)
        bias += pattern[h].sum(-1)[:, None] * (v_bias @ W_O[h])[None]
    if attn.b_O is not None:
        bias += attn.b_O.to(cdt)
    return moved, bias


def _at_position(nodes: list[QKNode], spread: Tensor, pos: int) -> tuple[list[QKNode], Tensor]:
    """The nodes that can reach ``pos`` (those at positions up to it) and their vectors there."""
    keep = [i for i, node in enumerate(nodes) if node.pos is None or node.pos <= pos]
    return [nodes[i] for i in keep], spread[keep, pos]


# ---------------------------------------------------------------------------- linear maps
def _project(
    model: ReplacementModel, run: _Run, layer: int, head: int, pos: int, vecs: Tensor, side: str, cdt: torch.dtype
) -> Tensor:
    """Each residual term through the frozen first norm of ``layer``, W_Q (side "Q") or W_K of the
    head's key/value group, and the rotary rotation of ``pos``; one more row for the side's bias
    (the norm's bias through the same map plus b_Q / b_K). returns (n_terms + 1, d_head)."""
    block = model.bridge.blocks[layer]
    norm = block.ln1.original_component
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    x = vecs
    if model.normalization.startswith("LN"):
        x = x - x.mean(-1, keepdim=True)  # the mean of a sum is the sum of the means: per term
    x = x / run.scale[pos].to(cdt)  # the run's scale, frozen: the norm is linear in its input
    if weight is not None:
        x = x * weight.to(cdt)
    norm_bias = bias.to(cdt) if bias is not None else x.new_zeros(x.shape[-1])
    attn = block.attn
    W = attn.W_Q if side == "Q" else attn.W_K  # (n_heads or n_kv_heads, d_model, d_head)
    b = attn.b_Q if side == "Q" else attn.b_K
    # grouped-query attention: query heads share key heads in contiguous groups
    h = head if side == "Q" else head // (int(model.bridge.cfg.n_heads) // int(W.shape[0]))
    W_h = W[h].to(cdt)
    out = torch.cat([x @ W_h, (norm_bias @ W_h)[None]])
    if b is not None:
        out[-1] = out[-1] + b[h].to(cdt)
    if run.cos is not None and run.sin is not None:
        out = _rotate(out, run.cos[pos].to(cdt), run.sin[pos].to(cdt))
    return out


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of one position, the rotate-half convention (Llama, NeoX): the first
    ``len(cos)`` dimensions of each row of x (..., d_head) are rotated, the rest pass through."""
    r = int(cos.shape[-1])
    rot, rest = x[..., :r], x[..., r:]
    first, second = rot[..., : r // 2], rot[..., r // 2 :]
    rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1)


def _score_scaling(model: ReplacementModel, layer: int, d_head: int) -> float:
    """The constant the model multiplies q·k by before the softmax."""
    attn = model.bridge.blocks[layer].attn.original_component
    if hasattr(attn, "scale_attn_weights"):  # GPT-2's attention: its own two flags
        scaling = d_head**-0.5 if attn.scale_attn_weights else 1.0
        if getattr(attn, "scale_attn_by_inverse_layer_idx", False):
            scaling /= float(getattr(attn, "layer_idx", layer)) + 1
        return scaling
    scaling = getattr(attn, "scaling", None)  # Llama-family attention modules store it
    return float(scaling) if scaling is not None else d_head**-0.5


# ---------------------------------------------------------------------------- naming
def _with_graph_ids(nodes: list[QKNode], graph: Graph, cap: Capture, idx: Tensor) -> list[QKNode]:
    """The nodes with their graph-order ids; the graph must be of this prompt and these features."""
    same_tokens = np.array_equal(np.asarray(graph.input_tokens), cap.tokens.cpu().numpy())
    same_features = np.array_equal(np.asarray(graph.active_features), idx.cpu().numpy())
    if not (same_tokens and same_features):
        raise ValueError(
            "the graph was computed for another prompt or other transcoders (its tokens or active features "
            "differ from this capture's): pass the graph attributed from this prompt with this model"
        )
    named = []
    for node in nodes:
        gid = None
        if node.compute_node is not None:
            g = int(graph.compute_to_graph(node.compute_node))
            gid = g if g >= 0 else None
        named.append(QKNode(node.kind, node.layer, node.pos, node.feature, node.compute_node, gid))
    return named


def _top_terms(matrix: Tensor, q_nodes: list[QKNode], k_nodes: list[QKNode], top: int | None) -> list[QKTerm]:
    flat = matrix.reshape(-1)
    k = flat.numel() if top is None else min(int(top), flat.numel())
    order = flat.abs().topk(k).indices.tolist()
    n_k = matrix.shape[1]
    return [QKTerm(q_nodes[i // n_k], k_nodes[i % n_k], float(flat[i])) for i in order]
