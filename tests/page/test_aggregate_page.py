"""`circuits aggregate`'s page: the features that recur across the pruned graphs of demo prompts, their
frequencies counted again from the graph JSON files `circuits trace` wrote, and the page in Chromium."""

import contextlib
import io
import json
import re

import pytest

from circuits.aggregate import recurring_features, render_aggregate_page
from circuits.attribution.graph import Graph
from circuits.cli import main
from circuits.features import load_features
from circuits.page.recurrence import column
from circuits.pipeline import TraceOptions, trace

CITIES = ("Dallas", "Houston", "Chicago", "Peoria")  # two prompts answer Austin, two Springfield


@pytest.fixture(scope="module")
def traced(demo_model, demo_clt, tmp_path_factory):
    """The trace outputs of the demo prompts, and `circuits aggregate` run on their graphs."""
    out = tmp_path_factory.mktemp("aggregate")
    scan = load_features("demo", demo_clt)
    for city in CITIES:
        options = TraceOptions(out=out / "traces", slug=city.lower(), concept_traces=False)
        trace(f"Fact: {city} is in the state whose capital is", demo_model, demo_clt, options, scan)
    graphs = [out / "traces" / f"{city.lower()}.graph.safetensors" for city in CITIES]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["aggregate", *map(str, graphs), "--out", str(out / "agg.json")]) == 0
    (out / "printed.txt").write_text(printed.getvalue())
    return out


def _page_data(path) -> dict:
    text = path.read_text(encoding="utf-8")
    return json.loads(re.search(r'id="circuits-recurrence">(.*?)</script>', text, flags=re.S)[1])


def test_frequencies_match_a_count_over_the_graph_json_files(traced):
    kept = []  # per prompt: the (layer, feature) pairs and feature links its graph JSON keeps
    for city in CITIES:
        data = json.loads((traced / "traces" / f"{city.lower()}.json").read_text())
        features = {n["node_id"]: tuple(map(int, n["node_id"].split("_")[:2])) for n in data["nodes"]
                    if n["feature_type"] == "cross layer transcoder"}  # fmt: skip
        links = {(features[k["source"]], features[k["target"]]) for k in data["links"]
                 if k["source"] in features and k["target"] in features}  # fmt: skip
        kept.append((set(features.values()), links))
    counts = {f: sum(f in fs for fs, _ in kept) for f in set().union(*(fs for fs, _ in kept))}
    page = _page_data(traced / "agg.html")
    shown = {}
    for node_id, node in page["nodes"].items():
        layer, feature, col = map(int, node_id.split("_"))
        if layer <= 3:  # features (logits sit on layer n_layers + 1 = 5)
            shown[(layer, feature)] = node
            assert col == len(node["prompts"]) - 1  # one column per count for a few prompts
    assert set(shown) == set(counts)
    for f, node in shown.items():
        assert node["frequency"] == pytest.approx(counts[f] / len(CITIES))
        assert node["prompts"] == [i for i, (fs, _) in enumerate(kept) if f in fs]
    assert max(counts.values()) == len(CITIES) > min(counts.values())  # features of every prompt, and of some
    assert page["prompts"] == [f"Fact: {c} is in the state whose capital is" for c in CITIES]
    assert [a.strip() for a in page["answers"]] == ["Austin", "Austin", "Springfield", "Springfield"]
    graphs = [Graph.load(traced / "traces" / f"{c.lower()}.graph.safetensors") for c in CITIES]
    recurrence = recurring_features(graphs)
    feature_links = [link for link in recurrence["links"] if not link["target"].startswith("L_")]
    assert feature_links
    for link in feature_links:
        pair = tuple(tuple(map(int, link[end].split("_"))) for end in ("source", "target"))
        assert link["prompts"] == [i for i, (_, ls) in enumerate(kept) if pair in ls]
    printed = (traced / "printed.txt").read_text().splitlines()
    assert printed[-2:] == [str(traced / "agg.json"), str(traced / "agg.html")]  # every file written


def test_frequency_columns_bin_many_prompts():
    assert [column(k / 5, 5) for k in range(1, 6)] == [0, 1, 2, 3, 4]
    assert [column(f, 40) for f in (1 / 40, 0.1, 0.11, 0.5, 1.0)] == [0, 0, 1, 4, 9]


def _load(open_page, path):
    opened = open_page(path)
    opened.page.wait_for_function("window.circuitsPage && window.circuitsPage.ready && window.circuitsPage.firstDrawn")
    return opened


@pytest.mark.browser
def test_the_page_draws_nodes_apart_and_a_click_shows_frequency_and_prompts(traced, open_page):
    opened = _load(open_page, traced / "agg.html")
    page = opened.page
    assert opened.errors == [] and opened.blocked == []
    boxes = page.evaluate("""() => nodes.getIds().map((id) => network.getBoundingBox(id))""")
    assert len(boxes) == len(_page_data(traced / "agg.html")["nodes"])
    for i, a in enumerate(boxes):  # no two drawn nodes overlap (bounding boxes, in canvas units)
        for b in boxes[i + 1 :]:
            assert (
                a["right"] <= b["left"] or b["right"] <= a["left"] or a["bottom"] <= b["top"] or b["bottom"] <= a["top"]
            )
    data = _page_data(traced / "agg.html")
    node_id, node = max(((k, v) for k, v in data["nodes"].items() if int(k.split("_")[0]) <= 3),
                        key=lambda kv: (len(kv[1]["prompts"]), kv[0]))  # fmt: skip
    x, y = page.evaluate(
        """(id) => { const p = network.canvasToDOM(network.getPositions([id])[id]);
        const r = document.querySelector('#mynetwork canvas').getBoundingClientRect();
        return [r.left + p.x, r.top + p.y]; }""",
        node_id,
    )
    page.mouse.click(x, y)
    page.wait_for_selector("#details section.recurrence")
    k, n = len(node["prompts"]), len(CITIES)
    assert page.inner_text("#details .frequency") == f"kept by {k} of {n} prompts (frequency {round(100 * k / n)}%)"
    listed = page.eval_on_selector_all("#details ol.prompts li a", "(as) => as.map((a) => a.textContent)")
    assert listed == [data["prompts"][p] for p in node["prompts"]]
    page.click("#recurrence-prompts li:nth-child(3) a")  # a prompt highlights the nodes it keeps
    focus = page.evaluate("window.circuitsPage.focus()")
    assert sorted(focus["ids"]) == sorted(i for i, v in data["nodes"].items() if 2 in v["prompts"])


@pytest.mark.browser
def test_prompts_are_escaped(traced, open_page, tmp_path):
    graphs = [Graph.load(traced / "traces" / f"{c.lower()}.graph.safetensors") for c in CITIES[:2]]
    recurrence = recurring_features(graphs)
    evil = '</script><img src=x onerror="document.title=1">'
    recurrence["prompts"][0] += evil
    recurrence["answers"][0] = evil
    path = tmp_path / "evil.html"
    path.write_text(render_aggregate_page(recurrence), encoding="utf-8")
    assert "<img" not in path.read_text(encoding="utf-8")
    opened = _load(open_page, path)
    assert opened.errors == [] and opened.page.title() != "1"
    assert evil in opened.page.inner_text("#recurrence-prompts")
