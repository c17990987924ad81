"""Transcoder loading, writing and maths: circuit-tracer's on-disk formats, lazy decoders,
hub resolution and one-line errors for every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline import testing
from pipeline.transcoders import (
    SUPPORTED_HOOKS,
    CrossLayerTranscoder,
    TranscoderConfigError,
    Transcoders,
    TranscoderSet,
    load_transcoders,
    save_cross_layer_transcoder,
    save_transcoder_set,
)
from pipeline.transcoders.config import TranscoderSourceError
from pipeline.transcoders.lazy import TensorFile

HOOKS = dict(feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out")


# ------------------------------------------------------------------------------ helpers
def random_layers(activation="relu", *, skip=False, n_layers=2, d_model=8, d_transcoder=12, seed=0, top_k=3):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        layer = {
            "W_enc": torch.randn(d_transcoder, d_model, generator=g),
            "W_dec": torch.randn(d_transcoder, d_model, generator=g),
            "b_enc": torch.randn(d_transcoder, generator=g) - 0.5,
            "b_dec": torch.randn(d_model, generator=g),
        }
        if activation == "jump_relu":
            layer["threshold"] = torch.rand(d_transcoder, generator=g)
        if activation == "topk":
            layer["top_k"] = top_k
        if skip:
            layer["W_skip"] = torch.randn(d_model, d_model, generator=g)
        layers.append(layer)
    return layers


def direct_activations(layer, x, activation):
    pre = x @ layer["W_enc"].T + layer["b_enc"]
    if activation == "relu":
        return pre.clamp(min=0)
    if activation == "jump_relu":
        return torch.where(pre > layer["threshold"], pre, torch.zeros_like(pre))
    keep = pre.topk(layer["top_k"], dim=-1).indices
    out = torch.zeros_like(pre)
    out.scatter_(-1, keep, pre.gather(-1, keep))
    return out.clamp(min=0)


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def rewrite_config(directory: Path, **changes) -> None:
    path = directory / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("lazy", [True, False])
@pytest.mark.parametrize(
    "activation,skip,gemmascope",
    [
        ("relu", False, False),
        ("jump_relu", True, False),
        ("topk", False, False),
        ("jump_relu", False, True),
        ("relu", True, True),
    ],
)
def test_saved_transcoder_set_loads_back_the_same_weights(tmp_path, activation, skip, gemmascope, lazy):
    layers = random_layers(activation, skip=skip)
    path = save_transcoder_set(tmp_path / "tc", layers, gemmascope=gemmascope, scan="toy", model_name="tiny", **HOOKS)
    tc = load_transcoders(path, lazy_decoder=lazy)
    assert isinstance(tc, TranscoderSet) and isinstance(tc, Transcoders)
    assert (tc.kind, tc.n_layers, tc.d_model, tc.d_transcoder) == ("transcoder_set", 2, 8, 12)
    assert (tc.scan, tc.model_name, tc.activation) == ("toy", "tiny", activation)
    assert tc.has_skip == skip
    all_features = torch.arange(12)
    x = torch.randn(5, 8)
    for layer, weights in enumerate(layers):
        torch.testing.assert_close(tc.encoder_vectors(layer, all_features), weights["W_enc"])
        torch.testing.assert_close(tc.encoder_bias(layer, all_features), weights["b_enc"])
        torch.testing.assert_close(tc.decoder_bias(layer), weights["b_dec"])
        torch.testing.assert_close(tc.decoder_vectors(layer, all_features), weights["W_dec"][:, None, :])
        assert tc.output_layers(layer) == range(layer, layer + 1)
        if activation == "jump_relu":
            torch.testing.assert_close(tc.threshold(layer), weights["threshold"])
        if skip:
            torch.testing.assert_close(tc.skip(layer, x), x @ weights["W_skip"].T)
        else:
            assert tc.skip(layer, x) is None


def test_saved_cross_layer_transcoder_loads_back_the_same_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    n_layers, d_model, d_t = 3, 6, 10
    encoders = [
        {
            "W_enc": torch.randn(d_t, d_model, generator=g),
            "b_enc": torch.randn(d_t, generator=g),
            "b_dec": torch.randn(d_model, generator=g),
            "threshold": torch.rand(d_t, generator=g),
        }
        for _ in range(n_layers)
    ]
    decoders = [torch.randn(d_t, n_layers - i, d_model, generator=g) for i in range(n_layers)]
    path = save_cross_layer_transcoder(tmp_path / "clt", encoders, decoders, **HOOKS)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["config.yaml"] + [f"W_enc_{i}.safetensors" for i in range(3)] + [f"W_dec_{i}.safetensors" for i in range(3)]
    )
    assert set(load_file(path / "W_enc_1.safetensors")) == {"W_enc_1", "b_enc_1", "b_dec_1", "threshold_1"}
    tc = load_transcoders(path)
    assert isinstance(tc, CrossLayerTranscoder) and tc.activation == "jump_relu"
    assert (tc.n_layers, tc.d_model, tc.d_transcoder) == (3, 6, 10)
    feats = torch.tensor([7, 2, 7])
    for i in range(n_layers):
        assert tc.output_layers(i) == range(i, n_layers)
        torch.testing.assert_close(tc.decoder_vectors(i, feats), decoders[i][feats])
        torch.testing.assert_close(tc.encoder_vectors(i, feats), encoders[i]["W_enc"][feats])
        torch.testing.assert_close(tc.threshold(i), encoders[i]["threshold"])
        torch.testing.assert_close(tc.decoder_bias(i), encoders[i]["b_dec"])


def test_writers_are_deterministic_and_replace_atomically(tmp_path):
    a = testing.make_random_plt(
        tmp_path / "a", n_layers=2, d_model=8, d_transcoder=16, activation="jump_relu", skip=True
    )
    b = testing.make_random_plt(
        tmp_path / "b", n_layers=2, d_model=8, d_transcoder=16, activation="jump_relu", skip=True
    )
    assert tree_digest(a) == tree_digest(b)
    g1 = testing.make_random_plt(tmp_path / "g1", n_layers=1, d_model=8, d_transcoder=16, gemmascope=True)
    g2 = testing.make_random_plt(tmp_path / "g2", n_layers=1, d_model=8, d_transcoder=16, gemmascope=True)
    assert tree_digest(g1) == tree_digest(g2)
    c1 = testing.make_random_clt(tmp_path / "c1", n_layers=2, d_model=8, d_transcoder=16)
    c2 = testing.make_random_clt(tmp_path / "c2", n_layers=2, d_model=8, d_transcoder=16)
    assert tree_digest(c1) == tree_digest(c2)
    # overwrite a, with a different seed: new content, no temporary leftovers
    (a / "stale.txt").write_text("old")
    testing.make_random_plt(a, n_layers=2, d_model=8, d_transcoder=16, seed=5)
    assert not (a / "stale.txt").exists()
    assert tree_digest(a) != tree_digest(b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c1", "c2", "g1", "g2"]


# ---------------------------------------------------------------------------------- maths
@pytest.mark.parametrize("activation", ["relu", "jump_relu", "topk"])
def test_activations_equal_a_direct_computation(tmp_path, activation):
    layers = random_layers(activation, d_model=8, d_transcoder=12)
    tc = load_transcoders(save_transcoder_set(tmp_path / "tc", layers, **HOOKS))
    x = torch.randn(3, 7, 8)  # any leading dims
    for layer, weights in enumerate(layers):
        pre = tc.encode(layer, x)
        torch.testing.assert_close(pre, x @ weights["W_enc"].T + weights["b_enc"])
        acts = tc.activations(layer, x)
        torch.testing.assert_close(acts, direct_activations(weights, x, activation))
        assert bool((acts >= 0).all())
        if activation == "topk":
            assert int((acts != 0).sum(-1).max()) <= weights["top_k"]


def test_plt_reconstruct_reads_only_active_rows_and_matches_dense(plt_skip_dir, monkeypatch):
    tc = load_transcoders(plt_skip_dir)
    dense = load_transcoders(plt_skip_dir, lazy_decoder=False)
    requested: list[np.ndarray] = []
    original = TensorFile.rows

    def spy(self, name, index, sub=None):
        requested.append(np.asarray(index).copy())
        return original(self, name, index, sub)

    monkeypatch.setattr(TensorFile, "rows", spy)
    x = torch.nn.functional.layer_norm(torch.randn(6, tc.d_model), (tc.d_model,))
    acts = [tc.activations(layer, x) for layer in range(tc.n_layers)]
    for layer in range(tc.n_layers):
        requested.clear()
        y = tc.reconstruct(layer, acts, x)
        W_dec = dense.decoder_vectors(layer, torch.arange(tc.d_transcoder))[:, 0]
        W_skip = dense.layers[layer].W_skip
        expected = acts[layer] @ W_dec + dense.decoder_bias(layer) + x @ W_skip.T
        torch.testing.assert_close(y, expected)
        active = set(torch.nonzero(acts[layer].any(0)).flatten().tolist())
        assert active and len(active) < tc.d_transcoder
        assert set(np.concatenate(requested).tolist()) == active
    for layer, y in enumerate(tc.reconstruct_all(acts, [x] * tc.n_layers)):
        torch.testing.assert_close(y, tc.reconstruct(layer, acts, x))
    with pytest.raises(ValueError, match="skip connection"):
        tc.reconstruct(0, acts)


@pytest.mark.parametrize("fixture", ["plt_dir", "clt_dir", "gemmascope_dir"])
def test_no_active_features_and_empty_requests(fixture, request):
    tc = load_transcoders(request.getfixturevalue(fixture))
    zeros = [torch.zeros(3, tc.d_transcoder) for _ in range(tc.n_layers)]
    for layer in range(tc.n_layers):
        torch.testing.assert_close(tc.reconstruct(layer, zeros), tc.decoder_bias(layer).expand(3, -1))
        empty = tc.decoder_vectors(layer, torch.zeros(0, dtype=torch.long))
        assert empty.shape == (0, len(tc.output_layers(layer)), tc.d_model)
        assert tc.encoder_vectors(layer, torch.zeros(0, dtype=torch.long)).shape == (0, tc.d_model)
    with pytest.raises(IndexError):
        tc.decoder_vectors(0, torch.tensor([tc.d_transcoder]))
    with pytest.raises(IndexError):
        tc.encoder_vectors(0, torch.tensor([-1]))
    with pytest.raises(IndexError):
        tc.encode(tc.n_layers, torch.zeros(1, tc.d_model))


def test_clt_reconstruct_equals_dense_computation(clt_dir):
    tc = load_transcoders(clt_dir)
    dense = load_transcoders(clt_dir, lazy_decoder=False)
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.nn.functional.layer_norm(torch.randn(5, tc.d_model, generator=g), (tc.d_model,))
        for _ in range(tc.n_layers)
    ]
    acts = [tc.activations(layer, xs[layer]) for layer in range(tc.n_layers)]
    assert all(bool((a > 0).any()) for a in acts)
    all_features = torch.arange(tc.d_transcoder)
    W_dec = [dense.decoder_vectors(layer, all_features) for layer in range(tc.n_layers)]
    batch = tc.reconstruct_all(acts)
    for out in range(tc.n_layers):
        expected = dense.decoder_bias(out) + sum(acts[src] @ W_dec[src][:, out - src] for src in range(out + 1))
        torch.testing.assert_close(tc.reconstruct(out, acts), expected)
        torch.testing.assert_close(batch[out], expected)
        torch.testing.assert_close(dense.reconstruct(out, acts), expected)


def test_reconstruct_is_differentiable_in_the_activations(plt_dir):
    tc = load_transcoders(plt_dir)
    x = torch.nn.functional.layer_norm(torch.randn(4, tc.d_model), (tc.d_model,))
    acts = [tc.activations(layer, x).requires_grad_(True) for layer in range(tc.n_layers)]
    tc.reconstruct(1, acts).sum().backward()
    assert acts[1].grad is not None and bool(acts[1].grad.abs().sum() > 0)


def test_random_fixture_density_is_calibrated(tmp_path):
    x = torch.nn.functional.layer_norm(torch.randn(2000, 32), (32,))
    for activation in ("relu", "jump_relu", "topk"):
        tc = load_transcoders(
            testing.make_random_plt(
                tmp_path / activation, n_layers=1, d_model=32, d_transcoder=256, activation=activation, density=0.05
            )
        )
        density = float((tc.activations(0, x) > 0).float().mean())
        assert 0.03 < density < 0.07, (activation, density)


# ----------------------------------------------------------------------------- formats
def test_gemmascope_npz_with_transposed_encoder(gemmascope_dir):
    files = sorted(p.relative_to(gemmascope_dir).as_posix() for p in gemmascope_dir.rglob("*.npz"))
    assert files == ["layer_0/params.npz", "layer_1/params.npz"]
    with np.load(gemmascope_dir / "layer_0" / "params.npz") as npz:
        raw = {key: torch.from_numpy(npz[key]) for key in npz.files}
    assert set(raw) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    assert raw["W_enc"].shape == (16, 64)  # (d_model, d_transcoder), GemmaScope's orientation
    tc = load_transcoders(gemmascope_dir)
    assert tc.activation == "jump_relu" and (tc.d_model, tc.d_transcoder) == (16, 64)
    assert tc.layers[0].decoder.lazy
    feats = torch.tensor([5, 0, 63])
    torch.testing.assert_close(tc.encoder_vectors(0, feats), raw["W_enc"].T[feats])
    torch.testing.assert_close(tc.decoder_vectors(0, feats)[:, 0], raw["W_dec"][feats])
    x = torch.randn(4, 16)
    pre = x @ raw["W_enc"] + raw["b_enc"]
    torch.testing.assert_close(tc.activations(0, x), pre * (pre > raw["threshold"]))


def test_square_gemmascope_safetensors_and_gemmascope2_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    d = 8  # d_model == d_transcoder: orientation comes from the key names
    W_enc_stored = torch.randn(d, d, generator=g)  # (d_model, d_transcoder)
    common = {
        "W_dec": torch.randn(d, d, generator=g),
        "b_enc": torch.zeros(d),
        "b_dec": torch.randn(d, generator=g),
        "threshold": torch.full((d,), 0.1),
    }
    save_file({"W_enc": W_enc_stored, **common}, str(tmp_path / "gs.safetensors"))
    affine = torch.randn(d, d, generator=g)  # (d_in, d_out)
    save_file(
        {
            "w_enc": W_enc_stored,
            "w_dec": common["W_dec"],
            "b_enc": common["b_enc"],
            "b_dec": common["b_dec"],
            "threshold": common["threshold"],
            "affine_skip_connection": affine,
        },
        str(tmp_path / "gs2.safetensors"),
    )
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"model_kind": "transcoder_set", **HOOKS, "transcoders": ["gs.safetensors", "gs2.safetensors"]})
    )
    tc = load_transcoders(tmp_path)
    x = torch.randn(3, d, generator=g)
    for layer in range(2):
        torch.testing.assert_close(tc.encode(layer, x), x @ W_enc_stored + common["b_enc"])
    torch.testing.assert_close(tc.skip(1, x), x @ affine)
    assert tc.skip(0, x) is None


def test_circuit_tracer_layouts_load_unchanged(tmp_path):
    # no 'transcoders' key: circuit-tracer's cache layout layer_{i}.safetensors; k stored in
    # the file marks TopK (what circuit-tracer's to_safetensors writes for a TopK layer)
    layers = random_layers("relu", d_model=8, d_transcoder=12)
    for i, layer in enumerate(layers):
        save_file({**layer, "k": torch.tensor(4)}, str(tmp_path / f"layer_{i}.safetensors"))
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"model_name": "tiny", "model_kind": "transcoder_set", "scan": ["a", "b"], **HOOKS})
    )
    tc = load_transcoders(tmp_path)
    assert (tc.n_layers, tc.activation, tc.top_k(0), tc.scan) == (2, "topk", 4, "a")
    # config activation: relu wins over a stored threshold, as in circuit-tracer
    layers = random_layers("jump_relu", d_model=8, d_transcoder=12)
    path = save_transcoder_set(tmp_path / "jr", layers, **HOOKS)
    rewrite_config(path, activation="relu")
    tc = load_transcoders(path)
    x = torch.randn(3, 8)
    assert tc.activation == "relu" and tc.threshold(0) is None
    torch.testing.assert_close(tc.activations(0, x), direct_activations(layers[0], x, "relu"))


def test_bf16_decoder_rows_are_read_lazily(tmp_path):
    layers = random_layers("relu", d_model=8, d_transcoder=12, n_layers=1)
    bf16 = [{k: v.to(torch.bfloat16) for k, v in layers[0].items()}]
    save_file(bf16[0], str(tmp_path / "layer_0.safetensors"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model_kind": "transcoder_set", **HOOKS}))
    tc = load_transcoders(tmp_path, dtype=torch.float32)
    feats = torch.tensor([11, 3])
    torch.testing.assert_close(tc.decoder_vectors(0, feats)[:, 0], bf16[0]["W_dec"][feats].float())
    assert tc.decoder_vectors(0, feats).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(50, 7), (50, 1, 7), (50, 6, 7)])
def test_row_reader_equals_indexing_the_dense_tensor(tmp_path, shape, dtype):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(*shape, generator=g).to(dtype)
    save_file({"x": dense, "other": torch.zeros(3)}, str(tmp_path / "f.safetensors"))
    tf = TensorFile(tmp_path / "f.safetensors")
    rng = np.random.default_rng(0)
    for size in (0, 1, 5, 40):  # duplicates, runs and gaps
        index = rng.integers(0, shape[0], size=size)
        picked = dense[torch.from_numpy(index)]
        assert torch.equal(tf.rows("x", index), picked)
        for j in range(shape[1] if len(shape) == 3 else 0):
            assert torch.equal(tf.rows("x", index, j), picked[:, j])
    assert torch.equal(tf.load("x"), dense)


def test_relative_paths_resolve_against_the_transcoder_directory(tmp_path, monkeypatch):
    layers = random_layers("relu")
    path = save_transcoder_set(tmp_path / "deep" / "tc", layers, **HOOKS)
    rewrite_config(path, transcoders=["./layer_0.safetensors", "sub/../layer_1.safetensors"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tc = load_transcoders(os.path.relpath(path, elsewhere))
    torch.testing.assert_close(tc.encoder_vectors(1, torch.arange(12)), layers[1]["W_enc"])
    # an absolute file reference also works
    rewrite_config(path, transcoders=[str(path / "layer_0.safetensors"), "layer_1.safetensors"])
    assert load_transcoders(path).n_layers == 2


# --------------------------------------------------------------------------------- hub
def _fake_hub_cache(home: Path, repo_id: str, content: Path, subfolder: str | None = None):
    """A Hugging Face cache entry for ``repo_id`` whose snapshot holds ``content``."""
    repo_dir = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo_dir / "snapshots" / commit
    shutil.copytree(content, snap / subfolder if subfolder else snap)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def test_hub_source_offline_and_uncached_fails_with_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in ("someorg/transcoders", "someorg/transcoders//layer_set@v2"):
        with pytest.raises(TranscoderSourceError) as excinfo:
            load_transcoders(source)
        message = one_line_error(excinfo)
        assert "could not fetch" in message and "someorg/transcoders" in message
        assert "HF_HUB_OFFLINE" in message and "local directory" in message
    assert isinstance(excinfo.value, FileNotFoundError) and isinstance(excinfo.value, ValueError)


def test_hub_source_loads_from_the_cache_offline(tmp_path, monkeypatch, plt_dir, clt_dir):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub_cache(home, "org/plts", plt_dir, subfolder="gpt2")
    _fake_hub_cache(home, "org/clt", clt_dir)
    for source, kwargs in (("org/plts//gpt2", {}), ("org/plts", {"subfolder": "gpt2"}), ("hf://org/plts/gpt2", {})):
        tc = load_transcoders(source, **kwargs)
        assert tc.scan == "org/plts//gpt2" and tc.n_layers == 2
        assert tc.digest() == load_transcoders(plt_dir).digest()
    assert isinstance(load_transcoders("org/clt"), CrossLayerTranscoder)
    # hf:// URIs inside a local config.yaml resolve through the same cache
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(plt_dir / "config.yaml", local / "config.yaml")
    rewrite_config(
        local, transcoders=["hf://org/plts/gpt2/layer_0.safetensors", "hf://org/plts/gpt2/layer_1.safetensors"]
    )
    assert load_transcoders(local).digest() == load_transcoders(plt_dir).digest()


# ------------------------------------------------------------------------------ memory
def _stream_plt_file(path: Path, d_transcoder: int, d_model: int) -> None:
    """A float32 PLT safetensors file written 1 MiB at a time, so the test process never
    holds (and frees) tensor-sized buffers that would blur its RSS measurements."""
    shapes = {
        "W_dec": (d_transcoder, d_model),
        "W_enc": (d_transcoder, d_model),
        "b_dec": (d_model,),
        "b_enc": (d_transcoder,),
    }
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            left = int(np.prod(shape))
            while left:
                n = min(left, 1 << 18)
                if name == "b_enc":
                    chunk = np.full(n, -2.5, dtype="<f4")
                elif name == "b_dec":
                    chunk = np.zeros(n, dtype="<f4")
                else:
                    scale = 0.05 if name == "W_enc" else 1.0
                    chunk = (rng.standard_normal(n, dtype=np.float32) * scale).astype("<f4")
                fh.write(chunk.tobytes())
                left -= n


_RSS_PROBE = """
import json, sys
import psutil, torch
from pipeline.transcoders import load_transcoders

