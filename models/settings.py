"""Settings: every default (docs/operations.md), and where each value may come from.

Precedence, highest first (docs/operations.md, "Configuration"): explicit overrides (what the CLI
builds from its flags) > ``WIRESTATE_*`` environment > the TOML config file > the defaults below.
`load_settings` is the one place that reads the environment and a file; ``Settings(...)`` built in
code sees only its keyword arguments and the defaults, so an application that embeds the hub is
never reconfigured by its process environment behind its back.

Layers merge key by key: ``WIRESTATE_SERVER__PORT`` replaces ``server.port`` from the file
and leaves ``server.host`` alone. Lists are replaced whole (``WIRESTATE_SOURCES`` replaces
every ``[[sources]]``).

Environment forms (names are case-insensitive; an empty value counts as unset):

- nested, any key: ``WIRESTATE_<SECTION>__<KEY>``, e.g. ``WIRESTATE_SERVER__PORT=8080``,
  ``WIRESTATE_BUS__BREAKER__RESET_TIMEOUT=2.5``, ``WIRESTATE_AUTH__SECRET=…``;
- a whole section or list as JSON: ``WIRESTATE_SOURCES='[{"kind": "system", ...}]'``,
  ``WIRESTATE_AUTH__ALLOWED_ORIGINS='["https://app.example.com"]'``,
  ``WIRESTATE_TOPICS='{"orders": {"overflow": "keep_latest"}}'`` (topic names in a nested
  variable name are lower-cased like every name, so use the JSON form for others);
- flat, the ``[server]`` keys only, as the configuration reference names them: ``WIRESTATE_HOST``,
  ``WIRESTATE_PORT``, ``WIRESTATE_PING_INTERVAL``, ``WIRESTATE_PING_TIMEOUT``,
  ``WIRESTATE_SEND_QUEUE_SIZE``, ``WIRESTATE_CLOSE_TIMEOUT``, ``WIRESTATE_CERTFILE``,
  ``WIRESTATE_KEYFILE``, ``WIRESTATE_LOOP_STALL_THRESHOLD`` and the rest (a list as JSON:
  ``WIRESTATE_TRUSTED_PROXIES='["10.0.0.0/8"]'``). When both a flat and a nested
  variable name the same key, the nested one wins.

A nested variable naming an unknown key (``WIRESTATE_SERVER__PROT``) is an error like a typo
in the file; any other ``WIRESTATE_*`` name is ignored, so other tools may share the prefix.

Overrides are a mapping shaped like the TOML document: nested (``{"server": {"port": 1}}``)
or with dotted keys (``{"server.port": 1}``, split on every dot). A ``None`` value means "flag
not given" and is skipped, so ``vars(argparse_namespace)`` can be passed through as it is.

Errors: every section forbids unknown keys, so a typo is reported instead of ignored.
`load_settings` raises `ConfigError`, one line per problem, naming the key as a dotted path,
where its value came from (file, environment variable, override) and what is allowed. Values
are never shown: ``auth.secret`` is a `SecretStr`, and validation errors are built with
``hide_input_in_errors`` so not even a chained traceback repeats an input.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, TypeAlias, Union, get_args, get_origin
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as _SourceError

from wirestate.core.causes import OverflowPolicy

from .wire import Topic

__all__ = [
    "ENV_PREFIX",
    "SENTINEL_SCHEME",
    "AuthSettings",
    "BreakerSettings",
    "BusBreakerSettings",
    "BusSettings",
    "ConfigError",
    "HistorySettings",
    "LimitsSettings",
    "SentinelAddress",
    "ServerSettings",
    "Settings",
    "SourceSettings",
    "TopicSettings",
    "load_settings",
    "sentinel_address",
]

ENV_PREFIX = "WIRESTATE_"
_NESTED = "__"

Seconds: TypeAlias = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Count: TypeAlias = Annotated[int, Field(ge=1)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class ServerSettings(_Section):
    """``[server]``: the listener, keep-alive and the bounds of every connection."""

    #: Address to bind; anything but a loopback address needs ``[auth]``.
    host: str = Field(default="127.0.0.1", min_length=1)
    #: 0 asks the OS for a free port (tests).
    port: int = Field(default=12080, ge=0, le=65535)
    #: Seconds between protocol pings to each client.
    ping_interval: Seconds = 30.0
    #: Seconds a pong may take; later, the client is closed with 1011 keepalive_timeout.
    ping_timeout: Seconds = 10.0
    #: Messages per client outbox; what happens when it is full is the topic's overflow policy.
    #: A burst that arrives at once may pass it while the client's connection takes writes.
    send_queue_size: Count = 256
    #: Bytes queued for one client (its outbox plus what its connection still buffers) past
    #: which it is a slow consumer, whatever the count.
    max_pending_bytes: Count = 1_048_576
    #: Seconds a connection may take to complete its upgrade (or an HTTP request); later it
    #: is dropped.
    open_timeout: Seconds = 10.0
    #: Bound on closing → unregistered, stuck pumps included (lifecycle invariant 5).
    close_timeout: Seconds = 5.0
    #: PEM certificate chain.
    #: Both or neither: serve wss:// and https://.
    certfile: Path | None = None
    #: PEM private key of `certfile`.
    keyfile: Path | None = None
    #: Event-loop lag above this counts as a stall: a pong deadline that expires during one
    #: is extended instead of blamed on the peer. Well above scheduling jitter, well below
    #: any sane ping_timeout.
    loop_stall_threshold: Seconds = 0.5
    #: The event loop of `wirestate serve`: "asyncio", or "uvloop" (`pip install
    #: 'wirestate[fast]'`), whose transports cost less per write (bench/README.md).
    loop: Literal["asyncio", "uvloop"] = "asyncio"
    #: Seconds the server writes a fan-out before letting the loop run again (at least 64
    #: clients each time). 0: after every 64, which coalesces most (least CPU per delivery);
    #: longer coalesces less and costs more CPU, and measured no sooner a paced fan-out's last
    #: client once the benchmark stopped favouring it (docs/performance.md).
    flush_slice: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0
    #: `wirestate serve` only: tune the cyclic GC for many long-lived connections after
    #: start-up (`gc.freeze()`, a young generation of 10,000; see `cli.tune_gc`).
    gc_tune: bool = True
    #: Peers (addresses or CIDR ranges) whose ``Forwarded`` / ``X-Forwarded-For`` header is
    #: believed: from them, the client's address is the right-most hop not in this list.
    #: From anyone else those headers are ignored.
    trusted_proxies: tuple[str, ...] = ()
    #: The header those proxies write the client's address in: "x-forwarded-for", or
    #: "forwarded" (RFC 7239, its ``for=``). Only this one is read: the other is passed
    #: through as the client wrote it.
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    #: Host names (no port) the hub answers to; empty: any with ``[auth]``, loopback names only
    #: in open mode. Anything else is refused with 421 on every path.
    allowed_hosts: tuple[str, ...] = ()
    #: Open mode (no token checked) may bind a non-loopback address: for a hub behind a proxy
    #: that authenticates, or in a container whose port is published on loopback. A warning
    #: is logged at start.
    open_beyond_loopback: bool = False

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together: set both or neither")
        for entry in self.trusted_proxies:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    "trusted_proxies entries are addresses or CIDR ranges such as 10.0.0.0/8"
                ) from None
        for name in self.allowed_hosts:
            if not _HOST_NAME.match(name):
                raise ValueError(
                    "allowed_hosts entries are host names or addresses without a port,"
                    " such as hub.example.com"
                )
        return self


class BreakerSettings(_Section):
    """A circuit breaker (docs/breaker.md); defaults are a source's: 5 / 300 s."""

    #: Consecutive failures that open the breaker.
    failure_threshold: Count = 5
    #: Seconds in open before a trial call.
    reset_timeout: Seconds = 300.0
    #: When set, the reset timeout doubles after each failed trial, up to this cap.
    max_reset_timeout: Seconds | None = None
    #: Trial calls let through while half_open.
    half_open_max_calls: Count = 1
    #: Successful trials needed to close again.
    success_threshold: Count = 1

    @model_validator(mode="after")
    def _cap_above_base(self) -> BreakerSettings:
        if self.max_reset_timeout is not None and self.max_reset_timeout < self.reset_timeout:
            raise ValueError("max_reset_timeout must be at least reset_timeout")
        if self.success_threshold > self.half_open_max_calls:
            raise ValueError("success_threshold cannot exceed half_open_max_calls")
        return self


