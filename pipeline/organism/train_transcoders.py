"""Train JumpReLU transcoders for the organism: per-layer with skip (PLT) and cross-layer (CLT).

1. Collect activations with plain forward hooks on the Hugging Face model: the MLP input
   ``x_l`` = output of ``transformer.h[l].ln_2`` (after the LayerNorm weight and bias, TL2's
   ``ln2.hook_normalized``) and the MLP output ``y_l`` = output of ``transformer.h[l].mlp``
   (``hook_mlp_out``), at every non-BOS position of the world's distinct sentences: all
   training sentences plus the held-out two-hop sentences, since the transcoders must
   reconstruct the model on every prompt of the default set. ``contexts="sentence"`` keeps
   every position of every sentence (a prefix that k sentences share counts k times, as in a
   corpus: the toy language's tag opens a third of them); ``"prefix"`` keeps each distinct
   prefix once (the tag's context then weighs one token in thousands and is reconstructed by
   a dense code of a hundred features). ``<bos>`` is left out: downstream, features are zeroed
   there and its MLP output is an error node.
2. Standardize: x and y of each layer are divided by a scalar so that E||x||^2 = d_model
   (the scales are folded back into the saved weights).
3. Train, full precision, AdamW with warmup and cosine decay, minibatches of tokens:

       pre_l = x_l W_enc_l^T + b_enc_l
       a_l   = JumpReLU_theta(pre_l) = pre_l * H(pre_l - theta_l)
       PLT:  y_l^ = a_l W_dec_l + b_dec_l + x_l W_skip_l^T
       CLT:  y_l^ = sum_{k <= l} a_k W_dec_k[:, l - k] + b_dec_l

   loss = sum_l ||y_l^ - y_l||^2 / Var(y_l)                       (normalized MSE per layer)
        + lambda(t) * sum_l mean_tokens sum_f tanh(c * a_lf * ||W_dec_lf||)
   with ||W_dec_lf|| the norm of all of feature f's decoder rows (concatenated over output
   layers for a CLT) and lambda ramped up linearly over the first ``sparsity_warmup`` of
   the steps. theta = exp(log_theta) learns through a straight-through estimator: the
   derivative of H(pre - theta) w.r.t. theta is replaced by -K((pre - theta)/eps)/eps with
   the rectangle kernel K(u) = 1{|u| < 1/2} and bandwidth eps. W_skip (PLT) starts at zero
   and carries an L2 penalty ``skip_l2 * ||W_skip||^2``: an unpenalized skip learns the
   linear part of the MLP, and in this model that part already holds the state and the
   language at the last position (the MLP input is ~75 % state), so the features would
   not carry them and a feature swap could not flip the answer (measured: state swap 3 %
   with a least-squares skip, 97 % with the default penalty). With ``matryoshka`` prefix
   sizes m_1 < m_2 < ..., the reconstruction term is the mean of the terms above computed
   from the first m_i features alone and from all of them (nested dictionaries).
4. Evaluate (metrics below), save with ``pipeline.transcoders`` writers
   (``feature_input_hook="ln2.hook_normalized"``, ``feature_output_hook="hook_mlp_out"``),
   plus ``metrics.json``.

Metrics, per layer and overall: fraction of variance explained (FVE, 1 - normalized MSE),
L0 (mean active features per token), dead-feature share (never active on the collected
contexts); and for the replacement model (every MLP output replaced by the transcoder's
reconstruction, computed from the replacement's own MLP inputs; the true MLP output is kept
at ``<bos>``): next-token agreement with the base model (argmax) at the answer position of
every evaluation prompt and at every position, mean KL(base || replacement), and the
replacement's own fact accuracy; and feature interventions at the last position of the
two-hop prompts (``state_swap_rate``, ``language_swap_rate``, ``language_ablation_rate``,
see ``intervention_metrics``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from pipeline.transcoders import save_cross_layer_transcoder, save_transcoder_set

from ._util import atomic_directory, read_json, torch_scope, write_json
from .config import CONTEXTS, MASSIVE_ACTIVATION_DIM, TranscoderTrainConfig
from .optim import PortableAdamW, exact_sqrt
from .tokenizer import load_tokenizer
from .train_model import city_states, encode_texts
from .world import World

FEATURE_INPUT_HOOK = "ln2.hook_normalized"
FEATURE_OUTPUT_HOOK = "hook_mlp_out"


# --- 1. activations ----------------------------------------------------------------------------
def _contexts(world: World, tokenizer: PreTrainedTokenizerFast) -> tuple[Tensor, Tensor]:
    """Distinct sentences (train + held-out two-hop), tokenized: ids (n, L), lengths (n,)."""
    texts = sorted(
        {s.text for s in world.training_sentences()} | {s.text for s in world.sentences("two_hop", split="heldout")}
    )
    return encode_texts(tokenizer, texts)


@torch.no_grad()
def collect_activations(
    model: GPT2LMHeadModel, ids: Tensor, lengths: Tensor, contexts: str = "sentence"
) -> tuple[Tensor, Tensor]:
    """MLP inputs and outputs at the non-BOS positions of the sentences ``ids``: every one
    (``contexts="sentence"``) or each distinct prefix once (``"prefix"``).

    returns x, y: (n_layers, n_tokens, d_model), rows in a fixed order (sentence, position).
    """
    if contexts not in CONTEXTS:
        raise ValueError(f"contexts must be one of {CONTEXTS}, got {contexts!r}")
    blocks = model.transformer.h
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    handles = []
    for blk in blocks:
        handles.append(blk.get_submodule("ln_2").register_forward_hook(lambda m, i, o: xs.append(o.detach())))
        handles.append(blk.get_submodule("mlp").register_forward_hook(lambda m, i, o: ys.append(o.detach())))
    try:
        mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
        model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    ri, pi = token_rows(ids, lengths, contexts)
    x = torch.stack([t[ri, pi] for t in xs])
    y = torch.stack([t[ri, pi] for t in ys])
    return x, y


def token_rows(ids: Tensor, lengths: Tensor, contexts: str = "sentence") -> tuple[Tensor, Tensor]:
    """The (sentence, position) of each row :func:`collect_activations` returns, in its order:
    every non-BOS position, or (``"prefix"``) the first of identical prefixes. -> two (n_tokens,)"""
    seen: set[tuple[int, ...]] = set()
    rows: list[tuple[int, int]] = []
    for i in range(len(ids)):
        row = ids[i].tolist()
        for p in range(1, int(lengths[i])):
            if contexts == "prefix":  # identical prefixes have identical activations
                key = tuple(row[: p + 1])
                if key in seen:
                    continue
                seen.add(key)
            rows.append((i, p))
    return torch.tensor([r for r, _ in rows]), torch.tensor([p for _, p in rows])


# --- 3. the JumpReLU transcoder ----------------------------------------------------------------
class _JumpReLU(torch.autograd.Function):
    """a = pre * H(pre - theta); d/dpre = H (as ReLU); d/dtheta = -theta/eps * K((pre-theta)/eps)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        gate = (pre > theta).to(pre.dtype)
        kernel = ((pre - theta).abs() < eps / 2).to(pre.dtype) / eps
        d_theta = (grad * (-theta) * kernel).sum_to_size(theta.shape)
        return grad * gate, d_theta, None


