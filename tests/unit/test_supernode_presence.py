"""SupernodeCore presence rules: sequence numbers, offline records, custody hand-over, lookups.

Wired in memory (tests.unit.cores): several supernode cores and clients on a fake network with
a shared dict standing for the DHT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from punchline.identity.certs import Role
from punchline.overlay.custody import custodians
from punchline.overlay.index import presence_key
from punchline.supernode.core import Publish, Release
from punchline.wire import presence
from tests.unit.cores import NOW, Addr, Party, SessionEnd, make_party, node_info, record
from tests.unit.test_supernode_core import Lab

if TYPE_CHECKING:
    from tests.unit.conftest import CA, IssueFn

ADDRS: dict[str, Addr] = {f"sn-{c}": (f"198.51.100.{i}", 7000) for i, c in enumerate("abcde", 1)}


@dataclass(frozen=True)
class World:
    ca: CA
    alice: Party
    bob: Party
    carol: Party
    foreign_bob: Party
    nodes: dict[str, Party]


@pytest.fixture(scope="module")
def world(ca: CA, issue: IssueFn, issue_other: IssueFn) -> World:
    return World(
        ca=ca,
        alice=make_party(issue, ca.cert, "alice"),
        bob=make_party(issue, ca.cert, "bob"),
        carol=make_party(issue, ca.cert, "carol"),
        foreign_bob=make_party(issue_other, ca.cert, "bob"),
        nodes={n: make_party(issue, ca.cert, n, (Role.SUPERNODE,)) for n in ADDRS},
    )


def network(world: World, count: int = 5, **lab_args: Any) -> Lab:
    lab = Lab(world, **lab_args)  # type: ignore[arg-type]
    names = list(ADDRS)[:count]
    for name in names:
        core = lab.node(world.nodes[name], ADDRS[name])
        core.set_peers([node_info(n, ADDRS[n]) for n in names])
    return lab


def offline(party: Party, seq: int, node: str = "sn-a", at: float = NOW) -> dict[str, str]:
    return presence.make_offline(party.key, party.cert, party.name, "laptop",
                                 node_info(node, ADDRS[node]), seq, at)  # fmt: skip


def attach(lab: Lab, party: Party, seq: int = 10, node: str = "sn-a") -> SessionEnd:
    client = lab.client(party, node)
    online = record(party, "laptop", node, ADDRS[node], seq)
    lab.send(client, {"t": "publish", "record": online, "offline": offline(party, seq + 1, node)})
    return client


def lookup(lab: Lab, client: SessionEnd, user: str) -> dict[str, Any]:
    lab.send(client, {"t": "lookup", "user": user, "id": 7})
    return client.of_type("lookup_result")[-1]


def test_a_lower_sequence_number_is_refused_and_counted_stale(world: World) -> None:
    lab = network(world, 1)
    core = lab.nodes["sn-a"][0]
    alice = attach(lab, world.alice, seq=10)
    lab.send(alice, {"t": "publish", "record": record(world.alice, "laptop", "sn-a", ADDRS["sn-a"],
                                                       9)})  # fmt: skip
    assert core.counters["stale_record"] == 1
    assert alice.of_type("error")[-1]["message"] == "stale presence record"
    assert core.by_user["alice"]["laptop"].seq == 10
    # a replay through a new session is refused too: the node remembers the device's seq
    lab.send(alice, {"t": "bye"})
    again = lab.client(world.alice)
    lab.send(again, {"t": "publish", "record": record(world.alice, "laptop", "sn-a",
                                                      ADDRS["sn-a"], 10)})  # fmt: skip
    assert core.counters["stale_record"] == 2  # below the offline record (11) put at bye


def test_republishing_the_same_record_is_acknowledged_without_a_new_put(world: World) -> None:
    lab = network(world, 1)
    alice = attach(lab, world.alice)
    core = lab.nodes["sn-a"][0]
    online = core.by_user["alice"]["laptop"].record
    assert online is not None
    core.published("alice", "laptop", online, lab.net.now)  # what the server says once put
    lab.net.advance(0.1)
    published = len(lab.index.records["alice"])
    acks = len(alice.of_type("published"))
    assert acks == 1
    lab.send(alice, {"t": "publish", "record": online, "offline": offline(world.alice, 12)})
    assert len(alice.of_type("published")) == acks + 1
    assert len(lab.index.records["alice"]) == published
    assert lab.nodes["sn-a"][0].by_user["alice"]["laptop"].offline_seq == 12


def test_bye_puts_the_offline_record_and_two_custodians_keep_it(world: World) -> None:
    lab = network(world)
    alice = attach(lab, world.alice, seq=10)
    lab.end().actions = []
    lab.send(alice, {"t": "bye"})
    lab.net.advance(2)
    stored = lab.index.records["alice"]["laptop"]
    checked = presence.verify_untrusted(stored, world.ca.cert, NOW)
    assert (checked.status, checked.seq, checked.last_seen) == ("offline", 11, NOW)
    a = lab.nodes["sn-a"][0]
    assert a.counters["offline_put"] == 1
    assert a.counters["custody_sent"] == 2
    chosen = custodians(presence_key("alice"), [n for n in ADDRS if n != "sn-a"], 2)
    for name in ADDRS:
        if name == "sn-a":
            continue
        received = lab.nodes[name][0].counters["custody_received"]
        assert received == (1 if name in chosen else 0), name


def test_the_offline_record_kept_by_custody_lives_72_hours(world: World) -> None:
    lab = network(world, 1, auto_index=False)
    alice = attach(lab, world.alice)
    lab.send(alice, {"t": "bye"})
    put = [p for p in lab.end().publishes() if p.record == offline(world.alice, 11)]
    assert len(put) == 1
    assert put[0].until == NOW + presence.LAST_SEEN_WINDOW


def test_a_silent_client_without_an_offline_record_is_released(world: World) -> None:
    lab = network(world, 1, auto_index=False)
    client = lab.client(world.alice)
    lab.send(client, {"t": "publish", "record": record(world.alice, "laptop", "sn-a",
                                                       ADDRS["sn-a"], 3)})  # fmt: skip
    lab.send(client, {"t": "bye"})
    assert [a for a in lab.end().actions if isinstance(a, Release)] == [Release("alice", "laptop")]


def test_lookup_from_another_node_finds_the_user_offline_with_last_seen(world: World) -> None:
    lab = network(world)
    alice = attach(lab, world.alice)
    bob = lab.client(world.bob, "sn-b", device="phone")
    result = lookup(lab, bob, "alice")
    assert result["status"] == "online"
    assert result["devices"] == [{"device": "laptop", "status": "online", "supernode": "sn-a",
                                  "seq": 10}]  # fmt: skip
    lab.send(alice, {"t": "bye"})
    result = lookup(lab, bob, "alice")
    assert (result["status"], result["last_seen"], result["devices"]) == ("offline", NOW, [])
    assert result["records"] == []
    # and a call to her is not routed to the supernode she left
    lab.send(bob, {"t": "signal", "to": "alice", "id": 3, "body": {}})
    assert [e["reason"] for e in bob.of_type("signal_error")] == ["offline"]
    chosen = custodians(presence_key("alice"), [n for n in ADDRS if n != "sn-a"], 2)
    assert set(lab.nodes["sn-a"][0].links) == set(chosen)  # custody hand-over only


def test_lookup_drops_and_counts_forged_and_stale_records(world: World) -> None:
    lab = network(world, 1, auto_index=False)
    core = lab.nodes["sn-a"][0]
    carol = lab.client(world.carol)
    lab.send(carol, {"t": "lookup", "user": "bob", "id": 1})
    new = record(world.bob, "phone", "sn-b", ADDRS["sn-b"], seq=5)
    old = record(world.bob, "phone", "sn-b", ADDRS["sn-b"], seq=4)
    forged = record(world.foreign_bob, "phone", "sn-b", ADDRS["sn-b"], seq=99)
    lab.answer_lookups("sn-a", [old, forged, new])
    (result,) = carol.of_type("lookup_result")
    assert result["records"] == [new]
    assert result["devices"][0]["seq"] == 5
    assert core.counters["forged_record"] == 1
    assert core.counters["stale_record"] == 1


def test_an_offline_record_must_be_newer_and_the_devices_own(world: World) -> None:
    lab = network(world, 1)
    core = lab.nodes["sn-a"][0]
    client = lab.client(world.alice)
    online = record(world.alice, "laptop", "sn-a", ADDRS["sn-a"], 10)
    lab.send(client, {"t": "publish", "record": online, "offline": offline(world.alice, 10)})
    other_device = presence.make_offline(world.alice.key, world.alice.cert, "alice", "phone",
                                         node_info("sn-a", ADDRS["sn-a"]), 20, NOW)  # fmt: skip
    lab.send(client, {"t": "publish", "record": online, "offline": other_device})
    bobs = offline(world.bob, 30)
    lab.send(client, {"t": "publish", "record": online, "offline": bobs})
    assert core.by_user["alice"]["laptop"].offline is None
    assert core.counters["bad_record"] == 3
    assert core.counters["forged_record"] == 1  # bob's record from alice's session


def test_an_online_record_cannot_claim_offline(world: World) -> None:
    lab = network(world, 1)
    client = lab.client(world.alice)
    lab.send(client, {"t": "publish", "record": offline(world.alice, 5)})
    assert client.of_type("error")[-1]["message"] == "say bye to go offline"


def test_custody_is_only_taken_from_supernodes_and_verified(world: World) -> None:
    lab = network(world, 2)
    b = lab.nodes["sn-b"][0]
    carol = lab.client(world.carol, "sn-b")
    lab.send(carol, {"t": "custody", "record": offline(world.alice, 11)})
    assert b.counters["custody_received"] == 0
    assert b.counters["malformed"] == 1
    a = lab.nodes["sn-a"][0]
    forged = dict(offline(world.alice, 11))
    forged["payload"] = forged["payload"].replace('"seq":11', '"seq":12')
    for message in (forged, record(world.alice, "laptop", "sn-a", ADDRS["sn-a"], 3)):
        a._send_to_node("sn-b", {"t": "custody", "record": message}, lab.net.now)
    lab.net.advance(2)
    assert b.counters["custody_received"] == 0
    assert b.counters["forged_record"] == 1
    assert b.counters["bad_record"] == 2  # and the online record
    a._send_to_node("sn-b", {"t": "custody", "record": offline(world.alice, 11)}, lab.net.now)
    lab.net.advance(1)
    assert b.counters["custody_received"] == 1
    a._send_to_node("sn-b", {"t": "custody", "record": offline(world.alice, 9)}, lab.net.now)
    lab.net.advance(1)
    assert b.counters["stale_record"] == 1
    assert presence.verify_untrusted(lab.index.records["alice"]["laptop"], world.ca.cert,
                                     NOW).seq == 11  # fmt: skip


def test_publish_actions_carry_the_records_expiry(world: World) -> None:
    lab = network(world, 1, auto_index=False)
    lab.client(world.alice, device="laptop")
    (action,) = lab.end().publishes()
    assert isinstance(action, Publish)
    assert action.until == NOW + 3600
