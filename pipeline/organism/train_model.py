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
from .config import ModelConfig, TrainConfig
from .optim import PortableAdamW
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
    """Set residual dimension 0 of block 0's MLP output bias to ``value`` (ModelConfig.massive_activation)."""
    if value:
        bias = cast(Tensor, model.transformer.h[0].get_submodule("mlp.c_proj").bias)
        with torch.no_grad():
            bias[0] = value


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
    is_stateless = torch.zeros(len(tokenizer), dtype=torch.bool)
    for place in world.stateless:
        is_stateless[tokenizer.convert_tokens_to_ids(place)] = True
    penalized = _training_hooks(model, model_cfg, cfg)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="organism model", disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        rows = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        width = int(lengths[rows].max())
        mask = attn[rows, :width]
        penalized["cities"] = state_of_token[ids[rows, :width]]  # read by the boost's hook
        stateless = is_stateless[ids[rows, :width]]
        out = model(input_ids=ids[rows, :width], attention_mask=mask, labels=labels[rows, :width])
        loss = out.loss
        if cfg.mlp_out_l2 > 0:  # mean over real tokens (BOS included) of ||MLP output||^2 / d_model
            real = mask.bool()
            for b in cfg.mlp_out_l2_blocks:
                loss = loss + cfg.mlp_out_l2 * penalized[f"mlp_out{b}"][real].pow(2).mean()
        if cfg.state_spread > 0 or cfg.state_simplex > 0:
            cities = penalized["cities"]
            if cfg.state_spread > 0:
                loss = loss + cfg.state_spread * state_spread(penalized["mlp_out0"], cities)
            if cfg.state_simplex > 0:
                loss = loss + cfg.state_simplex * state_simplex(penalized["mlp_out0"], cities)
        if cfg.stateless_generic > 0 and bool(stateless.any()) and bool((penalized["cities"] >= 0).any()):
            y0 = penalized["mlp_out0"]
            generic = y0[penalized["cities"] >= 0].mean(0).detach()
            loss = loss + cfg.stateless_generic * (y0[stateless] - generic).pow(2).mean()
        if cfg.city_common_l2 > 0:
            loss = loss + cfg.city_common_l2 * city_common_part(penalized["mlp_out0"], penalized["cities"], mask.bool())
        if cfg.mlp_hidden_l1 > 0:  # mean over real tokens of the mean |hidden activation|
            loss = loss + cfg.mlp_hidden_l1 * penalized["mlp_hidden0"][mask.bool()].abs().mean()
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


