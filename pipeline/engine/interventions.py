"""Feature interventions on the replacement model: set or scale transcoder features and rerun.

The model intervened on is the **local replacement model**: every MLP output is its
transcoder's reconstruction plus the error vector of the clean run, so with no intervention
the logits are the base model's, bit for bit. An intervention ``(layer, pos, feature, value)``
replaces that feature's activation at that position; its decoder change is added to the MLP
outputs it writes to (one layer for a per-layer transcoder, every later layer for a CLT).

Steps of one intervention run (:class:`InterventionRunner`):

1. Clean run: one forward pass of the base model records, per layer, the transcoder input,
   the MLP output and the feature activations (zero at BOS), every attention pattern and
   normalisation scale, and the unembedding's input.
2. Resolve the interventions into per-layer vectors of (pos, feature, multiplier, offset):
   the new value is ``multiplier * reference + offset`` (see *Values*), checked against the
   model (layer, feature and position ranges, finite values).
3. Resolve the mode (below) into: which layers' MLP outputs are frozen, which layers the
   interventions write to, whether attention patterns / norm scales are frozen.
4. Hooked forward pass: at each transcoder input the features are recomputed from the live
   residual stream; at each MLP output the hook writes ``clean output + (decoder change of
   every changed feature) + (skip(x_live) - skip(x_clean))``. Only changed features are
   decoded, so an intervention that changes nothing returns the clean run exactly.

Modes (the argument names and defaults are circuit-tracer's ``feature_intervention``,
``replacement_model_transformerlens.py``; checked against ``setup_intervention_with_freeze``
and ``_get_feature_intervention_hooks``):

* **Iterative patching** (default, ``constrained_layers=None``): the change propagates through
  every later transcoder: later features are recomputed from the new residual stream and
  write their own changes, error vectors stay at their clean values. The intervened
  feature's change is ``value - live activation`` (circuit-tracer: the delta is computed
  against the current activations at that layer). ``freeze_attention=True`` (default) holds
  every attention pattern at its clean value — and only the patterns: norm scales stay live,
  as in circuit-tracer (its docstring says "and layernorms", its code freezes ``hook_pattern``
  alone unless the constrained range covers every layer).
* **Constrained** (``constrained_layers=range(a, b)``): the layers in the range are *frozen*:
  their MLP outputs are the clean outputs plus the skip term's change, plus the decoder
  changes of the intervened features, which write **only** to output layers inside the range
  (a CLT feature of layer 2 constrained to ``range(4, 6)`` writes to layers 4 and 5 only; a
  per-layer feature outside the range has no effect). Intervention deltas are taken against
  the clean activations. Layers outside the range run live (iterative, as above, without the
  interventions). Attention patterns are frozen whatever ``freeze_attention`` says; norm
  scales are frozen too when the range covers every layer. This is circuit-tracer's
  semantics ("the effects of intervention will not propagate through the constrained
  layers, and CLTs will write only to those layers").
* **Direct effects** (``direct_effects=True``): the constrained mode over every layer, i.e.
  everything frozen as in attribution: attention patterns, all norm scales, every MLP output
  at its clean value plus the skip term's change plus the intervention's decoder change.
  Adding ``delta`` times a source's output vector then moves every target (feature
  pre-activation, de-meaned logit) by ``delta`` times its attribution edge weight.
  circuit-tracer spells this ``constrained_layers=range(n_layers)``; both work here.

Error vectors (``errors=``): ``"frozen"`` (default; the paper's local replacement model) holds
them at their clean values. ``"recomputed"`` runs the base model's own MLPs on the live input
and adds the interventions' decoder changes — exactly circuit-tracer's TransformerLens
replacement model, whose forward pass keeps the real MLPs (equivalently: the error is
recomputed from the live input). The two agree when nothing downstream changes.

Values: a number sets the feature (``0.0`` ablates); :class:`Scale` multiplies the feature's
reference activation (``Scale(0)`` ablates, ``Scale(-2)``, ``Scale(10)``); :class:`Add` adds
to it. The reference is the live activation (iterative mode, generated positions) or the
clean one (constrained and direct modes). Duplicated (layer, pos, feature) entries: the last
one wins. Positions: an int (negative counts from the prompt's end), a ``range``, a list of
ints, or a ``slice``; ``slice(k, None)`` is *open-ended*: every prompt position from ``k``
and, in generation, every generated position too.

Returned activations are the transcoders' reading of the live MLP input of this run (what
circuit-tracer returns: an intervened feature shows the value it was read at, not the value
it was set to; features of frozen layers show what they would read), zero at BOS;
``apply_activation_function=False`` returns pre-activations instead, which is what
attribution edges predict.

Generation (:func:`feature_intervention_generate`): the prompt pass is the intervention run
above (with its mode); every generated position is run like circuit-tracer's open-ended
hooks: iterative, attention free, the base model's MLPs (its error is recomputed: a generated
position has no clean run) plus the decoder changes of the open-ended interventions. With
``use_kv_cache=True`` the prompt's keys and values are computed once, under the intervention,
and each step runs one token. TransformerLens 4.3 on transformers 5 does not hand the cache to
its attention components (transformers now passes it as ``cache``, the bridge looks for
``past_key_values`` / ``layer_past``), so the cache is passed under both names; a cache that is
not filled raises. Cached and uncached generation give the same tokens.

Supernodes: a named group of features intervened on as one unit (:class:`Supernode`,
:func:`intervene`). Read from the viewer's sidecar (``{slug}.annotations.json``) or a config
mapping by :func:`load_supernodes` / :func:`supernodes_from_config`; accepted schemas::

    {"supernodes": {"<name>": [[layer, pos, feature], ...], ...},    # simple form
     "labels": {"<node_id>": "<text>", ...}}                          # optional
    {"supernodes": {"<name>": {"nodes": [...], "features": [[layer, pos, feature], ...]}}}
                                                                      # the viewer's stored form

Node ids alone are not read (an error node ``0_{layer}_{pos}`` and a feature node
``{layer}_{feature}_{pos}`` have the same shape); the viewer stores ``features`` for this.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from pipeline.engine import hooks as H

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.engine.replacement import ReplacementModel

__all__ = [
    "Add",
    "Annotations",
    "CleanRun",
    "GenerationResult",
    "InterventionResult",
    "InterventionRunner",
    "Mode",
    "Scale",
    "Supernode",
    "clean_run",
    "feature_intervention",
    "feature_intervention_generate",
    "intervene",
    "load_supernodes",
    "read_annotations",
    "resolve_mode",
    "supernodes_from_config",
]

ErrorMode = Literal["frozen", "recomputed"]
ERROR_MODES = ("frozen", "recomputed")


# ------------------------------------------------------------------------------------ values
def _finite(x: Any, what: str) -> float:
    """``x`` as a finite float, else ValueError naming ``what``."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{what} must be one number, got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{what} must be a number, got {x!r}")
    x = float(x)
    if math.isnan(x):
        raise ValueError(f"{what} is NaN: give a finite number (0.0 or Scale(0.0) ablates)")
    if math.isinf(x):
        raise ValueError(f"{what} is infinite: give a finite number")
    return x


