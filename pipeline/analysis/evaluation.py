"""Check a circuit causally: ablate its top features, keep or remove the whole circuit, run the
prompt's named experiments, and count the flips (details: docs/interventions.md).

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
4. Named experiments, each with its baselines (:mod:`pipeline.analysis.experiments`).
5. The intermediate hop (:func:`~pipeline.analysis.hops.prompt_hop`), for a prompt labeled with
   a state and a city, given a selectivity table.
6. Summary: the flip rate (of the experiments with an expected flip, those that flipped; a
   rule that selects nothing counts as not flipped), overall, per experiment kind and per
   group, each with its baselines' flip rates; faithfulness; correlations; the intermediate
   node. :func:`study_metrics` sums them over a study.

The report is a JSON-ready dict, floats rounded to 6 significant digits
(:mod:`pipeline.analysis.readouts`); :mod:`pipeline.analysis.report` writes it as files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.analysis.circuit import Circuit, read_circuit
from pipeline.analysis.evaluation_spec import EvaluationSpec, PromptContext
from pipeline.analysis.experiments import NO_MATCH, ExperimentSetting, run_experiment
from pipeline.analysis.hops import prompt_hop
from pipeline.analysis.options import BASELINES
from pipeline.analysis.readouts import kl_divergence, rounded, token_text, top_tokens
from pipeline.analysis.supernodes import load_supernodes, supernodes_from_config
from pipeline.engine.intervened_forward import InterventionRunner
from pipeline.engine.interventions import ModeArguments
from pipeline.engine.replacement import ReplacementModel
from pipeline.graph.pruned import PrunedGraph

__all__ = ["REPORT_FORMAT", "evaluate", "faithfulness_scores", "study_metrics"]

REPORT_FORMAT = "circuit-pipeline/intervention-report"
REPORT_VERSION = 2


def _corr(a: Sequence[float], b: Sequence[float]) -> float | None:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


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
    setting = ExperimentSetting(model, runner, spec, supernodes, context, item, circuit)
    report["experiments"] = experiments = [run_experiment(setting, exp) for exp in spec.experiments]

    # Phase 5: the intermediate hop, for a two-hop prompt of the bank (its state is the hop, not
    # the answer) with a pruned graph (a raw store has no pruned edges to follow)
    two_hop = any(b["prompt"] == item["prompt"] and b["labels"].get("kind") == "two_hop" for b in context.bank)
    pruned = graph if isinstance(graph, PrunedGraph) and two_hop else None
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
