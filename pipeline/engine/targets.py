"""Logit targets: the output nodes an attribution graph explains, and their read vectors.

A target is read at the unembedding's input, last position (``docs/algorithm.md``): a token's
target vector is its de-meaned unembedding column, so its row holds direct effects on that
token's logit minus the mean logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.engine.replacement import ReplacementModel
from pipeline.engine.tokens import ALLOW_UNKNOWN_HINT, PromptError, unknown_token_id


@dataclass
class LogitTarget:
    """One logit node: what it is called, which token it stands for, and its read vector.

    vector: (d_model,) read at the unembedding's input, last position
    probability: the weight of the node in influence computations (the token's probability
    for token targets)
    """

    label: str
    token_id: int
    probability: float
    vector: Tensor = field(repr=False)


def salient_logit_targets(
    model: ReplacementModel, logits: Tensor, max_n_logits: int, desired_logit_prob: float
) -> list[LogitTarget]:
    """The top next-token logits: at most ``max_n_logits``, until ``desired_logit_prob``.

    logits: (d_vocab,) at the last position
    """
    probs = torch.softmax(logits.double(), dim=-1)
    top_p, top_idx = torch.topk(probs, min(max_n_logits, probs.numel()))
    cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), desired_logit_prob)) + 1
    W_U = model.W_U
    mean = W_U.mean(dim=-1)
    return [
        LogitTarget(
            label=model.tokenizer.decode([int(t)]),
            token_id=int(t),
            probability=float(p),
            vector=(W_U[:, int(t)] - mean).detach(),
        )
        for p, t in zip(top_p[:cutoff], top_idx[:cutoff])
    ]


def custom_logit_targets(
    model: ReplacementModel, logits: Tensor, specs: Sequence, *, allow_unknown_tokens: bool = False
) -> list[LogitTarget]:
    """Logit targets the user names.

    Each spec is a token string (" Austin"), a pair of token strings (" Austin", " Dallas")
    for the difference of two logits, or a dict ``{"label", "vector" (d_model,),
    "probability"?}`` for any direction in the residual stream (finite, probability in (0, 1]).
    A token string the tokenizer encodes as its unknown token is refused unless
    ``allow_unknown_tokens``.
    logits: (d_vocab,) at the last position
    """
    probs = torch.softmax(logits.double(), dim=-1)
    targets = []
    for label, token_id, vector, probability in parse_logit_targets(
        model, specs, allow_unknown_tokens=allow_unknown_tokens
    ):
        prob = float(probs[token_id]) if probability is None else probability
        targets.append(LogitTarget(label, token_id, prob, vector))
    return targets


def parse_logit_targets(
    model: ReplacementModel, specs: Sequence, *, allow_unknown_tokens: bool = False
) -> list[tuple[str, int, Tensor, float | None]]:
    """(label, token id or -1, read vector, probability or None for the token's) of each spec
    of :func:`custom_logit_targets`, every spec checked; needs no forward pass."""
    if len(specs) == 0:
        raise ValueError("logit_targets is empty: give at least one target, or None for the top logits")
    W_U = model.W_U
    mean = W_U.mean(dim=-1)
    parsed: list[tuple[str, int, Tensor, float | None]] = []
    for spec in specs:
        if isinstance(spec, str):
            tok = _single_token(model, spec, allow_unknown_tokens)
            parsed.append((spec, tok, (W_U[:, tok] - mean).detach(), None))
        elif isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(s, str) for s in spec):
            a, b = (_single_token(model, s, allow_unknown_tokens) for s in spec)
            parsed.append((f"{spec[0]} - {spec[1]}", a, (W_U[:, a] - W_U[:, b]).detach(), None))
        elif isinstance(spec, dict) and "vector" in spec:
            label = str(spec.get("label", "custom"))
            vec = torch.as_tensor(spec["vector"], dtype=W_U.dtype, device=W_U.device).flatten()
            if vec.numel() != model.d_model:
                raise ValueError(
                    f"custom logit target {spec.get('label', '?')!r} has dimension {vec.numel()}, "
                    f"but the residual stream has d_model={model.d_model}"
                )
            if not bool(torch.isfinite(vec).all()):
                raise ValueError(f"custom logit target {label!r}: its vector holds NaN or inf: give a finite direction")
            prob = float(spec.get("probability", 1.0 / len(specs)))
            if not 0.0 < prob <= 1.0:  # False for NaN too
                raise ValueError(f"custom logit target {label!r}: probability must be in (0, 1], got {prob!r}")
            parsed.append((label, -1, vec, prob))
        else:
            raise ValueError(
                f"logit target {spec!r} not understood: give a token string, a pair of token "
                "strings, or {'label': ..., 'vector': [...]}"
            )
    return parsed


def _single_token(model: ReplacementModel, text: str, allow_unknown_tokens: bool = False) -> int:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"logit target {text!r} is {len(ids)} tokens ({ids}), not one: give a single token")
    unk = unknown_token_id(model.tokenizer)
    if not allow_unknown_tokens and unk is not None and int(ids[0]) == unk:
        raise PromptError(
            f"the tokenizer does not know the logit target {text!r} (tokenized as {model.tokenizer.unk_token}): "
            f"check the spelling, or pass {ALLOW_UNKNOWN_HINT} to attribute {model.tokenizer.unk_token}"
        )
    return int(ids[0])
