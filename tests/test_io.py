"""pipeline._io: atomic files and directories, stale temporaries, the JSON encodings."""

from __future__ import annotations

import json
import math
import os

import pytest

from pipeline import _io


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    _io.atomic_write_bytes(path, b"one")
    _io.atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.bin"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_atomic_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    _io.atomic_write_text(path, "old")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io.os, "replace", fail)
    with pytest.raises(OSError):
        _io.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_directory_replaces_on_success_and_keeps_old_on_error(tmp_path):
    target = tmp_path / "d"
    with _io.atomic_directory(target) as tmp:
        (tmp / "x").write_text("1")
    assert (target / "x").read_text() == "1"
    with pytest.raises(RuntimeError):
        with _io.atomic_directory(target) as tmp:
            (tmp / "y").write_text("2")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["x"]
    with _io.atomic_directory(target) as tmp:
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("as_dir", [False, True])
def test_atomic_path_writes_a_file_or_a_directory(tmp_path, as_dir):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale").write_text("old")
    with _io.atomic_path(target) as tmp:
        if as_dir:
            tmp.mkdir()
            (tmp / "new").write_text("n")
        else:
            tmp.write_text("n")
    if as_dir:
        assert sorted(p.name for p in target.iterdir()) == ["new"]
    else:
        assert target.read_text() == "n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_path_refuses_an_empty_result(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with _io.atomic_path(tmp_path / "out"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_remove_stale_temps_removes_only_this_paths_temporaries(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    target = tmp_path / "graph"
    (tmp_path / ".graph.abcdefgh.tmp").mkdir()  # no pid: an older writer's
    (tmp_path / ".graph.def_0123.tmp").write_text("x")
    (tmp_path / f".graph.{dead}.abcdefgh.tmp").mkdir()  # its writer is gone
    (tmp_path / f".graph.{dead}.abcdefgh.old.tmp").mkdir()
    (tmp_path / f".graph.{os.getpid()}.abcdefgh.tmp").mkdir()  # a live writer's (this one)
    (tmp_path / f".graph.png.{dead}.abcdefgh.tmp").write_text("x")  # graph.png's, not graph's
    (tmp_path / ".graph.json.tmp").write_text("x")  # no temporary name of this module
    (tmp_path / ".other.abcdefgh.tmp").write_text("x")
    (tmp_path / "graph").mkdir()
    removed = _io.remove_stale_temps(target)
    assert [p.name for p in removed] == sorted(
        [".graph.abcdefgh.tmp", ".graph.def_0123.tmp", f".graph.{dead}.abcdefgh.tmp", f".graph.{dead}.abcdefgh.old.tmp"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            f".graph.{os.getpid()}.abcdefgh.tmp",
            f".graph.png.{dead}.abcdefgh.tmp",
            ".graph.json.tmp",
            ".other.abcdefgh.tmp",
            "graph",
        ]
    )


def test_temporaries_carry_the_writers_pid(tmp_path):
    target = tmp_path / "out"
    with _io.atomic_path(target) as tmp:
        (temp,) = [p for p in tmp_path.iterdir()]
        assert tmp.parent == temp and _io.temp_owner(temp, target) == os.getpid()
        tmp.write_text("x")
    assert _io.pid_alive(os.getpid()) and not _io.pid_alive(0)
    with pytest.raises(ValueError, match="not a temporary"):
        _io.temp_owner(tmp_path / "out", target)


def test_json_encodings():
    obj = {"b": 1, "a": ["é", 0.5]}
    assert _io.json_text(obj) == '{\n  "a": [\n    "é",\n    0.5\n  ],\n  "b": 1\n}\n'
    assert _io.json_text(obj, sort_keys=False, indent=None) == '{"b":1,"a":["é",0.5]}\n'
    assert _io.json_bytes(obj) == _io.json_text(obj).encode("utf-8")
    with pytest.raises(ValueError):
        _io.json_text({"x": math.nan})
    assert _io.finite_or_none({1: (math.inf, 2.0)}) == {"1": [None, 2.0]}


def test_digest_json_is_the_fixed_hashing_encoding():
    import hashlib

    payload = {"z": [1, 2], "a": "é"}
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    assert _io.digest_json(payload) == expected
    assert _io.digest_json({"a": "é", "z": [1, 2]}) == expected


def test_write_and_read_json_round_trip(tmp_path):
    path = _io.write_json(tmp_path / "x.json", {"k": [1, "ü"]})
    assert _io.read_json(path) == {"k": [1, "ü"]}
    assert path.read_bytes().endswith(b"]\n}\n")


def test_atomic_directory_gets_a_plain_mkdir_mode(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        with _io.atomic_directory(tmp_path / "d") as tmp:
            (tmp / "x").write_text("1")
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(umask)
