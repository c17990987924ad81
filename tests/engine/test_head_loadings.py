"""Head loadings are exact: checked against forward-only interventions on the frozen model.

The reference here never differentiates. It reruns the model with attention patterns and norm
scales pinned to their clean values and MLP outputs to their clean values plus the skip term's
change (as FrozenReference in test_attribution.py), adds a source's output vector, and edits
the heads' outputs (``hook_z``) of one layer by hand: a head's loading is the target's change
when only that head's change from the source is put back into a clean run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from pipeline import testing
from pipeline.engine import edge_sweeps as ES
from pipeline.engine import head_loadings as HL
from pipeline.engine import hooks as H
from pipeline.engine.attribution import attribute
from pipeline.engine.head_loadings import (
    HeadLoadingsError,
    graph_capture,
    head_loadings,
    read_head_loadings,
    top_edges,
    write_head_loadings,
)
from pipeline.engine.replacement import ReplacementModel
from pipeline.graph.pruning import prune_graph
from pipeline.graph.store import Graph, verify_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_LAYERS, N_HEADS = 3, 4
ARCHS = ["gpt2", "llama"]
KINDS = ["plt", "plt_skip", "clt"]


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    """3 layers (so that edges cross several attention layers), 4 heads (Llama: 2 key/value heads)."""
    root = tmp_path_factory.mktemp("head_loadings")
    sizes = dict(n_layers=N_LAYERS, d_model=16, n_heads=N_HEADS, n_ctx=32)
    dirs = {"gpt2": testing.make_tiny_gpt2(root / "gpt2", **sizes)}
    dirs["llama"] = testing.make_tiny_llama(root / "llama", **sizes)
    common = dict(n_layers=N_LAYERS, d_model=16, d_transcoder=24, density=0.3)
    dirs["plt"] = testing.make_random_plt(root / "plt", activation="relu", **common)
    dirs["plt_skip"] = testing.make_random_plt(root / "plt_skip", activation="jump_relu", skip=True, **common)
    dirs["clt"] = testing.make_random_clt(root / "clt", **common)
    return dirs


@pytest.fixture(scope="module")
def attributed(fixture_dirs, tmp_path_factory):
    """(arch, kind) -> (float64 model, its graph of a 7-word prompt, the graph's capture), built once."""
    cache: dict = {}

    def get(arch: str, kind: str):
        if (arch, kind) not in cache:
            model = ReplacementModel.from_pretrained(fixture_dirs[arch], fixture_dirs[kind], dtype=torch.float64)
            prompt = " ".join(testing.vocabulary_words(fixture_dirs[arch])[3:10])
            store = tmp_path_factory.mktemp(f"{arch}_{kind}") / "g.zarr"
            graph = attribute(prompt, model, batch_size=16, store=store, verbose=False)
            cache[arch, kind] = (model, graph, graph_capture(graph, model))
        return cache[arch, kind]

    return get


def sample_edges(graph: Graph, per_kind: int) -> list[tuple[int, int]]:
    """(source, target) pairs: into the first logit and into a feature of the last layer, the
    largest edges from each source kind (features, errors, tokens) first."""
    last = graph.active_features[graph.selected_features][:, 0] == graph.n_layers - 1
    targets = [graph.logit_node(0)] + [int(np.nonzero(last)[0][-1])] if last.any() else [graph.logit_node(0)]
    edges = []
    for target in targets:
        cols, vals = graph.row(target)
        order = np.argsort(-np.abs(vals), kind="stable")
        for kind in ("feature", "error", "token"):
            picked = [int(c) for c in cols[order] if graph.node_kind(int(c)) == kind][:per_kind]
            edges += [(s, target) for s in picked]
    return edges


# ---------------------------------------------------------------------------- reference
class HandFrozen:
    """Forward-only reruns of the frozen model; no autograd anywhere."""

    def __init__(self, model: ReplacementModel, graph: Graph):
        self.model, self.graph = model, graph
        self.cap = model.capture(torch.as_tensor(graph.input_tokens))
        frozen: dict[str, torch.Tensor] = {}

        def save(tensor, *, hook):
            frozen[hook.name] = tensor.detach().clone()

        with model.hooks([(n, save) for n in model.pattern_hooks + model.scale_hooks]), torch.no_grad():
            model.bridge(self.cap.tokens[None])
        self.frozen = frozen
        self.clean = self.run({})

    @torch.no_grad()
    def run(self, additions: dict[str, torch.Tensor], edit: tuple[int, Callable] | None = None):
        """additions: hook name -> (n_pos, d_model) added there; edit: (layer, f) replaces that
        layer's heads' outputs z (n_pos, n_heads, d_head) by f(z).

        returns (transcoder reads (n_layers, n_pos, d_model), unembedding input (n_pos, d_model),
        z of every layer {layer: (n_pos, n_heads, d_head)}, as they were before any edit)
        """
        m, cap = self.model, self.cap
        reads: dict[int, torch.Tensor] = {}
        zs: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}

        def patch(tensor, *, hook):
            return self.frozen[hook.name]

        def embed(tensor, *, hook):
            return tensor + additions.get(H.EMBED, 0)

        def heads(layer):
            def hook(tensor, *, hook):
                zs[layer] = tensor[0].clone()
                if edit is not None and edit[0] == layer:
                    return edit[1](tensor[0].clone())[None]
                return None

            return hook

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
            # TransformerLens's own name for the heads' outputs, spelt here on purpose
            fwd += [(f"blocks.{layer}.attn.hook_z", heads(layer))]
            fwd += [(m.input_hooks[layer], read(layer)), (m.output_hooks[layer], write(layer))]
        with m.hooks(fwd):
            m.bridge(cap.tokens[None])
        return torch.stack([reads[layer] for layer in range(m.n_layers)]), out["u"], zs

    def additions(self, node: int) -> dict[str, torch.Tensor]:
        """The output vector of graph-order source ``node``, placed where it is written."""
        g, m, cap = self.graph, self.model, self.cap
        kind = g.node_kind(node)
        add: dict[str, torch.Tensor] = {}

        def at(pos, vector):
            v = torch.zeros_like(cap.token_embeddings)
            v[pos] = vector
            return v

        if kind == "feature":
            layer, pos, f = (int(v) for v in g.active_features[g.selected_features[node]])
            dec = m.transcoders.decoder_vectors(layer, torch.tensor([f]))[0]
            for j, out_layer in enumerate(m.transcoders.output_layers(layer)):
                add[m.output_hooks[out_layer]] = at(pos, cap.activations[layer, pos, f] * dec[j])
        elif kind == "error":
            layer, pos = divmod(node - g.error_slice.start, g.n_pos)
            add[m.output_hooks[layer]] = at(pos, cap.errors[layer, pos])
        else:
            pos = node - g.token_slice.start
            add[H.EMBED] = at(pos, cap.token_embeddings[pos])
        return add

    def target_value(self, target: int, reads: torch.Tensor, unembed: torch.Tensor) -> float:
        g, m = self.graph, self.model
        if g.node_kind(target) == "logit":
            token = int(g.logit_tokens[target - g.logit_slice.start])
            vector = m.W_U[:, token] - m.W_U.mean(dim=-1)
            return float(vector @ unembed[-1])
        layer, pos, f = (int(v) for v in g.active_features[g.selected_features[target]])
        return float(m.transcoders.encoder_vectors(layer, torch.tensor([f]))[0] @ reads[layer, pos])

    def change(self, target: int, additions, edit=None) -> float:
        """The target's change from the clean frozen run under ``additions`` and ``edit``."""
        x, u, _ = self.run(additions, edit)
        return self.target_value(target, x, u) - self.target_value(target, *self.clean[:2])


