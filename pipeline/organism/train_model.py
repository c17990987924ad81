"""Train the organism: a small GPT-2-style language model on the toy world's corpus.

1. Build the world's word-level tokenizer and tokenize every distinct training sentence once
   (``<bos>`` prepended, right-padded to the longest sentence).
2. Sample ``steps * batch_size`` sentences with ``World.corpus`` (seeded, kind-weighted): the
   first ``curriculum_fraction`` of them with the curriculum's kind weights (the one-hop facts
   first), the rest with the world's.
3. Train a ``GPT2LMHeadModel`` (dropout 0, tied embeddings; the attention of
   ``attention_free_blocks`` silenced after every step) with AdamW, linear warmup then
   cosine decay, next-token loss on every real token after ``<bos>`` (``loss_on="all"``: the
   model is a language model of the corpus, not only a fact classifier; template words are
   deterministic given their prefix and cost nothing to learn, names after the template
   carry the facts). ``loss_on="answer"`` trains only the final word.
4. Evaluate greedily on the canonical-template prompts (one-hop, two-hop trained/held out, per
   language, and the default prompt set) and save model + tokenizer with ``save_pretrained``
   (safetensors) into ``out_dir`` atomically, with ``metrics.json`` and ``organism.json``
   (the configs).

Deterministic: same configs and thread count -> identical ``model.safetensors`` bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import cast

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from ._util import atomic_directory, read_json, torch_scope, write_json
from .config import MASSIVE_ACTIVATION_DIM, ModelConfig, TrainConfig
from .optim import PortableAdamW
from .shaping import register_shaping, shaping_penalty
from .tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from .world import Sentence, World, WorldConfig, make_world


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at (0-based) ``step``: linear warmup, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * t))


def gpt2_config(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=model_cfg.n_ctx,
        n_embd=model_cfg.d_model,
        n_layer=model_cfg.n_layers,
        n_head=model_cfg.n_heads,
        n_inner=model_cfg.d_mlp,
        activation_function=model_cfg.activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=model_cfg.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def silence_attention(model: GPT2LMHeadModel, blocks: tuple[int, ...]) -> None:
    """Zero the attention output projection of ``blocks``: their attention then writes nothing."""
    with torch.no_grad():
        for b in blocks:
            for weight in model.transformer.h[b].get_submodule("attn.c_proj").parameters():
                weight.zero_()


def fix_massive_activation(model: GPT2LMHeadModel, value: float) -> None:
    """Set dimension MASSIVE_ACTIVATION_DIM of block 0's MLP output bias to ``value``
    (ModelConfig.massive_activation)."""
    if value:
        bias = cast(Tensor, model.transformer.h[0].get_submodule("mlp.c_proj").bias)
        with torch.no_grad():
            bias[MASSIVE_ACTIVATION_DIM] = value


# --- tokenized batches ---------------------------------------------------------------------------
def encode_texts(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> tuple[Tensor, Tensor]:
    """``<bos>`` + words, right-padded. returns ids (n, L) and lengths (n,) including BOS."""
    rows = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts]
    if any(tokenizer.unk_token_id in r for r in rows):
        raise ValueError("a text contains words outside the tokenizer's vocabulary")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


@torch.no_grad()
def last_position_logits(model: GPT2LMHeadModel, ids: Tensor, lengths: Tensor, batch: int = 512) -> Tensor:
    """Next-token logits after the last real token of each row. ids (n, L) -> (n, vocab)."""
    out = []
    for i in range(0, len(ids), batch):
        x, n = ids[i : i + batch], lengths[i : i + batch]
        mask = (torch.arange(x.shape[1]) < n[:, None]).long()
        logits = model(input_ids=x, attention_mask=mask).logits
        out.append(logits[torch.arange(len(x)), n - 1])
    return torch.cat(out)


@torch.no_grad()
def prompt_accuracy(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, prompts: list[str], answers: list[str]
) -> tuple[float, list[str]]:
    """Greedy next-token accuracy; also returns the predicted words."""
    if not prompts:
        return float("nan"), []
    ids, lengths = encode_texts(tokenizer, prompts)
    pred = last_position_logits(model, ids, lengths).argmax(-1)
    words = cast(list[str], tokenizer.convert_ids_to_tokens(pred.tolist()))  # a list for a list of ids
    return sum(w == a for w, a in zip(words, answers)) / len(prompts), words


def evaluate_model(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, world: World) -> dict:
    """Greedy next-token accuracies on the canonical-template prompts and the prompt set."""
    model.eval()
    metrics: dict = {}
    sets = world.eval_sets()

    def acc(sents: list[Sentence]) -> float:
        return prompt_accuracy(model, tokenizer, [s.prompt for s in sents], [s.answer for s in sents])[0]

    metrics["one_hop_accuracy"] = acc(sets["one_hop"])
    metrics["two_hop_trained_accuracy"] = acc(sets["two_hop_trained"])
    metrics["two_hop_heldout_accuracy"] = acc(sets["two_hop_heldout"])
    for lang in world.languages:
        for name, sents in sets.items():
            metrics[f"{name}_accuracy_{lang}"] = acc([s for s in sents if s.language == lang])
        metrics[f"language_accuracy_{lang}"] = acc([s for v in sets.values() for s in v if s.language == lang])
    ps = world.prompt_set()
    a, words = prompt_accuracy(model, tokenizer, [p["prompt"] for p in ps], [p["answer"] for p in ps])
    metrics["prompt_set_accuracy"] = a
    metrics["prompt_set_predictions"] = {p["id"]: w for p, w in zip(ps, words)}
    metrics["n_eval_prompts"] = {k: len(v) for k, v in sets.items()}
    return metrics


# --- training ------------------------------------------------------------------------------------
def train_model(
    world: World,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train the organism on ``world``'s corpus; save it to ``out_dir`` (if given); return metrics.

    The saved directory holds ``config.json``, ``model.safetensors``, the tokenizer files,
    ``metrics.json`` and ``organism.json`` (world, model and train configs).
    """
    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or TrainConfig()
    t0 = time.perf_counter()
    with torch_scope(train_cfg.threads):
        model, tokenizer, metrics = _train(world, model_cfg, train_cfg, progress)
        if out_dir is not None:  # metrics.json holds no wall time: same configs -> same bytes
            with atomic_directory(out_dir) as tmp:
                model.save_pretrained(str(tmp))
                save_tokenizer(tokenizer, tmp)
                write_json(tmp / "metrics.json", metrics)
                write_json(
                    tmp / "organism.json",
                    {
                        "world": world.config.to_dict(),
                        "model": asdict(model_cfg),
                        "train": asdict(train_cfg),
                    },
                )
    metrics["wall_time_s"] = time.perf_counter() - t0  # returned (and logged by callers), never saved
    return metrics


