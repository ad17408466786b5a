"""The HTML page: its Python assembly, then the page itself in a real browser (headless Chromium,
network cut off)."""

import builtins
import io
import json
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest

from circuits.attribution.schema import annotate
from circuits.concepts.figures import residual_labels
from circuits.errors import CircuitsError
from circuits.features import FeatureScanConfig, scan_features
from circuits.page.assemble import PageInfo, feature_cards, render_page, write_page
from circuits.page.graph_view import ViewOptions, build_view
from circuits.page.supernodes import suggest_supernodes

HOSTILE = "<script>alert(1)</script>"
HOSTILE_IMG = "<img src=x onerror=alert(1)>"
N_LAYERS = 4


def make_graph(tokens: list[str], seed: int = 0, per_cell: int = 2, n_features: int = 12, links: int = 160) -> dict:
    """A graph in the circuit-tracer schema with random features, errors, two logits and random
    edges that only go upwards (to a higher row, at the same or a later position)."""
    rng = random.Random(seed)
    P, last = len(tokens), len(tokens) - 1
    nodes = [
        {"node_id": f"E_{10 + p}_{p}", "feature": 10 + p, "layer": "E", "ctx_idx": p, "feature_type": "embedding"}
        for p in range(P)
    ]
    for l in range(N_LAYERS):
        for p in range(P):
            for f in rng.sample(range(n_features), per_cell):
                nodes.append({"node_id": f"{l}_{f}_{p}", "feature": 999, "layer": str(l), "ctx_idx": p,
                              "feature_type": "cross layer transcoder", "activation": rng.uniform(0.5, 3),
                              "influence": rng.uniform(0, 1), "clerp": ""})  # fmt: skip
            nodes.append({"node_id": f"{l}_-1_{p}", "feature": -1, "layer": str(l), "ctx_idx": p,
                          "feature_type": "mlp reconstruction error", "influence": rng.uniform(0, 1)})  # fmt: skip
    for k, (tok, prob) in enumerate((("Austin", 0.7), ("Dallas", 0.2))):
        nodes.append({"node_id": f"{N_LAYERS + 1}_{50 + k}_{last}", "feature": 50 + k, "layer": str(N_LAYERS + 1),
                      "ctx_idx": last, "feature_type": "logit", "token_prob": prob, "is_target_logit": k == 0,
                      "clerp": f'Output "{tok}" (p={prob:.3f})'})  # fmt: skip

    def row(n):
        return 0 if n["layer"] == "E" else int(n["layer"]) + 1

    pairs = [(s, t) for s in nodes for t in nodes if row(t) > row(s) and t["ctx_idx"] >= s["ctx_idx"]]
    chosen = rng.sample(pairs, min(links, len(pairs)))
    edges = [{"source": s["node_id"], "target": t["node_id"], "weight": rng.gauss(0, 1)} for s, t in chosen]
    metadata = {"slug": "test", "prompt": " ".join(tokens[1:]), "prompt_tokens": tokens, "node_threshold": 0.8,
                "edge_threshold": 0.98, "replacement_score": 0.75, "completeness_score": 0.9}  # fmt: skip
    return {"metadata": metadata, "qParams": {"pinnedIds": [], "supernodes": []}, "nodes": nodes, "links": edges}


TOKENS = ["<bos>", "Fact", ":", "Dallas", "is", "in", "the", "state", "whose", "capital", "is"]


