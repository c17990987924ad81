// circuit-pipeline viewer: plain JS + SVG, no build step, no external code.
//
// Data comes from the local server only: /data/graph-metadata.json (the graph list),
// /data/<slug>.json (a graph JSON: metadata, qParams, nodes, links) and
// /api/annotations/<slug> (the sidecar: pinned, clicked, labels, supernodes, thresholds) and
// /data/features/<layer>_<feature>.json (a feature's dashboard, fetched when it is clicked).
// Every text taken from data is rendered with textContent / SVG text nodes, never as HTML.
//
// Layout: rows are layers, bottom to top (token embeddings at the bottom, transcoder layers,
// logits at the top); columns are prompt positions, left to right.  Node size: features and
// errors by their own influence, estimated from the cumulative influence the export writes
// (nodes sorted by cumulative influence; own = cumulative - previous cumulative); logits by
// probability.  Edges: blue positive, red negative, width by |weight|.  A crowded cell (many
// nodes of one layer at one position) wraps into sub-rows.
//
// Sliders (client-side pruning): "nodes" keeps feature / error nodes whose cumulative
// influence is <= the value (tokens, logits and pinned nodes always stay); "edges" keeps the
// strongest edges (by |weight|) among the visible nodes until that fraction of their total
// |weight| is reached.  While either filter is active, feature / error nodes left without a
// visible edge are hidden too.
//
// URL: ?slug=<slug>&pinnedIds=<id>,<id>&clickedId=<id>&nodeThreshold=<x>&edgeThreshold=<x>
//
// Attention (optional fields export writes from the qk stage's attention file): a link may carry
// head_loadings = {edge, layers: [{layer, heads: [n_heads], bypass}]}, and the top level
// attention_heads = {n_layers, n_heads, config, heads: [{layer, head, loading, edges:
// [[source, target]], query_pos, key_pos, pattern, score, terms_sum, terms: [{query, key,
// value}], query_marginals, key_marginals}]} with node references {node_id, label, clerp}.
// Clicking an edge shows, per attention layer on its way, the heads sorted by |loading|, the
// bypass and the sum check; a head (from there or the heads list) shows its top query x key
// pairs with their labels, the score and the pattern.
"use strict";

