"""remove_qk_nodes: the hooked forward's score change equals the QK matrices' prediction.

The reference is written here, not taken from the library: a manual forward of layer L's
attention from the clean run's residual stream and norm scale (LayerNorm or RMSNorm by hand,
W_Q / W_K, rotary from the run's cos/sin tables, causal softmax), with each removed node's
vector (from the capture: activation x decoder rows, error, token embedding...) taken out of
the normalised residual feeding W_Q at the query position, or W_K at the key position.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import testing
from pipeline.engine.qk import QKNode, qk_attribution
from pipeline.engine.qk_intervention import remove_qk_nodes
from pipeline.engine.replacement import Capture, ReplacementModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYER, HEAD = 1, 1


@pytest.fixture(scope="module")
def models(tiny_gpt2_dir, tiny_llama_dir, plt_skip_dir, clt_dir):
    dirs = {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}
    tcs = {"plt_skip": plt_skip_dir, "clt": clt_dir}
    cache: dict = {}

    def get(arch: str, kind: str):
        if (arch, kind) not in cache:
            model = ReplacementModel.from_pretrained(dirs[arch], tcs[kind], dtype=torch.float64)
            prompt = " ".join(testing.vocabulary_words(dirs[arch])[3:10])
            cache[arch, kind] = (model, model.capture(prompt))
        return cache[arch, kind]

    return get


# ---------------------------------------------------------------------------- reference
def clean_tensors(model: ReplacementModel, tokens) -> dict[str, torch.Tensor]:
    rec: dict[str, torch.Tensor] = {}
    names = [
        f"blocks.{LAYER}.hook_resid_pre",
        f"blocks.{LAYER}.ln1.hook_scale",
        f"blocks.{LAYER}.attn.hook_attn_scores",
        f"blocks.{LAYER}.attn.hook_pattern",
    ]
    names += [f"blocks.{src}.hook_attn_out" for src in range(LAYER)]
    rotary = model.bridge.cfg.positional_embedding_type == "rotary"
    names += [f"blocks.{LAYER}.attn.hook_cos", f"blocks.{LAYER}.attn.hook_sin"] if rotary else ["hook_pos_embed"]

    def keep(name):
        def hook(t, *, hook):
            rec[name] = t[0].detach().clone()

        return hook

    with torch.no_grad(), model.hooks([(n, keep(n)) for n in names]):
        model.bridge(tokens[None])
    return rec


def node_vector(model: ReplacementModel, cap: Capture, clean: dict, node: QKNode) -> torch.Tensor:
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
        rows = tc.decoder_vectors(node.layer, torch.tensor([node.feature]))[0]
        below = [j for j, out in enumerate(tc.output_layers(node.layer)) if out < LAYER]
        return act * rows[below].sum(0)
    raise AssertionError(node)


def rotate(x, cos, sin):
    """Rotate-half rotary of x (pos, d_head) with tables (pos, r)."""
    r = cos.shape[-1]
    a, rest = x[:, :r], x[:, r:]
    half = torch.cat([-a[:, r // 2 :], a[:, : r // 2]], dim=-1)
    return torch.cat([a * cos + half * sin, rest], dim=-1)


def manual_row(model, cap, clean, query_pos, key_pos, q_nodes=(), k_nodes=()):
    """Head HEAD's scores and pattern row at query_pos, by hand, with the nodes removed from the
    normalised input of W_Q at query_pos and of W_K at key_pos (norm scale frozen)."""
    block = model.bridge.blocks[LAYER]
    norm = block.ln1.original_component
    x = clean[f"blocks.{LAYER}.hook_resid_pre"].clone()
    scale = clean[f"blocks.{LAYER}.ln1.hook_scale"].reshape(-1, 1)

    def normed(v, pos):
        if model.normalization.startswith("LN"):
            v = v - v.mean(-1, keepdim=True)
        return v / scale[pos] * norm.weight

    n_in = normed(x, slice(None))
    if getattr(norm, "bias", None) is not None:
        n_in = n_in + norm.bias
    q_in, k_in = n_in.clone(), n_in.clone()
    bias_q = bias_k = None
    for node in q_nodes:
        if node.kind == "bias":
            bias_q = True
            continue
        q_in[query_pos] -= normed(node_vector(model, cap, clean, node), query_pos)
    for node in k_nodes:
        if node.kind == "bias":
            bias_k = True
            continue
        k_in[key_pos] -= normed(node_vector(model, cap, clean, node), key_pos)
    attn = block.attn
    g = HEAD // (attn.W_Q.shape[0] // attn.W_K.shape[0])
    q = q_in @ attn.W_Q[HEAD] + (attn.b_Q[HEAD] if attn.b_Q is not None else 0)
    k = k_in @ attn.W_K[g] + (attn.b_K[g] if attn.b_K is not None else 0)
    if bias_q:  # the bias node: the norm's bias through W_Q plus b_Q
        nb = norm.bias if getattr(norm, "bias", None) is not None else torch.zeros_like(norm.weight)
        q[query_pos] -= nb @ attn.W_Q[HEAD] + (attn.b_Q[HEAD] if attn.b_Q is not None else 0)
    if bias_k:
        nb = norm.bias if getattr(norm, "bias", None) is not None else torch.zeros_like(norm.weight)
        k[key_pos] -= nb @ attn.W_K[g] + (attn.b_K[g] if attn.b_K is not None else 0)
    if f"blocks.{LAYER}.attn.hook_cos" in clean:
        n = x.shape[0]
        cos = clean[f"blocks.{LAYER}.attn.hook_cos"].reshape(n, -1)
        sin = clean[f"blocks.{LAYER}.attn.hook_sin"].reshape(n, -1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    scores = (q[query_pos] @ k[: query_pos + 1].T) / q.shape[-1] ** 0.5
    pattern = torch.zeros(x.shape[0], dtype=scores.dtype)
    pattern[: query_pos + 1] = torch.softmax(scores, 0)
    return scores, pattern


def feature_nodes(nodes):
    return [n for n in nodes if n.kind == "feature"]


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", ["plt_skip", "clt"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_manual_forward_reproduces_the_runs_scores(models, arch, kind):
    model, cap = models(arch, kind)
    clean = clean_tensors(model, cap.tokens)
    q = cap.n_pos - 1
    scores, pattern = manual_row(model, cap, clean, q, 2)
    tol = 1e-12 if arch == "gpt2" else 1e-6  # HF Llama's RMSNorm rounds in float32
    torch.testing.assert_close(scores, clean[f"blocks.{LAYER}.attn.hook_attn_scores"][HEAD, q], atol=tol, rtol=0)
    torch.testing.assert_close(pattern, clean[f"blocks.{LAYER}.attn.hook_pattern"][HEAD, q], atol=tol, rtol=0)


@pytest.mark.parametrize("kind", ["plt_skip", "clt"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_removing_a_query_and_a_key_node_matches_the_prediction_and_a_manual_forward(models, arch, kind):
    model, cap = models(arch, kind)
    clean = clean_tensors(model, cap.tokens)
    q, k = cap.n_pos - 1, 2
    qk = qk_attribution(model, cap, LAYER, HEAD, q, k, top=None)
    # the largest feature x feature term, and a second pair: a token and an error with the bias
    pairs = [(t.query, t.key) for t in qk.terms if t.query.kind == "feature" and t.key.kind == "feature"][:1] + [
        (QKNode("token", pos=q), QKNode("error", layer=0, pos=k))
    ]
    assert len(pairs) == 2
    for q_nodes, k_nodes in [([a], [b]) for a, b in pairs] + [([pairs[0][0], QKNode("bias")], [QKNode("bias")])]:
        r = remove_qk_nodes(model, cap, LAYER, HEAD, q, k, query_nodes=q_nodes, key_nodes=k_nodes)
        change = r.score_after - r.score_before
        assert abs(change) > 1e-8  # something was removed
        assert r.score_predicted - r.score_before == pytest.approx(change, rel=1e-6, abs=1e-10)
        torch.testing.assert_close(r.scores_predicted, r.scores_after, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(r.pattern_predicted, r.pattern_after, rtol=1e-6, atol=1e-9)
        ref_scores, ref_pattern = manual_row(model, cap, clean, q, k, q_nodes, k_nodes)
        tol = 1e-12 if arch == "gpt2" else 1e-6
        torch.testing.assert_close(r.scores_after, ref_scores, atol=tol, rtol=0)
        torch.testing.assert_close(r.pattern_after, ref_pattern, atol=tol, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_pairs_change_is_minus_row_minus_column_plus_their_term(models, arch):
    model, cap = models(arch, "clt")
    q, k = cap.n_pos - 1, 3
    qk = qk_attribution(model, cap, LAYER, HEAD, q, k, top=None)
    i = int(qk.query_marginals.abs().argmax())
    j = int(qk.key_marginals.abs().argmax())
    r = remove_qk_nodes(model, cap, LAYER, HEAD, q, k, query_nodes=[qk.query_nodes[i]], key_nodes=[qk.key_nodes[j]])
    expected = -(float(qk.query_marginals[i]) + float(qk.key_marginals[j]) - float(qk.matrix[i, j]))
    assert r.score_after - r.score_before == pytest.approx(expected, rel=1e-6)
    # the key-side removal leaves every other key's score alone; the query-side one does not
    qk_other = qk_attribution(model, cap, LAYER, HEAD, q, 1, top=None)
    other = qk_other.query_marginals[[n == qk.query_nodes[i] for n in qk_other.query_nodes].index(True)]
    assert float(r.scores_after[1] - r.scores_before[1]) == pytest.approx(-float(other), rel=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_removing_nothing_reproduces_the_clean_run_exactly(models, arch):
    model, cap = models(arch, "plt_skip")
    clean = clean_tensors(model, cap.tokens)
    q = cap.n_pos - 1
    r = remove_qk_nodes(model, cap, LAYER, HEAD, q, 2)
    assert torch.equal(r.scores_after, r.scores_before)
    assert torch.equal(r.pattern_after, r.pattern_before)
    assert torch.equal(r.logits_after, r.logits_before)
    assert torch.equal(r.pattern_before, clean[f"blocks.{LAYER}.attn.hook_pattern"][HEAD, q])
    torch.testing.assert_close(r.scores_predicted, r.scores_before, rtol=1e-6, atol=1e-9)


def test_a_removal_changes_the_logits_downstream(models):
    model, cap = models("gpt2", "clt")
    q = cap.n_pos - 1
    qk = qk_attribution(model, cap, 0, 0, q, 1, top=None)
    r = remove_qk_nodes(model, cap, 0, 0, q, 1, query_nodes=[qk.query_nodes[0]])
    assert float((r.logits_after - r.logits_before).abs().max()) > 1e-8


@pytest.mark.parametrize(
    "args, nodes, message",
    [
        ((2, 0, 5, 2), {}, "layer 2 is out of range"),
        ((1, 9, 5, 2), {}, "head 9 is out of range"),
        ((1, 0, 40, 2), {}, "query_pos 40 is out of range"),
        ((1, 0, 3, 5), {}, "key_pos 5 is after query_pos 3"),
        ((1, 0, 5, 2), {"query_nodes": [QKNode("token", pos=2)]}, "query node token p2 is not a term"),
        ((1, 0, 5, 2), {"key_nodes": [QKNode("feature", layer=0, pos=2, feature=10**6)]}, "key node feature L0 p2"),
        ((1, 0, 5, 2), {"key_nodes": ["token p2"]}, "must hold QKNode objects"),
        ((1, 0, 5, 2), {"query_nodes": [QKNode("bias"), QKNode("bias")]}, "given twice"),
    ],
)
def test_bad_input_is_a_clear_error(models, args, nodes, message):
    model, cap = models("gpt2", "plt_skip")
    with pytest.raises(ValueError, match=message):
        remove_qk_nodes(model, cap, *args, **nodes)


def test_reused_attributions_give_the_same_removal_and_wrong_ones_are_refused(models):
    model, cap = models("gpt2", "clt")
    q = cap.n_pos - 1
    per_key = [qk_attribution(model, cap, LAYER, HEAD, q, k, top=0) for k in range(q + 1)]
    node = feature_nodes(per_key[2].query_nodes)[0]
    a = remove_qk_nodes(model, cap, LAYER, HEAD, q, 2, query_nodes=[node])
    b = remove_qk_nodes(model, cap, LAYER, HEAD, q, 2, query_nodes=[node], attributions=per_key)
    assert torch.equal(a.scores_predicted, b.scores_predicted)
    assert torch.equal(a.scores_after, b.scores_after)
    with pytest.raises(ValueError, match="attributions must be qk_attribution at layer 1, head 1"):
        remove_qk_nodes(model, cap, LAYER, HEAD, q, 2, query_nodes=[node], attributions=per_key[:-1])
