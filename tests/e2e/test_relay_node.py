"""Relay nodes as an operator runs them: enrolment, credentials, quotas, the supernode role.

Real processes (login server, relay, supernode) and our TURN client over real sockets.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from punchline.client import account
from punchline.client.relay_path import relays_in
from punchline.client.store import IdentityStore
from punchline.lab.loopback import Network
from punchline.relay import credentials
from punchline.relay.connection import RelayServer, RelayUnavailable, open_turn


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    net = Network(tmp_path)
    try:
        net.start_auth()
        yield net
    finally:
        net.stop()


def _secret(net: Network) -> str:
    return (net.root / "auth" / credentials.SECRET_FILE).read_text().strip()


async def _allocate(port: int, secret: str, user: str) -> tuple[str, int]:
    creds = credentials.issue(secret, user, time.time())
    conn = await open_turn(RelayServer("udp", "127.0.0.1", port), creds.username,
                           creds.password, on_data=lambda _d, _p: None)  # fmt: skip
    return conn.relayed  # left open on purpose: it counts against the quotas


def test_user_quota_486_and_relay_capacity_508(network: Network) -> None:
    relay = network.start_relay("--user-allocations", "1", "--max-allocations", "2")
    secret = _secret(network)

    async def scenario() -> list[object]:
        results: list[object] = []
        for user in ("alice", "alice", "bob", "carol"):
            try:
                results.append(await _allocate(relay.udp_port, secret, user))
            except RelayUnavailable as exc:
                results.append(exc.code)
        return results

    first, second, third, fourth = asyncio.run(scenario())
    assert isinstance(first, tuple)
    assert second == 486  # alice's quota of one allocation
    assert isinstance(third, tuple)
    assert fourth == 508  # the relay is full


def test_relay_gets_its_secret_from_heartbeats_and_users_get_working_credentials(
    network: Network,
) -> None:
    relay = network.start_relay()
    assert (network.root / "relay1" / credentials.SECRET_FILE).read_text().strip() == _secret(
        network
    )
    network.signup("dora")
    store = IdentityStore(network.root / "dora")
    creds = account.turn_credentials(store)
    assert creds.username.endswith(":dora")
    assert creds.expires > time.time() + 3600

    async def use() -> tuple[str, int]:
        conn = await open_turn(RelayServer("udp", "127.0.0.1", relay.udp_port), creds.username,
                               creds.password, on_data=lambda _d, _p: None)  # fmt: skip
        relayed = conn.relayed
        await conn.close()
        return relayed

    assert asyncio.run(use())[0] == "127.0.0.1"
    # a forged password for the same username is refused
    with pytest.raises(RelayUnavailable) as refused:
        asyncio.run(_allocate_with(relay.udp_port, creds.username, "bm90LXRoZS1wYXNzd29yZA=="))
    assert refused.value.code == 401


async def _allocate_with(port: int, username: str, password: str) -> None:
    await open_turn(RelayServer("udp", "127.0.0.1", port), username, password,
                    on_data=lambda _d, _p: None)  # fmt: skip


def test_a_supernode_can_also_be_the_relay(network: Network) -> None:
    node = network.start_supernode("--relay", "--allow-private-peers")
    network.signup("erin")
    store = IdentityStore(network.root / "erin")
    assert account.refresh_bootstrap(store)
    listing = store.bootstrap() or {}
    (entry,) = [n for n in listing["nodes"] if n["node_id"] == node.node_id]
    assert set(entry["roles"]) == {"supernode", "relay"}
    (relay,) = relays_in(listing)
    assert relay.node_id == node.node_id
    ready = json.loads((network.root / "sn1" / "supernode.json").read_text())
    assert relay.addresses["udp"] == [("127.0.0.1", ready["relay"]["udp"])]
    creds = account.turn_credentials(store)

    async def use() -> tuple[str, int]:
        host, port = relay.addresses["udp"][0]
        conn = await open_turn(RelayServer("udp", host, port), creds.username, creds.password,
                               on_data=lambda _d, _p: None)  # fmt: skip
        relayed = conn.relayed
        await conn.close()
        return relayed

    assert asyncio.run(use())[1] > 0


def test_the_python_forwarder_relays_the_same_way(network: Network) -> None:
    """`--python-forwarder`: the event loop pumps the sockets instead of the C thread."""
    import socket

    relay = network.start_relay("--python-forwarder")
    creds = credentials.issue(_secret(network), "frank", time.time())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(5)

        async def exchange() -> tuple[bytes, list[bytes]]:
            got: asyncio.Queue[bytes] = asyncio.Queue()
            conn = await open_turn(RelayServer("udp", "127.0.0.1", relay.udp_port),
                                   creds.username, creds.password,
                                   on_data=lambda d, _p: got.put_nowait(d))  # fmt: skip
            where = peer.getsockname()
            for n in range(5):
                conn.send(b"out %d" % n, where)
                await asyncio.sleep(0.05)
            first, relayed_from = await asyncio.to_thread(peer.recvfrom, 100)
            assert relayed_from[1] == conn.relayed[1]
            for n in range(5):
                peer.sendto(b"back %d" % n, relayed_from)
            answers = [await asyncio.wait_for(got.get(), 5) for _ in range(5)]
            await conn.close()
            return first, answers

        first, answers = asyncio.run(exchange())
    assert first == b"out 0"
    assert answers == [b"back %d" % n for n in range(5)]
    health = json.loads(
        urllib.request.urlopen(f"http://127.0.0.1:{relay.health_port}/healthz").read()
    )
    assert health["native_forwarder"] is False
    assert health["relayed"]["packets_to_client"] >= 5