class BusBreakerSettings(BreakerSettings):
    """The breaker on the link to the bus: quicker than a source's (3 / 5 s).

    A class of its own, not a different default instance, so that a partial
    ``[bus.breaker]`` table still falls back to the bus's defaults, not a source's.
    """

    failure_threshold: Count = 3
    reset_timeout: Seconds = 5.0


class SourceSettings(_Section):
    """One ``[[sources]]`` entry: a poller publishing on `topic` through its own breaker.

    ``kind = "http"`` polls the JSON document at `url` (required); ``kind = "system"`` is the
    built-in host status and takes no url. `timeout` bounds one call; a timeout is a failure.
    """

    #: "http" polls `url`; "system" is the built-in host status.
    kind: Literal["http", "system"]
    #: The topic its values are published on.
    topic: Topic
    #: The JSON document an "http" source GETs.
    url: str | None = None
    #: Seconds between polls.
    interval: Seconds = 5.0
    #: Seconds one call may take; a slower call is a failure.
    timeout: Seconds = 2.0
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)

    @model_validator(mode="after")
    def _url_matches_kind(self) -> SourceSettings:
        if self.kind == "system":
            if self.url is not None:
                raise ValueError('url is only for kind = "http"')
        elif self.url is None:
            raise ValueError('url is required for kind = "http"')
        else:
            parts = urlsplit(self.url)
            if parts.scheme not in {"http", "https"} or not parts.netloc:
                raise ValueError("url must be an absolute http:// or https:// URL")
        return self


