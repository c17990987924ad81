"""Feature interventions: every mode and error option equals a forward pass written here with
plain hooks, the direct-effects mode reproduces attribution edges, zero interventions reproduce
the clean run, cached generation equals uncached generation, and bad input is a clear error.

The reference (:func:`manual_run`) is written from the definitions in docs/interventions.md, in
circuit-tracer 0.5.0's form rather than the library's: its own clean run, a
``(n_layers, n_pos, d_model)`` buffer of decoder deltas that each intervened layer fills (a CLT
feature into every later layer) and each MLP output in the intervention range adds, and the
local replacement model (``errors="frozen"``) as ``clean error + reconstruction``. It uses the
transcoders' own encoders, decoders and skip terms, and nothing of the intervention code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor

from pipeline.engine.attribution import attribute
from pipeline.engine.generation import feature_intervention_generate
from pipeline.engine.intervened_forward import InterventionRunner, feature_intervention
from pipeline.engine.interventions import Add, Scale
from pipeline.engine.replacement import ReplacementModel
from pipeline.transcoders import load_transcoders

ARCHS = ["tiny_gpt2_dir", "tiny_llama_dir"]
KINDS = ["plt_dir", "plt_skip_dir", "clt_dir"]
_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def load(request):
    """load(arch, kind) -> float64 ReplacementModel; one bridge per architecture (booting a
    bridge is the slow part), shared by every transcoder set."""

    def make(arch, kind):
        if (arch, kind) not in _MODELS:
            bridge = next((m.bridge for (a, _), m in _MODELS.items() if a == arch), None)
            if bridge is None:
                model = ReplacementModel.from_pretrained(
                    request.getfixturevalue(arch), request.getfixturevalue(kind), dtype=torch.float64
                )
            else:
                tc = load_transcoders(request.getfixturevalue(kind), dtype=torch.float64)
                model = ReplacementModel(bridge, tc, model_name=str(request.getfixturevalue(arch)))
            _MODELS[arch, kind] = model
        return _MODELS[arch, kind]

    return make


def prompt_for(model: ReplacementModel, n_words: int = 6) -> str:
    words = [w for w in model.tokenizer.get_vocab() if w.isalpha()]
    return " ".join(sorted(words)[3 : 3 + n_words])


def some_interventions(model: ReplacementModel, prompt: str) -> list:
    """A set, a scale and an add on active features of both layers, an inactive feature set,
    and a layer-1 feature set at the last position (its live activation differs from the clean
    one once layer 0 is changed, so the reference activation matters)."""
    cap = model.capture(prompt)
    idx, _ = cap.active_features()
    by_layer = {l: idx[idx[:, 0] == l] for l in range(model.n_layers)}
    assert all(len(v) >= 2 for v in by_layer.values()), "fixture has too few active features"
    (l0, p0, f0), (l0b, p0b, f0b) = by_layer[0][0].tolist(), by_layer[0][-1].tolist()
    (l1, p1, f1) = by_layer[1][len(by_layer[1]) // 2].tolist()
    (l1b, p1b, f1b) = by_layer[1][-1].tolist()
    inactive = int((cap.activations[0, 2] == 0).nonzero()[0])
    return [
        (l0, p0, f0, 0.0),
        (l0b, p0b, f0b, Scale(-2.0)),
        (l1, p1, f1, Add(0.7)),
        (0, 2, inactive, 1.5),
        (l1b, p1b, f1b, 0.25),
    ]


# ---------------------------------------------------------------------------- references
@dataclass
class ManualClean:
    """The base model's run with plain hooks. x, y: (n_layers, n_pos, d_model) at the
    transcoders' input / output hooks; acts: (n_layers, n_pos, d_transcoder), zero at BOS;
    frozen: every attention pattern and norm scale by hook name."""

    logits: Tensor
    x: Tensor
    y: Tensor
    acts: Tensor
    frozen: dict


@torch.no_grad()
def manual_clean(model: ReplacementModel, tokens: Tensor) -> ManualClean:
    tc = model.transcoders
    saved: dict = {}

    def save(name):  # by the name asked for (the bridge may report an alias's target)
        def hook(t, *, hook):
            saved[name] = t.detach().clone()

        return hook

    names = model.pattern_hooks + model.scale_hooks + model.input_hooks + model.output_hooks
    with model.hooks([(name, save(name)) for name in names]):
        logits = model.bridge(tokens[None])[0]
    x = torch.stack([saved[h][0] for h in model.input_hooks])
    acts = torch.stack([tc.activations(l, x[l]) for l in range(model.n_layers)])
    acts[:, 0] = 0
    y = torch.stack([saved[h][0] for h in model.output_hooks])
    return ManualClean(logits, x, y, acts, {n: saved[n] for n in model.pattern_hooks + model.scale_hooks})


def new_value(value, ref: float) -> float:
    if isinstance(value, Scale):
        return value.factor * ref
    if isinstance(value, Add):
        return ref + value.delta
    return float(value)


def prompt_rows(pos, n_prompt: int) -> list[int]:
    if isinstance(pos, slice):
        return list(range(*pos.indices(n_prompt)))
    if isinstance(pos, (range, list)):
        return [p % n_prompt for p in pos]
    return [pos % n_prompt]


def generated_rows(pos, n_prompt: int, n_seq: int, generated_positions: str) -> list[int]:
    """circuit-tracer ("all"): every generated position for an open-ended slice; "slice": those
    the slice selects."""
    if not (isinstance(pos, slice) and pos.stop is None):
        return []
    if generated_positions == "all":
        return list(range(n_prompt, n_seq))
    start = pos.start or 0
    if start < 0:
        start += n_prompt
    return [r for r in range(n_prompt, n_seq) if r >= start and (r - start) % (pos.step or 1) == 0]


@torch.no_grad()
def manual_run(
    model: ReplacementModel,
    prompt,
    interventions: list,
    *,
    constrained=None,
    freeze_attention: bool = True,
    errors: str = "recomputed",
    tokens: Tensor | None = None,
    generated_positions: str = "all",
    wrong: str | None = None,
):
    """One forward pass by the definitions; returns (logits, activations read at the transcoder
    inputs, zero at BOS).

    constrained: layers frozen (None: iterative patching). tokens: the prompt plus generated
    tokens, which run with attention free and the model's MLPs plus the open-ended
    interventions' deltas. wrong: a deliberate mistake, to show that the comparison fails —
    "other_errors", "attention_free", "clean_reference", "own_layer_only", "no_skip_change",
    "scales_frozen".
    """
    tc = model.transcoders
    n = model.n_layers
    prompt_tokens = model.tokenize(prompt)
    n_prompt = prompt_tokens.numel()
    seq = prompt_tokens if tokens is None else tokens
    n_seq = seq.numel()
    clean = manual_clean(model, prompt_tokens)
    if wrong == "other_errors":
        errors = "frozen" if errors == "recomputed" else "recomputed"
    frozen_layers = set(constrained) if constrained is not None else set()
    freeze_patterns = (freeze_attention or constrained is not None) and wrong != "attention_free"
    freeze_scales = frozen_layers == set(range(n)) or (wrong == "scales_frozen" and constrained is not None)
    in_range = set(range(n)) if constrained is None else frozen_layers  # where deltas are added
    live_reference = constrained is None and wrong != "clean_reference"

    deltas = torch.zeros(n, n_seq, clean.y.shape[-1], dtype=clean.y.dtype)
    read: list = [None] * n  # the transcoders' reading of the live inputs
    acts_model: list = [None] * n  # frozen errors, iterative: the reading with interventions set
    x_live: list = [None] * n

    def freeze(name):  # prompt rows only: generated positions run with attention free
        def hook(t, *, hook):
            out = t.clone()
            if name in model.pattern_hooks:
                out[:, :, :n_prompt, :n_prompt] = clean.frozen[name]
            else:
                out[:, :n_prompt] = clean.frozen[name]
            return out

        return hook

    def on_read(layer):
        def hook(t, *, hook):
            x = t[0].clone()
            x_live[layer] = x
            a = tc.activations(layer, x)
            a[0] = 0
            read[layer] = a.clone()
            acts_model[layer] = a.clone()
            delta = torch.zeros_like(a)  # (n_seq, d_transcoder): new value - reference
            for l, pos, f, v in interventions:
                if l != layer:
                    continue
                for p in prompt_rows(pos, n_prompt):
                    ref = float(a[p, f]) if live_reference else float(clean.acts[layer, p, f])
                    delta[p, f] = new_value(v, ref) - ref
                    acts_model[layer][p, f] = new_value(v, ref)
                for p in generated_rows(pos, n_prompt, n_seq, generated_positions):
                    delta[p, f] = new_value(v, float(a[p, f])) - float(a[p, f])
            outs = tc.output_layers(layer)
            dec = tc.decoder_vectors(layer, torch.arange(tc.d_transcoder))  # (d_tc, n_out, d_model)
            for j in outs:
                if wrong == "own_layer_only" and j != layer:
                    continue
                deltas[j] += delta @ dec[:, j - outs.start]

        return hook

    def on_write(layer):
        def hook(t, *, hook):
            y = t[0].clone()  # the model's own MLP output on the live input
            P = slice(0, n_prompt)
            if layer in frozen_layers:
                y[P] = clean.y[layer]
                skip_live = tc.skip(layer, x_live[layer][P])
                if skip_live is not None and wrong != "no_skip_change":
                    y[P] += skip_live - tc.skip(layer, clean.x[layer])
            elif errors == "frozen":  # the local replacement model: clean error + reconstruction
                error = clean.y[layer] - tc.reconstruct(layer, list(clean.acts[: layer + 1]), clean.x[layer])
                acts = acts_model if constrained is None else read
                y[P] = error + tc.reconstruct(layer, [a[P] for a in acts[: layer + 1]], x_live[layer][P])
            if layer in in_range and (layer in frozen_layers or errors == "recomputed"):
                y[P] += deltas[layer, P]  # (frozen errors carry them in the reconstruction)
            y[n_prompt:] += deltas[layer, n_prompt:]  # generated positions: live, every layer
            return y[None]

        return hook

    fwd = []
    if freeze_patterns:
        fwd += [(name, freeze(name)) for name in model.pattern_hooks]
    if freeze_scales:
        fwd += [(name, freeze(name)) for name in model.scale_hooks]
    for layer in range(n):
        fwd += [(model.input_hooks[layer], on_read(layer)), (model.output_hooks[layer], on_write(layer))]
    with model.hooks(fwd):
        logits = model.bridge(seq[None])[0]
    return logits, torch.stack(read)


MODES = {
    "iterative": dict(),
    "iterative_free_attention": dict(freeze_attention=False),
    "constrained_layer_0": dict(constrained_layers=[0]),
    "constrained_layer_1": dict(constrained_layers=range(1, 2)),
    "direct": dict(direct_effects=True),
}
ERRORS = {"default": {}, "frozen": dict(errors="frozen")}


def manual_kwargs(kw: dict) -> dict:
    out = dict(freeze_attention=kw.get("freeze_attention", True), errors=kw.get("errors", "recomputed"))
    if kw.get("direct_effects"):
        out["constrained"] = range(2)
    elif "constrained_layers" in kw:
        out["constrained"] = list(kw["constrained_layers"])
    return out


def check_against_manual(model, mode: str, errors: str) -> None:
    kw = {**MODES[mode], **ERRORS[errors]}
    prompt = prompt_for(model)
    ivs = some_interventions(model, prompt)
    logits, acts = feature_intervention(model, prompt, ivs, **kw)
    ref_logits, ref_acts = manual_run(model, prompt, ivs, **manual_kwargs(kw))
    clean = model.capture(prompt).logits
    assert (logits - clean).abs().max() > 1e-4, "the interventions changed nothing"
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(acts, ref_acts, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------- modes
@pytest.mark.parametrize("errors", list(ERRORS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", KINDS)
def test_each_mode_equals_manual_forward_with_plain_hooks_gpt2(load, mode, errors, kind):
    check_against_manual(load("tiny_gpt2_dir", kind), mode, errors)


@pytest.mark.parametrize("errors", list(ERRORS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["plt_skip_dir", "clt_dir"])
def test_each_mode_equals_manual_forward_with_plain_hooks_llama(load, mode, errors, kind):
    check_against_manual(load("tiny_llama_dir", kind), mode, errors)


def test_default_is_circuit_tracers_definition(load):
    # the default is errors="recomputed" (the model's own MLPs), bit for bit, and differs
    # from the local replacement model once a change reaches a later layer
    model = load("tiny_gpt2_dir", "clt_dir")
    prompt = prompt_for(model)
    ivs = some_interventions(model, prompt)
    default, _ = feature_intervention(model, prompt, ivs)
    recomputed, _ = feature_intervention(model, prompt, ivs, errors="recomputed")
    frozen, _ = feature_intervention(model, prompt, ivs, errors="frozen")
    assert torch.equal(default, recomputed)
    assert (default - frozen).abs().max() > 1e-3


WRONG = [  # (mistake, mode, errors, transcoders): each must make the manual pass disagree
    ("other_errors", "iterative", "default", "plt_dir"),
    ("other_errors", "constrained_layer_0", "frozen", "clt_dir"),
    ("attention_free", "iterative", "default", "clt_dir"),
    ("attention_free", "constrained_layer_0", "default", "plt_dir"),
    ("clean_reference", "iterative", "default", "plt_dir"),
    ("own_layer_only", "iterative", "default", "clt_dir"),
    ("own_layer_only", "direct", "default", "clt_dir"),
    ("no_skip_change", "direct", "default", "plt_skip_dir"),
    ("scales_frozen", "constrained_layer_1", "default", "plt_dir"),
]


@pytest.mark.parametrize("wrong, mode, errors, kind", WRONG)
def test_a_deliberately_wrong_manual_pass_differs(load, wrong, mode, errors, kind):
    model = load("tiny_gpt2_dir", kind)
    kw = {**MODES[mode], **ERRORS[errors]}
    prompt = prompt_for(model)
    ivs = some_interventions(model, prompt)
    logits, _ = feature_intervention(model, prompt, ivs, **kw)
    right, _ = manual_run(model, prompt, ivs, **manual_kwargs(kw))
    mistaken, _ = manual_run(model, prompt, ivs, **manual_kwargs(kw), wrong=wrong)
    torch.testing.assert_close(logits, right, rtol=0, atol=1e-10)
    assert (logits - mistaken).abs().max() > 1e-6, f"the comparison cannot see {wrong!r}"


def test_open_ended_slice_and_range_positions_equal_listing_them(load):
    model = load("tiny_gpt2_dir", "clt_dir")
    prompt = prompt_for(model)
    n = model.tokenize(prompt).numel()
    a, _ = feature_intervention(model, prompt, [(0, slice(2, None), [5, 9], Scale(-2.0))])
    b, _ = feature_intervention(model, prompt, [(0, p, f, Scale(-2.0)) for p in range(2, n) for f in (5, 9)])
    c, _ = feature_intervention(model, prompt, [(0, range(2, n), torch.tensor([5, 9]), Scale(-2.0))])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    # negative positions count from the end of the prompt
    d, _ = feature_intervention(model, prompt, [(1, -1, 3, 2.0)])
    e, _ = feature_intervention(model, prompt, [(1, n - 1, 3, 2.0)])
    torch.testing.assert_close(d, e, rtol=0, atol=0)


def test_scale_multiplies_the_live_activation_and_last_duplicate_wins(load):
    model = load("tiny_gpt2_dir", "plt_dir")
    prompt = prompt_for(model)
    cap = model.capture(prompt)
    idx, vals = cap.active_features()
    l, p, f = idx[0].tolist()  # layer 0: its live activation is the clean one
    a, _ = feature_intervention(model, prompt, [(l, p, f, Scale(-2.0))])
    b, _ = feature_intervention(model, prompt, [(l, p, f, 5.0), (l, p, f, -2.0 * float(vals[0]))])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_sparse_activations_equal_dense(load):
    model = load("tiny_gpt2_dir", "plt_dir")
    prompt = prompt_for(model)
    ivs = some_interventions(model, prompt)
    _, dense = feature_intervention(model, prompt, ivs)
    _, sparse = feature_intervention(model, prompt, ivs, sparse=True)
    assert sparse.is_sparse
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=0, atol=0)


def test_replacement_model_methods_delegate(load):
    model = load("tiny_gpt2_dir", "plt_dir")
    if not hasattr(model, "feature_intervention"):
        pytest.skip("ReplacementModel has no delegation methods")
    prompt = prompt_for(model)
    ivs = some_interventions(model, prompt)
    a, _ = model.feature_intervention(prompt, ivs)
    b, _ = feature_intervention(model, prompt, ivs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    g = model.feature_intervention_generate(prompt, ivs, max_new_tokens=2, stop_at_eos=False)
    assert g.tokens.numel() == model.tokenize(prompt).numel() + 2


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_interventions_reproduce_the_clean_run_exactly(load, arch, kind):
    model = load(arch, kind)
    prompt = prompt_for(model)
    runner = InterventionRunner(model, prompt)
    cap = model.capture(prompt)
    idx, vals = cap.active_features()
    (l, p, f), a = idx[-1].tolist(), float(vals[-1])
    no_ops = [
        [],
        [(l, p, f, Scale(1.0))],
        [(l, p, f, Add(0.0))],
        [(0, 1, 0, Scale(3.0))] if cap.activations[0, 1, 0] == 0 else [],
    ]
    for kw in [{**m, **e} for m in MODES.values() for e in ERRORS.values()]:
        for ivs in no_ops:
            res = runner.run(ivs, **kw)
            assert torch.equal(res.logits, cap.logits), (kw, ivs)
            assert torch.equal(res.activations, cap.activations), (kw, ivs)
    # setting a feature to its clean value in a frozen mode is a no-op too
    res = runner.run([(l, p, f, a)], direct_effects=True)
    assert torch.equal(res.logits, cap.logits)


@pytest.mark.parametrize("arch, kind", [("tiny_gpt2_dir", "clt_dir"), ("tiny_llama_dir", "plt_skip_dir")])
def test_direct_effects_mode_reproduces_attribution_edges(load, tmp_path, arch, kind):
    model = load(arch, kind)
    prompt = prompt_for(model)
    graph = attribute(prompt, model, batch_size=64, store=tmp_path / "g.zarr", verbose=False)
    A = graph.adjacency_dense().astype(np.float64)
    runner = InterventionRunner(model, prompt)
    feats = graph.active_features[graph.selected_features]
    vecs = torch.as_tensor(graph.table("logit_vectors"), dtype=torch.float64)
    delta = 0.5
    rng = np.random.default_rng(0)
    sources = rng.choice(graph.n_selected, size=min(8, graph.n_selected), replace=False)
    assert any(feats[s][0] == 0 for s in sources)
    base = runner.run([], direct_effects=True, apply_activation_function=False)
    for s in sources:
        l, p, f = (int(v) for v in feats[s])
        res = runner.run([(l, p, f, Scale(1.0 + delta))], direct_effects=True, apply_activation_function=False)
        d_acts = (res.activations - base.activations)[feats[:, 0], feats[:, 1], feats[:, 2]].numpy()
        d_logits = (vecs @ (res.unembed_in[-1] - base.unembed_in[-1])).numpy()
        # the same through the logits: a de-meaned logit change
        tok = int(graph.logit_tokens[0])
        dl = res.logits[-1] - base.logits[-1]
        assert abs(float(dl[tok] - dl.mean()) - d_logits[0]) < 1e-9
        measured = np.concatenate([d_acts, d_logits])
        predicted = delta * A[np.r_[graph.feature_slice, graph.logit_slice], s]
        # the no-op base run keeps HF's norm arithmetic (bit-exact clean run); runs that freeze
        # scales use the bridge's. HF's Llama RMSNorm computes in float32 even for a float64
        # model, hence the absolute slack there
        atol = 1e-7 if arch == "tiny_llama_dir" else 1e-10
        err = np.abs(measured - predicted).max()
        assert err <= 1e-6 * np.abs(predicted).max() + atol, f"source {s} ({l}, {p}, {f}): {err:.2e}"


# ---------------------------------------------------------------------------- generation
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("open_ended", [False, True])
def test_generation_with_kv_cache_equals_without(load, arch, open_ended):
    model = load(arch, "clt_dir")
    prompt = prompt_for(model, 4)
    cap = model.capture(prompt)
    idx, _ = cap.active_features()
    l, p, f = idx[len(idx) // 2].tolist()
    if open_ended:
        ivs = [(l, slice(p, None), f, Scale(-3.0)), (1, slice(1, None), 7, 2.5)]
    else:
        ivs = [(l, p, f, Scale(-3.0))]
    for kw in (dict(), dict(do_sample=True, temperature=2.0, top_k=20, seed=3), dict(direct_effects=True)):
        a = feature_intervention_generate(model, prompt, ivs, max_new_tokens=6, stop_at_eos=False, **kw)
        b = feature_intervention_generate(
            model, prompt, ivs, max_new_tokens=6, stop_at_eos=False, use_kv_cache=False, **kw
        )
        assert a.tokens.tolist() == b.tokens.tolist(), kw
        assert a.text == b.text and a.completion == b.completion
        assert a.logits.shape == (6, model.W_U.shape[1])
        assert a.activations.shape == (model.n_layers, cap.n_pos + 5, model.transcoders.d_transcoder)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-9)
        torch.testing.assert_close(a.activations, b.activations, rtol=0, atol=1e-9)
        # the first step is the prompt pass: feature_intervention's last position
        first, acts = feature_intervention(model, prompt, ivs, direct_effects=kw.get("direct_effects", False))
        torch.testing.assert_close(a.logits[0], first[-1], rtol=0, atol=1e-12)
        torch.testing.assert_close(a.activations[:, : cap.n_pos], acts, rtol=0, atol=1e-12)


def manual_generate(model, prompt, interventions, n_new: int, **kw):
    """Greedy generation by the definitions: each step reruns the whole sequence with
    :func:`manual_run` (prompt positions in the mode, generated ones live). Returns (tokens,
    logits (n_new, d_vocab), activations of the last pass)."""
    tokens = model.tokenize(prompt)
    steps = []
    for _ in range(n_new):
        logits, acts = manual_run(model, prompt, interventions, tokens=tokens, **kw)
        steps.append(logits[-1])
        tokens = torch.cat([tokens, logits[-1].argmax().reshape(1)])
    return tokens, torch.stack(steps), acts


GENERATION_MODES = {
    "default": dict(),
    "free_attention": dict(freeze_attention=False),
    "constrained_layer_0": dict(constrained_layers=[0]),
    "errors_frozen": dict(errors="frozen"),
}


@pytest.mark.parametrize("mode", list(GENERATION_MODES))
@pytest.mark.parametrize("arch, kind", [("tiny_gpt2_dir", "clt_dir"), ("tiny_llama_dir", "plt_skip_dir")])
def test_generation_equals_manual_greedy_generation(load, arch, kind, mode):
    model = load(arch, kind)
    prompt = prompt_for(model, 4)
    idx, _ = model.capture(prompt).active_features()
    l, p, f = idx[len(idx) // 2].tolist()
    ivs = [(l, slice(p, None), f, Scale(-3.0)), (1, slice(1, None), 7, 2.5), (0, 2, 5, 1.0)]
    kw = GENERATION_MODES[mode]
    gen = feature_intervention_generate(model, prompt, ivs, max_new_tokens=5, stop_at_eos=False, **kw)
    tokens, logits, acts = manual_generate(model, prompt, ivs, 5, **manual_kwargs(kw))
    assert gen.tokens.tolist() == tokens.tolist()
    torch.testing.assert_close(gen.logits, logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(gen.activations, acts, rtol=0, atol=1e-10)


def test_open_ended_interventions_apply_at_every_generated_position_by_default(load):
    # circuit-tracer applies an open-ended intervention at every generated token, whatever the
    # slice's start and step; generated_positions="slice" applies it where the slice says
    model = load("tiny_gpt2_dir", "clt_dir")
    prompt = prompt_for(model, 4)
    n = model.tokenize(prompt).numel()
    ivs = [(0, slice(n + 2, None), 5, 3.0), (1, slice(1, None, 2), 7, Scale(-3.0))]
    out = {}
    for where in ("all", "slice"):
        gen = feature_intervention_generate(
            model, prompt, ivs, max_new_tokens=5, stop_at_eos=False, generated_positions=where
        )
        tokens, logits, _ = manual_generate(model, prompt, ivs, 5, generated_positions=where)
        assert gen.tokens.tolist() == tokens.tolist()
        torch.testing.assert_close(gen.logits, logits, rtol=0, atol=1e-10)
        out[where] = gen.logits
    torch.testing.assert_close(out["all"][0], out["slice"][0], rtol=0, atol=0)  # the prompt pass
    assert (out["all"][1:] - out["slice"][1:]).abs().max() > 1e-6


def test_generation_reuses_a_given_clean_run_exactly(load):
    model = load("tiny_gpt2_dir", "plt_dir")
    prompt = prompt_for(model, 4)
    ivs = [(0, slice(2, None), 11, 4.0)]
    runner = InterventionRunner(model, prompt)
    a = feature_intervention_generate(model, prompt, ivs, max_new_tokens=4, stop_at_eos=False)
    b = feature_intervention_generate(
        model, runner.tokens, ivs, max_new_tokens=4, stop_at_eos=False, clean=runner.clean
    )
    assert a.tokens.tolist() == b.tokens.tolist()
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    other = InterventionRunner(model, prompt_for(model, 5)).clean
    with pytest.raises(ValueError, match="another prompt"):
        feature_intervention_generate(model, runner.tokens, ivs, max_new_tokens=2, clean=other)


def test_open_ended_interventions_apply_at_generated_positions(load):
    # with attention free and the model's own MLPs, prompt and generated positions follow the
    # same rule, so generating equals one intervention pass over the generated sequence
    model = load("tiny_gpt2_dir", "plt_dir")
    prompt = prompt_for(model, 4)
    n = model.tokenize(prompt).numel()
    ivs = [(0, slice(2, None), 11, 4.0), (1, slice(1, None), 7, Scale(-3.0))]
    kw = dict(freeze_attention=False, errors="recomputed")
    gen = feature_intervention_generate(model, prompt, ivs, max_new_tokens=5, stop_at_eos=False, **kw)
    logits, acts = feature_intervention(model, gen.tokens[:-1], ivs, **kw)
    torch.testing.assert_close(gen.logits, logits[n - 1 :], rtol=0, atol=1e-10)
    torch.testing.assert_close(gen.activations, acts, rtol=0, atol=1e-10)
    plain = feature_intervention_generate(model, prompt, [], max_new_tokens=5, stop_at_eos=False, **kw)
    closed = feature_intervention_generate(
        model,
        prompt,
        [(0, range(2, n), 11, 4.0), (1, range(1, n), 7, Scale(-3.0))],
        max_new_tokens=5,
        stop_at_eos=False,
        **kw,
    )
    assert not torch.allclose(gen.logits[1:], closed.logits[1:])  # generated positions differ
    torch.testing.assert_close(gen.logits[0], closed.logits[0], rtol=0, atol=0)
    assert not torch.allclose(plain.logits[0], gen.logits[0])
    # duplicated open-ended entries: the last one wins at generated positions too
    dup = feature_intervention_generate(
        model, prompt, [(0, slice(2, None), 11, 9.0)] + ivs, max_new_tokens=5, stop_at_eos=False, **kw
    )
    torch.testing.assert_close(dup.logits, gen.logits, rtol=0, atol=0)


def test_generation_stops_at_eos_and_samples_reproducibly(load):
    model = load("tiny_gpt2_dir", "plt_dir")
    prompt = prompt_for(model, 3)
    a = feature_intervention_generate(model, prompt, [], max_new_tokens=8, do_sample=True, seed=1, stop_at_eos=False)
    b = feature_intervention_generate(model, prompt, [], max_new_tokens=8, do_sample=True, seed=1, stop_at_eos=False)
    assert a.tokens.tolist() == b.tokens.tolist()
    eos = model.tokenizer.eos_token_id
    g = feature_intervention_generate(model, prompt, [], max_new_tokens=8, stop_at_eos=True)
    new = g.tokens[g.n_prompt :].tolist()
    assert eos not in new[:-1]
    assert len(new) == 8 or new[-1] == eos


# ---------------------------------------------------------------------------- bad input
BAD = [
    ([(0, 1, 64, 1.0)], "feature index 64 is out of range.*d_transcoder=64"),
    ([(0, 1, -1, 1.0)], "feature index -1 is out of range"),
    ([(2, 1, 3, 1.0)], "layer 2 is out of range.*2 layers"),
    ([(-1, 1, 3, 1.0)], "layer -1 is out of range"),
    ([(0, 7, 3, 1.0)], "position 7 is beyond the prompt \\(7 tokens"),
    ([(0, -8, 3, 1.0)], "position -8 is beyond the prompt"),
    ([(0, range(5, 9), 3, 1.0)], "position 7 is beyond the prompt"),
    ([(0, slice(2, 9), 3, 1.0)], "position 8 is beyond the prompt"),
    ([(0, slice(9, None), 3, 1.0)], "position 9 is beyond the prompt"),
    ([(0, 1, 3, float("nan"))], "NaN"),
    ([(0, 1, 3, float("inf"))], "infinite"),
    ([(0, 1, 3, "big")], "must be a number"),
    ([(0, 1, 3)], "must be \\(layer, pos, feature_idx, value\\)"),
    ((0, 1, 3, 1.0), "wrap a single intervention in a list"),
    ([(0.5, 1, 3, 1.0)], "layer must be an integer"),
]


@pytest.mark.parametrize("ivs, match", BAD)
def test_bad_interventions_are_clear_errors(load, ivs, match):
    model = load("tiny_gpt2_dir", "plt_dir")
    prompt = prompt_for(model)
    assert model.tokenize(prompt).numel() == 7
    with pytest.raises(ValueError, match=match):
        feature_intervention(model, prompt, ivs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Scale(float("nan")), "Scale factor is NaN"),
        (lambda: Scale(torch.tensor(float("nan"))), "Scale factor is NaN"),
        (lambda: Add(float("inf")), "infinite"),
    ],
)
def test_bad_values_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(constrained_layers=range(1, 3)), "constrained layer 2 is out of range"),
        (dict(constrained_layers=[]), "constrained_layers is empty"),
        (dict(constrained_layers=[0], direct_effects=True), "direct_effects=True freezes every layer"),
        (dict(errors="live"), "errors must be one of"),
    ],
)
def test_bad_modes_are_clear_errors(load, kwargs, match):
    model = load("tiny_gpt2_dir", "plt_dir")
    with pytest.raises(ValueError, match=match):
        feature_intervention(model, prompt_for(model), [(0, 1, 3, 1.0)], **kwargs)


def test_bad_generation_arguments_are_clear_errors(load):
    model = load("tiny_gpt2_dir", "plt_dir")
    prompt = prompt_for(model)
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        feature_intervention_generate(model, prompt, [], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        feature_intervention_generate(model, prompt, [], max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        feature_intervention_generate(model, prompt, [], max_new_tokens=40)
    with pytest.raises(ValueError, match="generated_positions must be one of"):
        feature_intervention_generate(model, prompt, [], max_new_tokens=2, generated_positions="from_start")
    # an open-ended slice may start after the prompt when generating
    g = feature_intervention_generate(model, prompt, [(0, slice(9, None), 3, 5.0)], max_new_tokens=4, stop_at_eos=False)
    assert g.tokens.numel() == 11
