"""Check a circuit causally: ablate its top features, keep or remove the whole circuit, run the
prompt's named experiments, and write the report (JSON, Markdown, figures).

Steps of :func:`evaluate`:

1. Load: the prompt (given, or the graph's ``prompt`` attribute, checked against its tokens),
   the graph-order feature table (layer, pos, feature, activation), node influence and the
   circuit (the pruned node mask: a :class:`~pipeline.graph.pruning.PrunedGraph`'s, or
   :func:`~pipeline.graph.pruning.prune_graph` of a :class:`~pipeline.graph.store.Graph`), the
   first logit node (the top token) and its read vector, and every feature's direct edge to it.
2. Top-k features by influence: ablate each one alone, in direct-effects mode and with
   iterative patching, and measure the change of the target's de-meaned logit
   ``v · Δ(unembedding input)`` at the last position. Attribution predicts ``-A[logit, f]``
   for a direct-effect ablation (an edge weight is activation × decoder · gradient, so removing
   the whole output vector moves the target by minus the edge). Report both correlations.
3. Faithfulness: four runs with iterative patching — clean, circuit only (every active feature
   outside the circuit set to 0), circuit ablated (its features set to 0), all features
   ablated — with the target's de-meaned logit, the clean top token's probability, the top
   token and KL(clean || run) at the last position. ``faithfulness`` = (circuit only − all
   ablated) / (clean − all ablated) on the de-meaned logit; error vectors stay at their
   clean values (errors="frozen"), so the fully ablated model is "errors + biases + skips".
4. Named experiments (:class:`Experiment`): ``ablate`` (scale the source features, default
   ×0), ``steer`` (set them to ``value`` or scale them by ``source_factor``), ``swap`` (source ×
   ``source_factor`` (default 0), and the target features set to ``target_factor`` × their
   activation on ``donor_prompt``). Target features are written in the donor prompt's
   positions (as its graph / annotations name them) and applied end-aligned: donor position
   ``q`` maps to ``q + n_pos - n_donor`` (the last token to the last token). Top tokens
   before / after, whether the expected tokens came out (``flipped``), and greedy generations
   without and with the intervention (open-ended when ``open_ended``). Source and target
   entries are supernode names, ``[layer, pos, feature]`` triples, or *selectors*
   ``{"pos": P, "layers": [...], "not_on_donor": bool}``: every feature active at position
   ``P`` (negative: from the end) of this prompt (source) or of the donor prompt (target), in
   those layers (all when omitted); ``not_on_donor`` (source only) keeps the features that
   are not active at the end-aligned position of ``donor_prompt`` (the features specific to
   this prompt, e.g. its language's). So a config can say "swap everything active at the
   last position" without naming feature indices of one particular set of transcoders. An
   optional ``group`` labels experiments for the per-group flip rates (``by_group``).
5. Summary: flip rate (experiments with an ``expected_after`` whose top token after the
   intervention is it, and before it ``expected_before`` when given), overall and per
   experiment kind, faithfulness, correlations. :func:`study_metrics` sums them over a study.

:func:`write_report` writes ``report.json`` (sorted keys, floats to 6 significant digits),
``report.md``, ``metrics.json`` (the summary, for ``dvc metrics``) and
``figures/{top_features,faithfulness,experiments}.{png,svg}`` (matplotlib Agg, no timestamps,
fixed SVG hash salt), each atomically. Same inputs on the same machine give the same bytes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from pipeline.analysis.supernodes import Supernode, intervene, load_supernodes, supernodes_from_config
from pipeline.engine.generation import feature_intervention_generate
from pipeline.engine.intervened_forward import InterventionRunner, clean_run
from pipeline.engine.interventions import ERROR_MODES, Scale
from pipeline.graph.pruning import (
    atomic_write_bytes,
    first_logit_feature_row,
    load_pruned_graph,
    prune_graph,
    selected_feature_table,
)

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.engine.replacement import ReplacementModel

__all__ = [
    "EvaluationSpec",
    "Experiment",
    "REPORT_FORMAT",
    "evaluate",
    "render_figures",
    "render_markdown",
    "study_metrics",
    "write_report",
]

REPORT_FORMAT = "circuit-pipeline/intervention-report"
REPORT_VERSION = 1
KINDS = ("ablate", "steer", "swap")
MODES = ("iterative", "constrained", "direct")
FIGURES = ("top_features", "faithfulness", "experiments")


# ------------------------------------------------------------------------------------ spec
@dataclass
class Experiment:
    """One named intervention experiment on the graph's prompt.

    source: supernode names, [layer, pos, feature] triples (this prompt's positions) and/or
    selectors {"pos": P, "layers": [...]} (every feature active there on this prompt)
    target: swap only: the same forms, in ``donor_prompt``'s positions and activations
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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"experiment {d.get('name', '?')!r}: unknown keys {unknown}; known: {sorted(names)}")
        return cls(**{k: _plain(v) for k, v in d.items()})


