"""Optional shaping of the organism's training, every kind off by default (``TrainSettings``):
penalties on block 0's MLP output or activations, and perturbations of the residual stream in
training, each meant to give the model a cleaner state representation at the city.
docs/organism.md#what-did-not-work measures each against the case studies.

:func:`register_shaping` installs the hooks a config asks for on the Hugging Face model and
returns the dict where they leave what the penalties read; the training loop sets its
``cities`` entry before each forward and adds the terms of :func:`shaping_penalty` to the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import GPT2LMHeadModel

from .config import ModelConfig, TrainSettings

# Each perturbation draws from a generator of its own, seeded from the training seed, so that
# turning one on leaves the others' draws (and the default run) as they were.
_NOISE_SEED, _BOOST_SEED, _CITY_NOISE_SEED = 2000, 3000, 5000


def register_shaping(model: GPT2LMHeadModel, model_cfg: ModelConfig, cfg: TrainSettings) -> dict[str, Tensor]:
    """Register the hooks of the shaping ``cfg`` asks for; returns the dict they share.

    Perturbations (while training only): ``city_common_boost`` (block 0's MLP output),
    ``city_noise`` and ``residual_noise`` (the residual stream entering a later block). The
    penalties' hooks record ``mlp_out{b}`` (block b's MLP output: the ``mlp_out_l2_blocks``,
    and block 0 under ``state_spread`` / ``state_simplex``) and ``mlp_hidden0`` (block 0's MLP
    activations, under ``mlp_hidden_l1``). The caller sets ``cities`` ((batch, pos) state index
    of each token's city, -1 where no city) before each forward."""
    seen: dict[str, Tensor] = {}
    if cfg.city_common_boost > 0:  # registered first: the penalties see the boosted output
        draws = torch.Generator().manual_seed(cfg.seed + _BOOST_SEED)

        def boost(_m, _i, y):
            if not model.training:
                return None
            return boost_common_part(y, seen["cities"] >= 0, cfg.city_common_boost, cfg.city_common_boost_p, draws)

        model.transformer.h[0].get_submodule("mlp").register_forward_hook(boost)
    if cfg.city_noise > 0:
        if model_cfg.n_layers < 2:
            raise ValueError("city_noise needs a block after block 0")
        shakes = torch.Generator().manual_seed(cfg.seed + _CITY_NOISE_SEED)

        def shake(_m, args):
            if not model.training:
                return None
            return (off_state_noise(args[0], seen["cities"], cfg.city_noise, cfg.city_noise_p, shakes), *args[1:])

        model.transformer.h[1].register_forward_pre_hook(shake)
    if cfg.mlp_out_l2 > 0 and any(not 0 <= b < model_cfg.n_layers for b in cfg.mlp_out_l2_blocks):
        raise ValueError(
            f"mlp_out_l2_blocks must be blocks of 0..{model_cfg.n_layers - 1}, got {cfg.mlp_out_l2_blocks}"
        )
    shaped = cfg.state_spread > 0 or cfg.state_simplex > 0
    watched = set(cfg.mlp_out_l2_blocks if cfg.mlp_out_l2 > 0 else ()) | ({0} if shaped else set())
    for b in sorted(watched):
        model.transformer.h[b].get_submodule("mlp").register_forward_hook(
            lambda _m, _i, out, b=b: seen.__setitem__(f"mlp_out{b}", out)
        )
    if cfg.mlp_hidden_l1 > 0:  # the input of c_proj is the MLP's activations, after the nonlinearity
        model.transformer.h[0].get_submodule("mlp.c_proj").register_forward_pre_hook(
            lambda _m, args: seen.__setitem__("mlp_hidden0", args[0])
        )
    if cfg.residual_noise > 0:
        if not 0 < cfg.residual_noise_block < model_cfg.n_layers:
            raise ValueError(f"residual_noise_block must be a block of 1..{model_cfg.n_layers - 1}")
        noise = torch.Generator().manual_seed(cfg.seed + _NOISE_SEED)

        def add_noise(_m, args):
            if not model.training:
                return None
            h = args[0]
            return (h + cfg.residual_noise * torch.randn(h.shape, generator=noise), *args[1:])

        model.transformer.h[cfg.residual_noise_block].register_forward_pre_hook(add_noise)
    return seen


def shaping_penalty(cfg: TrainSettings, seen: dict[str, Tensor], real: Tensor) -> list[Tensor]:
    """The penalties ``cfg`` asks for, each with its weight (none by default), from what the
    hooks of :func:`register_shaping` saw in this forward. real: (batch, pos) bool, the real
    (unpadded) tokens."""
    terms = []
    if cfg.mlp_out_l2 > 0:  # mean over real tokens (BOS included) of ||MLP output||^2 / d_model
        terms += [cfg.mlp_out_l2 * seen[f"mlp_out{b}"][real].pow(2).mean() for b in cfg.mlp_out_l2_blocks]
    if cfg.state_spread > 0:
        terms.append(cfg.state_spread * state_spread(seen["mlp_out0"], seen["cities"]))
    if cfg.state_simplex > 0:
        terms.append(cfg.state_simplex * state_simplex(seen["mlp_out0"], seen["cities"]))
    if cfg.mlp_hidden_l1 > 0:  # mean over real tokens of the mean |hidden activation|
        terms.append(cfg.mlp_hidden_l1 * seen["mlp_hidden0"][real].abs().mean())
    return terms


# --- the states' geometry at the city tokens ------------------------------------------------------
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


# --- perturbations ---------------------------------------------------------------------------------
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
    (batch, pos), -1: no city. h itself where the batch holds fewer than two city tokens."""
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
