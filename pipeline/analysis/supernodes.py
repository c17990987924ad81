"""Supernodes: named groups of features, intervened on as one unit.

They come from the viewer's annotations sidecar (``{slug}.annotations.json``) or from an
intervention config (:func:`load_supernodes`). Accepted forms::

    {"supernodes": {"<name>": [[layer, pos, feature], ...], ...},    # simple form
     "labels": {"<node_id>": "<text>", ...}}                          # optional
    {"supernodes": {"<name>": {"nodes": [...], "features": [[layer, pos, feature], ...]}}}
                                                                      # the viewer's stored form

Node ids alone are not read (an error node ``0_{layer}_{pos}`` and a feature node
``{layer}_{feature}_{pos}`` have the same shape); the viewer stores ``features`` for this.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline._io import read_json
from pipeline.engine.interventions import as_int


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
            feats.append(tuple(as_int(v, f"supernode {self.name!r} entry") for v in t))
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
    """Read a viewer annotations file (forms in the module docstring)."""
    path = Path(path)
    try:
        doc = read_json(path)
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
