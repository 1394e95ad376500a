"""``wirestate loadtest``: N subscribers, a paced publisher, and what they saw.

The run, in phases, every wait bounded:

1. **Setup.** The soft RLIMIT_NOFILE is raised to the hard limit; when N connections (plus
   the publishers and a reserve) still do not fit, the run stops before connecting, saying
   what to change.
2. **Publishers.** ``publishers`` lean connections (default: one per 40 events/s, under the
   server's default inbound limit of 50 messages/s per connection). The first one also
   subscribes to the topic: what it receives is what the server *sequenced*, so a publish
   the server refused (``rate_limited``, ``forbidden``) is reported as refused, not as a
   delivery lost by every client. A publisher that cannot connect stops the run (exit 1).
3. **Clients.** N `wirestate.adapters.tools.leanws` connections, at most ``concurrency``
   handshakes in flight (and at most ``ramp`` new ones per second when given), each sending
   ``subscribe`` right after the upgrade and counted as connected on ``subscribed``. A
   failure is recorded by kind (``refused``, ``timeout``, ``http_429``, ...) and the run goes
   on; after ``GIVE_UP`` failures with no success at all it stops trying.
4. **Publishing.** ``rate`` events/s for ``duration`` seconds, round robin over the
   publishers, each a ``publish`` message whose data carries the run's id, a per-run event
   id and the wall-clock publish time (``{"run": …, "id": k, "t": time.time()}``).
   Latency = receive wall time - ``t``, per delivery; throughput per 1 s bucket of receive
   time since the first publish.
5. **Drain**, up to ``drain_timeout``: each publisher, then the observer, sends an
   application ``ping`` until its ``pong`` comes back (resent every ``SYNC_EVERY``: a
   publisher over its rate limit has pings dropped too); then the server has handled every
   publish and the observer's count is final. The drain ends when every client has that
   many events.
6. **Close**: every connection closed with 1000, waiting up to ``close_timeout`` for the
   server's answer, then dropped.

Checked per client: seqs consecutive (a jump without a ``gap`` counts its events as
``missing``; a ``gap`` counts its range as ``gapped``; a seq at or below the last one is a
duplicate) and, at the end, the sequenced events it never got (``lost``). Every close not
started by the loadtest's own final close is a *disconnect*, recorded with its code and the
cause the wirestate server names in the close frame's reason (`wirestate.adapters.client.
parse_close`; no close frame is ``1006 read_error``).

The run fails (exit 1) on any connection failure, disconnect, lost, missing or duplicated
delivery, refused publish or ``error`` message to a client; `Report.failure` says why in one
line. Bad options, too few file descriptors and ``--plot`` without matplotlib are usage
errors (exit 2), found before anything connects.

Cost per delivery: one dict lookup of the payload (every client receives the same bytes, so
the JSON is parsed once per event, not once per delivery), a seq comparison and a log-bucket
histogram increment: memory does not grow with the number of deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import secrets
import shutil
import ssl
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TextIO
from urllib.parse import urlsplit

import orjson
from pydantic import TypeAdapter, ValidationError

from wirestate.adapters.client.probe import parse_close
from wirestate.adapters.server.auth import safe_url
from wirestate.adapters.tools import leanws
from wirestate.models.wire import Topic

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "LoadTestError",
    "LoadTestOptions",
    "Report",
    "execute",
    "plot_report",
    "run_loadtest",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

#: Events/s one publisher connection sends at most by default: under the server's default
#: ``[limits] messages_per_second = 50`` with room for timer jitter.
PUBLISH_RATE_PER_CONNECTION: Final = 40.0
#: File descriptors kept free beyond the connections (stdio, the loop's selector, logs).
FD_RESERVE: Final = 64
#: Failed connects, with none successful, after which the run stops trying.
GIVE_UP: Final = 100
#: How often the progress line is redrawn, and the drain condition checked.
PROGRESS_EVERY: Final = 0.5
DRAIN_POLL: Final = 0.05
#: Interval of the application pings that tell when the server has handled every publish.
SYNC_EVERY: Final = 0.1
_SYNC_ID: Final = "loadtest-sync"
_SYNC_PING: Final = orjson.dumps({"type": "ping", "id": _SYNC_ID})

# Latency histogram: logarithmic buckets of 1 % from 1 µs to ~1000 s.
_PER_E: Final = 1.0 / math.log(1.01)
_BUCKETS: Final = int(math.log(1e9) * _PER_E) + 2

_TOPIC: TypeAdapter[str] = TypeAdapter(Topic)

# Cached parse results: (kind, a, b). An event: (_EVENT, seq, publish time or -1.0 for an
# event that is not this run's); a gap: (_GAP, from_seq, to_seq or -1).
_EVENT: Final = 0
_GAP: Final = 1
_CACHE_MAX: Final = 4096

Role = Literal["client", "observer", "publisher"]


class LoadTestError(Exception):
    """The run could not start or could not go on; the message says what to change.
    `status` is the exit status it stands for: EXIT_USAGE for bad options, the fd limit or
    a missing matplotlib, EXIT_FAILED when the server could not be used (no publisher)."""

    def __init__(self, message: str, *, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LoadTestOptions:
    url: str
    clients: int
    duration: float
    rate: float = 10.0
    #: None: a fresh ``loadtest.<hex>`` topic per run (no retained value, no other traffic).
    topic: str | None = None
    #: Sent as ``Authorization: Bearer``; needs subscribe and publish claims on the topic.
    token: str | None = None
    #: New connections per second at most; None: as fast as ``concurrency`` allows.
    ramp: float | None = None
    #: None: one per PUBLISH_RATE_PER_CONNECTION events/s.
    publishers: int | None = None
    concurrency: int = 200
    connect_timeout: float = 10.0
    drain_timeout: float = 10.0
    close_timeout: float = 10.0

    def check(self) -> str | None:
        """What is wrong with the options, in one line, or None."""
        if self.clients < 1:
            return f"--clients must be at least 1 (got {self.clients})"
        if not self.duration > 0 or math.isinf(self.duration):
            return f"--duration must be a positive number of seconds (got {self.duration})"
        if not self.rate > 0 or math.isinf(self.rate):
            return f"--rate must be a positive number of events per second (got {self.rate})"
        if self.ramp is not None and not self.ramp > 0:
            return f"--ramp must be a positive number of connections per second ({self.ramp})"
        if self.publishers is not None and self.publishers < 1:
            return f"--publishers must be at least 1 (got {self.publishers})"
        if self.token is not None and ("\r" in self.token or "\n" in self.token):
            return "the token cannot contain line breaks"
        if self.concurrency < 1:
            return f"--concurrency must be at least 1 (got {self.concurrency})"
        for name in ("connect_timeout", "drain_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                return f"{name} must be positive"
        if self.topic is not None:
            try:
                _TOPIC.validate_python(self.topic)
            except ValidationError:
                return (
                    f"bad topic name {self.topic!r}: 1 to 128 characters from A-Z a-z 0-9 _ . : / -"
                )
        try:
            _target(self.url)
        except LoadTestError as exc:
            return str(exc)
        return None

    @property
    def publisher_count(self) -> int:
        if self.publishers is not None:
            return self.publishers
        return max(1, math.ceil(self.rate / PUBLISH_RATE_PER_CONNECTION))


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    path: str
    ssl: ssl.SSLContext | None


def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise LoadTestError(
            f"{safe_url(url)!r} is not a WebSocket URL: use ws://HOST:PORT/ws or wss://…"
        )
    try:
        port = parts.port or (443 if parts.scheme == "wss" else 80)
    except ValueError:
        raise LoadTestError(f"{safe_url(url)!r} has a bad port") from None
    path = parts.path or "/ws"
    if parts.query:
        path += "?" + parts.query
    context = ssl.create_default_context() if parts.scheme == "wss" else None
    return _Target(parts.hostname, port, path, context)


def ensure_fds(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; raise LoadTestError when `needed`
    descriptors still do not fit. Returns the soft limit now in force."""
    try:
        import resource
    except ImportError:  # not a Unix: nothing to raise, nothing to check
        return needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    want = hard if hard != infinite else max(soft, needed)
    if soft != infinite and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != infinite and needed > soft:
        raise LoadTestError(
            f"this run needs about {needed:,} file descriptors (one per connection plus"
            f" {FD_RESERVE}) but the process may open {soft:,} (hard limit"
            f" {'unlimited' if hard == infinite else f'{hard:,}'}): raise the hard limit"
            " (ulimit -Hn, /etc/security/limits.conf, systemd LimitNOFILE), or split the"
            " clients over several loadtest processes"
        )
    return int(soft)


