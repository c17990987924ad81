"""Cross-prompt aggregation of a study: recurring features and a union "task circuit".

Input: a study folder (read by :mod:`pipeline.analysis.study_files`). Every finished prompt
contributes its pruned graph, read one at a time: memory holds the running tables, never two
graphs. Details in docs/pipeline.md.

1. Align positions by template slot: ``align="end"`` gives position ``p`` of an ``n``-token
   prompt the slot ``p - n`` (-1: the last token, where the answer is read), ``"start"`` the
   slot ``p``. A slot's label is its token when all prompts share it, else ``{key}`` when the
   token is the value of every prompt's ``key=value`` tag (``{city}``), else ``*``.
2. Recurring features, per (layer, feature) and per (layer, feature, slot): in how many
   prompts' pruned graphs they are kept, their influence on the logits (summed over kept
   positions; mean over those prompts, and max), mean activation, the slots they sit at.
3. The task circuit: the union of the pruned graphs in the aligned frame. Feature and error
   nodes are kept when they appear in at least ``min_prompts`` prompts; an edge's weight is
   its mean over all prompts (0 where absent). Graph JSON as :mod:`pipeline.analysis.export`
   writes it, plus ``n_prompts`` and ``prompt_share`` on nodes and links; the slot labels are
   ``metadata.prompt_tokens``.
4. Figures, from ``aggregate.json`` alone (:mod:`pipeline.analysis.aggregate_figures`).

Outputs of :func:`aggregate_study` in ``out``::

    aggregate.json         tables (features, slot features, slots, prompts, heatmap data)
    features.csv           the recurring features table
    graph/<slug>.json      the task circuit (+ graph-metadata.json): `circuit-pipeline serve out/graph`
    figures/heatmap.{png,svg}, figures/top_features.{png,svg}   (or in ``figures_dir``)
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline._io import atomic_write_bytes, json_bytes, read_json
from pipeline.analysis.aggregate_figures import write_figures
from pipeline.analysis.export import (
    GRAPH_METADATA_FILE,
    SCHEMA_VERSION,
    cantor_pairing,
    error_node_id,
    feature_node_id,
    load_labels,
    logit_node_id,
    node_record,
    token_node_id,
    update_graph_metadata,
)
from pipeline.analysis.study_files import graph_done, load_study
from pipeline.graph.pruned import load_pruned_graph

__all__ = ["AGGREGATE_FORMAT", "PromptGraph", "aggregate_study", "iter_study_graphs"]

AGGREGATE_FORMAT = "circuit-pipeline/aggregate"
ALIGNS = ("end", "start")


@dataclass
class PromptGraph:
    """One finished prompt of a study: its record, its done.json and its pruned graph."""

    id: str
    key: str
    tags: dict[str, str]
    done: dict[str, Any]
    pruned: Any  # pipeline.graph.pruned.PrunedGraph

    @property
    def n_pos(self) -> int:
        return int(self.pruned.n_pos)


def _tag_dict(tags) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in tags or ():
        if "=" in t:
            k, v = t.split("=", 1)
            out.setdefault(k, v)
    return out


def iter_study_graphs(study_dir: str | os.PathLike) -> Iterator[PromptGraph]:
    """The finished prompts of a study (status done or skipped), one pruned graph at a time,
    in the study's order. Prompts sharing a key each yield it (they are the same graph)."""
    doc = load_study(study_dir)
    graphs = Path(doc["graphs_dir"])
    for p in doc["prompts"]:
        if p.get("status") not in ("done", "skipped") or not p.get("key"):
            continue
        key_dir = graphs / p["key"]
        done = graph_done(key_dir)
        if done is None:
            raise FileNotFoundError(f"study prompt {p['id']!r}: graph {key_dir} is not finished (rerun the study)")
        yield PromptGraph(
            p["id"], p["key"], _tag_dict(p.get("tags")), done, load_pruned_graph(key_dir / done["files"]["pruned"])
        )


