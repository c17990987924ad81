"""Selection rules: an experiment's features named by what they are — "the state-selective
features of the pruned circuit at the city" — instead of by position or index, and random
feature sets of the same shape for baselines (spec: docs/interventions.md#selection-rules).

A rule is ``{select: selective | contrast, label: L, role: R, value: V, in_graph: bool,
layers: [...]}``. On a labeled prompt (:func:`pipeline.analysis.selectivity.labeled_prompt`)
``selective`` selects the features that the selectivity table marks selective for (L, V, R), V
being the prompt's own value of L unless given; ``contrast`` those that tell V from the
counterpart's value of L (a swap's donor for its source, this prompt for its target: Texas
features that California lacks); among

* the features active (activation > 0) at R's position, or at any position but BOS for
  ``role: any``; or, with ``in_graph``, the features of the prompt's pruned circuit there;
* in ``layers`` (all when omitted).

A feature selected at ``role: any`` is one (layer, feature) pair, applied at every position but
BOS; its recorded activation is its largest on the prompt.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch import Tensor

from pipeline.analysis.selectivity import ANY, SelectivityTable, role_position

__all__ = ["SELECT_KINDS", "Chosen", "Rule", "is_rule", "moved", "random_like", "select"]

SELECT_KINDS: tuple[str, ...] = ("selective", "contrast")
_RULE_KEYS = ("select", "label", "role", "value", "in_graph", "layers")


def is_rule(item: Any) -> bool:
    """Whether an experiment's source / target entry is a selection rule."""
    return isinstance(item, Mapping) and "select" in item


@dataclass(frozen=True)
class Rule:
    """A parsed selection rule (module docstring)."""

    label: str
    role: str
    value: str | None = None
    in_graph: bool = False
    layers: tuple[int, ...] | None = None
    select: str = "selective"

    @classmethod
    def parse(cls, item: Mapping[str, Any], what: str) -> Rule:
        unknown = sorted(set(item) - set(_RULE_KEYS))
        if unknown or "label" not in item or "role" not in item:
            raise ValueError(
                f"{what}: a selection rule is {{select: selective, label: L, role: R, value: V, "
                f"in_graph: bool, layers: [...]}} (value, in_graph, layers optional), got {dict(item)!r}"
            )
        if item["select"] not in SELECT_KINDS:
            raise ValueError(f"{what}: select must be one of {SELECT_KINDS}, got {item['select']!r}")
        layers = item.get("layers")
        return cls(
            label=str(item["label"]),
            role=str(item["role"]),
            value=None if item.get("value") is None else str(item["value"]),
            in_graph=bool(item.get("in_graph", False)),
            layers=None if layers is None else tuple(int(v) for v in layers),
            select=str(item["select"]),
        )

    def describe(self, value: str) -> str:
        """E.g. ``selective state=Texas at city, in graph``."""
        layers = "" if self.layers is None else f", layers {list(self.layers)}"
        return f"{self.select} {self.label}={value} at {self.role}{', in graph' if self.in_graph else ''}{layers}"


@dataclass(frozen=True)
class Chosen:
    """One selected feature.

    layer, feature; pos: its position in the prompt it was selected on (None: every position
    but BOS); at: the position of this prompt the intervention writes it to (a swap's target
    is selected on the donor and written at the corresponding position here); activation: on
    the prompt it was selected on (the largest over the prompt for pos None); rule: how it was
    selected (for the report).
    """

    layer: int
    pos: int | None
    feature: int
    activation: float
    rule: str
    at: int | None