class _Shared:
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
        self.hist = [0] * _BUCKETS
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
                value = math.exp((i + 0.5) / _PER_E) * 1e-6
                return min(max(value, self.lat_min), self.lat_max)
        return self.lat_max


class _Client:
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

    def __init__(self, shared: _Shared, role: Role) -> None:
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
            i = int(math.log(us) * _PER_E) if us > 1.0 else 0
            shared.hist[i if i < _BUCKETS else _BUCKETS - 1] += 1
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


def _failure_kind(exc: BaseException) -> str:
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


def _kind_text(kind: str) -> str:
    """A failure kind for people: http_429 -> HTTP 429, closed_1008_policy -> closed 1008
    policy."""
    if kind.startswith("http_"):
        return "HTTP " + kind[5:]
    return kind.replace("_", " ", 2) if kind.startswith("closed_") else kind


@dataclass
class Report:
    """What a run measured. `to_dict` is the ``--json`` object; `failure` the one-line
    reason the run failed, or None."""

    url: str
    topic: str
    clients: int
    duration: float
    rate: float
    publishers: int
    connected: int
    connect_seconds: float
    failures: dict[str, int]
    published: int
    sequenced: int | None  # None: the observing publisher was lost
    publish_seconds: float
    expected: int
    received: int
    lost: int
    missing: int
    gapped: int
    gaps: int
    duplicates: int
    server_errors: dict[str, int]
    invalid: int
    latency: dict[str, float | None]  # seconds
    samples: int
    per_second: list[int]
    span: float  # first publish to last delivery, seconds
    disconnects: list[tuple[float | None, Role, int, str, str]]
    close_timeouts: int
    gave_up: bool
    histogram: list[int] = field(repr=False, default_factory=list)

    @property
    def window(self) -> float:
        """Seconds over which deliveries are averaged: the publishing phase, or longer when
        the last delivery came after it."""
        return max(self.span, self.publish_seconds)

    @property
    def throughput(self) -> float:
        return self.samples / self.window if self.window > 0 else 0.0

    def disconnects_by_cause(self) -> list[dict[str, Any]]:
        counts: Counter[tuple[int, str, Role]] = Counter(
            (code, cause, role) for _, role, code, cause, _ in self.disconnects
        )
        out = []
        for (code, cause, role), count in sorted(counts.items(), key=lambda kv: -kv[1]):
            times = [at for at, r, c, k, _ in self.disconnects if (c, k, r) == (code, cause, role)]
            known = [at for at in times if at is not None]
            out.append(
                {
                    "code": code,
                    "cause": cause,
                    "role": role,
                    "count": count,
                    "first_at": round(min(known), 3) if known else None,
                    "last_at": round(max(known), 3) if known else None,
                }
            )
        return out

    @property
    def failure(self) -> str | None:
        reasons: list[str] = []
        failed = sum(self.failures.values())
        if failed:
            kinds = ", ".join(
                f"{n:,} {_kind_text(k)}{_hint(k)}" for k, n in _by_count(self.failures)
            )
            reasons.append(f"{_n(failed, 'connection failure')} ({kinds})")
            if self.gave_up:
                reasons.append(f"gave up after {GIVE_UP} failures and no connection")
        if self.disconnects:
            causes = ", ".join(
                f"{d['code']} {d['cause']}: {d['count']:,}"
                + ("" if d["role"] == "client" else f" ({d['role']})")
                for d in self.disconnects_by_cause()
            )
            reasons.append(f"{_n(len(self.disconnects), 'disconnect')} during the run ({causes})")
        if self.sequenced is not None and self.sequenced < self.published:
            refused = {
                k.split(":", 1)[1]: n
                for k, n in self.server_errors.items()
                if k.startswith("publish:")
            }
            why = ", ".join(f"{code}: {n:,}" for code, n in refused.items())
            if "rate_limited" in refused:
                why += " — more --publishers, or raise the server's messages_per_second"
            elif "forbidden" in refused:
                why += " — the token needs publish claims on the topic"
            unsequenced = _n(self.published - self.sequenced, "publish", "publishes")
            reasons.append(
                f"{unsequenced} not sequenced by the server" + (f" ({why})" if why else "")
            )
        if self.lost:
            reasons.append(f"{_n(self.lost, 'delivery', 'deliveries')} lost")
        if self.missing:
            reasons.append(f"{_n(self.missing, 'event')} skipped without a gap")
        if self.gapped:
            reasons.append(f"{_n(self.gapped, 'event')} announced lost by {_n(self.gaps, 'gap')}")
        if self.duplicates:
            reasons.append(f"{_n(self.duplicates, 'duplicate delivery', 'duplicate deliveries')}")
        client_errors = {k: n for k, n in self.server_errors.items() if k.startswith("client:")}
        if client_errors:
            text = ", ".join(f"{k.split(':', 1)[1]}: {n:,}" for k, n in client_errors.items())
            reasons.append(f"error messages to clients ({text})")
        if self.invalid:
            reasons.append(f"{_n(self.invalid, 'frame')} that are not protocol v1")
        return "; ".join(reasons) if reasons else None

    def to_dict(self) -> dict[str, Any]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1e3, 3)

        return {
            "url": self.url,
            "topic": self.topic,
            "clients": self.clients,
            "duration": self.duration,
            "rate": self.rate,
            "publishers": self.publishers,
            "connections": {
                "connected": self.connected,
                "failed": sum(self.failures.values()),
                "failures": dict(self.failures),
                "seconds": round(self.connect_seconds, 3),
                "per_second": round(self.connected / self.connect_seconds, 1)
                if self.connect_seconds > 0
                else None,
            },
            "published": self.published,
            "sequenced": self.sequenced,
            "publish_seconds": round(self.publish_seconds, 3),
            "deliveries": {
                "expected": self.expected,
                "received": self.received,
                "lost": self.lost,
                "missing": self.missing,
                "gapped": self.gapped,
                "gaps": self.gaps,
                "duplicates": self.duplicates,
            },
            "throughput": {
                "deliveries_per_second": round(self.throughput, 1),
                "seconds": round(self.window, 3),
                "per_second": self.per_second,
            },
            "latency_ms": {
                "min": ms(self.latency["min"]),
                "p50": ms(self.latency["p50"]),
                "p90": ms(self.latency["p90"]),
                "p99": ms(self.latency["p99"]),
                "max": ms(self.latency["max"]),
                "mean": ms(self.latency["mean"]),
                "samples": self.samples,
            },
            "disconnects": {
                "total": len(self.disconnects),
                "by_cause": self.disconnects_by_cause(),
            },
            "server_errors": dict(self.server_errors),
            "invalid_frames": self.invalid,
            "close_timeouts": self.close_timeouts,
            "ok": self.failure is None,
            "failure": self.failure,
        }

    def render(self) -> str:
        """The human summary, one aligned line per subject."""
        lat = self.latency
        lines = [f"wirestate loadtest {self.url} (topic {self.topic})"]
        failed = sum(self.failures.values())
        secs = self.connect_seconds
        rate = f" ({self.connected / secs:,.0f}/s)" if secs else ""
        conn = f"{self.connected:,} of {self.clients:,} connected in {secs:.2f} s{rate}"
        if failed:
            kinds = ", ".join(f"{n:,} {_kind_text(k)}" for k, n in _by_count(self.failures))
            conn += f"; {failed:,} failed: {kinds}"
        lines.append(f"clients      {conn}")
        seq = "?" if self.sequenced is None else f"{self.sequenced:,}"
        lines.append(
            f"published    {self.published:,} events in {self.publish_seconds:.1f} s"
            f" ({self.rate:g}/s asked, {self.publishers} publisher"
            f"{'' if self.publishers == 1 else 's'}); {seq} sequenced by the server"
        )
        anomalies = [
            f"{self.lost:,} lost" if self.lost else "none lost",
            f"{self.missing:,} skipped" if self.missing else None,
            f"{self.gapped:,} in {self.gaps:,} gaps" if self.gaps else None,
            f"{self.duplicates:,} duplicates" if self.duplicates else "no duplicates",
        ]
        lines.append(
            f"deliveries   {self.received:,} of {self.expected:,} expected: "
            + ", ".join(a for a in anomalies if a)
        )
        if self.per_second:
            # Whole seconds of publishing only: the last bucket is a tail or a fraction.
            full = self.per_second[: int(self.publish_seconds)] or self.per_second
            lines.append(
                f"throughput   {self.throughput:,.0f} deliveries/s over {self.window:.1f} s"
                f" (per 1 s: min {min(full):,}, median {statistics.median(full):,.0f},"
                f" max {max(full):,})"
            )
        else:
            lines.append("throughput   no deliveries")
        if self.samples:
            lines.append(
                "latency      "
                + "  ".join(f"{k} {_ms(lat[k])}" for k in ("p50", "p90", "p99", "max"))
                + f"  (mean {_ms(lat['mean'])}, {self.samples:,} samples)"
            )
        if self.disconnects:
            by = ", ".join(
                f"{d['code']} {d['cause']}: {d['count']:,}"
                + ("" if d["role"] == "client" else f" ({d['role']})")
                for d in self.disconnects_by_cause()
            )
            lines.append(f"disconnects  {len(self.disconnects):,}: {by}")
        else:
            lines.append("disconnects  none during the run")
        if self.close_timeouts:
            lines.append(
                f"close        {self.close_timeouts:,} connections did not finish the closing"
                " handshake in time (dropped)"
            )
        failure = self.failure
        lines.append("result       OK" if failure is None else f"result       FAILED: {failure}")
        return "\n".join(lines) + "\n"


