// AI MRI console: one page, hash routes, no dependencies. Every string from the server is inserted as
// text (never as HTML), so labels and example text cannot inject markup.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const main = () => document.getElementById("main");

function h(tag, attrs, ...children) {
  const svg = ["svg", "g", "line", "circle", "rect", "text", "title", "path"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

function show(...nodes) { main().replaceChildren(...nodes); }
function errorBox(message) { return h("p", { class: "error", role: "alert" }, message); }

async function api(path, params) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) url.searchParams.set(k, v);
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const response = await fetch(url, { headers });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// POST with a server-sent-event answer: calls onProgress for each progress event, resolves with the result.
async function stream(path, body, onProgress) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  if (!response.headers.get("Content-Type").startsWith("text/event-stream")) {
    const err = await response.json();
    throw new Error(err.error || response.statusText);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const kind = /^event: (.*)$/m.exec(chunk)[1];
      const data = JSON.parse(/^data: (.*)$/m.exec(chunk)[1]);
      if (kind === "progress") onProgress(data);
      else if (kind === "result") return data;
      else if (kind === "error") throw new Error(data.error);
    }
  }
  throw new Error("the server closed the stream without an answer");
}

let STATUS = null;
async function status() { if (!STATUS) STATUS = await api("/api/status"); return STATUS; }

function missingList(st, what) {
  const items = st.missing.filter((m) => !what || m.what.includes(what));
  if (!items.length) return null;
  return h("div", { class: "card", id: "missing" }, h("h2", { text: "Not in this run yet" }),
    h("ul", {}, items.map((m) => h("li", {}, m.what + " — build it with ", h("code", { text: m.command })))));
}

// -- Run (home) ---------------------------------------------------------------------------------
async function pageHome() {
  const st = await status();
  show(h("h1", { text: "Run: " + st.run_dir }),
    h("div", { class: "card" },
      h("p", {}, "Model: ", h("b", { text: st.model || "unknown (start with --model)" })),
      h("p", {}, `${st.atlases.length} atlas(es), ${st.graphs.length} graph(s), checkup: ${st.checkup ? "yes" : "no"}, transcoders: ${st.transcoders ? "yes" : "no"}`),
      h("ul", { id: "atlases" }, st.atlases.map((a) => h("li", {}, a.error ? `${a.name}: ${a.error}` :
        h("a", { href: `#/search?atlas=${a.id}` }, `${a.name}: ${a.features.toLocaleString()} features on ${a.site}`))))),
    missingList(st));
}

// -- Feature search -----------------------------------------------------------------------------
async function pageSearch(params) {
  const st = await status();
  if (!st.atlases.length) return show(h("h1", { text: "Features" }), missingList(st, "atlas"));
  const atlas = h("select", { id: "atlas" }, st.atlases.map((a) => h("option", { value: a.id, selected: String(a.id) === params.get("atlas") }, a.name)));
  const by = h("select", { id: "by" }, ["label", "token", "text"].map((b) => h("option", { value: b, selected: b === (params.get("by") || "label") }, "by " + b)));
  const q = h("input", { id: "q", type: "search", placeholder: "a label word, a token, or example text", value: params.get("q") || "", size: 40 });
  const results = h("div", { id: "results" });
  const form = h("form", { class: "row", onsubmit: (e) => { e.preventDefault(); location.hash = `#/search?atlas=${atlas.value}&by=${by.value}&q=${encodeURIComponent(q.value)}`; } },
    atlas, by, q, h("button", { type: "submit", id: "search-go" }, "Search"),
    h("span", { class: "muted" }, "or open feature #"), h("input", { id: "goto", type: "number", min: 0, size: 8,
      onchange: (e) => { location.hash = `#/feature/${atlas.value}/${e.target.value}`; } }));
  show(h("h1", { text: "Features" }), form, results);
  if (!params.get("q")) return;
  try {
    const hits = await api("/api/search", { atlas: atlas.value, by: by.value, q: params.get("q"), limit: 50 });
    results.replaceChildren(hits.length ? h("table", {}, h("tr", {}, h("th", { text: "feature" }), h("th", { text: "label" }), h("th", { text: "density" }), h("th", { text: "score" })),
      hits.map((r) => h("tr", { class: "hit" }, h("td", {}, h("a", { href: `#/feature/${atlas.value}/${r.feature}` }, "#" + r.feature)),
        h("td", { text: r.label || "—" }), h("td", { text: r.density == null ? "" : r.density.toExponential(2) }), h("td", { text: r.score }))))
      : h("p", { class: "muted", id: "no-hits" }, "No feature matches."));
  } catch (err) { results.replaceChildren(errorBox(err.message)); }
}

