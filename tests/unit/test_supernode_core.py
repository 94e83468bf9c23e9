"""SupernodeCore: sessions, STUN hand-off, presence, lookups and signal routing, wired in memory."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from punchline.identity.certs import Role
from punchline.session.channel import ChannelConfig
from punchline.session.outbound import HELLO_ATTEMPTS, OutboundSession, State
from punchline.supernode.core import CoreConfig, Lookup, Publish, Route, SupernodeCore
from punchline.wire import session as wire
from tests.unit.cores import (
    NOW,
    Addr,
    CoreEnd,
    Index,
    Net,
    Party,
    SessionEnd,
    make_party,
    record,
    udp,
)

if TYPE_CHECKING:
    from tests.unit.conftest import CA, IssueFn

SA: Addr = ("198.51.100.1", 7000)
SB: Addr = ("198.51.100.2", 7000)
QUIET = ChannelConfig(ping_interval=None)


@dataclass(frozen=True)
class World:
    ca: CA
    alice: Party
    bob: Party
    carol: Party
    sn_a: Party
    sn_b: Party
    foreign_bob: Party


@pytest.fixture(scope="module")
def world(ca: CA, issue: IssueFn, issue_other: IssueFn) -> World:
    return World(
        ca=ca,
        alice=make_party(issue, ca.cert, "alice"),
        bob=make_party(issue, ca.cert, "bob"),
        carol=make_party(issue, ca.cert, "carol"),
        sn_a=make_party(issue, ca.cert, "sn-a", (Role.SUPERNODE,)),
        sn_b=make_party(issue, ca.cert, "sn-b", (Role.SUPERNODE,)),
        foreign_bob=make_party(issue_other, ca.cert, "bob"),
    )


class Lab:
    """Supernodes and clients on one fake network. With `auto_index`, publishes and lookups
    go to a shared in-memory index at once; otherwise the test answers lookups by hand."""

    def __init__(self, world: World, auto_index: bool = True, **net_args: Any) -> None:
        self.world = world
        self.net = Net(**net_args)
        self.index = Index()
        self.auto_index = auto_index
        self.nodes: dict[str, tuple[SupernodeCore, CoreEnd, Addr]] = {}
        self._ports = itertools.count(40000)

    def node(self, party: Party, addr: Addr, **core_args: Any) -> SupernodeCore:
        core = SupernodeCore(party.identity, party.name, self.net.now, **core_args)
        end = CoreEnd(core, self.index if self.auto_index else None)
        self.net.add(addr, end)
        self.nodes[party.name] = (core, end, addr)
        return core

    def end(self, node: str = "sn-a") -> CoreEnd:
        return self.nodes[node][1]

    def client(
        self,
        party: Party,
        node: str = "sn-a",
        device: str | None = None,
        seq: int = 1,
        config: ChannelConfig | None = None,
    ) -> SessionEnd:
        _, _, addr = self.nodes[node]
        address = ("192.0.2.1", next(self._ports))
        session = OutboundSession(party.identity, node, self.net.now, config=config)
        client = SessionEnd(session, addr, address)
        self.net.add(address, client)
        self.net.advance(1, until=lambda: session.established and bool(client.inbox))
        assert session.established, session.failure
        if device is not None:
            self.publish(client, record(party, device, node, addr, seq))
        return client

    def publish(self, client: SessionEnd, rec: dict[str, Any]) -> None:
        client.session.send({"t": "publish", "record": rec}, self.net.now)
        self.net.advance(0.1)

    def send(self, client: SessionEnd, message: dict[str, Any]) -> None:
        client.session.send(message, self.net.now)
        self.net.advance(0.1)

    def answer_lookups(self, node: str, records: list[dict[str, Any]]) -> None:
        core, end, _ = self.nodes[node]
        lookups = end.lookups()
        end.actions = [a for a in end.actions if not isinstance(a, Lookup)]
        for lookup in lookups:
            core.lookup_done(lookup.ref, records, self.net.now)
        self.net.advance(0.1)


def signals(client: SessionEnd) -> list[dict[str, Any]]:
    return client.of_type("signal")


def hello_from(party: Party, node: str = "sn-a") -> tuple[OutboundSession, bytes]:
    session = OutboundSession(party.identity, node, NOW)
    (hello,) = session.datagrams(NOW)
    return session, hello


# ------------------------------------------------------------------ sessions


def test_clients_open_sessions(world: World) -> None:
    lab = Lab(world)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    bob = lab.client(world.bob)
    assert core.counters["sessions_opened"] == 2
    assert sorted(s.subject for s in core.sessions.values()) == ["alice", "bob"]
    for client in (alice, bob):
        assert client.address is not None
        assert client.of_type("welcome") == [
            {"t": "welcome", "node_id": "sn-a", "reflexive": [*client.address]}
        ]
        session = next(s for s in core.sessions.values() if s.route == udp(client.address))
        assert session.device is None
        assert not session.is_supernode


def test_a_repeated_hello_gets_the_identical_cached_welcome(world: World) -> None:
    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW)
    client, hello = hello_from(world.alice)
    route = udp(("192.0.2.1", 1))
    core.receive(hello, route, NOW)
    first = core.datagrams(NOW)
    assert [wire.decode_untrusted(d).__class__ for d, _ in first] == [wire.Welcome, wire.Sealed]
    core.receive(hello, route, NOW + 0.5)
    again = core.datagrams(NOW + 0.5)
    assert again == [(first[0][0], route)]  # the same WELCOME bytes, and only that
    assert core.counters["sessions_opened"] == 1
    assert len(core.sessions) == 1
    # the client, whichever copy reached it, ends up on the one session
    welcome = wire.decode_untrusted(again[0][0])
    client.receive_untrusted(welcome, NOW + 0.5)
    assert client.channel is not None
    assert set(core.sessions) == {client.channel.session_id}


def test_a_re_encoded_hello_gets_the_cached_welcome_too(world: World) -> None:
    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW)
    _, hello = hello_from(world.alice)
    decoded = wire.decode_untrusted(hello)
    assert isinstance(decoded, wire.Hello)
    reordered = wire.encode_hello(dict(reversed(list(decoded.hello.items()))))
    assert reordered != hello
    route = udp(("192.0.2.1", 1))
    core.receive(hello, route, NOW)
    welcome = core.datagrams(NOW)[0][0]
    core.receive(reordered, route, NOW + 0.1)
    assert core.datagrams(NOW + 0.1) == [(welcome, route)]
    assert core.counters["sessions_opened"] == 1


@pytest.mark.parametrize("hello", [{}, {"v": 1}, {"to": "sn-a", "sig": "x"}])
def test_a_hello_of_the_wrong_shape_opens_nothing(world: World, hello: dict[str, Any]) -> None:
    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW)
    core.receive(wire.encode_hello(hello), udp(("192.0.2.1", 1)), NOW)
    assert core.counters["refused_hello"] == 1
    assert core.sessions == {}
    for data, _ in core.datagrams(NOW):
        assert isinstance(wire.decode_untrusted(data), wire.Refused)


def test_the_hello_cache_expires(world: World) -> None:
    config = CoreConfig(hello_cache_seconds=5)
    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW, config)
    _, hello = hello_from(world.alice)
    route = udp(("192.0.2.1", 1))
    core.receive(hello, route, NOW)
    first = core.datagrams(NOW)[0][0]
    core.handle_timer(NOW + 6)
    core.receive(hello, route, NOW + 6)  # still inside the handshake's replay window
    assert core.datagrams(NOW + 6)[0][0] != first
    assert core.counters["sessions_opened"] == 2


def test_a_hello_addressed_to_another_node_is_refused(world: World) -> None:
    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW)
    _, hello = hello_from(world.alice, node="sn-b")
    core.receive(hello, udp(("192.0.2.1", 1)), NOW)
    ((data, _),) = core.datagrams(NOW)
    refused = wire.decode_untrusted(data)
    assert isinstance(refused, wire.Refused)
    assert "sn-b" in refused.reason
    assert core.counters["refused_hello"] == 1
    assert core.sessions == {}


def test_a_client_of_another_ca_is_refused(world: World) -> None:
    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW)
    _, hello = hello_from(world.foreign_bob)
    core.receive(hello, udp(("192.0.2.1", 1)), NOW)
    ((data, _),) = core.datagrams(NOW)
    assert isinstance(wire.decode_untrusted(data), wire.Refused)
    assert core.sessions == {}


# ------------------------------------------------------------------ STUN and malformed input


def test_stun_looking_datagrams_go_to_the_stun_callable(world: World) -> None:
    seen: list[tuple[bytes, Route]] = []

    def stun(data: bytes, route: Route) -> bytes | None:
        seen.append((data, route))
        return b"\x01\x01answer" if data[1:2] == b"\x01" else None

    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW, stun=stun)
    route = udp(("192.0.2.1", 1))
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    core.receive(request, route, NOW)
    core.receive(b"\x01\x11whatever", route, NOW)  # answered with nothing
    assert seen == [(request, route), (b"\x01\x11whatever", route)]
    assert core.datagrams(NOW) == [(b"\x01\x01answer", route)]
    assert core.counters["stun"] == 2
    assert core.counters["malformed"] == 0


def test_without_a_stun_callable_stun_is_malformed(world: World) -> None:
    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW)
    core.receive(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12), udp(("192.0.2.1", 1)), NOW)
    assert core.counters["malformed"] == 1
    assert core.counters["stun"] == 0
    assert core.datagrams(NOW) == []


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff",
        b"\x80" + bytes(20),  # RTP
        b"\x50not json",
        b"\x50[]",
        wire.encode_welcome({}),  # a WELCOME from nowhere we linked to
        wire.encode_refused("x"),
        b"\x52" + bytes(5),
    ],
)
def test_malformed_datagrams_are_counted(world: World, data: bytes) -> None:
    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW, stun=lambda d, r: b"")
    core.receive(data, udp(("192.0.2.1", 1)), NOW)
    assert core.counters["malformed"] == 1
    assert core.datagrams(NOW) == []


def test_sealed_packets_of_unknown_sessions_are_counted(world: World) -> None:
    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW)
    core.receive(wire.sealed_header(b"12345678", 1) + bytes(20), udp(("192.0.2.1", 1)), NOW)
    assert core.counters["unknown_session"] == 1


# A core for the byte fuzzer; identity made once (creating certificates per example is slow).
def _fuzz_core() -> SupernodeCore:
    from punchline.identity import certs, keys
    from punchline.session.outbound import Identity

    ca_key, node_key = keys.generate(), keys.generate()
    ca = certs.create_ca(ca_key, NOW)
    cert = certs.issue(ca_key, ca, "sn-f", node_key.public_key(), [Role.SUPERNODE], NOW, 86400)
    return SupernodeCore(Identity(node_key, cert, ca), "sn-f", NOW)


_FUZZ_CORE = _fuzz_core()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=120))
def test_receive_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    core = _FUZZ_CORE
    core.receive(data, udp(("192.0.2.1", 1)), NOW)
    core.datagrams(NOW)


# ------------------------------------------------------------------ presence


def test_a_client_publishing_its_own_record_gives_a_publish_action(world: World) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    rec = record(world.alice, "laptop", "sn-a", SA)
    lab.publish(alice, rec)
    assert lab.end().publishes() == [Publish("alice", "laptop", rec)]
    assert set(core.by_user["alice"]) == {"laptop"}
    assert alice.of_type("error") == []
    assert core.counters["bad_record"] == 0


def test_the_client_hears_when_the_index_holds_its_current_record(world: World) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    for seq in (1, 2):
        lab.publish(alice, record(world.alice, "laptop", "sn-a", SA, seq))
    assert alice.of_type("published") == []  # nothing before the index confirms
    old, new = lab.end().publishes()  # the records as the core handed them to the index
    core.published("alice", "laptop", old.record, lab.net.now)  # superseded: no news
    core.published("alice", "laptop", new.record, lab.net.now)
    lab.net.advance(0.1)
    assert alice.of_type("published") == [{"t": "published", "seq": 2}]


def test_publishing_someone_elses_record_is_refused(world: World) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    lab.publish(alice, record(world.bob, "phone", "sn-a", SA))
    assert lab.end().publishes() == []
    assert core.counters["bad_record"] == 1
    (error,) = alice.of_type("error")
    assert "bob" in error["message"]
    assert core.by_user == {}


def test_publishing_a_record_naming_another_supernode_is_refused(world: World) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    lab.publish(alice, record(world.alice, "laptop", "sn-b", SB))
    assert lab.end().publishes() == []
    assert core.counters["bad_record"] == 1
    assert alice.of_type("error") == [{"t": "error", "message": "record names another supernode"}]


@pytest.mark.parametrize("bad", [None, "text", {"payload": "{}", "signature": "x"}, [1, 2]])
def test_publishing_garbage_is_refused(world: World, bad: object) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    lab.send(alice, {"t": "publish", "record": bad})
    assert core.counters["bad_record"] == 1
    assert len(alice.of_type("error")) == 1


def test_republishing_from_another_device_moves_the_session(world: World) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, device="laptop")
    lab.publish(alice, record(world.alice, "desk", "sn-a", SA, seq=2))
    assert set(core.by_user["alice"]) == {"desk"}


# ------------------------------------------------------------------ lookups


def test_lookup_returns_only_verified_records_of_the_user(world: World) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    lab.send(alice, {"t": "lookup", "user": "bob", "id": 42})
    ((ref, user),) = [(a.ref, a.user) for a in lab.end().lookups()]
    assert user == "bob"
    good = record(world.bob, "phone", "sn-b", SB)
    forged = dict(record(world.bob, "laptop", "sn-b", SB))
    forged["payload"] = forged["payload"].replace('"seq":1', '"seq":9')
    expired = record(world.bob, "tablet", "sn-b", SB, expires=NOW - 1)
    foreign = record(world.foreign_bob, "evil", "sn-b", SB)
    not_bob = record(world.carol, "phone", "sn-b", SB)
    core.lookup_done(ref, [good, forged, expired, foreign, not_bob, {"x": 1}], lab.net.now)
    lab.net.advance(0.1)
    (result,) = alice.of_type("lookup_result")
    assert result == {"t": "lookup_result", "id": 42, "user": "bob", "records": [good],
                      "status": "online", "last_seen": None,
                      "devices": [{"device": "phone", "status": "online", "supernode": "sn-b",
                                   "seq": 1}]}  # fmt: skip
    assert core.counters["bad_record"] == 5
    assert core.counters["expired_record"] == 1
    assert core.counters["forged_record"] == 4


def test_lookup_includes_users_attached_here_and_keeps_the_highest_seq(world: World) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    bob_phone = record(world.bob, "phone", "sn-a", SA, seq=5)
    bob = lab.client(world.bob)
    lab.publish(bob, bob_phone)
    lab.send(alice, {"t": "lookup", "user": "bob", "id": 1})
    old_phone = record(world.bob, "phone", "sn-a", SA, seq=3)
    newer_laptop = record(world.bob, "laptop", "sn-b", SB, seq=8)
    older_laptop = record(world.bob, "laptop", "sn-b", SB, seq=7)
    lab.answer_lookups("sn-a", [old_phone, newer_laptop, older_laptop])
    (result,) = alice.of_type("lookup_result")
    assert sorted(map(json.dumps, result["records"])) == sorted(
        map(json.dumps, [bob_phone, newer_laptop])
    )
    assert core.counters["bad_record"] == 0


def test_lookup_of_an_unknown_user_gives_an_empty_result(world: World) -> None:
    lab = Lab(world)
    lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    lab.send(alice, {"t": "lookup", "user": "nobody", "id": "x"})
    assert alice.of_type("lookup_result") == [
        {"t": "lookup_result", "id": "x", "user": "nobody", "records": [], "status": "unknown",
         "last_seen": None, "devices": []}
    ]  # fmt: skip


@pytest.mark.parametrize("user", [None, "", "x" * 65, 5, ["bob"]])
def test_lookup_of_a_malformed_name_is_dropped(world: World, user: object) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    lab.send(alice, {"t": "lookup", "user": user})
    assert lab.end().lookups() == []
    assert core.counters["malformed"] == 1


def test_lookup_done_for_unknown_or_departed_requests_is_harmless(world: World) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    core.lookup_done(999, [], lab.net.now)
    lab.send(alice, {"t": "lookup", "user": "bob"})
    lab.send(alice, {"t": "bye"})
    assert core.sessions == {}
    lab.answer_lookups("sn-a", [record(world.bob, "phone", "sn-a", SA)])
    assert alice.of_type("lookup_result") == []


# ------------------------------------------------------------------ signals on one supernode


def test_a_signal_to_a_local_user_is_delivered_before_the_lookup_returns(world: World) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, device="laptop")
    bob = lab.client(world.bob, device="phone")
    body = {"type": "invite", "call_id": "c1"}
    lab.send(alice, {"t": "signal", "to": "bob", "id": 7, "body": body})
    assert len(lab.end().lookups()) == 1  # not answered yet
    assert signals(bob) == [{"t": "signal", "from": "alice", "from_device": "laptop",
                             "body": body}]  # fmt: skip
    # the index also knows bob's record: he still gets the signal only once
    lab.answer_lookups("sn-a", [record(world.bob, "phone", "sn-a", SA)])
    lab.net.advance(2)
    assert len(signals(bob)) == 1
    assert alice.of_type("signal_error") == []
    assert core.counters["signals_routed"] == 1


def test_a_signal_reaches_only_the_wanted_device(world: World) -> None:
    lab = Lab(world)
    lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, device="laptop")
    phone = lab.client(world.bob, device="phone")
    desk = lab.client(world.bob, device="desk")
    lab.send(alice, {"t": "signal", "to": "bob", "to_device": "desk", "body": {"n": 1}})
    assert signals(phone) == []
    assert [s["body"] for s in signals(desk)] == [{"n": 1}]
    lab.send(alice, {"t": "signal", "to": "bob", "body": {"n": 2}})  # every device
    assert [s["body"] for s in signals(phone)] == [{"n": 2}]
    assert [s["body"] for s in signals(desk)] == [{"n": 1}, {"n": 2}]


def test_a_signal_to_an_offline_user_gives_signal_error_after_the_lookup(world: World) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, device="laptop")
    lab.send(alice, {"t": "signal", "to": "bob", "id": 7, "body": {"type": "invite"}})
    assert alice.of_type("signal_error") == []  # not before the index has answered
    lab.answer_lookups("sn-a", [])
    assert alice.of_type("signal_error") == [
        {"t": "signal_error", "ref": 7, "to": "bob", "reason": "offline"}
    ]
    assert core.counters["signals_undeliverable"] == 1


def test_a_stale_record_naming_this_node_counts_as_offline(world: World) -> None:
    lab = Lab(world, auto_index=False)
    lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, device="laptop")
    lab.send(alice, {"t": "signal", "to": "bob", "id": 1, "body": {}})
    lab.answer_lookups("sn-a", [record(world.bob, "phone", "sn-a", SA)])  # bob left
    assert [e["reason"] for e in alice.of_type("signal_error")] == ["offline"]


def test_a_signal_before_publishing_presence_is_refused(world: World) -> None:
    lab = Lab(world, auto_index=False)
    lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    lab.send(alice, {"t": "signal", "to": "bob", "id": 3, "body": {}})
    assert alice.of_type("signal_error") == [
        {"t": "signal_error", "ref": 3, "to": "bob", "reason": "publish presence first"}
    ]
    assert lab.end().lookups() == []


@pytest.mark.parametrize("body", [None, "text", [1], 5])
def test_a_signal_without_an_object_body_is_malformed(world: World, body: object) -> None:
    lab = Lab(world, auto_index=False)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, device="laptop")
    lab.send(alice, {"t": "signal", "to": "bob", "body": body})
    assert core.counters["malformed"] == 1
    assert lab.end().lookups() == []


def test_a_signal_is_routed_by_its_to_field_only(world: World) -> None:
    lab = Lab(world, auto_index=False)
    lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, device="laptop")
    carol = lab.client(world.carol, device="phone")
    lab.send(alice, {"t": "signal", "to": "bob", "user": "carol", "id": 1, "body": {}})
    lab.answer_lookups("sn-a", [])  # bob is offline
    assert signals(carol) == []
    assert [e["reason"] for e in alice.of_type("signal_error")] == ["offline"]


def test_a_deliver_from_a_user_session_is_forbidden(world: World) -> None:
    lab = Lab(world)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, device="laptop")
    bob = lab.client(world.bob, device="phone")
    lab.send(alice, {"t": "deliver", "from": "carol", "from_device": "x", "to": "bob",
                     "to_device": "phone", "body": {"forged": True}})  # fmt: skip
    assert core.counters["forbidden"] == 1
    assert signals(bob) == []


def test_a_deliver_from_a_supernode_session_reaches_the_device(world: World) -> None:
    lab = Lab(world)
    core = lab.node(world.sn_a, SA)
    bob = lab.client(world.bob, device="phone")
    peer = lab.client(world.sn_b)  # a supernode attached as a client: a link
    lab.send(peer, {"t": "deliver", "from": "carol", "from_device": "x", "to": "bob",
                    "to_device": "phone", "body": {"n": 1}})  # fmt: skip
    assert signals(bob) == [{"t": "signal", "from": "carol", "from_device": "x", "body": {"n": 1}}]
    lab.send(peer, {"t": "deliver", "from": "carol", "to": "bob", "to_device": "tv", "body": {}})
    assert core.counters["signals_undeliverable"] == 1
    assert core.counters["forbidden"] == 0


@pytest.mark.parametrize("kind", ["nonsense", None, 5])
def test_unknown_message_types_are_malformed(world: World, kind: object) -> None:
    lab = Lab(world)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice)
    lab.send(alice, {"t": kind})
    assert core.counters["malformed"] == 1


# ------------------------------------------------------------------ signals across supernodes


def test_a_signal_to_a_user_on_another_supernode_goes_over_a_link(world: World) -> None:
    lab = Lab(world)
    a = lab.node(world.sn_a, SA)
    b = lab.node(world.sn_b, SB)
    alice = lab.client(world.alice, "sn-a", device="laptop")
    bob = lab.client(world.bob, "sn-b", device="phone")
    assert set(lab.index.records["bob"]) == {"phone"}
    body = {"type": "invite", "call_id": "c9"}
    alice.session.send({"t": "signal", "to": "bob", "id": 1, "body": body}, lab.net.now)
    lab.net.advance(2, until=lambda: bool(signals(bob)))
    assert signals(bob) == [{"t": "signal", "from": "alice", "from_device": "laptop",
                             "body": body}]  # fmt: skip
    assert set(a.links) == {"sn-b"}
    link = a.links["sn-b"]
    assert link.route == udp(SB)
    assert link.session.established
    (from_a,) = [s for s in b.sessions.values() if s.subject == "sn-a"]
    assert from_a.is_supernode
    assert a.counters["signals_routed"] == 1
    assert alice.of_type("signal_error") == []
    # the link is reused, and kept alive by its pings while nothing else is said
    lab.net.advance(30)
    alice.session.send({"t": "signal", "to": "bob", "body": {"n": 2}}, lab.net.now)
    lab.net.advance(1)
    assert [s["body"] for s in signals(bob)] == [body, {"n": 2}]
    assert b.counters["sessions_opened"] == 2  # bob's session and one link


def test_a_link_to_a_dead_supernode_fails_and_is_retried_afresh(world: World) -> None:
    lab = Lab(world)
    a = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, "sn-a", device="laptop")
    # bob's record names sn-b, but nothing answers there
    lab.index.records["bob"] = {"phone": record(world.bob, "phone", "sn-b", SB)}
    lab.send(alice, {"t": "signal", "to": "bob", "body": {}})
    first = a.links["sn-b"].session
    lab.net.advance(10)
    assert first.state is State.FAILED
    assert first.failure == "no answer from the server"
    hellos = [s for s in lab.net.between(SA, SB) if s.data[0] == wire.HELLO]
    assert len(hellos) == HELLO_ATTEMPTS
    lab.send(alice, {"t": "signal", "to": "bob", "body": {}})
    assert a.links["sn-b"].session is not first
    assert a.links["sn-b"].session.state is State.CONNECTING


def test_a_record_naming_another_node_without_a_udp_address_is_undeliverable(
    world: World,
) -> None:
    lab = Lab(world)
    a = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, "sn-a", device="laptop")
    info = {"node_id": "sn-b", "addresses": [{"transport": "tcp", "host": "h", "port": 1}]}
    from punchline.wire import presence

    rec = presence.make(world.bob.key, world.bob.cert, "bob", "phone", info, 1, NOW + 3600)
    lab.index.records["bob"] = {"phone": rec}
    lab.send(alice, {"t": "signal", "to": "bob", "id": 5, "body": {}})
    assert a.links == {}
    assert [e["reason"] for e in alice.of_type("signal_error")] == ["offline"]


def test_a_record_with_a_malformed_address_list_does_not_break_routing(world: World) -> None:
    from punchline.wire import presence

    lab = Lab(world, auto_index=False)
    lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, device="laptop")
    lab.send(alice, {"t": "signal", "to": "bob", "id": 1, "body": {}})
    info = {"node_id": "sn-b", "addresses": 5}
    rec = presence.make(world.bob.key, world.bob.cert, "bob", "phone", info, 1, NOW + 3600)
    lab.answer_lookups("sn-a", [rec])
    assert [e["reason"] for e in alice.of_type("signal_error")] == ["offline"]


# ------------------------------------------------------------------ timeouts, goodbyes, routes


def test_silent_sessions_are_closed_and_their_devices_forgotten(world: World) -> None:
    lab = Lab(world)
    core = lab.node(world.sn_a, SA, config=CoreConfig(session_timeout=20))
    alice = lab.client(world.alice, device="laptop", config=QUIET)  # never pings
    bob = lab.client(world.bob, device="phone")  # pings every 1.5 s
    assert set(core.by_user) == {"alice", "bob"}
    start = lab.net.now
    lab.net.advance(19)
    assert len(core.sessions) == 2
    lab.net.advance(2)
    assert [s.subject for s in core.sessions.values()] == ["bob"]
    assert set(core.by_user) == {"bob"}
    assert core.counters["sessions_closed"] == 1
    assert lab.net.now - start > 20
    # a signal to alice now finds nobody here (the index still has her old record)
    lab.send(bob, {"t": "signal", "to": "alice", "id": 1, "body": {}})
    assert [e["reason"] for e in bob.of_type("signal_error")] == ["offline"]
    assert alice.session.established  # alice has not noticed: she never pings


def test_a_pinging_client_keeps_its_session(world: World) -> None:
    lab = Lab(world)
    core = lab.node(world.sn_a, SA)
    lab.client(world.alice, device="laptop")
    lab.net.advance(90)
    assert len(core.sessions) == 1
    assert core.counters["sessions_closed"] == 0


def test_bye_closes_the_session(world: World) -> None:
    lab = Lab(world)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, device="laptop")
    lab.send(alice, {"t": "bye"})
    assert core.sessions == {}
    assert core.by_user == {}
    assert core.counters["sessions_closed"] == 1


def test_an_old_session_timing_out_leaves_the_new_session_of_the_device(world: World) -> None:
    lab = Lab(world)
    core = lab.node(world.sn_a, SA)
    lab.client(world.alice, device="laptop", config=QUIET)
    lab.net.advance(10)
    new = lab.client(world.alice, device="laptop", seq=2)  # re-attached from a new address
    lab.net.advance(15)
    assert core.counters["sessions_closed"] == 1
    (session,) = core.by_user["alice"].values()
    assert new.address is not None
    assert session.route == udp(new.address)


def test_an_authenticated_client_is_followed_to_its_new_address(world: World) -> None:
    lab = Lab(world)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, device="laptop")
    old = alice.address
    assert old is not None
    moved = ("203.0.113.9", 1234)  # the NAT gave the client a new mapping
    del lab.net.nodes[old]
    lab.net.add(moved, alice)
    alice.address = moved
    lab.net.advance(3)
    (session,) = core.sessions.values()
    assert session.route == udp(moved)


def test_a_spoofed_packet_does_not_move_a_session(world: World) -> None:
    lab = Lab(world)
    core = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, device="laptop")
    (session,) = core.sessions.values()
    route = session.route
    header = wire.sealed_header(session.channel.session_id, 10_000)
    core.receive(header + bytes(32), udp(("203.0.113.66", 6666)), lab.net.now)
    assert session.route == route
    assert session.channel.counters["forged"] == 1
    assert alice.session.established


def test_timer_after_handling_lies_ahead_with_a_silent_client(world: World) -> None:
    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW, CoreConfig(session_timeout=20))
    _, hello = hello_from(world.alice)
    core.receive(hello, udp(("192.0.2.1", 1)), NOW)
    for _ in range(200):
        due = core.next_timer()
        if math.isinf(due) or due > NOW + 19.5:
            break
        core.handle_timer(due)
        core.datagrams(due)
        assert core.next_timer() > due


def test_timer_after_handling_lies_ahead_at_the_session_timeout(world: World) -> None:
    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW, CoreConfig(session_timeout=20))
    _, hello = hello_from(world.alice)
    core.receive(hello, udp(("192.0.2.1", 1)), NOW)
    for _ in range(200):
        due = core.next_timer()
        if math.isinf(due):
            break
        core.handle_timer(due)
        core.datagrams(due)
        assert core.next_timer() > due, f"timer stays at +{due - NOW} s"
    assert core.sessions == {}


# ------------------------------------------------------------------ fuzzing client messages

json_leaf = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=6)
json_values = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8,
)
kinds = st.sampled_from(["publish", "lookup", "signal", "deliver", "bye", "ping", "x"])
messages = st.fixed_dictionaries(
    {"t": kinds},
    optional={
        "to": st.sampled_from(["bob", "alice", ""]) | json_values,
        "user": st.sampled_from(["bob", "alice"]) | json_values,
        "to_device": st.sampled_from(["phone", "laptop"]) | json_values,
        "body": json_values,
        "record": json_values,
        "id": json_values,
    },
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(messages, min_size=1, max_size=4), answer_with_bob=st.booleans())
def test_any_client_message_is_handled_without_raising(
    world: World, batch: list[dict[str, Any]], answer_with_bob: bool
) -> None:
    core = SupernodeCore(world.sn_a.identity, "sn-a", NOW)
    client, hello = hello_from(world.alice)
    route = udp(("192.0.2.1", 1))
    core.receive(hello, route, NOW)
    for data, _ in core.datagrams(NOW):
        client.receive_untrusted(wire.decode_untrusted(data), NOW)
    assert client.established
    client.send({"t": "publish", "record": record(world.alice, "laptop", "sn-a", SA)}, NOW)
    for message in batch:
        client.send(message, NOW)
    for data in client.datagrams(NOW):
        core.receive(data, route, NOW)
    bob = [record(world.bob, "phone", "sn-a", SA)] if answer_with_bob else []
    for action in core.actions():
        if isinstance(action, Lookup):
            core.lookup_done(action.ref, bob, NOW)
    core.handle_timer(NOW + 1)
    core.datagrams(NOW + 1)


def test_a_signal_queued_on_a_dead_link_comes_back_as_unreachable(world: World) -> None:
    """bob's record names sn-b, but sn-b never answers: alice hears so instead of silence."""
    lab = Lab(world)
    a = lab.node(world.sn_a, SA)
    alice = lab.client(world.alice, "sn-a", device="laptop")
    lab.index.records["bob"] = {"phone": record(world.bob, "phone", "sn-b", SB)}
    lab.send(alice, {"t": "signal", "to": "bob", "id": 5, "body": {}})
    assert alice.of_type("signal_error") == []  # handed to the link, waiting for it
    lab.net.advance(10)
    assert alice.of_type("signal_error") == [
        {"t": "signal_error", "ref": 5, "to": "bob", "reason": "unreachable"}
    ]
    assert a.links == {}
