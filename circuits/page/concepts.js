// The concept panel: concept-trace charts (CircuitsCharts, charts.js) in tabs beside the graph, a cell
// click selecting the graph nodes there (pyvis's globals `network`, `nodes`) or saying why there are none.
// Data: <script id="concepts-data"> from circuits/page/panels.py. Strings are written with textContent.
(function () {
  "use strict";
  const panel = JSON.parse(document.getElementById("concepts-data").textContent);
  const section = document.getElementById("concepts");
  const tabButtons = [...document.querySelectorAll("#concept-tabs .concept-tab")];
  let current = 0;

  function tokenAt(pos) {
    return `${pos} "${panel.tokens[pos] !== undefined ? panel.tokens[pos] : ""}"`;
  }

  // ---- one numbering: residual rows and layers, as the graph counts them -------------------------

  function where(link, key) {
    if (link === "layer") return `layer ${key}`;
    if (key === 0) return "the embeddings";
    const logits = key === panel.n_layers ? " and the logits" : "";
    return `after block ${key - 1} (layer ${key - 1} features${logits})`;
  }

  function cellNodes(fig, row, col) {
    const key = fig.rows[row];
    return panel.cells[fig.link][`${key},${col}`] || [];
  }

  function rowsAtPosition(pos) {
    // the residual rows holding graph nodes at `pos`
    return Object.keys(panel.cells.residual).map((k) => k.split(",").map(Number)).filter(([, p]) => p === pos)
      .map(([row]) => row);
  }

  function focus() {
    const f = panel.focus;
    return f ? `: the graph does its work at position ${tokenAt(f.position)} (${f.count} of its ${f.total} features are there)` : "";
  }

  function whyEmpty(fig, row, col) {
    const key = fig.rows[row];
    if (fig.link === "residual" && key === 0) {
      return `no graph node at the embeddings, position ${tokenAt(col)}: the token's embedding was pruned (too little influence on the logits).`;
    }
    const layer = fig.link === "residual" ? key - 1 : key;
    const text = `no graph node at layer ${layer}, position ${tokenAt(col)}: no feature or error node of layer ${layer} there passed pruning.`;
    const route = panel.routes[String(col)];
    if (route) {
      const target = route.layer === "logit" ? "the logits" : `layer ${route.layer} nodes`;
      return `${text} The graph routes position ${col} through attention to position ${tokenAt(route.to)} (to ${target} there).`;
    }
    const rows = rowsAtPosition(col);
    const kept = !rows.length ? `Nothing at position ${col} passed pruning`
      : rows.every((r) => r === 0) ? `Position ${col} keeps only its token embedding, and none of its edges passed pruning`
        : `Position ${col} keeps nodes of other layers, and none of their edges to other positions passed pruning`;
    return `${text} ${kept}${focus()}.`;
  }

  function cellMessage(fig, row, col) {
    const ids = cellNodes(fig, row, col);
    if (!ids.length) return whyEmpty(fig, row, col);
    return `${ids.length} graph node(s) at ${where(fig.link, fig.rows[row])}, position ${tokenAt(col)}: selected in the graph`;
  }

  function highlightCell(index, row, col) {
    const fig = panel.figures[index];
    const ids = cellNodes(fig, row, col).filter((id) => nodes.get(id) && !nodes.get(id).hidden);
    network.selectNodes(ids);
    document.getElementById(`cell-info-${index}`).textContent = cellMessage(fig, row, col);
    return ids;
  }

  // ---- tabs, drawing, collapsing ----------------------------------------------------------------------

  function draw(index) {
    const fig = panel.figures[index];
    const handlers = fig.link ? {
      onCell: (grid, row, col) => highlightCell(index, row, col),
      cellNote: (grid, row, col) => {
        const n = cellNodes(fig, row, col).length;
        return n ? `${n} graph node(s) here: click to select` : "no graph node here: click for why";
      },
    } : {};
    CircuitsCharts.draw(document.getElementById(`figure-${index}`), fig.chart, handlers);
  }

  function showTab(t) {
    current = t;
    tabButtons.forEach((b, i) => b.setAttribute("aria-selected", String(i === t)));
    panel.tabs.forEach((tab, i) => { document.getElementById(`concept-page-${i}`).hidden = i !== t; });
    if (!section.classList.contains("collapsed")) panel.tabs[t].figures.forEach(draw);
  }

  function collapse(on) {
    section.classList.toggle("collapsed", on);
    const toggle = document.getElementById("concepts-toggle");
    toggle.textContent = on ? "«" : "»";
    toggle.title = on ? "show the concept panel" : "hide the concept panel";
    window.dispatchEvent(new Event("resize"));  // the graph takes the freed width
    if (!on) showTab(current);
  }

  tabButtons.forEach((b, t) => b.addEventListener("click", () => showTab(t)));
  document.getElementById("concepts-toggle").addEventListener("click", () =>
    collapse(!section.classList.contains("collapsed")));
  let width = section.clientWidth;
  new ResizeObserver(() => {
    if (section.clientWidth === width || section.classList.contains("collapsed")) return;
    width = section.clientWidth;
    panel.tabs[current].figures.forEach(draw);
  }).observe(section);
  showTab(0);
  window.circuitsConcepts = { highlightCell, showTab, collapse, cellMessage: (i, r, c) => cellMessage(panel.figures[i], r, c) };
})();