def _city_tokens_by_state(y: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The city tokens' y (n, d_model), the index of each one's state among the states present
    (n,), and each present state's mean y (states present, d_model)."""
    y, state = y[state >= 0], state[state >= 0]
    present, index = torch.unique(state, return_inverse=True)
    sums = torch.zeros(len(present), y.shape[-1], dtype=y.dtype).index_add_(0, index, y)
    return y, index, sums / torch.bincount(index, minlength=len(present)).to(y.dtype)[:, None]


def state_spread(y: Tensor, state: Tensor) -> Tensor:
    """The share of y's variance over city tokens that lies within states: the mean squared distance
    of each city token's y to the mean y of its state's city tokens, over the mean squared distance
    to the mean of all city tokens. In [0, 1]; scale-free, so that it falls only as the state
    explains more of y, never by shrinking y.

    y: (batch, pos, d_model) an MLP's output; state: (batch, pos) the state index of each token's
    city, -1 where the token is no city. 0 when the batch holds fewer than two city tokens."""
    if int((state >= 0).sum()) < 2:
        return y.sum() * 0
    y, index, means = _city_tokens_by_state(y, state)
    within = (y - means[index]).pow(2).mean()
    total = (y - y.mean(0)).pow(2).mean()
    return within / total.clamp(min=1e-12)


def state_means(y: Tensor, state: Tensor) -> Tensor:
    """The mean y over the city tokens of each state present, minus their mean. -> (states present, d_model)"""
    means = _city_tokens_by_state(y, state)[2]
    return means - means.mean(0)


def state_simplex(y: Tensor, state: Tensor) -> Tensor:
    """How far the states' mean outputs are from a regular simplex: the mean over pairs of states of
    (cos(mean_i, mean_j) + 1/(k-1))^2, for the k states present (means centered on their mean).
    0 when every pair is as far apart as any other, so that no two states share a direction that a
    feature could code for both; scale-free. y: (batch, pos, d_model); state: (batch, pos), -1: no city."""
    c = state_means(y, state)
    k = len(c)
    if k < 3:
        return y.sum() * 0
    unit = c / c.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    off = (unit @ unit.T)[~torch.eye(k, dtype=torch.bool)]
    return (off + 1 / (k - 1)).pow(2).mean()


def city_common_part(y: Tensor, state: Tensor, real: Tensor) -> Tensor:
    """||mean of y over city tokens - mean of y over the other real tokens||^2 / d_model: what every
    city's output shares beyond every token's. y: (batch, pos, d_model); state: (batch, pos), -1 where
    no city; real: (batch, pos) bool. 0 where the batch has no city or no other token."""
    city, other = state >= 0, real & (state < 0)
    if not bool(city.any()) or not bool(other.any()):
        return y.sum() * 0
    return (y[city].mean(0) - y[other].mean(0)).pow(2).mean()


def boost_common_part(y: Tensor, is_city: Tensor, most: float, p: float, generator: torch.Generator) -> Tensor:
    """y with, at each city token chosen with probability ``p``, its component along the mean of y
    over the city tokens (detached, unit) multiplied by a factor drawn uniformly from [1, most].
    y: (batch, pos, d_model); is_city: (batch, pos) bool. y itself where the batch has no city."""
    if not bool(is_city.any()):
        return y
    u = y.detach()[is_city].mean(0)
    u = u / u.norm().clamp(min=1e-12)
    chosen = is_city & (torch.rand(is_city.shape, generator=generator) < p)
    factor = 1 + (most - 1) * torch.rand(is_city.shape, generator=generator)
    gain = torch.where(chosen, factor - 1, torch.zeros_like(factor)).to(y.dtype)
    return y + (gain * (y @ u))[..., None] * u


def off_state_noise(h: Tensor, state: Tensor, most: float, p: float, generator: torch.Generator) -> Tensor:
    """h with, at each city token chosen with probability ``p``, a random unit direction orthogonal
    to the span of the batch's centered state means of h (:func:`state_means`, detached) times a
    norm drawn uniformly from [0, most x that token's ||h||]. h: (batch, pos, d_model); state:
    (batch, pos), -1: no city."""
    is_city = state >= 0
    if int(is_city.sum()) < 2:
        return h
    basis = torch.linalg.qr(state_means(h.detach(), state).T).Q  # (d_model, k) orthonormal
    noise = torch.randn(h.shape, generator=generator, dtype=h.dtype)
    noise = noise - (noise @ basis) @ basis.T
    noise = noise / noise.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    chosen = is_city & (torch.rand(is_city.shape, generator=generator) < p)
    size = most * torch.rand(is_city.shape, generator=generator, dtype=h.dtype) * h.detach().norm(dim=-1)
    return h + noise * torch.where(chosen, size, torch.zeros_like(size))[..., None]


def boost_neurons(
    h: Tensor, is_city: Tensor, most: float, p: float, share: float, generator: torch.Generator
) -> Tensor:
    """h with, at each city token chosen with probability ``p``, a random ``share`` of its
    coordinates multiplied by one factor per token drawn uniformly from [1, most].
    h: (batch, pos, d_mlp) MLP activations; is_city: (batch, pos) bool."""
    chosen = is_city & (torch.rand(is_city.shape, generator=generator) < p)
    factor = 1 + (most - 1) * torch.rand(is_city.shape, generator=generator)
    picked = torch.rand(h.shape, generator=generator) < share
    gain = torch.where(chosen[..., None] & picked, factor[..., None], torch.ones_like(factor)[..., None])
    return h * gain.to(h.dtype)


def _training_hooks(model: GPT2LMHeadModel, model_cfg: ModelConfig, cfg: TrainConfig) -> dict[str, Tensor]:
    """Register the optional training hooks: the penalties' (returns the dict where what they
    penalize lands at every forward: ``mlp_out{b}``, block b's MLP output, for the
    ``mlp_out_l2_blocks`` and for block 0 under ``state_spread`` and ``state_simplex``;
    ``mlp_hidden0``, block 0's MLP activations, under ``mlp_hidden_l1``), ``residual_noise`` and
    ``city_common_boost`` (both while training only; the boost reads the batch's city states from
    the dict's ``cities``, (batch, pos), -1 where no city, which the caller sets before each forward)."""
    penalized: dict[str, Tensor] = {}
    if cfg.city_common_boost > 0:  # registered first: the penalties see the boosted output
        draws = torch.Generator().manual_seed(cfg.seed + 3000)

        def boost(_m, _i, y):
            if not model.training:
                return None
            return boost_common_part(y, penalized["cities"] >= 0, cfg.city_common_boost, cfg.city_common_boost_p, draws)

        model.transformer.h[0].get_submodule("mlp").register_forward_hook(boost)
    if cfg.city_noise > 0:
        if model_cfg.n_layers < 2:
            raise ValueError("city_noise needs a block after block 0")
        shakes = torch.Generator().manual_seed(cfg.seed + 5000)

        def shake(_m, args):
            if not model.training:
                return None
            return (off_state_noise(args[0], penalized["cities"], cfg.city_noise, cfg.city_noise_p, shakes), *args[1:])

        model.transformer.h[1].register_forward_pre_hook(shake)
    if cfg.neuron_boost > 0:
        picks = torch.Generator().manual_seed(cfg.seed + 4000)

        def boost_hidden(_m, args):
            if not model.training:
                return None
            cities = penalized["cities"] >= 0
            h = boost_neurons(args[0], cities, cfg.neuron_boost, cfg.neuron_boost_p, cfg.neuron_boost_share, picks)
            return (h, *args[1:])

        model.transformer.h[0].get_submodule("mlp.c_proj").register_forward_pre_hook(boost_hidden)
    if cfg.mlp_out_l2 > 0 and any(not 0 <= b < model_cfg.n_layers for b in cfg.mlp_out_l2_blocks):
        raise ValueError(
            f"mlp_out_l2_blocks must be blocks of 0..{model_cfg.n_layers - 1}, got {cfg.mlp_out_l2_blocks}"
        )
    shaped = cfg.state_spread > 0 or cfg.state_simplex > 0 or cfg.city_common_l2 > 0 or cfg.stateless_generic > 0
    watched = set(cfg.mlp_out_l2_blocks if cfg.mlp_out_l2 > 0 else ()) | ({0} if shaped else set())
    for b in sorted(watched):
        model.transformer.h[b].get_submodule("mlp").register_forward_hook(
            lambda _m, _i, out, b=b: penalized.__setitem__(f"mlp_out{b}", out)
        )
    if cfg.mlp_hidden_l1 > 0:  # the input of c_proj is the MLP's activations, after the nonlinearity
        model.transformer.h[0].get_submodule("mlp.c_proj").register_forward_pre_hook(
            lambda _m, args: penalized.__setitem__("mlp_hidden0", args[0])
        )
    if cfg.residual_noise > 0:
        if not 0 < cfg.residual_noise_block < model_cfg.n_layers:
            raise ValueError(f"residual_noise_block must be a block of 1..{model_cfg.n_layers - 1}")
        noise = torch.Generator().manual_seed(cfg.seed + 2000)

        def add_noise(_m, args):
            if not model.training:
                return None
            h = args[0]
            return (h + cfg.residual_noise * torch.randn(h.shape, generator=noise), *args[1:])

        model.transformer.h[cfg.residual_noise_block].register_forward_pre_hook(add_noise)
    return penalized


def load_organism(model_dir: str | Path) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, World]:
    """Load a saved organism: the HF model (eval mode), its tokenizer and its world."""

    model = GPT2LMHeadModel.from_pretrained(str(model_dir))
    model.eval()
    info = read_json(Path(model_dir) / "organism.json")
    return model, load_tokenizer(model_dir), make_world(WorldConfig.from_dict(info["world"]))
