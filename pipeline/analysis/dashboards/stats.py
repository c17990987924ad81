"""Streaming per-feature statistics of one layer (docs/dashboards.md, steps 2 and 4).

Firing count and sum, a log-binned histogram, the top-k entries by (activation desc, token id
asc) and, per histogram bin, a reservoir of the entries with the smallest seeded hash key.
Every merge is a sort over dense ``(n_features, k)`` tables, so the state does not depend on
how the stream is batched; the quantile groups and their examples are read from it at the end.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import DashboardConfig

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _hash_keys(tids: np.ndarray, layer: int, features: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 key per (token, layer, feature) (splitmix64)."""
    with np.errstate(over="ignore"):
        x = tids.astype(np.uint64) * _GOLD
        x ^= (features.astype(np.uint64) + np.uint64(layer) * np.uint64(1 << 32)) * _M2
        x ^= np.uint64(seed) * _M1 + _GOLD
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def _rank_in_group(groups: np.ndarray) -> np.ndarray:
    """Rank of each element within its run of equal values (``groups`` sorted)."""
    first = np.searchsorted(groups, groups, side="left")
    return np.arange(groups.size) - first


def _empty_key(dtype) -> Any:
    return np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max


def _merge_best(
    slot_id: np.ndarray,
    slot_key: np.ndarray,
    slot_val: np.ndarray | None,
    slots: np.ndarray,
    ids: np.ndarray,
    keys: np.ndarray,
    vals: np.ndarray | None,
    keep: int,
) -> None:
    """Merge candidates into per-slot tables keeping the ``keep`` smallest (key, id).

    slot_id: (n_slots, keep) int64 ids, -1 for empty, rows sorted by (key, id)
    slot_key: (n_slots, keep) sort key of the entries (+inf / max for empty)
    slot_val: optional (n_slots, keep) payload carried along (or None)
    slots, ids, keys, vals: (n,) candidates
    Updates the tables in place; only the rows of slots that have candidates are touched.
    """
    if slots.size == 0:
        return
    u, inv = np.unique(slots, return_inverse=True)
    e_id = slot_id[u].reshape(-1)
    e_key = slot_key[u].reshape(-1)
    e_grp = np.repeat(np.arange(u.size), keep)
    full = e_id >= 0
    grp = np.concatenate([e_grp[full], inv])
    kk = np.concatenate([e_key[full], keys])
    ii = np.concatenate([e_id[full], ids])
    order = np.lexsort((ii, kk, grp))
    grp, kk, ii = grp[order], kk[order], ii[order]
    rank = _rank_in_group(grp)
    sel = rank < keep
    g, r = grp[sel], rank[sel]
    new_id = np.full((u.size, keep), -1, dtype=slot_id.dtype)
    new_key = np.full((u.size, keep), _empty_key(slot_key.dtype), dtype=slot_key.dtype)
    new_id[g, r] = ii[sel]
    new_key[g, r] = kk[sel]
    slot_id[u] = new_id
    slot_key[u] = new_key
    if slot_val is not None:
        e_val = slot_val[u].reshape(-1)
        vv = np.concatenate([e_val[full], vals])[order]
        new_val = np.zeros((u.size, keep), dtype=slot_val.dtype)
        new_val[g, r] = vv[sel]
        slot_val[u] = new_val


class LayerState:
    """Streaming statistics of one layer's features; ``NAMES`` are the arrays a checkpoint holds.

    count (F,), sum (F,), hist (F, H); top_val / top_id (F, K) best first (-inf / -1 empty);
    res_id / res_val (F * H, M): per (feature, bin) the reservoir, in hash key order.
    """

    NAMES = ("count", "sum", "hist", "top_val", "top_id", "res_id", "res_val")

    def __init__(self, n_features: int, cfg: DashboardConfig, arrays: dict[str, np.ndarray] | None = None):
        F, H, K, M = n_features, cfg.n_bins, cfg.top_k, cfg.examples_per_quantile
        self.F, self.H, self.K, self.M = F, H, K, M
        if arrays is not None:
            for name in self.NAMES:
                setattr(self, name, arrays[name])
            return
        self.count = np.zeros(F, dtype=np.int64)
        self.sum = np.zeros(F, dtype=np.float64)
        self.hist = np.zeros((F, H), dtype=np.int64)
        self.top_val = np.full((F, K), -np.inf, dtype=np.float32)
        self.top_id = np.full((F, K), -1, dtype=np.int64)
        self.res_id = np.full((F * H, M), -1, dtype=np.int64)
        self.res_val = np.zeros((F * H, M), dtype=np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.NAMES}


