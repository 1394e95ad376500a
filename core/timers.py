"""Keep-alive and close deadlines: every connection's timers in one heap. Pure.

Rules of this module:

* One heap serves every connection: 10,000 connections cost one ``next_deadline`` for the
  adapter to sleep until, not 10,000 timers. Entries are never removed; an entry whose
  connection has moved on (another deadline, another state) is skipped when it comes due,
  so ``next_deadline`` may be early and a tick then does nothing.
* An open connection is pinged every ``ping_interval``; a ping whose pong is ``ping_timeout``
  late is due as ``PONG`` (the hub closes with ``keepalive_timeout``). A pong received
  clears the deadline and records the round trip. Unsolicited pongs change nothing
  (RFC 6455 section 5.5.3).
* A connection whose close began with a pump still running is due as ``CLOSE`` after
  ``close_timeout`` (the hub aborts it), so a stuck pump cannot keep it registered.
* The stalled-loop rule: when the adapter's event loop was blocked, pong deadlines still
  pending when the stall began are pushed back by its length, because a pong may be sitting
  unread in a socket buffer, and a busy hub must not blame its peers.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Final

from wirestate.core.lifecycle import PUMPS, ConnState

if TYPE_CHECKING:
    from wirestate.core.connection import Connection

#: What came due: send a ping, a pong is overdue, a close is overdue.
PING: Final = 0
PONG: Final = 1
CLOSE: Final = 2

_OPEN: Final = ConnState.OPEN


class Timers:
    """The deadlines of every connection of one hub (see the module docstring)."""

    __slots__ = ("close_timeout", "heap", "ping_interval", "ping_timeout", "seq")

    def __init__(self, ping_interval: float, ping_timeout: float, close_timeout: float) -> None:
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.close_timeout = close_timeout
        self.heap: list[tuple[float, int, str, int]] = []
        self.seq = 0  # breaks ties in arming order

    def copy(self) -> Timers:
        other = Timers.__new__(Timers)
        other.ping_interval = self.ping_interval
        other.ping_timeout = self.ping_timeout
        other.close_timeout = self.close_timeout
        other.heap = self.heap.copy()
        other.seq = self.seq
        return other

    def next_deadline(self) -> float | None:
        """The earliest deadline, or None when nothing is armed."""
        return self.heap[0][0] if self.heap else None

    def opened(self, conn: Connection, now: float) -> None:
        """The connection is open: its first ping is due one interval from now."""
        conn.next_ping_at = now + self.ping_interval
        self._arm(conn.next_ping_at, conn, PING)

    def closing(self, conn: Connection, now: float) -> None:
        """Its close began: no pong is awaited any more, and a pump still running must end
        within ``close_timeout``."""
        conn.pong_deadline = None
        if PUMPS[conn.state] != (False, False):
            conn.close_deadline = now + self.close_timeout
            self._arm(conn.close_deadline, conn, CLOSE)

    def pong(self, conn: Connection, now: float) -> None:
        """A pong arrived: the round trip, if a ping was awaiting it."""
        if conn.pong_deadline is not None and conn.ping_sent_at is not None:
            conn.rtt = now - conn.ping_sent_at
            conn.pong_deadline = None

    def due(
        self, now: float, clients: Mapping[str, Connection]
    ) -> Iterator[tuple[int, Connection]]:
        """Pop what is due at ``now``, yielding ``(PING, conn)`` when a ping must be sent
        (its pong deadline and the next ping are armed already), ``(PONG, conn)`` when a
        pong is overdue and ``(CLOSE, conn)`` when a close is. The caller may arm new
        deadlines while iterating."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            when, _, client_id, kind = heapq.heappop(heap)
            conn = clients.get(client_id)
            if conn is None:
                continue
            if kind == PING:
                if conn.next_ping_at != when or conn.state is not _OPEN:
                    continue
                ping = conn.pong_deadline is None
                if ping:
                    conn.ping_sent_at = now
                    conn.pong_deadline = now + self.ping_timeout
                    self._arm(conn.pong_deadline, conn, PONG)
                conn.next_ping_at = now + self.ping_interval
                self._arm(conn.next_ping_at, conn, PING)
                if ping:
                    yield PING, conn
            elif kind == PONG:
                if conn.pong_deadline == when and conn.state is _OPEN:
                    yield PONG, conn
            elif conn.close_deadline == when and PUMPS[conn.state] != (False, False):
                conn.close_deadline = None
                yield CLOSE, conn

    def stalled(self, conns: Iterable[Connection], now: float, duration: float) -> int:
        """The loop was blocked for ``duration`` seconds ending at ``now``: push back the
        pong deadlines that were still pending when it began. Returns how many."""
        began = now - duration
        extended = 0
        for conn in conns:
            deadline = conn.pong_deadline
            if deadline is not None and deadline >= began and conn.state is _OPEN:
                conn.pong_deadline = deadline + duration
                self._arm(conn.pong_deadline, conn, PONG)
                extended += 1
        return extended

    def _arm(self, when: float, conn: Connection, kind: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, conn.client_id, kind))
