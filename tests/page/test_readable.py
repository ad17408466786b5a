"""The graph is readable in a real browser (headless Chromium, network cut off), on every page of the
committed gallery and on a dense synthetic graph: no two node discs overlap, no two drawn labels
overlap, tokens are written at >= 11 px, a click on the top logit highlights its strongest path down
to a token embedding (checked against an independent dynamic programme over the graph JSON), search
highlights and lists every match and centres them without losing the axes, and the header's counts
are what is drawn."""

import json
import math
import re
from pathlib import Path

import pytest

from circuits.page.assemble import write_page
from tests.page.test_page import TOKENS, _click_node, _load, make_graph, with_inhibited

GALLERY = Path(__file__).parents[2] / "graphs"


def _gallery_pages() -> list[Path]:
    index = (GALLERY / "index.html").read_text(encoding="utf-8")
    return [GALLERY / name for name in re.findall(r'href="([^"/]+\.html)"', index)]


def discs_overlap(page) -> list:
    """Pairs of drawn nodes whose discs (squares counted by their circumscribed circle) touch."""
    discs = page.evaluate(
        """() => { const pos = network.getPositions();
        return nodes.get({filter: (n) => !n.hidden}).map((n) => [n.id, pos[n.id].x, pos[n.id].y,
          n.shape === 'square' ? n.size * Math.SQRT2 : n.size]); }"""
    )
    return [
        (a[0], b[0])
        for i, a in enumerate(discs)
        for b in discs[i + 1 :]
        if math.hypot(a[1] - b[1], a[2] - b[2]) < a[3] + b[3]
    ]


def labels_overlap(labels: list[dict]) -> list:
    def hit(a, b):
        return (
            a["x"] < b["x"] + b["w"]
            and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"]
            and b["y"] < a["y"] + a["h"]
        )

    return [(a["text"], b["text"]) for i, a in enumerate(labels) for b in labels[i + 1 :] if hit(a, b)]


def drawn_labels(page) -> list[dict]:
    """The labels drawn on the canvas, each with its text's width measured afresh in its font."""
    return page.evaluate(
        """() => { const ctx = document.createElement('canvas').getContext('2d');
        return circuitsPage.drawnLabels().map((b) => { ctx.font = b.font;
          return {...b, measured: ctx.measureText(b.text).width, px: parseFloat(b.font)}; }); }"""
    )


def best_path_score(graph: dict, start: str) -> float:
    """The largest product of |w| / (sum of |w| into the target) along a path from `start` down to a
    token embedding, by a dynamic programme over the graph JSON's links."""
    into: dict[str, list] = {}
    for link in graph["links"]:
        into.setdefault(link["target"], []).append(link)
    kind = {n["node_id"]: n["feature_type"] for n in graph["nodes"]}
    memo: dict[str, float] = {}

    def best(node: str) -> float:
        if kind[node] == "embedding":
            return 1.0
        if node not in memo:
            links = into.get(node, [])
            total = sum(abs(link["weight"]) for link in links)
            memo[node] = max((abs(link["weight"]) / total * best(link["source"]) for link in links), default=0.0)
        return memo[node]

    return best(start)


def next_frames(page) -> None:
    """Wait until the page has drawn the frames it asked for (redraws wait for the next frame)."""
    page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")


