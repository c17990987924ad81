"""Graph JSON files for circuit-tracer's viewer and Neuronpedia: ``{slug}.json`` and the
folder's ``graph-metadata.json`` index (the full schema: docs/formats.md).

Mirrors circuit-tracer's ``utils/create_graph_files.py`` and ``frontend/graph_models.py``. A
file holds ``metadata``, ``qParams``, ``nodes`` (pruning survivors in graph order: features,
errors, tokens, logits; only those a kept link touches, plus every token and logit) and
``links`` (every kept edge, by target then source, ``weight`` = ``A[target, source]``)::

    kind     node_id                    feature       layer       ctx_idx     jsNodeId
    feature  {layer}_{feature}_{pos}    cantor(l, f)  "{layer}"   pos         {layer}_{feature}-0
    error    0_{layer}_{pos}            -1            "{layer}"   pos         {layer}_{pos}-0
    token    E_{token_id}_{pos}         pos           "E"         pos         E_{token_id}-{pos}
    logit    {L+1}_{token_id}_{P-1}     token_id      "{L+1}"     P - 1       L_{token_id}-{P-1}

(L = n_layers, P = n_pos.) Kept for compatibility: an error node's id can equal a layer-0
feature's (warned). Deliberate differences from circuit-tracer: a list ``scan`` is named
``"custom-"`` + a SHA-256 digest of the names (not Python's salted ``hash``); with a string
``scan``, ``transcoder_list`` comes from ``graph.attrs`` when present; float32 values are
written with their shortest float32 repr; ``graph-metadata.json`` is sorted by slug.

Optional attention fields (``attention=``: the per-prompt ``attention.json`` of the ``qk`` stage,
docs/formats.md#attention-fields-in-the-graph-json): ``head_loadings`` on each link that is one of
the file's edges and a top-level ``attention_heads`` (the heads' QK attributions, their nodes
labelled). Neuronpedia's schema and circuit-tracer's models accept and ignore keys they do not
know; without ``attention`` the file is unchanged.

Fixed key order and float formatting, no timestamps: the same graph, pruning and labels give
byte-identical files, each written atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline._io import atomic_write_bytes, json_bytes, read_json
from pipeline.graph.pruned import PrunedGraph, load_pruned_graph, selected_feature_table
from pipeline.graph.pruning import PruneResult, prune_graph

__all__ = [
    "FEATURE_TYPES",
    "ATTENTION_FORMAT",
    "GRAPH_METADATA_FILE",
    "NODE_FIELDS",
    "SCHEMA_VERSION",
    "attention_fields",
    "build_graph_json",
    "cantor_pairing",
    "create_graph_files",
    "error_node_id",
    "feature_node_id",
    "load_labels",
    "logit_node_id",
    "node_record",
    "token_node_id",
    "update_graph_metadata",
]

SCHEMA_VERSION = 1
GRAPH_METADATA_FILE = "graph-metadata.json"
DEFAULT_NODE_THRESHOLD = 0.8
DEFAULT_EDGE_THRESHOLD = 0.98

FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "token": "embedding",
    "logit": "logit",
}
METADATA_FIELDS = ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold", "schema_version")
QPARAMS_FIELDS = ("pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos")
NODE_FIELDS = (
    "node_id",
    "feature",
    "layer",
    "ctx_idx",
    "feature_type",
    "token_prob",
    "is_target_logit",
    "run_idx",
    "reverse_ctx_idx",
    "jsNodeId",
    "clerp",
    "influence",
    "activation",
)
LINK_FIELDS = ("source", "target", "weight")
#: the per-prompt attention file export reads (written by the ``qk`` stage)
ATTENTION_FORMAT = ("circuit-pipeline/attention", 1)


# --------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------


def cantor_pairing(x: int, y: int) -> int:
    """``(x + y)(x + y + 1)/2 + y``: the ``feature`` field of a feature node (x = layer)."""
    x, y = int(x), int(y)
    return (x + y) * (x + y + 1) // 2 + y


def feature_node_id(layer: int, feature: int, pos: int) -> str:
    return f"{int(layer)}_{int(feature)}_{int(pos)}"


def error_node_id(layer: int, pos: int) -> str:
    return f"0_{int(layer)}_{int(pos)}"


def token_node_id(token_id: int, pos: int) -> str:
    return f"E_{int(token_id)}_{int(pos)}"


def logit_node_id(n_layers: int, token_id: int, n_pos: int) -> str:
    """Logit nodes sit at layer ``n_layers + 1`` and the last position ``n_pos - 1``."""
    return f"{int(n_layers) + 1}_{int(token_id)}_{int(n_pos) - 1}"


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def _f32(x) -> float:
    """A float32 value as the Python float of its shortest repr (stable, compact JSON)."""
    v = np.float32(x)
    if not np.isfinite(v):
        raise ValueError(f"non-finite value {v!r} cannot be written to graph JSON")
    return float(str(v))


def _float(x) -> float:
    """Float64 (or float32 kept at its own precision) as a finite Python float."""
    if isinstance(x, np.floating) and x.dtype == np.float32:
        return _f32(x)
    v = float(x)
    if not np.isfinite(v):
        raise ValueError(f"non-finite value {v!r} cannot be written to graph JSON")
    return v


def _token_decoder(tokenizer, graph):
    """``(input_strings(ids) -> list[str], logit_string(id) -> str)``.

    ``tokenizer``: an object with ``decode`` (called as ``decode([id])``), a mapping or a
    sequence of token strings indexed by id, or a callable ``id -> str``.  ``None``: the
    graph's ``attrs["prompt_tokens"]`` / ``attrs["logit_token_strings"]`` when present, else
    ``"<id>"``.
    """
    attrs = getattr(graph, "attrs", {}) or {}
    if tokenizer is None:
        prompt_tokens = attrs.get("prompt_tokens")
        logit_strings = attrs.get("logit_token_strings")

        def inputs(ids):
            if isinstance(prompt_tokens, Sequence) and len(prompt_tokens) == len(ids):
                return [str(t) for t in prompt_tokens]
            return [f"<{int(i)}>" for i in ids]

        def logit(i, index):
            if isinstance(logit_strings, Sequence) and index < len(logit_strings):
                return str(logit_strings[index])
            return f"<{int(i)}>"

        return inputs, logit
    if hasattr(tokenizer, "decode"):
        one = lambda i: str(tokenizer.decode([int(i)]))  # noqa: E731
    elif isinstance(tokenizer, (Mapping, Sequence)) and not isinstance(tokenizer, str):
        one = lambda i: str(tokenizer[int(i)])  # noqa: E731
    elif callable(tokenizer):
        one = lambda i: str(tokenizer(int(i)))  # noqa: E731
    else:
        raise TypeError("tokenizer must have .decode, be a mapping/sequence of strings, or callable")
    return (lambda ids: [one(i) for i in ids]), (lambda i, index: one(i))


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def _label_text(value) -> str:
    if isinstance(value, Mapping):
        for key in ("clerp", "label", "description", "explanation"):
            if key in value:
                return str(value[key])
        raise ValueError(f"label record {value!r} has no clerp/label/description")
    return str(value)


def load_labels(labels) -> tuple[dict[str, str], dict[tuple[int, int], str]]:
    """Normalise labels to ``(by node id, by (layer, feature))``.

    Accepts ``None``; a path to a JSON file; a mapping whose keys are node ids (``str``) or
    ``(layer, feature)`` tuples and whose values are strings or records with ``clerp`` /
    ``label`` / ``description``; or a list of records with ``node_id`` or ``layer`` +
    ``feature`` and a label field.  A JSON file holds a mapping (node ids) or such a list.
    """
    by_id: dict[str, str] = {}
    by_feature: dict[tuple[int, int], str] = {}
    if labels is None:
        return by_id, by_feature
    if isinstance(labels, (str, os.PathLike)):
        labels = read_json(labels)
    if isinstance(labels, Mapping):
        for key, value in labels.items():
            if isinstance(key, tuple):
                layer, feature = key
                by_feature[(int(layer), int(feature))] = _label_text(value)
            else:
                by_id[str(key)] = _label_text(value)
    elif isinstance(labels, Sequence):
        for rec in labels:
            if not isinstance(rec, Mapping):
                raise ValueError(f"label list entries must be records, got {rec!r}")
            if "node_id" in rec:
                by_id[str(rec["node_id"])] = _label_text(rec)
            elif "layer" in rec and "feature" in rec:
                by_feature[(int(rec["layer"]), int(rec["feature"]))] = _label_text(rec)
            else:
                raise ValueError(f"label record {rec!r} needs node_id or layer + feature")
    else:
        raise TypeError(f"unsupported labels {type(labels).__name__}")
    return by_id, by_feature


# --------------------------------------------------------------------------------------------
# The graph JSON
# --------------------------------------------------------------------------------------------


#: the names Neuronpedia's upload accepts for ``scan`` and ``slug``
NEURONPEDIA_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_NEURONPEDIA_RULE = "Neuronpedia accepts only letters, digits, '_', '.' and '-'"


def neuronpedia_name(name: str) -> str:
    """A name we derive (a transcoder path, a hub repo id) made acceptable to Neuronpedia:
    every run of other characters becomes one '_' ('models/organism/plt' ->
    'models_organism_plt', 'org/repo@v1' -> 'org_repo_v1'); a valid name is kept as it is."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_")
    return out.lstrip(".") or "custom"


