"""Settings: the documented defaults, overrides > environment > file, and errors that name keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from wirestate.core.causes import OverflowPolicy
from wirestate.models.settings import (
    AuthSettings,
    BreakerSettings,
    BusBreakerSettings,
    ConfigError,
    ServerSettings,
    Settings,
    SourceSettings,
    load_settings,
    sentinel_address,
)

SECRET = "correct-horse-battery-staple-0123456789"  # 39 bytes: long enough for HS256


@pytest.fixture
def write_toml(tmp_path: Path) -> Any:
    def write(text: str) -> Path:
        path = tmp_path / "wirestate.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def problems(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    return str(excinfo.value)


# --- defaults ---------------------------------------------------------------------------


def test_every_default_of_the_design() -> None:
    settings = load_settings(env={})
    server = settings.server
    assert (server.host, server.port) == ("127.0.0.1", 12080)
    assert (server.ping_interval, server.ping_timeout) == (30.0, 10.0)
    assert server.send_queue_size == 256
    assert server.close_timeout == 5.0
    assert server.certfile is None
    assert server.keyfile is None
    assert 0 < server.loop_stall_threshold < server.ping_timeout
    assert settings.sources == ()
    assert settings.auth is None
    limits = settings.limits
    assert limits.max_connections == 10000
    assert limits.max_connections_per_ip == 1000
    assert limits.max_subscriptions == 100
    assert limits.max_message_size == 65536
    assert limits.messages_per_second == 50
    assert (settings.history.size, settings.history.max_age) == (1000, 600.0)
    assert settings.bus.kind == "memory"
    assert settings.bus.url == "redis://127.0.0.1:6379/0"
    assert (settings.bus.breaker.failure_threshold, settings.bus.breaker.reset_timeout) == (3, 5.0)
    assert settings.topics == {}
    assert settings.overflow_policy("anything") is OverflowPolicy.DISCONNECT
    assert settings == Settings()


def test_source_and_auth_defaults() -> None:
    source = SourceSettings(kind="http", topic="agent_status", url="http://127.0.0.1:9000/agents")
    assert (source.breaker.failure_threshold, source.breaker.reset_timeout) == (5, 300.0)
    auth = AuthSettings(secret=SecretStr(SECRET))
    assert auth.algorithm == "HS256"
    assert auth.first_message is False
    assert auth.allowed_origins == ()
    assert auth.public_key_file is None


DESIGN_EXAMPLE = """
[server]
host = "127.0.0.1"
port = 12080
ping_interval = 30.0
ping_timeout = 10.0
send_queue_size = 256       # messages per client outbox
close_timeout = 5.0
certfile = "/etc/wirestate/cert.pem"
keyfile = "/etc/wirestate/key.pem"

[[sources]]
topic = "agent_status"
kind = "http"            # poll a JSON URL; "system" is the built-in host status
url = "http://127.0.0.1:9000/agents"
interval = 5.0
timeout = 2.0
[sources.breaker]
failure_threshold = 5
reset_timeout = 300.0

[auth]
secret = "@SECRET@"
allowed_origins = ["https://app.example.com"]

[limits]
max_connections = 10000
max_connections_per_ip = 1000
max_subscriptions = 100
max_message_size = 65536
messages_per_second = 50

[history]
size = 1000
max_age = 600.0

[bus]
kind = "memory"
url = "redis://127.0.0.1:6379/0"
[bus.breaker]
failure_threshold = 3
reset_timeout = 5.0

