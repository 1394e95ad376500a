"""HTTP requests and responses as values, and the small router that answers them: what the
endpoints, the dashboard and the metrics are written against, whatever transport carries
the bytes (the h11 connection of ``transports.http``, or an ASGI server).

Rules: the wire never carries input or exception text. Errors are JSON
``{"error": code, "message": fixed text}`` from `error_response`, whose defaults come from
`ERRORS`; handlers pass fixed strings only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Protocol, Self
from urllib.parse import parse_qs

import orjson

__all__ = [
    "ERRORS",
    "JSON",
    "Handler",
    "HttpApp",
    "HttpRequest",
    "HttpResponse",
    "Router",
    "error_response",
    "json_response",
    "phrase",
]

JSON: Final = "application/json"

#: Fixed error codes and messages; never built from the request or from an exception.
ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("bad_request", "malformed HTTP request"),
    404: ("not_found", "no such endpoint"),
    405: ("method_not_allowed", "method not allowed on this endpoint"),
    408: ("request_timeout", "the request did not arrive in time"),
    413: ("payload_too_large", "request body too large"),
    415: ("unsupported_media_type", "send the body as Content-Type: application/json"),
    421: ("misdirected_request", "this hub does not answer to that host name"),
    431: ("header_fields_too_large", "request head too large"),
    426: ("upgrade_required", "this endpoint speaks WebSocket only"),
    500: ("internal_error", "internal server error"),
    503: ("unavailable", "service unavailable"),
}


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One complete request. Header names are lowercase; values are latin-1 decoded.

    ``target`` is the raw request target; ``path`` and ``query`` are its two halves, not
    percent-decoded. ``client`` is the peer's (host, port) when known.
    """

    method: str
    target: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    client: tuple[str, int] | None = None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    def query_param(self, name: str) -> str | None:
        """The first value of query parameter ``name`` (percent-decoded), or None."""
        values = parse_qs(self.query, keep_blank_values=True).get(name)
        return values[0] if values else None


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete response. The connection adds Content-Length and Connection itself."""

    status: int
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""

    def __post_init__(self) -> None:
        # Freeze a list the caller passed, so the response is really immutable.
        object.__setattr__(self, "headers", tuple(self.headers))


class HttpApp(Protocol):
    """Answers one request. Raising is allowed: the connection turns it into a 500."""

    async def __call__(self, request: HttpRequest) -> HttpResponse: ...


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


def json_response(
    value: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()
) -> HttpResponse:
    """``value`` serialized with orjson, as ``application/json``."""
    return HttpResponse(status, (("content-type", JSON), *headers), orjson.dumps(value))


def error_response(
    status: int,
    error: str | None = None,
    message: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> HttpResponse:
    """``{"error": ..., "message": ...}``; defaults come from `ERRORS` for ``status``.

    Pass fixed strings only: never request data or exception text."""
    default = ERRORS.get(status) or ("http_error", phrase(status) or "HTTP error")
    return json_response(
        {"error": error or default[0], "message": message or default[1]}, status, headers
    )


class Router:
    """An `HttpApp` that dispatches on exact path, then method.

    Unknown path: 404. Known path, other method: 405 with ``Allow``. HEAD is answered by
    the GET handler (the connection leaves the body out). Routes are set up before serving;
    methods return the router so calls chain."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}

    def route(self, method: str, path: str, handler: Handler) -> Self:
        methods = self._routes.setdefault(path, {})
        method = method.upper()
        if method in methods:
            raise ValueError(f"{method} {path} is already routed")
        methods[method] = handler
        return self

    def get(self, path: str, handler: Handler) -> Self:
        return self.route("GET", path, handler)

    def post(self, path: str, handler: Handler) -> Self:
        return self.route("POST", path, handler)

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        methods = self._routes.get(request.path)
        if methods is None:
            return error_response(404)
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allowed = set(methods) | ({"HEAD"} if "GET" in methods else set())
            return error_response(405, headers=(("allow", ", ".join(sorted(allowed))),))
        return await handler(request)


def phrase(status: int) -> str:
    """The standard reason phrase of ``status``, or an empty string."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
