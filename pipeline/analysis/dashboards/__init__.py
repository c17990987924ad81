"""Feature dashboards computed locally from a corpus: what makes each feature fire, what it writes.

``compute_dashboards(model, corpus, out)`` streams a corpus through the clean base model and
writes one Zarr store; ``Dashboards.open(out).feature(layer, index)`` answers one feature as a
JSON-able dict, ``.labels()`` gives the automatic labels for graph export, and
``export_feature_json`` writes the per-feature files a viewer fetches for one graph.
How it works and the store's layout: docs/dashboards.md.

Modules: config (DashboardConfig, format constants), corpus (corpora, sequences, batches),
stats (streaming per-feature statistics), checkpoint, logits, labels, compute (the run),
writer (the store), store (the reader and the per-feature JSON).
"""

from .compute import compute_dashboards
from .config import DashboardConfig
from .corpus import TextFileCorpus, hf_dataset_corpus, organism_corpus, read_corpus
from .store import Dashboards, export_feature_json, feature_json_bytes, graph_features

__all__ = [
    "DashboardConfig",
    "Dashboards",
    "TextFileCorpus",
    "compute_dashboards",
    "export_feature_json",
    "feature_json_bytes",
    "graph_features",
    "hf_dataset_corpus",
    "organism_corpus",
    "read_corpus",
]
