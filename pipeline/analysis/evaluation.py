"""Check a circuit causally: ablate its top features, keep or remove the whole circuit, run the
prompt's named experiments (details: docs/interventions.md).

The phases of :func:`evaluate`, run as the
:class:`~pipeline.analysis.evaluation_spec.EvaluationSpec` says:

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
4. Named experiments (:class:`~pipeline.analysis.evaluation_spec.Experiment`): ablate, steer
   or swap features, named by position, index, supernode or selection rule
   (:mod:`pipeline.analysis.selection`, resolved on the graph's circuit and a selectivity
   table); the features each chose; top tokens before and
   after, whether the experiment flipped (:func:`is_flip`: the top token changed from the
   clean one to ``expected_after``; for a steer measured by language, the continuation
   switched to ``expected_language``, :func:`language_share`); greedy generations without and
   with the intervention. Beside each experiment with an expected flip, its baselines
   (:data:`BASELINES`): random feature sets of the same shape, donors that share this prompt's
   value of the swapped label, and the same swap at a wrong position.
5. Summary: the flip rate (of the experiments with an expected flip, those that flipped; a
   rule that selects nothing counts as not flipped), overall, per experiment kind and per
   group, each with its baselines' flip rates; faithfulness; correlations.
   :func:`study_metrics` sums them over a study.

The report is a JSON-ready dict, floats rounded to 6 significant digits
(:mod:`pipeline.analysis.readouts`); :mod:`pipeline.analysis.report` writes it as files.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.analysis.circuit import Circuit, read_circuit
from pipeline.analysis.evaluation_spec import EvaluationSpec, Experiment, PromptContext
from pipeline.analysis.hops import prompt_hop
from pipeline.analysis.options import BASELINES
from pipeline.analysis.readouts import kl_divergence, rounded, token_text, top_tokens
from pipeline.analysis.selection import Chosen, Rule, is_rule, moved, random_like, select
from pipeline.analysis.selectivity import role_position
from pipeline.analysis.supernodes import Supernode, intervene, load_supernodes, supernodes_from_config
from pipeline.engine.generation import GenerationResult, feature_intervention_generate
from pipeline.engine.intervened_forward import CleanRun, InterventionRunner, clean_run
from pipeline.engine.interventions import ModeArguments, Scale
from pipeline.engine.replacement import ReplacementModel
from pipeline.graph.pruned import PrunedGraph

__all__ = [
    "BASELINES",
    "REPORT_FORMAT",
    "evaluate",
    "faithfulness_scores",
    "is_flip",
    "language_share",
    "study_metrics",
]

REPORT_FORMAT = "circuit-pipeline/intervention-report"
REPORT_VERSION = 2
#: random: feature sets of the selected sets' shape (n_random seeded draws); same_state: the swap
#: from donors with this prompt's value of the swapped label; wrong_position: every
#: intervention moved by wrong_offset tokens
NO_MATCH = "no feature matched"


# ------------------------------------------------------------------------------------ helpers
def _corr(a: Sequence[float], b: Sequence[float]) -> float | None:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


# ------------------------------------------------------------------------------------ evaluate
def evaluate(
    model: ReplacementModel,
    graph,
    spec: EvaluationSpec | Mapping[str, Any] | None = None,
    *,
    prompt: str | None = None,
    annotations=None,
    edges=None,
    context: PromptContext | None = None,
) -> dict:
    """Run the checks of the module docstring and return the report (a JSON-ready dict).

    graph: a Graph, a PrunedGraph, or a path to either (a graph store directory or a pruned
    ``.npz``); annotations: a viewer annotations file / mapping whose supernodes the
    experiments may name; edges: with a pruned graph, the unpruned graph store (a Graph or
    its path) it was pruned from, so the top-k predictions use the target's full row of
    attribution edges (see :mod:`pipeline.analysis.circuit` for when it is needed);
    context: the prompt's labels, the donors, the selectivity table, the prompt bank and the
    words' languages, for experiments that use selection rules, donors by id, same-state
    baselines or an expected language.
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
        "tokens": [token_text(model, t) for t in c.tokens.tolist()],
        "model": model.model_name,
        "transcoders": {"kind": model.transcoders.kind, "scan": model.transcoders.scan},
        "spec": spec.to_dict(),
        "target": {
            "token": token_text(model, c.target_token),
            "id": c.target_token,
            "demeaned_logit": rounded(base_target),
        },
        "pruning": {name: rounded(value) for name, value in c.pruning.items()},
        "clean": {"top_tokens": top_tokens(model, clean.logits[-1], spec.n_top_tokens)},
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
                "activation": rounded(c.activations[node]),
                "influence": rounded(c.influence[node]),
                "in_circuit": bool(c.in_circuit[node]),
                "predicted": rounded(-c.edge_to_target[node]),
                "direct": rounded(direct),
                "iterative": rounded(iterative),
            }
        )
    pred = [-c.edge_to_target[n] for n in order]
    dirs = [r["direct"] for r in rows]
    its = [r["iterative"] for r in rows]
    report["top_features"] = {
        "rows": rows,
        "correlation_direct": rounded(_corr(pred, dirs)),
        "correlation_iterative": rounded(_corr(pred, its)),
        "max_abs_error_direct": rounded(max((abs(p - d) for p, d in zip(pred, dirs)), default=None)),
    }

    # Phase 3: faithfulness
    report["faithfulness"] = _faithfulness(model, runner, c, target_of, common) if spec.faithfulness else None
    faith = report["faithfulness"] or {"faithfulness": None, "circuit_ablation_effect": None}

    # Phase 4: named experiments
    context = context or PromptContext()
    item = context.prompt or {"prompt": text, "labels": {}, "anchors": {}}
    circuit = {tuple(int(v) for v in f) for f in c.features[c.in_circuit]}
    setting = _Setting(model, runner, spec, supernodes, context, item, circuit)
    report["experiments"] = experiments = [_run_experiment(setting, exp) for exp in spec.experiments]

    # Phase 5: the intermediate hop (prompts labeled with a state and a city, given a selectivity table)
    pruned = graph if isinstance(graph, PrunedGraph) else None  # a raw store has no pruned edges to follow
    hop = prompt_hop(model, pruned, item, runner.clean.tokens, context.selectivity)
    report["intermediate_node"] = None if hop is None else hop.to_dict()

    # Phase 6: summary
    report["summary"] = {
        **_flip_counts(experiments),
        **_by_kind_and_group(experiments),
        "faithfulness": faith["faithfulness"],
        "circuit_ablation_effect": faith["circuit_ablation_effect"],
        "correlation_direct": report["top_features"]["correlation_direct"],
        "correlation_iterative": report["top_features"]["correlation_iterative"],
        "intermediate_node": None if hop is None else hop.found,
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
    """Experiments, those with an expected flip (checked), those that flipped, those whose
    rules selected nothing, and per baseline the runs and flips summed over the checked ones."""
    checked = [e for e in experiments if e["flipped"] is not None]
    n_flipped = sum(bool(e["flipped"]) for e in checked)
    baselines = {}
    for name in BASELINES:
        runs = [e["baselines"][name] for e in checked if name in (e.get("baselines") or {})]
        baselines[name] = _sum_runs(runs)
    return {
        "n_experiments": len(experiments),
        "n_checked": len(checked),
        "n_flipped": n_flipped,
        "n_no_match": sum(e.get("status") == NO_MATCH for e in experiments),
        "flip_rate": rounded(n_flipped / len(checked)) if checked else None,
        "baselines": baselines,
    }


def _sum_runs(runs: Sequence[Mapping[str, Any]]) -> dict:
    """Baseline runs summed: experiments that ran it, runs, flips, their rate."""
    ran = [r for r in runs if r.get("n_runs")]
    n_runs = sum(r["n_runs"] for r in ran)
    n_flipped = sum(r["n_flipped"] for r in ran)
    return {
        "n_experiments": sum(r.get("n_experiments", 1) for r in ran),
        "n_runs": n_runs,
        "n_flipped": n_flipped,
        "flip_rate": rounded(n_flipped / n_runs) if n_runs else None,
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
            "demeaned_logit": rounded(values[name]),
            "prob_clean_top": rounded(float(torch.softmax(last.double(), -1)[top_clean])),
            "top_token": token_text(model, top),
            "top_id": top,
            "kl_from_clean": rounded(kl_divergence(clean.logits[-1], last)),
        }
    faith.update({name: rounded(v) for name, v in faithfulness_scores(values).items()})
    return faith


def faithfulness_scores(values: Mapping[str, float]) -> dict[str, float | None]:
    """From the target's de-meaned logit under each condition (``clean``, ``circuit_only``,
    ``circuit_ablated``, ``all_ablated``): ``faithfulness`` = (circuit only − all ablated) /
    (clean − all ablated), the share of the clean logit above the fully ablated one that the
    circuit alone keeps; ``circuit_ablation_effect`` = (clean − circuit ablated) / (clean − all
    ablated), the share removing the circuit removes. None where clean equals all ablated."""
    span = values["clean"] - values["all_ablated"]
    if not span:
        return {"faithfulness": None, "circuit_ablation_effect": None}
    return {
        "faithfulness": (values["circuit_only"] - values["all_ablated"]) / span,
        "circuit_ablation_effect": (values["clean"] - values["circuit_ablated"]) / span,
    }


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
    activations: Tensor,
    donor: Tensor | None = None,
) -> list[tuple[int, int, int]]:
    """The (layer, pos, feature) triples of supernode names, listed triples and selectors, in
    range of ``activations`` (n_layers, n_pos, d_transcoder), positions counted from 0."""
    n_layers, n_pos, d_transcoder = (int(v) for v in activations.shape)
    out: list[tuple[int, int, int]] = []
    for item in items:
        if isinstance(item, str):  # a supernode (unknown names: intervene's clear error)
            found = [(layer, pos, feat) for layer, pos, feat, _ in intervene(supernodes, item, 0.0)]
        elif isinstance(item, Mapping):
            found = _select(item, activations, what, donor)
        elif isinstance(item, (list, tuple)) and len(item) == 3:
            layer, pos, feat = (int(v) for v in item)
            found = [(layer, pos, feat)]
        else:
            raise ValueError(
                f"{what}: each entry is a supernode name, [layer, pos, feature], a selector "
                f"{{pos: P, layers: [...]}} or a rule {{select: selective, ...}}, got {item!r}"
            )
        for layer, pos, feat in found:
            if not (0 <= layer < n_layers and -n_pos <= pos < n_pos and 0 <= feat < d_transcoder):
                raise ValueError(
                    f"{what}: feature ({layer}, {pos}, {feat}) is not in the {n_layers} layers x "
                    f"{n_pos} positions x {d_transcoder} features of the prompt it is read on"
                )
            out.append((layer, pos % n_pos, feat))
    return out


