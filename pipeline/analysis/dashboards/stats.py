"""Streaming per-feature statistics of one layer (docs/dashboards.md, steps 2 and 4).

Firing count and sum, a log-binned histogram, the top-k entries by (activation desc, token id
asc) and, per histogram bin, a reservoir of the entries with the smallest seeded hash key.
The state is a set of dense tensors on the model's device, and a batch is folded in with a
handful of tensor ops there: bincounts for the counts and the histogram, then, for the top-k
and the reservoirs, one sorted merge of the entries that beat a row's current last entry into
the rows they touch. Each merge keeps the smallest entries of a total order, so the state does
not depend on how the stream is batched. The quantile groups and their examples are read from
the state once, at the end (numpy).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .config import DashboardConfig


def _int64(c: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``c`` (taken mod 2**64)."""
    c %= 1 << 64
    return c - (1 << 64) if c >= 1 << 63 else c


_M1 = _int64(0xBF58476D1CE4E5B9)
_M2 = _int64(0x94D049BB133111EB)
_GOLD = _int64(0x9E3779B97F4A7C15)
_SIGN = _int64(1 << 63)


def _shift_right(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` shifts the sign bit in)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash_keys(tids: Tensor, layer: int, features: Tensor, seed: int) -> Tensor:
    """A seeded pseudo-random key per (token, layer, feature) (splitmix64).

    tids, features: (n,) int64 -> (n,) int64 keys. The hash is unsigned 64-bit arithmetic;
    torch has none, but int64 multiplication and xor wrap to the same bits, shifts are made
    logical, and the sign bit is flipped at the end so that comparing the int64 keys orders
    them as the unsigned hashes. For a fixed (layer, feature, seed) every step is a bijection,
    so no two tokens of a feature share a key.
    """
    x = tids * _GOLD
    x = x ^ ((features + layer * (1 << 32)) * _M2)
    x = x ^ _int64(seed * _M1 + _GOLD)
    x = x ^ _shift_right(x, 30)
    x = x * _M1
    x = x ^ _shift_right(x, 27)
    x = x * _M2
    x = x ^ _shift_right(x, 31)
    return x ^ _SIGN


def _lex_order(major: Tensor, minor: Tensor) -> Tensor:
    """The permutation sorting (n,) pairs by (major, minor): a stable sort on the major key
    after a sort on the minor one, skipped when the minor keys are already ascending (token
    ids arrive in order from the stream)."""
    if bool((minor[1:] >= minor[:-1]).all()):
        return torch.argsort(major, stable=True)
    order = torch.argsort(minor)
    return order[torch.argsort(major[order], stable=True)]


def _rank_in_group(groups: Tensor) -> Tensor:
    """Rank of each element within its run of equal values: (n,) sorted -> (n,)."""
    index = torch.arange(groups.numel(), device=groups.device)
    starts = torch.ones_like(groups, dtype=torch.bool)
    starts[1:] = groups[1:] != groups[:-1]
    first = torch.where(starts, index, 0).cummax(0).values  # where each element's run starts
    return index - first


def _insert_sorted(
    tables: tuple[Tensor, Tensor],
    empty: tuple[float, float],
    u: Tensor,
    inv: Tensor,
    n_before: Tensor,
    new: tuple[Tensor, Tensor],
) -> None:
    """Insert sorted candidates into the sorted rows of a pair of (R, W) tables, in place.

    tables: (ids, values) whose rows are sorted by the merge order, empty entries last
    empty: what an empty entry holds in each table
    u, inv: (U,) the rows the candidates go to, ascending, and (n,) each candidate's index
        into u; the candidates are sorted by (row, merge order)
    n_before: (n,) how many of its row's entries come before each candidate
    new: (n,) ids and values of the candidates

    A candidate lands at n_before + its rank among its row's candidates; the row's entries
    keep their order in the positions left free; whatever falls past W drops out. Only the
    touched rows are rewritten, and nothing already in them is sorted again.
    """
    width = tables[0].shape[1]
    pos = n_before + _rank_in_group(inv)
    keep = (pos < width).nonzero().squeeze(1)
    at = (inv.index_select(0, keep), pos.index_select(0, keep))
    taken = torch.zeros((u.numel(), width), dtype=torch.bool, device=u.device)
    taken[at] = True
    source = ((~taken).cumsum(1) - 1).clamp(min=0)  # the k-th free position takes entry k
    for table, fill, values in zip(tables, empty, new):
        row = table.index_select(0, u).gather(1, source)
        row.masked_fill_(taken, fill)
        row[at] = values.index_select(0, keep)
        table.index_copy_(0, u, row)


def _select(index: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
    """The elements ``index`` (m,) of each of the (n,) tensors ``xs``."""
    return tuple(x.index_select(0, index) for x in xs)


def _descending_code(vals: Tensor) -> Tensor:
    """(n,) float32 activations > 0 -> (n,) int64 in [0, 2**31), smaller for larger values.

    The bits of a positive float32, read as an integer, grow with the value.
    """
    return (2**31 - 1) - vals.view(torch.int32).to(torch.int64)


class LayerState:
    """Streaming statistics of one layer's features; ``NAMES`` are the arrays a checkpoint holds.

    Tensors on ``device``: count (F,) int64, sum (F,) float64, hist (F, H) int64; top_val
    (F, K) float32 / top_id (F, K) int64, best first (-inf / -1 empty); res_id (F * H, M)
    int64 / res_val (F * H, M) float32: per (feature, bin) slot ``f * H + bin`` the reservoir,
    in hash key order (-1 / 0 empty).
    """

    NAMES = ("count", "sum", "hist", "top_val", "top_id", "res_id", "res_val")

    def __init__(
        self,
        n_features: int,
        cfg: DashboardConfig,
        arrays: dict[str, np.ndarray] | None = None,
        device: torch.device | str = "cpu",
    ):
        F, H, K, M = n_features, cfg.n_bins, cfg.top_k, cfg.examples_per_quantile
        self.F, self.H, self.K, self.M = F, H, K, M
        self.device = torch.device(device)
        if arrays is not None:
            for name in self.NAMES:
                setattr(self, name, torch.as_tensor(np.asarray(arrays[name])).to(self.device))
            return
        dev = self.device
        self.count = torch.zeros(F, dtype=torch.int64, device=dev)
        self.sum = torch.zeros(F, dtype=torch.float64, device=dev)
        self.hist = torch.zeros((F, H), dtype=torch.int64, device=dev)
        self.top_val = torch.full((F, K), -torch.inf, dtype=torch.float32, device=dev)
        self.top_id = torch.full((F, K), -1, dtype=torch.int64, device=dev)
        self.res_id = torch.full((F * H, M), -1, dtype=torch.int64, device=dev)
        self.res_val = torch.zeros((F * H, M), dtype=torch.float32, device=dev)

    def arrays(self) -> dict[str, np.ndarray]:
        """The state as numpy arrays (views of it on the CPU, copies from another device).

        ``LayerState(F, cfg, arrays)`` takes such arrays back (sharing their memory on the CPU).
        """
        return {name: getattr(self, name).cpu().numpy() for name in self.NAMES}


def update_layer(
    st: LayerState,
    layer: int,
    tids: Tensor | np.ndarray,
    feats: Tensor | np.ndarray,
    vals: Tensor | np.ndarray,
    inner_edges: Tensor | np.ndarray,
    seed: int,
) -> None:
    """Fold one batch's firing entries of one layer into its state.

    tids, feats, vals: (n,) token id (int64), feature (int64), activation (float32, > 0) of
    every firing entry, in any order; they are moved to the state's device.
    inner_edges: (hist_bins + 1,) float64, the histogram's finite edges above 0
    """
    dev = st.device
    tids = torch.as_tensor(tids, device=dev).long()
    feats = torch.as_tensor(feats, device=dev).long()
    vals = torch.as_tensor(vals, device=dev).float()
    if vals.numel() == 0:
        return
    if not bool(torch.isfinite(vals).all()):
        raise ValueError(f"layer {layer} has non-finite feature activations; check the model and transcoders")
    F, H = st.F, st.H
    # 1. count, sum and histogram (float32 activations sum exactly in float64 in practice, so
    # the sum does not depend on the batching either)
    st.count += torch.bincount(feats, minlength=F)
    st.sum += torch.bincount(feats, weights=vals.double(), minlength=F)
    edges = torch.as_tensor(inner_edges, dtype=torch.float64, device=dev)
    slots = feats * H + torch.searchsorted(edges, vals.double(), right=True)
    st.hist.view(-1).index_add_(0, slots, torch.ones_like(slots))  # O(n), not O(F * H)
    # 2. top-k by (activation desc, token id asc)
    _merge_top(st, tids, feats, vals)
    # 3. reservoirs: per (feature, bin) the entries with the smallest hash key
    _merge_reservoirs(st, layer, seed, slots, tids, feats, vals)


def _merge_top(st: LayerState, tids: Tensor, feats: Tensor, vals: Tensor) -> None:
    """Merge the entries (n,) into the top-k tables; those behind a full row's last drop first."""
    # (-inf, -1) while the row is not full
    last_val, last_id = st.top_val[:, -1].index_select(0, feats), st.top_id[:, -1].index_select(0, feats)
    beats = ((vals > last_val) | ((vals == last_val) & (tids < last_id))).nonzero().squeeze(1)
    if beats.numel() == 0:
        return
    f, v, t = _select(beats, feats, vals, tids)
    # features below 2**32, so (feature, activation desc) fits one int64 sort key
    f, v, t = _select(_lex_order((f << 31) | _descending_code(v), t), f, v, t)
    u, inv = torch.unique_consecutive(f, return_inverse=True)
    old_val, old_id = (x.index_select(0, u).index_select(0, inv) for x in (st.top_val, st.top_id))  # (n, K)
    v_, t_ = v[:, None], t[:, None]
    n_before = ((old_val > v_) | ((old_val == v_) & (old_id < t_))).sum(1)  # empties never come first
    _insert_sorted((st.top_id, st.top_val), (-1, -torch.inf), u, inv, n_before, (t, v))


def _merge_reservoirs(
    st: LayerState, layer: int, seed: int, slots: Tensor, tids: Tensor, feats: Tensor, vals: Tensor
) -> None:
    """Merge the entries (n,) into the reservoirs of their (feature, bin) ``slots``.

    A slot keeps the M smallest hash keys; an entry above a full slot's last key drops first.
    Keys are distinct within a feature (:func:`hash_keys`), so the key alone orders a slot.
    """
    keys = hash_keys(tids, layer, feats, seed)
    last = st.res_id[:, -1].index_select(0, slots)  # -1 while the slot is not full
    beats = ((last < 0) | (keys < hash_keys(last, layer, feats, seed))).nonzero().squeeze(1)
    if beats.numel() == 0:
        return
    s, k, t, v = _select(beats, slots, keys, tids, vals)
    s, k, t, v = _select(_lex_order(s, k), s, k, t, v)
    u, inv = torch.unique_consecutive(s, return_inverse=True)
    old_id = st.res_id.index_select(0, u)  # (U, M)
    old_key = hash_keys(old_id, layer, (u // st.H)[:, None], seed)
    old_key.masked_fill_(old_id < 0, torch.iinfo(torch.int64).max)  # empties never come first
    n_before = (old_key.index_select(0, inv) < k[:, None]).sum(1)
    _insert_sorted((st.res_id, st.res_val), (-1, 0.0), u, inv, n_before, (t, v))


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
    ids = st.res_id.cpu().numpy().reshape(-1)
    vals = st.res_val.cpu().numpy().reshape(-1)
    slot = np.repeat(np.arange(F * H), M)
    full = ids >= 0
    ids, vals, slot = ids[full], vals[full], slot[full]
    feats, bins = slot // H, slot % H
    group = _group_of_bins(bounds, H)[feats, bins]
    gkey = feats * Q + group
    keys = hash_keys(torch.from_numpy(ids), layer, torch.from_numpy(feats), seed).numpy()
    order = np.lexsort((ids, keys, gkey))
    gkey, ids, vals = gkey[order], ids[order], vals[order]
    rank = np.arange(gkey.size) - np.searchsorted(gkey, gkey, side="left")
    sel = rank < M
    q_id = np.full((F * Q, M), -1, dtype=np.int64)
    q_val = np.zeros((F * Q, M), dtype=np.float32)
    q_id[gkey[sel], rank[sel]] = ids[sel]
    q_val[gkey[sel], rank[sel]] = vals[sel]
    return q_id.reshape(F, Q, M), q_val.reshape(F, Q, M)