#: Browser origins are compared as scheme://host[:port]; a path would never match.
_ORIGIN = re.compile(r"^https?://[^/?#\s]+$")
_HOST_NAME = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)$")
_MIN_HS256_SECRET_BYTES = 32


class AuthSettings(_Section):
    """``[auth]``: tokens, browser origins and anonymous topics.

    With a key, every upgrade and POST /publish needs a JWT (but `anonymous` topics): HS256
    (the default) verifies with `secret`, at least 32 bytes (RFC 7518, section 3.2); RS256 and
    ES256 verify with the PEM key in `public_key_file`. At most one of the two is set.
    Without either, `allowed_origins` alone: no token is asked for, and browsers from other
    origins are refused. `allowed_origins` empty: the Origin header is not checked.
    """

    #: The HS256 key, at least 32 bytes.
    secret: SecretStr | None = None
    #: The one algorithm tokens must be signed with.
    algorithm: Literal["HS256", "RS256", "ES256"] = "HS256"
    #: PEM public key for RS256 or ES256.
    public_key_file: Path | None = None
    #: Browser origins (scheme://host[:port]) allowed to upgrade, others get 403; empty:
    #: the Origin header is not checked.
    allowed_origins: tuple[str, ...] = ()
    #: Accept a first ``{"type": "auth", "token": …}`` message instead of a token on the upgrade.
    first_message: bool = False
    #: How long a connection may stay unauthenticated waiting for that first message.
    first_message_timeout: Seconds = 5.0
    #: Topic patterns a connection without a token may subscribe to (never publish to), as
    #: in a token's claims: ``*`` matches any run of characters, dots included.
    anonymous: tuple[str, ...] = ()

    @property
    def tokens(self) -> bool:
        """Whether tokens are verified (a secret or a public key is set)."""
        return self.secret is not None or self.public_key_file is not None

    @model_validator(mode="after")
    def _key_matches_algorithm(self) -> AuthSettings:
        # Messages name keys only: the secret itself must never reach an error.
        if not self.tokens and self.algorithm == "HS256":
            if not self.allowed_origins:
                raise ValueError(
                    "secret is required with algorithm HS256 (or allowed_origins alone, to"
                    " refuse other browser origins without tokens)"
                )
            if self.anonymous or self.first_message:
                raise ValueError("anonymous and first_message need tokens: set secret")
        elif self.algorithm == "HS256":
            if self.public_key_file is not None:
                raise ValueError("public_key_file is for RS256/ES256; HS256 uses secret")
            if self.secret is None:
                raise ValueError("secret is required with algorithm HS256")
            if len(self.secret.get_secret_value().encode()) < _MIN_HS256_SECRET_BYTES:
                raise ValueError("secret must be at least 32 bytes for HS256")
        else:
            if self.secret is not None:
                raise ValueError("secret is only for HS256; RS256/ES256 use public_key_file")
            if self.public_key_file is None:
                raise ValueError(f"public_key_file is required with algorithm {self.algorithm}")
        for pattern in self.anonymous:
            if not pattern or len(pattern) > 128:
                raise ValueError("anonymous entries are topic patterns of 1-128 characters")
        for origin in self.allowed_origins:
            if not _ORIGIN.match(origin):
                raise ValueError(
                    "allowed_origins entries are origins such as https://app.example.com "
                    "(scheme and host, optional port, no path)"
                )
        return self


