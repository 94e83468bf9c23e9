"""The global index survives losing supernodes: five supernode processes, two killed at once.

Users sit on different supernodes of a five-node network (each runs its OpenDHT node): alice on
sn1, carol on sn2, bob and dave on sn5. dave goes offline first, so sn5 puts his pre-signed
offline record and hands it to two other supernodes (custody). Then sn5 (bob's and dave's) and
one of dave's custodians are killed at the same moment. Nothing is lost: bob's daemon re-attaches
elsewhere and republishes, every user is found from every side (online where they are now, dave
offline with his last-seen time), and alice's call to bob connects. Forged and stale records are
proven rejected in tests/e2e/test_presence.py, against the same supernode code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from punchline.lab.loopback import Network, Supernode, call_with_sample
from punchline.supernode.server import STATUS_FILE


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = Network(tmp_path_factory.mktemp("index"))
    try:
        network.start_auth()
        for _ in range(5):
            network.start_supernode()
        for user in ("alice", "bob", "carol", "dave"):
            network.signup(user)
        yield network
    finally:
        network.stop()


def lookup(net: Network, who: str, asker: str) -> dict[str, Any]:
    result = net.cli("lookup", who, "--json", "--data", str(net.root / asker))
    assert result.returncode == 0, result.stderr + net.logs()
    value: dict[str, Any] = json.loads(result.stdout)
    return value


def wait_for(check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def counters(net: Network, node: Supernode) -> dict[str, int]:
    value: dict[str, int] = json.loads((net.root / node.name / STATUS_FILE).read_text())["counters"]
    return value


def test_killing_two_supernodes_loses_no_presence_and_calls_still_connect(net: Network) -> None:
    sn1, sn2, _sn3, _sn4, sn5 = net.supernodes
    net.start_daemon("alice", "--supernode", sn1.node_id)
    net.start_daemon("carol", "--supernode", sn2.node_id)
    net.start_daemon("bob", "--auto-answer", "--record", str(net.root / "bob.wav"),
                     "--supernode", sn5.node_id)  # fmt: skip
    net.start_daemon("dave", "--supernode", sn5.node_id)
    for asker, who in (("alice", "bob"), ("bob", "carol"), ("carol", "dave")):
        found = lookup(net, who, asker)
        assert found["status"] == "online", (asker, who, found)

    net.daemons["dave"].stop()  # says goodbye: sn5 puts his offline record, shares custody
    assert wait_for(lambda: lookup(net, "dave", "alice")["status"] == "offline", 10)

    def custodians() -> list[Supernode]:
        return [n for n in net.supernodes[:4] if counters(net, n).get("custody_received")]

    holders = wait_for(lambda: len(custodians()) == 2 and custodians(), 5)
    assert holders, [counters(net, n) for n in net.supernodes]
    doomed = [sn5, holders[0]]
    if holders[0] in (sn1, sn2):  # keep alice's and carol's own supernodes for the check below
        doomed = [sn5, holders[1]] if holders[1] not in (sn1, sn2) else [sn5, _sn3]
    for node in doomed:
        node.kill()
    killed = time.monotonic()

    def bob_moved() -> bool:
        node = net.status("bob").get("supernode") or {}
        return node.get("node_id") not in (None, *(n.node_id for n in doomed))

    assert wait_for(bob_moved, 15), net.logs()
    assert wait_for(lambda: net.status("bob").get("published"), 10), net.logs()
    reattached = time.monotonic() - killed
    print(f"bob re-attached and republished {reattached:.2f} s after two supernodes died")

    found_bob = wait_for(lambda: (f := lookup(net, "bob", "alice"))["status"] == "online" and f, 10)
    assert found_bob, lookup(net, "bob", "alice")
    assert all(d["supernode"] not in (n.node_id for n in doomed) for d in found_bob["devices"])
    for asker in ("alice", "carol"):
        dave = lookup(net, "dave", asker)
        assert dave["status"] == "offline", (asker, dave)
        assert dave["last_seen"], (asker, dave)
    assert lookup(net, "carol", "alice")["status"] == "online"
    assert lookup(net, "alice", "carol")["status"] == "online"

    report = call_with_sample(net, "alice", "bob", net.root / "bob.wav", "--duration", "3")
    assert report["connected"] is True, (report, net.logs())
    assert report["peer"] == "bob"
    assert report["setup_ms"] < 2000, report
