"""The on-disk attribution graph: round trip, resume, crash safety, bounded-memory reads."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline import _io
from pipeline.graph import store as graph_store
from pipeline.graph import writer as graph_writer
from pipeline.graph.layout import NodeLayout
from pipeline.graph.store import Graph, GraphStoreError, GraphStoreIncompleteError, GraphStoreMismatchError
from pipeline.graph.writer import GraphStoreWriter, write_graph_from_dense

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Fixtures: a random graph in compute order, cut into deterministic batches
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    layout: NodeLayout
    selected: np.ndarray  # (n_selected,) sorted active indices whose rows are computed
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # targets, indptr, ...
    dense: np.ndarray  # (n_compute, n_compute) float32, the rows the batches hold
    tables: dict[str, np.ndarray]
    fingerprint: str = "fp-1"

    def write(self, path: Path, batches=None, attrs=None) -> GraphStoreWriter:
        writer = self.open(path)
        for b in range(len(self.batches)) if batches is None else batches:
            if b not in writer.done_batches:
                writer.write_batch(b, *self.batches[b])
        return writer

    def open(self, path: Path) -> GraphStoreWriter:
        return GraphStoreWriter.open(
            path,
            fingerprint=self.fingerprint,
            layout=self.layout.to_dict(),
            tables=self.tables,
            attrs={"prompt": "The capital of Texas is", "seed": 3},
        )

    def finish(self, writer: GraphStoreWriter) -> Graph:
        writer.write_table("selected_features", self.selected)
        return writer.finalize({"wall_clock": "not stored in tests"})

    def graph_order(self) -> np.ndarray:
        """Compute-order id of each graph-order node."""
        lay = self.layout
        return np.concatenate([self.selected, np.arange(lay.n_active, lay.n_compute)])


def make_case(seed=0, n_layers=3, n_pos=5, n_active=40, n_logits=4, n_selected=20, batch_size=8, density=0.3) -> Case:
    rng = np.random.default_rng(seed)
    layout = NodeLayout(n_layers=n_layers, n_pos=n_pos, n_active=n_active, n_logits=n_logits)
    n = layout.n_compute
    selected = np.sort(rng.choice(n_active, n_selected, replace=False)).astype(np.int64)
    logits = np.arange(layout.compute_logit_slice.start, n)
    targets = np.concatenate([logits, rng.permutation(selected)])  # logit rows first
    dense = np.zeros((n, n), np.float32)
    batches = []
    for start in range(0, len(targets), batch_size):
        rows = targets[start : start + batch_size]
        indptr, indices, values = [0], [], []
        for k, t in enumerate(rows):
            cols = np.flatnonzero(rng.random(n) < density) if k != 1 else np.zeros(0, int)
            cols = rng.permutation(cols)  # the engine may pass unsorted columns
            vals = rng.standard_normal(len(cols)).astype(np.float32)
            dense[t, cols] = vals
            indices.append(cols)
            values.append(vals)
            indptr.append(indptr[-1] + len(cols))
        batches.append(
            (
                rows.astype(np.int64),
                np.array(indptr, np.int64),
                np.concatenate(indices).astype(np.int32),
                np.concatenate(values),
            )
        )
    active = np.stack(
        np.unravel_index(np.sort(rng.choice(n_layers * n_pos * 100, n_active, replace=False)), (n_layers, n_pos, 100)),
        axis=1,
    ).astype(np.int32)
    tables = {
        "active_features": active,
        "activation_values": rng.random(n_active).astype(np.float32),
        "input_tokens": rng.integers(0, 1000, n_pos),
        "logit_tokens": rng.integers(0, 1000, n_logits),
        "logit_probabilities": rng.random(n_logits).astype(np.float32),
        "logit_vectors": rng.standard_normal((n_logits, 16)).astype(np.float32),
    }
    return Case(layout, selected, batches, dense, tables)


def tree(path: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory (None) under ``path``."""
    out: dict[str, bytes | None] = {}
    for d, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), path)] = None
        for name in files:
            out[os.path.relpath(os.path.join(d, name), path)] = Path(d, name).read_bytes()
    return out


