"""Authentication and authorization for the upgrade and POST /publish: pure logic, no I/O
beyond reading the public key file once at construction (docs/security.md).

Rules:

* **Claims.** ``sub`` (a non-empty string) and ``exp`` (a number, epoch seconds) are
  required; ``subscribe`` and ``publish`` are lists of topic patterns and default to empty,
  which allows nothing. A pattern is matched as in `fnmatch.fnmatchcase`: case-sensitive,
  ``*`` matches any run of characters (dots and slashes included), ``?`` one character.
  Topic names cannot contain ``*``, ``?`` or ``[`` (models/wire.py), so a pattern without
  them only ever matches the topic of that exact name.
* **Time comes in from outside.** `Authenticator.authenticate` takes ``now``; PyJWT's own
  clock checks are turned off and ``exp``/``nbf`` are checked here against ``now`` with a
  leeway of 0: a token is expired from the second its ``exp`` names (RFC 7519, 4.1.4).
  Issuers and hub share a clock closely enough for tokens that live minutes, and a leeway
  would only lengthen the life of a stolen token. `Grants.expired` gives the same answer
  for a connection that outlives its token (close 1008, cause auth_expired).
* **The algorithm is pinned.** Exactly the configured algorithm is accepted: never
  ``none``, and never HS256 when RS256/ES256 is configured (a public key is public, so an
  HMAC "signed" with it proves nothing). The key is loaded and type-checked once, in
  `Authenticator.from_settings`.
* **Tokens carrying ``aud`` are refused**: no audience is configured, so a token minted for
  another service is not accepted here just because it shares the issuer's key.
* **Secrets stay secret.** `AuthError` carries a fixed reason code and a fixed message;
  neither the token nor PyJWT's exception text ever reach it (and it is raised ``from
  None``, so no chained traceback repeats them). Construction errors name the setting and
  the file, never the key. `redact` scrubs secrets and anything shaped like a JWT from text
  before it is logged.
* **Origin** is checked only for browsers: the header is a browser control that a
  non-browser client may omit or forge at will, so a missing Origin is allowed and the
  token is what actually authenticates (see `origin_allowed`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import translate
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, TypeGuard
from urllib.parse import parse_qsl, urlsplit

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from wirestate.models.settings import AuthSettings

__all__ = [
    "ANONYMOUS_SUB",
    "MAX_TOKEN_LENGTH",
    "OPEN",
    "AuthError",
    "Authenticator",
    "Grants",
    "origin_allowed",
    "parse_origin",
    "redact",
    "token_from_request",
]

#: Longer tokens are refused before any parsing (bad_token): a JWT with a few dozen topic
#: patterns is well under 2 KiB, and header limits cap the upgrade's anyway.
MAX_TOKEN_LENGTH: Final = 8192
_MIN_RSA_BITS: Final = 2048
_REDACTED: Final = "[redacted]"

Reason: TypeAlias = Literal["missing_token", "bad_token", "expired", "bad_claims"]
Algorithm: TypeAlias = Literal["HS256", "RS256", "ES256"]

_MESSAGES: Final[dict[str, str]] = {
    "missing_token": "a token is required",
    "bad_token": "the token is malformed, not signed with the configured key, or not accepted",
    "expired": "the token has expired",
    "bad_claims": "the token's claims are missing, of the wrong type, or not valid yet",
}


class AuthError(Exception):
    """A refused token. `reason` is one of the fixed codes of `Reason`; `message` is fixed text
    for that code. Safe to log and to send: neither ever contains the token or the key."""

    def __init__(self, reason: Reason) -> None:
        self.reason: Reason = reason
        self.message: str = _MESSAGES[reason]
        super().__init__(reason)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    def __repr__(self) -> str:
        return f"AuthError({self.reason!r})"


@dataclass(frozen=True, slots=True)
class Grants:
    """What one authenticated client may do. Immutable; compare with ``==``.

    `expires_at` is the token's ``exp`` in epoch seconds, None for `OPEN` (never expires).
    """

    sub: str
    expires_at: float | None
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()

    def may_subscribe(self, topic: str) -> bool:
        return _matcher(self.subscribe)(topic) is not None

    def may_publish(self, topic: str) -> bool:
        return _matcher(self.publish)(topic) is not None

    def expired(self, now: float) -> bool:
        """True from the second ``exp`` names on (leeway 0, as in `Authenticator`)."""
        return self.expires_at is not None and now >= self.expires_at


@lru_cache(maxsize=1024)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """One compiled regular expression for a claim's patterns: matches a topic exactly when
    ``fnmatchcase`` matches it against one of them (the same translation), in one call
    (publishing is on every message's path). Keyed by the tuple: tokens that carry the same
    claims share it; at most 1,024 distinct claim sets are kept."""
    if not patterns:
        return lambda topic: None
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns)).match


#: The ``sub`` of a connection without a token under ``[auth] anonymous`` (logs, dashboard).
ANONYMOUS_SUB: Final = "anonymous"

#: Open mode (no ``[auth]``): everything allowed, nothing expires.
OPEN: Final = Grants(sub="", expires_at=None, subscribe=("*",), publish=("*",))


_Key: TypeAlias = bytes | RSAPublicKey | EllipticCurvePublicKey


class Authenticator:
    """Verifies tokens against one configured key and algorithm.

    Build it with `from_settings`; it is immutable and may be shared by every connection.
    With no ``[auth]`` it is open: `required` is False and `authenticate` returns `OPEN`
    whatever it is given.
    """

    __slots__ = ("_algorithm", "_key", "anonymous")

    def __init__(
        self, algorithm: Algorithm | None, key: _Key | None, anonymous: Sequence[str] = ()
    ) -> None:
        if (algorithm is None) != (key is None):
            raise ValueError("algorithm and key go together: both or neither")
        self._algorithm = algorithm
        self._key = key
        #: What a connection without a token may do (``[auth] anonymous``): subscribe to
        #: those patterns, publish nothing. None: a token is required.
        self.anonymous: Grants | None = (
            Grants(sub=ANONYMOUS_SUB, expires_at=None, subscribe=tuple(anonymous))
            if anonymous and algorithm is not None
            else None
        )

    @classmethod
    def from_settings(cls, auth: AuthSettings | None) -> Authenticator:
        """Raises ValueError, naming the setting and the file but never the key, when the
        public key file is missing, unreadable, not a PEM public key, or of the wrong kind."""
        if auth is None or (not auth.tokens and auth.allowed_origins):
            return cls(None, None)  # open, or [auth] allowed_origins alone: no token asked for
        if auth.algorithm == "HS256":
            if auth.secret is None:  # AuthSettings validates this; model_construct does not
                raise ValueError("auth.secret is required with algorithm HS256")
            return cls("HS256", auth.secret.get_secret_value().encode(), auth.anonymous)
        if auth.public_key_file is None:
            raise ValueError(f"auth.public_key_file is required with algorithm {auth.algorithm}")
        key = _load_public_key(auth.public_key_file, auth.algorithm)
        return cls(auth.algorithm, key, auth.anonymous)

    @property
    def required(self) -> bool:
        """False in open mode: no token is asked for."""
        return self._algorithm is not None

    @property
    def algorithm(self) -> Algorithm | None:
        return self._algorithm

    def __repr__(self) -> str:
        return f"Authenticator(algorithm={self._algorithm!r})"

    def authenticate_request(self, headers: Headers, target: str, *, now: float) -> Grants:
        """`authenticate` with the token of an HTTP request or upgrade (`token_from_request`):
        `OPEN` without ``[auth]``, else the token's grants; raises `AuthError` as
        `authenticate` does."""
        return self.authenticate(token_from_request(headers, target), now=now)

    def authenticate(self, token: str | None, *, now: float) -> Grants:
        """The grants of a valid `token` at time `now` (epoch seconds).

        Raises `AuthError` with reason missing_token (None or empty), bad_token (malformed,
        bad signature, other algorithm, too long, carries ``aud``), expired (``now >= exp``)
        or bad_claims (``sub``/``exp`` missing or of the wrong type, a pattern list that is
        not a list of strings, ``nbf`` in the future).
        """
        if self._algorithm is None or self._key is None:
            return OPEN
        if not token:
            raise AuthError("missing_token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("bad_token")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                options={
                    "verify_signature": True,
                    # Checked below against the injected clock instead of PyJWT's.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    # sub is checked below, so a wrong type is bad_claims like any other claim.
                    "verify_sub": False,
                    "verify_aud": True,
                },
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            # PyJWT's text may quote the header or payload: never let it through.
            raise AuthError("bad_token") from None
        return _grants(claims, now)


def _grants(claims: dict[str, Any], now: float) -> Grants:
    sub = claims.get("sub")
    exp = claims.get("exp")
    if not isinstance(sub, str) or not sub or not _is_time(exp):
        raise AuthError("bad_claims")
    nbf = claims.get("nbf")
    if nbf is not None and (not _is_time(nbf) or now < nbf):
        raise AuthError("bad_claims")
    subscribe = _patterns(claims.get("subscribe", []))
    publish = _patterns(claims.get("publish", []))
    if now >= exp:
        raise AuthError("expired")
    return Grants(sub=sub, expires_at=float(exp), subscribe=subscribe, publish=publish)


#: The latest time a claim may name (9999-12-31T23:59:59Z): an ``exp`` of ``10**400`` is
#: absurd, and no float can even hold it.
MAX_TIME: Final = 253_402_300_799


def _is_time(value: object) -> TypeGuard[int | float]:
    # Compared, not converted: float(10**400) raises, and NaN compares false both ways.
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and -MAX_TIME <= value <= MAX_TIME
    )


def _patterns(value: object) -> tuple[str, ...]:
    # A bare string ("orders.*") is refused rather than read as one pattern or as characters.
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AuthError("bad_claims")
    return tuple(value)


def _load_public_key(path: Path, algorithm: Algorithm) -> RSAPublicKey | EllipticCurvePublicKey:
    where = f"auth.public_key_file {path}"
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{where}: not found") from None
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it ({exc.strerror})") from None
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # cryptography's text is generic today; still, a private key pasted here must not be
        # echoed by some future version: fixed text only.
        raise ValueError(f"{where}: not a PEM public key") from None
    if algorithm == "RS256":
        if not isinstance(key, RSAPublicKey):
            raise ValueError(f"{where}: RS256 needs an RSA public key")
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"{where}: RSA keys must be at least {_MIN_RSA_BITS} bits")
        return key
    if not isinstance(key, EllipticCurvePublicKey) or not isinstance(key.curve, SECP256R1):
        raise ValueError(f"{where}: ES256 needs an EC P-256 public key")
    return key


Headers: TypeAlias = Mapping[str, str] | Iterable[tuple[str, str]]


def token_from_request(headers: Headers, path_or_query: str) -> str | None:
    """The bearer token of an upgrade or HTTP request, or None when there is none.

    ``Authorization: Bearer <token>`` (scheme case-insensitive) wins; otherwise the first
    non-empty ``token`` query parameter of `path_or_query` (``/ws?token=…``, ``?token=…`` or
    a bare query string), since browsers cannot set headers on a WebSocket. Other schemes
    (Basic, …) are ignored. `headers` is a mapping or (name, value) pairs; an object with
    ``raw_items()`` (websockets' ``Headers``) is read through it, so repeated headers do not
    raise. Choosing one of several tokens is safe: whichever is chosen must still verify.
    """
    for name, value in _header_pairs(headers):
        if name.lower() != "authorization":
            continue
        parts = value.split()
        if len(parts) == 2 and parts[0].lower() == "bearer":
            return parts[1]
    query = _query_of(path_or_query)
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "token" and value:
            return value
    return None


def _header_pairs(headers: Headers) -> Iterable[tuple[str, str]]:
    raw_items: Callable[[], Iterable[tuple[str, str]]] | None = getattr(headers, "raw_items", None)
    if callable(raw_items):
        return raw_items()
    if isinstance(headers, Mapping):
        return headers.items()
    return headers


def _query_of(path_or_query: str) -> str:
    text = path_or_query.partition("#")[0]
    if "?" in text:
        return text.partition("?")[2]
    return "" if text.startswith("/") else text


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_Origin: TypeAlias = tuple[str, str, int]


def parse_origin(text: str) -> _Origin | None:
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if (
        scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        return None
    return scheme, parts.hostname.lower(), _DEFAULT_PORTS[scheme] if port is None else port


def origin_allowed(origin: str | None, allowed: Sequence[str] | None) -> bool:
    """Whether an upgrade with this ``Origin`` header may proceed (else HTTP 403).

    * `allowed` None or empty: no allowlist, every origin is allowed (``[auth]
      allowed_origins`` unset).
    * `origin` None (no header): allowed. Origin is a browser control: browsers always send it
      on a WebSocket upgrade and page scripts cannot forge it, so it stops other sites from
      riding a user's browser; non-browser clients need not send it and could forge it, so
      for them the token, not the origin, is the check.
    * otherwise the origin must equal one allowed entry as scheme://host[:port]: scheme and
      host case-insensitive, default ports (80, 443) implied. ``null`` and anything malformed
      is refused.
    """
    if not allowed or origin is None:
        return True
    parsed = parse_origin(origin)
    if parsed is None:
        return False
    return any(parse_origin(entry) == parsed for entry in allowed)


# A compact JWS: base64url header starting {" (eyJ), payload, signature.
_JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every non-empty string of `secrets` and anything shaped like a JWT
    replaced by ``[redacted]``. Use on any text that may hold a token or key before it is
    logged or sent. Longer secrets are replaced first, so one containing another is scrubbed
    whole."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, _REDACTED)
    return _JWT_SHAPE.sub(_REDACTED, text)
