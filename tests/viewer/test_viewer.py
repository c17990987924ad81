"""The local viewer: server security and the annotations API over HTTP, then the page itself in
headless Chromium (Debian's ``chromium`` driven by playwright; skipped when either is missing).

Install for the browser tests (never downloads a browser)::

    apt-get install -y chromium        # /usr/bin/chromium
    pip install playwright             # the Python driver only; no `playwright install`
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from pipeline.analysis.export import create_graph_files
from pipeline.viewer import server as viewer_server
from pipeline.viewer.server import MAX_ANNOTATION_BYTES, make_server, normalize_annotations
from tests.graph_fixtures import make_graph  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SECRET = "TOP-SECRET-OUTSIDE-THE-GRAPH-FOLDER"
SCRIPT_LABEL = "<script>window.pwned=1</script>"
IMG_LABEL = '<img src=x onerror="window.pwned=2">'


# --------------------------------------------------------------------------------------------
# Fixtures: a graph folder with two exported graphs, a server on a free port
# --------------------------------------------------------------------------------------------


def _toy_graph():
    g = make_graph(7, "clt", n_layers=4, n_pos=6, d_transcoder=40, per_site=(2, 4))
    g.attrs["prompt"] = "The capital of Texas is"
    g.attrs["prompt_tokens"] = ["<bos>", "The", " capital", " of", " Texas", " is"]
    g.attrs["logit_token_strings"] = [" Austin", " Dallas", " the"]
    return g


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("viewer")
    graphs = base / "graphs"
    g = _toy_graph()
    doc = json.loads(create_graph_files(g, "toy", graphs, 0.9, 0.99).read_text())
    features = [n["node_id"] for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    labels = {features[0]: SCRIPT_LABEL, features[1]: "Texas (state)"}
    create_graph_files(g, "toy", graphs, 0.9, 0.99, labels=labels)
    create_graph_files(make_graph(3, "plt", n_layers=3, n_pos=5), "second", graphs)
    (base / "secret.json").write_text(json.dumps({"secret": SECRET}))
    (base / "secret.txt").write_text(SECRET)
    os.symlink(base / "secret.json", graphs / "escape.json")
    os.symlink(graphs / "toy.json", graphs / "inside-link.json")
    (graphs / "notes.txt").write_text("not json")
    (graphs / ".hidden.json").write_text("{}")
    (graphs / "bad.json").write_text("{not json")
    (graphs / "sub").mkdir()
    (graphs / "sub" / "ok.json").write_text('{"ok": true}')

    server = make_server(graphs, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    doc = json.loads((graphs / "toy.json").read_text())
    yield {
        "server": server,
        "graphs": graphs,
        "base": base,
        "url": server.url,
        "port": server.server_address[1],
        "doc": doc,
        "script_node": features[0],
    }
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _no_sidecars(request):
    if "site" in request.fixturenames:
        site = request.getfixturevalue("site")
        for p in site["graphs"].glob("*.annotations.json"):
            p.unlink()
    yield


def req(site, method, path, body=None, headers=None):
    """A raw request (the path is sent exactly as given): (status, headers, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", site["port"], timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        hdrs = {"Host": f"127.0.0.1:{site['port']}"}
        hdrs.update(headers or {})
        if body is not None and "Content-Length" not in hdrs:
            hdrs["Content-Length"] = str(len(body))
        for k, v in hdrs.items():
            if v is not None:
                conn.putheader(k, v)
        conn.endheaders()
        if body is not None:
            conn.send(body)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def post(site, slug, obj, **headers):
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers)
    return req(site, "POST", f"/api/annotations/{slug}", body, hdrs)


