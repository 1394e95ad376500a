"""Decisions the core hands to its adapter, drained with ``Hub.actions()``.

Each is a frozen value so tests compare them with ``==``. The adapter performs them in order;
performing one never requires asking the core again, and every one is safe to perform for a
client that has meanwhile gone away (the adapter ignores unknown client ids).

Outgoing frames are not actions: they wait in each client's bounded outbox, drained by its
writer with ``Hub.drain(client_id)``, and ``Hub.take_ready()`` names the clients whose outbox
went from empty to non-empty (so the hot path creates no object per recipient).
"""

from __future__ import annotations

from dataclasses import dataclass

from wirestate.core.causes import CloseCause


@dataclass(frozen=True, slots=True)
class Ping:
    """Send a protocol ping to the client; report its pong with ``Hub.pong_received``."""

    client_id: str


@dataclass(frozen=True, slots=True)
class Close:
    """Begin closing: flush what the writer already holds, send a close frame with ``code``.

    ``reason`` is the cause's fixed name, never exception text. For causes the peer started
    (peer_close, read_error) no frame needs sending; the adapter just stops the writer.
    """

    client_id: str
    code: int
    cause: CloseCause
    reason: str


@dataclass(frozen=True, slots=True)
class Abort:
    """The close timeout passed with a pump still running: abort the transport and cancel
    the pumps. Each pump must still report ``reader_done``/``writer_done`` when it ends."""

    client_id: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the handshake (the adapter answers the upgrade with an HTTP error)."""

    client_id: str
    cause: CloseCause


@dataclass(frozen=True, slots=True)
class Unregistered:
    """The client left the registry: both pumps had finished. Emitted exactly once."""

    client_id: str
    cause: CloseCause
    code: int | None
    duration: float


Action = Ping | Close | Abort | Reject | Unregistered
