"""``circuit-pipeline serve GRAPH_DIR``: a local viewer for exported graph JSON files.

A standard-library HTTP server (``http.server.HTTPServer`` with a bounded worker pool) that serves the viewer's
own static page (``static/index.html``, ``viewer.js``, ``viewer.css``: plain JS + SVG, no build
step, nothing fetched from the internet) and the ``.json`` files of one graph folder, as
written by :func:`pipeline.analysis.export.create_graph_files` (``{slug}.json`` + ``graph-metadata.json``).

Routes::

    GET  /                          the viewer page
    GET  /static/viewer.js|.css     its assets (a fixed list; nothing else under static/)
    GET  /data/<path>.json          a JSON file inside GRAPH_DIR (sub-folders allowed, e.g. the
                                    features/ folder of feature dashboards); checked to parse
                                    as JSON before it is sent, as application/json
    GET  /api/annotations/<slug>    the graph's sidecar annotations (an empty document when
                                    there is none yet)
    POST /api/annotations/<slug>    save them (body: application/json, at most
                                    MAX_ANNOTATION_BYTES); answers the document as stored

Security: binds 127.0.0.1 by default (a warning is printed for any other address: the
annotation API has no authentication).  Paths are percent-decoded once, then refused with 403
if a segment is empty (``//``, an absolute path after the prefix), ``.`` or ``..`` (also
written ``%2e%2e``), still contains ``%`` (double encoding) or an encoded ``/``; with 404 if a
segment starts with a dot (hidden / temporary files) or the name does not end in ``.json``;
and with 403 if the real path (symlinks resolved) leaves GRAPH_DIR.  When bound to a loopback
address, requests whose ``Host`` header is not a loopback name are refused (DNS rebinding);
a POST must carry ``Content-Type: application/json`` and, when the browser sends ``Origin``,
come from the page's own origin.  Every response carries a strict Content-Security-Policy
(scripts only from this server, no inline script) and ``nosniff``; the page itself renders
every label with ``textContent`` / SVG text nodes, never as HTML.

Load (:class:`ServerLimits`, ``serve --timeout/--workers/--backlog``): the listen backlog is
128 (not socketserver's 5); connections are answered by a fixed pool of worker threads fed
from a bounded queue (a full queue answers 503 at once); every connection's socket times out
after ``timeout`` seconds of silence (a half-sent request, a body shorter than its
Content-Length, an idle keep-alive connection: all closed, nothing saved).  A POST needs an
exact Content-Length (411 without, 400 invalid or with Transfer-Encoding, 413 above
MAX_ANNOTATION_BYTES, 400 when fewer bytes arrive) and a body nesting at most MAX_JSON_DEPTH
arrays / objects (400, checked before the recursive JSON parser).  Every response, the
standard library's own errors (400, 414, 431, 501, 505) included, carries the security
headers and a JSON ``{"error": ...}`` body.  The Host check is case-insensitive; more than
one Host header is refused (400).

Sidecar annotations: ``GRAPH_DIR/{slug}.annotations.json`` (schema_version 1), written
atomically (temp file in the same folder, fsync, ``os.replace``), UTF-8, sorted where order
carries no meaning::

    {
      "schema_version": 1,
      "slug": "<slug>",
      "pinned":  ["<node_id>", ...],                  # pinned nodes, in pin order
      "clicked": "<node_id>" | "",                    # the selected node
      "labels":  {"<node_id>": "<text>", ...},         # user labels (override the clerp)
      "supernodes": {
        "<name>": {
          "nodes":    ["<node_id>", ...],
          "features": [[layer, pos, feature], ...]    # the transcoder features among the
        }, ...                                        # nodes (errors/tokens/logits have none)
      },
      "thresholds": {"node": <0..1>, "edge": <0..1>}, # the viewer's sliders
      "qParams": {"pinnedIds": [...], "supernodes": [["<name>", "<node_id>", ...], ...],
                  "linkType": "both", "clickedId": "...", "sg_pos": ""}
    }

``features`` are recomputed by the server from the graph JSON on every save (clients cannot
set them): a node whose ``feature_type`` is ``"cross layer transcoder"`` has id
``{layer}_{feature}_{pos}`` and contributes ``[layer, pos, feature]`` (the order of the graph
store's ``active_features`` rows), so interventions can use a supernode without the graph.
``qParams`` mirrors the top-level fields in the graph JSON's own ``qParams`` format
(circuit-tracer / Neuronpedia).  A POST body has the same shape (``features`` and ``qParams``
are ignored except ``linkType`` / ``sg_pos``; a supernode may also be given as a plain list of
node ids); every node id must be a node of the graph, unknown keys are refused (400).

URL of the page: ``/?slug=<slug>&pinnedIds=<id>,<id>&clickedId=<id>&nodeThreshold=<x>
&edgeThreshold=<x>`` (names as Neuronpedia's viewer uses them where they exist); the page keeps
it in sync with every change and restores from it (falling back to the sidecar) on reload.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import ipaddress
import json
import math
import os
import queue
import re
import socket
import socketserver
import sys
import threading
import webbrowser
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from pipeline import _io

__all__ = [
    "ANNOTATIONS_SCHEMA_VERSION",
    "MAX_ANNOTATION_BYTES",
    "MAX_JSON_DEPTH",
    "ServerLimits",
    "ViewerServer",
    "annotations_path",
    "make_server",
    "normalize_annotations",
    "serve",
]

ANNOTATIONS_SCHEMA_VERSION = 1
MAX_ANNOTATION_BYTES = 1 << 20  # 1 MiB per POST body
MAX_JSON_DEPTH = 32  # nesting of a POST body's arrays/objects (an annotations document needs 4)
MAX_LABEL_CHARS = 2000
MAX_NAME_CHARS = 200
MAX_ID_CHARS = 200
ANNOTATION_SUFFIX = ".annotations.json"
FEATURE_TYPE = "cross layer transcoder"

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_ROUTES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/viewer.js": ("viewer.js", "text/javascript; charset=utf-8"),
    "/static/viewer.css": ("viewer.css", "text/css; charset=utf-8"),
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

_FEATURE_ID = re.compile(r"(\d+)_(\d+)_(\d+)")
_LOOPBACK_NAMES = {"localhost", "localhost.", "127.0.0.1", "::1"}
_TOP_KEYS = {"schema_version", "slug", "pinned", "clicked", "labels", "supernodes", "thresholds", "qParams"}


@dataclass(frozen=True)
class ServerLimits:
    """The server's resource limits (``serve --timeout/--workers/--backlog``).

    ``timeout``: seconds a connection may stay silent (waiting for a request line, headers or
    the rest of a body, or idle between keep-alive requests) before the server closes it.
    ``workers``: threads answering connections (a bounded pool, not a thread per connection).
    ``backlog``: the listen queue of the socket (connections the kernel holds before accept).
    ``max_pending``: accepted connections waiting for a free worker; beyond it a connection
    is answered 503 and closed at once.  ``max_body_bytes`` / ``max_json_depth``: a POST body's
    size (413 above it) and the nesting of its arrays and objects (400 above it).
    """

    timeout: float = 20.0
    workers: int = 32
    backlog: int = 128
    max_pending: int = 1024
    max_body_bytes: int = MAX_ANNOTATION_BYTES
    max_json_depth: int = MAX_JSON_DEPTH

    def __post_init__(self) -> None:
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, not {self.timeout!r}")
        for name in ("workers", "backlog", "max_pending", "max_body_bytes", "max_json_depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------


def annotations_path(graph_dir, slug: str) -> Path:
    """``GRAPH_DIR/{slug}.annotations.json``."""
    return Path(graph_dir) / f"{slug}{ANNOTATION_SUFFIX}"


def _node_id(value, nodes: Mapping[str, Any] | None, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise ValueError(f"{what}: node ids are non-empty strings of at most {MAX_ID_CHARS} chars")
    if nodes is not None and value not in nodes:
        raise ValueError(f"{what}: {value!r} is not a node of this graph")
    return value


def _id_list(value, nodes, what: str) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list of node ids")
    out, seen = [], set()
    for v in value:
        v = _node_id(v, nodes, what)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _feature_triple(node_id: str, node: Mapping[str, Any]) -> list[int] | None:
    if node.get("feature_type") != FEATURE_TYPE:
        return None
    m = _FEATURE_ID.fullmatch(node_id)
    if m is None:
        return None
    layer, feature, pos = (int(g) for g in m.groups())
    return [layer, pos, feature]


def normalize_annotations(doc, slug: str, nodes: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Validate a posted annotations document and return it in the stored form.

    ``nodes``: node id -> node record of the graph JSON (``None`` skips the membership checks
    and leaves supernode ``features`` empty).  Raises ``ValueError`` with a readable message.
    """
    if not isinstance(doc, dict):
        raise ValueError("annotations must be a JSON object")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"unknown annotation keys {unknown}")
    if doc.get("schema_version", ANNOTATIONS_SCHEMA_VERSION) != ANNOTATIONS_SCHEMA_VERSION:
        raise ValueError(f"schema_version must be {ANNOTATIONS_SCHEMA_VERSION}")
    if doc.get("slug", slug) != slug:
        raise ValueError(f"slug {doc.get('slug')!r} does not match the URL's {slug!r}")

    pinned = _id_list(doc.get("pinned", []), nodes, "pinned")
    clicked = doc.get("clicked", "")
    if clicked is None:
        clicked = ""
    if clicked != "":
        clicked = _node_id(clicked, nodes, "clicked")

    labels_in = doc.get("labels", {})
    if not isinstance(labels_in, dict):
        raise ValueError("labels must be an object {node_id: text}")
    labels = {}
    for key in sorted(labels_in):
        text = labels_in[key]
        _node_id(key, nodes, "labels")
        if not isinstance(text, str) or len(text) > MAX_LABEL_CHARS:
            raise ValueError(f"labels: each label is a string of at most {MAX_LABEL_CHARS} chars")
        if text.strip():
            labels[key] = text

    sn_in = doc.get("supernodes", {})
    if not isinstance(sn_in, dict):
        raise ValueError("supernodes must be an object {name: {nodes: [...]}}")
    supernodes: dict[str, dict[str, list]] = {}
    for name in sorted(sn_in):
        if not name.strip() or len(name) > MAX_NAME_CHARS:
            raise ValueError(f"supernode names are non-blank strings of at most {MAX_NAME_CHARS} chars")
        value = sn_in[name]
        if isinstance(value, dict):
            extra = sorted(set(value) - {"nodes", "features"})
            if extra:
                raise ValueError(f"supernode {name!r}: unknown keys {extra}")
            value = value.get("nodes")
        members = _id_list(value, nodes, f"supernode {name!r}")
        if not members:
            raise ValueError(f"supernode {name!r} has no nodes")
        features = []
        if nodes is not None:
            features = [t for t in (_feature_triple(i, nodes[i]) for i in members) if t is not None]
        supernodes[name] = {"nodes": members, "features": features}

    th_in = doc.get("thresholds", {})
    if not isinstance(th_in, dict) or set(th_in) - {"node", "edge"}:
        raise ValueError("thresholds must be an object with optional 'node' and 'edge'")
    thresholds = {}
    for key in ("node", "edge"):
        if key in th_in:
            v = th_in[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"thresholds.{key} must be a number in [0, 1]")
            thresholds[key] = float(v)

    q_in = doc.get("qParams", {})
    if not isinstance(q_in, dict):
        raise ValueError("qParams must be an object")
    link_type = q_in.get("linkType", "both")
    sg_pos = q_in.get("sg_pos", "")
    for key, v in (("linkType", link_type), ("sg_pos", sg_pos)):
        if not isinstance(v, str) or len(v) > 100:
            raise ValueError(f"qParams.{key} must be a short string")
    qparams = {
        "pinnedIds": list(pinned),
        "supernodes": [[name, *sn["nodes"]] for name, sn in supernodes.items()],
        "linkType": link_type,
        "clickedId": clicked,
        "sg_pos": sg_pos,
    }
    return {
        "schema_version": ANNOTATIONS_SCHEMA_VERSION,
        "slug": slug,
        "pinned": pinned,
        "clicked": clicked,
        "labels": labels,
        "supernodes": supernodes,
        "thresholds": thresholds,
        "qParams": qparams,
    }


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _loads(data: bytes):
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_exceeds(data: bytes, limit: int) -> bool:
    """Whether the arrays / objects of JSON text ``data`` nest deeper than ``limit`` (brackets
    inside strings do not count); checked before ``json.loads``, whose parser recurses."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, delete=_NOT_BRACKETS)
    if len(brackets) <= limit:
        return False
    depth = 0
    for b in brackets:
        if b in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ViewerServer(http.server.HTTPServer):
    """Serves the viewer and ``graph_dir``; ``.url`` is the page's address.

    Connections are answered by a fixed pool of ``limits.workers`` threads fed from a bounded
    queue (not a thread per connection), every connection's socket has ``limits.timeout``,
    and the listen backlog is ``limits.backlog`` (see :class:`ServerLimits`).
    """

    daemon_threads = True

    def __init__(
        self,
        graph_dir,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        quiet: bool = True,
        limits: ServerLimits | None = None,
    ):
        root = Path(os.path.realpath(graph_dir))
        if not root.is_dir():
            raise NotADirectoryError(f"graph folder {graph_dir} is not a directory")
        self.graph_dir = root
        self.quiet = quiet
        self.limits = limits or ServerLimits()
        self.request_queue_size = int(self.limits.backlog)  # listen() backlog (socketserver's is 5)
        self.loopback_only = _is_loopback(host)
        self.write_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._node_cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._pending: queue.Queue[tuple[Any, Any] | None] = queue.Queue(maxsize=int(self.limits.max_pending))
        self._workers: list[threading.Thread] = []
        super().__init__((host, port), ViewerHandler)
        for i in range(int(self.limits.workers)):
            t = threading.Thread(target=self._work, name=f"viewer-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    # -- the worker pool ---------------------------------------------------------------------

    def process_request(self, request, client_address) -> None:
        """Hand an accepted connection to the pool; refuse it (503) when the queue is full."""
        try:
            self._pending.put_nowait((request, client_address))
        except queue.Full:
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)

    def _work(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        if not self.quiet:
            super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        while True:  # connections still waiting for a worker are closed unanswered
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        for _ in self._workers:
            try:
                self._pending.put_nowait(None)
            except queue.Full:
                break

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's FQDN (a DNS query); not needed here
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        assert isinstance(host, str)  # an AF_INET or AF_INET6 address
        self.server_name, self.server_port = host, port

    @property
    def url(self) -> str:
        host = f"[{self.server_name}]" if ":" in self.server_name else self.server_name
        return f"http://{host}:{self.server_port}/"

    # -- files of the graph folder -----------------------------------------------------------

    def resolve_data_path(self, segments: list[str]) -> Path:
        """A file inside the graph folder from already-decoded path segments (or HTTPError)."""
        if not segments:
            raise HTTPError(404, "no file named")
        for seg in segments:
            if seg in ("", ".", ".."):
                raise HTTPError(403, "path traversal refused")
            if "%" in seg or "/" in seg or "\\" in seg or "\x00" in seg:
                raise HTTPError(403, "encoded path separators refused")
            if any(ord(c) < 32 or ord(c) == 127 for c in seg):
                raise HTTPError(400, "control characters in path")
            if seg.startswith("."):
                raise HTTPError(404, "not found")
            if len(seg.encode("utf-8")) > 255:
                raise HTTPError(404, "not found")
        if not segments[-1].endswith(".json"):
            raise HTTPError(404, "only .json files are served from the graph folder")
        real = os.path.realpath(self.graph_dir.joinpath(*segments))
        root = str(self.graph_dir)
        if os.path.commonpath([real, root]) != root:
            raise HTTPError(403, "path leaves the graph folder")
        if not real.endswith(".json") or not os.path.isfile(real):
            raise HTTPError(404, "not found")
        return Path(real)

    def graph_nodes(self, slug: str) -> dict[str, Any]:
        """node id -> node of ``{slug}.json`` (cached by mtime and size)."""
        path = self.resolve_data_path([f"{slug}.json"])
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            hit = self._node_cache.get(str(path))
            if hit and hit[0] == key:
                return hit[1]
        try:
            doc = _loads(path.read_bytes())
        except ValueError as exc:
            raise HTTPError(500, f"{path.name} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
            raise HTTPError(404, f"{path.name} is not a graph JSON")
        nodes = {n["node_id"]: n for n in doc["nodes"] if isinstance(n, dict) and isinstance(n.get("node_id"), str)}
        with self._cache_lock:
            self._node_cache[str(path)] = (key, nodes)
        return nodes

    def check_slug(self, slug: str) -> str:
        self.resolve_data_path([f"{slug}.json"])  # validates the name (403/404)
        if slug.endswith(ANNOTATION_SUFFIX[: -len(".json")]) or slug == "graph-metadata":
            raise HTTPError(404, "not a graph")
        return slug


_BUSY_BODY = b'{"error": "server busy, retry"}\n'
#: the answer to a connection the full queue cannot take (written by the accepting thread)
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
    + b"".join(f"{k}: {v}\r\n".encode() for k, v in SECURITY_HEADERS.items())
    + f"Retry-After: 1\r\nConnection: close\r\nContent-Length: {len(_BUSY_BODY)}\r\n\r\n".encode()
    + _BUSY_BODY
)


class ViewerHandler(http.server.BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "circuit-pipeline-viewer"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # -- plumbing ------------------------------------------------------------------------------

    def setup(self) -> None:
        # StreamRequestHandler.setup applies self.timeout to the connection's socket: a read
        # (request line, headers, body, the next keep-alive request) waits at most this long
        self.timeout = self.server.limits.timeout  # type: ignore[misc]
        super().setup()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # would be answered without a status line or headers
            self.send_error(400, "HTTP/0.9 requests are not served")
            return False
        return True

    def end_headers(self) -> None:
        # every response, the standard library's own error pages (400/414/431/501/505) included
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        super().end_headers()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's errors (malformed request line, too long, unsupported
        version...) in the viewer's JSON error form; the connection is closed after them."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            # a request line the standard library could not parse leaves the version at
            # HTTP/0.9, whose answers have no status line or headers: answer as HTTP/1.1
            self.request_version = "HTTP/1.1"
        if message is None:
            message = self.responses.get(code, ("error",))[0]
        head = getattr(self, "command", None) == "HEAD" or code < 200 or code in (204, 304)
        try:
            self.send_response(code, message)
            self.send_header("Connection", "close")
            body = _io.json_bytes({"error": message}, sort_keys=False)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", "0" if head else str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str, *, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, status: int, obj, *, head: bool = False) -> None:
        # keys in the order the document was built in: the annotations' schema order
        self._send(status, _io.json_bytes(obj, sort_keys=False), "application/json; charset=utf-8", head=head)

    def _error(self, status: int, message: str, *, head: bool = False) -> None:
        self._send_json(status, {"error": message}, head=head)

    def _check_host(self) -> None:
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1:
            raise HTTPError(400, "more than one Host header")
        if not self.server.loopback_only or not hosts:
            return
        host = hosts[0].strip().lower()  # host names are case-insensitive
        if host.startswith("["):  # [::1]:8000
            name = host[1 : host.find("]")] if "]" in host else host
        else:
            name = host.split(":", 1)[0]
        if not _is_loopback(name):
            raise HTTPError(403, "unexpected Host header (the viewer answers loopback names only)")

    def _route(self) -> tuple[str, list[str]]:
        """(raw path without query, decoded segments)."""
        raw = self.path.split("?", 1)[0].split("#", 1)[0]
        if not raw.startswith("/") or "\\" in raw:
            raise HTTPError(400, "bad request path")
        decoded = unquote(raw, errors="strict") if "%" in raw else raw
        if "\x00" in decoded:
            raise HTTPError(400, "bad request path")
        # split the *raw* path so an encoded "/" stays inside its segment (and is refused)
        segments = [unquote(s, errors="strict") for s in raw.split("/")[1:]]
        return raw, segments

    def _dispatch(self, method: str) -> None:
        head = method == "HEAD"
        try:
            self._check_host()
            try:
                raw, segments = self._route()
            except UnicodeDecodeError:
                raise HTTPError(400, "bad request path") from None
            if method in ("GET", "HEAD"):
                self._get(raw, segments, head=head)
            elif method == "POST":
                self._post(segments)
            else:
                raise HTTPError(405, "method not allowed")
        except HTTPError as exc:
            if exc.status >= 400 and method == "POST":
                self.close_connection = True  # an unread or partly read body may follow
            self._error(exc.status, exc.message, head=head)
        except OSError:  # the client went away (reset, broken pipe) or the socket timed out
            self.close_connection = True
        except Exception as exc:  # a bug: answer 500 rather than drop the connection
            self.close_connection = True
            self.log_error("internal error: %r", exc)
            try:
                self._error(500, "internal server error", head=head)
            except OSError:
                pass

    # -- GET -----------------------------------------------------------------------------------

    def _get(self, raw: str, segments: list[str], *, head: bool) -> None:
        if raw in STATIC_ROUTES:
            name, ctype = STATIC_ROUTES[raw]
            self._send(200, (STATIC_DIR / name).read_bytes(), ctype, head=head)
            return
        if raw == "/favicon.ico":
            self._send(204, b"", "image/x-icon", head=head)
            return
        if segments and segments[0] == "data":
            path = self.server.resolve_data_path(segments[1:])
            data = path.read_bytes()
            try:
                _loads(data)
            except ValueError:
                raise HTTPError(500, f"{path.name} is not valid JSON") from None
            self._send(200, data, "application/json; charset=utf-8", head=head)
            return
        if len(segments) == 3 and segments[:2] == ["api", "annotations"]:
            slug = self.server.check_slug(segments[2])
            name = f"{slug}{ANNOTATION_SUFFIX}"
            if not os.path.lexists(self.server.graph_dir / name):
                self._send_json(200, normalize_annotations({}, slug), head=head)
                return
            path = self.server.resolve_data_path([name])
            try:
                doc = _loads(path.read_bytes())
            except ValueError:
                raise HTTPError(500, f"{path.name} is not valid JSON") from None
            self._send_json(200, doc, head=head)
            return
        raise HTTPError(404, "not found")

    # -- POST ----------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        """Exactly Content-Length bytes of body, or HTTPError: 411 without a Content-Length,
        400 for an invalid one (or a Transfer-Encoding), 413 above the limit, 400 when the
        client sends fewer bytes (closes its side, or falls silent for the socket timeout)."""
        if self.headers.get_all("Transfer-Encoding"):
            raise HTTPError(
                411 if "Content-Length" not in self.headers else 400,
                "send the body with a Content-Length, not a Transfer-Encoding",
            )
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise HTTPError(411, "Content-Length required")
        values = {v.strip() for v in lengths}
        if len(values) != 1 or not next(iter(values)).isascii() or not next(iter(values)).isdigit():
            raise HTTPError(400, "invalid Content-Length")
        n_bytes = int(next(iter(values)))
        limit = self.server.limits.max_body_bytes
        if n_bytes > limit:
            raise HTTPError(413, f"annotations larger than {limit} bytes refused")
        chunks: list[bytes] = []
        got = 0
        try:
            while got < n_bytes:
                chunk = self.rfile.read1(n_bytes - got)  # type: ignore[attr-defined]  # a BufferedReader
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except TimeoutError:
            raise HTTPError(
                400, f"request body shorter than Content-Length ({got} of {n_bytes} bytes before the timeout)"
            ) from None
        if got < n_bytes:
            raise HTTPError(400, f"request body shorter than Content-Length ({got} of {n_bytes} bytes)")
        return b"".join(chunks)

    def _post(self, segments: list[str]) -> None:
        if len(segments) != 3 or segments[:2] != ["api", "annotations"]:
            raise HTTPError(404, "not found")
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{self.headers.get('Host', '')}":
            raise HTTPError(403, "cross-origin request refused")
        if self.headers.get("Sec-Fetch-Site") == "cross-site":
            raise HTTPError(403, "cross-site request refused")
        ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise HTTPError(415, "Content-Type must be application/json")
        body = self._read_body()
        slug = self.server.check_slug(segments[2])
        if json_depth_exceeds(body, self.server.limits.max_json_depth):
            raise HTTPError(400, f"invalid JSON: nested deeper than {self.server.limits.max_json_depth} levels")
        try:
            doc = _loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"invalid JSON: {exc}") from None
        nodes = self.server.graph_nodes(slug)
        try:
            stored = normalize_annotations(doc, slug, nodes)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        path = annotations_path(self.server.graph_dir, slug)
        with self.server.write_lock:
            try:
                _io.atomic_write_bytes(path, _io.json_bytes(stored, sort_keys=False))
            except OSError as exc:
                raise HTTPError(500, f"could not save annotations: {exc.strerror or exc}") from None
        self._send_json(200, stored)


# http.server answers a request with the handler's do_<METHOD>: every method goes through
# _dispatch, which refuses those the viewer does not serve (405) in its JSON error form
for _method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
    setattr(ViewerHandler, f"do_{_method}", functools.partialmethod(ViewerHandler._dispatch, _method))


def make_server(
    graph_dir, host: str = "127.0.0.1", port: int = 8000, *, quiet: bool = True, limits: ServerLimits | None = None
) -> ViewerServer:
    """A bound, not yet running server (``port=0``: any free port; see ``.url``)."""
    return ViewerServer(graph_dir, host, port, quiet=quiet, limits=limits)


def serve(
    graph_dir,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    open_browser: bool = False,
    quiet: bool = False,
    limits: ServerLimits | None = None,
) -> int:
    """Serve until interrupted (Ctrl-C)."""
    server = make_server(graph_dir, host, port, quiet=quiet, limits=limits)
    if not server.loopback_only:
        print(
            f"warning: listening on {host}: anyone who can reach this address can read the "
            "graphs and overwrite their annotations",
            file=sys.stderr,
        )
    if not (server.graph_dir / "graph-metadata.json").is_file():
        print(
            f"warning: {server.graph_dir} has no graph-metadata.json (export graphs with "
            "pipeline.analysis.export.create_graph_files)",
            file=sys.stderr,
        )
    print(f"viewer: {server.url}  (graphs in {server.graph_dir}; Ctrl-C stops)", flush=True)
    if open_browser:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.viewer.server", description=__doc__.split("\n")[0])
    p.add_argument("graph_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    add_limit_options(p)
    args = p.parse_args(argv)
    return serve(args.graph_dir, args.host, args.port, open_browser=args.open, limits=limits_from_args(args))


def add_limit_options(p: argparse.ArgumentParser) -> None:
    """``--timeout``, ``--workers``, ``--backlog`` (see :class:`ServerLimits`)."""
    d = ServerLimits()
    p.add_argument(
        "--timeout", type=float, default=d.timeout, help=f"seconds a silent connection is kept (default {d.timeout:g})"
    )
    p.add_argument("--workers", type=int, default=d.workers, help=f"threads answering requests (default {d.workers})")
    p.add_argument("--backlog", type=int, default=d.backlog, help=f"listen queue length (default {d.backlog})")


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(timeout=args.timeout, workers=args.workers, backlog=args.backlog)


if __name__ == "__main__":
    sys.exit(main())
