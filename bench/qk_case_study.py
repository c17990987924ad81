"""QK case study on the organism: at the final "is" of a two-hop prompt, which head attends to
the city, whether that head carries the city -> answer edges, which query x key feature pairs
make it attend there, and whether removing the top pair lowers the score as predicted.

    python bench/qk_case_study.py            # after `dvc repro`, from the repo root (about 7 min on 2 shared cores)
    python bench/qk_case_study.py --extra 1  # plus one more English two-hop prompt per state

Per transcoder set (PLT, CLT) and two-hop prompt (the default set's, plus ``--extra`` English
two-hop prompts per state from the organism world): the attention pattern at the last position
(the head attending most to the city); the head loadings of the pruned graph's edges from the
city's nodes to the answer logit; the QK attribution of that head at (last, city) with each
feature labelled from selectivity tables over the world's prompts; and interventions by
``remove_qk_nodes`` on the real model: the top query x key feature pair, its query node and
key node alone, the same query node with the top key feature at a wrong key position (the
token before the city), and ``--n-random`` seeded random (query feature, key feature) pairs
from the features active at the two positions. Writes bench/results/qk_case_study.json and
docs/qk-case-study.png. The library does the work; this script loops, labels and counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import machine_info, pipeline_version  # noqa: E402
from pipeline._io import atomic_write_bytes, write_json  # noqa: E402
from pipeline.analysis.figures import figure_bytes  # noqa: E402
from pipeline.analysis.selectivity import SelectivityTable, anchor_position, compute_selectivity  # noqa: E402
from pipeline.engine.attribution import attribute  # noqa: E402
from pipeline.engine.head_loadings import head_loadings  # noqa: E402
from pipeline.engine.qk import QKAttribution, QKNode, qk_attribution  # noqa: E402
from pipeline.engine.qk_intervention import QKRemoval, remove_qk_nodes  # noqa: E402
from pipeline.engine.replacement import ReplacementModel  # noqa: E402
from pipeline.graph.pruned import load_pruned_graph  # noqa: E402
from pipeline.graph.pruning import PruneResult, prune_graph  # noqa: E402
from pipeline.graph.store import Graph  # noqa: E402
from pipeline.organism.world import World, WorldConfig, make_world  # noqa: E402


# ---------------------------------------------------------------------------- prompts
def two_hop_prompts(params: dict, world: World, extra: int) -> list[dict]:
    """The default set's two-hop prompts (any language), then ``extra`` more English ones per
    state (the state's first cities not already in the set): {id, prompt, answer, city, state,
    language, in_default_set}."""
    bank = {p["prompt"]: p for p in world.labeled_prompts()}
    out: list[dict] = []
    for pid, item in params["prompts"]["items"].items():
        if item["prompt"] in bank:
            b = bank[item["prompt"]]
            out.append({"id": pid, "answer": item["answer"], "in_default_set": True, **_fields(b)})
    seen = {p["prompt"] for p in out}
    for state in world.states:
        picked = 0
        for p in world.labeled_prompts():
            if picked >= extra:
                break
            if p["labels"]["state"] == state.name and p["labels"]["language"] == "en" and p["prompt"] not in seen:
                pid = f"two_hop_{p['labels']['city'].lower()}_en"
                out.append({"id": pid, "answer": p["answer"], "in_default_set": False, **_fields(p)})
                seen.add(p["prompt"])
                picked += 1
    return out


def _fields(p: dict) -> dict:
    lab = p["labels"]
    return {"prompt": p["prompt"], "city": lab["city"], "state": lab["state"], "language": lab["language"]}


def kind_bank(world: World) -> list[dict]:
    """Canonical prompts of every sentence kind (two-hop, state -> capital, city -> state), both
    languages, labelled by kind: to tell a two-hop template feature from a general one."""
    out = []
    for kind in ("two_hop", "state_capital", "city_state"):
        for s in world.sentences(kind, split="all", canonical_only=True):
            out.append({"prompt": s.prompt, "labels": {"kind": kind, "language": s.language}, "anchors": {}})
    return out


# ---------------------------------------------------------------------------- labels
class Labeler:
    """Names a layer-0 feature from where it fires over the world's prompts and what its
    decoder writes (the top token of decoder row x W_U)."""

    def __init__(self, model: ReplacementModel, world: World):
        self.model = model
        self.states = [s.name for s in world.states]
        self.cities = [c for s in world.states for c in s.cities]
        self.table = compute_selectivity(
            model, world.labeled_prompts(), labels=("state", "city", "language"), roles=("city", "last")
        )
        self.kinds = compute_selectivity(model, kind_bank(world), labels=("kind",), roles=("last",))

    def _fraction_all(self, table: SelectivityTable, label: str, role: str, layer: int, feature: int) -> float:
        counts, totals = table.counts[role, label], table.totals[role, label]
        return float(counts[:, layer, feature].sum() / max(totals.sum(), 1))

    def readout(self, layer: int, feature: int) -> str:
        tc = self.model.transcoders
        row = tc.decoder_vectors(layer, torch.tensor([feature]))[0][0]
        logits = row.to(self.model.W_U.dtype) @ self.model.W_U
        return self.model.tokenizer.decode([int(logits.argmax())]).strip()

    def key_label(self, layer: int, feature: int) -> dict:
        """At the city: state-selective, city-specific, general (>= 90 % of cities) or shared."""
        states = [s for s in self.states if self.table.selective("state", s, "city")[layer, feature]]
        cities = [c for c in self.cities if self.table.selective("city", c, "city")[layer, feature]]
        frac = self._fraction_all(self.table, "state", "city", layer, feature)
        if states:
            cls = f"state:{states[0]}"
        elif cities:
            cls = f"city:{cities[0]}"
        elif frac >= 0.9:
            cls = "general"
        else:
            cls = "shared"
        return {"class": cls, "fires_on_cities": round(frac, 3), "readout": self.readout(layer, feature)}

    def query_label(self, layer: int, feature: int) -> dict:
        """At the last token: two-hop template (>= 90 % of two-hop prompts, <= 5 % of one-hop
        ones), language-selective, state-selective, general or shared."""
        two_hop = bool(self.kinds.selective("kind", "two_hop", "last")[layer, feature])
        langs = [v for v in ("en", "toy") if self.table.selective("language", v, "last")[layer, feature]]
        states = [s for s in self.states if self.table.selective("state", s, "last")[layer, feature]]
        frac = self._fraction_all(self.table, "state", "last", layer, feature)
        frac_kind = {
            k: round(float(self.kinds.firing_fraction("kind", k, "last")[0][layer, feature]), 3)  # type: ignore[index]
            for k in self.kinds.labels["kind"]
        }
        if two_hop and langs:
            cls = f"two-hop template ({langs[0]})"
        elif two_hop:
            cls = "two-hop template"
        elif langs:
            cls = f"language:{langs[0]}"
        elif states:
            cls = f"state:{states[0]}"
        elif frac >= 0.9:
            cls = "general"
        else:
            cls = "shared"
        return {
            "class": cls,
            "fires_on_two_hop": round(frac, 3),
            "fires_by_kind": frac_kind,
            "readout": self.readout(layer, feature),
        }


# ---------------------------------------------------------------------------- measurements
def layer_patterns(model: ReplacementModel, tokens) -> dict[int, torch.Tensor]:
    """Every layer's attention pattern (n_heads, n_pos, n_pos) of a clean run."""
    rec: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(t, *, hook):
            rec[layer] = t[0].detach().to(torch.float64)

        return hook

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep(layer)) for layer in range(model.n_layers)]
    with torch.no_grad(), model.hooks(hooks):
        model.bridge(tokens[None])
    return rec


