"""Steered generation: feature interventions on the prompt and on every generated token.

The prompt pass is an intervened forward pass (:mod:`pipeline.engine.intervened_forward`) with
its mode; every generated position runs like circuit-tracer's open-ended hooks: iterative,
attention free, the base model's MLPs (its error is recomputed, whatever ``errors`` says: a
generated position has no clean run) plus the decoder changes of the open-ended interventions
(``pos=slice(k, None)``), by default at every generated position (``generated_positions``).
With ``use_kv_cache=True`` the prompt's keys and values are computed once, under the
intervention, and each step runs one token; cached and uncached generation give the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Unpack

import torch
from torch import Tensor

from pipeline.engine.intervened_forward import CleanRun, HookedModel, InterventionPass, clean_run
from pipeline.engine.interventions import ModeArguments, as_finite, as_int, effective_mode, resolve_mode, resolve_plan


@dataclass
class GenerationResult:
    """One steered generation.

    text: prompt + completion, decoded without special tokens; completion: the new tokens only
    tokens: (n_prompt + n_new,) ids, BOS first
    logits: (n_new, d_vocab); logits[i] is the distribution token n_prompt + i was drawn from
    activations: (n_layers, n_prompt + n_new - 1, d_transcoder) at every position that was run
    """

    text: str
    completion: str
    tokens: Tensor
    logits: Tensor
    activations: Tensor
    n_prompt: int


def _sample(
    logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> int:
    if not do_sample:
        return int(torch.argmax(logits))
    scores = logits.double() / temperature
    if top_k is not None and top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _new_cache(model: HookedModel):
    # imported here: transformers takes about a second to import, and only cached generation
    # needs it (the model loaded it already by then)
    from transformers import DynamicCache

    return DynamicCache(config=model.bridge.original_model.config)


@torch.no_grad()
def feature_intervention_generate(
    model: HookedModel,
    prompt: str | Tensor,
    interventions: Sequence,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    use_kv_cache: bool = True,
    stop_at_eos: bool = True,
    apply_activation_function: bool = True,
    sparse: bool = False,
    generated_positions: str = "all",
    clean: CleanRun | None = None,
    **mode_args: Unpack[ModeArguments],
) -> GenerationResult:
    """Generate with interventions (circuit-tracer's ``feature_intervention_generate``).

    The prompt pass is :func:`~pipeline.engine.intervened_forward.feature_intervention` with
    the same mode (the arguments it shares mean the same); open-ended
    interventions (``pos=slice(k, None)``) also apply at generated positions, which run live
    (see the module docstring): at every one with ``generated_positions="all"`` (circuit-tracer's
    rule, whatever the slice's start and step), at those the slice selects with ``"slice"``
    (position >= k, every step-th). Sampling: greedy unless ``do_sample``; then softmax of
    logits / ``temperature`` over the ``top_k`` best, drawn from a generator seeded with
    ``seed`` (the global RNG when None). ``clean``: the prompt's :func:`clean_run`, when the
    caller has it (an ``InterventionRunner``'s ``clean``), so it is not recomputed; it
    must be the run of this ``prompt``.
    """
    if as_int(max_new_tokens, "max_new_tokens") <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if do_sample and not as_finite(temperature, "temperature") > 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    if top_k is not None and as_int(top_k, "top_k") <= 0:
        raise ValueError(f"top_k must be positive or None, got {top_k}")
    m = model
    if clean is None:
        clean = clean_run(m, prompt)
    elif isinstance(prompt, Tensor) and not torch.equal(prompt.to(clean.tokens.device).reshape(-1), clean.tokens):
        raise ValueError("clean is the run of another prompt than the one given")
    n_prompt = clean.n_pos
    if n_prompt + max_new_tokens - 1 > m.n_ctx:
        raise ValueError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {m.n_ctx}: generate fewer tokens"
        )
    mode = resolve_mode(m.n_layers, **mode_args)
    plan = resolve_plan(
        interventions,
        m.n_layers,
        m.transcoders.d_transcoder,
        n_prompt,
        generating=True,
        generated_positions=generated_positions,
    )
    mode = effective_mode(mode, plan, clean.activations)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=clean.logits.device).manual_seed(int(seed))
    eos = m.tokenizer.eos_token_id if stop_at_eos else None

    tokens = clean.tokens.clone()
    step_logits: list[Tensor] = []
    step_acts: list[Tensor] = []
    cache = _new_cache(m) if use_kv_cache else None
    offset = 0
    while True:
        seq = tokens[offset:] if cache is not None else tokens
        p = InterventionPass(
            m, clean, plan, mode, offset if cache is not None else 0, seq.numel(), apply_activation_function
        )
        # TransformerLens 4.3 on transformers 5 does not hand the cache to its attention
        # components (transformers passes it as ``cache``, the bridge looks for
        # ``past_key_values`` / ``layer_past``): pass it under both names, and refuse a cache
        # that was not filled
        kwargs = {"past_key_values": cache, "layer_past": cache} if cache is not None else {}
        with m.hooks(p.hooks()):
            logits = m.bridge(seq[None], **kwargs)[0]
        if cache is not None:
            if cache.get_seq_length() != tokens.numel():
                raise RuntimeError(
                    f"the KV cache holds {cache.get_seq_length()} positions after a pass over "
                    f"{tokens.numel()}: this transformer_lens / transformers pair does not fill it; "
                    "generate with use_kv_cache=False"
                )
            step_acts.append(p.activations())
            offset = tokens.numel()
        else:
            step_acts = [p.activations()]
        last = logits[-1]
        step_logits.append(last)
        nxt = _sample(last, do_sample, temperature, top_k, generator)
        tokens = torch.cat([tokens, torch.tensor([nxt], dtype=tokens.dtype, device=tokens.device)])
        if len(step_logits) == max_new_tokens or (eos is not None and nxt == eos):
            break
    acts = torch.cat(step_acts, dim=1)
    if sparse:
        acts = acts.to_sparse().coalesce()
    tok = m.tokenizer
    ids = tokens.tolist()
    return GenerationResult(
        text=tok.decode(ids, skip_special_tokens=True),
        completion=tok.decode(ids[n_prompt:], skip_special_tokens=True),
        tokens=tokens,
        logits=torch.stack(step_logits),
        activations=acts,
        n_prompt=n_prompt,
    )
