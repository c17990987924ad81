"""What a dashboard records (:class:`DashboardConfig`), and the constants of the store format.

The steps and the store's layout are described in docs/dashboards.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: the store's format name and version, in its zarr.json attributes under META_KEY
FORMAT = "circuit-pipeline/feature-dashboards"
FORMAT_VERSION = 1
META_KEY = "dashboards"
#: a token's id is ``seq_id << POS_BITS | pos``
POS_BITS = 24
MAX_SEQ_LEN = 1 << POS_BITS
#: features per inner chunk of the per-feature arrays (one shard per layer holds them all)
FEATURE_CHUNK = 256
#: elements per chunk of the 1-D tables (sequences, labels, vocab)
SPAN_CHUNK = 1 << 16


@dataclass
class DashboardConfig:
    """What a dashboard records and how the corpus is streamed.

    top_k: top activating examples kept per feature.
    context_before / context_after: window of tokens shown around an example's token.
    n_quantiles / examples_per_quantile: quantile groups of the firing distribution and
        examples sampled (uniformly, seeded) from each.
    hist_bins / hist_min / hist_max: log-spaced histogram bins between hist_min and hist_max,
        plus an underflow (0, hist_min) and an overflow [hist_max, inf) bin.
    n_logits: top and bottom output logits kept per feature (and per output layer for a CLT).
    batch_tokens: padded tokens per forward pass (memory: batch_tokens x d_transcoder floats).
    seq_len: tokens per sequence, BOS included; longer documents are split (default
        min(model context, 128)).
    max_tokens: stop after this many counted (non-BOS) tokens; None: the whole corpus.
    seed: seed of the quantile sampling.
    checkpoint_every: batches between checkpoints (does not change the result).
    logits_chunk: features per W_dec @ W_U product.
    label_inputs / label_outputs: tokens shown on each side of an automatic label.
    """

    top_k: int = 20
    context_before: int = 8
    context_after: int = 4
    n_quantiles: int = 5
    examples_per_quantile: int = 4
    hist_bins: int = 36
    hist_min: float = 1e-3
    hist_max: float = 1e3
    n_logits: int = 10
    batch_tokens: int = 2048
    seq_len: int | None = None
    max_tokens: int | None = None
    seed: int = 0
    checkpoint_every: int = 20
    logits_chunk: int = 512
    label_inputs: int = 3
    label_outputs: int = 3

    def __post_init__(self) -> None:
        positive = (
            "top_k",
            "n_quantiles",
            "examples_per_quantile",
            "hist_bins",
            "n_logits",
            "batch_tokens",
            "checkpoint_every",
            "logits_chunk",
        )
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DashboardConfig.{name} must be a positive integer, got {v!r}")
        for name in ("context_before", "context_after", "label_inputs", "label_outputs", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"DashboardConfig.{name} must be a non-negative integer, got {v!r}")
        if not (0 < float(self.hist_min) < float(self.hist_max) < math.inf):
            raise ValueError(
                f"DashboardConfig needs 0 < hist_min < hist_max < inf, got {self.hist_min}, {self.hist_max}"
            )
        self.hist_min, self.hist_max = float(self.hist_min), float(self.hist_max)
        if self.seq_len is not None and not 2 <= int(self.seq_len) <= MAX_SEQ_LEN:
            raise ValueError(f"DashboardConfig.seq_len must be in 2..{MAX_SEQ_LEN}, got {self.seq_len}")
        if self.max_tokens is not None and int(self.max_tokens) < 1:
            raise ValueError(f"DashboardConfig.max_tokens must be positive or None, got {self.max_tokens}")

    @property
    def window(self) -> int:
        return self.context_before + 1 + self.context_after

    @property
    def n_bins(self) -> int:
        """Histogram bins including the underflow and overflow bins."""
        return self.hist_bins + 2

    def hist_edges(self) -> np.ndarray:
        """(n_bins + 1,) float64 bin edges: 0, hist_min .. hist_max (log-spaced), inf."""
        inner = np.geomspace(self.hist_min, self.hist_max, self.hist_bins + 1)
        inner = inner.astype(np.float32).astype(np.float64)  # exact in float32 and in JSON
        return np.concatenate([[0.0], inner, [np.inf]])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DashboardConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DashboardConfig keys: {', '.join(unknown)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def result_dict(self) -> dict[str, Any]:
        """The fields that determine the result (checkpoint_every does not)."""
        d = self.to_dict()
        d.pop("checkpoint_every")
        return d