def _n(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    ms = seconds * 1e3
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:,.1f} ms" if ms < 10_000 else f"{ms / 1e3:,.1f} s"


class _Run:
    """One run of `run_loadtest`. Not reusable."""

    def __init__(self, options: LoadTestOptions, progress: TextIO | None) -> None:
        self.options = options
        self.target = _target(options.url)
        self.topic = options.topic or f"loadtest.{secrets.token_hex(4)}"
        self.shared = _Shared(secrets.token_hex(6), self.topic)
        self.progress = progress
        self.headers: tuple[tuple[str, str], ...] = (
            (("Authorization", f"Bearer {options.token}"),) if options.token else ()
        )
        self.clients: list[_Client] = []
        self.publishers: list[_Client] = []
        self.failures: Counter[str] = Counter()
        self.attempted = 0
        self.gave_up = False
        self.phase = "connecting"
        self.published = 0
        self.connect_seconds = 0.0
        self.publish_seconds = 0.0
        self.close_timeouts = 0
        self._subscribe = orjson.dumps({"type": "subscribe", "topics": [self.topic]})

    # -- connections -----------------------------------------------------------------------

    async def _open(self, client: _Client, subscribe: bool) -> str | None:
        """Connect and set up one connection; None on success, else the failure kind."""
        loop = asyncio.get_running_loop()
        t = self.target
        client.ready = loop.create_future()
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                client.conn = await leanws.connect(
                    t.host,
                    t.port,
                    t.path,
                    headers=self.headers,
                    on_text=client.on_text,
                    on_close=client.on_close,
                    timeout=self.options.connect_timeout,
                    ssl=t.ssl,
                )
                if subscribe:
                    client.conn.send_text(self._subscribe)
                outcome = await client.ready
        except (OSError, TimeoutError, leanws.HandshakeError) as exc:
            outcome = _failure_kind(exc)
        except BaseException:  # cancelled mid-setup: not in any list yet, so drop it here
            if client.conn is not None:
                client.conn.abort()
            raise
        client.ready = None
        if outcome is not None and client.conn is not None:
            client.conn.abort()
        return outcome

    async def _connect_publishers(self) -> None:
        for i in range(self.options.publisher_count):
            client = _Client(self.shared, "observer" if i == 0 else "publisher")
            self.publishers.append(client)
            outcome = await self._open(client, subscribe=i == 0)
            if outcome is not None:
                raise LoadTestError(
                    f"the publisher could not connect to {safe_url(self.options.url)}:"
                    f" {_kind_text(outcome)}{_hint(outcome)}",
                    status=EXIT_FAILED,
                )

    async def _connect_clients(self) -> None:
        options = self.options
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = options.clients
        shared = self.shared

        async def worker() -> None:
            while self.attempted < n and not self.gave_up:
                i = self.attempted
                self.attempted += 1
                if options.ramp is not None:
                    delay = start + i / options.ramp - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                client = _Client(shared, "client")
                outcome = await self._open(client, subscribe=True)
                if outcome is None:
                    self.clients.append(client)
                    shared.connected += 1
                else:
                    self.failures[outcome] += 1
                    if shared.connected == 0 and sum(self.failures.values()) >= GIVE_UP:
                        self.gave_up = True

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(options.concurrency, n)):
                tg.create_task(worker())
        self.connect_seconds = loop.time() - start

    # -- publishing ------------------------------------------------------------------------

    async def _publish(self) -> None:
        options = self.options
        loop = asyncio.get_running_loop()
        interval = 1.0 / options.rate
        count = math.ceil(options.duration * options.rate - 1e-9)
        topic = self.topic
        run_id = self.shared.run_id
        dumps = orjson.dumps
        start = loop.time()
        self.shared.t0 = time.time()
        k = 0
        while k < count:
            now = loop.time()
            due = start + k * interval
            if due > now:
                await asyncio.sleep(due - now)
                continue
            live = [p.conn for p in self.publishers if p.conn is not None and p.conn.open]
            if not live:
                break  # every publisher is gone (a disconnect, reported as such)
            while k < count and start + k * interval <= now:
                message = {
                    "type": "publish",
                    "topic": topic,
                    "data": {"run": run_id, "id": k, "t": time.time()},
                }
                live[k % len(live)].send_text(dumps(message))
                k += 1
        self.published = k
        if k == count:  # the phase lasts `duration`, the last interval included
            end = start + options.duration
            if end > loop.time():
                await asyncio.sleep(end - loop.time())
        self.publish_seconds = loop.time() - start

    def _expected(self) -> int:
        observer = self.publishers[0] if self.publishers else None
        if observer is not None and not observer.dropped:
            return observer.received
        return self.published

    def _drained(self) -> bool:
        expected = self._expected()
        refused = any(key.startswith("publish:") for key in self.shared.server_errors)
        if expected < self.published and not refused:
            # The pong can overtake events a bus sequences asynchronously (Redis).
            return False
        live = [c.received for c in self.clients if not c.dropped]
        return sum(live) >= expected * len(live)

    async def _sync(self, client: _Client) -> None:
        """Until `client` gets a pong: the server has handled every message it sent before
        (and queued, on this connection, every event sequenced before). The ping is resent
        every SYNC_EVERY seconds: a publisher over its rate limit has it dropped too."""
        conn = client.conn
        client.sync = asyncio.Event()
        while conn is not None and conn.open and not client.sync.is_set():
            conn.send_text(_SYNC_PING)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SYNC_EVERY):
                    await client.sync.wait()

    async def _drain(self) -> None:
        """Wait, up to drain_timeout, until the observer's count is final (the publishers,
        then the observer, synced by a ping) and every client has that many events."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.drain_timeout):
                for publisher in self.publishers[1:]:
                    await self._sync(publisher)
                if self.publishers:
                    await self._sync(self.publishers[0])
                # A sum over every client, re-evaluated a few times a second: cheaper than
                # a check in the per-delivery path.
                while not self._drained():  # noqa: ASYNC110
                    await asyncio.sleep(DRAIN_POLL)

    async def _close_all(self) -> None:
        self.shared.closing = True
        conns = [c.conn for c in (*self.clients, *self.publishers) if c.conn is not None]
        for conn in conns:
            conn.close(1000)
        pending = {conn.closed for conn in conns if not conn.closed.done()}
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.options.close_timeout)
            self.close_timeouts = len(late)
        for conn in conns:
            conn.abort()

    def abort_all(self) -> None:
        self.shared.closing = True
        for c in (*self.clients, *self.publishers):
            if c.conn is not None:
                c.conn.abort()

    # -- progress --------------------------------------------------------------------------

    async def _progress_loop(self, out: TextIO) -> None:
        loop = asyncio.get_running_loop()
        shared = self.shared
        last_count, last_at = shared.deliveries, loop.time()
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            now = loop.time()
            rate = (shared.deliveries - last_count) / max(now - last_at, 1e-9)
            last_count, last_at = shared.deliveries, now
            width = shutil.get_terminal_size().columns - 1  # a wrapped line is not redrawn
            out.write("\r\033[K" + self._progress_line(rate)[:width])
            out.flush()

    def _progress_line(self, rate: float) -> str:
        """One status line, most important first (a narrow terminal cuts the end)."""
        shared, n = self.shared, self.options.clients
        failed = sum(self.failures.values())
        fails = f", {failed:,} failed" if failed else ""
        drops = f", {len(shared.disconnects):,} dropped" if shared.disconnects else ""
        if self.phase == "connecting":
            return f"connecting {shared.connected:,}/{n:,}{fails}"
        if self.phase == "publishing":
            elapsed = min(time.time() - shared.t0, self.options.duration)
            done = int(10 * elapsed / self.options.duration)
            head = f"[{'#' * done}{'-' * (10 - done)}] {elapsed:.1f}/{self.options.duration:g} s"
        else:
            head = self.phase
        return (
            f"{head}  {shared.connected:,}/{n:,} clients{fails}{drops}"
            f"  p99 {_ms(shared.percentile(0.99))}  {rate:,.0f} deliveries/s"
        )

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> Report:
        out = self.progress
        # The progress line is this method's task: cancelled and awaited on every way out
        # (asyncio.wait: its CancelledError stays its own, ours still propagates).
        ticker = asyncio.create_task(self._progress_loop(out)) if out is not None else None
        try:
            await self._connect_publishers()
            await self._connect_clients()
            if self.clients:
                self.phase = "publishing"
                await self._publish()
                self.phase = "draining"
                await self._drain()
            self.phase = "closing"
            await self._close_all()
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.wait([ticker])
            if out is not None:
                out.write("\r\033[K")
                out.flush()
        return self._report()

    def _report(self) -> Report:
        shared = self.shared
        observer = self.publishers[0] if self.publishers else None
        sequenced = observer.received if observer is not None and not observer.dropped else None
        expected_each = self._expected()
        # Lost deliveries are counted for the clients that stayed until the final close;
        # a client that was disconnected is reported as a disconnect.
        stayed = [c for c in self.clients if not c.dropped]
        lost = sum(max(0, expected_each - c.received) for c in stayed)
        latency: dict[str, float | None] = {
            "min": shared.lat_min if shared.deliveries else None,
            "p50": shared.percentile(0.50),
            "p90": shared.percentile(0.90),
            "p99": shared.percentile(0.99),
            "max": shared.lat_max if shared.deliveries else None,
            "mean": shared.lat_sum / shared.deliveries if shared.deliveries else None,
        }
        span = shared.last_delivery - shared.t0 if shared.deliveries else 0.0
        return Report(
            url=safe_url(self.options.url),
            topic=self.topic,
            clients=self.options.clients,
            duration=self.options.duration,
            rate=self.options.rate,
            publishers=self.options.publisher_count,
            connected=len(self.clients),
            connect_seconds=self.connect_seconds,
            failures=dict(self.failures),
            published=self.published,
            sequenced=sequenced,
            publish_seconds=self.publish_seconds,
            expected=expected_each * len(stayed),
            received=sum(c.received for c in stayed),
            lost=lost,
            missing=sum(c.missing for c in self.clients),
            gapped=sum(c.gapped for c in self.clients),
            gaps=sum(c.gaps for c in self.clients),
            duplicates=sum(c.duplicates for c in self.clients),
            server_errors=dict(shared.server_errors),
            invalid=shared.invalid,
            latency=latency,
            samples=shared.deliveries,
            per_second=list(shared.per_second),
            span=span,
            disconnects=list(shared.disconnects),
            close_timeouts=self.close_timeouts,
            gave_up=self.gave_up,
            histogram=list(shared.hist),
        )


def _hint(kind: str) -> str:
    return {
        "refused": " — is `wirestate serve` running?",
        "timeout": " — is the host reachable and the port a wirestate server?",
        "http_401": " — the server wants a token: --token",
        "http_403": " — the server refused this origin or token",
        "http_404": " — check the path (the hub serves /ws)",
        "http_429": " — the server's [limits] max_connections_per_ip is reached",
        "http_503": " — the server is at max_connections or shutting down",
    }.get(kind, "")


async def run_loadtest(options: LoadTestOptions, *, progress: TextIO | None = None) -> Report:
    """Run the load test `options` describes (module docstring) and return its report.

    Raises `LoadTestError` when the options are invalid, the descriptors do not fit, or no
    publisher can connect. `progress`: where the progress line is redrawn (a terminal), or
    None for none. Cancellation drops every connection and propagates.
    """
    problem = options.check()
    if problem is not None:
        raise LoadTestError(problem)
    ensure_fds(options.clients + options.publisher_count + FD_RESERVE)
    run = _Run(options, progress)
    try:
        return await run.run()
    finally:
        run.abort_all()  # idempotent: only what is still open (an error, a cancellation)


def _load_matplotlib() -> Any:
    """matplotlib's Figure class, or LoadTestError naming the extra to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LoadTestError("--plot needs matplotlib: pip install 'wirestate[plot]'") from None
    return Figure


