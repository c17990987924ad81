"""Edge sweeps: both sides of many edges of the frozen replacement model at once.

An edge's source adds a vector to the residual stream; its target reads one direction of it. In
the frozen model (attention patterns and norm scales fixed) everything between is linear, so the
source's change of every head's output z (``dz``) and the target's gradient with respect to z
are enough to split the edge across heads (``pipeline.engine.head_loadings``). ``EdgeSweeper``
gets them for a whole batch of edges from one frozen forward; ``source_sweep`` gets one source's
by forward-mode autodiff, the independent route the batched one is tested against.
Spec: ``docs/head-loadings.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from pipeline.engine import hooks as H
from pipeline.engine.replacement import Capture, ReplacementModel

__all__ = [
    "EdgeSweeper",
    "EdgeSweeps",
    "HeadLoadingsError",
    "SourceBlock",
    "SourceSweep",
    "SourceVector",
    "TargetSide",
    "TargetVector",
    "layers_on_the_way",
    "pair_shares",
    "position_shares",
    "source_sweep",
    "sweep_edges",
]


class HeadLoadingsError(ValueError):
    """A request a graph cannot answer: a bad node id, a pair with no edge, other weights."""


NO_VALUE_HOOKS = (
    "this model's attention exposes no attn.hook_v / attn.hook_pattern hooks: head loadings cannot be "
    "split by position (write_head_loadings without positions=True still works)"
)


# ---------------------------------------------------------------------------- endpoints
@dataclass
class SourceVector:
    """What a source node adds to the residual stream of the frozen model, and where.

    kind: "feature" | "error" | "token"; layer: its layer (-1 for a token); pos: its position
    writes: write layer -> (d_model,) added to that layer's MLP output at ``pos`` (a cross-layer
    transcoder's feature writes into every layer from its own on)
    embed: (d_model,) added to the token embedding at ``pos`` (token sources), else None
    """

    kind: str
    layer: int
    pos: int
    writes: dict[int, Tensor]
    embed: Tensor | None = None

    def write_indices(self) -> list[int]:
        """Where it writes, as indices of the frozen run's write locations: 0 the embedding,
        ``l + 1`` layer l's MLP output."""
        return [0] if self.embed is not None else [layer + 1 for layer in self.writes]

    def vector_at(self, index: int) -> Tensor | None:
        """Its vector at write location ``index`` (as :meth:`write_indices`), or None."""
        return self.embed if index == 0 else self.writes.get(index - 1)


@dataclass
class TargetVector:
    """Where a target node reads, and the direction it reads.

    kind: "feature" | "logit"; layer: the read layer (a feature's transcoder input, read after
    that layer's attention; ``n_layers`` for a logit, read at the unembedding's input)
    pos: its position; vector: (d_model,) the encoder row or the logit direction
    """

    kind: str
    layer: int
    pos: int
    vector: Tensor


def layers_on_the_way(source_layer: int, target_layer: int, n_layers: int) -> list[int]:
    """The attention layers an edge can pass: source layer < L <= target's read layer.

    A feature or error of layer l writes after layer l's attention, a token below layer 0; a
    feature target of layer m reads after layer m's attention, a logit after the last layer.
    """
    return list(range(source_layer + 1, min(target_layer, n_layers - 1) + 1))


# ---------------------------------------------------------------------------- sweeps
@dataclass
class SourceSweep:
    """The change one source makes in the frozen model over its first n positions
    (forward-mode tangents; exact, no finite differences).

    z: per layer (n, n_heads, d_head) the heads' outputs before W_O
    reads: per layer (n, d_model) the transcoders' read locations
    unembed: (n, d_model) the unembedding's input
    v: per layer (n, n_kv_heads, d_head) the value vectors (empty when the model has no
    ``attn.hook_v``); patterns: per layer (n_heads, n, n) the clean attention patterns (no tangent)
    """

    z: list[Tensor]
    reads: list[Tensor]
    unembed: Tensor
    v: list[Tensor] = field(default_factory=list)
    patterns: list[Tensor] = field(default_factory=list)

    def read(self, target: TargetVector) -> Tensor:
        """The target's change (0-d): its read vector . the tangent where it reads."""
        at = self.unembed if target.layer == len(self.reads) else self.reads[target.layer]
        return at[target.pos] @ target.vector.to(at.dtype)