// -- Feature card -------------------------------------------------------------------------------
function tokenSpans(tokens, acts, peak) {
  return tokens.map((t, i) => {
    const a = Math.max(0, acts[i] || 0) / (peak || 1);
    const span = h("span", { class: "tok", title: (acts[i] || 0).toFixed(2) }, t);
    if (a > 0.01) span.style.backgroundColor = `rgba(245, 158, 11, ${Math.min(1, a).toFixed(2)})`;
    return span;
  });
}

function quantileChart(quantiles, maxAct) {
  const entries = Object.entries(quantiles || {}).sort((a, b) => Number(a[0]) - Number(b[0]));
  if (!entries.length) return h("p", { class: "muted", text: "no activation histogram" });
  const width = 420, height = 120, bw = width / entries.length;
  const top = Math.max(maxAct || 0, ...entries.map((e) => e[1])) || 1;
  return h("svg", { class: "hist", width, height: height + 18, viewBox: `0 0 ${width} ${height + 18}` },
    entries.map(([q, v], i) => h("g", {}, h("rect", { x: i * bw + 2, y: height - (v / top) * height, width: bw - 4, height: (v / top) * height, fill: "#1f6feb" },
      h("title", { text: `${q} quantile: ${v.toFixed(3)}` })), h("text", { x: i * bw + bw / 2, y: height + 14, "text-anchor": "middle", "font-size": 10, fill: "#6b7684" }, q))));
}

