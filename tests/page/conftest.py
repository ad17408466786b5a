"""The browser the page tests share: Debian's Chromium through Playwright, network cut off."""

import os

import pytest

from circuits.page.browser import find_chromium, offline_browser


@pytest.fixture(scope="module")
def open_page():
    """A factory opening a page offline at 1600x1000 (`circuits.page.browser.offline_browser`); skips
    without Chromium unless CIRCUITS_REQUIRE_BROWSER is set."""
    if find_chromium() is None:
        if os.environ.get("CIRCUITS_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (CIRCUITS_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("chromium is not installed")
    pytest.importorskip("playwright")
    with offline_browser() as open_:
        yield open_
