"""Feature dashboards: every statistic checked against a brute-force scan of ``capture``."""

from __future__ import annotations

import json
import random
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import testing
from pipeline.analysis import dashboards as D
from pipeline.analysis.dashboards import compute, stats
from pipeline.analysis.dashboards.corpus import sequences
from pipeline.analysis.dashboards.labels import auto_label
from pipeline.engine.replacement import ReplacementModel

CFG = dict(
    top_k=5,
    context_before=3,
    context_after=2,
    n_quantiles=3,
    examples_per_quantile=3,
    hist_bins=12,
    hist_min=1e-2,
    hist_max=10.0,
    n_logits=6,
    batch_tokens=64,
    checkpoint_every=1,
)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir, plt_dir):
    return ReplacementModel.from_pretrained(tiny_gpt2_dir, plt_dir)


@pytest.fixture(scope="module")
def corpus(tiny_gpt2_dir):
    """30 short sentences of the fixture's words (every one fits one sequence)."""
    words = testing.vocabulary_words(tiny_gpt2_dir)
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(30)]


@pytest.fixture(scope="module")
def store(model, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("dash") / "plt.zarr"
    return D.compute_dashboards(model, corpus, out, D.DashboardConfig(**CFG), progress=False)


@pytest.fixture(scope="module")
def dash(store):
    return D.Dashboards.open(store)


@pytest.fixture(scope="module")
def brute(model, corpus):
    """Per document: token ids (T,) and activations (n_layers, T, F) from ReplacementModel.capture."""
    out = []
    for text in corpus:
        cap = model.capture(text)
        out.append((cap.tokens.numpy(), cap.activations.numpy()))
    return out


def _firings(brute, layer, feature):
    """Every (value, document, position) where the feature fires, best first (value desc)."""
    rows = [
        (float(a[layer, p, feature]), d, p)
        for d, (_, a) in enumerate(brute)
        for p in range(a.shape[1])
        if a[layer, p, feature] > 0
    ]
    return sorted(rows, key=lambda r: (-r[0], r[1], r[2]))


def _check_example(ex, brute, layer, feature, cfg):
    tokens, acts = brute[ex["document"]]
    pos = ex["position"]
    assert acts[layer, pos, feature] == pytest.approx(ex["value"], rel=1e-5, abs=1e-6)
    lo, hi = max(0, pos - cfg["context_before"]), min(tokens.size, pos + cfg["context_after"] + 1)
    assert ex["token_ids"] == tokens[lo:hi].tolist()
    assert ex["tokens"][ex["max_index"]] == ex["tokens"][pos - lo]
    np.testing.assert_allclose(ex["activations"], acts[layer, lo:hi, feature], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- statistics
def test_top_examples_equal_brute_force_scan(dash, brute):
    n_checked = 0
    for layer in range(dash.n_layers):
        for f in range(dash.d_transcoder):
            rec = dash.feature(layer, f)
            expected = _firings(brute, layer, f)[: CFG["top_k"]]
            got = rec["top_examples"]
            assert len(got) == len(expected)
            np.testing.assert_allclose([e["value"] for e in got], [r[0] for r in expected], rtol=1e-5, atol=1e-6)
            for ex in got:
                _check_example(ex, brute, layer, f, CFG)
            if got:
                assert rec["max_activation"] == got[0]["value"]
            n_checked += len(got)
    assert n_checked > 100


def test_density_and_histogram_match_brute_force(dash, brute):
    edges = np.array([e if e is not None else np.inf for e in dash.meta["hist_edges"]])
    n_tokens = sum(t.size - 1 for t, _ in brute)  # BOS never counts
    assert dash.n_tokens == n_tokens
    for layer in range(dash.n_layers):
        for f in range(dash.d_transcoder):
            values = np.array([r[0] for r in _firings(brute, layer, f)])
            rec = dash.feature(layer, f)
            assert rec["n_firing"] == values.size
            assert rec["density"] == pytest.approx(values.size / n_tokens)
            counts = np.bincount(np.searchsorted(edges[1:-1], values, side="right"), minlength=edges.size - 1)
            nz = np.nonzero(counts)[0]
            if nz.size == 0:
                assert rec["histogram"] == {"edges": [], "counts": []}
                continue
            assert rec["histogram"]["counts"] == counts[nz[0] : nz[-1] + 1].tolist()
            assert len(rec["histogram"]["edges"]) == len(rec["histogram"]["counts"]) + 1
            if values.size:
                assert rec["mean_activation"] == pytest.approx(values.mean(), rel=1e-5)


def test_quantile_examples_lie_in_their_quantile(dash, brute):
    """Each group's count, CDF range and examples agree with the brute-force firing values.

    The store's activations come from batched forward passes, the brute force from one
    ``capture`` per document: they agree to ~1e-7, so a value within TOL of a group edge may
    fall on either side.
    """
    tol = 1e-6
    n_examples = 0
    for layer in range(dash.n_layers):
        for f in range(dash.d_transcoder):
            rec = dash.feature(layer, f)
            values = np.array([r[0] for r in _firings(brute, layer, f)])
            assert sum(q["count"] for q in rec["quantiles"]) == values.size
            for q in rec["quantiles"]:
                lo, hi = q["range"]
                hi = np.inf if hi is None else hi
                strict = ((values >= lo + tol) & (values < hi - tol)).sum()
                loose = ((values >= lo - tol) & (values < hi + tol)).sum()
                assert strict <= q["count"] <= loose
                below = values.size * q["cdf"][0]
                assert (values < lo - tol).sum() <= round(below) <= (values < lo + tol).sum()
                assert q["cdf"][1] - q["cdf"][0] == pytest.approx(q["count"] / values.size)
                assert len(q["examples"]) == min(CFG["examples_per_quantile"], q["count"])
                for ex in q["examples"]:
                    v = np.float32(ex["value"])  # JSON holds float32 reprs
                    assert np.float32(lo) <= v and v < np.float32(hi)
                    _check_example(ex, brute, layer, f, CFG)
                    n_examples += 1
    assert n_examples > 100


def test_quantile_bins_snap_to_the_nearest_edge():
    hist = np.array([[10, 10, 10, 10, 10, 10], [0, 0, 60, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    bounds = stats.quantile_bins(hist, 3)
    assert bounds[0].tolist() == [0, 2, 4, 6]
    assert bounds[1].tolist() == [0, 0, 3, 6]  # one bin holds everything: one non-empty group
    assert bounds[2].tolist() == [0, 0, 0, 6]
    assert (np.diff(bounds, axis=1) >= 0).all()


def test_streaming_state_does_not_depend_on_batching():
    rng = np.random.default_rng(0)
    F, n = 7, 400
    cfg = D.DashboardConfig(top_k=4, examples_per_quantile=3, hist_bins=6, hist_min=0.1, hist_max=10.0)
    tids = np.arange(n, dtype=np.int64) * 3
    feats = rng.integers(0, F, n)
    vals = np.round(rng.exponential(1.0, n), 1).astype(np.float32) + np.float32(0.05)  # many ties
    inner = cfg.hist_edges()[1:-1]
    states = []
    for cuts in ([n], [13, 200, 201, 390, n], list(range(1, n + 1))):
        st, start = stats.LayerState(F, cfg), 0
        for end in cuts:
            stats.update_layer(st, 0, tids[start:end], feats[start:end], vals[start:end], inner, seed=1)
            start = end
        states.append(st)
    for st in states[1:]:
        for name in stats.LayerState.NAMES:
            np.testing.assert_array_equal(getattr(st, name), getattr(states[0], name))
    st = states[0]
    for f in range(F):  # top-k: (value desc, id asc)
        order = sorted(np.nonzero(feats == f)[0], key=lambda i: (-vals[i], tids[i]))[: cfg.top_k]
        assert st.top_id[f, : len(order)].tolist() == tids[order].tolist()


def _splitmix64(tid: int, layer: int, feature: int, seed: int) -> int:
    """The reservoirs' hash key, in Python's unbounded integers taken mod 2**64."""
    m1, m2, gold, mask = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15, (1 << 64) - 1
    x = (tid * gold) & mask
    x ^= ((feature + (layer << 32)) * m2) & mask
    x ^= (seed * m1 + gold) & mask
    x ^= x >> 30
    x = (x * m1) & mask
    x ^= x >> 27
    x = (x * m2) & mask
    return x ^ (x >> 31)


def test_hash_keys_order_as_the_unsigned_hash():
    rng = np.random.default_rng(3)
    tids = np.concatenate([rng.integers(0, 1 << 62, 500), [0, 1, (1 << 62) - 1]]).astype(np.int64)
    feats = rng.integers(0, 1 << 17, tids.size).astype(np.int64)
    for layer, seed in [(0, 0), (5, 1), (25, 123456789)]:
        keys = stats.hash_keys(torch.from_numpy(tids), layer, torch.from_numpy(feats), seed).numpy()
        want = [_splitmix64(int(t), layer, int(f), seed) for t, f in zip(tids, feats)]
        assert (keys.view(np.uint64) ^ np.uint64(1 << 63)).tolist() == want  # the hash, sign bit flipped
        assert np.argsort(keys, kind="stable").tolist() == sorted(range(tids.size), key=want.__getitem__)


def _brute_state(F, cfg, layer, tids, feats, vals, seed):
    """The statistics of a whole stream computed directly from its definition."""
    H, K, M = cfg.n_bins, cfg.top_k, cfg.examples_per_quantile
    bins = np.searchsorted(cfg.hist_edges()[1:-1], vals.astype(np.float64), side="right")
    out = {
        "count": np.bincount(feats, minlength=F),
        "sum": np.bincount(feats, weights=vals.astype(np.float64), minlength=F),
        "hist": np.bincount(feats * H + bins, minlength=F * H).reshape(F, H),
        "top_val": np.full((F, K), -np.inf, dtype=np.float32),
        "top_id": np.full((F, K), -1, dtype=np.int64),
        "res_id": np.full((F * H, M), -1, dtype=np.int64),
        "res_val": np.zeros((F * H, M), dtype=np.float32),
    }
    for f in range(F):
        best = sorted(np.nonzero(feats == f)[0], key=lambda i: (-vals[i], tids[i]))[:K]
        out["top_val"][f, : len(best)] = vals[best]
        out["top_id"][f, : len(best)] = tids[best]
        for b in range(H):
            members = np.nonzero((feats == f) & (bins == b))[0]
            sample = sorted(members, key=lambda i: _splitmix64(int(tids[i]), layer, f, seed))[:M]
            out["res_id"][f * H + b, : len(sample)] = tids[sample]
            out["res_val"][f * H + b, : len(sample)] = vals[sample]
    return out


@pytest.mark.parametrize("ordered", [True, False])
def test_streaming_state_equals_brute_force(ordered):
    """Batched updates (token ids in stream order, or shuffled within each batch) give exactly
    the statistics computed from their definition, and a checkpointed state resumes exactly."""
    rng = np.random.default_rng(1 + ordered)
    F, n, layer, seed = 5, 600, 3, 11
    cfg = D.DashboardConfig(top_k=6, examples_per_quantile=3, hist_bins=4, hist_min=0.1, hist_max=10.0)
    tids = np.sort(rng.choice(1 << 40, n, replace=False)).astype(np.int64)
    feats = rng.integers(0, F, n)
    vals = (np.round(rng.exponential(1.0, n), 1) + 0.05).astype(np.float32)  # many ties
    inner = cfg.hist_edges()[1:-1]
    cuts = [0, 1, 40, 41, 200, 350, 351, 599, n]
    st = stats.LayerState(F, cfg)
    for i, (start, end) in enumerate(zip(cuts[:-1], cuts[1:])):
        batch = np.arange(start, end) if ordered else rng.permutation(np.arange(start, end))
        stats.update_layer(st, layer, tids[batch], feats[batch], vals[batch], inner, seed)
        if i == 4:  # through a checkpoint's arrays and back
            st = stats.LayerState(F, cfg, {k: v.copy() for k, v in st.arrays().items()})
    want = _brute_state(F, cfg, layer, tids, feats, vals, seed)
    got = st.arrays()
    for name in stats.LayerState.NAMES:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_firing_entries_are_the_positive_activations_row_major(dtype):
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(50, 300, generator=g)
    acts = (pre * (pre > 1.5)).to(dtype)
    acts[3, 5], acts[7, 0] = -1.0, -0.5  # negative activations do not fire
    rows, feats, vals = compute.firing_entries(acts)
    want_rows, want_feats = (acts > 0).nonzero(as_tuple=True)
    assert rows.tolist() == want_rows.tolist() and feats.tolist() == want_feats.tolist()
    assert vals.dtype == torch.float32
    assert vals.tolist() == acts[want_rows, want_feats].float().tolist()
    assert [x.numel() for x in compute.firing_entries(torch.zeros(4, 6, dtype=dtype))] == [0, 0, 0]


# ----------------------------------------------------------------------------- logits, labels
def test_top_logits_equal_direct_matrix_product(dash, model, plt_dir):
    W_U = model.W_U.detach().float()
    for layer in range(dash.n_layers):
        W_dec = load_file(str(Path(plt_dir) / f"layer_{layer}.safetensors"))["W_dec"].float()
        logits = W_dec @ W_U
        for f in range(dash.d_transcoder):
            rec = dash.feature(layer, f)["logits"]
            top = torch.sort(logits[f], descending=True)
            assert [e["token_id"] for e in rec["top"]] == top.indices[: CFG["n_logits"]].tolist()
            np.testing.assert_allclose(
                [e["value"] for e in rec["top"]], top.values[: CFG["n_logits"]], rtol=1e-5, atol=1e-6
            )
            bottom = torch.sort(logits[f])
            assert [e["token_id"] for e in rec["bottom"]] == bottom.indices[: CFG["n_logits"]].tolist()
            assert rec["top"][0]["token"] == model.tokenizer.decode([rec["top"][0]["token_id"]])
            assert "per_output_layer" not in rec


def test_clt_logits_per_output_layer(tiny_gpt2_dir, clt_dir, corpus, tmp_path):
    clt = ReplacementModel.from_pretrained(tiny_gpt2_dir, clt_dir)
    out = D.compute_dashboards(clt, corpus[:8], tmp_path / "clt.zarr", D.DashboardConfig(**CFG), progress=False)
    dash = D.Dashboards.open(out)
    W_U = clt.W_U.detach().float()
    L = dash.n_layers
    for layer in range(L):
        W_dec = load_file(str(Path(clt_dir) / f"W_dec_{layer}.safetensors"))[f"W_dec_{layer}"].float()
        for f in range(0, dash.d_transcoder, 7):
            rec = dash.feature(layer, f)["logits"]
            assert [p["layer"] for p in rec["per_output_layer"]] == list(range(layer, L))
            for p in rec["per_output_layer"]:
                direct = W_dec[f, p["layer"] - layer] @ W_U
                assert [e["token_id"] for e in p["top"]] == direct.topk(CFG["n_logits"]).indices.tolist()
            total = W_dec[f].sum(0) @ W_U
            np.testing.assert_allclose(
                [e["value"] for e in rec["top"]], total.topk(CFG["n_logits"]).values, rtol=1e-5, atol=1e-6
            )


def test_labels_name_top_tokens_and_logits_and_feed_export(dash):
    from pipeline.analysis.export import load_labels

    labels = dash.labels()
    assert len(labels) == dash.n_layers * dash.d_transcoder
    for layer, f in [(0, 0), (1, 5), (1, 63)]:
        rec = dash.feature(layer, f)
        assert labels[(layer, f)] == rec["label"]
        ins, outs = rec["label"].split(" → ")
        assert outs.split("/")[0] == rec["logits"]["top"][0]["token"].strip()
        if rec["top_examples"]:
            tops = [e["tokens"][e["max_index"]] for e in rec["top_examples"]]
            assert ins.split("/")[0] in tops
    _, by_feature = load_labels(labels)
    assert by_feature[(1, 5)] == labels[(1, 5)]
    assert auto_label([], ["x"]) == "(dead) → x"
    assert auto_label(["a", "b", "b"], [" y ", "y", "z"]) == "b/a → y/z"


# ----------------------------------------------------------------------------- viewer JSON
def test_export_feature_json_writes_only_the_graph_features(dash, tmp_path):
    graph = {
        "nodes": [
            {"node_id": "1_5_3", "feature_type": "cross layer transcoder"},
            {"node_id": "0_7_2", "feature_type": "cross layer transcoder"},
            {"node_id": "1_5_4", "feature_type": "cross layer transcoder"},
            {"node_id": "0_1_2", "feature_type": "mlp reconstruction error"},
            {"node_id": "E_4_0", "feature_type": "embedding"},
        ]
    }
    paths = D.export_feature_json(dash, graph, tmp_path)
    assert [p.name for p in paths] == ["0_7.json", "1_5.json"]
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["0_7.json", "1_5.json"]
    first = paths[1].read_bytes()
    assert json.loads(first) == dash.feature(1, 5)
    D.export_feature_json(dash, [(1, 5)], tmp_path)
    assert paths[1].read_bytes() == first
    assert D.feature_json_bytes(D.Dashboards.open(dash.path).feature(1, 5)) == first


# ----------------------------------------------------------------------------- resume
def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where, nth", [("update_layer", 5), ("decoder_logits", 2), ("write_store", 1)])
def test_interrupt_and_resume_gives_identical_store(model, corpus, store, tmp_path, monkeypatch, where, nth):
    out = tmp_path / "plt.zarr"
    real = getattr(compute, where)
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compute, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        D.compute_dashboards(model, corpus, out, D.DashboardConfig(**CFG), progress=False)
    assert not out.exists()
    assert (tmp_path / ".plt.zarr.partial" / "state.bin").exists()
    monkeypatch.setattr(compute, where, real)

    updates = {"n": 0}
    real_update = compute.update_layer

    def counting(*args, **kwargs):
        updates["n"] += 1
        return real_update(*args, **kwargs)

    monkeypatch.setattr(compute, "update_layer", counting)
    D.compute_dashboards(model, corpus, out, D.DashboardConfig(**CFG), progress=False)
    n_batches = D.Dashboards.open(out).meta["n_batches"]
    # resumed, not restarted: the 5th layer update is batch 3's first, batches 1-2 were checkpointed
    assert updates["n"] == (model.n_layers * (n_batches - 2) if where == "update_layer" else 0)
    assert _files(out) == _files(store)
    assert not (tmp_path / ".plt.zarr.partial").exists()


def test_resume_after_the_corpus_changed_starts_over(model, corpus, tmp_path, monkeypatch):
    out = tmp_path / "plt.zarr"
    real = compute.update_layer
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compute, "update_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        D.compute_dashboards(model, corpus, out, D.DashboardConfig(**CFG), progress=False)
    calls["n"] = -(10**9)
    changed = ["texas austin dallas"] + corpus[1:]
    D.compute_dashboards(model, changed, out, D.DashboardConfig(**CFG), progress=False)
    dash = D.Dashboards.open(out)
    assert calls["n"] == -(10**9) + model.n_layers * dash.meta["n_batches"]  # every batch again
    assert dash.n_tokens == sum(model.tokenize(t).numel() - 1 for t in changed)


def test_a_corpus_that_changes_between_passes_is_an_error(model, corpus, tmp_path):
    reads = {"n": 0}

    def unstable():
        reads["n"] += 1
        return iter(corpus if reads["n"] == 1 else corpus[::-1])

    with pytest.raises(RuntimeError, match="corpus changed"):
        D.compute_dashboards(model, unstable, tmp_path / "u.zarr", D.DashboardConfig(**CFG), progress=False)


def test_existing_output_is_refused_unless_overwrite(model, corpus, store, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite"):
        D.compute_dashboards(model, corpus, store, D.DashboardConfig(**CFG), progress=False)
    other = tmp_path / "not_a_store"
    other.mkdir()
    with pytest.raises(ValueError, match="not a dashboards store"):
        D.compute_dashboards(model, corpus, other, D.DashboardConfig(**CFG), progress=False, overwrite=True)


# ----------------------------------------------------------------------------- corpora
def test_long_documents_are_split_into_bos_first_sequences(model, tiny_gpt2_dir):
    words = testing.vocabulary_words(tiny_gpt2_dir)
    doc = " ".join(words[i % len(words)] for i in range(70))
    seqs = list(sequences(model, lambda: iter([doc, "", doc[:20]]), 16, None))
    full = model.bridge.to_tokens(doc, truncate=False)[0].numpy()
    bos = full[0]
    body = [s for s in seqs if s.doc == 0]
    assert all(s.tokens[0] == bos and s.tokens.size <= 16 for s in seqs)
    assert np.concatenate([s.tokens[1:] for s in body]).tolist() == full[1:].tolist()
    assert [s.start for s in body] == list(range(0, 70, 15))
    assert [s.doc for s in seqs][-1] == 2 and [s.seq_id for s in seqs] == list(range(len(seqs)))
    capped = list(sequences(model, lambda: iter([doc]), 16, 20))
    assert sum(s.tokens.size - 1 for s in capped) == 20


def test_read_corpus_txt_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("the capital\n\n  \nof texas\n", encoding="utf-8")
    assert list(D.read_corpus(txt)) == ["the capital", "of texas"]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "a b"}\n{"text": "c", "x": 1}\n', encoding="utf-8")
    assert list(D.read_corpus(jl)) == ["a b", "c"]
    assert D.read_corpus(jl).fingerprint() != D.read_corpus(txt).fingerprint()


def test_organism_corpus_is_the_worlds_corpus(tmp_path):
    from pipeline.organism.world import make_world

    world = make_world()
    path = tmp_path / "world.json"
    path.write_text(json.dumps({"config": world.config.to_dict()}), encoding="utf-8")
    assert D.organism_corpus(path, 50) == world.corpus(50)
    assert D.organism_corpus({"config": world.config.to_dict()}, 5, seed=3) == world.corpus(5, seed=3)


# ----------------------------------------------------------------------------- bad input
def test_empty_corpus_is_a_clear_error(model, tmp_path):
    with pytest.raises(ValueError, match="no tokens"):
        D.compute_dashboards(model, [], tmp_path / "a.zarr", D.DashboardConfig(**CFG), progress=False)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no tokens"):
        D.compute_dashboards(model, D.read_corpus(blank), tmp_path / "b.zarr", D.DashboardConfig(**CFG), progress=False)


def test_binary_corpus_file_is_a_clear_error(model, tmp_path):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not a text file"):
        D.read_corpus(binary)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        D.read_corpus(latin)
    late = tmp_path / "late.txt"  # bad bytes after the sniffed prefix
    late.write_bytes(b"the capital\n" * 7000 + b"\xff\xfe\n")
    with pytest.raises(ValueError, match="line 7001 is not UTF-8"):
        list(D.read_corpus(late))
    bad_json = tmp_path / "c.jsonl"
    bad_json.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 has no string field 'text'"):
        list(D.read_corpus(bad_json))
    with pytest.raises(FileNotFoundError):
        D.read_corpus(tmp_path / "missing.txt")


def test_one_shot_iterator_corpus_is_refused(model, corpus, tmp_path):
    with pytest.raises(ValueError, match="one-shot iterator"):
        D.compute_dashboards(model, (t for t in corpus), tmp_path / "g.zarr", progress=False)
    with pytest.raises(TypeError, match="not one string"):
        D.compute_dashboards(model, "the capital of texas", tmp_path / "s.zarr", progress=False)


def test_feature_out_of_range_is_a_clear_error(dash, tmp_path):
    for layer, f in [(0, 64), (0, -1), (2, 0), (-1, 3)]:
        with pytest.raises(ValueError, match="out of range"):
            dash.feature(layer, f)
    with pytest.raises(ValueError, match="out of range"):
        D.export_feature_json(dash, [(0, 99)], tmp_path)
    with pytest.raises(ValueError, match="integer"):
        dash.feature(0, 1.5)
    with pytest.raises(ValueError, match="not a dashboards store"):
        D.Dashboards.open(tmp_path)
    with pytest.raises(FileNotFoundError):
        D.Dashboards.open(tmp_path / "nowhere.zarr")


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="top_k"):
        D.DashboardConfig(top_k=0)
    with pytest.raises(ValueError, match="hist_min"):
        D.DashboardConfig(hist_min=10.0, hist_max=1.0)
    with pytest.raises(ValueError, match="unknown"):
        D.DashboardConfig.from_dict({"topk": 3})


def test_hf_dataset_corpus_errors_are_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        D.hf_dataset_corpus("wikitext")
    fake = types.ModuleType("datasets")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    fake.load_dataset = unreachable
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(OSError, match="hub reachable"):
        D.hf_dataset_corpus("wikitext", "train")
    fake.load_dataset = lambda *a, **k: [{"text": "the capital"}, {"title": "x"}]
    corpus = D.hf_dataset_corpus("local", "train")
    with pytest.raises(ValueError, match="record 1 has no string field"):
        list(corpus)


# ----------------------------------------------------------------------------- CLI
def test_cli_features_smoke(tiny_gpt2_dir, plt_dir, corpus, tmp_path, capsys):
    from pipeline.run.cli import main

    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus[:10]) + "\n", encoding="utf-8")
    out = tmp_path / "dash.zarr"
    rc = main(
        [
            "-q",
            "features",
            "--model",
            str(tiny_gpt2_dir),
            "--transcoders",
            str(plt_dir),
            "--corpus",
            str(path),
            "--out",
            str(out),
            "--top-k",
            "3",
            "--max-tokens",
            "40",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    dash = D.Dashboards.open(out)
    assert dash.n_tokens == 40 and dash.config.top_k == 3
    assert str(out) in capsys.readouterr().out
    rc = main(
        [
            "-q",
            "features",
            "--model",
            str(tiny_gpt2_dir),
            "--transcoders",
            str(plt_dir),
            "--corpus",
            str(tmp_path / "missing.txt"),
            "--out",
            str(tmp_path / "x.zarr"),
        ]
    )
    assert rc == 2
    assert "missing.txt" in capsys.readouterr().err


def test_a_damaged_chunk_is_an_error_naming_the_array(store, tmp_path):
    """Every array carries a CRC32C checksum: one flipped byte in layer 0's chunks fails the
    read of a layer-0 feature, naming the store and the array, where it read wrong numbers."""
    copy = tmp_path / "plt.zarr"
    shutil.copytree(store, copy)
    D.Dashboards.open(copy).feature(0, 0)  # intact: reads
    damaged = []
    for f in sorted(copy.rglob("0.*")):
        if f.is_file() and f.stat().st_size > 16:
            data = bytearray(f.read_bytes())
            data[8] ^= 0xFF
            f.write_bytes(bytes(data))
            damaged.append(f)
    assert damaged, "no layer-0 chunk file found: the test checks nothing"
    with pytest.raises(ValueError, match=r"dashboards array '.+' is damaged .*checksum"):
        D.Dashboards.open(copy).feature(0, 0)