async function pageFeature(atlas, id) {
  show(h("p", { class: "muted", text: "Loading feature…" }));
  if (!/^[0-9]+$/.test(atlas)) {  // a link by dictionary name (the checkup report's): its place in this console's list
    const name = decodeURIComponent(atlas);
    const found = (await status()).atlases.find((a) => a.name === name);
    if (!found) return show(h("h1", { text: "Feature " + id }), errorBox(`no atlas named ${name} in this run directory`));
    return location.replace(`#/feature/${found.id}/${id}`);
  }
  let c;
  try { c = await api("/api/feature", { atlas, id }); } catch (err) { return show(h("h1", { text: "Feature " + id }), errorBox(err.message)); }
  const label = c.labels.length ? c.labels[c.labels.length - 1] : null;
  const logits = (rows) => h("div", {}, (rows || []).map(([t, v]) => h("span", { class: "pill", title: v.toFixed(3) }, t)));
  const examples = (list) => list.map((e) => h("div", { class: "example" }, tokenSpans(e.tokens, e.acts, c.max_act)));
  show(
    h("h1", { id: "feature-title", text: `${c.address}` }),
    h("div", { class: "card" },
      h("p", {}, h("b", { text: label ? label.label : "unlabelled" }), label && label.scores ? h("span", { class: "muted" }, "  " + Object.entries(label.scores).map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(3) : v}`).join(", ")) : null),
      h("p", { class: "muted", text: `density ${c.density == null ? "?" : c.density.toExponential(2)} · fires ${c.fires} · max activation ${c.max_act == null ? "?" : c.max_act.toFixed(3)}` }),
      c.atlas.steerable ? h("a", { href: `#/steer?atlas=${atlas}&feature=${id}`, id: "steer-this" }, "Steer with this feature →") : null),
    h("div", { class: "cols" },
      h("div", { class: "card" }, h("h2", { text: "Activation when firing (quantiles)" }), quantileChart(c.quantiles, c.max_act)),
      h("div", { class: "card" }, h("h2", { text: "Logit effects" }), h("p", { class: "muted", text: "promotes" }), logits(c.logits_top), h("p", { class: "muted", text: "suppresses" }), logits(c.logits_bottom))),
    h("div", { class: "card" }, h("h2", { text: "Neighbours (decoder cosine)" }),
      h("div", {}, (c.neighbours || []).map(([f, v]) => h("a", { class: "pill", href: `#/feature/${atlas}/${f}` }, `#${f} ${Number(v).toFixed(2)}`)))),
    h("div", { class: "card", id: "top-examples" }, h("h2", { text: "Top examples" }), examples(c.top_examples)),
    c.sample_examples.length ? h("div", { class: "card" }, h("h2", { text: "Examples across quantiles" }), examples(c.sample_examples)) : null,
  );
}

// -- Steering playground ------------------------------------------------------------------------
async function pageSteer(params) {
  const st = await status();
  const steerable = st.atlases.filter((a) => a.steerable);
  if (!steerable.length && !st.directions.length) return show(h("h1", { text: "Steer" }), errorBox("Nothing to steer with: no atlas next to its dictionary (cfg.json) and no directions/*.npy in this run."), missingList(st, "atlas"));
  const chosen = [], vectors = [];
  const vlist = h("div", { id: "chosen-directions" });
  const redrawV = () => vlist.replaceChildren(...vectors.map((v, i) => h("div", { class: "row" },
    h("span", { class: "pill", text: `${v.name} at ${v.site}` }), "strength",
    h("input", { type: "number", step: "0.5", value: v.strength, onchange: (e) => { v.strength = Number(e.target.value); } }),
    h("button", { class: "secondary", type: "button", onclick: () => { vectors.splice(i, 1); redrawV(); } }, "remove"))));
  const dirSel = h("select", { id: "direction" }, st.directions.map((d) => h("option", { value: d }, d)));
  const dirSite = h("input", { id: "direction-site", value: "resid.1", size: 10 });
  const directionsCard = st.directions.length ? h("div", { class: "card" }, h("h2", { text: "Directions" }), vlist,
    h("div", { class: "row" }, dirSel, "at", dirSite, h("button", { class: "secondary", type: "button", id: "add-direction", onclick: () => {
      vectors.push({ name: dirSel.value, site: dirSite.value, strength: 4 }); redrawV(); } }, "add"))) : null;
  if (params.get("feature")) chosen.push({ atlas: Number(params.get("atlas") || steerable[0].id), feature: Number(params.get("feature")), strength: 4 });
  const list = h("div", { id: "chosen" });
  const redraw = () => list.replaceChildren(...chosen.map((c, i) => h("div", { class: "row" },
    h("span", { class: "pill", text: `${st.atlases[c.atlas].name} #${c.feature}` }), "strength ×max",
    h("input", { type: "number", step: "0.5", value: c.strength, class: "strength", onchange: (e) => { c.strength = Number(e.target.value); } }),
    h("button", { class: "secondary", type: "button", onclick: () => { chosen.splice(i, 1); redraw(); } }, "remove"))));
  redraw();
  const atlasSel = h("select", {}, steerable.map((a) => h("option", { value: a.id }, a.name)));
  const featureIn = h("input", { type: "number", min: 0, placeholder: "feature #", id: "add-feature" });
  const prompt = h("textarea", { id: "prompt", rows: 3, cols: 80 }, "Tell me about your favourite place.");
  const tokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 128, value: 24 });
  const bar = h("progress", { id: "steer-progress", max: 1, value: 0, hidden: true });
  const stage = h("span", { class: "muted", id: "steer-stage" });
  const out = h("div", { id: "steer-out" });
  const run = h("button", { id: "steer-run", type: "button", onclick: async () => {
    run.disabled = true; bar.hidden = false; out.replaceChildren();
    try {
      const res = await stream("/api/steer", { prompt: prompt.value, features: chosen, directions: vectors, max_tokens: Number(tokens.value) }, (p) => {
        stage.textContent = p.stage; bar.max = Math.max(1, p.total); bar.value = p.done;
      });
      stage.textContent = "done";
      out.replaceChildren(h("div", { class: "cols" },
        h("div", { class: "card" }, h("h2", { text: "Unsteered" }), h("p", { id: "unsteered", text: res.unsteered })),
        h("div", { class: "card" }, h("h2", { text: "Steered" }), h("p", { id: "steered", text: res.steered }),
          h("p", { class: "muted" }, res.features.map((f) => f.direction ? `${f.direction} at ${f.site} ×${f.strength}` : `#${f.feature} ${f.label || ""} clamped to ${f.clamp.toFixed(2)}`).join("; ")))));
    } catch (err) { stage.textContent = ""; out.replaceChildren(errorBox(err.message)); }
    run.disabled = false; bar.hidden = true;
  } }, "Generate");
  show(h("h1", { text: "Steer" }),
    h("div", { class: "card" }, h("h2", { text: "Features" }), list,
      steerable.length ? h("div", { class: "row" }, atlasSel, featureIn, h("button", { class: "secondary", type: "button", id: "add", onclick: () => {
        if (featureIn.value === "") return; chosen.push({ atlas: Number(atlasSel.value), feature: Number(featureIn.value), strength: 4 }); featureIn.value = ""; redraw();
      } }, "add")) : h("p", { class: "muted", text: "no atlas with its dictionary in this run" })),
    directionsCard,
    h("div", { class: "card" }, h("h2", { text: "Prompt" }), prompt, h("div", { class: "row" }, "new tokens", tokens, run, bar, stage)),
    out);
}

