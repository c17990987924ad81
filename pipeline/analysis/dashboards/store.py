"""Reading a dashboards store (:class:`Dashboards`) and writing the per-feature JSON a viewer fetches.

A feature's record is described in docs/dashboards.md ("The per-feature record").
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from pipeline._io import atomic_write_bytes, fsync_dir, json_bytes, read_json

from .config import FEATURE_CHUNK, FORMAT, FORMAT_VERSION, META_KEY, SPAN_CHUNK, DashboardConfig

#: decoded blocks a reader keeps (least recently used first out)
_CACHE_BLOCKS = 128


def is_store(path: Path) -> bool:
    """Whether ``path`` holds a dashboards store (of any version)."""
    try:
        doc = read_json(path / "zarr.json")
    except (OSError, ValueError):
        return False
    return isinstance(doc.get("attributes", {}).get(META_KEY), dict)


def _decode_strings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = data.tobytes()
    return [raw[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(offsets.size - 1)]


def _f32(x) -> float | None:
    """A float32 value as the float of its shortest repr (deterministic JSON); None if not finite."""
    v = np.float32(x)
    if not np.isfinite(v):
        return None
    return float(str(v))


class Dashboards:
    """A finished dashboards store, opened read-only. Feature queries return JSON-able dicts."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self._store = LocalStore(str(path), read_only=True)
        self._arrays: dict[str, Any] = {}
        self._blocks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._vocab: list[str] | None = None
        self._labels: list[str] | None = None
        self.config = DashboardConfig.from_dict(meta["config"])
        self.n_layers: int = int(meta["n_layers"])
        self.d_transcoder: int = int(meta["d_transcoder"])
        self.kind: str = str(meta["kind"])
        self.n_tokens: int = int(meta["n_tokens"])

    @classmethod
    def open(cls, path: str | os.PathLike) -> Dashboards:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no dashboards store at {path}; compute it with `circuit-pipeline features`")
        try:
            doc = read_json(path / "zarr.json")
        except (OSError, ValueError):
            raise ValueError(f"{path} is not a dashboards store (no readable zarr.json)") from None
        meta = doc.get("attributes", {}).get(META_KEY)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a dashboards store ({FORMAT})")
        if int(meta.get("version", -1)) != FORMAT_VERSION:
            raise ValueError(
                f"{path} has dashboards format version {meta.get('version')}, this code reads "
                f"{FORMAT_VERSION}; recompute it"
            )
        return cls(path, meta)

    def __repr__(self) -> str:
        return (
            f"Dashboards({str(self.path)!r}, kind={self.kind!r}, n_layers={self.n_layers}, "
            f"d_transcoder={self.d_transcoder}, n_tokens={self.n_tokens})"
        )

    # ------------------------------------------------------------------ raw access
    def _array(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = zarr.open_array(self._store, path=name, mode="r")
        return self._arrays[name]

    def _read(self, name: str, index: Any = Ellipsis) -> np.ndarray:
        """``self._array(name)[index]`` as numpy; a chunk that fails its checksum or cannot be
        decoded is an error naming the store, the array and the fix."""
        try:
            return np.asarray(self._array(name)[index])
        except Exception as exc:
            raise ValueError(
                f"{self.path}: dashboards array {name!r} is damaged ({type(exc).__name__}: "
                f"{str(exc).rstrip('.')}): delete the store and compute the dashboards again "
                "(circuit-pipeline features, or dvc repro -f features)"
            ) from exc

    def _cached(self, key: tuple, name: str, index: Any) -> np.ndarray:
        """``self._array(name)[index]`` read as numpy, kept in the LRU cache under ``key``."""
        block = self._blocks.get(key)
        if block is None:
            block = self._read(name, index)
            self._blocks[key] = block
            if len(self._blocks) > _CACHE_BLOCKS:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return block

    def _feat(self, name: str, layer: int, f: int) -> np.ndarray:
        """Feature f of ``layer`` from a per-feature array (one FEATURE_CHUNK block read, cached)."""
        c, r = divmod(f, FEATURE_CHUNK)
        sl = slice(c * FEATURE_CHUNK, (c + 1) * FEATURE_CHUNK)
        if name.startswith("logits/layer_"):  # (L, L, F, V): feature axis 2
            block = self._cached((name, layer, c), name, (layer, slice(None), sl))
            return block[:, r]
        block = self._cached((name, layer, c), name, (layer, sl))
        return block[r]

    def _span(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of a 1-D table (read in cached SPAN_CHUNK-element chunks)."""
        n = SPAN_CHUNK
        parts = []
        for c in range(start // n, (max(stop, start + 1) - 1) // n + 1):
            block = self._cached((name, c), name, slice(c * n, (c + 1) * n))
            parts.append(block[max(start - c * n, 0) : max(min(stop - c * n, n), 0)])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    @property
    def vocab(self) -> list[str]:
        """Every token id's string (tokenizer.decode of the one id)."""
        if self._vocab is None:
            self._vocab = _decode_strings(self._read("vocab/bytes"), self._read("vocab/offsets"))
        return self._vocab

    def _check(self, layer, index) -> tuple[int, int]:
        """``(layer, index)`` as ints; ValueError if they are not integers in range."""
        for what, v in (("layer", layer), ("feature", index)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{what} must be an integer, got {v!r}")
        layer, index = int(layer), int(index)
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range: the store has layers 0..{self.n_layers - 1}")
        if not 0 <= index < self.d_transcoder:
            raise ValueError(f"feature {index} out of range: layer {layer} has features 0..{self.d_transcoder - 1}")
        return layer, index

    # ------------------------------------------------------------------ queries
    def labels(self) -> dict[tuple[int, int], str]:
        """Automatic label of every feature, keyed (layer, feature): ``create_graph_files(labels=...)``."""
        if self._labels is None:
            self._labels = _decode_strings(self._read("labels/bytes"), self._read("labels/offsets"))
        F = self.d_transcoder
        return {(i // F, i % F): s for i, s in enumerate(self._labels)}

    def label(self, layer: int, index: int) -> str:
        layer, index = self._check(layer, index)
        i = layer * self.d_transcoder + index
        offs = self._span("labels/offsets", i, i + 2)
        return self._span("labels/bytes", int(offs[0]), int(offs[1])).tobytes().decode("utf-8")

    def feature(self, layer: int, index: int) -> dict[str, Any]:
        """One feature's dashboard as a JSON-able dict (what ``export_feature_json`` writes):
        counts, histogram, top and quantile examples, logits, label; see docs/dashboards.md.
        Floats are float32 values written with their shortest repr."""
        layer, f = self._check(layer, index)
        cfg = self.config
        count = int(self._feat("stats/count", layer, f))
        total = float(self._feat("stats/sum", layer, f))
        hist = self._feat("stats/hist", layer, f)
        top_val = self._feat("top/value", layer, f)
        top_seq = self._feat("top/seq", layer, f)
        top_pos = self._feat("top/pos", layer, f)
        top_win = self._feat("top/window", layer, f)
        examples = [self._example(v, s, p, w) for v, s, p, w in zip(top_val, top_seq, top_pos, top_win) if s >= 0]

        edges = np.asarray([e if e is not None else np.inf for e in self.meta["hist_edges"]], dtype=np.float64)
        max_act = float(top_val[0]) if examples else 0.0
        bins = self._feat("quantiles/bins", layer, f)
        q_val = self._feat("quantiles/value", layer, f)
        q_seq = self._feat("quantiles/seq", layer, f)
        q_pos = self._feat("quantiles/pos", layer, f)
        q_win = self._feat("quantiles/window", layer, f)
        cum = np.concatenate([[0], np.cumsum(hist)])
        quantiles = []
        for q in range(cfg.n_quantiles):
            b0, b1 = int(bins[q]), int(bins[q + 1])
            n_q = int(cum[b1] - cum[b0])
            if n_q == 0:
                continue
            quantiles.append(
                {
                    "index": q,
                    "range": [_f32(edges[b0]), _f32(edges[b1])],  # [lo, hi); hi None: unbounded
                    "cdf": [float(cum[b0] / count), float(cum[b1] / count)],
                    "count": n_q,
                    "examples": [
                        self._example(v, s, p, w)
                        for v, s, p, w in zip(q_val[q], q_seq[q], q_pos[q], q_win[q])
                        if s >= 0
                    ],
                }
            )
        nz = np.nonzero(hist)[0]
        if nz.size:
            b0, b1 = int(nz[0]), int(nz[-1]) + 1
            hi_edges = [edges[b] if np.isfinite(edges[b]) else max_act for b in range(b0, b1 + 1)]
            histogram = {"edges": [_f32(e) for e in hi_edges], "counts": [int(c) for c in hist[b0:b1]]}
        else:
            histogram = {"edges": [], "counts": []}

        vocab = self.vocab
        logits = {
            "top": self._logit_list("top", layer, f, vocab),
            "bottom": self._logit_list("bottom", layer, f, vocab),
        }
        if self.kind == "cross_layer_transcoder":
            per = []
            for out_layer in range(layer, self.n_layers):
                per.append(
                    {
                        "layer": out_layer,
                        "top": self._logit_list("layer_top", layer, f, vocab, out_layer),
                        "bottom": self._logit_list("layer_bottom", layer, f, vocab, out_layer),
                    }
                )
            logits["per_output_layer"] = per
        return {
            "layer": layer,
            "feature": f,
            "label": self.label(layer, f),
            "n_tokens": self.n_tokens,
            "n_firing": count,
            "density": float(count / self.n_tokens) if self.n_tokens else 0.0,
            "mean_activation": _f32(total / count) if count else 0.0,
            "max_activation": _f32(max_act),
            "histogram": histogram,
            "top_examples": examples,
            "quantiles": quantiles,
            "logits": logits,
        }

    def _logit_list(self, prefix: str, layer: int, f: int, vocab: list[str], out_layer: int | None = None):
        ids = self._feat(f"logits/{prefix}_id", layer, f)
        vals = self._feat(f"logits/{prefix}_value", layer, f)
        if out_layer is not None:
            ids, vals = ids[out_layer], vals[out_layer]
        return [{"token": vocab[int(i)], "token_id": int(i), "value": _f32(v)} for i, v in zip(ids, vals)]

    def _sequence(self, row: int) -> tuple[np.ndarray, int, int, int]:
        offs = self._span("sequences/offsets", row, row + 2)
        tokens = self._span("sequences/tokens", int(offs[0]), int(offs[1]))
        return (
            tokens,
            int(self._span("sequences/id", row, row + 1)[0]),
            int(self._span("sequences/doc", row, row + 1)[0]),
            int(self._span("sequences/start", row, row + 1)[0]),
        )

    def _example(self, value, row, pos, window) -> dict[str, Any]:
        tokens, seq_id, doc, start = self._sequence(int(row))
        cfg = self.config
        pos = int(pos)
        lo = max(0, pos - cfg.context_before)
        hi = min(tokens.size, pos + cfg.context_after + 1)
        acts = window[lo - (pos - cfg.context_before) : hi - (pos - cfg.context_before)]
        vocab = self.vocab
        return {
            "value": _f32(value),
            "sequence": seq_id,
            "document": doc,
            "position": pos,
            "doc_start": start,
            "max_index": pos - lo,
            "token_ids": [int(t) for t in tokens[lo:hi]],
            "tokens": [vocab[int(t)] for t in tokens[lo:hi]],
            "activations": [_f32(a) for a in acts],
        }


# Per-graph feature JSON for the viewer
# --------------------------------------------------------------------------------------------


def graph_features(graph) -> list[tuple[int, int]]:
    """(layer, feature) of every feature node of a graph JSON (path or dict), sorted, unique."""
    if not isinstance(graph, Mapping):
        graph = read_json(graph)
    out = set()
    for node in graph.get("nodes", []):
        if node.get("feature_type") != "cross layer transcoder":
            continue
        layer, feature, _pos = str(node["node_id"]).split("_")
        out.add((int(layer), int(feature)))
    return sorted(out)


def feature_json_bytes(record: Mapping[str, Any]) -> bytes:
    """Deterministic bytes of one feature record (fixed key order, compact, UTF-8)."""
    return json_bytes(record, sort_keys=False, indent=None)


def export_feature_json(
    dash: Dashboards, features: Iterable[tuple[int, int]] | Mapping | str | os.PathLike, out_dir: str | os.PathLike
) -> list[Path]:
    """Write ``out_dir/features/{layer}_{feature}.json`` for the given features only.

    features: (layer, feature) pairs, or a graph JSON (path or dict) whose feature nodes are
    taken. Each file is ``Dashboards.feature(layer, feature)``; bytes are deterministic and
    each file is written atomically. Returns the paths written, in (layer, feature) order.
    """
    if isinstance(features, (str, os.PathLike, Mapping)):
        features = graph_features(features)
    pairs = sorted({(int(l), int(f)) for l, f in features})
    for l, f in pairs:
        dash._check(l, f)
    folder = Path(out_dir) / "features"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for l, f in pairs:
        path = folder / f"{l}_{f}.json"
        data = feature_json_bytes(dash.feature(l, f))
        if not (path.exists() and path.read_bytes() == data):
            atomic_write_bytes(path, data, sync_dir=False)
        paths.append(path)
    fsync_dir(folder)
    return paths
