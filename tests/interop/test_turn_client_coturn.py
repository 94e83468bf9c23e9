"""Our TURN client (`open_turn`) against coturn's `turnserver`, over every transport we offer.

coturn runs with the TURN REST API scheme (`use-auth-secret`) our relays use, so credentials
come from `punchline.relay.credentials.issue`. For each of UDP, TCP, TLS, and TLS through
tinyproxy (an HTTP CONNECT proxy with Basic auth) the client allocates, and a plain UDP socket
playing the peer exchanges datagrams with it both ways: first via Send/Data indications, then,
once the channel is bound, via ChannelData. Failures must come back as `RelayUnavailable`
saying what went wrong: a wrong password (401), a proxy refusing us (407), an untrusted
certificate, nothing listening.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from punchline.relay import credentials
from punchline.relay.connection import (
    ProxyConfig,
    RelayServer,
    RelayUnavailable,
    TurnConnection,
    open_turn,
)
from tests.interop.coturn import Coturn, free_port, turnserver
from tests.interop.tinyproxy import PROXY_PASSWORD, PROXY_USER, tinyproxy

SECRET = "interop-shared-secret-0123456789"
REALM = "punchline.test"
Addr = tuple[str, int]


# ------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Tls:
    ca_pem: bytes
    certificate: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """Verifies like a real client, trusting only the test CA."""
        return ssl.create_default_context(cadata=self.ca_pem.decode())


def _make_tls(directory: Path) -> Tls:
    """A test CA and a server certificate for localhost / 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "punchline test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    certificate, key_file = directory / "turn-cert.pem", directory / "turn-key.pem"
    certificate.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Tls(ca.public_bytes(serialization.Encoding.PEM), certificate, key_file)


# ------------------------------------------------------------------ servers


@dataclass(frozen=True)
class Setup:
    coturn: Coturn
    tls: Tls

    def server(self, transport: str) -> RelayServer:
        if transport == "tls":
            assert self.coturn.tls_port is not None
            return RelayServer("tls", "127.0.0.1", self.coturn.tls_port, "localhost")
        return RelayServer(transport, "127.0.0.1", self.coturn.port)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """One coturn for the module: UDP+TCP on one port, TLS on another, REST-API auth."""
    directory = tmp_path_factory.mktemp("coturn")
    tls = _make_tls(directory)
    with turnserver(
        directory,
        "--use-auth-secret",
        f"--static-auth-secret={SECRET}",
        f"--realm={REALM}",
        "--allow-loopback-peers",
        "--fingerprint",
        tcp=True,
        tls=(tls.certificate, tls.key),
    ) as coturn:
        yield Setup(coturn, tls)


# ------------------------------------------------------------------ the exchange


def _alice() -> credentials.TurnCredentials:
    return credentials.issue(SECRET, "alice", time.time())