def feature_ids(doc):
    return [n["node_id"] for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


def test_page_assets_graph_list_and_json(site):
    status, headers, body = req(site, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="/static/viewer.js"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    for path, ctype in [("/static/viewer.js", "text/javascript"), ("/static/viewer.css", "text/css")]:
        status, headers, body = req(site, "GET", path)
        assert status == 200 and headers["Content-Type"].startswith(ctype) and body
    status, headers, body = req(site, "GET", "/data/graph-metadata.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert [g["slug"] for g in json.loads(body)["graphs"]] == ["second", "toy"]
    status, headers, body = req(site, "GET", "/data/toy.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body == (site["graphs"] / "toy.json").read_bytes()
    status, headers, body = req(site, "HEAD", "/data/toy.json")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    # a symlink that stays inside the folder and a sub-folder are fine
    assert req(site, "GET", "/data/inside-link.json")[0] == 200
    assert req(site, "GET", "/data/sub/ok.json")[2] == b'{"ok": true}'
    # default bind address
    assert make_server.__defaults__[0] == "127.0.0.1"
    assert site["server"].server_address[0] == "127.0.0.1"


@pytest.mark.parametrize(
    "path",
    [
        "/data/../secret.json",
        "/data/sub/../../secret.json",
        "/data/%2e%2e/secret.json",
        "/data/%2E%2E/secret.txt",
        "/data/..%2fsecret.json",
        "/data/%2e%2e%2fsecret.json",
        "/data/%252e%252e/secret.json",
        "/data//etc/passwd",
        "/data/%2fetc%2fpasswd.json",
        "/data/%2F" + "%2F".join(["tmp", "x.json"]),
        "/data/escape.json",  # symlink resolving outside the folder
        "/../secret.json",
        "/static/../server.py",
        "/static/server.py",
        "/static/%2e%2e/server.py",
        "/data/.hidden.json",
        "/data/notes.txt",
        "/data/toy.json/..",
        "/etc/passwd",
        "/api/annotations/..",
        "/api/annotations/%2e%2e%2fsecret",
        "/api/annotations/graph-metadata",
    ],
)
def test_traversal_and_non_json_refused(site, path):
    status, _, body = req(site, "GET", path)
    assert status in (403, 404), (path, status)
    assert SECRET.encode() not in body and b"root:" not in body


def test_absolute_path_symlink_nul_and_absolute_uri(site):
    # an absolute file-system path after the prefix, encoded and not
    assert req(site, "GET", f"/data/{site['base']}/secret.json")[0] in (403, 404)
    assert req(site, "GET", "/data/" + str(site["base"] / "secret.json").replace("/", "%2f"))[0] in (403, 404)
    assert req(site, "GET", "/data/escape.json")[0] == 403
    status, _, body = req(site, "GET", "/data/toy.json%00.txt")
    assert status in (400, 403, 404) and SECRET.encode() not in body
    assert req(site, "GET", f"http://127.0.0.1:{site['port']}/data/toy.json")[0] == 400
    assert req(site, "PUT", "/data/toy.json", b"{}")[0] == 405


def test_only_valid_json_is_served(site):
    status, _, body = req(site, "GET", "/data/bad.json")
    assert status == 500 and b"{not json" not in body


def test_host_header_checked_on_loopback(site):
    assert req(site, "GET", "/data/toy.json", headers={"Host": "evil.example:80"})[0] == 403
    assert req(site, "GET", "/data/toy.json", headers={"Host": f"localhost:{site['port']}"})[0] == 200


def test_annotations_round_trip(site):
    doc = site["doc"]
    feats = feature_ids(doc)
    error = next(n["node_id"] for n in doc["nodes"] if n["feature_type"] == "mlp reconstruction error")
    status, _, body = req(site, "GET", "/api/annotations/toy")
    empty = json.loads(body)
    assert status == 200 and empty["pinned"] == [] and empty["supernodes"] == {}
    sent = {
        "pinned": [feats[2], feats[3], feats[2]],
        "clicked": feats[3],
        "labels": {feats[3]: "capital ⟶ «Austin»", feats[4]: "  "},
        "supernodes": {"capital": [feats[2], feats[3], error]},
        "thresholds": {"node": 0.5, "edge": 1},
    }
    status, _, body = post(site, "toy", sent)
    assert status == 200, body
    path = site["graphs"] / "toy.annotations.json"
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert stored == json.loads(body)

    def triple(node_id):
        layer, feature, pos = map(int, node_id.split("_"))
        return [layer, pos, feature]

    assert stored == {
        "schema_version": 1,
        "slug": "toy",
        "pinned": [feats[2], feats[3]],
        "clicked": feats[3],
        "labels": {feats[3]: "capital ⟶ «Austin»"},
        "supernodes": {
            "capital": {"nodes": [feats[2], feats[3], error], "features": [triple(feats[2]), triple(feats[3])]}
        },
        "thresholds": {"node": 0.5, "edge": 1.0},
        "qParams": {
            "pinnedIds": [feats[2], feats[3]],
            "supernodes": [["capital", feats[2], feats[3], error]],
            "linkType": "both",
            "clickedId": feats[3],
            "sg_pos": "",
        },
    }
    # the triples agree with the graph JSON's own fields
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    for (layer, pos, _), nid in zip(stored["supernodes"]["capital"]["features"], feats[2:4]):
        assert str(layer) == nodes[nid]["layer"] and pos == nodes[nid]["ctx_idx"]
    assert req(site, "GET", "/api/annotations/toy")[2] == path.read_bytes()
    assert req(site, "GET", "/data/toy.annotations.json")[0] == 200
    # the stored document posts back unchanged (features are recomputed, not trusted)
    forged = json.loads(path.read_text())
    forged["supernodes"]["capital"]["features"] = [[9, 9, 9]]
    status, _, body = post(site, "toy", forged)
    assert status == 200 and json.loads(body) == stored
    assert not [p for p in site["graphs"].iterdir() if p.name.endswith(".tmp")]


def test_annotations_refused(site):
    feats = feature_ids(site["doc"])
    good = {"pinned": [feats[0]]}
    assert post(site, "toy", good)[0] == 200
    path = site["graphs"] / "toy.annotations.json"
    before = path.read_bytes()
    # refused from Content-Length alone, before the body is read (no body sent here: the
    # server closes the connection, so a client still writing one would see a broken pipe)
    oversize = req(
        site,
        "POST",
        "/api/annotations/toy",
        None,
        {"Content-Type": "application/json", "Content-Length": str(MAX_ANNOTATION_BYTES + 1)},
    )
    cases = [
        (oversize, 413),
        (post(site, "toy", b"{not json"), 400),
        (post(site, "toy", b'{"thresholds": {"node": NaN}}'), 400),
        (post(site, "toy", b"\xff\xfe"), 400),
        (post(site, "toy", [1, 2]), 400),
        (post(site, "toy", {"pinned": ["9_9_9"]}), 400),
        (post(site, "toy", {"pinned": [feats[0]], "evil": 1}), 400),
        (post(site, "toy", {"labels": {feats[0]: 3}}), 400),
        (post(site, "toy", {"supernodes": {"empty": []}}), 400),
        (post(site, "toy", {"thresholds": {"node": 2}}), 400),
        (post(site, "toy", {"slug": "second"}), 400),
        (post(site, "toy", good, **{"Content-Type": "text/plain"}), 415),
        (post(site, "toy", good, Origin="http://evil.example"), 403),
        (post(site, "toy", good, **{"Sec-Fetch-Site": "cross-site"}), 403),
        (post(site, "toy", good, Host="evil.example"), 403),
        (post(site, "graph-metadata", good), 404),
        (post(site, "missing", good), 404),
        (post(site, "..%2fsecret", good), 403),
        (post(site, "escape", good), 403),
        (req(site, "POST", "/api/annotations/toy", None, {"Content-Type": "application/json"}), 411),
        (post(site, "toy/extra", good), 404),
    ]
    for (status, _, body), expected in cases:
        assert status == expected, (status, expected, body)
    assert path.read_bytes() == before
    assert not (site["base"] / "secret.annotations.json").exists()
    assert not [p for p in site["graphs"].iterdir() if p.name.endswith(".tmp")]


def test_annotations_write_is_atomic(site, monkeypatch):
    feats = feature_ids(site["doc"])
    assert post(site, "toy", {"pinned": [feats[0]]})[0] == 200
    path = site["graphs"] / "toy.annotations.json"
    before = path.read_bytes()
    calls = []

    def failing_replace(src, dst):
        calls.append((src, dst))
        assert Path(src).parent == path.parent and Path(src).read_bytes()  # complete temp file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(viewer_server.os, "replace", failing_replace)
    status, _, body = post(site, "toy", {"pinned": [feats[1]]})
    assert status == 500 and b"No space left" in body and calls
    assert path.read_bytes() == before
    assert not [p for p in site["graphs"].iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    # parallel writers: the file is always one complete document
    docs = [{"pinned": [feats[i]], "labels": {feats[i]: "w" * 1500}} for i in range(8)]
    statuses = []
    threads = [threading.Thread(target=lambda d=d: statuses.append(post(site, "toy", d)[0])) for d in docs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 8
    final = json.loads(path.read_text())
    assert final["pinned"][0] in feats[:8] and final["labels"] == {final["pinned"][0]: "w" * 1500}


def test_normalize_annotations_without_graph():
    doc = normalize_annotations({}, "g")
    assert doc == {
        "schema_version": 1,
        "slug": "g",
        "pinned": [],
        "clicked": "",
        "labels": {},
        "supernodes": {},
        "thresholds": {},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
    }
    with pytest.raises(ValueError, match="unknown"):
        normalize_annotations({"nodes": []}, "g")


def test_serve_subcommand_and_server_errors(tmp_path):
    cli = pytest.importorskip("pipeline.run.cli")
    args = cli.build_parser().parse_args(["serve", str(tmp_path)])
    assert args.func.__name__ == "cmd_serve"
    assert (args.graph_dir, args.port, args.host) == (str(tmp_path), 8000, "127.0.0.1")
    with pytest.raises(NotADirectoryError):
        make_server(tmp_path / "missing", port=0)


# --------------------------------------------------------------------------------------------
# The page in headless Chromium
# --------------------------------------------------------------------------------------------


def _browser_missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser_context(site):
    reason = _browser_missing()
    if reason:
        pytest.skip(f"browser tests skipped: {reason}")
    from playwright.sync_api import sync_playwright

    user_data = tempfile.mkdtemp(prefix="viewer-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            user_data,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 860},
        )
        # nothing may leave this machine: every request must go to a local test server
        context.route(lambda url: not url.startswith("http://127.0.0.1:"), lambda route: route.abort())
        yield context
        context.close()
    shutil.rmtree(user_data, ignore_errors=True)


@pytest.fixture
def page(browser_context):
    page = browser_context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.close()
    assert not errors, errors


def open_graph(page, site, query="slug=toy"):
    page.goto(f"{site['url']}?{query}")
    page.wait_for_selector('body[data-ready="1"]', timeout=10_000)


def wait_saved(page):
    # (wait_for_function would need eval, which the page's Content-Security-Policy forbids)
    page.wait_for_selector('body[data-save-state="saved"]', state="attached", timeout=10_000)


def incident(doc, node_id):
    ins = [lk for lk in doc["links"] if lk["target"] == node_id]
    outs = [lk for lk in doc["links"] if lk["source"] == node_id]
    return ins, outs


def test_page_loads_graph_with_all_nodes(site, page):
    doc = site["doc"]
    open_graph(page, site)
    assert page.locator("#graph g.node").count() == len(doc["nodes"])
    assert page.locator("#graph line.link").count() == len(doc["links"])
    assert page.locator("#graph g.node.logit").count() == 3
    assert page.locator("#graph line.link.neg").count() == sum(lk["weight"] < 0 for lk in doc["links"])
    assert page.locator("#graph-select option").all_text_contents()[1].startswith("toy")
    tokens = page.locator("#graph text.token-label").all_text_contents()
    assert tokens == ["<bos>", "The", " capital", " of", " Texas", " is"]
    assert page.locator("#graph text.logit-label").all_text_contents()[0] == " Austin"
    assert page.text_content("#prompt-text") == "The capital of Texas is"
    # layers bottom to top, positions left to right
    y = {}
    for kind in ("emb", "feat", "logit"):
        boxes = [
            page.locator(f"#graph g.node.{kind}").nth(i).bounding_box()
            for i in range(page.locator(f"#graph g.node.{kind}").count())
        ]
        y[kind] = sum(b["y"] for b in boxes) / len(boxes)
    assert y["emb"] > y["feat"] > y["logit"]
    xs = [
        page.locator(f'#graph g.node[data-id="{n["node_id"]}"]').bounding_box()["x"]
        for n in doc["nodes"]
        if n["feature_type"] == "embedding"
    ]
    assert xs == sorted(xs)
    # the node slider prunes client-side; back to 1 shows everything again
    page.locator("#node-threshold").fill("0.3")
    kept = [n for n in doc["nodes"] if n["feature_type"] in ("embedding", "logit") or n["influence"] <= 0.3]
    assert 0 < page.locator("#graph g.node").count() <= len(kept) < len(doc["nodes"])
    assert "nodeThreshold=0.3" in page.url
    page.locator("#node-threshold").fill("1")
    assert page.locator("#graph g.node").count() == len(doc["nodes"])
    page.locator("#edge-threshold").fill("0.5")
    strong = page.locator("#graph line.link").count()
    assert 0 < strong < len(doc["links"])
    page.locator("#edge-threshold").fill("1")


def test_clicking_a_node_shows_its_edges(site, page):
    doc = site["doc"]
    best = max(
        (n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"),
        key=lambda n: sum(map(len, incident(doc, n["node_id"]))),
    )
    ins, outs = incident(doc, best["node_id"])
    assert ins and outs
    open_graph(page, site)
    assert page.locator("#graph line.link.hl").count() == 0
    page.locator(f'#graph g.node[data-id="{best["node_id"]}"]').dispatch_event("click")
    assert page.locator("#graph line.link.hl").count() == len(ins) + len(outs)
    assert page.locator("#graph line.link.hl-in").count() == len(ins)
    assert page.locator("#graph line.link.hl-out").count() == len(outs)
    assert page.text_content("#edges-in-count") == f"({len(ins)})"
    assert page.text_content("#edges-out-count") == f"({len(outs)})"
    assert page.locator("#edges-in .edge-row").count() == min(25, len(ins))
    fields = page.locator("#details-fields dd").all_text_contents()
    assert best["node_id"] in fields and str(best["activation"])[:4] in " ".join(fields)
    page.wait_for_selector('#feature-dashboard[data-state="none"]', timeout=10_000)
    layer, feature, _ = best["node_id"].split("_")
    assert (
        page.locator("#feature-dashboard")
        .text_content()
        .startswith(f"No feature dashboard: features/{layer}_{feature}.json is not in the graph folder")
    )
    assert f"clickedId={best['node_id']}" in page.url
    # an incoming-edge row navigates to that node
    first_source = max(ins, key=lambda lk: abs(lk["weight"]))["source"]
    page.locator("#edges-in .edge-row").first.click()
    assert page.locator("#graph g.node.selected").get_attribute("data-id") == first_source
    # hovering another node highlights that node's edges instead
    tok = next(n for n in doc["nodes"] if n["feature_type"] == "embedding" and incident(doc, n["node_id"])[1])
    page.locator(f'#graph g.node[data-id="{tok["node_id"]}"]').dispatch_event("mouseenter")
    assert page.locator("#graph line.link.hl-out").count() == len(incident(doc, tok["node_id"])[1])
    assert not page.locator("#tooltip").is_hidden()
    page.locator(f'#graph g.node[data-id="{tok["node_id"]}"]').dispatch_event("mouseleave")
    wait_saved(page)


def test_pin_group_label_saved_and_restored(site, page, tmp_path):
    doc = site["doc"]
    feats = [f for f in feature_ids(doc) if f != site["script_node"]]
    a, b = feats[0], feats[-1]
    open_graph(page, site)
    for nid in (a, b):
        page.locator(f'#graph g.node[data-id="{nid}"]').dispatch_event("click")
        page.click("#pin-toggle")
    assert page.locator("#pinned-list .pinned-row").count() == 2
    assert page.locator("#graph g.node.pinned").count() == 2
    for nid in (a, b):
        page.check(f'#pinned-list input.pin-check[data-id="{nid}"]')
    page.fill("#supernode-name", "capital city")
    page.click("#group-btn")
    page.fill("#label-input", "says Austin")  # b is still the clicked node
    page.click("#label-save")
    wait_saved(page)
    stored = json.loads((site["graphs"] / "toy.annotations.json").read_text())

    def triple(node_id):
        layer, feature, pos = map(int, node_id.split("_"))
        return [layer, pos, feature]

    assert stored["pinned"] == [a, b] and stored["clicked"] == b
    assert stored["supernodes"] == {"capital city": {"nodes": [a, b], "features": [triple(a), triple(b)]}}
    assert stored["labels"] == {b: "says Austin"}
    assert stored["qParams"]["pinnedIds"] == [a, b] and stored["qParams"]["clickedId"] == b
    assert f"pinnedIds={a}%2C{b}" in page.url and f"clickedId={b}" in page.url

    page.reload()
    page.wait_for_selector('body[data-ready="1"]')
    assert page.locator("#supernode-list .supernode-row .sn-name").all_text_contents() == ["capital city"]
    assert page.locator("#pinned-list .pinned-row").count() == 2
    assert page.locator("#graph g.node.pinned").count() == 2
    assert page.locator("#graph g.node.selected").get_attribute("data-id") == b
    assert page.text_content("#details-title") == "says Austin"
    assert page.locator("#subgraph g.sub-node.supernode").count() == 1
    # a fresh visit without the query string restores from the sidecar alone
    open_graph(page, site, "slug=toy")
    assert page.locator("#graph g.node.pinned").count() == 2
    assert page.locator("#graph g.node.selected").get_attribute("data-id") == b
    # a screenshot for people (a test artifact; docs/viewer.png comes from docs/make_screenshot.py)
    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_script_labels_render_as_text(site, page):
    open_graph(page, site)
    nid = site["script_node"]
    node = page.locator(f'#graph g.node[data-id="{nid}"]')
    node.dispatch_event("mouseenter")
    assert page.locator("#tooltip .tt-title").text_content() == SCRIPT_LABEL
    node.dispatch_event("click")
    assert page.text_content("#details-title") == SCRIPT_LABEL
    # a user label with an inline handler, saved and reloaded, is text as well
    page.fill("#label-input", IMG_LABEL)
    page.click("#label-save")
    wait_saved(page)
    page.reload()
    page.wait_for_selector('body[data-ready="1"]')
    assert page.text_content("#details-title") == IMG_LABEL
    assert page.locator("#pinned-list .pinned-row").count() == 0
    page.locator(f'#graph g.node[data-id="{nid}"]').dispatch_event("click")
    page.click("#pin-toggle")
    assert page.locator("#pinned-list .pin-label").all_text_contents() == [IMG_LABEL]
    wait_saved(page)
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.locator("body script").count() == 0  # the page's own script is in <head>
    assert page.locator("body img").count() == 0
    assert json.loads((site["graphs"] / "toy.annotations.json").read_text())["labels"] == {nid: IMG_LABEL}


def test_traversal_from_the_page(site, page):
    open_graph(page, site)
    results = page.evaluate(
        """async (paths) => {
        const out = [];
        for (const p of paths) {
            const r = await fetch(p);
            out.push([p, r.status, await r.text()]);
        }
        return out;
    }""",
        [
            "/data/../secret.json",
            "/data/%2e%2e/secret.json",
            "/data/..%2fsecret.json",
            "/data/%2e%2e%2fsecret.txt",
            "/data/escape.json",
            "/data//etc/passwd",
            "/static/..%2fserver.py",
        ],
    )
    for path, status, body in results:
        assert status in (403, 404), (path, status)
        assert SECRET not in body


# --------------------------------------------------------------------------------------------
# Feature dashboards in the node pane: a real (tiny) dashboards store, a real attributed graph
# --------------------------------------------------------------------------------------------

SCRIPT_TOKEN = "<script>window.pwned=3</script>"
IMG_TOKEN = "<img/src=x/onerror=window.pwned=4>"
DASH_CFG = dict(
    top_k=8,
    context_before=3,
    context_after=2,
    n_quantiles=3,
    examples_per_quantile=3,
    hist_bins=12,
    hist_min=1e-2,
    hist_max=10.0,
    n_logits=5,
    batch_tokens=128,
)


@pytest.fixture(scope="module")
def dash_site(tmp_path_factory):
    """A tiny GPT-2 whose vocabulary holds markup tokens, a random CLT, dashboards computed
    from a corpus full of those tokens, the attribution graph of a prompt exported with the
    dashboards' labels, and ``features/*.json`` written by ``export_feature_json``."""
    import random

    import torch

    from pipeline import testing
    from pipeline.analysis import dashboards as D
    from pipeline.engine.attribution import attribute
    from pipeline.engine.replacement import ReplacementModel

    base = tmp_path_factory.mktemp("viewer-dash")
    words = list(testing.DEFAULT_WORDS)
    model_dir = testing.make_tiny_gpt2(
        base / "model", n_layers=2, d_model=16, vocab_words=[*words, SCRIPT_TOKEN, IMG_TOKEN]
    )
    clt_dir = testing.make_random_clt(
        base / "clt", n_layers=2, d_model=16, d_transcoder=64, activation="jump_relu", seed=2
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = ReplacementModel.from_pretrained(model_dir, clt_dir)
        rng = random.Random(0)
        corpus = [
            " ".join(
                [
                    *(rng.choice(words) for _ in range(rng.randint(2, 6))),
                    SCRIPT_TOKEN,
                    *(rng.choice(words) for _ in range(rng.randint(1, 4))),
                    IMG_TOKEN,
                ]
            )
            for _ in range(40)
        ]
        store = D.compute_dashboards(model, corpus, base / "dash.zarr", D.DashboardConfig(**DASH_CFG), progress=False)
        dash = D.Dashboards.open(store)
        graph = attribute(
            "the capital of the state containing dallas is",
            model,
            store=base / "graph.zarr",
            batch_size=64,
            verbose=False,
        )
    finally:
        torch.set_num_threads(threads)
    graphs = base / "graphs"
    path = create_graph_files(graph, "tiny", graphs, tokenizer=dash.vocab, labels=dash.labels(), scan="tiny-clt")
    written = D.export_feature_json(dash, path, graphs)
    doc = json.loads(path.read_text())
    records = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in written}

    def key(node):
        layer, feature, _ = node["node_id"].split("_")
        return f"{layer}_{feature}"

    feats = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert {key(n) for n in feats} == set(records) and len(records) >= 3

    def score(n):  # the most telling feature: markup in its top examples, many firings
        rec = records[key(n)]
        markup = any(SCRIPT_TOKEN in ex["tokens"] for ex in rec["top_examples"])
        return (markup, len(rec["top_examples"]), rec["n_firing"], n["node_id"])

    shown, *others = sorted(feats, key=score, reverse=True)
    missing = next(n for n in others if key(n) != key(shown))
    broken = next(n for n in others if key(n) not in (key(shown), key(missing)))
    (graphs / "features" / f"{key(missing)}.json").unlink()
    (graphs / "features" / f"{key(broken)}.json").write_text("{not json")

    server = make_server(graphs, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {
        "url": server.url,
        "graphs": graphs,
        "doc": doc,
        "n_layers": 2,
        "shown": shown,
        "record": records[key(shown)],
        "missing": missing,
        "broken": broken,
    }
    server.shutdown()
    server.server_close()


def distinct(examples):
    """Examples as the viewer lists them: identical contexts once, in order, with counts."""
    out, counts = [], []
    for ex in examples:
        key = (ex["tokens"], ex["max_index"], ex["value"])
        for i, seen in enumerate(out):
            if (seen["tokens"], seen["max_index"], seen["value"]) == key:
                counts[i] += 1
                break
        else:
            out.append(ex)
            counts.append(1)
    return out, counts


def click_node(page, node_id):
    page.locator(f'#graph g.node[data-id="{node_id}"]').dispatch_event("click")


def test_feature_dashboard_in_the_node_pane(dash_site, page, tmp_path):
    rec, node = dash_site["record"], dash_site["shown"]
    page.goto(f"{dash_site['url']}?slug=tiny")
    page.wait_for_selector('body[data-ready="1"]', timeout=10_000)
    # a crowded cell wraps into sub-rows: no two node centres closer than 8 px, rows kept apart
    boxes = page.locator("#graph g.node").evaluate_all(
        "els => els.map(e => { const b = e.getBoundingClientRect(); "
        "return [e.dataset.id, b.x + b.width / 2, b.y + b.height / 2]; })"
    )
    centres = {nid: (x, y) for nid, x, y in boxes}
    assert len(centres) == len(dash_site["doc"]["nodes"])
    pts = list(centres.values())
    assert min(((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5 for i, a in enumerate(pts) for b in pts[i + 1 :]) >= 8
    ys = {}
    for n in dash_site["doc"]["nodes"]:
        row = 0 if n["feature_type"] == "embedding" else 99 if n["feature_type"] == "logit" else int(n["layer"]) + 1
        ys.setdefault(row, []).append(centres[n["node_id"]][1])
    order = sorted(ys)
    for lower, upper in zip(order, order[1:]):
        assert min(ys[lower]) > max(ys[upper])  # every node of a lower row is below
    click_node(page, node["node_id"])
    page.wait_for_selector('#feature-dashboard[data-state="ok"]', timeout=10_000)
    fd = page.locator("#feature-dashboard")
    # the label (also the node's clerp, from the same store), density and histogram
    assert rec["label"] and fd.locator(".fd-label").text_content() == rec["label"]
    assert page.text_content("#details-title") == rec["label"]
    stats = fd.locator(".fd-stats").all_text_contents()
    assert f"of {rec['n_tokens']:,} tokens" in stats[0] and "fires on " in stats[0]
    assert f"max {rec['max_activation']:.2f}" in stats[1] and f"this node {node['activation']:.2f}" in stats[1]
    v = 100 * rec["density"]
    assert 0.01 < v < 100
    share = f"{v:.2f}%" if v < 1 else f"{v:.1f}%" if v < 10 else f"{v:.0f}%"
    assert fd.locator(".fd-density").text_content() == f"fires on {share}"
    assert fd.locator("svg.fd-hist rect.fd-bar").count() == len(rec["histogram"]["counts"]) > 0
    assert fd.locator("svg.fd-hist line.fd-marker").count() == 1  # this node's activation

    # top examples (identical contexts once, with a count): five shown, the rest behind a
    # button; every token's text and shading
    top, counts = distinct(rec["top_examples"])
    rows = fd.locator(".fd-examples").first.locator("li.fd-example")
    assert rows.count() == min(5, len(top))
    if len(top) > 5:
        fd.locator(".fd-examples").first.locator("button.fd-more").click()
    assert rows.count() == len(top)
    for i, ex in enumerate(top):
        row = rows.nth(i)
        assert row.get_attribute("data-count") == (str(counts[i]) if counts[i] > 1 else None)
        toks = row.locator(".fd-tok")
        assert toks.all_text_contents() == ex["tokens"]
        assert row.locator(".fd-value").text_content() == f"{ex['value']:.2f}"
        on = [j for j, a in enumerate(ex["activations"]) if a is not None and a > 0]
        assert [j for j in range(toks.count()) if "on" in toks.nth(j).get_attribute("class").split()] == on
        assert row.locator(".fd-tok.max").text_content() == ex["tokens"][ex["max_index"]]
        colours = toks.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
        for j, colour in enumerate(colours):
            assert (colour != "rgba(0, 0, 0, 0)") == (j in on), (i, j, colour)
    # shading grows with the activation: the feature's strongest token is the most opaque
    alpha = rows.first.locator(".fd-tok.max").evaluate("e => getComputedStyle(e).backgroundColor")
    assert alpha.startswith("rgba(245, 130, 32, 0.9")

    # quantile groups, strongest first, each with its sampled examples
    quant = fd.locator("details.fd-quantile")
    assert quant.count() == len(rec["quantiles"])
    for i, q in enumerate(reversed(rec["quantiles"])):
        det = quant.nth(i)
        assert det.get_attribute("data-index") == str(q["index"])
        assert f"{q['count']} token(s)" in det.locator("summary").text_content()
        det.locator("summary").click()
        texts = [r.locator(".fd-tok").all_text_contents() for r in det.locator("li.fd-example").all()]
        assert texts == [ex["tokens"] for ex in distinct(q["examples"])[0]]

    # output logits: total direction, then per output layer (a CLT)
    table = fd.locator("table.fd-logits").first
    assert table.locator("td.fd-logit-tok.pos").all_text_contents() == [lg["token"] for lg in rec["logits"]["top"]]
    assert table.locator("td.fd-logit-tok.neg").all_text_contents() == [lg["token"] for lg in rec["logits"]["bottom"]]
    values = [float(t) for t in table.locator("td.fd-logit-val").all_text_contents()]
    expected = [v for b, t in zip(rec["logits"]["bottom"], rec["logits"]["top"]) for v in (b["value"], t["value"])]
    assert values == pytest.approx(expected, rel=6e-3, abs=1e-12)
    per = rec["logits"]["per_output_layer"]
    assert len(per) == dash_site["n_layers"] - rec["layer"]
    fd.locator("details.fd-per-layer summary").click()
    sections = fd.locator(".fd-out-layer")
    assert sections.count() == len(per)
    for i, p in enumerate(per):
        assert sections.nth(i).get_attribute("data-layer") == str(p["layer"])
        assert sections.nth(i).locator("td.fd-logit-tok.pos").all_text_contents() == [lg["token"] for lg in p["top"]]

    # markup tokens in examples are text: shown literally, nothing ran, no element was made
    markup = fd.locator(".fd-tok", has_text=SCRIPT_TOKEN)
    assert markup.count() >= 1 and markup.first.text_content() == SCRIPT_TOKEN
    assert fd.locator(".fd-tok", has_text=IMG_TOKEN).count() >= 1
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.locator("body script").count() == 0 and page.locator("body img").count() == 0
    shot = tmp_path / "viewer-dashboard.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_feature_dashboard_missing_broken_and_non_features(dash_site, page):
    page.goto(f"{dash_site['url']}?slug=tiny")
    page.wait_for_selector('body[data-ready="1"]', timeout=10_000)
    fd = page.locator("#feature-dashboard")
    missing = dash_site["missing"]["node_id"]
    layer, feature, _ = missing.split("_")
    click_node(page, missing)
    page.wait_for_selector('#feature-dashboard[data-state="none"]', timeout=10_000)
    assert fd.text_content().startswith(f"No feature dashboard: features/{layer}_{feature}.json is not in")
    click_node(page, dash_site["broken"]["node_id"])
    page.wait_for_selector('#feature-dashboard[data-state="error"]', timeout=10_000)
    assert fd.text_content().startswith("Feature dashboard unreadable: HTTP 500")
    # tokens, errors and logits have no dashboard (and no stale one from the last feature)
    click_node(page, dash_site["shown"]["node_id"])
    page.wait_for_selector('#feature-dashboard[data-state="ok"]', timeout=10_000)
    for kind in ("embedding", "mlp reconstruction error", "logit"):
        other = next((n for n in dash_site["doc"]["nodes"] if n["feature_type"] == kind), None)
        if other is None:
            continue
        click_node(page, other["node_id"])
        assert fd.text_content() == "" and fd.get_attribute("data-state") is None
    # a cached record comes back at once on a second click
    click_node(page, dash_site["shown"]["node_id"])
    assert fd.get_attribute("data-state") == "ok"
    assert fd.locator(".fd-label").text_content() == dash_site["record"]["label"]


# --------------------------------------------------------------------------------------------
# Attention: the heads that carry an edge, a head's QK attribution
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attn_site(tmp_path_factory):
    """The hand-made attention graph exported with its hand-written attention file (a feature
    label with markup among the QK terms), and the same graph without it."""
    from tests.attention_fixtures import LABELS, attention_file, attention_graph

    graphs = tmp_path_factory.mktemp("viewer-attn") / "graphs"
    labels = {**LABELS, (0, 9): IMG_LABEL}
    path = create_graph_files(attention_graph(), "attn", graphs, 1.0, 1.0, labels=labels, attention=attention_file())
    create_graph_files(attention_graph(), "plain", graphs, 1.0, 1.0, labels=labels)
    server = make_server(graphs, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": server.url, "port": server.server_address[1], "graphs": graphs, "doc": json.loads(path.read_text())}
    server.shutdown()
    server.server_close()


def test_attention_fields_served_with_the_graph(attn_site):
    status, headers, body = req(attn_site, "GET", "/data/attn.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body == (attn_site["graphs"] / "attn.json").read_bytes()
    doc = json.loads(body)
    assert [h["layer"] for h in doc["attention_heads"]["heads"]] == [1, 0]
    assert sum("head_loadings" in lk for lk in doc["links"]) == 2


def _link(page, source, target):
    return page.locator(f'#graph line.link[data-source="{source}"][data-target="{target}"]')


def test_clicking_an_edge_shows_its_heads_and_a_head_its_qk_pairs(attn_site, page):
    from tests.attention_fixtures import E00, F0, F1, T0, T1

    page.goto(f"{attn_site['url']}?slug=attn")
    page.wait_for_selector('body[data-ready="1"]', timeout=10_000)
    assert page.locator("#edge-pane").is_hidden() and page.locator("#head-pane").is_hidden()
    # the heads list: every head of the file, most loading first
    assert page.locator("#heads-list .head-row .hl-name").all_text_contents() == ["L1 H0", "L0 H0"]
    assert page.locator("#graph line.link.has-heads").count() == 2

    # an edge crossing one layer: heads by |loading|, the bypass, the sum check
    _link(page, F0, F1).dispatch_event("click")
    assert page.text_content("#edge-title") == "Dallas → Texas"
    assert page.locator("#graph line.link.edge-selected").count() == 1
    assert page.locator("#edge-body .hl-layer").evaluate_all("els => els.map(e => e.dataset.layer)") == ["1"]
    assert page.locator("#edge-body .hl-head .hl-name").all_text_contents() == ["H0", "H1"]
    assert page.locator("#edge-body .hl-head .weight").all_text_contents() == ["1.50", "-0.250"]
    assert page.text_content("#edge-body .hl-bypass .weight") == "0.750"
    check = page.text_content("#edge-body .hl-sum")
    assert check.startswith("Σ heads + bypass = 2.00 · edge 2.00 · |Δ| ")
    expected = abs((1.5 + -0.25) + 0.7500001 - 2.0000001)
    assert float(check.rsplit(" ", 1)[1]) == pytest.approx(expected, rel=0.1, abs=1e-15)

    # an edge crossing two layers: layer 1's heads reorder by |loading|; only L1 H0 has QK terms
    _link(page, T1, F1).dispatch_event("click")
    assert page.locator("#edge-body .hl-layer").evaluate_all("els => els.map(e => e.dataset.layer)") == ["0", "1"]
    layer1 = page.locator('#edge-body .hl-layer[data-layer="1"]')
    assert layer1.locator(".hl-head .hl-name").all_text_contents() == ["H1", "H0"]
    assert layer1.locator(".hl-head.has-qk .hl-name").all_text_contents() == ["H0"]
    layer1.locator(".hl-head.has-qk").click()

    # the head: position pair with tokens, score, pattern, its top pairs with their labels
    assert page.text_content("#head-title") == "Head L1 H0"
    fields = page.locator("#head-body .head-fields dd").all_text_contents()
    assert fields == ['p1 " is" → p0 "Dallas"', "2.50 (terms sum 2.50)", "0.750", "1.63 over 2 edge(s)"]
    rows = page.locator("#head-body .qk-term")
    assert rows.count() == 3
    cells = [rows.nth(i).locator("td").all_text_contents() for i in range(3)]
    assert cells == [
        ["2.00", "token p1", "×", "Dallas"],
        ["-0.750", IMG_LABEL, "×", "error L0 p0"],
        ["0.500", "bias", "×", "Dallas"],
    ]
    assert page.locator("#head-body .qk-term .qk-node.in-graph").evaluate_all("els => els.map(e => e.dataset.id)") == [
        T1,
        F0,
        E00,
        F0,
    ]
    assert page.locator("#heads-list .head-row.active").get_attribute("data-key") == "1:0"
    # the edges it carries lead back to their edge
    page.locator("#head-body .head-edges .edge-row").first.click()
    assert page.get_attribute("#edge-body", "data-source") == F0
    # a term's node in the graph selects that node
    page.locator("#head-body .qk-node.in-graph").nth(1).click()
    assert page.locator("#graph g.node.selected").get_attribute("data-id") == F0
    # the other head from the list
    page.locator('#heads-list .head-row[data-key="0:0"]').click()
    assert page.text_content("#head-title") == "Head L0 H0"
    assert page.locator("#head-body .qk-term td").all_text_contents() == ["0.375", "token p1", "×", "position p1"]

    # the node pane marks edges with head loadings; its button opens the edge
    page.locator(f'#graph g.node[data-id="{F1}"]').dispatch_event("click")
    assert page.locator("#edges-in .edge-heads").count() == 2
    page.locator("#edges-in .edge-heads").first.click()
    assert page.get_attribute("#edge-body", "data-source") == F0
    # an edge without loadings says why
    _link(page, T0, F0).dispatch_event("click")
    assert page.text_content("#edge-body .no-heads") == "No head loadings: not one of the attention file's top edges."
    assert page.evaluate("typeof window.pwned") == "undefined" and page.locator("body img").count() == 0


def test_graph_without_attention_has_no_heads(attn_site, page):
    from tests.attention_fixtures import F0, F1

    page.goto(f"{attn_site['url']}?slug=plain")
    page.wait_for_selector('body[data-ready="1"]', timeout=10_000)
    assert page.locator("#heads-pane").is_hidden()
    assert page.locator("#graph line.link.has-heads").count() == 0
    _link(page, F0, F1).dispatch_event("click")
    assert page.locator("#edge-pane").is_visible()
    assert page.text_content("#edge-body .no-heads").startswith("No head loadings: the graph was exported without")
    # a click on the background clears the edge
    page.locator("#graph").dispatch_event("click")
    assert page.locator("#edge-pane").is_hidden()