def _tangent(t: Tensor) -> Tensor:
    """The forward-mode tangent of ``t`` without its batch dimension (zeros when none reached it)."""
    primal, tangent = fwAD.unpack_dual(t)
    return torch.zeros_like(primal[0]) if tangent is None else tangent[0]


class _Stop(Exception):
    """Raised once a sweep has recorded the last read it needs: later layers are not computed."""


def source_sweep(
    model: ReplacementModel,
    capture: Capture,
    source: SourceVector,
    n_pos: int,
    *,
    last_read: int | None = None,
) -> SourceSweep:
    """One forward-mode pass of the frozen model over the first ``n_pos`` tokens, the tangent
    entering at the source's write locations: one source at a time, with no autograd graph (the
    independent route :func:`sweep_edges` is checked against, and :func:`pair_shares`' input).

    Frozen as in ``ReplacementModel.frozen_forward``: attention patterns and norm scales keep
    their clean values and carry no tangent; an MLP output carries the source's vector (when the
    source writes there) plus the change of the transcoder's skip term. With ``last_read`` (a
    read layer; ``n_layers``: the unembedding's input) the pass stops once that read is
    recorded: later layers' tensors are zeros (no target there can see them). The unembedding
    itself is never computed.
    """
    n = int(n_pos)
    if not source.pos < n <= capture.n_pos:
        raise ValueError(f"n_pos must be in [{source.pos + 1}, {capture.n_pos}] for a source at position {source.pos}")
    dtype, device = capture.mlp_outputs.dtype, capture.mlp_outputs.device
    z: dict[int, Tensor] = {}
    reads: dict[int, Tensor] = {}
    live: dict[int, Tensor] = {}
    unembed: list[Tensor] = []
    values: dict[int, Tensor] = {}
    patterns: dict[int, Tensor] = {}

    def placed(vector: Tensor) -> Tensor:
        """``vector`` at the source's position of a (1, n, d_model) zero tensor."""
        out = torch.zeros(1, n, model.d_model, dtype=dtype, device=device)
        out[0, source.pos] = vector.to(device=device, dtype=dtype)
        return out

    def primal_only(tensor: Tensor, *, hook) -> Tensor:
        return fwAD.unpack_dual(tensor).primal

    def embed(tensor: Tensor, *, hook) -> Tensor | None:
        if source.embed is None:
            return None
        return fwAD.make_dual(tensor.detach(), placed(source.embed))

    def tangent_to(store: dict[int, Tensor], layer: int):
        def hook(tensor: Tensor, *, hook) -> None:
            store[layer] = _tangent(tensor)

        return hook

    def pattern(layer: int):
        def hook(tensor: Tensor, *, hook) -> None:
            patterns[layer] = fwAD.unpack_dual(tensor).primal[0]

        return hook

    def read(layer: int):
        def hook(tensor: Tensor, *, hook) -> None:
            live[layer] = tensor
            reads[layer] = _tangent(tensor)
            if layer == last_read:
                raise _Stop

        return hook

    def write(layer: int):
        def hook(tensor: Tensor, *, hook) -> Tensor:
            out = capture.mlp_outputs[layer][None, :n].clone()
            if layer in source.writes:
                out = fwAD.make_dual(out, placed(source.writes[layer]))
            skip = model.transcoders.skip(layer, live[layer])
            if skip is not None:  # value unchanged (x - x == 0 exactly); tangent: the skip's change
                out = out + (skip - fwAD.unpack_dual(skip).primal)
            return out

        return hook

    def grab_unembed(tensor: Tensor, *, hook) -> None:
        unembed.append(_tangent(tensor))
        raise _Stop  # the logits themselves are not needed

    fwd: list = [(name, primal_only) for name in model.pattern_hooks + model.scale_hooks]
    fwd.append((H.EMBED, embed))
    for layer in range(model.n_layers):
        if f"blocks.{layer}.attn.hook_v" in model.bridge.hook_dict:
            fwd.append((f"blocks.{layer}.attn.hook_v", tangent_to(values, layer)))
        if f"blocks.{layer}.attn.hook_pattern" in model.bridge.hook_dict:
            fwd.append((f"blocks.{layer}.attn.hook_pattern", pattern(layer)))
        fwd.append((H.attention_heads_hook(layer), tangent_to(z, layer)))
        fwd.append((model.input_hooks[layer], read(layer)))
        fwd.append((model.output_hooks[layer], write(layer)))
    fwd.append((H.UNEMBED_IN, grab_unembed))
    try:
        with torch.no_grad(), fwAD.dual_level(), model.hooks(fwd):
            model.bridge(capture.tokens[None, :n])
    except _Stop:
        pass
    layers = range(model.n_layers)
    cfg = model.bridge.cfg
    z_shape = (n, int(cfg.n_heads), int(cfg.d_head))
    return SourceSweep(
        [z[layer] if layer in z else torch.zeros(z_shape, dtype=dtype, device=device) for layer in layers],
        [
            reads[layer] if layer in reads else torch.zeros(n, model.d_model, dtype=dtype, device=device)
            for layer in layers
        ],
        unembed[0] if unembed else torch.zeros(n, model.d_model, dtype=dtype, device=device),
        v=_every_layer(values, model.n_layers),
        patterns=_every_layer(patterns, model.n_layers),
    )