def writes(model: ReplacementModel, layer: int) -> bool:
    """Whether the layer's attention writes anything (the organism's block 0 has W_O = 0)."""
    return bool(model.bridge.blocks[layer].attn.W_O.abs().max() > 0)


def graph_for(item: dict, kind: str, model32: ReplacementModel, results: Path, work: Path, params: dict):
    """The attribution graph and its pruned result: the main job's (results/<id>/) for the
    configured transcoder set where present, else attributed here with the main job's settings."""
    main_kind = params["transcoders"]["kind"]
    graph_dir = results / item["id"] / "graph.zarr"
    pruned_path = results / item["id"] / "pruned.npz"
    if kind == main_kind and graph_dir.exists() and pruned_path.exists():
        return Graph.open(graph_dir), load_pruned_graph(pruned_path).result, "main job"
    a = params["attribution"]
    graph = attribute(
        item["prompt"],
        model32,
        store=work / f"{kind}_{item['id']}.zarr",
        verbose=False,
        max_n_logits=a["max_n_logits"],
        desired_logit_prob=a["desired_logit_prob"],
        batch_size=a["batch_size"],
        zero_bos_errors=a["zero_bos_errors"],
    )
    p = params["pruning"]
    return graph, prune_graph(graph, p["node_threshold"], p["edge_threshold"]), "attributed here"