@dataclass(frozen=True)
class Scale:
    """Multiply a feature's reference activation by ``factor`` (×0 ablates, ×−2, ×10)."""

    factor: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", _finite(self.factor, "Scale factor"))


@dataclass(frozen=True)
class Add:
    """Add ``delta`` to a feature's reference activation."""

    delta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "delta", _finite(self.delta, "Add delta"))


def _mul_add(value: Any, what: str) -> tuple[float, float]:
    """(multiplier, offset) with new value = multiplier * reference + offset."""
    if isinstance(value, Scale):
        return value.factor, 0.0
    if isinstance(value, Add):
        return 1.0, value.delta
    try:
        return 0.0, _finite(value, what)
    except ValueError as exc:
        if "must be a number" in str(exc):
            raise ValueError(
                f"{what} must be a number (the new activation), Scale(factor) or Add(delta), got {value!r}"
            ) from None
        raise


# ------------------------------------------------------------------------------------ plan
@dataclass
class _Closed:
    """Interventions of one layer at fixed prompt positions. All (k,)."""

    pos: Tensor  # long
    feature: Tensor  # long
    mul: Tensor  # float64
    add: Tensor  # float64


@dataclass
class _Open:
    """An open-ended intervention's generated-position part: positions start, start+step, …"""

    layer: int
    start: int
    step: int
    feature: Tensor  # (k,) long
    mul: Tensor  # (k,) float64
    add: Tensor  # (k,) float64

    def applies(self, pos: int) -> bool:
        return pos >= self.start and (pos - self.start) % self.step == 0


@dataclass
class _Plan:
    n_prompt: int
    closed: dict[int, _Closed]
    open: list[_Open]

    @property
    def empty(self) -> bool:
        return not self.closed and not self.open


def _int(x: Any, what: str) -> int:
    if isinstance(x, Tensor) and x.numel() == 1 and not x.is_floating_point():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {x!r}")
    return int(x)


