"""Protocol v1 messages: docs/protocol.md's examples round-trip, and bad peer input never raises."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from wirestate.core.causes import ErrorCode, GapReason
from wirestate.models.wire import (
    BINARY_FRAME,
    CLIENT_MESSAGE,
    DATA_RULE,
    INT_RANGE,
    MAX_DEPTH,
    MAX_SEQ,
    MAX_TOPIC_LENGTH,
    SERVER_MESSAGE,
    Auth,
    ErrorMessage,
    Event,
    Gap,
    Ping,
    Pong,
    Publish,
    SinceCursor,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Welcome,
    WireError,
    format_timestamp,
    parse_client_message,
    parse_server_message,
    portable,
)

# The protocol's own examples, verbatim where they give a complete frame.
CLIENT_EXAMPLES: list[tuple[str, type[Any]]] = [
    (
        '{"type": "subscribe", "topics": ["system_status"], "since": {"system_status": 41}}',
        Subscribe,
    ),
    (
        '{"type": "subscribe", "topics": ["system_status"],'
        ' "since": {"system_status": {"seq": 41, "epoch": "k3f9"}}}',
        Subscribe,
    ),
    ('{"type": "subscribe", "topics": ["a", "b.c/d:e-f_g"]}', Subscribe),
    ('{"type": "unsubscribe", "topics": ["system_status"]}', Unsubscribe),
    ('{"type": "ping", "id": "any string"}', Ping),
    ('{"type": "ping"}', Ping),
    ('{"type": "publish", "topic": "t", "data": {"a": [1, 2.5, null, true, "x"]}}', Publish),
    ('{"type": "publish", "topic": "t", "data": null}', Publish),
    ('{"type": "auth", "token": "eyJhbGciOiJIUzI1NiJ9.e30.sig"}', Auth),
]

SERVER_EXAMPLES: list[tuple[str, type[Any]]] = [
    (
        '{"type": "welcome", "client_id": "c1", "protocol": 1,'
        ' "ping_interval": 30.0, "ping_timeout": 10.0}',
        Welcome,
    ),
    (
        '{"type": "subscribed", "topics": ["topic"], "recovered": {"topic": true},'
        ' "epoch": {"topic": "k3f9"}, "seq": {"topic": 41}}',
        Subscribed,
    ),
    (
        '{"type": "event", "topic": "system_status", "seq": 42,'
        ' "ts": "2026-11-25T16:00:00.000Z", "data": {"cpu": 3.5}, "stale": false}',
        Event,
    ),
    (
        '{"type": "event", "topic": "agent_status", "seq": 7,'
        ' "ts": "2026-11-25T16:00:00.000Z", "data": [1], "stale": true, "age": 12.5}',
        Event,
    ),
    (
        '{"type": "gap", "topic": "t", "from_seq": 5, "to_seq": 17, "reason": "history_evicted"}',
        Gap,
    ),
    ('{"type": "gap", "topic": "t", "reason": "epoch_changed"}', Gap),
    (
        '{"type": "error", "code": "bad_json", "message": "frame is not valid UTF-8 JSON"}',
        ErrorMessage,
    ),
    ('{"type": "pong", "id": "any string"}', Pong),
]


@pytest.mark.parametrize(("raw", "model"), CLIENT_EXAMPLES)
def test_client_examples_round_trip(raw: str, model: type[Any]) -> None:
    message = parse_client_message(raw)
    assert isinstance(message, model)
    assert json.loads(message.model_dump_json()) == json.loads(raw)
    assert json.loads(CLIENT_MESSAGE.dump_json(message)) == json.loads(raw)
    assert parse_client_message(message.model_dump_json()) == message
    assert parse_client_message(raw.encode()) == message


@pytest.mark.parametrize(("raw", "model"), SERVER_EXAMPLES)
def test_server_examples_round_trip(raw: str, model: type[Any]) -> None:
    message = parse_server_message(raw)
    assert isinstance(message, model)
    assert json.loads(message.model_dump_json()) == json.loads(raw)
    assert json.loads(SERVER_MESSAGE.dump_json(message)) == json.loads(raw)
    assert parse_server_message(message.model_dump_json()) == message


def test_type_is_the_first_key_on_the_wire() -> None:
    for raw, _ in CLIENT_EXAMPLES:
        message = parse_client_message(raw)
        assert not isinstance(message, WireError)
        assert next(iter(json.loads(message.model_dump_json()))) == "type"
    for raw, _ in SERVER_EXAMPLES:
        reply = parse_server_message(raw)
        assert not isinstance(reply, WireError)
        assert next(iter(json.loads(reply.model_dump_json()))) == "type"


def test_subscribed_says_where_each_topic_stands_and_older_servers_may_not() -> None:
    ack = parse_server_message(SERVER_EXAMPLES[1][0])
    assert isinstance(ack, Subscribed)
    assert ack.seq == {"topic": 41}
    older = parse_server_message('{"type": "subscribed", "topics": ["t"]}')
    assert isinstance(older, Subscribed)
    assert older.seq == {}  # an added field: a v1 server from before it omits it
    for bad in ('{"t": -1}', '{"t": "1"}', '{"t": 9007199254740992}', '{"bad topic": 1}'):
        raw = f'{{"type": "subscribed", "topics": ["t"], "seq": {bad}}}'
        assert isinstance(parse_server_message(raw), WireError), bad


def test_typed_values_after_parsing() -> None:
    message = parse_client_message(CLIENT_EXAMPLES[1][0])
    assert isinstance(message, Subscribe)
    assert message.topics == ("system_status",)
    assert message.since == {"system_status": SinceCursor(seq=41, epoch="k3f9")}
    gap = parse_server_message(SERVER_EXAMPLES[4][0])
    assert isinstance(gap, Gap)
    assert gap.reason is GapReason.HISTORY_EVICTED
    error = parse_server_message(SERVER_EXAMPLES[6][0])
    assert isinstance(error, ErrorMessage)
    assert error.code is ErrorCode.BAD_JSON


def test_python_construction_needs_no_type() -> None:
    assert Subscribe(topics=("a",)).type == "subscribe"
    assert Welcome(client_id="c", ping_interval=30.0, ping_timeout=10.0).protocol == 1


# --- serialisation details --------------------------------------------------------------


def test_absent_optionals_are_omitted_but_null_data_is_kept() -> None:
    assert json.loads(Ping().model_dump_json()) == {"type": "ping"}
    assert json.loads(Pong().model_dump_json()) == {"type": "pong"}
    assert "since" not in json.loads(Subscribe(topics=("a",)).model_dump_json())
    event = Event(topic="t", seq=1, ts="2026-11-25T16:00:00.000Z", data=None)
    assert json.loads(event.model_dump_json()) == {
        "type": "event",
        "topic": "t",
        "seq": 1,
        "ts": "2026-11-25T16:00:00.000Z",
        "data": None,
        "stale": False,
    }
    gap = Gap(topic="t", reason=GapReason.EPOCH_CHANGED)
    assert json.loads(gap.model_dump_json()) == {
        "type": "gap",
        "topic": "t",
        "reason": "epoch_changed",
    }


def test_none_values_inside_data_are_kept() -> None:
    publish = Publish(topic="t", data={"a": None, "b": [None]})
    assert json.loads(publish.model_dump_json())["data"] == {"a": None, "b": [None]}


def test_messages_are_frozen() -> None:
    subscribe = Subscribe(topics=("a",))
    with pytest.raises(ValidationError):
        subscribe.topics = ("b",)
    event = Event(topic="t", seq=1, ts="2026-11-25T16:00:00.000Z", data=1)
    with pytest.raises(ValidationError):
        event.seq = 2
    assert isinstance(subscribe.topics, tuple)
    error = WireError(ErrorCode.BAD_JSON, "x")
    with pytest.raises(AttributeError):
        error.code = ErrorCode.FORBIDDEN  # type: ignore[misc]


def test_auth_token_is_not_in_repr() -> None:
    auth = Auth(token="s3cr3t-token-value")
    assert "s3cr3t-token-value" not in repr(auth)
    assert "s3cr3t-token-value" not in str(auth)
    # ...but it is on the wire, where it belongs.
    assert json.loads(auth.model_dump_json())["token"] == "s3cr3t-token-value"


# --- parse errors -----------------------------------------------------------------------

BAD_CLIENT_INPUT: list[tuple[str | bytes, ErrorCode]] = [
    # not JSON
    ("", ErrorCode.BAD_JSON),
    ("{", ErrorCode.BAD_JSON),
    ("{'type': 'ping'}", ErrorCode.BAD_JSON),
    ('{"type": "ping"} trailing', ErrorCode.BAD_JSON),
    (b'{"type": "ping", "id": "\xff"}', ErrorCode.BAD_JSON),
    (b"\xfe\xff\x00{", ErrorCode.BAD_JSON),
    ('{"type": "ping", "id": "\ud800"}', ErrorCode.BAD_JSON),  # a lone surrogate in a str
    ('{"type": "ping", "id": "\\ud800"}', ErrorCode.BAD_JSON),  # ...or escaped in the JSON
    ("[" * 5000 + "]" * 5000, ErrorCode.BAD_JSON),
    # JSON, but no usable type
    ("{}", ErrorCode.UNKNOWN_TYPE),
    ('{"topics": ["a"]}', ErrorCode.UNKNOWN_TYPE),
    ('{"type": "subscribe_all", "topics": ["a"]}', ErrorCode.UNKNOWN_TYPE),
    ('{"type": 5}', ErrorCode.UNKNOWN_TYPE),
    ('{"type": null}', ErrorCode.UNKNOWN_TYPE),
    ('{"type": "SUBSCRIBE", "topics": ["a"]}', ErrorCode.UNKNOWN_TYPE),
    (
        '{"type": "welcome", "client_id": "c", "ping_interval": 1, "ping_timeout": 1}',
        ErrorCode.UNKNOWN_TYPE,
    ),
    ('{"type": "event", "topic": "t"}', ErrorCode.UNKNOWN_TYPE),
    # not an object
    ("[]", ErrorCode.INVALID_MESSAGE),
    ('[{"type": "ping"}]', ErrorCode.INVALID_MESSAGE),
    ('"ping"', ErrorCode.INVALID_MESSAGE),
    ("42", ErrorCode.INVALID_MESSAGE),
    ("null", ErrorCode.INVALID_MESSAGE),
    # missing fields
    ('{"type": "subscribe"}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "publish", "topic": "t"}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "auth"}', ErrorCode.INVALID_MESSAGE),
    # extra fields
    ('{"type": "ping", "id": "1", "extra": 1}', ErrorCode.INVALID_MESSAGE),
    (
        '{"type": "subscribe", "topics": ["a"], "since": {"a": {"seq": 1, "epoch": "e", "x": 1}}}',
        ErrorCode.INVALID_MESSAGE,
    ),
    # wrong types (parsing is strict)
    ('{"type": "subscribe", "topics": "a"}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "subscribe", "topics": [1]}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "subscribe", "topics": ["a"], "since": {"a": "41"}}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "subscribe", "topics": ["a"], "since": {"a": 41.0}}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "subscribe", "topics": ["a"], "since": {"a": true}}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "subscribe", "topics": ["a"], "since": {"a": -1}}', ErrorCode.INVALID_MESSAGE),
    (
        f'{{"type": "subscribe", "topics": ["a"], "since": {{"a": {MAX_SEQ + 1}}}}}',
        ErrorCode.INVALID_MESSAGE,
    ),
    ('{"type": "ping", "id": 7}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "publish", "topic": ["t"], "data": 1}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "auth", "token": ""}', ErrorCode.INVALID_MESSAGE),
    # topic names
    ('{"type": "subscribe", "topics": []}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "subscribe", "topics": [""]}', ErrorCode.INVALID_MESSAGE),
    (
        f'{{"type": "subscribe", "topics": ["{"a" * (MAX_TOPIC_LENGTH + 1)}"]}}',
        ErrorCode.INVALID_MESSAGE,
    ),
    ('{"type": "subscribe", "topics": ["has space"]}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "subscribe", "topics": ["orders.*"]}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "subscribe", "topics": ["caf\\u00e9"]}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "subscribe", "topics": ["a\\n"]}', ErrorCode.INVALID_MESSAGE),
    ('{"type": "publish", "topic": "<script>", "data": 1}', ErrorCode.INVALID_MESSAGE),
    # consistency
    ('{"type": "subscribe", "topics": ["a"], "since": {"b": 1}}', ErrorCode.INVALID_MESSAGE),
    (
        '{"type": "subscribe", "topics": ["a"], "since": {"a": {"seq": 1, "epoch": "no spaces"}}}',
        ErrorCode.INVALID_MESSAGE,
    ),
]


@pytest.mark.parametrize(("raw", "code"), BAD_CLIENT_INPUT)
def test_bad_client_input_becomes_a_wire_error(raw: str | bytes, code: ErrorCode) -> None:
    result = parse_client_message(raw)
    assert isinstance(result, WireError)
    assert result.code is code
    assert 0 < len(result.message) <= 80


def test_a_topic_of_the_maximum_length_is_accepted() -> None:
    topic = "a" * MAX_TOPIC_LENGTH
    result = parse_client_message(json.dumps({"type": "subscribe", "topics": [topic]}))
    assert isinstance(result, Subscribe)
    assert result.topics == (topic,)


def test_field_names_come_from_the_schema_only() -> None:
    missing = parse_client_message('{"type": "subscribe"}')
    assert missing == WireError(ErrorCode.INVALID_MESSAGE, "missing field 'topics'")
    wrong = parse_client_message('{"type": "subscribe", "topics": ["a"], "since": {"a": "1"}}')
    assert wrong == WireError(ErrorCode.INVALID_MESSAGE, "invalid value for field 'since'")
    extra = parse_client_message('{"type": "ping", "name_of_my_choosing": 1}')
    assert extra == WireError(ErrorCode.INVALID_MESSAGE, "unexpected field")


CANARY = "CANARY-q7Zx"


@pytest.mark.parametrize(
    "raw",
    [
        f'{{"type": "{CANARY}"}}',
        f'{{"{CANARY}": 1}}',
        f'{{"type": "ping", "{CANARY}": 1}}',
        f'{{"type": "ping", "id": "{CANARY * 20}"}}',
        f'{{"type": "subscribe", "topics": ["{CANARY} x"]}}',
        f'{{"type": "subscribe", "topics": ["a"], "since": {{"{CANARY}": 1}}}}',
        f'{{"type": "subscribe", "topics": ["a"], "since": {{"a": "{CANARY}"}}}}',
        f'{{"type": "publish", "topic": "t", "data": 1, "x": "{CANARY}"}}',
        f'{{"type": "auth", "token": 5, "{CANARY}": "{CANARY}"}}',
        f'{{"type": "ping", "id": "{CANARY}"',
        f"[{CANARY}]",
        f'"{CANARY}"',
        f'{{"type": "ping", "id": "{CANARY}\\x"}}',
    ],
)
def test_error_messages_never_echo_the_input(raw: str) -> None:
    result = parse_client_message(raw)
    assert isinstance(result, WireError)
    assert CANARY not in result.message
    assert CANARY.lower() not in result.message.lower()
    assert "Input" not in result.message  # pydantic's own texts are never passed through
    assert "line" not in result.message  # nor the JSON parser's position report
    assert CANARY not in result.to_message().model_dump_json()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
TYPES = st.sampled_from(["subscribe", "unsubscribe", "ping", "publish", "auth", "event", "x"])


@settings(max_examples=150, deadline=None)
# exclude_categories=(): let lone surrogates in, which no real text frame can carry.
@given(st.text(st.characters(exclude_categories=()), max_size=64) | st.binary(max_size=64))
def test_arbitrary_frames_never_raise(raw: str | bytes) -> None:
    result = parse_client_message(raw)
    assert isinstance(result, WireError | Subscribe | Unsubscribe | Ping | Publish | Auth)


@settings(max_examples=150, deadline=None)
@given(
    TYPES,
    st.dictionaries(
        st.sampled_from(["topics", "topic", "since", "id", "data", "token", "zz"]), JSON
    ),
)
def test_arbitrary_objects_never_raise(message_type: str, fields: dict[str, Any]) -> None:
    raw = json.dumps({"type": message_type, **fields})
    result = parse_client_message(raw)
    if isinstance(result, WireError):
        assert result.code in {ErrorCode.UNKNOWN_TYPE, ErrorCode.INVALID_MESSAGE}
    else:
        assert result.type == message_type
        assert parse_client_message(result.model_dump_json()) == result


def test_server_parser_refuses_client_messages_and_garbage() -> None:
    assert parse_server_message('{"type": "subscribe", "topics": ["a"]}') == WireError(
        ErrorCode.UNKNOWN_TYPE, "missing or unknown message type"
    )
    bad = parse_server_message(b"\xff")
    assert isinstance(bad, WireError)
    assert bad.code is ErrorCode.BAD_JSON


def test_wire_error_becomes_an_error_frame() -> None:
    frame = WireError(ErrorCode.UNKNOWN_TYPE, "missing or unknown message type").to_message()
    assert json.loads(frame.model_dump_json()) == {
        "type": "error",
        "code": "unknown_type",
        "message": "missing or unknown message type",
    }
    assert BINARY_FRAME.code is ErrorCode.INVALID_MESSAGE
    assert isinstance(
        parse_server_message(BINARY_FRAME.to_message().model_dump_json()), ErrorMessage
    )


# --- model rules ------------------------------------------------------------------------


def test_gap_range_follows_its_reason() -> None:
    assert Gap(topic="t", from_seq=5, to_seq=5, reason=GapReason.SLOW_CONSUMER).to_seq == 5
    with pytest.raises(ValidationError):
        Gap(topic="t", reason=GapReason.HISTORY_EVICTED)
    with pytest.raises(ValidationError):
        Gap(topic="t", from_seq=5, reason=GapReason.BUS_OUTAGE)
    with pytest.raises(ValidationError):
        Gap(topic="t", from_seq=6, to_seq=5, reason=GapReason.SLOW_CONSUMER)
    with pytest.raises(ValidationError):
        Gap(topic="t", from_seq=1, to_seq=2, reason=GapReason.EPOCH_CHANGED)


def test_age_only_for_stale_events() -> None:
    ts = "2026-11-25T16:00:00.000Z"
    assert Event(topic="t", seq=1, ts=ts, data=1, stale=True, age=3.0).age == 3.0
    with pytest.raises(ValidationError):
        Event(topic="t", seq=1, ts=ts, data=1, age=3.0)
    with pytest.raises(ValidationError):
        Event(topic="t", seq=1, ts=ts, data=1, stale=True, age=-1.0)


@pytest.mark.parametrize(
    "ts",
    [
        "2026-11-25T16:00:00Z",
        "2026-11-25T16:00:00.000+00:00",
        "2026-11-25T16:00:00.000000Z",
        "2026-11-25 16:00:00.000Z",
        "2026-13-25T16:00:00.000Z",
        "2026-02-30T16:00:00.000Z",
        "2026-11-25T16:00:00.000Z\n",
    ],
)
def test_event_timestamps_are_utc_with_milliseconds(ts: str) -> None:
    with pytest.raises(ValidationError):
        Event(topic="t", seq=1, ts=ts, data=1)


def test_format_timestamp() -> None:
    assert format_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert format_timestamp(1_795_622_400.1239) == "2026-11-25T16:00:00.123Z"
    ts = format_timestamp(1_795_622_400)
    assert Event(topic="t", seq=1, ts=ts, data=1).ts == "2026-11-25T16:00:00.000Z"


def test_welcome_speaks_protocol_1_only() -> None:
    raw = json.dumps(
        {"type": "welcome", "client_id": "c", "protocol": 2, "ping_interval": 1, "ping_timeout": 1}
    )
    result = parse_server_message(raw)
    assert isinstance(result, WireError)
    assert result.code is ErrorCode.INVALID_MESSAGE


def _nested(depth: int) -> Any:
    value: Any = 0
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize(
    ("data", "ok"),
    [
        (_nested(MAX_DEPTH), True),
        (_nested(MAX_DEPTH + 1), False),
        (INT_RANGE[0], True),
        (INT_RANGE[1], True),
        (INT_RANGE[0] - 1, False),
        (INT_RANGE[1] + 1, False),
        ({"a": [1.5, -0.0, 1e308]}, True),
        ({"a": [float("inf")]}, False),
        ([float("-inf")], False),
        ([float("nan")], False),
        ("\u0000 \ud7ff \ue000 \U0010ffff", True),
        ([True, None, "s", 1.0, INT_RANGE[1], {"k": [False]}], True),
        ([1, [2, [INT_RANGE[1] + 1]]], False),
        ({"a": {"b": [0, float("nan")]}}, False),
        ({"a": {"b": INT_RANGE[0] - 1}}, False),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, bool) else str(v),
)
def test_portable_data_is_what_the_encoder_sends_back_unchanged(data: Any, ok: bool) -> None:
    assert portable(data) is ok
    if ok:  # what passes survives the wire exactly
        assert orjson.loads(orjson.dumps(data)) == data


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "publish", "topic": "t", "data": 1e400}',
        '{"type": "publish", "topic": "t", "data": [-1e999]}',
        '{"type": "publish", "topic": "t", "data": 18446744073709551616}',
        '{"type": "publish", "topic": "t", "data": ' + "[" * 129 + "]" * 129 + "}",
    ],
    ids=["infinity", "minus_infinity", "int_over_64_bits", "depth_129"],
)
def test_a_publish_of_unportable_data_names_the_rule_not_the_value(raw: str) -> None:
    result = parse_client_message(raw)
    assert result == WireError(ErrorCode.INVALID_MESSAGE, DATA_RULE)
    assert "1e" not in DATA_RULE
    assert "18446744073709551616" not in DATA_RULE


def test_nesting_far_past_the_limit_costs_no_recursion() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    # the parser's own limit: an error answer, not a crash
    result = parse_client_message('{"type": "publish", "topic": "t", "data": ' + deep + "}")
    assert isinstance(result, WireError)
    assert result.code in (ErrorCode.BAD_JSON, ErrorCode.INVALID_MESSAGE)
    assert not portable(_nested(100_000))
