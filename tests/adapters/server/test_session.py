"""A session over a transport of the test's own: the Transport contract, registration's
shutdown re-check, and shutdown ending with a handler that would never end by itself."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from wirestate.adapters.server import WirestateServer
from wirestate.adapters.server.session import Ended, Session
from wirestate.core.causes import CloseCause
from wirestate.testing.net import WAIT, server_settings, until


class FakeTransport:
    """A transport the test drives: messages in through ``inbox``, frames out to ``sent``;
    ``stuck`` makes receive ignore everything, as a connection whose peer vanished without
    a FIN would, and abort unable to end it (as on ASGI)."""

    keeps_alive = True
    limits_size = False

    def __init__(self, *, stuck: bool = False, claims_abort: bool = False) -> None:
        self.inbox: asyncio.Queue[str | bytes | Ended] = asyncio.Queue()
        self.sent: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.stuck = stuck
        self.aborted = False
        self.claims_abort = claims_abort  # abort says it ended receive, and it did not

    def peer(self) -> tuple[str, int] | None:
        return ("127.0.0.1", 1)

    async def receive(self) -> str | bytes:
        if self.stuck:
            await asyncio.Event().wait()
        item = await self.inbox.get()
        if isinstance(item, Ended):
            raise item
        return item

    def ready(self) -> bool:
        return False

    def write(self, frames: list[bytes]) -> None:  # pragma: no cover - ready() is False
        raise AssertionError

    def writable(self) -> bool:
        return True

    def buffered(self) -> int:
        return 0

    async def drain(self) -> None:
        return None

    async def send(self, frames: list[bytes]) -> None:
        if self.closed is not None:
            raise Ended()
        self.sent.extend(frames)

    async def ping(self) -> Awaitable[object]:  # pragma: no cover - keeps_alive
        raise AssertionError

    def ping_now(self, answered: Callable[[], None]) -> bool:  # pragma: no cover - keeps_alive
        raise AssertionError

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.inbox.put_nowait(Ended(CloseCause.PEER_CLOSE, code))

    def abort(self) -> bool:
        self.aborted = True
        return self.claims_abort


async def test_a_session_decided_before_shutdown_is_told_1001_and_never_registered() -> None:
    server = WirestateServer(server_settings())
    await server.start_core()
    try:
        assert server.hub is not None
        server.admission.closing = True  # stop() began after the upgrade was decided
        transport = FakeTransport()
        await asyncio.wait_for(Session(server, transport, "c1", "127.0.0.1", None).run(), WAIT)
        assert transport.closed == (1001, "shutdown")
        assert server.hub.clients == {}
        assert server.sessions == {}
        assert server.admission.connections == 0
        assert transport.sent == []  # not even a welcome
    finally:
        server.admission.closing = False
        await server.stop()


async def test_a_session_runs_over_any_transport() -> None:
    server = WirestateServer(server_settings())
    await server.start_core()
    try:
        transport = FakeTransport()
        task = asyncio.create_task(Session(server, transport, "c1", "127.0.0.1", None).run())
        await until(lambda: len(transport.sent) >= 1)
        assert b'"type":"welcome"' in transport.sent[0]
        transport.inbox.put_nowait('{"type":"ping","id":"x"}')
        await until(lambda: any(b'"type":"pong"' in f for f in transport.sent))
        transport.inbox.put_nowait(Ended(CloseCause.PEER_CLOSE, 1000))
        await asyncio.wait_for(task, WAIT)
        assert server.sessions == {}
        assert server.hub is not None
        assert server.hub.stats.disconnects["peer_close"] == 1
    finally:
        await server.stop()


async def test_stop_ends_even_when_a_session_never_would() -> None:
    close_timeout = 0.2
    server = WirestateServer(server_settings(close_timeout=close_timeout))
    await server.start_core()
    transport = FakeTransport(stuck=True)
    task: asyncio.Task[Any] = asyncio.create_task(
        Session(server, transport, "c1", "127.0.0.1", None).run()
    )
    await until(lambda: "c1" in server.sessions)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(server.stop(), close_timeout + 3)
    assert loop.time() - began < close_timeout + 2
    assert task.done()
    assert transport.aborted  # the core's Abort reached the transport
    assert server.sessions == {}


async def test_stop_cancels_a_handler_that_outlives_the_close_timeout() -> None:
    close_timeout = 0.2
    server = WirestateServer(server_settings(close_timeout=close_timeout))
    await server.start_core()
    transport = FakeTransport(stuck=True, claims_abort=True)
    task: asyncio.Task[Any] = asyncio.create_task(
        Session(server, transport, "c1", "127.0.0.1", None).run()
    )
    await until(lambda: "c1" in server.sessions)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(server.stop(), close_timeout + 4)
    assert loop.time() - began < close_timeout + 2
    assert task.cancelled()  # the reader never ended: stop() cancelled the handler
    assert server.sessions == {}  # and its release still ran
