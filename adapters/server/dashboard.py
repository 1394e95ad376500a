"""The live dashboard at ``GET /`` (docs/operations.md).

A page served by the hub itself, from files shipped inside the package (no CDN, no
framework: ``static/dashboard.{html,js,css}``, read with `importlib.resources`, so a wheel
install works offline), and the JSON it reads:

* ``GET /`` the page; ``GET /static/<name>`` its script and style sheet, from a fixed
  allowlist (anything else, ``..`` included, is the router's 404), with an ``ETag`` and
  ``Cache-Control: no-cache`` (revalidated, answered 304 when unchanged).
* ``GET /static/wirestate.js`` and ``wirestate.d.ts``: the browser client the page is built
  on, for any page (docs/client-js.md); cacheable for an hour, readable cross-origin.
* ``GET /api/snapshot`` everything on the page at one moment (`snapshot`). The page polls it
  every second and, between polls, follows the ``clients``, ``circuit_breaker`` and
  ``system_status`` topics over its own ``/ws`` subscription, so a connection, a disconnect
  or a breaker transition shows at once.

Rules:

* The page and its assets are public: they hold no data. With ``[auth]`` the snapshot needs a
  token (``Authorization: Bearer`` or ``?token=``; 401 otherwise) and shows only what that
  token could subscribe to over ``/ws``: the connection sections need ``clients``, the
  breakers need ``circuit_breaker``, and topics and events are filtered by the token's
  ``subscribe`` claims. The page asks for a token, keeps it in ``sessionStorage``, and sends
  it as ``?token=`` on its WebSocket.
* A snapshot is a pure read of the hub, its pollers and its bus: it changes nothing, and it
  costs a bounded amount whatever the load (capped lists, histories read from their newest
  end). Rates and the disconnect timeline come from the topics' own histories, so the
  dashboard keeps no state of its own and several viewers cost no more than their requests.
* Nothing from a request or an exception reaches a response: errors are fixed texts. The
  page renders every value with ``textContent``/``createElementNS``, never as markup.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import orjson

from wirestate.adapters.server.auth import (
    OPEN,
    Authenticator,
    AuthError,
    Grants,
)
from wirestate.adapters.server.routes import (
    HttpRequest,
    HttpResponse,
    Router,
    error_response,
)
from wirestate.adapters.server.sources import BREAKER_TOPIC, SourcePoller
from wirestate.core import diagram
from wirestate.core.breaker import Breaker
from wirestate.core.breaker import table as breaker_table
from wirestate.core.causes import CloseCause
from wirestate.core.frames import iso_utc
from wirestate.core.hub import Hub
from wirestate.core.lifecycle import ConnState
from wirestate.core.topics import Topic

__all__ = [
    "ASSETS",
    "BREAKER_LAYOUT",
    "CLIENT_ASSETS",
    "REGISTERED_STATES",
    "SCHEMA_VERSION",
    "Asset",
    "Dashboard",
    "asset",
    "breaker_diagram",
    "snapshot",
]

SCHEMA_VERSION: Final = 1
CLIENTS_TOPIC: Final = "clients"

#: What ``/static/`` serves: every other name is a 404, so no path reaches the file system.
ASSETS: Final[Mapping[str, str]] = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
#: The browser client (docs/client-js.md), for any page to import: cached for an hour and
#: revalidated by ETag, readable from other origins (module scripts are fetched with CORS),
#: under the page's CSP.
CLIENT_ASSETS: Final[Mapping[str, str]] = {
    "wirestate.js": "text/javascript; charset=utf-8",
    "wirestate.d.ts": "application/typescript; charset=utf-8",
}
_CLIENT_CACHE: Final = "public, max-age=3600"
PAGE: Final = "dashboard.html"
_HTML: Final = "text/html; charset=utf-8"

#: The page loads only its own script and style and talks only to its own origin (CSP 3:
#: ``'self'`` covers ws:/wss: on the same host and port).
_PAGE_HEADERS: Final = (
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)

#: Caps that keep a snapshot's cost bounded on a busy hub (the totals are always exact).
MAX_CLIENTS: Final = 200
MAX_TOPICS: Final = 200
EVENT_TAIL: Final = 30
RECENT_DISCONNECTS: Final = 20
PREVIEW_CHARS: Final = 240
#: Seconds of history a topic's rate is measured over.
RATE_WINDOW: Final = 10.0
#: The disconnect timeline: this many seconds back, in buckets of this many seconds.
TIMELINE_WINDOW: Final = 300
TIMELINE_BUCKET: Final = 10

#: The lifecycle states a client in the registry can be in (lifecycle invariant 4: it holds
#: exactly the registered, not-yet-unregistered clients), in the table's order.
REGISTERED_STATES: Final = tuple(
    s
    for s in ConnState
    if s not in {ConnState.HANDSHAKING, ConnState.REJECTED, ConnState.UNREGISTERED}
)

#: Where each breaker state sits in the drawing, as (column, row). Placed by hand, since a
#: cyclic machine has no good automatic layered layout; the edges are the table's own
#: (`wirestate.core.diagram.edges`), and a test checks every state of the table is placed.
BREAKER_LAYOUT: Final[Mapping[str, tuple[int, int]]] = {
    "forced_open": (0, 0),
    "disabled": (2, 0),
    "closed": (0, 1),
    "open": (2, 1),
    "half_open": (1, 2),
}
#: Triggers only an operator fires: their edges are drawn dashed and unlabelled.
_MANUAL_TRIGGERS: Final = frozenset({"force_open", "disable", "reset"})
_GUARDS: Final = re.compile(r"\s*\[[^\]]*\]")


# --------------------------------------------------------------------------- assets


@dataclass(frozen=True)
class Asset:
    """One shipped file, read once: its bytes, content type and strong ETag."""

    body: bytes
    content_type: str
    etag: str


@functools.cache
def asset(name: str) -> Asset:
    """The page (`PAGE`) or an allowlisted asset (`ASSETS`); ``KeyError`` for anything else.

    Read through `importlib.resources` from ``wirestate/adapters/server/static/``: package data,
    installed with the wheel."""
    content_type = _HTML if name == PAGE else {**ASSETS, **CLIENT_ASSETS}[name]
    body = resources.files("wirestate.adapters.server").joinpath("static", name).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    return Asset(body, content_type, etag)


def _serve(
    request: HttpRequest,
    item: Asset,
    extra: Sequence[tuple[str, str]] = (),
    cache: str = "no-cache",
) -> HttpResponse:
    headers = [("etag", item.etag), ("cache-control", cache), *extra]
    if item.etag in _etags(request.header("if-none-match")):
        return HttpResponse(304, headers)
    return HttpResponse(200, [("content-type", item.content_type), *headers], item.body)


def _etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}


# --------------------------------------------------------------------------- the routes


#: Builds the snapshot for one request; the argument says which topics the requester may
#: see. None when the hub has not started.
SnapshotSource = Callable[[Callable[[str], bool]], dict[str, Any] | None]


class Dashboard:
    """The dashboard's HTTP handlers. ``mount`` adds them to the server's `Router`.

    ``source`` is the server's ``dashboard_snapshot``; ``auth`` decides whether
    ``/api/snapshot`` needs a token (the page and its assets never do)."""

    def __init__(self, source: SnapshotSource, auth: Authenticator) -> None:
        self._source = source
        self._auth = auth

    def mount(self, router: Router) -> Router:
        router.get("/", self.page).get("/api/snapshot", self.snapshot)
        for name in ASSETS:
            router.get(f"/static/{name}", functools.partial(self._asset, name))
        for name in CLIENT_ASSETS:
            router.get(f"/static/{name}", functools.partial(self._client_asset, name))
        return router

    async def page(self, request: HttpRequest) -> HttpResponse:
        return _serve(request, asset(PAGE), _PAGE_HEADERS)

    async def _asset(self, name: str, request: HttpRequest) -> HttpResponse:
        return _serve(request, asset(name), (("x-content-type-options", "nosniff"),))

    async def _client_asset(self, name: str, request: HttpRequest) -> HttpResponse:
        extra = (*_PAGE_HEADERS, ("access-control-allow-origin", "*"))
        return _serve(request, asset(name), extra, _CLIENT_CACHE)

    async def snapshot(self, request: HttpRequest) -> HttpResponse:
        try:
            grants = self._auth.authenticate_request(
                request.headers, request.target, now=time.time()
            )
        except AuthError as exc:
            return error_response(
                401,
                "unauthorized",
                f"a valid token is required ({exc.reason})",
                (("www-authenticate", "Bearer"), ("cache-control", "no-store")),
            )
        body = self._source(_visible(grants))
        if body is None:
            return error_response(503, "unavailable", "the hub has not started")
        return HttpResponse(
            200,
            (("content-type", "application/json"), ("cache-control", "no-store")),
            orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS),
        )


def _visible(grants: Grants) -> Callable[[str], bool]:
    if grants is OPEN:
        return _everything
    return grants.may_subscribe


def _everything(topic: str) -> bool:
    return True


# --------------------------------------------------------------------------- the snapshot


def snapshot(
    hub: Hub,
    now: float,
    *,
    pollers: Iterable[SourcePoller] = (),
    bus: Mapping[str, Any] | None = None,
    bus_breaker: Breaker | None = None,
    refused: Mapping[str, int] | None = None,
    visible: Callable[[str], bool] = _everything,
) -> dict[str, Any]:
    """Everything the page shows, at loop time ``now``; JSON-able, schema `SCHEMA_VERSION`.

    ``pollers`` are the server's sources (one breaker each), ``bus`` the bus's ``status()``
    and ``bus_breaker`` its link's breaker (a Redis bus), ``refused`` the upgrades refused by
    reason. Sections a requester may not see (``visible`` is false for ``clients`` or
    ``circuit_breaker``) are None; topics and events are filtered by ``visible``."""
    stats = hub.stats
    out: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "now": iso_utc(now + hub.wall_offset),
        "epoch": hub.epoch,
        "bus": dict(bus) if bus is not None else None,
        "totals": {
            "published": stats.published,
            "sent": stats.sent,
            "dropped": dict(stats.dropped),
            "refused": dict(refused or {}),
            "aborts": stats.aborts,
            "loop_stalls": stats.loop_stalls,
        },
        "connections": None,
        "clients": None,
        "disconnects": None,
        "breakers": None,
        "diagrams": {"breaker": breaker_diagram()},
    }
    if visible(CLIENTS_TOPIC):
        out["connections"] = _connections(hub)
        out["clients"] = _clients(hub, now)
        out["disconnects"] = _disconnects(hub, now)
    if visible(BREAKER_TOPIC):
        out["breakers"] = _breakers(pollers, bus_breaker, now)
    # Only recently published topics are read (at most `RECENT`, however many topics the
    # hub holds): the busiest ones are among them, and the newest events are theirs.
    held = hub.topics
    topics = [held[name] for name in reversed(held.recent) if visible(name)]
    out["topics"] = _topics(topics, now, total=len(held))
    out["events"] = _tail(topics, now)
    return out


def _connections(hub: Hub) -> dict[str, Any]:
    states = dict.fromkeys((s.value for s in REGISTERED_STATES), 0)
    for conn in hub.clients.values():
        states[conn.state.value] += 1
    return {"total": len(hub.clients), "states": states}


def _clients(hub: Hub, now: float) -> dict[str, Any]:
    newest = heapq.nlargest(MAX_CLIENTS, hub.clients.values(), key=lambda c: c.opened_at)
    rows = [
        {
            "id": conn.client_id,
            "state": conn.state.value,
            "age": _secs(now - conn.opened_at),
            "topics": sorted(conn.topics),
            "outbox": len(conn.outbox),
            "rtt": None if conn.rtt is None else round(conn.rtt, 6),
            "cause": conn.cause.value if conn.cause is not None else None,
        }
        for conn in newest
    ]
    return {"total": len(hub.clients), "shown": len(rows), "rows": rows}


def _disconnects(hub: Hub, now: float) -> dict[str, Any]:
    """Totals by cause (exact, from the hub's counters), and the timeline and recent list
    read from the ``clients`` topic's history (as far back as it reaches)."""
    totals = dict.fromkeys((c.value for c in CloseCause), 0)
    totals.update(hub.stats.disconnects)
    n = TIMELINE_WINDOW // TIMELINE_BUCKET
    buckets: list[dict[str, int]] = [{} for _ in range(n)]
    recent: list[dict[str, Any]] = []
    topic = hub.topics.get(CLIENTS_TOPIC)
    horizon = now - TIMELINE_WINDOW
    for event in reversed(topic.history) if topic is not None else ():
        if event.at < horizon and len(recent) >= RECENT_DISCONNECTS:
            break
        msg = orjson.loads(event.frame)
        data = msg.get("data")
        if not isinstance(data, dict) or data.get("event") != "disconnected":
            continue
        cause = str(data.get("cause") or "unknown")
        if event.at >= horizon:
            index = n - 1 - min(n - 1, int((now - event.at) // TIMELINE_BUCKET))
            buckets[index][cause] = buckets[index].get(cause, 0) + 1
        if len(recent) < RECENT_DISCONNECTS:
            recent.append(
                {
                    "client_id": data.get("client_id"),
                    "cause": cause,
                    "code": data.get("code"),
                    "duration": data.get("duration"),
                    "ts": msg.get("ts"),
                    "age": _secs(now - event.at),
                }
            )
    return {
        "totals": totals,
        "window": TIMELINE_WINDOW,
        "bucket": TIMELINE_BUCKET,
        "timeline": buckets,
        "recent": recent,
    }


def _breakers(
    pollers: Iterable[SourcePoller], bus_breaker: Breaker | None, now: float
) -> list[dict[str, Any]]:
    out = []
    for poller in pollers:
        snap = poller.snapshot(now)
        out.append(
            {
                "name": poller.breaker.name,
                "kind": "source",
                "topic": poller.topic,
                "diagram": "breaker",
                "state": snap.state,
                "failures": snap.consecutive_failures,
                "retry_after": _secs(snap.retry_after),
                "has_value": snap.has_value,
                "age": _secs(snap.age),
                "last_reason": snap.last_reason,
                "last_error": snap.last_error,  # an exception's type name, never its text
            }
        )
    if bus_breaker is not None:
        snap_bus = bus_breaker.snapshot(now)
        out.append(
            {
                "name": bus_breaker.name,
                "kind": "bus",
                "topic": None,
                "diagram": "breaker",
                "state": snap_bus.state.value,
                "failures": snap_bus.consecutive_failures,
                "retry_after": _secs(snap_bus.retry_after),
                "has_value": None,
                "age": None,
                "last_reason": None,
                "last_error": None,
            }
        )
    return out


def _topics(topics: list[Topic], now: float, total: int) -> dict[str, Any]:
    """The busiest of ``topics`` (the recently published ones) first, then by name, capped
    at `MAX_TOPICS`; ``total`` is how many topics the hub holds."""
    rated = sorted(((_rate(t, now), t) for t in topics), key=lambda p: (-(p[0] or 0.0), p[1].name))
    rows = [
        {
            "name": t.name,
            "seq": t.seq,
            "epoch": t.epoch,
            "rate": rate,
            "subscribers": len(t.subscribers),
            "policy": t.policy.value,
            "last_age": None if t.retained is None else _secs(now - t.retained.at),
        }
        for rate, t in rated[:MAX_TOPICS]
    ]
    return {"total": total, "considered": len(rated), "shown": len(rows), "rows": rows}


def _rate(topic: Topic, now: float) -> float | None:
    """Events per second over the last `RATE_WINDOW` seconds, from the topic's history; over
    a shorter span when the history is full and does not reach that far back. None without
    a history to read (``[history] size = 0``)."""
    history = topic.history
    if history.maxlen == 0:
        return None
    horizon = now - RATE_WINDOW
    count = 0
    oldest = now
    for event in reversed(history):
        if event.at < horizon:
            break
        count += 1
        oldest = event.at
    span = RATE_WINDOW
    if count and count == len(history) and count == history.maxlen:
        span = now - oldest  # the history was cut by size within the window
    return round(count / span, 3) if span > 0 else None


def _tail(topics: list[Topic], now: float) -> list[dict[str, Any]]:
    """The newest `EVENT_TAIL` events of these topics, newest first. Only the topics whose
    latest event is among the newest can hold one, so at most that many are read."""
    recent = heapq.nlargest(
        EVENT_TAIL,
        (t for t in topics if t.retained is not None),
        key=lambda t: t.retained.at if t.retained is not None else -math.inf,
    )
    # Without a history ([history] size = 0) a topic still has its latest event.
    candidates = [
        event
        for topic in recent
        for event in (
            itertools.islice(reversed(topic.history), EVENT_TAIL)
            if topic.history
            else [topic.retained]
        )
        if event is not None
    ]
    rows = []
    for event in heapq.nlargest(EVENT_TAIL, candidates, key=lambda e: (e.at, e.seq)):
        msg = orjson.loads(event.frame)
        preview = orjson.dumps(msg.get("data")).decode()
        if len(preview) > PREVIEW_CHARS:
            preview = preview[: PREVIEW_CHARS - 1] + "…"
        rows.append(
            {
                "topic": event.topic,
                "seq": event.seq,
                "ts": msg.get("ts"),
                "age": _secs(now - event.at),
                "stale": bool(msg.get("stale")),
                "data": preview,
            }
        )
    return rows


def _secs(value: float | None) -> float | None:
    """Seconds, rounded for display; None for none or an infinity (JSON has no inf)."""
    if value is None or not math.isfinite(value):
        return None
    return round(max(0.0, value), 3)


# --------------------------------------------------------------------------- the diagram


@functools.cache
def breaker_diagram() -> dict[str, Any]:
    """The breaker's state diagram as data for the page's renderer: states placed on a grid
    (`BREAKER_LAYOUT`), the table's state-changing rows as edges. ``label`` is the full
    row text (triggers and guards), ``short`` the triggers alone, ``manual`` true when
    only an operator fires them."""
    machine = breaker_table.MACHINE
    states = breaker_table.BreakerState
    edges = []
    for src, dst, label in diagram.edges(machine, states):
        bare = _GUARDS.sub("", label)  # "success [trials_suffice], reset" -> the triggers
        triggers = list(dict.fromkeys(t.strip() for t in bare.split(",") if t.strip()))
        edges.append(
            {
                "from": src,
                "to": dst,
                "label": label,
                "short": ", ".join(t for t in triggers if t not in _MANUAL_TRIGGERS),
                "manual": all(t in _MANUAL_TRIGGERS for t in triggers),
            }
        )
    return {
        "title": "Circuit breaker",
        "initial": breaker_table.INITIAL.value,
        "columns": 1 + max(c for c, _ in BREAKER_LAYOUT.values()),
        "rows": 1 + max(r for _, r in BREAKER_LAYOUT.values()),
        "states": [
            {"id": s.value, "col": BREAKER_LAYOUT[s.value][0], "row": BREAKER_LAYOUT[s.value][1]}
            for s in states
        ],
        "edges": edges,
    }
