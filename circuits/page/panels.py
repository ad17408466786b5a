"""The concept-trace panels: plotly figures as JSON specs the page draws with an inlined plotly.js.

Clicking a heatmap cell highlights the graph nodes at that (layer, position). How a figure's rows
map to graph layers follows the concept-trace figures' names (`circuits.concepts.report.figures`):
  trace:*                rows are residual-stream states: row 0 the embeddings, row r the output of
                         block r - 1 (features and errors of layer r - 1; the last row also the logits)
  writers:*, patching:*  rows are layers (a grid with more rows than layers, e.g. heads, is split
                         evenly: row i belongs to layer i * n_layers // n_rows)
  flow                   scatter points at (position, residual row)
Columns (heatmaps) and x (scatter) are token positions. Other figures are shown but not linked.
"""

from __future__ import annotations

import json

import plotly.io


def graph_link(name: str) -> str | None:
    """How clicks on the figure `name` map to graph nodes: 'residual', 'layer' or None."""
    if name.startswith("trace:") or name == "flow":
        return "residual"
    if name.startswith(("writers:", "patching:")):
        return "layer"
    return None


def figure_specs(figures: dict) -> list[dict]:
    """[{name, link, figure}] with each plotly figure as plain JSON (data, layout, frames)."""
    return [
        {"name": name, "link": graph_link(name), "figure": json.loads(plotly.io.to_json(fig, validate=False))}
        for name, fig in figures.items()
    ]


def plotly_js() -> str:
    """plotly.js, bundled with the plotly package (no CDN)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()
