"""Admission: whether a WebSocket upgrade may proceed, the same for every transport.

Rules of this module:

* One decision per upgrade, in a fixed order, the first refusal wins: shutting down (503),
  the total connection limit (503), the per-IP limit (429), the Host header (421), the
  Origin (403; both in `access`), the token (401). A refusal is counted by reason in
  ``wirestate_connections_rejected_total`` and logged with its reason and status, never
  with the token. Without a token, ``[auth] anonymous`` grants its topics to subscribe to.
* A refusal's body names the reason only: never the token, never a library's text.
* The counts the limits read (connections in total and per peer address) change only
  through `admitted` and `released`, which the connection's session calls once each; the
  decision itself changes nothing, so a refused or abandoned upgrade leaves no trace but
  its counter.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Final

from wirestate.adapters.server.access import Access, loopback
from wirestate.adapters.server.auth import OPEN, Authenticator, AuthError, Grants
from wirestate.models.settings import Settings

__all__ = ["HOST_REFUSED", "Admission", "Refusal", "RefusalReason", "loopback"]

log = logging.getLogger("wirestate.server")

#: The body of a 421: which setting decides, never the name that was asked for.
HOST_REFUSED: Final = "this hub does not answer to that host name (see [server] allowed_hosts)"


class RefusalReason(StrEnum):
    """Why an upgrade was refused: the label of ``wirestate_connections_rejected_total``."""

    SHUTTING_DOWN = "shutting_down"
    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"
    ORIGIN = "origin"
    HOST = "host"  # a Host name this hub does not answer to (DNS rebinding, a wrong route)
    AUTH = "auth"
    MAX_HANDSHAKES = "max_handshakes"  # too many upgrades in flight: dropped at accept
    NOT_STARTED = "not_started"  # an ASGI app asked before its lifespan started the hub
    OPEN_MODE = "open_mode"  # open mode reached on a non-loopback address (ASGI)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """An upgrade refused before it was accepted: the HTTP status, the reason counted in
    ``wirestate_connections_rejected_total{reason}``, and the body (the reason only)."""

    status: int
    reason: RefusalReason
    text: str


class Admission:
    """The upgrade decision and the counts it reads (see the module docstring)."""

    def __init__(self, settings: Settings, auth: Authenticator, rejections: Counter[str]) -> None:
        self.settings = settings
        self.auth = auth
        self.access = Access(settings)
        #: Set once shutdown begins: every later upgrade is refused, and a session whose
        #: upgrade was decided before it re-checks before registering.
        self.closing = False
        self.connections = 0
        self.per_ip: dict[str, int] = {}
        #: Refusals by reason, exported as ``wirestate_connections_rejected_total``.
        self.rejections = rejections

    def decide(
        self, ip: str, headers: Sequence[tuple[str, str]], token: Callable[[], str | None]
    ) -> Refusal | Grants | None:
        """The checks before accepting an upgrade from ``ip`` (module docstring). Returns
        the refusal (counted and logged), the token's grants (or the anonymous ones), or None
        when the token is to come in the first message (``[auth] first_message``).
        ``token`` is called only when a token is needed."""
        limits = self.settings.limits
        if self.closing:
            return self.refuse(503, RefusalReason.SHUTTING_DOWN, "shutting down")
        if self.connections >= limits.max_connections:
            return self.refuse(503, RefusalReason.MAX_CONNECTIONS, "too many connections")
        if self.per_ip.get(ip, 0) >= limits.max_connections_per_ip:
            return self.refuse(429, RefusalReason.MAX_CONNECTIONS_PER_IP, "too many connections")
        refusal = self.screen(headers)
        if refusal is not None:
            return refusal
        if not self.auth.required:
            return OPEN
        try:
            return self.grants(token())
        except AuthError as exc:
            # The body names the reason only: never the token, never the library's text.
            return self.refuse(401, RefusalReason.AUTH, f"unauthorized: {exc.reason}")

    def grants(self, value: str | None) -> Grants | None:
        """What an upgrade bringing the token ``value`` (None: none) gets: `OPEN` without
        ``[auth]``, the anonymous grants without a token under ``[auth] anonymous``, None when
        the token is to come in the first message, else the token's grants. Raises
        `AuthError` when the upgrade would be refused with 401. Counts nothing."""
        auth = self.settings.auth
        if not self.auth.required:
            return OPEN
        if not value and self.auth.anonymous is not None:
            return self.auth.anonymous  # an auth message may still replace them
        if value is None and auth is not None and auth.first_message:
            return None  # the token comes in the first message, within a deadline
        return self.auth.authenticate(value, now=time.time())

    def screen(self, headers: Sequence[tuple[str, str]]) -> Refusal | None:
        """The Host and Origin checks (`access`) of a request's ``headers`` (name, value
        pairs, names in any case), for upgrades and HTTP requests on every transport. A
        repeated Host or Origin is refused (400): no browser sends either twice, and which
        of two a parser reads is not a thing to depend on."""
        hosts = [value for name, value in headers if name.lower() == "host"]
        origins = [value for name, value in headers if name.lower() == "origin"]
        if len(hosts) > 1 or len(origins) > 1:
            return self.refuse(400, RefusalReason.HOST, "one Host, at most one Origin")
        host = hosts[0] if hosts else None
        origin = origins[0] if origins else None
        if self.access.host_refused(host):
            return self.refuse(421, RefusalReason.HOST, HOST_REFUSED)
        if self.access.origin_refused(origin, host):
            return self.refuse(403, RefusalReason.ORIGIN, "origin not allowed")
        return None

    def refuse(self, status: int, reason: RefusalReason, text: str) -> Refusal:
        """Count and log a refused upgrade; ``text`` is the body, a fixed sentence."""
        self.rejections[reason.value] += 1
        log.info("upgrade refused", extra={"reason": reason.value, "status": status})
        return Refusal(status, reason, text + "\n")

    def admitted(self, ip: str) -> None:
        """A connection from ``ip`` was registered: it counts against the limits."""
        self.connections += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def released(self, ip: str) -> None:
        """The connection from ``ip`` was unregistered."""
        self.connections -= 1
        left = self.per_ip[ip] - 1
        if left:
            self.per_ip[ip] = left
        else:
            del self.per_ip[ip]
