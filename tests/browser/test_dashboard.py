"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright's Python package with ``executable_path``: no browser is downloaded) against a
real server on loopback, with millisecond keep-alive set through settings.

Without Chromium or Playwright these tests skip, except under CI (``CI`` set), where they
fail (the ``browser`` fixture, tests/browser/conftest.py). A screenshot of the page is saved
to ``test-artifacts/dashboard.png``."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
from websockets.asyncio.client import connect

from wirestate.adapters.server.service import WirestateServer
from wirestate.core.breaker import BreakerConfig
from wirestate.models.settings import Settings
from wirestate.testing.net import recv, server_settings

# Without Playwright the `browser` fixture skips (or fails, under CI) before these are used.
with contextlib.suppress(ImportError):
    from playwright.async_api import Browser, ConsoleMessage, Page, expect

WAIT_MS = 10_000  # the bound on every wait in the page: a failure, never a hang
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SECRET = "browser-" + "k" * 40


class Upstream:
    """A source's fetch that fails on command."""

    def __init__(self) -> None:
        self.failing = False

    async def __call__(self) -> Any:
        if self.failing:
            raise ConnectionError("upstream down")
        return {"widgets": 42}


def settings(**sections: Any) -> Settings:
    """Pings every 100 ms, a pong due within 2 s, loop stalls at the default threshold."""
    return server_settings(sections, ping_interval=0.1, ping_timeout=2.0, loop_stall_threshold=0.5)


class Console:
    """Everything the page reports as an error: console errors and uncaught exceptions."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console.error: {message.text}")


async def test_the_dashboard_shows_a_client_come_and_go_and_a_breaker_open(
    browser: Browser,
) -> None:
    upstream = Upstream()
    server = WirestateServer(settings(), epoch="browser")
    server.add_source(
        "inventory",
        upstream,
        interval=0.05,
        timeout=1.0,
        breaker=BreakerConfig(failure_threshold=1, reset_timeout=60.0),
    )
    async with server:
        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        console = Console(page)
        await page.goto(f"http://127.0.0.1:{server.port}/")
        await expect(page.locator("#link")).to_have_text("live", timeout=WAIT_MS)
        await expect(page.locator("#clients tr.mine")).to_have_count(1, timeout=WAIT_MS)
        await expect(page.locator('[data-breaker="inventory"]')).to_have_attribute(
            "data-state", "closed", timeout=WAIT_MS
        )

        # Another client connects: its id appears in the list.
        ws = await connect(server.url, ping_interval=None)
        welcome = await recv(ws)
        client_id = welcome["client_id"]
        await ws.send(orjson.dumps({"type": "subscribe", "topics": ["orders"]}).decode())
        row = page.locator(f'#clients tr[data-client-id="{client_id}"]')
        await expect(row).to_have_count(1, timeout=WAIT_MS)
        await expect(row).to_contain_text("orders", timeout=WAIT_MS)  # from the snapshot
        await server.publish("orders", {"id": 7})
        await expect(page.locator('#events tr[data-topic="orders"]')).to_have_count(
            1, timeout=WAIT_MS
        )

        # It closes normally: gone from the list, its disconnect shown as peer_close.
        await ws.close(1000)
        await expect(row).to_have_count(0, timeout=WAIT_MS)
        gone = page.locator(f'#disconnects li[data-client-id="{client_id}"]')
        await expect(gone).to_have_attribute("data-cause", "peer_close", timeout=WAIT_MS)
        await expect(gone).to_contain_text("peer_close")
        await expect(gone).to_contain_text("code 1000")
        await expect(page.locator('#disconnect-totals [data-cause="peer_close"] b')).to_have_text(
            "1", timeout=WAIT_MS
        )

        # The upstream fails: its breaker opens, highlighted in its diagram.
        upstream.failing = True
        card = page.locator('[data-breaker="inventory"]')
        await expect(card).to_have_attribute("data-state", "open", timeout=WAIT_MS)
        current = card.locator(".diagram .node.current")
        await expect(current).to_have_count(1)
        await expect(current).to_have_attribute("data-state", "open")
        await expect(card.locator(".badge")).to_have_text("open")
        await expect(
            page.locator('[data-breaker="system_status"] .node.current')
        ).to_have_attribute("data-state", "closed")

        # The next snapshot agrees with the live events (a tidy screenshot).
        await expect(card.locator(".breaker-detail")).to_contain_text(
            "1 consecutive failure ", timeout=WAIT_MS
        )
        await expect(page.locator("#conn-total")).to_have_text("1", timeout=WAIT_MS)
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        assert console.errors == []
        await page.close()


def token(**claims: Any) -> str:
    body = {"sub": "ops", "exp": time.time() + 60, "subscribe": ["*"], "publish": []}
    body.update(claims)
    return jwt.encode(body, SECRET, algorithm="HS256")


async def test_with_auth_the_page_asks_for_a_token_then_goes_live(browser: Browser) -> None:
    server = WirestateServer(settings(auth={"secret": SECRET}), epoch="auth")
    async with server:
        page = await browser.new_page()
        console = Console(page)
        await page.goto(f"http://127.0.0.1:{server.port}/")
        await expect(page.locator("#auth")).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator("#link")).to_have_text("token required")
        await page.locator("#token").fill(token())
        await page.locator("#auth-form button[type=submit]").click()
        await expect(page.locator("#auth")).to_be_hidden(timeout=WAIT_MS)
        await expect(page.locator("#link")).to_have_text("live", timeout=WAIT_MS)
        await expect(page.locator("#clients tr.mine")).to_have_count(1, timeout=WAIT_MS)
        # Kept for this tab only: sessionStorage, never localStorage.
        stored = await page.evaluate("sessionStorage.getItem('wirestate.dashboard.token')")
        assert stored.startswith("eyJ")
        assert await page.evaluate("localStorage.length") == 0
        # The only error is the browser's own report of the first, tokenless 401.
        assert all("401" in error for error in console.errors), console.errors
        await page.close()
