"""Protocol v1 wire messages (docs/protocol.md): JSON text frames on `/ws`.

Rules of this module:

- Every message is a frozen pydantic model with ``extra="forbid"``; ``type`` is its first
  field and the discriminator. There is one union per direction (`ClientMessage`,
  `ServerMessage`) and one module-level `TypeAdapter` per direction (`CLIENT_MESSAGE`,
  `SERVER_MESSAGE`). The core receives these typed values, never JSON (docs/contributing.md, rule
  10).
- Peer input is parsed by `parse_client_message` (server side) or `parse_server_message`
  (client side). Neither raises on bad input: they return a `WireError` carrying an
  `ErrorCode` and a short message taken from a fixed set. The message never contains
  exception text or any part of the input, so nothing a peer sends is reflected back.
- Parsing is strict: ``"41"`` is not a sequence number and ``41.0`` is not either. Building a
  message in Python is ordinary (lax) pydantic validation.
- Serialising: ``msg.model_dump_json()`` (or ``SERVER_MESSAGE.dump_json(msg)``). Optional
  fields whose default is ``None`` are left out when they are ``None`` (a gap without a range,
  an event without ``age``, a ping without ``id``), so frames look like docs/protocol.md's examples.
  ``data`` is required and a JSON ``null`` there is kept.
- Binary frames are not part of protocol v1. The adapter answers one with `BINARY_FRAME`
  (code ``invalid_message``) and counts it as bad input, exactly like an invalid text frame.
  Frames over ``limits.max_message_size`` never reach this module (close 1009).

Topic names are 1 to `MAX_TOPIC_LENGTH` (128) characters from ``[A-Za-z0-9_.:/-]``: enough
for dotted, slashed or colon-separated hierarchies, nothing that needs escaping in a log line,
a metric label or a URL path, and no ``*`` (``*`` belongs to the JWT claim patterns, not to
names).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic_core import ErrorDetails

from wirestate.core.causes import ErrorCode, GapReason

__all__ = [
    "BAD_JSON",
    "BINARY_FRAME",
    "CLIENT_MESSAGE",
    "MAX_ID_LENGTH",
    "MAX_SEQ",
    "MAX_TOPIC_LENGTH",
    "NOT_AN_OBJECT",
    "PROTOCOL_VERSION",
    "SERVER_MESSAGE",
    "TOPIC_PATTERN",
    "UNKNOWN_TYPE",
    "Auth",
    "ClientMessage",
    "Epoch",
    "ErrorMessage",
    "Event",
    "Gap",
    "Ping",
    "Pong",
    "Publish",
    "Seq",
    "ServerMessage",
    "SinceCursor",
    "Subscribe",
    "Subscribed",
    "Timestamp",
    "Topic",
    "Unsubscribe",
    "Welcome",
    "WireError",
    "format_timestamp",
    "parse_client_message",
    "parse_server_message",
]

PROTOCOL_VERSION: Literal[1] = 1

#: Longest topic name accepted anywhere (wire, settings, HTTP publish).
MAX_TOPIC_LENGTH = 128
#: JSON Schema / ECMA-262 compatible; pydantic-core's regex engine anchors ``$`` at the very
#: end of the text, so a trailing newline does not sneak through.
TOPIC_PATTERN = r"^[A-Za-z0-9_.:/-]+$"

#: Sequence numbers stay within JavaScript's Number.MAX_SAFE_INTEGER, so a browser client
#: can hold one and echo it back in `since` without losing precision.
MAX_SEQ = 2**53 - 1

#: Longest client id and application ping id.
MAX_ID_LENGTH = 128

Topic: TypeAlias = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_TOPIC_LENGTH, pattern=TOPIC_PATTERN),
]
Seq: TypeAlias = Annotated[int, Field(ge=0, le=MAX_SEQ)]
#: An event's own number: topics count from 1 (0 only ever means "nothing yet").
EventSeq: TypeAlias = Annotated[int, Field(ge=1, le=MAX_SEQ)]
#: A topic's epoch: an opaque token the server mints (uuid, hex, base64url all fit).
Epoch: TypeAlias = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
]
_Id: TypeAlias = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
_Seconds: TypeAlias = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Topics: TypeAlias = Annotated[tuple[Topic, ...], Field(min_length=1)]

_TS_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"


def _real_instant(value: str) -> str:
    # The pattern fixes the shape; this rejects shapes that are not a date (month 13).
    # The raised text is fixed: peer input must never be echoed.
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("not a calendar date and time") from None
    return value


#: ISO-8601 UTC with milliseconds and ``Z``: ``2026-11-25T16:00:00.000Z``.
Timestamp: TypeAlias = Annotated[
    str, StringConstraints(pattern=_TS_PATTERN), AfterValidator(_real_instant)
]


def format_timestamp(seconds: float) -> str:
    """Format POSIX time `seconds` as a wire `Timestamp` (milliseconds, truncated).

    Pure: the caller passes the time in (the core has no clock). Raises ValueError or
    OverflowError for a time outside what `datetime` can represent.
    """
    instant = datetime.fromtimestamp(seconds, tz=UTC)
    return instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _type_first_and_required(schema: dict[str, Any]) -> None:
    # `type` has a default so Python callers needn't spell it, but on the wire it is what
    # selects the model: the published schema must say it is required.
    required = [name for name in schema.get("required", []) if name != "type"]
    schema["required"] = ["type", *required]


def _with_rule(rule: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A message's schema hook that also states a rule its validator enforces across fields
    (``if``/``then``/``else``), so the published schema is as strict as the parser."""

    def extra(schema: dict[str, Any]) -> None:
        _type_first_and_required(schema)
        schema.update(rule)

    return extra


