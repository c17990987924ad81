"""Check a circuit causally: ablate its top features, keep or remove the whole circuit, run the
prompt's named experiments (details: docs/interventions.md).

The phases of :func:`evaluate`:

1. Read the circuit (:func:`~pipeline.analysis.circuit.read_circuit`) and run the prompt clean.
2. Top-k features by influence, each ablated alone, in direct-effects mode and with iterative
   patching: the change of the target's de-meaned logit ``v · Δ(unembedding input)`` at the
   last position against the attribution's prediction ``-A[logit, f]`` (an edge weight is
   activation × decoder · gradient, so removing the whole output vector moves the target by
   minus the edge).
3. Faithfulness: clean, circuit only (every active feature outside the circuit set to 0),
   circuit ablated, all features ablated, with iterative patching and the spec's ``errors``:
   by default circuit-tracer's (the model's own MLPs on the live input minus the ablated
   features' live contributions), or ``"frozen"`` (the local replacement model, so the fully
   ablated model is "clean errors + biases + skips"); ``faithfulness`` = (circuit only − all
   ablated) / (clean − all ablated) on the de-meaned target logit.
4. Named experiments (:class:`Experiment`): ablate, steer or swap features; top tokens before
   and after, whether the expected token came out (``flipped``), greedy generations without
   and with the intervention.
5. Summary: the flip rate (of the experiments with an ``expected_after``, those whose top
   token after is it, and before ``expected_before`` when given), overall, per experiment
   kind and per group; faithfulness; correlations. :func:`study_metrics` sums them over a study.

The report is a JSON-ready dict, floats rounded to 6 significant digits;
:mod:`pipeline.analysis.report` writes it as files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.analysis.circuit import Circuit, read_circuit
from pipeline.analysis.supernodes import Supernode, intervene, load_supernodes, supernodes_from_config
from pipeline.engine.generation import feature_intervention_generate
from pipeline.engine.intervened_forward import InterventionRunner, clean_run
from pipeline.engine.interventions import ERROR_MODES, ModeArguments, Scale
from pipeline.engine.replacement import ReplacementModel

__all__ = ["REPORT_FORMAT", "EvaluationSpec", "Experiment", "evaluate", "study_metrics"]

REPORT_FORMAT = "circuit-pipeline/intervention-report"
REPORT_VERSION = 1
KINDS = ("ablate", "steer", "swap")
MODES = ("iterative", "constrained", "direct")


# ------------------------------------------------------------------------------------ spec
@dataclass
class Experiment:
    """One named intervention experiment on the graph's prompt.

    Kinds: ``ablate`` scales the source features (default ×0); ``steer`` sets them to
    ``value`` or scales them by ``source_factor``; ``swap`` scales the source by
    ``source_factor`` (default 0) and sets the target features to ``target_factor`` × their
    activation on ``donor_prompt``, end-aligned (donor position ``q`` is this prompt's
    ``q + n_pos - n_donor``: the last token maps to the last token).

    Source and target entries are supernode names, ``[layer, pos, feature]`` triples, or
    selectors ``{"pos": P, "layers": [...], "not_on_donor": bool}``: every feature active at
    position ``P`` (negative: from the end) of this prompt (source) or of the donor prompt
    (target), in those layers (all when omitted); ``not_on_donor`` (source only) keeps the
    features inactive at the end-aligned position of ``donor_prompt``. A config can so say
    "swap everything active at the last position" without naming feature indices.

    source_factor: multiplier for the source features (ablate / swap default 0; steer: used
    when ``value`` is None)
    value: steer: the value the source features are set to
    open_ended: apply from each feature's position to the end, generated tokens included
    expected_before / expected_after: the top next token before / after (text, compared
    without surrounding whitespace)
    mode: "iterative" | "constrained" (with constrained_layers) | "direct"
    max_new_tokens: steered generation length (None: the spec's; 0: none)
    group: a label for the per-group flip rates (e.g. "state_swap", "language_swap")
    """

    name: str
    kind: str = "ablate"
    source: list = field(default_factory=list)
    target: list = field(default_factory=list)
    donor_prompt: str | None = None
    source_factor: float | None = None
    target_factor: float = 1.0
    value: float | None = None
    open_ended: bool = False
    expected_before: str | None = None
    expected_after: str | None = None
    mode: str = "iterative"
    constrained_layers: list[int] | None = None
    max_new_tokens: int | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"an experiment needs a non-blank name, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"experiment {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.mode not in MODES:
            raise ValueError(f"experiment {self.name!r}: mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "constrained" and not self.constrained_layers:
            raise ValueError(f"experiment {self.name!r}: mode 'constrained' needs constrained_layers")
        if not self.source:
            raise ValueError(f"experiment {self.name!r} has no source features or supernodes")
        if self.kind == "swap" and (not self.target or not self.donor_prompt):
            raise ValueError(
                f"experiment {self.name!r}: a swap needs target features and the donor_prompt on which they are active"
            )
        if self.kind == "steer" and self.value is None and self.source_factor is None:
            raise ValueError(f"experiment {self.name!r}: a steer needs a value or a source_factor")
        for name in ("source_factor", "target_factor", "value"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"experiment {self.name!r}: {name} must be a finite number, got {v!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Experiment:
        return cls(**_fields_of(cls, d, f"experiment {d.get('name', '?')!r}"))


@dataclass
class EvaluationSpec:
    """What :func:`evaluate` runs (the ``intervention`` config group's schema).

    supernodes: {name: [[layer, pos, feature], ...]} defined in the config (they override
    annotation supernodes of the same name)
    node_threshold / edge_threshold: pruning of a raw Graph (a pruned graph keeps its own)
    faithfulness: run the four faithfulness conditions (False: the report's ``faithfulness``
    section is None)
    errors: "recomputed" (circuit-tracer's definition) or "frozen" (the local replacement
    model: a circuit's faithfulness inside the replacement model); see resolve_mode
    """

    top_k: int = 10
    experiments: list[Experiment] = field(default_factory=list)
    faithfulness: bool = True
    supernodes: dict = field(default_factory=dict)
    freeze_attention: bool = True
    errors: str = "recomputed"  # circuit-tracer's definition, so its users' numbers carry over
    n_top_tokens: int = 5
    max_new_tokens: int = 8
    node_threshold: float = 0.8
    edge_threshold: float = 0.98

    def __post_init__(self) -> None:
        self.experiments = [e if isinstance(e, Experiment) else Experiment.from_dict(e) for e in self.experiments]
        names = [e.name for e in self.experiments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"experiment names must be unique; repeated: {dupes}")
        for name in ("top_k", "n_top_tokens", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.n_top_tokens == 0:
            raise ValueError("n_top_tokens must be positive")
        if self.errors not in ERROR_MODES:
            raise ValueError(f"errors must be one of {ERROR_MODES}, got {self.errors!r}")
        supernodes_from_config(self.supernodes)  # validate early

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> EvaluationSpec:
        return cls(**_fields_of(cls, d or {}, "intervention spec"))

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


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


# ------------------------------------------------------------------------------------ helpers
def _r(x: float | None) -> float | None:
    """Round to 6 significant digits; NaN / inf / None -> None (JSON null)."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


def _corr(a: Sequence[float], b: Sequence[float]) -> float | None:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _tok(model: ReplacementModel, token_id: int) -> str:
    return model.tokenizer.decode([int(token_id)])


def _top_tokens(model, logits: Tensor, k: int) -> list[dict]:
    probs = torch.softmax(logits.double(), -1)
    p, idx = torch.topk(probs, min(k, probs.numel()))
    return [
        {
            "rank": i + 1,
            "id": int(t),
            "token": _tok(model, int(t)),
            "prob": _r(float(pp)),
            "logit": _r(float(logits[t])),
        }
        for i, (pp, t) in enumerate(zip(p, idx))
    ]


def _kl(p_logits: Tensor, q_logits: Tensor) -> float:
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


# ------------------------------------------------------------------------------------ evaluate
def evaluate(
    model: ReplacementModel,
    graph,
    spec: EvaluationSpec | Mapping[str, Any] | None = None,
    *,
    prompt: str | None = None,
    annotations=None,
    edges=None,
) -> dict:
    """Run the checks of the module docstring and return the report (a JSON-ready dict).

    graph: a Graph, a PrunedGraph, or a path to either (a graph store directory or a pruned
    ``.npz``); annotations: a viewer annotations file / mapping whose supernodes the
    experiments may name; edges: with a pruned graph, the unpruned graph store (a Graph or
    its path) it was pruned from, so the top-k predictions use the target's full row of
    attribution edges (see :mod:`pipeline.analysis.circuit` for when it is needed).
    """
    spec = spec if isinstance(spec, EvaluationSpec) else EvaluationSpec.from_dict(spec)
    c = read_circuit(model, graph, node_threshold=spec.node_threshold, edge_threshold=spec.edge_threshold, edges=edges)

    # Phase 1: the prompt and its clean run
    text = prompt if prompt is not None else c.prompt
    source = text if text is not None else torch.as_tensor(c.tokens)
    runner = InterventionRunner(model, source)
    if runner.tokens.cpu().tolist() != c.tokens.tolist():
        raise ValueError(
            "the prompt tokenizes to other tokens than the graph's input_tokens: pass the prompt "
            "the graph was computed on (and the same model)"
        )
    clean = runner.clean
    n_pos = clean.n_pos
    vec = c.target_vector

    def target_of(u: Tensor) -> float:
        return float(vec @ u[-1].to(vec.dtype))

    base_target = target_of(clean.unembed_in)
    common: ModeArguments = {"freeze_attention": spec.freeze_attention, "errors": spec.errors}
    supernodes = load_supernodes(annotations)
    supernodes.update(supernodes_from_config(spec.supernodes))

    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "prompt": text,
        "tokens": [_tok(model, t) for t in c.tokens.tolist()],
        "model": model.model_name,
        "transcoders": {"kind": model.transcoders.kind, "scan": model.transcoders.scan},
        "spec": spec.to_dict(),
        "target": {"token": _tok(model, c.target_token), "id": c.target_token, "demeaned_logit": _r(base_target)},
        "pruning": {name: _r(value) for name, value in c.pruning.items()},
        "clean": {"top_tokens": _top_tokens(model, clean.logits[-1], spec.n_top_tokens)},
    }

    # Phase 2: top-k features by influence, ablated one at a time
    order = np.argsort(-c.influence, kind="stable")[: spec.top_k]
    rows = []
    for node in order:
        layer, pos, feat = (int(v) for v in c.features[node])
        iv = [(layer, pos, feat, 0.0)]
        direct = target_of(runner.run(iv, direct_effects=True, errors=spec.errors).unembed_in) - base_target
        iterative = target_of(runner.run(iv, **common).unembed_in) - base_target
        rows.append(
            {
                "node": int(node),
                "layer": layer,
                "pos": pos,
                "feature": feat,
                "token": report["tokens"][pos],
                "activation": _r(c.activations[node]),
                "influence": _r(c.influence[node]),
                "in_circuit": bool(c.in_circuit[node]),
                "predicted": _r(-c.edge_to_target[node]),
                "direct": _r(direct),
                "iterative": _r(iterative),
            }
        )
    pred = [-c.edge_to_target[n] for n in order]
    dirs = [r["direct"] for r in rows]
    its = [r["iterative"] for r in rows]
    report["top_features"] = {
        "rows": rows,
        "correlation_direct": _r(_corr(pred, dirs)),
        "correlation_iterative": _r(_corr(pred, its)),
        "max_abs_error_direct": _r(max((abs(p - d) for p, d in zip(pred, dirs)), default=None)),
    }

    # Phase 3: faithfulness
    report["faithfulness"] = _faithfulness(model, runner, c, target_of, common) if spec.faithfulness else None
    faith = report["faithfulness"] or {"faithfulness": None, "circuit_ablation_effect": None}

    # Phase 4: named experiments
    clean_generation: dict[int, str] = {}
    donors: dict[str, Any] = {}
    experiments = []
    for exp in spec.experiments:
        experiments.append(_run_experiment(model, runner, exp, spec, supernodes, n_pos, clean_generation, donors))
    report["experiments"] = experiments

    # Phase 5: summary
    report["summary"] = {
        **_flip_counts(experiments),
        **_by_kind_and_group(experiments),
        "faithfulness": faith["faithfulness"],
        "circuit_ablation_effect": faith["circuit_ablation_effect"],
        "correlation_direct": report["top_features"]["correlation_direct"],
        "correlation_iterative": report["top_features"]["correlation_iterative"],
    }
    return report


def _by_kind_and_group(experiments: Sequence[Mapping[str, Any]]) -> dict:
    """Flip counts per experiment kind and per group (experiments without a group: none)."""
    groups = sorted({e["group"] for e in experiments if e.get("group") is not None})
    return {
        "by_kind": {
            kind: _flip_counts([e for e in experiments if e["kind"] == kind])
            for kind in sorted({e["kind"] for e in experiments})
        },
        "by_group": {g: _flip_counts([e for e in experiments if e.get("group") == g]) for g in groups},
    }


def _flip_counts(experiments: Sequence[Mapping[str, Any]]) -> dict:
    checked = [e for e in experiments if e["expected_after"] is not None]
    flipped = [e for e in checked if e["flipped"]]
    return {
        "n_experiments": len(experiments),
        "n_checked": len(checked),
        "n_flipped": len(flipped),
        "flip_rate": _r(len(flipped) / len(checked)) if checked else None,
    }


def _faithfulness(model, runner: InterventionRunner, c: Circuit, target_of, common) -> dict:
    clean = runner.clean
    active = clean.activations.nonzero().tolist()  # (layer, pos, feature), BOS excluded
    circuit = {tuple(int(v) for v in f) for f in c.features[c.in_circuit]}
    outside = [tuple(f) for f in active if tuple(f) not in circuit]
    conditions = {
        "clean": [],
        "circuit_only": [(l, p, f, 0.0) for l, p, f in outside],
        "circuit_ablated": [(l, p, f, 0.0) for l, p, f in sorted(circuit)],
        "all_ablated": [(l, p, f, 0.0) for l, p, f in active],
    }
    top_clean = int(torch.argmax(clean.logits[-1]))
    faith: dict[str, Any] = {"n_active_features": len(active), "n_circuit_features": len(circuit), "conditions": {}}
    values = {}
    for name, ivs in conditions.items():
        res = runner.run(ivs, **common)
        last = res.logits[-1]
        values[name] = target_of(res.unembed_in)
        top = int(torch.argmax(last))
        faith["conditions"][name] = {
            "n_ablated": len(ivs),
            "demeaned_logit": _r(values[name]),
            "prob_clean_top": _r(float(torch.softmax(last.double(), -1)[top_clean])),
            "top_token": _tok(model, top),
            "top_id": top,
            "kl_from_clean": _r(_kl(clean.logits[-1], last)),
        }
    span = values["clean"] - values["all_ablated"]
    faith["faithfulness"] = _r((values["circuit_only"] - values["all_ablated"]) / span) if span else None
    faith["circuit_ablation_effect"] = _r((values["clean"] - values["circuit_ablated"]) / span) if span else None
    return faith


_SELECTOR_KEYS = ("pos", "layers", "not_on_donor")


def _select(
    item: Mapping[str, Any], activations: Tensor, what: str, donor: Tensor | None = None
) -> list[tuple[int, int, int]]:
    """Every feature active at ``item["pos"]`` in ``item["layers"]`` (all layers if absent);
    with ``not_on_donor``, only those inactive at the end-aligned position of ``donor``."""
    unknown = sorted(set(item) - set(_SELECTOR_KEYS))
    if unknown or "pos" not in item:
        raise ValueError(
            f"{what}: a selector is {{pos: P, layers: [...], not_on_donor: bool}} "
            f"(layers, not_on_donor optional), got {dict(item)!r}"
        )
    n_layers, n_pos = int(activations.shape[0]), int(activations.shape[1])
    pos = item["pos"]
    if isinstance(pos, bool) or not isinstance(pos, int) or not -n_pos <= pos < n_pos:
        raise ValueError(f"{what}: selector position {pos!r} is not a position of the {n_pos}-token prompt")
    pos %= n_pos
    layers = item.get("layers")
    layers = list(range(n_layers)) if layers is None else list(layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ValueError(f"{what}: selector layer {layer!r} is out of range (0..{n_layers - 1})")
    exclude = None
    if item.get("not_on_donor"):
        if donor is None:
            raise ValueError(f"{what}: not_on_donor needs a donor_prompt (and is for the source only)")
        dpos = pos - n_pos + int(donor.shape[1])
        exclude = donor[:, dpos] if 0 <= dpos < donor.shape[1] else torch.zeros_like(activations[:, pos])
    out = []
    for layer in layers:
        active = activations[layer, pos] != 0
        if exclude is not None:
            active &= exclude[layer] == 0
        out += [(layer, pos, int(f)) for f in torch.nonzero(active).reshape(-1).tolist()]
    return out


def _features_of(
    items: Sequence,
    supernodes: Mapping[str, Supernode],
    what: str,
    activations: Tensor | None = None,
    donor: Tensor | None = None,
) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for item in items:
        if isinstance(item, str):  # a supernode (unknown names: intervene's clear error)
            out += [(layer, pos, feat) for layer, pos, feat, _ in intervene(supernodes, item, 0.0)]
        elif isinstance(item, Mapping) and activations is not None:
            out += _select(item, activations, what, donor)
        elif isinstance(item, (list, tuple)) and len(item) == 3:
            layer, pos, feat = (int(v) for v in item)
            out.append((layer, pos, feat))
        else:
            raise ValueError(
                f"{what}: each entry is a supernode name, [layer, pos, feature] or "
                f"{{pos: P, layers: [...]}}, got {item!r}"
            )
    return out


def _matches(token: str, expected: str | None) -> bool | None:
    if expected is None:
        return None
    return token.strip() == expected.strip()


def _run_experiment(
    model,
    runner: InterventionRunner,
    exp: Experiment,
    spec: EvaluationSpec,
    supernodes,
    n_pos: int,
    clean_generation: dict,
    donors: dict,
) -> dict:
    donor = None
    if exp.donor_prompt is not None:  # donors' clean runs are shared by the prompt's experiments
        if exp.donor_prompt not in donors:
            donors[exp.donor_prompt] = clean_run(model, exp.donor_prompt)
        donor = donors[exp.donor_prompt]
    src = _features_of(
        exp.source,
        supernodes,
        f"experiment {exp.name!r} source",
        runner.clean.activations,
        None if donor is None else donor.activations,
    )
    ivs: list[tuple] = []
    if exp.kind == "steer" and exp.value is not None:
        src_value: Any = float(exp.value)
    else:
        src_value = Scale(exp.source_factor if exp.source_factor is not None else 0.0)
    for layer, pos, feat in src:
        ivs.append((layer, slice(pos, None) if exp.open_ended else pos, feat, src_value))
    n_target_inactive = 0
    if exp.kind == "swap":
        assert donor is not None  # a swap has a donor_prompt (Experiment checks it)
        shift = n_pos - donor.n_pos
        for layer, dpos, feat in _features_of(
            exp.target, supernodes, f"experiment {exp.name!r} target", donor.activations
        ):
            if not 0 <= dpos < donor.n_pos or not 0 <= dpos + shift < n_pos:
                raise ValueError(
                    f"experiment {exp.name!r}: target feature ({layer}, {dpos}, {feat}) has no "
                    f"position in the donor prompt ({donor.n_pos} tokens) that maps into this "
                    f"prompt ({n_pos} tokens, end-aligned)"
                )
            a = float(donor.activations[layer, dpos, feat])
            n_target_inactive += a == 0
            pos = dpos + shift
            ivs.append((layer, slice(pos, None) if exp.open_ended else pos, feat, exp.target_factor * a))
    mode: ModeArguments = {"freeze_attention": spec.freeze_attention, "errors": spec.errors}
    if exp.mode == "direct":
        mode["direct_effects"] = True
    elif exp.mode == "constrained":
        assert exp.constrained_layers  # Experiment checks that a constrained one has them
        mode["constrained_layers"] = list(exp.constrained_layers)
    res = runner.run(ivs, **mode)
    clean = runner.clean
    before = _top_tokens(model, clean.logits[-1], spec.n_top_tokens)
    after = _top_tokens(model, res.logits[-1], spec.n_top_tokens)
    ok_before = _matches(before[0]["token"], exp.expected_before)
    ok_after = _matches(after[0]["token"], exp.expected_after)
    flipped = None if ok_after is None else bool(ok_after and ok_before is not False)
    out: dict[str, Any] = {
        "name": exp.name,
        "kind": exp.kind,
        "mode": exp.mode,
        "group": exp.group,
        "n_source_features": len(src),
        "n_interventions": len(ivs),
        "n_target_inactive_on_donor": int(n_target_inactive),
        "before": before,
        "after": after,
        "expected_before": exp.expected_before,
        "expected_after": exp.expected_after,
        "before_ok": ok_before,
        "after_ok": ok_after,
        "flipped": flipped,
        "kl_from_clean": _r(_kl(clean.logits[-1], res.logits[-1])),
        "generation": None,
    }
    n_new = spec.max_new_tokens if exp.max_new_tokens is None else exp.max_new_tokens
    if n_new:
        n_new = min(n_new, model.n_ctx - n_pos + 1)
        if n_new not in clean_generation:
            clean_generation[n_new] = feature_intervention_generate(
                model, clean.tokens, [], max_new_tokens=n_new, clean=clean
            ).completion
        steered = feature_intervention_generate(model, clean.tokens, ivs, max_new_tokens=n_new, clean=clean, **mode)
        out["generation"] = {"max_new_tokens": n_new, "clean": clean_generation[n_new], "steered": steered.completion}
    return out


def _sum_counts(counts: Sequence[Mapping[str, Any]]) -> dict:
    n = {k: sum(c[k] for c in counts) for k in ("n_experiments", "n_checked", "n_flipped")}
    return {**n, "flip_rate": _r(n["n_flipped"] / n["n_checked"]) if n["n_checked"] else None}


def study_metrics(
    summaries: Sequence[Mapping[str, Any]], prompt_groups: Mapping[str, Sequence[int]] | None = None
) -> dict:
    """Summary over a study, from each prompt's report ``summary`` (or the whole report):
    flip rate over all checked experiments, per experiment kind (``by_kind``) and group
    (``by_group``), mean faithfulness and correlations (None where no prompt has the value).
    ``prompt_groups``: {name: indices into ``summaries``} adds ``by_prompt_group`` (for
    example the flip rate per prompt kind)."""
    summaries = [r["summary"] if "summary" in r else r for r in summaries]

    def mean(key):
        vals = [s[key] for s in summaries if s.get(key) is not None]
        return _r(sum(vals) / len(vals)) if vals else None

    def per(field):
        names = sorted({name for s in summaries for name in s.get(field, {})})
        return {name: _sum_counts([s[field][name] for s in summaries if name in s.get(field, {})]) for name in names}

    out = {
        "n_prompts": len(summaries),
        **_sum_counts(summaries),
        "by_kind": per("by_kind"),
        "by_group": per("by_group"),
        "mean_faithfulness": mean("faithfulness"),
        "mean_correlation_direct": mean("correlation_direct"),
        "mean_correlation_iterative": mean("correlation_iterative"),
    }
    if prompt_groups is not None:
        out["by_prompt_group"] = {
            name: _sum_counts([summaries[i] for i in sorted(idx)]) for name, idx in sorted(prompt_groups.items())
        }
    return out
