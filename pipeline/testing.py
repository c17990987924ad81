"""Seeded, deterministic fixtures for tests and benchmarks: tiny models and random transcoders.

* ``make_tiny_gpt2`` / ``make_tiny_llama``: randomly initialised Hugging Face models saved
  with ``save_pretrained`` (float32, eval) plus a word-level tokenizer, loadable offline by
  ``transformer_lens.TransformerBridge.boot_transformers(directory)``.
  The GPT-2 tokenizer does not add BOS itself (like GPT-2's); the Llama tokenizer's
  post-processor does (like Llama's). Either way the bridge's ``to_tokens`` yields exactly one
  ``<bos>`` first: the bridge reloads a tokenizer that does not add BOS with
  ``add_bos_token=True``.
* ``make_random_plt`` / ``make_random_clt``: random transcoders written with the real
  writers, encoder biases calibrated so that about ``density`` of the features fire on inputs
  with per-coordinate scale ``input_scale`` (LayerNorm / RMSNorm outputs: ~1).

Same arguments and seed -> byte-identical files. The global torch RNG is left untouched.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from pipeline.transcoders import save_cross_layer_transcoder, save_transcoder_set

SPECIAL_TOKENS: tuple[str, ...] = ("<bos>", "<eos>", "<pad>", "<unk>")
BOS, EOS, PAD, UNK = SPECIAL_TOKENS

#: A small toy-world vocabulary (states, cities, capitals, two languages' function words).
DEFAULT_WORDS: tuple[str, ...] = (
    "the",
    "a",
    "of",
    "is",
    "in",
    "and",
    "capital",
    "state",
    "city",
    "containing",
    "which",
    "to",
    "from",
    "by",
    "it",
    "was",
    "la",
    "le",
    "de",
    "est",
    "capitale",
    "ville",
    "dans",
    "texas",
    "california",
    "florida",
    "ohio",
    "oregon",
    "nevada",
    "utah",
    "georgia",
    "austin",
    "sacramento",
    "tallahassee",
    "columbus",
    "salem",
    "carson",
    "atlanta",
    "boise",
    "dallas",
    "houston",
    "miami",
    "tampa",
    "portland",
    "reno",
    "provo",
    "savannah",
    "big",
    "small",
    "old",
    "new",
    "north",
    "south",
    "river",
    "lake",
    ".",
    ",",
)

DEFAULT_INPUT_HOOK = "ln2.hook_normalized"  # TL2 meaning: the MLP input
DEFAULT_OUTPUT_HOOK = "hook_mlp_out"


# ----------------------------------------------------------------------------- tokenizer
def _vocab(words: Sequence[str] | None) -> dict[str, int]:
    words = list(DEFAULT_WORDS if words is None else words)
    for w in words:
        if not isinstance(w, str) or not w or any(c.isspace() for c in w):
            raise ValueError(f"vocabulary word {w!r} must be a non-empty string without spaces")
        if w in SPECIAL_TOKENS:
            raise ValueError(f"vocabulary word {w!r} clashes with a special token")
    if len(set(words)) != len(words):
        raise ValueError("vocabulary words must be unique")
    return {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}


def _save_tokenizer(directory: Path, vocab: dict[str, int], *, n_ctx: int, adds_bos: bool) -> None:
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=n_ctx
    )
    fast.save_pretrained(directory)


def vocabulary_words(model_dir: str | os.PathLike) -> list[str]:
    """The ordinary (non-special) words of a fixture model's tokenizer, in id order."""
    data = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    return [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if w not in SPECIAL_TOKENS]


def _save_model(model, directory: Path, dtype: torch.dtype = torch.float32) -> None:
    model = model.eval().to(dtype)
    model.generation_config.bos_token_id = model.config.bos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(directory)


def _quiet_hf():
    hf_logging.disable_progress_bar()


# A builder makes a model from its vocabulary size, special token ids and size (the defaults
# of n_kv_heads, d_mlp and head_dim are the architecture's, see make_tiny_model).
def _gpt2(vocab_size, special, n_layers, d_model, n_heads, n_kv_heads, d_mlp, n_ctx, head_dim):
    if n_kv_heads is not None:
        raise ValueError("GPT-2 has no grouped-query attention: leave n_kv_heads None")
    if head_dim is not None:
        raise ValueError("GPT-2's heads are d_model / n_heads wide: leave head_dim None")
    sizes = dict(n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, **sizes, **special))


def _llama_family_sizes(n_layers, d_model, n_heads, n_kv_heads, d_mlp, n_ctx) -> dict[str, int]:
    """The sizes under the names Llama-family configs (Llama, Gemma-2) give them."""
    return dict(
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=n_ctx,
    )


