"""Out-of-core primitives of pruning: passes over a graph's row blocks in bounded memory.

A graph is read one stored row block at a time (``graph.iter_row_blocks()``); pruning keeps
O(n_nodes) vectors plus one block, and each power-series term is one pass over the blocks.
:class:`RowBlocks` may cache the blocks in memory up to a byte budget, so later passes need not
read the store again. :func:`streaming_threshold` is ``find_threshold`` over scores that arrive
in chunks: an exact selection by radix histograms over the float64 bit patterns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import scipy.sparse as sp

__all__ = [
    "RowBlocks",
    "influence_series",
    "normalized_data",
    "row_ids",
    "row_stats",
    "row_sums",
    "streaming_threshold",
]


class RowBlocks:
    """Re-iterable view of ``graph.iter_row_blocks()`` with canonical CSR blocks.

    The first full pass also caches the blocks in memory while they fit in ``cache_bytes``;
    later passes then read the cache (same blocks, same order, so the same arithmetic).
    """

    def __init__(self, graph, cache_bytes: int):
        self.graph = graph
        self.n = int(graph.n_nodes)
        self.cache_bytes = int(cache_bytes)
        self.cache: list | None = None
        self.passes = 0

    def _canonical(self, rows, block):
        rows = np.asarray(rows, dtype=np.int64).ravel()
        m = sp.csr_matrix(block, copy=True)
        if m.shape != (rows.shape[0], self.n):
            raise ValueError(f"row block has shape {m.shape}, expected ({rows.shape[0]}, {self.n})")
        m.sum_duplicates()
        m.eliminate_zeros()
        m.sort_indices()
        return rows, m

    def __iter__(self) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        self.passes += 1
        if self.cache is not None:
            yield from self.cache
            return
        building = self.cache_bytes > 0
        cache: list[tuple[np.ndarray, sp.csr_matrix]] = []
        used = 0
        for rows, block in self.graph.iter_row_blocks():
            rows, m = self._canonical(rows, block)
            if building:
                used += rows.nbytes + m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
                if used > self.cache_bytes:
                    building, cache = False, []
                else:
                    cache.append((rows, m))
            yield rows, m
        if building:
            self.cache = cache


def _abs64(m: sp.csr_matrix) -> np.ndarray:
    return np.abs(m.data.astype(np.float64, copy=False))


def row_ids(m: sp.csr_matrix) -> np.ndarray:
    """(nnz,) the row of each stored entry of ``m``."""
    return np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))


def normalized_data(rows, m, denom, keep=None) -> np.ndarray:
    """(nnz,) entries of the row-normalised |block|: ``|m| / denom[rows]``, zero outside the
    kept rows and columns when ``keep`` (n_nodes,) bool is given."""
    data = _abs64(m)
    if keep is not None:
        data = data * (keep[m.indices] & np.repeat(keep[rows], np.diff(m.indptr)))
    return data / np.repeat(denom[rows], np.diff(m.indptr))


def _block_row_sums(m: sp.csr_matrix, data: np.ndarray) -> np.ndarray:
    return np.bincount(row_ids(m), weights=data, minlength=m.shape[0])


def row_sums(blocks: RowBlocks, keep=None) -> np.ndarray:
    """One pass: (n_nodes,) row sums of |A|, restricted to kept rows and columns if ``keep``."""
    sums = np.zeros(blocks.n, dtype=np.float64)
    for rows, m in blocks:
        data = _abs64(m)
        if keep is not None:
            data = data * (keep[m.indices] & np.repeat(keep[rows], np.diff(m.indptr)))
        sums[rows] = _block_row_sums(m, data)
    return sums


def influence_series(blocks: RowBlocks, denom, w, keep=None) -> tuple[np.ndarray, int]:
    """``w @ (N + N^2 + ...)``, N the blocks normalised by ``denom`` (n_nodes,), one pass per
    term: (influence (n_nodes,), number of non-zero terms). At most ``n_nodes`` terms, as
    ``pruning.compute_influence``; more means a cycle: RuntimeError."""
    n = blocks.n
    max_iter = max(n, 1)
    v = np.asarray(w, dtype=np.float64)
    influence = np.zeros(n, dtype=np.float64)
    depth = 0
    while True:
        nxt = np.zeros(n, dtype=np.float64)
        for rows, m in blocks:
            u = v[rows]
            if not u.any():
                continue
            data = normalized_data(rows, m, denom, keep)
            nm = sp.csr_matrix((data, m.indices, m.indptr), shape=m.shape)
            nxt += nm.T @ u
        if not nxt.any():
            return influence, depth
        depth += 1
        if depth > max_iter:
            raise RuntimeError(
                f"influence series did not terminate after {max_iter} terms: "
                "the adjacency is not nilpotent (does the graph have a cycle?)"
            )
        influence += nxt
        v = nxt


def row_stats(blocks: RowBlocks, n_features: int, fe_end: int, eps: float):
    """One pass: the row sums of |A| (n_nodes,), each row's error-column mass once normalised
    by its sum clamped below at ``eps`` (n_nodes,), and the number of stored entries."""
    n = blocks.n
    sums = np.zeros(n, dtype=np.float64)
    err = np.zeros(n, dtype=np.float64)
    seen = np.zeros(n, dtype=bool)
    nnz = 0
    for rows, m in blocks:
        if seen[rows].any() or np.unique(rows).size != rows.size:
            raise ValueError("graph.iter_row_blocks() yielded a row twice")
        seen[rows] = True
        nnz += m.nnz
        counts = np.diff(m.indptr)
        data = _abs64(m)
        block_sums = _block_row_sums(m, data)
        sums[rows] = block_sums
        ndata = data / np.repeat(np.maximum(block_sums, eps), counts)
        is_err = (m.indices >= n_features) & (m.indices < fe_end)
        err[rows] = np.bincount(row_ids(m)[is_err], weights=ndata[is_err], minlength=rows.size)
    return sums, err, nnz


def streaming_threshold(
    make_iter: Callable[[], Iterable[np.ndarray]],
    threshold: float,
    n_implicit_zeros: int = 0,
    max_candidates: int = 1 << 22,
) -> float:
    """``pruning.find_threshold`` over scores produced in chunks, in bounded memory.

    ``make_iter()`` must yield the same non-negative float64 chunks on every call.  One pass
    sums the mass; while more than ``max_candidates`` scores could hold the answer, a pass
    histograms the candidates' float64 bit patterns (monotone in value for non-negative
    floats) into 4096 bins and narrows to the bin where the cumulative mass crosses
    ``threshold``; a last pass collects that bin and sorts it exactly.
    """
    if threshold >= 1.0:  # keep every positive score, as pruning.find_threshold
        smallest = None
        for s in make_iter():
            s = np.asarray(s, dtype=np.float64)
            positive = s[s > 0]
            if positive.size:
                m = float(positive.min())
                smallest = m if smallest is None else min(smallest, m)
        return 0.0 if smallest is None else smallest
    total, count = 0.0, 0
    for s in make_iter():
        total += float(np.sum(s))
        count += int(np.size(s))
    if count == 0 or not total > 0:
        return 0.0

    def bits_of(s):
        s = np.asarray(s, dtype=np.float64) + 0.0  # -0.0 -> +0.0
        return s, s.view(np.int64)

    lo, hi = 0, 1 << 63  # candidate bit range [lo, hi)
    mass_above = 0.0  # mass of scores whose bits are >= hi
    n_in = count
    nbins = 4096
    crossed = True
    while n_in > max_candidates and hi - lo > 1:
        width = -(-(hi - lo) // nbins)
        counts = np.zeros(nbins, dtype=np.int64)
        sums = np.zeros(nbins, dtype=np.float64)
        for chunk in make_iter():
            s, b = bits_of(chunk)
            sel = (b >= lo) & (b < hi)
            idx = (b[sel] - lo) // width
            counts += np.bincount(idx, minlength=nbins)
            sums += np.bincount(idx, weights=s[sel], minlength=nbins)
        cum = (mass_above + np.cumsum(sums[::-1])) / total
        j = int(np.searchsorted(cum, threshold, side="left"))
        if j >= nbins:  # the mass never reaches the threshold inside the range
            crossed = False
            break
        b_idx = nbins - 1 - j
        mass_above = mass_above + float(np.sum(sums[b_idx + 1 :]))
        lo, hi = lo + b_idx * width, min(hi, lo + (b_idx + 1) * width)
        n_in = int(counts[b_idx])

    if not crossed:
        vals = np.zeros(0)
    elif hi - lo == 1 and n_in > max_candidates:  # one value, tied many times: it is the answer
        return float(np.array([lo], dtype=np.int64).view(np.float64)[0])
    else:
        parts = [s[(b >= lo) & (b < hi)] for s, b in (bits_of(c) for c in make_iter())]
        vals = np.sort(np.concatenate(parts) if parts else np.zeros(0))[::-1]
        if vals.size:
            cumulative = (mass_above + np.cumsum(vals)) / total
            idx = int(np.searchsorted(cumulative, threshold, side="left"))
            if idx < vals.size:
                return float(vals[idx])
    # floating-point rounding kept the cumulative mass below the threshold through the range:
    # like find_threshold, continue with the next smaller score (an implicit zero, if any, or
    # clamp to the smallest score)
    below_max, range_min = None, None
    for chunk in make_iter():
        s, b = bits_of(chunk)
        below = s[b < lo]
        if below.size:
            m = float(below.max())
            below_max = m if below_max is None else max(below_max, m)
        inside = s[(b >= lo) & (b < hi)]
        if inside.size:
            m = float(inside.min())
            range_min = m if range_min is None else min(range_min, m)
    if below_max is not None:
        return below_max
    if n_implicit_zeros > 0 or range_min is None:
        return 0.0
    return range_min
