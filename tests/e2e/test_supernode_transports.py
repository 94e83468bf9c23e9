"""A supernode speaks the same session protocol on UDP, on TCP and on TLS ports."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from punchline.client.store import IdentityStore
from punchline.identity import certs
from punchline.lab.loopback import Network
from punchline.session.outbound import Identity, OutboundSession
from punchline.wire import session as wire


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Network, int]]:
    net = Network(tmp_path_factory.mktemp("net"))
    tls_port = _free_port()
    try:
        net.start_auth()
        net.start_supernode("--tcp-port", str(tls_port))
        net.signup("alice")
        yield net, tls_port
    finally:
        net.stop()


def _identity(data: Path) -> Identity:
    store = IdentityStore(data)
    ca = store.pinned_ca()
    assert ca is not None
    return Identity(store.key(), store.certificate(), ca)


async def _lookup_over_stream(
    identity: Identity, node_id: str, port: int, tls: ssl.SSLContext | None
) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname=certs.node_dns_name(node_id) if tls else None
    )
    session = OutboundSession(identity, node_id, time.time())
    session.send({"t": "lookup", "id": 7, "user": "alice"}, time.time())
    decoder = wire.FrameDecoder()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for packet in session.datagrams(time.time()):
                writer.write(wire.frame(packet))
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the supernode closed the connection"
            for frame in decoder.feed(data):
                for message in session.receive_untrusted(wire.decode_untrusted(frame), time.time()):
                    if message.get("t") == "lookup_result":
                        return message
        raise AssertionError("no lookup result")
    finally:
        writer.close()


def test_session_over_tcp(network: tuple[Network, int]) -> None:
    net, _tls = network
    node = net.supernodes[0]
    result = asyncio.run(_lookup_over_stream(_identity(net.root / "alice"), node.node_id,
                                             node.udp_port, None))  # fmt: skip
    assert result["id"] == 7
    assert result["records"] == []  # alice's daemon is not running: nobody published


def test_session_over_tls_with_the_node_certificate(network: tuple[Network, int]) -> None:
    net, tls_port = network
    node = net.supernodes[0]
    identity = _identity(net.root / "alice")
    context = ssl.create_default_context(cadata=certs.to_pem(identity.ca))
    result = asyncio.run(_lookup_over_stream(identity, node.node_id, tls_port, context))
    assert result["id"] == 7
    with pytest.raises(ssl.SSLCertVerificationError):  # any other name is refused
        asyncio.run(_lookup_over_stream(identity, "not" + node.node_id, tls_port, context))
