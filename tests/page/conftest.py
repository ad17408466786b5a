import os

import pytest

from circuits.page.browser import find_chromium, offline_browser


@pytest.fixture(scope="module")
def open_page():
    """Opens a page file in headless Chromium with the network cut off (`OfflinePage`)."""
    if find_chromium() is None:
        if os.environ.get("CIRCUITS_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (CIRCUITS_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("chromium is not installed")
    pytest.importorskip("playwright")
    with offline_browser() as open_:
        yield open_
