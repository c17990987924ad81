"""A graph store's integrity: the writer lock, chunk checksums and checks, a full disk."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from zarr.codecs import BloscCodec

from pipeline import _io
from pipeline.graph import writer as graph_writer
from pipeline.graph.store import Graph, GraphStoreCorruptError, GraphStoreMismatchError, verify_store
from pipeline.graph.writer import GraphStoreDiskFullError
from pipeline.run import cli
from tests.graph.test_store import Case, make_case

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def case() -> Case:
    return make_case()


def finished(case: Case, path: Path) -> Graph:
    return case.finish(case.write(path))


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# The writer lock
# ---------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from pipeline._io import StoreLock

    lock = StoreLock(sys.argv[1])
    print("locked", flush=True)
    sys.stdin.read()  # hold it until killed or stdin closes
    """
)


@pytest.fixture
def holder():
    """Start a process that holds the lock of a path; yields (start, procs)."""
    procs: list[subprocess.Popen] = []

    def start(path: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def can_lock_from_another_process(path: Path) -> bool:
    code = "import sys\nfrom pipeline._io import StoreLock\nStoreLock(sys.argv[1])"
    return subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True).returncode == 0


def test_a_second_writer_fails_fast_naming_the_store_and_the_pid(case: Case, tmp_path: Path, holder) -> None:
    path = tmp_path / "g"
    writer = case.write(path, batches=[0])
    writer.close()
    proc = holder(path)
    with pytest.raises(_io.StoreBusyError, match=rf"another run is writing {path} \(pid {proc.pid}\)"):
        case.open(path)
    proc.kill()  # a killed holder's lock is released by the OS
    proc.wait()
    resumed = case.open(path)
    assert resumed.done_batches == {0}
    case.finish(case.write(path))


def test_creating_a_store_another_process_is_writing_fails_fast(case: Case, tmp_path: Path, holder) -> None:
    path = tmp_path / "g"
    holder(path)
    with pytest.raises(_io.StoreBusyError, match=rf"another run is writing {path}"):
        case.open(path)
    assert not path.exists()


