"""The load test's options and limits: what a run is asked to do, checked before it connects."""

from __future__ import annotations

import contextlib
import math
import ssl
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from pydantic import TypeAdapter, ValidationError

from wirestate.adapters.client.urls import safe_url
from wirestate.models.wire import Topic

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


_TOPIC: TypeAdapter[str] = TypeAdapter(Topic)


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
            target(self.url)
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


def target(url: str) -> _Target:
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