def select(
    rule: Rule,
    item: Mapping[str, Any],
    tokens: Tensor,
    activations: Tensor,
    tokenizer,
    table: SelectivityTable | None,
    circuit: Collection[tuple[int, ...]] | None,
    what: str,
    counterpart: Mapping[str, Any] | None = None,
) -> tuple[list[Chosen], str]:
    """The features ``rule`` selects on the labeled prompt ``item`` (``tokens``, clean
    ``activations`` (n_layers, n_pos, d_transcoder), its pruned ``circuit`` as (layer, pos,
    feature) triples or None where it has none), and the rule's description. ``at`` is the
    role's position in this prompt. ``counterpart``: the labeled prompt a ``contrast`` rule
    contrasts with."""
    if table is None:
        raise ValueError(f"{what}: a selection rule needs a selectivity table (the selectivity stage's output)")
    value = rule.value if rule.value is not None else item.get("labels", {}).get(rule.label)
    if value is None:
        raise ValueError(
            f"{what}: the prompt has no {rule.label!r} label (a tag {rule.label}=...): give the rule a value"
        )
    if rule.in_graph and circuit is None:
        raise ValueError(f"{what}: in_graph needs the prompt's pruned circuit (a donor has none here)")
    pos = None if rule.role == ANY else role_position(tokenizer, tokens, rule.role, item)
    if rule.role != ANY and pos is None:
        raise ValueError(f"{what}: the prompt {item.get('prompt')!r} has no {rule.role!r} position")
    if rule.select == "contrast":
        other = None if counterpart is None else counterpart.get("labels", {}).get(rule.label)
        if other is None:
            raise ValueError(f"{what}: a contrast rule needs a counterpart prompt with a {rule.label!r} label")
        mask = table.contrastive(rule.label, value, other, rule.role)
        value = f"{value} (not {other})"
    else:
        mask = table.selective(rule.label, value, rule.role)
    n_layers = int(activations.shape[0])
    layers = range(n_layers) if rule.layers is None else rule.layers
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"{what}: rule layer {layer} is out of range (0..{n_layers - 1})")
    acts = activations[:, 1:].amax(dim=1) if pos is None else activations[:, pos]  # (n_layers, d_transcoder)
    if circuit is not None and rule.in_graph:
        candidates = {(l, f) for l, p, f in circuit if (p >= 1 if pos is None else p == pos)}
    else:
        candidates = {(int(l), int(f)) for l, f in (acts > 0).nonzero().tolist()}
    desc = rule.describe(value)
    chosen = [
        Chosen(layer=l, pos=pos, feature=f, activation=float(acts[l, f]), rule=desc, at=pos)
        for l, f in sorted(candidates)
        if l in layers and mask[l, f]
    ]
    return chosen, desc


def _pool(activations: Tensor, layer: int, pos: int | None, exclude: Collection[int] = ()) -> np.ndarray:
    """The features active at (layer, pos), or at any position but BOS for pos None, but
    ``exclude``."""
    row = activations[layer, 1:].amax(dim=0) if pos is None else activations[layer, pos]
    active = np.flatnonzero(row.cpu().numpy() > 0)
    return np.setdiff1d(active, np.asarray(sorted(exclude), dtype=active.dtype))


def random_like(chosen: Sequence[Chosen], activations: Tensor, rng: np.random.Generator) -> list[Chosen]:
    """A random feature set of ``chosen``'s shape: for each (layer, pos, at) cell of
    ``chosen``, as many features drawn without replacement from the *other* features active in
    that cell of ``activations`` (the prompt they were selected on: the features ``chosen``
    does not hold), with their activations there. A cell with too few others gets fewer."""
    cells: dict[tuple[int, int | None, int | None], int] = {}
    for c in chosen:
        key = (c.layer, c.pos, c.at)
        cells[key] = cells.get(key, 0) + 1
    out: list[Chosen] = []
    for (layer, pos, at), k in sorted(cells.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]), _order(kv[0][2]))):
        taken = {c.feature for c in chosen if (c.layer, c.pos, c.at) == (layer, pos, at)}
        pool = _pool(activations, layer, pos, exclude=taken)
        drawn = rng.choice(pool, size=min(k, len(pool)), replace=False).tolist() if len(pool) else []
        row = activations[layer, 1:].amax(dim=0) if pos is None else activations[layer, pos]
        out += [
            Chosen(layer=layer, pos=pos, feature=int(f), activation=float(row[int(f)]), rule="random", at=at)
            for f in sorted(drawn)
        ]
    return out


def _order(pos: int | None) -> int:
    return -1 if pos is None else pos


def moved(chosen: Sequence[Chosen], offset: int, n_pos: int) -> list[Chosen] | None:
    """``chosen`` written ``offset`` positions away (a wrong-position baseline); None when a
    feature has no one position or would land on BOS or outside the ``n_pos``-token prompt."""
    out = []
    for c in chosen:
        if c.at is None or not 1 <= c.at + offset < n_pos:
            return None
        out.append(replace(c, at=c.at + offset))
    return out
