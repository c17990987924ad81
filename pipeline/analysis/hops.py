"""Does a pruned circuit show an intermediate hop? A path from a token (the city) through a feature
selective for the intermediate concept (the city's state) to the answer's logit, where that
feature is not itself one that writes the answer (spec: docs/organism.md#hop-separation).

``intermediate_hop`` answers it for one pruned graph from three inputs the caller resolves:
the source position, the candidate features (those selective for the prompt's intermediate
value, e.g. from a :class:`~pipeline.analysis.selectivity.SelectivityTable`) and the features
that write the answer (:func:`answer_writers`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.analysis.selectivity import SelectivityTable, role_position
from pipeline.graph.pruned import PrunedGraph

__all__ = ["HopResult", "answer_writers", "intermediate_hop", "prompt_hop", "reachable"]

Node = tuple[int, int, int]  # (layer, position, feature)


@dataclass(frozen=True)
class HopResult:
    """found: some candidate lies on a kept path source token -> feature -> answer logit and
    does not write the answer. ``nodes``: those features (layer, pos, feature); ``reason``: why
    nothing was found ("" when found)."""

    found: bool
    nodes: list[Node] = field(default_factory=list)
    reason: str = ""
    candidates_kept: int = 0

    def to_dict(self) -> dict:
        return {
            "found": self.found,
            "nodes": [list(n) for n in self.nodes],
            "reason": self.reason,
            "candidates_kept": self.candidates_kept,
        }


def reachable(edges: tuple[np.ndarray, np.ndarray], start: int, *, forward: bool) -> set[int]:
    """Nodes reachable from ``start`` along kept edges ``(targets, sources)``: downstream
    (source -> target) when ``forward``, upstream otherwise. ``start`` included."""
    targets, sources = edges
    frm, to = (sources, targets) if forward else (targets, sources)
    nexts: dict[int, list[int]] = {}
    for a, b in zip(frm.tolist(), to.tolist()):
        nexts.setdefault(a, []).append(b)
    seen, todo = {start}, [start]
    while todo:
        for v in nexts.get(todo.pop(), ()):
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return seen


def answer_writers(model, nodes: Iterable[Node], answer_token: int) -> set[Node]:
    """The features among ``nodes`` whose decoder, read by the unembedding (summed over the
    layers a cross-layer feature writes to, de-meaned over the vocabulary), promotes
    ``answer_token`` above every other token: the features that say the answer themselves."""
    W_U = model.W_U.detach()  # (d_model, d_vocab)
    out = set()
    for layer, pos, feature in nodes:
        vec = model.transcoders.decoder_vectors(layer, torch.tensor([feature]))[0].sum(0)  # (d_model,)
        logits = vec.to(W_U.dtype) @ W_U
        if int((logits - logits.mean()).argmax()) == answer_token:
            out.add((layer, pos, feature))
    return out


def intermediate_hop(
    pruned: PrunedGraph,
    *,
    source_pos: int,
    answer_token: int,
    candidates: Iterable[Node],
    writes_answer: Callable[[Iterable[Node]], set[Node]],
) -> HopResult:
    """Whether the pruned circuit routes the source token through a candidate feature to the
    answer's logit, the feature not being an answer writer.

    Node order is circuit-tracer's: [selected features, errors (n_layers * n_pos), tokens
    (n_pos), logits]. ``candidates``: (layer, pos, feature) of the features selective for the
    intermediate value; ``writes_answer``: which of a set of nodes write the answer
    (e.g. ``lambda ns: answer_writers(model, ns, token)``)."""
    result = pruned.result
    n_features = result.n_features
    token_start = n_features + pruned.n_layers * pruned.n_pos
    logit_tokens = [int(t) for t in np.asarray(pruned.logit_tokens)]
    if answer_token not in logit_tokens:
        return HopResult(False, reason="the answer is not a logit node of the graph")
    logit_node = token_start + pruned.n_pos + logit_tokens.index(answer_token)
    info = np.asarray(pruned.feature_info, dtype=np.int64)
    kept = {(int(info[i, 0]), int(info[i, 1]), int(info[i, 2])): i for i in range(n_features) if result.node_mask[i]}
    in_circuit = [n for n in set(candidates) if n in kept]
    if not in_circuit:
        return HopResult(False, reason="no selective feature in the pruned circuit")
    targets, sources, _ = result.kept_edges()
    downstream = reachable((targets, sources), token_start + source_pos, forward=True)
    upstream = reachable((targets, sources), logit_node, forward=False)
    on_path = sorted(n for n in in_circuit if kept[n] in downstream and kept[n] in upstream)
    if not on_path:
        return HopResult(
            False, reason="no selective feature on a path token -> answer", candidates_kept=len(in_circuit)
        )
    writers = writes_answer(on_path)
    hops = [n for n in on_path if n not in writers]
    if not hops:
        return HopResult(
            False, reason="the selective features on the path write the answer", candidates_kept=len(in_circuit)
        )
    return HopResult(True, nodes=hops, candidates_kept=len(in_circuit))


def prompt_hop(
    model,
    pruned: PrunedGraph | None,
    item: Mapping[str, Any],
    tokens: Tensor,
    table: SelectivityTable | None,
    *,
    label: str = "state",
    source_role: str = "city",
    roles: tuple[str, ...] = ("city", "last"),
) -> HopResult | None:
    """:func:`intermediate_hop` for a labeled prompt: the source is its ``source_role`` token (the
    city), the candidates the features selective for its ``label`` value (its state) at each of
    ``roles``, the answer the graph's first logit (the model's top token); a candidate at the
    last position that promotes the answer itself is that answer's writer, not an intermediate
    node (one at the city's position writes into the city's residual stream, which the answer
    reads only through attention). None where the check does not apply: no pruned graph, no table, or a prompt without that label or anchor."""
    value = item.get("labels", {}).get(label)
    if pruned is None or table is None or value is None or label not in table.labels:
        return None
    source = role_position(model.tokenizer, tokens, source_role, item)
    if source is None:
        return None
    candidates: list[Node] = []
    for role in roles:
        pos = role_position(model.tokenizer, tokens, role, item) if role in table.roles else None
        if pos is not None:
            layers, features = np.nonzero(table.selective(label, value, role))
            candidates += [(int(layer), pos, int(f)) for layer, f in zip(layers, features)]
    answer = int(np.asarray(pruned.logit_tokens)[0])
    last = int(tokens.shape[0]) - 1

    def writes_answer(nodes: Iterable[Node]) -> set[Node]:
        # only a feature at the answer's position can be the one that writes the answer
        return answer_writers(model, [n for n in nodes if n[1] == last], answer)

    return intermediate_hop(
        pruned, source_pos=source, answer_token=answer, candidates=candidates, writes_answer=writes_answer
    )
