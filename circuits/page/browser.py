"""Open a page from disk in headless Chromium with the network cut off, for tests and benchmarks.

Uses Debian's `chromium` (or the executable in $CHROMIUM) through Playwright for Python; it never
downloads a browser. Every request that is not for a file: or data: URL is aborted and recorded,
and console errors and uncaught exceptions are collected, so a caller can assert that a page is
self-contained and runs cleanly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from circuits.errors import CircuitsError

_LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")


def find_chromium() -> str | None:
    """Path of a Chromium executable: $CHROMIUM, else `chromium` or `chromium-browser` on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class OfflinePage:
    """A Playwright page plus what it tried to do: blocked requests, console errors, dialogs."""

    page: object
    blocked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


@contextlib.contextmanager
def offline_browser(width: int = 1600, height: int = 1000) -> Iterator:
    """A started headless Chromium (Playwright Browser) and a factory opening pages offline."""
    executable = find_chromium()
    if executable is None:
        raise CircuitsError("no chromium found: install it (apt-get install chromium) or set $CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield lambda path: _open(browser, Path(path), width, height)
        finally:
            browser.close()


def _open(browser, path: Path, width: int, height: int) -> OfflinePage:
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    result = OfflinePage(page)

    def route(r):
        if r.request.url.startswith(_LOCAL_SCHEMES):
            r.continue_()
        else:
            result.blocked.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page.on("console", lambda m: result.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: result.errors.append(f"uncaught: {e}"))

    def dialog(d):
        result.dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", dialog)
    page.goto(path.resolve().as_uri(), wait_until="load", timeout=120_000)  # a 9 MB page on a busy machine
    return result
