"""Feature interventions as data: what to set, where, and what the run freezes.

An intervention ``(layer, pos, feature, value)`` replaces a transcoder feature's activation.
This module checks a list of them against the model and vectorises it into a :class:`Plan`
(:func:`resolve_plan`), and turns circuit-tracer's mode arguments into a :class:`Mode`
(:func:`resolve_mode`). :mod:`pipeline.engine.intervened_forward` runs them; the semantics
of every mode are in ``docs/interventions.md``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from torch import Tensor

from pipeline.engine.options import ERROR_MODES

#: How MLP outputs of layers that run live are formed. "recomputed" (the default): the model's
#: own MLP on the live input plus the intervened features' decoder changes, which is what
#: circuit-tracer 0.5.0 computes; "frozen": the local replacement model, error vectors held at
#: their clean values (docs/interventions.md#error-vectors).
#: Which generated positions an open-ended intervention (``pos=slice(k, None, step)``) applies
#: to. "all" (the default): every generated token, whatever k and step, as circuit-tracer 0.5.0
#: does; "slice": only those the slice selects (position >= k, every step-th).
GENERATED_POSITIONS = ("all", "slice")


# ------------------------------------------------------------------------------------ numbers
def as_finite(x: Any, what: str) -> float:
    """``x`` (a number or a one-element tensor) as a finite float, else ValueError naming ``what``."""
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


def as_int(x: Any, what: str) -> int:
    """``x`` (an integer or a one-element integer tensor) as an int, else ValueError naming ``what``."""
    if isinstance(x, Tensor) and x.numel() == 1 and not x.is_floating_point():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {x!r}")
    return int(x)


# ------------------------------------------------------------------------------------ values
@dataclass(frozen=True)
class Scale:
    """Multiply a feature's reference activation by ``factor`` (×0 ablates, ×−2, ×10)."""

    factor: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", as_finite(self.factor, "Scale factor"))


@dataclass(frozen=True)
class Add:
    """Add ``delta`` to a feature's reference activation."""

    delta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "delta", as_finite(self.delta, "Add delta"))


def _mul_add(value: Any, what: str) -> tuple[float, float]:
    """(multiplier, offset) with new value = multiplier * reference + offset."""
    if isinstance(value, Scale):
        return value.factor, 0.0
    if isinstance(value, Add):
        return 1.0, value.delta
    try:
        return 0.0, as_finite(value, what)
    except ValueError as exc:
        if "must be a number" in str(exc):
            raise ValueError(
                f"{what} must be a number (the new activation), Scale(factor) or Add(delta), got {value!r}"
            ) from None
        raise


# ------------------------------------------------------------------------------------ plan
@dataclass
class PromptInterventions:
    """Interventions of one layer at fixed prompt positions. All (k,)."""

    pos: Tensor  # long
    feature: Tensor  # long
    mul: Tensor  # float64
    add: Tensor  # float64


@dataclass
class OpenIntervention:
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
class Plan:
    """Checked, vectorised interventions: per layer at prompt positions, and open-ended ones
    for generated positions; each sets ``mul * reference + add``."""

    n_prompt: int
    closed: dict[int, PromptInterventions]
    open: list[OpenIntervention]


def _check_layer(layer: Any, n_layers: int, what: str = "layer") -> int:
    layer = as_int(layer, what)
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
        f = as_int(f, "feature index")
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
        p = as_int(p, "position")
        q = p + n_pos if p < 0 else p
        if not 0 <= q < n_pos:
            raise _beyond(p, n_pos)
        return q

    if isinstance(pos, slice):
        step = 1 if pos.step is None else as_int(pos.step, "slice step")
        if step <= 0:
            raise ValueError(f"slice step must be positive, got {step}")
        start = 0 if pos.start is None else as_int(pos.start, "slice start")
        if start < 0:
            start += n_pos
            if start < 0:
                raise _beyond(pos.start, n_pos)
        if pos.stop is None:  # open-ended
            if start >= n_pos and not generating:
                raise _beyond(start, n_pos)
            return list(range(start, n_pos, step)), (start, step)
        stop = as_int(pos.stop, "slice stop")
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