@pytest.fixture
def case() -> Case:
    return make_case()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes | None]:
    """The bytes of an uninterrupted run of ``make_case()``."""
    path = tmp_path_factory.mktemp("reference") / "g"
    case = make_case()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        case.finish(case.write(path))
    return tree(path)


@pytest.fixture
def real_fsync() -> None:
    """Requested by tests that need real fsync calls (see skip_fsync)."""


@pytest.fixture(autouse=True)
def skip_fsync(request, monkeypatch) -> None:
    """Skip fsync in this process where a test checks logic, not durability (fsync takes
    milliseconds on some disks). test_batch_files_are_durable_before_the_record checks the
    fsync order, and the kill -9 writer subprocesses fsync for real."""
    if "real_fsync" not in request.fixturenames:
        monkeypatch.setattr(os, "fsync", lambda fd: None)


def assert_same_store(path: Path, reference: dict[str, bytes | None]) -> None:
    got = tree(path)
    assert sorted(got) == sorted(reference)
    different = [k for k in got if got[k] != reference[k]]
    assert not different, f"files differ from the uninterrupted run: {different}"


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------


def test_round_trip_in_graph_and_compute_order(case: Case, tmp_path: Path) -> None:
    g = case.finish(case.write(tmp_path / "g"))
    lay = case.layout
    g2c = case.graph_order()
    expected = case.dense[np.ix_(g2c, g2c)]
    # columns of unselected features carry weight in compute order and must be dropped
    unselected = np.setdiff1d(np.arange(lay.n_active), case.selected)
    assert np.abs(case.dense[:, unselected]).sum() > 0

    assert (g.n_layers, g.n_pos, g.n_active, g.n_logits) == (3, 5, 40, 4)
    assert g.n_selected == len(case.selected)
    assert g.n_nodes == len(case.selected) + 3 * 5 + 5 + 4 == expected.shape[0]
    np.testing.assert_array_equal(g.selected_features, case.selected)
    np.testing.assert_array_equal(g.active_features, case.tables["active_features"])
    np.testing.assert_array_equal(g.activation_values, case.tables["activation_values"])
    np.testing.assert_array_equal(g.input_tokens, case.tables["input_tokens"])
    np.testing.assert_array_equal(g.logit_tokens, case.tables["logit_tokens"])
    np.testing.assert_array_equal(g.logit_probabilities, case.tables["logit_probabilities"])
    np.testing.assert_array_equal(g.table("logit_vectors"), case.tables["logit_vectors"])
    assert g.attrs == {"prompt": "The capital of Texas is", "seed": 3, "wall_clock": "not stored in tests"}
    assert g.summary == {
        "n_batches": len(case.batches),
        "n_rows": len(case.selected) + 4,
        "nnz": sum(len(b[2]) for b in case.batches),
    }

    np.testing.assert_array_equal(g.adjacency_dense(), expected)
    sparse = g.to_scipy_sparse()
    assert sparse.shape == (g.n_nodes, g.n_nodes)
    np.testing.assert_array_equal(sparse.toarray(), expected)
    assembled = np.zeros_like(expected)
    for rows, block in g.iter_row_blocks():
        assert block.shape == (len(rows), g.n_nodes)
        assembled[rows] += block.toarray()
    np.testing.assert_array_equal(assembled, expected)
    for node in range(g.n_nodes):
        cols, vals = g.row(node)
        dense_row = np.zeros(g.n_nodes, np.float32)
        dense_row[cols] = vals
        np.testing.assert_array_equal(dense_row, expected[node])
        if g.node_kind(node) in ("error", "token"):
            assert len(cols) == 0

    compute = np.zeros_like(case.dense)
    for targets, block in g.iter_compute_rows():
        assert block.shape == (len(targets), lay.n_compute)
        compute[targets] = block.toarray()
    np.testing.assert_array_equal(compute, case.dense)
    for t in case.batches[1][0]:
        cols, vals = g.compute_row(int(t))
        np.testing.assert_array_equal(case.dense[t, cols], vals)
        assert np.count_nonzero(case.dense[t]) == len(cols)
    np.testing.assert_array_equal(g.read_batch(2)["indices"], case.batches[2][2])


