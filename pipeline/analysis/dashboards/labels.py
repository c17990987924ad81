"""Automatic feature labels: ``"<top input tokens> → <top output tokens>"`` (docs/dashboards.md, step 7)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import MAX_SEQ_LEN, POS_BITS, DashboardConfig
from .logits import DecoderLogits


def short_token(token: str, limit: int = 24) -> str:
    """A token as a label shows it: stripped (repr if only whitespace), at most ``limit`` chars."""
    s = token.strip()
    if not s:
        s = repr(token) if token else "''"
    return s if len(s) <= limit else s[: limit - 1] + "…"


def auto_label(
    input_tokens: Sequence[str], output_tokens: Sequence[str], *, n_inputs: int = 3, n_outputs: int = 3
) -> str:
    """``"in1/in2/in3 → out1/out2/out3"``: the most common tokens where a feature fires most
    (in order of first appearance among ties) and its top output logits; ``(dead)`` inputs
    when it never fired."""
    return _compose(
        [short_token(t) for t in input_tokens], [short_token(t) for t in output_tokens], n_inputs, n_outputs
    )


def _compose(ins: Sequence[str], outs: Sequence[str], n_inputs: int, n_outputs: int) -> str:
    counts = Counter(ins)
    order = {t: i for i, t in reversed(list(enumerate(ins)))}  # first appearance
    left = sorted(counts, key=lambda t: (-counts[t], order[t]))[:n_inputs]
    right = list(dict.fromkeys(outs))[:n_outputs]
    text = "/".join(left) if left else "(dead)"
    return f"{text} → {'/'.join(right)}" if right else text


def feature_labels(
    cfg: DashboardConfig,
    n_features: int,
    examples: list[dict[str, Any]],
    seqs: dict[str, np.ndarray],
    logits: list[DecoderLogits],
    vocab: list[str],
) -> list[str]:
    """The label of every feature, layer-major: the tokens of its top-k examples and its top logits.

    examples[l]["tid"]: layer l's example token ids, the top-k ones first (F * K);
    seqs: the stored sequences table (id, offsets, tokens); vocab: every token id's string.
    """
    short = [short_token(t) for t in vocab]
    labels = []
    for layer, ex in enumerate(examples):
        F, K = n_features, cfg.top_k
        tid = ex["tid"][: F * K].reshape(F, K)
        seq_row = np.searchsorted(seqs["id"], tid >> POS_BITS).clip(0, max(seqs["id"].size - 1, 0))
        tok_at = np.full(tid.shape, -1, dtype=np.int64)
        has = tid >= 0
        if has.any():
            tok_at[has] = seqs["tokens"][seqs["offsets"][seq_row[has]] + (tid[has] & (MAX_SEQ_LEN - 1))]
        n_out = max(cfg.label_outputs * 3, cfg.label_outputs)  # enough to fill after de-duplication
        ins_all = tok_at.tolist()
        outs_all = logits[layer].top_id[:, :n_out].tolist()
        for f in range(F):
            ins = [short[t] for t in ins_all[f] if t >= 0]
            outs = [short[t] for t in outs_all[f]]
            labels.append(_compose(ins, outs, cfg.label_inputs, cfg.label_outputs))
    return labels
