"""Attribution edges are exact direct effects: checked by intervention on the frozen model.

The reference here never differentiates: it reruns the model with attention patterns and
norm scales patched to their clean values, MLP outputs patched to their clean values plus
the skip term's change, and one source's output vector added. The change of every target
(feature pre-activation, de-meaned logit) must equal the source's adjacency column.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import testing
from pipeline.engine import attribution
from pipeline.engine import hooks as H
from pipeline.engine.attribution import attribute
from pipeline.engine.replacement import ReplacementModel
from pipeline.engine.rows import ActiveFeatures, RowBatch, build_sources, compute_rows
from pipeline.engine.tokens import PromptError
from pipeline.graph.layout import NodeLayout
from pipeline.graph.store import Graph, GraphStoreMismatchError

PROMPT_WORDS = 7


def tree_digest(root) -> dict:
    """Relative path -> sha256 of every file under ``root``."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("attribution")
    dirs = {
        "gpt2": testing.make_tiny_gpt2(root / "gpt2", n_layers=3, d_model=16, n_heads=2, n_ctx=32),
        "llama": testing.make_tiny_llama(root / "llama", n_layers=3, d_model=16, n_heads=2, n_ctx=32),
        "gemma2": testing.make_tiny_gemma2(root / "gemma2", n_layers=3, d_model=16, n_heads=2, n_ctx=32),
    }
    for arch in ("gpt2", "llama", "gemma2"):
        common = dict(n_layers=3, d_model=16, d_transcoder=24, density=0.3)
        dirs[arch, "plt"] = testing.make_random_plt(root / f"{arch}_plt", activation="relu", **common)
        dirs[arch, "plt_skip"] = testing.make_random_plt(
            root / f"{arch}_plt_skip", activation="jump_relu", skip=True, **common
        )
        dirs[arch, "clt"] = testing.make_random_clt(root / f"{arch}_clt", **common)
    return dirs


def load(fixture_dirs, arch, kind, dtype=torch.float64) -> ReplacementModel:
    return ReplacementModel.from_pretrained(fixture_dirs[arch], fixture_dirs[arch, kind], dtype=dtype)


def prompt_for(model_dir) -> str:
    return " ".join(testing.vocabulary_words(model_dir)[3 : 3 + PROMPT_WORDS])


