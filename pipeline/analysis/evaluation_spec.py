"""What :func:`~pipeline.analysis.evaluation.evaluate` runs, validated when it is read, before
any model runs: :class:`EvaluationSpec` (the ``intervention`` config group's settings plus the
prompt's experiments, supernodes and pruning thresholds), :class:`Experiment` (one named
intervention: kinds, modes, how its features are named, its expected flip) and
:class:`PromptContext` (what selection rules, donors and baselines read beyond the graph).
Spec: docs/interventions.md#the-intervene-stage.

A module of its own because both the experiment runner (:mod:`pipeline.analysis.experiments`)
and the report (:mod:`pipeline.analysis.evaluation`, which calls the runner) read it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.analysis.options import InterventionSettings
from pipeline.analysis.selection import Rule, is_rule
from pipeline.analysis.selectivity import ANY, SelectivityTable
from pipeline.analysis.supernodes import supernodes_from_config

__all__ = ["KINDS", "MODES", "EvaluationSpec", "Experiment", "PromptContext"]

KINDS = ("ablate", "steer", "swap")
MODES = ("iterative", "constrained", "direct")


@dataclass
class Experiment:
    """One named intervention experiment on the graph's prompt.

    Kinds: ``ablate`` scales the source features (default ×0); ``steer`` sets them to
    ``value`` or scales them by ``source_factor``; ``swap`` scales the source by
    ``source_factor`` (default 0) and sets the target features to ``target_factor`` × their
    activation on the donor: the prompt ``donor`` names by id (its tags known), or the text
    ``donor_prompt``.

    Source and target entries are supernode names, ``[layer, pos, feature]`` triples,
    selectors ``{"pos": P, "layers": [...], "not_on_donor": bool}`` (every feature active at
    position ``P``, negative from the end, of this prompt for a source or of the donor for a
    target, in those layers; ``not_on_donor``, source only: those inactive at the end-aligned
    donor position), or selection rules ``{"select": "selective", "label": L, "role": R, ...}``
    (:mod:`pipeline.analysis.selection`): for a source, on this prompt and its circuit; for a
    target, on the donor (no ``in_graph``: the donor's circuit is another prompt's). A
    target picked by a rule is written at this prompt's position of the same role (city to
    city); any other target end-aligned (donor position ``q`` is this prompt's
    ``q + n_pos - n_donor``). A rule at role ``any`` applies its features at every position
    but BOS.

    source_factor: multiplier for the source features (ablate / swap default 0; steer: used
    when ``value`` is None)
    value: steer: the value the source features are set to
    open_ended: apply from each feature's position to the end, generated tokens included
    expected_before / expected_after: the clean top token and the top token the intervention
    should give (text, compared without surrounding whitespace)
    expected_language: the flip is measured on the continuation instead: the intervention's
    greedy continuation is mostly (more than the spec's ``language_share``) in this language and
    the clean one is not
    mode: "iterative" | "constrained" | "direct"; constrained_layers: the layers of the
    constrained mode (given alone, they make the mode constrained)
    max_new_tokens: steered generation length (None: the spec's; 0: none)
    group: a label for the per-group flip rates (e.g. "state_swap", "language_steer")
    """

    name: str
    kind: str = "ablate"
    source: list = field(default_factory=list)
    target: list = field(default_factory=list)
    donor: str | None = None
    donor_prompt: str | None = None
    source_factor: float | None = None
    target_factor: float = 1.0
    value: float | None = None
    open_ended: bool = False
    expected_before: str | None = None
    expected_after: str | None = None
    expected_language: str | None = None
    mode: str = "iterative"
    constrained_layers: list[int] | None = None
    max_new_tokens: int | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"an experiment needs a non-blank name, got {self.name!r}")
        what = f"experiment {self.name!r}"
        if self.kind not in KINDS:
            raise ValueError(f"{what}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.mode not in MODES:
            raise ValueError(f"{what}: mode must be one of {MODES}, got {self.mode!r}")
        if self.constrained_layers and self.mode == "iterative":
            self.mode = "constrained"  # circuit-tracer: constrained_layers is the constrained mode
        if self.mode == "constrained" and not self.constrained_layers:
            raise ValueError(f"{what}: mode 'constrained' needs constrained_layers")
        if self.mode == "direct" and self.constrained_layers:
            raise ValueError(f"{what}: mode 'direct' freezes every layer; constrained_layers do not apply")
        if not self.source:
            raise ValueError(f"{what} has no source features or supernodes")
        if self.donor is not None and self.donor_prompt is not None:
            raise ValueError(f"{what}: give donor (a prompt id) or donor_prompt (a text), not both")
        if self.kind == "swap" and (not self.target or (self.donor is None and self.donor_prompt is None)):
            raise ValueError(
                f"{what}: a swap needs target features and the donor (or donor_prompt) on which they are active"
            )
        if self.kind == "steer" and self.value is None and self.source_factor is None:
            raise ValueError(f"{what}: a steer needs a value or a source_factor")
        if self.expected_language is not None and self.max_new_tokens == 0:
            raise ValueError(f"{what}: expected_language is measured on generated tokens; max_new_tokens is 0")
        for name in ("source_factor", "target_factor", "value"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{what}: {name} must be a finite number, got {v!r}")
        for side in ("source", "target"):
            for item in getattr(self, side):
                if is_rule(item):
                    rule = Rule.parse(item, f"{what} {side}")
                    if side == "target" and (rule.in_graph or rule.role == ANY):
                        raise ValueError(
                            f"{what} target: a target rule is evaluated on the donor, which has no "
                            "circuit here (no in_graph) and needs one position per feature (no role any)"
                        )

    @property
    def checked(self) -> bool:
        """Whether the experiment has an expected flip."""
        return self.expected_after is not None or self.expected_language is not None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Experiment:
        return cls(**_fields_of(cls, d, f"experiment {d.get('name', '?')!r}"))


@dataclass
class EvaluationSpec(InterventionSettings):
    """What :func:`~pipeline.analysis.evaluation.evaluate` runs: the :class:`~pipeline.analysis.options.InterventionSettings`
    (the ``intervention`` config group) plus what is per prompt or per call.

    experiments: the prompt's named experiments (:class:`Experiment`)
    supernodes: {name: [[layer, pos, feature], ...]} defined in the config (they override
    annotation supernodes of the same name)
    node_threshold / edge_threshold: pruning of a raw Graph (a pruned graph keeps its own)
    """

    experiments: list[Experiment] = field(default_factory=list)
    supernodes: dict = field(default_factory=dict)
    node_threshold: float = 0.8
    edge_threshold: float = 0.98

    def __post_init__(self) -> None:
        super().__post_init__()
        self.experiments = [e if isinstance(e, Experiment) else Experiment.from_dict(e) for e in self.experiments]
        names = [e.name for e in self.experiments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"experiment names must be unique; repeated: {dupes}")
        supernodes_from_config(self.supernodes)  # validate early

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> EvaluationSpec:
        return cls(**_fields_of(cls, d or {}, "intervention spec"))

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


@dataclass
class PromptContext:
    """What selection rules, donors named by id and baselines read beyond the graph and the model.

    prompt: this prompt as a labeled prompt (:func:`pipeline.analysis.selectivity.labeled_prompt`:
    its tags as labels, its city as the ``city`` anchor)
    prompts: prompt id -> labeled prompt, the donors experiments may name (``donor:``)
    selectivity: the table selection rules read
    bank: labeled prompts the same-state donors are drawn from (``World.labeled_prompts()``)
    word_languages: word -> language (``World.word_languages()``), for experiments with an
    ``expected_language``
    """

    prompt: Mapping[str, Any] | None = None
    prompts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    selectivity: SelectivityTable | None = None
    bank: Sequence[Mapping[str, Any]] = ()
    word_languages: Mapping[str, str] = field(default_factory=dict)


def _plain(v: Any) -> Any:
    """Config values (OmegaConf containers, tuples) as plain dicts / lists."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig":
        return [_plain(x) for x in v]
    return v


def _fields_of(cls: type, d: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``d`` as plain keyword arguments of the dataclass ``cls``; an unknown key is an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; known: {sorted(names)}")
    return {k: _plain(v) for k, v in d.items()}
