"""The settings of the analyses, as plain dataclasses (no torch), so that the config schema uses
them as its nodes and every setting is defined once: how the intervene checks run
(:class:`InterventionSettings`, the base of ``evaluation_spec.EvaluationSpec``; docs/interventions.md)
and what a feature dashboard records (:class:`DashboardConfig`; docs/dashboards.md)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np

from pipeline.engine.options import ERROR_MODES

__all__ = ["BASELINES", "MAX_SEQ_LEN", "POS_BITS", "DashboardConfig", "InterventionSettings"]

#: the baselines run beside every experiment with an expected flip
BASELINES: tuple[str, ...] = ("random", "same_state", "wrong_position")


# The config schema's intervention node: typing's List, the form OmegaConf 2.3 documents.
@dataclass
class InterventionSettings:
    """top_k: features (by influence) ablated one at a time and compared with their edges.
    faithfulness: run the circuit-only / circuit-ablated / all-ablated comparison.
    freeze_attention: attention patterns frozen in the iterative runs (circuit-tracer's default).
    errors: ``recomputed`` (circuit-tracer's definition: the model's MLPs on the live input plus
        the decoder deltas) or ``frozen`` (the local replacement model: a circuit's
        faithfulness inside the replacement model); see ``engine.interventions.resolve_mode``.
    n_top_tokens: rows of the before / after top-token tables.
    max_new_tokens: greedy generation length per experiment (clean and steered; 0: none).
    baselines: which of :data:`BASELINES` run beside every experiment with an expected flip:
        ``random`` (``n_random`` feature sets of the selected sets' shape, drawn from ``seed``;
        each experiment's draws come from ``(seed, its name)``), ``same_state`` (swaps from
        donors of this prompt's own state), ``wrong_position`` (every feature written
        ``wrong_offset`` tokens away; not run where a feature would land on BOS or outside).
    language_share: a continuation is in a language when more than this share of its
        language-marked tokens are (steers with an ``expected_language``).
    """

    top_k: int = 10
    faithfulness: bool = True
    freeze_attention: bool = True
    errors: str = "recomputed"  # circuit-tracer's definition, so its users' numbers carry over
    n_top_tokens: int = 5
    max_new_tokens: int = 5
    baselines: List[str] = field(default_factory=lambda: list(BASELINES))
    n_random: int = 100
    seed: int = 0
    wrong_offset: int = -1
    language_share: float = 0.5

    def __post_init__(self) -> None:
        for name in ("top_k", "n_top_tokens", "max_new_tokens", "n_random", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"intervention.{name} must be a non-negative integer, got {v!r}")
        if self.n_top_tokens == 0:
            raise ValueError("intervention.n_top_tokens must be positive")
        if self.errors not in ERROR_MODES:
            raise ValueError(f"intervention.errors must be one of {ERROR_MODES}, got {self.errors!r}")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ValueError(f"intervention.baselines must be among {BASELINES}, got {unknown}")
        if isinstance(self.wrong_offset, bool) or not isinstance(self.wrong_offset, int) or self.wrong_offset == 0:
            raise ValueError(f"intervention.wrong_offset must be a non-zero integer, got {self.wrong_offset!r}")
        if not 0 <= self.language_share < 1:
            raise ValueError(f"intervention.language_share must be in [0, 1), got {self.language_share!r}")


#: a dashboard token's id is ``seq_id << POS_BITS | pos``, so a sequence holds at most MAX_SEQ_LEN
POS_BITS = 24
MAX_SEQ_LEN = 1 << POS_BITS


# The features config group's node extends this class: typing's Optional, the form OmegaConf
# 2.3 documents.
@dataclass
class DashboardConfig:
    """What a dashboard records and how the corpus is streamed."""

    #: top activating examples kept per feature
    top_k: int = 20
    #: window of tokens shown around an example's token
    context_before: int = 8
    context_after: int = 4
    #: quantile groups of the firing distribution, and examples sampled (seeded) from each
    n_quantiles: int = 5
    examples_per_quantile: int = 4
    #: log-spaced histogram bins between hist_min and hist_max, plus an underflow (0, hist_min)
    #: and an overflow [hist_max, inf) bin
    hist_bins: int = 36
    hist_min: float = 1e-3
    hist_max: float = 1e3
    #: top and bottom output logits kept per feature (and per output layer for a CLT)
    n_logits: int = 10
    #: padded tokens per forward pass (memory: batch_tokens x d_transcoder floats)
    batch_tokens: int = 2048
    #: tokens per sequence, BOS included; longer documents are split (None: min(context, 128))
    seq_len: Optional[int] = None
    #: stop after this many counted (non-BOS) tokens; None: the whole corpus
    max_tokens: Optional[int] = None
    #: seed of the quantile sampling
    seed: int = 0
    #: batches between checkpoints (does not change the result)
    checkpoint_every: int = 20
    #: features per W_dec @ W_U product
    logits_chunk: int = 512
    #: tokens shown on each side of an automatic label
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

    @classmethod
    def of(cls, config: DashboardConfig) -> DashboardConfig:
        """The dashboard fields of ``config`` (a subclass: the features config group) as this
        class, whose fingerprint the store records."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def result_dict(self) -> dict[str, Any]:
        """The fields that determine the result (checkpoint_every does not)."""
        d = self.to_dict()
        d.pop("checkpoint_every")
        return d