# ---------------------------------------------------------------------------- reference
class FrozenReference:
    """Reruns of the model with everything frozen at the clean run, by forward hooks only."""

    def __init__(self, model: ReplacementModel, prompt: str):
        self.model = model
        self.cap = model.capture(prompt)
        frozen: dict[str, torch.Tensor] = {}

        def save(tensor, *, hook):
            frozen[hook.name] = tensor.detach().clone()

        names = model.pattern_hooks + model.scale_hooks
        with model.hooks([(n, save) for n in names]), torch.no_grad():
            model.bridge(self.cap.tokens[None])
        self.frozen = frozen
        self.clean = self.run({})

    @torch.no_grad()
    def run(self, additions: dict[str, torch.Tensor]):
        """additions: hook name -> (n_pos, d_model) added to that tensor.

        returns (mlp_inputs (n_layers, n_pos, d_model), unembed_in (n_pos, d_model))
        """
        m, cap = self.model, self.cap
        reads: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}

        def patch(tensor, *, hook):
            return self.frozen[hook.name]

        def embed(tensor, *, hook):
            return tensor + additions.get(H.EMBED, 0)

        def read(layer):
            def hook(tensor, *, hook):
                reads[layer] = tensor[0].clone()

            return hook

        def write(layer):
            def hook(tensor, *, hook):
                y = cap.mlp_outputs[layer].clone()
                skip_live = m.transcoders.skip(layer, reads[layer])
                if skip_live is not None:
                    y = y + (skip_live - m.transcoders.skip(layer, cap.mlp_inputs[layer]))
                return (y + additions.get(m.output_hooks[layer], 0))[None]

            return hook

        def unembed(tensor, *, hook):
            out["u"] = tensor[0].clone()

        fwd = [(n, patch) for n in self.frozen] + [(H.EMBED, embed), (H.UNEMBED_IN, unembed)]
        for layer in range(m.n_layers):
            fwd += [(m.input_hooks[layer], read(layer)), (m.output_hooks[layer], write(layer))]
        with m.hooks(fwd):
            m.bridge(cap.tokens[None])
        return torch.stack([reads[l] for l in range(m.n_layers)]), out["u"]

    def target_changes(self, graph: Graph, additions) -> np.ndarray:
        """Change of every row target of ``graph`` (graph order) under ``additions``."""
        x1, u1 = self.run(additions)
        x0, u0 = self.clean
        tc = self.model.transcoders
        feats = graph.active_features[graph.selected_features]
        delta = np.zeros(graph.n_nodes)
        for i, (layer, pos, f) in enumerate(feats):
            enc = tc.encoder_vectors(int(layer), torch.tensor([int(f)]))[0]
            delta[i] = float(enc @ (x1[layer, pos] - x0[layer, pos]))
        vecs = torch.as_tensor(graph.table("logit_vectors"), dtype=u0.dtype)
        delta[graph.logit_slice] = (vecs @ (u1[-1] - u0[-1])).numpy()
        return delta

    def source_additions(self, graph: Graph, node: int) -> dict[str, torch.Tensor]:
        """The output vector of source ``node`` (graph order), placed where it is written."""
        m, cap = self.model, self.cap
        zeros = lambda: torch.zeros_like(cap.token_embeddings)  # noqa: E731
        kind = graph.node_kind(node)
        add: dict[str, torch.Tensor] = {}
        if kind == "feature":
            active = graph.selected_features[node - graph.feature_slice.start]
            layer, pos, f = (int(v) for v in graph.active_features[active])
            a = float(graph.activation_values[active])
            dec = m.transcoders.decoder_vectors(layer, torch.tensor([f]))[0]  # (n_out, d_model)
            for j, out_layer in enumerate(m.transcoders.output_layers(layer)):
                v = zeros()
                v[pos] = a * dec[j].to(v.dtype)
                add[m.output_hooks[out_layer]] = v
        elif kind == "error":
            k = node - graph.error_slice.start
            layer, pos = divmod(k, graph.n_pos)
            v = zeros()
            v[pos] = cap.errors[layer, pos]
            add[m.output_hooks[layer]] = v
        elif kind == "token":
            pos = node - graph.token_slice.start
            v = zeros()
            v[pos] = cap.token_embeddings[pos]
            add[H.EMBED] = v
        return add


def check_columns_by_intervention(model, prompt, graph, n_samples, rtol, seed=0):
    ref = FrozenReference(model, prompt)
    A = graph.adjacency_dense()
    rng = np.random.default_rng(seed)
    sources = []
    for sl in (graph.feature_slice, graph.error_slice, graph.token_slice):
        nodes = np.arange(sl.start, sl.stop)
        sources += list(rng.choice(nodes, size=min(n_samples, len(nodes)), replace=False))
    assert any(graph.node_kind(s) == "feature" for s in sources), "fixture has no active features"
    worst = 0.0
    for s in sources:
        delta = ref.target_changes(graph, ref.source_additions(graph, int(s)))
        column = A[:, s]
        scale = max(np.abs(delta).max(), 1e-12)
        err = np.abs(column - delta).max() / scale
        worst = max(worst, err)
        assert err <= rtol, f"source {s} ({graph.node_kind(s)}): relative error {err:.2e}"
    return worst


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["plt", "plt_skip", "clt"])
def test_edges_match_intervention_on_frozen_model_float64(fixture_dirs, tmp_path, arch, kind):
    model = load(fixture_dirs, arch, kind, torch.float64)
    prompt = prompt_for(fixture_dirs[arch])
    graph = attribute(prompt, model, batch_size=16, store=tmp_path / "g.zarr", verbose=False)
    assert graph.n_selected > 0
    check_columns_by_intervention(model, prompt, graph, n_samples=6, rtol=1e-6)


