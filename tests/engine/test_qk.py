"""QK attributions split one pre-softmax score exactly: checked against the model's own forward.

The references here never use the decomposition's algebra: the score is read from the run's
``hook_attn_scores``, and a node's effect is measured by rerunning the model with layer L's
first norm scale frozen at its clean value and the node's output vector subtracted from that
norm's input at the query (or key) position only. Keys sit before the query, so an edit at the
query position leaves every key the score reads untouched, and the other way round.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import testing
from pipeline.engine.attribution import attribute
from pipeline.engine.qk import QKAttribution, QKNode, qk_attribution
from pipeline.engine.replacement import Capture, ReplacementModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT_WORDS = 7
KINDS = ("plt", "plt_skip", "clt")


@pytest.fixture(scope="module")
def dirs(tiny_gpt2_dir, tiny_llama_dir, plt_dir, plt_skip_dir, clt_dir):
    return {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir, "plt": plt_dir, "plt_skip": plt_skip_dir, "clt": clt_dir}


@pytest.fixture(scope="module")
def models(dirs):
    cache: dict[tuple[str, str], ReplacementModel] = {}

    def get(arch: str, kind: str) -> ReplacementModel:
        if (arch, kind) not in cache:
            cache[arch, kind] = ReplacementModel.from_pretrained(dirs[arch], dirs[kind], dtype=torch.float64)
        return cache[arch, kind]

    return get


def prompt_for(model_dir) -> str:
    return " ".join(testing.vocabulary_words(model_dir)[3 : 3 + PROMPT_WORDS])


# ---------------------------------------------------------------------------- reference
def run_scores(model: ReplacementModel, tokens, layer: int, edits=()) -> tuple[torch.Tensor, dict]:
    """Layer ``layer``'s pre-softmax scores (n_heads, n_pos, n_pos) of a forward in which its first
    norm's scale is frozen at the clean run's and each (pos, vector) of ``edits`` is subtracted
    from that norm's input; also the clean run's tensors the node vectors need."""
    clean: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(t, *, hook):
            clean[name] = t[0].detach().clone()

        return hook

    names = [f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln1.hook_in", f"blocks.{layer}.attn.hook_attn_scores"]
    names += [f"blocks.{src}.hook_attn_out" for src in range(layer)]
    if model.bridge.cfg.positional_embedding_type == "standard":
        names.append("hook_pos_embed")
    with torch.no_grad(), model.hooks([(n, keep(n)) for n in names]):
        model.bridge(tokens[None])
    if not edits:
        return clean[f"blocks.{layer}.attn.hook_attn_scores"], clean

    out: dict[str, torch.Tensor] = {}

    def edit_input(t, *, hook):
        t = t.clone()
        for pos, vec in edits:
            t[0, pos] -= vec
        return t

    def freeze_scale(t, *, hook):
        return clean[f"blocks.{layer}.ln1.hook_scale"][None].clone()

    def read_scores(t, *, hook):
        out["scores"] = t[0].detach().clone()

    fwd = [
        (f"blocks.{layer}.ln1.hook_in", edit_input),
        (f"blocks.{layer}.ln1.hook_scale", freeze_scale),
        (f"blocks.{layer}.attn.hook_attn_scores", read_scores),
    ]
    with torch.no_grad(), model.hooks(fwd):
        model.bridge(tokens[None])
    return out["scores"], clean


def node_vector(model: ReplacementModel, cap: Capture, clean: dict, node: QKNode, layer: int) -> torch.Tensor:
    """What ``node`` adds to the residual stream entering ``layer``, from the capture and the run."""
    tc = model.transcoders
    if node.kind == "token":
        return cap.token_embeddings[node.pos]
    if node.kind == "position":
        return clean["hook_pos_embed"][node.pos]
    if node.kind == "attention":
        return clean[f"blocks.{node.layer}.hook_attn_out"][node.pos]
    if node.kind == "error":
        return cap.errors[node.layer, node.pos]
    if node.kind == "decoder_bias":
        return tc.decoder_bias(node.layer)
    if node.kind == "skip":
        return tc.skip(node.layer, cap.mlp_inputs[node.layer, node.pos])
    if node.kind == "feature":
        act = cap.activations[node.layer, node.pos, node.feature]
        rows = tc.decoder_vectors(node.layer, torch.tensor([node.feature]))[0]  # (n_out, d_model)
        below = [j for j, out in enumerate(tc.output_layers(node.layer)) if out < layer]
        return act * rows[below].sum(0)
    raise AssertionError(f"no vector for {node}")


def attribution_and_run(models, dirs, arch, kind, layer=1, head=0, query_pos=None, key_pos=2):
    model = models(arch, kind)
    cap = model.capture(prompt_for(dirs[arch]))
    query_pos = cap.n_pos - 1 if query_pos is None else query_pos
    qk = qk_attribution(model, cap, layer, head, query_pos, key_pos, top=None)
    return model, cap, qk


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_qk_terms_sum_to_the_pre_softmax_score(models, dirs, arch, kind):
    model = models(arch, kind)
    cap = model.capture(prompt_for(dirs[arch]))
    n = cap.n_pos
    worst = 0.0
    for layer in range(model.n_layers):
        scores, _ = run_scores(model, cap.tokens, layer)
        for head in range(int(model.bridge.cfg.n_heads)):
            for p, q in [(n - 1, 0), (n - 1, 3), (n - 1, n - 1), (4, 2), (1, 1)]:
                qk = qk_attribution(model, cap, layer, head, p, q, top=5)
                actual = float(scores[head, p, q])
                assert qk.total == pytest.approx(actual, abs=1e-12)
                assert float(qk.matrix.sum()) == pytest.approx(qk.terms_sum, abs=1e-12)
                worst = max(worst, abs(qk.terms_sum - actual))
    assert worst < 1e-6, f"{arch}/{kind}: terms miss the score by {worst:.3g}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_query_node_term_equals_score_change_when_its_contribution_is_removed(models, dirs, arch, kind):
    model, cap, qk = attribution_and_run(models, dirs, arch, kind, head=1)
    p, q = qk.query_pos, qk.key_pos
    clean_scores, clean = run_scores(model, cap.tokens, qk.layer)
    base = float(clean_scores[qk.head, p, q])
    kinds = set()
    for i, node in enumerate(qk.query_nodes[:-1]):  # the last row is the bias, no residual term
        vec = node_vector(model, cap, clean, node, qk.layer)
        edited, _ = run_scores(model, cap.tokens, qk.layer, [(p, vec)])
        change = base - float(edited[qk.head, p, q])
        assert float(qk.query_marginals[i]) == pytest.approx(change, abs=1e-9), node.label()
        kinds.add(node.kind)
    expected = {"token", "attention", "feature", "error", "decoder_bias"}
    expected |= {"position"} if arch == "gpt2" else set()
    expected |= {"skip"} if kind == "plt_skip" else set()
    assert expected <= kinds  # every kind of residual term was checked


@pytest.mark.parametrize("kind", ["plt_skip", "clt"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_key_node_term_equals_score_change_when_its_contribution_is_removed(models, dirs, arch, kind):
    model, cap, qk = attribution_and_run(models, dirs, arch, kind)
    p, q = qk.query_pos, qk.key_pos
    clean_scores, clean = run_scores(model, cap.tokens, qk.layer)
    base = float(clean_scores[qk.head, p, q])
    for j, node in enumerate(qk.key_nodes[:-1]):
        vec = node_vector(model, cap, clean, node, qk.layer)
        edited, _ = run_scores(model, cap.tokens, qk.layer, [(q, vec)])
        assert float(qk.key_marginals[j]) == pytest.approx(base - float(edited[qk.head, p, q]), abs=1e-9), node.label()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_term_is_the_interaction_of_removing_its_query_and_its_key_node(models, dirs, arch):
    """Bilinearity: s - s(-i) - s(-j) + s(-i, -j) is the (i, j) term alone."""
    model, cap, qk = attribution_and_run(models, dirs, arch, "clt")
    p, q = qk.query_pos, qk.key_pos
    scores, clean = run_scores(model, cap.tokens, qk.layer)
    s = float(scores[qk.head, p, q])
    checked = 0
    for term in qk.terms:
        if "bias" in (term.query.kind, term.key.kind) or abs(term.value) < 1e-6:
            continue
        vi = node_vector(model, cap, clean, term.query, qk.layer)
        vj = node_vector(model, cap, clean, term.key, qk.layer)

        def score(edits):
            return float(run_scores(model, cap.tokens, qk.layer, edits)[0][qk.head, p, q])

        interaction = s - score([(p, vi)]) - score([(q, vj)]) + score([(p, vi), (q, vj)])
        assert term.value == pytest.approx(interaction, abs=1e-9), f"{term.query.label()} x {term.key.label()}"
        checked += 1
        if checked == 4:
            break
    assert checked == 4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bias_row_is_the_score_with_the_whole_query_residual_removed(models, dirs, arch):
    model, cap, qk = attribution_and_run(models, dirs, arch, "plt")
    p, q = qk.query_pos, qk.key_pos
    _, clean = run_scores(model, cap.tokens, qk.layer)
    resid = clean[f"blocks.{qk.layer}.ln1.hook_in"][p]
    emptied, _ = run_scores(model, cap.tokens, qk.layer, [(p, resid)])
    assert qk.query_nodes[-1].kind == "bias"
    assert float(qk.query_marginals[-1]) == pytest.approx(float(emptied[qk.head, p, q]), abs=1e-9)


def test_top_keeps_the_largest_terms_and_the_totals_stay_exact(models, dirs):
    model = models("gpt2", "clt")
    cap = model.capture(prompt_for(dirs["gpt2"]))
    every = qk_attribution(model, cap, 1, 0, cap.n_pos - 1, 1, top=None)
    few = qk_attribution(model, cap, 1, 0, cap.n_pos - 1, 1, top=3)
    assert len(every.terms) == every.matrix.numel() and len(few.terms) == 3
    largest = np.sort(np.abs(every.matrix.numpy().reshape(-1)))[::-1][:3]
    np.testing.assert_allclose([abs(t.value) for t in few.terms], largest)
    assert few.terms_sum == every.terms_sum and few.total == every.total
    assert torch.equal(few.query_marginals, every.query_marginals)
    i = every.query_nodes.index(few.terms[0].query)
    j = every.key_nodes.index(few.terms[0].key)
    assert float(every.matrix[i, j]) == few.terms[0].value


def test_a_prompt_and_its_capture_give_the_same_decomposition(models, dirs):
    model = models("llama", "plt")
    prompt = prompt_for(dirs["llama"])
    a = qk_attribution(model, prompt, 1, 1, 5, 3)
    b = qk_attribution(model, model.capture(prompt), 1, 1, 5, 3)
    assert isinstance(a, QKAttribution)
    assert a.query_nodes == b.query_nodes and a.key_nodes == b.key_nodes
    assert torch.equal(a.matrix, b.matrix)


def test_graph_ids_name_the_attribution_graphs_nodes(models, dirs, tmp_path):
    model = models("gpt2", "plt")
    prompt = prompt_for(dirs["gpt2"])
    graph = attribute(prompt, model, batch_size=16, store=tmp_path / "g.zarr", verbose=False)
    cap = model.capture(prompt)
    qk = qk_attribution(model, cap, 1, 0, cap.n_pos - 1, 2, graph=graph)
    active = graph.active_features
    seen = set()
    for node in qk.query_nodes + qk.key_nodes:
        if node.kind == "feature":
            assert tuple(active[node.compute_node]) == (node.layer, node.pos, node.feature)
            if node.graph_node is not None:
                assert graph.node_kind(node.graph_node) == "feature"
                assert graph.node_active_index(node.graph_node) == node.compute_node
        elif node.kind == "error":
            assert node.graph_node == graph.error_node(node.layer, node.pos)
        elif node.kind == "token":
            assert node.graph_node == graph.token_node(node.pos)
        else:
            assert node.graph_node is None and node.compute_node is None
        seen.add(node.kind)
    assert {"feature", "error", "token"} <= seen
    other = model.capture(" ".join(testing.vocabulary_words(dirs["gpt2"])[10:14]))
    with pytest.raises(ValueError, match="another prompt"):
        qk_attribution(model, other, 1, 0, 2, 1, graph=graph)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, message",
    [
        ((2, 0, 3, 1), r"layer 2 is out of range: the model has 2 layers; pass layer in \[0, 2\)"),
        ((-1, 0, 3, 1), r"layer -1 is out of range"),
        ((1, 2, 3, 1), r"head 2 is out of range: layer 1 has 2 heads; pass head in \[0, 2\)"),
        ((1, 0, 99, 1), r"query_pos 99 is out of range: the prompt has \d+ tokens"),
        ((1, 0, 3, -1), r"key_pos -1 is out of range"),
        ((1, 0, 2, 3), r"key_pos 3 is after query_pos 2: attention is causal.*pass key_pos <= query_pos"),
        ((1, 0.0, 3, 1), r"head must be an int, got 0.0"),
    ],
)
def test_bad_layer_head_or_position_is_a_clear_error(models, dirs, args, message):
    model = models("llama", "plt")
    with pytest.raises(ValueError, match=message) as err:
        qk_attribution(model, prompt_for(dirs["llama"]), *args)
    assert "\n" not in str(err.value)


def test_attention_logit_soft_capping_is_refused(dirs, tmp_path):
    gemma = testing.make_tiny_gemma2(tmp_path / "gemma2", n_layers=2, d_model=16)
    model = ReplacementModel.from_pretrained(gemma, dirs["plt"], dtype=torch.float64)
    with pytest.raises(ValueError, match="soft-caps its attention logits.*use a model without") as err:
        qk_attribution(model, prompt_for(gemma), 1, 0, 3, 1)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- expanded attention
@pytest.mark.parametrize("kind", ["plt_skip", "clt"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_expanded_attention_terms_sum_to_the_pre_softmax_score(models, dirs, arch, kind):
    model = models(arch, kind)
    cap = model.capture(prompt_for(dirs[arch]))
    n = cap.n_pos
    worst = 0.0
    for layer in range(model.n_layers):
        scores, _ = run_scores(model, cap.tokens, layer)
        for head in range(int(model.bridge.cfg.n_heads)):
            for p, q in [(n - 1, 0), (n - 1, 3), (4, 4)]:
                qk = qk_attribution(model, cap, layer, head, p, q, expand_attention=True)
                assert all(node.kind != "attention" for node in qk.query_nodes + qk.key_nodes)
                assert all(node.pos is None or node.pos <= p for node in qk.query_nodes)
                assert all(node.pos is None or node.pos <= q for node in qk.key_nodes)
                worst = max(worst, abs(qk.terms_sum - float(scores[head, p, q])))
    assert worst < 1e-6, f"{arch}/{kind}: expanded terms miss the score by {worst:.3g}"


def frozen_scores_without(model: ReplacementModel, cap: Capture, layer: int, node: QKNode, vec) -> torch.Tensor:
    """Layer ``layer``'s scores (n_heads, n_pos, n_pos) of a rerun with every attention pattern
    below it, every first-norm scale up to it and every MLP output below it held at the clean
    run's, and ``node``'s output vector ``vec`` taken out where it enters the residual stream."""
    clean: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(t, *, hook):
            clean[name] = t.detach().clone()

        return hook

    frozen = [f"blocks.{src}.attn.hook_pattern" for src in range(layer)]
    frozen += [f"blocks.{src}.ln1.hook_scale" for src in range(layer + 1)]
    with torch.no_grad(), model.hooks([(n, keep(n)) for n in frozen]):
        model.bridge(cap.tokens[None])

    def hold(name):
        return lambda t, *, hook: clean[name]

    def minus(pos):
        def hook(t, *, hook):
            t = t.clone()
            t[0, pos] -= vec
            return t

        return hook

    fwd = [(n, hold(n)) for n in frozen]
    for src in range(layer):
        mlp_out = cap.mlp_outputs[src]
        if node.kind == "feature" and src in model.transcoders.output_layers(node.layer):
            act = cap.activations[node.layer, node.pos, node.feature]
            rows = model.transcoders.decoder_vectors(node.layer, torch.tensor([node.feature]))[0]
            row = act * rows[list(model.transcoders.output_layers(node.layer)).index(src)]
            write = minus_at(node.pos, mlp_out, row)  # this layer's share of the feature's output
        elif node.kind in ("error", "decoder_bias", "skip") and node.layer == src:
            write = minus_at(node.pos, mlp_out, vec)
        else:
            write = minus_at(node.pos, mlp_out, torch.zeros_like(mlp_out[0]))  # held at the clean output
        fwd.append((model.output_hooks[src], write))
    if node.kind == "token":
        fwd.append(("hook_embed", minus(node.pos)))
    elif node.kind == "position":
        fwd.append(("hook_pos_embed", minus(node.pos)))
    elif node.kind == "attention_bias":
        fwd.append((f"blocks.{node.layer}.hook_attn_out", minus(node.pos)))
    out: dict[str, torch.Tensor] = {}
    fwd.append((f"blocks.{layer}.attn.hook_attn_scores", lambda t, *, hook: out.setdefault("s", t[0].clone())))
    with torch.no_grad(), model.hooks(fwd):
        model.bridge(cap.tokens[None])
    return out["s"]


def minus_at(pos, base, row):
    """A hook that writes ``base`` (n_pos, d_model) with ``row`` taken out at ``pos``."""

    def hook(t, *, hook):
        t = base[None].clone()
        t[0, pos] -= row
        return t

    return hook


@pytest.mark.parametrize("kind", ["plt_skip", "clt"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_expanded_query_term_equals_score_change_in_the_frozen_model(models, dirs, arch, kind):
    """A node between the key and the query position reaches only the query side: removing it
    where it enters the residual (patterns, norm scales and MLP outputs held) changes the score
    by its row sum, through its direct path and every attention path together."""
    model = models(arch, kind)
    cap = model.capture(prompt_for(dirs[arch]))
    layer, head, p, q = 1, 1, cap.n_pos - 1, 2
    qk = qk_attribution(model, cap, layer, head, p, q, top=None, expand_attention=True)
    scores, clean = run_scores(model, cap.tokens, layer)
    base = float(scores[head, p, q])
    checked = set()
    for i, node in enumerate(qk.query_nodes[:-1]):
        if node.pos is None or node.pos <= q:
            continue
        if node.kind == "attention_bias":
            continue  # no single vector: it is the bias part of the attention output, see the sum test
        vec = None if node.kind == "feature" else node_vector(model, cap, clean, node, layer)
        edited = frozen_scores_without(model, cap, layer, node, vec)
        assert float(qk.query_marginals[i]) == pytest.approx(base - float(edited[head, p, q]), abs=1e-9), node.label()
        checked.add(node.kind)
    assert {"token", "feature", "error", "decoder_bias"} <= checked
