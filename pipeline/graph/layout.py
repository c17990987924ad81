"""The node layout of an attribution graph: the sizes of its node groups and the index
arithmetic of its two node orders, defined once (``docs/formats.md`` describes both orders)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class NodeLayout:
    """Sizes of the node groups, and the compute-order index helpers.

    Compute order: [active features (n_active), errors (n_layers * n_pos, layer-major),
    tokens (n_pos), logits (n_logits)]. Graph order (see :class:`Graph`) replaces the active
    features by the selected ones and keeps the rest.
    """

    n_layers: int
    n_pos: int
    n_active: int
    n_logits: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"layout.{field.name} must be a non-negative int, got {value!r}")
            object.__setattr__(self, field.name, int(value))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeLayout:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"layout is missing {missing}; it needs {names}")
        return cls(**{n: d[n] for n in names})

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    # compute order
    @property
    def n_compute(self) -> int:
        return self.n_active + self.n_errors + self.n_pos + self.n_logits

    @property
    def compute_token_slice(self) -> slice:
        start = self.n_active + self.n_errors
        return slice(start, start + self.n_pos)

    @property
    def compute_logit_slice(self) -> slice:
        start = self.n_active + self.n_errors + self.n_pos
        return slice(start, start + self.n_logits)

    def compute_error_node(self, layer: int, pos: int) -> int:
        self.check_layer_pos(layer, pos)
        return self.n_active + layer * self.n_pos + pos

    def compute_token_node(self, pos: int) -> int:
        self.check_layer_pos(0, pos)
        return self.compute_token_slice.start + pos

    def compute_logit_node(self, i: int) -> int:
        if not 0 <= i < self.n_logits:
            raise IndexError(f"logit {i} out of range [0, {self.n_logits})")
        return self.compute_logit_slice.start + i

    def is_compute_row_target(self, nodes: np.ndarray) -> np.ndarray:
        """Whether compute-order ids may carry a stored row (a feature or a logit)."""
        nodes = np.asarray(nodes)
        return ((nodes >= 0) & (nodes < self.n_active)) | (
            (nodes >= self.compute_logit_slice.start) & (nodes < self.n_compute)
        )

    def check_layer_pos(self, layer: int, pos: int) -> None:
        """IndexError unless 0 <= layer < n_layers and 0 <= pos < n_pos."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.n_layers})")
        if not 0 <= pos < self.n_pos:
            raise IndexError(f"position {pos} out of range [0, {self.n_pos})")