def city_edge_loadings(
    graph: Graph, pruned: PruneResult, model32: ReplacementModel, city_pos: int, answer: int, layer: int
) -> dict:
    """Head loadings at ``layer`` of the pruned graph's kept edges from the city's nodes
    (token, features, errors at the city) into the answer's logit."""
    logit_tokens = [int(t) for t in np.asarray(graph.logit_tokens)]
    if answer not in logit_tokens:
        return {"n_edges": 0, "note": "the answer is not among the graph's logits"}
    target = graph.logit_node(logit_tokens.index(answer))
    row = pruned.edge_mask[target]
    sources = [int(s) for s in row.indices]
    info = np.asarray(graph.table("active_features"))
    at_city = []
    for s in sources:
        kind = graph.node_kind(s)
        if kind == "token" and s == graph.token_node(city_pos):
            at_city.append((s, "token"))
        elif kind == "error" and any(s == graph.error_node(lyr, city_pos) for lyr in range(graph.n_layers)):
            at_city.append((s, "error"))
        elif kind == "feature":
            a = graph.node_active_index(s)
            if int(info[a, 1]) == city_pos:
                at_city.append((s, f"feature L{int(info[a, 0])} #{int(info[a, 2])}"))
    edges = []
    for s, name in at_city:
        hl = head_loadings(graph, s, target, model=model32)
        where = [int(x) for x in hl.layers].index(layer) if layer in [int(x) for x in hl.layers] else None
        heads = hl.heads[where].tolist() if where is not None else []
        edges.append({"source": name, "edge": float(hl.edge), "heads": heads, "bypass": float(hl.bypass[where])})
    total = sum(e["edge"] for e in edges)
    per_head = np.sum([e["heads"] for e in edges], axis=0).tolist() if edges else []
    return {"n_edges": len(edges), "edges": edges, "total_edge": total, "per_head": per_head}


def term_label(node: QKNode, labels: dict) -> str:
    if node.kind == "feature":
        return f"L{node.layer} #{node.feature} [{labels[(node.layer, node.feature)]['class']}]"
    return node.label()


def block_shares(qk: QKAttribution) -> dict[str, float]:
    """The score summed by (query kind, key kind): which kinds of terms make it."""
    out: dict[str, float] = {}
    qk_kinds = [n.kind for n in qk.query_nodes]
    kk_kinds = [n.kind for n in qk.key_nodes]
    m = qk.matrix.numpy()
    for qkind in sorted(set(qk_kinds)):
        for kkind in sorted(set(kk_kinds)):
            rows = [i for i, k in enumerate(qk_kinds) if k == qkind]
            cols = [j for j, k in enumerate(kk_kinds) if k == kkind]
            val = float(m[np.ix_(rows, cols)].sum())
            if abs(val) > 1e-9:
                out[f"{qkind} x {kkind}"] = round(val, 5)
    return out


