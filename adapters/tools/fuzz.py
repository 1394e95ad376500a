"""``wirestate fuzz URL``: a stateful wire fuzzer for a live server, over real sockets.

A Hypothesis ``RuleBasedStateMachine`` (`WireFuzzer`) opens several clients on the given
``ws://`` URL and interleaves connects, subscribes and unsubscribes (valid and invalid
topics), publishes (odd data too: numbers past 64 bits or infinite, nesting past the
limit, lone surrogate escapes), application pings, malformed JSON, unknown types, schema
errors, oversized frames, binary frames (a text frame of invalid UTF-8 cannot be sent with the
websockets client), abrupt disconnects and slow readers. Every frame that comes back is
checked against protocol v1's promises (docs/protocol.md):

* ``welcome`` is the first frame, and comes once;
* every application ``ping`` gets a ``pong`` with the same id while the connection is
  open, and no ``pong`` answers a ping that was never sent;
* per topic, ``event`` seqs are consecutive, or a ``gap`` covering the hole comes first;
  no event on a topic the client never subscribed to;
* ``subscribed`` says where each topic stands (``seq``): never below a seq some client had
  already received when the subscribe was sent, and for a new subscription the events that
  follow start right after it (the retained latest event, at exactly that seq, aside);
* subscribing again to a topic the connection holds replays nothing, and its ``seq`` is the
  last one the connection received: no connection gets one topic's seq twice while it
  holds the topic (an ``unsubscribe`` ends that: a new subscription starts afresh);
* no event on a topic after its ``unsubscribe`` was processed: the protocol has no
  unsubscribe ack, so each unsubscribe is followed by a ping, and an event of that topic
  arriving after its pong (and before a new subscribe was sent) is a violation;
* every ``error`` has a known code; every frame is a JSON object with a known type (strict
  JSON: no NaN or Infinity);
* odd data comes back exactly as published, or is refused: an event never carries a
  value the server should have refused;
* every close has a code (1000/1001/1008/1009/1011/1013) and, when the server started
  it, a reason that is one of the protocol's close causes; a connection is never dropped
  without a close frame unless the client aborted it or had stopped reading;
* the server is alive at the end of each test case (a fresh connection gets ``welcome``).

Hypothesis has no async rules (as of 6.x): each test case owns a private event
loop, and every rule runs its I/O with ``loop.run_until_complete`` under a timeout, so no
step hangs. A failure is shrunk to a short script of rule calls, which `run_fuzz` prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, TextIO, TypeVar
from urllib.parse import urlsplit

from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.reporting import with_reporter
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from wirestate.adapters.server.admission import loopback
from wirestate.core.causes import CloseCause, ErrorCode

__all__ = [
    "CLOSE_CODES",
    "WAIT",
    "ProtocolViolation",
    "WireFuzzer",
    "check_url",
    "fuzzer_for",
    "run_fuzz",
]

T = TypeVar("T")

#: Every network wait is bounded by this many seconds.
WAIT = 2.0
#: Close codes the server may send (docs/protocol.md, "Close codes").
CLOSE_CODES = frozenset({1000, 1001, 1008, 1009, 1011, 1013})
CLOSE_REASONS = frozenset(c.value for c in CloseCause)
ERROR_CODES = frozenset(c.value for c in ErrorCode)
SERVER_TYPES = frozenset({"welcome", "subscribed", "event", "gap", "error", "pong"})
#: Topics the fuzzer plays with: few, so that clients share them.
TOPICS = ("fz.a", "fz.b", "fz.c")
BAD_TOPICS = ("", "has space", "star*", "x" * 129, "ünï")
MAX_PEERS = 4
#: Frames that are not valid v1 client messages, one per kind of mistake.
GARBAGE: tuple[str | bytes, ...] = (
    "{",  # malformed JSON
    "null",
    "[1, 2]",
    '{"type": "nope"}',  # unknown type
    '{"topics": ["fz.a"]}',  # no type
    '{"type": "subscribe", "topics": "fz.a"}',  # schema errors
    '{"type": "subscribe", "topics": []}',
    '{"type": "ping", "id": 5}',
    '{"type": "publish", "topic": "fz.a"}',
    '{"type": "unsubscribe", "topics": ["fz.a"], "extra": 1}',
    '{"type": "subscribe", "topics": ["fz.a"], "since": {"fz.b": 1}}',
    b"\xff\xfe\xfd",  # invalid UTF-8: only possible as a binary frame with this client
    b'{"type": "ping", "id": "bin"}',
)
#: The topic of odd publishes, plus a suffix per run (a retained value outlives a test
#: case, and a run): each peer that publishes there subscribes to it first.
ODD_TOPIC = "fz.odd"
#: ``data`` of a publish, as JSON text, with whether the server must deliver it unchanged
#: (True) or refuse it with an ``error`` (False): numbers no JSON peer agrees on, nesting
#: past the limit, escapes of characters that are no text.
ODD_DATA: tuple[tuple[str, bool], ...] = (
    ("1e400", False),  # infinity for most parsers; JSON has none
    ("-1e400", False),
    ("18446744073709551616", False),  # 2**64: past every 64-bit integer
    ("-9223372036854775809", False),
    ('"\\\\ud800"', True),  # an escaped backslash, then plain text
    ('"\\u0000 \\u001f"', True),  # escaped control characters are text
    ('"\\ud800 lone"', False),  # a lone surrogate escape: no character at all
    ("18446744073709551615", True),
    ("-9223372036854775808", True),
    ("1e308", True),
    ("-0.0", True),
    ("[" * 128 + "]" * 128, True),
    ("[" * 129 + "]" * 129, False),
    ('{"": {"": {"": null}}}', True),
    ('"' + "\\u00e9" * 200 + '"', True),
)


def _not_json(constant: str) -> Any:
    """Python's json accepts NaN and Infinity; JSON, and every other peer, does not."""
    raise ValueError(f"{constant} is not JSON")