def close(a: float, b: float, scale: float) -> float:
    """|a - b| relative to the edge's scale (an absolute error for edges below 1)."""
    return abs(a - b) / max(scale, 1.0)


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_head_loadings_sum_to_the_edge(attributed, arch, kind):
    """Each layer's heads plus the edge with that layer's heads pinned clean (computed by hand,
    forward only) add up to the edge: the bypass the library reports is that remainder."""
    model, graph, capture = attributed(arch, kind)
    ref = HandFrozen(model, graph)
    z_clean = ref.clean[2]
    edges = sample_edges(graph, per_kind=4)
    assert {graph.node_kind(s) for s, _ in edges} == {"feature", "error", "token"}
    n_layers_seen = set()
    for source, target in edges:
        hl = head_loadings(graph, source, target, model=model, capture=capture)
        n_layers_seen.add(len(hl.layers))
        assert hl.heads.shape == (len(hl.layers), N_HEADS) and hl.bypass.shape == (len(hl.layers),)
        add = ref.additions(source)
        for i, layer in enumerate(hl.layers.tolist()):
            pinned = ref.change(target, add, (layer, lambda z, layer=layer: z_clean[layer].clone()))
            total = hl.heads[i].sum() + pinned
            assert close(total, hl.edge, abs(hl.edge)) <= 1e-6, (source, target, layer, total, hl.edge)
            assert close(hl.bypass[i], pinned, abs(hl.edge)) <= 1e-6, (source, target, layer)
        # and the edge is the graph's (stored in float32)
        assert abs(hl.edge - hl.graph_edge) <= 1e-6 * abs(hl.edge) + 1e-12, (source, target)
    assert max(n_layers_seen) == N_LAYERS  # a token source crosses every layer's attention


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_each_head_loading_equals_the_edge_through_that_head_alone(attributed, arch, kind):
    model, graph, capture = attributed(arch, kind)
    ref = HandFrozen(model, graph)
    z_clean = ref.clean[2]
    for source, target in sample_edges(graph, per_kind=1):
        hl = head_loadings(graph, source, target, model=model, capture=capture)
        add = ref.additions(source)
        _, _, z_source = ref.run(add)
        assert close(ref.change(target, add), hl.edge, abs(hl.edge)) <= 1e-6
        scale = max(abs(hl.edge), np.abs(hl.heads).max(initial=0.0))
        for i, layer in enumerate(hl.layers.tolist()):
            dz = z_source[layer] - z_clean[layer]  # the source's change of every head at this layer
            for h in range(N_HEADS):

                def only_head_h(z, dz=dz, h=h):
                    z[:, h] += dz[:, h]  # a clean run, plus head h's change from the source
                    return z

                through_h = ref.change(target, {}, (layer, only_head_h))
                assert close(hl.heads[i, h], through_h, scale) <= 1e-6, (source, target, layer, h)
    assert np.abs(hl.heads).max() > 0  # the loadings are not trivially zero


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_batched_source_tangents_equal_one_forward_mode_sweep_per_source(attributed, arch, kind):
    """sweep_edges gets every source's dz and dv from one double backward; source_sweep gets one
    source's from forward-mode autodiff of a hooked forward: two routes to the same tangents."""
    model, graph, capture = attributed(arch, kind)
    edges = sample_edges(graph, per_kind=3)
    sources = [HL.source_vector(graph, s, model, capture) for s in sorted({s for s, _ in edges})]
    targets = [HL.target_vector(graph, t, model) for t in sorted({t for _, t in edges})]
    n = graph.n_pos
    sweeps = ES.sweep_edges(model, capture, sources, targets, n, values=True)
    assert len(sweeps.dv) == N_LAYERS
    largest = 0.0
    for i, src in enumerate(sources):
        ref = ES.source_sweep(model, capture, src, n)
        for layer in range(N_LAYERS):
            largest = max(largest, float(ref.z[layer].abs().max()))
            assert torch.allclose(sweeps.dz[layer][i], ref.z[layer], rtol=1e-9, atol=1e-12), (i, layer)
            assert torch.allclose(sweeps.dv[layer][i], ref.v[layer], rtol=1e-9, atol=1e-12), (i, layer)
        for j, tgt in enumerate(targets):
            if tgt.pos >= src.pos:
                assert abs(float(sweeps.edges[i, j]) - float(ref.read(tgt))) <= 1e-9 * max(
                    1.0, abs(float(ref.read(tgt)))
                )
    assert largest > 0  # the sources do move the heads
    # blocks of two sources each: the same tangents, every source in exactly one block
    sweeper = ES.EdgeSweeper(model, capture, n, values=True)
    seen = []
    for blk in sweeper.source_blocks(sources, block=2):
        assert len(blk.index) <= 2
        seen += blk.index.tolist()
        for layer in range(N_LAYERS):
            for got, dense in ((blk.dz[layer], sweeps.dz[layer]), (blk.dv[layer], sweeps.dv[layer])):
                expected = dense[blk.index]
                if got is None:
                    assert not expected.any()
                else:
                    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert sorted(seen) == list(range(len(sources)))
    # targets in blocks of one: the same gradients and edges as every target in one backward;
    # a target's gradient is kept only at the layers it reads at or above (zero elsewhere)
    assert len(targets) > 1
    one, whole = (sweeper.target_side(targets, sources, block=b) for b in (1, len(targets)))
    for layer in range(N_LAYERS):
        dense = one.dense_grads(layer)
        assert torch.allclose(dense, whole.dense_grads(layer), rtol=1e-12, atol=1e-15)
        assert torch.allclose(dense, sweeps.grads[layer], rtol=1e-12, atol=1e-15)
        below = [j for j, t in enumerate(targets) if t.layer < layer]
        assert not dense[below].any()
        assert len(one.grads[layer]) == len(targets) - len(below)
    assert torch.allclose(one.edges, whole.edges, rtol=1e-12, atol=1e-15)


