// Charts of the concept traces, drawn as SVG sized to their box: heatmap, bars, lines, scatter, flow.
// Specs come from circuits/concepts/figures.py. Every string is written with textContent, never as HTML.
// CircuitsCharts.draw(box, spec, {onCell(grid, row, col), cellNote(grid, row, col)}) draws `spec` into
// `box` (replacing what was there) at the box's current width; call it again after a resize.
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const FONT = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";
  const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
    "#b5de2b", "#fde725"];
  const DIVERGING = ["#b2182b", "#d6604d", "#f4a582", "#fddbc7", "#f7f7f7", "#d1e5f0", "#92c5de", "#4393c3",
    "#2166ac"];  // negative red, positive blue (the graph's edge colours)
  const measure = document.createElement("canvas").getContext("2d");
  measure.font = FONT;

  function textWidth(s) {
    return measure.measureText(s).width;
  }

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function htmlEl(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(x) {
    if (x === null || x === undefined) return "–";
    const a = Math.abs(x);
    return a !== 0 && (a < 1e-3 || a >= 1e4) ? x.toExponential(2) : String(Number(x.toPrecision(3)));
  }

  function clip(s, width) {
    if (textWidth(s) <= width) return s;
    let t = s;
    while (t.length > 1 && textWidth(t + "…") > width) t = t.slice(0, -1);
    return t + "…";
  }

  function lerpColor(stops, t) {
    const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
    const i = Math.min(Math.floor(x), stops.length - 2);
    const f = x - i;
    const a = parseInt(stops[i].slice(1), 16);
    const b = parseInt(stops[i + 1].slice(1), 16);
    const ch = (s) => Math.round(((a >> s) & 255) * (1 - f) + ((b >> s) & 255) * f);
    return `rgb(${ch(16)},${ch(8)},${ch(0)})`;
  }

  function colorOf(spec, v) {
    const stops = spec.scale === "diverging" ? DIVERGING : VIRIDIS;
    return lerpColor(stops, (v - spec.zmin) / (spec.zmax - spec.zmin || 1));
  }

  function niceTicks(lo, hi, count) {
    const span = hi - lo || 1;
    const step0 = span / count;
    const mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= step0);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) out.push(Number(v.toPrecision(6)));
    return out;
  }

  // ---- tooltip --------------------------------------------------------------------------------

  let tip = null;
  function showTip(event, lines) {
    if (!tip) {
      tip = htmlEl("div", "chart-tip");
      document.body.appendChild(tip);
    }
    tip.replaceChildren(...lines.map((l) => htmlEl("div", "", l)));
    tip.style.display = "block";
    const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 4);
    const y = Math.min(event.clientY + 14, window.innerHeight - tip.offsetHeight - 4);
    tip.style.left = `${Math.max(4, x)}px`;
    tip.style.top = `${Math.max(4, y)}px`;
  }
  function hideTip() {
    if (tip) tip.style.display = "none";
  }
  function hoverable(node, lines) {
    node.addEventListener("mousemove", (e) => showTip(e, lines()));
    node.addEventListener("mouseleave", hideTip);
  }

  // ---- common frame: title above, legend below, SVG between ------------------------------------

  function frame(box, spec) {
    box.replaceChildren();
    box.classList.add("chart");
    box.appendChild(htmlEl("div", "chart-title", spec.title));
    const width = Math.max(240, box.clientWidth);
    return width;
  }

  function legend(box, items) {
    const list = htmlEl("div", "chart-legend");
    for (const item of items) {
      const entry = htmlEl("span", "chart-legend-item");
      const swatch = htmlEl("i", "chart-swatch");
      swatch.style.background = item.color;
      entry.append(swatch, document.createTextNode(item.name));
      list.appendChild(entry);
    }
    box.appendChild(list);
  }

  function xLabels(svg, labels, x0, colW, y, maxWidth) {
    // token labels at -45 degrees, thinned so that neighbours stay a line height apart (16 px along x)
    const step = Math.max(1, Math.ceil(16 / colW));
    labels.forEach((label, c) => {
      if (c % step) return;
      const x = x0 + (c + 0.5) * colW;
      svg.appendChild(svgEl("text", { x, y, transform: `rotate(-45 ${x} ${y})`, "text-anchor": "end",
        "dominant-baseline": "middle", class: "tick" }, clip(label, maxWidth)));
    });
  }

  function labelSpace(labels, maxWidth) {
    return Math.min(maxWidth, Math.max(0, ...labels.map(textWidth)));
  }

  // ---- heatmap ----------------------------------------------------------------------------------

  function heatmap(box, spec, handlers) {
    const width = frame(box, spec);
    const nRows = spec.y.length;
    const nCols = spec.x.length;
    const left = labelSpace(spec.y, 120) + 10;
    const right = 58;
    const colW = (width - left - right) / nCols;
    const rowH = Math.max(11, Math.min(26, Math.max(18, colW * 0.9), 360 / nRows));
    const xLabelW = labelSpace(spec.x, 90);
    const bottom = xLabelW * 0.72 + 14;
    const gridTop = [];
    let y = 4;
    for (const g of spec.grids) {
      if (g.title) y += 16;
      gridTop.push(y);
      y += nRows * rowH + 8;
    }
    const height = y - 8 + bottom;
    const svg = svgEl("svg", { width, height, class: "chart-svg" });
    spec.grids.forEach((g, gi) => {
      const top = gridTop[gi];
      if (g.title) svg.appendChild(svgEl("text", { x: left, y: top - 5, class: "subtitle" }, clip(g.title, width - left)));
      for (let r = 0; r < nRows; r++) {
        const cy = top + (nRows - 1 - r) * rowH;  // row 0 at the bottom
        svg.appendChild(svgEl("text", { x: left - 6, y: cy + rowH / 2, "text-anchor": "end",
          "dominant-baseline": "middle", class: "tick" }, rowH >= 11 ? spec.y[r] : ""));
        for (let c = 0; c < nCols; c++) {
          const v = g.z[r][c];
          const cell = svgEl("rect", { x: left + c * colW, y: cy, width: colW + 0.3, height: rowH + 0.3,
            fill: colorOf(spec, v), class: "cell", "data-grid": gi, "data-row": r, "data-col": c });
          hoverable(cell, () => cellLines(spec, g, gi, r, c, handlers));
          if (handlers.onCell) cell.addEventListener("click", () => handlers.onCell(gi, r, c));
          svg.appendChild(cell);
        }
      }
      svg.appendChild(svgEl("rect", { x: left, y: top, width: nCols * colW, height: nRows * rowH, class: "outline" }));
    });
    for (const m of spec.marks || []) {
      const cy = gridTop[0] + (nRows - 1 - m.row) * rowH + rowH / 2;
      svg.appendChild(svgEl("text", { x: left + (m.col + 0.5) * colW, y: cy, class: "mark", "text-anchor": "middle",
        "dominant-baseline": "central", "font-size": Math.max(10, Math.min(18, rowH, colW)) }, "★"));
    }
    xLabels(svg, spec.x, left, colW, y - 8 + 8, 90);
    colorbar(svg, spec, width - right + 12, gridTop[0], Math.min(y - 12 - gridTop[0], 160));
    box.appendChild(svg);
  }

  function cellLines(spec, g, gi, r, c, handlers) {
    const lines = [`${spec.y[r]}, ${spec.x[c]}`];
    if (g.title) lines.push(g.title);
    let values = `${spec.value} = ${fmt(g.z[r][c])}`;
    for (const [k, grid] of Object.entries(spec.hover || {})) values += `  ${k} = ${fmt(grid[r][c])}`;
    lines.push(values);
    const note = handlers.cellNote && handlers.cellNote(gi, r, c);
    if (note) lines.push(note);
    return lines;
  }

  function colorbar(svg, spec, x, top, height) {
    const steps = 24;
    for (let i = 0; i < steps; i++) {
      const v = spec.zmax - ((i + 0.5) / steps) * (spec.zmax - spec.zmin);
      svg.appendChild(svgEl("rect", { x, y: top + (i * height) / steps, width: 10, height: height / steps + 0.5,
        fill: colorOf(spec, v) }));
    }
    const ticks = spec.scale === "diverging" ? [spec.zmin, 0, spec.zmax] : [spec.zmin, (spec.zmin + spec.zmax) / 2, spec.zmax];
    for (const t of ticks) {
      const ty = top + ((spec.zmax - t) / (spec.zmax - spec.zmin || 1)) * height;
      svg.appendChild(svgEl("text", { x: x + 13, y: ty, "dominant-baseline": "middle", class: "tick" }, fmt(t)));
    }
  }

  // ---- bars (horizontal, grouped) ------------------------------------------------------------------

  function bars(box, spec) {
    const width = frame(box, spec);
    const colors = ["#4c78a8", "#f58518", "#54a24b", "#b279a2"];
    const left = 8;
    const right = 44;
    const barH = 11;
    const groupH = 16 + spec.series.length * (barH + 2) + 8;
    const height = spec.categories.length * groupH + 22;
    const svg = svgEl("svg", { width, height, class: "chart-svg" });
    const plotW = width - left - right;
    const x = (v) => left + (Math.max(0, v) / spec.max) * plotW;
    for (const t of niceTicks(0, spec.max, 4)) {
      svg.appendChild(svgEl("line", { x1: x(t), x2: x(t), y1: 0, y2: height - 18, class: "gridline" }));
      svg.appendChild(svgEl("text", { x: x(t), y: height - 6, "text-anchor": "middle", class: "tick" }, fmt(t)));
    }
    spec.categories.forEach((cat, i) => {
      const top = i * groupH;
      svg.appendChild(svgEl("text", { x: left, y: top + 12, class: "label" }, clip(cat, plotW)));
      spec.series.forEach((s, k) => {
        const v = s.values[i];
        const by = top + 16 + k * (barH + 2);
        const bar = svgEl("rect", { x: left, y: by, width: Math.max(1, x(v) - left), height: barH, fill: colors[k % colors.length] });
        hoverable(bar, () => [cat, `${s.name}: ${fmt(v)}`]);
        svg.appendChild(bar);
        svg.appendChild(svgEl("text", { x: x(v) + 4, y: by + barH / 2, "dominant-baseline": "middle", class: "tick" }, fmt(v)));
      });
    });
    box.appendChild(svg);
    legend(box, spec.series.map((s, k) => ({ name: s.name, color: colors[k % colors.length] })));
  }

  // ---- axes for lines and scatter -------------------------------------------------------------------

  function axes(svg, area, xr, yr, labels) {
    const sx = (v) => area.left + ((v - xr[0]) / (xr[1] - xr[0] || 1)) * area.width;
    const sy = (v) => area.top + area.height - ((v - yr[0]) / (yr[1] - yr[0] || 1)) * area.height;
    for (const t of niceTicks(yr[0], yr[1], 4)) {
      svg.appendChild(svgEl("line", { x1: area.left, x2: area.left + area.width, y1: sy(t), y2: sy(t), class: "gridline" }));
      svg.appendChild(svgEl("text", { x: area.left - 5, y: sy(t), "text-anchor": "end", "dominant-baseline": "middle",
        class: "tick" }, fmt(t)));
    }
    if (labels.xTicks) {
      for (const t of niceTicks(xr[0], xr[1], 4)) {
        svg.appendChild(svgEl("line", { x1: sx(t), x2: sx(t), y1: area.top, y2: area.top + area.height, class: "gridline" }));
        svg.appendChild(svgEl("text", { x: sx(t), y: area.top + area.height + 13, "text-anchor": "middle", class: "tick" }, fmt(t)));
      }
    }
    svg.appendChild(svgEl("rect", { x: area.left, y: area.top, width: area.width, height: area.height, class: "outline" }));
    if (labels.x) {
      svg.appendChild(svgEl("text", { x: area.left + area.width / 2, y: area.top + area.height + 28, "text-anchor": "middle",
        class: "label" }, labels.x));
    }
    if (labels.y) {
      const cx = 11;
      const cy = area.top + area.height / 2;
      svg.appendChild(svgEl("text", { x: cx, y: cy, transform: `rotate(-90 ${cx} ${cy})`, "text-anchor": "middle",
        class: "label" }, labels.y));
    }
    return [sx, sy];
  }

  function range(values, pad) {
    const lo = Math.min(...values);
    const hi = Math.max(...values);
    const p = (hi - lo || Math.abs(hi) || 1) * pad;
    return [lo - p, hi + p];
  }

  function lines(box, spec) {
    const width = frame(box, spec);
    const xLabelW = labelSpace(spec.x, 90);
    const area = { left: 52, top: 8, width: width - 52 - 16, height: 150 };
    const height = area.top + area.height + xLabelW * 0.72 + 16;
    const svg = svgEl("svg", { width, height, class: "chart-svg" });
    const all = spec.series.flatMap((s) => s.values);
    const yr = [Math.min(0, ...all), Math.max(...all) * 1.1 || 1];
    const colW = area.width / spec.x.length;
    const [, sy] = axes(svg, area, [0, 1], yr, { y: spec.ylabel });
    const px = (i) => area.left + (i + 0.5) * colW;
    spec.series.forEach((s, k) => {
      const color = ["#4c78a8", "#f58518"][k % 2];
      svg.appendChild(svgEl("polyline", { points: s.values.map((v, i) => `${px(i)},${sy(v)}`).join(" "), fill: "none",
        stroke: color, "stroke-width": 2 }));
      s.values.forEach((v, i) => {
        const dot = svgEl("circle", { cx: px(i), cy: sy(v), r: 4, fill: color });
        hoverable(dot, () => [spec.x[i], `${s.name} = ${fmt(v)}`]);
        svg.appendChild(dot);
      });
    });
    xLabels(svg, spec.x, area.left, colW, area.top + area.height + 8, 90);
    box.appendChild(svg);
  }

  function scatter(box, spec) {
    const width = frame(box, spec);
    const plot = Math.min(width - 60, 420);
    const area = { left: 50, top: 8, width: width - 50 - 12, height: plot * 0.85 };
    const height = area.top + area.height + 36;
    const svg = svgEl("svg", { width, height, class: "chart-svg" });
    box.appendChild(svg);
    if (spec.zlabel) rotatable(svg, spec, area);
    else {
      const [sx, sy] = axes(svg, area, range(spec.series.flatMap((s) => s.x), 0.05),
        range(spec.series.flatMap((s) => s.y), 0.05), { x: spec.xlabel, y: spec.ylabel, xTicks: true });
      trajectories(svg, spec, (s, i) => [sx(s.x[i]), sy(s.y[i])]);
    }
    legend(box, spec.series.filter((s) => s.legend).map((s) => ({ name: s.name, color: s.color })));
    const first = spec.points[0];
    const last = spec.points[spec.points.length - 1];
    const drag = spec.zlabel ? "; drag to rotate" : "";
    box.appendChild(htmlEl("div", "chart-note", `each line: one prompt's last position, from ${first} (ring) to ${last}${drag}`));
  }

  function trajectories(svg, spec, at) {
    // thin lines first, the thick one (the page's own prompt) on top
    const order = [...spec.series].sort((a, b) => a.width - b.width);
    for (const s of order) {
      const pts = s.x.map((_, i) => at(s, i));
      svg.appendChild(svgEl("polyline", { points: pts.map((p) => p.join(",")).join(" "), fill: "none",
        stroke: s.color, "stroke-width": s.width, "stroke-opacity": s.width > 2 ? 1 : 0.7 }));
      pts.forEach(([x, y], i) => {
        const dot = svgEl("circle", { cx: x, cy: y, r: s.width > 2 ? 4 : 2.6, fill: s.color });
        hoverable(dot, () => [s.text, `${spec.points[i]} · answer ${s.name}`]);
        svg.appendChild(dot);
      });
      // the first point (the embeddings) is a hollow ring: trajectories run from there
      svg.appendChild(svgEl("circle", { cx: pts[0][0], cy: pts[0][1], r: 5, fill: "white", stroke: s.color, "stroke-width": 1.5 }));
    }
  }

  function rotatable(svg, spec, area) {
    // three principal components as an orthographic projection; dragging turns it
    const all = spec.series.flatMap((s) => s.x.map((_, i) => [s.x[i], s.y[i], s.z[i]]));
    const mean = [0, 1, 2].map((k) => all.reduce((a, p) => a + p[k], 0) / all.length);
    const extent = Math.max(...all.map((p) => Math.hypot(p[0] - mean[0], p[1] - mean[1], p[2] - mean[2]))) || 1;
    const scale = (0.48 * Math.min(area.width, area.height)) / extent;
    const cx = area.left + area.width / 2;
    const cy = area.top + area.height / 2;
    const view = { yaw: 0.6, pitch: 0.35 };
    const project = (p) => {
      const [x, y, z] = [p[0] - mean[0], p[1] - mean[1], p[2] - mean[2]];
      const x1 = x * Math.cos(view.yaw) + z * Math.sin(view.yaw);
      const z1 = -x * Math.sin(view.yaw) + z * Math.cos(view.yaw);
      const y1 = y * Math.cos(view.pitch) - z1 * Math.sin(view.pitch);
      return [cx + scale * x1, cy - scale * y1];
    };
    const layer = svgEl("g");
    svg.append(svgEl("rect", { x: area.left, y: area.top, width: area.width, height: area.height, class: "outline drag" }), layer);
    function render() {
      layer.replaceChildren();
      [spec.xlabel, spec.ylabel, spec.zlabel].forEach((label, k) => {
        const tip = [...mean];
        tip[k] += extent * 0.9;
        const [x0, y0] = project(mean);
        const [x1, y1] = project(tip);
        layer.appendChild(svgEl("line", { x1: x0, y1: y0, x2: x1, y2: y1, stroke: "#999", "stroke-dasharray": "4 3" }));
        layer.appendChild(svgEl("text", { x: x1, y: y1 - 4, "text-anchor": "middle", class: "tick" }, label));
      });
      trajectories(layer, spec, (s, i) => project([s.x[i], s.y[i], s.z[i]]));
    }
    let from = null;
    svg.addEventListener("pointerdown", (e) => { from = [e.clientX, e.clientY]; svg.setPointerCapture(e.pointerId); });
    svg.addEventListener("pointerup", () => { from = null; });
    svg.addEventListener("pointermove", (e) => {
      if (!from) return;
      view.yaw += (e.clientX - from[0]) * 0.01;
      view.pitch = Math.max(-1.5, Math.min(1.5, view.pitch + (e.clientY - from[1]) * 0.01));
      from = [e.clientX, e.clientY];
      render();
    });
    render();
  }

  // ---- reasoning flow ---------------------------------------------------------------------------------

  function flow(box, spec) {
    const width = frame(box, spec);
    const controls = htmlEl("div", "chart-controls");
    const play = htmlEl("button", "", "▶ play");
    play.type = "button";
    const slider = htmlEl("input");
    Object.assign(slider, { type: "range", min: 1, max: spec.steps.length, step: 1, value: spec.steps.length });
    const caption = htmlEl("span", "chart-step");
    controls.append(play, slider, caption);
    box.appendChild(controls);
    const left = labelSpace(spec.y, 120) + 10;
    const xLabelW = labelSpace(spec.x, 90);
    const right = 22;  // room for the last column's bubble
    const colW = (width - left - right) / spec.x.length;
    const rowH = Math.max(26, Math.min(48, colW * 1.3));
    const top = 10;
    const plotH = spec.y.length * rowH;
    const height = top + plotH + xLabelW * 0.72 + 16;
    const svg = svgEl("svg", { width, height, class: "chart-svg" });
    const defs = svgEl("defs");
    const marker = svgEl("marker", { id: `arrow-${Math.random().toString(36).slice(2)}`, viewBox: "0 0 10 10", refX: 9,
      refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto-start-reverse" });
    marker.appendChild(svgEl("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#555" }));
    defs.appendChild(marker);
    svg.appendChild(defs);
    const px = (c) => left + (c + 0.5) * colW;
    const py = (r) => top + plotH - (r + 0.5) * rowH;
    spec.y.forEach((label, r) => {
      svg.appendChild(svgEl("line", { x1: left, x2: width - right, y1: py(r), y2: py(r), class: "gridline" }));
      svg.appendChild(svgEl("text", { x: left - 6, y: py(r), "text-anchor": "end", "dominant-baseline": "middle",
        class: "tick" }, label));
    });
    svg.appendChild(svgEl("rect", { x: left, y: top, width: width - right - left, height: plotH, class: "outline" }));
    xLabels(svg, spec.x, left, colW, top + plotH + 8, 90);
    const layer = svgEl("g");
    svg.appendChild(layer);
    const radius = (s) => Math.min(rowH * 0.45, 5 + 14 * Math.sqrt(s.prob));

    function show(k) {
      layer.replaceChildren();
      const shown = spec.steps.slice(0, k);
      shown.slice(1).forEach((b, i) => {
        const a = shown[i];
        const [x1, y1, x2, y2] = [px(a.col), py(a.row), px(b.col), py(b.row)];
        const d = Math.hypot(x2 - x1, y2 - y1) || 1;
        const r = radius(b) + 3;
        layer.appendChild(svgEl("line", { x1, y1, x2: x2 - ((x2 - x1) * r) / d, y2: y2 - ((y2 - y1) * r) / d,
          stroke: "#555", "stroke-width": 2, "marker-end": `url(#${marker.id})` }));
      });
      shown.forEach((s) => {
        const bubble = svgEl("circle", { cx: px(s.col), cy: py(s.row), r: radius(s), fill: "#ff9f40", "fill-opacity": 0.85,
          stroke: "#c05a00", "stroke-width": 1.5 });
        hoverable(bubble, () => [s.concept, `${spec.y[s.row]}, ${spec.x[s.col]}`, `p = ${fmt(s.prob)}`]);
        layer.appendChild(bubble);
        // the concept's name beside its bubble, inside the plot
        const tx = px(s.col) + radius(s) + 4;
        const anchor = tx + textWidth(s.concept) > width - 14 ? "end" : "start";
        layer.appendChild(svgEl("text", { x: anchor === "end" ? px(s.col) - radius(s) - 4 : tx, y: py(s.row),
          "text-anchor": anchor, "dominant-baseline": "middle", class: "flow-label" }, s.concept));
      });
      slider.value = k;
      caption.textContent = `${k} of ${spec.steps.length}: ${shown.map((s) => s.concept).join(" → ")}`;
    }

    let timer = null;
    play.addEventListener("click", () => {
      clearInterval(timer);
      let k = 1;
      show(k);
      timer = setInterval(() => {
        k += 1;
        if (k > spec.steps.length || !box.isConnected) clearInterval(timer);
        else show(k);
      }, 900);
    });
    slider.addEventListener("input", () => {
      clearInterval(timer);
      show(Number(slider.value));
    });
    show(spec.steps.length);
    box.appendChild(svg);
  }

  const KINDS = { heatmap, bars, lines, scatter, flow };

  window.CircuitsCharts = {
    draw(box, spec, handlers) {
      hideTip();
      KINDS[spec.type](box, spec, handlers || {});
    },
  };
})();
