"""The graph JSON: circuit-tracer's graph schema, read by the Neuronpedia / Anthropic graph viewer and
by our page. This module is its one owner: `to_dict` writes it from a `Graph`, `annotate` adds the
feature labels and supernodes, and the parsers read it back.

A graph is {"metadata", "qParams", "nodes", "links"}. Node ids: features `{layer}_{feature}_{pos}`,
error nodes `{layer}_-1_{pos}`, embeddings `E_{token}_{pos}`, logits `{n_layers + 1}_{token}_{pos}`.
A node's `layer` is a string ("E" for embeddings, n_layers + 1 for logits), its `feature` the token
for embeddings and logits and circuit-tracer's pairing of (layer, index) for features, its
`influence` the cumulative share of the influence on the targets up to it (smaller: more
influential). Links are {source, target, weight}. Inactive features the graph suppresses are not
nodes: `metadata.inhibited_features` lists them, each with its inhibitors.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from circuits.errors import CircuitsError

if TYPE_CHECKING:
    from circuits.attribution.graph import Graph, PruneResult

SCHEMA_VERSION = 1  # of the graph's files: this JSON and the safetensors of `Graph.save`
FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "embedding": "embedding",
    "logit": "logit",
}
KINDS = {feature_type: kind for kind, feature_type in FEATURE_TYPES.items()}

# ---- writing ---------------------------------------------------------------------------------


def to_dict(
    graph: Graph,
    slug: str,
    scan: str = "",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    prune: bool = True,
) -> dict:
    """The graph JSON of `graph`: pruned by `graph.prune(node_threshold, edge_threshold)`, or with
    `prune=False` the full graph (every node, every nonzero edge; the thresholds are written as null).
    `scan` names the transcoder."""
    result = graph.prune(node_threshold, edge_threshold) if prune else graph.unpruned()
    records = graph.nodes()
    kept = result.node_mask.nonzero()[:, 0].tolist()
    nodes = [node_json(graph, records[i], i, result.cumulative_scores[i].item()) for i in kept]
    links = links_json(graph, result, {i: records[i]["id"] for i in kept})
    if prune:  # pruning can leave a kept node with no kept link: only tokens and logits stay alone
        linked = {link["source"] for link in links} | {link["target"] for link in links}
        nodes = [n for n in nodes if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    thresholds = (node_threshold, edge_threshold) if prune else (None, None)
    return {
        "metadata": metadata_json(graph, slug, scan, thresholds, records),
        "qParams": qparams_json(),
        "nodes": nodes,
        "links": links,
    }


def node_json(graph: Graph, record: dict, index: int, influence: float) -> dict:
    """One node: `record` is `graph.nodes()[index]`, `influence` its cumulative influence score."""
    kind = record["kind"]
    return {
        "node_id": record["id"],
        "feature": _cantor(record["layer"], record["feature"]) if kind == "feature" else record["feature"],
        "layer": "E" if kind == "embedding" else str(record["layer"] + (kind == "logit")),
        "ctx_idx": record["pos"],
        "feature_type": FEATURE_TYPES[kind],
        "jsNodeId": _js_node_id(record),
        "clerp": f'Output "{record["token"]}" (p={record["prob"]:.3f})' if kind == "logit" else "",
        "influence": influence,
        "activation": record.get("activation"),
        "token_prob": record.get("prob", 0.0),
        "is_target_logit": kind == "logit" and index == graph.target_slice.start,
        "reverse_ctx_idx": graph.n_pos - 1 - record["pos"],
        "run_idx": 0,
    }


def links_json(graph: Graph, result: PruneResult, ids: dict[int, str]) -> list[dict]:
    """The kept edges between kept nodes (`ids`: node index -> node id), by target, then source."""
    targets, sources, weights = graph.edges(result)
    weights = weights.tolist()
    return [
        {"source": ids[s], "target": ids[t], "weight": w}
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)
        if s in ids and t in ids
    ]


def metadata_json(
    graph: Graph, slug: str, scan: str, thresholds: tuple[float | None, float | None], records: list[dict]
) -> dict:
    """The graph's `metadata`: prompt, thresholds (None: not pruned), scores, suppressed features, the
    transcoder's hooks (circuit-tracer's key names) and the weight processing of the model and the one
    the transcoder expects (graphs saved before these were recorded: resid_mid -> mlp_out, "none")."""
    replacement, completeness = graph.scores()
    transcoder = graph.config.get("transcoder", {})
    return {
        "slug": slug,
        "scan": scan,
        "transcoder_list": [],
        "prompt_tokens": graph.token_strs,
        "prompt": graph.prompt,
        "node_threshold": thresholds[0],
        "edge_threshold": thresholds[1],
        "pruned": thresholds[0] is not None,
        "schema_version": SCHEMA_VERSION,
        "replacement_score": replacement,
        "completeness_score": completeness,
        "inhibited_features": [_inhibited_json(r, records) for r in graph.inhibited],
        "feature_input_hook": transcoder.get("input_hook", "hook_resid_mid"),
        "feature_output_hook": transcoder.get("output_hook", "hook_mlp_out"),
        "model_processing": graph.config.get("model_processing", "none"),
        "transcoder_model_processing": transcoder.get("model_processing", "none"),
    }


def qparams_json() -> dict:
    """The viewer's state, empty: nothing pinned, no supernodes, nothing clicked."""
    return {
        "pinnedIds": [],
        "supernodes": [],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
        "sparsityThreshold": 0,
    }