def _describe(item: Any) -> str:
    """How a non-rule entry named its features, for the report."""
    if isinstance(item, str):
        return f"supernode {item}"
    if isinstance(item, Mapping):
        return "selector " + ", ".join(f"{k}={v}" for k, v in item.items())
    return "listed"


def _matches(token: str, expected: str | None) -> bool | None:
    if expected is None:
        return None
    return token.strip() == expected.strip()


def is_flip(before: str, after: str, expected_before: str | None, expected_after: str | None) -> bool | None:
    """Whether an intervention flipped the answer: the top token changed from the clean one
    (``before``) to ``expected_after`` (and the clean one is ``expected_before`` when that is
    given). Tokens are compared without surrounding whitespace. None without ``expected_after``:
    there is nothing to check. An intervention that leaves the top token alone never flips,
    whatever it was expected to give."""
    if expected_after is None:
        return None
    before, after = before.strip(), after.strip()
    if expected_before is not None and before != expected_before.strip():
        return False
    return after != before and after == expected_after.strip()


def language_share(words: Sequence[str], word_languages: Mapping[str, str], language: str) -> float | None:
    """The share of the language-marked ``words`` (those ``word_languages`` knows) that are in
    ``language``; None when no word is marked."""
    marked = [word_languages[w.strip()] for w in words if w.strip() in word_languages]
    return sum(lang == language for lang in marked) / len(marked) if marked else None