def _slot(pos: int, n_pos: int, align: str) -> int:
    return pos - n_pos if align == "end" else pos


def _frame_pos(slot: int, frame: int, align: str) -> int:
    return frame + slot if align == "end" else slot


# ----------------------------------------------------------------------------------- accumulate
class _Tables:
    """Running sums over prompts; memory grows with distinct features / nodes / edges only."""

    def __init__(self) -> None:
        self.prompts: list[dict[str, Any]] = []
        # per (layer, feature), (layer, feature, slot), node identity: counts, sums, maxima
        self.feat: defaultdict[tuple[int, int], dict[str, Any]] = defaultdict(
            lambda: {"n": 0, "infl_sum": 0.0, "infl_max": -np.inf, "act_sum": 0.0, "act_n": 0, "slots": Counter()}
        )
        self.slot_feat: defaultdict[tuple[int, int, int], dict[str, Any]] = defaultdict(
            lambda: {"n": 0, "infl_sum": 0.0, "infl_max": -np.inf, "act_sum": 0.0}
        )
        self.nodes: defaultdict[tuple, dict[str, Any]] = defaultdict(
            lambda: {"n": 0, "infl_sum": 0.0, "act_sum": 0.0, "prob_sum": 0.0}
        )
        self.edges: defaultdict[tuple, list[float]] = defaultdict(
            lambda: [0, 0.0]
        )  # (target, source) -> [prompts, weight sum]
        self.slot_tokens: dict[int, list[tuple[int, str, dict[str, str]]]] = defaultdict(list)
        self.logit_text: dict[int, str] = {}
        self.n_layers = 0
        self.max_pos = 0
        self.meta: dict[str, Any] = {}

    def add(self, g: PromptGraph, align: str) -> None:
        pg, r = g.pruned, g.pruned.result
        n_pos, n_layers, n_feat = int(pg.n_pos), int(pg.n_layers), int(r.n_features)
        self.n_layers = max(self.n_layers, n_layers)
        self.max_pos = max(self.max_pos, n_pos)
        n_err = n_layers * n_pos
        info = np.asarray(pg.feature_info, dtype=np.int64).reshape(-1, 3)
        acts = np.asarray(pg.feature_activations, dtype=np.float64)
        infl = np.asarray(r.node_influence, dtype=np.float64)
        mask = np.asarray(r.node_mask, dtype=bool)
        tokens = [int(t) for t in np.asarray(pg.input_tokens).tolist()]
        strings = g.done.get("prompt_tokens") or [f"<{t}>" for t in tokens]
        for pos, (tok, text) in enumerate(zip(tokens, strings)):
            self.slot_tokens[_slot(pos, n_pos, align)].append((tok, str(text), g.tags))
        logit_tokens = [int(t) for t in np.asarray(pg.logit_tokens).tolist()]
        labels = list(g.done.get("logit_labels") or [])
        for i, tok in enumerate(logit_tokens):
            if i < len(labels):
                self.logit_text.setdefault(tok, str(labels[i]))
        probs = np.asarray(pg.logit_probabilities, dtype=np.float64)

        # 2. features of this prompt, per (layer, feature) and per (layer, feature, slot)
        per_feat: dict[tuple[int, int], list[Any]] = defaultdict(lambda: [0.0, -np.inf, set()])  # sum, max, slots
        per_slot: dict[tuple[int, int, int], list[float]] = {}
        kept = np.flatnonzero(mask[:n_feat])
        for i in kept.tolist():
            layer, pos, feat = (int(v) for v in info[i])
            s = _slot(pos, n_pos, align)
            pf = per_feat[(layer, feat)]
            pf[0] += infl[i]
            pf[1] = max(pf[1], acts[i])
            pf[2].add(s)
            ps = per_slot.setdefault((layer, feat, s), [0.0, 0.0])
            ps[0] += infl[i]
            ps[1] = max(ps[1], acts[i])
        for k, (isum, amax, slots) in per_feat.items():
            t = self.feat[k]
            t["n"] += 1
            t["infl_sum"] += isum
            t["infl_max"] = max(t["infl_max"], isum)
            t["act_sum"] += amax
            t["act_n"] += 1
            t["slots"].update(slots)
        for key, (isum, amax) in per_slot.items():
            t = self.slot_feat[key]
            t["n"] += 1
            t["infl_sum"] += isum
            t["infl_max"] = max(t["infl_max"], isum)
            t["act_sum"] += amax

        # 3. union graph: map every kept node of this prompt to its aligned identity
        ident: dict[int, tuple] = {}
        for i in np.flatnonzero(mask).tolist():
            if i < n_feat:
                layer, pos, feat = (int(v) for v in info[i])
                ident[i] = ("feature", layer, feat, _slot(pos, n_pos, align))
            elif i < n_feat + n_err:
                layer, pos = divmod(i - n_feat, n_pos)
                ident[i] = ("error", layer, 0, _slot(pos, n_pos, align))
            elif i < n_feat + n_err + n_pos:
                ident[i] = ("token", 0, 0, _slot(i - n_feat - n_err, n_pos, align))
            else:
                ident[i] = ("logit", 0, logit_tokens[i - n_feat - n_err - n_pos], 0)
        seen: set[tuple] = set()
        for i, node in ident.items():
            if node in seen:  # a feature at one slot twice cannot happen; keep counts per prompt
                continue
            seen.add(node)
            t = self.nodes[node]
            t["n"] += 1
            t["infl_sum"] += infl[i]
            if node[0] == "feature":
                t["act_sum"] += acts[i]
            elif node[0] == "logit":
                t["prob_sum"] += probs[i - n_feat - n_err - n_pos]
        targets, sources, weights = r.kept_edges()
        per_edge: dict[tuple, float] = defaultdict(float)
        for tgt, src, w in zip(
            np.asarray(targets).tolist(), np.asarray(sources).tolist(), np.asarray(weights, dtype=np.float64).tolist()
        ):
            if tgt in ident and src in ident:
                per_edge[(ident[tgt], ident[src])] += w
        for k, w in per_edge.items():
            e = self.edges[k]
            e[0] += 1
            e[1] += w
        self.prompts.append(
            {
                "id": g.id,
                "key": g.key,
                "n_pos": n_pos,
                "kept_features": int(len(kept)),
                "answer_logit": self.logit_text.get(logit_tokens[0]) if logit_tokens else None,
            }
        )
        if not self.meta:
            self.meta = {"pruning": g.done.get("pruning", {}), "json": g.done["files"]["json"], "key": g.key}