def annotate(graph: dict, labels: dict[str, str], supernodes: list[list[str]] | None = None) -> dict:
    """A copy of the graph JSON `graph` (metadata and links shared, not copied) whose nodes without a clerp
    get their label from `labels` (node id -> label), and whose qParams.supernodes are `supernodes`
    (`[label, node_id, ...]` groups) when given."""
    out = {**graph, "nodes": [_labelled(node, labels) for node in graph["nodes"]]}
    if supernodes is not None:
        out["qParams"] = {**(graph.get("qParams") or {}), "supernodes": supernodes}
    return out


def _labelled(node: dict, labels: dict[str, str]) -> dict:
    """A copy of `node`, its label from `labels` as its clerp when it has none."""
    if node.get("clerp") or node["node_id"] not in labels:
        return dict(node)
    return {**node, "clerp": labels[node["node_id"]]}


def _inhibited_json(record: dict, records: list[dict]) -> dict:
    """A suppressed feature of `Graph.inhibited`, its inhibitors named by node id."""
    return {
        "node_id": f"{record['layer']}_{record['feature']}_{record['pos']}",
        "pre_activation": record["pre_activation"],
        "inhibition": record["inhibition"],
        "inhibitors": [{"source": records[i]["id"], "weight": w} for i, w in record["inhibitors"]],
    }


def _cantor(x: int, y: int) -> int:
    """circuit-tracer's feature number: a unique integer for (layer, feature index)."""
    return (x + y) * (x + y + 1) // 2 + y


def _js_node_id(record: dict) -> str:
    kind, feature, pos = record["kind"], record["feature"], record["pos"]
    if kind == "feature":
        return f"{record['layer']}_{feature}-0"
    if kind == "error":
        return f"{record['layer']}_-1-{pos}"
    if kind == "embedding":
        return f"E_{feature}-{pos}"
    return f"L_{feature}-{pos}"


# ---- reading ---------------------------------------------------------------------------------


def check_graph(graph: dict) -> None:
    """Refuse a dict that is not a graph JSON (no metadata, nodes or links)."""
    for key in ("metadata", "nodes", "links"):
        if key not in graph:
            raise CircuitsError(f"the graph JSON has no {key!r}: pass a graph in the circuit-tracer schema")


