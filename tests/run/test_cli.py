"""The command line runs the engine and reports where its result is."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline import testing
from pipeline.engine.options import AttributionConfig
from pipeline.graph.store import Graph
from pipeline.run.cli import build_parser, main
from pipeline.run.config import DTYPES, AttributionSpec, PruningSpec


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


def _given(cls) -> tuple[list[str], dict]:
    """Every field of ``cls`` as its command-line option with a value other than its default."""
    argv, values = [], {}
    for f in dataclasses.fields(cls):
        if f.type in ("bool", bool):
            argv.append(f"--{f.name.replace('_', '-')}" if not f.default else f"--no-{f.name.replace('_', '-')}")
            values[f.name] = not f.default
        else:
            if f.name == "dtype":
                value = f.metadata.get("choices", ("float64",))[-1]
            elif f.metadata.get("check") == "probability":  # in (0, 1]: half the default
                value = f.default / 2
            else:
                value = (f.default or 1) + 1
            argv += [f"--{f.name.replace('_', '-')}", str(value)]
            values[f.name] = value
    return argv, values


def test_attribution_and_pruning_options_are_the_dataclass_fields(capsys):
    """`attribute` has an option per AttributionSpec field (AttributionConfig's options and the
    load dtype): its name, type, default and help; `study` has those and PruningSpec's, None
    unless given (given, they override the composed config)."""
    required = ["--model", "m", "--transcoders", "t", "--prompt", "p", "--out", "o"]
    args = build_parser().parse_args(["attribute", *required])
    assert {f.name: getattr(args, f.name) for f in dataclasses.fields(AttributionSpec)} == dataclasses.asdict(
        AttributionSpec()
    )
    argv, values = _given(AttributionSpec)
    args = build_parser().parse_args(["attribute", *required, *argv])
    assert {name: getattr(args, name) for name in values} == values
    args = build_parser().parse_args(["study"])
    assert all(getattr(args, f.name) is None for cls in (AttributionSpec, PruningSpec) for f in dataclasses.fields(cls))
    for cls in (AttributionSpec, PruningSpec):
        argv, values = _given(cls)
        args = build_parser().parse_args(["study", *argv])
        assert {name: getattr(args, name) for name in values} == values
    for command, classes in (("attribute", (AttributionSpec,)), ("study", (AttributionSpec, PruningSpec))):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        shown = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
        for f in (f for cls in classes for f in dataclasses.fields(cls)):
            assert "".join(f.metadata["help"].split()) in shown, f.name
    assert {f.name for f in dataclasses.fields(AttributionConfig)} < {
        f.name for f in dataclasses.fields(AttributionSpec)
    }
    assert AttributionSpec.__dataclass_fields__["dtype"].metadata["choices"] == DTYPES


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "-1"], "argument --threads: -1 is not positive: give an integer >= 1"),
        (["--threads", "two"], "argument --threads: 'two' is not an integer"),
        (["--batch-size", "0"], "argument --batch-size: 0 is not positive"),
        (["--desired-logit-prob", "1.5"], r"argument --desired-logit-prob: 1.5 is not in (0, 1]"),
        (["--desired-logit-prob", "nan"], r"argument --desired-logit-prob: nan is not in (0, 1]"),
    ],
)
def test_attribute_arguments_are_checked_by_argparse(argv, message, capsys):
    required = ["--model", "m", "--transcoders", "t", "--prompt", "p", "--out", "o"]
    with pytest.raises(SystemExit) as exc:
        main(["attribute", *required, *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_and_aggregate_need_existing_folders(tmp_path, capsys):
    for argv in (["serve", str(tmp_path / "nope")], ["aggregate", str(tmp_path / "nope")]):
        with pytest.raises(SystemExit):
            main(argv)
        assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path), "--port", "70000"])
    assert "70000 is not a port number" in capsys.readouterr().err


def test_attribute_command_refuses_unknown_words_unless_allowed(tmp_path, tiny_gpt2_dir, plt_dir, capsys):
    words = testing.vocabulary_words(tiny_gpt2_dir)
    base = ["-q", "attribute", "--model", str(tiny_gpt2_dir), "--transcoders", str(plt_dir)]
    prompt = " ".join(words[3:8])
    rc = main([*base, "--prompt", f"{prompt} Austn", "--out", str(tmp_path / "a.zarr")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not know the prompt's word 'Austn'" in err and "--allow-unknown-tokens" in err
    rc = main([*base, "--prompt", prompt, "--logit-target", "Austn", "--out", str(tmp_path / "a.zarr")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not know the logit target 'Austn'" in err and "\n" not in err
    assert not (tmp_path / "a.zarr").exists()
    rc = main(
        [
            *base,
            "--prompt",
            prompt,
            "--logit-target",
            "Austn",
            "--allow-unknown-tokens",
            "--out",
            str(tmp_path / "b.zarr"),
        ]
    )
    assert rc == 0 and Graph.open(tmp_path / "b.zarr").n_logits == 1


def test_attribute_command_reports_a_non_utf8_prompt(tmp_path, tiny_gpt2_dir, plt_dir, capsys):
    prompt = b"the \xe9 river".decode("utf-8", "surrogateescape")  # a Latin-1 byte on the command line
    base = ["-q", "attribute", "--model", str(tiny_gpt2_dir), "--transcoders", str(plt_dir)]
    rc = main([*base, "--prompt", prompt, "--out", str(tmp_path / "a.zarr")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "the prompt is not valid UTF-8 text (byte 0xe9) at character 4" in err


@pytest.mark.parametrize("command", ["attribute", "features", "demo"])
def test_a_device_this_machine_lacks_is_one_line_before_anything_loads(
    command, tmp_path, tiny_gpt2_dir, plt_dir, capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    paths = ["--model", str(tiny_gpt2_dir), "--transcoders", str(plt_dir)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the\n")
    out = tmp_path / "out"
    argv = {
        "attribute": [*paths, "--prompt", "the", "--out", str(out)],
        "features": [*paths, "--corpus", str(corpus), "--out", str(out)],
        "demo": ["--out", str(out)],
    }[command]
    assert main(["-q", command, *argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: device 'cuda' asked for, but") and err.endswith("or use device cpu")
    assert "\n" not in err
    assert not out.exists()  # nothing written, nothing built


def test_device_and_dtype_reach_the_model(tmp_path, tiny_gpt2_dir, plt_skip_dir, monkeypatch):
    """--device and --dtype of attribute, features and demo are what the model is loaded with."""
    from pipeline.engine.replacement import ReplacementModel

    loaded = []

    def spy(cls, *args, **kwargs):
        loaded.append((kwargs.get("device"), kwargs.get("dtype")))
        raise ValueError("stop here")

    monkeypatch.setattr(ReplacementModel, "from_pretrained", classmethod(spy))
    paths = ["--model", str(tiny_gpt2_dir), "--transcoders", str(plt_skip_dir)]
    corpus = tmp_path / "c.txt"
    corpus.write_text("the\n")
    for argv in (
        ["attribute", *paths, "--prompt", "the", "--out", str(tmp_path / "g.zarr")],
        ["features", *paths, "--corpus", str(corpus), "--out", str(tmp_path / "d.zarr")],
        ["demo", "--out", str(tmp_path / "demo")],
    ):
        assert main(["-q", *argv, "--device", "cpu", "--dtype", "bfloat16"]) == 2
    assert loaded == [("cpu", "bfloat16")] * 3


def test_study_device_flag_is_the_launchers_device():
    from pipeline.run.cli import _study_overrides

    args = build_parser().parse_args(["study", "launcher=ray", "--device", "cuda"])
    assert _study_overrides(args) == ["launcher=ray", "launcher.device=cuda"]
    args = build_parser().parse_args(["study", "launcher.device=cuda", "--device", "cpu"])
    with pytest.raises(ValueError, match="launcher.device given twice"):
        _study_overrides(args)
