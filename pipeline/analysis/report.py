"""The intervention report as files: Markdown, figures and JSON.

:func:`write_report` writes what :func:`~pipeline.analysis.evaluation.evaluate` returns as
``report.json`` (sorted keys; its floats are already rounded to 6 significant digits),
``report.md``, ``metrics.json`` (the summary, for ``dvc metrics``) and
``figures/{top_features,faithfulness,experiments,baselines}.{png,svg}``, each atomically. The same
report gives the same bytes on one machine (figures: see :func:`pipeline.analysis.figures.figure_bytes`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.typing import RcKeyType

from pipeline._io import atomic_write_bytes, json_bytes
from pipeline.analysis.figures import figure_bytes

__all__ = ["render_figures", "render_markdown", "write_report"]


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


_ERRORS_MEANING = {
    "recomputed": "the model's own MLPs on the live input, as circuit-tracer computes interventions",
    "frozen": "held at their clean values: the local replacement model",
}


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
        f"error vectors {report['spec']['errors']} ({_ERRORS_MEANING.get(report['spec']['errors'], '?')}).",
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
            ["rules that selected no feature", s.get("n_no_match", 0)],
            ["flip rate", s["flip_rate"]],
            ["faithfulness (circuit only)", s["faithfulness"]],
            ["circuit ablation effect", s["circuit_ablation_effect"]],
            ["correlation, predicted vs direct", s["correlation_direct"]],
            ["correlation, predicted vs iterative", s["correlation_iterative"]],
        ],
    )
    L += ["", "### Flip rates and their baselines", ""]
    L += [
        "Flipped: the top token changed from the clean one to the expected one (a steer with an "
        "expected language: the continuation switched to it). Each baseline: flips / runs "
        "(rate); random: feature sets of the same shape, same-state: the swap from donors of "
        "this prompt's own state, wrong position: every feature written "
        f"{report['spec'].get('wrong_offset', '?')} token(s) away.",
        "",
    ]
    L += _md_table(
        ["experiments", "flipped", *_BASELINE_NAMES.values()],
        [
            ["all", _md_rate(s["n_flipped"], s["n_checked"], s["flip_rate"]), *_md_baselines(s)],
            *[
                [f"kind {kind}", _md_rate(k["n_flipped"], k["n_checked"], k["flip_rate"]), *_md_baselines(k)]
                for kind, k in s.get("by_kind", {}).items()
            ],
            *[
                [f"group {g}", _md_rate(k["n_flipped"], k["n_checked"], k["flip_rate"]), *_md_baselines(k)]
                for g, k in s.get("by_group", {}).items()
            ],
        ],
    )
    L += ["", "![baselines](figures/baselines.png)", ""]
    L += ["## Clean run", ""]
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
        L += _md_experiment(e)
    L += ["![experiments](figures/experiments.png)", ""]
    return "\n".join(L)


_BASELINE_NAMES = {"random": "random features", "same_state": "same-state donors", "wrong_position": "wrong position"}
#: selected features listed per side in report.md (report.json has all of them)
_MAX_FEATURE_ROWS = 20


def _md_rate(n_flipped: int, n: int, rate: float | None) -> str:
    return f"{n_flipped}/{n} ({_md_cell(rate)})" if n else "–"


def _md_baselines(counts: Mapping[str, Any]) -> list[str]:
    b = counts.get("baselines", {})
    return [_md_rate(b[n]["n_flipped"], b[n]["n_runs"], b[n]["flip_rate"]) if n in b else "–" for n in _BASELINE_NAMES]


def _md_experiment(e: Mapping[str, Any]) -> list[str]:
    expected = (
        f"continuation in {_quote(e['expected_language'])}"
        if e.get("expected_language")
        else f"{_quote(e['expected_before'])} → {_quote(e['expected_after'])}"
    )
    donor = e.get("donor")
    L = [f"### {e['name']} ({e['kind']}, {e['mode']})", ""]
    mode = f", layers {e['constrained_layers']}" if e.get("constrained_layers") else ""
    L += [
        f"Group {_md_cell(e['group'])}{mode}; donor {_quote(donor['prompt']) if donor else '–'}. "
        f"{e['n_source_features']} source and {e['n_target_features']} target features, "
        f"{e['n_interventions']} interventions. Expected {expected}.",
        "",
    ]
    if e["status"] != "ran":
        L += [f"**{e['status']}**: not run, not a flip.", ""]
        L += _md_selected(e)
        return L
    L += [
        f"Before {_md_cell(e['before_ok'])}, after {_md_cell(e['after_ok'])}, **flipped: {_md_cell(e['flipped'])}**. "
        f"KL from clean {_md_cell(e['kl_from_clean'])}.",
        "",
    ]
    if e["n_target_inactive_on_donor"]:
        L += [f"{e['n_target_inactive_on_donor']} target features are inactive on the donor prompt.", ""]
    rows = [
        [b["rank"], _quote(b["token"]), b["prob"], _quote(a["token"]), a["prob"]]
        for b, a in zip(e["before"], e["after"])
    ]
    L += _md_table(["rank", "before", "p", "after", "p"], rows)
    if e["generation"]:
        g = e["generation"]
        L += [
            "",
            f"Generation ({g['max_new_tokens']} tokens): clean {_quote(g['clean'])}; steered {_quote(g['steered'])}.",
        ]
    if e.get("language"):
        lang = e["language"]
        L += [
            "",
            f"Share of language-marked generated tokens in {_quote(lang['expected'])}: clean "
            f"{_md_cell(lang['clean_share'])}, steered {_md_cell(lang['steered_share'])}.",
        ]
    L += [""]
    L += _md_selected(e)
    if e.get("baselines"):
        L += ["Baselines:", ""]
        L += _md_table(
            ["baseline", "flipped / runs", "detail"], [_md_baseline(n, b) for n, b in e["baselines"].items()]
        )
        L += [""]
    return L


def _md_selected(e: Mapping[str, Any]) -> list[str]:
    L: list[str] = []
    for side in ("source", "target"):
        rows = e["selected"][side]
        if not rows:
            continue
        more = len(rows) - _MAX_FEATURE_ROWS
        L += [f"Selected {side} features{f' (first {_MAX_FEATURE_ROWS} of {len(rows)})' if more > 0 else ''}:", ""]
        L += _md_table(
            ["layer", "read at", "written at", "token", "feature", "activation", "rule"],
            [
                [
                    r["layer"],
                    "any" if r["pos"] is None else r["pos"],
                    "every non-BOS" if r["at"] is None else r["at"],
                    _quote(r["token"]),
                    r["feature"],
                    r["activation"],
                    r["rule"],
                ]
                for r in rows[:_MAX_FEATURE_ROWS]
            ],
        )
        L += [""]
    return L


def _md_baseline(name: str, b: Mapping[str, Any]) -> list[Any]:
    if name == "random":
        size = b["size"]
        detail = f"{b['n_runs']} draws (seed {b['seed']}) of {size['source']} source"
        detail += f" + {size['target']} target features" if size["target"] else " features"
        if b.get("mean_language_share") is not None:
            detail += f"; mean language share {_md_cell(b['mean_language_share'])}"
    elif name == "same_state":
        tops = ", ".join(
            f"{d['anchor'] or d['prompt']}: {_quote(d['top_token'])}" for d in b["donors"] if "flipped" in d
        )
        kept = f"; kept the answer {b['n_kept']}/{b['n_runs']}" if b.get("n_kept") is not None else ""
        detail = b.get("note") or f"{b['label']}={b['value']} donors: {tops}{kept}"
    else:
        moves = ", ".join(f"{m['from']}→{m['to']} ({_quote(m['token'])})" for m in b.get("moves", []))
        detail = b.get("note") or f"moved {moves}; top {_quote(b.get('top_token'))}"
    return [_BASELINE_NAMES.get(name, name), _md_rate(b["n_flipped"], b["n_runs"], b["flip_rate"]), detail]


# ------------------------------------------------------------------------------------ figures
# the report's own look (default font family and SVG text as text), kept for byte-identical reports
_RC: dict[RcKeyType, Any] = {
    "svg.hashsalt": "circuit-pipeline",
    "font.size": 9,
    "axes.titlesize": 10,
    "path.simplify": True,
}


def _fig_top_features(report):
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
            if e[key] is None:  # not run: its rules selected nothing
                ax.text(0.5, 0.5, e["status"], ha="center", va="center", fontsize=8)
                ax.set_axis_off()
                ax.set_title(f"{e['name']}\n{title}", fontsize=8)
                continue
            toks = e[key][::-1]
            ax.barh(range(len(toks)), [t["prob"] or 0.0 for t in toks], color="#4c72b0" if j == 0 else "#c44e52")
            ax.set_yticks(range(len(toks)), [repr(t["token"]) for t in toks])
            ax.set_xlim(0, 1)
            ax.set_title(f"{e['name']}\n{title}" + (f" (flipped: {_md_cell(e['flipped'])})" if j else ""), fontsize=8)
    fig.tight_layout()
    return fig


def _fig_baselines(report):
    """Per experiment with an expected flip: whether it flipped, beside its baselines' flip rates."""
    exps = [e for e in report["experiments"] if e["flipped"] is not None]
    names = ["experiment", *report["spec"].get("baselines", [])]
    fig = Figure(figsize=(8, 0.5 + 0.45 * max(len(exps), 1) * (len(names) / 2 + 0.5)))
    ax = fig.add_subplot()
    if not exps:
        ax.text(0.5, 0.5, "no experiment with an expected flip", ha="center", va="center")
        ax.set_axis_off()
        return fig
    height = 0.8 / len(names)
    colours = ["#4c72b0", "#8c8c8c", "#55a868", "#dd8452"]
    for j, name in enumerate(names):
        rates = [
            float(bool(e["flipped"])) if name == "experiment" else (e["baselines"].get(name) or {}).get("flip_rate")
            for e in exps
        ]
        ys = [i + j * height for i in range(len(exps))]
        ax.barh(
            ys, [r or 0.0 for r in rates], height=height, color=colours[j % len(colours)], label=name.replace("_", " ")
        )
        for y, r, e in zip(ys, rates, exps):  # the numbers, so that a zero or a missing run shows
            text = e["status"] if e["status"] != "ran" and j == 0 else ("not run" if r is None else f"{r:.2f}")
            ax.text((r or 0.0) + 0.01, y, text, va="center", fontsize=6)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(exps))], [e["name"] for e in exps], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("flipped (experiment) / flip rate (baselines)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def render_figures(report: Mapping[str, Any], formats: Sequence[str] = ("png", "svg")) -> dict[str, bytes]:
    """``{"top_features.png": bytes, "top_features.svg": ..., ...}`` for every figure, in
    ``formats`` (png and/or svg)."""
    out: dict[str, bytes] = {}
    with matplotlib.rc_context(_RC):
        for name, make in (
            ("top_features", _fig_top_features),
            ("faithfulness", _fig_faithfulness),
            ("experiments", _fig_experiments),
            ("baselines", _fig_baselines),
        ):
            if name == "faithfulness" and report["faithfulness"] is None:
                continue
            for fmt, data in figure_bytes(make(report), formats, dpi=100).items():
                out[f"{name}.{fmt}"] = data
    return out


# ------------------------------------------------------------------------------------ write
def write_report(
    report: Mapping[str, Any], out_dir: str | os.PathLike, figure_formats: Sequence[str] = ("png", "svg")
) -> dict[str, Path]:
    """Write report.json, report.md, metrics.json and figures/* (``figure_formats``) under
    ``out_dir``, each atomically; returns {name: path}."""
    out = Path(out_dir)
    files: dict[str, bytes] = {
        "report.json": json_bytes(report),
        "report.md": render_markdown(report).encode("utf-8"),
        "metrics.json": json_bytes(report["summary"]),
    }
    for name, data in render_figures(report, figure_formats).items():
        files[f"figures/{name}"] = data
    return {name: atomic_write_bytes(out / name, data) for name, data in files.items()}
