"""Write transcoders in the on-disk formats ``load_transcoders`` (and circuit-tracer) read.

Both writers build the whole directory in a temporary sibling and rename it into place, so a
reader never sees half a transcoder set. Same tensors in -> byte-identical files out.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from .config import CONFIG_NAME, TranscoderConfigError, dump_config, validate_hook
from .lazy import all_finite

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _tensor(value: Any, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
    t = torch.as_tensor(value).detach().cpu().contiguous()
    if not t.is_floating_point():
        t = t.float()
    if shape is not None and tuple(t.shape) != shape:
        raise TranscoderConfigError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if not all_finite(t):
        raise TranscoderConfigError(f"{name} holds NaN or inf; refusing to write it")
    return t


def _check_threshold(t: Tensor, name: str) -> None:
    if bool((t < 0).any()):
        raise TranscoderConfigError(f"{name} has negative JumpReLU thresholds; they must be >= 0")


def _write_npz(path: Path, arrays: Mapping[str, Tensor]) -> None:
    """An uncompressed .npz (what np.savez writes) with fixed timestamps: deterministic bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arrays[name].numpy(), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _write_config(tmp: Path, config: dict[str, Any]) -> None:
    (tmp / CONFIG_NAME).write_text(dump_config(config), encoding="utf-8")


def _atomic_dir(directory: str | os.PathLike, write) -> Path:
    """Run ``write(tmp_dir)`` then move tmp_dir to ``directory`` (replacing what was there)."""
    target = Path(directory).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists() and not target.is_dir():
            raise TranscoderConfigError(f"{str(target)!r} exists and is not a directory")
        if target.is_dir() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "d")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if target.is_dir():
                target.rmdir()
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _base_config(
    kind: str, feature_input_hook: str, feature_output_hook: str, scan: str | None, model_name: str | None
) -> dict[str, Any]:
    return {
        "model_name": model_name,
        "model_kind": kind,
        "feature_input_hook": validate_hook(feature_input_hook, "feature_input_hook", "writer"),
        "feature_output_hook": validate_hook(feature_output_hook, "feature_output_hook", "writer"),
        "scan": scan,
    }


def save_transcoder_set(
    directory: str | os.PathLike,
    layers: Sequence[Mapping[str, Any]],
    *,
    feature_input_hook: str,
    feature_output_hook: str,
    scan: str | None = None,
    model_name: str | None = None,
    gemmascope: bool = False,
) -> Path:
    """Write per-layer transcoders; returns the directory.

    layers[l]: ``W_enc`` (d_transcoder, d_model), ``W_dec`` (d_transcoder, d_model), ``b_enc``
    (d_transcoder,), ``b_dec`` (d_model,), optional ``threshold`` (d_transcoder,) for JumpReLU,
    optional ``W_skip`` (d_model, d_model) with skip(x) = x @ W_skip.T, optional ``top_k`` (int,
    the same for every layer). Every layer must use the same activation.

    Default layout: ``layer_{l}.safetensors`` (circuit-tracer's keys, threshold under
    ``activation_function.threshold``). ``gemmascope=True``: ``layer_{l}/params.npz`` with
    ``W_enc`` transposed to (d_model, d_transcoder) and the threshold under ``threshold``, as in
    google/gemma-scope-*-transcoders. config.yaml lists the files as relative paths.
    """
    if not layers:
        raise TranscoderConfigError("save_transcoder_set needs at least one layer")
    config = _base_config("transcoder_set", feature_input_hook, feature_output_hook, scan, model_name)
    first = layers[0]
    d_transcoder, d_model = tuple(torch.as_tensor(first["W_enc"]).shape)
    kinds = {
        ("topk" if lw.get("top_k") is not None else "jump_relu" if lw.get("threshold") is not None else "relu")
        for lw in layers
    }
    if len(kinds) != 1:
        raise TranscoderConfigError(f"layers mix activations {sorted(kinds)}; every layer needs the same one")
    activation = kinds.pop()
    config["activation"] = activation
    if activation == "topk":
        ks = {int(lw["top_k"]) for lw in layers}
        if len(ks) != 1 or min(ks) < 1:
            raise TranscoderConfigError(f"top_k must be one positive integer for all layers, got {ks}")
        config["k"] = ks.pop()

    prepared: list[tuple[str, dict[str, Tensor]]] = []
    for i, lw in enumerate(layers):
        missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in lw]
        if missing:
            raise TranscoderConfigError(f"layer {i} is missing {', '.join(missing)}")
        W_enc = _tensor(lw["W_enc"], f"layer {i} W_enc", (d_transcoder, d_model))
        tensors = {
            "W_dec": _tensor(lw["W_dec"], f"layer {i} W_dec", (d_transcoder, d_model)),
            "b_enc": _tensor(lw["b_enc"], f"layer {i} b_enc", (d_transcoder,)),
            "b_dec": _tensor(lw["b_dec"], f"layer {i} b_dec", (d_model,)),
        }
        if lw.get("W_skip") is not None:
            tensors["W_skip"] = _tensor(lw["W_skip"], f"layer {i} W_skip", (d_model, d_model))
        threshold = None
        if activation == "jump_relu":
            threshold = _tensor(lw["threshold"], f"layer {i} threshold", (d_transcoder,))
            _check_threshold(threshold, f"layer {i} threshold")
        if gemmascope:
            tensors["W_enc"] = W_enc.T.contiguous()
            if threshold is not None:
                tensors["threshold"] = threshold
            prepared.append((f"layer_{i}/params.npz", tensors))
        else:
            tensors["W_enc"] = W_enc
            if threshold is not None:
                tensors["activation_function.threshold"] = threshold
            prepared.append((f"layer_{i}.safetensors", tensors))
    config["transcoders"] = [rel for rel, _ in prepared]

    def write(tmp: Path) -> None:
        for rel, tensors in prepared:
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if gemmascope:
                _write_npz(path, tensors)
            else:
                save_file(tensors, str(path))
        _write_config(tmp, config)

    return _atomic_dir(directory, write)


