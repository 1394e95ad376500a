"""Admission: whether a WebSocket upgrade may proceed, the same for every transport.

Rules of this module:

* One decision per upgrade, in a fixed order, the first refusal wins: shutting down (503),
  the total connection limit (503), the per-IP limit (429), the Origin allowlist (403), the
  token (401). A refusal is counted by reason in ``wirestate_connections_rejected_total`` and
  logged with its reason and status, never with the token.
* A refusal's body names the reason only: never the token, never a library's text.
* The counts the limits read (connections in total and per peer address) change only
  through `admitted` and `released`, which the connection's session calls once each; the
  decision itself changes nothing, so a refused or abandoned upgrade leaves no trace but
  its counter.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from enum import StrEnum

from wirestate.adapters.server.auth import OPEN, Authenticator, AuthError, Grants, origin_allowed
from wirestate.models.settings import Settings

__all__ = ["Admission", "Refusal", "RefusalReason", "loopback"]

log = logging.getLogger("wirestate.server")


class RefusalReason(StrEnum):
    """Why an upgrade was refused: the label of ``wirestate_connections_rejected_total``."""

    SHUTTING_DOWN = "shutting_down"
    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"
    ORIGIN = "origin"
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


def loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is on the loopback interface."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class Admission:
    """The upgrade decision and the counts it reads (see the module docstring)."""

    def __init__(self, settings: Settings, auth: Authenticator, rejections: Counter[str]) -> None:
        self.settings = settings
        self.auth = auth
        #: Set once shutdown begins: every later upgrade is refused, and a session whose
        #: upgrade was decided before it re-checks before registering.
        self.closing = False
        self.connections = 0
        self.per_ip: dict[str, int] = {}
        #: Refusals by reason, exported as ``wirestate_connections_rejected_total``.
        self.rejections = rejections

    def decide(
        self, ip: str, origin: str | None, token: Callable[[], str | None]
    ) -> Refusal | Grants | None:
        """The checks before accepting an upgrade from ``ip`` (module docstring). Returns
        the refusal (counted and logged), the token's grants, or None when the token is to
        come in the first message (``[auth] first_message``). ``token`` is called only when
        a token is needed."""
        limits, auth = self.settings.limits, self.settings.auth
        if self.closing:
            return self.refuse(503, RefusalReason.SHUTTING_DOWN, "shutting down")
        if self.connections >= limits.max_connections:
            return self.refuse(503, RefusalReason.MAX_CONNECTIONS, "too many connections")
        if self.per_ip.get(ip, 0) >= limits.max_connections_per_ip:
            return self.refuse(429, RefusalReason.MAX_CONNECTIONS_PER_IP, "too many connections")
        if auth is not None and not origin_allowed(origin, auth.allowed_origins):
            return self.refuse(403, RefusalReason.ORIGIN, "origin not allowed")
        if not self.auth.required:
            return OPEN
        value = token()
        if value is None and auth is not None and auth.first_message:
            return None  # the token comes in the first message, within a deadline
        try:
            return self.auth.authenticate(value, now=time.time())
        except AuthError as exc:
            # The body names the reason only: never the token, never the library's text.
            return self.refuse(401, RefusalReason.AUTH, f"unauthorized: {exc.reason}")

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
