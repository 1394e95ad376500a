"""Structured logging: one line per record, extra fields as keys, exceptions by type only."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from enum import StrEnum

import pytest

from wirestate.adapters.server import logs
from wirestate.adapters.server.logs import configure_logging

SECRET = "Bearer eyJhbGciOiJIUzI1NiJ9.s3cr3t"
TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


class Cause(StrEnum):
    KEEPALIVE_TIMEOUT = "keepalive_timeout"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    transitions_level = logging.getLogger("transitions").level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("transitions").setLevel(transitions_level)


def ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logs._Handler)]


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def fail_with_secret() -> None:
    raise PermissionError(f"token rejected: {SECRET}")


def test_json_lines_parse_with_the_standard_keys_and_extra_fields() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)
    log = logging.getLogger("wirestate.server")
    log.info(
        "client closed",
        extra={"client_id": "c1", "cause": Cause.KEEPALIVE_TIMEOUT, "code": 1011, "duration": 12.3},
    )
    log.warning("breaker moved\non two lines", extra={"from_state": "closed", "to_state": "open"})
    first, second = (json.loads(line) for line in lines(out))
    assert first == {
        "ts": first["ts"],
        "level": "INFO",
        "logger": "wirestate.server",
        "msg": "client closed",
        "client_id": "c1",
        "cause": "keepalive_timeout",
        "code": 1011,
        "duration": 12.3,
    }
    assert TS.match(first["ts"])
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]
    assert second["msg"] == "breaker moved\non two lines"
    assert (second["from_state"], second["to_state"]) == ("closed", "open")


def test_json_exception_is_its_type_name_only() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)
    try:
        fail_with_secret()
    except PermissionError:
        logging.getLogger("wirestate.auth").exception("upgrade refused", extra={"state": "x"})
    logging.getLogger("wirestate.auth").error("again", exc_info=PermissionError(SECRET))
    text = out.getvalue()
    assert "s3cr3t" not in text
    assert "Traceback" not in text
    assert "fail_with_secret" not in text
    records = [json.loads(line) for line in lines(out)]
    assert [r["exc"] for r in records] == ["PermissionError", "PermissionError"]
    assert records[0]["state"] == "x"


def test_text_is_one_readable_line_with_key_values_and_no_exception_text() -> None:
    out = io.StringIO()
    configure_logging("text", stream=out)
    log = logging.getLogger("wirestate.hub")
    log.info("client closed", extra={"client_id": "c 1", "cause": "slow_consumer", "code": 1013})
    try:
        fail_with_secret()
    except PermissionError:
        log.exception("two\nlines", stack_info=True)
    first, second = lines(out)
    ts, rest = first.split(" ", 1)
    assert TS.match(ts)
    assert rest == 'INFO wirestate.hub client closed client_id="c 1" cause=slow_consumer code=1013'
    assert second.endswith("ERROR wirestate.hub two\\nlines exc=PermissionError")
    assert "s3cr3t" not in out.getvalue()


def test_extra_keys_never_overwrite_the_lines_own_keys() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)
    logging.getLogger("x").info("m", extra={"level": "forged", "ts": 0, "exc": "no"})
    record = json.loads(out.getvalue())
    assert record["level"] == "INFO"
    assert (record["extra_level"], record["extra_ts"], record["extra_exc"]) == ("forged", 0, "no")
    assert "exc" not in record


def test_configuring_twice_replaces_the_handler_and_keeps_others() -> None:
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("text", stream=first)
    configure_logging("json", "debug", stream=second)
    configure_logging("json", "debug", stream=second)
    assert len(ours()) == 1
    assert other in logging.getLogger().handlers
    logging.getLogger("wirestate").debug("once")
    assert first.getvalue() == ""
    assert [json.loads(line)["msg"] for line in lines(second)] == ["once"]
    logging.getLogger().removeHandler(other)


def test_level_filters_and_transitions_is_quiet() -> None:
    out = io.StringIO()
    configure_logging("json", "warning", stream=out)
    logging.getLogger("wirestate").info("hidden")
    logging.getLogger("transitions.core").warning("also hidden")
    logging.getLogger("wirestate").warning("shown")
    assert logging.getLogger("transitions").level == logging.ERROR
    assert [json.loads(line)["msg"] for line in lines(out)] == ["shown"]


@pytest.mark.parametrize(("fmt", "level"), [("yaml", "INFO"), ("json", "LOUD")])
def test_unknown_format_or_level_is_refused(fmt: str, level: str) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(fmt, level, stream=io.StringIO())  # type: ignore[arg-type]
    assert ours() == []
