"""Who may reach the hub before any token is read: the Host and Origin checks, and the
client's address behind trusted proxies. Pure functions of the settings and the request
head, the same for every transport and for HTTP and WebSocket alike (docs/security.md,
"Access").

Rules of this module:

* **Host.** With ``[server] allowed_hosts``, the Host header's name (port aside, case and a
  trailing dot ignored) must be one of them. Without it, open mode (no ``[auth]``) answers
  loopback names only (``localhost``, ``*.localhost``, 127.0.0.0/8, ``::1``), so a page
  whose host name was rebound to 127.0.0.1 reaches nothing; so does ``[auth]
  allowed_origins`` alone (no token is checked there either: a rebound page's same-origin
  GET carries no Origin). With tokens, any name is answered (the token is the check). A
  request without a Host header (HTTP/1.0 tools) is not a browser's and passes.
* **Origin.** A request without ``Origin`` is not a page's and passes. With ``[auth]
  allowed_origins`` the origin must be one of them (``null`` never is). Without it, open mode
  answers only its own pages: a loopback origin (or, with ``allowed_hosts``, one of those
  names) on the port of the request's Host; with tokens and no list, the Origin is not
  checked.
* **Client address.** Only when the peer is in ``[server] trusted_proxies``: the right-most
  hop of the one header the proxy writes (``[server] forwarded_header``: ``X-Forwarded-For``
  or ``Forwarded``'s ``for=``) that is not itself a trusted proxy. The other header is never
  read: a proxy passes it through as the client wrote it. Hops left of the chosen one were
  written by the client and are never read either. A hop that is not an address
  (``unknown``, an obfuscated name) ends the walk at the peer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final, TypeAlias

from wirestate.adapters.server.auth import origin_allowed, parse_origin
from wirestate.models.settings import Settings

__all__ = ["Access", "loopback", "loopback_name", "split_host"]

_Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is on the loopback interface."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def loopback_name(name: str) -> bool:
    """`loopback`, and the names browsers resolve to loopback themselves (``*.localhost``,
    RFC 6761), lower-case and without a trailing dot."""
    return loopback(name) or name.endswith(".localhost")


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header as (name, port): the name lower-cased without a trailing dot or IPv6
    brackets; None when it is malformed."""
    value = value.strip()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text = value.partition(":")
        if not sep:
            port_text = None
    name = name.lower().rstrip(".")
    if not name or any(c.isspace() or c in "/?#@" for c in name):
        return None
    if port_text is None:
        return name, None
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        return None
    if int(port_text) > 65535:
        return None
    return name, int(port_text)


class Access:
    """The Host, Origin and client-address rules of one hub (the module docstring)."""

    __slots__ = ("allowed_hosts", "allowed_origins", "forwarded_header", "open", "proxies")

    def __init__(self, settings: Settings) -> None:
        server, auth = settings.server, settings.auth
        #: No token is checked (no ``[auth]``, or ``allowed_origins`` alone): nothing but the
        #: Host name stops a rebound page's same-origin GET (which carries no Origin).
        self.open = auth is None or not auth.tokens
        self.allowed_origins = auth.allowed_origins if auth is not None else ()
        self.allowed_hosts = frozenset(
            h.lower().rstrip(".").strip("[]") for h in server.allowed_hosts
        )
        #: The one header a trusted proxy writes the client's address in (the other is the
        #: client's own, passed through, so it is never read).
        self.forwarded_header = server.forwarded_header
        self.proxies: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(entry, strict=False) for entry in server.trusted_proxies
        )

    def host_refused(self, host: str | None) -> bool:
        """Whether a request with this Host header is refused (421)."""
        if host is None:
            return False
        parsed = split_host(host)
        if parsed is None:
            return True
        name = parsed[0]
        if self.allowed_hosts:
            return name not in self.allowed_hosts
        return self.open and not loopback_name(name)

    def origin_refused(self, origin: str | None, host: str | None) -> bool:
        """Whether a request with this Origin (and Host) header is refused (403)."""
        if origin is None:
            return False
        if self.allowed_origins:
            return not origin_allowed(origin, self.allowed_origins)
        if not self.open:
            return False
        parsed = parse_origin(origin)
        if parsed is None:
            return True
        scheme, name, port = parsed
        name = name.rstrip(".")
        if not (name in self.allowed_hosts if self.allowed_hosts else loopback_name(name)):
            return True
        own = split_host(host) if host is not None else None
        if own is None:
            return host is not None  # a malformed Host: refused; none at all: name decides
        return port != (own[1] or _DEFAULT_PORTS[scheme])

    def client_ip(self, peer: str, headers: Iterable[tuple[str, str]]) -> str:
        """The client's address: ``peer``, or what a trusted proxy says it forwarded."""
        if not self.proxies or not self._trusted_text(peer):
            return peer
        hops = _hops(headers, self.forwarded_header)
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                return peer
            if not self._trusted(address):
                return str(address)
        first = _address(hops[0]) if hops else None
        return str(first) if first is not None else peer

    def _trusted_text(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return self._trusted(address)

    def _trusted(self, address: _Address) -> bool:
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped
        return any(address in network for network in self.proxies)


def _hops(headers: Iterable[tuple[str, str]], which: str) -> list[str]:
    """The forwarded-for hops of header ``which`` (``forwarded``: its ``for=`` parameters;
    ``x-forwarded-for``: its list), left to right, repeated headers read in order."""
    hops: list[str] = []
    for name, value in headers:
        if name.lower() != which:
            continue
        if which == "forwarded":
            for element in value.split(","):
                for pair in element.split(";"):
                    key, sep, val = pair.strip().partition("=")
                    if sep and key.strip().lower() == "for":
                        hops.append(val.strip().strip('"'))
        else:
            hops.extend(part.strip() for part in value.split(","))
    return [hop for hop in hops if hop]


def _address(hop: str) -> _Address | None:
    """An address from one hop (``192.0.2.1``, ``192.0.2.1:4711``, ``[2001:db8::1]:4711``,
    ``2001:db8::1``), or None for ``unknown``, an obfuscated name or garbage."""
    text = hop
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
