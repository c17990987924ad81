"""A prompt's token ids, and the rules a runnable prompt follows (not empty, within the context),
shared by :meth:`ReplacementModel.tokenize` and :class:`PromptTokenizer`, which tokenizes as the
replacement model does without loading weights or transcoders."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor
from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources._bridge_builder import (
    build_bridge_config_from_hf,
    configure_tokenizer,
    skip_tokenizer_for_modality,
)
from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config
from transformer_lens.utilities.hf_utils import autotokenizer_with_special_token_compat
from transformers import AutoConfig, AutoTokenizer

__all__ = [
    "PromptError",
    "PromptTokenizer",
    "check_prompt_text",
    "check_prompt_tokens",
    "check_token_ids",
    "check_unknown_tokens",
    "unknown_token_id",
]

#: how a caller lets unknown tokens through (the option's spelling on the command line and in the config)
ALLOW_UNKNOWN_HINT = "--allow-unknown-tokens (attribution.allow_unknown_tokens=true)"


class PromptError(ValueError):
    """The prompt cannot be run (empty, too long, not text, unknown words, bad token ids)."""


def check_prompt_text(prompt: object) -> None:
    """A text prompt must be a ``str`` of valid UTF-8 text holding something besides whitespace."""
    if isinstance(prompt, (bytes, bytearray)):
        raise PromptError("the prompt is bytes, not text: decode it first (prompt.decode('utf-8'))")
    if not isinstance(prompt, str):
        raise PromptError(
            f"the prompt is a {type(prompt).__name__}, not text: give a str, or token ids as a 1-D integer tensor"
        )
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: bytes that were not UTF-8 (argv, surrogateescape)
        bad = prompt[exc.start]
        byte = f" (byte 0x{ord(bad) - 0xDC00:02x})" if 0xDC80 <= ord(bad) <= 0xDCFF else ""
        raise PromptError(
            f"the prompt is not valid UTF-8 text{byte} at character {exc.start}: "
            "save the prompt (or prompt file) as UTF-8"
        ) from None
    if not prompt.strip():
        raise PromptError("the prompt is empty: give at least one token of text")


def check_token_ids(tokens: object, d_vocab: int) -> Tensor:
    """Token ids given as a tensor: integers in [0, d_vocab), shape (n,) or (1, n); returns them
    as a long tensor (n,)."""
    if not isinstance(tokens, Tensor):
        raise PromptError(f"token ids must be a torch tensor, got {type(tokens).__name__}")
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        raise PromptError(
            f"token ids must be an integer tensor, got dtype {tokens.dtype}: convert them with .long() "
            "(after checking they are whole numbers)"
        )
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise PromptError(
            f"token ids must have shape (n,) or (1, n) (one prompt), got {tuple(tokens.shape)}: "
            "attribute one prompt at a time"
        )
    tokens = tokens.to(torch.long)
    bad = ((tokens < 0) | (tokens >= d_vocab)).nonzero().flatten()
    if len(bad):
        pos = int(bad[0])
        raise PromptError(
            f"token id {int(tokens[pos])} at position {pos} is outside the vocabulary [0, {d_vocab}): "
            "tokenize the prompt with this model's tokenizer"
        )
    return tokens


def unknown_token_id(tokenizer) -> int | None:
    """The tokenizer's unknown-token id, or None when it makes none: no unk token, or one that
    doubles as BOS/EOS/padding (GPT-2's byte-level BPE names ``<|endoftext|>``, which encodes
    every text without it)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    specials = {getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad")}
    return None if unk in specials else int(unk)


def _unknown_words(tokenizer, text: str, unk: int) -> list[str]:
    """The pieces of ``text`` the tokenizer encodes as the unknown token."""
    words: list[str] = []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        words = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizers have no offsets
        words = [w for w in text.split() if unk in tokenizer.encode(w, add_special_tokens=False)]
    return list(dict.fromkeys(w.strip() or w for w in words))


def check_unknown_tokens(tokenizer, tokens: Tensor, text: str | None = None) -> None:
    """Refuse a prompt whose ids (n_pos,) hold the tokenizer's unknown token: the words it does
    not know would silently be attributed as ``<unk>``. ``text``: the prompt, to name the words."""
    unk = unknown_token_id(tokenizer)
    if unk is None or not bool((tokens == unk).any()):
        return
    unk_name = getattr(tokenizer, "unk_token", None) or str(unk)
    words = _unknown_words(tokenizer, text, unk) if text is not None else []
    if words:
        what = "word" if len(words) == 1 else "words"
        named = ", ".join(repr(w) for w in words)
        raise PromptError(
            f"the tokenizer does not know the prompt's {what} {named} (tokenized as {unk_name}): "
            f"check the spelling, or pass {ALLOW_UNKNOWN_HINT} to attribute {unk_name}"
        )
    positions = [int(p) for p in (tokens == unk).nonzero().flatten()]
    raise PromptError(
        f"the prompt's token ids hold the unknown token {unk_name} (id {unk}) at position(s) {positions}: "
        f"check the prompt's spelling, or pass {ALLOW_UNKNOWN_HINT} to attribute {unk_name}"
    )


def check_prompt_tokens(tokens: Tensor, n_ctx: int, *, from_text: bool) -> None:
    """Token ids (n_pos,), BOS included: at least one token after BOS (for a text prompt) and
    no more than the model's context."""
    if from_text and tokens.numel() < 2:
        raise PromptError("the prompt is empty: give at least one token of text")
    if tokens.numel() > n_ctx:
        raise PromptError(
            f"the prompt has {tokens.numel()} tokens (BOS included) but the model's context "
            f"is {n_ctx}: shorten the prompt"
        )


class PromptTokenizer:
    """The model's prompt tokenization without its weights or transcoders.

    ``tokenize(prompt)`` gives the ids ``ReplacementModel.tokenize`` gives (BOS prepended when
    the tokenizer does not add one, the same empty-prompt and context-length errors): the
    tokenizer and the bridge config are built by TransformerLens's own boot steps
    (``boot_transformers``: the model's config, its architecture adapter, the tokenizer
    loaded with ``add_bos_token`` and normalised by ``configure_tokenizer``), and the ids come
    from the bridge's own ``to_tokens``; only the weights are never read. The tokenize stage
    therefore depends on the model alone (tests/stages/test_pipeline.py checks the ids are equal).
    """

    def __init__(self, name: str, revision: str | None = None):
        hf_config = AutoConfig.from_pretrained(name, revision=revision, output_attentions=True)
        architecture = determine_architecture_from_hf_config(hf_config)
        bridge_cfg = build_bridge_config_from_hf(hf_config, architecture, name, torch.float32)
        cfg = ArchitectureAdapterFactory.select_architecture_adapter(bridge_cfg).cfg
        cfg.device = "cpu"
        if skip_tokenizer_for_modality(cfg):
            raise ValueError(f"{name} is not a text model: it has no tokenizer")
        source = getattr(cfg, "tokenizer_name", None) or name
        use_fast = getattr(cfg, "use_fast", True)
        try:
            tok = autotokenizer_with_special_token_compat(
                source, auto_tokenizer=AutoTokenizer, add_bos_token=True, use_fast=use_fast, revision=revision
            )
        except ValueError:
            tok = AutoTokenizer.from_pretrained(source, use_fast=use_fast, revision=revision)
        self.tokenizer = configure_tokenizer(tok, cfg)
        self.cfg = cfg
        self.n_ctx = int(cfg.n_ctx)
        self._to_tokens = TransformerBridge.to_tokens  # uses only .tokenizer and .cfg of its self

    def tokenize(self, prompt: str, *, allow_unknown_tokens: bool = False):
        """Input ids (n_pos,) as ``ReplacementModel.tokenize(prompt)``, on the CPU; a word the
        tokenizer does not know is an error unless ``allow_unknown_tokens``."""
        check_prompt_text(prompt)
        bridge = SimpleNamespace(tokenizer=self.tokenizer, cfg=self.cfg)  # all of the bridge that to_tokens uses
        tokens = self._to_tokens(bridge, prompt, truncate=False, move_to_device=False)[0]  # type: ignore[arg-type]
        check_prompt_tokens(tokens, self.n_ctx, from_text=True)
        if not allow_unknown_tokens:
            check_unknown_tokens(self.tokenizer, tokens, prompt)
        return tokens

    def convert_ids_to_tokens(self, ids):
        return self.tokenizer.convert_ids_to_tokens(ids)
