"""Auth: real HS256/RS256/ES256 tokens with keys made here, claims, patterns, token
extraction, origins, and that no token, secret or key ever reaches an error's text."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr

from wirestate.adapters.server.auth import (
    MAX_TOKEN_LENGTH,
    OPEN,
    Authenticator,
    AuthError,
    Grants,
    origin_allowed,
    redact,
    token_from_request,
)
from wirestate.models.settings import AuthSettings

NOW = 1_700_000_000.0
SECRET = "s3cr3t-" + "k" * 40
OTHER_SECRET = "0th3r-" + "k" * 40


def _pem_public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pem_private(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": "alice",
        "exp": NOW + 60,
        "subscribe": ["orders.*"],
        "publish": ["orders.eu"],
    }
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


def _hs256(**overrides: Any) -> str:
    return jwt.encode(_claims(**overrides), SECRET, algorithm="HS256")


@pytest.fixture
def hs() -> Authenticator:
    return Authenticator.from_settings(AuthSettings(secret=SecretStr(SECRET)))


def _write(tmp_path: Path, pem: bytes, name: str = "key.pem") -> Path:
    path = tmp_path / name
    path.write_bytes(pem)
    return path


@pytest.fixture
def rs(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Authenticator:
    path = _write(tmp_path, _pem_public(rsa_key))
    return Authenticator.from_settings(AuthSettings(algorithm="RS256", public_key_file=path))


def _reason(auth: Authenticator, token: str | None, now: float = NOW) -> str:
    with pytest.raises(AuthError) as info:
        auth.authenticate(token, now=now)
    return info.value.reason


# --- valid tokens, three algorithms ---------------------------------------------------------


def test_hs256_token_gives_its_grants(hs: Authenticator) -> None:
    grants = hs.authenticate(_hs256(), now=NOW)
    assert grants == Grants("alice", NOW + 60, ("orders.*",), ("orders.eu",))
    assert hs.required
    assert hs.algorithm == "HS256"


def test_rs256_token(rs: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(_claims(), _pem_private(rsa_key), algorithm="RS256")
    assert rs.authenticate(token, now=NOW).sub == "alice"


def test_es256_token(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    path = _write(tmp_path, _pem_public(ec_key))
    auth = Authenticator.from_settings(AuthSettings(algorithm="ES256", public_key_file=path))
    token = jwt.encode(_claims(), _pem_private(ec_key), algorithm="ES256")
    assert auth.authenticate(token, now=NOW).may_subscribe("orders.us")
    # Signed by another EC key: refused.
    other = jwt.encode(_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    assert _reason(auth, other) == "bad_token"


def test_patterns_default_to_nothing(hs: Authenticator) -> None:
    grants = hs.authenticate(jwt.encode({"sub": "bob", "exp": NOW + 1}, SECRET), now=NOW)
    assert grants.subscribe == () == grants.publish
    assert not grants.may_subscribe("orders")
    assert not grants.may_publish("orders")


def test_open_mode_allows_everything_without_a_token() -> None:
    auth = Authenticator.from_settings(None)
    assert not auth.required
    assert auth.authenticate(None, now=NOW) is OPEN
    assert OPEN.may_subscribe("any/topic:1")
    assert OPEN.may_publish("x")
    assert not OPEN.expired(1e18)


PATTERNS = [
    (),
    ("*",),
    ("orders*",),
    ("orders.*", "audit"),
    ("a.?", "[ab]*", "x.*.y"),
    ("a+b(c)", "[!x]*", "dot."),
    ("", "line\n*"),
]
TOPICS = [
    "",
    "orders",
    "ordersADMIN",
    "orders.us",
    "audit",
    "auditx",
    "a.b",
    "a.bc",
    "bx",
    "x.1.y",
    "x..y",
    "a+b(c)",
    "yz",
    "dot.",
    "dotx",
    "line\nz",
    "\u00e9.x",
]


@pytest.mark.parametrize("patterns", PATTERNS, ids=repr)
def test_claims_match_topics_exactly_as_fnmatchcase_does(patterns: tuple[str, ...]) -> None:
    # The claims are compiled into one expression per claim set; it must say what
    # fnmatchcase says for every pattern, regex metacharacters and newlines included.
    grants = Grants(sub="s", expires_at=None, subscribe=patterns, publish=patterns)
    for topic in TOPICS:
        expected = any(fnmatchcase(topic, pattern) for pattern in patterns)
        assert grants.may_subscribe(topic) is expected, (patterns, topic)
        assert grants.may_publish(topic) is expected, (patterns, topic)


# --- refusals -------------------------------------------------------------------------------


def test_missing_token(hs: Authenticator) -> None:
    assert _reason(hs, None) == "missing_token"
    assert _reason(hs, "") == "missing_token"


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "eyJ.eyJ.x", "é" * 10])
def test_malformed_token(hs: Authenticator, token: str) -> None:
    assert _reason(hs, token) == "bad_token"


def test_too_long_token(hs: Authenticator) -> None:
    token = _hs256(pad="x" * MAX_TOKEN_LENGTH)
    assert _reason(hs, token) == "bad_token"


def test_wrong_secret(hs: Authenticator) -> None:
    assert _reason(hs, jwt.encode(_claims(), OTHER_SECRET, algorithm="HS256")) == "bad_token"


def test_expiry_has_no_leeway(hs: Authenticator) -> None:
    token = _hs256(exp=NOW + 10)
    grants = hs.authenticate(token, now=NOW + 9.999)
    assert not grants.expired(NOW + 9.999)
    assert grants.expired(NOW + 10)
    assert _reason(hs, token, now=NOW + 10) == "expired"
    assert _reason(hs, _hs256(exp=NOW - 3600)) == "expired"


def test_not_before_in_the_future(hs: Authenticator) -> None:
    assert hs.authenticate(_hs256(nbf=NOW), now=NOW).sub == "alice"
    assert _reason(hs, _hs256(nbf=NOW + 1)) == "bad_claims"


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": None},
        {"exp": None},
        {"sub": ""},
        {"sub": 42},
        {"exp": "tomorrow"},
        {"exp": True},
        {"subscribe": "orders.*"},
        {"subscribe": [1, 2]},
        {"publish": {"orders": True}},
        {"publish": ["ok", None]},
        {"nbf": "now"},
    ],
)
def test_bad_claims(hs: Authenticator, claims: dict[str, Any]) -> None:
    assert _reason(hs, _hs256(**claims)) == "bad_claims"


def test_token_with_an_audience_is_refused(hs: Authenticator) -> None:
    assert _reason(hs, _hs256(aud="another-service")) == "bad_token"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], key: bytes | None) -> str:
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(_claims()).encode())
    if key is None:
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def test_alg_none_refused(hs: Authenticator, rs: Authenticator) -> None:
    for header in ({"alg": "none", "typ": "JWT"}, {"alg": "None"}, {"alg": "NONE"}):
        token = _forge(header, None)
        assert _reason(hs, token) == "bad_token"
        assert _reason(rs, token) == "bad_token"


def test_alg_confusion_refused(rs: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    # The classic attack: HMAC-sign with the (public) RSA key's PEM as the secret.
    token = _forge({"alg": "HS256", "typ": "JWT"}, _pem_public(rsa_key))
    assert _reason(rs, token) == "bad_token"


def test_other_asymmetric_algorithm_refused(rs: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(_claims(), _pem_private(rsa_key), algorithm="RS512")
    assert _reason(rs, token) == "bad_token"


# --- patterns -------------------------------------------------------------------------------


def test_pattern_matching() -> None:
    grants = Grants("a", None, subscribe=("orders.*", "status"), publish=("*",))
    assert grants.may_subscribe("orders.eu")
    assert grants.may_subscribe("orders.eu.paris")  # * spans dots
    assert grants.may_subscribe("orders.")
    assert not grants.may_subscribe("orders")
    assert not grants.may_subscribe("Orders.eu")  # case-sensitive
    assert not grants.may_subscribe("xorders.eu")
    assert grants.may_subscribe("status")
    assert not grants.may_subscribe("status2")
    assert grants.may_publish("anything/at:all")


# --- token extraction -----------------------------------------------------------------------


def test_token_from_authorization_header() -> None:
    assert token_from_request({"Authorization": "Bearer abc"}, "/ws") == "abc"
    assert token_from_request([("authorization", "bEaReR   abc  ")], "/ws") == "abc"
    assert token_from_request([("Authorization", "Basic dXNlcg==")], "/ws") is None
    assert token_from_request([("Authorization", "Bearer")], "/ws") is None
    assert token_from_request([("Authorization", "Bearer a b")], "/ws") is None
    assert token_from_request([("Authorization", "Bearer\tabc")], "/ws") == "abc"


def test_header_wins_over_query() -> None:
    assert token_from_request([("Authorization", "Bearer h")], "/ws?token=q") == "h"
    assert token_from_request([("Authorization", "Basic x")], "/ws?token=q") == "q"


@pytest.mark.parametrize(
    ("path", "token"),
    [
        ("/ws?token=abc", "abc"),
        ("/ws?x=1&token=abc&token=def", "abc"),
        ("?token=abc", "abc"),
        ("token=abc", "abc"),
        ("/ws?token=", None),
        ("/ws", None),
        ("/ws#token=abc", None),
        ("/ws?tokens=abc", None),
        ("/ws?token=a%2Eb", "a.b"),
    ],
)
def test_token_from_query(path: str, token: str | None) -> None:
    assert token_from_request([], path) == token


def test_headers_with_raw_items() -> None:
    class RepeatedHeaders(dict[str, str]):
        def raw_items(self) -> list[tuple[str, str]]:
            return [("Authorization", "Basic x"), ("Authorization", "Bearer second")]

    assert token_from_request(RepeatedHeaders(), "/ws") == "second"


# --- origins --------------------------------------------------------------------------------

ALLOWED = ["https://app.example.com", "http://localhost:8080"]


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        ("https://app.example.com", True),
        ("https://APP.Example.com", True),
        ("HTTPS://app.example.com", True),
        ("https://app.example.com:443", True),
        ("https://app.example.com/", True),
        ("http://localhost:8080", True),
        ("http://app.example.com", False),  # other scheme
        ("https://app.example.com:8443", False),
        ("https://evil.example.com", False),
        ("https://app.example.com.evil.com", False),
        ("http://localhost", False),  # port 80, not 8080
        ("null", False),
        ("", False),
        ("https://app.example.com/path", False),
        ("https://user@app.example.com", False),
        ("https://app.example.com:99999", False),
        (None, True),  # no Origin: not a browser
    ],
)
def test_origin_allowed(origin: str | None, ok: bool) -> None:
    assert origin_allowed(origin, ALLOWED) is ok


def test_no_allowlist_allows_every_origin() -> None:
    assert origin_allowed("https://evil.example.com", None)
    assert origin_allowed("null", ())
    assert origin_allowed("http://localhost", ["http://localhost:80"])


# --- secrets stay secret --------------------------------------------------------------------


def test_redact() -> None:
    token = _hs256()
    text = f"got {token} with {SECRET} and {SECRET[:10]}"
    scrubbed = redact(text, [SECRET[:10], SECRET, ""])
    assert token not in scrubbed
    assert SECRET not in scrubbed
    assert SECRET[:10] not in scrubbed
    assert scrubbed == "got [redacted] with [redacted] and [redacted]"
    # JWT-shaped strings are scrubbed even when not listed.
    assert redact(f"Authorization: Bearer {token}", []) == "Authorization: Bearer [redacted]"
    assert redact("nothing here", []) == "nothing here"


def test_errors_never_contain_the_token_or_secret(
    hs: Authenticator, rs: Authenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    tokens = [
        _hs256(exp=NOW - 1),
        _hs256(sub=None),
        jwt.encode(_claims(), OTHER_SECRET, algorithm="HS256"),
        _forge({"alg": "HS256"}, _pem_public(rsa_key)),
        "not-a-token-" + SECRET,
    ]
    for auth in (hs, rs):
        assert SECRET not in repr(auth)
        for token in tokens:
            with pytest.raises(AuthError) as info:
                auth.authenticate(token, now=NOW)
            error = info.value
            assert error.__cause__ is None
            assert error.__context__ is None or error.__suppress_context__
            for text in (str(error), repr(error), error.message, *map(str, error.args)):
                for fragment in (token, *token.split("."), SECRET):
                    assert not fragment or fragment not in text


def test_key_errors_name_the_file_never_the_key(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    private = _pem_private(rsa_key)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cases: list[tuple[Literal["RS256", "ES256"], Path, str, bytes]] = [
        ("RS256", tmp_path / "missing.pem", "not found", b""),
        ("RS256", _write(tmp_path, private, "private.pem"), "not a PEM public key", private),
        ("RS256", _write(tmp_path, b"junk " + SECRET.encode(), "junk.pem"), "not a PEM", b""),
        ("RS256", _write(tmp_path, _pem_public(ec_key), "ec.pem"), "needs an RSA", b""),
        ("RS256", _write(tmp_path, _pem_public(small), "small.pem"), "2048 bits", b""),
        ("ES256", _write(tmp_path, _pem_public(rsa_key), "rsa.pem"), "EC P-256", b""),
        ("ES256", tmp_path, "cannot read it", b""),  # a directory
    ]
    p384 = ec.generate_private_key(ec.SECP384R1())
    cases.append(("ES256", _write(tmp_path, _pem_public(p384), "p384.pem"), "P-256", b""))
    for algorithm, path, expected, material in cases:
        settings = AuthSettings(algorithm=algorithm, public_key_file=path)
        with pytest.raises(ValueError, match=r"auth\.public_key_file") as info:
            Authenticator.from_settings(settings)
        text = str(info.value)
        assert expected in text
        assert str(path) in text
        error = info.value
        assert error.__cause__ is None
        assert error.__context__ is None or error.__suppress_context__
        assert SECRET not in text
        assert "PRIVATE KEY" not in text
        assert "BEGIN" not in text
        for line in material.decode().splitlines()[1:-1]:
            assert line not in text


def test_unvalidated_settings_without_a_key_are_refused() -> None:
    # model_construct skips AuthSettings' own checks; the authenticator still refuses.
    with pytest.raises(ValueError, match=r"auth\.secret is required"):
        Authenticator.from_settings(AuthSettings.model_construct(algorithm="HS256", secret=None))
    with pytest.raises(ValueError, match=r"auth\.public_key_file is required"):
        Authenticator.from_settings(
            AuthSettings.model_construct(algorithm="RS256", public_key_file=None)
        )
    with pytest.raises(ValueError, match="both or neither"):
        Authenticator("HS256", None)


def test_other_headers_are_ignored() -> None:
    headers = {"Cookie": "token=abc", "X-Token": "Bearer abc"}
    assert token_from_request(headers, "/ws") is None