// -- Attribution graphs -------------------------------------------------------------------------
async function pageGraphs() {
  const st = await status();
  const prompt = h("input", { id: "trace-prompt", size: 60, placeholder: "a prompt whose next token to trace" });
  const stage = h("span", { class: "muted", id: "trace-stage" });
  const bar = h("progress", { max: 1, value: 0, hidden: true });
  const out = h("div", {});
  const go = h("button", { id: "trace-run", type: "button", onclick: async () => {
    go.disabled = true; bar.hidden = false; out.replaceChildren();
    try {
      const res = await stream("/api/trace", { prompt: prompt.value }, (p) => { stage.textContent = p.stage; bar.max = Math.max(1, p.total); bar.value = p.done; });
      STATUS = null;
      location.hash = `#/graph/${encodeURIComponent(res.name)}`;
    } catch (err) { out.replaceChildren(errorBox(err.message)); stage.textContent = ""; }
    go.disabled = false; bar.hidden = true;
  } }, "Trace");
  show(h("h1", { text: "Attribution graphs" }),
    st.graphs.length ? h("ul", { id: "graph-list" }, st.graphs.map((g) => h("li", {}, h("a", { href: `#/graph/${encodeURIComponent(g)}` }, g)))) : missingList(st, "graph"),
    st.transcoders ? h("div", { class: "card" }, h("h2", { text: "New graph" }), h("div", { class: "row" }, prompt, go, bar, stage), out) : null);
}

// circuit-tracer's node records: a transcoder feature is "cross layer transcoder" with node_id LAYER_INDEX_POS
const isFeature = (n) => n.feature_type === "cross layer transcoder";
const featureIndex = (n) => Number(n.node_id.split("_")[1]);

function layerOf(n, maxLayer) {
  if (n.feature_type === "embedding") return -1;
  if (n.feature_type === "logit") return maxLayer + 1;
  return Number(n.layer);
}