path, small_dir, d_model = sys.argv[1], sys.argv[2], int(sys.argv[3])
small = load_transcoders(small_dir)  # warm up the loader's code paths
small.reconstruct(0, [small.activations(0, torch.randn(2, small.d_model))])
proc = psutil.Process()
before = proc.memory_info().rss
tc = load_transcoders(path)
loaded = proc.memory_info().rss
xs = torch.randn(6, 8, d_model)
tc.reconstruct(0, [tc.activations(0, xs[0])])  # warm up torch's kernels
warm = proc.memory_info().rss
n_read = 0
for x in xs:
    acts = tc.activations(0, x)
    n_read += int((acts != 0).any(0).sum())
    assert tc.reconstruct(0, [acts]).shape == (8, d_model)
used = proc.memory_info().rss - warm
start = proc.memory_info().rss
streamed = load_transcoders(path, lazy_encoder=True)
streamed_load = proc.memory_info().rss - start
for x in xs:
    assert torch.equal(streamed.activations(0, x), tc.activations(0, x))
streamed_used = proc.memory_info().rss - start
eager = load_transcoders(path, lazy_decoder=False)
print(json.dumps({"load": loaded - before, "read": used, "n_read": n_read,
                  "streamed_load": streamed_load, "streamed_used": streamed_used,
                  "eager": proc.memory_info().rss - start}))