def check_scan(scan: str) -> str:
    """A scan name the user gives must already be one Neuronpedia accepts."""
    if not isinstance(scan, str) or not NEURONPEDIA_NAME.fullmatch(scan):
        raise ValueError(
            f"invalid scan {scan!r}: {_NEURONPEDIA_RULE} (e.g. gemma-2-2b, the name of a model "
            f"Neuronpedia hosts); give another scan (--scan / export.scan), e.g. {neuronpedia_name(str(scan))!r}"
        )
    return scan


def _scan_fields(graph, scan) -> tuple[str, list[str]]:
    """The graph's ``scan`` and ``transcoder_list``: ``scan`` as given (a string must be a valid
    Neuronpedia name; a list becomes ``custom-<digest>``), else the one the graph records
    (derived from the transcoders' source: made valid by :func:`neuronpedia_name`)."""
    attrs = getattr(graph, "attrs", {}) or {}
    if scan is None:
        scan = attrs.get("scan")
        if scan is None:
            raise ValueError(
                "Neither scan nor graph.attrs['scan'] is set: one must identify which transcoders "
                "were used to create the graph."
            )
        if not isinstance(scan, (list, tuple)):
            scan = neuronpedia_name(str(scan))
    if isinstance(scan, (list, tuple)):
        names = [str(s) for s in scan]
        digest = hashlib.sha256("-".join(names).encode("utf-8")).hexdigest()[:16]
        return f"custom-{digest}", names
    return check_scan(scan), [str(s) for s in attrs.get("transcoder_list", []) or []]