@dataclass
class EvaluationSpec:
    """What :func:`evaluate` runs (the ``intervention`` config group's schema).

    supernodes: {name: [[layer, pos, feature], ...]} defined in the config (they override
    annotation supernodes of the same name)
    node_threshold / edge_threshold: pruning of a raw Graph (a pruned graph keeps its own)
    faithfulness: run the four faithfulness conditions (False: the report's ``faithfulness``
    section is None)
    """

    top_k: int = 10
    experiments: list[Experiment] = field(default_factory=list)
    faithfulness: bool = True
    supernodes: dict = field(default_factory=dict)
    freeze_attention: bool = True
    errors: str = "frozen"
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
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"intervention spec: unknown keys {unknown}; known: {sorted(names)}")
        d = {k: _plain(v) for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(v: Any) -> Any:
    """Config values (OmegaConf containers, tuples) as plain dicts / lists."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig":
        return [_plain(x) for x in v]
    return v


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
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


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


def _load_graph(graph):
    if isinstance(graph, (str, os.PathLike)):
        path = Path(graph)
        if path.is_file():
            return load_pruned_graph(path)
        from pipeline.graph.store import Graph

        return Graph.open(path)
    return graph


@dataclass
class _Circuit:
    """Graph-order features and what the graph says about them."""

    features: np.ndarray  # (n_features, 3) layer, pos, feature
    activations: np.ndarray  # (n_features,)
    influence: np.ndarray  # (n_features,)
    in_circuit: np.ndarray  # (n_features,) bool
    edge_to_target: np.ndarray  # (n_features,) A[first logit, feature]
    target_token: int
    target_vector: Tensor  # (d_model,)
    tokens: np.ndarray
    prompt: str | None
    pruning: dict


def _full_row(edges, feats: np.ndarray, n_f: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The first logit's edges from every feature, and its read vector, from the unpruned store."""
    efeats, _ = selected_feature_table(edges)
    if efeats.shape != feats.shape or not np.array_equal(efeats, feats):
        raise ValueError(
            "edges: the graph store does not hold the pruned graph's features (same prompt, model and attribution run?)"
        )
    return first_logit_feature_row(edges, n_f)


def _circuit(model, graph, spec: EvaluationSpec, edges=None) -> _Circuit:
    feats, acts = selected_feature_table(graph)
    n_f = len(feats)
    if hasattr(graph, "result") and edges is not None:  # pruned circuit, full attribution row
        result = graph.result
        edge, vector = _full_row(edges, np.asarray(feats, np.int64).reshape(-1, 3), n_f)
    elif getattr(graph, "target_feature_edges", None) is not None:  # full row saved by prune
        result = graph.result
        edge = np.asarray(graph.target_feature_edges, np.float64)
        if edge.shape != (n_f,):
            raise ValueError(f"the pruned graph's target_feature_edges has shape {edge.shape}, expected ({n_f},)")
        vector = graph.target_vector
    elif hasattr(graph, "result"):  # a pruned-graph artifact without it: its kept edges only
        result = graph.result
        logit0 = result.n_nodes - result.n_logits
        row = result.edge_weights.getrow(logit0).tocoo()
        edge = np.zeros(n_f)
        sel = row.col < n_f
        edge[row.col[sel]] = row.data[sel]
        vector = None
    else:
        result = prune_graph(graph, spec.node_threshold, spec.edge_threshold)
        edge, vector = first_logit_feature_row(graph, n_f)
    if graph.n_logits == 0:
        raise ValueError("the graph has no logit nodes: nothing to measure interventions against")
    token = int(graph.logit_tokens[0])
    W_U = model.W_U
    if vector is not None:
        vector = torch.as_tensor(vector)
    else:
        if token < 0:
            raise ValueError(
                "the graph's first logit target is not a token and the graph stores no "
                "logit vectors: evaluate the unpruned graph store instead"
            )
        vector = W_U[:, token] - W_U.mean(-1)
    return _Circuit(
        features=np.asarray(feats, np.int64).reshape(-1, 3),
        activations=np.asarray(acts, np.float64),
        influence=np.asarray(result.node_influence[:n_f], np.float64),
        in_circuit=np.asarray(result.node_mask[:n_f], bool),
        edge_to_target=edge.astype(np.float64),
        target_token=token,
        target_vector=vector.to(dtype=model.dtype, device=W_U.device),
        tokens=np.asarray(graph.input_tokens, np.int64),
        prompt=(getattr(graph, "attrs", {}) or {}).get("prompt"),
        pruning={
            "node_threshold": _r(result.node_threshold),
            "edge_threshold": _r(result.edge_threshold),
            "replacement_score": _r(result.replacement_score),
            "completeness_score": _r(result.completeness_score),
        },
    )


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
    attribution edges. Not needed for a pruned graph saved from a store (it carries that row,
    ``target_feature_edges``); otherwise a pruned graph has only its kept edges, and a feature
    whose edge to the target was pruned would be predicted 0.
    """
    spec = spec if isinstance(spec, EvaluationSpec) else EvaluationSpec.from_dict(spec)
    graph = _load_graph(graph)
    c = _circuit(model, graph, spec, None if edges is None else _load_graph(edges))

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
    common = dict(freeze_attention=spec.freeze_attention, errors=spec.errors)
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
        "pruning": c.pruning,
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
    groups = sorted({e.get("group") for e in experiments} - {None})
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


def _faithfulness(model, runner: InterventionRunner, c: _Circuit, target_of, common) -> dict:
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
            out.append(tuple(int(v) for v in item))
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
    mode = dict(freeze_attention=spec.freeze_attention, errors=spec.errors)
    if exp.mode == "direct":
        mode["direct_effects"] = True
    elif exp.mode == "constrained":
        mode["constrained_layers"] = list(exp.constrained_layers)
    res = runner.run(ivs, **mode)
    clean = runner.clean
    before = _top_tokens(model, clean.logits[-1], spec.n_top_tokens)
    after = _top_tokens(model, res.logits[-1], spec.n_top_tokens)
    ok_before = _matches(before[0]["token"], exp.expected_before)
    ok_after = _matches(after[0]["token"], exp.expected_after)
    flipped = None if ok_after is None else bool(ok_after and ok_before is not False)
    out = {
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


# ------------------------------------------------------------------------------------ markdown
def _md_cell(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return lines


def _quote(s: str | None) -> str:
    return "–" if s is None else "`" + s.replace("`", "'") + "`"


def _md_faithfulness(f: Mapping[str, Any]) -> list[str]:
    L = [f"{f['n_circuit_features']} circuit features of {f['n_active_features']} active features.", ""]
    L += _md_table(
        ["run", "features ablated", "de-meaned target logit", "p(clean top)", "top token", "KL from clean"],
        [
            [name, c["n_ablated"], c["demeaned_logit"], c["prob_clean_top"], _quote(c["top_token"]), c["kl_from_clean"]]
            for name, c in f["conditions"].items()
        ],
    )
    L += [
        "",
        f"Faithfulness (circuit only vs all ablated, on the target logit): {_md_cell(f['faithfulness'])}; "
        f"effect of ablating the circuit: {_md_cell(f['circuit_ablation_effect'])}.",
        "",
        "![faithfulness](figures/faithfulness.png)",
        "",
    ]
    return L


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown (figures linked from ``figures/``)."""
    L: list[str] = []
    prompt = report["prompt"] if report["prompt"] is not None else "".join(report["tokens"])
    L += [f"# Intervention report: {_quote(prompt)}", ""]
    t = report["target"]
    L += [
        f"Model `{report['model']}`, transcoders: {report['transcoders']['kind']}. Target: the top "
        f"token {_quote(t['token'])} (id {t['id']}), de-meaned logit {_md_cell(t['demeaned_logit'])}. "
        f"Iterative runs: attention {'frozen' if report['spec']['freeze_attention'] else 'free'}, "
        f"error vectors {report['spec']['errors']}.",
        "",
    ]
    s = report["summary"]
    L += ["## Summary", ""]
    L += _md_table(
        ["metric", "value"],
        [
            ["experiments", s["n_experiments"]],
            ["experiments with an expected flip", s["n_checked"]],
            ["flipped as expected", s["n_flipped"]],
            ["flip rate", s["flip_rate"]],
            *[
                [f"flip rate, {kind} ({k['n_flipped']}/{k['n_checked']})", k["flip_rate"]]
                for kind, k in s.get("by_kind", {}).items()
            ],
            *[
                [f"flip rate, group {g} ({k['n_flipped']}/{k['n_checked']})", k["flip_rate"]]
                for g, k in s.get("by_group", {}).items()
            ],
            ["faithfulness (circuit only)", s["faithfulness"]],
            ["circuit ablation effect", s["circuit_ablation_effect"]],
            ["correlation, predicted vs direct", s["correlation_direct"]],
            ["correlation, predicted vs iterative", s["correlation_iterative"]],
        ],
    )
    L += ["", "## Clean run", ""]
    L += _md_table(
        ["rank", "token", "prob", "logit"],
        [[r["rank"], _quote(r["token"]), r["prob"], r["logit"]] for r in report["clean"]["top_tokens"]],
    )
    tf = report["top_features"]
    L += [
        "",
        "## Top features by influence: ablation vs attribution",
        "",
        "Change of the target's de-meaned logit when each feature is set to 0 alone. "
        "*Predicted* is minus its attribution edge to the target (exact for direct effects).",
        "",
    ]
    L += _md_table(
        [
            "node",
            "layer",
            "pos",
            "token",
            "feature",
            "activation",
            "influence",
            "circuit",
            "predicted",
            "direct",
            "iterative",
        ],
        [
            [
                r["node"],
                r["layer"],
                r["pos"],
                _quote(r["token"]),
                r["feature"],
                r["activation"],
                r["influence"],
                r["in_circuit"],
                r["predicted"],
                r["direct"],
                r["iterative"],
            ]
            for r in tf["rows"]
        ],
    )
    L += [
        "",
        f"Correlation with the prediction: direct effects {_md_cell(tf['correlation_direct'])}, "
        f"iterative {_md_cell(tf['correlation_iterative'])}; largest direct-effect error "
        f"{_md_cell(tf['max_abs_error_direct'])}.",
        "",
        "![top features](figures/top_features.png)",
        "",
    ]
    f = report["faithfulness"]
    L += ["## Faithfulness", ""]
    if f is None:
        L += ["Not run (intervention.faithfulness is false).", ""]
    else:
        L += _md_faithfulness(f)
    L += ["## Experiments", ""]
    if not report["experiments"]:
        L += ["No experiments configured.", ""]
    for e in report["experiments"]:
        L += [
            f"### {e['name']} ({e['kind']}, {e['mode']})",
            "",
            f"{e['n_source_features']} source features, {e['n_interventions']} interventions. "
            f"Expected {_quote(e['expected_before'])} → {_quote(e['expected_after'])}: "
            f"before {_md_cell(e['before_ok'])}, after {_md_cell(e['after_ok'])}, "
            f"**flipped: {_md_cell(e['flipped'])}**. KL from clean {_md_cell(e['kl_from_clean'])}.",
            "",
        ]
        if e["n_target_inactive_on_donor"]:
            L += [f"{e['n_target_inactive_on_donor']} target features are inactive on the donor prompt.", ""]
        rows = []
        for b, a in zip(e["before"], e["after"]):
            rows.append([b["rank"], _quote(b["token"]), b["prob"], _quote(a["token"]), a["prob"]])
        L += _md_table(["rank", "before", "p", "after", "p"], rows)
        if e["generation"]:
            g = e["generation"]
            L += [
                "",
                f"Generation ({g['max_new_tokens']} tokens): clean {_quote(g['clean'])}; "
                f"steered {_quote(g['steered'])}.",
            ]
        L += [""]
    L += ["![experiments](figures/experiments.png)", ""]
    return "\n".join(L)


# ------------------------------------------------------------------------------------ figures
_RC = {"svg.hashsalt": "circuit-pipeline", "font.size": 9, "axes.titlesize": 10, "path.simplify": True}


def _save(fig, formats: Sequence[str] = ("png", "svg")) -> dict[str, bytes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    out = {}
    for fmt, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
        if fmt not in formats:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=100, metadata=meta)
        out[fmt] = buf.getvalue()
    return out


def _fig_top_features(report):
    from matplotlib.figure import Figure

    rows = report["top_features"]["rows"]
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    pred = [r["predicted"] for r in rows]
    for key, marker, label in (("direct", "o", "direct effects"), ("iterative", "x", "iterative")):
        ax.scatter(pred, [r[key] for r in rows], marker=marker, label=label)
    vals = [v for r in rows for v in (r["predicted"], r["direct"], r["iterative"]) if v is not None]
    if vals:
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.05 or 1.0
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", linewidth=0.8, label="y = x")
    ax.set_xlabel("predicted change (−edge weight)")
    ax.set_ylabel("measured change of the de-meaned logit")
    ax.set_title(f"Top {len(rows)} features by influence, ablated")
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def _fig_faithfulness(report):
    from matplotlib.figure import Figure

    conds = report["faithfulness"]["conditions"]
    names = list(conds)
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    vals = [conds[n]["demeaned_logit"] or 0.0 for n in names]
    ax.bar(range(len(names)), vals, color=["#4c72b0", "#55a868", "#c44e52", "#8c8c8c"][: len(names)])
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names])
    ax.set_ylabel("de-meaned target logit")
    ax.set_title(f"Faithfulness {_md_cell(report['faithfulness']['faithfulness'])}")
    ax.axhline(0, color="black", linewidth=0.6)
    fig.tight_layout()
    return fig


