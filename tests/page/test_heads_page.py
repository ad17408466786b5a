"""`circuits trace --heads` on the demo flagship: head loadings in every link of the JSON, the story
they tell (layer-0 heads 0 and 2 carry Dallas to the last position, as per-head patching says), and
the page's attention view in headless Chromium (edge -> loadings -> attention row -> QK terms, and
the head filter)."""

import json
import re

import pytest

from circuits.features import features_for
from circuits.pipeline import TraceOptions, trace
from tests.page.test_page import _load

FLAGSHIP = "Fact: Dallas is in the state whose capital is"


@pytest.fixture(scope="module")
def traced(demo_model, demo_clt, tmp_path_factory):
    options = TraceOptions(out=tmp_path_factory.mktemp("heads"), slug="dallas", concept_traces=False, heads=True)
    return trace(FLAGSHIP, demo_model, demo_clt, options, features_for("demo", demo_clt))


def test_trace_with_heads_writes_each_links_loadings_and_the_attention_view(traced, demo_model):
    written = json.loads(traced.json_path.read_text(encoding="utf-8"))
    assert written == traced.data and written["links"]
    for link in written["links"]:
        for parts in link["heads"].values():
            assert sum(parts.values()) == pytest.approx(link["weight"], rel=1e-4, abs=1e-5)
    # Dallas (position 3) reaches the last position through layer-0 heads 0 and 2
    dallas = [link for link in written["links"] if link["source"] == "E_57_3" and link["target"].endswith("_10")]
    total = sum(link["weight"] for link in dallas)
    by_head = [sum(link["heads"]["0"][str(h)] for link in dallas) for h in range(4)]
    assert by_head[0] + by_head[2] >= 0.95 * total and min(by_head[0], by_head[2]) >= 0.3 * total
    attention = traced.attention
    assert {"0.0", "0.2"} <= set(list(attention["heads"])[:3])  # with 0.3, which carries "capital"
    head = attention["heads"]["0.0"]
    assert head["pattern"][10][3] > 0.8  # "is" looks at "Dallas"
    _, cache = demo_model.run_with_cache(FLAGSHIP)
    qk = head["qk"]["10"]["3"]
    assert qk["score"] == pytest.approx(cache["blocks.0.attn.hook_attn_scores"][0, 0, 10, 3].item(), abs=1e-4)
    assert ["E_262_10", "E_57_3"] in [t[:2] for t in qk["terms"]]  # "is" x "Dallas" among the top terms
    page = traced.page_path.read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="circuits-attention">(.*?)</script>', page, flags=re.S)[1])
    assert data["links"] == {f"{link['source']}|{link['target']}": link["heads"] for link in written["links"]}


@pytest.mark.browser
def test_the_attention_view_opens_from_an_edge_and_filters_by_head(open_page, traced, tmp_path):  # noqa: F811
    opened = _load(open_page, traced.page_path)
    page = opened.page
    x, y, target = page.evaluate(
        """() => { const e = edges.get({filter: (e) => e.from === 'E_57_3' && e.to.endsWith('_10')})[0];
        const pos = network.getPositions([e.from, e.to]);
        const a = network.canvasToDOM(pos[e.from]), b = network.canvasToDOM(pos[e.to]);
        const r = document.querySelector('#mynetwork canvas').getBoundingClientRect();
        return [r.left + (a.x + b.x) / 2, r.top + (a.y + b.y) / 2, e.to]; }"""
    )
    page.mouse.click(x, y)
    view = page.locator("#attention-view")
    assert view.get_attribute("data-edge") == f"E_57_3|{target}"
    assert page.locator("#attention-view ul.att-bars li").count() == 5  # layer 0: 4 heads and "other"
    page.click("#attention-view a.att-name:has-text('H0')")
    assert page.locator("#attention-row").get_attribute("data-head") == "0.0"
    assert page.locator("#attention-row ul.att-bars li").count() == 11  # every key up to the query
    page.click("#attention-row a.att-name:has-text('Dallas')")
    terms = page.inner_text("#qk-terms")
    assert 'why "is"@10 looks at "Dallas"@3' in terms and 'token "is"@10 × token "Dallas"@3' in terms
    shown = page.evaluate("window.edgesView.length")
    page.select_option("#head-filter", "0.2")
    kept = page.evaluate(
        """() => { const links = JSON.parse(document.getElementById('circuits-attention').textContent).links;
        return window.edgesView.get().map((e) => Math.abs(links[e.from + '|' + e.to]['0']['2'] / e.weight)); }"""
    )
    assert 0 < len(kept) < shown and min(kept) >= 0.25
    page.select_option("#head-filter", "")
    assert page.evaluate("window.edgesView.length") == shown
    page.screenshot(path=str(tmp_path / "attention.png"))
    assert opened.errors == [] and opened.blocked == [] and opened.dialogs == []
