"""How the intervention report reads a run out: numbers rounded to 6 significant digits (NaN and
inf as JSON null), token texts, top-token tables and the KL divergence from the clean run.

Shared by :mod:`pipeline.analysis.evaluation` (the clean run, top-k ablations, faithfulness,
summary) and :mod:`pipeline.analysis.experiments` (each experiment and its baselines), so that
every number of a report is written the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.engine.replacement import ReplacementModel

__all__ = ["kl_divergence", "rounded", "token_text", "top_tokens"]


def rounded(x: float | None) -> float | None:
    """Round to 6 significant digits; NaN / inf / None -> None (JSON null)."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


def token_text(model: ReplacementModel, token_id: int) -> str:
    """The text of one token."""
    return model.tokenizer.decode([int(token_id)])


def top_tokens(model, logits: Tensor, k: int) -> list[dict]:
    """The ``k`` most probable next tokens of ``logits`` (d_vocab,): rank, id, token, probability
    (softmax in float64) and logit, rounded."""
    probs = torch.softmax(logits.double(), -1)
    p, idx = torch.topk(probs, min(k, probs.numel()))
    return [
        {
            "rank": i + 1,
            "id": int(t),
            "token": token_text(model, int(t)),
            "prob": rounded(float(pp)),
            "logit": rounded(float(logits[t])),
        }
        for i, (pp, t) in enumerate(zip(p, idx))
    ]


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> float:
    """KL(p || q) of the next-token distributions of two logit vectors, in float64."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())