def update_layer(
    st: LayerState,
    layer: int,
    tids: np.ndarray,
    feats: np.ndarray,
    vals: np.ndarray,
    inner_edges: np.ndarray,
    seed: int,
) -> None:
    """Fold one batch's firing entries of one layer into its state.

    tids, feats, vals: (n,) token id, feature, activation (> 0) of every firing entry
    inner_edges: (hist_bins + 1,) the histogram's finite edges above 0
    """
    if vals.size == 0:
        return
    if not np.isfinite(vals).all():
        raise ValueError(f"layer {layer} has non-finite feature activations; check the model and transcoders")
    F, H = st.F, st.H
    # 1. count, sum and histogram
    st.count += np.bincount(feats, minlength=F)
    st.sum += np.bincount(feats, weights=vals.astype(np.float64), minlength=F)
    bins = np.searchsorted(inner_edges, vals.astype(np.float64), side="right")
    slots = feats * H + bins
    st.hist += np.bincount(slots, minlength=F * H).reshape(F, H)

    # 2. top-k by (activation desc, token id asc); candidates below a full row's last entry drop
    last_val, last_id = st.top_val[feats, -1], st.top_id[feats, -1]
    cand = (vals > last_val) | ((vals == last_val) & (tids < last_id))
    if cand.any():
        f, v, t = feats[cand], vals[cand], tids[cand]
        neg = np.negative(st.top_val.astype(np.float64))
        _merge_best(st.top_id, neg, None, f, t, -v.astype(np.float64), None, st.K)
        st.top_val[:] = np.negative(neg).astype(np.float32)

    # 3. reservoirs: per (feature, bin) the entries with the smallest hash key
    keys = _hash_keys(tids, layer, feats, seed)
    last = st.res_id[slots, -1]
    full = last >= 0
    cand = ~full
    if full.any():
        last_key = _hash_keys(last[full], layer, feats[full], seed)
        k_full, t_full = keys[full], tids[full]
        cand[full] = (k_full < last_key) | ((k_full == last_key) & (t_full < last[full]))
    if cand.any():
        s = slots[cand]
        _merge_reservoirs(st, layer, seed, np.unique(s), s, tids[cand], keys[cand], vals[cand])


def _merge_reservoirs(
    st: LayerState,
    layer: int,
    seed: int,
    touched: np.ndarray,
    slots: np.ndarray,
    ids: np.ndarray,
    keys: np.ndarray,
    vals: np.ndarray,
) -> None:
    """Merge candidates (slots, ids, keys, vals) into the reservoirs of the sorted ``touched`` slots."""
    sub_id = st.res_id[touched]
    sub_val = st.res_val[touched]
    feats = np.repeat(touched // st.H, st.M).reshape(sub_id.shape)
    sub_key = _hash_keys(sub_id.reshape(-1), layer, feats.reshape(-1), seed).reshape(sub_id.shape)
    sub_key[sub_id < 0] = np.iinfo(np.uint64).max
    _merge_best(sub_id, sub_key, sub_val, np.searchsorted(touched, slots), ids, keys, vals, st.M)
    st.res_id[touched] = sub_id
    st.res_val[touched] = sub_val


def quantile_bins(hist: np.ndarray, n_quantiles: int) -> np.ndarray:
    """Group boundaries over histogram bins: (F, H) counts -> (F, Q+1) int32 bin indices.

    Group q holds bins [b[q], b[q+1]); b[0] = 0, b[Q] = H, and b[q] is the bin edge whose
    cumulative count is nearest q / Q of the feature's total (the lowest such edge on ties),
    made non-decreasing. Groups can be empty when one bin holds more than 1/Q of the mass.
    """
    hist = np.asarray(hist, dtype=np.int64)
    F, H = hist.shape
    Q = int(n_quantiles)
    cum = np.concatenate([np.zeros((F, 1), dtype=np.int64), np.cumsum(hist, axis=1)], axis=1)
    total = cum[:, -1:]
    out = np.empty((F, Q + 1), dtype=np.int32)
    out[:, 0], out[:, Q] = 0, H
    for q in range(1, Q):
        dist = np.abs(cum * Q - total * q)  # exact integer |cum/total - q/Q| * Q * total
        out[:, q] = dist.argmin(axis=1)
    np.maximum.accumulate(out, axis=1, out=out)
    return out


def _group_of_bins(bounds: np.ndarray, n_bins: int) -> np.ndarray:
    """(F, Q+1) group boundaries -> (F, H) group index of every bin."""
    inner = bounds[:, 1:-1]
    return (inner[:, :, None] <= np.arange(n_bins)[None, None, :]).sum(axis=1)


def quantile_examples(
    st: LayerState, layer: int, bounds: np.ndarray, n_quantiles: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The examples of each quantile group: (F, Q, M) token ids (-1 empty) and activations.

    A group's examples are the M smallest hash keys over its bins' reservoirs: a uniform
    sample of the group.
    """
    F, H, M, Q = st.F, st.H, st.M, n_quantiles
    ids = st.res_id.reshape(-1)
    vals = st.res_val.reshape(-1)
    slot = np.repeat(np.arange(F * H), M)
    full = ids >= 0
    ids, vals, slot = ids[full], vals[full], slot[full]
    feats, bins = slot // H, slot % H
    group = _group_of_bins(bounds, H)[feats, bins]
    gkey = feats * Q + group
    keys = _hash_keys(ids, layer, feats, seed)
    order = np.lexsort((ids, keys, gkey))
    gkey, ids, vals = gkey[order], ids[order], vals[order]
    rank = _rank_in_group(gkey)
    sel = rank < M
    q_id = np.full((F * Q, M), -1, dtype=np.int64)
    q_val = np.zeros((F * Q, M), dtype=np.float32)
    q_id[gkey[sel], rank[sel]] = ids[sel]
    q_val[gkey[sel], rank[sel]] = vals[sel]
    return q_id.reshape(F, Q, M), q_val.reshape(F, Q, M)