def removal_row(r: QKRemoval, answer: int, city_pos: int) -> dict:
    return {
        "score_before": r.score_before,
        "score_predicted": r.score_predicted,
        "score_after": r.score_after,
        "attention_before": r.attention_before,
        "attention_predicted": r.attention_predicted,
        "attention_after": r.attention_after,
        "pattern_max_abs_error": float((r.pattern_predicted - r.pattern_after).abs().max()),
        "scores_max_abs_error": float((r.scores_predicted - r.scores_after).abs().max()),
        "answer_logit_change": float(r.logits_after[answer] - r.logits_before[answer]),
        "answer_prob_before": float(torch.softmax(r.logits_before, 0)[answer]),
        "answer_prob_after": float(torch.softmax(r.logits_after, 0)[answer]),
    }


def study_prompt(item, kind, model, model32, labeler, results, work, params, n_random, seed) -> dict:
    cap = model.capture(item["prompt"])
    tokens = cap.tokens
    city = anchor_position(model.tokenizer, tokens, item["city"])
    last = cap.n_pos - 1
    answer = int(model.tokenize(" " + item["answer"])[-1])
    patterns = layer_patterns(model, tokens)
    live = [layer for layer in range(model.n_layers) if writes(model, layer)]
    to_city = {layer: patterns[layer][:, last, city].tolist() for layer in range(model.n_layers)}
    layer, head = max(((lyr, h) for lyr in live for h in range(len(to_city[lyr]))), key=lambda x: to_city[x[0]][x[1]])
    row: dict = {
        "id": item["id"],
        "prompt": item["prompt"],
        "city": item["city"],
        "state": item["state"],
        "language": item["language"],
        "in_default_set": item["in_default_set"],
        "city_pos": city,
        "last_pos": last,
        "attention_to_city": {str(lyr): [round(x, 6) for x in v] for lyr, v in to_city.items()},
        "attention_layers_that_write": live,
        "layer": layer,
        "head": head,
    }
    # head loadings of the pruned graph's city -> answer edges
    graph, pruned, source = graph_for(item, kind, model32, results, work, params)
    row["head_loadings"] = {"graph": source, **city_edge_loadings(graph, pruned, model32, city, answer, layer)}

    # the QK attribution at (last, city)
    qk = qk_attribution(model, cap, layer, head, last, city, top=None)
    q_feats = [i for i, n in enumerate(qk.query_nodes) if n.kind == "feature"]
    k_feats = [j for j, n in enumerate(qk.key_nodes) if n.kind == "feature"]
    labels = {}
    for i in q_feats:
        n = qk.query_nodes[i]
        labels[(n.layer, n.feature)] = labeler.query_label(n.layer, n.feature)
    key_labels = {}
    for j in k_feats:
        n = qk.key_nodes[j]
        key_labels[(n.layer, n.feature)] = labeler.key_label(n.layer, n.feature)
    m = qk.matrix.numpy()
    ff = m[np.ix_(q_feats, k_feats)]
    bi, bj = np.unravel_index(int(np.argmax(ff)), ff.shape)
    qi, kj = q_feats[bi], k_feats[bj]
    top_q, top_k = qk.query_nodes[qi], qk.key_nodes[kj]
    row["score"] = qk.total
    row["terms_sum_error"] = abs(qk.terms_sum - qk.total)
    row["score_by_kind"] = block_shares(qk)
    row["feature_x_feature_sum"] = float(ff.sum())
    row["n_query_features"], row["n_key_features"] = len(q_feats), len(k_feats)
    row["top_terms"] = [
        {
            "query": term_label(t.query, labels),
            "key": term_label(t.key, key_labels),
            "value": t.value,
        }
        for t in qk.terms[:10]
    ]
    row["top_pair"] = {
        "query": {"node": top_q.label(), **labels[(top_q.layer, top_q.feature)]},
        "key": {"node": top_k.label(), **key_labels[(top_k.layer, top_k.feature)]},
        "term": float(m[qi, kj]),
        "query_marginal": float(qk.query_marginals[qi]),
        "key_marginal": float(qk.key_marginals[kj]),
    }
    # the query features' and key features' classes, weighted by their marginals
    row["query_marginals_by_class"] = _by_class(qk.query_marginals.numpy(), q_feats, qk.query_nodes, labels)
    row["key_marginals_by_class"] = _by_class(qk.key_marginals.numpy(), k_feats, qk.key_nodes, key_labels)
    # the matrix of the strongest features, for the figure
    q_order = sorted(q_feats, key=lambda i: -float(qk.query_marginals[i]))[:8]
    k_order = sorted(k_feats, key=lambda j: -float(qk.key_marginals[j]))[:8]
    row["matrix_top"] = {
        "query": [term_label(qk.query_nodes[i], labels) for i in q_order],
        "key": [term_label(qk.key_nodes[j], key_labels) for j in k_order],
        "values": m[np.ix_(q_order, k_order)].round(5).tolist(),
    }

    # interventions on the real model
    per_key = [qk_attribution(model, cap, layer, head, last, k, top=0) for k in range(last + 1)]

    def remove(q_nodes, k_nodes, key_pos=city):
        return remove_qk_nodes(
            model, cap, layer, head, last, key_pos, query_nodes=q_nodes, key_nodes=k_nodes, attributions=per_key
        )

    top = remove([top_q], [top_k])
    row["remove_top_pair"] = removal_row(top, answer, city)
    row["remove_top_query_node"] = removal_row(remove([top_q], []), answer, city)
    row["remove_top_key_node"] = removal_row(remove([], [top_k]), answer, city)
    wrong = city - 1
    qk_w = qk_attribution(model, cap, layer, head, last, wrong, top=None)
    wq = [i for i, n in enumerate(qk_w.query_nodes) if n == top_q][0]  # the same query terms at every key
    w_feats = [j for j, n in enumerate(qk_w.key_nodes) if n.kind == "feature"]
    wrong_row: dict = {"key_pos": wrong, "token": model.tokenizer.decode([int(tokens[wrong])]).strip()}
    if w_feats:
        wj = max(w_feats, key=lambda j: float(qk_w.matrix[wq, j]))
        rw = remove([top_q], [qk_w.key_nodes[wj]], key_pos=wrong)
        wrong_row.update(key=qk_w.key_nodes[wj].label(), term=float(qk_w.matrix[wq, wj]))
        wrong_row.update(removal_row(rw, answer, city))
        wrong_row["attention_to_city_after"] = float(rw.pattern_after[city])
        wrong_row["score_to_city_after"] = float(rw.scores_after[city])
    row["wrong_key_position"] = wrong_row

    # random (query feature, key feature) pairs of the active features at the two positions
    rng = np.random.default_rng([seed, sum(map(ord, item["id"] + kind))])
    rand = []
    for _ in range(n_random):
        a, b = int(rng.choice(q_feats)), int(rng.choice(k_feats))
        r = remove([qk.query_nodes[a]], [qk.key_nodes[b]])
        rand.append(
            {
                "term": float(m[a, b]),
                "score_drop": r.score_before - r.score_after,
                "predicted_drop": r.score_before - r.score_predicted,
                "attention_after": r.attention_after,
                "answer_logit_change": float(r.logits_after[answer] - r.logits_before[answer]),
            }
        )
    drops = np.array([x["score_drop"] for x in rand])
    top_drop = top.score_before - top.score_after
    row["random_pairs"] = {
        "n": n_random,
        "score_drop_quantiles": {q: float(np.quantile(drops, float(q))) for q in ("0.05", "0.5", "0.95")},
        "score_drop_max": float(drops.max()),
        "share_at_least_top_drop": float((drops >= top_drop).mean()),
        "attention_after_min": float(min(x["attention_after"] for x in rand)),
        "max_prediction_error": float(max(abs(x["score_drop"] - x["predicted_drop"]) for x in rand)),
        "answer_logit_change_mean": float(np.mean([x["answer_logit_change"] for x in rand])),
        "drops": [round(float(d), 6) for d in drops],
    }
    row["top_pair_score_drop"] = top_drop
    return row


