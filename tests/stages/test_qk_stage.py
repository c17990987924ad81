"""The qk DVC stage on a tiny fixture (no DVC, no organism build): results/<id>/attention/ as
explain_attention gives it, the graph store left as it was, byte-identical on a rerun, a
killed run's partial work resumed and its temporaries removed, config errors naming the key."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline import _io, testing  # noqa: E402
from pipeline.analysis.attention import explain_attention  # noqa: E402
from pipeline.engine.attribution import attribute  # noqa: E402
from pipeline.engine.head_loadings import read_head_loadings  # noqa: E402
from pipeline.engine.replacement import ReplacementModel  # noqa: E402
from pipeline.graph.pruned import load_pruned_graph, save_pruned_graph  # noqa: E402
from pipeline.graph.pruning import prune_graph  # noqa: E402
from pipeline.graph.store import Graph  # noqa: E402
from pipeline.run.compose import ConfigError  # noqa: E402
from stages import qk  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QK = {"edges": 10, "heads": 3, "terms": 5, "expand_attention": False, "chunk_size": 4}


@pytest.fixture(scope="module")
def study(tiny_gpt2_dir, plt_dir, tmp_path_factory):
    """params.yaml (tiny model + PLTs, one prompt) and the prompt's graph store and pruning, as
    the attribute and prune stages leave them."""
    root = tmp_path_factory.mktemp("qk_study")
    text = " ".join(testing.vocabulary_words(tiny_gpt2_dir)[3:10])
    model = ReplacementModel.from_pretrained(tiny_gpt2_dir, plt_dir, dtype=torch.float32)
    graph = attribute(text, model, store=root / "results" / "p" / "graph.zarr", verbose=False)
    save_pruned_graph(graph, prune_graph(graph, 0.8, 0.98), root / "results" / "p" / "pruned.npz")
    params = {
        "model": {"name": str(tiny_gpt2_dir), "dep": str(tiny_gpt2_dir), "revision": None},
        "transcoders": {"source": str(plt_dir), "kind": "plt", "dep": str(plt_dir), "revision": None},
        "prompts": {"name": "tiny", "items": {"p": {"prompt": text}}},
        "runtime": {"threads": 1, "device": "cpu"},
        "qk": QK,
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def digest_tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


def test_stage_writes_the_attention_folder_and_leaves_the_graph_store(study, monkeypatch):
    monkeypatch.chdir(study)
    graph_before = digest_tree(Path("results/p/graph.zarr"))
    stale = Path("results/p") / f"{_io.temp_prefix(Path('results/p/attention'))}99999999.k3j_x9qa{_io.TMP_SUFFIX}"
    stale.mkdir(parents=True)  # a killed run's temporary (its pid is gone)
    qk.main(["--prompt-id", "p"])
    out = Path("results/p/attention")
    assert sorted(p.name for p in out.iterdir()) == ["attention.json", "head_loadings.zarr"]
    assert not stale.exists() and not Path("tmp/partial/p/attention").exists()
    assert digest_tree(Path("results/p/graph.zarr")) == graph_before
    doc = json.loads((out / "attention.json").read_text())
    graph = Graph.open("results/p/graph.zarr")
    model = ReplacementModel.from_pretrained(
        yaml.safe_load(Path("params.yaml").read_text())["model"]["name"],
        yaml.safe_load(Path("params.yaml").read_text())["transcoders"]["source"],
        dtype=torch.float32,
    )
    counts = {k: QK[k] for k in ("edges", "heads", "terms", "expand_attention")}
    # the stage's chunking too: float32 loadings round differently in other batches of edges
    expected = explain_attention(
        graph,
        load_pruned_graph("results/p/pruned.npz"),
        model,
        prompt_id="p",
        progress=False,
        chunk_size=QK["chunk_size"],
        **counts,
    )
    assert doc == json.loads(json.dumps(expected))
    assert doc["prompt_id"] == "p" and doc["config"] == counts and doc["heads"]
    table = read_head_loadings(graph, out=out / "head_loadings.zarr")
    assert len(table) == len(doc["edges"]) and table.pair_abs is not None
    first = digest_tree(out)
    shutil.rmtree(out)
    qk.main(["--prompt-id", "p"])
    assert digest_tree(out) == first  # byte-identical


def test_stage_resumes_a_killed_runs_head_loadings(study, monkeypatch):
    from pipeline.engine import head_loadings as HL

    monkeypatch.chdir(study)
    before = (Path("results/p/attention/attention.json")).read_bytes() if Path("results/p/attention").exists() else None
    real = HL._compute_chunk
    calls = []

    def killed_after_one(*args):
        if calls:
            raise KeyboardInterrupt  # as if killed while computing the second chunk
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(HL, "_compute_chunk", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        qk.main(["--prompt-id", "p"])
    assert (Path("tmp/partial/p/attention/head_loadings.zarr") / "chunk_000000").is_dir()
    resumed = []
    monkeypatch.setattr(HL, "_compute_chunk", lambda *a: resumed.append(1) or real(*a))
    qk.main(["--prompt-id", "p"])
    n_chunks = -(-len(json.loads(Path("results/p/attention/attention.json").read_text())["edges"]) // QK["chunk_size"])
    assert len(resumed) == n_chunks - 1 and not Path("tmp/partial/p/attention").exists()
    if before is not None:
        assert Path("results/p/attention/attention.json").read_bytes() == before


@pytest.mark.parametrize("key", ["edges", "heads", "terms", "chunk_size"])
def test_a_bad_qk_value_is_refused_naming_the_key(study, tmp_path, monkeypatch, key):
    params = yaml.safe_load((study / "params.yaml").read_text())
    params["qk"][key] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ConfigError, ValueError), match=rf"qk\.{key} must be a positive integer, got 0"):
        qk.main(["--prompt-id", "p"])