def _check_layer(layer: Any, n_layers: int, what: str = "layer") -> int:
    layer = _int(layer, what)
    if not 0 <= layer < n_layers:
        raise ValueError(f"{what} {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return layer


def _features(feature: Any, d_transcoder: int) -> list[int]:
    if isinstance(feature, (Tensor, np.ndarray)):
        items = feature.reshape(-1).tolist()
    elif isinstance(feature, (list, tuple, range)):
        items = list(feature)
    else:
        items = [feature]
    if not items:
        raise ValueError("feature_idx is empty: give at least one feature index")
    out = []
    for f in items:
        f = _int(f, "feature index")
        if not 0 <= f < d_transcoder:
            raise ValueError(
                f"feature index {f} is out of range: the transcoders have d_transcoder="
                f"{d_transcoder} features per layer (0..{d_transcoder - 1})"
            )
        out.append(f)
    return out


def _beyond(pos: int, n_pos: int) -> ValueError:
    return ValueError(
        f"position {pos} is beyond the prompt ({n_pos} tokens, BOS included: positions "
        f"0..{n_pos - 1}); for generated tokens use an open-ended slice(k, None)"
    )


def _positions(pos: Any, n_pos: int, generating: bool) -> tuple[list[int], tuple[int, int] | None]:
    """Closed prompt positions, and (start, step) of the open-ended part if any."""

    def one(p: Any) -> int:
        p = _int(p, "position")
        q = p + n_pos if p < 0 else p
        if not 0 <= q < n_pos:
            raise _beyond(p, n_pos)
        return q

    if isinstance(pos, slice):
        step = 1 if pos.step is None else _int(pos.step, "slice step")
        if step <= 0:
            raise ValueError(f"slice step must be positive, got {step}")
        start = 0 if pos.start is None else _int(pos.start, "slice start")
        if start < 0:
            start += n_pos
            if start < 0:
                raise _beyond(pos.start, n_pos)
        if pos.stop is None:  # open-ended
            if start >= n_pos and not generating:
                raise _beyond(start, n_pos)
            return list(range(start, n_pos, step)), (start, step)
        stop = _int(pos.stop, "slice stop")
        if stop < 0:
            stop += n_pos
        if stop > n_pos:
            raise _beyond(stop - 1, n_pos)
        closed = list(range(start, stop, step))
        if not closed:
            raise ValueError(f"position {pos} selects no position of the {n_pos}-token prompt")
        return closed, None
    if isinstance(pos, (range, list, tuple, np.ndarray)) or (isinstance(pos, Tensor) and pos.ndim > 0):
        items = pos.tolist() if isinstance(pos, (Tensor, np.ndarray)) else list(pos)
        if not items:
            raise ValueError("position list is empty: give at least one position")
        return [one(p) for p in items], None
    return [one(pos)], None


def _resolve(model: ReplacementModel, interventions: Sequence, n_pos: int, *, generating: bool) -> _Plan:
    """Check and vectorise ``interventions`` (see the module docstring)."""
    if isinstance(interventions, tuple) and len(interventions) == 4 and not isinstance(interventions[0], (tuple, list)):
        raise ValueError(
            "interventions must be a list of (layer, pos, feature_idx, value) tuples; "
            "wrap a single intervention in a list"
        )
    n_layers = model.n_layers
    d_tc = model.transcoders.d_transcoder
    per_layer: dict[int, list[tuple[int, int, float, float]]] = {}
    opens: list[_Open] = []
    for i, item in enumerate(interventions):
        if not isinstance(item, (tuple, list)) or len(item) != 4:
            raise ValueError(f"intervention #{i} must be (layer, pos, feature_idx, value), got {item!r}")
        layer, pos, feature, value = item
        layer = _check_layer(layer, n_layers)
        feats = _features(feature, d_tc)
        mul, add = _mul_add(value, f"value of intervention #{i}")
        closed, open_part = _positions(pos, n_pos, generating)
        rows = per_layer.setdefault(layer, [])
        rows.extend((p, f, mul, add) for p in closed for f in feats)
        if open_part is not None and generating:
            k = len(feats)
            opens.append(
                _Open(
                    layer,
                    open_part[0],
                    open_part[1],
                    torch.tensor(feats, dtype=torch.long),
                    torch.full((k,), mul, dtype=torch.float64),
                    torch.full((k,), add, dtype=torch.float64),
                )
            )
    closed_plan: dict[int, _Closed] = {}
    for layer, rows in per_layer.items():
        if not rows:
            continue
        arr = np.asarray([(p, f) for p, f, _, _ in rows], dtype=np.int64)
        vals = np.asarray([(m, a) for _, _, m, a in rows], dtype=np.float64)
        keys = arr[:, 0] * d_tc + arr[:, 1]
        # last occurrence of each key wins
        _, first_in_reversed = np.unique(keys[::-1], return_index=True)
        keep = np.sort(len(keys) - 1 - first_in_reversed)
        closed_plan[layer] = _Closed(
            pos=torch.from_numpy(arr[keep, 0].copy()),
            feature=torch.from_numpy(arr[keep, 1].copy()),
            mul=torch.from_numpy(vals[keep, 0].copy()),
            add=torch.from_numpy(vals[keep, 1].copy()),
        )
    return _Plan(n_prompt=n_pos, closed=closed_plan, open=opens)


# ------------------------------------------------------------------------------------ modes
@dataclass(frozen=True)
class Mode:
    """What an intervention run freezes.

    frozen_layers: layers whose MLP outputs stay at their clean values (+ skip change)
    write_layers: output layers the prompt interventions' decoder changes are added to
    freeze_patterns / freeze_scales: attention patterns / norm scales at their clean values
    reference: the activation a Scale / Add / delta is taken against ("live" or "clean")
    errors: "frozen" (clean error vectors) or "recomputed" (the base model's MLPs)
    """

    frozen_layers: frozenset[int]
    write_layers: frozenset[int]
    freeze_patterns: bool
    freeze_scales: bool
    reference: Literal["live", "clean"]
    errors: str

    @property
    def name(self) -> str:
        if not self.frozen_layers:
            return "iterative"
        return "direct" if self.freeze_scales else "constrained"


def resolve_mode(
    model: ReplacementModel,
    *,
    constrained_layers: Iterable[int] | None = None,
    freeze_attention: bool = True,
    direct_effects: bool = False,
    errors: str = "frozen",
) -> Mode:
    """The :class:`Mode` of circuit-tracer's arguments (see the module docstring)."""
    if errors not in ERROR_MODES:
        raise ValueError(f"errors must be one of {ERROR_MODES}, got {errors!r}")
    all_layers = frozenset(range(model.n_layers))
    layers: frozenset[int] | None = None
    if constrained_layers is not None:
        if isinstance(constrained_layers, (str, bytes)) or not isinstance(constrained_layers, Iterable):
            raise ValueError(f"constrained_layers must be a range or a list of layers, got {constrained_layers!r}")
        items = list(constrained_layers)
        if not items:
            raise ValueError("constrained_layers is empty: give a range of layers, or None for iterative patching")
        layers = frozenset(_check_layer(l, model.n_layers, "constrained layer") for l in items)
    if direct_effects:
        if layers is not None and layers != all_layers:
            raise ValueError(
                "direct_effects=True freezes every layer; constrained_layers must then be None or "
                f"cover all {model.n_layers} layers (got {sorted(layers)})"
            )
        layers = all_layers
    if layers is None:
        return Mode(frozenset(), all_layers, bool(freeze_attention), False, "live", errors)
    return Mode(layers, layers, True, layers == all_layers, "clean", errors)


# ------------------------------------------------------------------------------------ clean run
@dataclass
class CleanRun:
    """The clean forward pass every intervention run is measured against.

    tokens: (n_pos,); logits: (n_pos, d_vocab)
    mlp_inputs, mlp_outputs: (n_layers, n_pos, d_model) at the transcoders' hooks
    activations: (n_layers, n_pos, d_transcoder), zero at BOS
    unembed_in: (n_pos, d_model) input of the unembedding (after the final norm)
    frozen: hook name -> clean tensor (batch dim kept) for every attention pattern and norm scale
    """

    tokens: Tensor
    logits: Tensor
    mlp_inputs: Tensor
    mlp_outputs: Tensor
    activations: Tensor
    unembed_in: Tensor
    frozen: dict[str, Tensor]

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])