class JumpReLUTranscoders(nn.Module):
    """All layers' encoders and decoders, trained together (standardized units).

    W_enc: (L, F, d); b_enc, log_theta: (L, F); b_dec: (L, d); W_skip: (L, d, d) or None
    (skip(x) = x @ W_skip^T). PLT: W_dec (L, F, d). CLT: W_dec[k] (F, L - k, d).
    """

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        cfg: TranscoderTrainConfig,
        cross_layer: bool,
        skip_init: Tensor | None,
        b_dec_init: Tensor,
    ):
        super().__init__()
        L, d, Fn = n_layers, d_model, cfg.d_transcoder
        self.cross_layer = cross_layer
        self.eps = cfg.bandwidth
        g = torch.Generator().manual_seed(cfg.seed)
        n_out = [L - k for k in range(L)] if cross_layer else [1] * L
        dec = [torch.randn(Fn, n, d, generator=g) for n in n_out]
        # decoder rows of norm 0.1 (split over output layers), encoder = decoder direction
        dec = [w / w.flatten(1).norm(dim=1)[:, None, None] * 0.1 for w in dec]
        self.W_dec = nn.ParameterList([nn.Parameter(w) for w in dec])
        self.W_enc = nn.Parameter(torch.stack([w[:, 0] / w[:, 0].norm(dim=1, keepdim=True) for w in dec]))
        self.b_enc = nn.Parameter(torch.zeros(L, Fn))
        self.log_theta = nn.Parameter(torch.full((L, Fn), math.log(cfg.threshold_init)))
        self.b_dec = nn.Parameter(b_dec_init.clone())
        self.skip_full: nn.Parameter | None = None
        self.skip_factors: nn.ParameterList | None = None
        if skip_init is not None and cfg.skip_rank is not None:
            # the best rank-r start (the truncated SVD): U s (L, d, r) and V (L, r, d); from a zero
            # init, U is zero and V the first r input coordinates, so the skip starts at zero
            r = min(cfg.skip_rank, d)
            u, sv, vh = torch.linalg.svd(skip_init)
            self.skip_factors = nn.ParameterList(
                [nn.Parameter(u[..., :r] * sv[:, None, :r]), nn.Parameter(vh[:, :r].clone())]
            )
        elif skip_init is not None:
            self.skip_full = nn.Parameter(skip_init.clone())

    @property
    def W_skip(self) -> Tensor | None:
        """(L, d, d) the skip, or None: the trained matrix, or the product of its factors."""
        if self.skip_factors is not None:
            return self.skip_factors[0] @ self.skip_factors[1]
        return self.skip_full

    def activations(self, x: Tensor) -> Tensor:
        """x (L', n, d), the inputs of the first L' <= L layers -> a (L', n, F)."""
        k = x.shape[0]
        pre = torch.einsum("lnd,lfd->lnf", x, self.W_enc[:k]) + self.b_enc[:k, None, :]
        theta = self.log_theta[:k].exp()[:, None, :]
        return _JumpReLU.apply(pre, theta, self.eps)

    def decoder_norms(self) -> Tensor:
        """(L, F): norm of each feature's decoder rows over all its output layers."""
        return torch.stack([w.flatten(1).norm(dim=1) for w in self.W_dec])

    def reconstruct(self, x: Tensor, a: Tensor) -> Tensor:
        """(L, n, d) predictions of every layer's MLP output."""
        L = x.shape[0]
        skip = self.W_skip
        outs = []
        for lo in range(L):
            if self.cross_layer:
                y = sum(a[k] @ self.W_dec[k][:, lo - k] for k in range(lo + 1))
            else:
                y = a[lo] @ self.W_dec[lo][:, 0]
            y = y + self.b_dec[lo]
            if skip is not None:
                y = y + x[lo] @ skip[lo].T
            outs.append(y)
        return torch.stack(outs)


