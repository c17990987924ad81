"""``circuit-pipeline serve GRAPH_DIR``: a local viewer for exported graph JSON files.

A standard-library HTTP server (``http.server.ThreadingHTTPServer``) that serves the viewer's
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
import re
import socket
import socketserver
import sys
import threading
import webbrowser
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from pipeline import _io

__all__ = [
    "ANNOTATIONS_SCHEMA_VERSION",
    "MAX_ANNOTATION_BYTES",
    "ViewerServer",
    "annotations_path",
    "make_server",
    "normalize_annotations",
    "serve",
]

ANNOTATIONS_SCHEMA_VERSION = 1
MAX_ANNOTATION_BYTES = 1 << 20  # 1 MiB per POST body
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
    return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)


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


class ViewerServer(http.server.ThreadingHTTPServer):
    """Serves the viewer and ``graph_dir``; ``.url`` is the page's address."""

    daemon_threads = True

    def __init__(self, graph_dir, host: str = "127.0.0.1", port: int = 8000, *, quiet: bool = True):
        root = Path(os.path.realpath(graph_dir))
        if not root.is_dir():
            raise NotADirectoryError(f"graph folder {graph_dir} is not a directory")
        self.graph_dir = root
        self.quiet = quiet
        self.loopback_only = _is_loopback(host)
        self.write_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._node_cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), ViewerHandler)

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


class ViewerHandler(http.server.BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "circuit-pipeline-viewer"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # -- plumbing ------------------------------------------------------------------------------

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str, *, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, status: int, obj, *, head: bool = False) -> None:
        # keys in the order the document was built in: the annotations' schema order
        self._send(status, _io.json_bytes(obj, sort_keys=False), "application/json; charset=utf-8", head=head)

    def _error(self, status: int, message: str, *, head: bool = False) -> None:
        self._send_json(status, {"error": message}, head=head)

    def _check_host(self) -> None:
        if not self.server.loopback_only:
            return
        host = self.headers.get("Host")
        if host is None:
            return
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
                self.close_connection = True
            self._error(exc.status, exc.message, head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

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
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HTTPError(411, "Content-Length required")
        n_bytes = int(length)
        if n_bytes > MAX_ANNOTATION_BYTES:
            raise HTTPError(413, f"annotations larger than {MAX_ANNOTATION_BYTES} bytes refused")
        body = self.rfile.read(n_bytes)
        slug = self.server.check_slug(segments[2])
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


def make_server(graph_dir, host: str = "127.0.0.1", port: int = 8000, *, quiet: bool = True) -> ViewerServer:
    """A bound, not yet running server (``port=0``: any free port; see ``.url``)."""
    return ViewerServer(graph_dir, host, port, quiet=quiet)


def serve(
    graph_dir, host: str = "127.0.0.1", port: int = 8000, *, open_browser: bool = False, quiet: bool = False
) -> int:
    """Serve until interrupted (Ctrl-C)."""
    server = make_server(graph_dir, host, port, quiet=quiet)
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
    args = p.parse_args(argv)
    return serve(args.graph_dir, args.host, args.port, open_browser=args.open)


if __name__ == "__main__":
    sys.exit(main())
