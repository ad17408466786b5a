// The attention view (with `circuits trace --heads`): clicking an edge shows its head loadings per
// layer as small bars; clicking a head opens its attention row at the edge's target position;
// clicking a key position there shows the top QK terms. A menu keeps only the edges a head carries.
// It listens for page.js's "circuits:edge-click" event and filters through window.edgeFilter.
// Every string from the graph is written with textContent, never as HTML.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("circuits-attention").textContent);
  const tokens = data.tokens;
  const CARRIED = 0.25;  // a head carries an edge when its part is at least this share of |weight|

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "onclick") node.addEventListener("click", v);
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  function fmt(x) {
    return (x >= 0 ? "+" : "") + x.toFixed(Math.abs(x) >= 10 ? 1 : 3);
  }

  const position = (id) => Number(id.split("_").pop());
  const tokenAt = (p) => `"${tokens[p]}"@${p}`;

  function sourceName(id) {
    const parts = id.split("_");
    const p = Number(parts[parts.length - 1]);
    if (parts[0] === "E") return `token ${tokenAt(p)}`;
    if (parts[0] === "pos") return `position ${p}`;
    if (parts[0] === "head") return `head L${parts[1].replace(".", ".H")} output @${p}`;
    if (parts[0] === "skip") return `skip L${parts[1]} @${p}`;
    if (parts[0] === "bias") return parts[1] === "Q" || parts[1] === "K" ? `b_${parts[1]} + norm offset` : `b ${parts[1]} L${parts[2]}`;
    if (parts[1] === "-1") return `error L${parts[0]} @${p}`;
    const label = data.labels[id];
    return `L${parts[0]}#${parts[1]} @${p}` + (label ? ` ${label}` : "");
  }

  // a row of bars, one per (name, value), scaled to the largest |value| of the row set
  function bars(entries, scale, onclick) {
    const list = el("ul", { class: "att-bars" });
    for (const [name, value, key] of entries) {
      const width = scale > 0 ? Math.max(1, (100 * Math.abs(value)) / scale) : 0;
      const label = el(onclick && key !== undefined ? "a" : "span", { class: "att-name", text: name });
      if (onclick && key !== undefined) label.addEventListener("click", () => onclick(key));
      list.append(el("li", {}, label,
        el("span", { class: "att-track" }, el("i", { class: value >= 0 ? "pos" : "neg", style: `width:${width}%` })),
        el("span", { class: "att-value", text: fmt(value) })));
    }
    return list;
  }

  const box = el("section", { id: "attention" }, el("h2", { text: "Attention" }));
  const menu = el("select", { id: "head-filter", title: `keep the edges of which a head carries ≥ ${CARRIED * 100}%` },
    el("option", { value: "", text: "edges of every head" }));
  for (const name of Object.keys(data.heads)) menu.append(el("option", { value: name, text: `edges head L${name.replace(".", ".H")} carries` }));
  const view = el("div", { id: "attention-view" },
    el("p", { class: "hint", text: "Click an edge for its head loadings per attention layer." }));
  box.append(menu, view);
  const panel = document.getElementById("panel");
  panel.insertBefore(box, document.getElementById("supernodes"));

  function showEdge(edge) {
    const key = `${edge.from}|${edge.to}`;
    const loadings = data.links[key];
    view.replaceChildren(el("h3", { text: `${edge.from} → ${edge.to}  (${fmt(edge.weight)})` }));
    view.dataset.edge = key;
    if (!loadings || !Object.keys(loadings).length) {
      view.append(el("p", { class: "hint", text: "no attention layer between these nodes" }));
      return;
    }
    const scale = Math.max(...Object.values(loadings).flatMap((parts) => Object.values(parts).map(Math.abs)));
    for (const [layer, parts] of Object.entries(loadings)) {
      const entries = Object.entries(parts).map(([h, w]) => [h === "other" ? "other" : `H${h}`, w,
        h !== "other" && data.heads[`${layer}.${h}`] ? `${layer}.${h}` : undefined]);
      view.append(el("div", { class: "att-layer", text: `layer ${layer}` }), bars(entries, scale, (name) => showRow(name, position(edge.to))));
    }
    view.append(el("div", { id: "attention-row" }));
  }

  function showRow(name, query) {
    const head = data.heads[name];
    const row = head.pattern[query].slice(0, query + 1);
    const qk = head.qk[String(query)] || {};
    const box = document.getElementById("attention-row");
    box.dataset.head = name;
    box.replaceChildren(el("h3", { text: `head L${name.replace(".", ".H")} from ${tokenAt(query)}: attention over keys` }));
    const entries = row.map((w, k) => [tokenAt(k), w, qk[String(k)] ? k : undefined]);
    box.append(bars(entries, Math.max(...row), (k) => showTerms(name, query, k)), el("div", { id: "qk-terms" }));
  }

  function showTerms(name, query, key) {
    const qk = data.heads[name].qk[String(query)][String(key)];
    const box = document.getElementById("qk-terms");
    box.dataset.key = String(key);
    box.replaceChildren(el("h3", { text: `why ${tokenAt(query)} looks at ${tokenAt(key)}: score ${fmt(qk.score)}` }));
    const scale = Math.max(...qk.terms.map((t) => Math.abs(t[2])));
    box.append(bars(qk.terms.map(([q, k, v]) => [`${sourceName(q)} × ${sourceName(k)}`, v]), scale));
  }

  function carries(edge, name) {
    const [layer, head] = name.split(".");
    const parts = (data.links[`${edge.from}|${edge.to}`] || {})[layer];
    return parts !== undefined && Math.abs(parts[head]) >= CARRIED * Math.abs(edge.weight);
  }

  const base = window.edgeFilter;
  menu.addEventListener("change", () => {
    const name = menu.value;
    window.edgeFilter = name ? (e) => (!base || base(e)) && carries(e, name) : base;
    const slider = document.getElementById("edge-threshold");
    if (window.circuitsPage && window.circuitsPage.setThreshold) window.circuitsPage.setThreshold(slider.value / 100);
    else window.edgesView.refresh();
  });
  document.addEventListener("circuits:edge-click", (e) => showEdge(e.detail));
  window.circuitsAttention = { showEdge, showRow, showTerms };
})();