@dataclass
class _Setting:
    """What every experiment on one prompt shares: the model and the prompt's clean run, the
    spec and supernodes, the context (``item``: this prompt, labeled), the circuit's
    (layer, pos, feature) triples, and clean runs / generations computed once."""

    model: Any
    runner: InterventionRunner
    spec: EvaluationSpec
    supernodes: Mapping[str, Supernode]
    context: PromptContext
    item: Mapping[str, Any]
    circuit: set[tuple[int, ...]]
    runs: dict[str, CleanRun] = field(default_factory=dict)
    generations: dict[int, GenerationResult] = field(default_factory=dict)

    def clean_run_of(self, text: str) -> CleanRun:
        if text not in self.runs:
            self.runs[text] = clean_run(self.model, text)
        return self.runs[text]

    def clean_generation(self, n_new: int) -> GenerationResult:
        if n_new not in self.generations:
            clean = self.runner.clean
            self.generations[n_new] = feature_intervention_generate(
                self.model, clean.tokens, [], max_new_tokens=n_new, clean=clean
            )
        return self.generations[n_new]

    def labeled(self, text: str) -> Mapping[str, Any]:
        """The labeled prompt of this text among the context's prompts and bank (unlabeled if none)."""
        for item in [*self.context.prompts.values(), *self.context.bank]:
            if item["prompt"] == text:
                return item
        return {"prompt": text, "labels": {}, "anchors": {}}