@torch.no_grad()
def clean_run(model: ReplacementModel, prompt: str | Tensor) -> CleanRun:
    tokens = model.tokenize(prompt)
    n = model.n_layers
    x: dict[int, Tensor] = {}
    y: dict[int, Tensor] = {}
    frozen: dict[str, Tensor] = {}
    grabbed: dict[str, Tensor] = {}

    def save(store: dict, key):
        def hook(tensor: Tensor, *, hook) -> None:
            store[key] = tensor[0].detach().clone()

        return hook

    def save_frozen(tensor: Tensor, *, hook) -> None:
        frozen[hook.name] = tensor.detach().clone()

    fwd = [(name, save_frozen) for name in model.pattern_hooks + model.scale_hooks]
    for layer in range(n):
        fwd.append((model.input_hooks[layer], save(x, layer)))
        fwd.append((model.output_hooks[layer], save(y, layer)))
    fwd.append((H.UNEMBED_IN, save(grabbed, "u")))
    with model.hooks(fwd):
        logits = model.bridge(tokens[None])[0]
    tc = model.transcoders
    acts = []
    for layer in range(n):
        a = tc.activations(layer, x[layer])
        a[0] = 0
        acts.append(a)
    return CleanRun(
        tokens=tokens,
        logits=logits.detach(),
        mlp_inputs=torch.stack([x[l] for l in range(n)]),
        mlp_outputs=torch.stack([y[l] for l in range(n)]),
        activations=torch.stack(acts),
        unembed_in=grabbed["u"],
        frozen=frozen,
    )


# ------------------------------------------------------------------------------------ one pass
@dataclass
class _Write:
    """Decoder changes of one source layer: rows (k,) of the pass, coeff (k,), dec (k, n_out, d)."""

    rows: Tensor
    coeff: Tensor
    dec: Tensor
    gate: Literal["write", "free", "all"]  # write: write_layers; free: non-frozen; all: every layer


