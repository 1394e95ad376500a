"""TLS: with a certificate the same port serves wss:// and https:// (made at test time)."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect

from wirestate.adapters.server.service import WirestateServer
from wirestate.models.settings import Settings


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = tmp / "cert.pem", tmp / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


async def test_wss_and_https_on_one_port(tmp_path: Path) -> None:
    certfile, keyfile = self_signed(tmp_path)
    settings = Settings.model_validate(
        {"server": {"port": 0, "certfile": str(certfile), "keyfile": str(keyfile)}}
    )
    trust = ssl.create_default_context(cafile=str(certfile))
    async with WirestateServer(settings) as server:
        assert server.url.startswith("wss://127.0.0.1:")
        ws = await connect(server.url, ssl=trust, ping_interval=None)
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome"
        await ws.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=trust)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200")
        assert raw.endswith(b'{"status":"ok"}')
        # A plain-text client gets nowhere: the port speaks TLS only.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        plain = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert not plain.startswith(b"HTTP/1.1 200")
