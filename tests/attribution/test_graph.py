"""Graph: influence, pruning invariants, scores, the JSON schema, the safetensors round trip."""

import json
import re

import pytest
import torch

from circuits.attribution.attribute import attribute
from circuits.attribution.graph import Graph, aggregate, compute_influence, edge_influence, normalize_matrix
from circuits.cli import main
from circuits.errors import CircuitsError

FLAGSHIP = "Fact: Dallas is in the state whose capital is"


@pytest.fixture(scope="module")
def graph(demo_model, demo_clt):
    return attribute(FLAGSHIP, demo_model, demo_clt, targets=["Austin", "Springfield"], progress=False)


def test_influence_is_the_neumann_series(graph):
    A = normalize_matrix(graph.adjacency.double())
    w = graph.target_weights().double()
    N = len(A)
    expected = w @ (torch.linalg.inv(torch.eye(N, dtype=A.dtype) - A) - torch.eye(N, dtype=A.dtype))
    assert torch.allclose(compute_influence(A, w), expected, atol=1e-9)
    assert torch.allclose(normalize_matrix(graph.adjacency)[: graph.n_features].sum(1), torch.ones(graph.n_features))


def test_influence_over_edges_grouped_by_target_row(graph):
    """The sparse path's form: each row's K largest edges as raw values [R, K] with the row's whole
    total, normalised as read, in chunks of a few rows, against the Neumann series of those edges."""
    A = graph.adjacency.double()
    N, K = len(A), 16
    rows = torch.arange(N)[A.abs().sum(1) > 0]  # [R] the rows with edges
    top = A[rows].abs().topk(K, dim=1).indices  # [R, K]
    values, totals = A[rows].gather(1, top), A[rows].abs().sum(1)
    kept = torch.zeros_like(A)
    kept[rows[:, None], top] = values.abs() / totals[:, None]
    w = graph.target_weights().double()
    expected = w @ (torch.linalg.inv(torch.eye(N, dtype=A.dtype) - kept) - torch.eye(N, dtype=A.dtype))
    got = edge_influence(rows, top, values, w, totals, chunk=5 * K)
    assert torch.allclose(got, expected, atol=1e-9)
    targets, sources = rows[:, None].expand_as(top).flatten(), top.flatten()
    assert torch.allclose(edge_influence(targets, sources, kept[targets, sources], w, chunk=7), expected, atol=1e-9)


def test_pruning_invariants(graph):
    node_mask, edge_mask, cumulative = graph.prune(0.8, 0.98)
    inner = graph.token_slice.start
    assert node_mask[inner:].all()  # tokens and targets stay
    assert 0 < node_mask[: graph.n_features].sum() < graph.n_features
    assert not (edge_mask & ~(node_mask[:, None] & node_mask[None, :])).any()  # edges join kept nodes
    kept = node_mask.nonzero()[:, 0]
    kept_inner = kept[kept < inner]
    assert edge_mask[:, kept_inner].any(0).all()  # features and errors send a kept edge
    kept_features = kept[kept < graph.n_features]
    assert edge_mask[kept_features].any(1).all()  # features receive one
    # kept nodes are the most influential ones, up to 80% of the influence: none lies past the node
    # whose cumulative share first reaches the threshold
    influence = graph.influence()
    dropped = (~node_mask[: graph.n_features]).nonzero()[:, 0]
    assert cumulative[kept_features].max() <= cumulative[cumulative >= 0.8].min()
    assert influence[kept_features].max() >= influence[dropped].max()
    # a looser threshold keeps a superset of the nodes
    loose = graph.prune(0.95, 0.99).node_mask
    assert loose.sum() >= node_mask.sum()
    with pytest.raises(CircuitsError, match="node_threshold"):
        graph.prune(1.5)


def test_scores(graph):
    replacement, completeness = graph.scores()
    assert 0 <= replacement <= 1 and 0 <= completeness <= 1
    perfect = Graph(**{**graph.__dict__, "adjacency": graph.adjacency.clone()})
    perfect.adjacency[:, graph.error_slice] = 0
    assert perfect.scores() == pytest.approx((1.0, 1.0))
    errors_only = Graph(**{**graph.__dict__, "adjacency": graph.adjacency.clone()})
    errors_only.adjacency[:, : graph.n_features] = 0
    errors_only.adjacency[:, graph.token_slice] = 0
    assert errors_only.scores()[0] == pytest.approx(0.0)


