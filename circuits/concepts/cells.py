"""Which attribution-graph nodes sit at each cell (row, position) of a concept trace.

Trace rows are residual-stream states: row 0 the embeddings, row r the stream after r blocks (see
`circuits.concepts.lens.logit_lens`); columns are token positions.
"""

from __future__ import annotations


def graph_node_row(layer: str | int, n_layers: int) -> int:
    """The trace row where a graph node's output lands: embeddings ("E") row 0; a feature or error
    node of layer l writes the MLP output of block l, so row l+1; logit nodes the last row."""
    if str(layer) == "E":
        return 0
    return min(int(layer) + 1, n_layers)


def graph_nodes_by_cell(nodes: list[dict], n_layers: int) -> dict[tuple[int, int], list[str]]:
    """Map each trace cell (row, position) to the ids of graph nodes there. Nodes are dicts with `layer`
    ("E" or a layer number) and `ctx_idx` (circuit-tracer/Neuronpedia graph JSON), and `node_id`
    (default `{layer}_{feature}_{ctx_idx}`)."""
    cells: dict[tuple[int, int], list[str]] = {}
    for node in nodes:
        node_id = node.get("node_id", f"{node['layer']}_{node.get('feature', 0)}_{node['ctx_idx']}")
        cells.setdefault((graph_node_row(node["layer"], n_layers), int(node["ctx_idx"])), []).append(node_id)
    return cells