def check_readable(page, graph: dict, query: str) -> None:
    assert discs_overlap(page) == []
    labels = drawn_labels(page)
    assert labels_overlap(labels) == []
    assert all(b["w"] >= b["measured"] for b in labels)  # boxes hold their text
    tokens = [b for b in labels if b["kind"] == "token"]
    n_tokens = len(graph["metadata"]["prompt_tokens"])
    assert len(tokens) == n_tokens and all(b["px"] >= 11 for b in tokens)
    assert {b["text"] for b in labels if b["kind"] == "axis"} >= {"embeddings", "layer 0", "logits"}

    # header counts = what is drawn
    facts = dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", page.inner_html("#facts")))
    assert int(facts["nodes"]) == page.evaluate("nodes.get({filter: (n) => !n.hidden}).length") == len(graph["nodes"])
    drawn, total = re.fullmatch(r"(\d+) drawn of (\d+)", facts["edges"]).groups()
    assert int(drawn) == page.evaluate("circuitsPage.visibleEdgeCount()") and int(total) == len(graph["links"])
    assert page.inner_text("#edge-count").startswith(f"{drawn} of {drawn} drawn edges")

    # a click on the most probable logit: its strongest paths, the first one best, down to a token
    logits = [n for n in graph["nodes"] if n["feature_type"] == "logit"]
    top = max(logits, key=lambda n: n.get("token_prob") or 0.0)["node_id"]
    _click_node(page, top)
    next_frames(page)
    focus = page.evaluate("circuitsPage.focus()")
    assert focus["kind"] == "path" and focus["root"] == top and focus["paths"]
    kinds = {n["node_id"]: n["feature_type"] for n in graph["nodes"]}
    weights = {(link["source"], link["target"]): link["weight"] for link in graph["links"]}
    for path in focus["paths"]:
        assert path["ids"][0] == top and kinds[path["ids"][-1]] == "embedding"
        steps = list(zip(path["ids"][1:], path["ids"][:-1], strict=True))  # (source, target), top down
        assert [weights[s] for s in steps] == pytest.approx(path["weights"])
    assert focus["paths"][0]["score"] == pytest.approx(best_path_score(graph, top), rel=1e-6)
    assert page.locator("#details ol.paths li").count() == len(focus["paths"])
    assert labels_overlap(drawn_labels(page)) == []

    # search: every match highlighted and listed, all inside the view, axes still drawn
    page.locator("#search").fill(query)
    page.locator("#search").press("Enter")
    next_frames(page)
    expected = {n["node_id"] for n in graph["nodes"] if _matches(n, graph, query)}
    hits = set(page.evaluate("circuitsPage.focus().ids"))
    assert hits == expected and expected
    assert page.locator("#search-results li").count() == len(expected)
    assert page.inner_text("#search-count") == f"{len(expected)} found"
    inside = page.evaluate(
        """(ids) => { const c = document.querySelector('#mynetwork canvas');
        return ids.map((id) => { const p = network.canvasToDOM(network.getPositions([id])[id]);
          return p.x > 86 && p.x < c.clientWidth && p.y > 0 && p.y < c.clientHeight - 42; }); }""",
        sorted(expected),
    )
    assert all(inside)
    assert _ringed(page, sorted(expected)) == [True] * len(expected)
    after = drawn_labels(page)
    positions = {int(n["ctx_idx"]) for n in graph["nodes"] if n["node_id"] in expected}
    assert {b["id"] for b in after if b["kind"] == "token"} >= {f"token:{p}" for p in positions}  # the axes stay
    assert {b["text"] for b in after if b["kind"] == "axis"} and labels_overlap(after) == []


def _matches(node: dict, graph: dict, query: str) -> bool:
    """What the search box matches: id, label, token of its position, logit token, L{layer}#{feature}."""
    q = query.lower()
    tokens = graph["metadata"]["prompt_tokens"]
    names = [node["node_id"], node.get("clerp") or "", tokens[int(node["ctx_idx"])]]
    if node["feature_type"] == "cross layer transcoder":
        names.append(f"L{node['layer']}#{node['node_id'].split('_')[1]}")
    return any(q in str(s).lower() for s in names)


def _ringed(page, ids: list[str]) -> list[bool]:
    """Whether each node has the search highlight's amber ring drawn around it on the canvas."""
    return page.evaluate(
        """(ids) => { const c = document.querySelector('#mynetwork canvas');
        const ctx = c.getContext('2d'); const ratio = c.width / c.clientWidth; const s = network.getScale();
        return ids.map((id) => { const n = nodes.get(id); const p = network.canvasToDOM(network.getPositions([id])[id]);
          const r = Math.max(n.size * s * 1.6, 6) + 1.5;
          for (let k = 0; k < 16; k++) { const a = (k / 16) * 2 * Math.PI;
            const x = Math.round((p.x + r * Math.cos(a)) * ratio), y = Math.round((p.y + r * Math.sin(a)) * ratio);
            const d = ctx.getImageData(x, y, 1, 1).data;
            if (d[0] > 200 && d[1] > 120 && d[1] < 190 && d[2] < 80) return true; }
          return false; }); }""",
        ids,
    )


