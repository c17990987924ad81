"""Feature selectivity: which transcoder features fire for one value of a prompt label (a state,
a language) and not for the others, at a named position (spec: docs/interventions.md#feature-selectivity).

A labeled prompt is ``{"prompt": text, "labels": {label: value}, "anchors": {role: word}}``
(``World.labeled_prompts()`` is the organism's bank). Position roles:

* an anchor role (``city``): the last token of the first occurrence of the prompt's anchor word
  for that role (``anchors[role]``, else ``labels[role]``);
* ``last``: the prompt's last token;
* ``any``: every position but BOS (a feature fires at ``any`` when it fires at one of them).

A feature fires on a prompt at a role when its activation there is positive. It is
*selective* for (label, value, role) when it fires on at least ``hi`` of the prompts with that
value and on at most ``lo`` of all the other prompts (those with another value of the label);
a value with no prompt, or no other prompt to compare with, has no selective feature.
:func:`compute_selectivity` counts the firings; :class:`SelectivityTable` holds the counts and
applies the definition.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from pipeline._io import atomic_write_bytes, json_bytes, npz_bytes

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.engine.replacement import ReplacementModel

__all__ = [
    "LAST",
    "ANY",
    "ROLES",
    "SelectivityTable",
    "anchor_position",
    "compute_selectivity",
    "fired_at",
    "labeled_prompt",
    "role_position",
]

LAST, ANY = "last", "any"
#: the default roles: the city's token, the last token, any token but BOS
ROLES: tuple[str, ...] = ("city", LAST, ANY)
FORMAT = "circuit-pipeline/selectivity"
FORMAT_VERSION = 1


def labeled_prompt(prompt: str, tags: Sequence[str] = (), language: str | None = None) -> dict:
    """A prompt of a prompt set as a labeled prompt: its ``key=value`` tags as labels (plus
    ``language``), the city tag as the ``city`` anchor."""
    labels = dict(t.split("=", 1) for t in tags if "=" in t)
    if language and "language" not in labels:
        labels["language"] = language
    anchors = {"city": labels["city"]} if "city" in labels else {}
    return {"prompt": prompt, "labels": labels, "anchors": anchors}


def anchor_position(tokenizer, tokens: Tensor, word: str) -> int | None:
    """The position of the last token of ``word``'s first occurrence as a whole word in the
    prompt ``tokens`` (BOS first), or None: the first position whose decoded prefix reaches the
    end of the word's first match in the decoded prompt."""
    ids = [int(t) for t in tokens.tolist()]
    match = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", tokenizer.decode(ids[1:]))
    if match is None:
        return None
    for pos in range(1, len(ids)):
        if len(tokenizer.decode(ids[1 : pos + 1])) >= match.end():
            return pos
    return None  # pragma: no cover - the whole prompt reaches every match


def role_position(tokenizer, tokens: Tensor, role: str, item: Mapping[str, Any]) -> int | None:
    """The position of ``role`` (an anchor role or ``last``) in the labeled prompt ``item``
    tokenized as ``tokens``; None where the prompt has no such anchor. ``any`` has no one
    position (see :func:`fired_at`)."""
    if role == ANY:
        raise ValueError("role 'any' is every position but BOS, not one position")
    if role == LAST:
        return int(tokens.shape[0]) - 1
    word = item.get("anchors", {}).get(role) or item.get("labels", {}).get(role)
    return None if word is None else anchor_position(tokenizer, tokens, word)


def fired_at(activations: Tensor, role: str, pos: int | None) -> Tensor | None:
    """(n_layers, d_transcoder) bool: which features fire at the role's position (``pos``), or
    at any position but BOS for ``any``; None where the role has no position."""
    if role == ANY:
        return (activations[:, 1:] > 0).any(dim=1)
    return None if pos is None else activations[:, pos] > 0


