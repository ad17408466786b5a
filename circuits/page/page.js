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
  const hiddenIds = new Set(nodes.getIds({ filter: (n) => n.hidden }));
  // edges of the graph; the edges into suppressed features (kind "inhibited", hidden until asked for)
  // are drawn only: they are no links of the graph JSON
  const baseEdges = edges.get({ filter: (e) => !e.inhibited });
  const inhibitedEdges = edges.get({ filter: (e) => e.inhibited });
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
    showInhibited: false, labels: true, focus: null, pinned: new Set(), drawn: [], order: null };
  const N_PATHS = 5;  // strongest paths shown from a clicked node

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

  function node(id) {
    return original.get(id) || nodes.get(id);
  }

  function nodeName(id) {
    const n = node(id);
    if (!n) return id;
    if (n.kind === "feature") return `L${n.layer} #${n.feature} ${n.clerp || ""}`.trim();
    if (n.kind === "error") return `error L${n.layer} @${n.pos} "${tokenAt(n.pos)}"`;
    if (n.kind === "embedding") return `token "${tokenAt(n.pos)}" @${n.pos}`;
    if (n.kind === "logit") return `logit "${n.token}" p=${fmt(n.prob)}`;
    if (n.kind === "inhibited") return `suppressed L${n.layer} #${n.feature} ${n.clerp || ""}`.trim();
    return `supernode "${n.name}"`;
  }

  // One numbering: node ids, rows and panels count layers from 0, and a feature of layer l writes
  // into the residual stream after block l (the heatmaps' "after block l").
  function layerText(n) {
    if (n.kind === "embedding") return "embeddings (the residual stream before block 0)";
    if (n.kind === "logit") return `output (reads the residual stream after block ${nLayers - 1})`;
    if (n.kind === "error") return `${n.layer} (what the transcoder misses of block ${n.layer}'s MLP)`;
    return `${n.layer} (writes into the residual stream after block ${n.layer})`;
  }

  // One redraw at the next frame, so that the side panel fills before a large graph is redrawn.
  function requestRedraw() {
    if (state.redrawPending) return;
    state.redrawPending = true;
    requestAnimationFrame(() => {
      state.redrawPending = false;
      network.redraw();
    });
  }

  function setHidden(ids, hidden) {
    state.order = null;
    nodes.update(ids.map((id) => ({ id, hidden })));
    ids.forEach((id) => (hidden ? hiddenIds.add(id) : hiddenIds.delete(id)));
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
    const shownInhibited = inhibitedEdges.filter(edgeVisible).length;
    const extra = shownInhibited ? ` + ${shownInhibited} to suppressed features` : "";
    document.getElementById("edge-count").textContent =
      `${edgesView.length - shownInhibited} of ${baseEdges.length} drawn edges${extra}`;
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
    setHidden(suppressedIds, !on);
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
    // drawn in the slot of its most influential member (hidden now), so it covers no other node
    const first = [...members].sort((a, b) => (original.get(a).influence ?? 1) - (original.get(b).influence ?? 1))[0];
    const text = label || `group ${state.nextGroup - 1}`;
    nodes.add({ id, x: original.get(first).x, y: original.get(first).y, fixed: true, physics: false, shape: "hexagon",
      size: 12, color: "#9467bd", name: text, kind: "supernode", members, layer: original.get(first).layer,
      pos: original.get(first).pos });
    setHidden(members, true);
    state.groups.set(id, { label: text, members });
    members.forEach((m) => state.rep.set(m, id));
    rebuildSupernodeEdges();
    refreshEdges();
    renderGroups();
    message("");
    renderSubgraph();
    return id;
  }

  function ungroup(id) {
    const g = state.groups.get(id);
    if (!g) return;
    state.groups.delete(id);
    g.members.forEach((m) => state.rep.delete(m));
    nodes.remove(id);
    setHidden(g.members, false);
    rebuildSupernodeEdges();
    refreshEdges();
    renderGroups();
    renderSubgraph();
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
    const pinnedIds = [...state.pinned].flatMap((id) => (state.groups.has(id) ? state.groups.get(id).members : [id]));
    return { metadata: graph.metadata, qParams: { ...graph.qParams, supernodes, pinnedIds }, nodes: graph.nodes, links };
  }

  function download() {
    const blob = new Blob([JSON.stringify(exportGraph())], { type: "application/json" });
    const a = el("a", { href: URL.createObjectURL(blob), download: `${graph.metadata.slug || "graph"}.json` });
    a.click();
    URL.revokeObjectURL(a.href);
  }

  // ---- paths: the strongest routes from a node down to the token embeddings ----------------

  function rowOf(id) {
    const n = node(id);
    if (!n || n.kind === "embedding") return 0;
    return n.kind === "logit" ? nLayers + 1 : n.layer + 1;
  }

  // The top `k` paths from `start` down to an embedding, by the product along the path of each edge's
  // |weight| over the summed |weight| of its target's incoming edges (the graph's links, drawn or not).
  // Edges go to higher rows only, so one pass over the reachable nodes, highest row first, keeps the
  // k best partial paths into each node.
  function topPaths(start, k = N_PATHS) {
    const seen = new Set([start]);
    const stack = [start];
    while (stack.length) {
      for (const link of incoming.get(stack.pop()) || []) {
        if (!seen.has(link.source)) {
          seen.add(link.source);
          stack.push(link.source);
        }
      }
    }
    const best = new Map([[start, [{ score: 1, id: start, up: null, weight: null }]]]);
    const ends = [];
    for (const id of [...seen].sort((a, b) => rowOf(b) - rowOf(a))) {
      const here = (best.get(id) || []).sort((a, b) => b.score - a.score).slice(0, k);
      if (!here.length) continue;
      if (node(id) && node(id).kind === "embedding") {
        ends.push(...here);
        continue;
      }
      const links = (incoming.get(id) || []).filter((l) => rowOf(l.source) < rowOf(id));
      const total = links.reduce((sum, l) => sum + Math.abs(l.weight), 0);
      for (const l of links) {
        for (const p of here) {
          push(best, l.source, { score: (p.score * Math.abs(l.weight)) / total, id: l.source, up: p, weight: l.weight });
        }
      }
    }
    return ends.sort((a, b) => b.score - a.score).slice(0, k).map((end) => {
      const ids = [];
      const weights = [];
      for (let p = end; p; p = p.up) {
        ids.push(p.id);
        if (p.up) weights.push(p.weight);
      }
      return { ids: ids.reverse(), weights: weights.reverse(), score: end.score };  // start first, token last
    });
  }

  function focusPaths(id, paths) {
    const ids = new Set([id]);
    const links = [];
    for (const p of paths) {
      p.ids.forEach((n) => ids.add(n));
      for (let i = 0; i + 1 < p.ids.length; i++) links.push([p.ids[i + 1], p.ids[i], p.weights[i]]);
    }
    state.focus = { kind: "path", root: id, ids, links, paths };
    requestRedraw();
  }

  function showPaths(id) {
    const n = node(id);
    if (!n || n.kind === "supernode" || n.kind === "inhibited") return clearFocus();
    focusPaths(id, data.positions ? topPaths(id) : directLinks(id));
  }

  // Without token positions (a global circuit: no embeddings to reach), a click shows the node's
  // strongest direct links instead, as one-step paths.
  function directLinks(id) {
    const links = (incoming.get(id) || []).map((l) => [l.source, l.weight])
      .concat((outgoing.get(id) || []).map((l) => [l.target, l.weight]));
    return links.sort((a, b) => Math.abs(b[1]) - Math.abs(a[1])).slice(0, 12)
      .map(([other, weight]) => ({ ids: [id, other], weights: [weight], score: Math.abs(weight) }));
  }

  function clearFocus() {
    state.focus = null;
    document.getElementById("search-results").replaceChildren();
    requestRedraw();
  }

  // ---- pins and the subgraph view -----------------------------------------------------------

  function pin(ids, on) {
    ids.forEach((id) => (on ? state.pinned.add(id) : state.pinned.delete(id)));
    document.getElementById("subgraph-toggle").textContent = `subgraph (${state.pinned.size})`;
    renderSubgraph();
  }

  // The pinned nodes as labelled boxes (a pinned node of a supernode shows as the supernode's box),
  // rows by layer, columns by position, with the summed weights of the links between boxes.
  function renderSubgraph() {
    const box = document.getElementById("subgraph");
    if (box.hidden) return;
    const ns = "http://www.w3.org/2000/svg";
    const unitOf = (id) => state.rep.get(id) || id;
    const units = [...new Set([...state.pinned].map(unitOf))].filter((u) => node(u));
    const svg = document.createElementNS(ns, "svg");
    box.replaceChildren(el("p", { class: "hint", text: units.length
      ? "Pinned nodes; supernodes are purple boxes. Click a box for its details."
      : "Nothing pinned: click a node, then \u201cpin\u201d or \u201cpin these paths\u201d in the side panel." }), svg);
    if (!units.length) return;
    const rowKey = (u) => rowOf(node(u).kind === "supernode" ? node(u).members[0] : u);
    const posKey = (u) => node(u).pos;
    const rows = [...new Set(units.map(rowKey))].sort((a, b) => b - a);
    const cells = new Map();
    for (const u of units) push(cells, `${rowKey(u)}:${posKey(u)}`, u);
    const positions = [...new Set(units.map(posKey))].sort((a, b) => a - b);
    const perPos = positions.map((p) => Math.max(...rows.map((r) => (cells.get(`${r}:${p}`) || []).length)));
    const W = 170, H = 34, GX = 24, GY = 56;
    const xs = [];
    let x = 92;  // after the row names
    positions.forEach((p, i) => { xs.push(x); x += perPos[i] * (W + 8) + GX; });
    const at = new Map();
    rows.forEach((r, j) => positions.forEach((p, i) => (cells.get(`${r}:${p}`) || []).forEach((u, k) =>
      at.set(u, { x: xs[i] + k * (W + 8), y: 10 + j * (H + GY) }))));
    svg.setAttribute("width", x);
    svg.setAttribute("height", 20 + rows.length * (H + GY));
    rows.forEach((r, j) => {
      const name = document.createElementNS(ns, "text");
      name.setAttribute("x", 4);
      name.setAttribute("y", 10 + j * (H + GY) + H / 2 + 4);
      name.setAttribute("class", "row-name");
      name.textContent = r === 0 ? "embeddings" : r === nLayers + 1 ? "logits" : `layer ${r - 1}`;
      svg.appendChild(name);
    });
    const sums = new Map();
    for (const link of allLinks) {
      const a = unitOf(link.source);
      const b = unitOf(link.target);
      if (a !== b && at.has(a) && at.has(b)) sums.set(`${a}\u0000${b}`, (sums.get(`${a}\u0000${b}`) || 0) + link.weight);
    }
    const strongest = Math.max(1e-12, ...[...sums.values()].map(Math.abs));
    for (const [key, weight] of sums) {
      const [a, b] = key.split("\u0000").map((u) => at.get(u));
      const line = document.createElementNS(ns, "line");
      const rel = Math.abs(weight) / strongest;
      for (const [k, v] of Object.entries({ x1: a.x + W / 2, y1: a.y, x2: b.x + W / 2, y2: b.y + H,
        stroke: `rgba(${rgb(weight)},${(0.35 + 0.6 * rel).toFixed(2)})`, "stroke-width": (1 + 5 * rel).toFixed(2) })) {
        line.setAttribute(k, v);
      }
      line.appendChild(document.createElementNS(ns, "title")).textContent = `${fmt(weight)}`;
      svg.appendChild(line);
    }
    for (const [u, p] of at) {
      const n = node(u);
      const g = document.createElementNS(ns, "g");
      g.setAttribute("class", `unit ${n.kind}`);
      g.setAttribute("data-id", u);
      const rect = document.createElementNS(ns, "rect");
      for (const [k, v] of Object.entries({ x: p.x, y: p.y, width: W, height: H, rx: 5 })) rect.setAttribute(k, v);
      const text = document.createElementNS(ns, "text");
      text.setAttribute("x", p.x + 6);
      text.setAttribute("y", p.y + H / 2 + 4);
      const full = labelText(n);
      text.textContent = full.length > 26 ? `${full.slice(0, 25)}\u2026` : full;
      g.appendChild(document.createElementNS(ns, "title")).textContent = `${nodeName(u)}\n${layerText(n.kind === "supernode" ? node(n.members[0]) : n)}`;
      g.append(rect, text);
      g.addEventListener("click", () => {
        network.selectNodes([u]);
        showDetails(u);
      });
      svg.appendChild(g);
    }
  }

  function showSubgraph(on) {
    document.getElementById("subgraph").hidden = !on;
    document.getElementById("subgraph-toggle").classList.toggle("active", on);
    renderSubgraph();
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

  function pathList(id, paths) {
    const list = el("ol", { class: "paths" });
    paths.forEach((p) => {
      const names = p.ids.map((n) => (node(n).kind === "embedding" ? `"${tokenAt(node(n).pos)}"` : shortName(n)));
      list.appendChild(el("li", { title: p.ids.map(nodeName).join("\n\u2190 ") },
        el("a", { text: names.join(" \u2190 "), onclick: () => focusPaths(id, [p]) }),
        el("span", { class: "num", text: fmt(p.score, 2) })));
    });
    if (!paths.length) list.appendChild(el("li", { text: "no path to a token in this graph" }));
    return list;
  }

  function shortName(id) {
    const n = node(id);
    if (n.kind === "logit") return n.token;
    if (n.kind === "error") return `error L${n.layer}`;
    const text = labelText(n);
    return text.length > 24 ? `${text.slice(0, 23)}\u2026` : text;
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

  function pinButtons(id) {
    const pinned = state.pinned.has(id);
    const row = el("div", { class: "row" },
      el("button", { type: "button", class: "pin", text: pinned ? "unpin" : "pin",
        onclick: () => { pin([id], !pinned); showDetails(id); } }));
    if (state.focus && state.focus.kind === "path" && state.focus.root === id) {
      row.appendChild(el("button", { type: "button", class: "pin-paths", text: "pin these paths",
        onclick: () => { pin([...state.focus.ids], true); showDetails(id); } }));
    }
    return row;
  }

  function showDetails(id) {
    const n = nodes.get(id);
    const box = document.getElementById("details");
    box.replaceChildren();
    if (!n) return;
    box.dataset.node = id;
    if (n.kind === "supernode") {
      box.appendChild(el("h2", { text: `Supernode: ${n.name}` }));
      const list = el("ul", { class: "edges" });
      n.members.forEach((m) => list.appendChild(el("li", {}, el("a", { text: nodeName(m), title: m }))));
      box.append(pinButtons(id), el("h3", { text: "members" }), list,
        el("button", { type: "button", text: "ungroup", onclick: () => ungroup(id) }));
      return;
    }
    const rows = [["id", n.id], ["kind", n.kind === "inhibited" ? "suppressed (inactive) feature" : n.kind],
      ["layer", layerText(n)]];
    if (data.positions) rows.push(["position", `${n.pos} "${tokenAt(n.pos)}"`]);
    if (n.kind === "feature") rows.push(["feature", n.feature], ["activation", fmt(n.activation)]);
    if (n.kind === "inhibited") {
      rows.push(["feature", n.feature], ["pre-activation", fmt(n.pre_activation)],
        ["inhibition (from the graph's features)", fmt(n.inhibition)]);
    }
    if (n.kind === "logit") rows.push(["token", n.token], ["probability", fmt(n.prob)]);
    if (n.kind !== "inhibited") rows.push(["influence (cumulative)", fmt(n.influence)]);
    const table = el("table", { class: "kv" });
    for (const [k, v] of rows) table.appendChild(el("tr", {}, el("td", { text: k }), el("td", { text: String(v) })));
    box.append(el("h2", { text: nodeName(id) }), table, pinButtons(id));
    if (data.positions && state.focus && state.focus.kind === "path" && state.focus.root === id &&
      n.kind !== "embedding") {
      box.append(el("h3", { text: "strongest paths to the tokens (product of normalised |weights|)" }),
        pathList(id, state.focus.paths));
    }
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
    document.dispatchEvent(new CustomEvent("circuits:details", { detail: { id } }));  // for other views
    window.circuitsPage.detailsAt = performance.now();
  }

  function select(id) {
    if (!nodes.get(id)) return;
    network.selectNodes([id]);
    showPaths(id);
    showDetails(id);
  }

  // ---- hover, search --------------------------------------------------------------------------

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
        const nd = nodes.get(n);
        return { edge: false, id: n, saved: { id: n, borderWidth: nd.borderWidth || 1, color: nd.color } };
      }));
    edges.update(connected.map((e) => ({ id: e.id, width: e.width + 1.5, color: `rgba(${rgb(e.weight)},1)` })));
    nodes.update([...neighbours].map((n) => {
      const base = nodes.get(n).color;
      return { id: n, borderWidth: 3, color: { background: typeof base === "string" ? base : base.background, border: "#111" } };
    }));
    // the full label: the one drawn beside the node may be cut short
    document.getElementById("hover-info").textContent = `${nodeName(id)}   (${connected.length} edges shown)`;
  }

  function matches(n, q) {
    const names = [n.id, n.clerp, n.token, n.name, n.kind === "logit" ? labelText(n) : "",
      ["feature", "inhibited"].includes(n.kind) ? `L${n.layer}#${n.feature}` : "", n.pos !== undefined ? tokenAt(n.pos) : ""];
    return names.some((s) => s && String(s).toLowerCase().includes(q));
  }

  function search(query) {
    const q = query.trim().toLowerCase();
    const out = document.getElementById("search-count");
    const list = document.getElementById("search-results");
    list.replaceChildren();
    if (!q) {
      out.textContent = "";
      if (state.focus && state.focus.kind === "search") clearFocus();
      return [];
    }
    const hits = nodes.getIds({ filter: (n) => !n.hidden && matches(n, q) });
    out.textContent = `${hits.length} found`;
    state.focus = hits.length ? { kind: "search", ids: new Set(hits), links: [] } : null;
    for (const id of hits.slice(0, 200)) {
      list.appendChild(el("li", {}, el("a", { text: nodeName(id), title: id, onclick: () => { select(id); centreOn([id]); } })));
    }
    if (hits.length > 200) list.appendChild(el("li", { text: `… and ${hits.length - 200} more` }));
    requestRedraw();
    return hits;
  }

  // ---- drawing: rows, axes, labels and the focus (paths, search hits) on the canvas --------

  const LEFT = 86;  // px: the layer axis, pinned to the left edge of the graph
  const BOTTOM = 42;  // px: the token axis, pinned to the bottom edge (two staggered lines)
  const TOKEN_FONT = "12px sans-serif";
  const LABEL_FONT = "11px sans-serif";
  const widths = new Map();

  function textWidth(ctx, text) {
    const key = `${ctx.font}\u0000${text}`;
    if (!widths.has(key)) widths.set(key, ctx.measureText(text).width);
    return widths.get(key);
  }

  function fitText(ctx, text, max) {
    if (textWidth(ctx, text) <= max) return text;
    let lo = 0;
    let hi = text.length;
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (textWidth(ctx, `${text.slice(0, mid)}\u2026`) <= max) lo = mid;
      else hi = mid - 1;
    }
    return lo ? `${text.slice(0, lo)}\u2026` : "";
  }

  function labelText(n) {
    if (n.kind === "logit") return `${n.token} ${fmt(n.prob)}`;
    if (n.kind === "supernode") return `${n.name} (${n.members.length})`;
    if (n.kind === "error") return `error L${n.layer}`;
    if (n.kind === "embedding") return `"${tokenAt(n.pos)}" @${n.pos}`;
    const text = n.clerp || `L${n.layer} #${n.feature}`;
    return n.kind === "inhibited" ? `suppressed: ${text}` : text;
  }

  // Axis-aligned boxes in a grid of buckets, to find collisions fast.
  class Boxes {
    constructor() { this.cells = new Map(); }
    keys(b, fn) {
      for (let i = Math.floor(b.x / 64); i <= Math.floor((b.x + b.w) / 64); i++) {
        for (let j = Math.floor(b.y / 32); j <= Math.floor((b.y + b.h) / 32); j++) fn(`${i},${j}`);
      }
    }
    add(b) { this.keys(b, (k) => push(this.cells, k, b)); }
    hits(b) {
      let hit = false;
      this.keys(b, (k) => {
        for (const o of this.cells.get(k) || []) {
          if (o.owner !== b.owner && o.x < b.x + b.w && b.x < o.x + o.w && o.y < b.y + b.h && b.y < o.y + o.h) hit = true;
        }
      });
      return hit;
    }
  }

  // Labelled nodes, most important first (logits by probability, then supernodes, then features by
  // influence); kept until the nodes change (a group made or undone, suppressed features shown).
  function labelOrder() {
    if (state.order) return state.order;
    const rank = { logit: 0, supernode: 1, feature: 2, inhibited: 2 };
    state.order = nodes.get({ filter: (n) => n.kind in rank }).sort((a, b) => rank[a.kind] - rank[b.kind] ||
      (a.kind === "logit" ? b.prob - a.prob : (a.influence ?? 1) - (b.influence ?? 1))).map((n) => n.id);
    return state.order;
  }

  network.on("beforeDrawing", (ctx) => {
    // rows by layer (every other one shaded) and the columns' borders, in canvas units
    const cols = geometry.columns;
    const left = cols[0][0];
    const right = cols[cols.length - 1][1];
    ctx.save();
    geometry.rows.forEach(([top, bottom], row) => {
      ctx.fillStyle = row % 2 ? "#f7f8fa" : "#ffffff";
      ctx.fillRect(left, top, right - left, bottom - top);
    });
    ctx.strokeStyle = "#eceef1";
    ctx.lineWidth = 1 / network.getScale();
    const top = geometry.rows[geometry.rows.length - 1][0];
    const bottom = geometry.rows[0][1];
    for (const [x] of cols.concat([[right]])) {
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, bottom);
      ctx.stroke();
    }
    ctx.restore();
  });

  network.on("afterDrawing", (ctx) => {
    const canvas = ctx.canvas;
    const W = canvas.clientWidth;
    const H = canvas.clientHeight;
    const s = network.getScale();
    const o = network.canvasToDOM({ x: 0, y: 0 });
    const dom = (x, y) => [x * s + o.x, y * s + o.y];
    ctx.save();
    ctx.setTransform(canvas.width / W, 0, 0, canvas.height / H, 0, 0);
    const boxes = new Boxes();
    const drawn = [];
    if (state.focus) drawFocus(ctx, W, H, s, dom);
    const axes = axisLabels(ctx, W, H, s, dom);
    axes.forEach((b) => boxes.add(b));
    boxes.add({ x: 0, y: 0, w: LEFT, h: H, owner: "axis" });
    boxes.add({ x: 0, y: H - BOTTOM, w: W, h: BOTTOM, owner: "axis" });
    const labels = placeLabels(ctx, W, H, s, dom, boxes);
    ctx.font = LABEL_FONT;
    ctx.textBaseline = "middle";
    for (const b of labels) {
      ctx.fillStyle = "rgba(255,255,255,0.88)";
      ctx.fillRect(b.x, b.y, b.w, b.h);
      ctx.fillStyle = b.focus ? "#111111" : "#2d3748";
      ctx.fillText(b.text, b.x + 3, b.y + b.h / 2 + 0.5);
    }
    ctx.fillStyle = "rgba(255,255,255,0.94)";
    ctx.fillRect(0, 0, LEFT, H);
    ctx.fillRect(0, H - BOTTOM, W, BOTTOM);
    ctx.strokeStyle = "#dddddd";
    ctx.beginPath();
    ctx.moveTo(LEFT, 0);
    ctx.lineTo(LEFT, H - BOTTOM);
    ctx.lineTo(W, H - BOTTOM);
    ctx.stroke();
    ctx.textBaseline = "middle";
    for (const b of axes) {
      ctx.font = b.font;
      ctx.fillStyle = b.kind === "token" ? "#1a202c" : "#555555";
      ctx.fillText(b.text, b.x + 2, b.y + b.h / 2 + 0.5);
    }
    ctx.restore();
    state.drawn = axes.concat(labels).map(({ x, y, w, h, text, kind, font, owner }) => ({ x, y, w, h, text, kind, font, id: owner }));
  });

  // Layer names along the left edge, tokens along the bottom (second line where a token would
  // touch its left neighbour, cut with "…" where both lines are taken): boxes in DOM px.
  function axisLabels(ctx, W, H, s, dom) {
    const out = [];
    ctx.font = TOKEN_FONT;
    geometry.rows.forEach(([top, bottom], row) => {
      const y = dom(0, (top + bottom) / 2)[1];
      if (y < 8 || y > H - BOTTOM - 8) return;
      const text = row === 0 ? "embeddings" : row === nLayers + 1 ? "logits" : `layer ${row - 1}`;
      const w = textWidth(ctx, text) + 4;
      out.push({ x: LEFT - 6 - w, y: y - 8, w, h: 16, text, kind: "axis", font: TOKEN_FONT, owner: `row:${row}` });
    });
    const ends = [LEFT, LEFT];  // right end of the last label on each line
    geometry.columns.forEach(([a, b], pos) => {
      const centre = dom((a + b) / 2, 0)[0];
      if (pos >= tokens.length || centre < LEFT || centre > W) return;
      const full = tokens[pos].trim() ? tokens[pos] : "\u2423";
      let line = ends.findIndex((end) => end + 4 <= centre - (textWidth(ctx, full) + 4) / 2);
      let text = full;
      if (line < 0) {
        line = ends[0] <= ends[1] ? 0 : 1;
        const room = 2 * (centre - ends[line] - 4) - 4;
        text = fitText(ctx, full, room);
        if (!text) return;
      }
      const w = textWidth(ctx, text) + 4;
      const x = Math.max(centre - w / 2, ends[line] + 4);
      ends[line] = x + w;
      out.push({ x, y: H - BOTTOM + 4 + line * 18, w, h: 16, text, kind: "token", font: TOKEN_FONT, owner: `token:${pos}` });
    });
    return out;
  }

  // Node labels, most influential first: right of the node inside its slot, else left of it, else
  // not drawn; never over another label, a node or an axis. With a focus, only its nodes.
  function placeLabels(ctx, W, H, s, dom, boxes) {
    ctx.font = LABEL_FONT;
    const inView = (x, y) => x > LEFT && x < W && y > 0 && y < H - BOTTOM;
    for (const [id, n] of original) {
      if (hiddenIds.has(id)) continue;
      const [x, y] = dom(n.x, n.y);
      const r = Math.max(n.size * s, 2) + 1;
      if (inView(x, y)) boxes.add({ x: x - r, y: y - r, w: 2 * r, h: 2 * r, owner: id });
    }
    const ids = state.focus ? [...state.focus.ids].map((id) => state.rep.get(id) || id)
      : state.labels ? labelOrder() : [];
    const out = [];
    for (const id of ids) {
      const n = nodes.get(id);
      if (!n || n.hidden || n.kind === "embedding" || out.length >= 400) continue;
      const [x, y] = dom(n.x, n.y);
      if (!inView(x, y)) continue;
      const r = n.size * s * (state.focus && state.focus.kind === "search" ? 1.6 : 1) + 4;
      // inside its slot; a highlighted node's label may run on (few are drawn, and none over another)
      const max = state.focus ? 280 : Math.min(280, (geometry.slot_width - 20) * s - r - 4);
      const text = fitText(ctx, labelText(n), max);
      if (!text || max < 36) continue;
      const w = textWidth(ctx, text) + 6;
      const right = { x: x + r, y: y - 8, w, h: 16, owner: id };
      const left = { x: x - r - w, y: y - 8, w, h: 16, owner: id };
      const box = [right, left].find((b) => b.x >= LEFT && b.x + b.w <= W && !boxes.hits(b));
      if (!box) continue;
      boxes.add(box);
      out.push({ ...box, text, kind: "label", font: LABEL_FONT, focus: Boolean(state.focus) });
    }
    return out;
  }

  function drawFocus(ctx, W, H, s, dom) {
    ctx.fillStyle = "rgba(255,255,255,0.82)";
    ctx.fillRect(0, 0, W, H);
    const shown = (id) => nodes.get(state.rep.get(id) || id);
    for (const [a, b, weight] of state.focus.links) {
      const p = shown(a);
      const q = shown(b);
      if (!p || !q || p.id === q.id) continue;
      const rel = Math.min(Math.abs(weight) / fullWidthWeight, 1);
      ctx.strokeStyle = `rgba(${rgb(weight)},0.95)`;
      ctx.lineWidth = 2 + 3 * rel;
      ctx.beginPath();
      ctx.moveTo(...dom(p.x, p.y));
      ctx.lineTo(...dom(q.x, q.y));
      ctx.stroke();
    }
    const search = state.focus.kind === "search";
    for (const id of state.focus.ids) {
      const n = shown(id);
      if (!n || n.hidden) continue;
      const [x, y] = dom(n.x, n.y);
      const r = Math.max(n.size * s * (search ? 1.6 : 1), search ? 6 : 3);
      const fill = typeof n.color === "string" ? n.color : n.color.background;
      ctx.fillStyle = fill;
      ctx.beginPath();
      if (n.shape === "square") ctx.rect(x - r, y - r, 2 * r, 2 * r);
      else ctx.arc(x, y, r, 0, 2 * Math.PI);
      ctx.fill();
      ctx.lineWidth = search ? 3 : 2;
      ctx.strokeStyle = search ? "#f59e0b" : id === state.focus.root ? "#111111" : "#444444";
      ctx.beginPath();
      if (n.shape === "square") ctx.rect(x - r - 1.5, y - r - 1.5, 2 * r + 3, 2 * r + 3);
      else ctx.arc(x, y, r + 1.5, 0, 2 * Math.PI);
      ctx.stroke();
    }
  }

  // ---- view: fit the grid (or some nodes) into the area the axes leave ---------------------

  function fitBounds(x0, x1, y0, y1, maxScale) {
    const frame = network.canvas.frame;
    const W = frame.clientWidth;
    const H = frame.clientHeight;
    const availW = Math.max(W - LEFT - 16, 50);
    const availH = Math.max(H - BOTTOM - 16, 50);
    const scale = Math.min(availW / Math.max(x1 - x0, 1), availH / Math.max(y1 - y0, 1), maxScale);
    const cx = LEFT + 8 + availW / 2;
    const cy = 8 + availH / 2;
    const position = { x: (x0 + x1) / 2 + (W / 2 - cx) / scale, y: (y0 + y1) / 2 + (H / 2 - cy) / scale };
    network.moveTo({ position, scale, animation: false });
  }

  function fitAll() {
    const cols = geometry.columns;
    const rows = geometry.rows;
    fitBounds(cols[0][0], cols[cols.length - 1][1], rows[rows.length - 1][0], rows[0][1], 1.5);
  }

  function centreOn(ids) {
    const shown = ids.map((id) => nodes.get(id)).filter((n) => n);
    if (!shown.length) return;
    const xs = shown.map((n) => n.x);
    const ys = shown.map((n) => n.y);
    const pad = geometry.slot_width;
    fitBounds(Math.min(...xs) - pad / 2, Math.max(...xs) + pad, Math.min(...ys) - pad / 2, Math.max(...ys) + pad / 2, 1.5);
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
    const at = { x: e.clientX - r.left, y: e.clientY - r.top };
    const id = network.getNodeAt(at);
    if (id === undefined) {
      // an edge click is announced for other views (heads.js): detail is the vis edge {from, to, weight}
      const edge = network.getEdgeAt(at);
      if (edge !== undefined) {
        document.dispatchEvent(new CustomEvent("circuits:edge-click", { detail: edges.get(edge) }));
      } else if (!e.ctrlKey && !e.metaKey) clearFocus();
      return;
    }
    if (!e.ctrlKey && !e.metaKey) showPaths(id);
    showDetails(id);
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
    if (e.key === "Escape") {
      e.target.value = "";
      search("");
    }
    if (e.key !== "Enter") return;
    const hits = search(e.target.value);
    if (hits.length) centreOn(hits);
  });
  const labelsBox = document.getElementById("show-labels");
  labelsBox.addEventListener("change", (e) => {
    state.labels = e.target.checked;
    requestRedraw();
  });
  document.getElementById("fit").addEventListener("click", fitAll);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && e.target.tagName !== "INPUT") clearFocus();
  });
  const suppressedBox = document.getElementById("show-inhibited");
  if (suppressedBox) suppressedBox.addEventListener("change", (e) => showSuppressed(e.target.checked));
  document.getElementById("group-selected").addEventListener("click", () =>
    group(document.getElementById("supernode-label").value.trim(), network.getSelectedNodes()));
  document.getElementById("export-json").addEventListener("click", download);
  document.getElementById("subgraph-toggle").addEventListener("click", () =>
    showSubgraph(document.getElementById("subgraph").hidden));
  document.getElementById("panel-toggle").addEventListener("click", () => {
    const layout = document.getElementById("layout");
    layout.classList.toggle("panel-collapsed");
    requestRedraw();
  });
  new ResizeObserver(() => requestRedraw()).observe(canvasBox);
  window.edgeFilter = edgeVisible;
  renderSuggestions();
  state.labels = labelsBox.checked;
  if (suppressedBox && suppressedBox.checked) showSuppressed(true);  // a checkbox the browser restored
  else refreshEdges();
  Object.assign(window.circuitsPage, { network, nodes, edges, el, showDetails, select, setThreshold, group, ungroup,
    visibleEdgeCount: () => edgesView.length, exportGraph, search, showSuppressed, topPaths,
    showPaths, clearFocus, centreOn, fitAll, pin, showSubgraph,
    focus: () => state.focus && { kind: state.focus.kind, root: state.focus.root, ids: [...state.focus.ids],
      paths: state.focus.paths || [] },
    focusNodes: (ids) => { state.focus = { kind: "search", ids: new Set(ids), links: [] }; requestRedraw(); },
    drawnLabels: () => state.drawn.map((b) => ({ ...b })) });
  network.once("afterDrawing", () => { window.circuitsPage.firstDrawn = performance.now(); });
  fitAll();
  network.redraw();
  window.circuitsPage.readyAt = performance.now();
  window.circuitsPage.ready = true;
})();