def _lr_at(step: int, cfg: TranscoderTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * t))


def _least_squares_skip(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per layer, the affine map y ~ x S^T + b by least squares. returns S (L, d, d), b (L, d)."""
    L, n, d = x.shape
    xm, ym = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
    xc, yc = x - xm, y - ym
    gram = xc.transpose(1, 2) @ xc + 1e-3 * n * torch.eye(d)
    S = torch.linalg.solve(gram, xc.transpose(1, 2) @ yc).transpose(1, 2)  # (L, d_out, d_in)
    b = ym[:, 0] - torch.einsum("ld,led->le", xm[:, 0], S)
    return S, b


def _fit(
    x: Tensor,
    y: Tensor,
    cfg: TranscoderTrainConfig,
    cross_layer: bool,
    progress: bool,
    desc: str,
    city_state: Tensor | None = None,
) -> tuple[JumpReLUTranscoders, list[float]]:
    """city_state: (n,) the state index of each row's token when it is a city, else -1; given,
    ``cfg.state_tint`` weighs the tint penalty on layer 0."""
    torch.manual_seed(cfg.seed)
    L, n, d = x.shape
    var = (y - y.mean(1, keepdim=True)).pow(2).sum(-1).mean(1)  # (L,)
    use_skip = cfg.skip and not cross_layer
    if use_skip and cfg.skip_init == "least_squares":
        S, b = _least_squares_skip(x, y)
    elif use_skip:
        S, b = torch.zeros(L, d, d), y.mean(1)
    else:
        S, b = None, y.mean(1)
    model = JumpReLUTranscoders(L, d, cfg, cross_layer, S, b)
    opt = PortableAdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=g)
    cursor = 0
    # Matryoshka: the reconstruction from each prefix of the dictionary, and from all of it
    prefixes: list[Tensor | None] = [(torch.arange(cfg.d_transcoder) < m).to(x.dtype) for m in (cfg.matryoshka or [])]
    prefixes.append(None)
    # the states' span at the city is fixed by the data; the features' selectivity is refreshed
    tint_basis = state_basis(y[0], city_state) if city_state is not None else None
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, cfg)
        if city_state is not None and step % 50 == 0:
            with torch.no_grad():  # layer 0 only: the penalty is on layer 0's decoders
                unselective = state_unselectivity(model.activations(x[:1])[0], city_state)
        if cursor + cfg.batch_size > n:
            perm, cursor = torch.randperm(n, generator=g), 0
        idx = perm[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        xb, yb = x[:, idx], y[:, idx]
        a = model.activations(xb)
        terms = [
            ((model.reconstruct(xb, a if keep is None else a * keep) - yb).pow(2).sum(-1).mean(1) / var).sum()
            for keep in prefixes
        ]
        recon = terms[0] if len(terms) == 1 else torch.stack(terms).mean()
        ramp = min(1.0, (step + 1) / max(1.0, cfg.sparsity_warmup * cfg.steps))
        sparsity = torch.tanh(cfg.tanh_scale * a * model.decoder_norms()[:, None, :]).sum(-1).mean(1).sum()
        loss = recon + cfg.sparsity_coefficient * ramp * sparsity
        if cfg.coactive_orthogonality > 0:
            loss = loss + cfg.coactive_orthogonality * coactive_overlap(a, list(model.W_dec))
        if tint_basis is not None:
            loss = loss + cfg.state_tint * state_tint(model.W_dec[0], tint_basis, unselective)
        skip = model.W_skip
        if skip is not None and cfg.skip_l2 > 0:
            loss = loss + cfg.skip_l2 * skip.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(recon.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            bar.set_postfix(nmse=f"{recon.item() / L:.3f}", l0=f"{(a > 0).float().sum(-1).mean().item():.1f}")
    bar.close()
    return model, losses


def coactive_overlap(a: Tensor, decoders: Sequence[Tensor]) -> Tensor:
    """Sum over layers of the mean over tokens of the sum, over the pairs of distinct features
    firing together on the token, of the squared cosine of their decoders. a: (L, n, F)
    activations; decoders[l]: (F, ..., d) layer l's decoder rows (flattened over output layers)."""
    total = a.sum() * 0
    for l, w in enumerate(decoders):
        fires = (a[l] > 0).to(a.dtype)
        together = fires.T @ fires / fires.shape[0]  # (F, F)
        unit = w.flatten(1) / w.flatten(1).norm(dim=1, keepdim=True).clamp(min=1e-12)
        overlap = (unit @ unit.T).pow(2) * together
        total = total + (overlap.sum() - overlap.diagonal().sum()) / 2
    return total


def state_basis(y: Tensor, city_state: Tensor) -> Tensor:
    """An orthonormal basis of the span of the states' mean ``y`` over their city rows, centered
    on the mean of those means. y: (n, d); city_state: (n,), -1: no city -> (d, rank)"""
    # the same means as shaping.state_means, summed per state here: its index_add rounds
    # otherwise, and the default transcoders' bytes were trained with this sum
    present = torch.unique(city_state[city_state >= 0])
    means = torch.stack([y[city_state == s].mean(0) for s in present.tolist()])
    _, sv, vh = torch.linalg.svd(means - means.mean(0), full_matrices=False)
    return vh[sv > sv[0] * 1e-6].T


def state_unselectivity(a: Tensor, city_state: Tensor) -> Tensor:
    """Per feature, how much of it the tint penalty weighs: the share of its firings that are at
    city rows x (1 - the gap between the two largest per-state shares of cities it fires on).
    A state's feature (fires on its cities, no other's) -> ~0; a generic, group or single-city
    feature -> its city share. a: (n, F) activations; city_state: (n,), -1: no city -> (F,)"""
    fires = (a > 0).to(a.dtype)
    present = torch.unique(city_state[city_state >= 0])
    if len(present) < 2:
        raise ValueError("state_tint needs the cities of at least two states in the training tokens")
    share = torch.stack([fires[city_state == s].mean(0) for s in present.tolist()])  # (k, F)
    top2 = share.topk(2, dim=0).values
    at_city = fires[city_state >= 0].sum(0) / fires.sum(0).clamp(min=1)
    return at_city * (1 - (top2[0] - top2[1]))


def state_tint(w_dec: Tensor, basis: Tensor, weight: Tensor) -> Tensor:
    """The weighted mean over features of the share of each decoder's squared norm (into the
    first output layer) in ``basis``'s span. w_dec: (F, d) or (F, L_out, d); basis: (d, k)
    orthonormal; weight: (F,)"""
    w = w_dec if w_dec.dim() == 2 else w_dec[:, 0]
    inside = (w @ basis).pow(2).sum(-1) / w.pow(2).sum(-1).clamp(min=1e-12)
    return (weight * inside).mean()


# --- 4. evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def _layer_stats(model: JumpReLUTranscoders, x: Tensor, y: Tensor) -> dict:
    a = model.activations(x)
    yhat = model.reconstruct(x, a)
    var = (y - y.mean(1, keepdim=True)).pow(2).sum(-1).mean(1)
    fve = 1 - (yhat - y).pow(2).sum(-1).mean(1) / var
    active = a > 0
    return {
        "fve": fve.tolist(),
        "l0": active.float().sum(-1).mean(1).tolist(),
        "dead_share": (~active.any(1)).float().mean(1).tolist(),
        "n_tokens": int(x.shape[1]),
    }


class _Replacement:
    """Forward hooks on the HF model that replace every MLP output by the transcoders' output.

    w: weights in model units: W_enc (L, F, d), b_enc, theta (L, F), W_dec (list of
    (F, n_out, d)), b_dec (L, d), W_skip (L, d, d) or None. Position 0 (BOS) keeps the true MLP
    output. ``patch[l]``: (batch, F) values for the features at position ``patch_pos``
    (batch,) of layer l, NaN = leave the feature as computed (iterative patching: later layers
    see the patched outputs).
    """

    def __init__(
        self,
        hf: GPT2LMHeadModel,
        w: dict,
        cross_layer: bool,
        patch: dict[int, Tensor] | None = None,
        patch_pos: Tensor | None = None,
    ):
        self.hf, self.w, self.cross_layer = hf, w, cross_layer
        self.patch, self.patch_pos = patch or {}, patch_pos
        self.acts: dict[int, Tensor] = {}
        self.inputs: dict[int, Tensor] = {}

    def _ln2(self, layer: int):
        def hook(mod, inp, out):
            w = self.w
            pre = out @ w["W_enc"][layer].T + w["b_enc"][layer]
            a = pre * (pre > w["theta"][layer]).to(pre.dtype)
            if layer in self.patch:
                rows = torch.arange(a.shape[0])
                at = a[rows, self.patch_pos]
                p = self.patch[layer]
                a = a.clone()
                a[rows, self.patch_pos] = torch.where(torch.isnan(p), at, p)
            self.acts[layer] = a
            self.inputs[layer] = out

        return hook

    def _mlp(self, layer: int):
        def hook(mod, inp, out):
            w = self.w
            if self.cross_layer:
                y = sum(self.acts[k] @ w["W_dec"][k][:, layer - k] for k in range(layer + 1))
            else:
                y = self.acts[layer] @ w["W_dec"][layer][:, 0]
            y = y + w["b_dec"][layer]
            if w["W_skip"] is not None:
                y = y + self.inputs[layer] @ w["W_skip"][layer].T
            y = y.clone()
            y[:, 0] = out[:, 0]
            return y

        return hook

    @torch.no_grad()
    def logits(self, ids: Tensor, mask: Tensor) -> Tensor:
        handles = []
        try:
            for l, blk in enumerate(self.hf.transformer.h):
                handles.append(blk.get_submodule("ln_2").register_forward_hook(self._ln2(l)))
                handles.append(blk.get_submodule("mlp").register_forward_hook(self._mlp(l)))
            return self.hf(input_ids=ids, attention_mask=mask).logits
        finally:
            for h in handles:
                h.remove()


@torch.no_grad()
def replacement_metrics(
    hf: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, world: World, weights: dict, cross_layer: bool
) -> dict:
    """Next-token agreement / KL of the replacement model with the base model."""
    rep = _Replacement(hf, weights, cross_layer)
    sets = world.eval_sets()
    prompts = [s for v in sets.values() for s in v]
    ids, lengths = encode_texts(tokenizer, [s.prompt for s in prompts])
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    base = hf(input_ids=ids, attention_mask=mask).logits
    repl = rep.logits(ids, mask)
    last = lengths - 1
    rows = torch.arange(len(ids))
    b_last, r_last = base[rows, last], repl[rows, last]
    ans_ids = torch.tensor(tokenizer.convert_tokens_to_ids([s.answer for s in prompts]))
    # every real non-BOS position of the full training sentences (answer positions included)
    fids, flen = encode_texts(tokenizer, sorted({s.text for s in world.training_sentences()}))
    fmask = (torch.arange(fids.shape[1]) < flen[:, None]).long()
    fb, fr = hf(input_ids=fids, attention_mask=fmask).logits, rep.logits(fids, fmask)
    sel = fmask.bool().clone()
    sel[:, 0] = False
    fb, fr = fb[sel], fr[sel]

    def kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
        lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
        return (lp.exp() * (lp - lq)).sum(-1)

    out = {
        "agreement_answer_positions": (b_last.argmax(-1) == r_last.argmax(-1)).float().mean().item(),
        "agreement_all_positions": (fb.argmax(-1) == fr.argmax(-1)).float().mean().item(),
        "kl_answer_positions": kl(b_last, r_last).mean().item(),
        "kl_all_positions": kl(fb, fr).mean().item(),
        "replacement_accuracy": (r_last.argmax(-1) == ans_ids).float().mean().item(),
        "base_accuracy": (b_last.argmax(-1) == ans_ids).float().mean().item(),
    }
    start = 0
    for name, sents in sets.items():
        sl = slice(start, start + len(sents))
        start += len(sents)
        out[f"replacement_accuracy_{name}"] = (r_last[sl].argmax(-1) == ans_ids[sl]).float().mean().item()
    return out


@torch.no_grad()
def intervention_metrics(
    hf: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, world: World, weights: dict, cross_layer: bool
) -> dict:
    """Feature interventions on the replacement model on the canonical two-hop prompts (every
    layer's features, iterative patching, no error terms): state swaps at the city's token,
    where the organism forms the state, language swaps and ablations at the last position.

    A *swap* from prompt p to reference prompt r sets the features active at p but not at r
    to 0 and those active at r but not at p to their values at r (the features active on
    both keep their values; all other positions untouched), as when one swaps supernodes.

    * ``state_swap_rate``: r = the same template and language for the first city of the
      next state in the table (Texas -> California, ...); success: r's capital, in p's
      language.
    * ``language_swap_rate``: toy prompts, r = the same city in English; success: the
      English capital.
    * ``language_ablation_rate``: toy prompts, only zero the features active at p but not
      at r; success: the English capital (English as the unmarked language).
    """
    prompts = world.sentences("two_hop", split="all", canonical_only=True)
    ids, lengths = encode_texts(tokenizer, [s.prompt for s in prompts])
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    last, rows = lengths - 1, torch.arange(len(ids))
    city = torch.tensor([ids[i].tolist().index(tokenizer.convert_tokens_to_ids(s.city)) for i, s in enumerate(prompts)])
    clean = _Replacement(hf, weights, cross_layer)
    clean.logits(ids, mask)
    index = {(s.city, s.language): i for i, s in enumerate(prompts)}
    names = [st.name for st in world.states]

    def swap_patch(pairs: list[tuple[int, int]], add: bool, pos: Tensor) -> dict[int, Tensor]:
        patch = {}
        for l, a in ((l, a[rows, pos]) for l, a in clean.acts.items()):
            p = torch.full((len(pairs), a.shape[1]), float("nan"))
            for k, (i, j) in enumerate(pairs):
                only_i, only_j = (a[i] > 0) & (a[j] <= 0), (a[j] > 0) & (a[i] <= 0)
                p[k, only_i] = 0.0
                if add:
                    p[k, only_j] = a[j, only_j]
            patch[l] = p
        return patch

    def rate(pairs: list[tuple[int, int]], targets: list[str], add: bool, pos: Tensor) -> float:
        """Share of ``pairs`` (prompt, reference) whose swap at ``pos`` (one per prompt; the
        reference's is the same: same template and language) gives its target."""
        if not pairs:
            return float("nan")
        src = torch.tensor([i for i, _ in pairs])
        rep = _Replacement(hf, weights, cross_layer, swap_patch(pairs, add, pos), pos[src])
        pred = rep.logits(ids[src], mask[src])[torch.arange(len(src)), last[src]].argmax(-1)
        want = torch.tensor(tokenizer.convert_tokens_to_ids(targets))
        return (pred == want).float().mean().item()

    state_pairs, state_targets = [], []
    for i, s in enumerate(prompts):
        nxt = world.states[(names.index(s.state) + 1) % len(names)]
        state_pairs.append((i, index[(nxt.cities[0], s.language)]))
        state_targets.append(world.spell(nxt.capital, s.language))
    lang_pairs = [(i, index[(s.city, "en")]) for i, s in enumerate(prompts) if s.language != "en"]
    lang_targets = [prompts[i].capital for i, _ in lang_pairs]
    return {
        "state_swap_rate": rate(state_pairs, state_targets, True, city),
        "language_swap_rate": rate(lang_pairs, lang_targets, True, last),
        "language_ablation_rate": rate(lang_pairs, lang_targets, False, last),
        "last_position_l0_per_layer": [(a[rows, last] > 0).float().sum(-1).mean().item() for a in clean.acts.values()],
    }


# --- driver --------------------------------------------------------------------------------------
def _export(model: JumpReLUTranscoders, sx: Tensor, sy: Tensor) -> dict:
    """Weights in model units: pre = x W_enc^T/sx + b; y = sy (a W_dec + b_dec + x/sx W_skip^T)."""
    L = model.W_enc.shape[0]
    return {
        "W_enc": (model.W_enc / sx[:, None, None]).detach().clone(),
        "b_enc": model.b_enc.detach().clone(),
        "theta": model.log_theta.exp().detach().clone(),
        "W_dec": [
            (w * sy[lo]).detach().clone()
            if not model.cross_layer
            else torch.stack([w[:, j] * sy[lo + j] for j in range(L - lo)], 1).detach().clone()
            for lo, w in enumerate(model.W_dec)
        ],
        "b_dec": (model.b_dec * sy[:, None]).detach().clone(),
        "W_skip": None if model.W_skip is None else (model.W_skip * (sy / sx)[:, None, None]).detach().clone(),
    }


def train_transcoders(
    model_dir: str | Path,
    world: World,
    cfg: TranscoderTrainConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    *,
    cross_layer: bool,
) -> dict:
    """JumpReLU transcoders on ln2.hook_normalized -> hook_mlp_out: per-layer (with a skip when
    ``cfg.skip``), or with ``cross_layer=True`` one cross-layer transcoder (no skip); use
    :func:`train_plt` / :func:`train_clt`. Returns the metrics; with ``out_dir``, saves the transcoders and
    metrics.json there."""
    t0 = time.perf_counter()
    cfg = cfg or TranscoderTrainConfig()
    kind = "clt" if cross_layer else "plt"
    with torch_scope(cfg.threads):
        hf = GPT2LMHeadModel.from_pretrained(str(model_dir))
        hf.eval()
        tokenizer = load_tokenizer(model_dir)
        ids, lengths = _contexts(world, tokenizer)
        x, y = collect_activations(hf, ids, lengths, cfg.contexts)
        if cfg.n_tokens is not None and cfg.n_tokens < x.shape[1]:
            keep = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n_tokens]
            x, y = x[:, keep.sort().values], y[:, keep.sort().values]
        d = x.shape[-1]
        fixed = fixed_mlp_output(model_dir, x.shape[0], d)
        if fixed is not None:  # a constant the model holds fixed is the decoder bias's, not the features'
            y = y - fixed[:, None, :]
        sx = exact_sqrt(x.pow(2).sum(-1).mean(1) / d)  # (L,)
        sy = exact_sqrt(y.pow(2).sum(-1).mean(1) / d)
        xs, ys = x / sx[:, None, None], y / sy[:, None, None]
        city_state = None
        if cfg.state_tint > 0:
            ri, pi = token_rows(ids, lengths, cfg.contexts)
            city_state = city_states(world, tokenizer)[ids[ri, pi]]
            if cfg.n_tokens is not None and cfg.n_tokens < len(city_state):
                city_state = city_state[keep.sort().values]
        model, losses = _fit(xs, ys, cfg, cross_layer, progress, f"organism {kind}", city_state)
        metrics: dict = {"kind": kind, "d_transcoder": cfg.d_transcoder}
        stats = _layer_stats(model, xs, ys)
        metrics.update({f"{k}_per_layer": v for k, v in stats.items() if k != "n_tokens"})
        metrics["n_tokens"] = stats["n_tokens"]
        metrics["fve"] = sum(stats["fve"]) / len(stats["fve"])
        metrics["l0_total"] = sum(stats["l0"])  # active features per token, all layers together
        metrics["dead_share"] = sum(stats["dead_share"]) / len(stats["dead_share"])
        weights = _export(model, sx, sy)
        if fixed is not None:
            weights["b_dec"] = weights["b_dec"] + fixed
        metrics.update(replacement_metrics(hf, tokenizer, world, weights, cross_layer))
        if world.config.n_states >= 2:
            metrics.update(intervention_metrics(hf, tokenizer, world, weights, cross_layer))
        metrics["final_nmse"] = sum(losses[-20:]) / len(losses[-20:]) / x.shape[0]
        metrics["train_config"] = asdict(cfg)
        if out_dir is not None:  # metrics.json holds no wall time: same configs -> same bytes
            _save(out_dir, weights, cross_layer, metrics, model_name=str(model_dir))
    metrics["wall_time_s"] = time.perf_counter() - t0  # returned (and logged by callers), never saved
    return metrics