def plot_report(report: Report, path: Path) -> None:
    """Draw the latency distribution (log x) and the throughput per second into `path`
    (PNG). Raises LoadTestError without matplotlib."""
    figure_class = _load_matplotlib()
    fig = figure_class(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    group = 5  # 5 % bins for the eye; the percentiles come from the 1 % histogram
    counts = [sum(report.histogram[i : i + group]) for i in range(0, _BUCKETS, group)]
    edges = [math.exp(i / _PER_E) * 1e-3 for i in range(0, _BUCKETS + group, group)]
    edges = edges[: len(counts) + 1]
    used = [i for i, c in enumerate(counts) if c]
    if used:
        lo, hi = max(0, used[0] - 1), min(len(counts), used[-1] + 2)
        left.stairs(counts[lo:hi], edges[lo : hi + 1], fill=True, alpha=0.6)
        for name, style in (("p50", "--"), ("p99", ":"), ("max", "-.")):
            value = report.latency[name]
            if value is not None:
                left.axvline(
                    value * 1e3,
                    color="black",
                    linestyle=style,
                    linewidth=1,
                    label=f"{name} {_ms(value)}",
                )
        left.legend(loc="upper right", fontsize="small")
    left.set_xscale("log")
    left.set_xlabel("latency, publish to receive (ms)")
    left.set_ylabel("deliveries")
    left.set_title(f"latency ({report.samples:,} deliveries)")
    right.stairs(report.per_second, range(len(report.per_second) + 1))
    right.set_xlabel("seconds since the first publish")
    right.set_ylabel("deliveries per second")
    right.set_ylim(bottom=0)
    right.set_title(f"throughput ({report.clients:,} clients, {report.rate:g} events/s)")
    drops = Counter(int(at) for at, *_ in report.disconnects if at is not None and at >= 0)
    if drops:
        twin = right.twinx()
        seconds = max(len(report.per_second), max(drops) + 1)
        twin.stairs([drops.get(s, 0) for s in range(seconds)], range(seconds + 1), color="red")
        twin.set_ylabel("disconnects per second", color="red")
        twin.set_ylim(bottom=0)
    fig.suptitle(f"wirestate loadtest {report.url}", fontsize="medium")
    fig.savefig(path, dpi=100)


async def execute(
    options: LoadTestOptions,
    *,
    json_output: bool = False,
    plot: Path | None = None,
    out: TextIO,
    err: TextIO | None = None,
) -> int:
    """``wirestate loadtest``: run, print the summary (human or one JSON object) on `out`,
    draw `plot`; return the exit status (0 ok, 1 the run failed, 2 bad usage or setup).

    The progress line goes to `err` when it is a terminal and `json_output` is off. A failed
    run also writes its one-line reason to `err`.
    """
    err = sys.stderr if err is None else err
    try:
        problem = options.check()
        if problem is not None:
            raise LoadTestError(problem)
        if plot is not None:
            _load_matplotlib()  # before the run, not after minutes of it
        tty = not json_output and hasattr(err, "isatty") and err.isatty()
        report = await run_loadtest(options, progress=err if tty else None)
    except LoadTestError as exc:
        err.write(f"wirestate loadtest: {exc}\n")
        return exc.status
    if json_output:
        out.write(orjson.dumps(report.to_dict()).decode() + "\n")
    else:
        out.write(report.render())
    out.flush()
    failure = report.failure
    status = EXIT_OK if failure is None else EXIT_FAILED
    if plot is not None:
        try:
            plot_report(report, plot)
        except OSError as exc:
            err.write(f"wirestate loadtest: cannot write {plot}: {exc.strerror or exc}\n")
            status = status or EXIT_USAGE
        else:
            if not json_output:
                out.write(f"plot         {plot}\n")
    if failure is not None:
        err.write(f"wirestate loadtest: FAILED: {failure}\n")
    return status