// Links drawn as one <path> per (sign, strength bucket): 20k links cost 16 elements, not 20k.
function linkPaths(links, byId, maxW) {
  const BUCKETS = 8, parts = new Map();
  for (const l of links) {
    const a = byId.get(l.source), b = byId.get(l.target);
    if (!a || !b) continue;
    const bucket = Math.min(BUCKETS - 1, Math.floor((BUCKETS * Math.abs(l.weight)) / maxW));
    const key = `${l.weight >= 0 ? "+" : "-"}${bucket}`;
    if (!parts.has(key)) parts.set(key, []);
    parts.get(key).push(`M${a._x.toFixed(1)} ${a._y.toFixed(1)}L${b._x.toFixed(1)} ${b._y.toFixed(1)}`);
  }
  return [...parts.entries()].sort((x, y) => Number(x[0].slice(1)) - Number(y[0].slice(1))).map(([key, segments]) => {
    const strength = (Number(key.slice(1)) + 0.5) / BUCKETS;
    return h("path", { class: "links", d: segments.join(""), fill: "none", stroke: key[0] === "+" ? "#2563eb" : "#dc2626",
      "stroke-opacity": (0.15 + 0.85 * strength).toFixed(3), "stroke-width": (0.4 + 2.6 * strength).toFixed(2) });
  });
}

// Node circles built directly into a fragment (the page's largest element count).
function nodeLayer(nodes) {
  const ns = "http://www.w3.org/2000/svg", layer = document.createElementNS(ns, "g");
  for (const n of nodes) {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("class", "node");
    c.setAttribute("cx", n._x.toFixed(1));
    c.setAttribute("cy", n._y.toFixed(1));
    c.setAttribute("r", n.feature_type === "logit" ? 6 : 4);
    c.setAttribute("fill", isFeature(n) ? "#f59e0b" : { embedding: "#94a3b8", logit: "#16a34a" }[n.feature_type] || "#cbd5e1");
    c.setAttribute("data-id", n.node_id);
    n._el = c;
    layer.appendChild(c);
  }
  return layer;
}