class LimitsSettings(_Section):
    """``[limits]``: what one client, and all of them together, may take."""

    #: Connections at once; beyond it, the upgrade gets 503.
    max_connections: Count = 10000
    #: Connections at once from one address; beyond it, the upgrade gets 429.
    max_connections_per_ip: Count = 1000
    #: Topics per client; beyond it, error too_many_topics.
    max_subscriptions: Count = 100
    #: Bytes per inbound frame; beyond it, close 1009.
    max_message_size: Count = 65536
    #: Inbound messages per second per client (token bucket); protocol pings count too.
    messages_per_second: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 50.0
    #: Topics this node holds at most (built-in and source topics aside); creating one more
    #: is refused with topic_limit (HTTP 503 on POST /publish).
    max_topics: Count = 100_000
    #: Upgrades in flight at once (connected, not yet upgraded or answered); beyond it a
    #: new connection is closed at accept.
    max_handshakes: Count = 1000


class HistorySettings(_Section):
    """``[history]``: what each topic keeps for clients that resume with ``since``."""

    #: Events kept per topic for resume; 0 keeps none (every resume is a gap).
    size: int = Field(default=1000, ge=0)
    #: Seconds an event is kept for resume.
    max_age: Seconds = 600.0


#: The scheme of a bus URL that names Redis Sentinels rather than a server.
SENTINEL_SCHEME = "redis+sentinel"
_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", SENTINEL_SCHEME})


class SentinelAddress(BaseModel):
    """A ``redis+sentinel://`` bus URL, parsed: where the sentinels listen, the name they
    monitor the primary under, the database, and the primary's credentials (the sentinels
    are asked without them)."""

    model_config = ConfigDict(frozen=True)

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = Field(default=None, repr=False)


def sentinel_address(url: str) -> SentinelAddress | None:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]``
    as a `SentinelAddress`; None for another scheme. ``ValueError`` for a Sentinel URL
    without a sentinel, a port or a service name, or with a database that is not a number.
    The port defaults to 26379, Sentinel's own."""
    if not url.startswith(f"{SENTINEL_SCHEME}://"):
        return None
    rest = url[len(SENTINEL_SCHEME) + 3 :]
    hosts, _, path = rest.partition("/")
    username = password = None
    if "@" in hosts:
        auth, _, hosts = hosts.rpartition("@")
        user, colon, secret = auth.partition(":")
        username, password = (user or None), (unquote(secret) if colon else None)
        if not colon:  # "password@host", as redis:// reads a lone user part
            username, password = None, unquote(user)
    sentinels = []
    for part in hosts.split(","):
        host, _, port = part.strip().rpartition(":") if ":" in part else (part.strip(), "", "")
        host = host.strip("[]")
        if not host:
            raise ValueError("a redis+sentinel:// URL needs host:port for each sentinel")
        try:
            sentinels.append((host, int(port) if port else 26379))
        except ValueError:
            raise ValueError(f"bad sentinel port in {part.strip()!r}") from None
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError("a redis+sentinel:// URL needs the service name: .../service_name[/db]")
    if db and not db.isdigit():
        raise ValueError("the database of a redis+sentinel:// URL must be a number")
    return SentinelAddress(
        sentinels=tuple(sentinels),
        service=unquote(service),
        db=int(db or 0),
        username=username,
        password=password,
    )