"""


def test_lazy_decoder_keeps_resident_memory_near_the_encoder_size(tmp_path, plt_dir):
    """RSS is measured in a fresh interpreter with a fixed mmap threshold: in the test process,
    memory freed by earlier tests (and glibc raising its mmap threshold after large frees)
    lets a load reuse pages without growing RSS, which would hide what is measured."""
    d_model, d_t = 256, 16384  # 16 MiB encoder, 16 MiB decoder
    mib = 1 << 20
    decoder_bytes = d_t * d_model * 4
    path = tmp_path / "big"
    path.mkdir()
    _stream_plt_file(path / "layer_0.safetensors", d_t, d_model)
    (path / "config.yaml").write_text(yaml.safe_dump({"model_kind": "transcoder_set", **HOOKS}))
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": str(128 << 10),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path), str(plt_dir), str(d_model)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    # the encoder is resident, the decoder is not
    assert decoder_bytes // 2 < m["load"] < decoder_bytes * 3 // 2, f"load grew RSS {m['load'] / mib:.1f} MiB"
    assert 0 < m["n_read"] < d_t // 2
    assert m["read"] < decoder_bytes // 3, f"reading {m['n_read']} rows grew RSS {m['read'] / mib:.1f} MiB"
    assert m["eager"] > decoder_bytes * 3 // 2, "the measurement cannot see a loaded decoder"
    # lazy_encoder=True: the encoder is streamed in blocks, nothing stays resident
    assert m["streamed_load"] < decoder_bytes // 8, f"lazy encoder load grew RSS {m['streamed_load'] / mib:.1f} MiB"
    assert m["streamed_used"] < decoder_bytes // 3, f"streamed encodes grew RSS {m['streamed_used'] / mib:.1f} MiB"


# ----------------------------------------------------------------------------- digests
def test_digest_tracks_content_not_location(tmp_path, plt_dir):
    d1 = load_transcoders(plt_dir).digest()
    assert d1 == load_transcoders(plt_dir, lazy_decoder=False).digest()
    copy = shutil.copytree(plt_dir, tmp_path / "copy")
    assert load_transcoders(copy).digest() == d1
    data = bytearray((copy / "layer_1.safetensors").read_bytes())
    data[-1] ^= 0x01  # flip a bit of the last decoder-bias float... still finite
    (copy / "layer_1.safetensors").write_bytes(bytes(data))
    assert load_transcoders(copy).digest() != d1
    assert re.fullmatch("[0-9a-f]{64}", d1), d1


def test_check_compatible_names_both_numbers(plt_dir):
    tc = load_transcoders(plt_dir)
    tc.check_compatible(2, 16)
    with pytest.raises(ValueError, match=r"d_model=16.*d_model=32"):
        tc.check_compatible(2, 32)
    with pytest.raises(ValueError, match=r"2 layers.*has 3"):
        tc.check_compatible(3, 16)


# ------------------------------------------------------------------------ bad inputs
def _corrupt_plt(kind: str, path: Path) -> None:
    layer1 = path / "layer_1.safetensors"
    if kind == "config_missing":
        (path / "config.yaml").unlink()
    elif kind.startswith("missing_key:"):
        rewrite_config(path, **{kind.split(":")[1]: None})
    elif kind == "unknown_model_kind":
        rewrite_config(path, model_kind="sparse_autoencoder")
    elif kind == "unknown_input_hook":
        rewrite_config(path, feature_input_hook="blocks.0.mlp.hook_pre")
    elif kind == "unknown_output_hook":
        rewrite_config(path, feature_output_hook="hook_attn_out")
    elif kind == "config_not_mapping":
        (path / "config.yaml").write_text("- just\n- a list\n")
    elif kind == "config_bad_yaml":
        (path / "config.yaml").write_text("model_kind: [unclosed\n")
    elif kind == "topk_without_k":
        rewrite_config(path, activation="topk")
    elif kind == "unknown_activation":
        rewrite_config(path, activation="gelu")
    elif kind == "missing_file":
        layer1.unlink()
    elif kind == "truncated_file":
        layer1.write_bytes(layer1.read_bytes()[:-10])
    elif kind == "not_safetensors":
        layer1.write_bytes(b"PK\x03\x04 this is not a safetensors file at all" * 4)
    elif kind == "empty_file":
        layer1.write_bytes(b"")
    elif kind == "huge_header_length":
        layer1.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif kind.startswith("nonfinite:"):
        key = kind.split(":")[1]
        tensors = load_file(layer1)
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan") if key != "b_dec" else float("inf")
        save_file(tensors, str(layer1))
    elif kind == "negative_threshold":
        tensors = load_file(layer1)
        tensors["activation_function.threshold"][3] = -0.5
        save_file(tensors, str(layer1))
    elif kind == "inconsistent_d_transcoder":
        tensors = load_file(layer1)
        tensors = {
            k: (v[:-1] if k in ("W_enc", "W_dec", "b_enc", "activation_function.threshold") else v)
            for k, v in tensors.items()
        }
        save_file(tensors, str(layer1))
    elif kind == "missing_tensor":
        tensors = load_file(layer1)
        del tensors["W_dec"]
        save_file(tensors, str(layer1))
    elif kind == "transposed_decoder":
        tensors = load_file(layer1)
        tensors["W_dec"] = tensors["W_dec"].T.contiguous()
        save_file(tensors, str(layer1))
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind,error,pattern",
    [
        ("config_missing", FileNotFoundError, "config.yaml"),
        ("missing_key:model_kind", TranscoderConfigError, "missing the key 'model_kind'"),
        ("missing_key:feature_input_hook", TranscoderConfigError, "feature_input_hook"),
        ("missing_key:feature_output_hook", TranscoderConfigError, "feature_output_hook"),
        ("unknown_model_kind", TranscoderConfigError, "unknown model_kind 'sparse_autoencoder'"),
        ("unknown_input_hook", TranscoderConfigError, "not a supported hook"),
        ("unknown_output_hook", TranscoderConfigError, "hook_attn_out"),
        ("config_not_mapping", TranscoderConfigError, "mapping"),
        ("config_bad_yaml", TranscoderConfigError, "not valid YAML"),
        ("topk_without_k", TranscoderConfigError, "needs a positive integer 'k'"),
        ("unknown_activation", TranscoderConfigError, "activation 'gelu'"),
        ("missing_file", FileNotFoundError, "layer_1.safetensors.*not found"),
        ("truncated_file", TranscoderConfigError, "truncated"),
        ("not_safetensors", TranscoderConfigError, "truncated or not a valid weight file"),
        ("empty_file", TranscoderConfigError, "shorter than a safetensors header"),
        ("huge_header_length", TranscoderConfigError, "header length"),
        ("nonfinite:W_enc", TranscoderConfigError, "W_enc holds NaN or inf"),
        ("nonfinite:b_enc", TranscoderConfigError, "b_enc holds NaN or inf"),
        ("nonfinite:b_dec", TranscoderConfigError, "b_dec holds NaN or inf"),
        ("nonfinite:W_skip", TranscoderConfigError, "W_skip holds NaN or inf"),
        ("negative_threshold", TranscoderConfigError, "negative JumpReLU thresholds"),
        ("inconsistent_d_transcoder", TranscoderConfigError, r"shape \(63, 16\).*\(64, 16\)"),
        ("missing_tensor", TranscoderConfigError, "no tensor 'W_dec'"),
        ("transposed_decoder", TranscoderConfigError, r"W_dec has shape \(16, 64\)"),
    ],
)
def test_bad_transcoder_directory_raises_one_clear_line(tmp_path, plt_skip_dir, kind, error, pattern):
    path = Path(shutil.copytree(plt_skip_dir, tmp_path / "tc"))
    _corrupt_plt(kind, path)
    with pytest.raises(error, match=pattern) as excinfo:
        load_transcoders(path)
    one_line_error(excinfo)
    assert isinstance(excinfo.value, (ValueError, FileNotFoundError))


@pytest.mark.parametrize("fixture", ["plt_skip_dir", "clt_dir", "gemmascope_dir"])
def test_lazy_encoders_compute_what_resident_encoders_compute(fixture, request):
    directory = request.getfixturevalue(fixture)
    resident = load_transcoders(directory)
    streamed = load_transcoders(directory, lazy_encoder=True)
    for w in streamed.layers:
        w.encoder.block_rows = 5  # several blocks, the last one short
    # GemmaScope stores W_enc transposed: no contiguous rows, so it stays resident
    assert streamed.layers[0].encoder.lazy == (fixture != "gemmascope_dir")
    assert not resident.layers[0].encoder.lazy
    assert (streamed.d_transcoder, streamed.d_model) == (resident.d_transcoder, resident.d_model)
    g = torch.Generator().manual_seed(0)
    feats = torch.tensor([3, 0, resident.d_transcoder - 1, 3])
    for layer in range(resident.n_layers):
        x = torch.randn(2, 5, resident.d_model, generator=g)
        torch.testing.assert_close(streamed.encode(layer, x), resident.encode(layer, x), rtol=1e-6, atol=1e-6)
        assert torch.equal(streamed.activations(layer, x) != 0, resident.activations(layer, x) != 0)
        assert torch.equal(streamed.encoder_vectors(layer, feats), resident.encoder_vectors(layer, feats))
    with pytest.raises(IndexError, match="out of range"):
        streamed.encoder_vectors(0, torch.tensor([resident.d_transcoder]))


def test_nan_in_a_lazy_encoder_fails_on_first_encode_naming_the_feature(tmp_path, plt_dir):
    path = Path(shutil.copytree(plt_dir, tmp_path / "tc"))
    tensors = load_file(path / "layer_1.safetensors")
    tensors["W_enc"][7, 1] = float("inf")
    save_file(tensors, str(path / "layer_1.safetensors"))
    tc = load_transcoders(path, lazy_encoder=True)  # nothing read yet: loads
    x = torch.randn(3, tc.d_model)
    tc.activations(0, x)  # a clean layer encodes fine
    tc.encoder_vectors(1, torch.tensor([6, 8]))
    with pytest.raises(TranscoderConfigError, match="W_enc holds NaN or inf \\(feature 7\\)") as excinfo:
        tc.activations(1, x)
    one_line_error(excinfo)
    with pytest.raises(TranscoderConfigError, match="feature 7"):
        tc.encoder_vectors(1, torch.tensor([2, 7]))
    with pytest.raises(TranscoderConfigError, match="W_enc holds NaN"):
        load_transcoders(path)


def test_nan_in_a_lazy_decoder_fails_on_first_read_or_scan(tmp_path, plt_dir):
    path = Path(shutil.copytree(plt_dir, tmp_path / "tc"))
    tensors = load_file(path / "layer_0.safetensors")
    tensors["W_dec"][5, 2] = float("nan")
    save_file(tensors, str(path / "layer_0.safetensors"))
    tc = load_transcoders(path)  # lazy: loads
    tc.decoder_vectors(0, torch.tensor([4, 6]))  # clean rows read fine
    with pytest.raises(TranscoderConfigError, match="feature 5") as excinfo:
        tc.decoder_vectors(0, torch.tensor([1, 5]))
    one_line_error(excinfo)
    with pytest.raises(TranscoderConfigError, match="NaN"):
        tc.validate_decoders()
    with pytest.raises(TranscoderConfigError, match="W_dec holds NaN"):
        load_transcoders(path, lazy_decoder=False)


@pytest.mark.parametrize(
    "kind", ["missing_decoder_file", "wrong_decoder_shape", "missing_encoder_layer", "mixed_thresholds"]
)
def test_bad_cross_layer_transcoder_raises_one_clear_line(tmp_path, clt_dir, kind):
    path = Path(shutil.copytree(clt_dir, tmp_path / "clt"))
    if kind == "missing_decoder_file":
        (path / "W_dec_1.safetensors").unlink()
        error, pattern = FileNotFoundError, "W_dec_1.safetensors.*not found"
    elif kind == "wrong_decoder_shape":
        t = load_file(path / "W_dec_0.safetensors")["W_dec_0"]
        save_file({"W_dec_0": t[:, :1].contiguous()}, str(path / "W_dec_0.safetensors"))
        error, pattern = TranscoderConfigError, r"expected \(64, 2, 16\)"
    elif kind == "missing_encoder_layer":
        (path / "W_enc_0.safetensors").rename(path / "W_enc_2.safetensors")
        error, pattern = FileNotFoundError, "W_enc_0.safetensors"
    else:
        t = load_file(path / "W_enc_1.safetensors")
        del t["threshold_1"]
        save_file(t, str(path / "W_enc_1.safetensors"))
        error, pattern = TranscoderConfigError, "threshold_"
    with pytest.raises(error, match=pattern) as excinfo:
        load_transcoders(path)
    one_line_error(excinfo)


@pytest.mark.parametrize(
    "source,pattern",
    [
        ("./no/such/dir", "does not exist"),
        ("not a repo id!", "neither an existing directory nor a Hugging Face repo id"),
    ],
)
def test_bad_sources_raise_one_clear_line(tmp_path, source, pattern):
    with pytest.raises(FileNotFoundError, match=pattern) as excinfo:
        load_transcoders(source)
    one_line_error(excinfo)


def test_source_that_is_a_file_names_the_fix(plt_dir):
    with pytest.raises(FileNotFoundError, match="pass the directory") as excinfo:
        load_transcoders(plt_dir / "layer_0.safetensors")
    one_line_error(excinfo)


def test_writers_reject_bad_weights(tmp_path):
    layers = random_layers("jump_relu")
    layers[1]["threshold"] = -layers[1]["threshold"]
    with pytest.raises(TranscoderConfigError, match="negative"):
        save_transcoder_set(tmp_path / "a", layers, **HOOKS)
    with pytest.raises(TranscoderConfigError, match="not a supported hook"):
        save_transcoder_set(
            tmp_path / "b", random_layers(), feature_input_hook="resid", feature_output_hook="hook_mlp_out"
        )
    mixed = random_layers("relu") + random_layers("jump_relu", n_layers=1)
    with pytest.raises(TranscoderConfigError, match="mix activations"):
        save_transcoder_set(tmp_path / "c", mixed, **HOOKS)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_supported_hooks_are_the_tl2_block_relative_names():
    assert SUPPORTED_HOOKS == {
        "ln2.hook_normalized",
        "hook_resid_mid",
        "mlp.hook_in",
        "hook_mlp_in",
        "mlp.hook_out",
        "hook_mlp_out",
        "ln2.hook_out",
        "hook_resid_pre",
        "hook_resid_post",
    }


# ----------------------------------------------------------------------- model fixtures
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fixture_models_boot_offline_and_prepend_bos_once(arch, request, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformer_lens import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    words = testing.vocabulary_words(model_dir)
    prompt = " ".join(words[6:11])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers must not warn about the fixture
        hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
    bridge = TransformerBridge.boot_transformers(str(model_dir), device="cpu")
    tokens = bridge.to_tokens(prompt)
    bos = tok.convert_tokens_to_ids(testing.BOS)
    assert tokens[0, 0] == bos and int((tokens == bos).sum()) == 1
    assert tokens.shape == (1, 6)
    assert bridge.to_tokens(prompt, prepend_bos=False).shape == (1, 5)
    # the GPT-2 tokenizer leaves BOS to the caller, the Llama one adds it (like the originals)
    assert (tok(prompt)["input_ids"][0] == bos) == (arch == "llama")
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_fixture_models_are_byte_identical_per_seed(tmp_path):
    a = testing.make_tiny_llama(tmp_path / "a", seed=3)
    b = testing.make_tiny_llama(tmp_path / "b", seed=3)
    c = testing.make_tiny_llama(tmp_path / "c", seed=4)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a)["model.safetensors"] != tree_digest(c)["model.safetensors"]
