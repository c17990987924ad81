"""Feature interventions: every mode equals a forward pass written here with plain hooks, the
direct-effects mode reproduces attribution edges, zero interventions reproduce the clean run,
cached generation equals uncached generation, and bad input is a clear error.

The references below are written in another form than the library: the replacement model as
``reconstruct(acts with the interventions set) + clean error`` (iterative), circuit-tracer's
``real MLP + (value - live activation) x decoder`` (errors recomputed), and ``clean output +
skip change + decoder change`` (constrained, direct).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
    """A set, a scale and an add on active features of both layers, plus an inactive one."""
    cap = model.capture(prompt)
    idx, _ = cap.active_features()
    by_layer = {l: idx[idx[:, 0] == l] for l in range(model.n_layers)}
    assert all(len(v) >= 2 for v in by_layer.values()), "fixture has too few active features"
    (l0, p0, f0), (l0b, p0b, f0b) = by_layer[0][0].tolist(), by_layer[0][-1].tolist()
    (l1, p1, f1) = by_layer[1][len(by_layer[1]) // 2].tolist()
    inactive = int((cap.activations[0, 2] == 0).nonzero()[0])
    return [(l0, p0, f0, 0.0), (l0b, p0b, f0b, Scale(-2.0)), (l1, p1, f1, Add(0.7)), (0, 2, inactive, 1.5)]


# ---------------------------------------------------------------------------- references
def clean_frozen(model: ReplacementModel, tokens) -> dict:
    frozen = {}

    def save(t, *, hook):
        frozen[hook.name] = t.detach().clone()

    with model.hooks([(n, save) for n in model.pattern_hooks + model.scale_hooks]), torch.no_grad():
        model.bridge(tokens[None])
    return frozen


def new_value(value, ref):
    if isinstance(value, Scale):
        return value.factor * ref
    if isinstance(value, Add):
        return ref + value.delta
    return float(value)


@torch.no_grad()
def reference_run(model, prompt, interventions, *, constrained=None, freeze_attention=True, errors="frozen"):
    """A plain-hooks forward pass with the documented semantics; returns (logits, activations)."""
    tc = model.transcoders
    cap = model.capture(prompt)
    frozen = clean_frozen(model, cap.tokens)
    n = model.n_layers
    frozen_layers = set(constrained) if constrained is not None else set()
    freeze_patterns = freeze_attention or constrained is not None
    freeze_scales = frozen_layers == set(range(n))
    acts_set: list = [None] * n  # activations with the interventions applied (iterative)
    deltas: list = [None] * n  # (n_pos, d_tc) value - reference, the intervened features only
    read: list = [None] * n
    x_live: list = [None] * n

    def patch(t, *, hook):
        return frozen[hook.name]

    def on_read(layer):
        def hook(t, *, hook):
            x = t[0].clone()
            x_live[layer] = x
            a = tc.activations(layer, x)
            a[0] = 0
            read[layer] = a.clone()
            ref_acts = a if constrained is None else cap.activations[layer]
            d = torch.zeros_like(a)
            s = a.clone()
            for l, p, f, v in interventions:
                if l == layer:
                    target = new_value(v, float(ref_acts[p, f]))
                    d[p, f] = target - ref_acts[p, f]
                    s[p, f] = target
            deltas[layer], acts_set[layer] = d, s

        return hook

    def on_write(layer):
        def hook(t, *, hook):
            write_deltas = constrained is None or layer in frozen_layers
            if layer in frozen_layers:  # constrained / direct
                y = cap.mlp_outputs[layer].clone()
                sk = tc.skip(layer, x_live[layer])
                if sk is not None:
                    y = y + sk - tc.skip(layer, cap.mlp_inputs[layer])
            elif errors == "frozen":  # the replacement model with clean errors
                acts = acts_set if constrained is None else read
                y = tc.reconstruct(layer, acts[: layer + 1], x_live[layer]) + cap.errors[layer]
                write_deltas = False  # the set activations already carry them
            else:  # circuit-tracer: the real MLP
                y = t[0].clone()
            if write_deltas:
                for src in range(layer + 1):
                    outs = tc.output_layers(src)
                    if layer in outs:
                        dec = tc.decoder_vectors(src, torch.arange(tc.d_transcoder))[:, layer - outs.start]
                        y = y + deltas[src] @ dec
            return y[None]

        return hook

    fwd = []
    if freeze_patterns:
        fwd += [(n_, patch) for n_ in model.pattern_hooks]
    if freeze_scales:
        fwd += [(n_, patch) for n_ in model.scale_hooks]
    for layer in range(n):
        fwd += [(model.input_hooks[layer], on_read(layer)), (model.output_hooks[layer], on_write(layer))]
    with model.hooks(fwd):
        logits = model.bridge(cap.tokens[None])[0]
    return logits, torch.stack(read)


MODES = {
    "iterative": dict(),
    "iterative_free_attention": dict(freeze_attention=False),
    "iterative_errors_recomputed": dict(errors="recomputed"),
    "free_attention_errors_recomputed": dict(freeze_attention=False, errors="recomputed"),
    "constrained_layer_1": dict(constrained_layers=range(1, 2)),
    "constrained_layer_0": dict(constrained_layers=[0]),
    "direct": dict(direct_effects=True),
}


def reference_kwargs(kw):
    out = dict(freeze_attention=kw.get("freeze_attention", True), errors=kw.get("errors", "frozen"))
    if kw.get("direct_effects"):
        out["constrained"] = range(2)
    elif "constrained_layers" in kw:
        out["constrained"] = list(kw["constrained_layers"])
    return out


# ---------------------------------------------------------------------------- modes
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", KINDS)
def test_each_mode_equals_manual_forward_with_plain_hooks_gpt2(load, mode, kind):
    model = load("tiny_gpt2_dir", kind)
    prompt = prompt_for(model)
    ivs = some_interventions(model, prompt)
    logits, acts = feature_intervention(model, prompt, ivs, **MODES[mode])
    ref_logits, ref_acts = reference_run(model, prompt, ivs, **reference_kwargs(MODES[mode]))
    clean = model.capture(prompt).logits
    assert (logits - clean).abs().max() > 1e-4, "the interventions changed nothing"
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(acts, ref_acts, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["iterative", "iterative_errors_recomputed", "constrained_layer_1", "direct"])
@pytest.mark.parametrize("kind", ["plt_skip_dir", "clt_dir"])
def test_each_mode_equals_manual_forward_with_plain_hooks_llama(load, mode, kind):
    model = load("tiny_llama_dir", kind)
    prompt = prompt_for(model)
    ivs = some_interventions(model, prompt)
    logits, acts = feature_intervention(model, prompt, ivs, **MODES[mode])
    ref_logits, ref_acts = reference_run(model, prompt, ivs, **reference_kwargs(MODES[mode]))
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(acts, ref_acts, rtol=0, atol=1e-10)


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
    for kw in MODES.values():
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
    # an open-ended slice may start after the prompt when generating
    g = feature_intervention_generate(model, prompt, [(0, slice(9, None), 3, 5.0)], max_new_tokens=4, stop_at_eos=False)
    assert g.tokens.numel() == 11