async function pageGraph(name) {
  let g;
  try { g = await api("/api/graph", { name }); } catch (err) { return show(h("h1", { text: name }), errorBox(err.message)); }
  const st = await status();
  const nodes = g.nodes, byId = new Map(nodes.map((n) => [n.node_id, n]));
  const tokens = g.metadata.prompt_tokens || [];
  const maxLayer = Math.max(0, ...nodes.filter((n) => !["embedding", "logit"].includes(n.feature_type)).map((n) => Number(n.layer) || 0));
  // layout: token columns across, layers upward (embeddings at the bottom, logits on top); the nodes of one
  // (layer, position) slot spread across the column, wrapping upward inside the layer's row
  const W = 900, padX = 60, padY = 30, H = Math.max(620, (maxLayer + 3) * 26 + 2 * padY + 20);
  const colW = (W - 2 * padX) / Math.max(1, tokens.length), rowH = (H - 2 * padY - 20) / (maxLayer + 2);
  const perRow = Math.max(1, Math.floor((0.9 * colW) / 9)), slots = new Map();
  for (const n of nodes) {
    const layer = layerOf(n, maxLayer), key = `${layer}:${n.ctx_idx}`, k = slots.get(key) || 0;
    slots.set(key, k + 1);
    n._x = padX + n.ctx_idx * colW + 0.05 * colW + ((k % perRow) + 0.5) * ((0.9 * colW) / perRow);
    n._y = H - padY - 20 - (layer + 1) * rowH - Math.floor(k / perRow) * Math.min(8, rowH / 3);
  }
  const maxW = Math.max(1e-9, ...g.links.map((l) => Math.abs(l.weight)));
  const strongest = [...g.links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  const linkLayer = h("g", { id: "links" });
  const shown = h("input", { id: "links-shown", type: "number", min: 0, step: 500, value: Math.min(3000, strongest.length),
    onchange: () => linkLayer.replaceChildren(...linkPaths(strongest.slice(0, Number(shown.value)), byId, maxW)) });
  linkLayer.replaceChildren(...linkPaths(strongest.slice(0, Number(shown.value)), byId, maxW));
  const selected = new Set(), pinned = new Set(), groups = [];
  const panel = h("div", { id: "node-panel" });
  const svg = h("svg", { class: "graph", id: "graph-svg", viewBox: `0 0 ${W} ${H}` },
    tokens.map((t, i) => h("text", { x: padX + (i + 0.5) * colW, y: H - 8, "text-anchor": "middle", "font-size": 11, fill: "#334" }, t)),
    linkLayer,
    nodeLayer(nodes));
  // one listener for every node (thousands of nodes: no per-node listeners or tooltips to build)
  svg.addEventListener("click", (e) => {
    const id = e.target.getAttribute && e.target.getAttribute("data-id");
    if (!id) return;
    const n = byId.get(id);
    if (selected.has(id)) selected.delete(id); else selected.add(id);
    n._el.classList.toggle("selected");
    renderPanel(n);
  });
  const hover = h("p", { class: "muted", id: "hover" }, " ");
  svg.addEventListener("mouseover", (e) => {
    const id = e.target.getAttribute && e.target.getAttribute("data-id");
    if (id) hover.textContent = byId.get(id).clerp || id;
  });
  const result = h("div", { id: "intervene-out" });
  const stage = h("span", { class: "muted" });
  function atlasFor(n) {
    const wanted = `layer-${n.layer}`;
    return st.atlases.find((a) => a.name === wanted);
  }
  // attention-mediated edges (mri trace --qk-edges): the heads carrying each, and its top head's QK pairs
  const qkEdges = g.qk || [];
  function qkView(e) {
    const heads = h("table", { class: "qk-heads" }, h("tr", {}, h("th", { text: "layer.head" }), h("th", { text: "weight carried" })),
      e.heads.map((x) => h("tr", {}, h("td", { text: `${x.layer}.${x.head}` }), h("td", { text: x.weight.toPrecision(3) }))),
      h("tr", {}, h("td", { text: "residual (no head)" }), h("td", { text: e.residual.toPrecision(3) })));
    const qk = e.qk ? h("div", {},
      h("p", { class: "muted", text: `QK of head ${e.qk.layer}.${e.qk.head}, query @${e.qk.query_pos} → key @${e.qk.key_pos}: score ${e.qk.score.toPrecision(4)}` }),
      h("table", { class: "qk-pairs" }, h("tr", {}, h("th", { text: "query node" }), h("th", { text: "key node" }), h("th", { text: "term" })),
        e.qk.pairs.map((p) => h("tr", {}, h("td", { text: p.query }), h("td", { text: p.key }), h("td", { text: p.value.toPrecision(3) }))))) : null;
    return h("div", { class: "card qk-edge" }, h("h2", { text: `${e.source_label || e.source} → ${JSON.stringify(e.target_label || e.target)} (edge ${e.weight.toPrecision(3)})` }), heads, qk);
  }
  function renderPanel(n) {
    const atlas = isFeature(n) ? atlasFor(n) : null;
    const through = qkEdges.filter((e) => e.source === n.node_id || e.target === n.node_id);
    panel.replaceChildren(h("div", { class: "card" },
      h("h2", { text: n.clerp || n.node_id }),
      h("p", { class: "muted", text: `${n.feature_type} · layer ${n.layer} · position ${n.ctx_idx} (${JSON.stringify(tokens[n.ctx_idx] || "")}) · influence ${n.influence == null ? "?" : Number(n.influence).toFixed(3)}` }),
      atlas ? h("a", { href: `#/feature/${atlas.id}/${featureIndex(n)}`, id: "node-card" }, "Open feature card →") : null,
      h("div", { class: "row" },
        h("button", { class: "secondary", type: "button", id: "pin", onclick: () => { if (pinned.has(n.node_id)) pinned.delete(n.node_id); else pinned.add(n.node_id); n._el.classList.toggle("pinned"); } }, pinned.has(n.node_id) ? "unpin" : "pin"),
        h("button", { class: "secondary", type: "button", id: "group", onclick: () => {
          if (pinned.size < 2) return; groups.push([...pinned]); for (const id of pinned) byId.get(id)._el.classList.remove("pinned"); pinned.clear(); drawGroups();
        } }, "group pinned"))), ...through.map(qkView));
  }
  const groupsBox = h("div", { id: "groups" });
  function drawGroups() { groupsBox.replaceChildren(...groups.map((grp, i) => h("p", { class: "pill" }, `group ${i + 1}: ${grp.length} nodes`))); }
  const factor = h("input", { id: "factor", type: "number", step: "0.5", value: -2 });
  const go = h("button", { id: "intervene-run", type: "button", onclick: async () => {
    const feats = [...selected].map((id) => byId.get(id)).filter(isFeature);
    if (!feats.length) { result.replaceChildren(errorBox("select one or more feature nodes first")); return; }
    go.disabled = true; result.replaceChildren();
    try {
      const res = await stream("/api/intervene", { graph: name, changes: feats.map((n) => ({ layer: Number(n.layer), feature: featureIndex(n), positions: [n.ctx_idx], mode: "scale", value: Number(factor.value) })) },
        (p) => { stage.textContent = p.stage; });
      stage.textContent = "";
      const rows = (list) => h("table", {}, list.map(([t, p]) => h("tr", {}, h("td", { text: JSON.stringify(t) }), h("td", {}, h("div", { class: "bar" }), (p * 100).toFixed(1) + "%"))));
      const tables = [rows(res.before), rows(res.after)];
      tables.forEach((t, k) => t.querySelectorAll(".bar").forEach((b, i) => { b.style.width = `${Math.round(200 * (k ? res.after : res.before)[i][1])}px`; }));
      result.replaceChildren(h("div", { class: "cols" }, h("div", { class: "card", id: "logits-before" }, h("h2", { text: "Top logits before" }), tables[0]),
        h("div", { class: "card", id: "logits-after" }, h("h2", { text: "After" }), tables[1])));
    } catch (err) { result.replaceChildren(errorBox(err.message)); stage.textContent = ""; }
    go.disabled = false;
  } }, "Intervene");
  const info = g.metadata.info || {};
  show(h("h1", { text: `Graph: ${g.metadata.prompt}` }),
    h("p", { class: "muted", id: "graph-scores", text: `${nodes.length} nodes, ${g.links.length} links · ${info.transcoder_kind || "transcoders"} · replacement ${info.replacement_score == null ? "?" : info.replacement_score.toFixed(3)} (full ${info.replacement_score_full == null ? "?" : info.replacement_score_full.toFixed(3)}) · completeness ${info.completeness_score == null ? "?" : info.completeness_score.toFixed(3)} (full ${info.completeness_score_full == null ? "?" : info.completeness_score_full.toFixed(3)}) · linearity check ${info.hessian == null ? "?" : info.hessian.toExponential(1)}` }),
    h("div", { class: "row" }, "strongest links shown", shown, h("span", { class: "muted", text: `of ${g.links.length}` })),
    h("div", { class: "graph-wrap" }, h("div", {}, svg, hover), h("div", {}, panel, groupsBox,
      h("div", { class: "card" }, h("h2", { text: "Intervention" }), h("p", { class: "muted", text: "Scale the selected feature nodes at their positions." }),
        h("div", { class: "row" }, "× ", factor, go, stage)))),
    qkEdges.length ? h("div", { class: "card", id: "attention-edges" }, h("h2", { text: "Attention-mediated edges" }),
      h("p", { class: "muted", text: "Click a listed node for its edges; each edge splits over the heads whose output carries it into the target's position, and its top head's score over query × key feature pairs." }),
      h("ul", {}, qkEdges.map((e) => h("li", {}, h("a", { href: "javascript:void 0", onclick: () => { const n = byId.get(e.target) || byId.get(e.source); if (n) renderPanel(n); } },
        `${e.source_label || e.source} → ${JSON.stringify(e.target_label || e.target)}: ${e.heads.length ? `head ${e.heads[0].layer}.${e.heads[0].head} carries ${e.heads[0].weight.toPrecision(3)} of ${e.weight.toPrecision(3)}` : "no head"}`))))) : null,
    result);
}

// -- Checkup ------------------------------------------------------------------------------------
function evidenceView(ev) {
  if (ev.kind === "features" && ev.dictionary && Array.isArray(ev.rows) && ev.rows.length && "link" in ev.rows[0]) {
    // labelled features: each number opens its card here; examples one per line
    const keys = Object.keys(ev.rows[0]).filter((k) => !["feature", "label", "examples", "link"].includes(k));
    return h("table", { class: "cited" }, h("tr", {}, ["feature", "label", ...keys, "top examples"].map((k) => h("th", { text: k }))),
      ev.rows.map((r) => h("tr", {},
        h("td", {}, h("a", { href: `#/feature/${encodeURIComponent(ev.dictionary)}/${r.feature}` }, "#" + r.feature)),
        h("td", { text: r.label }), keys.map((k) => h("td", { text: typeof r[k] === "number" ? r[k].toFixed(3) : String(r[k]) })),
        h("td", {}, (r.examples || []).map((x) => h("div", { text: x }))))));
  }
  if (Array.isArray(ev.rows) && ev.rows.length && typeof ev.rows[0] === "object") {
    const keys = Object.keys(ev.rows[0]);
    return h("table", {}, h("tr", {}, keys.map((k) => h("th", { text: k }))), ev.rows.map((r) => h("tr", {}, keys.map((k) => h("td", { text: typeof r[k] === "object" ? JSON.stringify(r[k]) : String(r[k]) })))));
  }
  return h("pre", { text: JSON.stringify(ev, null, 1) });
}

async function pageCheckup() {
  let c;
  try { c = await api("/api/checkup"); } catch (err) { const st = await status(); return show(h("h1", { text: "Checkup" }), errorBox(err.message), missingList(st, "checkup")); }
  show(h("h1", { text: `Checkup: ${c.model}` + (c.baseline ? ` vs ${c.baseline}` : "") }),
    h("p", { class: "muted", text: `overall suspicion ${c.suspicion == null ? "?" : Number(c.suspicion).toFixed(2)} · ${c.findings.length} findings` }),
    h("div", { id: "findings" }, c.findings.map((f) => {
      const detail = h("div", { class: "evidence", hidden: true },
        h("p", { text: f.summary || "" }), f.reliability && Object.keys(f.reliability).length ? h("p", { class: "muted", text: "reliability (measured on held-out data): " + Object.entries(f.reliability).map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(3) : JSON.stringify(v)}`).join(", ") }) : null,
        (f.evidence || []).map((ev) => h("div", {}, h("h2", { text: ev.kind || "evidence" }), evidenceView(ev))));
      return h("div", { class: "card finding", onclick: (e) => { if (e.target.closest(".evidence")) return; detail.hidden = !detail.hidden; } },
        h("div", {}, h("span", { class: "suspicion", text: Number(f.suspicion).toFixed(2) }), " ", h("span", { class: "title", text: f.title }), h("span", { class: "muted", text: "  " + (f.category || "") })),
        detail);
    })));
}

// -- routing ------------------------------------------------------------------------------------
async function route() {
  const [path, query] = location.hash.slice(1).split("?");
  const parts = (path || "/").split("/").filter(Boolean);
  const params = new URLSearchParams(query || "");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.getAttribute("href") === "#/" + (parts[0] || ""));
  try {
    if (!parts.length) await pageHome();
    else if (parts[0] === "search") await pageSearch(params);
    else if (parts[0] === "feature" && parts.length === 3) await pageFeature(parts[1], parts[2]);
    else if (parts[0] === "steer") await pageSteer(params);
    else if (parts[0] === "graph" && parts.length === 2) await pageGraph(decodeURIComponent(parts[1]));
    else if (parts[0] === "graph") await pageGraphs();
    else if (parts[0] === "checkup") await pageCheckup();
    else show(errorBox("No such page: " + location.hash));
  } catch (err) { show(errorBox(err.message)); }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
