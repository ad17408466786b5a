"""Global circuits: the features that recur across the pruned graphs of many prompts.

A prompt keeps a feature when its pruned graph JSON (`schema.to_dict` at the given thresholds, the
graph `circuits trace` writes) has a node of that (layer, feature) at any position; a feature's
frequency is the fraction of prompts that keep it. Position-free: within a prompt a feature's
influence is summed over its positions, and an edge between two (layer, feature) pairs (or a feature
and a logit target, keyed by its token) sums its kept edges over all positions.
(`circuits.attribution.graph.aggregate` merges the full graphs, every active feature, instead.)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from circuits.attribution import schema
from circuits.attribution.graph import Graph, check_one_source
from circuits.errors import CircuitsError, check_range

if TYPE_CHECKING:
    from circuits.features import FeatureScan

log = logging.getLogger(__name__)


def recurring_features(
    graphs: list[Graph], node_threshold: float = 0.8, edge_threshold: float = 0.98, min_prompts: int = 1
) -> dict:
    """JSON-ready {"prompts", "answers", "n_layers", "model", "transcoder" (the graphs' names),
    "node_threshold", "edge_threshold", "nodes", "links"}.

    nodes: {id ("{layer}_{feature}", or "L_{token id}" for a logit target), kind, layer, feature, token
    (logits), prompts (indices of the prompts keeping it), frequency, mean_influence (its influence on
    the targets, `Graph.influence`, over the prompts keeping it), mean_activation (features: the
    largest over its positions, averaged likewise), mean_probability (logits: over all prompts, 0 where
    it is no target)}, most frequent first. links: {source, target, prompts, frequency, weight: summed
    over the prompts' kept edges / the number of prompts}, by |weight|. Nodes and links kept by fewer
    than `min_prompts` prompts are left out."""
    if not graphs:
        raise CircuitsError("no graphs to aggregate: pass .graph.safetensors files written by `circuits trace`")
    check_range("min_prompts", min_prompts, 1, len(graphs), integer=True)
    check_one_source(graphs)
    nodes: dict[str, dict] = {}
    links: dict[tuple[str, str], dict] = {}
    for index, graph in enumerate(graphs):
        kept, kept_links = _kept(graph, node_threshold, edge_threshold)
        for key, record in kept.items():
            node = nodes.setdefault(key, {**record["node"], "prompts": [], "influence": 0.0, "activation": 0.0})
            node["prompts"].append(index)
            node["influence"] += record["influence"]
            node["activation"] += record["activation"]
        for pair, weight in kept_links.items():
            link = links.setdefault(pair, {"prompts": [], "weight": 0.0})
            link["prompts"].append(index)
            link["weight"] += weight
    n = len(graphs)
    node_list = [_node_json(node, n) for node in nodes.values() if len(node["prompts"]) >= min_prompts]
    node_list.sort(key=lambda node: (-node["frequency"], -node["mean_influence"]))
    shown = {node["id"] for node in node_list}
    link_list = [
        {"source": s, "target": t, "prompts": link["prompts"], "frequency": len(link["prompts"]) / n,
         "weight": link["weight"] / n}
        for (s, t), link in links.items()
        if len(link["prompts"]) >= min_prompts and s in shown and t in shown
    ]  # fmt: skip
    link_list.sort(key=lambda link: -abs(link["weight"]))
    return {
        "prompts": [g.prompt for g in graphs],
        "answers": [g.target_names[0] if g.target_names else "" for g in graphs],
        "n_layers": graphs[0].n_layers,
        "model": str(graphs[0].config.get("model", "")),
        "transcoder": str((graphs[0].config.get("transcoder") or {}).get("name", "")),
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "nodes": node_list,
        "links": link_list,
    }


def _kept(graph: Graph, node_threshold: float, edge_threshold: float) -> tuple[dict[str, dict], dict]:
    """The features and logit targets the graph's pruned JSON keeps, by aggregate key ({node, influence,
    activation}), and its kept edges between them summed by key pair."""
    pruned = schema.to_dict(graph, "aggregate", "", node_threshold, edge_threshold)
    records = graph.nodes()
    index = {record["id"]: i for i, record in enumerate(records)}
    influence = graph.influence().tolist()  # [N]
    keys: dict[str, str] = {}  # node id -> aggregate key
    kept: dict[str, dict] = {}
    for node in pruned["nodes"]:
        record = records[index[node["node_id"]]]
        if record["kind"] not in ("feature", "logit"):
            continue
        key, base = _key(record)
        keys[node["node_id"]] = key
        entry = kept.setdefault(key, {"node": base, "influence": 0.0, "activation": 0.0})
        entry["influence"] += influence[index[node["node_id"]]]
        entry["activation"] = max(entry["activation"], record.get("activation") or record.get("prob") or 0.0)
    summed: dict[tuple[str, str], float] = {}
    for link in pruned["links"]:
        if link["source"] in keys and link["target"] in keys:
            pair = (keys[link["source"]], keys[link["target"]])
            summed[pair] = summed.get(pair, 0.0) + link["weight"]
    return kept, summed


def _key(record: dict) -> tuple[str, dict]:
    """(aggregate key, the node's position-free fields) of a feature or logit record of `Graph.nodes`."""
    if record["kind"] == "logit":
        return f"L_{record['feature']}", {"id": f"L_{record['feature']}", "kind": "logit", "layer": record["layer"],
                                            "feature": record["feature"], "token": record["token"]}  # fmt: skip
    key = f"{record['layer']}_{record['feature']}"
    return key, {"id": key, "kind": "feature", "layer": record["layer"], "feature": record["feature"]}


def _node_json(node: dict, n_prompts: int) -> dict:
    count = len(node["prompts"])
    out = {k: v for k, v in node.items() if k not in ("influence", "activation")}
    out["frequency"] = count / n_prompts
    out["mean_influence"] = node["influence"] / count
    if node["kind"] == "logit":
        out["mean_probability"] = node["activation"] / n_prompts
    else:
        out["mean_activation"] = node["activation"] / count
    return out


def render_aggregate_page(recurrence: dict, features: FeatureScan | None = None) -> str:
    """The page of `recurring_features` (see `circuits.page.recurrence`): the trace page's viewer with
    the features' cards from `features` (the scan of the graphs' transcoder; None: no cards)."""
    from circuits.page.assemble import PageInfo, feature_cards, render_page
    from circuits.page.recurrence import graph_json, page_data

    graph = graph_json(recurrence)
    n = len(recurrence["prompts"])
    info = PageInfo(
        model=recurrence["model"],
        transcoder=recurrence["transcoder"],
        predictions_caption="answers (mean probability over the prompts)",
        facts=[("prompts", str(n), "the prompts whose pruned graphs are merged; the side panel lists them")],
    )
    return render_page(graph, cards=feature_cards(graph, features), info=info, recurrence=page_data(recurrence))


def scan_for(transcoder: str, directory: str | None = None) -> FeatureScan | None:
    """The feature scan for the page's cards: `directory` (written by `circuits features`; 'demo',
    'demo-tuned': the shipped ones), else the transcoder's default folder (for a shipped transcoder,
    its shipped scan until one is written there); None when there is none. A scan made for a
    transcoder of another name is used with a warning (a path and a name may name one transcoder)."""
    from circuits.features import SHIPPED_FEATURES, default_features_dir, load_features, scan_dir

    if directory is None:
        candidates = (default_features_dir(transcoder), SHIPPED_FEATURES.get(transcoder))
        found = [d for d in candidates if d is not None and (d / "features.json").is_file()]
        if not found:
            log.warning("no feature scan for %s: pass --features for feature cards", transcoder)
            return None
        directory = found[0]
    scan = load_features(scan_dir(directory))
    if scan.clt_name != transcoder:
        log.warning("the feature scan in %s is of %s, the graphs of %s", directory, scan.clt_name, transcoder)
    return scan
