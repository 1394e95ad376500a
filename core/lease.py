"""One node's side of a lease held in a shared store (the Redis bus): who polls a source. Pure.

A shared source is polled by one node of a cluster at a time, the one holding its lease.
The store keeps the lease as a key with a time to live (``ttl``) and a fencing token that
grows with every acquisition; this module decides, on the clock the adapter hands in, when
to ask the store for what, and when this node leads or must stop leading. The adapter does
the I/O (``adapters/server/leases.py``) and reports each answer back.

Rules:

* Two states, ``follower`` and ``leader``, in one table (``TRANSITIONS``) run by the core's
  engine; an input the table does not list for the current state changes nothing (a
  renewal confirmed after the lead expired here, a loss reported to a follower:
  ``REFUSED``).
* A follower asks to ``Acquire`` at once, then again when the holder's lease would expire
  (the store says how long it has left), at least every ``ttl / 3``; a leader asks to
  ``Renew`` every ``ttl / 3``.
* A leader counts a renewal from the moment the request was *sent*: the store started the
  new ``ttl`` later than that, never earlier, so this node's idea of its lease never
  outlives the store's. It stops leading (``Follow``, cause ``expired``) when no renewal
  sent in the last ``ttl - margin`` seconds was confirmed: ``margin`` covers clock drift
  and the time to stop publishing. A renewal the store refuses (another token holds the
  key), a fenced write refused by the store, or ``release`` end the lead at once.
* Fencing is the store's: a lease that ended here may still be believed by a paused
  process, so every write the leader makes carries the token and the store refuses a
  write whose token no longer holds the key. This module only hands the token out.
* Inputs take ``now``; decisions are queued and drained with ``actions()`` (``Lead`` when
  this node starts leading, ``Follow`` when it stops). ``due(now)`` says what to ask the
  store now, ``next_deadline()`` when to call ``due`` next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Final

from wirestate.core.machine import Engine, build_machine


class LeaseState(Enum):
    FOLLOWER = "follower"
    LEADER = "leader"


class LostCause(StrEnum):
    """Why a node stopped leading."""

    EXPIRED = "expired"  # no renewal confirmed within ttl - margin
    REFUSED = "refused"  # the store holds another token
    FENCED = "fenced"  # a fenced write was refused: another node holds the lease
    RELEASED = "released"  # this node gave it up (shutdown)


_F, _L = LeaseState.FOLLOWER, LeaseState.LEADER

#: The lease's table: the store's answers move it; nothing else does.
TRANSITIONS: Final[list[dict[str, Any]]] = [
    {"trigger": "acquired", "source": _F, "dest": _L},
    {"trigger": "renewed", "source": _L, "dest": None},  # internal: the lead goes on
    {"trigger": "lost", "source": _L, "dest": _F},
]
#: The (state, trigger) pairs the table refuses on purpose, and why.
REFUSED: Final[dict[tuple[LeaseState, str], str]] = {
    (_F, "renewed"): "a renewal confirmed after the lead expired here does not revive it",
    (_F, "lost"): "a follower has nothing to lose",
    (_L, "acquired"): "the adapter asks only as a follower (a bug: Lease.acquired raises)",
}
ENGINE: Final = Engine(build_machine(TRANSITIONS, LeaseState, _F), LeaseState)


@dataclass(frozen=True, slots=True)
class Acquire:
    """Ask the store for the lease (set it with a new token if nobody holds it)."""


@dataclass(frozen=True, slots=True)
class Renew:
    """Ask the store to extend the lease, if ``token`` still holds it."""

    token: str


@dataclass(frozen=True, slots=True)
class Lead:
    """This node holds the lease now: start polling (from the last state the cluster
    published), writing with ``token``. ``fence`` is the token's rank."""

    token: str
    fence: int


@dataclass(frozen=True, slots=True)
class Follow:
    """This node no longer holds the lease: stop polling and writing now."""

    cause: LostCause