def test_node_index_helpers_follow_graph_order(case: Case, tmp_path: Path) -> None:
    g = case.finish(case.write(tmp_path / "g"))
    s = g.n_selected
    assert g.feature_slice == slice(0, s)
    assert g.error_slice == slice(s, s + 15)
    assert g.token_slice == slice(s + 15, s + 20)
    assert g.logit_slice == slice(s + 20, s + 24)
    assert g.error_node(2, 1) == s + 2 * 5 + 1
    assert g.token_node(4) == s + 15 + 4
    assert g.logit_node(3) == g.n_nodes - 1
    assert g.feature_node(int(case.selected[3])) == 3
    assert g.node_active_index(3) == case.selected[3]
    unselected = int(np.setdiff1d(np.arange(40), case.selected)[0])
    with pytest.raises(ValueError, match="not a selected feature"):
        g.feature_node(unselected)
    kinds = [g.node_kind(i) for i in range(g.n_nodes)]
    assert kinds == ["feature"] * s + ["error"] * 15 + ["token"] * 5 + ["logit"] * 4
    with pytest.raises(IndexError):
        g.node_kind(g.n_nodes)
    with pytest.raises(IndexError):
        g.error_node(3, 0)
    g2c = case.graph_order()
    np.testing.assert_array_equal(g.graph_to_compute(np.arange(g.n_nodes)), g2c)
    np.testing.assert_array_equal(g.compute_to_graph(g2c), np.arange(g.n_nodes))
    assert g.compute_to_graph(unselected) == -1
    lay = case.layout
    assert lay.compute_error_node(2, 1) == 40 + 11
    assert g.compute_to_graph(lay.compute_error_node(2, 1)) == g.error_node(2, 1)
    assert g.compute_to_graph(lay.compute_token_node(4)) == g.token_node(4)
    assert g.compute_to_graph(lay.compute_logit_node(3)) == g.logit_node(3)
    with pytest.raises(ValueError, match="max_nodes"):
        g.adjacency_dense(max_nodes=10)


def test_write_graph_from_dense_stores_selected_and_logit_rows(tmp_path: Path) -> None:
    lay = NodeLayout(n_layers=2, n_pos=3, n_active=6, n_logits=2)
    rng = np.random.default_rng(1)
    dense = (rng.random((lay.n_compute,) * 2) < 0.4) * rng.standard_normal((lay.n_compute,) * 2)
    selected = np.array([0, 2, 5])
    g = write_graph_from_dense(
        tmp_path / "g", dense, lay.to_dict(), {}, {"x": 1}, batch_size=2, selected_features=selected
    )
    g2c = np.concatenate([selected, np.arange(6, lay.n_compute)])
    expected = dense[np.ix_(g2c, g2c)].astype(np.float32)
    expected[g.error_slice.start : g.logit_slice.start] = 0  # error and token rows are not stored
    np.testing.assert_array_equal(g.adjacency_dense(), expected)
    assert g.attrs == {"x": 1}
    # the same call again finds the finished store
    again = write_graph_from_dense(tmp_path / "g", dense, lay, batch_size=2, selected_features=selected)
    np.testing.assert_array_equal(again.adjacency_dense(), expected)


def test_extra_arrays_and_default_selection(tmp_path: Path) -> None:
    case = make_case(seed=2, n_selected=10)
    writer = case.open(tmp_path / "g")
    for b, batch in enumerate(case.batches):
        writer.write_batch(b, *batch, extra={"row_abs_sum": np.abs(batch[3]).sum(keepdims=True)})
    np.testing.assert_array_equal(writer.read_batch(0)["indptr"], case.batches[0][1])
    g = writer.finalize()  # no selected_features table: the features with rows are selected
    np.testing.assert_array_equal(g.selected_features, case.selected)
    np.testing.assert_allclose(g.read_batch(1)["extra_row_abs_sum"], [np.abs(case.batches[1][3]).sum()])