def test_an_edge_with_no_attention_layer_on_its_way_is_all_bypass(attributed):
    model, graph, capture = attributed("gpt2", "plt")
    source = graph.error_node(N_LAYERS - 1, graph.n_pos - 1)  # written after the last attention layer
    hl = head_loadings(graph, source, graph.logit_node(0), model=model, capture=capture)
    assert hl.layers.shape == (0,) and hl.heads.shape == (0, N_HEADS) and hl.sum_error() == 0.0
    assert abs(hl.edge - hl.graph_edge) <= 1e-6 * abs(hl.edge)


# ---------------------------------------------------------------------------- bad input
def test_a_node_id_out_of_range_is_refused_naming_the_range(attributed):
    model, graph, capture = attributed("gpt2", "plt")
    for bad in (graph.n_nodes, -1):
        with pytest.raises(HeadLoadingsError, match=rf"source node {bad} is out of range: .* 0 to {graph.n_nodes - 1}"):
            head_loadings(graph, bad, graph.logit_node(0), model=model, capture=capture)
    with pytest.raises(HeadLoadingsError, match="target node 1.5 is not an integer"):
        head_loadings(graph, 0, 1.5, model=model, capture=capture)


def test_a_source_that_cannot_reach_the_target_is_refused(attributed):
    model, graph, capture = attributed("gpt2", "plt")
    feats = graph.active_features[graph.selected_features]
    late = int(np.argmax(feats[:, 0]))  # a feature of the highest layer that has one
    early = int(np.argmin(feats[:, 0]))
    assert feats[late, 0] > feats[early, 0]
    with pytest.raises(HeadLoadingsError, match=r"cannot reach target .* no such edge; pick a source upstream"):
        head_loadings(graph, late, early, model=model, capture=capture)
    later_pos = graph.error_node(0, graph.n_pos - 1)  # earlier layer, later position
    at_pos0 = [i for i in range(graph.n_selected) if feats[i, 1] < graph.n_pos - 1 and feats[i, 0] > 0][0]
    with pytest.raises(HeadLoadingsError, match="cannot reach"):
        head_loadings(graph, later_pos, at_pos0, model=model, capture=capture)