def _by_class(marg: np.ndarray, idx: list[int], nodes: list[QKNode], labels: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for i in idx:
        cls = labels[(nodes[i].layer, nodes[i].feature)]["class"].split(":")[0]
        out[cls] = round(out.get(cls, 0.0) + float(marg[i]), 5)
    return out


# ---------------------------------------------------------------------------- figure
def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ("plt", "clt")  # the same panel order from a run and from its JSON (keys sorted)
    kinds = sorted(results["kinds"], key=lambda k: (order.index(k) if k in order else len(order), k))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.25, 1]})
    ax = axes[0]
    ticks, names = [], []
    x = 0
    for kind in kinds:
        for row in results["kinds"][kind]["prompts"]:
            drops = np.array(row["random_pairs"]["drops"])
            jitter = (np.arange(len(drops)) % 21 - 10) / 60
            ax.scatter(np.full(len(drops), x) + jitter, drops, s=4, color="0.6", lw=0)
            ax.scatter([x], [row["top_pair_score_drop"]], color="C3", marker="D", s=28, zorder=3)
            w = row["wrong_key_position"]
            if "score_to_city_after" in w:
                ax.scatter([x], [row["score"] - w["score_to_city_after"]], color="C0", marker="x", s=28, zorder=3)
            ticks.append(x)
            names.append(f"{kind} {row['city']}{'' if row['language'] == 'en' else ' (toy)'}")
            x += 1
        x += 0.6
    ax.set_xticks(ticks, names, rotation=70, fontsize=6)
    ax.set_ylabel("drop of the head's score to the city (pre-softmax)")
    ax.set_title(
        "remove one query x key feature pair: top pair (red), random pairs (grey),\n"
        "top query feature + top key feature at the token before the city (blue x)",
        fontsize=8,
    )
    ax.axhline(0, color="k", lw=0.5)

    # the term matrix of the first prompt, for the kind with the most query features there (a
    # single query row says less)
    shown = max(kinds, key=lambda k: len(results["kinds"][k]["prompts"][0]["matrix_top"]["query"]))
    row = results["kinds"][shown]["prompts"][0]
    mt = row["matrix_top"]
    vals = np.array(mt["values"])
    ax = axes[1]
    lim = float(np.abs(vals).max()) or 1.0
    im = ax.imshow(vals, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_yticks(range(len(mt["query"])), mt["query"], fontsize=6)
    ax.set_xticks(range(len(mt["key"])), mt["key"], fontsize=6, rotation=70)
    ax.set_ylabel(f'query side ("{row["prompt"].split()[-1]}")', fontsize=8)
    ax.set_xlabel(f'key side ("{row["city"]}")', fontsize=8)
    ax.set_title(f'{shown}: L{row["layer"]} H{row["head"]} QK terms, "{row["prompt"]}"', fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.7)
    fig.tight_layout()
    atomic_write_bytes(path, figure_bytes(fig, ["png"], dpi=130)["png"])
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def summarize(rows: list[dict]) -> dict:
    def mean(key, sub=None):
        vals = [r[key][sub] if sub else r[key] for r in rows]
        return float(np.mean(vals))

    return {
        "n_prompts": len(rows),
        "heads_chosen": sorted({f"L{r['layer']}H{r['head']}" for r in rows}),
        "attention_to_city_before_mean": mean("remove_top_pair", "attention_before"),
        "attention_to_city_after_top_pair_mean": mean("remove_top_pair", "attention_after"),
        "score_mean": mean("score"),
        "top_pair_term_mean": float(np.mean([r["top_pair"]["term"] for r in rows])),
        "top_pair_score_drop_mean": mean("top_pair_score_drop"),
        "random_score_drop_median_mean": float(
            np.mean([r["random_pairs"]["score_drop_quantiles"]["0.5"] for r in rows])
        ),
        "random_share_at_least_top_drop_mean": float(
            np.mean([r["random_pairs"]["share_at_least_top_drop"] for r in rows])
        ),
        "max_score_prediction_error": float(
            max(
                max(r["remove_top_pair"]["scores_max_abs_error"], r["random_pairs"]["max_prediction_error"])
                for r in rows
            )
        ),
        "max_pattern_prediction_error": float(max(r["remove_top_pair"]["pattern_max_abs_error"] for r in rows)),
        "top_pair_answer_logit_change_mean": mean("remove_top_pair", "answer_logit_change"),
        "top_query_node_attention_after_mean": mean("remove_top_query_node", "attention_after"),
        "top_key_node_attention_after_mean": mean("remove_top_key_node", "attention_after"),
        "top_key_class_counts": _count([r["top_pair"]["key"]["class"].split(":")[0] for r in rows]),
        "top_query_class_counts": _count([r["top_pair"]["query"]["class"] for r in rows]),
        "head_loading_share_of_chosen_head_mean": float(
            np.mean(
                [
                    r["head_loadings"]["per_head"][r["head"]] / r["head_loadings"]["total_edge"]
                    for r in rows
                    if r["head_loadings"].get("n_edges") and abs(r["head_loadings"]["total_edge"]) > 0
                ]
                or [float("nan")]
            )
        ),
    }


def _count(xs: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models/organism"))
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--world", type=Path, default=Path("data/organism/world.json"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--kinds", nargs="+", default=["plt", "clt"])
    ap.add_argument("--extra", type=int, default=0, help="extra English two-hop prompts per state")
    ap.add_argument("--n-random", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / ".work" / "qk_case_study")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "qk_case_study.json")
    ap.add_argument("--figure", type=Path, default=REPO / "docs" / "qk-case-study.png")
    ap.add_argument("--draw-only", action="store_true", help="redraw the figure from --out")
    args = ap.parse_args(argv)
    if args.draw_only:
        draw(json.loads(args.out.read_text()), args.figure)
        return
    torch.set_num_threads(args.threads)
    t0 = time.time()
    params = yaml.safe_load(args.params.read_text())
    world = _load_world(args.world)
    prompts = two_hop_prompts(params, world, args.extra)
    args.workdir.mkdir(parents=True, exist_ok=True)
    out: dict = {"machine": machine_info(args.threads), "pipeline": pipeline_version(), "kinds": {}}
    out["settings"] = {"n_random": args.n_random, "seed": args.seed, "extra_per_state": args.extra}
    for kind in args.kinds:
        model = ReplacementModel.from_pretrained(args.models / "model", args.models / kind, dtype=torch.float64)
        dtype = getattr(torch, params["attribution"]["dtype"])
        model32 = ReplacementModel.from_pretrained(args.models / "model", args.models / kind, dtype=dtype)
        labeler = Labeler(model32, world)
        rows = []
        for item in prompts:
            rows.append(
                study_prompt(
                    item, kind, model, model32, labeler, args.results, args.workdir, params, args.n_random, args.seed
                )
            )
            r = rows[-1]
            print(
                f"{kind} {item['id']}: L{r['layer']}H{r['head']} attn {r['remove_top_pair']['attention_before']:.4f} "
                f"score {r['score']:.3f}; top pair {r['top_pair']['query']['class']} x {r['top_pair']['key']['class']} "
                f"term {r['top_pair']['term']:.3f} drop {r['top_pair_score_drop']:.3f} "
                f"(random median {r['random_pairs']['score_drop_quantiles']['0.5']:.3f}, "
                f"share >= top {r['random_pairs']['share_at_least_top_drop']:.3f}) "
                f"attn after {r['remove_top_pair']['attention_after']:.4f}",
                flush=True,
            )
        out["kinds"][kind] = {
            "prompts": rows,
            "summary": summarize(rows),
            "default_set": summarize([r for r in rows if r["in_default_set"]]),
        }
    out["wall_time_s"] = round(time.time() - t0, 1)
    write_json(args.out, out)
    draw(out, args.figure)
    print(f"{args.out}  {args.figure}  ({out['wall_time_s']} s)")


def _load_world(path: Path) -> World:
    data = json.loads(path.read_text())
    return make_world(WorldConfig.from_dict(data["config"]))


if __name__ == "__main__":
    main()
