"""wirestate.js in Chromium against a hub with ``[auth]``: a refused token ends the client
after one attempt (the browser hides the upgrade's 401; the client's plain ``GET /ws`` sees
it, across origins), and with ``getToken`` a fresh token is asked for and let in."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import jwt

from wirestate.adapters.server.service import WirestateServer
from wirestate.testing.net import server_settings

with contextlib.suppress(ImportError):  # without it the `browser` fixture skips first
    from playwright.async_api import Browser, Page

SECRET = "refusals-" + "k" * 40
WAIT_MS = 10_000

PAGE = """<!doctype html>
<meta charset="utf-8">
<script type="module">
import { connect } from "%(hub)s/static/wirestate.js";
const states = [], errors = [], asked = [];
const tokens = %(tokens)s;
const options = { backoff: { base: 0.02, cap: 0.1 } };
if (tokens.length === 1) options.token = tokens[0];
else options.getToken = async () => {
  asked.push(tokens[0]);
  return tokens.length > 1 ? tokens.shift() : tokens[0];
};
const client = connect(%(ws)s, options);
client.on("state", (s) => states.push(s));
client.on("error", (e) => errors.push(e.code));
Object.assign(window, { client, states, errors, asked });
</script>
"""


def token(**claims: Any) -> str:
    body = {"sub": "page", "exp": time.time() + 60, "subscribe": ["*"], "publish": []}
    body.update(claims)
    return jwt.encode(body, SECRET, algorithm="HS256")


async def load(
    browser: Browser,
    page_server: Callable[[str], contextlib.AbstractAsyncContextManager[str]],
    server: WirestateServer,
    tokens: list[str],
    stack: contextlib.AsyncExitStack,
) -> Page:
    hub = f"http://127.0.0.1:{server.port}"
    body = PAGE % {"hub": hub, "ws": json.dumps(server.url), "tokens": json.dumps(tokens)}
    origin = await stack.enter_async_context(page_server(body))
    page = await browser.new_page()
    await page.goto(origin + "/")
    return page


async def test_a_refused_static_token_ends_the_client_after_one_attempt(
    browser: Browser,
    page_server: Callable[[str], contextlib.AbstractAsyncContextManager[str]],
) -> None:
    server = WirestateServer(server_settings({"auth": {"secret": SECRET}}), epoch="refusals")
    async with server, contextlib.AsyncExitStack() as stack:
        page = await load(browser, page_server, server, ["not.a.jwt"], stack)
        await page.wait_for_function("states.includes('closed')", timeout=WAIT_MS)
        assert await page.evaluate("errors") == ["unauthorized"]
        assert await page.evaluate("states") == ["closed"]  # from connecting, no retry
        # closed ends every timer: that one refused upgrade is all the hub will ever see
        assert server.metrics.rejections["auth"] == 1
        await page.close()


async def test_with_get_token_a_refused_token_is_replaced_and_let_in(
    browser: Browser,
    page_server: Callable[[str], contextlib.AbstractAsyncContextManager[str]],
) -> None:
    server = WirestateServer(server_settings({"auth": {"secret": SECRET}}), epoch="refusals")
    async with server, contextlib.AsyncExitStack() as stack:
        expired = token(exp=time.time() - 5)
        page = await load(browser, page_server, server, [expired, token()], stack)
        await page.wait_for_function("states.includes('open')", timeout=WAIT_MS)
        assert await page.evaluate("errors") == []
        assert await page.evaluate("asked.length") == 2  # once per attempt
        assert server.metrics.rejections["auth"] == 1
        await page.evaluate("client.close()")
        await page.close()
