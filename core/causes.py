"""The one vocabulary for why a connection closed, and the close codes that go with it.

Every path into closing carries a `CloseCause`; logs, metrics, the `clients` topic and the
client CLI all use these names (docs/protocol.md, "Close codes and causes"). Codes are RFC 6455
section 7.4.1 close codes; 1013 ("try again later") is what the hub sends a slow consumer.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # server shutdown
    PROTOCOL_ERROR = 1002  # a frame that breaks RFC 6455 (the protocol layer decides)
    ABNORMAL = 1006  # no close frame (never sent on the wire; reported by the transport)
    INVALID_DATA = 1007  # a text frame that is not UTF-8 (RFC 6455 section 8.1: fail it)
    POLICY_VIOLATION = 1008  # auth, origin, repeated bad input, rate
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011  # keep-alive timeout or internal error
    TRY_AGAIN_LATER = 1013  # slow consumer: send queue overflow


class CloseCause(StrEnum):
    PEER_CLOSE = "peer_close"
    READ_ERROR = "read_error"
    WRITE_ERROR = "write_error"
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    SLOW_CONSUMER = "slow_consumer"
    MESSAGE_TOO_BIG = "message_too_big"
    POLICY = "policy"
    AUTH_EXPIRED = "auth_expired"
    SHUTDOWN = "shutdown"
    PROTOCOL_ERROR = "protocol_error"
    INVALID_UTF8 = "invalid_utf8"


#: The close code the server sends for each cause it initiates. Causes the peer or the
#: transport initiate (peer_close, read_error, write_error) carry the code that was observed.
CLOSE_CODE: dict[CloseCause, CloseCode] = {
    CloseCause.PEER_CLOSE: CloseCode.NORMAL,
    CloseCause.READ_ERROR: CloseCode.ABNORMAL,
    CloseCause.WRITE_ERROR: CloseCode.ABNORMAL,
    CloseCause.KEEPALIVE_TIMEOUT: CloseCode.INTERNAL_ERROR,
    CloseCause.SLOW_CONSUMER: CloseCode.TRY_AGAIN_LATER,
    CloseCause.MESSAGE_TOO_BIG: CloseCode.MESSAGE_TOO_BIG,
    CloseCause.POLICY: CloseCode.POLICY_VIOLATION,
    CloseCause.AUTH_EXPIRED: CloseCode.POLICY_VIOLATION,
    CloseCause.SHUTDOWN: CloseCode.GOING_AWAY,
    CloseCause.PROTOCOL_ERROR: CloseCode.PROTOCOL_ERROR,
    CloseCause.INVALID_UTF8: CloseCode.INVALID_DATA,
}

#: Closes the protocol layer decides itself, by the code it fails the connection with: the
#: close frame carries the cause as its reason, and the reader reports it.
PROTOCOL_CLOSES: dict[int, CloseCause] = {
    CloseCode.PROTOCOL_ERROR: CloseCause.PROTOCOL_ERROR,
    CloseCode.INVALID_DATA: CloseCause.INVALID_UTF8,
    CloseCode.MESSAGE_TOO_BIG: CloseCause.MESSAGE_TOO_BIG,
}


class GapReason(StrEnum):
    """Why a client will not get events it should have had (docs/protocol.md, `gap`)."""

    HISTORY_EVICTED = "history_evicted"
    SLOW_CONSUMER = "slow_consumer"
    BUS_OUTAGE = "bus_outage"
    EPOCH_CHANGED = "epoch_changed"


class ErrorCode(StrEnum):
    """Codes of the `error` message (docs/protocol.md)."""

    BAD_JSON = "bad_json"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_MESSAGE = "invalid_message"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_TOPICS = "too_many_topics"
    TOPIC_LIMIT = "topic_limit"


class OverflowPolicy(StrEnum):
    """What happens when a client's bounded outbox is full (docs/protocol.md, "Slow consumers")."""

    DISCONNECT = "disconnect"
    DROP_OLDEST = "drop_oldest"
    KEEP_LATEST = "keep_latest"