def test_a_logit_source_or_a_token_target_is_refused(attributed):
    model, graph, capture = attributed("gpt2", "plt")
    with pytest.raises(HeadLoadingsError, match="is a logit: .* pass it as the target"):
        head_loadings(graph, graph.logit_node(0), 0, model=model, capture=capture)
    with pytest.raises(HeadLoadingsError, match="has no incoming edges .* pass a feature or logit node"):
        head_loadings(graph, 0, graph.token_node(1), model=model, capture=capture)


def test_a_graph_made_with_other_weights_is_refused(attributed, fixture_dirs, tmp_path):
    _, graph, _ = attributed("gpt2", "plt")
    other_tc = ReplacementModel.from_pretrained(fixture_dirs["gpt2"], fixture_dirs["clt"], dtype=torch.float64)
    with pytest.raises(HeadLoadingsError, match="attributed with other transcoders weights .* re-attribute"):
        head_loadings(graph, graph.token_node(1), graph.logit_node(0), model=other_tc)
    other_dir = testing.make_tiny_gpt2(tmp_path / "gpt2_seed1", n_layers=N_LAYERS, d_model=16, n_heads=N_HEADS, seed=1)
    other_model = ReplacementModel.from_pretrained(other_dir, fixture_dirs["plt"], dtype=torch.float64)
    with pytest.raises(HeadLoadingsError, match="attributed with other model weights"):
        head_loadings(graph, graph.token_node(1), graph.logit_node(0), model=other_model)


