"""The directory end to end: list, search from another supernode, unlist, forged entries.

Real processes: a login server, two supernodes with their OpenDHT nodes, alice on one, bob on
the other, carol (who never opts in) on the first. A DHT node in this test process plays the
attacker who writes a forged entry straight into the DHT.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from punchline.client.store import IdentityStore
from punchline.lab.loopback import Network
from punchline.overlay.dht import DhtConfig, DhtIndex
from punchline.wire import directory

FOUND_BOUND_S = 5.0  # from `directory --list` returning to a search elsewhere finding it


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    net = Network(tmp_path_factory.mktemp("directory"))
    try:
        net.start_auth()
        sn1, sn2 = net.start_supernode(), net.start_supernode()
        for user, node in (("alice", sn1), ("bob", sn2), ("carol", sn1)):
            net.signup(user)
            net.start_daemon(user, "--supernode", node.node_id)
        yield net
    finally:
        net.stop()


def _cli(net: Network, who: str, *args: str) -> dict[str, Any]:
    result = net.cli(*args, "--data", str(net.root / who), "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert isinstance(answer, dict)
    return answer


def _search(net: Network, who: str, query: str) -> list[tuple[str, str]]:
    answer = _cli(net, who, "search", query)
    return [(r["user"], r["display"]) for r in answer["results"]]


def _until_found(net: Network, who: str, query: str, wanted: list[tuple[str, str]]) -> float:
    start = time.monotonic()
    while time.monotonic() - start < FOUND_BOUND_S:
        if _search(net, who, query) == wanted:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"{who} searching {query!r}: {_search(net, who, query)}\n{net.logs()}")


def test_listed_users_are_found_and_others_never(network: Network) -> None:
    net = network
    listed = _cli(net, "alice", "directory", "--list", "Alice  Liddell")
    assert listed == {"listed": True, "display": "Alice Liddell", "handed_over": True}
    took = _until_found(net, "bob", "ali", [("alice", "Alice Liddell")])
    print(f"bob found alice {took * 1000:.0f} ms after she listed herself")
    assert _search(net, "bob", "LIDD") == [("alice", "Alice Liddell")]
    assert _cli(net, "bob", "directory", "--list", "Bób Bäcker")["handed_over"] is True
    _until_found(net, "alice", "bob b", [("bob", "Bób Bäcker")])
    assert _search(net, "carol", "bäc") == [("bob", "Bób Bäcker")]
    # carol is online, attached, findable by name for calls, but never opted in
    assert _search(net, "alice", "carol") == []
    assert _search(net, "alice", "ca") == []
    assert _cli(net, "carol", "directory") == {"listed": False, "display": None}
    short = net.cli("search", "a", "--data", str(net.root / "bob"))
    assert short.returncode == 1
    assert "at least 2" in short.stderr


def test_forged_entries_are_dropped_and_counted(network: Network) -> None:
    net = network
    _cli(net, "alice", "directory", "--list", "Alice Liddell")
    _until_found(net, "bob", "ali", [("alice", "Alice Liddell")])
    store = IdentityStore(net.root / "alice")
    genuine = directory.make(store.key(), store.certificate(), "alice", "Alicia Fake", 2**62,
                             time.time() + 3600)  # fmt: skip
    forged = {**genuine, "payload": genuine["payload"].replace("Alicia Fake", "Alicia Evil")}

    async def inject() -> None:
        dht_ports = [("127.0.0.1", s.dht_port) for s in net.supernodes]
        index = DhtIndex(DhtConfig(bind_host="127.0.0.1", bootstrap=dht_ports,
                                   unlimited_rate=True))  # fmt: skip
        try:
            await asyncio.sleep(0.5)  # join the DHT
            for key in directory.keys_for("alice", "Alicia Evil"):
                if key.startswith("dir/ali"):
                    await index.put(key, directory.value_id("alice"), forged)
        finally:
            await index.close()

    asyncio.run(inject())
    status = net.root / "sn2" / "supernode-status.json"
    deadline = time.monotonic() + FOUND_BOUND_S
    counted = 0
    while time.monotonic() < deadline and not counted:
        assert _search(net, "bob", "ali") == [("alice", "Alice Liddell")]
        time.sleep(1.1)  # the status file is rewritten every second
        counted = json.loads(status.read_text())["directory"]["forged_entries"]
    assert counted >= 1


def test_unlisting_hides_a_user_at_once(network: Network) -> None:
    net = network
    _cli(net, "alice", "directory", "--list", "Alice Liddell")
    _until_found(net, "bob", "alice", [("alice", "Alice Liddell")])
    assert _cli(net, "alice", "directory", "--unlist") == {"listed": False, "display": None,
                                                          "handed_over": True}  # fmt: skip
    took = _until_found(net, "bob", "alice", [])
    print(f"alice disappeared from bob's searches {took * 1000:.0f} ms after unlisting")