class _Pass:
    """Hooks for one forward pass over sequence positions [offset, offset + length).

    Positions < n_prompt follow the mode; later (generated) positions run live with the
    open-ended interventions. ``offset > 0`` only for KV-cached steps (all generated).
    """

    def __init__(
        self,
        model: ReplacementModel,
        clean: CleanRun,
        plan: _Plan,
        mode: Mode,
        offset: int,
        length: int,
        apply_activation_function: bool,
    ):
        self.m, self.clean, self.plan, self.mode = model, clean, plan, mode
        self.offset, self.length = offset, length
        self.n_pr = max(0, min(length, plan.n_prompt - offset))  # prompt rows of this pass
        self.apply_fn = apply_activation_function
        n = model.n_layers
        self.reported: list[Tensor | None] = [None] * n
        self.x: list[Tensor | None] = [None] * n
        self.writes: list[list[_Write]] = [[] for _ in range(n)]
        self.unembed_in: Tensor | None = None
        tc = model.transcoders
        self.out_layers = [tc.output_layers(l) for l in range(n)]
        # live feature changes matter where a free (non-frozen) layer has frozen errors
        self.track_live = [
            mode.errors == "frozen" and any(j not in mode.frozen_layers for j in self.out_layers[l]) for l in range(n)
        ]

    # -- hooks ---------------------------------------------------------------------------
    def hooks(self) -> list:
        m, mode = self.m, self.mode
        fwd: list = []
        if self.n_pr and mode.freeze_patterns:
            fwd += [(name, self._freeze_pattern) for name in m.pattern_hooks]
        if mode.freeze_scales:
            fwd += [(name, self._freeze_scale) for name in m.scale_hooks]
        for layer in range(m.n_layers):
            fwd.append((m.input_hooks[layer], self._read(layer)))
            fwd.append((m.output_hooks[layer], self._write(layer)))
        fwd.append((H.UNEMBED_IN, self._grab_unembed))
        return fwd

    # An edited norm scale sends the bridge down its own arithmetic (x / scale; HF's Llama norm
    # computes x * rsqrt(var + eps) in float32), so a run that freezes scales edits every scale
    # at every position, cached steps included, and a run that changes nothing freezes none
    # (see _effective_mode). Patterns are replaced only where they differ (same arithmetic).
    def _freeze_pattern(self, tensor: Tensor, *, hook) -> Tensor | None:
        clean = self.clean.frozen[hook.name]  # (1, heads, n_prompt, n_prompt)
        if tensor.shape == clean.shape:
            return None if torch.equal(tensor, clean) else clean.to(tensor.dtype)
        k = clean.shape[-1]
        if torch.equal(tensor[:, :, : self.n_pr, :k], clean[:, :, : self.n_pr]):
            return None
        out = tensor.clone()
        out[:, :, : self.n_pr, :k] = clean[:, :, : self.n_pr].to(tensor.dtype)
        out[:, :, : self.n_pr, k:] = 0  # causal: prompt rows never see generated tokens
        return out

    def _freeze_scale(self, tensor: Tensor, *, hook) -> Tensor:
        out = tensor.clone()
        if self.n_pr:
            clean = self.clean.frozen[hook.name]  # (1, n_prompt, ...)
            out[:, : self.n_pr] = clean[:, : self.n_pr].to(tensor.dtype)
        return out

    def _grab_unembed(self, tensor: Tensor, *, hook) -> None:
        self.unembed_in = tensor[0].detach().clone()

    def _read(self, layer: int):
        def hook(tensor: Tensor, *, hook) -> None:
            m, clean, mode = self.m, self.clean, self.mode
            tc = m.transcoders
            x = tensor[0].detach()
            pre = tc.encode(layer, x)
            acts = tc.activation_function(layer, pre)
            if self.offset == 0:
                acts[0] = 0
            if self.apply_fn:
                self.reported[layer] = acts.clone()
            else:
                rep = pre.clone()
                if self.offset == 0:
                    rep[0] = 0
                self.reported[layer] = rep
            self.x[layer] = x
            lo, n_pr = self.offset, self.n_pr
            dev = acts.device
            # prompt interventions
            entries = self.plan.closed.get(layer)
            if n_pr and entries is not None:
                sel = (entries.pos >= lo) & (entries.pos < lo + n_pr)
                if sel.any():
                    pos, feat = entries.pos[sel].to(dev), entries.feature[sel].to(dev)
                    if mode.reference == "live":
                        ref = acts[pos - lo, feat].double()
                    else:
                        ref = clean.activations[layer, pos, feat].double()
                    coeff = entries.mul[sel].to(dev) * ref + entries.add[sel].to(dev) - ref
                    self._add_write(layer, pos - lo, feat, coeff, "write")
            # live feature changes (frozen errors in free layers)
            if n_pr and self.track_live[layer]:
                diff = acts[:n_pr] - clean.activations[layer, lo : lo + n_pr]
                rows, feat = diff.nonzero(as_tuple=True)
                if rows.numel():
                    self._add_write(layer, rows, feat, diff[rows, feat], "free")
            # open-ended interventions at generated positions
            if n_pr < self.length:
                chosen: dict[tuple[int, int], tuple[float, float]] = {}  # the last entry wins
                for op in self.plan.open:
                    if op.layer != layer:
                        continue
                    for r in range(n_pr, self.length):
                        if op.applies(lo + r):
                            for f, mu, ad in zip(op.feature.tolist(), op.mul.tolist(), op.add.tolist()):
                                chosen[r, f] = (mu, ad)
                if chosen:
                    r = torch.tensor([k[0] for k in chosen], dtype=torch.long, device=dev)
                    feat = torch.tensor([k[1] for k in chosen], dtype=torch.long, device=dev)
                    mul = torch.tensor([v[0] for v in chosen.values()], dtype=torch.float64, device=dev)
                    add = torch.tensor([v[1] for v in chosen.values()], dtype=torch.float64, device=dev)
                    ref = acts[r, feat].double()
                    self._add_write(layer, r, feat, mul * ref + add - ref, "all")

        return hook

    def _add_write(self, layer: int, rows: Tensor, feat: Tensor, coeff: Tensor, gate) -> None:
        nz = coeff != 0
        if not nz.any():
            return
        rows, feat, coeff = rows[nz], feat[nz], coeff[nz]
        dec = self.m.transcoders.decoder_vectors(layer, feat)  # (k, n_out, d_model)
        self.writes[layer].append(_Write(rows, coeff, dec, gate))

    def _write(self, layer: int):
        def hook(tensor: Tensor, *, hook) -> Tensor:
            m, clean, mode = self.m, self.clean, self.mode
            y = tensor[0]
            out = y.clone()
            lo, n_pr = self.offset, self.n_pr
            frozen = layer in mode.frozen_layers
            if n_pr and (frozen or mode.errors == "frozen"):
                base = clean.mlp_outputs[layer, lo : lo + n_pr].to(y.dtype).clone()
                x = self.x[layer]
                if x is not None:
                    skip_live = m.transcoders.skip(layer, x[:n_pr])
                    if skip_live is not None:
                        skip_clean = m.transcoders.skip(layer, clean.mlp_inputs[layer, lo : lo + n_pr])
                        base = base + (skip_live - skip_clean).to(y.dtype)
                out[:n_pr] = base
            for src in range(layer + 1):
                outs = self.out_layers[src]
                if layer not in outs:
                    continue
                j = layer - outs.start
                for w in self.writes[src]:
                    if w.gate == "write" and layer not in mode.write_layers:
                        continue
                    if w.gate == "free" and frozen:
                        continue
                    vec = w.coeff.to(y.dtype)[:, None] * w.dec[:, j].to(device=y.device, dtype=y.dtype)
                    out.index_add_(0, w.rows.to(y.device), vec)
            return out[None]

        return hook

    def activations(self) -> Tensor:
        return torch.stack(self.reported)  # (n_layers, length, d_transcoder)