def resolve_plan(
    interventions: Sequence,
    n_layers: int,
    d_transcoder: int,
    n_pos: int,
    *,
    generating: bool,
    generated_positions: str = "all",
) -> Plan:
    """Check and vectorise ``interventions`` against a model and an ``n_pos``-token prompt.

    Each is ``(layer, pos, feature_idx, value)``. value: a number sets the feature (0.0
    ablates), :class:`Scale` / :class:`Add` multiply / add to its reference activation. pos: an
    int (negative counts from the prompt's end), a range, a list, or a slice; ``slice(k, None)``
    is open-ended: every prompt position from k and, when ``generating``, generated positions
    as ``generated_positions`` says (:data:`GENERATED_POSITIONS`). feature_idx: an int or a
    list. Duplicated (layer, pos, feature) entries: the last one wins.
    """
    if generated_positions not in GENERATED_POSITIONS:
        raise ValueError(f"generated_positions must be one of {GENERATED_POSITIONS}, got {generated_positions!r}")
    if isinstance(interventions, tuple) and len(interventions) == 4 and not isinstance(interventions[0], (tuple, list)):
        raise ValueError(
            "interventions must be a list of (layer, pos, feature_idx, value) tuples; "
            "wrap a single intervention in a list"
        )
    per_layer: dict[int, list[tuple[int, int, float, float]]] = {}
    opens: list[OpenIntervention] = []
    for i, item in enumerate(interventions):
        if not isinstance(item, (tuple, list)) or len(item) != 4:
            raise ValueError(f"intervention #{i} must be (layer, pos, feature_idx, value), got {item!r}")
        layer, pos, feature, value = item
        layer = _check_layer(layer, n_layers)
        feats = _features(feature, d_transcoder)
        mul, add = _mul_add(value, f"value of intervention #{i}")
        closed, open_part = _positions(pos, n_pos, generating)
        rows = per_layer.setdefault(layer, [])
        rows.extend((p, f, mul, add) for p in closed for f in feats)
        if open_part is not None and generating:
            k = len(feats)
            start, step = open_part if generated_positions == "slice" else (n_pos, 1)
            # a plan is host-side bookkeeping, on the CPU whatever the model's device: the hooks
            # move what they apply to the activations' device
            opens.append(
                OpenIntervention(
                    layer,
                    start,
                    step,
                    torch.tensor(feats, dtype=torch.long, device="cpu"),
                    torch.full((k,), mul, dtype=torch.float64, device="cpu"),
                    torch.full((k,), add, dtype=torch.float64, device="cpu"),
                )
            )
    closed_plan: dict[int, PromptInterventions] = {}
    for layer, rows in per_layer.items():
        if not rows:
            continue
        arr = np.asarray([(p, f) for p, f, _, _ in rows], dtype=np.int64)
        vals = np.asarray([(m, a) for _, _, m, a in rows], dtype=np.float64)
        keys = arr[:, 0] * d_transcoder + arr[:, 1]
        # last occurrence of each key wins
        _, first_in_reversed = np.unique(keys[::-1], return_index=True)
        keep = np.sort(len(keys) - 1 - first_in_reversed)
        closed_plan[layer] = PromptInterventions(
            pos=torch.from_numpy(arr[keep, 0].copy()),
            feature=torch.from_numpy(arr[keep, 1].copy()),
            mul=torch.from_numpy(vals[keep, 0].copy()),
            add=torch.from_numpy(vals[keep, 1].copy()),
        )
    return Plan(n_prompt=n_pos, closed=closed_plan, open=opens)