def with_inhibited(graph: dict, seed: int = 0) -> dict:
    """`graph` with three suppressed features at the last position (layers 1, 1, 2) in
    `metadata.inhibited_features`, as `schema.to_dict` writes them: feature indices no node of that
    cell has, inhibitors from the graph's features of lower layers plus one feature that is not in
    the graph (no edge for it)."""
    rng = random.Random(seed)
    last = len(graph["metadata"]["prompt_tokens"]) - 1
    ids = {n["node_id"] for n in graph["nodes"]}
    records = []
    for layer in (1, 1, 2):
        free = [f for f in range(12) if f"{layer}_{f}_{last}" not in ids | {r["node_id"] for r in records}]
        below = [n["node_id"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"
                 and int(n["layer"]) < layer and n["ctx_idx"] <= last]  # fmt: skip
        inhibitors = [{"source": s, "weight": -rng.uniform(0.1, 2)} for s in rng.sample(below, 3)]
        inhibitors.append({"source": f"0_99_{last}", "weight": -0.05})  # pruned from the graph
        inhibitors.sort(key=lambda i: i["weight"])
        records.append({"node_id": f"{layer}_{free[0]}_{last}", "pre_activation": -rng.uniform(0.5, 3),
                        "inhibition": sum(i["weight"] for i in inhibitors) - 1, "inhibitors": inhibitors})  # fmt: skip
    graph["metadata"]["inhibited_features"] = records
    return graph


@pytest.fixture(scope="module")
def scan(demo_model, random_clt):
    return scan_features(demo_model, random_clt, FeatureScanConfig(n_documents=16, top_k=3), clt_name="random")


# ---- Python side ------------------------------------------------------------------------------


def test_top_k_edges_are_the_union_of_each_nodes_strongest():
    graph = make_graph(TOKENS, links=400)
    view = build_view(graph, {}, ViewOptions(top_k_edges=3))
    expected = set()
    for end in ("source", "target"):
        for nid in {n["node_id"] for n in graph["nodes"]}:
            mine = [link for link in graph["links"] if link[end] == nid]
            mine.sort(key=lambda link: -abs(link["weight"]))
            expected |= {(link["source"], link["target"]) for link in mine[:3]}
    assert {(e["from"], e["to"]) for e in view.edges} == expected
    assert view.n_links == 400 > len(view.edges)
    assert all(e["color"].startswith("rgba(43,108,176," if e["weight"] >= 0 else "rgba(197,48,48,") for e in view.edges)


def test_layout_puts_tokens_at_the_bottom_logits_on_top_and_each_node_in_its_cell():
    graph = with_inhibited(make_graph(TOKENS, per_cell=5))
    view = build_view(graph, {}, ViewOptions())
    columns, rows = view.geometry["columns"], view.geometry["rows"]
    row_of = {"embedding": lambda n: 0, "logit": lambda n: N_LAYERS + 1}
    for n in view.nodes:
        row = row_of.get(n["kind"], lambda n: n["layer"] + 1)(n)
        left, right = columns[n["pos"]]
        top, bottom = rows[row]
        assert left + n["size"] <= n["x"] <= right - n["size"] and top + n["size"] <= n["y"] <= bottom - n["size"]
    radius = {n["id"]: n["size"] * (math.sqrt(2) if n["shape"] == "square" else 1) for n in view.nodes}
    for i, a in enumerate(view.nodes):  # no two discs overlap, suppressed features (hidden) included
        for b in view.nodes[i + 1 :]:
            assert math.hypot(a["x"] - b["x"], a["y"] - b["y"]) >= radius[a["id"]] + radius[b["id"]]
    logits = sorted((n["y"], n["x"], n["token"]) for n in view.nodes if n["kind"] == "logit")
    assert [t for *_, t in logits] == ["Austin", "Dallas"]  # most probable first
    assert rows[0][0] > rows[1][0] > rows[-1][0]  # embeddings lowest, logits on top (canvas y grows down)


def test_suppressed_features_are_hidden_nodes_in_their_cells_with_edges_from_their_inhibitors(scan):
    graph = with_inhibited(make_graph(TOKENS, per_cell=3))
    records = {r["node_id"]: r for r in graph["metadata"]["inhibited_features"]}
    opts = ViewOptions()
    view = build_view(graph, {}, opts)
    columns, rows = view.geometry["columns"], view.geometry["rows"]
    suppressed = {n["id"]: n for n in view.nodes if n["kind"] == "inhibited"}
    assert set(suppressed) == set(records)
    feature_ys = {n["layer"]: n["y"] for n in view.nodes if n["kind"] == "feature"}
    for nid, n in suppressed.items():
        layer, feature, pos = (int(x) for x in nid.split("_"))
        assert n["hidden"] is True and (n["layer"], n["feature"], n["pos"]) == (layer, feature, pos)
        assert n["pre_activation"] == records[nid]["pre_activation"] and n["inhibition"] == records[nid]["inhibition"]
        assert columns[pos][0] < n["x"] < columns[pos][1]  # its cell
        assert rows[layer + 1][0] < n["y"] < rows[layer + 1][1]  # the row of its layer's features
        assert rows[layer + 1][0] < feature_ys[layer] < rows[layer + 1][1]
        assert n["shapeProperties"]["borderDashes"]  # drawn apart from the active features
    assert len({(n["x"], n["y"]) for n in view.nodes}) == len(view.nodes)  # on top of nothing
    graph_ids = {n["node_id"] for n in graph["nodes"]}
    drawn = {(e["from"], e["to"]): e for e in view.edges if e.get("inhibited")}
    expected = {(i["source"], nid): i["weight"] for nid, r in records.items() for i in r["inhibitors"]}
    assert {k: e["weight"] for k, e in drawn.items()} == {k: w for k, w in expected.items() if k[0] in graph_ids}
    assert len(drawn) == 9 and all(e["weight"] < 0 and e["color"].startswith("rgba(197,48,48,") for e in drawn.values())
    assert len({e["id"] for e in view.edges}) == len(view.edges)
    # the JSON's nodes and the header's counts stay the graph's; cards cover the suppressed features
    assert view.n_links == len(graph["links"]) and len(view.nodes) == len(graph["nodes"]) + 3
    text = render_page(graph, cards=feature_cards(graph, scan))
    data = json.loads(re.search(r'id="circuits-data">(.*?)</script>', text, flags=re.S)[1])
    assert data["graph"]["nodes"] == graph["nodes"]
    assert f"<dt>nodes</dt><dd>{len(graph['nodes'])}</dd>" in text and 'id="show-inhibited"' in text
    for nid in records:
        layer, feature, _ = (int(x) for x in nid.split("_"))
        assert data["cards"][nid] == scan.card(layer, feature)
    assert 'id="show-inhibited"' not in render_page(make_graph(TOKENS))  # no switch without suppressed features
    bad = with_inhibited(make_graph(TOKENS))
    bad["metadata"]["inhibited_features"][0]["node_id"] = next(n["node_id"] for n in bad["nodes"] if n["layer"] == "1")
    with pytest.raises(CircuitsError, match="also a node of the graph"):
        build_view(bad, {}, opts)
    bad["metadata"]["inhibited_features"][0]["node_id"] = "L1#3"
    with pytest.raises(CircuitsError, match="is not '{layer}_{feature}_{pos}'"):
        build_view(bad, {}, opts)


def test_supernode_suggestions_group_features_with_parallel_link_profiles():
    graph = make_graph(TOKENS, seed=3)
    # two features at position 4 whose links are exact multiples of a third feature's links
    a, b, c = "1_0_4", "1_1_4", "2_2_4"
    graph["nodes"] = [n for n in graph["nodes"] if n["node_id"] not in (a, b, c)]
    for nid, layer in ((a, 1), (b, 1), (c, 2)):
        kind = "cross layer transcoder"
        graph["nodes"].append({"node_id": nid, "feature": 0, "layer": str(layer), "ctx_idx": 4, "feature_type": kind})
    graph["links"] = [link for link in graph["links"] if {link["source"], link["target"]}.isdisjoint({a, b, c})]
    graph["links"] += [
        {"source": "E_13_3", "target": a, "weight": 2.0},
        {"source": a, "target": "3_-1_9", "weight": 1.0},
    ]
    graph["links"] += [
        {"source": "E_13_3", "target": b, "weight": 4.0},
        {"source": b, "target": "3_-1_9", "weight": 2.0},
    ]
    graph["links"] += [{"source": "E_14_4", "target": c, "weight": 1.0}]
    groups = suggest_supernodes(graph, threshold=0.95, labels={a: "the a feature"})
    assert ["the a feature", a, b] in groups
    assert all(c not in g for g in groups)
    # every suggested group: one position, pairwise cosine >= threshold (recomputed densely)
    ids = sorted({n["node_id"] for n in graph["nodes"]})
    index = {nid: i for i, nid in enumerate(ids)}
    vec = np.zeros((len(ids), 2 * len(ids)))
    for link in graph["links"]:
        vec[index[link["target"]], index[link["source"]]] = link["weight"]
        vec[index[link["source"]], len(ids) + index[link["target"]]] = link["weight"]
    pos = {n["node_id"]: n["ctx_idx"] for n in graph["nodes"]}
    for _, *members in suggest_supernodes(graph, threshold=0.5):
        assert len({pos[m] for m in members}) == 1
        for i, x in enumerate(members):
            for y in members[i + 1 :]:
                u, v = vec[index[x]], vec[index[y]]
                assert u @ v / (np.linalg.norm(u) * np.linalg.norm(v)) >= 0.5 - 1e-9


def test_page_is_one_file_with_nothing_external_and_everything_escaped(scan):
    graph = _hostile_graph()
    text = render_page(
        graph, cards=feature_cards(graph, scan), figures=_figures(), info=PageInfo(model=HOSTILE, transcoder="demo")
    )
    assert HOSTILE not in text and HOSTILE_IMG not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # the header, escaped as HTML
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in text  # the page data, escaped as JSON
    tags = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", text)
    assert not [t for t in tags if re.search(r"\b(src|href)\s*=", t)]


def test_annotate_and_feature_cards(scan):
    graph = make_graph(TOKENS)
    cards = feature_cards(graph, scan)
    some = next(n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, feature = (int(x) for x in some["node_id"].split("_")[:2])
    assert cards[some["node_id"]] == scan.card(layer, feature)
    out = annotate(graph, {nid: card["label"] for nid, card in cards.items()}, [["group", some["node_id"], "0_-1_1"]])
    node = next(n for n in out["nodes"] if n["node_id"] == some["node_id"])
    assert node["clerp"] == scan.card(layer, feature)["label"] and some["clerp"] == ""
    assert out["qParams"]["supernodes"] == [["group", some["node_id"], "0_-1_1"]]
    assert graph["qParams"]["supernodes"] == [] and out["links"] == graph["links"]  # the input is left as it was
    graph["nodes"].append({**some, "node_id": "1_12_3"})  # feature index 12 of a 12-feature scan
    with pytest.raises(CircuitsError, match="outside the feature scan"):
        feature_cards(graph, scan)


def _hostile_graph() -> dict:
    tokens = ["<bos>", "Fact", HOSTILE, HOSTILE_IMG, "is", "capital", "is"]
    graph = make_graph(tokens, seed=5)
    graph["metadata"]["prompt"] = f"Fact {HOSTILE} {HOSTILE_IMG} is"
    feature = next(n for n in graph["nodes"] if n["node_id"].startswith("2_"))
    feature["clerp"] = f"label {HOSTILE} {HOSTILE_IMG}"
    graph["qParams"]["supernodes"] = [[f"group {HOSTILE_IMG}", feature["node_id"], "2_-1_" + str(feature["ctx_idx"])]]
    return graph


def _figures() -> dict:
    """Chart specs as `circuits.concepts.figures` makes them: a residual-row heatmap and a bar chart."""
    z = [[(r + 1) * (p + 1) / 100 for p in range(len(TOKENS))] for r in range(N_LAYERS + 1)]
    heat = {"type": "heatmap", "title": f"trace {HOSTILE_IMG}", "x": [f"{i} {t}" for i, t in enumerate(TOKENS)],
            "y": residual_labels(N_LAYERS + 1), "grids": [{"title": "", "z": z}], "scale": "viridis", "zmin": 0,
            "zmax": 1, "value": "p"}  # fmt: skip
    bars = {"type": "bars", "title": "paths", "categories": ["a"], "series": [{"name": "s", "values": [1]}], "max": 1}
    return {"trace:Texas": heat, "paths": bars}


# ---- in the browser ---------------------------------------------------------------------------


def _load(open_page, path):
    opened = open_page(path)
    opened.page.wait_for_function("window.circuitsPage && window.circuitsPage.ready && window.circuitsPage.firstDrawn")
    return opened


def _click_node(page, node_id: str) -> None:
    x, y = page.evaluate(
        """(id) => { const p = network.canvasToDOM(network.getPositions([id])[id]);
        const r = document.querySelector('#mynetwork canvas').getBoundingClientRect();
        return [r.left + p.x, r.top + p.y]; }""",
        node_id,
    )
    page.mouse.click(x, y)


@pytest.mark.browser
def test_harness_blocks_network_and_collects_errors(open_page, tmp_path):
    page_file = tmp_path / "probe.html"
    page_file.write_text(
        "<html><body><p id=t>local</p><img src='https://example.com/x.png'>"
        "<script>console.error('boom'); alert('hi')</script></body></html>"
    )
    opened = open_page(page_file)
    assert opened.page.inner_text("#t") == "local"
    assert opened.blocked == ["https://example.com/x.png"]
    assert "boom" in opened.errors
    assert opened.dialogs == ["hi"]


@pytest.mark.browser
def test_page_loads_offline_draws_the_graph_and_opens_a_feature_panel(open_page, scan, tmp_path):
    graph = make_graph(TOKENS)
    path = write_page(
        tmp_path / "page.html", graph, cards=feature_cards(graph, scan), figures=_figures(), info=PageInfo(model="demo")
    )
    opened = _load(open_page, path)
    page = opened.page
    assert opened.errors == [] and opened.blocked == [] and opened.dialogs == []
    assert page.inner_text("#prompt") == graph["metadata"]["prompt"]
    assert page.inner_text("#predictions").split() == ["Austin", "0.700", "Dallas", "0.200"]
    assert page.evaluate("nodes.length") == len(graph["nodes"])
    painted = page.evaluate(
        """() => { const c = document.querySelector('#mynetwork canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
    )
    assert painted > 10_000
    feature = next(n for n in graph["nodes"] if n["node_id"].startswith("3_"))
    layer, index = (int(x) for x in feature["node_id"].split("_")[:2])
    _click_node(page, feature["node_id"])
    details = page.locator("#details")
    assert details.get_attribute("data-node") == feature["node_id"]
    card = scan.card(layer, index)
    assert page.inner_text("#details h2").startswith(f"L{layer} #{index} {card['label']}")
    assert card["contexts"][0]["tokens"][0] in page.inner_text("#details .contexts")
    assert page.locator("#details svg.histogram rect").count() == len(card["histogram"])
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000


@pytest.mark.browser
def test_threshold_slider_hides_weak_edges(open_page, tmp_path):
    graph = make_graph(TOKENS)
    path = write_page(tmp_path / "page.html", graph, options=None)
    page = _load(open_page, path).page
    shown = [e["weight"] for e in build_view(graph, {}, ViewOptions()).edges]
    assert page.evaluate("circuitsPage.visibleEdgeCount()") == len(shown)
    page.locator("#edge-threshold").fill("60")
    magnitudes = sorted(abs(w) for w in shown)
    threshold = magnitudes[math.floor(0.6 * len(magnitudes))]
    expected = sum(abs(w) >= threshold for w in shown)
    assert page.evaluate("circuitsPage.visibleEdgeCount()") == expected < len(shown)
    assert page.inner_text("#edge-count").startswith(f"{expected} of")
    page.locator("#edge-threshold").fill("0")
    assert page.evaluate("circuitsPage.visibleEdgeCount()") == len(shown)


@pytest.mark.browser
def test_suppressed_features_toggle_with_their_edges_and_open_their_details(open_page, scan, tmp_path):
    graph = with_inhibited(make_graph(TOKENS))
    records = {r["node_id"]: r for r in graph["metadata"]["inhibited_features"]}
    path = write_page(tmp_path / "page.html", graph, cards=feature_cards(graph, scan))
    opened = _load(open_page, path)
    page = opened.page
    view = build_view(graph, {}, ViewOptions())
    n_shown = sum(not e.get("inhibited") for e in view.edges)
    n_inhibitor_edges = len(view.edges) - n_shown
    hidden = "(ids) => ids.map((i) => nodes.get(i).hidden)"
    assert all(page.evaluate(hidden, list(records)))
    assert page.evaluate("circuitsPage.visibleEdgeCount()") == n_shown
    assert page.inner_text("#edge-count") == f"{n_shown} of {n_shown} drawn edges"
    target = next(iter(records))
    assert page.evaluate("(q) => circuitsPage.search(q)", target) == []  # hidden: not found
    page.locator("#show-inhibited").check()
    assert not any(page.evaluate(hidden, list(records)))
    assert page.evaluate("circuitsPage.visibleEdgeCount()") == n_shown + n_inhibitor_edges
    shown = page.evaluate("edgesView.get({filter: (e) => e.inhibited}).map((e) => [e.from, e.to, e.weight])")
    assert sorted(map(tuple, shown)) == sorted(
        (e["from"], e["to"], e["weight"]) for e in view.edges if e.get("inhibited")
    )
    assert page.evaluate("(q) => circuitsPage.search(q)", target) == [target]
    page.evaluate("circuitsPage.search('')")
    _click_node(page, target)
    details = page.locator("#details")
    assert details.get_attribute("data-node") == target
    layer, feature, pos = (int(x) for x in target.split("_"))
    card = scan.card(layer, feature)
    assert page.inner_text("#details h2") == f"suppressed L{layer} #{feature} {card['label']}"
    rows = dict(r.split("\t", 1) for r in page.inner_text("#details table.kv").splitlines())
    assert rows["pre-activation"] == f"{records[target]['pre_activation']:.3g}"
    assert rows["inhibition (from the graph's features)"] == f"{records[target]['inhibition']:.3g}"
    assert rows["position"] == f'{pos} "{TOKENS[pos]}"' and rows["feature"] == str(feature)
    assert page.locator("#details svg.histogram rect").count() == len(card["histogram"])
    links = page.locator("#details ul.edges a")
    assert links.count() == len(records[target]["inhibitors"])  # the one outside the graph listed by its id
    strongest = records[target]["inhibitors"][0]["source"]
    assert links.first.get_attribute("title") == strongest
    links.first.click()
    assert details.get_attribute("data-node") == strongest
    assert page.locator(f'#details ul.edges a[title="{target}"]').count() == 1  # what the inhibitor suppresses
    page.locator("#show-inhibited").uncheck()
    assert all(page.evaluate(hidden, list(records)))
    assert page.evaluate("circuitsPage.visibleEdgeCount()") == n_shown
    exported = page.evaluate("circuitsPage.exportGraph()")
    assert len(exported["links"]) == len(graph["links"]) and exported["nodes"] == graph["nodes"]
    assert opened.errors == [] and opened.blocked == [] and opened.dialogs == []


@pytest.mark.browser
def test_hostile_strings_show_as_text_and_run_nothing(open_page, scan, tmp_path):
    graph = _hostile_graph()
    path = write_page(
        tmp_path / "hostile.html",
        graph,
        cards=feature_cards(graph, scan),
        figures=_figures(),
        info=PageInfo(model=HOSTILE),
    )
    opened = _load(open_page, path)
    page = opened.page
    page.locator("#search").fill("alert")
    _click_node(page, "E_12_2")
    feature = next(n for n in graph["nodes"] if HOSTILE in (n.get("clerp") or ""))
    _click_node(page, feature["node_id"])
    page.locator("#suggestions button").first.click()
    page.wait_for_timeout(300)
    assert opened.dialogs == [] and opened.errors == [] and opened.blocked == []
    assert page.inner_text("#prompt") == graph["metadata"]["prompt"]
    assert HOSTILE in page.inner_text("#facts")
    assert f"label {HOSTILE} {HOSTILE_IMG}" in page.inner_text("#details h2")
    assert f"group {HOSTILE_IMG}" in page.inner_text("#supernode-list")
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.inner_text("#figure-0 .chart-title") == f"trace {HOSTILE_IMG}"  # a chart title, as text
    # vis-network, the page data, the drawing, page.js; the concept panel's data, charts.js, concepts.js
    assert page.evaluate("document.querySelectorAll('script').length") == 7


@pytest.mark.browser
def test_supernodes_group_with_summed_edges_export_and_ungroup(open_page, tmp_path):
    graph = make_graph(TOKENS, links=300)
    path = write_page(tmp_path / "page.html", graph, options=None)
    page = _load(open_page, path).page
    members = ["1_" + n["node_id"].split("_", 1)[1] for n in graph["nodes"] if n["node_id"].startswith("1_")][:3]
    page.evaluate("(ids) => network.selectNodes(ids)", members)
    page.locator("#supernode-label").fill("my group")
    page.locator("#group-selected").click()
    group = page.evaluate("nodes.get({filter: (n) => n.kind === 'supernode'})")
    assert len(group) == 1 and group[0]["name"] == "my group" and group[0]["members"] == members
    assert all(page.evaluate("(ids) => ids.map((i) => nodes.get(i).hidden)", members))
    summed = {}
    for link in graph["links"]:
        if link["source"] in members and link["target"] not in members:
            summed[link["target"]] = summed.get(link["target"], 0.0) + link["weight"]
    edges = page.evaluate("(id) => edges.get({filter: (e) => e.supernode && e.from === id})", group[0]["id"])
    assert {e["to"]: pytest.approx(e["weight"]) for e in edges} == {k: pytest.approx(v) for k, v in summed.items()}
    exported = page.evaluate("circuitsPage.exportGraph()")
    assert exported["qParams"]["supernodes"] == [["my group", *members]]
    assert sorted(json.dumps(x, sort_keys=True) for x in exported["links"]) == sorted(
        json.dumps(x, sort_keys=True) for x in graph["links"]
    )
    page.locator("#supernode-list button").click()
    assert page.evaluate("nodes.get({filter: (n) => n.kind === 'supernode'}).length") == 0
    assert not any(page.evaluate("(ids) => ids.map((i) => nodes.get(i).hidden)", members))


@pytest.mark.browser
def test_clicking_a_trace_heatmap_cell_selects_the_graph_nodes_there(open_page, tmp_path):
    graph = make_graph(TOKENS)
    path = write_page(tmp_path / "page.html", graph, figures=_figures())
    page = _load(open_page, path).page
    row, pos = 3, 9  # residual row 3: the stream after block 2, where the features of layer 2 write
    page.locator(f'#figure-0 rect.cell[data-row="{row}"][data-col="{pos}"]').click()
    expected = {n["node_id"] for n in graph["nodes"] if n["layer"] == "2" and n["ctx_idx"] == pos}
    assert set(page.evaluate("network.getSelectedNodes()")) == expected
    assert page.inner_text("#cell-info-0").startswith(
        f'{len(expected)} graph node(s) at after block 2 (layer 2 features), position 9 "capital"'
    )


# ---- `circuits trace` end to end --------------------------------------------------------------


def test_trace_writes_the_json_once_from_memory_and_the_page_from_the_same_dict(
    demo_model, demo_clt, tmp_path, monkeypatch
):
    from circuits import pipeline
    from circuits.attribution import schema
    from circuits.features import features_for

    features = features_for("demo", demo_clt)
    writes, opened, cards_made = [], [], []
    write_json, card = pipeline.write_json, features.card

    def recording(open_):
        def wrapped(file, *args, **kwargs):
            if isinstance(file, str | os.PathLike):  # not a file descriptor
                opened.append(Path(file))
            return open_(file, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(pipeline, "write_json", lambda path, *a: writes.append(Path(path)) or write_json(path, *a))
    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(io, "open", recording(io.open))
    monkeypatch.setattr(features, "card", lambda *lf: cards_made.append(lf) or card(*lf))
    options = pipeline.TraceOptions(out=tmp_path, slug="dallas", inhibited=3, concept_traces=False)
    result = pipeline.trace("Fact: Dallas is in the state whose capital is", demo_model, demo_clt, options, features)
    monkeypatch.undo()
    assert writes == [tmp_path / "dallas.json"]  # written once
    assert not [p for p in opened if p.parent == tmp_path]  # and nothing read back from the output directory
    assert len(cards_made) == len(result.cards) > 0  # one card made per feature node and suppressed feature
    written = json.loads(result.json_path.read_text(encoding="utf-8"))
    assert written == result.data
    # the schema's JSON of the returned graph, plus the cards' labels and the suggested supernodes
    fresh = schema.to_dict(result.graph, "dallas", "demo")
    labels = {nid: c["label"] for nid, c in result.cards.items()}
    assert written == schema.annotate(fresh, labels, suggest_supernodes(fresh, 0.8, labels))
    feature_nodes = [n for n in written["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert written["qParams"]["supernodes"] and feature_nodes and all(n["clerp"] for n in feature_nodes)
    assert set(tmp_path.iterdir()) == {result.json_path, result.graph_path, result.page_path}
    text = result.page_path.read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="circuits-data">(.*?)</script>', text, flags=re.S)[1])
    assert data["graph"]["nodes"] == written["nodes"] and data["cards"] == result.cards
    assert data["suggestions"] == written["qParams"]["supernodes"]


@pytest.mark.slow
def test_trace_command_writes_the_page_next_to_the_json_and_prints_its_path_last(demo_clt, tmp_path, capsys):
    from circuits.cli import main
    from circuits.transcoders.circuit_tracer import save_transcoder

    save_transcoder(demo_clt, tmp_path / "clt")
    clt, out = str(tmp_path / "clt"), tmp_path / "out"
    assert main(["features", "--clt", clt, "--documents", "24", "--top-k", "3"]) == 0
    assert main(["trace", "--transcoder", clt, "--out", str(out), "--validate", "--path", "Dallas,Texas,Austin"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    page = out / "fact-dallas-is-in-the-state-whose-capital-is.html"
    assert lines[-3:] == [str(page.with_suffix(x)) for x in (".json", ".graph.safetensors", ".html")]  # every file
    graph = json.loads(page.with_suffix(".json").read_text())
    features = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features and all(n["clerp"] for n in features)  # labels from the feature scan
    ids = {n["node_id"] for n in graph["nodes"]}
    assert all(isinstance(label, str) and set(members) <= ids for label, *members in graph["qParams"]["supernodes"])
    text = page.read_text(encoding="utf-8")
    assert "validation r (attention frozen)" in text and "trace:Texas" in text
    suppressed = graph["metadata"]["inhibited_features"]  # 5 by default, listed in the header
    assert len(suppressed) == 5 and all(r["inhibition"] < 0 and r["node_id"] in text for r in suppressed)
    assert main(["trace", "--transcoder", clt, "--out", str(out), "--features", str(tmp_path / "none")]) == 2
    assert "no feature scan" in capsys.readouterr().err


@pytest.mark.browser
def test_committed_gallery_pages_load_offline_without_errors(open_page):
    # the pages the index lists: a user's own trace written into graphs/ is no gallery page
    gallery = Path(__file__).parents[2] / "graphs"
    index = (gallery / "index.html").read_text(encoding="utf-8")
    pages = [gallery / name for name in dict.fromkeys(re.findall(r'href="([^"/]+\.html)"', index))]
    assert len(pages) >= 6
    for page in pages:
        opened = _load(open_page, page)
        graph = json.loads(page.with_suffix(".json").read_text())
        assert opened.errors == [] and opened.blocked == [] and opened.dialogs == []
        graph_nodes = "nodes.get({filter: (n) => n.kind !== 'inhibited'}).length"  # suppressed: no graph nodes
        assert opened.page.evaluate(graph_nodes) == len(graph["nodes"])
        opened.page.context.close()
