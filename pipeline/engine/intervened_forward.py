"""One intervened forward pass of the replacement model, measured against its clean run.

Steps of a run (:class:`InterventionRunner`; the modes in ``docs/interventions.md``):

1. Clean run (:func:`clean_run`): per layer the transcoder input, the MLP output and the
   feature activations (zero at BOS), every attention pattern and norm scale, and the
   unembedding's input.
2. Resolve the interventions into a :class:`~pipeline.engine.interventions.Plan` and the mode
   into a :class:`~pipeline.engine.interventions.Mode`.
3. Hooked forward pass (:class:`InterventionPass`): at each transcoder input the features are
   recomputed from the live residual stream; at each MLP output the hook keeps the model's own
   output (a live layer with ``errors="recomputed"``, circuit-tracer's default) or writes
   ``clean output + (skip(x_live) - skip(x_clean))`` (a frozen layer; with ``errors="frozen"``
   every layer, plus the live features' changes), then adds the decoder changes of the
   intervened features. Only changed features are decoded, so an intervention that changes
   nothing returns the clean run exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Unpack

import torch
from torch import Tensor

from pipeline.engine import hooks as H
from pipeline.engine.interventions import Mode, ModeArguments, Plan, effective_mode, resolve_mode, resolve_plan
from pipeline.transcoders import Transcoders


class HookedModel(Protocol):
    """What an intervention run needs of the replacement model
    (:class:`~pipeline.engine.replacement.ReplacementModel` provides it)."""

    bridge: Any  # the TransformerLens bridge
    transcoders: Transcoders
    n_layers: int
    n_ctx: int
    input_hooks: list[str]  # per layer: the transcoder's read location
    output_hooks: list[str]  # per layer: the MLP output it replaces
    pattern_hooks: list[str]
    scale_hooks: list[str]

    @property
    def tokenizer(self) -> Any: ...

    def tokenize(self, prompt: str | Tensor) -> Tensor: ...

    def hooks(self, fwd_hooks: list, bwd_hooks: list | None = None) -> AbstractContextManager[None]: ...


# ------------------------------------------------------------------------------------ clean run
@dataclass
class CleanRun:
    """The clean forward pass every intervention run is measured against.

    tokens: (n_pos,); logits: (n_pos, d_vocab)
    mlp_inputs, mlp_outputs: (n_layers, n_pos, d_model) at the transcoders' hooks
    activations: (n_layers, n_pos, d_transcoder), zero at BOS
    unembed_in: (n_pos, d_model) input of the unembedding (after the final norm)
    frozen: hook name -> clean tensor (batch dim kept) for every attention pattern and norm scale
    """

    tokens: Tensor
    logits: Tensor
    mlp_inputs: Tensor
    mlp_outputs: Tensor
    activations: Tensor
    unembed_in: Tensor
    frozen: dict[str, Tensor]

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])


@torch.no_grad()
def clean_run(model: HookedModel, prompt: str | Tensor) -> CleanRun:
    """One forward pass of the base model, recording what intervention runs compare against."""
    tokens = model.tokenize(prompt)
    n = model.n_layers
    x: dict[int, Tensor] = {}
    y: dict[int, Tensor] = {}
    frozen: dict[str, Tensor] = {}
    grabbed: dict[str, Tensor] = {}

    def save(store: dict, key):
        def hook(tensor: Tensor, *, hook) -> None:
            store[key] = tensor[0].detach().clone()

        return hook

    def save_frozen(tensor: Tensor, *, hook) -> None:
        frozen[hook.name] = tensor.detach().clone()

    fwd = [(name, save_frozen) for name in model.pattern_hooks + model.scale_hooks]
    for layer in range(n):
        fwd.append((model.input_hooks[layer], save(x, layer)))
        fwd.append((model.output_hooks[layer], save(y, layer)))
    fwd.append((H.UNEMBED_IN, save(grabbed, "u")))
    with model.hooks(fwd):
        logits = model.bridge(tokens[None])[0]
    tc = model.transcoders
    acts = []
    for layer in range(n):
        a = tc.activations(layer, x[layer])
        a[0] = 0
        acts.append(a)
    return CleanRun(
        tokens=tokens,
        logits=logits.detach(),
        mlp_inputs=torch.stack([x[l] for l in range(n)]),
        mlp_outputs=torch.stack([y[l] for l in range(n)]),
        activations=torch.stack(acts),
        unembed_in=grabbed["u"],
        frozen=frozen,
    )


# ------------------------------------------------------------------------------------ one pass
@dataclass
class _Write:
    """Decoder changes of one source layer: rows (k,) of the pass, coeff (k,), dec (k, n_out, d)."""

    rows: Tensor
    coeff: Tensor
    dec: Tensor
    gate: Literal["write", "free", "all"]  # write: write_layers; free: non-frozen; all: every layer


class InterventionPass:
    """Hooks for one forward pass over sequence positions [offset, offset + length).

    Positions < n_prompt follow the mode; later (generated) positions run live with the
    open-ended interventions. ``offset > 0`` only for KV-cached steps (all generated).
    """

    def __init__(
        self,
        model: HookedModel,
        clean: CleanRun,
        plan: Plan,
        mode: Mode,
        offset: int,
        length: int,
        apply_activation_function: bool,
    ):
        self.m, self.clean, self.plan, self.mode = model, clean, plan, mode
        self.offset, self.length = offset, length
        self.n_pr = max(0, min(length, plan.n_prompt - offset))  # prompt rows of this pass
        self.apply_fn = apply_activation_function
        n = model.n_layers
        self.reported: list[Tensor | None] = [None] * n
        self.x: list[Tensor | None] = [None] * n
        self.writes: list[list[_Write]] = [[] for _ in range(n)]
        self.unembed_in: Tensor | None = None
        tc = model.transcoders
        self.out_layers = [tc.output_layers(l) for l in range(n)]
        # live feature changes matter where a free (non-frozen) layer has frozen errors
        self.track_live = [
            mode.errors == "frozen" and any(j not in mode.frozen_layers for j in self.out_layers[l]) for l in range(n)
        ]

    # -- hooks ---------------------------------------------------------------------------
    def hooks(self) -> list:
        m, mode = self.m, self.mode
        fwd: list = []
        if self.n_pr and mode.freeze_patterns:
            fwd += [(name, self._freeze_pattern) for name in m.pattern_hooks]
        if mode.freeze_scales:
            fwd += [(name, self._freeze_scale) for name in m.scale_hooks]
        for layer in range(m.n_layers):
            fwd.append((m.input_hooks[layer], self._read(layer)))
            fwd.append((m.output_hooks[layer], self._write(layer)))
        fwd.append((H.UNEMBED_IN, self._grab_unembed))
        return fwd

    # An edited norm scale sends the bridge down its own arithmetic (x / scale; HF's Llama norm
    # computes x * rsqrt(var + eps) in float32), so a run that freezes scales edits every scale
    # at every position, cached steps included, and a run that changes nothing freezes none
    # (see interventions.effective_mode). Patterns are replaced only where they differ (same
    # arithmetic).
    def _freeze_pattern(self, tensor: Tensor, *, hook) -> Tensor | None:
        clean = self.clean.frozen[hook.name]  # (1, heads, n_prompt, n_prompt)
        if tensor.shape == clean.shape:
            return None if torch.equal(tensor, clean) else clean.to(tensor.dtype)
        k = clean.shape[-1]
        if torch.equal(tensor[:, :, : self.n_pr, :k], clean[:, :, : self.n_pr]):
            return None
        out = tensor.clone()
        out[:, :, : self.n_pr, :k] = clean[:, :, : self.n_pr].to(tensor.dtype)
        out[:, :, : self.n_pr, k:] = 0  # causal: prompt rows never see generated tokens
        return out

    def _freeze_scale(self, tensor: Tensor, *, hook) -> Tensor:
        out = tensor.clone()
        if self.n_pr:
            clean = self.clean.frozen[hook.name]  # (1, n_prompt, ...)
            out[:, : self.n_pr] = clean[:, : self.n_pr].to(tensor.dtype)
        return out

    def _grab_unembed(self, tensor: Tensor, *, hook) -> None:
        self.unembed_in = tensor[0].detach().clone()

    def _read(self, layer: int):
        def hook(tensor: Tensor, *, hook) -> None:
            m, clean, mode = self.m, self.clean, self.mode
            tc = m.transcoders
            x = tensor[0].detach()
            pre = tc.encode(layer, x)
            acts = tc.activation_function(layer, pre)
            if self.offset == 0:
                acts[0] = 0
            if self.apply_fn:
                self.reported[layer] = acts.clone()
            else:
                rep = pre.clone()
                if self.offset == 0:
                    rep[0] = 0
                self.reported[layer] = rep
            self.x[layer] = x
            lo, n_pr = self.offset, self.n_pr
            dev = acts.device
            # prompt interventions
            entries = self.plan.closed.get(layer)
            if n_pr and entries is not None:
                sel = (entries.pos >= lo) & (entries.pos < lo + n_pr)
                if sel.any():
                    pos, feat = entries.pos[sel].to(dev), entries.feature[sel].to(dev)
                    if mode.reference == "live":
                        ref = acts[pos - lo, feat].double()
                    else:
                        ref = clean.activations[layer, pos, feat].double()
                    coeff = entries.mul[sel].to(dev) * ref + entries.add[sel].to(dev) - ref
                    self._add_write(layer, pos - lo, feat, coeff, "write")
            # live feature changes (frozen errors in free layers)
            if n_pr and self.track_live[layer]:
                diff = acts[:n_pr] - clean.activations[layer, lo : lo + n_pr]
                rows, feat = diff.nonzero(as_tuple=True)
                if rows.numel():
                    self._add_write(layer, rows, feat, diff[rows, feat], "free")
            # open-ended interventions at generated positions
            if n_pr < self.length:
                chosen: dict[tuple[int, int], tuple[float, float]] = {}  # the last entry wins
                for op in self.plan.open:
                    if op.layer != layer:
                        continue
                    for r in range(n_pr, self.length):
                        if op.applies(lo + r):
                            for f, mu, ad in zip(op.feature.tolist(), op.mul.tolist(), op.add.tolist()):
                                chosen[r, f] = (mu, ad)
                if chosen:
                    gen_rows = torch.tensor([k[0] for k in chosen], dtype=torch.long, device=dev)
                    feat = torch.tensor([k[1] for k in chosen], dtype=torch.long, device=dev)
                    mul = torch.tensor([v[0] for v in chosen.values()], dtype=torch.float64, device=dev)
                    add = torch.tensor([v[1] for v in chosen.values()], dtype=torch.float64, device=dev)
                    ref = acts[gen_rows, feat].double()
                    self._add_write(layer, gen_rows, feat, mul * ref + add - ref, "all")

        return hook

    def _add_write(self, layer: int, rows: Tensor, feat: Tensor, coeff: Tensor, gate) -> None:
        nz = coeff != 0
        if not nz.any():
            return
        rows, feat, coeff = rows[nz], feat[nz], coeff[nz]
        dec = self.m.transcoders.decoder_vectors(layer, feat)  # (k, n_out, d_model)
        self.writes[layer].append(_Write(rows, coeff, dec, gate))

    def _write(self, layer: int):
        def hook(tensor: Tensor, *, hook) -> Tensor:
            m, clean, mode = self.m, self.clean, self.mode
            y = tensor[0]
            out = y.clone()
            lo, n_pr = self.offset, self.n_pr
            frozen = layer in mode.frozen_layers
            if n_pr and (frozen or mode.errors == "frozen"):
                base = clean.mlp_outputs[layer, lo : lo + n_pr].to(y.dtype).clone()
                x = self.x[layer]
                if x is not None:
                    skip_live = m.transcoders.skip(layer, x[:n_pr])
                    skip_clean = m.transcoders.skip(layer, clean.mlp_inputs[layer, lo : lo + n_pr])
                    if skip_live is not None and skip_clean is not None:  # the layer has a skip
                        base = base + (skip_live - skip_clean).to(y.dtype)
                out[:n_pr] = base
            for src in range(layer + 1):
                outs = self.out_layers[src]
                if layer not in outs:
                    continue
                j = layer - outs.start
                for w in self.writes[src]:
                    if w.gate == "write" and layer not in mode.write_layers:
                        continue
                    if w.gate == "free" and frozen:
                        continue
                    vec = w.coeff.to(y.dtype)[:, None] * w.dec[:, j].to(device=y.device, dtype=y.dtype)
                    out.index_add_(0, w.rows.to(y.device), vec)
            return out[None]

        return hook

    def activations(self) -> Tensor:
        """(n_layers, length, d_transcoder): what every layer's transcoder read in the pass."""
        reported = [a for a in self.reported if a is not None]
        if len(reported) != len(self.reported):
            raise RuntimeError("activations() asked before the pass ran every layer")
        return torch.stack(reported)


