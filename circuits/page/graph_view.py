"""The graph view: an attribution graph in the circuit-tracer / Neuronpedia JSON schema (read
through `circuits.attribution.schema`) laid out as a pyvis (vis-network) network with fixed positions.

x = token position, y = layer: embeddings on the bottom row, features and error nodes of layer l
on row l + 1, logits on top. Nodes sharing a (layer, position) cell are packed in a small grid
inside it. Each node keeps its top-k edges by |weight| (an edge stays when it is among the top k
of its source's outgoing or its target's incoming edges).

The suppressed features of `metadata.inhibited_features` (inactive, so no node of the graph JSON)
become hidden nodes of kind `inhibited` in their cells, after the cell's graph nodes, with an edge
`inhibited: true` from each of their inhibitors that is a node of the view; the page shows them on
request.

pyvis renders the vis-network data and options into its template; `network_assets` keeps only
the inlined vis-network CSS/JS and the script that draws the network (globals `nodes`, `edges`,
`network`) and drops every tag that would load something from the network.
"""

from __future__ import annotations

import dataclasses
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
SHAPES = {"feature": "dot", "error": "square", "embedding": "box", "logit": "box", "inhibited": "dot"}
EDGE_RGB = {True: "43,108,176", False: "197,48,48"}  # positive (blue), negative (red)


@dataclass
class ViewOptions:
    top_k_edges: int | None = 10
    """Edges kept per node, by |weight| (None: every edge of the graph)."""
    column_width: float = 170.0
    row_height: float | None = None
    """None: from the prompt's length, so that the grid is roughly as tall as it is wide (150 to 400)."""
    node_pitch: float = 26.0
    """Distance between nodes packed in one (layer, position) cell."""


@dataclass
class GraphView:
    nodes: list[dict]  # vis-network node objects (ids are the graph's node_ids)
    edges: list[dict]  # vis-network edge objects; `weight` holds the signed edge weight
    n_layers: int
    n_links: int  # edges in the graph before the top-k selection
    tokens: list[str]
    geometry: dict  # column_width, row_height: for the axes the page draws


def build_view(graph: dict, labels: dict[str, str], options: ViewOptions) -> GraphView:
    """Vis-network nodes and edges of `graph`; `labels` maps node ids to feature labels."""
    schema.check_graph(graph)
    n_layers = schema.count_layers(graph)
    tokens = [str(t) for t in graph["metadata"].get("prompt_tokens", [])]
    parsed = {n["node_id"]: {**schema.parse_node(n, n_layers), "node": n} for n in graph["nodes"]}
    inhibited = schema.inhibited_features(graph, set(parsed))
    n_pos = max([len(tokens)] + [p["pos"] + 1 for p in parsed.values()])
    if options.row_height is None:
        auto = options.column_width * (n_pos + 1) / (n_layers + 2) * 0.8
        options = dataclasses.replace(options, row_height=min(max(auto, 150.0), 400.0))
    positions = _layout({**parsed, **inhibited}, options)
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
    geometry = {"column_width": options.column_width, "row_height": options.row_height}
    return GraphView(nodes, edges, n_layers, len(links), tokens, geometry)


def _layout(parsed: dict[str, dict], options: ViewOptions) -> dict[str, tuple[float, float]]:
    """(x, y) per node: cell centre (position, row) plus a grid offset inside the cell; canvas y
    grows downwards, so higher rows get smaller y."""
    cells: dict[tuple[int, int], list[str]] = defaultdict(list)
    for nid, p in parsed.items():
        cells[(p["row"], p["pos"])].append(nid)
    width, height, pitch = options.column_width * 0.85, options.row_height * 0.7, options.node_pitch
    out = {}
    for (row, pos), ids in cells.items():
        # graph nodes first (errors last among them), then the hidden suppressed features
        ids.sort(key=lambda i: (_SLOT[parsed[i]["kind"]], schema.influence(parsed[i]["node"]), i))
        per_line = max(1, min(len(ids), int(width // pitch)))
        lines = math.ceil(len(ids) / per_line)
        dy = min(pitch, height / max(lines - 1, 1))
        dx = min(pitch, width / max(per_line - 1, 1))
        if parsed[ids[0]]["kind"] == "logit":  # labelled boxes in one line, as wide as their labels
            ids.sort(key=lambda i: -float(parsed[i]["node"].get("token_prob") or 0.0))
            per_line, lines, dy = len(ids), 1, 0.0
            dx = max(_label_width(schema.logit_token(parsed[i]["node"])) for i in ids) + 16
        for k, nid in enumerate(ids):
            line, col = divmod(k, per_line)
            in_line = min(per_line, len(ids) - line * per_line)
            x = pos * options.column_width + (col - (in_line - 1) / 2) * dx
            y = -row * options.row_height + (line - (lines - 1) / 2) * dy
            out[nid] = (round(x, 1), round(y, 1))
    return out


_SLOT = {"feature": 0, "embedding": 0, "logit": 0, "error": 1, "inhibited": 2}


def _label_width(text: str) -> float:
    """Rough width of a label in canvas units (22 px font)."""
    return 12.0 * max(len(line) for line in text.split("\n"))


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
    }
    if kind in ("feature", "error"):
        out["size"] = round(5 + 13 * importance, 2)
    elif kind == "embedding":
        out["label"] = tokens[p["pos"]] if p["pos"] < len(tokens) else nid
    else:
        out["token"] = schema.logit_token(node)
        out["prob"] = float(node.get("token_prob") or 0.0)
        out["label"] = f"{out['token']}\n{out['prob']:.3f}"
        if node.get("is_target_logit"):
            out["borderWidth"] = 3
    return out


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
        "nodes": {"font": {"size": 22, "face": "sans-serif"}, "borderWidth": 1},
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