def _donor(s: _Setting, exp: Experiment) -> tuple[Mapping[str, Any] | None, CleanRun | None]:
    """The donor as a labeled prompt, and its clean run (None, None without one)."""
    if exp.donor is not None:
        if exp.donor not in s.context.prompts:
            raise ValueError(f"experiment {exp.name!r}: donor {exp.donor!r} is not a prompt id of the prompt set")
        item = s.context.prompts[exp.donor]
    elif exp.donor_prompt is not None:
        item = s.labeled(exp.donor_prompt)
    else:
        return None, None
    return item, s.clean_run_of(item["prompt"])


def _source(s: _Setting, exp: Experiment, donor: CleanRun | None) -> list[Chosen]:
    """The source features, on this prompt."""
    what = f"experiment {exp.name!r} source"
    clean = s.runner.clean
    table = s.context.selectivity
    out: list[Chosen] = []
    for entry in exp.source:
        if is_rule(entry):
            rule = Rule.parse(entry, what)
            out += select(rule, s.item, clean.tokens, clean.activations, s.model.tokenizer, table, s.circuit, what)[0]
            continue
        donor_acts = None if donor is None else donor.activations
        for layer, pos, feat in _features_of([entry], s.supernodes, what, clean.activations, donor_acts):
            act = float(clean.activations[layer, pos, feat])
            out.append(Chosen(layer, pos, feat, act, _describe(entry), at=pos))
    return out


def _target(s: _Setting, exp: Experiment, donor_item: Mapping[str, Any], donor: CleanRun) -> list[Chosen]:
    """A swap's target features, picked on the donor, each with the position of this prompt it
    is written at: a rule's at this prompt's position of the same role, the others end-aligned."""
    what = f"experiment {exp.name!r} target"
    here = s.runner.clean
    shift = here.n_pos - donor.n_pos
    out: list[Chosen] = []
    for entry in exp.target:
        if is_rule(entry):
            rule = Rule.parse(entry, what)
            chosen, _ = select(
                rule, donor_item, donor.tokens, donor.activations, s.model.tokenizer, s.context.selectivity, None, what
            )
            at = role_position(s.model.tokenizer, here.tokens, rule.role, s.item)
            if at is None:
                raise ValueError(f"{what}: this prompt has no {rule.role!r} position to write the donor's features at")
            out += [dataclasses.replace(c, at=at) for c in chosen]
            continue
        for layer, dpos, feat in _features_of([entry], s.supernodes, what, donor.activations):
            if not 0 <= dpos + shift < here.n_pos:
                raise ValueError(
                    f"{what}: target feature ({layer}, {dpos}, {feat}) has no position in the donor "
                    f"prompt ({donor.n_pos} tokens) that maps into this prompt ({here.n_pos} tokens, end-aligned)"
                )
            act = float(donor.activations[layer, dpos, feat])
            out.append(Chosen(layer, dpos, feat, act, _describe(entry), at=dpos + shift))
    return out


def _where(at: int | None, open_ended: bool, n_pos: int) -> Any:
    """An intervention's position: ``at``, or every position but BOS for None; open-ended:
    from there on, generated tokens included."""
    start = 1 if at is None else at
    if open_ended:
        return slice(start, None)
    return range(1, n_pos) if at is None else at


def _interventions(exp: Experiment, src: Sequence[Chosen], tgt: Sequence[Chosen], n_pos: int) -> list[tuple]:
    """Source features scaled (or set, for a steer with a value); targets set to
    ``target_factor`` × their activation on the donor, at their positions here."""
    if exp.kind == "steer" and exp.value is not None:
        value: Any = float(exp.value)
    else:
        value = Scale(exp.source_factor if exp.source_factor is not None else 0.0)
    ivs = [(c.layer, _where(c.at, exp.open_ended, n_pos), c.feature, value) for c in src]
    ivs += [(c.layer, _where(c.at, exp.open_ended, n_pos), c.feature, exp.target_factor * c.activation) for c in tgt]
    return ivs


