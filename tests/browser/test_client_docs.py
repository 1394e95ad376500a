"""The complete page of docs/client-js.md, as written, in Chromium against a real hub: it
goes live, shows published events in order, and a restart of the hub as a gap."""

from __future__ import annotations

import contextlib
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx

from wirestate.adapters.server.service import WirestateServer
from wirestate.testing.net import free_port, server_settings

with contextlib.suppress(ImportError):  # without it the `browser` fixture skips first
    from playwright.async_api import Browser, expect

DOC = Path(__file__).resolve().parents[2] / "docs" / "client-js.md"
WAIT_MS = 10_000


def the_page(port: int) -> str:
    (html,) = re.findall(r"^```html\n(.*?)^```$", DOC.read_text(encoding="utf-8"), re.M | re.S)
    assert html.count("127.0.0.1:12080") == 2  # the module and the socket, nothing else
    return html.replace("127.0.0.1:12080", f"127.0.0.1:{port}")


async def test_the_documented_page_works_next_to_a_running_hub(
    browser: Browser,
    page_server: Callable[[str], contextlib.AbstractAsyncContextManager[str]],
) -> None:
    port = free_port()
    toml = re.search(r"^```toml\n(.*?)^```$", DOC.read_text(encoding="utf-8"), re.M | re.S)
    assert toml is not None
    async with page_server(the_page(port)) as origin, contextlib.AsyncExitStack() as stack:
        # The documented configuration, for the origin the page is served from here.
        auth = tomllib.loads(toml[1].replace("http://127.0.0.1:8000", origin))["auth"]
        settings = server_settings({"auth": auth}, port=port, ping_interval=0.1, ping_timeout=1.0)
        first = await stack.enter_async_context(WirestateServer(settings, epoch="first"))
        page = await browser.new_page()
        stack.push_async_callback(page.close)
        await page.goto(origin + "/")
        await expect(page.locator("#state")).to_have_text("open", timeout=WAIT_MS)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for i in (1, 2):
                body = {"topic": "orders", "data": {"id": i}}
                assert (await http.post("/publish", json=body)).json() == {"seq": i}
        events = page.locator("#events li.event")
        await expect(events).to_have_text(['#1 {"id":1}', '#2 {"id":2}'], timeout=WAIT_MS)

        # The hub restarts on the same port: the page says so, then goes on.
        await first.stop()
        await expect(page.locator("#state")).to_have_text("reconnecting", timeout=WAIT_MS)
        second = await stack.enter_async_context(WirestateServer(settings, epoch="second"))
        await expect(page.locator("#state")).to_have_text("open", timeout=WAIT_MS)
        await second.publish("orders", {"id": 3})
        await expect(page.locator("#events li.gap")).to_have_text(
            ["the hub restarted (epoch_changed): older events are gone"], timeout=WAIT_MS
        )
        await expect(events.last).to_have_text('#1 {"id":3}', timeout=WAIT_MS)
