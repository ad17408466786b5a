"""The graph view: an attribution graph in the circuit-tracer / Neuronpedia JSON schema (read
through `circuits.attribution.schema`) laid out as a pyvis (vis-network) network with fixed positions.

x = token position, y = layer: embeddings on the bottom row, features and error nodes of layer l
on row l + 1, logits on top. Nodes sharing a (layer, position) cell sit in slots of a grid inside
it (a node and room for its label to its right); a column is as wide as its widest cell and a row
as tall as its tallest, so no two nodes overlap and empty columns stay narrow. The page draws the
labels, tokens and layer names itself (page.js), so vis-network nodes carry none. Each node keeps
its top-k edges by |weight| (an edge stays when it is among the top k of its source's outgoing or
its target's incoming edges).

The suppressed features of `metadata.inhibited_features` (inactive, so no node of the graph JSON)
become hidden nodes of kind `inhibited` in their cells, after the cell's graph nodes, with an edge
`inhibited: true` from each of their inhibitors that is a node of the view; the page shows them on
request.

pyvis renders the vis-network data and options into its template; `network_assets` keeps only
the inlined vis-network CSS/JS and the script that draws the network (globals `nodes`, `edges`,
`network`) and drops every tag that would load something from the network.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass

from pyvis.network import Network

from circuits.attribution import schema

COLORS = {
    "feature": "#4c78a8",
    "error": "#a0a0a0",
    "embedding": "#54a24b",
    "logit": "#f58518",
    "inhibited": {"background": "#fff5f5", "border": "#c53030"},  # hollow, red dashed border
}
SHAPES = {"feature": "dot", "error": "square", "embedding": "square", "logit": "square", "inhibited": "dot"}
EDGE_RGB = {True: "43,108,176", False: "197,48,48"}  # positive (blue), negative (red)


@dataclass
class ViewOptions:
    top_k_edges: int | None = 10
    """Edges kept per node, by |weight| (None: every edge of the graph)."""
    slot_width: float = 170.0
    """Width of one node's slot in a (layer, position) cell: the node and its label to its right."""
    slot_height: float = 34.0
    """Height of one node's slot (more than the largest node's diameter)."""
    min_column_width: float = 40.0
    """A column holding only its token (the token's label also widens it)."""
    min_row_height: float = 72.0
    gap: float = 20.0
    """Space between neighbouring cells, on both axes."""


@dataclass
class GraphView:
    nodes: list[dict]  # vis-network node objects (ids are the graph's node_ids)
    edges: list[dict]  # vis-network edge objects; `weight` holds the signed edge weight
    n_layers: int
    n_links: int  # edges in the graph before the top-k selection
    tokens: list[str]
    geometry: dict  # columns [[left, right]] per position, rows [[top, bottom]] per row (canvas units)


def build_view(graph: dict, labels: dict[str, str], options: ViewOptions) -> GraphView:
    """Vis-network nodes and edges of `graph`; `labels` maps node ids to feature labels."""
    schema.check_graph(graph)
    n_layers = schema.count_layers(graph)
    tokens = [str(t) for t in graph["metadata"].get("prompt_tokens", [])]
    parsed = {n["node_id"]: {**schema.parse_node(n, n_layers), "node": n} for n in graph["nodes"]}
    inhibited = schema.inhibited_features(graph, set(parsed))
    n_pos = max([len(tokens)] + [p["pos"] + 1 for p in parsed.values()])
    positions, geometry = _layout({**parsed, **inhibited}, tokens, n_pos, n_layers + 2, options)
    nodes = [_vis_node(nid, p, positions[nid], tokens, labels.get(nid, "")) for nid, p in parsed.items()]
    links = [link for link in graph["links"] if link["source"] in parsed and link["target"] in parsed]
    kept = _top_k(links, options.top_k_edges)
    scale = _weight_scale([abs(link["weight"]) for link in kept])
    edges = [_vis_edge(i, link, scale) for i, link in enumerate(kept)]
    strongest = max([abs(float(p["node"]["inhibition"])) for p in inhibited.values()], default=1.0) or 1.0
    for nid, p in inhibited.items():
        nodes.append(_inhibited_node(nid, p, positions[nid], labels.get(nid, ""), strongest))
        for source in p["node"].get("inhibitors", []):
            if source["source"] in parsed:
                link = {"source": source["source"], "target": nid, "weight": source["weight"]}
                edges.append({**_vis_edge(len(edges), link, scale), "inhibited": True})
    return GraphView(nodes, edges, n_layers, len(links), tokens, geometry)


