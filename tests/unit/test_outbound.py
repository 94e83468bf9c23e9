"""OutboundSession: HELLO with back-off, WELCOME checks, queued messages, failure reasons."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from punchline.crypto import handshake
from punchline.identity.certs import Role
from punchline.session.channel import ChannelConfig, SecureChannel
from punchline.session.outbound import HELLO_ATTEMPTS, HELLO_RETRY, OutboundSession, State
from punchline.supernode.core import SupernodeCore
from punchline.wire import session as wire
from tests.unit.cores import NOW, Addr, CoreEnd, Net, Party, SessionEnd, make_party

if TYPE_CHECKING:
    from tests.unit.conftest import CA, IssueFn

CLIENT: Addr = ("192.0.2.10", 40000)
SERVER: Addr = ("198.51.100.1", 7000)
QUIET = ChannelConfig(ping_interval=None)


@dataclass(frozen=True)
class World:
    ca: CA
    alice: Party
    node: Party  # "sn-a", the supernode alice means to reach
    other_node: Party  # "sn-x", a genuine supernode with another name
    user_named_like_node: Party  # a *user* certificate whose subject is "sn-a"
    foreign_node: Party  # "sn-a" certified by a CA nobody pinned
    relay: Party
    foreign_alice: Party


@pytest.fixture(scope="module")
def world(ca: CA, issue: IssueFn, issue_other: IssueFn) -> World:
    return World(
        ca=ca,
        alice=make_party(issue, ca.cert, "alice"),
        node=make_party(issue, ca.cert, "sn-a", (Role.SUPERNODE,)),
        other_node=make_party(issue, ca.cert, "sn-x", (Role.SUPERNODE,)),
        user_named_like_node=make_party(issue, ca.cert, "sn-a"),
        foreign_node=make_party(issue_other, ca.cert, "sn-a", (Role.SUPERNODE,)),
        relay=make_party(issue, ca.cert, "relay-1", (Role.RELAY,)),
        foreign_alice=make_party(issue_other, ca.cert, "alice"),
    )


def connect(party: Party, server: str = "sn-a", now: float = NOW) -> OutboundSession:
    return OutboundSession(party.identity, server, now, config=QUIET)


def hello_of(data: bytes) -> dict[str, Any]:
    packet = wire.decode_untrusted(data)
    assert isinstance(packet, wire.Hello)
    return packet.hello


def answer(
    hello: dict[str, Any], server: Party, now: float = NOW, name: str = "sn-a"
) -> tuple[SecureChannel, wire.Welcome]:
    """Answer a HELLO by hand as `server` (which believes it is `name`)."""
    _, keys, reply = handshake.answer_untrusted(
        hello, server.key, server.cert, server.ca, "session", name, now, None
    )
    return SecureChannel(keys, now, QUIET), wire.Welcome(reply)


def hand_established(world: World, now: float = NOW) -> tuple[OutboundSession, SecureChannel]:
    session = connect(world.alice, now=now)
    (hello,) = session.datagrams(now)
    channel, welcome = answer(hello_of(hello), world.node, now)
    session.receive_untrusted(welcome, now + 0.05)
    assert session.established
    return session, channel


def carry(session: OutboundSession, server: SecureChannel, now: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for data in session.datagrams(now):
        packet = wire.decode_untrusted(data)
        assert isinstance(packet, wire.Sealed)
        out += server.receive_untrusted(packet, now)
    return out


def served(world: World, net: Net, **core_args: Any) -> SupernodeCore:
    core = SupernodeCore(world.node.identity, "sn-a", net.now, **core_args)
    net.add(SERVER, CoreEnd(core))
    return core


# ------------------------------------------------------------------ handshake


def test_hello_is_addressed_to_the_server_and_signed_for_sessions(world: World) -> None:
    session = connect(world.alice)
    assert session.state is State.CONNECTING
    assert session.next_timer() == NOW
    (data,) = session.datagrams(NOW)
    hello = hello_of(data)
    assert hello["to"] == "sn-a"
    assert hello["ts"] == NOW
    # a call-context responder refuses it: the signature names the "session" context
    with pytest.raises(handshake.HandshakeError):
        handshake.answer_untrusted(
            hello, world.node.key, world.node.cert, world.ca.cert, "call", "sn-a", NOW, None
        )


def test_attaches_to_a_supernode_core(world: World) -> None:
    net = Net()
    core = served(world, net)
    end = SessionEnd(connect(world.alice), SERVER)
    net.add(CLIENT, end)
    net.advance(1, until=lambda: end.session.established and bool(end.inbox))
    session = end.session
    assert session.state is State.ESTABLISHED
    assert session.failure == ""
    assert session.rtt == pytest.approx(2 * net.delay)
    assert session.peer is not None
    assert session.peer.info.subject == "sn-a"
    assert Role.SUPERNODE in session.peer.info.roles
    assert end.of_type("welcome") == [{"t": "welcome", "node_id": "sn-a", "reflexive": [*CLIENT]}]
    assert core.counters["sessions_opened"] == 1
    (server_side,) = core.sessions.values()
    assert server_side.subject == "alice"
    assert session.channel is not None
    assert server_side.channel.session_id == session.channel.session_id


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_attaches_over_a_lossy_path_with_one_server_session(world: World, seed: int) -> None:
    net = Net(seed=seed, loss=0.3, jitter=0.02)
    core = served(world, net)
    end = SessionEnd(connect(world.alice), SERVER)
    net.add(CLIENT, end)
    end.session.send({"t": "lookup", "user": "bob", "id": 1}, net.now)
    net.advance(10, until=lambda: end.session.state is not State.CONNECTING)
    assert end.session.established, end.session.failure
    hellos = [s for s in net.between(CLIENT, SERVER) if s.data[0] == wire.HELLO]
    assert len(hellos) >= 2  # with these seeds the first attempt was lost
    assert core.counters["sessions_opened"] == 1  # repeated HELLOs got the cached WELCOME
    assert len(core.sessions) == 1


def test_hello_is_retransmitted_with_back_off_then_fails(world: World) -> None:
    session = connect(world.alice)
    sent: list[tuple[float, bytes]] = []
    now = NOW
    for _ in range(20):
        sent += [(now, d) for d in session.datagrams(now)]
        session.handle_timer(now)
        if session.state is State.FAILED:
            break
        assert session.next_timer() > now
        now = session.next_timer()
    assert session.state is State.FAILED
    assert session.failure == "no answer from the server"
    assert len(sent) == HELLO_ATTEMPTS
    assert len({d for _, d in sent}) == 1  # the very same HELLO each time
    gaps = [round(b[0] - a[0], 6) for a, b in itertools.pairwise(sent)]
    assert gaps == [round(HELLO_RETRY * n, 6) for n in range(1, HELLO_ATTEMPTS)]
    assert now - sent[-1][0] == pytest.approx(HELLO_RETRY * HELLO_ATTEMPTS)
    assert session.next_timer() == math.inf
    assert session.datagrams(now + 100) == []
    assert not session.established


def test_no_hello_before_its_time(world: World) -> None:
    session = connect(world.alice)
    assert len(session.datagrams(NOW)) == 1
    assert session.datagrams(NOW + HELLO_RETRY - 0.01) == []
    assert len(session.datagrams(NOW + HELLO_RETRY)) == 1


def test_fails_against_a_silent_server_core(world: World) -> None:
    net = Net()
    served(world, net)
    net.blocked.add(SERVER)
    end = SessionEnd(connect(world.alice), SERVER)
    net.add(CLIENT, end)
    net.advance(30, until=lambda: end.session.state is State.FAILED)
    assert end.session.failure == "no answer from the server"
    assert len(net.between(CLIENT, SERVER)) == HELLO_ATTEMPTS


def test_rtt_is_unknown_when_the_hello_had_to_be_repeated(world: World) -> None:
    session = connect(world.alice)
    session.datagrams(NOW)  # lost
    (hello,) = session.datagrams(NOW + HELLO_RETRY)
    _, welcome = answer(hello_of(hello), world.node, NOW + HELLO_RETRY)
    session.receive_untrusted(welcome, NOW + HELLO_RETRY + 0.03)
    assert session.established
    assert session.rtt is None


def test_rtt_of_a_first_time_answer(world: World) -> None:
    session, _ = hand_established(world)
    assert session.rtt == pytest.approx(0.05)


# ------------------------------------------------------------------ queued messages


def test_messages_sent_while_connecting_are_flushed_in_order(world: World) -> None:
    session = connect(world.alice)
    session.send({"t": "publish", "n": 1}, NOW)
    session.send({"t": "bye"}, NOW, reliable=False)
    session.send({"t": "publish", "n": 2}, NOW)
    (hello,) = session.datagrams(NOW)
    server, welcome = answer(hello_of(hello), world.node)
    assert session.receive_untrusted(welcome, NOW + 0.02) == []
    got = carry(session, server, NOW + 0.02)
    assert got == [{"t": "publish", "n": 1}, {"t": "bye"}, {"t": "publish", "n": 2}]
    assert session.channel is not None
    assert session.channel.unacked == 2
    assert carry(session, server, NOW + 0.03) == []  # the queue is not sent twice


def test_after_establishing_messages_go_straight_out_both_ways(world: World) -> None:
    session, server = hand_established(world)
    session.send({"t": "lookup", "user": "bob"}, NOW + 1)
    assert carry(session, server, NOW + 1) == [{"t": "lookup", "user": "bob"}]
    server.send({"t": "lookup_result"}, NOW + 1)
    (data,) = server.datagrams(NOW + 1)
    assert session.receive_untrusted(wire.decode_untrusted(data), NOW + 1) == [
        {"t": "lookup_result"}
    ]


def test_queued_messages_reach_a_supernode_core(world: World) -> None:
    net = Net()
    core = served(world, net)
    end = SessionEnd(connect(world.alice), SERVER)
    net.add(CLIENT, end)
    end.session.send({"t": "lookup", "user": "bob", "id": 9}, net.now)
    net.advance(1)
    node_end = net.nodes[SERVER]
    assert isinstance(node_end, CoreEnd)
    assert [(a.ref, a.user) for a in node_end.lookups()] == [(1, "bob")]
    assert core.counters["malformed"] == 0


# ------------------------------------------------------------------ refusals and bad answers


def run_out(session: OutboundSession, start: float = NOW) -> None:
    """Let the HELLO attempts run out with no further answer."""
    t = start
    while session.state is State.CONNECTING and t < start + 60:
        t += 0.1
        session.datagrams(t)


def test_refused_fails_with_the_reason(world: World) -> None:
    session = connect(world.alice)
    (hello,) = session.datagrams(NOW)
    refused = wire.decode_untrusted(wire.encode_refused("not today"))
    assert session.receive_untrusted(refused, NOW + 0.01) == []
    assert not session.established  # unauthenticated: keep trying
    assert session.failure == ""
    run_out(session)
    assert session.state is State.FAILED
    assert session.failure == "refused: not today"
    assert session.next_timer() == math.inf
    assert session.datagrams(NOW + 60) == []
    # a genuine WELCOME arriving afterwards does not revive it
    _, welcome = answer(hello_of(hello), world.node)
    session.receive_untrusted(welcome, NOW + 61)
    assert session.state is State.FAILED
    assert session.channel is None


def test_a_spoofed_refusal_does_not_beat_the_genuine_welcome(world: World) -> None:
    session = connect(world.alice)
    (hello,) = session.datagrams(NOW)
    session.receive_untrusted(wire.decode_untrusted(wire.encode_refused("go away")), NOW)
    _, welcome = answer(hello_of(hello), world.node)
    session.receive_untrusted(welcome, NOW + 0.01)
    assert session.established


def test_a_core_refuses_a_client_from_another_ca(world: World) -> None:
    net = Net()
    core = served(world, net)
    end = SessionEnd(connect(world.foreign_alice), SERVER)
    net.add(CLIENT, end)
    net.advance(10, until=lambda: end.session.state is State.FAILED)
    assert end.session.state is State.FAILED
    assert end.session.failure.startswith("refused: ")
    assert "certificate" in end.session.failure
    assert core.counters["refused_hello"] == HELLO_ATTEMPTS  # each retry is refused again
    assert core.sessions == {}


def test_a_core_refuses_roles_that_do_not_attach(world: World) -> None:
    net = Net()
    core = served(world, net)
    end = SessionEnd(OutboundSession(world.relay.identity, "sn-a", NOW), SERVER)
    net.add(CLIENT, end)
    net.advance(10, until=lambda: end.session.state is State.FAILED)
    assert end.session.failure == "refused: only users and supernodes attach"
    assert core.sessions == {}


def test_a_welcome_for_another_session_fails(world: World) -> None:
    mine, theirs = connect(world.alice), connect(world.alice)
    mine.datagrams(NOW)
    (their_hello,) = theirs.datagrams(NOW)
    _, welcome = answer(hello_of(their_hello), world.node)
    assert mine.receive_untrusted(welcome, NOW + 0.01) == []
    assert not mine.established
    run_out(mine)
    assert mine.state is State.FAILED
    assert not mine.established
    assert mine.channel is None
    assert "different handshake" in mine.failure
    theirs.receive_untrusted(welcome, NOW + 0.01)
    assert theirs.established


@pytest.mark.parametrize(
    ("server", "why"),
    [
        ("other_node", "expected 'sn-a'"),  # a genuine supernode, but not the one we asked for
        ("user_named_like_node", "certificate"),  # right name, but a user certificate
        ("foreign_node", "certificate"),  # right name and role, but another CA
    ],
)
def test_a_welcome_from_the_wrong_server_fails(world: World, server: str, why: str) -> None:
    impostor: Party = getattr(world, server)
    session = connect(world.alice)
    (hello,) = session.datagrams(NOW)
    _, welcome = answer(hello_of(hello), impostor)
    session.receive_untrusted(welcome, NOW + 0.01)
    assert not session.established
    run_out(session)
    assert session.state is State.FAILED
    assert not session.established
    assert session.channel is None
    assert session.peer is None
    assert why in session.failure


def test_a_client_expecting_a_relay_refuses_a_supernode(world: World) -> None:
    session = OutboundSession(world.alice.identity, "sn-a", NOW, server_role=Role.RELAY)
    (hello,) = session.datagrams(NOW)
    _, welcome = answer(hello_of(hello), world.node)
    session.receive_untrusted(welcome, NOW)
    run_out(session)
    assert session.state is State.FAILED


@pytest.mark.parametrize("garbage", [{}, {"v": 1}, {"sig": "x" * 5000}])
def test_a_garbage_welcome_fails(world: World, garbage: dict[str, Any]) -> None:
    session = connect(world.alice)
    session.datagrams(NOW)
    session.receive_untrusted(wire.Welcome(garbage), NOW)
    run_out(session)
    assert session.state is State.FAILED
    assert session.failure != "no answer from the server"


# ------------------------------------------------------------------ once established


def test_late_refused_and_repeated_welcome_are_ignored(world: World) -> None:
    session = connect(world.alice)
    (hello,) = session.datagrams(NOW)
    server, welcome = answer(hello_of(hello), world.node)
    session.receive_untrusted(welcome, NOW)
    channel = session.channel
    session.receive_untrusted(welcome, NOW + 0.1)
    session.receive_untrusted(wire.Refused("late"), NOW + 0.1)
    assert session.established
    assert session.channel is channel
    assert session.failure == ""
    session.send({"t": "x"}, NOW + 0.2)
    assert carry(session, server, NOW + 0.2) == [{"t": "x"}]


def test_sealed_packets_of_other_sessions_are_ignored(world: World) -> None:
    session, _ = hand_established(world)
    _, stranger = hand_established(world)
    stranger.send({"t": "signal"}, NOW)
    (data,) = stranger.datagrams(NOW)
    packet = wire.decode_untrusted(data)
    assert session.receive_untrusted(packet, NOW) == []
    assert session.channel is not None
    assert session.channel.counters["forged"] == 0  # dropped by session id, before opening


def test_sealed_packets_before_the_welcome_are_ignored(world: World) -> None:
    session = connect(world.alice)
    session.datagrams(NOW)
    packet = wire.Sealed(b"\x00" * 8, 1, wire.sealed_header(b"\x00" * 8, 1), bytes(16))
    assert session.receive_untrusted(packet, NOW) == []
    assert session.state is State.CONNECTING


def test_fails_when_the_server_stops_answering(world: World) -> None:
    net = Net()
    served(world, net)
    end = SessionEnd(OutboundSession(world.alice.identity, "sn-a", NOW), SERVER)  # pings
    net.add(CLIENT, end)
    net.advance(10)
    assert end.session.established
    net.blocked.add(SERVER)
    silent = net.now
    net.advance(10, until=lambda: end.session.state is State.FAILED)
    assert end.session.failure == "the server stopped answering"
    assert net.now - silent <= 4.05  # ping interval + dead_after (+ one delay)


def test_stays_established_while_the_server_answers(world: World) -> None:
    net = Net()
    served(world, net)
    end = SessionEnd(OutboundSession(world.alice.identity, "sn-a", NOW), SERVER)
    net.add(CLIENT, end)
    net.advance(60, until=lambda: end.session.state is State.FAILED)
    assert end.session.established