@pytest.mark.browser
def test_every_gallery_page_is_readable(open_page):
    pages = _gallery_pages()
    assert len(pages) >= 6
    for path in pages:
        opened = _load(open_page, path)
        graph = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        top = max((n for n in graph["nodes"] if n["feature_type"] == "logit"), key=lambda n: n.get("token_prob") or 0)
        query = re.fullmatch(r'Output "(.*)" \(p=.*\)', top["clerp"])[1].split(" ")[0]
        check_readable(opened.page, graph, query)
        assert opened.errors == [] and opened.blocked == [] and opened.dialogs == []
        opened.page.context.close()


@pytest.mark.browser
def test_a_dense_graph_is_readable_and_its_columns_grow_with_their_nodes(open_page, tmp_path):
    graph = with_inhibited(make_graph(TOKENS, per_cell=2, links=300))
    crowd = [{"node_id": f"1_{100 + k}_5", "feature": 0, "layer": "1", "ctx_idx": 5, "influence": 0.5 + k / 100,
              "feature_type": "cross layer transcoder", "activation": 1.0, "clerp": f"crowd feature {k}"}
             for k in range(30)]  # fmt: skip
    graph["nodes"] += crowd
    graph["links"] += [{"source": n["node_id"], "target": "3_-1_9", "weight": 0.1} for n in crowd]
    path = write_page(tmp_path / "dense.html", graph)
    opened = _load(open_page, path)
    check_readable(opened.page, graph, "crowd")
    columns = opened.page.evaluate("JSON.parse(document.getElementById('circuits-data').textContent).geometry.columns")
    widths = [b - a for a, b in columns]
    assert widths[5] > 2 * max(w for i, w in enumerate(widths) if i != 5)  # 30 more nodes, a wider column
    opened.page.locator("#show-inhibited").check()
    assert discs_overlap(opened.page) == []  # suppressed features have their own slots
    assert opened.errors == [] and opened.blocked == []


@pytest.mark.browser
def test_pinned_paths_make_a_subgraph_with_supernodes_as_labelled_boxes(open_page, tmp_path):
    graph = make_graph(TOKENS, links=300)
    page = _load(open_page, write_page(tmp_path / "page.html", graph)).page
    logit = next(n["node_id"] for n in graph["nodes"] if n["feature_type"] == "logit" and n["is_target_logit"])
    _click_node(page, logit)
    page.locator("#details button.pin-paths").click()
    pinned = set(page.evaluate("circuitsPage.focus().ids"))
    assert page.inner_text("#subgraph-toggle") == f"subgraph ({len(pinned)})"
    page.locator("#subgraph-toggle").click()
    boxes = page.evaluate("[...document.querySelectorAll('#subgraph g.unit')].map((g) => g.dataset.id)")
    assert set(boxes) == pinned
    features = sorted(i for i in pinned if "_-1_" not in i and not i.startswith(("E_", "5_")))[:2]
    if len(features) < 2:
        features = sorted(i for i in pinned if not i.startswith(("E_", "5_")))[:2]
    group = page.evaluate("(ids) => circuitsPage.group('my concept', ids)", features)
    units = page.evaluate(
        """[...document.querySelectorAll('#subgraph g.unit')].map((g) =>
        [g.dataset.id, g.classList.contains('supernode'), g.querySelector('text').textContent])"""
    )
    assert {u[0] for u in units} == (pinned - set(features)) | {group}
    assert [u for u in units if u[1]] == [[group, True, "my concept (2)"]]
    # the box's edges are the summed links between the boxes
    lines = page.locator("#subgraph line").count()
    unit_of = {m: group for m in features}
    pairs = {(unit_of.get(link["source"], link["source"]), unit_of.get(link["target"], link["target"]))
             for link in graph["links"]}  # fmt: skip
    shown = {u[0] for u in units}
    assert lines == len({(a, b) for a, b in pairs if a != b and a in shown and b in shown})
    assert page.evaluate("circuitsPage.exportGraph().qParams.pinnedIds").sort() == sorted(pinned).sort()
