"""The interactive test client behind ``wirestate client`` (docs/operations.md,
"Command line").

`run_client` connects to a hub's ``/ws``, waits for ``welcome``, subscribes, prints every
server message, measures the round trip of the application ping, and at exit prints a summary:
how long the connection lasted, what was received, the ping round trip, and the close code
with its cause. It is one task and owns no other: pings are sent from the same loop that reads,
between reads (cancelling websockets' ``recv()`` is safe: no message is lost), so there is no
pump to supervise and every exception reaches the caller as itself.

Close causes are the shared vocabulary of `wirestate.core.causes.CloseCause`, as the server
reports them, plus one word of the client's own:

- ``client_close``: this client ended the connection itself (``count`` or ``duration``
  reached, cancelled, or the server broke protocol). It is not a server cause and never
  appears in the server's logs or metrics: the server sees such a close as ``peer_close``.
- A close frame from the server carries the cause name as its reason (``1011
  keepalive_timeout``, ``1013 slow_consumer``, ``1001 shutdown``); see `parse_close`.
- No close frame at all (the TCP connection dropped or was reset): code 1006 and cause
  ``read_error``, the server's own word for a read side that failed without a close frame
  (rather than a client-only ``connection_lost``), so one name covers both ends.

Exit status: 0 when the run ended normally (``count`` or ``duration`` reached, or the server
closed with 1000 or 1001); 1 when the connection could not be made or failed (refused,
handshake refused or timed out, no ``welcome``, a protocol violation, any other close code);
2 for bad arguments. Cancellation closes with 1000, prints the summary and re-raises
`asyncio.CancelledError`: the caller picks the exit status (the CLI maps Ctrl-C to one).
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)
from websockets.uri import parse_uri

from wirestate.adapters.client.urls import safe_url
from wirestate.core.causes import CloseCause, CloseCode, ErrorCode
from wirestate.models.wire import (
    ErrorMessage,
    Event,
    Gap,
    Ping,
    Pong,
    ServerMessage,
    Subscribe,
    Subscribed,
    Welcome,
    WireError,
    parse_server_message,
)

__all__ = [
    "CLIENT_CLOSE",
    "CLOSE_TIMEOUT",
    "EXIT_BAD_ARGUMENTS",
    "EXIT_FAILED",
    "EXIT_OK",
    "parse_close",
    "run_client",
]

#: The client's own close cause: it closed the connection itself. Not a `CloseCause`.
CLIENT_CLOSE = "client_close"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ARGUMENTS = 2

#: Seconds the client waits for the server to answer its close frame before dropping TCP.
CLOSE_TIMEOUT = 2.0

#: Unanswered pings remembered for matching a late pong; older ones are forgotten.
_MAX_PENDING_PINGS = 64

_CAUSES = frozenset(cause.value for cause in CloseCause)

#: Codes that name one cause on their own (docs/protocol.md's close codes), for a close frame
#: whose reason is not a cause name (a server other than wirestate, or an empty reason).
_CAUSE_OF_CODE: dict[int, CloseCause] = {
    CloseCode.NORMAL: CloseCause.PEER_CLOSE,
    CloseCode.GOING_AWAY: CloseCause.SHUTDOWN,
    CloseCode.MESSAGE_TOO_BIG: CloseCause.MESSAGE_TOO_BIG,
    CloseCode.TRY_AGAIN_LATER: CloseCause.SLOW_CONSUMER,
}

#: Protocol v1 is JSON text frames only (the server answers a binary frame the same way).
_BINARY = WireError(ErrorCode.INVALID_MESSAGE, "binary frames are not protocol v1")

_End = Literal["count", "duration", "server_close", "no_welcome", "protocol_error", "cancelled"]


def parse_close(code: int | None, reason: str | None) -> tuple[int, str]:
    """The (close code, cause) a close frame from the server stands for.

    `code` None (no close frame) or 1006 gives ``(1006, "read_error")``. A `reason` that is a
    `CloseCause` name is the cause (that is how a wirestate server reports it). Otherwise the
    cause follows from the code where the code means one thing only (1001 ``shutdown``, 1009
    ``message_too_big``, 1013 ``slow_consumer``) and is ``peer_close`` (the server closed, with
    that code) for every other code, 1000 included. Never returns ``client_close``: that is
    decided by who closed first, not by the frame.
    """
    if code is None or code == CloseCode.ABNORMAL:
        return int(CloseCode.ABNORMAL), CloseCause.READ_ERROR.value
    if reason is not None and reason in _CAUSES:
        return code, reason
    return code, _CAUSE_OF_CODE.get(code, CloseCause.PEER_CLOSE).value


def _check_arguments(
    url: str,
    topics: Sequence[str],
    count: int | None,
    duration: float | None,
    ping_every: float,
    open_timeout: float,
) -> str | None:
    """What is wrong with the arguments, as one line, or None."""
    try:
        parse_uri(url)
    except InvalidURI:
        return f"{safe_url(url)!r} is not a WebSocket URL: use ws://HOST:PORT/ws or wss://…"
    if not topics:
        return "no topic given: pass at least one --topic"
    for topic in topics:
        try:
            Subscribe(topics=(topic,))
        except ValidationError:
            return (
                f"bad topic name {topic!r}: topics are 1 to 128 characters "
                "from A-Z a-z 0-9 _ . : / -"
            )
    if count is not None and count < 1:
        return f"--count must be at least 1 (got {count})"
    if duration is not None and not duration > 0:
        return f"--duration must be a positive number of seconds (got {duration})"
    if not ping_every > 0:
        return f"the ping interval must be positive (got {ping_every})"
    if not open_timeout > 0:
        return f"the open timeout must be positive (got {open_timeout})"
    return None


def _connect_failure(url: str, exc: BaseException, open_timeout: float) -> str:
    """One line saying what failed and what to do. Never includes a token."""
    where = f"could not connect to {safe_url(url)}"
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        hints = {
            401: "the server wants a token (Authorization: Bearer … or ?token=…)",
            403: "the server refused this origin or token",
            404: "check the path (the hub serves /ws)",
            426: "the request reached the server without its Upgrade header: a proxy in"
            " between does not pass WebSocket upgrades (docs/troubleshooting.md)",
            503: "the server is at its connection limit or not ready; try again later",
        }
        hint = hints.get(status, "is this a wirestate server?")
        return f"{where}: the server answered the upgrade with HTTP {status} — {hint}"
    if isinstance(exc, InvalidHandshake):
        return (
            f"{where}: the WebSocket handshake failed ({type(exc).__name__}) — "
            "is this a wirestate server's /ws endpoint?"
        )
    if isinstance(exc, TimeoutError):
        return (
            f"{where}: no WebSocket handshake within {open_timeout:g} s — "
            "is the host reachable and is the port a wirestate server?"
        )
    if isinstance(exc, socket.gaierror):
        return f"{where}: the host name does not resolve — check the URL"
    if isinstance(exc, OSError):
        # With several addresses (localhost: ::1 and 127.0.0.1) Python 3.11 raises one
        # OSError without errno whose text lists each attempt's "[Errno 111] …".
        refused = isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED
        if refused or f"[Errno {errno.ECONNREFUSED}]" in str(exc):
            return f"{where}: connection refused — is `wirestate serve` running?"
        reason = exc.strerror or type(exc).__name__
        return f"{where}: {reason} — check the host and port"
    return f"{where}: {type(exc).__name__}"


@dataclass
class _Stats:
    received: int = 0
    events: int = 0
    gaps: int = 0
    errors: int = 0
    control: int = 0  # welcome, subscribed, pong
    invalid: int = 0  # frames that are not protocol v1 server messages
    seq_anomalies: int = 0  # an event whose seq is not the previous one + 1, with no gap
    rtts_ms: list[float] = field(default_factory=list)


@dataclass
class _Closed:
    code: int
    cause: str
    reason: str
    by: Literal["server", "client", "transport"]


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _compact(value: Any) -> str:
    # ASCII-only: safe on any terminal encoding; still the same JSON value.
    return json.dumps(value, separators=(",", ":"))


class _Session:
    """One connection, from an open websocket to its summary. Not reusable."""

    def __init__(
        self,
        ws: ClientConnection,
        url: str,
        topics: tuple[str, ...],
        *,
        count: int | None,
        duration: float | None,
        json_lines: bool,
        out: TextIO,
        err: TextIO,
        ping_every: float,
        open_timeout: float,
    ) -> None:
        self.ws = ws
        self.url = url
        self.topics = topics
        self.count = count
        self.duration = duration
        self.json_lines = json_lines
        self.out = out
        self.err = err
        self.ping_every = ping_every
        self.open_timeout = open_timeout
        self.loop = asyncio.get_running_loop()
        self.opened = self.loop.time()
        self.ended_at: float | None = None
        self.stats = _Stats()
        self.client_id: str | None = None
        self.closed: _Closed | None = None
        self.pending_pings: dict[str, float] = {}
        self.ping_number = 0
        self.last_seq: dict[str, int] = {}

    # --- output ---------------------------------------------------------------------------

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _show(
        self, raw: str | bytes, msg: Welcome | Subscribed | Event | Gap | ErrorMessage
    ) -> None:
        if self.json_lines:
            self._line(_compact(json.loads(raw)))
            return
        match msg:
            case Event():
                stale = ""
                if msg.stale:
                    stale = " (stale)" if msg.age is None else f" (stale, age {msg.age:.1f} s)"
                data = json.dumps(msg.data)
                self._line(f"{msg.topic} #{msg.seq} {msg.ts} {data}{stale}")
            case Gap():
                if msg.from_seq is None:
                    what = "the topic's sequence restarted; earlier events cannot be resumed"
                else:
                    n = msg.to_seq - msg.from_seq + 1 if msg.to_seq is not None else 0
                    what = f"{_n(n, 'event')} #{msg.from_seq}..#{msg.to_seq} will not be delivered"
                self._line(f"!! GAP {msg.topic}: {what} ({msg.reason.value})")
            case ErrorMessage():
                self._line(f"!! ERROR from server: {msg.code.value}: {msg.message}")
            case Welcome():
                self._line(
                    f"connected to {safe_url(self.url)} as client {msg.client_id} "
                    f"(protocol {msg.protocol}; server pings every {msg.ping_interval:g} s, "
                    f"timeout {msg.ping_timeout:g} s)"
                )
            case Subscribed():
                text = f"subscribed to {', '.join(msg.topics)}"
                lost = [topic for topic, ok in msg.recovered.items() if not ok]
                if lost:
                    text += f" (not recovered: {', '.join(lost)})"
                self._line(text)

    def _show_invalid(self, error: WireError) -> None:
        if self.json_lines:
            self._line(
                _compact({"invalid_frame": {"code": error.code.value, "message": error.message}})
            )
        else:
            self._line(f"!! INVALID frame from server: {error.code.value}: {error.message}")

    # --- protocol ---------------------------------------------------------------------------

    async def _recv_until(self, deadline: float) -> str | bytes | None:
        """The next frame, or None at `deadline`. Raises ConnectionClosed."""
        timer = asyncio.timeout_at(deadline)
        try:
            async with timer:
                return await self.ws.recv()
        except TimeoutError:
            if timer.expired():
                return None
            raise

    async def _ping(self) -> None:
        """Send one application ping. Raises ConnectionClosed."""
        self.ping_number += 1
        ping_id = f"rtt-{self.ping_number}"
        while len(self.pending_pings) >= _MAX_PENDING_PINGS:
            del self.pending_pings[next(iter(self.pending_pings))]
        self.pending_pings[ping_id] = self.loop.time()
        await self.ws.send(Ping(id=ping_id).model_dump_json())

    def _note_server_close(self, exc: ConnectionClosed) -> None:
        if exc.rcvd is not None and exc.rcvd_then_sent is not False:
            code, cause = parse_close(exc.rcvd.code, exc.rcvd.reason)
            self.closed = _Closed(code, cause, exc.rcvd.reason, "server")
        elif exc.sent is not None:
            # websockets failed the connection itself (a frame over max_size, a protocol
            # error in the server's frames): the read side is what broke.
            sent = exc.sent
            too_big = sent.code == CloseCode.MESSAGE_TOO_BIG
            cause = CloseCause.MESSAGE_TOO_BIG if too_big else CloseCause.READ_ERROR
            code = exc.rcvd.code if exc.rcvd is not None else int(CloseCode.ABNORMAL)
            self.closed = _Closed(code, cause.value, sent.reason, "client")
        else:
            code, cause = parse_close(None, None)
            self.closed = _Closed(code, cause, "", "transport")

    def _handle(self, raw: str | bytes) -> ServerMessage | WireError:
        """Count, track and print one frame; return what it parsed to."""
        self.stats.received += 1
        msg = parse_server_message(raw) if isinstance(raw, str) else _BINARY
        if isinstance(msg, WireError):
            self.stats.invalid += 1
            self._show_invalid(msg)
            return msg
        match msg:
            case Pong():
                self.stats.control += 1
                sent_at = self.pending_pings.pop(msg.id, None) if msg.id is not None else None
                if sent_at is not None:
                    self.stats.rtts_ms.append((self.loop.time() - sent_at) * 1000.0)
                return msg
            case Event():
                self.stats.events += 1
                last = self.last_seq.get(msg.topic)
                if last is not None and msg.seq != last + 1:
                    self.stats.seq_anomalies += 1
                    if not self.json_lines:
                        self._line(
                            f"!! SEQ {msg.topic}: expected #{last + 1}, got #{msg.seq} "
                            "with no gap announced (protocol violation)"
                        )
                self.last_seq[msg.topic] = msg.seq
            case Gap():
                self.stats.gaps += 1
                if msg.to_seq is None:
                    self.last_seq.pop(msg.topic, None)
                else:
                    self.last_seq[msg.topic] = msg.to_seq
            case ErrorMessage():
                self.stats.errors += 1
            case Welcome() | Subscribed():
                self.stats.control += 1
        self._show(raw, msg)
        return msg

    async def _welcome(self) -> Welcome | WireError | None:
        """The first frame if it is a welcome; the WireError or None (timeout) otherwise."""
        raw = await self._recv_until(self.opened + self.open_timeout)
        if raw is None:
            return None
        msg = self._handle(raw)
        if isinstance(msg, Welcome):
            self.client_id = msg.client_id
            return msg
        if isinstance(msg, WireError):
            return msg
        return WireError(ErrorCode.INVALID_MESSAGE, "the first frame is not a welcome")

    async def converse(self) -> _End:
        """Run until count, duration, a server close or a protocol failure. Raises
        CancelledError when cancelled (the connection is then still open)."""
        deadline = None if self.duration is None else self.opened + self.duration
        timer = asyncio.timeout_at(deadline)
        try:
            async with timer:
                return await self._talk()
        except TimeoutError:
            if timer.expired():
                return "duration"
            raise

    async def _talk(self) -> _End:
        try:
            welcome = await self._welcome()
            if welcome is None:
                self.err.write(
                    f"wirestate client: connected to {safe_url(self.url)} but no welcome "
                    f"within {self.open_timeout:g} s — is this a wirestate server (protocol 1)?\n"
                )
                return "no_welcome"
            if isinstance(welcome, WireError):
                self.err.write(
                    f"wirestate client: {safe_url(self.url)} did not start with a protocol 1 "
                    f"welcome ({welcome.message}) — is this a wirestate server?\n"
                )
                return "protocol_error"
            await self.ws.send(Subscribe(topics=self.topics).model_dump_json())
            next_ping = self.loop.time()
            while True:
                if self.loop.time() >= next_ping:
                    await self._ping()
                    next_ping += self.ping_every
                    if next_ping <= self.loop.time():  # stalled for several intervals
                        next_ping = self.loop.time() + self.ping_every
                raw = await self._recv_until(next_ping)
                if raw is None:
                    continue
                self._handle(raw)
                if self.count is not None and self.stats.events >= self.count:
                    return "count"
        except ConnectionClosed as exc:
            self._note_server_close(exc)
            return "server_close"

    async def close(self, end: _End | None) -> None:
        """Close from this side unless the server already did. Idempotent; bounded by
        CLOSE_TIMEOUT."""
        if self.closed is None:
            # 1002: protocol error (RFC 6455 section 7.4.1), when the server broke protocol 1.
            await self.ws.close(1002 if end == "protocol_error" else CloseCode.NORMAL)
            observed = self.ws.close_code
            self.closed = _Closed(
                observed if observed is not None else int(CloseCode.ABNORMAL),
                CLIENT_CLOSE,
                "",
                "client",
            )
        if self.ended_at is None:
            self.ended_at = self.loop.time()

    # --- summary ----------------------------------------------------------------------------

    def summary(self, end: _End | None) -> dict[str, Any]:
        ended_at = self.ended_at if self.ended_at is not None else self.loop.time()
        rtts = self.stats.rtts_ms
        rtt = (
            {
                "min": round(min(rtts), 3),
                "median": round(statistics.median(rtts), 3),
                "max": round(max(rtts), 3),
                "samples": len(rtts),
            }
            if rtts
            else None
        )
        closed = self.closed
        return {
            "url": safe_url(self.url),
            "client_id": self.client_id,
            "ended": end if end is not None else "crashed",
            "duration": round(ended_at - self.opened, 3),
            "messages": self.stats.received,
            "events": self.stats.events,
            "gaps": self.stats.gaps,
            "errors": self.stats.errors,
            "control": self.stats.control,
            "invalid": self.stats.invalid,
            "seq_anomalies": self.stats.seq_anomalies,
            "ping_rtt_ms": rtt,
            "close_code": closed.code if closed else None,
            "close_cause": closed.cause if closed else None,
            "close_reason": closed.reason if closed else None,
            "closed_by": closed.by if closed else None,
        }

    def write_summary(self, end: _End | None) -> None:
        s = self.summary(end)
        if self.json_lines:
            self._line(_compact({"summary": s}))
            return
        rtt = s["ping_rtt_ms"]
        rtt_text = (
            f"min {rtt['min']:.2f} ms, median {rtt['median']:.2f} ms, max {rtt['max']:.2f} ms "
            f"({rtt['samples']} {'pong' if rtt['samples'] == 1 else 'pongs'})"
            if rtt
            else "n/a (no pong received)"
        )
        ended = {
            "count": f"{self.count} events received",
            "duration": f"--duration {self.duration or 0:g} s reached",
            "server_close": "the server closed the connection",
            "no_welcome": "no welcome from the server",
            "protocol_error": "the server broke protocol 1",
            "cancelled": "interrupted",
            "crashed": "the client failed",
        }[s["ended"]]
        received = (
            f"{s['messages']} received: {_n(s['events'], 'event')}, {_n(s['gaps'], 'gap')}, "
            f"{_n(s['errors'], 'error')} ({s['control']} control, {s['invalid']} invalid)"
        )
        if s["seq_anomalies"]:
            received += f", {s['seq_anomalies']} sequence jumps with no gap"
        if s["close_code"] is None:
            close_text = "n/a"
        else:
            by = {
                "server": "closed by the server",
                "client": "closed by this client",
                "transport": "no close frame: the connection dropped",
            }[s["closed_by"]]
            close_text = f"{s['close_code']} {s['close_cause']} ({by})"
        lines = [
            f"--- {s['url']} summary ({ended}) ---",
            f"duration    {s['duration']:.3f} s",
            f"messages    {received}",
            f"ping rtt    {rtt_text}",
            f"close       {close_text}",
        ]
        for line in lines:
            self._line(line)

    def exit_status(self, end: _End) -> int:
        if end in ("count", "duration"):
            return EXIT_OK
        if (
            end == "server_close"
            and self.closed is not None
            and self.closed.code
            in (
                CloseCode.NORMAL,
                CloseCode.GOING_AWAY,
            )
        ):
            return EXIT_OK
        return EXIT_FAILED


async def run_client(
    url: str,
    topics: Sequence[str],
    *,
    count: int | None = None,
    duration: float | None = None,
    json_lines: bool = False,
    out: TextIO,
    err: TextIO | None = None,
    ping_every: float = 1.0,
    open_timeout: float = 10.0,
) -> int:
    """Connect, subscribe to `topics`, print what arrives on `out`, then a summary; return
    the exit status (module docstring).

    Stops after `count` events, after `duration` seconds from the opening handshake, or when
    the server closes; the client closes with 1000 itself in the first two cases. `open_timeout`
    bounds the opening handshake and, separately, the wait for ``welcome``. Pings every
    `ping_every` seconds, the first one right after subscribing. With `json_lines`, each server
    message (pongs excepted: they feed the round trip) is printed as its JSON object on one
    line, and the summary as ``{"summary": {...}}``.

    One-line failure messages go to `err` (default: ``sys.stderr`` at call time) and never
    include a ``token`` from the URL. Bad arguments return 2 before connecting; a failed
    connection returns 1 with no summary (there was no connection to summarise). Once the
    handshake has succeeded the summary is always printed, also when cancelled: cancellation
    closes with 1000 (cause ``client_close``), prints the summary and re-raises CancelledError.
    A cancellation before the handshake completes just propagates.
    """
    err_stream = sys.stderr if err is None else err
    problem = _check_arguments(url, topics, count, duration, ping_every, open_timeout)
    if problem is not None:
        err_stream.write(f"wirestate client: {problem}\n")
        return EXIT_BAD_ARGUMENTS
    try:
        ws = await connect(
            url,
            compression=None,
            open_timeout=open_timeout,
            # The application ping measures the round trip; the server's protocol pings are
            # answered by websockets regardless. One keep-alive, not two.
            ping_interval=None,
            close_timeout=CLOSE_TIMEOUT,
        )
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        err_stream.write(f"wirestate client: {_connect_failure(url, exc, open_timeout)}\n")
        return EXIT_FAILED
    session = _Session(
        ws,
        url,
        tuple(dict.fromkeys(topics)),
        count=count,
        duration=duration,
        json_lines=json_lines,
        out=out,
        err=err_stream,
        ping_every=ping_every,
        open_timeout=open_timeout,
    )
    end: _End | None = None
    try:
        end = await session.converse()
    except asyncio.CancelledError:
        end = "cancelled"
        raise
    finally:
        # Runs on every exit (cancellation and unexpected errors included): each step is
        # bounded (close waits at most CLOSE_TIMEOUT) and close is idempotent.
        try:
            await session.close(end)
        finally:
            session.write_summary(end)
    return session.exit_status(end)