def _layout(
    parsed: dict[str, dict], tokens: list[str], n_pos: int, n_rows: int, options: ViewOptions
) -> tuple[dict[str, tuple[float, float]], dict]:
    """(x, y) per node and the grid's geometry. Each (row, position) cell packs its nodes in a grid
    of slots (most influential first, errors and suppressed features last); a column is as wide as
    its widest cell, a row as tall as its tallest, so no two nodes overlap. Canvas y grows
    downwards: row 0 (embeddings) is at the bottom."""
    cells: dict[tuple[int, int], list[str]] = defaultdict(list)
    for nid, p in parsed.items():
        cells[(p["row"], p["pos"])].append(nid)
    shape = {}  # (row, pos) -> (slots per line, lines)
    for key, ids in cells.items():
        ids.sort(key=lambda i: _order(parsed[i]))
        per_line = math.ceil(math.sqrt(len(ids) / 5))  # taller than wide: rows are cheaper than columns
        shape[key] = (per_line, math.ceil(len(ids) / per_line))
    widths = [max(options.min_column_width, _text_width(tokens[p]) if p < len(tokens) else 0.0) for p in range(n_pos)]
    heights = [options.min_row_height] * n_rows
    for (row, pos), (per_line, lines) in shape.items():
        if row > 0:  # a token's embedding has no label beside it: its token is written under the column
            widths[pos] = max(widths[pos], per_line * options.slot_width)
        heights[row] = max(heights[row], lines * options.slot_height)
    columns = _spans([w + options.gap for w in widths])
    rows = [(-bottom, -top) for top, bottom in _spans([h + options.gap for h in heights])]  # row 0 lowest
    out = {}
    for (row, pos), ids in cells.items():
        per_line, lines = shape[(row, pos)]
        left, right = columns[pos]
        top, bottom = rows[row]
        centre = (left + right) / 2
        for k, nid in enumerate(ids):
            line, col = divmod(k, per_line)
            # a slot holds its node on the left and the node's label to its right; a token's label
            # is drawn under its column instead, so an embedding sits in the middle
            x = centre if parsed[nid]["kind"] == "embedding" else _slot_x(centre, col, per_line, options)
            y = (top + bottom) / 2 + (line - (lines - 1) / 2) * options.slot_height
            out[nid] = (round(x, 1), round(y, 1))
    geometry = {
        "columns": [list(c) for c in columns],
        "rows": [list(r) for r in rows],
        "slot_width": options.slot_width,
    }
    return out, geometry


def _slot_x(centre: float, col: int, per_line: int, options: ViewOptions) -> float:
    """x of the node in slot `col` of a line of `per_line` slots centred on `centre`."""
    return centre + (col - per_line / 2) * options.slot_width + options.slot_height / 2


def _spans(sizes: list[float]) -> list[tuple[float, float]]:
    """Consecutive [start, end] intervals of the given sizes, starting at 0."""
    out, start = [], 0.0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def _order(p: dict) -> tuple:
    """Graph nodes first (logits by probability, others by influence), errors after them, then the
    hidden suppressed features."""
    node = p["node"]
    if p["kind"] == "logit":
        return (0, -float(node.get("token_prob") or 0.0), node["node_id"])
    return (_SLOT[p["kind"]], schema.influence(node), node["node_id"])


def _text_width(text: str) -> float:
    """Half the width of a token's label (12 px sans-serif) at scale 1: neighbouring tokens take
    turns on two lines, so each has about two columns."""
    return 3.5 * len(text) + 8


_SLOT = {"feature": 0, "embedding": 0, "logit": 0, "error": 1, "inhibited": 2}


def _vis_node(nid: str, p: dict, xy: tuple[float, float], tokens: list[str], label: str) -> dict:
    node, kind = p["node"], p["kind"]
    importance = 1.0 - min(max(schema.influence(node), 0.0), 1.0)
    out = {
        "id": nid,
        "x": xy[0],
        "y": xy[1],
        "fixed": True,
        "physics": False,
        "shape": SHAPES[kind],
        "color": COLORS[kind],
        "kind": kind,
        "layer": p["layer"],
        "pos": p["pos"],
        "feature": p["feature"],
        "activation": node.get("activation"),
        "influence": node.get("influence"),
        "clerp": node.get("clerp") or label,
        "size": SIZES[kind](importance),
    }
    if kind == "embedding":
        out["token"] = tokens[p["pos"]] if p["pos"] < len(tokens) else nid
    elif kind == "logit":
        out["token"] = schema.logit_token(node)
        out["prob"] = float(node.get("token_prob") or 0.0)
        if node.get("is_target_logit"):
            out["borderWidth"] = 3
    return out


# node radius (dots) or half side (squares) by kind, from importance in [0, 1]; the largest fits a slot
SIZES = {
    "feature": lambda imp: round(6 + 6 * imp, 2),
    "error": lambda imp: round(5 + 3 * imp, 2),
    "embedding": lambda imp: 8.0,
    "logit": lambda imp: 10.0,
}