def test_gemma2_post_norms_are_frozen_and_edges_stay_exact(fixture_dirs, tmp_path):
    model = load(fixture_dirs, "gemma2", "plt_skip", torch.float64)
    assert any("ln2_post" in n for n in model.scale_hooks)
    prompt = prompt_for(fixture_dirs["gemma2"])
    cap = model.capture(prompt)
    # Gemma-2's own norm code computes in float32 even in a float64 model
    assert (model.run_replacement(prompt, errors=cap.errors) - cap.logits).abs().max() <= 1e-5
    graph = attribute(prompt, model, batch_size=16, store=tmp_path / "g.zarr", verbose=False)
    check_columns_by_intervention(model, prompt, graph, n_samples=4, rtol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_edges_match_intervention_in_float32(fixture_dirs, tmp_path, arch):
    model = load(fixture_dirs, arch, "clt", torch.float32)
    prompt = prompt_for(fixture_dirs[arch])
    graph = attribute(prompt, model, batch_size=16, store=tmp_path / "g.zarr", verbose=False)
    check_columns_by_intervention(model, prompt, graph, n_samples=5, rtol=1e-4)


def test_structural_zeros_are_never_stored_and_are_zero(fixture_dirs, tmp_path):
    model = load(fixture_dirs, "gpt2", "clt")
    prompt = prompt_for(fixture_dirs["gpt2"])
    graph = attribute(prompt, model, batch_size=16, store=tmp_path / "g.zarr", verbose=False)
    feats = graph.active_features[graph.selected_features]
    for i, (layer, pos, _) in enumerate(feats):
        cols, _ = graph.row(graph.feature_slice.start + i)
        for c in cols:
            kind = graph.node_kind(c)
            if kind == "feature":
                src_layer, src_pos, _ = graph.active_features[graph.selected_features[c]]
                assert src_layer < layer and src_pos <= pos
            elif kind == "error":
                src_layer, src_pos = divmod(c - graph.error_slice.start, graph.n_pos)
                assert src_layer < layer and src_pos <= pos
            elif kind == "token":
                assert c - graph.token_slice.start <= pos
            else:
                pytest.fail("a feature row has a logit column")
    # and the intervention reference agrees that everything not stored is zero
    check_columns_by_intervention(model, prompt, graph, n_samples=4, rtol=1e-6)


def test_logit_rows_are_demeaned_unembedding_reads(fixture_dirs, tmp_path):
    model = load(fixture_dirs, "gpt2", "plt")
    prompt = prompt_for(fixture_dirs["gpt2"])
    graph = attribute(prompt, model, max_n_logits=3, desired_logit_prob=0.99, store=tmp_path / "g.zarr", verbose=False)
    probs = torch.softmax(model.capture(prompt).logits[-1], -1)
    top = torch.topk(probs, graph.n_logits)
    np.testing.assert_array_equal(graph.logit_tokens, top.indices.numpy())
    np.testing.assert_allclose(graph.logit_probabilities, top.values.numpy(), rtol=1e-6)
    W_U = model.W_U
    vec = (W_U[:, graph.logit_tokens[0]] - W_U.mean(-1)).numpy()
    np.testing.assert_allclose(graph.table("logit_vectors")[0], vec, rtol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rows_from_a_prompt_prefix_equal_rows_from_the_whole_prompt(fixture_dirs, arch):
    """The engine differentiates the shortest prefix holding a batch's targets: exact because
    the model is causal."""
    model = load(fixture_dirs, arch, "clt")
    capture = model.capture(prompt_for(fixture_dirs[arch]))
    active, values = capture.active_features()
    a = active.numpy()
    layout = NodeLayout(model.n_layers, capture.n_pos, len(a), 1)
    sources = build_sources(model, capture, ActiveFeatures(layout, a), values)
    ids = np.nonzero((a[:, 0] == model.n_layers - 1) & (a[:, 1] < capture.n_pos - 2))[0]
    assert len(ids) > 0
    feats = torch.as_tensor(a[ids, 2])
    batch = RowBatch(
        a[ids, 0].astype(np.int64),
        a[ids, 1].astype(np.int64),
        model.transcoders.encoder_vectors(model.n_layers - 1, feats),
        ids.astype(np.int64),
    )
    n = int(batch.pos.max()) + 1
    full = compute_rows(model.frozen_forward(capture, batch=1), batch, layout, sources)
    prefix = compute_rows(model.frozen_forward(capture, batch=1, n_pos=n), batch, layout, sources)
    np.testing.assert_allclose(prefix, full, rtol=1e-12, atol=1e-12)
    assert np.abs(full).sum() > 0
    with pytest.raises(ValueError, match="outside the"):
        compute_rows(model.frozen_forward(capture, batch=1, n_pos=n - 1), batch, layout, sources)


def test_zero_bos_errors_removes_exactly_the_bos_error_edges(fixture_dirs, tmp_path):
    model = load(fixture_dirs, "gpt2", "plt_skip")
    prompt = prompt_for(fixture_dirs["gpt2"])
    ours = attribute(prompt, model, store=tmp_path / "a.zarr", verbose=False).adjacency_dense()
    graph = attribute(prompt, model, zero_bos_errors=True, store=tmp_path / "b.zarr", verbose=False)
    theirs = graph.adjacency_dense()
    bos_errors = [graph.error_slice.start + layer * graph.n_pos for layer in range(graph.n_layers)]
    assert np.abs(ours[:, bos_errors]).sum() > 0
    assert not theirs[:, bos_errors].any()
    keep = np.setdiff1d(np.arange(ours.shape[1]), bos_errors)
    np.testing.assert_array_equal(theirs[:, keep], ours[:, keep])
    assert not graph.table("error_vectors")[:, 0].any()


# ---------------------------------------------------------------------------- selection
def greedy_reference(A_full: np.ndarray, n_active: int, logit_weights, k, batch, interval):
    """circuit-tracer's greedy visiting order, recomputed on the full dense graph.

    Only rows visited so far (and the logits) count when influence is estimated.
    """
    n = A_full.shape[0]
    n_logits = len(logit_weights)
    visited_rows = list(range(n - n_logits, n))
    visited = np.zeros(n_active, dtype=bool)
    while visited.sum() < k:
        M = np.abs(A_full[visited_rows])
        M = M / np.maximum(M.sum(1, keepdims=True), 1e-8)
        prod = np.zeros(n)
        prod[-n_logits:] = logit_weights
        infl = np.zeros(n)
        for _ in range(n):
            prod = prod[visited_rows] @ M
            if not prod.any():
                break
            infl += prod
        rank = np.argsort(-infl[:n_active], kind="stable")
        pending = rank[~visited[rank]][: min(interval * batch, k - visited.sum())]
        visited[pending] = True
        visited_rows += list(pending)
    return np.sort(np.nonzero(visited)[0])


@pytest.mark.parametrize("interval", [1, 100])
def test_max_feature_nodes_selects_like_brute_force_influence_ranking(fixture_dirs, tmp_path, interval):
    model = load(fixture_dirs, "gpt2", "plt_skip")
    prompt = prompt_for(fixture_dirs["gpt2"])
    full = attribute(prompt, model, batch_size=4, store=tmp_path / "full.zarr", verbose=False)
    A = full.adjacency_dense()
    assert full.n_selected == full.n_active
    k = max(2, full.n_active // 3)
    part = attribute(
        prompt,
        model,
        batch_size=4,
        max_feature_nodes=k,
        update_interval=interval,
        store=tmp_path / "part.zarr",
        verbose=False,
    )
    expected = greedy_reference(A, full.n_active, full.logit_probabilities.astype(np.float64), k, 4, interval)
    np.testing.assert_array_equal(part.selected_features, expected)
    # rows of selected features equal the full graph's rows, restricted to selected columns
    cols = np.concatenate([part.selected_features, np.arange(full.n_active, full.n_nodes)])
    rows = cols
    np.testing.assert_allclose(part.adjacency_dense(), A[np.ix_(rows, cols)], rtol=1e-7, atol=1e-12)


# ---------------------------------------------------------------------------- targets
def test_custom_logit_targets_token_difference_and_direction(fixture_dirs, tmp_path):
    model = load(fixture_dirs, "gpt2", "plt")
    words = testing.vocabulary_words(fixture_dirs["gpt2"])
    prompt = prompt_for(fixture_dirs["gpt2"])
    direction = torch.linspace(-1, 1, model.d_model, dtype=torch.float64)
    graph = attribute(
        prompt,
        model,
        logit_targets=[words[5], (words[5], words[6]), {"label": "dir", "vector": direction}],
        store=tmp_path / "g.zarr",
        verbose=False,
    )
    assert graph.n_logits == 3
    W_U = model.W_U
    a, b = (model.tokenizer.encode(w, add_special_tokens=False)[0] for w in words[5:7])
    vecs = graph.table("logit_vectors")
    np.testing.assert_allclose(vecs[0], (W_U[:, a] - W_U.mean(-1)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(vecs[1], (W_U[:, a] - W_U[:, b]).numpy(), rtol=1e-6)
    np.testing.assert_allclose(vecs[2], direction.numpy(), rtol=1e-6)
    check_columns_by_intervention(model, prompt, graph, n_samples=3, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-3), "batch_size"),
        (dict(logit_targets=["w3 w4"]), "2 tokens"),
        (dict(logit_targets=[{"label": "d", "vector": [1.0, 2.0]}]), "dimension 2"),
    ],
)
def test_bad_attribution_arguments_are_clear_errors(fixture_dirs, tmp_path, kwargs, match):
    model = load(fixture_dirs, "gpt2", "plt")
    with pytest.raises(ValueError, match=match):
        attribute(prompt_for(fixture_dirs["gpt2"]), model, store=tmp_path / "g.zarr", verbose=False, **kwargs)
    assert not (tmp_path / "g.zarr").exists()


def test_empty_and_too_long_prompts_are_refused(fixture_dirs, tmp_path):
    model = load(fixture_dirs, "gpt2", "plt")
    with pytest.raises(ValueError, match="empty"):
        attribute("   ", model, store=tmp_path / "a.zarr", verbose=False)
    long_prompt = " ".join(testing.vocabulary_words(fixture_dirs["gpt2"])[3:5] * 40)
    with pytest.raises(ValueError, match="context"):
        attribute(long_prompt, model, store=tmp_path / "b.zarr", verbose=False)


# ---------------------------------------------------------------------------- store
def test_store_with_other_inputs_is_refused(fixture_dirs, tmp_path):
    model = load(fixture_dirs, "gpt2", "plt")
    words = testing.vocabulary_words(fixture_dirs["gpt2"])
    attribute(" ".join(words[3:8]), model, store=tmp_path / "g.zarr", verbose=False)
    with pytest.raises(GraphStoreMismatchError):
        attribute(" ".join(words[4:9]), model, store=tmp_path / "g.zarr", verbose=False)


def test_rerun_on_finished_store_recomputes_nothing(fixture_dirs, tmp_path, monkeypatch):
    model = load(fixture_dirs, "gpt2", "plt")
    prompt = prompt_for(fixture_dirs["gpt2"])
    g1 = attribute(prompt, model, batch_size=4, store=tmp_path / "g.zarr", verbose=False)

    def fail(*a, **k):
        raise AssertionError("rows recomputed")

    monkeypatch.setattr(attribution, "compute_rows", fail)
    g2 = attribute(prompt, model, batch_size=4, store=tmp_path / "g.zarr", verbose=False)
    np.testing.assert_array_equal(g1.adjacency_dense(), g2.adjacency_dense())


def test_interrupted_attribution_resumes_to_identical_store(fixture_dirs, tmp_path, monkeypatch):
    model = load(fixture_dirs, "gpt2", "clt")
    prompt = prompt_for(fixture_dirs["gpt2"])
    reference = attribute(
        prompt, model, batch_size=4, max_feature_nodes=10, update_interval=1, store=tmp_path / "ref.zarr", verbose=False
    )
    real = attribution.compute_rows
    calls = {"n": 0}

    def crash_after_three(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(attribution, "compute_rows", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        attribute(
            prompt,
            model,
            batch_size=4,
            max_feature_nodes=10,
            update_interval=1,
            store=tmp_path / "g.zarr",
            verbose=False,
        )
    monkeypatch.setattr(attribution, "compute_rows", real)
    resumed = attribute(
        prompt, model, batch_size=4, max_feature_nodes=10, update_interval=1, store=tmp_path / "g.zarr", verbose=False
    )
    np.testing.assert_array_equal(resumed.selected_features, reference.selected_features)
    np.testing.assert_array_equal(resumed.adjacency_dense(), reference.adjacency_dense())
    assert tree_digest(tmp_path / "g.zarr") == tree_digest(tmp_path / "ref.zarr")


# ---------------------------------------------------------------------------- unknown words
def test_unknown_words_in_prompt_and_logit_targets_are_refused_unless_allowed(fixture_dirs, tmp_path):
    model = load(fixture_dirs, "gpt2", "plt")
    words = testing.vocabulary_words(fixture_dirs["gpt2"])
    prompt = f"{words[3]} Austn {words[4]} Dalas"
    with pytest.raises(PromptError, match=r"does not know the prompt's words 'Austn', 'Dalas' \(tokenized as <unk>\)"):
        attribute(prompt, model, store=tmp_path / "a.zarr", verbose=False)
    tokens = model.tokenize(prompt)
    with pytest.raises(PromptError, match=r"unknown token <unk> \(id 3\) at position\(s\) \[2, 4\]"):
        attribute(tokens, model, store=tmp_path / "a.zarr", verbose=False)
    with pytest.raises(PromptError, match=r"does not know the logit target 'Austn'.*--allow-unknown-tokens"):
        attribute(" ".join(words[3:8]), model, logit_targets=["Austn"], store=tmp_path / "a.zarr", verbose=False)
    assert not (tmp_path / "a.zarr").exists()
    graph = attribute(
        prompt, model, logit_targets=["Austn"], allow_unknown_tokens=True, store=tmp_path / "b.zarr", verbose=False
    )
    assert graph.logit_tokens.tolist() == [model.tokenizer.unk_token_id]
    # the option decides only whether a run may go: valid input keeps its fingerprint
    cfg = attribution.AttributionConfig()
    allowed = attribution.AttributionConfig(allow_unknown_tokens=True)
    assert attribution.fingerprint(model, tokens, cfg, None) == attribution.fingerprint(model, tokens, allowed, None)
    assert "allow_unknown_tokens" not in graph.attrs["config"]


def test_non_finite_custom_logit_targets_are_refused(fixture_dirs, tmp_path):
    model = load(fixture_dirs, "gpt2", "plt")
    vec = torch.ones(model.d_model, dtype=torch.float64)
    vec[2] = float("nan")
    cases = [
        ([{"label": "d", "vector": vec}], r"custom logit target 'd': its vector holds NaN or inf"),
        (
            [{"label": "d", "vector": torch.ones(model.d_model), "probability": float("nan")}],
            r"probability must be in \(0, 1\], got nan",
        ),
        ([{"label": "d", "vector": torch.ones(model.d_model), "probability": 0.0}], r"probability must be in \(0, 1\]"),
    ]
    for targets, match in cases:
        with pytest.raises(ValueError, match=match):
            attribute(
                prompt_for(fixture_dirs["gpt2"]), model, logit_targets=targets, store=tmp_path / "g.zarr", verbose=False
            )
    assert not (tmp_path / "g.zarr").exists()


def test_full_disk_names_the_store_and_the_rerun_resumes_from_the_last_batch(fixture_dirs, tmp_path, monkeypatch):
    import errno

    from pipeline import _io
    from pipeline.graph import writer as graph_writer

    model = load(fixture_dirs, "gpt2", "plt")
    prompt = prompt_for(fixture_dirs["gpt2"])
    reference = attribute(prompt, model, batch_size=4, store=tmp_path / "ref.zarr", verbose=False)
    real_write = graph_writer.write_file

    def full_disk(path, data):
        if "batch_000003" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    store = tmp_path / "g.zarr"
    monkeypatch.setattr(graph_writer, "write_file", full_disk)
    with pytest.raises(graph_writer.GraphStoreDiskFullError) as err:
        attribute(prompt, model, batch_size=4, store=store, verbose=False)
    assert err.value.errno == errno.ENOSPC
    assert f"while writing batch 3 of the graph store {store}" in str(err.value)
    assert "free space and rerun: the run resumes from the last finished batch" in str(err.value)
    assert not _io._HELD  # the failed run gave its lock up
    monkeypatch.setattr(graph_writer, "write_file", real_write)

    real_rows, computed = attribution.compute_rows, []

    def counting(frozen, batch, *a, **k):
        computed.append(batch.nodes.copy())
        return real_rows(frozen, batch, *a, **k)

    monkeypatch.setattr(attribution, "compute_rows", counting)
    resumed = attribute(prompt, model, batch_size=4, store=store, verbose=False)
    assert len(computed) == reference.summary["n_batches"] - 3  # batches 0-2 were kept
    np.testing.assert_array_equal(resumed.adjacency_dense(), reference.adjacency_dense())
    assert tree_digest(store) == tree_digest(tmp_path / "ref.zarr")