def test_rows_of_unselected_features_are_reported(case: Case, tmp_path: Path) -> None:
    writer = case.write(tmp_path / "g")
    writer.write_table("selected_features", case.selected[1:])
    with pytest.warns(UserWarning, match="not in selected_features"):
        g = writer.finalize()
    assert g.n_selected == len(case.selected) - 1
    assert sum(len(t) for t, _ in g.iter_compute_rows()) == len(case.selected) + 4
    assert sum(len(r) for r, _ in g.iter_row_blocks()) == len(case.selected) + 3
    with pytest.raises(ValueError, match="sorted, unique"):
        case.open(tmp_path / "h").write_table("selected_features", case.selected[::-1])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t, p, i, v: (t + 10**6, p, i, v), "not feature or logit"),
        (lambda t, p, i, v: (np.full_like(t, 45), p, i, v), "not feature or logit"),  # errors
        (lambda t, p, i, v: (t, p[:-1], i, v), "indptr"),
        (lambda t, p, i, v: (t, p, i + 10**4, v), r"column indices"),
        (lambda t, p, i, v: (t, p, i, v[:-1]), "values"),
        (lambda t, p, i, v: (np.repeat(t[:1], len(t)), p, i, v), "repeat"),
    ],
)
def test_invalid_batches_are_rejected(case: Case, tmp_path: Path, change, match) -> None:
    writer = case.open(tmp_path / "g")
    with pytest.raises(ValueError, match=match):
        writer.write_batch(0, *change(*case.batches[0]))
    assert writer.done_batches == set()


def test_verify_detects_a_damaged_chunk(case: Case, tmp_path: Path) -> None:
    g = case.finish(case.write(tmp_path / "g"))
    g.verify()
    chunk = tmp_path / "g/adjacency/batch_000001/values/0"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="batch 1"):
        g.verify()


# ---------------------------------------------------------------------------------------------
# Resume, mismatch, finished stores
# ---------------------------------------------------------------------------------------------


def test_resume_gives_byte_identical_store(case: Case, tmp_path: Path, reference) -> None:
    path = tmp_path / "resumed"
    case.write(path, batches=[0, 2])
    writer = case.open(path)
    assert writer.done_batches == {0, 2} and not writer.finished
    writer.write_batch(2, *case.batches[2])  # already recorded: a no-op
    t, p, i, v = case.batches[2]
    with pytest.raises(ValueError, match="deterministic"):
        writer.write_batch(2, t[:-1], p[:-1], i[: p[-2]], v[: p[-2]])
    for b in range(len(case.batches)):
        if b not in writer.done_batches:
            writer.write_batch(b, *case.batches[b])
    case.finish(writer)
    assert_same_store(path, reference)


def test_crash_between_chunks_and_record_rewrites_the_batch(case: Case, tmp_path: Path, reference, monkeypatch) -> None:
    path = tmp_path / "g"

    def crash(event: str, batch_index: int) -> None:
        if event == "before_record" and batch_index == 2:
            raise KeyboardInterrupt  # anything that stops the process there

    monkeypatch.setattr(graph_writer, "batch_phase", crash)
    with pytest.raises(KeyboardInterrupt):
        case.write(path)
    monkeypatch.undo()
    assert (path / "adjacency/batch_000002/values/0").exists()  # chunks written, not recorded
    writer = case.open(path)
    assert writer.done_batches == {0, 1}
    assert not (path / "adjacency/batch_000002").exists()
    case.finish(case.write(path))
    assert_same_store(path, reference)


def is_temp_of(temp: Path, path: Path) -> bool:
    """Whether ``temp`` is a temporary name under which pipeline._io writes ``path``."""
    return (
        temp.parent == path.parent
        and temp.name.startswith(_io.temp_prefix(path))
        and temp.name.endswith(_io.TMP_SUFFIX)
    )


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_batch_files_are_durable_before_the_record(case: Case, tmp_path: Path, monkeypatch, real_fsync) -> None:
    path = tmp_path / "g"
    writer = case.open(path)
    events: list[tuple[str, object]] = []
    fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")))), fsync(fd))
    )
    monkeypatch.setattr(graph_writer, "batch_phase", lambda event, b: events.append((event, b)))
    writer.write_batch(0, *case.batches[0])
    at_record = events.index(("before_record", 0))
    synced_before = {p for kind, p in events[:at_record] if kind == "fsync"}
    batch_dir = path / "adjacency/batch_000000"
    for p in batch_dir.rglob("*"):  # files are fsynced as their temp file, before the rename
        assert p in synced_before if p.is_dir() else any(is_temp_of(q, p) for q in synced_before), p
    assert {batch_dir, path / "adjacency"} <= synced_before
    synced_after = [p for kind, p in events[at_record:] if kind == "fsync"]
    assert len(synced_after) == 2 and is_temp_of(synced_after[0], path / "progress/batch_000000.json")
    assert synced_after[1] == path / "progress"
    assert events[-1] == ("recorded", 0)

    for b in range(1, len(case.batches)):
        writer.write_batch(b, *case.batches[b])
    events.clear()
    case.finish(writer)
    synced = [p for kind, p in events if kind == "fsync"]
    assert is_temp_of(synced[-2], path / "zarr.json") and synced[-1] == path  # the finished flag, last


