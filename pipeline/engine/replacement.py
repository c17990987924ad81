"""The replacement model: a TransformerLens 4 bridge with a transcoder in place of every MLP.

Three ways of running it, each one set of hooks installed inside ``with bridge.hooks(...)``
(so they are removed when the run ends, also on error):

1. ``capture``: the clean base model; records the transcoders' inputs and the true MLP
   outputs, from which feature activations, reconstructions and error vectors follow.
2. ``run_replacement``: MLP outputs replaced by the transcoder reconstructions computed on
   the live residual stream (plus the error vectors, when given: then the logits are the
   base model's).
3. ``frozen_forward``: the local linearisation used by attribution. Attention patterns and
   every normalisation scale are detached, each MLP output is the clean output with the
   gradient routed only through the transcoder's skip term, so the residual stream is
   linear in token embeddings, decoder outputs and error vectors.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pipeline.devices import check_device_dtype, parse_dtype, same_device
from pipeline.digests import remembered
from pipeline.engine import generation, intervened_forward
from pipeline.engine import hooks as H
from pipeline.engine.tokens import check_prompt_text, check_prompt_tokens, check_token_ids
from pipeline.transcoders import Transcoders, load_transcoders
from pipeline.transcoders.lazy import all_finite

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class Capture:
    """One clean forward pass of the base model on a prompt, seen through the transcoders.

    tokens: (n_pos,) input ids, BOS first
    logits: (n_pos, d_vocab)
    mlp_inputs: (n_layers, n_pos, d_model) tensors at the transcoders' feature_input_hook
    mlp_outputs: (n_layers, n_pos, d_model) true MLP outputs (feature_output_hook)
    activations: (n_layers, n_pos, d_transcoder) feature activations, zero at the BOS position
    reconstructions: (n_layers, n_pos, d_model) transcoder outputs (bias and skip included)
    errors: (n_layers, n_pos, d_model) mlp_outputs - reconstructions
    token_embeddings: (n_pos, d_model) the token embedding (``hook_embed``) at each position
    """

    tokens: Tensor
    logits: Tensor
    mlp_inputs: Tensor
    mlp_outputs: Tensor
    activations: Tensor
    reconstructions: Tensor
    errors: Tensor
    token_embeddings: Tensor

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    def active_features(self) -> tuple[Tensor, Tensor]:
        """Active features in (layer, pos, feature) order.

        returns (indices (n_active, 3) long, values (n_active,))
        """
        idx = self.activations.nonzero()  # row-major: lexicographic (layer, pos, feature)
        values = self.activations[idx[:, 0], idx[:, 1], idx[:, 2]]
        return idx, values


@dataclass
class FrozenForward:
    """The graph of one frozen forward pass of ``batch`` copies of the prompt.

    mlp_inputs[l]: (batch, n_pos, d_model) read location of layer l's transcoder (in the graph)
    mlp_outputs[l]: (batch, n_pos, d_model) leaf at layer l's write location
    embed: (batch, n_pos, d_model) leaf at the token embedding
    unembed_in: (batch, n_pos, d_model) input of the unembedding (after the frozen final norm)
    logits: (batch, n_pos, d_vocab)
    """

    mlp_inputs: list[Tensor]
    mlp_outputs: list[Tensor]
    embed: Tensor
    unembed_in: Tensor
    logits: Tensor

    @property
    def batch(self) -> int:
        return len(self.embed)


class ReplacementModel:
    """A base model (TransformerLens 4 bridge) plus transcoders for every layer.

    Mirrors circuit-tracer's ``ReplacementModel``: ``from_pretrained``, ``get_activations``,
    and the interventions built on the same hooks.
    """

    def __init__(self, bridge, transcoders: Transcoders, *, model_name: str = ""):
        self.bridge = bridge
        self.transcoders = transcoders
        self.model_name = model_name
        cfg = bridge.cfg
        self.n_layers: int = int(cfg.n_layers)
        self.d_model: int = int(cfg.d_model)
        self.n_ctx: int = int(cfg.n_ctx)
        self.normalization: str = str(getattr(cfg, "normalization_type", "LN") or "LN")
        transcoders.check_compatible(self.n_layers, self.d_model)
        _check_same_place(bridge, transcoders)
        self.input_hooks = [
            H.block_hook(transcoders.feature_input_hook, layer, self.normalization) for layer in range(self.n_layers)
        ]
        self.output_hooks = [
            H.block_hook(transcoders.feature_output_hook, layer, self.normalization) for layer in range(self.n_layers)
        ]
        if transcoders.feature_input_hook == "hook_mlp_in":
            bridge.set_use_hook_mlp_in(True)
        for name in self.input_hooks + self.output_hooks:
            if name not in bridge.hook_dict:
                raise ValueError(
                    f"the model has no hook {name!r} (from the transcoders' config.yaml): "
                    "check feature_input_hook / feature_output_hook"
                )
        self.pattern_hooks = [n for n in bridge.hook_dict if H.is_attention_pattern_hook(n)]
        self.scale_hooks = [n for n in bridge.hook_dict if H.is_norm_scale_hook(n)]
        for p in bridge.parameters():
            p.requires_grad_(False)
        self._digest: str | None = None
        self._weight_files: list[Path] = []  # the local files it was loaded from (from_pretrained)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model_name_or_dir: str | os.PathLike,
        transcoders: Transcoders | str | os.PathLike,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        lazy_encoder: bool = False,
    ) -> ReplacementModel:
        """Load a Hugging Face model (hub name or local directory, offline) and its transcoders.

        device, dtype: where the model and the transcoders live and compute (``cuda``, ``cuda:1``,
        ``mps``, ``cpu``; ``float32``, ``bfloat16``, ``float16``, ``float64``, as torch.dtype or
        name); a device this machine lacks, or a dtype it cannot run, is a ``DeviceError`` (a
        ValueError) naming the fix, raised before anything loads. Transcoders given as an object
        must already be on that device in that dtype.
        lazy_encoder: when ``transcoders`` is a path, leave the encoders on disk (streamed per
        forward, rows read on demand; see ``load_transcoders``). Attribution encodes once, so
        this lowers its peak memory by the encoders' size at no measurable cost.
        """
        # imported here: TransformerLens takes seconds to import, and only loading a model needs it
        from transformer_lens import TransformerBridge

        dtype = parse_dtype(dtype)
        device = check_device_dtype(device, dtype)
        source = str(model_name_or_dir)
        if Path(source).exists():
            _check_local_model_dir(Path(source))
        if not isinstance(transcoders, Transcoders):
            transcoders = load_transcoders(transcoders, device=device, dtype=dtype, lazy_encoder=lazy_encoder)
        elif not same_device(transcoders.device, device) or transcoders.dtype != dtype:
            # before the model loads: the same check as __init__, without the wait
            raise ValueError(
                f"the transcoders are on {transcoders.device} in {transcoders.dtype}, the model is to load on "
                f"{device} in {dtype}: load both with the same device and dtype"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                bridge = TransformerBridge.boot_transformers(source, device=str(device), dtype=dtype, revision=revision)
            except OSError as exc:
                raise OSError(
                    f"could not load model {source!r} ({exc.__class__.__name__}): "
                    "pass a local Hugging Face directory (config.json, weights, tokenizer), "
                    "or make the hub reachable"
                ) from exc
        bridge.eval()
        check_model_weights(bridge.original_model, source)
        model = cls(bridge, transcoders, model_name=source)
        if Path(source).is_dir():
            model._weight_files = sorted(p for p in Path(source).iterdir() if p.is_file())
        return model

    @property
    def tokenizer(self):
        return self.bridge.tokenizer

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model and its transcoders compute in."""
        return self.transcoders.dtype

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (``cuda:0``, not ``cuda``): every tensor a run creates goes here."""
        return self.bridge.W_U.device

    @property
    def W_U(self) -> Tensor:
        """Unembedding (d_model, d_vocab)."""
        return self.bridge.W_U

    def digest(self) -> str:
        """sha256 of the model's weights (names, shapes and bytes), for caches and stores.

        A model loaded from a local directory has it remembered across processes under the
        stat of that directory's files, the dtype and the library versions
        (:mod:`pipeline.digests`): it is the digest of the weights as loaded, so a model edited
        in memory needs a fresh ``ReplacementModel``.
        """
        if self._digest is None:
            if self._weight_files:
                extra = f"{self.dtype}|torch {torch.__version__}|transformers {_transformers_version()}"
                self._digest = remembered("model-state-dict", self._weight_files, self._hash_state_dict, extra)
            else:
                self._digest = self._hash_state_dict()
        return self._digest

    def _hash_state_dict(self) -> str:
        h = hashlib.sha256()
        for name, tensor in sorted(self.bridge.original_model.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode())
            # hashed through the buffer, not .tobytes(): a copy of the embedding would be
            # the largest allocation of a whole attribution run
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
        return h.hexdigest()

    # ------------------------------------------------------------------ tokens
    def tokenize(self, prompt: str | Tensor) -> Tensor:
        """Input ids (n_pos,), with BOS prepended when the tokenizer does not add one."""
        if isinstance(prompt, Tensor):
            tokens = check_token_ids(prompt, int(self.bridge.cfg.d_vocab))
        else:
            check_prompt_text(prompt)
            tokens = self.bridge.to_tokens(prompt, truncate=False)[0]
        check_prompt_tokens(tokens, self.n_ctx, from_text=not isinstance(prompt, Tensor))
        return tokens.to(self.bridge.cfg.device)

    # ------------------------------------------------------------------ clean run
    @torch.no_grad()
    def capture(self, prompt: str | Tensor) -> Capture:
        """Run the base model once and derive activations, reconstructions and errors."""
        tokens = self.tokenize(prompt)
        mlp_in: dict[int, Tensor] = {}
        mlp_out: dict[int, Tensor] = {}
        embed: list[Tensor] = []

        def save_to(store: dict[int, Tensor], layer: int):
            def hook(tensor: Tensor, *, hook) -> None:
                store[layer] = tensor[0].detach().clone()

            return hook

        def save_embed(tensor: Tensor, *, hook) -> None:
            embed.append(tensor[0].detach().clone())

        fwd = [(H.EMBED, save_embed)]
        for layer in range(self.n_layers):
            fwd.append((self.input_hooks[layer], save_to(mlp_in, layer)))
            fwd.append((self.output_hooks[layer], save_to(mlp_out, layer)))
        with self.hooks(fwd):
            logits = self.bridge(tokens[None])[0]

        x = torch.stack([mlp_in[layer] for layer in range(self.n_layers)])
        y = torch.stack([mlp_out[layer] for layer in range(self.n_layers)])
        self._check_finite_residual(tokens, embed[0], x, y)
        acts = torch.stack([self._activations(layer, x[layer]) for layer in range(self.n_layers)])
        recon = torch.stack(
            [self.transcoders.reconstruct(layer, list(acts[: layer + 1]), x[layer]) for layer in range(self.n_layers)]
        )
        return Capture(
            tokens=tokens,
            logits=logits.detach(),
            mlp_inputs=x,
            mlp_outputs=y,
            activations=acts,
            reconstructions=recon,
            errors=y - recon,
            token_embeddings=embed[0],
        )

    def _check_finite_residual(self, tokens: Tensor, embed: Tensor, x: Tensor, y: Tensor) -> None:
        """The clean run's residual stream (the embedding, then every layer's MLP input and output)
        holds no NaN/inf; otherwise one line naming the first layer and position that does."""
        if bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all()) and bool(torch.isfinite(embed).all()):
            return  # the common case: three reductions over tensors the capture keeps anyway
        stages = [("the token embedding", embed)]
        for layer in range(self.n_layers):
            stages += [(f"layer {layer}'s MLP input", x[layer]), (f"layer {layer}'s MLP output", y[layer])]
        where, t = next((w, t) for w, t in stages if not bool(torch.isfinite(t).all()))
        pos = int((~torch.isfinite(t)).any(dim=-1).nonzero()[0])
        token = self.tokenizer.decode([int(tokens[pos])]) if self.tokenizer is not None else str(int(tokens[pos]))
        raise ValueError(
            f"the model's residual stream holds NaN or inf at {where}, position {pos} (token {token!r}): "
            f"the model overflows in {self.dtype} (load it in float32) or its weights are damaged "
            "(re-download or re-train the checkpoint)"
        )

    def get_activations(self, prompt: str | Tensor, sparse: bool = True) -> tuple[Tensor, Tensor]:
        """Logits (n_pos, d_vocab) and feature activations (n_layers, n_pos, d_transcoder).

        BOS-position activations are zero. ``sparse=True`` returns a coalesced COO tensor.
        """
        cap = self.capture(prompt)
        acts = cap.activations.to_sparse().coalesce() if sparse else cap.activations
        return cap.logits, acts

    def _activations(self, layer: int, x: Tensor) -> Tensor:
        """Feature activations of ``layer`` on x (..., n_pos, d_model), zero at position 0 (BOS)."""
        acts = self.transcoders.activations(layer, x)
        acts[..., 0, :] = 0
        return acts

    # ------------------------------------------------------------------ replacement run
    @torch.no_grad()
    def run_replacement(self, prompt: str | Tensor, errors: Tensor | None = None) -> Tensor:
        """Logits (n_pos, d_vocab) of the replacement model.

        Every MLP output is the transcoder reconstruction of the live MLP input; with
        ``errors`` (n_layers, n_pos, d_model) added back, this is the base model again.
        """
        tokens = self.tokenize(prompt)
        x_live: dict[int, Tensor] = {}
        acts: list[Tensor] = []

        def read(layer: int):
            def hook(tensor: Tensor, *, hook) -> None:
                x_live[layer] = tensor[0]
                acts.append(self._activations(layer, tensor[0].clone()))

            return hook

        def write(layer: int):
            def hook(tensor: Tensor, *, hook) -> Tensor:
                out = self.transcoders.reconstruct(layer, acts[: layer + 1], x_live[layer])
                if errors is not None:
                    out = out + errors[layer]
                return out[None].to(tensor.dtype)

            return hook

        fwd = []
        for layer in range(self.n_layers):
            fwd.append((self.input_hooks[layer], read(layer)))
            fwd.append((self.output_hooks[layer], write(layer)))
        with self.hooks(fwd):
            return self.bridge(tokens[None])[0]

    # ------------------------------------------------------------------ linearised run
    def frozen_forward(self, capture: Capture, batch: int, n_pos: int | None = None) -> FrozenForward:
        """Forward ``batch`` copies of the prompt through the frozen, linearised model.

        The returned tensors keep the autograd graph: inject a gradient at a read location
        (``mlp_inputs[l]`` or ``unembed_in``) and ``torch.autograd.grad`` to the write
        locations gives direct effects. Values equal the clean run's.

        ``n_pos``: run only the first ``n_pos`` tokens. The model is causal, so every tensor
        at those positions equals the full prompt's, and a target at a position below
        ``n_pos`` has all its sources there: attribution differentiates the shortest prefix
        that holds a batch's targets.
        """
        n = capture.n_pos if n_pos is None else int(n_pos)
        if not 0 < n <= capture.n_pos:
            raise ValueError(f"n_pos must be in [1, {capture.n_pos}], got {n_pos!r}")
        tokens = capture.tokens[None, :n].expand(batch, -1)
        reads: dict[int, Tensor] = {}
        writes: dict[int, Tensor] = {}
        grabbed: dict[str, Tensor] = {}

        def detach(tensor: Tensor, *, hook) -> Tensor:
            return tensor.detach()

        def leaf_embed(tensor: Tensor, *, hook) -> Tensor:
            leaf = tensor.detach().clone().requires_grad_(True)
            grabbed["embed"] = leaf
            return leaf

        def read(layer: int):
            def hook(tensor: Tensor, *, hook) -> None:
                reads[layer] = tensor

            return hook

        def write(layer: int):
            def hook(tensor: Tensor, *, hook) -> Tensor:
                leaf = capture.mlp_outputs[layer][:n].expand(batch, -1, -1).clone().requires_grad_(True)
                writes[layer] = leaf
                skip = self.transcoders.skip(layer, reads[layer])
                if skip is None:
                    return leaf
                return leaf + (skip - skip.detach())  # value: clean output; gradient: skip only

            return hook

        def grab_unembed(tensor: Tensor, *, hook) -> None:
            grabbed["unembed_in"] = tensor

        fwd: list[tuple[str, Callable[..., Tensor | None]]] = [
            (name, detach) for name in self.pattern_hooks + self.scale_hooks
        ]
        fwd.append((H.EMBED, leaf_embed))
        for layer in range(self.n_layers):
            fwd.append((self.input_hooks[layer], read(layer)))
            fwd.append((self.output_hooks[layer], write(layer)))
        fwd.append((H.UNEMBED_IN, grab_unembed))
        with torch.enable_grad(), self.hooks(fwd):
            logits = self.bridge(tokens)
        return FrozenForward(
            mlp_inputs=[reads[layer] for layer in range(self.n_layers)],
            mlp_outputs=[writes[layer] for layer in range(self.n_layers)],
            embed=grabbed["embed"],
            unembed_in=grabbed["unembed_in"],
            logits=logits,
        )

    # ------------------------------------------------------------------ hooks
    @contextmanager
    def hooks(self, fwd_hooks: list, bwd_hooks: list | None = None) -> Iterator[None]:
        """Install hooks for one run; they are removed on exit, also on error."""
        with warnings.catch_warnings():
            # the bridge warns on every forward when a norm's hook_scale is edited
            warnings.simplefilter("ignore")
            with self.bridge.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks or []):
                yield

    # ------------------------------------------------------------------ interventions
    def feature_intervention(self, prompt: str | Tensor, interventions, **kwargs):
        """See :func:`pipeline.engine.intervened_forward.feature_intervention`."""
        return intervened_forward.feature_intervention(self, prompt, interventions, **kwargs)

    def feature_intervention_generate(self, prompt: str | Tensor, interventions, **kwargs):
        """See :func:`pipeline.engine.generation.feature_intervention_generate`."""
        return generation.feature_intervention_generate(self, prompt, interventions, **kwargs)


def _check_same_place(bridge, transcoders: Transcoders) -> None:
    """The transcoders live on the model's device in the model's dtype: otherwise every hook would
    copy between devices or mix precisions (one line naming both and the fix)."""
    W_U = bridge.W_U
    if not same_device(W_U.device, transcoders.device) or W_U.dtype != transcoders.dtype:
        raise ValueError(
            f"the model is on {W_U.device} in {W_U.dtype} but its transcoders on {transcoders.device} in "
            f"{transcoders.dtype}: load both with the same device and dtype (load_transcoders(..., "
            f"device={str(W_U.device)!r}, dtype={W_U.dtype}))"
        )


def _transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def check_model_weights(module: torch.nn.Module, source: str) -> None:
    """Every weight of the base model is finite; otherwise one line naming the first tensor that
    is not (a damaged checkpoint gives NaN graphs everywhere). Bounded memory: a float64 sum per
    tensor, chunks only when that sum is not finite."""
    for name, tensor in module.state_dict().items():
        if not all_finite(tensor.detach()):
            name = name.replace("._original_component", "")  # the bridge's wrapping: the checkpoint's name
            raise ValueError(
                f"model {source!r}: weight {name} holds NaN or inf; the checkpoint is damaged, "
                "re-download or re-train it"
            )


def _check_local_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise NotADirectoryError(f"model path {path} is not a directory of a Hugging Face model")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: save the model there with model.save_pretrained()")
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model directory {path} has no tokenizer: save one there with "
            "tokenizer.save_pretrained() (tokenizer.json or tokenizer_config.json)"
        )