# ---------------------------------------------------------------------------- many edges, streamed
@pytest.fixture
def graph_copy(attributed, tmp_path):
    """A copy of the CLT Llama graph (the tests add a group to its store), its model and capture."""
    import shutil

    model, graph, capture = attributed("llama", "clt")
    shutil.copytree(graph.path, tmp_path / "g.zarr")
    return model, Graph.open(tmp_path / "g.zarr"), capture


def test_top_edges_are_the_pruned_graphs_highest_scoring_kept_edges(graph_copy):
    _, graph, _ = graph_copy
    result = prune_graph(graph, node_threshold=0.9, edge_threshold=0.95)
    edges = top_edges(result, 10)
    scores = np.asarray(result.edge_scores[edges[:, 1], edges[:, 0]]).ravel()
    assert len(edges) == 10 and np.all(np.diff(scores) <= 0)
    assert scores[-1] >= np.sort(result.edge_scores.data)[::-1][9]  # none better left out
    assert result.edge_mask[edges[:, 1], edges[:, 0]].all()


def test_streamed_head_loadings_equal_single_edge_calls(graph_copy):
    model, graph, capture = graph_copy
    edges = top_edges(prune_graph(graph, node_threshold=0.9, edge_threshold=0.95), 12)
    group = write_head_loadings(graph, edges, model=model, chunk_size=5, capture=capture)
    assert sorted(p.name for p in group.iterdir()) == [
        "chunk_000000",
        "chunk_000001",
        "chunk_000002",
        "edges",
        "zarr.json",
    ]
    table = read_head_loadings(graph)
    np.testing.assert_array_equal(table.edges, edges)
    for i, (source, target) in enumerate(edges.tolist()):
        one, streamed = head_loadings(graph, source, target, model=model, capture=capture), table[i]
        np.testing.assert_array_equal(streamed.layers, one.layers)
        np.testing.assert_allclose(streamed.heads, one.heads, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(streamed.bypass, one.bypass, rtol=1e-12, atol=1e-15)
        assert streamed.edge == pytest.approx(one.edge, rel=1e-12, abs=1e-15)
        assert streamed.graph_edge == one.graph_edge
        assert streamed.sum_error() <= 1e-9 * max(1.0, abs(streamed.edge))
    assert verify_store(graph.path) == []  # the store stays valid, the new arrays checksummed


def test_streaming_resumes_skipping_finished_chunks(graph_copy, monkeypatch):
    import shutil

    model, graph, capture = graph_copy
    edges = top_edges(prune_graph(graph, node_threshold=0.9, edge_threshold=0.95), 9)
    group = write_head_loadings(graph, edges, model=model, chunk_size=3, capture=capture)
    first = read_head_loadings(graph)
    shutil.rmtree(group / "chunk_000001")  # as if the run had been killed before this chunk
    with pytest.raises(HeadLoadingsError, match=r"unfinished \(1 of 3 chunks missing\): rerun write_head_loadings"):
        read_head_loadings(graph)
    computed = []
    real = HL._compute_chunk
    monkeypatch.setattr(HL, "_compute_chunk", lambda g, m, c, e, *a: computed.append(e.copy()) or real(g, m, c, e, *a))
    write_head_loadings(graph, edges, model=model, chunk_size=3, capture=capture)
    assert len(computed) == 1 and np.array_equal(computed[0], edges[3:6])
    again = read_head_loadings(graph)
    for name in ("heads", "bypass", "on_way", "edge", "graph_edge"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    with pytest.raises(HeadLoadingsError, match="another request .*delete it .rm -r"):
        write_head_loadings(graph, edges[:5], model=model, chunk_size=3, capture=capture)


def test_a_bad_edge_in_a_batch_is_refused_naming_its_row(graph_copy):
    model, graph, capture = graph_copy
    edges = np.array([[graph.token_node(0), graph.logit_node(0)], [graph.logit_node(0), 0]])
    with pytest.raises(HeadLoadingsError, match=r"edges\[1\]: source logit node .* is a logit"):
        write_head_loadings(graph, edges, model=model, capture=capture)
    assert not (graph.path / HL.GROUP).exists()


# ---------------------------------------------------------------------------- split by position
@pytest.mark.parametrize("arch", ARCHS)
def test_pair_shares_equal_the_edge_through_one_query_key_pair(attributed, arch):
    """share[h, p, k] is the target's change when a clean run gets, at head h's output of
    query position p, only what the pattern moved there from key position k of the source's
    value change (v recorded by hand in two frozen runs); they add up to the head's loading."""
    model, graph, capture = attributed(arch, "plt")
    ref = HandFrozen(model, graph)

    def values(additions):
        vs = {}

        def keep(layer):
            def hook(tensor, *, hook):
                vs[layer] = tensor[0].clone()

            return hook

        with model.hooks([(f"blocks.{layer}.attn.hook_v", keep(layer)) for layer in range(model.n_layers)]):
            ref.run(additions)
        return vs

    v_clean = values({})
    checked = 0
    for source, target in sample_edges(graph, per_kind=1):
        hl = head_loadings(graph, source, target, model=model, capture=capture)
        src, tgt = HL.source_vector(graph, source, model, capture), HL.target_vector(graph, target, model)
        n = tgt.pos + 1
        sweep = ES.source_sweep(model, capture, src, n)
        grads = [g[0] for g in ES.sweep_edges(model, capture, [src], [tgt], n).grads]
        dv_all = {layer: v - v_clean[layer] for layer, v in values(ref.additions(source)).items()}
        scale = max(abs(hl.edge), np.abs(hl.heads).max(initial=0.0))
        for i, layer in enumerate(hl.layers.tolist()):
            share = ES.pair_shares(sweep, grads, layer).numpy()
            assert share.shape == (N_HEADS, n, n)
            np.testing.assert_allclose(share.sum(axis=(1, 2)), hl.heads[i], rtol=1e-9, atol=1e-12 * scale)
            pattern = ref.frozen[f"blocks.{layer}.attn.hook_pattern"][0]
            dv = dv_all[layer]
            group = N_HEADS // dv.shape[1]  # Llama fixture: grouped-query attention
            for h in range(N_HEADS):
                for flat in np.argsort(-np.abs(share[h]), axis=None)[:2]:
                    p, k = (int(x) for x in np.unravel_index(flat, (n, n)))

                    def only_pair(z, h=h, p=p, k=k, dv=dv, pattern=pattern, group=group):
                        z[p, h] += pattern[h, p, k] * dv[k, h // group]
                        return z

                    through = ref.change(target, {}, (layer, only_pair))
                    assert close(share[h, p, k], through, scale) <= 1e-6, (source, target, layer, h, p, k)
                    checked += 1
    assert checked > 0 and np.abs(share).max() > 0


def test_a_chunk_split_into_target_groups_gives_the_same_loadings(graph_copy, tmp_path, monkeypatch):
    """TARGET_GROUP bounds the targets whose gradients a sweep keeps; groups of one target (each
    sweeping its own sources) store the same numbers as the whole chunk in one sweep."""
    model, graph, capture = graph_copy
    edges = top_edges(prune_graph(graph, node_threshold=0.9, edge_threshold=0.95), 12)
    assert len(np.unique(edges[:, 1])) > 1
    tables = []
    for group in (HL.TARGET_GROUP, 1):
        monkeypatch.setattr(HL, "TARGET_GROUP", group)
        out = tmp_path / f"group_{group}"
        write_head_loadings(graph, edges, model=model, chunk_size=12, capture=capture, out=out, positions=True)
        tables.append(read_head_loadings(graph, out=out))
    whole, split = tables
    assert np.abs(whole.heads).max() > 0
    np.testing.assert_array_equal(split.on_way, whole.on_way)
    for name in ("heads", "bypass", "edge", "pair_abs"):
        np.testing.assert_allclose(getattr(split, name), getattr(whole, name), rtol=1e-12, atol=1e-15)


def test_an_output_store_leaves_the_graph_store_untouched_and_sums_abs_pair_shares(graph_copy, tmp_path):
    """out=: the group is a store of its own (the graph's store, another stage's output, is not
    written: same files, same bytes); positions=True: pair_abs is the sum over the edges of
    |pair_shares|, here recomputed edge by edge."""
    model, graph, capture = graph_copy
    before = {p: p.read_bytes() for p in graph.path.rglob("*") if p.is_file()}
    edges = top_edges(prune_graph(graph, node_threshold=0.9, edge_threshold=0.95), 7)
    out = tmp_path / "attention" / "head_loadings.zarr"
    group = write_head_loadings(graph, edges, model=model, chunk_size=3, capture=capture, out=out, positions=True)
    assert group == out and {p: p.read_bytes() for p in graph.path.rglob("*") if p.is_file()} == before
    table = read_head_loadings(graph, out=out)
    with pytest.raises(HeadLoadingsError, match="holds no head loadings"):
        read_head_loadings(graph)  # nothing in the graph's own store
    expected = np.zeros((graph.n_layers, N_HEADS, graph.n_pos, graph.n_pos))
    for i, (s, t) in enumerate(edges.tolist()):
        src, tgt = HL.source_vector(graph, s, model, capture), HL.target_vector(graph, t, model)
        n = tgt.pos + 1
        sweep = ES.source_sweep(model, capture, src, n)
        grads = [g[0] for g in ES.sweep_edges(model, capture, [src], [tgt], n).grads]
        for layer in np.nonzero(table.on_way[i])[0].tolist():
            expected[layer, :, :n, :n] += np.abs(ES.pair_shares(sweep, grads, layer).numpy())
    assert table.pair_abs is not None and table.pair_abs.max() > 0
    np.testing.assert_allclose(table.pair_abs, expected, rtol=1e-9, atol=1e-15)
    assert verify_store(graph.path) == []