def node_record(
    node_id,
    feature,
    layer,
    ctx_idx,
    kind,
    *,
    js,
    token_prob=0.0,
    is_target=False,
    clerp="",
    influence=None,
    activation=None,
) -> dict[str, Any]:
    """One node of the graph JSON, its fields in ``NODE_FIELDS`` order; ``kind`` is a key of
    ``FEATURE_TYPES``, ``js`` the ``jsNodeId``."""
    return {
        "node_id": node_id,
        "feature": int(feature),
        "layer": str(layer),
        "ctx_idx": int(ctx_idx),
        "feature_type": FEATURE_TYPES[kind],
        "token_prob": token_prob,
        "is_target_logit": bool(is_target),
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js,
        "clerp": clerp,
        "influence": influence,
        "activation": activation,
    }


def _resolve_pruned(graph, pruned, node_threshold, edge_threshold):
    if isinstance(pruned, (str, os.PathLike)):
        pruned = load_pruned_graph(pruned)
    if isinstance(pruned, PrunedGraph):
        if graph is None:
            graph = pruned
        pruned = pruned.result
    if graph is None:
        raise ValueError("graph is None: pass a graph, or pruned= a saved pruned graph")
    if pruned is None:
        pruned = prune_graph(
            graph,
            DEFAULT_NODE_THRESHOLD if node_threshold is None else node_threshold,
            DEFAULT_EDGE_THRESHOLD if edge_threshold is None else edge_threshold,
        )
    if not isinstance(pruned, PruneResult):
        raise TypeError(f"pruned must be a PruneResult, PrunedGraph or path, got {type(pruned)}")
    for name, given, used in (
        ("node_threshold", node_threshold, pruned.node_threshold),
        ("edge_threshold", edge_threshold, pruned.edge_threshold),
    ):
        if given is not None and float(given) != float(used):
            raise ValueError(f"{name}={given} but the given pruning used {used}")
    if pruned.n_nodes != int(graph.n_nodes) or pruned.n_features != int(graph.n_selected):
        raise ValueError("the pruning result does not belong to this graph (node counts differ)")
    return graph, pruned