def _inhibited_node(nid: str, p: dict, xy: tuple[float, float], label: str, strongest: float) -> dict:
    """A suppressed feature: hollow with a red dashed border, radius 6 to 12 by |inhibition| relative
    to the strongest; hidden until the page shows suppressed features."""
    record = p["node"]
    return {
        "id": nid,
        "x": xy[0],
        "y": xy[1],
        "fixed": True,
        "physics": False,
        "hidden": True,
        "shape": SHAPES["inhibited"],
        "color": dict(COLORS["inhibited"]),
        "borderWidth": 2,
        "shapeProperties": {"borderDashes": [4, 3]},
        "size": round(6 + 6 * min(abs(float(record["inhibition"])) / strongest, 1.0), 2),
        "kind": "inhibited",
        "layer": p["layer"],
        "pos": p["pos"],
        "feature": p["feature"],
        "pre_activation": record.get("pre_activation"),
        "inhibition": record.get("inhibition"),
        "clerp": label,
    }


def _top_k(links: list[dict], k: int | None) -> list[dict]:
    """The links among the top k by |weight| of their source's outgoing or their target's incoming."""
    if k is None:
        return links
    keep = set()
    for end in ("source", "target"):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, link in enumerate(links):
            groups[link[end]].append(i)
        for members in groups.values():
            keep.update(sorted(members, key=lambda i: -abs(links[i]["weight"]))[:k])
    return [links[i] for i in sorted(keep)]


def _weight_scale(magnitudes: list[float]) -> float:
    """The |weight| drawn at full width: the 95th percentile, so one huge edge does not thin the rest."""
    if not magnitudes:
        return 1.0
    ordered = sorted(magnitudes)
    return max(ordered[int(0.95 * (len(ordered) - 1))], 1e-12)


def _vis_edge(i: int, link: dict, scale: float) -> dict:
    w = float(link["weight"])
    rel = min(abs(w) / scale, 1.0)
    return {
        "id": i,
        "from": link["source"],
        "to": link["target"],
        "weight": w,
        "width": round(0.4 + 3.6 * rel, 2),
        # one rgba string: vis-network converts {color, opacity} on every frame, which doubles drawing time
        "color": f"rgba({EDGE_RGB[w >= 0]},{0.25 + 0.65 * rel:.2f})",
    }


# ---- pyvis -----------------------------------------------------------------------------------


def vis_options(n_edges: int) -> dict:
    """Fixed layout, no physics, straight edges; large graphs hide edges while dragging."""
    return {
        "physics": {"enabled": False},
        "layout": {"improvedLayout": False},
        "edges": {"smooth": False, "arrows": {"to": {"enabled": n_edges <= 20_000, "scaleFactor": 0.35}}},
        "nodes": {"borderWidth": 1},  # no vis-network labels: the page draws its own (page.js)
        "interaction": {
            "hover": True,
            "multiselect": True,
            "tooltipDelay": 10**9,
            "hideEdgesOnDrag": n_edges > 5_000,
            "hideEdgesOnZoom": n_edges > 5_000,
            "navigationButtons": False,
            "keyboard": False,
        },
    }


def network_assets(view: GraphView) -> dict[str, str]:
    """The pieces of pyvis's page the final page needs: `css` and `js` (vis-network, inlined from
    pyvis's bundled copy) and `draw` (the script building the network in div#mynetwork)."""
    net = Network(height="100%", width="100%", directed=True, cdn_resources="in_line", heading="")
    # Appended directly: pyvis's add_edge checks every existing node and edge (quadratic in size).
    net.nodes = view.nodes
    net.edges = view.edges
    net.node_ids = [n["id"] for n in view.nodes]
    net.node_map = {n["id"]: n for n in view.nodes}
    net.set_options(json.dumps(vis_options(len(view.edges))))
    page = net.generate_html()
    head, body = page.split("<body>", 1)
    styles = re.findall(r"<style[^>]*>(.*?)</style>", head, flags=re.S)
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", head, flags=re.S)
    vis_js = [s for s in scripts if "vis-network" in s[:2000] or "vis.Network" in s]
    draw = [s for s in re.findall(r"<script[^>]*>(.*?)</script>", body, flags=re.S) if "drawGraph" in s]
    if len(vis_js) != 1 or len(draw) != 1 or not styles or draw[0].count(_PYVIS_DATA) != 1:
        raise RuntimeError("pyvis's template changed: vis-network or the drawing script was not found")
    return {"css": styles[0], "js": vis_js[0], "draw": draw[0].replace(_PYVIS_DATA, _FILTERED_DATA)}


# The network shows a filtered view of the edges: hiding thousands of edges through a DataView removes
# them from the network, which is far cheaper than updating each edge's `hidden` option.
_PYVIS_DATA = "data = {nodes: nodes, edges: edges};"
_FILTERED_DATA = (
    "window.edgesView = new vis.DataView(edges, {filter: (e) => !window.edgeFilter || window.edgeFilter(e)});"
    " data = {nodes: nodes, edges: window.edgesView};"
)