def fixed_mlp_output(model_dir: str | Path, n_layers: int, d_model: int) -> Tensor | None:
    """(n_layers, d_model) the constants the organism's config holds fixed in its MLP outputs
    (``ModelConfig.massive_activation``: block 0, dimension MASSIVE_ACTIVATION_DIM), or None when it
    holds none."""
    info = Path(model_dir) / "organism.json"
    value = float(read_json(info)["model"].get("massive_activation", 0.0)) if info.exists() else 0.0
    if not value:
        return None
    fixed = torch.zeros(n_layers, d_model)
    fixed[0, MASSIVE_ACTIVATION_DIM] = value
    return fixed


def _save(out_dir: str | Path, w: dict, cross_layer: bool, metrics: dict, model_name: str | None) -> None:
    L = w["W_enc"].shape[0]
    common: dict[str, Any] = dict(
        feature_input_hook=FEATURE_INPUT_HOOK, feature_output_hook=FEATURE_OUTPUT_HOOK, scan=None, model_name=None
    )
    with atomic_directory(out_dir) as tmp:
        target = tmp / "transcoders"
        if cross_layer:
            encoders = [
                {"W_enc": w["W_enc"][l], "b_enc": w["b_enc"][l], "b_dec": w["b_dec"][l], "threshold": w["theta"][l]}
                for l in range(L)
            ]
            save_cross_layer_transcoder(target, encoders, w["W_dec"], **common)
        else:
            layers = [
                {
                    "W_enc": w["W_enc"][l],
                    "W_dec": w["W_dec"][l][:, 0],
                    "b_enc": w["b_enc"][l],
                    "b_dec": w["b_dec"][l],
                    "threshold": w["theta"][l],
                    "W_skip": None if w["W_skip"] is None else w["W_skip"][l],
                }
                for l in range(L)
            ]
            save_transcoder_set(target, layers, **common)
        for p in target.iterdir():
            p.rename(tmp / p.name)
        target.rmdir()
        write_json(tmp / "metrics.json", metrics)


train_plt = functools.partial(train_transcoders, cross_layer=False)
train_clt = functools.partial(train_transcoders, cross_layer=True)
