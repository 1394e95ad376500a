"""The ``browser`` fixture of the browser tests: headless Chromium (Debian's ``chromium``,
driven by Playwright's Python package with ``executable_path``: no browser is downloaded).

Without Chromium or Playwright the tests that use it skip, except under CI (``CI`` set),
where they fail: ``.ci/run`` installs both. ``WIRESTATE_CHROMIUM`` names another Chromium
binary."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest

try:
    from playwright.async_api import Browser, async_playwright
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None


def _chromium() -> str | None:
    named = os.environ.get("WIRESTATE_CHROMIUM")
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _missing() -> str | None:
    if async_playwright is None:
        return "Playwright's Python package is not installed (pip install playwright)"
    if _chromium() is None:
        return "Chromium is not installed (apt-get install chromium, or set WIRESTATE_CHROMIUM)"
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    missing = _missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI must provide it (.ci/run installs it)")
        pytest.skip(missing)
    assert async_playwright is not None
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=_chromium(), headless=True)
        try:
            yield launched
        finally:
            await launched.close()