def _effective_mode(mode: Mode, plan: _Plan, clean: CleanRun) -> Mode:
    """``mode``, without frozen norm scales when the run provably changes nothing.

    Only for the clean reference (constrained / direct modes), where every intervention's
    change is known before the pass: then the run is the clean run, and leaving the scales to
    the model's own arithmetic keeps it bit-exact (see _Pass._freeze_scale).
    """
    if not mode.freeze_scales or mode.reference != "clean" or plan.open:
        return mode
    for layer, e in plan.closed.items():
        ref = (
            clean.activations[layer, e.pos.to(clean.activations.device), e.feature.to(clean.activations.device)]
            .double()
            .cpu()
        )
        if bool(((e.mul * ref + e.add - ref) != 0).any()):
            return mode
    return dataclasses.replace(mode, freeze_scales=False)


# ------------------------------------------------------------------------------------ runner
@dataclass
class InterventionResult:
    """logits: (n_pos, d_vocab); activations: (n_layers, n_pos, d_transcoder), dense or sparse;
    unembed_in: (n_pos, d_model) the unembedding's input (for de-meaned logit directions)."""

    logits: Tensor
    activations: Tensor
    unembed_in: Tensor


class InterventionRunner:
    """One prompt's clean run, reused by any number of intervention runs on it."""

    def __init__(self, model: ReplacementModel, prompt: str | Tensor):
        self.model = model
        self.clean = clean_run(model, prompt)

    @property
    def tokens(self) -> Tensor:
        return self.clean.tokens

    @torch.no_grad()
    def run(
        self,
        interventions: Sequence,
        *,
        constrained_layers: Iterable[int] | None = None,
        freeze_attention: bool = True,
        direct_effects: bool = False,
        apply_activation_function: bool = True,
        sparse: bool = False,
        errors: str = "frozen",
    ) -> InterventionResult:
        """One intervention run on this prompt; arguments as :func:`feature_intervention`."""
        m = self.model
        mode = resolve_mode(
            m,
            constrained_layers=constrained_layers,
            freeze_attention=freeze_attention,
            direct_effects=direct_effects,
            errors=errors,
        )
        plan = _resolve(m, interventions, self.clean.n_pos, generating=False)
        mode = _effective_mode(mode, plan, self.clean)
        p = _Pass(m, self.clean, plan, mode, 0, self.clean.n_pos, apply_activation_function)
        with m.hooks(p.hooks()):
            logits = m.bridge(self.clean.tokens[None])[0]
        acts = p.activations()
        if sparse:
            acts = acts.to_sparse().coalesce()
        return InterventionResult(logits=logits, activations=acts, unembed_in=p.unembed_in)


