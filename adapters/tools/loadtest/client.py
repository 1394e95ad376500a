"""One lean connection of a load test (subscriber, publisher or observer) and the state they share:
per-delivery bookkeeping at a fixed cost."""

from __future__ import annotations

import asyncio
import errno
import math
import time
from collections import Counter
from typing import Final, Literal

import orjson

from wirestate.adapters.client.probe import parse_close
from wirestate.adapters.tools import leanws

_SYNC_ID: Final = "loadtest-sync"


SYNC_PING: Final = orjson.dumps({"type": "ping", "id": _SYNC_ID})


# Latency histogram: logarithmic buckets of 1 % from 1 µs to ~1000 s.
PER_E: Final = 1.0 / math.log(1.01)


BUCKETS: Final = int(math.log(1e9) * PER_E) + 2


# Cached parse results: (kind, a, b). An event: (_EVENT, seq, publish time or -1.0 for an
# event that is not this run's); a gap: (_GAP, from_seq, to_seq or -1).
_EVENT: Final = 0


_GAP: Final = 1


_CACHE_MAX: Final = 4096


Role = Literal["client", "observer", "publisher"]


class Shared:
    """What every connection of a run writes to: the parse cache and the aggregates."""

    __slots__ = (
        "cache",
        "closing",
        "connected",
        "deliveries",
        "disconnects",
        "hist",
        "invalid",
        "last_delivery",
        "lat_max",
        "lat_min",
        "lat_sum",
        "per_second",
        "run_id",
        "server_errors",
        "t0",
        "topic",
    )

    def __init__(self, run_id: str, topic: str) -> None:
        self.run_id = run_id
        self.topic = topic
        self.cache: dict[bytes, tuple[int, int, float]] = {}
        self.closing = False  # the final close has begun: ends are not disconnects
        self.connected = 0
        self.deliveries = 0
        self.hist = [0] * BUCKETS
        self.lat_sum = 0.0
        self.lat_max = -math.inf
        self.lat_min = math.inf
        self.per_second: list[int] = []
        self.t0 = math.inf  # wall time of the first publish
        self.last_delivery = 0.0
        self.invalid = 0
        self.server_errors: Counter[str] = Counter()
        #: (seconds since the first publish or None before it, role, code, cause, reason)
        self.disconnects: list[tuple[float | None, Role, int, str, str]] = []

    def parse(self, payload: bytes) -> tuple[int, int, float] | None:
        """An event or a gap, as a cache entry (cached: every subscriber gets these same
        bytes); None for anything else (per-connection messages, not cached)."""
        if not payload.startswith((b'{"type":"event"', b'{"type":"gap"')):
            return None
        try:
            msg = orjson.loads(payload)
            if msg["type"] == "event":
                data = msg.get("data")
                t = -1.0
                if isinstance(data, dict) and data.get("run") == self.run_id:
                    t = float(data["t"])
                hit = (_EVENT, int(msg["seq"]), t)
            else:
                to_seq = msg.get("to_seq")
                hit = (_GAP, int(msg.get("from_seq") or 0), -1 if to_seq is None else to_seq)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        cache = self.cache
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[payload] = hit
        return hit

    def percentile(self, q: float) -> float | None:
        """Latency quantile `q` in seconds from the histogram (1 % resolution, clamped to
        the exact min and max), or None without samples."""
        total = self.deliveries
        if not total:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for i, count in enumerate(self.hist):
            seen += count
            if seen >= rank:
                value = math.exp((i + 0.5) / PER_E) * 1e-6
                return min(max(value, self.lat_min), self.lat_max)
        return self.lat_max


