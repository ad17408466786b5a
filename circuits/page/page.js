// The page's behaviour on top of pyvis's network (globals `network`, `nodes`, `edges`).
// Every string from the graph is written with textContent or drawn on the canvas, never as HTML.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("circuits-data").textContent);
  const graph = data.graph;
  const cards = data.cards;
  const nLayers = data.n_layers;
  const tokens = data.tokens;
  const geometry = data.geometry;
  const original = new Map(nodes.get().map((n) => [n.id, n]));
  // edges of the graph; the edges into suppressed features (kind "inhibited", hidden until asked for)
  // are drawn only: they are no links of the graph JSON
  const baseEdges = edges.get({ filter: (e) => !e.inhibited });
  const nInhibitedEdges = edges.length - baseEdges.length;
  const allLinks = baseEdges
    .map((e) => ({ source: e.from, target: e.to, weight: e.weight }))
    .concat(graph.links_not_shown.map(([source, target, weight]) => ({ source, target, weight })));
  const incoming = new Map();
  const outgoing = new Map();
  for (const link of allLinks) {
    push(incoming, link.target, link);
    push(outgoing, link.source, link);
  }
  const suppressed = new Map((graph.metadata.inhibited_features || []).map((r) => [r.node_id, r]));
  const suppressedIds = [...original.values()].filter((n) => n.kind === "inhibited").map((n) => n.id);
  const inhibits = new Map();  // source -> [{source, target: suppressed feature, weight}]
  for (const r of suppressed.values()) {
    for (const i of r.inhibitors || []) {
      push(inhibits, i.source, { source: i.source, target: r.node_id, weight: i.weight });
    }
  }
  const magnitudes = baseEdges.map((e) => Math.abs(e.weight)).sort((a, b) => a - b);
  const fullWidthWeight = magnitudes.length ? magnitudes[Math.floor(0.95 * (magnitudes.length - 1))] || 1e-12 : 1;
  window.circuitsPage = { ready: false, firstDrawn: null, started: performance.now() };
  const state = { threshold: 0, groups: new Map(), rep: new Map(), nextGroup: 1, hovered: [], hoverTimer: null,
    showInhibited: false };

  function push(map, key, value) {
    if (!map.has(key)) map.set(key, []);
    map.get(key).push(value);
  }

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k === "onclick") node.addEventListener("click", v);
      else node.setAttribute(k, v);
    }
    for (const child of children) if (child) node.appendChild(child);
    return node;
  }

  function fmt(x, digits = 3) {
    return x === null || x === undefined ? "–" : Number(x).toPrecision(digits);
  }

  function tokenAt(pos) {
    return pos < tokens.length ? tokens[pos] : "";
  }

  function nodeName(id) {
    const n = nodes.get(id) || original.get(id);
    if (!n) return id;
    if (n.kind === "feature") return `L${n.layer} #${n.feature} ${n.clerp || ""}`.trim();
    if (n.kind === "error") return `error L${n.layer} @${n.pos} "${tokenAt(n.pos)}"`;
    if (n.kind === "embedding") return `token "${tokenAt(n.pos)}" @${n.pos}`;
    if (n.kind === "logit") return `logit "${n.token}" p=${fmt(n.prob)}`;
    if (n.kind === "inhibited") return `suppressed L${n.layer} #${n.feature} ${n.clerp || ""}`.trim();
    return `supernode "${n.label}"`;
  }

  // ---- edges: threshold, supernodes, visibility -------------------------------------------

  function rgb(weight) {
    return weight >= 0 ? "43,108,176" : "197,48,48";
  }

  function edgeStyle(weight) {
    const rel = Math.min(Math.abs(weight) / fullWidthWeight, 1);
    return { width: 0.4 + 3.6 * rel, color: `rgba(${rgb(weight)},${(0.25 + 0.65 * rel).toFixed(2)})` };
  }

  function edgeVisible(e) {
    if (e.inhibited && !state.showInhibited) return false;
    if (Math.abs(e.weight) < state.threshold) return false;
    return e.supernode || (!state.rep.has(e.from) && !state.rep.has(e.to));
  }

  function refreshEdges() {
    edgesView.refresh();
    const total = edges.length - (state.showInhibited ? 0 : nInhibitedEdges);
    document.getElementById("edge-count").textContent = `${edgesView.length} of ${total} edges`;
    return edgesView.length;
  }

  function setThreshold(fraction) {
    const i = Math.min(magnitudes.length - 1, Math.floor(fraction * magnitudes.length));
    state.threshold = fraction <= 0 || !magnitudes.length ? 0 : magnitudes[i];
    document.getElementById("edge-threshold-value").textContent = fmt(state.threshold, 2);
    return refreshEdges();
  }

  function showSuppressed(on) {
    state.showInhibited = on;
    nodes.update(suppressedIds.map((id) => ({ id, hidden: !on })));
    if (!on) network.selectNodes(network.getSelectedNodes().filter((id) => !suppressedIds.includes(id)));
    const shown = document.getElementById("details").dataset.node;
    if (shown && nodes.get(shown)) showDetails(shown);  // a feature's panel lists what it suppresses when shown
    return refreshEdges();
  }

  // ---- supernodes ---------------------------------------------------------------------------

  function rebuildSupernodeEdges() {
    edges.remove(edges.getIds({ filter: (e) => e.supernode }));
    const sums = new Map();
    for (const link of allLinks) {
      const a = state.rep.get(link.source) || link.source;
      const b = state.rep.get(link.target) || link.target;
      if (a === b || (!state.groups.has(a) && !state.groups.has(b))) continue;
      const key = `${a}\u0000${b}`;
      sums.set(key, (sums.get(key) || 0) + link.weight);
    }
    const added = [];
    for (const [key, weight] of sums) {
      const [from, to] = key.split("\u0000");
      added.push({ id: `supernode-edge:${key}`, from, to, weight, supernode: true, ...edgeStyle(weight) });
    }
    edges.add(added);
  }

  function group(label, ids) {
    const members = ids.filter((id) => original.has(id) && original.get(id).kind !== "inhibited" &&
      !state.rep.has(id));
    if (members.length < 2) {
      message("select at least two nodes that are not grouped yet");
      return null;
    }
    const id = `supernode:${state.nextGroup++}`;
    const xs = members.map((m) => original.get(m).x);
    const ys = members.map((m) => original.get(m).y);
    const mean = (v) => v.reduce((a, b) => a + b, 0) / v.length;
    const text = label || `group ${state.nextGroup - 1}`;
    nodes.add({ id, x: mean(xs), y: mean(ys), fixed: true, physics: false, shape: "hexagon", size: 16, color: "#9467bd",
      label: text, kind: "supernode", members });
    nodes.update(members.map((m) => ({ id: m, hidden: true })));
    state.groups.set(id, { label: text, members });
    members.forEach((m) => state.rep.set(m, id));
    rebuildSupernodeEdges();
    refreshEdges();
    renderGroups();
    message("");
    return id;
  }

  function ungroup(id) {
    const g = state.groups.get(id);
    if (!g) return;
    state.groups.delete(id);
    g.members.forEach((m) => state.rep.delete(m));
    nodes.remove(id);
    nodes.update(g.members.map((m) => ({ id: m, hidden: false })));
    rebuildSupernodeEdges();
    refreshEdges();
    renderGroups();
  }

  function message(text) {
    document.getElementById("supernode-message").textContent = text;
  }

  function renderGroups() {
    const list = document.getElementById("supernode-list");
    list.replaceChildren();
    for (const [id, g] of state.groups) {
      list.appendChild(el("li", {}, el("span", { text: `${g.label} (${g.members.length})` }),
        el("button", { type: "button", text: "ungroup", onclick: () => ungroup(id) })));
    }
  }

  function renderSuggestions() {
    const list = document.getElementById("suggestions");
    for (const [label, ...ids] of data.suggestions) {
      list.appendChild(el("li", {}, el("span", { text: `${label} (${ids.length})` }),
        el("button", { type: "button", text: "group", onclick: () => group(label, ids) })));
    }
    if (!data.suggestions.length) list.appendChild(el("li", { text: "none at this threshold" }));
  }

  function exportGraph() {
    const links = [];
    edges.forEach((e) => {
      if (!e.supernode && !e.inhibited) links.push({ source: e.from, target: e.to, weight: e.weight });
    });
    for (const [source, target, weight] of graph.links_not_shown) links.push({ source, target, weight });
    const supernodes = [...state.groups.values()].map((g) => [g.label, ...g.members]);
    return { metadata: graph.metadata, qParams: { ...graph.qParams, supernodes }, nodes: graph.nodes, links };
  }

  function download() {
    const blob = new Blob([JSON.stringify(exportGraph())], { type: "application/json" });
    const a = el("a", { href: URL.createObjectURL(blob), download: `${graph.metadata.slug || "graph"}.json` });
    a.click();
    URL.revokeObjectURL(a.href);
  }

  // ---- side panel ---------------------------------------------------------------------------

  function edgeList(links, end) {
    const top = [...links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 12);
    const list = el("ul", { class: "edges" });
    for (const link of top) {
      const other = link[end];
      list.appendChild(el("li", {},
        el("a", { text: nodeName(other), title: other, onclick: () => select(state.rep.get(other) || other) }),
        el("span", { class: link.weight >= 0 ? "pos-w" : "neg-w", text: fmt(link.weight) })));
    }
    if (!top.length) list.appendChild(el("li", { text: "none" }));
    return list;
  }

  function histogram(counts) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "histogram");
    svg.setAttribute("viewBox", `0 0 ${counts.length} 1`);
    svg.setAttribute("preserveAspectRatio", "none");
    const peak = Math.max(1, ...counts);
    counts.forEach((c, i) => {
      const h = c ? Math.max(0.02, Math.log1p(c) / Math.log1p(peak)) : 0;
      const rect = document.createElementNS(ns, "rect");
      for (const [k, v] of Object.entries({ x: i + 0.08, y: 1 - h, width: 0.84, height: h })) rect.setAttribute(k, v);
      svg.appendChild(rect);
    });
    return svg;
  }

  function contexts(card) {
    const box = el("div", { class: "contexts" });
    for (const c of card.contexts) {
      const peak = Math.max(...c.acts, 1e-9);
      const line = el("div", { class: "context" });
      c.tokens.forEach((t, i) => {
        const a = Math.max(0, c.acts[i]) / peak;
        const span = el("span", { text: t, title: fmt(c.acts[i]) });
        if (a > 0) span.style.background = `rgba(255, 140, 0, ${(0.15 + 0.85 * a).toFixed(3)})`;
        line.appendChild(span);
        line.appendChild(document.createTextNode(" "));
      });
      box.appendChild(line);
    }
    return box;
  }

  function logitList(pairs, negative) {
    const list = el("ul", { class: negative ? "logits neg" : "logits" });
    for (const [t, v] of pairs) list.appendChild(el("li", { text: `${t} ${v >= 0 ? "+" : ""}${fmt(v, 2)}` }));
    return list;
  }

  function showDetails(id) {
    const n = nodes.get(id);
    const box = document.getElementById("details");
    box.replaceChildren();
    if (!n) return;
    box.dataset.node = id;
    if (n.kind === "supernode") {
      box.appendChild(el("h2", { text: `Supernode: ${n.label}` }));
      const list = el("ul", { class: "edges" });
      n.members.forEach((m) => list.appendChild(el("li", {}, el("a", { text: nodeName(m), title: m }))));
      box.append(el("h3", { text: "members" }), list,
        el("button", { type: "button", text: "ungroup", onclick: () => ungroup(id) }));
      return;
    }
    const rows = [["id", n.id], ["kind", n.kind === "inhibited" ? "suppressed (inactive) feature" : n.kind],
      ["layer", n.layer === null ? "embedding" : n.layer], ["position", `${n.pos} "${tokenAt(n.pos)}"`]];
    if (n.kind === "feature") rows.push(["feature", n.feature], ["activation", fmt(n.activation)]);
    if (n.kind === "inhibited") {
      rows.push(["feature", n.feature], ["pre-activation", fmt(n.pre_activation)],
        ["inhibition (from the graph's features)", fmt(n.inhibition)]);
    }
    if (n.kind === "logit") rows.push(["token", n.token], ["probability", fmt(n.prob)]);
    if (n.kind !== "inhibited") rows.push(["influence (cumulative)", fmt(n.influence)]);
    const table = el("table", { class: "kv" });
    for (const [k, v] of rows) table.appendChild(el("tr", {}, el("td", { text: k }), el("td", { text: String(v) })));
    box.append(el("h2", { text: nodeName(id) }), table);
    const card = cards[id];
    if (card) {
      box.append(el("h3", { text: "feature card" }), el("div", { class: "label", text: card.label }),
        el("div", { class: "num", text: `fires on ${(100 * card.frequency).toFixed(2)}% of tokens, max ${fmt(card.max_activation)}` }),
        histogram(card.histogram), el("h3", { text: "top output logits (decoder × unembedding)" }),
        logitList(card.top_logits, false), logitList(card.bottom_logits, true),
        el("h3", { text: "top activating contexts" }), contexts(card));
    }
    if (n.kind === "inhibited") {
      const record = suppressed.get(id);
      const links = (record ? record.inhibitors || [] : [])
        .map((i) => ({ source: i.source, target: id, weight: i.weight }));
      box.append(el("h3", { text: "top inhibitors (graph features pushing it down)" }), edgeList(links, "source"));
    } else {
      box.append(el("h3", { text: "top incoming edges" }), edgeList(incoming.get(id) || [], "source"),
        el("h3", { text: "top outgoing edges" }), edgeList(outgoing.get(id) || [], "target"));
      if (state.showInhibited && inhibits.has(id)) {
        box.append(el("h3", { text: "suppressed features it pushes down" }), edgeList(inhibits.get(id), "target"));
      }
    }
    window.circuitsPage.detailsAt = performance.now();
  }

  function select(id) {
    if (!nodes.get(id)) return;
    network.selectNodes([id]);
    showDetails(id);
  }

  // ---- hover, search, labels ---------------------------------------------------------------

  function unhighlight() {
    const restoreEdges = state.hovered.filter((h) => h.edge && edges.get(h.id)).map((h) => h.saved);
    const restoreNodes = state.hovered.filter((h) => !h.edge && nodes.get(h.id)).map((h) => h.saved);
    if (restoreEdges.length) edges.update(restoreEdges);
    if (restoreNodes.length) nodes.update(restoreNodes);
    state.hovered = [];
  }

  function highlight(id) {
    unhighlight();
    const connected = network.getConnectedEdges(id).map((e) => edges.get(e)).filter((e) => e);
    const neighbours = new Set(connected.map((e) => (e.from === id ? e.to : e.from)));
    neighbours.add(id);
    state.hovered = connected.map((e) => ({ edge: true, id: e.id, saved: { id: e.id, width: e.width, color: e.color } }))
      .concat([...neighbours].map((n) => {
        const node = nodes.get(n);
        return { edge: false, id: n, saved: { id: n, borderWidth: node.borderWidth || 1, color: node.color } };
      }));
    edges.update(connected.map((e) => ({ id: e.id, width: e.width + 1.5, color: `rgba(${rgb(e.weight)},1)` })));
    nodes.update([...neighbours].map((n) => {
      const base = nodes.get(n).color;
      return { id: n, borderWidth: 3, color: { background: typeof base === "string" ? base : base.background, border: "#111" } };
    }));
    document.getElementById("hover-info").textContent = `${nodeName(id)}   (${connected.length} edges shown)`;
  }

  function search(query) {
    const q = query.trim().toLowerCase();
    const out = document.getElementById("search-count");
    if (!q) {
      network.unselectAll();
      out.textContent = "";
      return [];
    }
    const hits = nodes.getIds({ filter: (n) => !n.hidden &&
      [n.id, n.label, n.clerp, n.token, ["feature", "inhibited"].includes(n.kind) ? `L${n.layer}#${n.feature}` : "",
        n.pos !== undefined ? tokenAt(n.pos) : ""].some((s) => s && String(s).toLowerCase().includes(q)) });
    network.selectNodes(hits);
    out.textContent = `${hits.length} found`;
    return hits;
  }

  function showLabels(on) {
    nodes.update(nodes.get({ filter: (n) => n.kind === "feature" || n.kind === "inhibited" }).map((n) => ({
      id: n.id, label: on ? (n.clerp || `L${n.layer}#${n.feature}`).slice(0, 28) : "" })));
  }

  // ---- canvas axes: layer rows and tokens along the bottom ----------------------------------

  network.on("beforeDrawing", (ctx) => {
    const w = geometry.column_width;
    const h = geometry.row_height;
    const right = (Math.max(tokens.length, 1) - 0.5) * w;
    ctx.save();
    ctx.font = "22px sans-serif";
    ctx.textBaseline = "middle";
    for (let row = 0; row <= nLayers + 1; row++) {
      const y = -row * h;
      ctx.strokeStyle = "#eeeeee";
      ctx.beginPath();
      ctx.moveTo(-0.5 * w, y);
      ctx.lineTo(right, y);
      ctx.stroke();
      ctx.fillStyle = "#888888";
      ctx.textAlign = "right";
      ctx.fillText(row === 0 ? "embeddings" : row === nLayers + 1 ? "logits" : `layer ${row - 1}`, -0.6 * w, y);
    }
    ctx.textAlign = "center";
    ctx.fillStyle = "#333333";
    tokens.forEach((t, p) => ctx.fillText(`${p}: ${t}`.slice(0, 24), p * w, 0.5 * h));
    ctx.restore();
  });

  function fitAll() {
    // the whole grid, axis labels included (network.fit() would frame the nodes only)
    const w = geometry.column_width;
    const h = geometry.row_height;
    const xs = [...original.values()].map((n) => n.x);
    const left = Math.min(-1.6 * w, Math.min(...xs) - 60);
    const right = Math.max((Math.max(tokens.length, 1) - 0.4) * w, Math.max(...xs) + 80);
    const top = -(nLayers + 1.4) * h;
    const bottom = 0.75 * h;
    const frame = network.canvas.frame;
    const scale = Math.min(frame.clientWidth / (right - left), frame.clientHeight / (bottom - top));
    network.moveTo({ position: { x: (left + right) / 2, y: (top + bottom) / 2 }, scale, animation: false });
  }

  // ---- wiring -------------------------------------------------------------------------------

  // Clicks are read from pointer events, not vis-network's tap gesture: on a large graph a redraw can
  // hold the main thread past the gesture's time limit and the tap would be lost.
  const canvasBox = document.getElementById("mynetwork");
  let down = null;
  canvasBox.addEventListener("pointerdown", (e) => {
    clearTimeout(state.hoverTimer);
    down = { x: e.clientX, y: e.clientY };
  }, { capture: true });
  canvasBox.addEventListener("pointerup", (e) => {
    if (!down || Math.hypot(e.clientX - down.x, e.clientY - down.y) > 5) return;
    const r = canvasBox.getBoundingClientRect();
    const id = network.getNodeAt({ x: e.clientX - r.left, y: e.clientY - r.top });
    if (id !== undefined) showDetails(id);
  }, { capture: true });
  // Hover highlights wait a moment, so moving across a large graph does not redraw it at every node.
  network.on("hoverNode", (params) => {
    clearTimeout(state.hoverTimer);
    state.hoverTimer = setTimeout(() => highlight(params.node), 120);
  });
  network.on("blurNode", () => {
    clearTimeout(state.hoverTimer);
    unhighlight();
    document.getElementById("hover-info").textContent = "";
  });
  document.getElementById("edge-threshold").addEventListener("input", (e) => setThreshold(e.target.value / 100));
  document.getElementById("search").addEventListener("input", (e) => search(e.target.value));
  document.getElementById("search").addEventListener("keydown", (e) => {
    if (e.key !== "Enter") return;
    const hits = search(e.target.value);
    if (hits.length) {
      network.focus(hits[0], { scale: 1.2 });
      showDetails(hits[0]);
    }
  });
  document.getElementById("show-labels").addEventListener("change", (e) => showLabels(e.target.checked));
  document.getElementById("fit").addEventListener("click", fitAll);
  const suppressedBox = document.getElementById("show-inhibited");
  if (suppressedBox) suppressedBox.addEventListener("change", (e) => showSuppressed(e.target.checked));
  document.getElementById("group-selected").addEventListener("click", () =>
    group(document.getElementById("supernode-label").value.trim(), network.getSelectedNodes()));
  document.getElementById("export-json").addEventListener("click", download);
  window.edgeFilter = edgeVisible;
  renderSuggestions();
  if (suppressedBox && suppressedBox.checked) showSuppressed(true);  // a checkbox the browser restored
  else refreshEdges();
  Object.assign(window.circuitsPage, { network, nodes, edges, showDetails, select, setThreshold, group, ungroup,
    visibleEdgeCount: () => edgesView.length, exportGraph, search, showSuppressed });
  network.once("afterDrawing", () => { window.circuitsPage.firstDrawn = performance.now(); });
  fitAll();
  network.redraw();
  window.circuitsPage.readyAt = performance.now();
  window.circuitsPage.ready = true;
})();