class _Message(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        # A ValidationError that reaches a log must not carry a peer's token or payload.
        hide_input_in_errors=True,
        json_schema_extra=_type_first_and_required,
    )

    _OMIT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._OMIT_WHEN_NONE = frozenset(
            name
            for name, field in cls.model_fields.items()
            if not field.is_required() and field.default is None
        )

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self._OMIT_WHEN_NONE:
                if name in data and data[name] is None:
                    del data[name]
        return data


# --- client → server ----------------------------------------------------------------------


class SinceCursor(BaseModel):
    """A resume point that also names the epoch the client's `seq` belongs to."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    seq: Seq
    epoch: Epoch


class Subscribe(_Message):
    """Subscribe to `topics`; `since[topic]` means "I have everything up to and including this
    seq" (optionally with the epoch it was counted in). Every key of `since` must be one of
    `topics`. Duplicates in `topics` are not rejected here."""

    type: Literal["subscribe"] = "subscribe"
    topics: _Topics
    since: Mapping[Topic, Seq | SinceCursor] | None = None

    @model_validator(mode="after")
    def _since_names_subscribed_topics(self) -> Subscribe:
        if self.since is not None and not set(self.since) <= set(self.topics):
            raise ValueError("every topic in since must also be in topics")
        return self


class Unsubscribe(_Message):
    type: Literal["unsubscribe"] = "unsubscribe"
    topics: _Topics


class Ping(_Message):
    """Application ping, for browsers (they cannot send protocol pings); answered by `Pong`
    with the same `id`."""

    type: Literal["ping"] = "ping"
    id: _Id | None = None


#: The deepest nesting of a publish's ``data`` (arrays and objects): well within what the
#: JSON encoder writes back (254 levels) and the parser reads (about 200).
MAX_DEPTH = 128
#: Integers an event's data may hold: what the encoder writes exactly (64 bits, signed or not).
INT_RANGE = (-(2**63), 2**64 - 1)
#: Why a publish's data was refused: the same fixed text on every transport.
DATA_RULE = (
    "data must be JSON the hub can send on: finite numbers, integers within 64 bits, "
    f"nesting at most {MAX_DEPTH} levels"
)


def portable(value: Any) -> bool:
    """Whether ``value`` (parsed JSON) can go out as an event exactly as it came in: no
    infinite or NaN number (a parser reads ``1e400`` as infinity; JSON has no such value),
    no integer beyond 64 bits (the encoder refuses it), no nesting deeper than
    `MAX_DEPTH`. Iterative: a hostile depth costs no recursion."""
    low, high = INT_RANGE
    # The value goes in as the only item of a list at depth 0, so that one loop checks it:
    # containers are pushed, scalars checked where they are met (most data is flat).
    stack: list[tuple[Any, int]] = [([value], 0)]
    push, pop = stack.append, stack.pop
    while stack:
        item, depth = pop()
        for child in item.values() if type(item) is dict else item:
            kind = type(child)
            if kind is str or child is None or kind is bool:
                continue
            if kind is float:
                if child != child or child in (math.inf, -math.inf):
                    return False
            elif kind is int:
                if not low <= child <= high:
                    return False
            elif kind is list or kind is dict:
                if depth >= MAX_DEPTH:
                    return False
                push((child, depth + 1))
    return True


def _portable(value: JsonValue) -> JsonValue:
    if not portable(value):
        raise ValueError(DATA_RULE)
    return value


class Publish(_Message):
    type: Literal["publish"] = "publish"
    topic: Topic
    data: Annotated[JsonValue, AfterValidator(_portable)]


class Auth(_Message):
    """First-message authentication, accepted only with ``[auth] first_message = true``."""

    type: Literal["auth"] = "auth"
    # repr=False: a logged message must not leak the bearer token.
    token: str = Field(min_length=1, repr=False)


ClientMessage: TypeAlias = Annotated[
    Subscribe | Unsubscribe | Ping | Publish | Auth, Field(discriminator="type")
]
CLIENT_MESSAGE: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


# --- server → client ----------------------------------------------------------------------


class Welcome(_Message):
    """Always the first frame the server sends on a connection."""

    type: Literal["welcome"] = "welcome"
    client_id: _Id
    protocol: Literal[1] = PROTOCOL_VERSION
    ping_interval: _Seconds
    ping_timeout: _Seconds


class Subscribed(_Message):
    """`recovered[t]` is false when history could not cover the client's `since`; the gap
    that explains why follows. `epoch[t]` is what the client sends back in a `SinceCursor`.
    `seq[t]` is where the subscription took effect: the topic's newest seq (0 when it has
    none) for a new subscription or one already held, the `since` seq for a resume (the
    replay follows), 0 for a resume from another epoch (the `epoch_changed` gap follows,
    then the new numbering from its start). Resuming later from max(`seq[t]`, the last seq
    received) in `epoch[t]` misses nothing without a gap, whether or not an event arrived.
    Servers before this field omit it: a client then has no position for a topic that
    delivered nothing."""

    type: Literal["subscribed"] = "subscribed"
    topics: tuple[Topic, ...]
    recovered: Mapping[Topic, bool] = Field(default_factory=dict)
    epoch: Mapping[Topic, Epoch] = Field(default_factory=dict)
    seq: Mapping[Topic, Seq] = Field(default_factory=dict)


class Event(_Message):
    """One event of `topic`; `seq` increases by exactly 1 per topic (a hole is announced by
    a `Gap` first). `stale` events carry the cached value of a source whose breaker is open,
    with `age` seconds since it was fetched; `age` is only for stale events."""

    # The validator's rule, for the JSON Schema: age with stale and only with it.
    model_config = ConfigDict(
        json_schema_extra=_with_rule(
            {
                "if": {"properties": {"stale": {"const": True}}, "required": ["stale"]},
                "then": {"required": ["age"], "properties": {"age": {"type": "number"}}},
                "else": {"properties": {"age": {"type": "null"}}},
            }
        )
    )

    type: Literal["event"] = "event"
    topic: Topic
    seq: EventSeq
    ts: Timestamp
    data: JsonValue
    stale: bool = False
    age: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _age_with_stale_only(self) -> Event:
        if self.age is not None and not self.stale:
            raise ValueError("age is only sent with stale: true")
        if self.stale and self.age is None:
            raise ValueError("a stale event carries its age")
        return self


class Gap(_Message):
    """Events `from_seq`..`to_seq` (inclusive) of `topic` will not be delivered.

    Sent before the first event after the hole. With reason ``epoch_changed`` the old and new
    sequences are unrelated, so there is no range: the server sends both bounds as ``null``
    (a client may also meet them absent; both mean the same). With every other reason both
    bounds are present and ``from_seq <= to_seq``.
    """

    # The validator's rule, for the JSON Schema: a range unless the epoch changed.
    model_config = ConfigDict(
        json_schema_extra=_with_rule(
            {
                "if": {"properties": {"reason": {"const": "epoch_changed"}}},
                "then": {"properties": {"from_seq": {"type": "null"}, "to_seq": {"type": "null"}}},
                "else": {
                    "required": ["from_seq", "to_seq"],
                    "properties": {
                        "from_seq": {"type": "integer"},
                        "to_seq": {"type": "integer"},
                    },
                },
            }
        )
    )

    type: Literal["gap"] = "gap"
    topic: Topic
    from_seq: EventSeq | None = None
    to_seq: EventSeq | None = None
    reason: GapReason

    @model_validator(mode="after")
    def _range_matches_reason(self) -> Gap:
        if self.reason is GapReason.EPOCH_CHANGED:
            if self.from_seq is not None or self.to_seq is not None:
                raise ValueError("a gap for epoch_changed has no range")
        elif self.from_seq is None or self.to_seq is None:
            raise ValueError("from_seq and to_seq are required unless reason is epoch_changed")
        elif self.from_seq > self.to_seq:
            raise ValueError("from_seq must not exceed to_seq")
        return self


class ErrorMessage(_Message):
    """The `error` message. `message` is short, fixed text chosen by the server."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str


