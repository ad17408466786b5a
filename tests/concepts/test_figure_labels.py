"""Token labels of the concept figures as a reader sees them in the browser: quotes as quotes (plotly
shows &quot; literally), and markup in a token shown as text, never rendered."""

from __future__ import annotations

import os

import plotly.graph_objects as go
import pytest

from circuits.concepts.figures import token_labels
from circuits.page.browser import find_chromium, offline_browser
from circuits.page.panels import plotly_js

TOKENS = ["<bos>", 'say "hi"', "it's", "<b>bold</b>", "a&b"]


def test_token_labels_show_quotes_and_markup_as_typed(tmp_path):
    if find_chromium() is None:
        if os.environ.get("CIRCUITS_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (CIRCUITS_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("chromium is not installed")
    fig = go.Figure(go.Heatmap(z=[[1, 2, 3, 4, 5]], x=token_labels(TOKENS), y=["L0"]))
    fig.update_layout(width=700, height=260)
    page = tmp_path / "labels.html"
    page.write_text(
        f"<html><head><meta charset='utf-8'><script>{plotly_js()}</script></head><body><div id='f'></div>"
        f"<script>Plotly.newPlot('f', {fig.to_json()})</script></body></html>",
        encoding="utf-8",
    )
    with offline_browser(800, 320) as open_page:
        opened = open_page(page)
        opened.page.wait_for_selector(".xtick text")
        shown = opened.page.eval_on_selector_all(".xtick text", "ts => ts.map(t => t.textContent)")
        bold = opened.page.eval_on_selector_all(".xtick text *", "ts => ts.map(t => t.tagName)")
    assert shown == [f"{i} {t}" for i, t in enumerate(TOKENS)], shown
    assert bold == []  # "<b>bold</b>" is text, not a bold tspan
    assert opened.errors == [] and opened.blocked == []