def test_json_follows_the_circuit_tracer_schema(graph, tmp_path):
    path = tmp_path / "g.json"
    graph.to_json(path, slug="dallas", scan="demo")
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    assert meta["slug"] == "dallas" and meta["scan"] == "demo" and meta["prompt"] == FLAGSHIP
    assert meta["prompt_tokens"] == graph.token_strs and meta["node_threshold"] == 0.8
    assert set(data["qParams"]) >= {"pinnedIds", "supernodes", "linkType", "clickedId", "sparsityThreshold"}
    types = {
        "node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "jsNodeId": str,
        "clerp": str, "influence": float, "token_prob": float, "is_target_logit": bool, "reverse_ctx_idx": int,
        "run_idx": int,
    }  # fmt: skip
    patterns = {
        "cross layer transcoder": r"\d+_\d+_\d+",
        "mlp reconstruction error": r"\d+_-1_\d+",
        "embedding": r"E_\d+_\d+",
        "logit": rf"{graph.n_layers + 1}_\d+_{graph.n_pos - 1}",
    }
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)) and len({n["jsNodeId"] for n in data["nodes"]}) == len(ids)
    for node in data["nodes"]:
        for key, kind in types.items():
            assert isinstance(node[key], kind), (key, node)
        assert re.fullmatch(patterns[node["feature_type"]], node["node_id"]), node
        assert node["reverse_ctx_idx"] == graph.n_pos - 1 - node["ctx_idx"]
        if node["feature_type"] == "cross layer transcoder":
            assert node["activation"] > 0
    kinds = [n["feature_type"] for n in data["nodes"]]
    assert kinds.count("embedding") == graph.n_pos and kinds.count("logit") == 2
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    assert {link["source"] for link in data["links"]} | {link["target"] for link in data["links"]} <= set(ids)
    assert all(isinstance(link["weight"], float) for link in data["links"])
    # every link is a real edge of the graph
    index = {r["id"]: i for i, r in enumerate(graph.nodes())}
    for link in data["links"][:50]:
        assert graph.adjacency[index[link["target"]], index[link["source"]]].item() == pytest.approx(link["weight"])


def _links_of(records: list[dict], adjacency: torch.Tensor) -> dict[tuple[str, str], float]:
    """{(source id, target id): weight} of every nonzero edge."""
    targets, sources = (adjacency != 0).nonzero(as_tuple=True)
    weights = adjacency[targets, sources].tolist()
    pairs = zip(targets.tolist(), sources.tolist(), weights, strict=True)
    return {(records[s]["id"], records[t]["id"]): w for t, s, w in pairs}


def test_unpruned_json_has_every_node_and_exactly_the_nonzero_edges(graph):
    data = graph.to_dict("full", prune=False)
    records = graph.nodes()
    assert [n["node_id"] for n in data["nodes"]] == [r["id"] for r in records]
    kinds = [n["feature_type"] for n in data["nodes"]]
    assert kinds.count("cross layer transcoder") == graph.n_features
    assert kinds.count("mlp reconstruction error") == graph.n_layers * graph.n_pos
    links = {(link["source"], link["target"]): link["weight"] for link in data["links"]}
    assert len(links) == len(data["links"]) == int((graph.adjacency != 0).sum())
    assert links == _links_of(records, graph.adjacency)
    assert [n["influence"] for n in data["nodes"]] == pytest.approx(graph.prune().cumulative_scores.tolist())
    meta = data["metadata"]
    assert meta["pruned"] is False and meta["node_threshold"] is None and meta["edge_threshold"] is None
    pruned = graph.to_dict("pruned")
    assert pruned["metadata"]["pruned"] is True and len(pruned["nodes"]) < len(data["nodes"])
    assert len(pruned["links"]) < len(data["links"])


