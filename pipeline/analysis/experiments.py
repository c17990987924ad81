"""Run one named experiment (:class:`~pipeline.analysis.evaluation_spec.Experiment`) on the
graph's prompt, with its baselines (spec: docs/interventions.md#the-intervene-stage).

:func:`run_experiment` resolves the experiment's features (supernode names, ``[layer, pos,
feature]`` triples, selectors, selection rules of :mod:`pipeline.analysis.selection`: a
source's on this prompt and its circuit, a swap's target on the donor), builds the
interventions, runs them in the experiment's mode and records the features chosen, the top
tokens before and after, whether it flipped (:func:`is_flip`; for an ``expected_language``, the
:func:`language_share` of the greedy continuation) and the generations without and with it. A
rule that selects nothing gives :data:`NO_MATCH`: reported, not run. Beside an experiment with
an expected flip run its baselines: random feature sets of the same shape, the swap from
same-state donors, the same interventions at a wrong position. They live here because each is
the experiment rerun through the same steps on other features, donors or positions.
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

from pipeline.analysis.evaluation_spec import EvaluationSpec, Experiment, PromptContext
from pipeline.analysis.readouts import kl_divergence, rounded, token_text, top_tokens
from pipeline.analysis.selection import Chosen, Rule, is_rule, moved, random_like, select
from pipeline.analysis.selectivity import role_position
from pipeline.analysis.supernodes import Supernode, intervene
from pipeline.engine.generation import GenerationResult, feature_intervention_generate
from pipeline.engine.intervened_forward import CleanRun, InterventionRunner, clean_run
from pipeline.engine.interventions import Scale

__all__ = ["NO_MATCH", "ExperimentSetting", "is_flip", "language_share", "run_experiment"]

#: the status of an experiment whose entries select no feature (or a swap without targets)
NO_MATCH = "no feature matched"


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
class ExperimentSetting:
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
        """The clean run of a donor's text, computed once."""
        if text not in self.runs:
            self.runs[text] = clean_run(self.model, text)
        return self.runs[text]

    def clean_generation(self, n_new: int) -> GenerationResult:
        """This prompt's clean greedy continuation of ``n_new`` tokens, computed once."""
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


def _donor(s: ExperimentSetting, exp: Experiment) -> tuple[Mapping[str, Any] | None, CleanRun | None]:
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


def _source(
    s: ExperimentSetting, exp: Experiment, donor_item: Mapping[str, Any] | None, donor: CleanRun | None
) -> list[Chosen]:
    """The source features, on this prompt."""
    what = f"experiment {exp.name!r} source"
    clean = s.runner.clean
    table = s.context.selectivity
    out: list[Chosen] = []
    for entry in exp.source:
        if is_rule(entry):
            rule = Rule.parse(entry, what)
            out += select(
                rule, s.item, clean.tokens, clean.activations, s.model.tokenizer, table, s.circuit, what, donor_item
            )[0]
            continue
        donor_acts = None if donor is None else donor.activations
        for layer, pos, feat in _features_of([entry], s.supernodes, what, clean.activations, donor_acts):
            act = float(clean.activations[layer, pos, feat])
            out.append(Chosen(layer, pos, feat, act, _describe(entry), at=pos))
    return out


def _target(
    s: ExperimentSetting,
    exp: Experiment,
    donor_item: Mapping[str, Any],
    donor: CleanRun,
    counterpart: Mapping[str, Any] | None = None,
) -> list[Chosen]:
    """A swap's target features, picked on the donor, each with the position of this prompt it
    is written at: a rule's at this prompt's position of the same role, the others end-aligned.
    A contrast rule contrasts the donor with ``counterpart`` (this prompt unless given)."""
    what = f"experiment {exp.name!r} target"
    here = s.runner.clean
    shift = here.n_pos - donor.n_pos
    out: list[Chosen] = []
    for entry in exp.target:
        if is_rule(entry):
            rule = Rule.parse(entry, what)
            chosen, _ = select(
                rule,
                donor_item,
                donor.tokens,
                donor.activations,
                s.model.tokenizer,
                s.context.selectivity,
                None,
                what,
                s.item if counterpart is None else counterpart,
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


def _n_new(s: ExperimentSetting, exp: Experiment) -> int:
    """Tokens to generate for ``exp`` (0: none), within the model's context."""
    n_new = s.spec.max_new_tokens if exp.max_new_tokens is None else exp.max_new_tokens
    return min(n_new, s.model.n_ctx - s.runner.clean.n_pos + 1) if n_new else 0


def _completion_words(model, generation: GenerationResult) -> list[str]:
    return [token_text(model, t) for t in generation.tokens[generation.n_prompt :].tolist()]


def _outcome(s: ExperimentSetting, exp: Experiment, ivs: list[tuple], mode: dict, *, full: bool) -> dict:
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


def _rows(s: ExperimentSetting, chosen: Sequence[Chosen]) -> list[dict]:
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


def run_experiment(s: ExperimentSetting, exp: Experiment) -> dict:
    """The report's record of ``exp`` on the setting's prompt (module docstring), its baselines
    included."""
    clean = s.runner.clean
    donor_item, donor = _donor(s, exp)
    src = _source(s, exp, donor_item, donor)
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
def _baselines(s: ExperimentSetting, exp: Experiment, src, tgt, donor_item, donor, mode) -> dict:
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


def _random_baseline(s: ExperimentSetting, exp: Experiment, src, tgt, donor: CleanRun | None, mode) -> dict:
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


def _same_state_baseline(s: ExperimentSetting, exp: Experiment, src, donor_item, mode) -> dict:
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
            # The donor's features are picked as the experiment picks its counterfactual's: a
            # contrast rule contrasts them with the counterfactual (Houston's Texas-not-California
            # features), not with this prompt, which shares their value and would leave none.
            tgt = _target(s, exp, b, s.clean_run_of(b["prompt"]), counterpart=donor_item)
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
                "kept": _matches(o["after"][0]["token"], exp.expected_before),
            }
        )
    runs = [d for d in out["donors"] if "flipped" in d]
    n_kept = sum(bool(d["kept"]) for d in runs)
    out.update(n_runs=len(runs), n_flipped=n_flipped, flip_rate=_rate(n_flipped, len(runs)))
    out.update(n_kept=n_kept, kept_rate=_rate(n_kept, len(runs)))
    if not runs:
        out["note"] = f"no prompt of the bank shares this prompt's {label} ({value}) in the donor's language"
    return out


def _wrong_position_baseline(s: ExperimentSetting, exp: Experiment, src, tgt, mode) -> dict:
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