def _mode(exp: Experiment, spec: EvaluationSpec) -> dict:
    mode: dict[str, Any] = dict(freeze_attention=spec.freeze_attention, errors=spec.errors)
    if exp.mode == "direct":
        mode["direct_effects"] = True
    elif exp.mode == "constrained":
        mode["constrained_layers"] = list(exp.constrained_layers or ())
    return mode


def _n_new(s: _Setting, exp: Experiment) -> int:
    """Tokens to generate for ``exp`` (0: none), within the model's context."""
    n_new = s.spec.max_new_tokens if exp.max_new_tokens is None else exp.max_new_tokens
    return min(n_new, s.model.n_ctx - s.runner.clean.n_pos + 1) if n_new else 0


def _completion_words(model, generation: GenerationResult) -> list[str]:
    return [token_text(model, t) for t in generation.tokens[generation.n_prompt :].tolist()]


def _outcome(s: _Setting, exp: Experiment, ivs: list[tuple], mode: dict, *, full: bool) -> dict:
    """One intervention run of ``exp``: top tokens after, KL from clean, whether it flipped;
    the steered generation when ``full`` or when the flip is measured on it (an
    ``expected_language``), with the continuations' language shares."""
    clean = s.runner.clean
    res = s.runner.run(ivs, **mode)
    after = top_tokens(s.model, res.logits[-1], s.spec.n_top_tokens)
    out: dict[str, Any] = {
        "after": after,
        "kl_from_clean": rounded(kl_divergence(clean.logits[-1], res.logits[-1])),
        "generation": None,
        "language": None,
    }
    n_new = _n_new(s, exp)
    if exp.expected_language is not None and not n_new:
        raise ValueError(f"experiment {exp.name!r}: expected_language needs generated tokens (max_new_tokens > 0)")
    if n_new and (full or exp.expected_language is not None):
        clean_gen = s.clean_generation(n_new)
        steered = feature_intervention_generate(s.model, clean.tokens, ivs, max_new_tokens=n_new, clean=clean, **mode)
        out["generation"] = {"max_new_tokens": n_new, "clean": clean_gen.completion, "steered": steered.completion}
    if exp.expected_language is not None:
        langs, lang = s.context.word_languages, exp.expected_language
        shares = [language_share(_completion_words(s.model, g), langs, lang) for g in (clean_gen, steered)]
        out["language"] = {"expected": lang, "clean_share": rounded(shares[0]), "steered_share": rounded(shares[1])}
        was, now = (x is not None and x > s.spec.language_share for x in shares)
        out["flipped"] = now and not was
    else:
        before = token_text(s.model, int(torch.argmax(clean.logits[-1])))
        out["flipped"] = is_flip(before, after[0]["token"], exp.expected_before, exp.expected_after)
    return out


def _rows(s: _Setting, chosen: Sequence[Chosen]) -> list[dict]:
    """The report's record of selected features: where they were read and where written."""
    tokens = s.runner.clean.tokens.tolist()
    return [
        {
            "layer": c.layer,
            "pos": c.pos,
            "feature": c.feature,
            "activation": rounded(c.activation),
            "at": c.at,
            "token": None if c.at is None else token_text(s.model, tokens[c.at]),
            "rule": c.rule,
        }
        for c in chosen
    ]


