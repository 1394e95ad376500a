"""The ``browser`` fixture of the browser tests: headless Chromium (Debian's ``chromium``,
driven by Playwright's Python package with ``executable_path``: no browser is downloaded).

Without Chromium or Playwright the tests that use it skip, except under CI (``CI`` set),
where they fail: ``.ci/run`` installs both. ``WIRESTATE_CHROMIUM`` names another Chromium
binary."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable

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


@contextlib.asynccontextmanager
async def serve_page(body: str) -> AsyncIterator[str]:
    """A loopback HTTP server answering every request with the page ``body``, as a user's
    own web server would; yields its origin."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            data = body.encode()
            head = (
                "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n"
                f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
            )
            writer.write(head.encode() + data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def page_server() -> Callable[[str], contextlib.AbstractAsyncContextManager[str]]:
    """`serve_page`: ``async with page_server(html) as origin`` serves a page from its own
    loopback origin, as a user's web server would."""
    return serve_page
