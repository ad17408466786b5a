"""The HTML page in a real browser (headless Chromium, network cut off)."""

import os

import pytest

from circuits.export.browser import find_chromium, offline_browser


@pytest.fixture(scope="module")
def open_page():
    if find_chromium() is None:
        if os.environ.get("CIRCUITS_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (CIRCUITS_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("chromium is not installed")
    pytest.importorskip("playwright")
    with offline_browser() as open_:
        yield open_


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