class ProtocolViolation(AssertionError):
    """The server broke one of protocol v1's promises."""


def check_url(url: str, *, allow_remote: bool = False) -> None:
    """Refuse anything but a ws:// or wss:// URL on a loopback host (unless told)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a WebSocket URL: {url!r}")
    if allow_remote:
        return
    host = parts.hostname
    if not loopback(host):
        raise ValueError(
            f"refusing to fuzz non-loopback host {host!r} (pass allow_remote=True to insist)"
        )


@dataclass
class _Peer:
    """One fuzzing client and what the fuzzer knows about its stream."""

    name: str
    ws: ClientConnection
    frames: int = 0
    welcomed: bool = False
    #: ping id -> the topics whose unsubscribe it fences (with their subscribe generation)
    pings: dict[str, dict[str, int]] = field(default_factory=dict)
    subscribed_ever: set[str] = field(default_factory=set)
    generation: dict[str, int] = field(default_factory=dict)  # subscribes sent per topic
    fenced: set[str] = field(default_factory=set)  # unsubscribe proven processed
    last_seq: dict[str, int] = field(default_factory=dict)
    #: topics whose ``subscribed`` came and whose unsubscribe is not proven processed
    held: set[str] = field(default_factory=set)
    #: per topic, for each subscribe sent and not yet acknowledged, the newest seq any
    #: client had received per epoch when it was sent (a floor for ``subscribed.seq``)
    floors: dict[str, list[dict[str | None, int]]] = field(default_factory=dict)
    #: a new subscription's seq: its first event may carry it (the retained latest event)
    retained: dict[str, int] = field(default_factory=dict)
    fresh: set[str] = field(default_factory=set)  # new subscriptions with no event yet
    epochs: dict[str, str | None] = field(default_factory=dict)  # from ``subscribed``
    aborted: bool = False
    closing: bool = False  # the client sent a close frame
    paused_ever: bool = False
    closed: bool = False
    reader: asyncio.Task[None] | None = None


class WireFuzzer(RuleBasedStateMachine):
    """Drives the server at `url`; `fuzzer_for` makes a subclass with the parameters set."""

    url: ClassVar[str] = ""
    max_message_size: ClassVar[int] = 65536
    #: Names of checks to relax (known server deviations): "close_reason_1009".
    tolerate: ClassVar[frozenset[str]] = frozenset()
    #: frames sent over every test case of a run (`fuzzer_for` gives each run its own)
    tally: ClassVar[dict[str, int]] = {"frames": 0}
    #: this run's odd topic, and the portable odd data published on it by every test case
    odd_topic: ClassVar[str] = ODD_TOPIC
    odd_sent: ClassVar[list[Any]] = []

    peers = Bundle("peers")

    def __init__(self) -> None:
        super().__init__()
        if not self.url:
            raise ValueError("use fuzzer_for(url) to make a WireFuzzer for a server")
        self.loop = asyncio.new_event_loop()
        self.live: dict[str, _Peer] = {}
        self.all: list[_Peer] = []
        self.violations: list[str] = []
        #: topic -> epoch -> the newest seq any client of this test case has received
        self.newest: dict[str, dict[str | None, int]] = {}
        self.failed = False
        self._ids = itertools.count()

    # -- plumbing ------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(timeout):
                return await coro

        return self.loop.run_until_complete(bounded())

    def _violation(self, peer: _Peer | None, text: str) -> None:
        where = f"{peer.name}: " if peer is not None else ""
        self.violations.append(where + text)

    def _fail_if_broken(self) -> None:
        if self.violations:
            self.failed = True
            raise ProtocolViolation("; ".join(self.violations))

    async def _send(self, peer: _Peer, *frames: str | bytes) -> bool:
        """Send frames; False when the connection is gone (not a violation by itself)."""
        try:
            for frame in frames:
                async with asyncio.timeout(WAIT):
                    await peer.ws.send(frame)
                self.tally["frames"] += 1
        except (ConnectionClosed, TimeoutError):
            return False
        return True

    def _send_json(self, peer: _Peer, *messages: dict[str, Any]) -> bool:
        return self._run(self._send(peer, *(json.dumps(m) for m in messages)), WAIT * 2)

    async def _settle(self, seconds: float = 0.005) -> None:
        await asyncio.sleep(seconds)

    def _new_ping(self, peer: _Peer, fences: dict[str, int]) -> str:
        ping_id = f"p{next(self._ids)}"
        peer.pings[ping_id] = fences
        return ping_id

    def _expect_subscribed(self, peer: _Peer, topics: list[str]) -> None:
        """A subscribe is about to be sent: note, per topic (once, as the server dedups),
        the newest seq received so far, below which its ``subscribed.seq`` cannot be."""
        for topic in dict.fromkeys(topics):
            peer.floors.setdefault(topic, []).append(dict(self.newest.get(topic, {})))

    def _await_pong(self, peer: _Peer, ping_id: str) -> None:
        """Wait (bounded) until the pong came or the connection closed."""

        async def wait() -> None:
            # A violation ends the wait at once: a wrong pong need not wait out the timeout.
            while ping_id in peer.pings and not peer.closed and not self.violations:  # noqa: ASYNC110
                await asyncio.sleep(0.002)

        with contextlib.suppress(TimeoutError):
            self._run(wait())
        if ping_id in peer.pings and not peer.closed and not self.violations:
            self._violation(peer, f"no pong for ping {ping_id!r} within {WAIT}s")

    # -- what comes back -----------------------------------------------------------------

    async def _read(self, peer: _Peer) -> None:
        try:
            async for raw in peer.ws:
                self._frame(peer, raw)
        except ConnectionClosed:
            pass
        finally:
            peer.closed = True
            self._closed(peer)

    def _frame(self, peer: _Peer, raw: str | bytes) -> None:
        peer.frames += 1
        if isinstance(raw, bytes):
            self._violation(peer, "the server sent a binary frame")
            return
        try:
            msg = json.loads(raw, parse_constant=_not_json)
        except ValueError:
            self._violation(peer, f"the server sent invalid JSON: {raw[:80]!r}")
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind not in SERVER_TYPES:
            self._violation(peer, f"unknown server frame: {raw[:80]!r}")
            return
        if peer.frames == 1 and kind != "welcome":
            self._violation(peer, f"first frame is {kind!r}, not 'welcome'")
        elif peer.frames > 1 and kind == "welcome":
            self._violation(peer, "a second 'welcome'")
        peer.welcomed = True
        if kind == "pong":
            fences = peer.pings.pop(str(msg.get("id")), None)
            if fences is None:
                self._violation(peer, f"pong with an id no ping had: {msg.get('id')!r}")
                return
            for topic, gen in fences.items():
                if peer.generation.get(topic, 0) == gen:
                    peer.fenced.add(topic)
                    peer.held.discard(topic)
        elif kind == "error":
            if msg.get("code") not in ERROR_CODES:
                self._violation(peer, f"error with an unknown code: {msg.get('code')!r}")
        elif kind == "subscribed":
            self._subscribed(peer, msg)
        elif kind == "event":
            self._event(peer, msg)
        elif kind == "gap":
            self._gap(peer, msg)

    def _subscribed(self, peer: _Peer, msg: dict[str, Any]) -> None:
        seqs, epochs = msg.get("seq"), msg.get("epoch")
        for topic in msg.get("topics", ()):
            if not isinstance(topic, str):
                continue
            floors = peer.floors.get(topic)
            sent_at = floors.pop(0) if floors else {}
            n = seqs.get(topic) if isinstance(seqs, dict) else None
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                self._violation(peer, f"subscribed names no seq for {topic!r}: {msg!r}")
                continue
            epoch = epochs.get(topic) if isinstance(epochs, dict) else None
            floor = sent_at.get(epoch, 0)
            if n < floor:
                self._violation(
                    peer, f"{topic}: subscribed said seq {n}, but #{floor} had been delivered"
                )
            last = peer.last_seq.get(topic)
            if topic in peer.held and peer.epochs.get(topic) == epoch:
                # Subscribed again: every event queued before this ack came before it.
                if last is not None and n > last:
                    self._violation(
                        peer, f"{topic}: subscribed again said seq {n}, but only #{last} came"
                    )
                continue
            peer.held.add(topic)
            peer.epochs[topic] = epoch
            peer.last_seq[topic] = n  # a new subscription: the live events follow seq n
            peer.fresh.add(topic)
            if n:
                peer.retained[topic] = n
            else:
                peer.retained.pop(topic, None)

    def _heard(self, peer: _Peer, topic: str, seq: int) -> None:
        by_epoch = self.newest.setdefault(topic, {})
        epoch = peer.epochs.get(topic)
        by_epoch[epoch] = max(seq, by_epoch.get(epoch, 0))

    def _event(self, peer: _Peer, msg: dict[str, Any]) -> None:
        topic, seq = msg.get("topic"), msg.get("seq")
        if not isinstance(topic, str) or not isinstance(seq, int):
            self._violation(peer, f"malformed event: {msg!r}")
            return
        if topic not in peer.subscribed_ever and topic in TOPICS:
            self._violation(peer, f"event on {topic!r}, never subscribed")
        if topic in peer.fenced:
            self._violation(peer, f"event {topic}#{seq} after its unsubscribe was processed")
        if topic == self.odd_topic and msg.get("data") not in self.odd_sent:
            self._violation(peer, f"{topic}#{seq} carries data that was never sent or refused")
        last = peer.last_seq.get(topic)
        if peer.retained.pop(topic, None) == seq:
            pass  # a new subscription's retained latest event, at its subscribed seq
        elif last is not None and seq <= last:
            self._violation(peer, f"{topic}: #{seq} came twice or went back (after #{last})")
        elif topic in peer.fresh and last is not None and seq != last + 1:
            self._violation(peer, f"{topic}: subscribed said seq {last}, then #{seq} with no gap")
        elif last is not None and seq != last + 1:
            self._violation(peer, f"{topic}: seq {seq} after {last} with no gap")
        peer.last_seq[topic] = seq
        peer.fresh.discard(topic)
        self._heard(peer, topic, seq)

    def _gap(self, peer: _Peer, msg: dict[str, Any]) -> None:
        topic, lo, hi = msg.get("topic"), msg.get("from_seq"), msg.get("to_seq")
        if not isinstance(topic, str):
            self._violation(peer, f"malformed gap: {msg!r}")
            return
        peer.retained.pop(topic, None)
        peer.fresh.discard(topic)
        if lo is None and hi is None:  # epoch_changed: the old numbering is void
            peer.last_seq.pop(topic, None)
            return
        if not isinstance(lo, int) or not isinstance(hi, int) or lo > hi:
            self._violation(peer, f"malformed gap range: {msg!r}")
            return
        last = peer.last_seq.get(topic)
        if last is not None and lo > last + 1:
            self._violation(peer, f"{topic}: gap {lo}..{hi} leaves {last + 1}..{lo - 1} out")
        peer.last_seq[topic] = max(hi, last or hi)
        self._heard(peer, topic, peer.last_seq[topic])

    def _closed(self, peer: _Peer) -> None:
        """The connection ended: check its close code and reason."""
        if peer.aborted:
            return
        proto = peer.ws.protocol
        rcvd, sent = proto.close_rcvd, proto.close_sent
        if rcvd is None:
            if not peer.paused_ever:
                self._violation(peer, "the server dropped the connection without a close frame")
            return
        if rcvd.code not in CLOSE_CODES:
            self._violation(peer, f"close code {rcvd.code} is not one of {sorted(CLOSE_CODES)}")
        server_started = sent is None or proto.close_rcvd_then_sent
        tolerated = rcvd.code == 1009 and "close_reason_1009" in self.tolerate
        by_server = server_started and not peer.closing and not tolerated
        if by_server and rcvd.reason not in CLOSE_REASONS:
            self._violation(peer, f"close {rcvd.code} reason {rcvd.reason!r} is not a close cause")

    # -- rules ---------------------------------------------------------------------------

    @precondition(lambda self: len(self.live) < MAX_PEERS)
    @rule(target=peers)
    def connect(self) -> str:
        name = f"c{len(self.all)}"

        async def open_peer() -> _Peer:
            ws = await connect(
                self.url,
                compression=None,
                ping_interval=None,
                open_timeout=WAIT,
                close_timeout=WAIT / 4,
                max_size=None,
            )
            peer = _Peer(name, ws)
            peer.reader = asyncio.get_running_loop().create_task(self._read(peer))
            while not peer.welcomed and not peer.closed:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            return peer

        try:
            peer = self._run(open_peer())
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self._violation(None, f"{name}: could not connect: {type(exc).__name__}")
            self._fail_if_broken()
            raise AssertionError("unreachable") from exc
        self.live[name] = peer
        self.all.append(peer)
        return name

    def _peer(self, name: str) -> _Peer | None:
        peer = self.live.get(name)
        return None if peer is None or peer.closed else peer

    @rule(name=peers, topics=st.lists(st.sampled_from(TOPICS), min_size=1, max_size=3))
    def subscribe(self, name: str, topics: list[str]) -> None:
        peer = self._peer(name)
        if peer is None:
            return
        for topic in topics:
            peer.generation[topic] = peer.generation.get(topic, 0) + 1
            peer.fenced.discard(topic)
            peer.subscribed_ever.add(topic)
        self._expect_subscribed(peer, topics)
        self._send_json(peer, {"type": "subscribe", "topics": topics})

    @rule(name=peers, data=st.data())
    def subscribe_again(self, name: str, data: st.DataObject) -> None:
        """Subscribe again to topics the peer holds: acknowledged, nothing replayed."""
        peer = self._peer(name)
        if peer is None or not peer.held:
            return
        held = sorted(peer.held)
        topics = data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=len(held)))
        self.subscribe(name, topics)

    @rule(name=peers, topic=st.sampled_from(BAD_TOPICS))
    def subscribe_invalid(self, name: str, topic: str) -> None:
        peer = self._peer(name)
        if peer is not None:
            self._send_json(peer, {"type": "subscribe", "topics": [topic]})

    @rule(name=peers, topics=st.lists(st.sampled_from(TOPICS), min_size=1, max_size=3))
    def unsubscribe(self, name: str, topics: list[str]) -> None:
        """Unsubscribe, then ping: the pong proves the unsubscribe was processed."""
        peer = self._peer(name)
        if peer is None:
            return
        fences = {t: peer.generation.get(t, 0) for t in topics}
        ping_id = self._new_ping(peer, fences)
        if self._send_json(
            peer,
            {"type": "unsubscribe", "topics": topics},
            {"type": "ping", "id": ping_id},
        ):
            self._await_pong(peer, ping_id)

    @rule(name=peers, topic=st.sampled_from(TOPICS), n=st.integers(1, 4))
    def publish(self, name: str, topic: str, n: int) -> None:
        peer = self._peer(name)
        if peer is not None:
            self._send_json(
                peer, *({"type": "publish", "topic": topic, "data": {"i": i}} for i in range(n))
            )

    @rule(name=peers, topic=st.sampled_from(("system_status", "clients", "bad topic")))
    def publish_refused(self, name: str, topic: str) -> None:
        peer = self._peer(name)
        if peer is not None:
            self._send_json(peer, {"type": "publish", "topic": topic, "data": 1})

    @rule(name=peers)
    def ping(self, name: str) -> None:
        peer = self._peer(name)
        if peer is None:
            return
        ping_id = self._new_ping(peer, {})
        if self._send_json(peer, {"type": "ping", "id": ping_id}):
            self._await_pong(peer, ping_id)

    @rule(name=peers, odd=st.sampled_from(ODD_DATA))
    def publish_odd(self, name: str, odd: tuple[str, bool]) -> None:
        """Publish odd ``data`` on a topic the peer itself reads: what is portable comes
        back unchanged, the rest is refused with an error; either way a pong follows."""
        peer = self._peer(name)
        if peer is None:
            return
        text, portable = odd
        if portable:
            self.odd_sent.append(json.loads(text))
        topic = self.odd_topic
        if topic not in peer.subscribed_ever:
            peer.subscribed_ever.add(topic)
            self._expect_subscribed(peer, [topic])
            if not self._send_json(peer, {"type": "subscribe", "topics": [topic]}):
                return
        raw = f'{{"type": "publish", "topic": "{topic}", "data": {text}}}'
        ping_id = self._new_ping(peer, {})
        ping = json.dumps({"type": "ping", "id": ping_id})
        if self._run(self._send(peer, raw, ping), WAIT * 2):
            self._await_pong(peer, ping_id)

    @rule(name=peers, frame=st.sampled_from(GARBAGE))
    def garbage(self, name: str, frame: str | bytes) -> None:
        peer = self._peer(name)
        if peer is not None:
            self._run(self._send(peer, frame), WAIT * 2)

    @rule(name=peers, extra=st.sampled_from((1, 1000)))
    def oversized(self, name: str, extra: int) -> None:
        peer = self._peer(name)
        if peer is not None:
            self._run(self._send(peer, "x" * (self.max_message_size + extra)), WAIT * 2)

    @rule(name=consumes(peers))
    def abort(self, name: str) -> None:
        peer = self.live.pop(name, None)
        if peer is not None and not peer.closed:
            peer.aborted = True
            peer.ws.transport.abort()
            self._run(self._settle(0.01))

    @rule(name=consumes(peers))
    def close(self, name: str) -> None:
        peer = self.live.pop(name, None)
        if peer is not None and not peer.closed:
            peer.closing = True
            with contextlib.suppress(TimeoutError):
                self._run(peer.ws.close(1000))

    @rule(
        name=peers,
        seconds=st.sampled_from((0.02, 0.1, 0.3)),
        burst=st.integers(0, 20),
        topic=st.sampled_from(TOPICS),
    )
    def slow_reader(self, name: str, seconds: float, burst: int, topic: str) -> None:
        """Stop reading for a while (publishing a burst meanwhile), then read again."""
        peer = self._peer(name)
        if peer is None:
            return
        peer.paused_ever = True
        peer.ws.transport.pause_reading()
        try:
            self._send_json(
                peer,
                *({"type": "publish", "topic": topic, "data": {"b": i}} for i in range(burst)),
            )
            self._run(self._settle(seconds))
        finally:
            if not peer.ws.transport.is_closing():
                peer.ws.transport.resume_reading()

    # -- checks --------------------------------------------------------------------------

    @invariant()
    def promises_held(self) -> None:
        self._run(self._settle())
        for name, peer in list(self.live.items()):
            if peer.closed:
                del self.live[name]
        self._fail_if_broken()

    def server_alive(self) -> None:
        """A fresh connection gets ``welcome`` first."""

        async def probe() -> None:
            async with connect(
                self.url, compression=None, ping_interval=None, open_timeout=WAIT
            ) as ws:
                first = json.loads(await ws.recv())
                if not (isinstance(first, dict) and first.get("type") == "welcome"):
                    self._violation(None, f"the fresh connection's first frame: {first!r}")

        try:
            self._run(probe(), WAIT * 2)
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, ValueError) as exc:
            self._violation(None, f"the server is not alive at the end: {type(exc).__name__}")
        self._fail_if_broken()

    def teardown(self) -> None:
        try:
            if not self.failed:
                self._run(self._settle())
                self._fail_if_broken()
                self.server_alive()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for peer in self.all:
            if not peer.closed:
                peer.aborted = True
                peer.ws.transport.abort()
        tasks = [p.reader for p in self.all if p.reader is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def fuzzer_for(
    url: str,
    *,
    max_message_size: int = 65536,
    tolerate: frozenset[str] = frozenset(),
    allow_remote: bool = False,
) -> type[WireFuzzer]:
    """A `WireFuzzer` bound to one server, for `run_state_machine_as_test` or ``.TestCase``."""
    check_url(url, allow_remote=allow_remote)
    attrs = {
        "url": url,
        "max_message_size": max_message_size,
        "tolerate": tolerate,
        "tally": {"frames": 0},
        "odd_topic": f"{ODD_TOPIC}.{secrets.token_hex(4)}",
        "odd_sent": [],
    }
    return type("WireFuzzer", (WireFuzzer,), attrs)


def run_fuzz(
    url: str,
    *,
    examples: int,
    steps: int,
    seed: int | None,
    out: TextIO,
    max_message_size: int = 65536,
    tolerate: frozenset[str] = frozenset(),
    allow_remote: bool = False,
) -> int:
    """Fuzz the server at ``url``: 0 when every promise held, 1 after printing the shrunk
    failing script to ``out``. ``seed`` makes the run reproducible (None: random)."""
    machine = fuzzer_for(
        url, max_message_size=max_message_size, tolerate=tolerate, allow_remote=allow_remote
    )
    if seed is not None:
        machine = hypothesis_seed(seed)(machine)
    config = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        derandomize=False,
        print_blob=False,
        verbosity=Verbosity.normal,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )

    def report(text: object) -> None:
        out.write(f"{text}\n")

    with with_reporter(report):
        try:
            run_state_machine_as_test(machine, settings=config)
        except Exception as exc:
            # Hypothesis attaches the shrunk script to the exception as notes.
            for note in getattr(exc, "__notes__", ()):
                report(note)
            out.write(f"FAILED: {type(exc).__name__}: {exc}\n")
            out.flush()
            return 1
    frames = machine.tally["frames"]
    out.write(
        f"OK: {examples} examples x {steps} steps against {url}, {frames} frames sent,"
        " every promise held\n"
    )
    out.flush()
    return 0
