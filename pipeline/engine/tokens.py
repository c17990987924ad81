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

__all__ = ["PromptError", "PromptTokenizer", "check_prompt_text", "check_prompt_tokens"]


class PromptError(ValueError):
    """The prompt cannot be run (empty, too long)."""


def check_prompt_text(prompt: object) -> None:
    """A text prompt must hold something besides whitespace."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("the prompt is empty: give at least one token of text")


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

    def tokenize(self, prompt: str):
        """Input ids (n_pos,) as ``ReplacementModel.tokenize(prompt)``, on the CPU."""
        check_prompt_text(prompt)
        bridge = SimpleNamespace(tokenizer=self.tokenizer, cfg=self.cfg)  # all of the bridge that to_tokens uses
        tokens = self._to_tokens(bridge, prompt, truncate=False, move_to_device=False)[0]  # type: ignore[arg-type]
        check_prompt_tokens(tokens, self.n_ctx, from_text=True)
        return tokens

    def convert_ids_to_tokens(self, ids):
        return self.tokenizer.convert_ids_to_tokens(ids)