def _run_experiment(s: _Setting, exp: Experiment) -> dict:
    clean = s.runner.clean
    donor_item, donor = _donor(s, exp)
    src = _source(s, exp, donor)
    tgt = _target(s, exp, donor_item, donor) if exp.kind == "swap" and donor_item and donor else []
    before = top_tokens(s.model, clean.logits[-1], s.spec.n_top_tokens)
    out: dict[str, Any] = {
        "name": exp.name,
        "kind": exp.kind,
        "mode": exp.mode,
        "constrained_layers": exp.constrained_layers,
        "group": exp.group,
        "donor": None if donor_item is None else {"id": exp.donor, "prompt": donor_item["prompt"]},
        "selected": {"source": _rows(s, src), "target": _rows(s, tgt)},
        "n_source_features": len(src),
        "n_target_features": len(tgt),
        "n_target_inactive_on_donor": sum(c.activation == 0 for c in tgt),
        "before": before,
        "expected_before": exp.expected_before,
        "expected_after": exp.expected_after,
        "expected_language": exp.expected_language,
        "before_ok": _matches(before[0]["token"], exp.expected_before),
    }
    if not src or (exp.kind == "swap" and not tgt):  # reported, never run, never a flip
        out.update(
            status=NO_MATCH,
            n_interventions=0,
            after=None,
            after_ok=None,
            flipped=False if exp.checked else None,
            kl_from_clean=None,
            generation=None,
            language=None,
            baselines={},
        )
        return out
    ivs = _interventions(exp, src, tgt, clean.n_pos)
    mode = _mode(exp, s.spec)
    result = _outcome(s, exp, ivs, mode, full=True)
    out.update(
        status="ran", n_interventions=len(ivs), after_ok=_matches(result["after"][0]["token"], exp.expected_after)
    )
    out.update(result)
    out["baselines"] = _baselines(s, exp, src, tgt, donor_item, donor, mode) if exp.checked else {}
    return out


# ------------------------------------------------------------------------------------ baselines
def _baselines(s: _Setting, exp: Experiment, src, tgt, donor_item, donor, mode) -> dict:
    """The baselines of :data:`BASELINES` the spec asks for that apply to ``exp`` (same-state
    donors: swaps only), each with ``n_runs``, ``n_flipped`` and ``flip_rate``."""
    out = {}
    if "random" in s.spec.baselines:
        out["random"] = _random_baseline(s, exp, src, tgt, donor, mode)
    if "same_state" in s.spec.baselines and exp.kind == "swap":
        out["same_state"] = _same_state_baseline(s, exp, src, donor_item, mode)
    if "wrong_position" in s.spec.baselines:
        out["wrong_position"] = _wrong_position_baseline(s, exp, src, tgt, mode)
    return out


def _rate(n_flipped: int, n_runs: int) -> float | None:
    return rounded(n_flipped / n_runs) if n_runs else None


def _random_baseline(s: _Setting, exp: Experiment, src, tgt, donor: CleanRun | None, mode) -> dict:
    """``n_random`` random feature sets of the selected sets' shape (selection.random_like:
    per (layer, position) cell as many features, drawn from those active there), the source's
    on this prompt and the target's on the donor, run as the experiment."""
    rng = np.random.default_rng([s.spec.seed, zlib.crc32(exp.name.encode("utf-8"))])
    n_pos = s.runner.clean.n_pos
    n_flipped, shares = 0, []
    for _ in range(s.spec.n_random):
        rs = random_like(src, s.runner.clean.activations, rng)
        rt = random_like(tgt, donor.activations, rng) if tgt and donor is not None else []
        o = _outcome(s, exp, _interventions(exp, rs, rt, n_pos), mode, full=False)
        n_flipped += bool(o["flipped"])
        if o["language"] is not None and o["language"]["steered_share"] is not None:
            shares.append(o["language"]["steered_share"])
    out = {
        "n_runs": s.spec.n_random,
        "n_flipped": n_flipped,
        "flip_rate": _rate(n_flipped, s.spec.n_random),
        "seed": s.spec.seed,
        "size": {"source": len(src), "target": len(tgt)},
    }
    if exp.expected_language is not None:
        out["mean_language_share"] = rounded(sum(shares) / len(shares)) if shares else None
    return out


