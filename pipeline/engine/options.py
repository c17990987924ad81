"""The options of attribution, defined once: a plain dataclass (no torch), so the config schema and
the command line read it without loading the engine."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional


# The Hydra schema's attribution node extends this class: not frozen (OmegaConf makes frozen
# nodes read-only), and typing.Optional, the form OmegaConf 2.3 documents, not ``int | None``.
@dataclass
class AttributionConfig:
    """The options of :func:`attribute`, the one definition of their names, defaults, help
    (``metadata["help"]``, the command line's) and checks (``__post_init__``; ``metadata["check"]``
    names the command line's argparse type: ``positive`` integers, ``probability`` in (0, 1]).
    ``asdict`` of it is hashed into every graph store's fingerprint, so a new field changes
    every key, unless it is one of :data:`NOT_FINGERPRINTED` (options that decide whether a run
    may go ahead, not its numbers)."""

    max_n_logits: int = field(
        default=10, metadata={"help": "at most this many logit nodes: the top next-token logits", "check": "positive"}
    )
    desired_logit_prob: float = field(
        default=0.95,
        metadata={
            "help": "no more logit nodes once their cumulative probability reaches this",
            "check": "probability",
        },
    )
    batch_size: int = field(default=256, metadata={"help": "targets per backward pass", "check": "positive"})
    max_feature_nodes: Optional[int] = field(  # noqa: UP045
        default=None,
        metadata={
            "help": "rows for the N most influential features only (default: every active one)",
            "check": "positive",
        },
    )
    update_interval: int = field(
        default=4,
        metadata={"help": "batches between influence re-rankings (with max_feature_nodes)", "check": "positive"},
    )
    zero_bos_errors: bool = field(
        default=False,
        metadata={"help": "no edges out of the BOS-position error nodes (circuit-tracer 0.5.0's graphs)"},
    )
    allow_unknown_tokens: bool = field(
        default=False,
        metadata={
            "help": "attribute a prompt or logit target holding words the tokenizer does not know "
            "(as its unknown token, e.g. <unk>) instead of refusing it"
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.max_n_logits <= 0:
            raise ValueError(f"max_n_logits must be positive, got {self.max_n_logits!r}")
        if not 0.0 < self.desired_logit_prob <= 1.0:  # False for NaN too
            raise ValueError(f"desired_logit_prob must be in (0, 1], got {self.desired_logit_prob!r}")
        if self.max_feature_nodes is not None and self.max_feature_nodes <= 0:
            raise ValueError(
                f"max_feature_nodes must be positive or None (all features), got {self.max_feature_nodes!r}"
            )
        if self.update_interval <= 0:
            raise ValueError(f"update_interval must be positive, got {self.update_interval!r}")

    @classmethod
    def of(cls, config: AttributionConfig | None = None, **changes: Any) -> AttributionConfig:
        """The options of ``config`` (the defaults when None) with ``changes``, as this class:
        fields a subclass adds (the schema's load ``dtype``) are not attribution options and
        must stay out of the fingerprint."""
        values = {f.name: getattr(config, f.name) for f in fields(cls)} if config is not None else {}
        return cls(**{**values, **changes})


#: options that only decide whether a run may go ahead: left out of the graph store's
#: fingerprint and attributes, so the graphs of valid input keep their keys and bytes
NOT_FINGERPRINTED: frozenset[str] = frozenset({"allow_unknown_tokens"})


def fingerprinted(config: AttributionConfig) -> dict[str, Any]:
    """``asdict(config)`` without :data:`NOT_FINGERPRINTED`: what a graph store records."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in NOT_FINGERPRINTED}


#: how an intervention's live layers form their MLP output: ``recomputed`` (circuit-tracer's
#: definition: the model's own MLPs on the live input plus the decoder deltas) or ``frozen``
#: (the local replacement model: reconstruction plus the clean error vectors)
ERROR_MODES: tuple[str, ...] = ("recomputed", "frozen")
