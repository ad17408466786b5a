"""Supernodes: groups of graph nodes shown as one, with their edges summed.

`suggest_supernodes` proposes groups of features at the same token position whose link profiles
(the weights of their incoming edges, then of their outgoing edges, over every other node) point
the same way: complete linkage, every pair in a group at cosine >= threshold. Groups use the
circuit-tracer / Neuronpedia form `[label, node_id, node_id, ...]` (qParams.supernodes).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from circuits.attribution.schema import KINDS
from circuits.errors import CircuitsError


def similarity(ids: list[str], profiles: dict[str, dict]) -> np.ndarray:
    """Cosine similarity [n, n] of the nodes' link profiles."""
    keys = sorted({k for i in ids for k in profiles.get(i, {})})
    column = {k: j for j, k in enumerate(keys)}
    vectors = np.zeros((len(ids), len(keys)))
    for row, i in enumerate(ids):
        for k, v in profiles.get(i, {}).items():
            vectors[row, column[k]] = v
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T


def link_profiles(graph: dict) -> dict[str, dict[tuple[str, str], float]]:
    """Per node: {("in", source) or ("out", target): weight}, a sparse vector."""
    profiles: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    for link in graph["links"]:
        profiles[link["target"]][("in", link["source"])] = float(link["weight"])
        profiles[link["source"]][("out", link["target"])] = float(link["weight"])
    return profiles


def suggest_supernodes(graph: dict, threshold: float = 0.8, labels: dict[str, str] | None = None) -> list[list[str]]:
    """Groups of >= 2 features at one position with pairwise link-profile cosine >= `threshold`,
    largest first, each `[label, *node_ids]`; the label is that of the group's most influential
    feature (from `labels`, else its clerp), or its position's token."""
    if not 0.0 < threshold <= 1.0:
        raise CircuitsError(f"supernode threshold is {threshold}: pass a cosine in (0, 1]")
    labels = labels or {}
    profiles = link_profiles(graph)
    tokens = graph["metadata"].get("prompt_tokens", [])
    by_pos: dict[int, list[dict]] = defaultdict(list)
    for node in graph["nodes"]:
        if KINDS.get(node.get("feature_type")) == "feature":
            by_pos[int(node["ctx_idx"])].append(node)
    groups = []
    for pos, members in sorted(by_pos.items()):
        members.sort(key=lambda n: (n.get("influence") is None, n.get("influence") or 0.0, n["node_id"]))
        ids = [n["node_id"] for n in members]
        for cluster in _complete_linkage(ids, profiles, threshold):
            first = next(n for n in members if n["node_id"] == cluster[0])
            token = tokens[pos] if pos < len(tokens) else str(pos)
            label = labels.get(cluster[0]) or first.get("clerp") or f"{token} @{pos}"
            groups.append([label, *cluster])
    return sorted(groups, key=lambda g: -len(g))


def _complete_linkage(ids: list[str], profiles: dict, threshold: float) -> list[list[str]]:
    """Merge the most similar pair of clusters while their least similar cross pair has cosine
    >= threshold; clusters keep the order of `ids` (most influential first)."""
    linkage = similarity(ids, profiles)  # [n, n]: cluster-to-cluster similarity, complete linkage
    np.fill_diagonal(linkage, -np.inf)
    clusters = {i: [i] for i in range(len(ids))}
    while len(clusters) > 1:
        i, j = np.unravel_index(np.argmax(linkage), linkage.shape)
        if linkage[i, j] < threshold:
            break
        i, j = min(i, j), max(i, j)
        clusters[i] += clusters.pop(j)
        linkage[i] = linkage[:, i] = np.minimum(linkage[i], linkage[j])
        linkage[i, i] = -np.inf
        linkage[j] = linkage[:, j] = -np.inf
    return [[ids[k] for k in sorted(c)] for c in clusters.values() if len(c) > 1]
