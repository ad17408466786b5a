"""The concept panel of the flagship page, in headless Chromium (network cut off): the page's size,
its tabs, charts that fit their panel, and cells that select graph nodes or say why there are none."""

import re

import pytest

from circuits.demo.facts import CATEGORIES
from circuits.page.panels import attention_routes, panel_data

FLAGSHIP = "Fact: Dallas is in the state whose capital is"
MAX_PAGE_BYTES = 2 * 2**20


@pytest.fixture(scope="module")
def flagship(demo_model, demo_clt, tmp_path_factory):
    """The flagship page as `circuits trace` writes it (with the path Dallas -> Texas -> Austin)."""
    from circuits.features import features_for
    from circuits.pipeline import TraceOptions, trace

    options = TraceOptions(
        out=tmp_path_factory.mktemp("flagship"), slug="dallas", paths=[["Dallas", "Texas", "Austin"]],
        categories=CATEGORIES,
    )  # fmt: skip
    return trace(FLAGSHIP, demo_model, demo_clt, options, features_for("demo", demo_clt))


@pytest.fixture(scope="module")
def opened(flagship, open_page):
    page = open_page(flagship.page_path)
    page.page.wait_for_function("window.circuitsPage && window.circuitsPage.ready && window.circuitsConcepts")
    return page


def test_the_panel_data_links_rows_in_the_graphs_numbering(flagship):
    data = flagship.data
    panel = panel_data({"trace:T": {"y": ["embed", "a", "b", "c", "d"]}, "patching:head": {"y": ["block 0 head 0",
                        "block 0 head 1", "block 3 head 0"]}, "paths": {}}, data, 4)  # fmt: skip
    assert [f["link"] for f in panel["figures"]] == ["residual", "layer", None]
    assert panel["figures"][1]["rows"] == [0, 0, 3]
    assert [t["label"] for t in panel["tabs"]] == ["T", "patching", "path"]
    for key, ids in panel["cells"]["layer"].items():  # features and errors of that layer at that position
        layer, pos = (int(x) for x in key.split(","))
        nodes = [n for n in data["nodes"] if n["node_id"] in ids]
        assert all(int(n["layer"]) == layer and n["ctx_idx"] == pos for n in nodes) and len(nodes) == len(ids)
    # routes: for each position, the other position its edges reach most, by summed |weight|
    position = {n["node_id"]: n["ctx_idx"] for n in data["nodes"]}
    for source_pos, route in attention_routes(data).items():
        sums = {}
        for link in data["links"]:
            s, t = position[link["source"]], position[link["target"]]
            if s == int(source_pos) and t != s:
                sums[t] = sums.get(t, 0.0) + abs(link["weight"])
        assert route["to"] == max(sums, key=sums.get)
        assert route["weight"] == pytest.approx(sums[route["to"]], abs=1e-6)


@pytest.mark.browser
def test_the_flagship_page_is_small_and_offline(flagship, opened):
    assert flagship.page_path.stat().st_size <= MAX_PAGE_BYTES
    assert opened.blocked == [] and opened.errors == [] and opened.dialogs == []
    text = flagship.page_path.read_text(encoding="utf-8")
    assert not [
        t for t in re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", text) if re.search(r"\b(src|href)\s*=", t)
    ]