class Lease:
    """One lease as this node sees it. ``ttl`` and ``margin`` in seconds, ``0 <= margin <
    ttl * 2 / 3`` (a renewal every ``ttl / 3`` must be able to land before the deadline).
    ``ValueError`` otherwise. Usable for the life of the node; ``release`` may be followed
    by a new ``due``."""

    def __init__(self, name: str, ttl: float, *, margin: float | None = None) -> None:
        if not (isinstance(ttl, int | float) and 0 < ttl < math.inf):
            raise ValueError(f"ttl must be a finite number of seconds > 0, got {ttl!r}")
        margin = ttl / 5 if margin is None else margin
        if not 0 <= margin < ttl * 2 / 3:
            raise ValueError(f"margin must be in [0, ttl * 2/3), got {margin!r}")
        self.name = name
        self.ttl = float(ttl)
        self.margin = float(margin)
        self.every = self.ttl / 3
        self.state = LeaseState.FOLLOWER
        self.token: str | None = None
        self.fence = 0
        self._confirmed = -math.inf  # when the last confirmed request was sent
        self._next = -math.inf  # when to ask the store again
        self._asked = False  # a request is in flight
        self._actions: list[Lead | Follow] = []

    @property
    def leader(self) -> bool:
        return self.state is LeaseState.LEADER

    def _move(self, what: str) -> bool:
        return ENGINE.allows(self.state, what) and ENGINE.fire(self, what)

    # -- what to do ----------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When to call ``due`` next (a lead that is about to expire included)."""
        if self.leader:
            return min(self._next, self._confirmed + self.ttl - self.margin)
        return self._next

    def due(self, now: float) -> Acquire | Renew | None:
        """What to ask the store now, if anything; one request at a time (report its answer
        before the next). Ends a lead whose renewals did not land in time first."""
        self.expire(now)
        if self._asked or now < self._next:
            return None
        self._asked = True
        if self.leader:
            assert self.token is not None
            return Renew(self.token)
        return Acquire()

    def expire(self, now: float) -> bool:
        """End the lead if no renewal was confirmed in time; True when it ended now."""
        if self.leader and now >= self._confirmed + self.ttl - self.margin:
            self._lose(LostCause.EXPIRED)
            return True
        return False

    # -- the store's answers ---------------------------------------------------------------

    def acquired(self, token: str, fence: int, sent_at: float) -> None:
        """The ``Acquire`` sent at ``sent_at`` took the lease with ``token``."""
        self._asked = False
        if self.leader:
            raise RuntimeError(f"lease {self.name!r}: acquired while leading")
        self._move("acquired")
        self.token, self.fence = token, fence
        self._confirmed = sent_at
        self._next = sent_at + self.every
        self._actions.append(Lead(token, fence))

    def held(self, now: float, remaining: float) -> None:
        """The ``Acquire`` found the lease held by another node, for ``remaining`` seconds
        more: ask again when it would expire, and at least every ``ttl / 3``."""
        self._asked = False
        self._next = now + min(max(remaining, 0.0), self.every)

    def renewed(self, sent_at: float) -> None:
        """The ``Renew`` sent at ``sent_at`` was confirmed."""
        self._asked = False
        if not self.leader:
            return  # it had expired here meanwhile: the lead stays over
        self._move("renewed")
        self._confirmed = max(self._confirmed, sent_at)
        self._next = sent_at + self.every

    def refused(self) -> None:
        """The ``Renew`` found another token in the store: the lease is someone else's."""
        self._asked = False
        self._lose(LostCause.REFUSED)

    def fenced(self) -> None:
        """The store refused a write made with this node's token."""
        self._lose(LostCause.FENCED)

    def failed(self, now: float, retry: float) -> None:
        """The request got no answer (the link failed): ask again after ``retry`` seconds.
        A lead ends by itself if the renewals keep failing (``expire``)."""
        self._asked = False
        self._next = now + retry
        self.expire(now)

    def release(self) -> None:
        """This node gives the lease up (the adapter deletes the key if the token still
        holds it). Nothing more is asked until ``due``."""
        self._asked = False
        self._lose(LostCause.RELEASED)

    def _lose(self, cause: LostCause) -> None:
        if not self.leader:
            return
        self._move("lost")
        self.token = None
        self._confirmed = -math.inf
        self._next = -math.inf
        self._actions.append(Follow(cause))

    def actions(self) -> list[Lead | Follow]:
        """The decisions since the last call, in order."""
        out, self._actions = self._actions, []
        return out
