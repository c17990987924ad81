"""The constants of the dashboards store format (what a dashboard records, :class:`DashboardConfig`,
is defined with the other settings in :mod:`pipeline.analysis.options`).

The steps and the store's layout are described in docs/dashboards.md.
"""

from __future__ import annotations

from pipeline.analysis.options import MAX_SEQ_LEN, POS_BITS, DashboardConfig

#: the store's format name and version, in its zarr.json attributes under META_KEY
FORMAT = "circuit-pipeline/feature-dashboards"
FORMAT_VERSION = 1
META_KEY = "dashboards"
#: features per inner chunk of the per-feature arrays (one shard per layer holds them all)
FEATURE_CHUNK = 256
#: elements per chunk of the 1-D tables (sequences, labels, vocab)
SPAN_CHUNK = 1 << 16

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_KEY",
    "POS_BITS",
    "MAX_SEQ_LEN",
    "FEATURE_CHUNK",
    "SPAN_CHUNK",
    "DashboardConfig",
]