class BusSettings(_Section):
    """``[bus]``: how several nodes share their topics (docs/scaling.md)."""

    #: "memory": one node; "redis": Redis Streams number and carry every topic.
    kind: Literal["memory", "redis"] = "memory"
    # repr=False: a Redis URL may carry a password.
    #: The Redis server of kind "redis" (redis://, rediss:// or unix://), or the sentinels
    #: that know its primary: redis+sentinel://host:port[,host:port]/service_name[/db].
    url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    #: Seconds a shared source's lease lives without renewal: the longest a source goes
    #: unpolled after its leader dies (renewed every third of it).
    lease_ttl: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    breaker: BusBreakerSettings = Field(default_factory=BusBreakerSettings)

    @model_validator(mode="after")
    def _redis_url(self) -> BusSettings:
        if urlsplit(self.url).scheme not in _REDIS_SCHEMES:
            raise ValueError("url must be a redis://, rediss://, unix:// or redis+sentinel:// URL")
        sentinel_address(self.url)  # ValueError for a malformed Sentinel address
        return self


class TopicSettings(_Section):
    """``[topics."<name>"]``: one topic's own policy."""

    #: A full outbox: close with 1013 ("disconnect"), or drop events and send a gap.
    overflow: OverflowPolicy = OverflowPolicy.DISCONNECT


#: Topics the hub itself publishes on; a source may not claim them.
_HUB_TOPICS = frozenset({"circuit_breaker", "clients"})


class Settings(BaseSettings):
    """All of wirestate's settings, validated and frozen. Build with `load_settings`."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,
        # Read by the environment source that `load_settings` builds (see module docstring).
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=_NESTED,
        env_ignore_empty=True,
        case_sensitive=False,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    sources: tuple[SourceSettings, ...] = ()
    #: None: open mode.
    auth: AuthSettings | None = None
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    bus: BusSettings = Field(default_factory=BusSettings)
    topics: dict[Topic, TopicSettings] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments only: the environment and files are read by load_settings alone.
        return (init_settings,)

    @model_validator(mode="after")
    def _source_topics(self) -> Settings:
        seen: set[str] = set()
        for source in self.sources:
            if source.topic in _HUB_TOPICS:
                raise ValueError("circuit_breaker and clients are the hub's own topics")
            if source.topic in seen:
                raise ValueError("two sources publish on the same topic")
            seen.add(source.topic)
        return self

    def overflow_policy(self, topic: str) -> OverflowPolicy:
        """The overflow policy of `topic`: its ``[topics."…"]`` entry, else disconnect."""
        entry = self.topics.get(topic)
        return entry.overflow if entry is not None else OverflowPolicy.DISCONNECT


# --- loading ------------------------------------------------------------------------------


class ConfigError(ValueError):
    """Settings could not be loaded. `problems` has one line per problem; ``str()`` lists them.

    Never contains a configured value, only key paths, origins and what is allowed.
    """

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("invalid settings:\n" + "\n".join(f"  {p}" for p in self.problems))


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # case_sensitive is False in Settings.model_config: names are matched lower-cased.
        return {
            name.lower(): value
            for name, value in self._environ.items()
            if not (self.env_ignore_empty and value == "")
        }


def _lookup(environ: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive, empty-is-unset lookup of one variable (same rules as _Environment)."""
    wanted = name.lower()
    for key, value in environ.items():
        if key.lower() == wanted and value != "":
            return value
    return None