def parse_node(node: dict, n_layers: int) -> dict:
    """The kind, row, layer, position and feature index of a node of the graph JSON (row 0: the
    embeddings, row l + 1: features and errors of layer l, row n_layers + 1: the logits)."""
    kind = KINDS.get(node.get("feature_type"))
    if kind is None:
        raise CircuitsError(f"node {node.get('node_id')!r} has unknown feature_type {node.get('feature_type')!r}")
    pos = int(node["ctx_idx"])
    if kind == "embedding":
        return {"kind": kind, "row": 0, "layer": None, "pos": pos, "feature": int(node["feature"])}
    if kind == "logit":
        return {"kind": kind, "row": n_layers + 1, "layer": n_layers, "pos": pos, "feature": int(node["feature"])}
    layer = int(node["layer"])
    # circuit-tracer stores a pairing of (layer, index) in `feature`; the node id keeps the index itself
    feature = int(node["node_id"].split("_")[1]) if kind == "feature" else -1
    return {"kind": kind, "row": layer + 1, "layer": layer, "pos": pos, "feature": feature}


def parse_inhibited(record: dict) -> dict:
    """The row, layer, position and feature index of a suppressed feature of
    `metadata.inhibited_features` (node id `{layer}_{feature}_{pos}`)."""
    match = re.fullmatch(r"(\d+)_(\d+)_(\d+)", str(record.get("node_id")))
    if match is None:
        raise CircuitsError(
            f"suppressed feature {record.get('node_id')!r} in metadata.inhibited_features is not "
            "'{layer}_{feature}_{pos}': re-run `circuits trace`"
        )
    layer, feature, pos = (int(x) for x in match.groups())
    return {"kind": "inhibited", "row": layer + 1, "layer": layer, "pos": pos, "feature": feature}


def inhibited_features(graph: dict, node_ids: set[str]) -> dict[str, dict]:
    """The suppressed features of `metadata.inhibited_features` by node id, parsed like graph nodes
    (`node` holds the record); refused when one is also among `node_ids` (the graph's nodes) or
    listed twice."""
    out = {}
    for record in graph["metadata"].get("inhibited_features") or []:
        if record["node_id"] in node_ids or record["node_id"] in out:
            raise CircuitsError(
                f"suppressed feature {record['node_id']} is also a node of the graph, or listed twice: "
                "an inhibited feature is inactive; re-run `circuits trace`"
            )
        out[record["node_id"]] = {**parse_inhibited(record), "node": record}
    return out


def transcoder_features(graph: dict) -> list[tuple[str, int, int]]:
    """(node id, layer, feature index) of every transcoder feature the graph names: its feature
    nodes, then its suppressed features."""
    out = []
    for node in graph["nodes"]:
        if node.get("feature_type") == FEATURE_TYPES["feature"]:
            p = parse_node(node, 0)  # the number of layers only places logits
            out.append((node["node_id"], p["layer"], p["feature"]))
    for record in graph["metadata"].get("inhibited_features") or []:
        p = parse_inhibited(record)
        out.append((record["node_id"], p["layer"], p["feature"]))
    return out


def count_layers(graph: dict) -> int:
    """Transcoder layers of a graph: logit nodes sit on layer L + 1 in the schema."""
    logits = [int(n["layer"]) for n in graph["nodes"] if n.get("feature_type") == FEATURE_TYPES["logit"]]
    if logits:
        return logits[0] - 1
    layers = [int(n["layer"]) for n in graph["nodes"] if n.get("feature_type") in KINDS and n["layer"] != "E"]
    return max(layers, default=-1) + 1


def influence(node: dict) -> float:
    """A node's cumulative influence score; missing counts as least influential (1)."""
    value = node.get("influence")
    return 1.0 if value is None else float(value)


def logit_token(node: dict) -> str:
    """The token of a logit node: 'Austin' from the clerp 'Output "Austin" (p=0.999)'."""
    match = re.fullmatch(r'Output "(.*)" \(p=[0-9.e-]+\)', node.get("clerp") or "", flags=re.S)
    return match[1] if match else (node.get("clerp") or node["node_id"])
