"""Loading what a per-prompt stage needs, from the validated config: the replacement model
(model + transcoders), or only the prompt tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from safetensors.torch import load_file
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

from pipeline.engine.replacement import PromptError, ReplacementModel
from pipeline.run.config import PipelineConfig
from pipeline.transcoders import CrossLayerTranscoder, load_transcoders


def load_replacement_model(cfg: PipelineConfig, dtype: str | None = None, lazy_encoder: bool = False):
    """``ReplacementModel`` for ``cfg.model`` + ``cfg.transcoders`` (dtype: ``attribution.dtype``
    unless given; lazy_encoder for stages that encode once)."""
    torch_dtype = getattr(torch, dtype or cfg.attribution.dtype)
    tc = load_transcoders(
        cfg.transcoders.source,
        revision=cfg.transcoders.revision,
        device=cfg.runtime.device,
        dtype=torch_dtype,
        lazy_encoder=lazy_encoder,
    )
    is_clt = isinstance(tc, CrossLayerTranscoder)
    if is_clt != (cfg.transcoders.kind == "clt"):
        raise ValueError(
            f"transcoders.kind is {cfg.transcoders.kind!r} but {cfg.transcoders.source} holds "
            f"{'a cross-layer transcoder' if is_clt else 'per-layer transcoders'}"
        )
    return ReplacementModel.from_pretrained(
        cfg.model.name, tc, dtype=torch_dtype, device=cfg.runtime.device, revision=cfg.model.revision
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
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty: give at least one token of text")
        bridge = SimpleNamespace(tokenizer=self.tokenizer, cfg=self.cfg)  # all of the bridge that to_tokens uses
        tokens = self._to_tokens(bridge, prompt, truncate=False, move_to_device=False)[0]  # type: ignore[arg-type]
        if tokens.numel() < 2:
            raise PromptError("the prompt is empty: give at least one token of text")
        if tokens.numel() > self.n_ctx:
            raise PromptError(
                f"the prompt has {tokens.numel()} tokens (BOS included) but the model's context "
                f"is {self.n_ctx}: shorten the prompt"
            )
        return tokens

    def convert_ids_to_tokens(self, ids):
        return self.tokenizer.convert_ids_to_tokens(ids)


def load_prompt_tokenizer(cfg: PipelineConfig) -> PromptTokenizer:
    """The prompt tokenizer of ``cfg.model`` (no weights, no transcoders)."""
    return PromptTokenizer(cfg.model.name, revision=cfg.model.revision)


def read_tokens(path):
    """The prompt's token ids (n_pos,) as the tokenize stage wrote them."""
    return load_file(str(path))["tokens"]