class Client:
    """One connection's state and its ``on_text`` (the hot path)."""

    __slots__ = (
        "conn",
        "counted",
        "dropped",
        "duplicates",
        "ended",
        "gapped",
        "gaps",
        "last_seq",
        "missing",
        "ready",
        "received",
        "role",
        "shared",
        "sync",
        "welcomed",
    )

    def __init__(self, shared: Shared, role: Role) -> None:
        self.shared = shared
        self.role: Role = role
        self.counted = role == "client"
        self.conn: leanws.LeanConnection | None = None
        #: resolves with None on `subscribed` (or `welcome` for a bare publisher), or with
        #: the failure kind; None once set up
        self.ready: asyncio.Future[str | None] | None = None
        self.welcomed = False
        self.last_seq = -1
        self.received = 0  # this run's events, each seq once
        self.missing = 0
        self.gapped = 0
        self.gaps = 0
        self.duplicates = 0
        self.ended: tuple[int | None, str] | None = None
        self.dropped = False  # ended during the run, not by the final close
        self.sync: asyncio.Event | None = None  # set by the pong of `_Run._sync`

    def on_text(self, payload: bytes) -> None:
        shared = self.shared
        hit = shared.cache.get(payload)
        if hit is None:
            hit = shared.parse(payload)
            if hit is None:
                self._control(payload)
                return
        kind, seq, t = hit
        if kind == _EVENT:
            last = self.last_seq
            if seq != last + 1 and last >= 0:
                if seq <= last:
                    self.duplicates += 1
                    return
                self.missing += seq - last - 1
            self.last_seq = seq
            if t < 0:
                return
            self.received += 1
            if not self.counted:
                return
            now = time.time()
            latency = now - t
            shared.deliveries += 1
            shared.lat_sum += latency
            if latency > shared.lat_max:
                shared.lat_max = latency
            if latency < shared.lat_min:
                shared.lat_min = latency
            us = latency * 1e6
            i = int(math.log(us) * PER_E) if us > 1.0 else 0
            shared.hist[i if i < BUCKETS else BUCKETS - 1] += 1
            second = int(now - shared.t0)
            per_second = shared.per_second
            while second >= len(per_second):
                per_second.append(0)
            per_second[second] += 1
            shared.last_delivery = now
        else:
            self.gaps += 1
            if t >= 0:
                self.gapped += int(t) - seq + 1
                self.last_seq = int(t)
            else:  # the topic's sequence restarted (epoch changed)
                self.last_seq = -1

    def _control(self, payload: bytes) -> None:
        try:
            msg = orjson.loads(payload)
            kind = msg["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.shared.invalid += 1
            return
        ready = self.ready
        if kind == "welcome":
            self.welcomed = True
            if self.role == "publisher" and ready is not None and not ready.done():
                ready.set_result(None)
        elif kind == "subscribed":
            if ready is not None and not ready.done():
                ready.set_result(None if self.welcomed else "no_welcome")
        elif kind == "pong":
            if msg.get("id") == _SYNC_ID and self.sync is not None:
                self.sync.set()
        elif kind == "error":
            code = str(msg.get("code"))
            key = f"{'publish' if self.role != 'client' else 'client'}:{code}"
            self.shared.server_errors[key] += 1
            if ready is not None and not ready.done():
                ready.set_result(f"error_{code}")

    def on_close(self, code: int | None, reason: str) -> None:
        self.ended = (code, reason)
        ready = self.ready
        if ready is not None:
            if not ready.done():
                shown, cause = parse_close(code, reason)
                ready.set_result(f"closed_{shown}_{cause}")
            return
        shared = self.shared
        if shared.closing:
            return
        self.dropped = True
        if self.counted:
            shared.connected -= 1
        shown, cause = parse_close(code, reason)
        at = time.time() - shared.t0 if shared.t0 != math.inf else None
        shared.disconnects.append((at, self.role, shown, cause, reason[:60]))


def failure_kind(exc: BaseException) -> str:
    if isinstance(exc, leanws.HandshakeError):
        return f"http_{exc.status}" if exc.status not in (None, 101) else "handshake"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, OSError):
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return "fd_limit"
        if exc.errno == errno.EADDRNOTAVAIL:
            return "no_local_port"
        if exc.errno == errno.ECONNREFUSED or f"[Errno {errno.ECONNREFUSED}]" in str(exc):
            return "refused"  # several addresses tried: one OSError listing each attempt
        name = errno.errorcode.get(exc.errno or 0)
        return f"os_{name}" if name else "os_error"
    return type(exc).__name__


def kind_text(kind: str) -> str:
    """A failure kind for people: http_429 -> HTTP 429, closed_1008_policy -> closed 1008
    policy."""
    if kind.startswith("http_"):
        return "HTTP " + kind[5:]
    return kind.replace("_", " ", 2) if kind.startswith("closed_") else kind