def _environment_values(environ: Mapping[str, str]) -> dict[str, Any]:
    flat: dict[str, Any] = {
        key: value
        for key in ServerSettings.model_fields
        if (value := _lookup(environ, ENV_PREFIX + key)) is not None
    }
    for key, value in flat.items():
        if get_origin(ServerSettings.model_fields[key].annotation) is tuple:
            try:  # a list, as JSON like every list variable
                flat[key] = json.loads(value)
            except ValueError:
                name = ENV_PREFIX + key.upper()
                raise ConfigError([f"{name}: not valid JSON (lists are JSON)"]) from None
    try:
        nested = _Environment(Settings, environ)()
    except _SourceError as exc:
        # Raised for a list or table variable that is not JSON. Its text names the top-level
        # field (never the value); say which variables that means, and how to write them.
        match = re.search(r'field "([a-z_]+)"', str(exc))
        name = ENV_PREFIX + (match.group(1).upper() if match else "…")
        problem = f"{name} or a {name}__* variable: not valid JSON (lists and tables are JSON)"
        raise ConfigError([problem]) from None
    return _merge({"server": flat} if flat else {}, nested)


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Key-by-key merge; `top` wins. Tables merge recursively, anything else is replaced."""
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = _merge(below, value)
        else:
            merged[key] = value
    return merged


def _expand_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            value = _expand_overrides(value)
            if not value:
                continue
        for part in reversed(key.split(".")):
            value = {part: value}
        result = _merge(result, value)
    return result


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError([f"config file {path}: not found"]) from None
    except OSError as exc:
        raise ConfigError([f"config file {path}: cannot read it ({exc.strerror})"]) from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's text is the error kind and its line and column, not the document's content.
        raise ConfigError([f"config file {path}: not valid TOML: {exc}"]) from None


_Layer: TypeAlias = tuple[str, dict[str, Any]]  # (where it came from, its values)


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build `Settings` from defaults < `config_file` < `env` (os.environ when None) < `overrides`.

    Raises `ConfigError` for a missing or unreadable file, invalid TOML, or any value that
    does not validate; the error names every offending key and where it came from.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    layers: list[_Layer] = []
    if config_file is not None:
        layers.append((f"config file {config_file}", _read_toml(Path(config_file))))
    layers.append(("environment", _environment_values(environ)))
    if overrides:
        layers.append(("overrides", _expand_overrides(overrides)))
    merged: dict[str, Any] = {}
    for _, values in layers:
        merged = _merge(merged, values)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise ConfigError([_describe(error, layers, environ) for error in errors]) from None


# --- error text -----------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key_path(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as a TOML-style key path: sources[0].breaker."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part == "[key]":  # pydantic's marker for "the dict key itself is invalid"
            text += " (as a key)"
        else:
            name = part if _BARE_KEY.match(part) else f'"{part}"'
            text += f".{name}" if text else name
    return text or "(top level)"


def _value_at(values: Mapping[str, Any], loc: tuple[int | str, ...]) -> tuple[bool, Any]:
    current: Any = values
    for part in loc:
        in_table = isinstance(current, Mapping) and part in current
        in_list = isinstance(current, list) and isinstance(part, int) and part < len(current)
        if not (in_table or in_list):
            return False, None
        current = current[part]
    return True, current


def _env_name(loc: tuple[int | str, ...], environ: Mapping[str, str]) -> str | None:
    names: list[str] = []
    keys = [part for part in loc if isinstance(part, str)]
    if len(keys) == len(loc):
        names += [ENV_PREFIX + _NESTED.join(keys[:n]).upper() for n in range(len(keys), 0, -1)]
    if len(loc) == 2 and loc[0] == "server":
        names.append(ENV_PREFIX + str(loc[1]).upper())
    return next((name for name in names if _lookup(environ, name) is not None), None)


def _origin(loc: tuple[int | str, ...], layers: list[_Layer], environ: Mapping[str, str]) -> str:
    found: list[tuple[str, Any]] = []
    for label, values in layers:
        present, value = _value_at(values, loc)
        if present:
            found.append((label, value))
    if not found:
        return ""
    label, value = found[-1]
    # A table that several layers contributed to has no single origin.
    if isinstance(value, Mapping) and len(found) > 1:
        return ""
    if label == "environment":
        name = _env_name(loc, environ)
        return f" (from {name})" if name else " (from the environment)"
    return f" (from {label})"


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model whose keys are valid at `loc`, for listing them after an unknown key."""
    current: Any = Settings
    for part in loc:
        current = _strip_optional(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) is tuple:
            current = get_args(current)[0]
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return None
    current = _strip_optional(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, UnionType):
        members = [arg for arg in get_args(annotation) if arg is not NoneType]
        if len(members) == 1:
            return members[0]
    return annotation


def _describe(error: ErrorDetails, layers: list[_Layer], environ: Mapping[str, str]) -> str:
    loc = error["loc"]
    where = _key_path(loc) + _origin(loc, layers, environ)
    if error["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = ", ".join(model.model_fields) if model is not None else "none"
        return f"{where}: unknown key; allowed keys here: {allowed}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}"
