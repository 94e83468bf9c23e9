"""Presence in the global index, with real supernode processes and their OpenDHT nodes.

alice attaches to sn3, bob to sn1. When alice's daemon stops, sn3 puts her pre-signed offline
record and hands it to the two other supernodes (custody); bob, through sn1, finds her offline
with her last-seen time, also after sn3 is killed. An attacker running its own DHT node in the
network then puts a forged record (bob signing for alice) and a stale one (alice's own, with a
lower sequence number): both are rejected and counted by the supernode that reads them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from punchline.client.store import IdentityStore
from punchline.lab.loopback import Network, Supernode
from punchline.overlay.dht import DhtConfig, DhtIndex
from punchline.supernode.server import STATUS_FILE
from punchline.wire import presence


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = Network(tmp_path_factory.mktemp("presence"))
    try:
        network.start_auth()
        for _ in range(3):
            network.start_supernode()
        network.signup("alice")
        network.signup("bob")
        network.signup("carol")
        yield network
    finally:
        network.stop()


def lookup(net: Network, who: str, asker: str = "bob") -> dict[str, Any]:
    result = net.cli("lookup", who, "--json", "--data", str(net.root / asker))
    assert result.returncode == 0, result.stderr + net.logs()
    value: dict[str, Any] = json.loads(result.stdout)
    return value


def until_status(net: Network, who: str, status: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = lookup(net, who)
        if found["status"] == status or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def counters(node: Supernode, net: Network) -> dict[str, int]:
    status = json.loads((net.root / node.name / STATUS_FILE).read_text())
    value: dict[str, int] = status["counters"]
    return value


def test_a_user_who_went_offline_is_found_offline_with_last_seen(net: Network) -> None:
    sn1, sn2, sn3 = net.supernodes
    net.start_daemon("bob", "--supernode", sn1.node_id)
    net.start_daemon("alice", "--supernode", sn3.node_id)
    online = lookup(net, "alice")
    assert online["status"] == "online", online
    assert [d["supernode"] for d in online["devices"]] == [sn3.node_id]
    assert online["last_seen"] is None
    done = net.cli("status", "--set", "away", "--data", str(net.root / "alice"))
    assert done.returncode == 0, done.stderr
    assert until_status(net, "alice", "away")["status"] == "away"

    before = time.time()
    net.daemons["alice"].stop()  # says bye: sn3 puts her offline record
    found = until_status(net, "alice", "offline")
    assert found["status"] == "offline", found
    assert found["devices"] == []
    assert before - 2 <= found["last_seen"] <= time.time()
    # sn3 shared custody of the record with both other supernodes, which verified it
    time.sleep(1.5)  # status files are rewritten every second
    assert counters(sn3, net)["offline_put"] == 1
    assert counters(sn3, net)["custody_sent"] == 2
    assert counters(sn1, net)["custody_received"] == 1
    assert counters(sn2, net)["custody_received"] == 1
    text = net.cli("lookup", "alice", "--data", str(net.root / "bob"))
    assert "offline, last seen" in text.stdout, text.stderr

    sn3.kill()
    assert lookup(net, "alice")["status"] == "offline"


def test_forged_and_stale_records_in_the_dht_are_rejected_and_counted(net: Network) -> None:
    """carol was never online: the index holds only what the attacker's DHT node puts there,
    her genuine record (seq 5), a replay of an older one (seq 3) and bob signing for her."""
    sn1 = net.supernodes[0]
    time.sleep(1.5)  # status files are rewritten every second
    before = counters(sn1, net)
    carol, bob = IdentityStore(net.root / "carol"), IdentityStore(net.root / "bob")
    where = {"node_id": sn1.node_id, "addresses": [
        {"transport": "udp", "host": "127.0.0.1", "port": sn1.udp_port}]}  # fmt: skip
    now = time.time()
    genuine, stale = (
        presence.make(carol.key(), carol.certificate(), "carol", "phone", where, seq, now + 600)
        for seq in (5, 3)
    )
    forged = presence.make(bob.key(), bob.certificate(), "carol", "phone", where, 99, now + 600)

    async def attack() -> None:
        node = DhtIndex(DhtConfig(bind_host="127.0.0.1", unlimited_rate=True,
                                  bootstrap=(("127.0.0.1", sn1.dht_port),)))  # fmt: skip
        try:
            await asyncio.sleep(1.0)  # its routing table fills
            for record in (genuine, stale, forged):
                await node.put("presence/carol", hash(record["signature"]) & 0xFFFF, record)
        finally:
            await node.close()

    asyncio.run(attack())
    found = lookup(net, "carol")
    assert found["status"] == "online", found
    assert [(d["device"], d["seq"]) for d in found["devices"]] == [("phone", 5)]
    time.sleep(1.5)  # status files are rewritten every second
    after = counters(sn1, net)
    assert after["forged_record"] == before["forged_record"] + 1, after
    assert after["stale_record"] == before["stale_record"] + 1, after
