"""Writing a finished computation as one Zarr v3 store (layout: docs/dashboards.md).

Per-feature arrays get one shard per layer (chunks of ``FEATURE_CHUNK`` features), 1-D tables
chunks of ``SPAN_CHUNK`` elements; the bytes depend only on the inputs. The store is built
beside ``out`` and renamed into place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import LocalStore

from pipeline._io import atomic_path, fsync_files, remove_stale_temps

from .config import FEATURE_CHUNK, FORMAT, FORMAT_VERSION, MAX_SEQ_LEN, META_KEY, POS_BITS, SPAN_CHUNK
from .labels import feature_labels
from .logits import DecoderLogits

if TYPE_CHECKING:  # compute imports this module
    from .compute import DashboardRun


def _vocab_strings(model, d_vocab: int) -> list[str]:
    tok = model.tokenizer
    try:
        strings = tok.batch_decode([[i] for i in range(d_vocab)], clean_up_tokenization_spaces=False)
    except Exception:  # a tokenizer that cannot decode some ids (padded vocabularies)
        strings = []
        for i in range(d_vocab):
            try:
                strings.append(tok.decode([i], clean_up_tokenization_spaces=False))
            except Exception:
                strings.append(f"<{i}>")
    return [str(s) for s in strings]


def _encode_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of ``strings`` concatenated (uint8) and their (n+1,) int64 offsets."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in encoded])]).astype(np.int64)
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return data, offsets


def _model_label(name: str) -> str:
    """A hub name as is; a local directory by its last component (no machine paths in the store)."""
    path = Path(str(name))
    return path.name if path.exists() else str(name)


def write_store(run: DashboardRun, examples, windows, seqs, logits: list[DecoderLogits]) -> None:
    """Write ``run``'s statistics, examples (with their ``windows``), the stored sequences
    ``seqs``, the decoder ``logits``, labels and vocabulary to ``run.out``."""
    cfg, tc, model = run.cfg, run.tc, run.model
    L, F, K, Q, M, W = (
        model.n_layers,
        tc.d_transcoder,
        cfg.top_k,
        cfg.n_quantiles,
        cfg.examples_per_quantile,
        cfg.window,
    )
    d_vocab = int(model.W_U.shape[1])
    vocab = _vocab_strings(model, d_vocab)
    labels = feature_labels(cfg, F, examples, seqs, logits, vocab)
    edges = cfg.hist_edges()
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": run.fingerprint,
        "config": cfg.result_dict(),
        "seq_len": run.seq_len,
        "kind": tc.kind,
        "n_layers": L,
        "d_transcoder": F,
        "d_vocab": d_vocab,
        "window": [cfg.context_before, cfg.context_after],
        "n_tokens": int(run.meta["n_tokens"]),
        "n_documents": int(run.meta["n_docs"]),
        "n_sequences": int(run.meta["n_seqs"]),
        "n_batches": int(run.meta["n_batches"]),
        "n_stored_sequences": int(seqs["id"].size),
        "hist_edges": [float(e) if np.isfinite(e) else None for e in edges],
        "model": {"name": _model_label(model.model_name), "digest": model.digest()},
        "transcoders": {
            "digest": tc.digest(),
            "kind": tc.kind,
            "scan": tc.scan,
            "feature_input_hook": tc.feature_input_hook,
            "feature_output_hook": tc.feature_output_hook,
        },
        "dtype": str(model.dtype),
    }
    # what every array of the store shares: its codecs (a CRC32C checksum after compression, so
    # a damaged chunk fails on read), zero fill, v2 chunk keys ("." separator)
    encoding: dict[str, Any] = dict(
        compressors=(BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec()),
        fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "."},
    )
    fc = min(FEATURE_CHUNK, F)
    remove_stale_temps(run.out)  # what a killed earlier writer left
    with atomic_path(run.out) as tmp:
        store = LocalStore(str(tmp))
        zarr.create_group(store, attributes={META_KEY: meta})

        def create(name: str, shape: tuple, dtype, feature_axis: int | None):
            """Per-feature arrays (layer axis 0): chunks of ``fc`` features, one shard per layer
            holding every feature; 1-D tables: SPAN_CHUNK-element chunks in one shard."""
            shards: tuple[int, ...] | None
            if 0 in shape:
                chunks, shards = tuple(max(1, s) for s in shape), None
            elif feature_axis is None:
                c = min(shape[0], SPAN_CHUNK)
                chunks, shards = (c,), (-(-shape[0] // c) * c,)
            else:
                chunks = tuple(1 if i == 0 else fc if i == feature_axis else s for i, s in enumerate(shape))
                shards = tuple(
                    1 if i == 0 else -(-s // fc) * fc if i == feature_axis else s for i, s in enumerate(shape)
                )
            return zarr.create_array(
                store, name=name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, **encoding
            )

        def put(name: str, data: np.ndarray) -> None:
            data = np.ascontiguousarray(data)
            arr = create(name, data.shape, data.dtype, None)
            if data.size:
                arr[...] = data

        def put_layers(name: str, per_layer: list[np.ndarray], feature_axis: int = 1) -> None:
            """(L, ...) array written one layer (one shard) at a time, never stacked in memory."""
            first = per_layer[0]
            arr = create(name, (len(per_layer), *first.shape), first.dtype, feature_axis)
            for layer, data in enumerate(per_layer):
                arr[layer] = np.ascontiguousarray(data)

        # statistics
        for name in ("count", "sum", "hist"):
            put_layers(f"stats/{name}", [getattr(st, name).cpu().numpy() for st in run.layers])

        # examples: top-k then quantile groups, as (row in sequences/, position)
        n_top = F * K
        seq_index, pos = [], []
        for ex in examples:
            tid = ex["tid"]
            row = np.searchsorted(seqs["id"], tid >> POS_BITS)
            seq_index.append(np.where(tid >= 0, row, -1))
            pos.append(np.where(tid >= 0, tid & (MAX_SEQ_LEN - 1), 0).astype(np.int32))
        val = [ex["value"] for ex in examples]
        put_layers("top/value", [v[:n_top].reshape(F, K) for v in val])
        put_layers("top/seq", [x[:n_top].reshape(F, K) for x in seq_index])
        put_layers("top/pos", [x[:n_top].reshape(F, K) for x in pos])
        put_layers("top/window", [w[:n_top].reshape(F, K, W) for w in windows])
        put_layers("quantiles/bins", [ex["bounds"] for ex in examples])
        put_layers("quantiles/value", [v[n_top:].reshape(F, Q, M) for v in val])
        put_layers("quantiles/seq", [x[n_top:].reshape(F, Q, M) for x in seq_index])
        put_layers("quantiles/pos", [x[n_top:].reshape(F, Q, M) for x in pos])
        put_layers("quantiles/window", [w[n_top:].reshape(F, Q, M, W) for w in windows])

        # output logits
        for name in ("top_id", "top_value", "bottom_id", "bottom_value"):
            put_layers(f"logits/{name}", [getattr(lg, name) for lg in logits])
        if tc.kind == "cross_layer_transcoder":  # [source layer, output layer, feature, rank]
            for name in ("layer_top_id", "layer_top_value", "layer_bottom_id", "layer_bottom_value"):
                per_layer = []
                for layer, lg in enumerate(logits):
                    arr = getattr(lg, name)  # (F, L - layer, V)
                    full = np.full((L, F, arr.shape[2]), -1 if name.endswith("_id") else 0, dtype=arr.dtype)
                    full[layer:] = np.moveaxis(arr, 1, 0)
                    per_layer.append(full)
                put_layers(f"logits/{name}", per_layer, feature_axis=2)

        # string tables and sequences
        data, offsets = _encode_strings(labels)
        put("labels/bytes", data)
        put("labels/offsets", offsets)
        data, offsets = _encode_strings(vocab)
        put("vocab/bytes", data)
        put("vocab/offsets", offsets)
        for name in ("tokens", "offsets", "id", "doc", "start"):
            put(f"sequences/{name}", seqs[name])
        fsync_files(tmp)  # zarr does not sync what it writes