# ------------------------------------------------------------------------------------ runner
@dataclass
class InterventionResult:
    """logits: (n_pos, d_vocab); activations: (n_layers, n_pos, d_transcoder), dense or sparse;
    unembed_in: (n_pos, d_model) the unembedding's input (for de-meaned logit directions)."""

    logits: Tensor
    activations: Tensor
    unembed_in: Tensor


class InterventionRunner:
    """One prompt's clean run, reused by any number of intervention runs on it."""

    def __init__(self, model: HookedModel, prompt: str | Tensor):
        self.model = model
        self.clean = clean_run(model, prompt)

    @property
    def tokens(self) -> Tensor:
        return self.clean.tokens

    @torch.no_grad()
    def run(
        self,
        interventions: Sequence,
        *,
        apply_activation_function: bool = True,
        sparse: bool = False,
        **mode_args: Unpack[ModeArguments],
    ) -> InterventionResult:
        """One intervention run on this prompt; arguments as :func:`feature_intervention`."""
        m = self.model
        mode = resolve_mode(m.n_layers, **mode_args)
        plan = resolve_plan(interventions, m.n_layers, m.transcoders.d_transcoder, self.clean.n_pos, generating=False)
        mode = effective_mode(mode, plan, self.clean.activations)
        p = InterventionPass(m, self.clean, plan, mode, 0, self.clean.n_pos, apply_activation_function)
        with m.hooks(p.hooks()):
            logits = m.bridge(self.clean.tokens[None])[0]
        acts = p.activations()
        if sparse:
            acts = acts.to_sparse().coalesce()
        assert p.unembed_in is not None  # the pass's unembedding hook saw it
        return InterventionResult(logits=logits, activations=acts, unembed_in=p.unembed_in)


