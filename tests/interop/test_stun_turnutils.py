"""Our STUN against coturn (Debian package `coturn`), both ways, over real UDP on loopback.

- coturn's `turnutils_stunclient` asks our `BindingResponder` (behind a real asyncio UDP
  endpoint) for its reflexive address and prints it;
- coturn's `turnserver` answers our `binding_request`, and accepts a TURN Allocate signed with
  our long-term credential key, whose signed answer we verify in turn.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import pytest

from punchline.nat.stun_server import BindingResponder
from punchline.wire import stun
from punchline.wire.stun import Attr, Class, Message, Method
from tests.conftest import unavailable
from tests.interop.coturn import STARTUP_SECONDS, tool, turnserver

# ------------------------------------------------------------------ turnutils_stunclient -> us


class _UdpResponder(asyncio.DatagramProtocol):
    """The supernode's job in miniature: demultiplex with is_stun, answer with the responder."""

    def __init__(self) -> None:
        self.responder = BindingResponder()
        self.sources: list[tuple[str, int]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (CPython's selector transport does not subclass DatagramTransport, hence the cast)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        assert self.transport is not None
        if not stun.is_stun(data):
            return
        source = (str(addr[0]), int(addr[1]))
        self.sources.append(source)
        local = self.transport.get_extra_info("sockname")
        reply = self.responder.handle_untrusted(data, source, (local[0], local[1]))
        if reply is not None:
            self.transport.sendto(reply, addr)


async def _run_stunclient(tool: str) -> tuple[int | None, str, _UdpResponder]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _UdpResponder, local_addr=("127.0.0.1", 0)
    )
    try:
        port = transport.get_extra_info("sockname")[1]
        process = await asyncio.create_subprocess_exec(
            tool,
            "-p",
            str(port),
            "127.0.0.1",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
            pytest.fail("turnutils_stunclient got no answer it liked and hung")
        return process.returncode, output.decode("utf-8", "replace"), protocol
    finally:
        transport.close()


def test_turnutils_stunclient_learns_its_address_from_our_responder() -> None:
    binary = tool("turnutils_stunclient")
    returncode, output, protocol = asyncio.run(_run_stunclient(binary))
    assert returncode == 0, output
    assert protocol.responder.counters["answered"] >= 1, protocol.responder.counters
    assert protocol.responder.counters["malformed"] == 0
    host, port = protocol.sources[-1]
    assert f"UDP reflexive addr: {host}:{port}" in output, output


# ------------------------------------------------------------------ us -> turnserver


def _transact(
    sock: socket.socket, port: int, request: bytes, deadline: float, key: bytes | None = None
) -> Message:
    """Send `request` until the answer with its transaction id arrives (coturn may still be
    starting), and decode that answer strictly."""
    while time.monotonic() < deadline:
        sock.sendto(request, ("127.0.0.1", port))
        sock.settimeout(0.25)
        try:
            while True:
                data = sock.recv(65535)
                if data[8:20] == request[8:20]:
                    return stun.decode_untrusted(data, key)
        except TimeoutError:
            continue
    pytest.fail(f"turnserver on port {port} did not answer in time")


def test_turnserver_answers_our_binding_request(tmp_path: Path) -> None:
    with (
        turnserver(tmp_path, "--stun-only") as coturn,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(("127.0.0.1", 0))
        request = stun.binding_request(software="punchline interop test")
        reply = _transact(sock, coturn.port, request, time.monotonic() + STARTUP_SECONDS)
        ours = sock.getsockname()
    assert (reply.method, reply.cls) == (Method.BINDING, Class.SUCCESS)
    xored = reply.get(Attr.XOR_MAPPED_ADDRESS)
    assert xored is not None
    assert stun.decode_xor_address_untrusted(xored, reply.transaction_id) == ours
    plain = reply.get(Attr.MAPPED_ADDRESS)
    assert plain is None or stun.decode_address_untrusted(plain) == ours
    origin = reply.get(Attr.RESPONSE_ORIGIN)
    assert origin is None or stun.decode_address_untrusted(origin) == ("127.0.0.1", coturn.port)
    software = reply.get(Attr.SOFTWARE)
    assert software is None or "Coturn" in stun.decode_text_untrusted(software)


def test_turnserver_accepts_our_long_term_credentials(tmp_path: Path) -> None:
    """RFC 8656 §7.2 / RFC 8489 §9.2: unauthenticated Allocate -> 401 with REALM and NONCE;
    signed with long_term_key -> a relayed address, in a response signed with the same key."""
    realm, username, password = "punchline.test", "alice", "s3cret"
    transport = (Attr.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
    with (
        turnserver(
            tmp_path, "--lt-cred-mech", f"--user={username}:{password}", f"--realm={realm}"
        ) as coturn,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(("127.0.0.1", 0))
        deadline = time.monotonic() + STARTUP_SECONDS

        def allocate(key: bytes | None, nonce: bytes | None, signed: bool = True) -> Message:
            attributes: tuple[tuple[int, bytes], ...] = (transport,)
            if nonce is not None:
                attributes += (
                    (Attr.USERNAME, username.encode()),
                    (Attr.REALM, realm.encode()),
                    (Attr.NONCE, nonce),
                )
            tid = stun.new_transaction_id()
            request = stun.encode(Message(Method.ALLOCATE, Class.REQUEST, tid, attributes), key)
            return _transact(sock, coturn.port, request, deadline, key if signed else None)

        challenge = allocate(None, None)
        assert challenge.cls == Class.ERROR
        assert stun.decode_error_code_untrusted(challenge.get(Attr.ERROR_CODE) or b"")[0] == 401
        assert challenge.get(Attr.REALM) == realm.encode()
        nonce = challenge.get(Attr.NONCE)
        assert nonce

        # a 401 for wrong credentials is unsigned: the server cannot know our key
        wrong = allocate(stun.long_term_key(username, realm, "not it"), nonce, signed=False)
        assert stun.decode_error_code_untrusted(wrong.get(Attr.ERROR_CODE) or b"")[0] == 401

        key = stun.long_term_key(username, realm, password)
        granted = allocate(key, nonce)  # decoded with `key`: coturn's MESSAGE-INTEGRITY checks
        assert granted.cls == Class.SUCCESS, granted
        tid = granted.transaction_id
        relayed = stun.decode_xor_address_untrusted(
            granted.get(Attr.XOR_RELAYED_ADDRESS) or b"", tid
        )
        assert relayed[0] == "127.0.0.1"
        mapped = stun.decode_xor_address_untrusted(granted.get(Attr.XOR_MAPPED_ADDRESS) or b"", tid)
        assert mapped == sock.getsockname()
        assert stun.decode_uint32_untrusted(granted.get(Attr.LIFETIME) or b"") > 0

        release = Message(
            Method.REFRESH,
            Class.REQUEST,
            stun.new_transaction_id(),
            (
                (Attr.LIFETIME, stun.encode_uint32(0)),
                (Attr.USERNAME, username.encode()),
                (Attr.REALM, realm.encode()),
                (Attr.NONCE, nonce),
            ),
        )
        released = _transact(sock, coturn.port, stun.encode(release, key), deadline, key)
        assert (released.method, released.cls) == (Method.REFRESH, Class.SUCCESS)


def test_turnutils_stunclient_against_a_real_supernode(tmp_path: Path) -> None:
    """The supernode process answers a standard STUN client on its one UDP port."""
    from punchline.lab.loopback import Network

    client = shutil.which("turnutils_stunclient")
    if client is None:
        unavailable("coturn's turnutils_stunclient is not installed (tools/run installs coturn)")
        return
    net = Network(tmp_path)
    try:
        net.start_auth()
        node = net.start_supernode()
        result = subprocess.run(
            [client, "-p", str(node.udp_port), "127.0.0.1"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        net.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "UDP reflexive addr: 127.0.0.1:" in result.stdout