def test_other_inputs_raise_mismatch(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "g"
    case.write(path, batches=[0])
    with pytest.raises(GraphStoreMismatchError) as err:
        GraphStoreWriter.open(path, fingerprint="fp-2", layout=case.layout, tables=case.tables, attrs={})
    message = str(err.value)
    assert str(path) in message and "delete" in message.lower() and "--out" in message
    assert "fp-2" in message
    other = NodeLayout(3, 5, 41, 4)
    with pytest.raises(GraphStoreMismatchError, match="layout"):
        GraphStoreWriter.open(path, fingerprint="fp-1", layout=other, tables={}, attrs={})
    tables = dict(case.tables, input_tokens=case.tables["input_tokens"] + 1)
    with pytest.raises(GraphStoreMismatchError, match="input_tokens"):
        GraphStoreWriter.open(path, fingerprint="fp-1", layout=case.layout, tables=tables, attrs={})
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("not a graph")
    with pytest.raises(GraphStoreMismatchError, match="not a circuit-pipeline"):
        case.open(tmp_path / "other")
    assert isinstance(err.value, ValueError)


def test_unfinished_store_is_refused_and_finished_store_reopens_finished(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "g"
    writer = case.write(path, batches=[0, 1])
    with pytest.raises(GraphStoreIncompleteError, match="rerun attribution"):
        Graph.open(path)
    for b in range(2, len(case.batches)):
        writer.write_batch(b, *case.batches[b])
    case.finish(writer)
    before = tree(path)
    again = case.open(path)
    assert again.finished and again.done_batches == set(range(len(case.batches)))
    with pytest.raises(GraphStoreError, match="read-only"):
        again.write_batch(0, *case.batches[0])
    assert again.finalize().n_nodes == Graph.open(path).n_nodes
    assert tree(path) == before
    with pytest.raises(GraphStoreMismatchError):
        GraphStoreWriter.open(path, fingerprint="other", layout=case.layout, tables={}, attrs={})


# ---------------------------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------------------------


def test_full_disk_at_every_write_of_a_batch_leaves_it_unrecorded(
    case: Case, tmp_path: Path, reference, monkeypatch
) -> None:
    real = graph_writer.write_file
    case.write(tmp_path / "two_batches", batches=[0, 1])
    shutil.copytree(tmp_path / "two_batches", tmp_path / "count")
    writer = case.open(tmp_path / "count")
    written = []
    monkeypatch.setattr(graph_writer, "write_file", lambda p, d: (written.append(p), real(p, d)))
    writer.write_batch(2, *case.batches[2])
    monkeypatch.setattr(graph_writer, "write_file", real)
    assert len(written) >= 10  # group + 4 arrays (metadata + chunk) + the record

    for fail_at in range(len(written)):
        path = tmp_path / f"g{fail_at}"
        shutil.copytree(tmp_path / "two_batches", path)
        writer = case.open(path)
        calls = []

        def full_disk(p, data, fail_at=fail_at, calls=calls):
            calls.append(p)
            if len(calls) - 1 == fail_at:
                if fail_at % 2:  # a half-written temp file that could not be cleaned up
                    Path(p).parent.mkdir(parents=True, exist_ok=True)
                    Path(p).with_name(_io.temp_prefix(p) + "half" + _io.TMP_SUFFIX).write_bytes(bytes(data)[:10])
                raise OSError(errno.ENOSPC, "No space left on device", str(p))
            real(p, data)

        monkeypatch.setattr(graph_writer, "write_file", full_disk)
        with pytest.raises(OSError) as err:
            writer.write_batch(2, *case.batches[2])
        monkeypatch.setattr(graph_writer, "write_file", real)
        assert err.value.errno == errno.ENOSPC
        assert 2 not in writer.done_batches
        assert not (path / "progress/batch_000002.json").exists()
        if fail_at % 3 == 0:  # the same writer retries the batch
            writer.write_batch(2, *case.batches[2])
        resumed = case.open(path)
        assert resumed.done_batches == ({0, 1, 2} if fail_at % 3 == 0 else {0, 1})
        case.finish(case.write(path))
        assert_same_store(path, reference)


def test_full_disk_while_creating_leaves_no_store(case: Case, tmp_path: Path, reference, monkeypatch) -> None:
    path = tmp_path / "g"
    real, calls = graph_writer.write_file, []

    def full_disk(p, data):
        calls.append(p)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(p))
        real(p, data)

    monkeypatch.setattr(graph_writer, "write_file", full_disk)
    with pytest.raises(OSError):
        case.open(path)
    monkeypatch.setattr(graph_writer, "write_file", real)
    assert not path.exists() and (tmp_path / ".g.creating").exists()
    case.finish(case.write(path))
    assert not (tmp_path / ".g.creating").exists()
    assert_same_store(path, reference)


def test_full_disk_during_finalize_leaves_store_resumable(case: Case, tmp_path: Path, reference, monkeypatch) -> None:
    path = tmp_path / "g"
    writer = case.write(path)
    real = graph_writer.write_file

    def full_disk(p, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    monkeypatch.setattr(graph_writer, "write_file", full_disk)
    with pytest.raises(OSError):
        case.finish(writer)
    monkeypatch.setattr(graph_writer, "write_file", real)
    with pytest.raises(GraphStoreIncompleteError):
        Graph.open(path)
    case.finish(case.write(path))
    assert_same_store(path, reference)


# ---------------------------------------------------------------------------------------------
# kill -9 in a subprocess
# ---------------------------------------------------------------------------------------------

WRITER_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import numpy as np
    from pipeline.graph import writer as graph_writer
    from pipeline.graph.writer import GraphStoreWriter

    data = np.load(sys.argv[1])
    out, n_batches = sys.argv[2], int(data["n_batches"])
    kill_before_record = int(os.environ.get("KILL_BEFORE_RECORD", "-1"))
    kill_in_write = int(os.environ.get("KILL_IN_WRITE", "-1"))
    sleep = float(os.environ.get("SLEEP_BETWEEN_BATCHES", "0"))

    def hook(event, batch_index):
        if event == "before_record" and batch_index == kill_before_record:
            os.kill(os.getpid(), signal.SIGKILL)

    graph_writer.batch_phase = hook
    real_write, calls = graph_writer.write_file, [0]

    def write(path, payload):
        calls[0] += 1
        if calls[0] == kill_in_write:  # die half way through writing the temp file
            tmp = path.with_name("." + path.name + ".half.tmp")  # named like pipeline._io's temp files
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(bytes(payload)[: len(payload) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, payload)

    graph_writer.write_file = write
    tables = {k[6:]: data[k] for k in data.files if k.startswith("table_")}
    writer = GraphStoreWriter.open(out, fingerprint=str(data["fingerprint"]),
                                   layout={k: int(data["layout_" + k]) for k in
                                           ("n_layers", "n_pos", "n_active", "n_logits")},
                                   tables=tables, attrs={"prompt": "The capital of Texas is",
                                                         "seed": 3})
    for b in range(n_batches):
        if b in writer.done_batches:
            continue
        writer.write_batch(b, data[f"t{b}"], data[f"p{b}"], data[f"i{b}"], data[f"v{b}"])
        print("done", b, flush=True)
        time.sleep(sleep)
    print("all", flush=True)
    """
)


@pytest.fixture
def writer_script(case: Case, tmp_path: Path):
    script = tmp_path / "write_graph.py"
    script.write_text(WRITER_SCRIPT)
    arrays = {"n_batches": len(case.batches), "fingerprint": case.fingerprint}
    arrays.update({f"layout_{k}": v for k, v in case.layout.to_dict().items()})
    arrays.update({f"table_{k}": v for k, v in case.tables.items()})
    for b, (t, p, i, v) in enumerate(case.batches):
        arrays.update({f"t{b}": t, f"p{b}": p, f"i{b}": i, f"v{b}": v})
    np.savez(tmp_path / "batches.npz", **arrays)

    def start(out: Path, **env: str) -> subprocess.Popen:
        environ = dict(os.environ, PYTHONPATH=str(REPO), **env)
        return subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "batches.npz"), str(out)],
            env=environ,
            stdout=subprocess.PIPE,
            text=True,
        )

    return start


def test_kill_9_while_sleeping_between_batches(case, tmp_path, reference, writer_script) -> None:
    path = tmp_path / "g"
    proc = writer_script(path, SLEEP_BETWEEN_BATCHES="30")
    assert proc.stdout.readline().split() == ["done", "0"]  # batch 0 recorded; child sleeps
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    writer = case.open(path)
    assert writer.done_batches == {0}
    case.finish(case.write(path))
    assert_same_store(path, reference)


@pytest.mark.parametrize("env", [{"KILL_BEFORE_RECORD": "2"}, {"KILL_IN_WRITE": "30"}])
def test_kill_9_inside_a_batch(case, tmp_path, reference, writer_script, env) -> None:
    path = tmp_path / "g"
    proc = writer_script(path, **env)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, out
    assert "all" not in out
    leftovers = [p for p in path.rglob(".*.tmp")]
    if "KILL_IN_WRITE" in env:
        assert leftovers  # the half-written temp file is there until resume
    writer = case.open(path)
    assert writer.done_batches == set(range(len(writer.done_batches)))
    assert 0 < len(writer.done_batches) < len(case.batches)
    assert not list(path.rglob(".*.tmp"))
    case.finish(case.write(path))
    assert_same_store(path, reference)


# ---------------------------------------------------------------------------------------------
# Bounded memory
# ---------------------------------------------------------------------------------------------


def test_iter_row_blocks_holds_one_batch_at_a_time(tmp_path: Path, monkeypatch) -> None:
    lay = NodeLayout(n_layers=2, n_pos=10, n_active=20000, n_logits=4)
    rng = np.random.default_rng(5)
    writer = GraphStoreWriter.open(tmp_path / "big", fingerprint="big", layout=lay, tables={}, attrs={})
    n_batches, rows_per_batch, nnz_per_row = 16, 32, 1000
    for b in range(n_batches):
        targets = np.arange(b * rows_per_batch, (b + 1) * rows_per_batch)
        indptr = np.arange(rows_per_batch + 1, dtype=np.int64) * nnz_per_row
        offsets = rng.integers(0, 5, (rows_per_batch, 1))
        indices = (offsets + 5 * np.arange(nnz_per_row)).ravel().astype(np.int32)
        writer.write_batch(b, targets, indptr, indices, rng.standard_normal(len(indices)).astype(np.float32))
    g = writer.finalize()
    batch_bytes = rows_per_batch * nnz_per_row * 8  # int32 index + float32 value per entry
    total_bytes = n_batches * batch_bytes

    reads = []
    real_read = graph_store.read_batch_arrays
    monkeypatch.setattr(graph_store, "read_batch_arrays", lambda *a, **k: (reads.append(a[1]), real_read(*a, **k))[1])
    blocks = g.iter_row_blocks()
    next(blocks)
    assert reads == [0]  # lazily, one stored batch per block
    monkeypatch.setattr(graph_store, "read_batch_arrays", real_read)

    tracemalloc.start()
    try:
        n_seen, checksum = 0, 0.0
        for rows, block in g.iter_row_blocks():
            n_seen += len(rows)
            checksum += float(block.sum())
            del rows, block
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n_seen == n_batches * rows_per_batch
    # a few temporaries of one batch's size (decoded chunks, mapped columns, the csr), far
    # less than the 16 batches of the whole graph
    assert peak < 6 * batch_bytes, (peak, batch_bytes)
    assert 6 * batch_bytes < total_bytes / 2