@dataclass
class SelectivityTable:
    """Firing counts per role, label and value, and the thresholds of the definition.

    labels: label -> its values (sorted); roles: the roles counted
    counts[(role, label)]: (n_values, n_layers, d_transcoder) int, the prompts of each value on
    which the feature fires at the role
    totals[(role, label)]: (n_values,) int, the prompts of each value that have the role
    hi / lo: the selectivity thresholds (module docstring)
    """

    labels: dict[str, list[str]]
    roles: list[str]
    counts: dict[tuple[str, str], np.ndarray]
    totals: dict[tuple[str, str], np.ndarray]
    hi: float = 0.9
    lo: float = 0.05

    def _key(self, label: str, role: str) -> tuple[str, str]:
        if role not in self.roles:
            raise ValueError(f"the selectivity table has no role {role!r} (it has {self.roles})")
        if label not in self.labels:
            raise ValueError(f"the selectivity table has no label {label!r} (it has {sorted(self.labels)})")
        return role, label

    def firing_fraction(self, label: str, value: str, role: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(inside, outside), each (n_layers, d_transcoder): the share of ``value``'s prompts on
        which each feature fires at ``role``, and the share of all other prompts; None when
        ``value`` has no prompt or there is no other prompt."""
        key = self._key(label, role)
        if value not in self.labels[label]:
            return None
        v = self.labels[label].index(value)
        counts, totals = self.counts[key].astype(np.float64), self.totals[key].astype(np.float64)
        n_in, n_out = totals[v], totals.sum() - totals[v]
        if n_in == 0 or n_out == 0:
            return None
        return counts[v] / n_in, (counts.sum(axis=0) - counts[v]) / n_out

    def selective(self, label: str, value: str, role: str) -> np.ndarray:
        """(n_layers, d_transcoder) bool: the features selective for (label, value, role)."""
        fractions = self.firing_fraction(label, value, role)
        if fractions is None:
            return np.zeros(self.counts[self._key(label, role)].shape[1:], dtype=bool)
        inside, outside = fractions
        return (inside >= self.hi) & (outside <= self.lo)

    def contrastive(self, label: str, value: str, other: str, role: str) -> np.ndarray:
        """(n_layers, d_transcoder) bool: the features that fire on at least ``hi`` of ``value``'s
        prompts and on at most ``lo`` of ``other``'s at ``role``: what tells ``value`` from
        ``other`` (Texas from California), shared or not with the remaining values."""
        key = self._key(label, role)
        values = self.labels[label]
        if value not in values or other not in values or value == other:
            return np.zeros(self.counts[key].shape[1:], dtype=bool)
        counts, totals = self.counts[key], self.totals[key]
        v, o = values.index(value), values.index(other)
        if totals[v] == 0 or totals[o] == 0:
            return np.zeros(counts.shape[1:], dtype=bool)
        return (counts[v] / totals[v] >= self.hi) & (counts[o] / totals[o] <= self.lo)

    def n_selective(self) -> dict[str, dict[str, dict[str, int]]]:
        """{role: {label: {value: number of selective features}}}."""
        return {
            role: {
                label: {v: int(self.selective(label, v, role).sum()) for v in values}
                for label, values in self.labels.items()
            }
            for role in self.roles
        }

    # ---------------------------------------------------------------------------- file
    def save(self, path: str | os.PathLike) -> Path:
        """One ``.npz`` with deterministic bytes: ``counts/<role>/<label>``,
        ``totals/<role>/<label>`` and ``metadata`` (UTF-8 JSON: labels, roles, thresholds)."""
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "labels": self.labels,
            "roles": self.roles,
            "hi": self.hi,
            "lo": self.lo,
        }
        arrays: dict[str, Any] = {"metadata": np.frombuffer(json_bytes(meta), dtype=np.uint8)}
        for (role, label), counts in self.counts.items():
            arrays[f"counts/{role}/{label}"] = counts.astype(np.int32)
            arrays[f"totals/{role}/{label}"] = self.totals[role, label].astype(np.int32)
        return atomic_write_bytes(path, npz_bytes(arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SelectivityTable:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["metadata"]).decode("utf-8"))
            if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path} is not a selectivity table of format version {FORMAT_VERSION}")
            keys = [(r, label) for r in meta["roles"] for label in meta["labels"]]
            counts = {k: z[f"counts/{k[0]}/{k[1]}"] for k in keys}
            totals = {k: z[f"totals/{k[0]}/{k[1]}"] for k in keys}
        return cls(meta["labels"], meta["roles"], counts, totals, hi=meta["hi"], lo=meta["lo"])


@torch.no_grad()
def compute_selectivity(
    model: ReplacementModel,
    bank: Sequence[Mapping[str, Any]],
    *,
    labels: Sequence[str] = ("state", "language"),
    roles: Sequence[str] = ROLES,
    hi: float = 0.9,
    lo: float = 0.05,
) -> SelectivityTable:
    """Count, over the labeled prompts of ``bank``, where every feature of ``model``'s
    transcoders fires, per role, label and value (one clean run per prompt)."""
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"selectivity thresholds need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    values = {label: sorted({str(p["labels"][label]) for p in bank if label in p["labels"]}) for label in labels}
    shape = (model.n_layers, model.transcoders.d_transcoder)
    counts = {(r, label): np.zeros((len(values[label]), *shape), np.int64) for r in roles for label in labels}
    totals = {(r, label): np.zeros(len(values[label]), np.int64) for r in roles for label in labels}
    for item in bank:
        tokens = model.tokenize(item["prompt"])
        _, acts = model.get_activations(tokens, sparse=False)
        for role in roles:
            pos = None if role == ANY else role_position(model.tokenizer, tokens, role, item)
            fired = fired_at(acts, role, pos)
            if fired is None:
                continue
            fired_np = fired.cpu().numpy()
            for label in labels:
                if label in item["labels"]:
                    v = values[label].index(str(item["labels"][label]))
                    counts[role, label][v] += fired_np
                    totals[role, label][v] += 1
    return SelectivityTable(values, list(roles), counts, totals, hi=hi, lo=lo)