def feature_intervention(
    model: ReplacementModel,
    prompt: str | Tensor,
    interventions: Sequence,
    *,
    constrained_layers: Iterable[int] | None = None,
    freeze_attention: bool = True,
    direct_effects: bool = False,
    apply_activation_function: bool = True,
    sparse: bool = False,
    errors: str = "frozen",
) -> tuple[Tensor, Tensor]:
    """Intervene on features and rerun (circuit-tracer's ``feature_intervention``).

    interventions: list of ``(layer, pos, feature_idx, value)``; ``pos`` an int, slice, range
    or list; ``feature_idx`` an int or list; ``value`` a number, :class:`Scale` or :class:`Add`.
    returns (logits (n_pos, d_vocab), activations (n_layers, n_pos, d_transcoder))
    """
    res = InterventionRunner(model, prompt).run(
        interventions,
        constrained_layers=constrained_layers,
        freeze_attention=freeze_attention,
        direct_effects=direct_effects,
        apply_activation_function=apply_activation_function,
        sparse=sparse,
        errors=errors,
    )
    return res.logits, res.activations


# ------------------------------------------------------------------------------------ generation
@dataclass
class GenerationResult:
    """One steered generation.

    text: prompt + completion, decoded without special tokens; completion: the new tokens only
    tokens: (n_prompt + n_new,) ids, BOS first
    logits: (n_new, d_vocab); logits[i] is the distribution token n_prompt + i was drawn from
    activations: (n_layers, n_prompt + n_new - 1, d_transcoder) at every position that was run
    """

    text: str
    completion: str
    tokens: Tensor
    logits: Tensor
    activations: Tensor
    n_prompt: int


def _sample(
    logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> int:
    if not do_sample:
        return int(torch.argmax(logits))
    scores = logits.double() / temperature
    if top_k is not None and top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _new_cache(model: ReplacementModel):
    from transformers import DynamicCache

    return DynamicCache(config=model.bridge.original_model.config)


@torch.no_grad()
def feature_intervention_generate(
    model: ReplacementModel,
    prompt: str | Tensor,
    interventions: Sequence,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    use_kv_cache: bool = True,
    stop_at_eos: bool = True,
    constrained_layers: Iterable[int] | None = None,
    freeze_attention: bool = True,
    direct_effects: bool = False,
    apply_activation_function: bool = True,
    sparse: bool = False,
    errors: str = "frozen",
    clean: CleanRun | None = None,
) -> GenerationResult:
    """Generate with interventions (circuit-tracer's ``feature_intervention_generate``).

    The prompt pass is :func:`feature_intervention` with the same mode; open-ended
    interventions (``pos=slice(k, None)``) also apply at every generated position, which runs
    live (see the module docstring). Sampling: greedy unless ``do_sample``; then softmax of
    logits / ``temperature`` over the ``top_k`` best, drawn from a generator seeded with
    ``seed`` (the global RNG when None). ``clean``: the prompt's :func:`clean_run`, when the
    caller has it (an :class:`InterventionRunner`'s ``clean``), so it is not recomputed; it
    must be the run of this ``prompt``.
    """
    if _int(max_new_tokens, "max_new_tokens") <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if do_sample and not _finite(temperature, "temperature") > 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    if top_k is not None and _int(top_k, "top_k") <= 0:
        raise ValueError(f"top_k must be positive or None, got {top_k}")
    m = model
    if clean is None:
        clean = clean_run(m, prompt)
    elif isinstance(prompt, Tensor) and not torch.equal(prompt.to(clean.tokens.device).reshape(-1), clean.tokens):
        raise ValueError("clean is the run of another prompt than the one given")
    n_prompt = clean.n_pos
    if n_prompt + max_new_tokens - 1 > m.n_ctx:
        raise ValueError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {m.n_ctx}: generate fewer tokens"
        )
    mode = resolve_mode(
        m,
        constrained_layers=constrained_layers,
        freeze_attention=freeze_attention,
        direct_effects=direct_effects,
        errors=errors,
    )
    plan = _resolve(m, interventions, n_prompt, generating=True)
    mode = _effective_mode(mode, plan, clean)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=clean.logits.device).manual_seed(int(seed))
    eos = m.tokenizer.eos_token_id if stop_at_eos else None

    tokens = clean.tokens.clone()
    step_logits: list[Tensor] = []
    step_acts: list[Tensor] = []
    cache = _new_cache(m) if use_kv_cache else None
    offset = 0
    while True:
        seq = tokens[offset:] if cache is not None else tokens
        p = _Pass(m, clean, plan, mode, offset if cache is not None else 0, seq.numel(), apply_activation_function)
        kwargs = {"past_key_values": cache, "layer_past": cache} if cache is not None else {}
        with m.hooks(p.hooks()):
            logits = m.bridge(seq[None], **kwargs)[0]
        if cache is not None:
            if cache.get_seq_length() != tokens.numel():
                raise RuntimeError(
                    f"the KV cache holds {cache.get_seq_length()} positions after a pass over "
                    f"{tokens.numel()}: this transformer_lens / transformers pair does not fill it; "
                    "generate with use_kv_cache=False"
                )
            step_acts.append(p.activations())
            offset = tokens.numel()
        else:
            step_acts = [p.activations()]
        last = logits[-1]
        step_logits.append(last)
        nxt = _sample(last, do_sample, temperature, top_k, generator)
        tokens = torch.cat([tokens, torch.tensor([nxt], dtype=tokens.dtype, device=tokens.device)])
        if len(step_logits) == max_new_tokens or (eos is not None and nxt == eos):
            break
    acts = torch.cat(step_acts, dim=1)
    if sparse:
        acts = acts.to_sparse().coalesce()
    tok = m.tokenizer
    ids = tokens.tolist()
    return GenerationResult(
        text=tok.decode(ids, skip_special_tokens=True),
        completion=tok.decode(ids[n_prompt:], skip_special_tokens=True),
        tokens=tokens,
        logits=torch.stack(step_logits),
        activations=acts,
        n_prompt=n_prompt,
    )