@pytest.mark.browser
def test_tabs_start_with_the_intermediate_concept_and_every_chart_fits_its_panel(opened):
    page = opened.page
    tabs = page.evaluate("[...document.querySelectorAll('.concept-tab')].map((b) => b.textContent)")
    assert tabs[:3] == ["Texas", "Austin", "Dallas"]  # the intermediate, the answer, then the prompt's word
    assert tabs[3:] == ["path", "patching", "trajectories"]
    for t in range(len(tabs)):
        problems = page.evaluate(
            """(t) => { circuitsConcepts.showTab(t);
            const panel = document.getElementById('concepts').getBoundingClientRect();
            const bad = [];
            const inside = (r) => r.left >= panel.left - 0.5 && r.right <= panel.right + 0.5;
            const apart = (a, b) => a.bottom <= b.top + 0.5 || b.bottom <= a.top + 0.5 || a.right <= b.left + 0.5
              || b.right <= a.left + 0.5;
            const page = document.getElementById(`concept-page-${t}`);
            for (const chart of page.querySelectorAll('.chart')) {
              const parts = [...chart.children].filter((c) => c.getBoundingClientRect().height > 0);
              if (parts.length < 2) bad.push(`empty chart ${chart.id}`);
              parts.forEach((p, i) => {
                if (!inside(p.getBoundingClientRect())) bad.push(`${chart.id}: ${p.className} outside the panel`);
                parts.slice(i + 1).forEach((q) => {
                  if (!apart(p.getBoundingClientRect(), q.getBoundingClientRect()))
                    bad.push(`${chart.id}: ${p.className} overlaps ${q.className}`);
                });
              });
              for (const text of chart.querySelectorAll('svg text')) {
                const r = text.getBoundingClientRect();
                if (r.width && !inside(r)) bad.push(`${chart.id}: "${text.textContent}" cut at the panel's edge`);
              }
              const title = chart.querySelector('.chart-title');
              if (title.scrollWidth > title.clientWidth + 1) bad.push(`${chart.id}: title cut`);
            }
            return bad; }""",
            t,
        )
        assert problems == [], tabs[t]
    page.evaluate("circuitsConcepts.showTab(0)")


@pytest.mark.browser
def test_a_trace_cell_selects_its_graph_nodes_or_says_why_there_are_none(flagship, opened):
    page, data = opened.page, flagship.data
    names = [
        f["name"] for f in page.evaluate("JSON.parse(document.getElementById('concepts-data').textContent)")["figures"]
    ]
    texas = names.index("trace:Texas")
    page.evaluate("circuitsConcepts.showTab(0)")
    tokens = data["metadata"]["prompt_tokens"]
    # the last row at the last position: the stream after block 3, the features of layer 3 and the logits
    last = len(tokens) - 1
    expected = {n["node_id"] for n in data["nodes"] if n["ctx_idx"] == last and n["layer"] in ("3", "5")}
    page.locator(f'#figure-{texas} rect.cell[data-row="4"][data-col="{last}"]').click()
    assert set(page.evaluate("network.getSelectedNodes()")) == expected
    assert page.inner_text(f"#cell-info-{texas}") == (
        f'{len(expected)} graph node(s) at after block 3 (layer 3 features and the logits), position {last} "is": '
        "selected in the graph"
    )
    # Texas peaks at (after block 1, position 5 "in"): no node of layer 1 there; the reason from the graph
    peak = flagship.report.trace("Texas").peak()
    assert peak == (2, 5)
    page.locator(f'#figure-{texas} rect.cell[data-row="2"][data-col="5"]').click()
    assert page.evaluate("network.getSelectedNodes()") == []
    assert not [n for n in data["nodes"] if n["layer"] == "1" and n["ctx_idx"] == 5]
    message = page.inner_text(f"#cell-info-{texas}")
    assert message.startswith('no graph node at layer 1, position 5 "in": no feature or error node of layer 1 there')
    routes = attention_routes(data)
    if "5" in routes:
        to = routes["5"]["to"]
        assert f'The graph routes position 5 through attention to position {to} "{tokens[to]}"' in message
    else:
        features = [n["ctx_idx"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
        focus = max(set(features), key=lambda p: (features.count(p), p))
        kept = [n["layer"] for n in data["nodes"] if n["ctx_idx"] == 5]
        if kept == ["E"]:
            assert "Position 5 keeps only its token embedding, and none of its edges passed pruning" in message
        count = f"({features.count(focus)} of its {len(features)} features are there)"
        assert message.endswith(f'the graph does its work at position {focus} "{tokens[focus]}" {count}.')


@pytest.mark.browser
def test_the_standalone_concepts_page_draws_every_chart_offline(flagship, open_page, tmp_path):
    from circuits.concepts.page import write_concepts_page
    from circuits.concepts.report import figures

    concepts = open_page(write_concepts_page(flagship.report, tmp_path))
    assert concepts.errors == [] and concepts.blocked == [] and concepts.dialogs == []
    drawn = concepts.page.evaluate("document.querySelectorAll('.fig svg.chart-svg').length")
    assert drawn == len(figures(flagship.report))