async def _exchange(conn: TurnConnection, inbox: asyncio.Queue[tuple[bytes, Addr]]) -> None:
    """Datagrams both ways between the allocation and a plain UDP peer, until some went
    each way over a bound channel."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        peer_addr: Addr = peer.getsockname()
        for i in range(40):
            outgoing = f"to peer {i}".encode()
            conn.send(outgoing, peer_addr)
            data, source = await asyncio.wait_for(loop.sock_recvfrom(peer, 2048), 2)
            assert (data, source) == (outgoing, conn.relayed)

            incoming = f"from peer {i}".encode()
            await loop.sock_sendto(peer, incoming, conn.relayed)
            assert await asyncio.wait_for(inbox.get(), 2) == (incoming, peer_addr)
            counters = conn.counters
            if counters["channel_data_out"] >= 3 and counters["channel_data_in"] >= 3:
                break
            await asyncio.sleep(0.005)
    counters = conn.counters
    assert counters["send_indications_out"] >= 1, counters  # before the channel was bound
    assert counters["channel_data_out"] >= 3, counters
    assert counters["channel_data_in"] >= 3, counters
    assert counters["malformed"] == counters["forged"] == counters["unexpected"] == 0, counters


async def _allocate_and_exchange(
    server: RelayServer, **options: object
) -> tuple[TurnConnection, dict[str, int]]:
    creds = _alice()
    inbox: asyncio.Queue[tuple[bytes, Addr]] = asyncio.Queue()
    conn = await open_turn(
        server,
        creds.username,
        creds.password,
        on_data=lambda data, peer: inbox.put_nowait((data, peer)),
        **options,  # type: ignore[arg-type]
    )
    try:
        assert conn.relayed[0] == "127.0.0.1"
        await _exchange(conn, inbox)
    finally:
        await conn.close()
    return conn, conn.counters


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_allocates_and_relays_both_ways(setup: Setup, transport: str) -> None:
    options: dict[str, object] = {}
    if transport == "tls":
        options["ssl_context"] = setup.tls.client_context()
    conn, _ = asyncio.run(_allocate_and_exchange(setup.server(transport), **options))
    assert conn.transport == transport
    assert conn.closed_reason == "released"  # coturn confirmed the Refresh with LIFETIME 0
    if transport == "udp":
        assert conn.mapped is not None
        assert conn.mapped[0] == "127.0.0.1"


def test_tls_through_an_http_connect_proxy(setup: Setup, tmp_path: Path) -> None:
    assert setup.coturn.tls_port is not None
    with tinyproxy(tmp_path, setup.coturn.tls_port) as proxy_port:
        proxy = ProxyConfig.parse(f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{proxy_port}")
        conn, _ = asyncio.run(
            _allocate_and_exchange(
                setup.server("tls"), proxy=proxy, ssl_context=setup.tls.client_context()
            )
        )
    assert conn.transport == "tls+proxy"
    assert conn.closed_reason == "released"


@pytest.mark.parametrize(
    ("userinfo", "code"),
    [
        ("", 407),  # no credentials: 407 Proxy Authentication Required
        (f"{PROXY_USER}:wrong@", 401),  # tinyproxy 1.11 answers wrong ones with 401, not 407
    ],
)
def test_proxy_refusal_is_reported_with_its_status_line(
    setup: Setup, tmp_path: Path, userinfo: str, code: int
) -> None:
    assert setup.coturn.tls_port is not None
    with tinyproxy(tmp_path, setup.coturn.tls_port) as proxy_port:
        proxy = ProxyConfig.parse(f"http://{userinfo}127.0.0.1:{proxy_port}")
        with pytest.raises(RelayUnavailable) as caught:
            asyncio.run(
                _allocate_and_exchange(
                    setup.server("tls"), proxy=proxy, ssl_context=setup.tls.client_context()
                )
            )
    assert caught.value.code == code
    message = str(caught.value)
    assert f"via proxy 127.0.0.1:{proxy_port}" in message
    assert f"HTTP/1.0 {code} " in message
    assert "proxy credentials missing or wrong" in message


def test_proxy_refusing_the_port_is_reported(setup: Setup, tmp_path: Path) -> None:
    """tinyproxy's ConnectPort allows CONNECT to coturn's TLS port only: 403 for the others."""
    assert setup.coturn.tls_port is not None
    with tinyproxy(tmp_path, setup.coturn.tls_port) as proxy_port:
        proxy = ProxyConfig("127.0.0.1", proxy_port, PROXY_USER, PROXY_PASSWORD)
        with pytest.raises(RelayUnavailable, match=r"refused the tunnel: HTTP/1\.1 403") as caught:
            asyncio.run(_allocate_and_exchange(setup.server("tcp"), proxy=proxy))
    assert caught.value.code == 403


@pytest.mark.parametrize("transport", ["udp", "tls"])
def test_wrong_password_is_401(setup: Setup, transport: str) -> None:
    creds = _alice()

    async def attempt() -> None:
        await open_turn(
            setup.server(transport),
            creds.username,
            creds.password + "x",
            on_data=lambda data, peer: None,
            ssl_context=setup.tls.client_context(),
        )

    with pytest.raises(RelayUnavailable, match="401") as caught:
        asyncio.run(attempt())
    assert caught.value.code == 401
    assert "wrong username or password" in str(caught.value)


def test_default_tls_context_rejects_a_certificate_from_an_unknown_ca(setup: Setup) -> None:
    creds = _alice()

    async def attempt() -> None:
        await open_turn(
            setup.server("tls"), creds.username, creds.password, on_data=lambda data, peer: None
        )

    with pytest.raises(RelayUnavailable, match="certificate does not verify"):
        asyncio.run(attempt())


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_nothing_listening_fails_fast_and_clearly(transport: str) -> None:
    port = free_port()

    async def attempt() -> float:
        start = time.monotonic()
        with pytest.raises(RelayUnavailable) as caught:
            await open_turn(
                RelayServer(transport, "127.0.0.1", port), "u", "p", on_data=lambda d, p: None
            )
        assert f"127.0.0.1:{port} over {transport}" in str(caught.value)
        assert "refused" in str(caught.value).lower()
        return time.monotonic() - start

    assert asyncio.run(attempt()) < 2.0  # ICMP / RST, not the 5 s timeout