# ------------------------------------------------------------------------------------ supernodes
@dataclass(frozen=True)
class Supernode:
    """A named group of features ``(layer, pos, feature)`` intervened on as one unit."""

    name: str
    features: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a supernode name must be a non-blank string, got {self.name!r}")
        feats = []
        for t in self.features:
            if not isinstance(t, (list, tuple)) or len(t) != 3:
                raise ValueError(f"supernode {self.name!r}: each feature is [layer, pos, feature], got {t!r}")
            feats.append(tuple(_int(v, f"supernode {self.name!r} entry") for v in t))
        if not feats:
            raise ValueError(f"supernode {self.name!r} has no features")
        object.__setattr__(self, "features", tuple(feats))

    def interventions(self, value: Any, *, open_ended: bool = False) -> list[tuple]:
        """``value`` (number, Scale, Add) for every feature; ``open_ended``: from each
        feature's position on, generated positions included."""
        return [
            (layer, slice(pos, None) if open_ended else pos, feature, value) for layer, pos, feature in self.features
        ]


def intervene(
    supernodes: Mapping[str, Supernode], names: str | Sequence[str], value: Any, *, open_ended: bool = False
) -> list[tuple]:
    """Interventions setting / scaling every feature of the named supernode(s)."""
    if isinstance(names, str):
        names = [names]
    out: list[tuple] = []
    for name in names:
        if name not in supernodes:
            known = ", ".join(repr(n) for n in sorted(supernodes)) or "none"
            raise ValueError(
                f"unknown supernode {name!r}: the annotations define {known}; add it in the "
                "viewer or the intervention config"
            )
        out += supernodes[name].interventions(value, open_ended=open_ended)
    return out


def supernodes_from_config(mapping: Mapping[str, Any]) -> dict[str, Supernode]:
    """``{name: [[layer, pos, feature], ...]}`` or ``{name: {"features": [...]}}``."""
    if not isinstance(mapping, Mapping):
        raise ValueError("supernodes must be a mapping {name: [[layer, pos, feature], ...]}")
    out = {}
    for name in sorted(mapping):
        value = mapping[name]
        if isinstance(value, Mapping):
            if "features" not in value:
                raise ValueError(
                    f"supernode {name!r} has no 'features' list ([[layer, pos, feature], ...]); "
                    "save it again with the viewer, which fills them in from the graph"
                )
            value = value["features"]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"supernode {name!r}: expected a list of [layer, pos, feature]")
        out[str(name)] = Supernode(str(name), tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value))
    return out


@dataclass
class Annotations:
    """A viewer sidecar: supernodes and node labels."""

    supernodes: dict[str, Supernode] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def read_annotations(path: str | os.PathLike) -> Annotations:
    """Read a viewer annotations file (schemas in the module docstring)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: annotations must be a JSON object")
    labels = doc.get("labels", {}) or {}
    if not isinstance(labels, dict):
        raise ValueError(f"{path}: labels must be an object {{node_id: text}}")
    try:
        sn = supernodes_from_config(doc.get("supernodes", {}) or {})
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return Annotations(supernodes=sn, labels={str(k): str(v) for k, v in sorted(labels.items())})


def load_supernodes(source: str | os.PathLike | Mapping[str, Any] | Annotations | None) -> dict[str, Supernode]:
    """Supernodes from an annotations file, an :class:`Annotations`, or a config mapping
    (either ``{name: [...]}`` or a whole annotations document)."""
    if source is None:
        return {}
    if isinstance(source, Annotations):
        return dict(source.supernodes)
    if isinstance(source, Mapping):
        if "supernodes" in source and isinstance(source["supernodes"], Mapping):
            return supernodes_from_config(source["supernodes"])
        return supernodes_from_config(source)
    return read_annotations(source).supernodes