def feature_intervention(
    model: HookedModel,
    prompt: str | Tensor,
    interventions: Sequence,
    *,
    apply_activation_function: bool = True,
    sparse: bool = False,
    **mode_args: Unpack[ModeArguments],
) -> tuple[Tensor, Tensor]:
    """Intervene on features and rerun (circuit-tracer's ``feature_intervention``).

    interventions: list of ``(layer, pos, feature_idx, value)``; ``pos`` an int, slice, range
    or list; ``feature_idx`` an int or list; ``value`` a number, ``Scale`` or ``Add``
    (:func:`~pipeline.engine.interventions.resolve_plan`). constrained_layers, freeze_attention,
    direct_effects, errors: the mode (:func:`~pipeline.engine.interventions.resolve_mode`, with its
    defaults).
    returns (logits (n_pos, d_vocab), activations (n_layers, n_pos, d_transcoder))

    The defaults compute what circuit-tracer 0.5.0's ``feature_intervention`` computes: the
    model's own MLPs on the live input plus the intervened features' decoder changes, attention
    patterns frozen at their clean values. ``errors="frozen"`` intervenes on the local
    replacement model instead (error vectors held at their clean values), which is what a
    circuit's faithfulness inside the replacement model asks about.

    The activations are the transcoders' reading of this run's live MLP inputs, zero at BOS (as
    circuit-tracer returns them: an intervened feature shows the value it was read at, not the
    value it was set to); ``apply_activation_function=False`` returns pre-activations instead,
    which is what attribution edges predict.
    """
    runner = InterventionRunner(model, prompt)
    res = runner.run(interventions, apply_activation_function=apply_activation_function, sparse=sparse, **mode_args)
    return res.logits, res.activations