def _every_layer(recorded: dict[int, Tensor], n_layers: int) -> list[Tensor]:
    """``recorded`` per layer, zeros for the layers after a stopped pass; [] when the model
    exposes no such hook (layer 0, before any stop, never recorded)."""
    if 0 not in recorded:
        return []
    return [recorded[layer] if layer in recorded else torch.zeros_like(recorded[0]) for layer in range(n_layers)]


@dataclass
class EdgeSweeps:
    """Both sides of a batch of edges, from one frozen forward over the first n positions.

    grads: per layer (T, n, n_heads, d_head) d target / d z, one row per target
    dz: per layer (S, n, n_heads, d_head) each source's change of the heads' outputs
    dv: per layer (S, n, n_kv_heads, d_head) each source's change of the value vectors ([] unless
    asked for, or when the model has no ``attn.hook_v``); patterns: per layer (n_heads, n, n) the
    clean attention patterns (with ``dv``)
    edges: (S, T) every source's edge into every target, computed as attribution computes it
    """

    grads: list[Tensor]
    dz: list[Tensor]
    dv: list[Tensor]
    patterns: list[Tensor]
    edges: Tensor


@dataclass
class TargetSide:
    """What a batch of T targets reads, and every source's edge into each.

    grads: per layer L (T_L, n, n_heads, d_head) d target / d z for the targets that read at or
    above L, in the order of ``readers[L]`` (the others read below L: their gradient there is 0)
    readers: per layer L (T_L,) those targets' indices in the batch
    edges: (S, T) each source's edge into each target, as attribution computes it (the source's
    vectors against the targets' gradients where it writes)
    """

    grads: list[Tensor]
    readers: list[Tensor]
    edges: Tensor

    def slots(self, layer: int) -> Tensor:
        """(T,) each target's row in ``grads[layer]``, -1 for a target reading below ``layer``."""
        n_targets = self.edges.shape[1]
        out = torch.full((n_targets,), -1, dtype=torch.long)
        out[self.readers[layer]] = torch.arange(len(self.readers[layer]))
        return out

    def dense_grads(self, layer: int) -> Tensor:
        """(T, n, n_heads, d_head) every target's ``d target / d z`` at ``layer``, zeros included."""
        g = self.grads[layer]
        out = g.new_zeros((self.edges.shape[1], *g.shape[1:]))
        out[self.readers[layer]] = g
        return out


@dataclass
class SourceBlock:
    """Some sources' changes. index: (k,) their places in the list swept; dz: per layer
    (k, n, n_heads, d_head) and dv: per layer (k, n, n_kv_heads, d_head) (empty without values),
    None where they change nothing."""

    index: Tensor
    dz: list[Tensor | None]
    dv: list[Tensor | None]


