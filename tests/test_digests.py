"""Weight digests remembered across processes: reused while a file's stat holds, recomputed when
it changes, never remembered for a file written in the last moments, never an error."""

from __future__ import annotations

import hashlib
import os

import pytest

from pipeline import digests
from pipeline.engine.replacement import ReplacementModel


@pytest.fixture
def fresh_process(monkeypatch, tmp_path):
    """A cache directory of its own; ``new()`` forgets what this process memoised, as a new
    process would, so only the database can answer."""
    monkeypatch.setenv(digests.CACHE_ENV, str(tmp_path / "cache"))

    def new() -> None:
        digests._MEMO.clear()

    new()
    yield new
    new()


def _counting(value: str):
    calls = []

    def compute() -> str:
        calls.append(1)
        return value

    return compute, calls


def test_file_digest_is_the_sha256_of_its_bytes(tmp_path, fresh_process):
    path = tmp_path / "w.bin"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert digests.file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_a_settled_file_is_hashed_once_per_machine(tmp_path, fresh_process, monkeypatch):
    monkeypatch.setattr(digests, "RACY_SECONDS", 0.0)  # the file below counts as settled
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    compute, calls = _counting("first")
    assert digests.remembered("kind", [path], compute) == "first"
    fresh_process()
    assert digests.remembered("kind", [path], compute) == "first"
    assert len(calls) == 1
    assert (tmp_path / "cache" / "digests.sqlite").exists()
    # another kind, or other extra inputs, is another entry
    assert digests.remembered("kind", [path], _counting("other")[0], extra="bfloat16") == "other"


def test_a_changed_stat_is_recomputed(tmp_path, fresh_process, monkeypatch):
    monkeypatch.setattr(digests, "RACY_SECONDS", 0.0)
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    st = path.stat()
    assert digests.remembered("kind", [path], lambda: "before") == "before"
    fresh_process()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10 * 10**9))  # another stat, still settled
    assert digests.remembered("kind", [path], lambda: "after") == "after"


def test_a_file_written_just_now_is_never_remembered(tmp_path, fresh_process):
    """A rewrite within one clock tick can keep size and timestamps: such a file is hashed on
    every call until it has settled (git's racily clean files)."""
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 4096)
    first = digests.file_sha256(path)
    path.write_bytes(b"b" * 4096)  # same size, most likely the same timestamp
    fresh_process()
    assert digests.file_sha256(path) != first
    assert digests.file_sha256(path) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_remembering_off_or_impossible_still_gives_the_digest(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "RACY_SECONDS", 0.0)
    path = tmp_path / "w.bin"
    path.write_bytes(b"xyz" * 100)
    want = hashlib.sha256(b"xyz" * 100).hexdigest()
    monkeypatch.setenv(digests.CACHE_ENV, "off")
    digests._MEMO.clear()
    assert digests.cache_dir() is None
    assert digests.file_sha256(path) == want
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(digests.CACHE_ENV, str(blocker / "cache"))  # cannot be created
    digests._MEMO.clear()
    assert digests.file_sha256(path) == want
    digests._MEMO.clear()


def test_model_digest_is_remembered_under_its_directory(tiny_gpt2_dir, plt_dir, fresh_process, monkeypatch):
    monkeypatch.setattr(digests, "RACY_SECONDS", 0.0)
    model = ReplacementModel.from_pretrained(tiny_gpt2_dir, plt_dir)
    want = model._hash_state_dict()
    assert model.digest() == want
    fresh_process()
    again = ReplacementModel.from_pretrained(tiny_gpt2_dir, plt_dir)

    def must_not_hash() -> str:
        raise AssertionError("the model's weights were hashed again")

    monkeypatch.setattr(again, "_hash_state_dict", must_not_hash)
    assert again.digest() == want
    # a model built in memory has no files to key on: hashed every time
    bare = ReplacementModel(model.bridge, model.transcoders)
    assert bare._weight_files == [] and bare.digest() == want
