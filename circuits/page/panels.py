"""The concept panel of the page: the concept-trace charts in tabs beside the graph, linked to it.

Figures are chart specs (`circuits.concepts.figures`), drawn by `circuits/concepts/charts.js`; the
panel's own script (`concepts.js`) puts them in tabs and links heatmap cells to graph nodes. One
numbering holds across graph and panel: a feature (or error node) of layer l writes into the residual
stream after block l. So a figure row is linked either as a residual-stream state (`trace:*`,
`patching:resid_pre`: row 0 the embeddings, row r the stream after block r - 1, holding the nodes of
layer r - 1, and on the last row the logits) or as a block (`writers:*`, `patching:attn_out`,
`patching:mlp_out`, `patching:head`: the features and errors of that layer). Columns are positions.

A cell with no graph node says why, from the graph itself: which nodes the pruned graph keeps at that
position, and where its strongest edges from that position go through attention (`attention_routes`).
"""

from __future__ import annotations

import html

from circuits.concepts.cells import graph_nodes_by_cell

LAYER_NODES = ("cross layer transcoder", "mlp reconstruction error")
TAB_OF = {"flow": "path", "paths": "path", "trajectories": "trajectories", "funnel": "trajectories"}


def panel_data(figures: dict[str, dict], graph: dict, n_layers: int) -> dict:
    """What `concepts.js` needs: the figures in tabs with how their rows link to the graph, the graph
    nodes by cell (residual row or layer, position) and the attention routes of every position."""
    by_layer: dict[str, list[str]] = {}  # "layer,position" -> its feature and error nodes
    for n in graph["nodes"]:
        if n["feature_type"] in LAYER_NODES:
            by_layer.setdefault(f"{int(n['layer'])},{n['ctx_idx']}", []).append(n["node_id"])
    residual = graph_nodes_by_cell(graph["nodes"], n_layers)
    return {
        "tabs": tabs(figures),
        "figures": [{"name": name, **row_links(name, spec), "chart": spec} for name, spec in figures.items()],
        "cells": {"residual": {f"{r},{p}": ids for (r, p), ids in residual.items()}, "layer": by_layer},
        "routes": attention_routes(graph),
        "focus": feature_focus(graph),
        "tokens": graph["metadata"].get("prompt_tokens", []),
        "n_layers": n_layers,
    }


def tabs(figures: dict[str, dict]) -> list[dict]:
    """[{label, figures: [index]}] in the figures' order: one tab per concept (its trace and writers),
    one for the path (flow, scores), one for patching, one for trajectories (and the funnel)."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(figures):
        kind, _, rest = name.partition(":")
        label = rest if kind in ("trace", "writers") else TAB_OF.get(name, kind)
        out.setdefault(label, []).append(i)
    return [{"label": label, "figures": indices} for label, indices in out.items()]


def row_links(name: str, spec: dict) -> dict:
    """{link, rows}: how a click on row i of the figure maps to graph nodes, `rows[i]` being a residual
    row (link "residual") or a layer (link "layer"); link None: not linked."""
    if name.startswith("trace:") or name == "patching:resid_pre":
        return {"link": "residual", "rows": list(range(len(spec["y"])))}
    if name.startswith("writers:") or name in ("patching:attn_out", "patching:mlp_out"):
        return {"link": "layer", "rows": list(range(len(spec["y"])))}
    if name == "patching:head":  # rows "block b head h", heads of a block together
        return {"link": "layer", "rows": [int(label.split()[1]) for label in spec["y"]]}
    return {"link": None, "rows": []}


def attention_routes(graph: dict) -> dict[str, dict]:
    """For each position with an edge to another position (edges between positions pass through
    attention): {to: the target position its edges reach most (summed |weight|), layer: the target
    nodes' layer there that carries most of it ("logit" for logits), weight: that sum}."""
    nodes = {n["node_id"]: n for n in graph["nodes"]}
    sums: dict[int, dict[tuple[int, str], float]] = {}
    for link in graph["links"]:
        source, target = nodes[link["source"]], nodes[link["target"]]
        if source["ctx_idx"] == target["ctx_idx"]:
            continue
        layer = "logit" if target["feature_type"] == "logit" else str(target["layer"])
        cell = sums.setdefault(source["ctx_idx"], {})
        cell[(target["ctx_idx"], layer)] = cell.get((target["ctx_idx"], layer), 0.0) + abs(link["weight"])
    routes = {}
    for pos, cells in sums.items():
        by_target: dict[int, float] = {}
        for (to, _), w in cells.items():
            by_target[to] = by_target.get(to, 0.0) + w
        to = max(by_target, key=by_target.get)
        layer = max((k for k in cells if k[0] == to), key=cells.get)[1]
        routes[str(pos)] = {"to": to, "layer": layer, "weight": round(by_target[to], 6)}
    return routes


def feature_focus(graph: dict) -> dict | None:
    """{position, count, total}: the position holding most of the graph's feature nodes (the later one
    on a tie), where the graph does its work; None without features."""
    counts: dict[int, int] = {}
    for n in graph["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            counts[n["ctx_idx"]] = counts.get(n["ctx_idx"], 0) + 1
    if not counts:
        return None
    position = max(counts, key=lambda p: (counts[p], p))
    return {"position": position, "count": counts[position], "total": sum(counts.values())}


def panel_html(panel: dict) -> str:
    """The panel's markup: a collapse button, the tabs, one box per figure; `concepts.js` draws them."""
    buttons = "".join(
        f'<button type="button" role="tab" class="concept-tab" data-tab="{t}">{html.escape(tab["label"])}</button>'
        for t, tab in enumerate(panel["tabs"])
    )
    pages = "".join(
        f'<div class="concept-page" id="concept-page-{t}" hidden>'
        + "".join(
            f'<div class="figure-box"><div class="figure" id="figure-{i}"></div>'
            f'<p class="cell-info" id="cell-info-{i}"></p></div>'
            for i in tab["figures"]
        )
        + "</div>"
        for t, tab in enumerate(panel["tabs"])
    )
    return (
        '<section id="concepts"><div id="concepts-head">'
        '<button type="button" id="concepts-toggle" title="hide the concept panel">»</button>'
        '<h2>Concept traces</h2></div><div id="concepts-body">'
        f'<nav id="concept-tabs" role="tablist">{buttons}</nav>'
        '<p class="numbering">Rows are the residual stream: "after block l" holds what the features of layer l '
        "write. Click a cell to select its graph nodes.</p>"
        f"{pages}</div></section>"
    )