def test_trace_no_prune_writes_the_full_graph(tmp_path, capsys):
    assert main(["trace", "--out", str(tmp_path), "--slug", "full", "--no-prune", "--no-concepts"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "full.html")
    full = Graph.load(tmp_path / "full.graph.safetensors")
    data = json.loads((tmp_path / "full.json").read_text())
    records = full.nodes()
    assert [n["node_id"] for n in data["nodes"]] == [r["id"] for r in records]
    assert {(link["source"], link["target"]): link["weight"] for link in data["links"]} == _links_of(
        records, full.adjacency
    )
    assert len(data["links"]) == int((full.adjacency != 0).sum()) and data["metadata"]["pruned"] is False
    assert "<dt>pruned</dt><dd>no (every node and nonzero edge)</dd>" in (tmp_path / "full.html").read_text()


def test_safetensors_round_trip(graph, tmp_path):
    path = tmp_path / "g.graph.safetensors"
    graph.save(path)
    loaded = Graph.load(path)
    for key, value in graph.__dict__.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, getattr(loaded, key)), key
        else:
            assert value == getattr(loaded, key), key
    assert not any(tmp_path.glob(".*"))  # nothing half-written left behind
    bad = tmp_path / "bad.graph.safetensors"
    bad.write_bytes(b"not a graph")
    with pytest.raises(CircuitsError, match="not a readable graph"):
        Graph.load(bad)


def test_to_networkx(graph):
    result = graph.prune()
    g = graph.to_networkx(result)
    assert g.number_of_nodes() == int(result.node_mask.sum())
    assert g.number_of_edges() == int((result.edge_mask & (graph.adjacency != 0)).sum())
    full = graph.to_networkx()
    assert full.number_of_edges() == int((graph.adjacency != 0).sum())


def test_aggregate_merges_prompts(graph, demo_model, demo_clt, tmp_path):
    other = attribute("The capital of Texas is", demo_model, demo_clt, progress=False)
    merged = aggregate([graph, graph, other])
    nodes = {n["id"]: n for n in merged["nodes"]}
    links = {(link["source"], link["target"]): link for link in merged["links"]}
    # an edge between two features, recomputed by hand: summed over positions, averaged over prompts
    layer, pos, feat = graph.features[-1].tolist()
    row = graph.adjacency[graph.n_features - 1, : graph.n_features]
    s = int(row.abs().argmax())
    src = graph.features[s].tolist()
    pair = (f"{src[0]}_{src[2]}", f"{layer}_{feat}")
    same = [i for i, f in enumerate(graph.features.tolist()) if (f[0], f[2]) == (src[0], src[2])]
    dst = [i for i, f in enumerate(graph.features.tolist()) if (f[0], f[2]) == (layer, feat)]
    expected = [graph.adjacency[dst][:, same].sum().item()] * 2
    key_o = {(l, f): i for i, (l, _, f) in enumerate(other.features.tolist())}
    if (src[0], src[2]) in key_o and (layer, feat) in key_o:
        so = [i for i, f in enumerate(other.features.tolist()) if (f[0], f[2]) == (src[0], src[2])]
        do = [i for i, f in enumerate(other.features.tolist()) if (f[0], f[2]) == (layer, feat)]
        if other.adjacency[do][:, so].abs().sum() > 0:
            expected.append(other.adjacency[do][:, so].sum().item())
    assert links[pair]["prompts"] == len(expected)
    assert links[pair]["weight"] == pytest.approx(sum(expected) / len(expected), rel=1e-4, abs=1e-6)
    assert nodes[pair[1]]["prompts"] >= 2 and nodes["L_Austin"]["prompts"] == 3
    assert aggregate([graph, other], min_prompts=2)["nodes"] == [
        n for n in aggregate([graph, other])["nodes"] if n["prompts"] >= 2
    ]
    paths = []
    for i, g in enumerate((graph, other)):
        paths.append(tmp_path / f"g{i}.graph.safetensors")
        g.save(paths[-1])
    assert main(["aggregate", *map(str, paths), "--out", str(tmp_path / "agg.json")]) == 0
    assert json.loads((tmp_path / "agg.json").read_text())["prompts"] == [FLAGSHIP, "The capital of Texas is"]
