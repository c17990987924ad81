"""The command line runs the engine and reports where its result is."""

from __future__ import annotations

from pipeline import testing
from pipeline.graph.store import Graph
from pipeline.run.cli import main


def test_attribute_command_writes_a_store_and_prints_a_summary(tmp_path, tiny_gpt2_dir, plt_skip_dir, capsys):
    prompt = " ".join(testing.vocabulary_words(tiny_gpt2_dir)[3:9])
    out = tmp_path / "graph.zarr"
    rc = main(
        [
            "-q",
            "attribute",
            "--model",
            str(tiny_gpt2_dir),
            "--transcoders",
            str(plt_skip_dir),
            "--prompt",
            prompt,
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--max-feature-nodes",
            "5",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    graph = Graph.open(out)
    assert f"nodes={graph.n_nodes}" in printed and str(out) in printed and "peak_rss=" in printed
    assert graph.n_selected == 5


def test_attribute_command_reports_bad_input_in_one_line(tmp_path, tiny_gpt2_dir, plt_dir, capsys):
    rc = main(
        [
            "-q",
            "attribute",
            "--model",
            str(tiny_gpt2_dir),
            "--transcoders",
            str(plt_dir),
            "--prompt",
            "  ",
            "--out",
            str(tmp_path / "g.zarr"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "empty" in err and "\n" not in err
    assert not (tmp_path / "g.zarr").exists()