def _llama(vocab_size, special, n_layers, d_model, n_heads, n_kv_heads, d_mlp, n_ctx, head_dim):
    if n_kv_heads is None:
        n_kv_heads = n_heads // 2 if n_heads % 2 == 0 else n_heads
    sizes = _llama_family_sizes(n_layers, d_model, n_heads, n_kv_heads, d_mlp or 4 * d_model, n_ctx)
    config = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, head_dim=head_dim, **sizes, **special)
    return LlamaForCausalLM(config)


def _gemma2(vocab_size, special, n_layers, d_model, n_heads, n_kv_heads, d_mlp, n_ctx, head_dim):
    if n_kv_heads is None:
        n_kv_heads = max(1, n_heads // 2)
    sizes = _llama_family_sizes(n_layers, d_model, n_heads, n_kv_heads, d_mlp or 2 * d_model, n_ctx)
    head_dim = head_dim or d_model // n_heads
    config = Gemma2Config(
        vocab_size=vocab_size,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=max(2, n_ctx // 2),
        **sizes,
        **special,
    )
    return Gemma2ForCausalLM(config)


#: architecture -> (builder of the model from its vocabulary size, special token ids and shape;
#: whether its tokenizer adds BOS by default, as the real model's does)
_ARCHITECTURES = {"gpt2": (_gpt2, False), "llama": (_llama, True), "gemma2": (_gemma2, True)}


def make_tiny_model(
    directory: str | os.PathLike,
    *,
    arch: str,
    n_layers: int = 2,
    d_model: int = 16,
    n_heads: int = 2,
    n_kv_heads: int | None = None,
    d_mlp: int | None = None,
    head_dim: int | None = None,
    n_ctx: int = 32,
    vocab_words: Sequence[str] | None = None,
    seed: int = 0,
    tokenizer_adds_bos: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A randomly initialised Hugging Face model + word-level tokenizer; use
    :func:`make_tiny_gpt2`, :func:`make_tiny_llama` or :func:`make_tiny_gemma2`.

    * gpt2: LayerNorm, learned positions, GELU MLP (d_mlp None: 4 * d_model); its tokenizer
      does not add BOS (``tokenizer_adds_bos`` None).
    * llama: RMSNorm, rotary, grouped-query attention (n_kv_heads None: n_heads // 2 when
      n_heads is even, else n_heads), SwiGLU (d_mlp None: 4 * d_model); adds BOS.
    * gemma2: RMSNorm with post-attention and post-MLP norms, logit soft-capping,
      sliding-window layers (n_kv_heads None: max(1, n_heads // 2); d_mlp None: 2 * d_model);
      adds BOS.

    head_dim (llama, gemma2): width of a head, None: d_model // n_heads (Gemma-2-2B's is 256
    with d_model 2304 and 8 heads).

    The model is built under ``seed`` (the global torch RNG is left as it was) and saved in
    ``dtype`` (bfloat16 halves a large benchmark model's files) with the tokenizer's files.
    """
    if arch not in _ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(_ARCHITECTURES)}, got {arch!r}")
    build, adds_bos = _ARCHITECTURES[arch]
    _quiet_hf()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(vocab_words)
    special = dict(bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[PAD])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(len(vocab), special, n_layers, d_model, n_heads, n_kv_heads, d_mlp, n_ctx, head_dim)
    _save_model(model, directory, dtype)
    _save_tokenizer(
        directory, vocab, n_ctx=n_ctx, adds_bos=adds_bos if tokenizer_adds_bos is None else tokenizer_adds_bos
    )
    return directory


make_tiny_gpt2 = functools.partial(make_tiny_model, arch="gpt2")
make_tiny_llama = functools.partial(make_tiny_model, arch="llama")
make_tiny_gemma2 = functools.partial(make_tiny_model, arch="gemma2")


# --------------------------------------------------------------------------- transcoders
def _gaussian_quantile(p: float) -> float:
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def _random_encoder(
    g: torch.Generator,
    d_model: int,
    d_transcoder: int,
    *,
    activation: str,
    density: float,
    input_scale: float,
) -> dict[str, Any]:
    """W_enc, b_enc (and threshold / top_k) with about ``density`` of features active.

    For x with iid per-coordinate scale s, w . x ~ N(0, s^2 |w|^2); a feature fires when
    w . x + b_enc > t (t = 0, or its JumpReLU threshold), so b_enc = t - s |w| z_{1-density}.
    """
    W_enc = torch.randn(d_transcoder, d_model, generator=g) / math.sqrt(d_model)
    norm = W_enc.norm(dim=1) * input_scale
    z = _gaussian_quantile(1.0 - density)
    jitter = 0.1 * torch.randn(d_transcoder, generator=g)
    out: dict[str, Any] = {"W_enc": W_enc}
    if activation == "relu":
        out["b_enc"] = -norm * (z + jitter)
    elif activation == "jump_relu":
        threshold = norm * (0.1 + 0.4 * torch.rand(d_transcoder, generator=g))
        out["threshold"] = threshold
        out["b_enc"] = threshold - norm * (z + jitter)
    elif activation == "topk":
        out["b_enc"] = 0.1 * norm * torch.randn(d_transcoder, generator=g)
        out["top_k"] = max(1, round(density * d_transcoder))
    else:
        raise ValueError(f"activation {activation!r} is unknown; use relu, jump_relu or topk")
    return out


def _check_sizes(n_layers: int, d_model: int, d_transcoder: int, density: float) -> None:
    if min(n_layers, d_model, d_transcoder) < 1:
        raise ValueError("n_layers, d_model and d_transcoder must be positive")
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must be in (0, 1), got {density}")


def make_random_transcoders(
    directory: str | os.PathLike,
    *,
    cross_layer: bool,
    n_layers: int,
    d_model: int,
    d_transcoder: int,
    activation: str = "relu",
    skip: bool = False,
    density: float = 0.1,
    feature_input_hook: str = DEFAULT_INPUT_HOOK,
    feature_output_hook: str = DEFAULT_OUTPUT_HOOK,
    gemmascope: bool = False,
    seed: int = 0,
    scale: float = 0.05,
    input_scale: float = 1.0,
    model_name: str | None = None,
    scan: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Random transcoders: per-layer in circuit-tracer's format (or GemmaScope's npz layout with
    ``gemmascope=True``), or with ``cross_layer=True`` cross-layer in circuit-tracer's
    W_enc_{i}/W_dec_{i} layout; use :func:`make_random_plt` / :func:`make_random_clt`.

    scale: norm of each decoder row (and about the norm of the skip term); b_dec has norm
    0.1 * scale. A CLT's decoder slice rows have norm scale / sqrt(n_layers - i), so the summed
    write of a feature over its output layers has about the norm of a PLT feature's.
    activation: relu | jump_relu | topk (k = round(density * d_transcoder); PLT only).
    skip=True adds W_skip (for a CLT, W_skip_{i}: our extension of the layout).
    dtype: the files' dtype (drawn in float32, then cast; bfloat16 halves a large set's files,
    and the GemmaScope npz layout holds no bfloat16).
    """
    _check_sizes(n_layers, d_model, d_transcoder, density)
    if cross_layer and activation not in ("relu", "jump_relu"):
        raise ValueError(f"activation {activation!r} is not supported for a CLT; use relu or jump_relu")
    if cross_layer and gemmascope:
        raise ValueError("the GemmaScope layout holds per-layer transcoders only")
    if gemmascope and dtype == torch.bfloat16:
        raise ValueError("the GemmaScope layout (npz) holds no bfloat16: use float32 or float16")
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(n_layers):
        n_out = n_layers - i if cross_layer else 1
        layer = _random_encoder(
            g,
            d_model,
            d_transcoder,
            activation=activation,
            density=density,
            input_scale=input_scale,
        )
        layer["W_dec"] = torch.randn(d_transcoder, n_out, d_model, generator=g) * (scale / math.sqrt(d_model * n_out))
        layer["b_dec"] = torch.randn(d_model, generator=g) * (0.1 * scale / math.sqrt(d_model))
        if skip:
            layer["W_skip"] = torch.randn(d_model, d_model, generator=g) * (scale / d_model)
        layers.append({k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in layer.items()})
    hooks_and_names: dict[str, Any] = dict(
        feature_input_hook=feature_input_hook, feature_output_hook=feature_output_hook, scan=scan, model_name=model_name
    )
    if cross_layer:
        decoders = [layer.pop("W_dec") for layer in layers]
        return save_cross_layer_transcoder(directory, layers, decoders, **hooks_and_names)
    for layer in layers:
        layer["W_dec"] = layer["W_dec"][:, 0]  # (d_transcoder, d_model)
    return save_transcoder_set(directory, layers, gemmascope=gemmascope, **hooks_and_names)


#: random per-layer transcoders (arguments: :func:`make_random_transcoders`)
make_random_plt = functools.partial(make_random_transcoders, cross_layer=False)
#: a random cross-layer transcoder (arguments: :func:`make_random_transcoders`)
make_random_clt = functools.partial(make_random_transcoders, cross_layer=True)