def build_graph_json(
    graph, slug: str, pruned: PruneResult, *, tokenizer=None, labels=None, scan=None, attention=None
) -> dict[str, Any]:
    """The graph JSON as a dict (see the module docstring); ``attention``: see
    :func:`attention_fields`."""
    n_layers, n_pos = int(graph.n_layers), int(graph.n_pos)
    n_features = pruned.n_features
    error_end = n_features + n_layers * n_pos
    token_end = error_end + n_pos
    input_tokens = np.asarray(graph.input_tokens, dtype=np.int64)
    logit_tokens = np.asarray(graph.logit_tokens, dtype=np.int64)
    logit_probs = np.asarray(graph.logit_probabilities)
    info, acts = selected_feature_table(graph)
    decode_inputs, decode_logit = _token_decoder(tokenizer, graph)
    by_id, by_feature = load_labels(labels)
    scan_name, transcoder_list = _scan_fields(graph, scan)
    cumulative = np.asarray(pruned.cumulative_scores, dtype=np.float64)

    nodes: dict[int, dict[str, Any]] = {}
    for idx in np.flatnonzero(pruned.node_mask).tolist():
        if idx < n_features:
            layer, pos, feat = (int(v) for v in info[idx])
            nid = feature_node_id(layer, feat, pos)
            node = node_record(
                nid,
                cantor_pairing(layer, feat),
                layer,
                pos,
                "feature",
                js=f"{layer}_{feat}-0",
                influence=_float(cumulative[idx]),
                activation=_float(acts[idx]),
                clerp=by_id.get(nid, by_feature.get((layer, feat), "")),
            )
        elif idx < error_end:
            layer, pos = divmod(idx - n_features, n_pos)
            nid = error_node_id(layer, pos)
            node = node_record(
                nid,
                -1,
                layer,
                pos,
                "error",
                js=f"{layer}_{pos}-0",
                influence=_float(cumulative[idx]),
                clerp=by_id.get(nid, ""),
            )
        elif idx < token_end:
            pos = idx - error_end
            tok = int(input_tokens[pos])
            nid = token_node_id(tok, pos)
            node = node_record(
                nid,
                pos,
                "E",
                pos,
                "token",
                js=f"E_{tok}-{pos}",
                influence=_float(cumulative[idx]),
                clerp=by_id.get(nid, ""),
            )
        else:
            i = idx - token_end
            tok = int(logit_tokens[i])
            prob = _float(logit_probs[i])
            nid = logit_node_id(n_layers, tok, n_pos)
            text = decode_logit(tok, i)
            node = node_record(
                nid,
                tok,
                n_layers + 1,
                n_pos - 1,
                "logit",
                js=f"L_{tok}-{n_pos - 1}",
                token_prob=prob,
                is_target=i == 0,
                clerp=by_id.get(nid, f'Output "{text}" (p={prob:.3f})'),
            )
        nodes[idx] = node

    ids: dict[str, int] = {}
    collisions = []
    for idx, node in nodes.items():
        if node["node_id"] in ids:
            collisions.append(node["node_id"])
        ids[node["node_id"]] = idx
    if collisions:
        warnings.warn(
            f"graph {slug!r}: node ids shared by two nodes (circuit-tracer's id "
            f"format): {sorted(set(collisions))[:10]}",
            stacklevel=3,
        )

    targets, sources, weights = pruned.kept_edges()
    links: list[dict[str, Any]] = []
    used: set[int] = set()
    for t, s, w in zip(targets.tolist(), sources.tolist(), weights):
        if t in nodes and s in nodes:
            links.append({"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": _float(w)})
            used.update((t, s))
    used_nodes = [node for idx, node in nodes.items() if idx in used or node["feature_type"] in ("embedding", "logit")]

    prompt_tokens = decode_inputs(input_tokens.tolist())
    prompt = (getattr(graph, "attrs", {}) or {}).get("prompt")
    if prompt is None:  # attributed from token ids: the decoded tokens are the prompt
        prompt = "".join(prompt_tokens)
    metadata = {
        "slug": slug,
        "scan": scan_name,
        "transcoder_list": transcoder_list,
        "prompt_tokens": prompt_tokens,
        "prompt": str(prompt),
        "node_threshold": float(pruned.node_threshold),
        "schema_version": SCHEMA_VERSION,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    doc = {"metadata": metadata, "qParams": qparams, "nodes": used_nodes, "links": links}
    if attention is not None:

        def label_of(ref: Mapping[str, Any]) -> str:
            nid = ref.get("node_id")
            if nid is not None and nid in by_id:
                return by_id[nid]
            if ref.get("kind") == "feature" and ref.get("layer") is not None and ref.get("feature") is not None:
                return by_feature.get((int(ref["layer"]), int(ref["feature"])), "")
            return ""

        pruned_ids = {node["node_id"] for node in nodes.values()}
        doc["attention_heads"] = attention_fields(attention, links, pruned_ids, n_layers, label_of)
    return doc


# --------------------------------------------------------------------------------------------
# Attention: head loadings on links, the heads' QK attributions
# --------------------------------------------------------------------------------------------


def _attention_error(problem: str) -> ValueError:
    return ValueError(
        f"attention file: {problem}; it must be the qk stage's attention.json of this prompt's "
        "pruned graph (rerun qk@<id>, or export without it)"
    )


def _node_ref(ref, pruned_ids: set[str], label_of) -> dict[str, Any]:
    """``{"node_id", "label", "clerp"}`` of an attention NODE: its export id (``None`` when the
    pruned graph lacks it), its structural label (``feature L0 p3 #12``) and the export's label."""
    if not isinstance(ref, Mapping) or "node_id" not in ref or not isinstance(ref.get("label"), str):
        raise _attention_error(f"a node reference {ref!r} lacks node_id / label")
    nid = ref["node_id"]
    if nid is not None and (not isinstance(nid, str) or nid not in pruned_ids):
        raise _attention_error(f"node {nid!r} is not a node of the pruned graph")
    return {"node_id": nid, "label": ref["label"], "clerp": label_of(ref)}


def attention_fields(
    attention: Mapping[str, Any],
    links: list[dict[str, Any]],
    pruned_ids: set[str],
    n_layers: int,
    label_of=lambda ref: "",
) -> dict[str, Any]:
    """Attach the attention file's head loadings to ``links`` (in place) and return the
    top-level ``attention_heads`` field.

    Each link that is one of the file's edges gets ``head_loadings = {"edge": recomputed edge,
    "layers": [{"layer", "heads": [n_heads floats], "bypass"}, ...]}`` (per layer: heads + bypass
    = edge). ``attention_heads = {"n_layers", "n_heads", "config", "heads": [HEAD, ...]}``, HEAD
    as in the file with ``edges`` as ``[source, target]`` pairs and every node reference as
    ``{"node_id", "label", "clerp"}`` (``clerp``: the export's label of that node or feature).
    Refuses, naming the fix, a file of another format or model, an edge that is not a link (or
    whose weight differs), a node the pruned graph does not hold, a missing or malformed field.
    """
    try:
        return _attention_fields(attention, links, pruned_ids, n_layers, label_of)
    except (KeyError, TypeError, AttributeError) as exc:
        raise _attention_error(f"a missing or malformed field ({type(exc).__name__}: {exc})") from exc


def _attention_fields(attention, links, pruned_ids, n_layers, label_of) -> dict[str, Any]:
    if not isinstance(attention, Mapping):
        raise _attention_error(f"expected a JSON object, got {type(attention).__name__}")
    fmt = (attention.get("format"), attention.get("version"))
    if fmt != ATTENTION_FORMAT:
        raise _attention_error(f"format {fmt} is not {ATTENTION_FORMAT}")
    if attention.get("n_layers") != n_layers:
        raise _attention_error(f"n_layers {attention.get('n_layers')!r} but the graph has {n_layers}")
    n_heads = attention.get("n_heads")
    if not isinstance(n_heads, int) or n_heads < 1:
        raise _attention_error(f"n_heads {n_heads!r} is not a positive integer")

    # circuit-tracer's id format can give two nodes one id (export warns), so a (source, target)
    # pair may name several links: an edge goes to the unclaimed one with its weight
    by_pair: dict[tuple[str, str], list[dict]] = {}
    for lk in links:
        by_pair.setdefault((lk["source"], lk["target"]), []).append(lk)
    pairs: list[list[str]] = []
    for i, edge in enumerate(attention.get("edges", [])):
        pair = (edge.get("source"), edge.get("target"))
        candidates = by_pair.get(pair)
        if not candidates:
            raise _attention_error(f"edge {i} {pair[0]} -> {pair[1]} is not a link of the exported graph")
        weight = np.float32(edge["weight"])
        same = [lk for lk in candidates if np.float32(lk["weight"]) == weight and "head_loadings" not in lk]
        if not same:
            found = ", ".join(str(lk["weight"]) for lk in candidates)
            raise _attention_error(f"edge {i} has weight {edge['weight']} but the graph's link has {found}")
        link = same[0]
        layers = []
        for rec in edge["layers"]:
            heads = [_float(h) for h in rec["heads"]]
            if len(heads) != n_heads or not 0 <= int(rec["layer"]) < n_layers:
                raise _attention_error(f"edge {i}: layer {rec['layer']} with {len(heads)} heads (n_heads {n_heads})")
            layers.append({"layer": int(rec["layer"]), "heads": heads, "bypass": _float(rec["bypass"])})
        link["head_loadings"] = {"edge": _float(edge["edge"]), "layers": layers}
        pairs.append([pair[0], pair[1]])

    heads_out = []
    for head in attention.get("heads", []):
        if not 0 <= int(head["layer"]) < n_layers or not 0 <= int(head["head"]) < n_heads:
            raise _attention_error(f"head L{head['layer']} H{head['head']} is out of range")
        edges = [int(e) for e in head["edges"]]
        if any(not 0 <= e < len(pairs) for e in edges):
            raise _attention_error(
                f"head L{head['layer']} H{head['head']} names an edge index outside 0..{len(pairs) - 1}"
            )
        heads_out.append(
            {
                "layer": int(head["layer"]),
                "head": int(head["head"]),
                "loading": _float(head["loading"]),
                "edges": [pairs[e] for e in edges],
                "query_pos": int(head["query_pos"]),
                "key_pos": int(head["key_pos"]),
                "pattern": _float(head["pattern"]),
                "score": _float(head["score"]),
                "terms_sum": _float(head["terms_sum"]),
                "terms": [
                    {
                        "query": _node_ref(t["query"], pruned_ids, label_of),
                        "key": _node_ref(t["key"], pruned_ids, label_of),
                        "value": _float(t["value"]),
                    }
                    for t in head["terms"]
                ],
                **{
                    side: [
                        {"node": _node_ref(m["node"], pruned_ids, label_of), "value": _float(m["value"])}
                        for m in head[side]
                    ]
                    for side in ("query_marginals", "key_marginals")
                },
            }
        )
    config = attention.get("config", {})
    return {
        "n_layers": n_layers,
        "n_heads": n_heads,
        "config": dict(config) if isinstance(config, Mapping) else {},
        "heads": heads_out,
    }


def _check_slug(slug: str) -> None:
    if not isinstance(slug, str) or not NEURONPEDIA_NAME.fullmatch(slug) or slug.startswith("."):
        raise ValueError(
            f"invalid slug {slug!r}: it names a file in output_dir and a graph on Neuronpedia, which "
            f"accepts only letters, digits, '_', '.' and '-' (not starting with '.'); choose another slug "
            "(slug prefix / prompt id)"
        )


@contextlib.contextmanager
def _locked(output_dir: Path):
    lock_path = output_dir / f".{GRAPH_METADATA_FILE}.lock"
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def update_graph_metadata(output_dir, metadata: Mapping[str, Any]) -> Path:
    """Add or replace (by slug) one graph's metadata in ``output_dir/graph-metadata.json``.

    ``{"graphs": [metadata, ...]}`` sorted by slug; read-modify-write under an exclusive
    ``flock`` (parallel exports into one folder are safe), written atomically.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / GRAPH_METADATA_FILE
    entry = {k: metadata[k] for k in METADATA_FIELDS if k in metadata}
    with _locked(output_dir):
        graphs = []
        if path.exists():
            doc = read_json(path)
            if not isinstance(doc, dict) or not isinstance(doc.get("graphs"), list):
                raise ValueError(f"{path} is not a graph-metadata index ({{'graphs': [...]}})")
            graphs = [g for g in doc["graphs"] if g.get("slug") != entry["slug"]]
        graphs.append(entry)
        graphs.sort(key=lambda g: str(g.get("slug")))
        atomic_write_bytes(path, json_bytes({"graphs": graphs}, sort_keys=False))
    return path


def create_graph_files(
    graph,
    slug: str,
    output_dir,
    node_threshold: float | None = None,
    edge_threshold: float | None = None,
    *,
    tokenizer=None,
    labels=None,
    pruned=None,
    scan=None,
    attention=None,
) -> Path:
    """Write ``output_dir/{slug}.json`` and update ``output_dir/graph-metadata.json``.

    ``graph``: a graph-store ``Graph`` (or anything with its protocol), or ``None`` when
    ``pruned`` is a saved pruned graph (which carries everything export needs).
    ``pruned``: ``None`` (prune here with ``node_threshold`` / ``edge_threshold``, defaults 0.8
    / 0.98), a :class:`~pipeline.graph.pruning.PruneResult`, a
    :class:`~pipeline.graph.pruned.PrunedGraph` or the path of one; thresholds given together with
    a pruning result must equal the ones it used.  ``tokenizer``: see :func:`_token_decoder`.
    ``labels``: see :func:`load_labels` (become the nodes' ``clerp``).  ``scan``: overrides
    ``graph.attrs["scan"]``; a list of transcoder names gives ``transcoder_list``.
    ``attention``: the ``qk`` stage's ``attention.json`` (a dict or its path), or ``None``; see
    :func:`attention_fields`. Returns the graph JSON's path.
    """
    _check_slug(slug)
    graph, result = _resolve_pruned(graph, pruned, node_threshold, edge_threshold)
    if isinstance(attention, (str, os.PathLike)):
        attention = read_json(attention)
    doc = build_graph_json(graph, slug, result, tokenizer=tokenizer, labels=labels, scan=scan, attention=attention)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{slug}.json"
    atomic_write_bytes(path, json_bytes(doc, sort_keys=False))
    update_graph_metadata(output_dir, doc["metadata"])
    return path