def _same_state_baseline(s: _Setting, exp: Experiment, src, donor_item, mode) -> dict:
    """The swap from every bank prompt that shares this prompt's value of the swapped label
    (the first target rule's label, else ``state``): other cities of the same state, in the
    donor's language. It should not flip."""
    what = f"experiment {exp.name!r} target"
    rules = [Rule.parse(e, what) for e in exp.target if is_rule(e)]
    label = rules[0].label if rules else "state"
    labels = s.item.get("labels", {})
    value = labels.get(label)
    language = (donor_item or {}).get("labels", {}).get("language")
    donors = [
        b
        for b in s.context.bank
        if value is not None
        and b["labels"].get(label) == value
        and b["prompt"] != s.item["prompt"]
        and (language is None or b["labels"].get("language") == language)
        and ("city" not in labels or b["labels"].get("city") != labels["city"])
    ]
    out: dict[str, Any] = {"label": label, "value": value, "donors": []}
    n_flipped = 0
    for b in donors:
        try:
            tgt = _target(s, exp, b, s.clean_run_of(b["prompt"]))
        except ValueError as exc:  # this donor cannot take the swap: recorded, not counted
            out["donors"].append({"prompt": b["prompt"], "error": str(exc)})
            continue
        o = _outcome(s, exp, _interventions(exp, src, tgt, s.runner.clean.n_pos), mode, full=False)
        n_flipped += bool(o["flipped"])
        out["donors"].append(
            {
                "prompt": b["prompt"],
                "anchor": next(iter(b.get("anchors", {}).values()), None),
                "n_target_features": len(tgt),
                "top_token": o["after"][0]["token"],
                "flipped": o["flipped"],
            }
        )
    n_runs = sum("flipped" in d for d in out["donors"])
    out.update(n_runs=n_runs, n_flipped=n_flipped, flip_rate=_rate(n_flipped, n_runs))
    if not n_runs:
        out["note"] = f"no prompt of the bank shares this prompt's {label} ({value}) in the donor's language"
    return out


def _wrong_position_baseline(s: _Setting, exp: Experiment, src, tgt, mode) -> dict:
    """The same interventions, each written ``wrong_offset`` tokens away from its position."""
    off, n_pos = s.spec.wrong_offset, s.runner.clean.n_pos
    ms, mt = moved(src, off, n_pos), moved(tgt, off, n_pos)
    out: dict[str, Any] = {"offset": off}
    if ms is None or mt is None:
        out.update(n_runs=0, n_flipped=0, flip_rate=None)
        out["note"] = "not run: a feature is applied at every position, or would move onto BOS or past the prompt"
        return out
    o = _outcome(s, exp, _interventions(exp, ms, mt, n_pos), mode, full=False)
    tokens = s.runner.clean.tokens.tolist()
    moves = sorted({(c.at, c.at + off) for c in [*src, *tgt] if c.at is not None})
    out.update(
        moves=[{"from": a, "to": b, "token": token_text(s.model, tokens[b])} for a, b in moves],
        top_token=o["after"][0]["token"],
        flipped=o["flipped"],
        n_runs=1,
        n_flipped=int(bool(o["flipped"])),
        flip_rate=float(bool(o["flipped"])),
    )
    return out


def _sum_counts(counts: Sequence[Mapping[str, Any]]) -> dict:
    """Flip counts (:func:`_flip_counts`) summed, baselines included."""
    n = {k: sum(c.get(k, 0) for c in counts) for k in ("n_experiments", "n_checked", "n_flipped", "n_no_match")}
    baselines = {
        name: _sum_runs([c["baselines"][name] for c in counts if name in c.get("baselines", {})]) for name in BASELINES
    }
    return {
        **n,
        "flip_rate": rounded(n["n_flipped"] / n["n_checked"]) if n["n_checked"] else None,
        "baselines": baselines,
    }


def _hop_rate(summaries: Sequence[Mapping[str, Any]]) -> dict:
    """Prompts checked for an intermediate node, those that have one, and the rate."""
    checked = [s["intermediate_node"] for s in summaries if s.get("intermediate_node") is not None]
    found = sum(bool(f) for f in checked)
    return {
        "n_intermediate_checked": len(checked),
        "n_intermediate_found": found,
        "intermediate_node_rate": rounded(found / len(checked)) if checked else None,
    }


def study_metrics(
    summaries: Sequence[Mapping[str, Any]], prompt_groups: Mapping[str, Sequence[int]] | None = None
) -> dict:
    """Summary over a study, from each prompt's report ``summary`` (or the whole report):
    flip rate over all checked experiments, per experiment kind (``by_kind``) and group
    (``by_group``), each with its baselines' runs, flips and flip rates, mean faithfulness and correlations (None where no prompt has the value).
    ``prompt_groups``: {name: indices into ``summaries``} adds ``by_prompt_group`` (for
    example the flip rate per prompt kind)."""
    summaries = [r["summary"] if "summary" in r else r for r in summaries]

    def mean(key):
        vals = [s[key] for s in summaries if s.get(key) is not None]
        return rounded(sum(vals) / len(vals)) if vals else None

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
        **_hop_rate(summaries),
    }
    if prompt_groups is not None:
        out["by_prompt_group"] = {
            name: _sum_counts([summaries[i] for i in sorted(idx)]) for name, idx in sorted(prompt_groups.items())
        }
    return out