# ------------------------------------------------------------------------------------ modes
@dataclass(frozen=True)
class Mode:
    """What an intervention run freezes.

    frozen_layers: layers whose MLP outputs stay at their clean values (+ skip change)
    write_layers: output layers the prompt interventions' decoder changes are added to
    freeze_patterns / freeze_scales: attention patterns / norm scales at their clean values
    reference: the activation a Scale / Add / delta is taken against ("live" or "clean")
    errors: in layers that run live, "recomputed" (the base model's own MLP on the live input,
    as circuit-tracer runs it) or "frozen" (clean error vectors: the local replacement model)
    """

    frozen_layers: frozenset[int]
    write_layers: frozenset[int]
    freeze_patterns: bool
    freeze_scales: bool
    reference: Literal["live", "clean"]
    errors: str


class ModeArguments(TypedDict, total=False):
    """:func:`resolve_mode`'s keyword arguments: every intervention run and steered generation
    takes them and passes them on, so their defaults are resolve_mode's."""

    constrained_layers: Iterable[int] | None
    freeze_attention: bool
    direct_effects: bool
    errors: str


def resolve_mode(
    n_layers: int,
    *,
    constrained_layers: Iterable[int] | None = None,
    freeze_attention: bool = True,
    direct_effects: bool = False,
    errors: str = "recomputed",
) -> Mode:
    """The :class:`Mode` of circuit-tracer's ``feature_intervention`` arguments.

    * iterative patching (``constrained_layers=None``): every layer runs live, changes propagate
      through later transcoders, deltas against the live activations; ``freeze_attention``
      freezes the attention patterns only (norm scales stay live, as in circuit-tracer's code);
    * constrained (``constrained_layers=range(a, b)``): those layers frozen, interventions write
      only to them, deltas against the clean activations, attention patterns frozen, norm
      scales too when the range covers every layer;
    * direct effects (``direct_effects=True``): the constrained mode over every layer, i.e. the
      frozen model of attribution, whose responses are attribution edges.

    errors: how the layers that run live form their MLP output (:data:`ERROR_MODES`); the
    default, "recomputed", is circuit-tracer's. It does not matter in direct-effects mode.
    """
    if errors not in ERROR_MODES:
        raise ValueError(f"errors must be one of {ERROR_MODES}, got {errors!r}")
    all_layers = frozenset(range(n_layers))
    layers: frozenset[int] | None = None
    if constrained_layers is not None:
        if isinstance(constrained_layers, (str, bytes)) or not isinstance(constrained_layers, Iterable):
            raise ValueError(f"constrained_layers must be a range or a list of layers, got {constrained_layers!r}")
        items = list(constrained_layers)
        if not items:
            raise ValueError("constrained_layers is empty: give a range of layers, or None for iterative patching")
        layers = frozenset(_check_layer(l, n_layers, "constrained layer") for l in items)
    if direct_effects:
        if layers is not None and layers != all_layers:
            raise ValueError(
                "direct_effects=True freezes every layer; constrained_layers must then be None or "
                f"cover all {n_layers} layers (got {sorted(layers)})"
            )
        layers = all_layers
    if layers is None:
        return Mode(frozenset(), all_layers, bool(freeze_attention), False, "live", errors)
    return Mode(layers, layers, True, layers == all_layers, "clean", errors)


def effective_mode(mode: Mode, plan: Plan, clean_activations: Tensor) -> Mode:
    """``mode``, without frozen norm scales when the run provably changes nothing.

    clean_activations: (n_layers, n_prompt, d_transcoder). Only for the clean reference
    (constrained / direct modes), where every intervention's change is known before the pass:
    then the run is the clean run, and leaving the scales to the model's own arithmetic keeps
    it bit-exact (see ``InterventionPass``).
    """
    if not mode.freeze_scales or mode.reference != "clean" or plan.open:
        return mode
    for layer, e in plan.closed.items():
        ref = (
            clean_activations[layer, e.pos.to(clean_activations.device), e.feature.to(clean_activations.device)]
            .double()
            .cpu()
        )
        if bool(((e.mul * ref + e.add - ref) != 0).any()):
            return mode
    return dataclasses.replace(mode, freeze_scales=False)