def test_the_lock_is_held_until_finalize_or_close(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "g"
    writer = case.write(path)
    assert not can_lock_from_another_process(path)
    case.finish(writer)
    assert can_lock_from_another_process(path)
    writer = case.open(tmp_path / "h")
    writer.close()
    assert can_lock_from_another_process(tmp_path / "h")


def test_dashboards_refuse_an_output_another_run_is_writing(tmp_path: Path, holder) -> None:
    from pipeline.analysis.dashboards import compute_dashboards

    out = tmp_path / "dash.zarr"
    proc = holder(out)
    with pytest.raises(_io.StoreBusyError, match=rf"another run is writing {out} \(pid {proc.pid}\)"):
        compute_dashboards(None, [], out)


# ---------------------------------------------------------------------------------------------
# Damaged stores
# ---------------------------------------------------------------------------------------------

FIX = r"delete it \(rm -r '.*'\) and re-run attribute"


def test_a_flipped_byte_in_a_value_chunk_fails_its_checksum(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "g"
    finished(case, path)
    chunk = path / "adjacency/batch_000001/values/0"
    flip_byte(chunk, len(chunk.read_bytes()) // 2)
    graph = Graph.open(path)  # same size: the cheap check cannot see it
    with pytest.raises(
        GraphStoreCorruptError,
        match=rf"{path}: array 'adjacency/batch_000001/values' is damaged \(chunk file adjacency/batch_000001/values/0\)",
    ) as err:
        graph.to_scipy_sparse()
    assert "checksum" in str(err.value) and "re-run attribute" in str(err.value)
    with pytest.raises(GraphStoreCorruptError, match="batch 1: file adjacency/batch_000001/values/0 does not match"):
        graph.verify()


def test_a_truncated_chunk_is_refused_on_open(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "g"
    finished(case, path)
    chunk = path / "adjacency/batch_000002/indices/0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(GraphStoreCorruptError, match=rf"batch 2: file adjacency/batch_000002/indices/0 has .*{FIX}"):
        Graph.open(path)


def test_a_deleted_progress_record_is_refused_on_open(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "g"
    finished(case, path)
    (path / "progress/batch_000001.json").unlink()
    with pytest.raises(GraphStoreCorruptError, match=r"batch 1 \(adjacency/batch_000001\) has no progress record"):
        Graph.open(path)


@pytest.mark.parametrize(
    ("damage", "read", "chunk"),
    [
        (
            lambda p: flip_byte(p / "nodes/active_features/0.0", 20),
            lambda g: g.active_features,
            "nodes/active_features/0.0",
        ),
        (
            lambda p: flip_byte(p / "adjacency/row_index/0.0", 0),
            lambda g: g.row(0),
            "adjacency/row_index/0.0",
        ),  # header
        (
            lambda p: flip_byte(p / "nodes/logit_vectors/0.0", 2),
            lambda g: g.table("logit_vectors"),
            "nodes/logit_vectors/0.0",
        ),
        (
            lambda p: (p / "nodes/input_tokens/0").write_bytes((p / "nodes/input_tokens/0").read_bytes()[:5]),
            lambda g: g.input_tokens,
            "nodes/input_tokens/0",
        ),
        (
            lambda p: (p / "nodes/activation_values/0").unlink(),
            lambda g: g.activation_values,
            "nodes/activation_values/0",
        ),
    ],
    ids=["flipped-node-table", "damaged-header", "flipped-table-header", "truncated-table", "missing-chunk"],
)
def test_damaged_node_tables_and_headers_name_store_array_and_chunk(
    case: Case, tmp_path: Path, damage, read, chunk
) -> None:
    path = tmp_path / "g"
    finished(case, path)
    damage(path)
    graph = Graph.open(path)
    array = chunk.rsplit("/", 1)[0]
    with pytest.raises(
        GraphStoreCorruptError, match=rf"{path}: array '{array}' is damaged \(chunk file {chunk}\)"
    ) as err:
        read(graph)
    assert "re-run attribute" in str(err.value)
    problems = verify_store(path)
    assert any(array in p for p in problems), problems


def test_a_damaged_selection_is_refused_on_open(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "g"
    finished(case, path)
    flip_byte(path / "nodes/selected_features/0", 10)
    with pytest.raises(GraphStoreCorruptError, match="array 'nodes/selected_features' is damaged"):
        Graph.open(path)


def test_cli_verify_reports_and_sets_the_exit_code(case: Case, tmp_path: Path, capsys) -> None:
    path = tmp_path / "g"
    finished(case, path)
    assert cli.main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {path}: format 2, 3 batches") and "CRC32C" in out
    flip_byte(path / "adjacency/batch_000000/values/0", 9)
    (path / "progress/batch_000002.json").unlink()
    assert cli.main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"damaged: {path}")
    assert "array adjacency/batch_000000/values is unreadable" in out
    assert "batch 2 (adjacency/batch_000002) has no progress record" in out
    assert "re-run attribute" in out
    assert cli.main(["verify", str(tmp_path / "missing")]) == 1


def test_an_unfinished_store_fails_verify(case: Case, tmp_path: Path) -> None:
    case.write(tmp_path / "g", batches=[0]).close()
    assert verify_store(tmp_path / "g") == [
        "unfinished: attribution has not finished writing it (rerun attribute with the same inputs to resume)"
    ]


def test_stores_of_format_1_without_checksums_still_open(case: Case, tmp_path: Path, monkeypatch, capsys) -> None:
    new = finished(case, tmp_path / "new")
    with monkeypatch.context() as m:
        m.setattr(graph_writer, "FORMAT_VERSION", 1)
        m.setattr(graph_writer, "_compressors", lambda: (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),))
        old = finished(case, tmp_path / "old")
        case.write(tmp_path / "old_unfinished", batches=[0]).close()
    assert "crc32c" not in (tmp_path / "old/adjacency/batch_000000/values/zarr.json").read_text()
    assert "crc32c" in (tmp_path / "new/adjacency/batch_000000/values/zarr.json").read_text()
    old = Graph.open(tmp_path / "old")
    np.testing.assert_array_equal(old.adjacency_dense(), new.adjacency_dense())
    assert verify_store(tmp_path / "old") == []
    assert cli.main(["verify", str(tmp_path / "old")]) == 0
    assert "no chunk checksums (format 1)" in capsys.readouterr().out
    assert case.open(tmp_path / "old").finished  # a rerun of a finished old store returns it
    with pytest.raises(GraphStoreMismatchError, match="unfinished store in format version 1"):
        case.open(tmp_path / "old_unfinished")


def test_checksums_leave_the_values_unchanged(case: Case, tmp_path: Path) -> None:
    graph = finished(case, tmp_path / "g")
    order = case.graph_order()
    np.testing.assert_array_equal(graph.adjacency_dense(), case.dense[np.ix_(order, order)])


# ---------------------------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------------------------


def test_a_full_disk_names_the_store_and_the_rerun_resumes(case: Case, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "g"
    real = graph_writer.write_file

    def full_disk(p, data):
        if "batch_000002" in str(p) and p.name == "0":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(p, data)

    writer = case.write(path, batches=[0, 1])
    monkeypatch.setattr(graph_writer, "write_file", full_disk)
    with pytest.raises(OSError) as err:
        writer.write_batch(2, *case.batches[2])
    monkeypatch.setattr(graph_writer, "write_file", real)
    assert isinstance(err.value, GraphStoreDiskFullError) and err.value.errno == errno.ENOSPC
    message = str(err.value)
    assert f"no space left on device while writing batch 2 of the graph store {path}" in message
    assert "free space and rerun: the run resumes from the last finished batch" in message
    assert not (path / "adjacency/batch_000002").exists()  # the partial batch is freed
    writer.close()
    resumed = case.open(path)
    assert resumed.done_batches == {0, 1}
    graph = case.finish(case.write(path))
    order = case.graph_order()
    np.testing.assert_array_equal(graph.adjacency_dense(), case.dense[np.ix_(order, order)])


def test_a_full_disk_in_finalize_names_the_store(case: Case, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "g"
    writer = case.write(path)

    def full_disk(p, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    monkeypatch.setattr(graph_writer, "write_file", full_disk)
    with pytest.raises(GraphStoreDiskFullError, match=rf"graph store {path} .*free space and rerun"):
        case.finish(writer)
    monkeypatch.undo()
    writer.close()
    case.finish(case.write(path))
    assert verify_store(path) == []


def test_the_cli_prints_the_full_disk_message(case: Case, tmp_path: Path, monkeypatch, capsys) -> None:
    import pipeline.engine.attribution as attribution

    def full(*a, **k):
        raise GraphStoreDiskFullError(errno.ENOSPC, "no space left on device while writing batch 0 ... free space")

    monkeypatch.setattr(attribution, "attribute", full)
    monkeypatch.setattr("pipeline.engine.replacement.ReplacementModel.from_pretrained", lambda *a, **k: None)
    code = cli.main(["attribute", "--model", "m", "--transcoders", "t", "--prompt", "p", "--out", str(tmp_path / "g")])
    assert code == 2
    assert "error: [Errno 28] no space left on device while writing batch 0" in capsys.readouterr().err


def test_store_lock_is_shared_within_a_process(tmp_path: Path) -> None:
    a = _io.StoreLock(tmp_path / "s")
    b = _io.StoreLock(tmp_path / "s")
    a.release()
    assert not can_lock_from_another_process(tmp_path / "s")
    b.release()
    assert can_lock_from_another_process(tmp_path / "s")
    shutil.rmtree(tmp_path)


def test_the_lock_file_is_removed_on_release_and_a_stale_one_is_reused(tmp_path: Path) -> None:
    file = _io.lock_path(tmp_path / "s")
    file.write_text("12345\n")  # left by a killed writer
    lock = _io.StoreLock(tmp_path / "s")
    assert file.read_text() == f"{os.getpid()}\n"
    lock.release()
    assert not file.exists()
