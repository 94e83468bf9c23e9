"""A replayed invite rings once: the callee drops the copy and counts it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from punchline.call.signaling import Call
from punchline.client.store import IdentityStore
from punchline.identity import keys
from punchline.lab.loopback import Network
from punchline.session.outbound import Identity, OutboundSession
from punchline.wire import presence
from punchline.wire import session as wire


class ScriptedClient:
    """A client driven by hand over a real UDP socket: attach, then send raw messages."""

    def __init__(self, data: Path, node_id: str, port: int) -> None:
        store = IdentityStore(data)
        ca = store.pinned_ca()
        assert ca is not None
        self.identity = Identity(store.key(), store.certificate(), ca)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.05)
        self.server = ("127.0.0.1", port)
        self.node_id = node_id
        self.session = OutboundSession(self.identity, node_id, time.time())

    def pump(self, seconds: float) -> list[dict[str, Any]]:
        received: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            now = time.time()
            self.session.handle_timer(now)
            for data in self.session.datagrams(now):
                self.sock.sendto(data, self.server)
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            received += self.session.receive_untrusted(wire.decode_untrusted(data), time.time())
        return received

    def publish(self, user: str) -> None:
        record = presence.make(
            self.identity.key, self.identity.certificate, user,
            keys.key_id(self.identity.key.public_key()),
            {"node_id": self.node_id,
             "addresses": [{"transport": "udp", "host": "127.0.0.1", "port": self.server[1]}]},
            int(time.time() * 1000), time.time() + 120,
        )  # fmt: skip
        self.session.send({"t": "publish", "record": record}, time.time())


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    net = Network(tmp_path)
    try:
        net.start_auth()
        net.start_supernode()
        net.signup("alice")
        net.signup("bob")
        net.start_daemon("bob")
        yield net
    finally:
        net.stop()


def test_replayed_invite_rings_once(network: Network) -> None:
    node = network.supernodes[0]
    alice = ScriptedClient(network.root / "alice", node.node_id, node.udp_port)
    alice.pump(0.5)
    assert alice.session.established
    alice.publish("alice")
    alice.pump(0.3)
    call = Call.place(alice.identity, "alice", "bob", {"candidates": []}, time.time())
    (invite,) = call.outgoing_signals()

    def send_invite(number: int) -> list[dict[str, Any]]:
        alice.session.send({"t": "signal", "id": number, "to": "bob", "body": invite.body},
                           time.time())  # fmt: skip
        messages = alice.pump(1.5)
        return [m for m in messages if m.get("t") == "signal" and m["body"]["type"] == "ringing"]

    assert len(send_invite(1)) == 1
    assert network.status("bob")["call"]["state"] == "incoming"
    assert network.cli("hangup", "--data", str(network.root / "bob")).returncode == 0
    # the same invite again after the call ended: replayed by the network or an attacker
    assert send_invite(2) == []
    status = network.status("bob")
    assert status["call"]["state"] == "ended"
    assert status["counters"]["replayed_invites"] == 1


def test_invite_signed_by_someone_else_is_refused(network: Network) -> None:
    node = network.supernodes[0]
    network.signup("mallory")
    mallory = ScriptedClient(network.root / "mallory", node.node_id, node.udp_port)
    mallory.pump(0.5)
    mallory.publish("mallory")
    mallory.pump(0.3)
    # mallory replays an invite that alice made for bob: the supernode says it is from mallory
    alice_store = IdentityStore(network.root / "alice")
    ca = alice_store.pinned_ca()
    assert ca is not None
    alice = Identity(alice_store.key(), alice_store.certificate(), ca)
    (invite,) = Call.place(
        alice, "alice", "bob", {"candidates": []}, time.time()
    ).outgoing_signals()
    mallory.session.send({"t": "signal", "id": 1, "to": "bob", "body": invite.body}, time.time())
    messages = mallory.pump(1.5)
    assert not [m for m in messages if m.get("t") == "signal"], messages
    status = network.status("bob")
    assert status["call"] is None
    assert status["counters"]["forged_invites"] == 1
