"""Where every tensor the replacement model touches lives on the TransformerLens 4 bridge.

Transcoder configs published for circuit-tracer name their read and write locations with
TransformerLens **2** hook names, relative to a block. Some of those names mean another
tensor on the TL4 bridge (``docs/hooks.md``, measured table), so every name goes through
``block_hook`` which returns the bridge hook carrying the tensor TL2 meant.

This module is the single table of hook names; nothing else spells them out.
"""

from __future__ import annotations

import re

# TL2 block-relative names a transcoder config may use, and whether they can be a write
# location (the MLP output the transcoder predicts) as well as a read location.
READ_HOOKS = frozenset(
    {
        "ln2.hook_normalized",
        "ln2.hook_out",
        "mlp.hook_in",
        "hook_mlp_in",
        "hook_resid_mid",
        "hook_resid_pre",
    }
)
WRITE_HOOKS = frozenset({"mlp.hook_out", "hook_mlp_out"})

# Global (not per-block) locations.
EMBED = "hook_embed"  # token embedding, before positional embeddings are added
UNEMBED_IN = "unembed.hook_in"  # TL2's unembed.hook_pre: after the final norm

POS_EMBED = "hook_pos_embed"  # learned positional embedding (GPT-2); rotary models never fire it


# Per-layer locations that QK attribution (pipeline/engine/qk.py) reads.
def resid_pre(layer: int) -> str:
    """The residual stream entering block ``layer`` (the first norm's input)."""
    return f"blocks.{layer}.hook_resid_pre"


def attn_out(layer: int) -> str:
    """What block ``layer``'s attention adds to the residual stream (output bias included)."""
    return f"blocks.{layer}.hook_attn_out"


def ln1_scale(layer: int) -> str:
    """The scale block ``layer``'s first norm divides by: (batch, n_pos, 1)."""
    return f"blocks.{layer}.ln1.hook_scale"


def attn_scores(layer: int) -> str:
    """Pre-softmax scores (batch, n_heads, n_query, n_key) of block ``layer``: already times the
    model's score scaling (1/sqrt(d_head) on GPT-2 and Llama), masked positions at finfo.min."""
    return f"blocks.{layer}.attn.hook_attn_scores"


def rotary_cos_sin(layer: int) -> tuple[str, str]:
    """The rotary tables (batch, n_pos, rotary_dim) block ``layer`` applied (rotary models only)."""
    return f"blocks.{layer}.attn.hook_cos", f"blocks.{layer}.attn.hook_sin"


# Every normalisation scale: ln1, ln2, post-norms (Gemma-2's ln1_post / ln2_post), ln_final.
_SCALE_HOOK = re.compile(r"(^|\.)ln\w*\.hook_scale$")


def is_norm_scale_hook(name: str) -> bool:
    """True for the hook of any normalisation's scale (frozen during attribution)."""
    return bool(_SCALE_HOOK.search(name))


def is_attention_pattern_hook(name: str) -> bool:
    return name.endswith("attn.hook_pattern")


def attention_heads_hook(layer: int) -> str:
    """Bridge hook of layer ``layer``'s per-head attention output before W_O (TL's ``hook_z``,
    an alias of ``attn.o.hook_in``): (batch, pos, n_heads, d_head), one slice per query head
    (grouped-query models too: their key/value heads are shared, the outputs are not)."""
    return f"blocks.{layer}.attn.hook_z"


def block_hook(name: str, layer: int, normalization: str) -> str:
    """Bridge hook for a TL2 block-relative ``name`` at ``layer``.

    normalization: the bridge's ``cfg.normalization_type`` ("LN", "LNPre", "RMS", "RMSPre").
    ``ln2.hook_normalized`` meant the MLP input (after weight and bias) on LayerNorm models in
    TL2, but is the tensor before weight and bias on the bridge; on RMSNorm models both
    mean x / rms before the weight.
    """
    if name not in READ_HOOKS and name not in WRITE_HOOKS:
        known = ", ".join(sorted(READ_HOOKS | WRITE_HOOKS))
        raise ValueError(f"unknown transcoder hook {name!r}: use one of {known} in the transcoders' config.yaml")
    prefix = f"blocks.{layer}."
    if name == "ln2.hook_normalized" and normalization.upper().startswith("LN"):
        return prefix + "mlp.hook_in"
    if name == "hook_mlp_in":
        # fires on the bridge only after set_use_hook_mlp_in(True); mlp.hook_in is the same tensor
        return prefix + "mlp.hook_in"
    return prefix + name