class Pong(_Message):
    type: Literal["pong"] = "pong"
    id: _Id | None = None


ServerMessage: TypeAlias = Annotated[
    Welcome | Subscribed | Event | Gap | ErrorMessage | Pong, Field(discriminator="type")
]
SERVER_MESSAGE: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


# --- parsing peer input ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireError:
    """Why a frame from a peer was refused. `message` comes from a fixed set of strings."""

    code: ErrorCode
    message: str

    def to_message(self) -> ErrorMessage:
        """The `error` frame to send back to the peer."""
        return ErrorMessage(code=self.code, message=self.message)


BAD_JSON = WireError(ErrorCode.BAD_JSON, "frame is not valid UTF-8 JSON")
UNKNOWN_TYPE = WireError(ErrorCode.UNKNOWN_TYPE, "missing or unknown message type")
NOT_AN_OBJECT = WireError(ErrorCode.INVALID_MESSAGE, "message must be a JSON object")
#: What the adapter answers to a binary frame: protocol v1 is JSON text frames only.
BINARY_FRAME = WireError(ErrorCode.INVALID_MESSAGE, "binary frames are not accepted")

_FIELDS_BY_TYPE: dict[str, frozenset[str]] = {
    model.model_fields["type"].default: frozenset(model.model_fields)
    for model in (
        *(Subscribe, Unsubscribe, Ping, Publish, Auth),
        *(Welcome, Subscribed, Event, Gap, ErrorMessage, Pong),
    )
}