def _slot_labels(tables: _Tables) -> dict[int, str]:
    labels = {}
    for slot, entries in sorted(tables.slot_tokens.items()):
        texts = {text for _, text, _ in entries}
        if len(texts) == 1:
            labels[slot] = next(iter(texts)).strip() or repr(next(iter(texts)))
            continue
        label = "*"
        keys = set.intersection(*(set(tags) for _, _, tags in entries)) if entries else set()
        for k in sorted(keys):
            if all(tags[k] == text.strip() for _, text, tags in entries):
                label = "{" + k + "}"
                break
        labels[slot] = label
    return labels


# ------------------------------------------------------------------------------------- labels
def _feature_labels(labels, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """Labels of ``wanted`` (layer, feature) from a dashboards store (path with zarr.json), a
    labels file/mapping (:func:`pipeline.analysis.export.load_labels`), or None."""
    if labels is None:
        return {}
    if isinstance(labels, (str, os.PathLike)) and (Path(labels) / "zarr.json").is_file():
        # dashboards imports torch: only a dashboards store as the labels source pays for it
        from pipeline.analysis.dashboards import Dashboards

        dash = Dashboards.open(labels)
        out = {}
        for layer, feat in wanted:
            try:
                out[(layer, feat)] = dash.label(layer, feat)
            except (ValueError, IndexError, KeyError):
                continue
        return out
    by_id, by_feature = load_labels(labels)
    return {k: by_feature[k] for k in wanted if k in by_feature}


# ------------------------------------------------------------------------------------ aggregate
def _mean(total: float, n: int) -> float:
    return float(total / n) if n else 0.0


def _r(x: float) -> float:
    """Rounded for JSON: stable text, no float noise from summation order."""
    return float(f"{float(x):.6g}")


def _feature_table(tables: _Tables, n_graphs: int, labels: dict) -> list[dict[str, Any]]:
    rows = []
    for (layer, feat), t in tables.feat.items():
        rows.append(
            {
                "layer": layer,
                "feature": feat,
                "n_prompts": t["n"],
                "share": _r(t["n"] / n_graphs),
                "mean_influence": _r(_mean(t["infl_sum"], t["n"])),
                "max_influence": _r(t["infl_max"]),
                "mean_activation": _r(_mean(t["act_sum"], t["act_n"])),
                "slots": {str(s): c for s, c in sorted(t["slots"].items())},
                "label": labels.get((layer, feat), ""),
            }
        )
    rows.sort(key=lambda r: (-r["n_prompts"], -r["mean_influence"], r["layer"], r["feature"]))
    return rows


def _slot_feature_table(tables: _Tables, n_graphs: int, slot_labels: dict[int, str]) -> list[dict[str, Any]]:
    rows = []
    for (layer, feat, slot), t in tables.slot_feat.items():
        rows.append(
            {
                "layer": layer,
                "feature": feat,
                "slot": slot,
                "slot_label": slot_labels.get(slot, "*"),
                "n_prompts": t["n"],
                "share": _r(t["n"] / n_graphs),
                "mean_influence": _r(_mean(t["infl_sum"], t["n"])),
                "max_influence": _r(t["infl_max"]),
                "mean_activation": _r(_mean(t["act_sum"], t["n"])),
            }
        )
    rows.sort(key=lambda r: (-r["n_prompts"], -r["mean_influence"], r["layer"], r["feature"], r["slot"]))
    return rows


def _heatmap(study_dir, top: list[dict[str, Any]], group_by: str | None) -> dict[str, Any]:
    """Second pass: per-prompt influence of the top features (0 where absent). Columns in
    study order, or grouped by the value of the tag ``group_by`` (stable)."""
    index = {(r["layer"], r["feature"]): i for i, r in enumerate(top)}
    prompts, groups, columns = [], [], []
    for g in iter_study_graphs(study_dir):
        r = g.pruned.result
        info = np.asarray(g.pruned.feature_info, dtype=np.int64).reshape(-1, 3)
        infl = np.asarray(r.node_influence, dtype=np.float64)
        col = np.zeros(len(top))
        for i in np.flatnonzero(np.asarray(r.node_mask)[: r.n_features]).tolist():
            j = index.get((int(info[i, 0]), int(info[i, 2])))
            if j is not None:
                col[j] += infl[i]
        prompts.append(g.id)
        groups.append(g.tags.get(group_by, "") if group_by else "")
        columns.append(col)
    order = sorted(range(len(prompts)), key=lambda i: groups[i]) if group_by else list(range(len(prompts)))
    values = np.stack([columns[i] for i in order], axis=1) if columns else np.zeros((len(top), 0))
    return {
        "features": [f"L{r['layer']} F{r['feature']}" for r in top],
        "prompts": [prompts[i] for i in order],
        "group_by": group_by,
        "groups": [groups[i] for i in order],
        "values": [[_r(v) for v in row] for row in values.tolist()],
    }


def _union_graph(
    tables: _Tables,
    n_graphs: int,
    slot_labels: dict[int, str],
    align: str,
    min_prompts: int,
    slug: str,
    name: str,
    labels: dict,
    scan: str,
    transcoder_list: list[str],
) -> dict[str, Any]:
    frame = tables.max_pos
    n_layers = tables.n_layers
    slots = sorted(slot_labels)
    positions = {s: _frame_pos(s, frame, align) for s in slots}
    slot_token: dict[int, int] = {}
    for s, entries in tables.slot_tokens.items():
        counts = Counter(tok for tok, _, _ in entries)
        slot_token[s] = min(counts, key=lambda t: (-counts[t], t))

    def keep(node: tuple) -> bool:
        return node[0] in ("token", "logit") or tables.nodes[node]["n"] >= min_prompts

    order = {"feature": 0, "error": 1, "token": 2, "logit": 3}
    # graph order: features by (layer, position, feature), errors by (layer, position), tokens, logits
    kept_nodes = sorted((n for n in tables.nodes if keep(n)), key=lambda n: (order[n[0]], n[1], n[3], n[2]))
    best_logit = max(
        (n for n in kept_nodes if n[0] == "logit"), key=lambda n: (tables.nodes[n]["prob_sum"], -n[2]), default=None
    )
    docs: dict[tuple, dict[str, Any]] = {}
    for node in kept_nodes:
        kind, layer, b, slot = node
        t = tables.nodes[node]
        extra = {"n_prompts": t["n"], "prompt_share": _r(t["n"] / n_graphs)}
        infl = _r(t["infl_sum"] / n_graphs)
        if kind == "feature":
            pos = positions[slot]
            d = node_record(
                feature_node_id(layer, b, pos),
                cantor_pairing(layer, b),
                layer,
                pos,
                "feature",
                js=f"{layer}_{b}-0",
                influence=infl,
                activation=_r(_mean(t["act_sum"], t["n"])),
                clerp=labels.get((layer, b), ""),
            )
        elif kind == "error":
            pos = positions[slot]
            d = node_record(error_node_id(layer, pos), -1, layer, pos, "error", js=f"{layer}_{pos}-0", influence=infl)
        elif kind == "token":
            pos = positions[slot]
            tok = slot_token[slot]
            d = node_record(
                token_node_id(tok, pos),
                pos,
                "E",
                pos,
                "token",
                js=f"E_{tok}-{pos}",
                influence=infl,
                clerp=slot_labels[slot],
            )
        else:
            prob = _r(t["prob_sum"] / n_graphs)
            text = tables.logit_text.get(b, f"<{b}>")
            d = node_record(
                logit_node_id(n_layers, b, frame),
                b,
                n_layers + 1,
                frame - 1,
                "logit",
                js=f"L_{b}-{frame - 1}",
                token_prob=prob,
                is_target=node == best_logit,
                clerp=f'Output "{text}" (mean p={prob:.3f}, {t["n"]}/{n_graphs} prompts)',
            )
        d.update(extra)
        docs[node] = d
    rank = {n: i for i, n in enumerate(kept_nodes)}
    links: list[dict[str, Any]] = []
    used: set[tuple] = set()
    for tgt, src in sorted(
        (k for k in tables.edges if k[0] in docs and k[1] in docs), key=lambda k: (rank[k[0]], rank[k[1]])
    ):
        n, total = tables.edges[(tgt, src)]
        links.append(
            {
                "source": docs[src]["node_id"],
                "target": docs[tgt]["node_id"],
                "weight": _r(total / n_graphs),
                "n_prompts": n,
                "prompt_share": _r(n / n_graphs),
            }
        )
        used.update((tgt, src))
    nodes = [docs[n] for n in kept_nodes if n in used or n[0] in ("token", "logit")]
    metadata = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": transcoder_list,
        "prompt_tokens": [slot_labels.get(s, "") for s in _frame_slots(frame, align)],
        "prompt": f"task circuit of {n_graphs} prompts of {name!r} (union, positions aligned at the {align}, "
        f"features in >= {min_prompts} prompts)",
        "node_threshold": float(tables.meta.get("pruning", {}).get("node_threshold", 0.8)),
        "schema_version": SCHEMA_VERSION,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def _frame_slots(frame: int, align: str) -> list[int]:
    return [p - frame for p in range(frame)] if align == "end" else list(range(frame))


def _scan_of(study_dir, tables: _Tables) -> tuple[str, list[str]]:
    doc = load_study(study_dir)
    meta = read_json(Path(doc["graphs_dir"]) / tables.meta["key"] / tables.meta["json"])["metadata"]
    return str(meta.get("scan", "")), list(meta.get("transcoder_list", []))


def aggregate_study(
    study_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    align: str = "end",
    min_prompts: int = 1,
    top: int = 30,
    labels=None,
    figures_dir: str | os.PathLike | None = None,
    figures: bool = True,
    group_by: str | None = None,
) -> dict[str, Any]:
    """Aggregate the finished prompts of a study (see the module docstring); returns the
    ``aggregate.json`` document. ``out`` defaults to ``STUDY_DIR/aggregate``; ``labels``: a
    dashboards store, a labels JSON file or mapping (feature labels in tables, figures and
    the task circuit); ``group_by``: a tag whose value orders and labels the heatmap's
    columns (e.g. ``state``)."""
    if align not in ALIGNS:
        raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
    if min_prompts < 1:
        raise ValueError(f"min_prompts must be >= 1, got {min_prompts}")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    study_dir = Path(study_dir)
    out = Path(out) if out is not None else study_dir / "aggregate"
    doc = load_study(study_dir)
    tables = _Tables()
    for g in iter_study_graphs(study_dir):
        tables.add(g, align)
    n = len(tables.prompts)
    if n == 0:
        raise ValueError(f"study {study_dir} has no finished prompt to aggregate")
    slot_labels = _slot_labels(tables)
    ordered = sorted(
        tables.feat, key=lambda k: (-tables.feat[k]["n"], -_mean(tables.feat[k]["infl_sum"], tables.feat[k]["n"]), k)
    )
    union_feats = sorted(
        {(nd[1], nd[2]) for nd, t in tables.nodes.items() if nd[0] == "feature" and t["n"] >= min_prompts}
    )
    label_map = _feature_labels(labels, sorted(set(ordered[:top]) | set(union_feats)))
    features = _feature_table(tables, n, label_map)
    slug = f"{doc['name']}-task-circuit"
    scan, transcoder_list = _scan_of(study_dir, tables)
    union = _union_graph(
        tables, n, slot_labels, align, min_prompts, slug, doc["name"], label_map, scan, transcoder_list
    )
    result = {
        "format": AGGREGATE_FORMAT,
        "version": 1,
        "study": doc["name"],
        "align": align,
        "min_prompts": min_prompts,
        "n_prompts": n,
        "prompts": tables.prompts,
        "slots": [{"slot": s, "label": slot_labels[s]} for s in sorted(slot_labels)],
        "features": features,
        "slot_features": _slot_feature_table(tables, n, slot_labels),
        "heatmap": _heatmap(study_dir, features[:top], group_by),
        "task_circuit": {"slug": slug, "nodes": len(union["nodes"]), "links": len(union["links"])},
    }
    atomic_write_bytes(out / "aggregate.json", json_bytes(result, sort_keys=False))
    atomic_write_bytes(out / "features.csv", _features_csv(features))
    graph_dir = out / "graph"
    atomic_write_bytes(graph_dir / f"{slug}.json", json_bytes(union, sort_keys=False))
    update_graph_metadata(graph_dir, union["metadata"])
    (graph_dir / f".{GRAPH_METADATA_FILE}.lock").unlink(missing_ok=True)
    if figures:
        write_figures(result, figures_dir if figures_dir is not None else out / "figures")
    return result


def _features_csv(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "layer",
            "feature",
            "n_prompts",
            "share",
            "mean_influence",
            "max_influence",
            "mean_activation",
            "slots",
            "label",
        ]
    )
    for r in rows:
        w.writerow(
            [
                r["layer"],
                r["feature"],
                r["n_prompts"],
                r["share"],
                r["mean_influence"],
                r["max_influence"],
                r["mean_activation"],
                ";".join(f"{s}:{c}" for s, c in r["slots"].items()),
                r["label"],
            ]
        )
    return buf.getvalue().encode("utf-8")