(() => {
  const SVGNS = "http://www.w3.org/2000/svg";
  const FEATURE = "cross layer transcoder";
  const ERROR = "mlp reconstruction error";
  const EMBEDDING = "embedding";
  const LOGIT = "logit";

  const state = {
    graphs: [],
    slug: "",
    meta: {},
    qParams: {},
    nodes: [],            // visible-or-not node records, in file order
    byId: new Map(),      // node id -> node
    links: [],            // {source, target, weight, el}
    inLinks: new Map(),   // node id -> links whose target is the node
    outLinks: new Map(),  // node id -> links whose source is the node
    labels: {},           // node id -> user label
    pinned: [],           // node ids, pin order
    checked: new Set(),   // pinned ids ticked for grouping
    supernodes: {},       // name -> [node ids]
    clicked: "",
    hover: "",
    nodeThreshold: 1,
    edgeThreshold: 1,
    linkType: "both",
    sgPos: "",
    visible: new Set(),
    visibleLinks: [],
    nLayers: 0,
    nPos: 0,
    pos: new Map(),       // node id -> {x, y, r}
    nodeEls: new Map(),   // node id -> its <g> in the main graph
    featureCache: new Map(),
    heads: [],            // attention_heads.heads (QK attributions), most loading first
    headByKey: new Map(), // "layer:head" -> head
    linkByKey: new Map(), // "source\0target" -> link
    edge: null,           // the clicked link
    head: "",             // the shown head, "layer:head"
  };
  window.circuitViewer = { state };

  // ---------------------------------------------------------------------------------------
  // small helpers
  // ---------------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function h(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function s(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!r.ok) {
      let msg = `${r.status}`;
      try { msg += ": " + (await r.json()).error; } catch (e) { /* not JSON */ }
      throw new Error(`${url}: ${msg}`);
    }
    return r.json();
  }

  function message(text, isError) {
    const m = $("message");
    m.textContent = text || "";
    m.classList.toggle("error", !!isError);
  }

  function fmt(x, digits = 3) {
    if (typeof x !== "number" || !isFinite(x)) return "–";
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return x.toExponential(2);
    return x.toFixed(digits);
  }

  function showToken(t) {
    return String(t).replace(/\n/g, "⏎").replace(/\t/g, "⇥");
  }

  // (no Math.max(...xs): that overflows the argument limit on large graphs)
  function maxOf(xs) {
    let m = 1e-12;
    for (const x of xs) if (x > m) m = x;
    return m;
  }

  // a link's head_loadings field, checked: {edge, layers: [{layer, heads: [numbers], bypass}]} or null
  function headLoadings(x) {
    if (!x || typeof x !== "object" || !Array.isArray(x.layers)) return null;
    const layers = x.layers
      .filter((r) => r && Number.isInteger(r.layer) && Array.isArray(r.heads))
      .map((r) => ({ layer: r.layer, heads: r.heads.map(Number), bypass: Number(r.bypass) }));
    return { edge: Number(x.edge), layers };
  }

  function clamp01(x, fallback) {
    const v = Number(x);
    return isFinite(v) && v >= 0 && v <= 1 ? v : fallback;
  }

  // ---------------------------------------------------------------------------------------
  // node facts
  // ---------------------------------------------------------------------------------------

  function featureIndex(n) {
    if (n.feature_type !== FEATURE) return null;
    const m = /^(\d+)_(\d+)_(\d+)$/.exec(n.node_id);
    return m ? Number(m[2]) : null;
  }

  function logitToken(n) {
    const m = /^Output "([\s\S]*)" \(p=/.exec(n.clerp || "");
    return m ? m[1] : (n.clerp || `#${n.feature}`);
  }

  function tokenAt(pos) {
    const toks = state.meta.prompt_tokens || [];
    return pos >= 0 && pos < toks.length ? String(toks[pos]) : `@${pos}`;
  }

  function defaultName(n) {
    switch (n.feature_type) {
      case FEATURE: return `L${n.layer} #${featureIndex(n)} @${n.ctx_idx}`;
      case ERROR: return `error L${n.layer} @${n.ctx_idx}`;
      case EMBEDDING: return `"${showToken(tokenAt(n.ctx_idx))}" @${n.ctx_idx}`;
      case LOGIT: return `output "${showToken(logitToken(n))}"`;
      default: return n.node_id;
    }
  }

  function label(n) {
    return state.labels[n.node_id] || n.clerp || defaultName(n);
  }

  function rowOf(n) {
    if (n.feature_type === EMBEDDING || n.layer === "E") return 0;
    if (n.feature_type === LOGIT) return state.nLayers + 1;
    return Number(n.layer) + 1;
  }

  function supernodeOf(id) {
    for (const [name, ids] of Object.entries(state.supernodes)) if (ids.includes(id)) return name;
    return null;
  }

  // ---------------------------------------------------------------------------------------
  // loading
  // ---------------------------------------------------------------------------------------

  function indexGraph(doc) {
    if (!doc || typeof doc !== "object" || !Array.isArray(doc.nodes) || !Array.isArray(doc.links)) {
      throw new Error("not a graph JSON (needs nodes and links)");
    }
    state.meta = doc.metadata && typeof doc.metadata === "object" ? doc.metadata : {};
    state.qParams = doc.qParams && typeof doc.qParams === "object" ? doc.qParams : {};
    state.nodes = [];
    state.byId = new Map();
    for (const n of doc.nodes) {
      if (!n || typeof n.node_id !== "string" || state.byId.has(n.node_id)) continue;
      state.byId.set(n.node_id, n);
      state.nodes.push(n);
    }
    state.links = [];
    state.inLinks = new Map(state.nodes.map((n) => [n.node_id, []]));
    state.outLinks = new Map(state.nodes.map((n) => [n.node_id, []]));
    for (const l of doc.links) {
      if (!l || !state.byId.has(l.source) || !state.byId.has(l.target)) continue;
      const w = Number(l.weight);
      if (!isFinite(w)) continue;
      const link = { source: l.source, target: l.target, weight: w, el: null, loadings: headLoadings(l.head_loadings) };
      state.links.push(link);
      state.outLinks.get(l.source).push(link);
      state.inLinks.get(l.target).push(link);
    }
    for (const list of [...state.inLinks.values(), ...state.outLinks.values()]) {
      list.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
    }
    state.linkByKey = new Map(state.links.map((l) => [`${l.source}\u0000${l.target}`, l]));
    const att = doc.attention_heads && typeof doc.attention_heads === "object" ? doc.attention_heads : {};
    state.heads = (Array.isArray(att.heads) ? att.heads : [])
      .filter((hd) => hd && typeof hd === "object" && Number.isInteger(hd.layer) && Number.isInteger(hd.head));
    state.headByKey = new Map(state.heads.map((hd) => [`${hd.layer}:${hd.head}`, hd]));
    state.edge = null;
    state.head = "";
    // own influence from the cumulative scores
    const ranked = state.nodes.filter((n) => typeof n.influence === "number")
      .sort((a, b) => a.influence - b.influence);
    let prev = 0;
    for (const n of ranked) {
      n._own = Math.max(0, n.influence - prev);
      prev = n.influence;
    }
    const logits = state.nodes.filter((n) => n.feature_type === LOGIT);
    let maxLayer = -1;
    let maxPos = -1;
    for (const n of state.nodes) {
      if (n.feature_type !== LOGIT && n.layer !== "E" && isFinite(Number(n.layer))) {
        maxLayer = Math.max(maxLayer, Number(n.layer));
      }
      if (Number.isInteger(n.ctx_idx)) maxPos = Math.max(maxPos, n.ctx_idx);
    }
    state.nLayers = logits.length ? Number(logits[0].layer) - 1 : maxLayer + 1;
    state.nPos = Math.max(maxPos + 1, (state.meta.prompt_tokens || []).length, 1);
  }

  function applyAnnotations(ann, params) {
    const known = (id) => typeof id === "string" && state.byId.has(id);
    ann = ann && typeof ann === "object" ? ann : {};
    const q = state.qParams;
    let dropped = 0;
    const keep = (ids) => {
      const out = [];
      for (const id of ids || []) {
        if (known(id)) { if (!out.includes(id)) out.push(id); } else dropped++;
      }
      return out;
    };

    state.labels = {};
    for (const [id, text] of Object.entries(ann.labels || {})) {
      if (known(id) && typeof text === "string") state.labels[id] = text; else dropped++;
    }
    state.supernodes = {};
    const sn = ann.supernodes && Object.keys(ann.supernodes).length ? ann.supernodes : null;
    if (sn) {
      for (const [name, v] of Object.entries(sn)) {
        const ids = keep(Array.isArray(v) ? v : (v && v.nodes));
        if (ids.length) state.supernodes[name] = ids;
      }
    } else if (Array.isArray(q.supernodes)) {
      for (const entry of q.supernodes) {
        if (Array.isArray(entry) && entry.length > 1) {
          const ids = keep(entry.slice(1));
          if (ids.length) state.supernodes[String(entry[0])] = ids;
        }
      }
    }
    if (params.has("pinnedIds")) {
      state.pinned = keep(params.get("pinnedIds").split(",").filter(Boolean));
    } else if (Array.isArray(ann.pinned) && ann.pinned.length) {
      state.pinned = keep(ann.pinned);
    } else {
      state.pinned = keep(Array.isArray(q.pinnedIds) ? q.pinnedIds : []);
    }
    const clicked = params.has("clickedId") ? params.get("clickedId")
      : (ann.clicked || q.clickedId || "");
    state.clicked = known(clicked) ? clicked : "";
    const th = ann.thresholds || {};
    state.nodeThreshold = clamp01(params.get("nodeThreshold") ?? th.node, 1);
    state.edgeThreshold = clamp01(params.get("edgeThreshold") ?? th.edge, 1);
    state.linkType = typeof (ann.qParams || {}).linkType === "string" ? ann.qParams.linkType : "both";
    state.sgPos = typeof (ann.qParams || {}).sg_pos === "string" ? ann.qParams.sg_pos : "";
    state.checked = new Set();
    if (dropped) message(`${dropped} saved annotation(s) refer to nodes not in this graph; ignored`);
  }

  async function boot() {
    wireControls();
    const params = new URLSearchParams(location.search);
    let index;
    try {
      index = await getJSON("/data/graph-metadata.json");
    } catch (e) {
      message(`No graph list: ${e.message}`, true);
      document.body.dataset.ready = "error";
      return;
    }
    state.graphs = Array.isArray(index && index.graphs) ? index.graphs.filter((g) => g && typeof g.slug === "string") : [];
    const select = $("graph-select");
    select.replaceChildren();
    for (const g of state.graphs) {
      const prompt = typeof g.prompt === "string" && g.prompt ? ` — ${g.prompt.slice(0, 60)}` : "";
      select.append(h("option", { value: g.slug }, g.slug + prompt));
    }
    if (!state.graphs.length) {
      message("graph-metadata.json lists no graphs", true);
      document.body.dataset.ready = "error";
      return;
    }
    const slug = params.get("slug") || state.graphs[0].slug;
    select.value = slug;
    try {
      await loadGraph(slug, params);
    } catch (e) {
      message(`Could not load graph "${slug}": ${e.message}`, true);
      document.body.dataset.ready = "error";
      return;
    }
    document.body.dataset.ready = "1";
  }

  async function loadGraph(slug, params) {
    state.slug = slug;
    const enc = encodeURIComponent(slug);
    const [doc, ann] = await Promise.all([
      getJSON(`/data/${enc}.json`),
      getJSON(`/api/annotations/${enc}`).catch((e) => { message(e.message, true); return {}; }),
    ]);
    indexGraph(doc);
    applyAnnotations(ann, params);
    $("prompt-text").textContent = typeof state.meta.prompt === "string" ? state.meta.prompt : "";
    $("node-threshold").value = String(state.nodeThreshold);
    $("edge-threshold").value = String(state.edgeThreshold);
    document.title = `${slug} — circuit-pipeline viewer`;
    computeVisibility();
    renderAll();
    updateURL();
  }

  // ---------------------------------------------------------------------------------------
  // filtering
  // ---------------------------------------------------------------------------------------

  function computeVisibility() {
    const always = new Set([...state.pinned, state.clicked].filter(Boolean));
    const vis = new Set();
    for (const n of state.nodes) {
      if (n.feature_type === EMBEDDING || n.feature_type === LOGIT || always.has(n.node_id)
          || (typeof n.influence === "number" && n.influence <= state.nodeThreshold + 1e-9)
          || typeof n.influence !== "number") {
        vis.add(n.node_id);
      }
    }
    let links = state.links.filter((l) => vis.has(l.source) && vis.has(l.target));
    if (state.edgeThreshold < 1) {
      const sorted = [...links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
      const total = sorted.reduce((acc, l) => acc + Math.abs(l.weight), 0);
      const kept = [];
      let acc = 0;
      for (const l of sorted) {
        if (acc >= state.edgeThreshold * total - 1e-12 * total) break;
        kept.push(l);
        acc += Math.abs(l.weight);
      }
      const keep = new Set(kept);
      links = links.filter((l) => keep.has(l));
    }
    if (state.nodeThreshold < 1 || state.edgeThreshold < 1) {
      const touched = new Set();
      for (const l of links) { touched.add(l.source); touched.add(l.target); }
      for (const id of [...vis]) {
        const t = state.byId.get(id).feature_type;
        if ((t === FEATURE || t === ERROR) && !touched.has(id) && !always.has(id)) vis.delete(id);
      }
    }
    state.visible = vis;
    state.visibleLinks = links;
  }

  // ---------------------------------------------------------------------------------------
  // the main graph
  // ---------------------------------------------------------------------------------------

  function layoutGraph(W, H) {
    const m = { left: 46, right: 14, top: 54, bottom: 46 };
    const nRows = state.nLayers + 2;
    const rowH = (H - m.top - m.bottom) / nRows;
    const colW = (W - m.left - m.right) / state.nPos;
    const yOf = (row) => H - m.bottom - (row + 0.5) * rowH;
    const ownMax = maxOf(state.nodes.filter((n) => n._own !== undefined && n.feature_type !== EMBEDDING)
      .map((n) => n._own));
    const radius = (n) => {
      if (n.feature_type === LOGIT) return 3 + 7 * Math.sqrt(Math.max(0, Number(n.token_prob) || 0));
      if (n.feature_type === EMBEDDING) return 6;
      return 2.5 + 6.5 * Math.sqrt(Math.min(1, (n._own || 0) / ownMax));
    };
    const cells = new Map();
    const logits = [];
    for (const n of state.nodes) {
      if (!state.visible.has(n.node_id)) continue;
      if (n.feature_type === LOGIT) { logits.push(n); continue; }
      const key = `${rowOf(n)}:${n.ctx_idx}`;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(n);
    }
    const pos = new Map();
    for (const list of cells.values()) {
      list.sort((a, b) => (a.feature_type === ERROR) - (b.feature_type === ERROR)
        || (b._own || 0) - (a._own || 0) || a.node_id.localeCompare(b.node_id));
      const n0 = list[0];
      const cx = m.left + (n0.ctx_idx + 0.5) * colW;
      const y = yOf(rowOf(n0));
      // a crowded cell wraps into sub-rows (most influential nodes in the middle one)
      const perRow = Math.max(1, Math.min(list.length, Math.floor((colW * 0.92) / 13)));
      const nSub = Math.min(Math.ceil(list.length / perRow), Math.max(1, Math.floor((rowH * 0.7) / 14)));
      const perSub = Math.ceil(list.length / nSub);
      const subOrder = [...Array(nSub).keys()].sort((a, b) => Math.abs(a - (nSub - 1) / 2) - Math.abs(b - (nSub - 1) / 2) || a - b);
      const dy = nSub > 1 ? Math.min((rowH * 0.7) / (nSub - 1), 18) : 0;
      list.forEach((n, i) => {
        const sub = Math.floor(i / perSub);
        const inSub = Math.min(perSub, list.length - sub * perSub);
        const step = Math.min((colW * 0.92) / inSub, 20);
        const j = i - sub * perSub;
        const row = subOrder[sub];
        pos.set(n.node_id, { x: cx + (j - (inSub - 1) / 2) * step, y: y + (row - (nSub - 1) / 2) * dy, r: radius(n) });
      });
    }
    logits.sort((a, b) => (Number(b.token_prob) || 0) - (Number(a.token_prob) || 0));
    const span = W - m.left - m.right;
    const step = Math.min(span / Math.max(1, logits.length), 110);
    const x0 = m.left + span - step * logits.length + step / 2;  // right-aligned, near the last position
    logits.forEach((n, i) => {
      pos.set(n.node_id, { x: x0 + i * step, y: yOf(state.nLayers + 1), r: radius(n), step });
    });
    state.pos = pos;
    return { m, rowH, colW, yOf };
  }

  // The SVG `id`, emptied, its viewBox its size on the page (at least min; fallback while it is
  // not laid out yet).
  function clearedSvg(id, [minW, minH], [fallbackW, fallbackH]) {
    const svg = $(id);
    const W = Math.max(minW, svg.clientWidth || fallbackW);
    const H = Math.max(minH, svg.clientHeight || fallbackH);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.replaceChildren();
    return { svg, W, H };
  }

  function renderGraph() {
    const { svg, W, H } = clearedSvg("graph", [320, 240], [800, 560]);
    const L = layoutGraph(W, H);

    const grid = s("g", { class: "grid" });
    for (let row = 0; row < state.nLayers + 2; row++) {
      const y = L.yOf(row);
      grid.append(s("line", { x1: L.m.left, x2: W - L.m.right, y1: y, y2: y, class: "row-line" }));
      const name = row === 0 ? "emb" : row === state.nLayers + 1 ? "logit" : `L${row - 1}`;
      grid.append(s("text", { x: L.m.left - 6, y: y + 4, class: "row-label", "text-anchor": "end" }, name));
    }
    for (let p = 1; p < state.nPos; p++) {
      const x = L.m.left + p * L.colW;
      grid.append(s("line", { x1: x, x2: x, y1: L.m.top, y2: H - L.m.bottom, class: "col-line" }));
    }
    for (let p = 0; p < state.nPos; p++) {
      const x = L.m.left + (p + 0.5) * L.colW;
      const tok = showToken(tokenAt(p));
      const maxChars = Math.max(3, Math.floor(L.colW / 7));
      const tg = s("g", { class: "token" });
      tg.append(s("title", {}, tok));
      tg.append(s("text", { x, y: H - L.m.bottom + 18, class: "token-label", "text-anchor": "middle" },
        tok.length > maxChars ? tok.slice(0, maxChars - 1) + "…" : tok));
      grid.append(tg);
      grid.append(s("text", { x, y: H - L.m.bottom + 34, class: "pos-label", "text-anchor": "middle" }, p));
    }
    svg.append(grid);

    const maxW = maxOf(state.visibleLinks.map((l) => Math.abs(l.weight)));
    const gl = s("g", { class: "links" });
    for (const l of state.links) l.el = null;
    for (const l of state.visibleLinks) {
      const a = state.pos.get(l.source);
      const b = state.pos.get(l.target);
      if (!a || !b) continue;
      const e = s("line", {
        x1: a.x, y1: a.y, x2: b.x, y2: b.y,
        class: `link ${l.weight >= 0 ? "pos" : "neg"}`,
        "stroke-width": (0.35 + 3.2 * Math.sqrt(Math.abs(l.weight) / maxW)).toFixed(2),
        "data-source": l.source, "data-target": l.target,
      });
      if (l.loadings) e.classList.add("has-heads");
      if (l === state.edge) e.classList.add("edge-selected");
      e.addEventListener("click", (ev) => { ev.stopPropagation(); selectEdge(l); });
      l.el = e;
      gl.append(e);
    }
    svg.append(gl);

    const gn = s("g", { class: "nodes" });
    state.nodeEls = new Map();
    const glab = s("g", { class: "logit-labels" });
    for (const n of state.nodes) {
      const p = state.pos.get(n.node_id);
      if (!p) continue;
      const kind = { [FEATURE]: "feat", [ERROR]: "err", [EMBEDDING]: "emb", [LOGIT]: "logit" }[n.feature_type] || "feat";
      const g = s("g", { class: `node ${kind}`, transform: `translate(${p.x.toFixed(1)},${p.y.toFixed(1)})`, "data-id": n.node_id });
      let shape;
      if (kind === "err" || kind === "emb") {
        shape = s("rect", { x: -p.r, y: -p.r, width: 2 * p.r, height: 2 * p.r, rx: kind === "emb" ? 2 : 0 });
      } else {
        shape = s("circle", { r: p.r });
      }
      g.append(shape);
      g.append(s("circle", { r: p.r + 3.5, class: "ring" }));
      g.addEventListener("mouseenter", (ev) => { state.hover = n.node_id; highlight(); showTooltip(n, ev); });
      g.addEventListener("mousemove", (ev) => moveTooltip(ev));
      g.addEventListener("mouseleave", () => { state.hover = ""; highlight(); hideTooltip(); });
      g.addEventListener("click", (ev) => {
        ev.stopPropagation();
        if (ev.ctrlKey || ev.metaKey || ev.shiftKey) togglePin(n.node_id);
        else select(n.node_id);
      });
      gn.append(g);
      state.nodeEls.set(n.node_id, g);
      if (kind === "logit") {
        const tok = showToken(logitToken(n));
        const maxChars = Math.max(3, Math.floor((p.step || 60) / 7));
        glab.append(s("text", { x: p.x, y: p.y - p.r - 16, class: "logit-label", "text-anchor": "middle" },
          tok.length > maxChars ? tok.slice(0, maxChars - 1) + "…" : tok));
        glab.append(s("text", { x: p.x, y: p.y - p.r - 4, class: "logit-prob", "text-anchor": "middle" },
          `p=${fmt(Number(n.token_prob), 2)}`));
      }
    }
    svg.append(gn);
    svg.append(glab);
    highlight();
  }

  // Only the focused node's own edges and neighbours change classes; dimming everything else
  // is one class on the containers (cheap on graphs with many thousand edges).
  let lit = { links: [], nodes: [] };

  function highlight() {
    const focus = state.hover || state.clicked;
    for (const l of lit.links) if (l.el) l.el.classList.remove("hl", "hl-in", "hl-out");
    for (const e of lit.nodes) e.classList.remove("neighbor");
    lit = { links: [], nodes: [] };
    const svg = $("graph");
    const gl = svg.querySelector("g.links");
    const gn = svg.querySelector("g.nodes");
    if (gl) gl.classList.toggle("focus", focus !== "");
    if (gn) gn.classList.toggle("focus", focus !== "");
    const light = (l, cls, other) => {
      if (!l.el) return;
      l.el.classList.add("hl", cls);
      lit.links.push(l);
      const e = state.nodeEls.get(other);
      if (e) { e.classList.add("neighbor"); lit.nodes.push(e); }
    };
    if (focus !== "") {
      for (const l of state.inLinks.get(focus) || []) light(l, "hl-in", l.source);
      for (const l of state.outLinks.get(focus) || []) light(l, "hl-out", l.target);
      if (gl) for (const l of lit.links) gl.append(l.el);  // highlighted edges on top
    }
    const pinned = new Set(state.pinned);
    for (const [id, e] of state.nodeEls) {
      e.classList.toggle("selected", id === state.clicked);
      e.classList.toggle("hovered", id === state.hover);
      e.classList.toggle("pinned", pinned.has(id));
    }
  }

  // tooltip -------------------------------------------------------------------------------

  function showTooltip(n, ev) {
    const t = $("tooltip");
    t.replaceChildren(
      h("div", { class: "tt-title" }, label(n)),
      h("div", { class: "muted" }, `${n.node_id} · ${n.feature_type}`),
    );
    if (typeof n.activation === "number") t.append(h("div", {}, `activation ${fmt(n.activation)}`));
    if (typeof n.influence === "number") t.append(h("div", {}, `cumulative influence ${fmt(n.influence)}`));
    if (n.feature_type === LOGIT) t.append(h("div", {}, `probability ${fmt(Number(n.token_prob))}`));
    t.append(h("div", { class: "muted" },
      `${(state.inLinks.get(n.node_id) || []).length} in · ${(state.outLinks.get(n.node_id) || []).length} out`));
    t.hidden = false;
    moveTooltip(ev);
  }

  function moveTooltip(ev) {
    const t = $("tooltip");
    const pane = $("graph-pane").getBoundingClientRect();
    let x = ev.clientX - pane.left + 14;
    const y = ev.clientY - pane.top + 14;
    if (x + 260 > pane.width) x = Math.max(0, x - 290);
    t.style.left = `${x}px`;
    t.style.top = `${y}px`;
  }

  function hideTooltip() { $("tooltip").hidden = true; }

  // ---------------------------------------------------------------------------------------
  // details pane
  // ---------------------------------------------------------------------------------------

  function edgeRows(list, otherEnd, ol, countEl) {
    ol.replaceChildren();
    countEl.textContent = `(${list.length})`;
    for (const l of list.slice(0, 25)) {
      const other = state.byId.get(otherEnd(l));
      const li = h("li", { class: "edge-row", "data-id": other.node_id, tabindex: "0" });
      li.append(h("span", { class: `weight ${l.weight >= 0 ? "pos" : "neg"}` }, fmt(l.weight)));
      li.append(h("span", { class: "edge-label" }, label(other)));
      if (l.loadings) {
        const b = h("button", { type: "button", class: "edge-heads", title: "the heads that carry this edge" }, "heads");
        b.addEventListener("click", (ev) => { ev.stopPropagation(); selectEdge(l); });
        li.append(b);
      }
      li.addEventListener("click", () => select(other.node_id));
      li.addEventListener("keydown", (ev) => { if (ev.key === "Enter") select(other.node_id); });
      ol.append(li);
    }
    if (list.length > 25) ol.append(h("li", { class: "muted" }, `… ${list.length - 25} more`));
  }

  function renderDetails() {
    const n = state.byId.get(state.clicked);
    const title = $("details-title");
    const body = $("details-body");
    if (!n) {
      title.textContent = "Click a node";
      title.classList.add("muted");
      body.hidden = true;
      return;
    }
    title.textContent = label(n);
    title.classList.remove("muted");
    body.hidden = false;
    const dl = $("details-fields");
    dl.replaceChildren();
    const field = (k, v) => { dl.append(h("dt", {}, k), h("dd", {}, v)); };
    field("node", n.node_id);
    field("type", n.feature_type);
    if (n.clerp && state.labels[n.node_id]) field("clerp", n.clerp);
    field("layer", n.feature_type === EMBEDDING ? "embedding" : String(n.layer));
    field("position", `${n.ctx_idx}  "${showToken(tokenAt(n.ctx_idx))}"`);
    const fi = featureIndex(n);
    if (fi !== null) field("feature", String(fi));
    if (typeof n.activation === "number") field("activation", fmt(n.activation));
    if (typeof n.influence === "number") {
      field("influence", `${fmt(n.influence)} cumulative · ${fmt(n._own)} own`);
    }
    if (n.feature_type === LOGIT) field("probability", fmt(Number(n.token_prob)));
    const sn = supernodeOf(n.node_id);
    if (sn !== null) field("supernode", sn);

    const input = $("label-input");
    input.value = state.labels[n.node_id] || "";
    input.placeholder = n.clerp ? `label (clerp: ${n.clerp})` : "label this node";
    $("pin-toggle").textContent = state.pinned.includes(n.node_id) ? "Unpin" : "Pin";

    edgeRows(state.inLinks.get(n.node_id) || [], (l) => l.source, $("edges-in"), $("edges-in-count"));
    edgeRows(state.outLinks.get(n.node_id) || [], (l) => l.target, $("edges-out"), $("edges-out-count"));
    renderFeatureDashboard(n);
  }

  // ---------------------------------------------------------------------------------------
  // feature dashboard: GRAPH_DIR/features/<layer>_<feature>.json, the record written by
  // pipeline.analysis.dashboards.export_feature_json (Dashboards.feature):
  //   {layer, feature, label, n_tokens, n_firing, density, mean_activation, max_activation,
  //    histogram: {edges: [H+1], counts: [H]},            log-spaced bins (non-empty span)
  //    top_examples: [EXAMPLE],                           best first
  //    quantiles: [{index, range: [lo, hi|null], cdf: [p_lo, p_hi], count, examples: [EXAMPLE]}],
  //    logits: {top: [LOGIT], bottom: [LOGIT], per_output_layer?: [{layer, top, bottom}]}}
  //   EXAMPLE = {value, document, position, max_index, tokens: [..], activations: [..], ...}
  //   LOGIT = {token, token_id, value}
  // Everything from the file is put on the page as text nodes (textContent) or attribute
  // values; token shading is a CSSOM style property, never markup.
  // ---------------------------------------------------------------------------------------

  const arr = (x) => (Array.isArray(x) ? x : []);
  const num = (x) => (typeof x === "number" && isFinite(x) ? x : null);

  // three significant digits (logit values span orders of magnitude)
  function sig(x) {
    if (typeof x !== "number" || !isFinite(x)) return "–";
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return x.toExponential(2);
    return x.toPrecision(3);
  }

  function pct(x) {
    if (num(x) === null) return "–";
    const v = 100 * x;
    if (v === 0) return "0%";
    if (v < 0.01) return "<0.01%";
    return `${v < 1 ? v.toFixed(2) : v < 10 ? v.toFixed(1) : v.toFixed(0)}%`;
  }

  // activation -> background: transparent at 0, saturated orange at the feature's max
  function shade(el, act, max) {
    const a = num(act);
    if (a === null || a <= 0 || !(max > 0)) return;
    const t = Math.min(1, a / max);
    el.style.backgroundColor = `rgba(245, 130, 32, ${(0.12 + 0.78 * t).toFixed(3)})`;
  }

  function exampleRow(ex, max, count, words) {
    const li = h("li", { class: "fd-example" });
    li.append(h("span", { class: "fd-value" }, fmt(num(ex.value), 2)));
    if (count > 1) li.dataset.count = String(count);
    const ctx = h("span", { class: "fd-context" });
    const toks = arr(ex.tokens);
    const acts = arr(ex.activations);
    toks.forEach((t, i) => {
      const a = num(acts[i]);
      const tok = h("span", { class: "fd-tok", title: `${showToken(t)}: ${a === null ? "–" : fmt(a)}` },
        showToken(t));
      if (a !== null && a > 0) tok.classList.add("on");
      if (i === ex.max_index) tok.classList.add("max");
      shade(tok, a, max);
      if (words && i > 0) ctx.append(document.createTextNode(" "));
      ctx.append(tok);
    });
    li.append(ctx);
    if (count > 1) li.append(h("span", { class: "fd-count", title: `${count} identical contexts` }, `×${count}`));
    li.title = `document ${ex.document}, token ${ex.position}`;
    return li;
  }

  // identical contexts (a corpus that repeats sentences) are shown once, with their count
  function distinctExamples(examples) {
    const seen = new Map();
    const out = [];
    for (const ex of arr(examples)) {
      if (!ex || typeof ex !== "object") continue;
      const k = JSON.stringify([arr(ex.tokens), ex.max_index, ex.value]);
      if (seen.has(k)) { seen.get(k).count++; continue; }
      const row = { ex, count: 1 };
      seen.set(k, row);
      out.push(row);
    }
    return out;
  }

  function exampleList(examples, max, shown, words) {
    const ol = h("ol", { class: "fd-examples" });
    const rows = distinctExamples(examples);
    rows.slice(0, shown).forEach((r) => ol.append(exampleRow(r.ex, max, r.count, words)));
    if (rows.length > shown) {
      const more = h("button", { type: "button", class: "fd-more" }, `show all ${rows.length}`);
      more.addEventListener("click", () => {
        rows.slice(shown).forEach((r) => ol.insertBefore(exampleRow(r.ex, max, r.count, words), more.parentNode));
        more.parentNode.remove();
      });
      const li = h("li", { class: "fd-more-row" });
      li.append(more);
      ol.append(li);
    }
    return ol;
  }

  // bars over the log-spaced bins (equal widths: a log axis), the node's activation marked
  function histogram(hist, marker) {
    const edges = arr(hist && hist.edges).map(Number);
    const counts = arr(hist && hist.counts).map(Number);
    const W = 340;
    const H = 64;
    const m = { l: 4, r: 4, t: 4, b: 16 };
    const svg = s("svg", { class: "fd-hist", viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": "activation histogram" });
    if (!counts.length || edges.length !== counts.length + 1) {
      svg.append(s("text", { x: W / 2, y: H / 2, class: "muted-text", "text-anchor": "middle" }, "never fires"));
      return svg;
    }
    const bw = (W - m.l - m.r) / counts.length;
    const cmax = maxOf(counts);
    const g = s("g", {});
    counts.forEach((c, i) => {
      const bh = c > 0 ? Math.max(1, (H - m.t - m.b) * Math.sqrt(c / cmax)) : 0;
      const r = s("rect", { x: m.l + i * bw + 0.5, y: H - m.b - bh, width: Math.max(0.5, bw - 1), height: bh,
        class: "fd-bar" });
      r.append(s("title", {}, `[${fmt(edges[i])}, ${fmt(edges[i + 1])}): ${c} token(s)`));
      g.append(r);
    });
    svg.append(g);
    svg.append(s("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "fd-axis" }));
    svg.append(s("text", { x: m.l, y: H - 3, class: "fd-tick" }, fmt(edges[0], 2)));
    svg.append(s("text", { x: W - m.r, y: H - 3, class: "fd-tick", "text-anchor": "end" },
      fmt(edges[edges.length - 1], 2)));
    svg.append(s("text", { x: W / 2, y: H - 3, class: "fd-tick", "text-anchor": "middle" }, "activation (log bins)"));
    const a = num(marker);
    if (a !== null && a > 0) {
      let i = counts.length - 1;
      for (let k = 0; k < counts.length; k++) if (a < edges[k + 1]) { i = k; break; }
      const lo = edges[i];
      const hi = edges[i + 1];
      let f = 0.5;
      if (a < edges[0]) f = 0;
      else if (a >= edges[edges.length - 1]) f = 1;
      else if (lo > 0 && hi > lo) f = Math.log(a / lo) / Math.log(hi / lo);
      else if (hi > lo) f = (a - lo) / (hi - lo);
      const x = a < edges[0] ? m.l : m.l + (i + Math.min(1, Math.max(0, f))) * bw;
      const mk = s("line", { x1: x, x2: x, y1: m.t, y2: H - m.b, class: "fd-marker" });
      mk.append(s("title", {}, `this node: ${fmt(a)}`));
      svg.append(mk);
    }
    return svg;
  }

  function logitTable(top, bottom) {
    const table = h("table", { class: "fd-logits" });
    const head = h("tr", {});
    head.append(h("th", { class: "neg" }, "bottom (−)"), h("th", {}, ""), h("th", { class: "pos" }, "top (+)"), h("th", {}, ""));
    table.append(head);
    const tops = arr(top);
    const bots = arr(bottom);
    for (let i = 0; i < Math.max(tops.length, bots.length); i++) {
      const tr = h("tr", {});
      for (const [lg, cls] of [[bots[i], "neg"], [tops[i], "pos"]]) {
        if (lg && typeof lg === "object") {
          tr.append(h("td", { class: `fd-logit-tok ${cls}`, title: `token id ${lg.token_id}` }, showToken(lg.token)),
            h("td", { class: `fd-logit-val ${cls}` }, sig(num(lg.value))));
        } else {
          tr.append(h("td", {}), h("td", {}));
        }
      }
      table.append(tr);
    }
    return table;
  }

  function buildDashboard(data, n, key) {
    const box = h("div", { class: "fd", "data-key": key });
    // word-level vocabularies (no token starts with a space): a gap between tokens
    const allToks = [...arr(data.top_examples), ...arr(data.quantiles).flatMap((q) => arr(q && q.examples))]
      .flatMap((ex) => arr(ex && ex.tokens));
    const words = allToks.length > 0 && !allToks.some((t) => /^[\sĠ▁]/.test(String(t)));
    if (words) box.classList.add("words");
    const title = h("h3", {}, "Feature dashboard ");
    title.append(h("span", { class: "muted" }, `L${data.layer} #${data.feature}`));
    box.append(title);
    if (typeof data.label === "string" && data.label) box.append(h("div", { class: "fd-label" }, data.label));
    const stats = h("div", { class: "fd-stats" });
    stats.append(h("span", { class: "fd-density" }, `fires on ${pct(num(data.density))}`),
      h("span", { class: "muted" }, ` of ${num(data.n_tokens) === null ? "–" : data.n_tokens.toLocaleString("en-US")} tokens`));
    const acts = h("div", { class: "fd-stats muted" },
      `activation: mean ${fmt(num(data.mean_activation), 2)} · max ${fmt(num(data.max_activation), 2)}`
      + (typeof n.activation === "number" ? ` · this node ${fmt(n.activation, 2)}` : ""));
    box.append(stats, acts);
    box.append(histogram(data.histogram, n.activation));
    const max = num(data.max_activation) || 0;

    const top = arr(data.top_examples);
    const distinct = distinctExamples(top).length;
    box.append(h("h4", {}, `Top activations (${top.length}${distinct < top.length ? `, ${distinct} distinct` : ""})`));
    if (top.length) box.append(exampleList(top, max, 5, words));
    else box.append(h("div", { class: "muted" }, "no examples"));

    const logits = data.logits && typeof data.logits === "object" ? data.logits : {};
    box.append(h("h4", {}, "Output logits"));
    box.append(logitTable(logits.top, logits.bottom));
    const per = arr(logits.per_output_layer).filter((p) => p && typeof p === "object");
    if (per.length) {
      const det = h("details", { class: "fd-per-layer" });
      det.append(h("summary", {}, `per output layer (${per.length})`));
      for (const p of per) {
        const sec = h("div", { class: "fd-out-layer", "data-layer": String(p.layer) });
        sec.append(h("div", { class: "fd-sub" }, `writes to layer ${p.layer}`));
        sec.append(logitTable(p.top, p.bottom));
        det.append(sec);
      }
      box.append(det);
    }

    const qs = arr(data.quantiles).filter((q) => q && typeof q === "object");
    if (qs.length) {
      box.append(h("h4", {}, "Quantile examples"));
      for (const q of [...qs].reverse()) {  // strongest group first, like the top examples
        const det = h("details", { class: "fd-quantile", "data-index": String(q.index) });
        const range = arr(q.range);
        const cdf = arr(q.cdf);
        det.append(h("summary", {},
          `[${fmt(num(range[0]), 2)}, ${range[1] === null ? "∞" : fmt(num(range[1]), 2)}) · `
          + `${pct(num(cdf[0]))}–${pct(num(cdf[1]))} of firings · ${num(q.count) === null ? "–" : q.count} token(s)`));
        det.append(exampleList(q.examples, max, 8, words));
        box.append(det);
      }
    }
    return box;
  }

  function renderFeatureDashboard(n) {
    const slot = $("feature-dashboard");
    slot.replaceChildren();
    delete slot.dataset.state;
    const fi = featureIndex(n);
    if (fi === null) return;
    const key = `${n.layer}_${fi}`;
    const show = (entry) => {
      if (state.clicked !== n.node_id) return;
      slot.replaceChildren();
      slot.dataset.state = entry.status;
      if (entry.status === "none") {
        slot.append(h("div", { class: "muted fd-none" },
          `No feature dashboard: features/${key}.json is not in the graph folder `
          + "(write it with pipeline.analysis.dashboards.export_feature_json)."));
      } else if (entry.status === "error") {
        slot.append(h("div", { class: "fd-none error" }, `Feature dashboard unreadable: ${entry.error}`));
      } else {
        try {
          slot.append(buildDashboard(entry.data, n, key));
        } catch (e) {
          slot.replaceChildren(h("div", { class: "fd-none error" }, `Feature dashboard unreadable: ${e.message}`));
          slot.dataset.state = "error";
        }
      }
    };
    if (state.featureCache.has(key)) { show(state.featureCache.get(key)); return; }
    slot.dataset.state = "loading";
    slot.append(h("div", { class: "muted" }, "loading feature dashboard…"));
    fetch(`/data/features/${encodeURIComponent(key)}.json`, { cache: "no-store", credentials: "same-origin" })
      .then(async (r) => {
        if (r.status === 404) return { status: "none" };
        if (!r.ok) return { status: "error", error: `HTTP ${r.status}` };
        const data = await r.json();
        if (!data || typeof data !== "object" || Array.isArray(data)) {
          return { status: "error", error: "not a feature record" };
        }
        return { status: "ok", data };
      })
      .catch((e) => ({ status: "error", error: e.message }))
      .then((entry) => {
        state.featureCache.set(key, entry);
        show(entry);
      });
  }

  // ---------------------------------------------------------------------------------------
  // attention: the heads that carry an edge, a head's QK attribution, the heads list
  // ---------------------------------------------------------------------------------------

  const HEADS_SHOWN = 8;  // per layer, by |loading|; the rest are counted

  function nodeName(id) {
    const n = state.byId.get(id);
    return n ? label(n) : id;
  }

  function headKey(layer, head) { return `${layer}:${head}`; }

  function selectEdge(l) {
    state.edge = l || null;
    for (const x of state.links) if (x.el) x.el.classList.toggle("edge-selected", x === state.edge);
    renderEdge();
  }

  function selectHead(key) {
    state.head = state.headByKey.has(key) ? key : "";
    renderHead();
    renderHeadsList();
  }

  function renderEdge() {
    const pane = $("edge-pane");
    const l = state.edge;
    if (!l) { pane.hidden = true; return; }
    pane.hidden = false;
    $("edge-title").textContent = `${nodeName(l.source)} → ${nodeName(l.target)}`;
    const body = $("edge-body");
    body.replaceChildren();
    body.dataset.source = l.source;
    body.dataset.target = l.target;
    body.append(h("div", { class: "edge-weight" }, `weight ${fmt(l.weight)} · ${l.source} → ${l.target}`));
    const hl = l.loadings;
    if (!hl) {
      const any = state.links.some((x) => x.loadings);
      body.append(h("div", { class: "muted no-heads" }, any
        ? "No head loadings: not one of the attention file's top edges."
        : "No head loadings: the graph was exported without an attention file (the qk stage's attention.json)."));
      return;
    }
    body.append(h("div", { class: "muted" }, `recomputed edge ${sig(hl.edge)}; per layer, heads + bypass = edge`));
    if (!hl.layers.length) body.append(h("div", { class: "muted" }, "crosses no attention layer"));
    for (const r of hl.layers) {
      const sec = h("div", { class: "hl-layer", "data-layer": String(r.layer) });
      const sum = r.heads.reduce((a, b) => a + b, 0) + r.bypass;
      sec.append(h("h3", {}, `Layer ${r.layer}`));
      sec.append(h("div", { class: "hl-sum muted" },
        `Σ heads + bypass = ${sig(sum)} · edge ${sig(hl.edge)} · |Δ| ${Math.abs(sum - hl.edge).toExponential(1)}`));
      const maxAbs = maxOf([...r.heads.map(Math.abs), Math.abs(r.bypass)]);
      const ol = h("ol", { class: "hl-rows" });
      const bar = (v) => {
        const b = h("span", { class: `hl-bar ${v >= 0 ? "pos" : "neg"}` });
        b.style.width = `${(60 * Math.min(1, Math.abs(v) / maxAbs)).toFixed(1)}px`;
        return b;
      };
      const order = r.heads.map((v, i) => [i, v]).sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]) || a[0] - b[0]);
      for (const [i, v] of order.slice(0, HEADS_SHOWN)) {
        const key = headKey(r.layer, i);
        const li = h("li", { class: "hl-row hl-head", "data-head": String(i) });
        li.append(h("span", { class: "hl-name" }, `H${i}`), h("span", { class: `weight ${v >= 0 ? "pos" : "neg"}` }, sig(v)), bar(v));
        if (state.headByKey.has(key)) {
          li.classList.add("has-qk");
          li.title = "show this head's QK attribution";
          li.tabIndex = 0;
          li.addEventListener("click", () => selectHead(key));
          li.addEventListener("keydown", (ev) => { if (ev.key === "Enter") selectHead(key); });
        }
        ol.append(li);
      }
      if (order.length > HEADS_SHOWN) ol.append(h("li", { class: "muted" }, `… ${order.length - HEADS_SHOWN} more head(s)`));
      const by = h("li", { class: "hl-row hl-bypass" });
      by.append(h("span", { class: "hl-name" }, "bypass"), h("span", { class: `weight ${r.bypass >= 0 ? "pos" : "neg"}` }, sig(r.bypass)), bar(r.bypass));
      ol.append(by);
      sec.append(ol);
      body.append(sec);
    }
  }

  // a node reference of a QK term: its label (the export's clerp, else the structural label)
  function refName(ref) {
    if (!ref || typeof ref !== "object") return "?";
    return String(ref.clerp || ref.label || ref.node_id || "?");
  }

  function refSpan(ref) {
    const id = ref && typeof ref.node_id === "string" ? ref.node_id : null;
    const span = h("span", { class: "qk-node" }, refName(ref));
    span.title = `${String((ref && ref.label) || "")}${id ? ` · ${id}` : " · not in the graph"}`;
    if (id && state.byId.has(id)) {
      span.classList.add("in-graph");
      span.dataset.id = id;
      span.addEventListener("click", () => select(id));
    }
    return span;
  }

  function renderHead() {
    const pane = $("head-pane");
    const hd = state.headByKey.get(state.head);
    if (!hd) { pane.hidden = true; return; }
    pane.hidden = false;
    $("head-title").textContent = `Head L${hd.layer} H${hd.head}`;
    const body = $("head-body");
    body.replaceChildren();
    body.dataset.key = state.head;
    const dl = h("dl", { class: "head-fields" });
    const field = (k, v) => { dl.append(h("dt", {}, k), h("dd", {}, v)); };
    field("query → key", `p${hd.query_pos} "${showToken(tokenAt(hd.query_pos))}" → p${hd.key_pos} "${showToken(tokenAt(hd.key_pos))}"`);
    field("score", `${sig(num(hd.score))} (terms sum ${sig(num(hd.terms_sum))})`);
    field("pattern", fmt(num(hd.pattern)));
    const edges = arr(hd.edges);
    field("|loading|", `${sig(num(hd.loading))} over ${edges.length} edge(s)`);
    body.append(dl);
    body.append(h("h3", {}, "Top query × key pairs"));
    const table = h("table", { class: "qk-terms" });
    for (const t of arr(hd.terms)) {
      if (!t || typeof t !== "object") continue;
      const tr = h("tr", { class: "qk-term" });
      const v = num(t.value);
      tr.append(h("td", { class: `weight ${v !== null && v < 0 ? "neg" : "pos"}` }, sig(v)));
      const q = h("td", {});
      q.append(refSpan(t.query));
      const k = h("td", {});
      k.append(refSpan(t.key));
      tr.append(q, h("td", { class: "muted" }, "×"), k);
      table.append(tr);
    }
    body.append(table);
    for (const [side, title] of [["query_marginals", "Top query-side terms (row sums)"],
      ["key_marginals", "Top key-side terms (column sums)"]]) {
      const list = arr(hd[side]).filter((m) => m && typeof m === "object");
      if (!list.length) continue;
      body.append(h("h3", {}, title));
      const ol = h("ol", { class: `qk-marginals ${side}` });
      for (const m of list) {
        const li = h("li", {});
        const v = num(m.value);
        li.append(h("span", { class: `weight ${v !== null && v < 0 ? "neg" : "pos"}` }, sig(v)), refSpan(m.node));
        ol.append(li);
      }
      body.append(ol);
    }
    if (edges.length) {
      body.append(h("h3", {}, "Edges it carries"));
      const ol = h("ol", { class: "edge-list head-edges" });
      for (const e of edges) {
        if (!Array.isArray(e) || e.length !== 2) continue;
        const l = state.linkByKey.get(`${e[0]}\u0000${e[1]}`);
        const li = h("li", { class: "edge-row" }, `${nodeName(e[0])} → ${nodeName(e[1])}`);
        if (l) li.addEventListener("click", () => selectEdge(l));
        ol.append(li);
      }
      body.append(ol);
    }
  }

  function renderHeadsList() {
    const pane = $("heads-pane");
    pane.hidden = state.heads.length === 0;
    $("heads-count").textContent = `(${state.heads.length})`;
    const ol = $("heads-list");
    ol.replaceChildren();
    for (const hd of state.heads) {
      const key = headKey(hd.layer, hd.head);
      const li = h("li", { class: "head-row", "data-key": key, tabindex: "0" });
      if (key === state.head) li.classList.add("active");
      li.append(h("span", { class: "hl-name" }, `L${hd.layer} H${hd.head}`),
        h("span", { class: "muted" }, ` |loading| ${sig(num(hd.loading))} · p${hd.query_pos}→p${hd.key_pos} · pattern ${fmt(num(hd.pattern), 2)}`));
      li.addEventListener("click", () => selectHead(key));
      li.addEventListener("keydown", (ev) => { if (ev.key === "Enter") selectHead(key); });
      ol.append(li);
    }
  }

  // ---------------------------------------------------------------------------------------
  // subgraph pane: pinned nodes, supernodes
  // ---------------------------------------------------------------------------------------

  function renderPinned() {
    $("pinned-count").textContent = `(${state.pinned.length} pinned)`;
    const ul = $("pinned-list");
    ul.replaceChildren();
    for (const id of state.pinned) {
      const n = state.byId.get(id);
      const li = h("li", { class: "pinned-row", "data-id": id });
      const box = h("input", { type: "checkbox", class: "pin-check", "data-id": id, "aria-label": `check ${id}` });
      box.checked = state.checked.has(id);
      box.addEventListener("change", () => {
        if (box.checked) state.checked.add(id); else state.checked.delete(id);
      });
      const name = h("span", { class: "pin-label" }, label(n));
      name.addEventListener("click", () => select(id));
      const sn = supernodeOf(id);
      li.append(box, name);
      if (sn !== null) li.append(h("span", { class: "tag" }, sn));
      const un = h("button", { type: "button", class: "unpin", title: "unpin" }, "×");
      un.addEventListener("click", () => togglePin(id));
      li.append(un);
      ul.append(li);
    }
    const sl = $("supernode-list");
    sl.replaceChildren();
    for (const [name, ids] of Object.entries(state.supernodes)) {
      const li = h("li", { class: "supernode-row", "data-name": name });
      li.append(h("span", { class: "sn-name" }, name));
      const nf = ids.filter((id) => state.byId.get(id).feature_type === FEATURE).length;
      li.append(h("span", { class: "muted" }, ` ${ids.length} node(s), ${nf} feature(s)`));
      const ug = h("button", { type: "button", class: "ungroup", title: "ungroup" }, "ungroup");
      ug.addEventListener("click", () => { delete state.supernodes[name]; changed(); });
      li.append(ug);
      sl.append(li);
    }
    renderSubgraph();
  }

  function renderSubgraph() {
    const { svg, W, H } = clearedSvg("subgraph", [200, 120], [360, 240]);
    // items: each supernode, then every pinned node outside a supernode
    const items = [];
    const itemOf = new Map();
    for (const [name, ids] of Object.entries(state.supernodes)) {
      const it = { key: `sn:${name}`, name, ids, supernode: true };
      items.push(it);
      for (const id of ids) itemOf.set(id, it);
    }
    for (const id of state.pinned) {
      if (itemOf.has(id)) continue;
      const it = { key: id, name: label(state.byId.get(id)), ids: [id], supernode: false };
      items.push(it);
      itemOf.set(id, it);
    }
    if (!items.length) {
      svg.append(s("text", { x: W / 2, y: H / 2, class: "muted-text", "text-anchor": "middle" },
        "pin nodes (button or ctrl-click) to build a subgraph"));
      return;
    }
    const m = { l: 16, r: 16, t: 18, b: 22 };
    const nRows = state.nLayers + 2;
    for (const it of items) {
      const nodes = it.ids.map((id) => state.byId.get(id));
      it.row = nodes.reduce((a, n) => a + rowOf(n), 0) / nodes.length;
      it.col = nodes.reduce((a, n) => a + n.ctx_idx, 0) / nodes.length;
    }
    // spread items that share a (rounded) cell
    const cells = new Map();
    for (const it of items) {
      const k = `${Math.round(it.row * 2)}:${Math.round(it.col * 2)}`;
      if (!cells.has(k)) cells.set(k, []);
      cells.get(k).push(it);
    }
    const colW = (W - m.l - m.r) / Math.max(1, state.nPos);
    for (const list of cells.values()) {
      list.forEach((it, i) => {
        it.x = m.l + (it.col + 0.5) * colW + (i - (list.length - 1) / 2) * Math.min(colW, 60);
        it.y = H - m.b - (it.row / Math.max(1, nRows - 1)) * (H - m.t - m.b);
      });
    }
    // aggregated edges between items
    const agg = new Map();
    for (const l of state.links) {
      const a = itemOf.get(l.source);
      const b = itemOf.get(l.target);
      if (!a || !b || a === b) continue;
      const k = `${a.key}\u0000${b.key}`;
      if (!agg.has(k)) agg.set(k, { a, b, w: 0 });
      agg.get(k).w += l.weight;
    }
    const maxW = maxOf([...agg.values()].map((e) => Math.abs(e.w)));
    const ge = s("g", { class: "sub-links" });
    for (const e of agg.values()) {
      ge.append(s("line", {
        x1: e.a.x, y1: e.a.y, x2: e.b.x, y2: e.b.y, class: `link ${e.w >= 0 ? "pos" : "neg"}`,
        "stroke-width": (0.6 + 3.4 * Math.sqrt(Math.abs(e.w) / maxW)).toFixed(2),
      }));
    }
    svg.append(ge);
    const gn = s("g", { class: "sub-nodes" });
    for (const it of items) {
      const g = s("g", { class: `sub-node${it.supernode ? " supernode" : ""}`, transform: `translate(${it.x.toFixed(1)},${it.y.toFixed(1)})`,
        "data-key": it.key });
      if (it.supernode) g.append(s("rect", { x: -9, y: -7, width: 18, height: 14, rx: 4 }));
      else g.append(s("circle", { r: 5 }));
      const text = it.supernode ? `${it.name} (${it.ids.length})` : it.name;
      g.append(s("text", { y: 17, "text-anchor": "middle", class: "sub-label" },
        text.length > 22 ? text.slice(0, 21) + "…" : text));
      g.append(s("title", {}, text));
      g.addEventListener("click", () => select(it.ids[0]));
      gn.append(g);
    }
    svg.append(gn);
  }

  // ---------------------------------------------------------------------------------------
  // actions
  // ---------------------------------------------------------------------------------------

  function renderAll() {
    const filtering = state.nodeThreshold < 1 || state.edgeThreshold < 1;
    $("node-threshold-value").textContent = state.nodeThreshold.toFixed(2);
    $("edge-threshold-value").textContent = state.edgeThreshold.toFixed(2);
    renderGraph();
    renderDetails();
    renderEdge();
    renderHead();
    renderHeadsList();
    renderPinned();
    $("stats").textContent = `${state.visible.size} / ${state.nodes.length} nodes · `
      + `${state.visibleLinks.length} / ${state.links.length} links${filtering ? " (filtered)" : ""}`;
  }

  function select(id) {
    state.clicked = id && state.byId.has(id) ? id : "";
    if (state.clicked && !state.visible.has(state.clicked)) {
      computeVisibility();
      renderGraph();
    }
    highlight();
    renderDetails();
    changed({ render: false });
  }

  function togglePin(id) {
    const i = state.pinned.indexOf(id);
    if (i >= 0) {
      state.pinned.splice(i, 1);
      state.checked.delete(id);
    } else {
      state.pinned.push(id);
    }
    highlight();
    renderDetails();
    renderPinned();
    changed({ render: false });
  }

  function group() {
    const name = $("supernode-name").value.trim();
    if (!name) { message("name the supernode first", true); return; }
    let ids = state.pinned.filter((id) => state.checked.has(id));
    if (!ids.length) ids = state.pinned.filter((id) => supernodeOf(id) === null);
    if (!ids.length) { message("pin (and check) nodes to group", true); return; }
    for (const [other, members] of Object.entries(state.supernodes)) {
      const rest = members.filter((id) => !ids.includes(id));
      if (rest.length) state.supernodes[other] = rest; else delete state.supernodes[other];
    }
    state.supernodes[name] = [...(state.supernodes[name] || []), ...ids];
    state.checked.clear();
    $("supernode-name").value = "";
    message(`supernode "${name}": ${ids.length} node(s)`);
    renderPinned();
    renderDetails();
    changed({ render: false });
  }

  function saveLabel(text) {
    const id = state.clicked;
    if (!id) return;
    if (text && text.trim()) state.labels[id] = text; else delete state.labels[id];
    renderDetails();
    renderPinned();
    changed({ render: false });
  }

  // saving: the URL at once, the sidecar through a queue of POSTs (in order)
  let saveChain = Promise.resolve();
  let saveSeq = 0;

  function annotationDoc() {
    return {
      schema_version: 1,
      slug: state.slug,
      pinned: state.pinned,
      clicked: state.clicked,
      labels: state.labels,
      supernodes: Object.fromEntries(Object.entries(state.supernodes).map(([k, v]) => [k, { nodes: v }])),
      thresholds: { node: state.nodeThreshold, edge: state.edgeThreshold },
      qParams: { linkType: state.linkType, sg_pos: state.sgPos },
    };
  }

  function setSaveState(kind, text) {
    document.body.dataset.saveState = kind;
    document.body.dataset.saveSeq = String(saveSeq);
    $("save-status").textContent = text;
    $("save-status").className = kind;
  }

  function save() {
    const seq = ++saveSeq;
    const body = JSON.stringify(annotationDoc());
    const url = `/api/annotations/${encodeURIComponent(state.slug)}`;
    setSaveState("saving", "saving…");
    saveChain = saveChain.then(async () => {
      try {
        const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body });
        if (!r.ok) {
          let msg = `${r.status}`;
          try { msg += " " + (await r.json()).error; } catch (e) { /* not JSON */ }
          throw new Error(msg);
        }
        if (seq === saveSeq) setSaveState("saved", "saved");
      } catch (e) {
        setSaveState("error", `not saved: ${e.message}`);
      }
    });
    return saveChain;
  }

  function updateURL() {
    const p = new URLSearchParams();
    p.set("slug", state.slug);
    if (state.pinned.length) p.set("pinnedIds", state.pinned.join(","));
    if (state.clicked) p.set("clickedId", state.clicked);
    if (state.nodeThreshold < 1) p.set("nodeThreshold", String(state.nodeThreshold));
    if (state.edgeThreshold < 1) p.set("edgeThreshold", String(state.edgeThreshold));
    history.replaceState(null, "", `${location.pathname}?${p.toString()}`);
  }

  function changed(opts) {
    if (!opts || opts.render !== false) {
      computeVisibility();
      renderAll();
    }
    updateURL();
    save();
  }

  let sliderTimer = null;

  function wireControls() {
    $("graph-select").addEventListener("change", (ev) => {
      location.search = `?slug=${encodeURIComponent(ev.target.value)}`;
    });
    for (const [id, key] of [["node-threshold", "nodeThreshold"], ["edge-threshold", "edgeThreshold"]]) {
      const el = $(id);
      el.addEventListener("input", () => {
        state[key] = clamp01(el.value, 1);
        computeVisibility();
        renderAll();
        updateURL();
      });
      el.addEventListener("change", () => {
        clearTimeout(sliderTimer);
        sliderTimer = setTimeout(() => save(), 150);
      });
    }
    $("graph").addEventListener("click", () => {
      if (state.edge) selectEdge(null);
      if (state.clicked) select("");
    });
    $("pin-toggle").addEventListener("click", () => { if (state.clicked) togglePin(state.clicked); });
    $("label-save").addEventListener("click", () => saveLabel($("label-input").value));
    $("label-input").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") saveLabel($("label-input").value);
    });
    $("label-clear").addEventListener("click", () => saveLabel(""));
    $("group-btn").addEventListener("click", group);
    $("supernode-name").addEventListener("keydown", (ev) => { if (ev.key === "Enter") group(); });
    $("clear-pins").addEventListener("click", () => {
      state.pinned = [];
      state.checked.clear();
      highlight();
      renderDetails();
      renderPinned();
      changed({ render: false });
    });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => { if (state.nodes.length) { renderGraph(); renderSubgraph(); } }, 120);
    });
  }

  window.circuitViewer.save = save;
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
