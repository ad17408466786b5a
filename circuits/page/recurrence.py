"""The page of a global circuit: the features that recur across prompts (`circuits.aggregate`) in the
trace page's viewer.

The recurrence becomes a graph JSON the viewer reads (`graph_json`): rows are layers as in a trace;
columns, in place of token positions, are how often a node recurs (`k/N` prompts, or frequency bins
for many prompts), least frequent on the left. A feature's node id is `{layer}_{feature}_{column}`,
a logit's `{n_layers + 1}_{token}_{column}`; its `influence` is the cumulative share of the summed
influence over the prompts (the schema's meaning: smaller is more influential). `restyle` sizes the
nodes by frequency and shades features by mean influence; `recurrence.js` shows, for a clicked
node, its frequency and the prompts that keep it, and lists every prompt (a click highlights the
nodes it keeps).
"""

from __future__ import annotations

import math

from circuits.attribution.schema import FEATURE_TYPES

MAX_COLUMNS = 12
"""Up to this many prompts, one column per count; above, MAX_COLUMNS - 2 equal frequency bins."""
LIGHT, DARK = (198, 219, 239), (8, 48, 107)  # feature fill from least to most mean influence


def columns(n_prompts: int) -> list[str]:
    """The column labels: 'k/N' per count up to MAX_COLUMNS prompts, else frequency bins '≤p%'."""
    if n_prompts <= MAX_COLUMNS:
        return [f"{k}/{n_prompts}" for k in range(1, n_prompts + 1)]
    bins = MAX_COLUMNS - 2
    return [f"≤{round(100 * (b + 1) / bins)}%" for b in range(bins)]


def column(frequency: float, n_prompts: int) -> int:
    """The column of a node kept by `frequency` of `n_prompts` prompts."""
    if n_prompts <= MAX_COLUMNS:
        return round(frequency * n_prompts) - 1
    bins = MAX_COLUMNS - 2
    return min(bins - 1, max(0, math.ceil(frequency * bins - 1e-9) - 1))


def graph_json(recurrence: dict) -> dict:
    """The viewer's graph JSON (circuit-tracer schema) of `circuits.aggregate.recurring_features`."""
    n, n_layers = len(recurrence["prompts"]), recurrence["n_layers"]
    ids = node_ids(recurrence)
    total = sum(node["mean_influence"] * node["frequency"] for node in recurrence["nodes"]) or 1.0
    nodes, cumulative = [], 0.0
    for node in sorted(recurrence["nodes"], key=lambda x: -x["mean_influence"] * x["frequency"]):
        cumulative += node["mean_influence"] * node["frequency"] / total
        logit = node["kind"] == "logit"
        nodes.append({
            "node_id": ids[node["id"]],
            "feature": node["feature"],
            "layer": str(n_layers + 1 if logit else node["layer"]),
            "ctx_idx": column(node["frequency"], n),
            "feature_type": FEATURE_TYPES[node["kind"]],
            "clerp": f'Output "{node["token"]}" (p={node["mean_probability"]:.3f})' if logit else "",
            "influence": cumulative,
            "activation": None if logit else node["mean_activation"],
            "token_prob": node["mean_probability"] if logit else 0.0,
            "is_target_logit": False,
        })  # fmt: skip
    links = [
        {"source": ids[link["source"]], "target": ids[link["target"]], "weight": link["weight"]}
        for link in recurrence["links"]
    ]
    metadata = {
        "slug": "aggregate",
        "prompt": f"Features that recur across {n} prompts",
        "prompt_tokens": columns(n),
        "node_threshold": recurrence["node_threshold"],
        "edge_threshold": recurrence["edge_threshold"],
        "pruned": True,
    }
    return {"metadata": metadata, "qParams": {}, "nodes": nodes, "links": links}


def node_ids(recurrence: dict) -> dict[str, str]:
    """The viewer's node id of every node of the recurrence, by its id there."""
    n, top = len(recurrence["prompts"]), recurrence["n_layers"] + 1
    return {
        node["id"]: f"{top if node['kind'] == 'logit' else node['layer']}_{node['feature']}_"
        f"{column(node['frequency'], n)}"
        for node in recurrence["nodes"]
    }


def page_data(recurrence: dict) -> dict:
    """What `recurrence.js` needs: the prompts with their answers, and per viewer node id its
    frequency, mean influence and the indices of the prompts that keep it."""
    ids = node_ids(recurrence)
    return {
        "prompts": recurrence["prompts"],
        "answers": recurrence["answers"],
        "nodes": {
            ids[node["id"]]: {
                "frequency": node["frequency"],
                "mean_influence": node["mean_influence"],
                "prompts": node["prompts"],
            }
            for node in recurrence["nodes"]
        },
    }


def restyle(vis_nodes: list[dict], data: dict) -> None:
    """Size every node by its frequency (radius 5 to 13) and fill features from light to dark blue by
    mean influence (relative to the most influential feature), in place."""
    features = [data["nodes"][n["id"]]["mean_influence"] for n in vis_nodes if n["kind"] == "feature"]
    strongest = max(features, default=1.0) or 1.0
    for n in vis_nodes:
        node = data["nodes"][n["id"]]
        n["size"] = round(5 + 8 * node["frequency"], 2)
        if n["kind"] == "feature":
            t = min(max(node["mean_influence"] / strongest, 0.0), 1.0)
            n["color"] = "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(LIGHT, DARK, strict=True))
