"""The viewer server's limits: socket timeouts, the worker pool and listen backlog, strict
Content-Length, the JSON nesting limit, security headers on the standard library's own error
pages, and the Host check's case and duplicates. Every test runs a server of its own on
127.0.0.1 with a short timeout, so nothing here waits long; the time bounds are generous."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.analysis.export import create_graph_files
from pipeline.viewer.server import (
    MAX_JSON_DEPTH,
    SECURITY_HEADERS,
    ServerLimits,
    json_depth_exceeds,
    make_server,
)
from tests.graph_fixtures import make_graph

TIMEOUT = 1.0  # the servers' socket timeout in these tests (seconds)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    out = tmp_path_factory.mktemp("limits") / "graphs"
    create_graph_files(make_graph(3, "plt", n_layers=3, n_pos=5), "toy", out)
    return out


def _start(graphs, **limits):
    server = make_server(graphs, "127.0.0.1", 0, limits=ServerLimits(**{"timeout": TIMEOUT, **limits}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def server(graphs):
    server = _start(graphs)
    yield server
    server.shutdown()
    server.server_close()
    for p in graphs.glob("*.annotations.json"):
        p.unlink()


def _connect(server, timeout=10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.server_port), timeout=timeout)


def _exchange(server, raw: bytes, *, half_close: bool = False, timeout: float = 10.0) -> bytes:
    """Send ``raw`` on a new connection, read until the server closes it, return all it sent."""
    with _connect(server, timeout) as s:
        s.sendall(raw)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def _parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def _post_raw(server, body: bytes, *, length: str | None = None, extra: str = "", **kw) -> bytes:
    cl = "" if length is None else f"Content-Length: {length}\r\n"
    head = (
        f"POST /api/annotations/toy HTTP/1.1\r\nHost: 127.0.0.1:{server.server_port}\r\n"
        f"Content-Type: application/json\r\n{cl}{extra}\r\n"
    )
    return _exchange(server, head.encode() + body, **kw)


def _assert_secured(headers: dict[str, str]) -> None:
    for k, v in SECURITY_HEADERS.items():
        assert headers.get(k.lower()) == v, k


def _sidecar(server):
    return server.graph_dir / "toy.annotations.json"


# --------------------------------------------------------------------------------------------
# Timeouts: half-open requests, short bodies, idle keep-alive connections
# --------------------------------------------------------------------------------------------


def test_half_open_requests_are_closed_after_the_timeout(server):
    socks = [_connect(server) for _ in range(50)]  # more than the pool's 32 workers
    try:
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
        t0 = time.monotonic()
        for s in socks:
            s.settimeout(30)
            assert s.recv(65536) == b""  # closed by the server, no answer to half a request
        assert time.monotonic() - t0 < 30
    finally:
        for s in socks:
            s.close()
    # the workers are free again
    status, headers, _ = _parse(_exchange(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"))
    assert status == 200


def test_idle_keep_alive_connection_is_closed(server):
    with _connect(server, timeout=30) as s:
        s.sendall(b"GET /favicon.ico HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 204")
        t0 = time.monotonic()
        assert s.recv(65536) == b""  # no second request: the server hangs up after TIMEOUT
        assert time.monotonic() - t0 < 30


def test_post_body_shorter_than_content_length(server):
    # the client half-closes after fewer bytes than announced: 400, nothing saved
    body = json.dumps({"pinned": []}).encode()
    status, headers, text = _parse(_post_raw(server, body, length=str(len(body) + 10), half_close=True))
    assert status == 400
    assert "shorter than Content-Length" in json.loads(text)["error"]
    _assert_secured(headers)
    assert not _sidecar(server).exists()
    # the client stays silent instead: the same after the socket timeout
    t0 = time.monotonic()
    status, _, text = _parse(_post_raw(server, body, length=str(len(body) + 10)))
    assert status == 400 and "before the timeout" in json.loads(text)["error"]
    assert time.monotonic() - t0 < 30
    assert not _sidecar(server).exists()
    # the complete body is saved
    status, _, _ = _parse(_post_raw(server, body, length=str(len(body)), extra="Connection: close\r\n"))
    assert status == 200 and _sidecar(server).exists()


@pytest.mark.parametrize(
    ("length", "extra", "status", "message"),
    [
        (None, "", 411, "Content-Length required"),
        ("abc", "", 400, "invalid Content-Length"),
        ("-5", "", 400, "invalid Content-Length"),
        ("1\r\nContent-Length: 2", "", 400, "invalid Content-Length"),
        (None, "Transfer-Encoding: chunked\r\n", 411, "Transfer-Encoding"),
        ("2", "Transfer-Encoding: chunked\r\n", 400, "Transfer-Encoding"),
        (str((1 << 20) + 1), "", 413, "larger than"),
    ],
)
def test_post_content_length_checked(server, length, extra, status, message):
    got, headers, text = _parse(_post_raw(server, b"{}", length=length, extra=extra, half_close=True))
    assert got == status
    assert message in json.loads(text)["error"]
    assert headers.get("connection") == "close"
    assert not _sidecar(server).exists()


def test_body_limit_is_an_option(graphs):
    server = _start(graphs, max_body_bytes=10)
    try:
        got, _, text = _parse(_post_raw(server, b'{"pinned": []}', length="14", half_close=True))
        assert got == 413 and "larger than 10 bytes" in json.loads(text)["error"]
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------
# JSON nesting
# --------------------------------------------------------------------------------------------


def test_deeply_nested_json_refused_with_400(server):
    body = b"[" * 100_000
    status, headers, text = _parse(_post_raw(server, body, length=str(len(body))))
    assert status == 400
    assert f"nested deeper than {MAX_JSON_DEPTH}" in json.loads(text)["error"]
    _assert_secured(headers)
    body = b'{"labels": ' * 40 + b"{}" + b"}" * 40
    status, _, text = _parse(_post_raw(server, body, length=str(len(body))))
    assert status == 400 and "nested deeper" in json.loads(text)["error"]
    assert not _sidecar(server).exists()


def test_json_depth_scan():
    assert not json_depth_exceeds(b'{"a": [[1], {"b": "[[[[[[[["}]}', 3)
    assert json_depth_exceeds(b'{"a": [[1], {"b": [[]]}]}', 3)
    assert not json_depth_exceeds(b'["\\"[[[[", "]]]"]', 1)
    assert json_depth_exceeds(b"[" * 5, 4)
    assert not json_depth_exceeds(b"[]" * 1000, 1)


# --------------------------------------------------------------------------------------------
# Security headers on the standard library's error pages; the Host check
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"BREW / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501),
        (b"GET / HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", 505),
        (b"GET / HTTP/1.x\r\nHost: 127.0.0.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 120 + b"\r\n", 431),
        (b"GET /\r\n\r\n", 400),  # HTTP/0.9 (no status line, no headers): refused
        (b"POST /\r\n\r\n", 400),
    ],
)
def test_stdlib_errors_carry_the_security_headers(server, raw, status):
    got, headers, body = _parse(_exchange(server, raw))
    assert got == status
    _assert_secured(headers)
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]


@pytest.mark.parametrize(
    ("hosts", "status", "message"),
    [
        (["LOCALHOST:{port}"], 200, None),
        (["LocalHost"], 200, None),
        (["127.0.0.1:{port}", "evil.example"], 400, "more than one Host header"),
        (["127.0.0.1:{port}", "127.0.0.1:{port}"], 400, "more than one Host header"),
        (["EVIL.example:{port}"], 403, "unexpected Host header"),
    ],
)
def test_host_check_case_insensitive_and_single(server, hosts, status, message):
    lines = "".join(f"Host: {h.format(port=server.server_port)}\r\n" for h in hosts)
    got, headers, body = _parse(_exchange(server, f"GET / HTTP/1.1\r\n{lines}Connection: close\r\n\r\n".encode()))
    assert got == status
    _assert_secured(headers)
    if message:
        assert message in json.loads(body)["error"]


# --------------------------------------------------------------------------------------------
# Load: the backlog and the pool
# --------------------------------------------------------------------------------------------


def test_server_limits_validated():
    with pytest.raises(ValueError, match="timeout"):
        ServerLimits(timeout=0)
    with pytest.raises(ValueError, match="workers"):
        ServerLimits(workers=0)
    assert ServerLimits().backlog >= 128


def test_serve_limit_options(tmp_path):
    cli = pytest.importorskip("pipeline.run.cli")
    from pipeline.viewer.server import limits_from_args

    args = cli.build_parser().parse_args(
        ["serve", str(tmp_path), "--timeout", "5", "--workers", "3", "--backlog", "256"]
    )
    assert limits_from_args(args) == ServerLimits(timeout=5.0, workers=3, backlog=256)
    assert limits_from_args(cli.build_parser().parse_args(["serve", str(tmp_path)])) == ServerLimits()


def test_listen_backlog_and_bounded_pool(graphs):
    server = _start(graphs, workers=4)
    try:
        assert server.request_queue_size >= 128
        assert sum(t.name.startswith("viewer-worker-") for t in threading.enumerate()) >= 4
        before = threading.active_count()
        with ThreadPoolExecutor(40) as pool:
            codes = list(pool.map(lambda _: urllib.request.urlopen(server.url, timeout=30).status, range(40)))
        assert codes == [200] * 40
        assert threading.active_count() <= before  # no thread per connection
    finally:
        server.shutdown()
        server.server_close()


def test_full_queue_answers_503(graphs):
    server = _start(graphs, workers=1, max_pending=1, timeout=5.0)
    socks = []
    try:
        holder = _connect(server)  # occupies the one worker (half a request)
        holder.sendall(b"GET / HTTP/1.1\r\n")
        socks.append(holder)
        time.sleep(0.3)
        queued = _connect(server)  # waits in the queue
        socks.append(queued)
        time.sleep(0.3)
        got, headers, body = _parse(_exchange(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
        assert got == 503 and json.loads(body)["error"] == "server busy, retry"
        _assert_secured(headers)
    finally:
        for s in socks:
            s.close()
        server.shutdown()
        server.server_close()


def test_200_concurrent_requests(server):
    """200 concurrent GETs on 127.0.0.1: all 200 OK, no resets, well within 10 s."""

    def get(i):
        path = "/" if i % 2 else "/data/toy.json"
        with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=30) as r:
            r.read()
            return r.status

    t0 = time.monotonic()
    with ThreadPoolExecutor(200) as pool:
        codes = list(pool.map(get, range(200)))
    elapsed = time.monotonic() - t0
    assert codes == [200] * 200
    assert elapsed < 10, elapsed