def _placed(x: Tensor, sources: list[SourceVector], index: int) -> Tensor:
    """(S, *x.shape): source i's vector at write location ``index`` (or nothing) at its
    position of a zero copy of ``x`` (1, n, d_model)."""
    out = x.new_zeros((len(sources), *x.shape))
    for i, src in enumerate(sources):
        vector = src.vector_at(index)
        if vector is not None:
            out[i, 0, src.pos] = vector.to(device=x.device, dtype=x.dtype)
    return out


class EdgeSweeper:
    """The frozen model over the first ``n_pos`` tokens of a prompt, kept to answer any number
    of edge batches: :meth:`target_side` and :meth:`source_blocks` give both sides of every
    (source, target) pair of a batch.

    Built from one ``ReplacementModel.frozen_forward`` (batch 1) with the heads' outputs z (and,
    with ``values``, the value vectors v and the clean patterns) recorded on its autograd graph,
    and the transpose of its Jacobian from the write locations to z (and v), ``J.T @ u`` for a
    zero ``u``, kept differentiable in ``u``. Then per batch:

    1. targets: a backward pass vmapped over a block of them gives ``d target / d z`` and, at
       the write locations, the targets' rows (the edges, as attribution computes them);
    2. sources: ``J @ vector`` at z (and v) as the gradient of ``vector . J.T u`` in ``u``, vmapped
       over blocks of them (the frozen model is linear, so this is exactly what a forward-mode
       sweep from each source computes).
    """

    def __init__(self, model: ReplacementModel, capture: Capture, n_pos: int, *, values: bool = False):
        self.model, self.n = model, int(n_pos)
        n_layers = model.n_layers
        z: dict[int, Tensor] = {}
        v: dict[int, Tensor] = {}
        patterns: dict[int, Tensor] = {}

        def grab(store: dict[int, Tensor], layer: int):
            def hook(tensor: Tensor, *, hook) -> Tensor:
                # the tensor a hook is given is off the bridge's autograd path; the copy returned
                # here is what the rest of the layer is computed from
                store[layer] = tensor.clone()
                return store[layer]

            return hook

        def pattern(layer: int):
            def hook(tensor: Tensor, *, hook) -> None:
                patterns[layer] = tensor.detach()[0]

            return hook

        fwd: list = [(H.attention_heads_hook(layer), grab(z, layer)) for layer in range(n_layers)]
        names = model.bridge.hook_dict
        self.values = values and all(f"blocks.{layer}.attn.hook_v" in names for layer in range(n_layers))
        if self.values:
            for layer in range(n_layers):
                fwd.append((f"blocks.{layer}.attn.hook_v", grab(v, layer)))
                fwd.append((f"blocks.{layer}.attn.hook_pattern", pattern(layer)))
        # installed around frozen_forward's own hooks: z and v are recorded in its graph
        with model.hooks(fwd):
            self.ff = model.frozen_forward(capture, batch=1, n_pos=self.n)
        self.writes = [self.ff.embed, *self.ff.mlp_outputs]  # where sources enter: below layer 0, after each MLP
        self.zs = [z[layer] for layer in range(n_layers)]
        self.vs = [v[layer] for layer in range(n_layers)] if self.values else []
        self.patterns = [patterns[layer] for layer in range(n_layers)] if self.values else []
        ys = self.zs + self.vs
        self.us = [torch.zeros_like(y, requires_grad=True) for y in ys]
        with torch.enable_grad():
            transposed = torch.autograd.grad(ys, self.writes, self.us, create_graph=True, allow_unused=True)
        # the write locations some z or v depends on (the last MLP's output feeds no attention)
        self.reached = [i for i, g in enumerate(transposed) if g is not None and g.requires_grad]
        self.transposed = [transposed[i] for i in self.reached]

    def target_side(self, targets: list[TargetVector], sources: list[SourceVector], block: int = 8) -> TargetSide:
        """``d target / d z`` and every source's edge into every target: one backward pass
        vmapped over each block of at most ``block`` targets, blocks taken in order of the read
        layer (a block's backward starts at its highest read and skips the layers above it).

        Memory: the batched backward's temporaries grow with the block, not with T; the
        targets' gradients at the write locations give the block's edges and are dropped; of
        ``d target / d z`` only the layers at or below each target's read are kept."""
        if not targets:
            raise ValueError("a sweep needs at least one target")
        if max(t.pos for t in targets) >= self.n:
            raise ValueError(f"a target lies outside the first {self.n} positions")
        if sources and max(s.pos for s in sources) >= self.n:
            raise ValueError(f"a source lies outside the first {self.n} positions")
        n_layers, ff, zs = self.model.n_layers, self.ff, self.zs
        readers = [[i for i, t in enumerate(targets) if t.layer >= layer] for layer in range(n_layers)]
        slot = [{target: row for row, target in enumerate(r)} for r in readers]
        grads = [z.new_zeros((len(r), *z.shape[1:])) for z, r in zip(zs, readers)]
        edges = zs[0].new_zeros((len(sources), len(targets)))
        # per write location: the sources writing there, their positions and vectors (k, d_model)
        written = []
        for index, w in enumerate(self.writes):
            found = [(i, v) for i, src in enumerate(sources) if (v := src.vector_at(index)) is not None]
            if found:
                vectors = torch.stack([v.to(device=w.device, dtype=w.dtype) for _, v in found])
                at = torch.as_tensor([i for i, _ in found])
                written.append((index, at, torch.as_tensor([sources[i].pos for i, _ in found]), vectors))
        order = sorted(range(len(targets)), key=lambda i: (targets[i].layer, i))
        for start in range(0, len(order), block):
            members = order[start : start + block]
            outputs, grad_outputs = [], []
            for layer in sorted({targets[i].layer for i in members}):
                read = ff.unembed_in if layer == n_layers else ff.mlp_inputs[layer]
                g = read.new_zeros((len(members), *read.shape))
                for b, i in enumerate(members):
                    if targets[i].layer == layer:
                        g[b, 0, targets[i].pos] = targets[i].vector.to(device=g.device, dtype=g.dtype)
                outputs.append(read)
                grad_outputs.append(g)
            raw = torch.autograd.grad(
                outputs, zs + self.writes, grad_outputs, allow_unused=True, is_grads_batched=True, retain_graph=True
            )
            for layer, g in enumerate(raw[:n_layers]):
                if g is None:
                    continue
                kept = [(b, slot[layer][i]) for b, i in enumerate(members) if i in slot[layer]]
                if kept:
                    b_rows, g_rows = (torch.as_tensor(x) for x in zip(*kept))
                    grads[layer][g_rows] = g[b_rows, 0].detach()
            cols = torch.as_tensor(members)
            for index, at, where, vectors in written:
                row = raw[n_layers + index]  # (block, 1, n, d_model) or None: no target depends on it
                if row is not None:
                    # edges[s, t] += row_t[pos_s] . vector_s, for every source writing here
                    part = torch.einsum("bkd,kd->kb", row[:, 0, where].detach(), vectors.to(row.dtype))
                    edges[at[:, None], cols[None, :]] += part
        return TargetSide(grads, [torch.as_tensor(r, dtype=torch.long) for r in readers], edges)

    def source_blocks(self, sources: list[SourceVector], block: int = 8) -> Iterator[SourceBlock]:
        """Each source's change of z (and v): ``J @ vector = d (vector . J.T u) / d u``, vmapped
        over blocks of at most ``block`` sources that write to the same layer, so that a block's
        backward starts at its own writes and skips the layers below them. Blocks come in order
        of that layer; every source is in exactly one."""
        if sources and max(s.pos for s in sources) >= self.n:
            raise ValueError(f"a source lies outside the first {self.n} positions")
        n_layers = self.model.n_layers
        for first in sorted({src.layer + 1 for src in sources}):  # a write index: 0 the embedding
            group = [i for i, src in enumerate(sources) if src.layer + 1 == first]
            for start in range(0, len(group), block):
                index = group[start : start + block]
                members = [sources[i] for i in index]
                # where these sources write (a cross-layer feature: several layers)
                written = {i for src in members for i in src.write_indices()}
                roots = [(k, i) for k, i in enumerate(self.reached) if i in written]
                found: tuple = (None,) * len(self.us)
                if roots:  # else written after the last attention layer: no head sees them
                    vectors = [_placed(self.writes[i], members, i) for _, i in roots]
                    with torch.enable_grad():
                        found = torch.autograd.grad(
                            [self.transposed[k] for k, _ in roots],
                            self.us,
                            vectors,
                            allow_unused=True,
                            is_grads_batched=True,
                            retain_graph=True,
                        )
                tangents = [None if t is None else t[:, 0].detach() for t in found]
                yield SourceBlock(torch.as_tensor(index), tangents[:n_layers], tangents[n_layers:])

    def sweep(self, sources: list[SourceVector], targets: list[TargetVector]) -> EdgeSweeps:
        """Both sides of every (source, target) pair, the sources' tangents gathered into dense
        (S, ...) tensors (for a few edges; :func:`_compute_chunk` uses the blocks as they come)."""
        if not sources:
            raise ValueError("a sweep needs at least one source")
        side = self.target_side(targets, sources)
        ys = self.zs + self.vs
        dense = [y.new_zeros((len(sources), *y.shape[1:])) for y in ys]
        for blk in self.source_blocks(sources):
            for out, t in zip(dense, blk.dz + blk.dv):
                if t is not None:
                    out[blk.index] = t
        n_layers = self.model.n_layers
        grads = [side.dense_grads(layer) for layer in range(n_layers)]
        return EdgeSweeps(grads, dense[:n_layers], dense[n_layers:], self.patterns, side.edges)