def _train(world: World, model_cfg: ModelConfig, cfg: TrainConfig, progress: bool):
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(world.vocabulary())

    # 1. distinct sentences, tokenized once
    distinct = sorted({s.text for s in world.training_sentences()})
    row_of = {t: i for i, t in enumerate(distinct)}
    ids, lengths = encode_texts(tokenizer, distinct)
    if ids.shape[1] > model_cfg.n_ctx:
        raise ValueError(f"n_ctx {model_cfg.n_ctx} < longest sentence ({ids.shape[1]} tokens with BOS)")
    labels = ids.clone()
    pos = torch.arange(ids.shape[1])
    labels[pos[None, :] >= lengths[:, None]] = -100  # padding
    labels[:, 0] = -100  # BOS is never predicted
    if cfg.loss_on == "answer":
        labels[pos[None, :] != (lengths[:, None] - 1)] = -100
    attn = (pos[None, :] < lengths[:, None]).long()

    # 2. the sampled corpus, as rows of the table above
    n_curriculum = int(cfg.curriculum_fraction * cfg.steps) * cfg.batch_size
    # the curriculum's draws get their own stream (seed + 1000), so they do not repeat the main one's
    texts = world.corpus(n_curriculum, seed=cfg.seed + 1000, kind_weights=cfg.curriculum_kind_weights)
    texts += world.corpus(cfg.steps * cfg.batch_size - n_curriculum, seed=cfg.seed)
    order = torch.tensor([row_of[t] for t in texts])

    # 3. model and optimizer
    model = GPT2LMHeadModel(gpt2_config(model_cfg, tokenizer))
    silence_attention(model, model_cfg.attention_free_blocks)
    fix_massive_activation(model, model_cfg.massive_activation)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = PortableAdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    state_of_token = city_states(world, tokenizer)
    seen = register_shaping(model, model_cfg, cfg)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="organism model", disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        rows = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        width = int(lengths[rows].max())
        mask = attn[rows, :width]
        seen["cities"] = state_of_token[ids[rows, :width]]  # read by the shaping hooks
        out = model(input_ids=ids[rows, :width], attention_mask=mask, labels=labels[rows, :width])
        loss = out.loss
        for term in shaping_penalty(cfg, seen, mask.bool()):
            loss = loss + term
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        silence_attention(model, model_cfg.attention_free_blocks)  # AdamW's decay and momentum move them
        fix_massive_activation(model, model_cfg.massive_activation)
        losses.append(out.loss.item())
        if step % 20 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()

    # 4. evaluation
    model.eval()
    metrics = evaluate_model(model, tokenizer, world)
    tail = losses[-max(1, cfg.steps // 20) :]
    metrics["final_loss"] = sum(tail) / len(tail)
    metrics["loss_on"] = cfg.loss_on
    metrics["n_parameters"] = sum(p.numel() for p in model.parameters())
    metrics["n_distinct_sentences"] = len(distinct)
    metrics["steps"] = cfg.steps
    return model, tokenizer, metrics


def city_states(world: World, tokenizer: PreTrainedTokenizerFast) -> Tensor:
    """token id -> index of the state the city belongs to, -1 for a token that is no city. (vocab,)"""
    table = torch.full((len(tokenizer),), -1, dtype=torch.long)
    for i, state in enumerate(world.states):
        for city in state.cities:
            table[tokenizer.convert_tokens_to_ids(city)] = i
    return table


def load_organism(model_dir: str | Path) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, World]:
    """Load a saved organism: the HF model (eval mode), its tokenizer and its world."""

    model = GPT2LMHeadModel.from_pretrained(str(model_dir))
    model.eval()
    info = read_json(Path(model_dir) / "organism.json")
    return model, load_tokenizer(model_dir), make_world(WorldConfig.from_dict(info["world"]))
