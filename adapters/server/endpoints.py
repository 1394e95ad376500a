"""The HTTP endpoints beside ``/ws``: health, readiness, metrics, ``POST /publish`` and the
dashboard, as one `Router` that every transport serves (the h11 connection of the
websockets listener, or an ASGI server).

Rules: handlers answer with fixed texts (never request data or exception text); ``POST
/publish`` authenticates like an upgrade and applies the same claims and reserved topics
as a ``publish`` message.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pydantic_core
from pydantic import TypeAdapter, ValidationError

from wirestate.adapters.server.auth import AuthError, token_from_request
from wirestate.adapters.server.bus import BusUnavailable
from wirestate.adapters.server.dashboard import Dashboard
from wirestate.adapters.server.metrics import CONTENT_TYPE
from wirestate.adapters.server.routes import (
    JSON,
    HttpApp,
    HttpRequest,
    HttpResponse,
    Router,
    error_response,
    json_response,
)
from wirestate.core.hub import TopicLimit
from wirestate.models import wire

if TYPE_CHECKING:
    from wirestate.adapters.server.service import WirestateServer

__all__ = ["WS_PATH", "Endpoints"]

#: The WebSocket endpoint. A plain GET of it (no ``Upgrade``) is `Endpoints.websocket_status`.
WS_PATH = "/ws"
#: Readable by a page of any origin: the answer holds no data, only whether the token would do.
_ANY_ORIGIN = (("access-control-allow-origin", "*"), ("cache-control", "no-store"))

_TOPIC: TypeAdapter[str] = TypeAdapter(wire.Topic)


class Endpoints:
    """The HTTP side of one `WirestateServer`; ``app`` is what transports serve."""

    def __init__(self, service: WirestateServer) -> None:
        self.service = service
        router = (
            Router()
            .get("/healthz", self.healthz)
            .get("/readyz", self.readyz)
            .get("/metrics", self.metrics)
            .post("/publish", self.publish)
            .get(WS_PATH, self.websocket_status)
        )
        # GET /, /static/<asset> and /api/snapshot: the live dashboard
        self.routes: HttpApp = Dashboard(service.dashboard_snapshot, service.auth).mount(router)

    async def app(self, request: HttpRequest) -> HttpResponse:
        """What transports serve: the Host and Origin checks of an upgrade (`Admission.screen`)
        on every path, then the routes."""
        refusal = self.service.admission.screen(request.headers)
        if refusal is not None:
            codes = {400: "bad_request", 421: "misdirected_request"}
            code = codes.get(refusal.status, "origin_not_allowed")
            return error_response(refusal.status, code, refusal.text.strip())
        return await self.routes(request)

    async def healthz(self, request: HttpRequest) -> HttpResponse:
        return json_response({"status": "ok"})

    async def readyz(self, request: HttpRequest) -> HttpResponse:
        service = self.service
        if service.admission.closing or service.hub is None:
            return json_response({"status": "shutting_down"}, 503)
        bus = service.bus.status()
        if not service.bus.ready:
            # Clients stay served locally, but a load balancer should send new ones elsewhere.
            return json_response({"status": "bus_down", "bus": bus}, 503)
        body: dict[str, Any] = {"status": "ready", "clients": len(service.hub.clients), "bus": bus}
        return json_response(body)

    async def websocket_status(self, request: HttpRequest) -> HttpResponse:
        """A plain GET of ``/ws``: 401 when the upgrade would be refused for its token, else
        426 (this endpoint speaks WebSocket only). A browser cannot read the status of a
        refused upgrade, so wirestate.js asks this after a failed open, to stop retrying a
        token that cannot work instead of looping."""
        token = token_from_request(request.headers, request.target)
        try:
            self.service.admission.grants(token)
        except AuthError as exc:
            return error_response(
                401,
                "unauthorized",
                f"a valid token is required ({exc.reason})",
                (("www-authenticate", "Bearer"), *_ANY_ORIGIN),
            )
        return error_response(426, headers=(("upgrade", "websocket"), *_ANY_ORIGIN))

    async def metrics(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, [("content-type", CONTENT_TYPE)], self.service.metrics.render())

    async def publish(self, request: HttpRequest) -> HttpResponse:
        service = self.service
        try:
            grants = service.auth.authenticate_request(
                request.headers, request.target, now=time.time()
            )
        except AuthError as exc:
            return error_response(401, "unauthorized", f"a valid token is required ({exc.reason})")
        media_type = (request.header("content-type") or "").partition(";")[0].strip().lower()
        if media_type != JSON:
            # No form or text/plain body: a page on another site cannot publish with a
            # "simple" request that skips the browser's CORS preflight.
            return error_response(415)
        try:
            # The parser the WebSocket path uses too (exact integers, the same depth limit):
            # one rule for what a publish may carry, whichever way it comes.
            body = pydantic_core.from_json(request.body)
        except ValueError:
            return error_response(400, "bad_json", "the body is not valid JSON")
        if not isinstance(body, dict) or set(body) != {"topic", "data"}:
            return error_response(
                400, "invalid_message", 'send {"topic": "<name>", "data": <any JSON>}'
            )
        if not wire.portable(body["data"]):
            return error_response(400, "bad_json", wire.DATA_RULE)
        try:
            topic = _TOPIC.validate_python(body["topic"])
        except ValidationError:
            return error_response(
                400, "invalid_message", "topic: 1-128 characters of A-Z a-z 0-9 _ . : / -"
            )
        hub = service.hub
        if hub is None:
            return error_response(503, "unavailable", "the hub has not started")
        if topic in hub.config.reserved_topics:
            return error_response(403, "forbidden", "only the server publishes on this topic")
        if not grants.may_publish(topic):
            return error_response(
                403, "forbidden", "publishing there is outside your token's claims"
            )
        try:
            seq = await service.publish(topic, body["data"])
        except TopicLimit:
            return error_response(
                503, "topic_limit", f"this hub holds at most {hub.topics.max_topics} topics"
            )
        except BusUnavailable:
            return error_response(
                503, "unavailable", "the node is stopping; publish on another node"
            )
        return json_response({"seq": seq})