def sweep_edges(
    model: ReplacementModel,
    capture: Capture,
    sources: list[SourceVector],
    targets: list[TargetVector],
    n_pos: int,
    *,
    values: bool = False,
) -> EdgeSweeps:
    """Every (source, target) pair's ingredients over the first ``n_pos`` tokens: one
    :class:`EdgeSweeper`, one sweep."""
    return EdgeSweeper(model, capture, n_pos, values=values).sweep(sources, targets)


def position_shares(pattern: Tensor, grad: Tensor, dv: Tensor) -> Tensor:
    """``pattern[h, p, k] * grad[e, p, h] . dv[e, k, g(h)]``: (E, n_heads, n, n) from pattern
    (n_heads, n, n), grad (E, n, n_heads, d_head), dv (E, n, n_kv_heads, d_head)."""
    dv = dv.to(grad.dtype)
    n_heads = int(grad.shape[2])
    if dv.shape[2] != n_heads:  # grouped-query attention: query head h reads key/value head h // group
        dv = dv.repeat_interleave(n_heads // int(dv.shape[2]), dim=2)
    return pattern.to(grad.dtype)[None] * torch.einsum("ephd,ekhd->ehpk", grad, dv)


def pair_shares(sweep: SourceSweep, grads: list[Tensor], layer: int) -> Tensor:
    """One edge's loading of each head of ``layer`` split by (query, key) position:
    (n_heads, n, n), ``share[h, p, k]`` the part carried by what head h moved from key
    position k into its output at query position p.

    With the pattern A frozen, z[p, h] = sum_k A[h, p, k] v[k, g(h)] (the value bias has no
    tangent), so ``share[h, p, k] = A[h, p, k] * grad[p, h] . dv[k, g(h)]`` and
    ``share[h].sum()`` is head h's loading; g(h) is the key/value head of query head h.
    sweep: the source's change; grads: per layer (n, n_heads, d_head) one target's gradient
    (``sweep_edges(...).grads[layer][b]``).
    """
    if not sweep.v or not sweep.patterns:
        raise HeadLoadingsError(NO_VALUE_HOOKS)
    n = min(len(grads[layer]), len(sweep.z[layer]))
    return position_shares(sweep.patterns[layer][:, :n, :n], grads[layer][None, :n], sweep.v[layer][None, :n])[0]