def save_cross_layer_transcoder(
    directory: str | os.PathLike,
    encoders: Sequence[Mapping[str, Any]],
    decoders: Sequence[Any],
    *,
    feature_input_hook: str,
    feature_output_hook: str,
    scan: str | None = None,
    model_name: str | None = None,
) -> Path:
    """Write a cross-layer transcoder in circuit-tracer's layout; returns the directory.

    encoders[i]: ``W_enc`` (d_transcoder, d_model), ``b_enc`` (d_transcoder,), ``b_dec``
    (d_model,) of output layer i, optional ``threshold`` (d_transcoder,) (all layers or none),
    optional ``W_skip`` (d_model, d_model), skip(x) = x @ W_skip.T (our extension).
    decoders[i]: (d_transcoder, n_layers - i, d_model).
    Files: ``W_enc_{i}.safetensors`` (W_enc_i, b_enc_i, b_dec_i[, threshold_i][, W_skip_i]) and
    ``W_dec_{i}.safetensors`` (W_dec_i).
    """
    n_layers = len(encoders)
    if n_layers == 0 or len(decoders) != n_layers:
        raise TranscoderConfigError(f"need one encoder and one decoder per layer, got {n_layers} and {len(decoders)}")
    config = _base_config("cross_layer_transcoder", feature_input_hook, feature_output_hook, scan, model_name)
    d_transcoder, d_model = tuple(torch.as_tensor(encoders[0]["W_enc"]).shape)
    has_thr = {enc.get("threshold") is not None for enc in encoders}
    if len(has_thr) != 1:
        raise TranscoderConfigError("give a threshold for every layer or for none")
    config["activation"] = "jump_relu" if has_thr.pop() else "relu"

    files: list[tuple[str, dict[str, Tensor]]] = []
    for i, (enc, dec) in enumerate(zip(encoders, decoders)):
        missing = [k for k in ("W_enc", "b_enc", "b_dec") if k not in enc]
        if missing:
            raise TranscoderConfigError(f"encoder {i} is missing {', '.join(missing)}")
        tensors = {
            f"W_enc_{i}": _tensor(enc["W_enc"], f"layer {i} W_enc", (d_transcoder, d_model)),
            f"b_enc_{i}": _tensor(enc["b_enc"], f"layer {i} b_enc", (d_transcoder,)),
            f"b_dec_{i}": _tensor(enc["b_dec"], f"layer {i} b_dec", (d_model,)),
        }
        if enc.get("threshold") is not None:
            thr = _tensor(enc["threshold"], f"layer {i} threshold", (d_transcoder,))
            _check_threshold(thr, f"layer {i} threshold")
            tensors[f"threshold_{i}"] = thr
        if enc.get("W_skip") is not None:
            tensors[f"W_skip_{i}"] = _tensor(enc["W_skip"], f"layer {i} W_skip", (d_model, d_model))
        files.append((f"W_enc_{i}.safetensors", tensors))
        files.append(
            (
                f"W_dec_{i}.safetensors",
                {f"W_dec_{i}": _tensor(dec, f"layer {i} W_dec", (d_transcoder, n_layers - i, d_model))},
            )
        )

    def write(tmp: Path) -> None:
        for rel, tensors in files:
            save_file(tensors, str(tmp / rel))
        _write_config(tmp, config)

    return _atomic_dir(directory, write)