def _invalid(error: ErrorDetails) -> WireError:
    # Name the offending field only when it is one of the model's own declared fields:
    # that keeps the text within a closed set. An unexpected key, a `since` key or a list
    # index is the peer's input and is never named.
    loc = error["loc"]
    declared = _FIELDS_BY_TYPE.get(str(loc[0]), frozenset()) if loc else frozenset()
    field = loc[1] if len(loc) > 1 and loc[1] in declared else None
    kind = error["type"]
    if kind == "extra_forbidden":
        return WireError(ErrorCode.INVALID_MESSAGE, "unexpected field")
    if field is None:
        if kind == "value_error":  # a model-level rule, e.g. `since` naming other topics
            return WireError(ErrorCode.INVALID_MESSAGE, "fields of the message are inconsistent")
        return WireError(ErrorCode.INVALID_MESSAGE, "message does not match its type")
    if kind == "missing":
        return WireError(ErrorCode.INVALID_MESSAGE, f"missing field {field!r}")
    if kind == "value_error" and field == "data":
        return WireError(ErrorCode.INVALID_MESSAGE, DATA_RULE)
    return WireError(ErrorCode.INVALID_MESSAGE, f"invalid value for field {field!r}")


def _classify(exc: ValidationError) -> WireError:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    kinds = {error["type"] for error in errors}
    # string_unicode: a str holding lone surrogates, which has no UTF-8 form to parse.
    if kinds & {"json_invalid", "string_unicode"}:
        return BAD_JSON
    if kinds & {"union_tag_not_found", "union_tag_invalid"}:
        return UNKNOWN_TYPE
    if any(error["type"] in {"dict_type", "model_type"} and not error["loc"] for error in errors):
        return NOT_AN_OBJECT
    return _invalid(errors[0])


def parse_client_message(raw: str | bytes) -> ClientMessage | WireError:
    """Parse one text frame from a client. Never raises on peer input.

    Returns the typed message, or a `WireError`: ``bad_json`` for text that is not JSON or
    bytes that are not UTF-8; ``unknown_type`` for a JSON object whose ``type`` is missing,
    not a string or not a client message type; ``invalid_message`` for anything else that
    does not match the schema (not an object, missing, unexpected or ill-typed fields).
    """
    try:
        return CLIENT_MESSAGE.validate_json(raw, strict=True)
    except ValidationError as exc:
        return _classify(exc)


def parse_server_message(raw: str | bytes) -> ServerMessage | WireError:
    """Parse one text frame from the server (client side); same contract as
    `parse_client_message`, with the server-to-client types."""
    try:
        return SERVER_MESSAGE.validate_json(raw, strict=True)
    except ValidationError as exc:
        return _classify(exc)