[topics."orders"]
overflow = "disconnect"
[topics."prices.eu"]
overflow = "keep_latest"
""".replace("@SECRET@", SECRET)


def test_design_example_file_loads(write_toml: Any) -> None:
    settings = load_settings(write_toml(DESIGN_EXAMPLE), env={})
    assert settings.server.certfile == Path("/etc/wirestate/cert.pem")
    (source,) = settings.sources
    assert (source.kind, source.topic, source.interval, source.timeout) == (
        "http",
        "agent_status",
        5.0,
        2.0,
    )
    assert settings.auth is not None
    assert settings.auth.secret is not None
    assert settings.auth.secret.get_secret_value() == SECRET
    assert settings.auth.allowed_origins == ("https://app.example.com",)
    assert settings.overflow_policy("orders") is OverflowPolicy.DISCONNECT
    assert settings.overflow_policy("prices.eu") is OverflowPolicy.KEEP_LATEST


def test_settings_are_frozen() -> None:
    settings = load_settings(env={})
    with pytest.raises(ValidationError):
        settings.server = ServerSettings()
    with pytest.raises(ValidationError):
        settings.server.port = 1
    assert isinstance(settings.sources, tuple)


# --- precedence -------------------------------------------------------------------------


def test_overrides_beat_environment_beat_file_beat_defaults(write_toml: Any) -> None:
    config = write_toml('[server]\nport = 1000\nhost = "10.0.0.1"\nping_timeout = 7.0\n')
    env = {"WIRESTATE_SERVER__PORT": "2000", "WIRESTATE_SERVER__PING_TIMEOUT": "8"}
    overrides = {"server": {"port": 3000}}

    assert load_settings(env={}).server.port == 12080
    from_file = load_settings(config, env={}).server
    assert (from_file.port, from_file.host, from_file.ping_timeout) == (1000, "10.0.0.1", 7.0)
    from_env = load_settings(config, env=env).server
    assert (from_env.port, from_env.host, from_env.ping_timeout) == (2000, "10.0.0.1", 8.0)
    from_flags = load_settings(config, overrides=overrides, env=env).server
    # Key by key: each layer replaces only what it names.
    assert (from_flags.port, from_flags.host, from_flags.ping_timeout) == (3000, "10.0.0.1", 8.0)
    assert from_flags.ping_interval == 30.0


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WIRESTATE_SERVER__PORT", "4321")
    assert load_settings().server.port == 4321
    assert load_settings(env={}).server.port == 12080
    # Built in code, Settings never reads the process environment.
    assert Settings().server.port == 12080


def test_flat_server_names_and_their_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "WIRESTATE_HOST": "0.0.0.0",
        "WIRESTATE_PORT": "8080",
        "WIRESTATE_PING_INTERVAL": "1.5",
        "WIRESTATE_PING_TIMEOUT": "0.5",
        "WIRESTATE_SEND_QUEUE_SIZE": "8",
        "WIRESTATE_CLOSE_TIMEOUT": "0.25",
        "WIRESTATE_LOOP_STALL_THRESHOLD": "0.1",
    }
    server = load_settings(env=env).server
    assert (server.host, server.port, server.ping_interval, server.ping_timeout) == (
        "0.0.0.0",
        8080,
        1.5,
        0.5,
    )
    assert (server.send_queue_size, server.close_timeout, server.loop_stall_threshold) == (
        8,
        0.25,
        0.1,
    )
    # The nested form names the key exactly, so it wins over the flat one.
    both = {"WIRESTATE_PORT": "8080", "WIRESTATE_SERVER__PORT": "9090"}
    assert load_settings(env=both).server.port == 9090
    # Flat names are for [server] only.
    assert load_settings(env={"WIRESTATE_SIZE": "5"}).history.size == 1000


def test_environment_names_are_case_insensitive_and_empty_is_unset() -> None:
    assert load_settings(env={"wirestate_server__port": "1"}).server.port == 1
    assert load_settings(env={"Wirestate_Port": "2"}).server.port == 2
    assert load_settings(env={"WIRESTATE_PORT": "", "WIRESTATE_SERVER__HOST": ""}).server == (
        ServerSettings()
    )
    # Not our prefix: ignored.
    assert load_settings(env={"PORT": "1", "OTHER_SERVER__PORT": "1"}).server.port == 12080


def test_environment_reaches_every_section() -> None:
    env = {
        "WIRESTATE_LIMITS__MAX_MESSAGE_SIZE": "1024",
        "WIRESTATE_HISTORY__MAX_AGE": "60",
        "WIRESTATE_BUS__KIND": "redis",
        "WIRESTATE_BUS__URL": "redis://cache:6379/1",
        "WIRESTATE_BUS__BREAKER__FAILURE_THRESHOLD": "4",
        "WIRESTATE_AUTH__SECRET": SECRET,
        "WIRESTATE_AUTH__FIRST_MESSAGE": "true",
        "WIRESTATE_AUTH__ALLOWED_ORIGINS": '["https://a.example", "http://localhost:3000"]',
        "WIRESTATE_TOPICS__ORDERS__OVERFLOW": "drop_oldest",
        "WIRESTATE_SOURCES": '[{"kind": "system", "topic": "host", "interval": 1}]',
    }
    settings = load_settings(env=env)
    assert settings.limits.max_message_size == 1024
    assert settings.history.max_age == 60.0
    assert (settings.bus.kind, settings.bus.url) == ("redis", "redis://cache:6379/1")
    # A partial bus breaker keeps the bus's own defaults, not a source's.
    assert (settings.bus.breaker.failure_threshold, settings.bus.breaker.reset_timeout) == (4, 5.0)
    assert settings.auth is not None
    assert settings.auth.first_message is True
    assert settings.auth.allowed_origins == ("https://a.example", "http://localhost:3000")
    assert settings.overflow_policy("orders") is OverflowPolicy.DROP_OLDEST
    assert settings.sources == (SourceSettings(kind="system", topic="host", interval=1.0),)


def test_partial_bus_breaker_table_keeps_bus_defaults(write_toml: Any) -> None:
    settings = load_settings(write_toml("[bus.breaker]\nfailure_threshold = 4\n"), env={})
    assert isinstance(settings.bus.breaker, BusBreakerSettings)
    assert (settings.bus.breaker.failure_threshold, settings.bus.breaker.reset_timeout) == (4, 5.0)


def test_environment_list_replaces_file_list(write_toml: Any) -> None:
    config = write_toml(
        '[[sources]]\nkind = "system"\ntopic = "a"\n[[sources]]\nkind = "system"\ntopic = "b"\n'
    )
    assert [s.topic for s in load_settings(config, env={}).sources] == ["a", "b"]
    env = {"WIRESTATE_SOURCES": '[{"kind": "system", "topic": "c"}]'}
    assert [s.topic for s in load_settings(config, env=env).sources] == ["c"]


def test_override_forms() -> None:
    dotted = load_settings(overrides={"server.port": 1, "limits.max_subscriptions": 5}, env={})
    assert (dotted.server.port, dotted.limits.max_subscriptions) == (1, 5)
    nested = load_settings(overrides={"server": {"port": 2, "host": None}}, env={})
    assert (nested.server.port, nested.server.host) == (2, "127.0.0.1")
    # argparse leaves unset flags at None: they must not mask lower layers.
    env = {"WIRESTATE_PORT": "3"}
    unset = load_settings(overrides={"server.port": None, "server.host": None}, env=env)
    assert unset.server.port == 3
    assert load_settings(overrides={}, env=env).server.port == 3
    # Overrides merge with the environment key by key.
    mixed = load_settings(overrides={"server.host": "::1"}, env=env).server
    assert (mixed.host, mixed.port) == ("::1", 3)


# --- errors -----------------------------------------------------------------------------


def test_typo_in_file_is_rejected_with_the_key_named(write_toml: Any) -> None:
    config = write_toml("[server]\nprot = 8080\n")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(config, env={})
    text = problems(excinfo)
    assert "server.prot" in text
    assert str(config) in text
    assert "unknown key" in text
    assert "port" in text.split("server.prot", 1)[1]  # the allowed keys are listed


def test_unknown_table_is_rejected(write_toml: Any) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write_toml("[servr]\nport = 1\n"), env={})
    text = problems(excinfo)
    assert "servr" in text
    assert "server, sources, auth, limits, history, bus, topics" in text


def test_unknown_key_in_a_list_entry(write_toml: Any) -> None:
    config = write_toml('[[sources]]\nkind = "system"\ntopic = "a"\ninterva = 2\n')
    with pytest.raises(ConfigError) as excinfo:
        load_settings(config, env={})
    assert "sources[0].interva" in problems(excinfo)
    assert "interval" in problems(excinfo)


@pytest.mark.parametrize(
    ("toml", "key", "allowed"),
    [
        ('[[sources]]\nkind = "ftp"\ntopic = "a"\n', "sources[0].kind", "'http' or 'system'"),
        ('[bus]\nkind = "kafka"\n', "bus.kind", "'memory' or 'redis'"),
        (
            '[topics."orders"]\noverflow = "block"\n',
            "topics.orders.overflow",
            "'disconnect', 'drop_oldest' or 'keep_latest'",
        ),
        ("[server]\nport = 70000\n", "server.port", "65535"),
        ("[server]\nping_interval = 0\n", "server.ping_interval", "greater than 0"),
        (
            "[limits]\nmax_message_size = 0\n",
            "limits.max_message_size",
            "greater than or equal to 1",
        ),
        ('[server]\nport = "high"\n', "server.port", "valid integer"),
        ('[topics."no spaces"]\noverflow = "disconnect"\n', 'topics."no spaces"', "pattern"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(
    write_toml: Any, toml: str, key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write_toml(toml), env={})
    text = problems(excinfo)
    assert key in text
    assert allowed in text


def test_errors_say_which_layer_a_value_came_from(write_toml: Any) -> None:
    config = write_toml("[history]\nsize = -1\n")
    env = {"WIRESTATE_PORT": "x", "WIRESTATE_LIMITS__MAX_CONNECTIONS": "0"}
    with pytest.raises(ConfigError) as excinfo:
        load_settings(config, overrides={"server.ping_timeout": -1}, env=env)
    lines = excinfo.value.problems
    assert len(lines) == 4
    assert any(line.startswith("server.port (from WIRESTATE_PORT)") for line in lines)
    assert any(
        line.startswith("limits.max_connections (from WIRESTATE_LIMITS__MAX_CONNECTIONS)")
        for line in lines
    )
    assert any(line.startswith(f"history.size (from config file {config})") for line in lines)
    assert any(line.startswith("server.ping_timeout (from overrides)") for line in lines)


def test_typo_in_a_nested_variable_is_rejected() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={"WIRESTATE_SERVER__PROT": "1"})
    assert "server.prot (from WIRESTATE_SERVER__PROT): unknown key" in problems(excinfo)
    # Other names under the prefix are not ours to judge.
    assert load_settings(env={"WIRESTATE_CONFIG": "/etc/x.toml"}) == Settings()


def test_environment_json_that_does_not_parse() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={"WIRESTATE_SOURCES": "[{nope"})
    assert "WIRESTATE_SOURCES" in problems(excinfo)
    assert "{nope" not in problems(excinfo)


def test_missing_and_malformed_files(tmp_path: Path, write_toml: Any) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="not found"):
        load_settings(missing, env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write_toml("[server\nport = 1\n"), env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path, env={})
    assert issubclass(ConfigError, ValueError)


# --- secrets ----------------------------------------------------------------------------


def test_secret_is_not_in_repr_or_dumps() -> None:
    settings = load_settings(env={"WIRESTATE_AUTH__SECRET": SECRET})
    assert settings.auth is not None
    assert settings.auth.secret is not None
    assert settings.auth.secret.get_secret_value() == SECRET
    for text in (repr(settings), str(settings), repr(settings.auth), settings.model_dump_json()):
        assert SECRET not in text


@pytest.mark.parametrize(
    "auth_table",
    [
        f'secret = "{SECRET}"\nsecrte = "{SECRET}"\n',  # typo beside the real key
        f'secrte = "{SECRET}"\n',  # typo instead of it
        'secret = "short-hunter2"\n',  # too short
        f'secret = "{SECRET}"\nalgorithm = "RS256"\n',  # wrong algorithm for a secret
        f'secret = "{SECRET}"\nalgorithm = "none"\n',
        f'secret = "{SECRET}"\nallowed_origins = ["https://a.example/path"]\n',
        f'secret = ["{SECRET}"]\n',
    ],
)
def test_secret_never_appears_in_errors(write_toml: Any, auth_table: str) -> None:
    config = write_toml("[auth]\n" + auth_table)
    with pytest.raises(ConfigError) as excinfo:
        load_settings(config, env={})
    text = problems(excinfo)
    assert "auth" in text
    assert SECRET not in text
    assert "hunter2" not in text
    # Not even in the chain a traceback would print.
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__suppress_context__


def test_validation_errors_hide_inputs_even_outside_load_settings() -> None:
    with pytest.raises(ValidationError) as excinfo:
        Settings.model_validate({"auth": {"secret": SECRET, "secrte": SECRET}})
    assert SECRET not in str(excinfo.value)
    with pytest.raises(ValidationError) as excinfo:
        AuthSettings(secret=SecretStr("hunter2"))
    assert "hunter2" not in str(excinfo.value)


def test_secret_from_the_environment_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={"WIRESTATE_AUTH__SECRET": "hunter2-too-short"})
    assert "hunter2" not in problems(excinfo)
    assert "auth" in problems(excinfo)
    assert "32 bytes" in problems(excinfo)


# --- cross-field rules ------------------------------------------------------------------


def test_auth_key_must_match_the_algorithm() -> None:
    with pytest.raises(ValidationError, match="secret is required"):
        AuthSettings()
    with pytest.raises(ValidationError, match="public_key_file is required"):
        AuthSettings(algorithm="ES256")
    rs = AuthSettings(algorithm="RS256", public_key_file=Path("/keys/pub.pem"))
    assert rs.secret is None
    with pytest.raises(ValidationError, match="public_key_file is for RS256/ES256"):
        AuthSettings(secret=SecretStr(SECRET), public_key_file=Path("/keys/pub.pem"))


@pytest.mark.parametrize(
    "origin", ["https://app.example.com/", "app.example.com", "https://a.example/x", "*"]
)
def test_allowed_origins_are_bare_origins(origin: str) -> None:
    with pytest.raises(ValidationError, match="allowed_origins"):
        AuthSettings(secret=SecretStr(SECRET), allowed_origins=(origin,))


def test_source_url_follows_kind() -> None:
    with pytest.raises(ValidationError, match="url is required"):
        SourceSettings(kind="http", topic="a")
    with pytest.raises(ValidationError, match="only for kind"):
        SourceSettings(kind="system", topic="a", url="http://x/")
    with pytest.raises(ValidationError, match="http:// or https://"):
        SourceSettings(kind="http", topic="a", url="file:///etc/passwd")
    assert SourceSettings(kind="http", topic="a", url="https://x:1/y").url == "https://x:1/y"


def test_source_topics_are_unique_and_not_the_hubs() -> None:
    system = SourceSettings(kind="system", topic="a")
    with pytest.raises(ValidationError, match="same topic"):
        Settings(sources=(system, system))
    with pytest.raises(ValidationError, match="hub's own topics"):
        Settings(sources=(SourceSettings(kind="system", topic="clients"),))


def test_tls_needs_both_files() -> None:
    with pytest.raises(ValidationError, match="certfile and keyfile"):
        ServerSettings(certfile=Path("c.pem"))
    assert ServerSettings(certfile=Path("c.pem"), keyfile=Path("k.pem")).keyfile == Path("k.pem")


def test_breaker_rules() -> None:
    assert BreakerSettings(max_reset_timeout=600.0).max_reset_timeout == 600.0
    with pytest.raises(ValidationError, match="max_reset_timeout"):
        BreakerSettings(max_reset_timeout=10.0)
    with pytest.raises(ValidationError, match="success_threshold"):
        BreakerSettings(success_threshold=2)
    with pytest.raises(ValidationError):
        BreakerSettings(reset_timeout=float("inf"))


def test_bus_url_scheme() -> None:
    with pytest.raises(ConfigError, match="redis://"):
        load_settings(env={"WIRESTATE_BUS__URL": "http://cache:6379"})
    settings = load_settings(env={"WIRESTATE_BUS__URL": "rediss://:pw@cache:6380/0"})
    assert "pw" not in repr(settings)  # a Redis URL may carry a password


def test_a_sentinel_bus_url_names_the_sentinels_the_service_and_the_database() -> None:
    settings = load_settings(
        env={"WIRESTATE_BUS__URL": "redis+sentinel://:pw@s1:26380,s2/primary/2"}
    )
    assert "pw" not in repr(settings)
    address = sentinel_address(settings.bus.url)
    assert address is not None
    assert address.sentinels == (("s1", 26380), ("s2", 26379))
    assert (address.service, address.db, address.username, address.password) == (
        "primary",
        2,
        None,
        "pw",
    )
    assert "pw" not in repr(address)
    named = sentinel_address("redis+sentinel://user:p%40ss@[::1]:1/m")
    assert named is not None
    assert (named.sentinels, named.username, named.password) == ((("::1", 1),), "user", "p@ss")
    assert sentinel_address("redis://cache:6379/0") is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://s1:26379", "service name"),
        ("redis+sentinel://s1:x/m", "port"),
        ("redis+sentinel://s1:1/m/zero", "number"),
        ("redis+sentinel:///m", "host:port"),
    ],
)
def test_a_malformed_sentinel_url_is_refused(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings(env={"WIRESTATE_BUS__URL": url})


def test_the_lease_ttl_defaults_to_ten_seconds_and_must_be_positive() -> None:
    assert load_settings(env={}).bus.lease_ttl == 10.0
    assert load_settings(env={"WIRESTATE_BUS__LEASE_TTL": "1.5"}).bus.lease_ttl == 1.5
    with pytest.raises(ConfigError, match="lease_ttl"):
        load_settings(env={"WIRESTATE_BUS__LEASE_TTL": "0"})