def _fig_experiments(report):
    from matplotlib.figure import Figure

    exps = report["experiments"]
    n = max(len(exps), 1)
    fig = Figure(figsize=(8, 2.4 * n))
    if not exps:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no experiments configured", ha="center", va="center")
        ax.set_axis_off()
        return fig
    for i, e in enumerate(exps):
        for j, (key, title) in enumerate((("before", "before"), ("after", "after"))):
            ax = fig.add_subplot(n, 2, 2 * i + j + 1)
            toks = e[key][::-1]
            ax.barh(range(len(toks)), [t["prob"] or 0.0 for t in toks], color="#4c72b0" if j == 0 else "#c44e52")
            ax.set_yticks(range(len(toks)), [repr(t["token"]) for t in toks])
            ax.set_xlim(0, 1)
            ax.set_title(f"{e['name']}\n{title}" + (f" (flipped: {_md_cell(e['flipped'])})" if j else ""), fontsize=8)
    fig.tight_layout()
    return fig


def render_figures(report: Mapping[str, Any], formats: Sequence[str] = ("png", "svg")) -> dict[str, bytes]:
    """``{"top_features.png": bytes, "top_features.svg": ..., ...}`` for every figure, in
    ``formats`` (png and/or svg)."""
    bad = sorted(set(formats) - {"png", "svg"})
    if bad:
        raise ValueError(f"figure formats are png and svg, got {bad}")
    import matplotlib

    out: dict[str, bytes] = {}
    with matplotlib.rc_context(_RC):
        for name, make in (
            ("top_features", _fig_top_features),
            ("faithfulness", _fig_faithfulness),
            ("experiments", _fig_experiments),
        ):
            if name == "faithfulness" and report["faithfulness"] is None:
                continue
            for fmt, data in _save(make(report), formats).items():
                out[f"{name}.{fmt}"] = data
    return out


# ------------------------------------------------------------------------------------ write
def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_report(
    report: Mapping[str, Any], out_dir: str | os.PathLike, figure_formats: Sequence[str] = ("png", "svg")
) -> dict[str, Path]:
    """Write report.json, report.md, metrics.json and figures/* (``figure_formats``) under
    ``out_dir``, each atomically; returns {name: path}."""
    out = Path(out_dir)
    files: dict[str, bytes] = {
        "report.json": _json_bytes(report),
        "report.md": render_markdown(report).encode("utf-8"),
        "metrics.json": _json_bytes(report["summary"]),
    }
    for name, data in render_figures(report, figure_formats).items():
        files[f"figures/{name}"] = data
    paths = {}
    for name, data in files.items():
        path = out / name
        atomic_write_bytes(path, data)
        paths[name] = path
    return paths
