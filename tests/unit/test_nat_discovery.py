"""The NAT discovery cores against the supernodes' responders, through a simulated NAT, with a
fake clock: every RFC 4787 behaviour is told apart, and the responder stays amplification-safe.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest

from punchline.nat.discovery import (
    ADM,
    APDM,
    ASSUMED_LIFETIME,
    EIM,
    Discovery,
    DiscoveryConfig,
    LifetimeProbe,
    NatReport,
    classify_allocation,
    discovery_sockets,
)
from punchline.nat.stun_server import (
    PAD,
    RESPONSE_DELAY,
    DiscoveryResponder,
    DiscoveryResponderConfig,
    Outgoing,
    RateLimitPolicy,
)
from punchline.wire import stun
from punchline.wire.stun import Attr, Class, Message, Method

Address = tuple[str, int]
A, B = ("198.51.100.1", 3478), ("198.51.100.2", 3478)
LAN_IP, WAN_IP = "10.0.0.2", "203.0.113.7"


@dataclass
class Nat:
    """A NAT of RFC 4787's kinds in a few lines: mappings keyed by what `mapping` says,
    inbound admitted by what `filtering` says, ports allocated per `allocation`."""

    mapping: str
    filtering: str
    allocation: str = "preserving"
    delta: int = 1
    hairpin: bool = False
    lifetime: float = 1e9
    public_ip: str = WAN_IP
    mappings: dict[tuple[object, ...], int] = field(default_factory=dict)
    owner: dict[int, int] = field(default_factory=dict)  # public port -> local port
    contacted: dict[int, set[Address]] = field(default_factory=dict)
    last_used: dict[int, float] = field(default_factory=dict)
    next_port: int = 20000
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def outbound(self, local_port: int, dest: Address, now: float) -> Address:
        key: tuple[object, ...] = (local_port,)
        if self.mapping == ADM:
            key = (local_port, dest[0])
        elif self.mapping == APDM:
            key = (local_port, dest)
        port = self.mappings.get(key)
        if port is None or now - self.last_used[port] > self.lifetime:
            port = self._allocate(local_port)
            self.mappings[key] = port
            self.owner[port] = local_port
            self.contacted[port] = set()
        self.contacted[port].add(dest)
        self.last_used[port] = now
        return (self.public_ip, port)

    def _allocate(self, local_port: int) -> int:
        if self.allocation == "preserving" and local_port not in self.owner:
            return local_port
        if self.allocation == "sequential":
            self.next_port += self.delta
            return self.next_port
        return self.rng.randrange(1024, 65536)

    def inbound(self, port: int, source: Address, now: float) -> int | None:
        """The local port a datagram to public `port` from `source` reaches, or None."""
        if port not in self.owner or now - self.last_used[port] > self.lifetime:
            return None
        contacted = self.contacted[port]
        if self.filtering == ADM and source[0] not in {c[0] for c in contacted}:
            return None
        if self.filtering == APDM and source not in contacted:
            return None
        self.last_used[port] = now
        return self.owner[port]


class Net:
    """Two supernodes' responders (peers of each other), a NAT and the client's sockets."""

    def __init__(
        self, nat: Nat | None, peers: bool = True, responder: type[DiscoveryResponder] | None = None
    ) -> None:
        self.nat = nat
        kind = responder or DiscoveryResponder
        self.servers = {A: kind(), B: kind()}
        for address, server in self.servers.items():
            server.primary, server.alternate = address, (address[0], address[1] + 1)
            server.peers = [s for s in self.servers if s != address] if peers else []
        self.now = 1000.0
        self.local: dict[str, int] = {}
        self.by_port: dict[int, str] = {}

    def bind(self, names: list[str]) -> dict[str, int]:
        for n, name in enumerate(names):
            self.local[name] = 40000 + 7 * n
            self.by_port[40000 + 7 * n] = name
        return dict(self.local)

    def run(self, core: Discovery | LifetimeProbe, until: float = 30.0) -> None:
        end = self.now + until
        while self.now < end:
            core.handle_timer(self.now)
            for responder in self.servers.values():
                for item in responder.handle_timer(self.now):
                    self._deliver(core, item, responder)
            while out := core.datagrams(self.now):  # answers may start further tests
                for sock, data, to in out:
                    self._client_send(core, sock, data, to)
            core.handle_timer(self.now)
            if core.done:
                return
            self.now = min(core.next_timer(), self._server_timer(), end)

    def _server_timer(self) -> float:
        return min(r.next_timer() for r in self.servers.values())

    def _client_send(self, core: Discovery | LifetimeProbe, sock: str, data: bytes,
                     to: Address) -> None:  # fmt: skip
        port = self.local[sock]
        source = (LAN_IP, port) if self.nat is None else self.nat.outbound(port, to, self.now)
        if self.nat is not None and to[0] == self.nat.public_ip:  # towards ourselves
            local = self.nat.owner.get(to[1])  # hairpinned: the NAT's filter is not asked
            if self.nat.hairpin and local is not None:
                core.receive(self.by_port[local], data, source, self.now)
            return
        if to[0] == LAN_IP and self.nat is None:
            core.receive(self.by_port[to[1]], data, source, self.now)
            return
        self._to_server(core, data, source, to)

    def _to_server(self, core: Discovery | LifetimeProbe, data: bytes, source: Address,
                   to: Address) -> None:  # fmt: skip
        primary = (to[0], 3478)
        responder = self.servers[primary]
        arrival = "primary" if to == primary else "alternate"
        for item in responder.handle(data, source, arrival, self.now):
            self._deliver(core, item, responder)

    def _deliver(self, core: Discovery | LifetimeProbe, item: Outgoing,
                 responder: DiscoveryResponder) -> None:  # fmt: skip
        origin = responder.alternate if item.via == "alternate" else responder.primary
        assert origin is not None
        if item.to in self.servers:  # a forward to the peer
            for out in self.servers[item.to].handle(item.data, origin, "primary", self.now):
                self._deliver(core, out, self.servers[item.to])
            return
        if self.nat is None:
            core.receive(self.by_port[item.to[1]], item.data, origin, self.now)
            return
        local = self.nat.inbound(item.to[1], origin, self.now)
        if local is not None:
            core.receive(self.by_port[local], item.data, origin, self.now)


class PlainResponder(DiscoveryResponder):
    """A server that knows nothing of our private attributes: plain Binding only."""

    def handle(self, data: bytes, source: Address, arrived: str, now: float) -> list[Outgoing]:
        reply = self.binding.handle_untrusted(data, source, self.primary or A)
        return [] if reply is None else [Outgoing(reply, source, arrived)]


def _discover(nat: Nat | None, peers: bool = True) -> NatReport:
    net = Net(nat, peers)
    config = DiscoveryConfig()
    ports = net.bind(discovery_sockets(config, 2))
    core = Discovery([A, B], ports, [LAN_IP, "127.0.0.1"], net.now, config)
    net.run(core)
    assert core.done
    return core.report(net.now)


KINDS = {
    "full-cone": Nat(EIM, EIM),
    "restricted-cone": Nat(EIM, ADM),
    "port-restricted": Nat(EIM, APDM),
    "address-dependent mapping": Nat(ADM, APDM),
    "symmetric": Nat(APDM, APDM, "random"),
    "symmetric-seq": Nat(APDM, APDM, "sequential", delta=1),
    "symmetric-seq by 2": Nat(APDM, APDM, "sequential", delta=2),
    "symmetric, falling": Nat(APDM, APDM, "sequential", delta=-4),
}
WANTED = {
    "full-cone": (EIM, EIM, "preserving", None),
    "restricted-cone": (EIM, ADM, "preserving", None),
    "port-restricted": (EIM, APDM, "preserving", None),
    "address-dependent mapping": (ADM, APDM, "preserving", None),
    "symmetric": (APDM, APDM, "random", None),
    "symmetric-seq": (APDM, APDM, "sequential", 1),
    "symmetric-seq by 2": (APDM, APDM, "sequential", 2),
    "symmetric, falling": (APDM, APDM, "sequential", -4),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_nat_kind_is_classified(kind: str) -> None:
    report = _discover(KINDS[kind])
    assert (report.mapping, report.filtering, report.allocation, report.delta) == WANTED[kind]
    assert report.udp is True
    assert report.behind_nat is True
    assert report.public is not None
    assert report.public[0] == WAN_IP
    assert report.hairpinning is False
    assert report.mapping_lifetime_s == ASSUMED_LIFETIME
    assert report.lifetime_measured is False
    assert report.duration_s <= DiscoveryConfig().timeout + 0.5
    assert report.as_json()["public"] == list(report.public)


def test_hairpinning_nat() -> None:
    report = _discover(Nat(EIM, APDM, hairpin=True))
    assert report.hairpinning is True


def test_no_nat() -> None:
    report = _discover(None)
    assert (report.mapping, report.filtering, report.allocation) == (EIM, EIM, "preserving")
    assert report.behind_nat is False
    assert report.hairpinning is None


def test_without_peers_filtering_is_an_upper_bound() -> None:
    """No supernode can answer from another IP: a full cone looks address-dependent (noted)."""
    report = _discover(Nat(EIM, EIM), peers=False)
    assert report.filtering == ADM
    assert any("another IP" in note for note in report.notes)


def test_silence_means_no_udp() -> None:
    net = Net(Nat(EIM, EIM))
    net.servers.clear()  # nobody answers
    config = DiscoveryConfig()
    ports = net.bind(discovery_sockets(config, 2))
    core = Discovery([A, B], ports, [LAN_IP], net.now, config)
    clock = net.now
    while not core.done:
        core.datagrams(clock)
        core.handle_timer(clock)
        clock = core.next_timer() if core.next_timer() != float("inf") else clock + 1
    report = core.report(clock)
    assert report.udp is False
    assert (report.mapping, report.allocation, report.public) == (None, None, None)
    assert report.as_json()["udp"] is False
    assert report.duration_s == pytest.approx(config.timeout)


def test_allocation_tolerates_a_little_noise() -> None:
    steady = [(5000 + n, 20000 + n) for n in range(6)]
    assert classify_allocation(steady) == ("sequential", 1)
    noisy = [*steady[:3], (5003, 20004), (5004, 20005), (5005, 20006)]  # another host took one
    assert classify_allocation(noisy) == ("sequential", 1)
    assert classify_allocation([(p, p) for p in range(5000, 5006)]) == ("preserving", None)
    rng = random.Random(3)
    assert classify_allocation([(p, rng.randrange(1024, 65536)) for p in range(6)])[0] == "random"
    assert classify_allocation([(5000, 20000 + 100 * n) for n in range(6)]) == ("random", None)
    assert classify_allocation([(5000, 20000)]) == (None, None)


# ------------------------------------------------------------------ lifetime


@pytest.mark.parametrize(("lifetime", "bounds"), [(45.0, (30.0, 60.0)), (1e9, (60.0, None)),
                                                  (10.0, (None, 15.0))])  # fmt: skip
def test_lifetime_probe_brackets_the_mapping_lifetime(
    lifetime: float, bounds: tuple[float | None, float | None]
) -> None:
    net = Net(Nat(EIM, APDM, lifetime=lifetime))
    waits = (15.0, 30.0, 60.0)
    net.bind(LifetimeProbe.sockets(waits))
    probe = LifetimeProbe(A, waits, net.now)
    net.run(probe, until=100)
    assert probe.done
    assert probe.bounds() == bounds
    report = NatReport(True).with_lifetime(*probe.bounds())
    assert report.lifetime_measured is True
    assert report.mapping_lifetime_s == bounds[0]


def test_lifetime_probe_with_a_server_that_ignores_the_delay() -> None:
    """RESPONSE-DELAY is comprehension-optional: a plain server answers once; nothing is
    concluded from the missing second answer."""
    net = Net(Nat(EIM, APDM), responder=PlainResponder)
    net.bind(LifetimeProbe.sockets((15.0,)))
    probe = LifetimeProbe(A, (15.0,), net.now)
    net.run(probe, until=100)
    assert probe.done
    assert probe.bounds() == (None, None)


# ------------------------------------------------------------------ the responder


def _request(*attributes: tuple[int, bytes], pad: int = 0) -> bytes:
    attrs = [*attributes, *([(PAD, bytes(pad))] if pad else [])]
    return stun.encode(Message(Method.BINDING, Class.REQUEST, bytes(12), tuple(attrs)))


SOURCE = ("203.0.113.7", 40000)


def _responder(per_source: RateLimitPolicy | None = None) -> DiscoveryResponder:
    config = DiscoveryResponderConfig()
    if per_source is not None:
        config = DiscoveryResponderConfig(per_source=per_source)
    responder = DiscoveryResponder(config=config)
    responder.primary, responder.alternate = A, (A[0], 3479)
    responder.peers = [B]
    return responder


def test_change_port_is_answered_from_the_alternate_socket() -> None:
    responder = _responder()
    change = (Attr.CHANGE_REQUEST, stun.encode_change_request(False, True))
    (out,) = responder.handle(_request(change, pad=100), SOURCE, "primary", 0.0)
    assert (out.via, out.to) == ("alternate", SOURCE)
    answer = stun.decode_untrusted(out.data)
    assert stun.mapped_address_untrusted(answer) == SOURCE
    origin = stun.decode_address_untrusted(answer.get(Attr.RESPONSE_ORIGIN) or b"")
    assert origin == (A[0], 3479)
    assert responder.counters["changed_port"] == 1


def test_never_more_bytes_to_an_unverified_address_than_came_in() -> None:
    responder = _responder()
    for flags in ((False, True), (True, True), (True, False)):
        change = (Attr.CHANGE_REQUEST, stun.encode_change_request(*flags))
        assert responder.handle(_request(change), SOURCE, "primary", 0.0) == []  # unpadded
    delay = (RESPONSE_DELAY, stun.encode_uint32(30))
    assert responder.handle(_request(delay, pad=40), SOURCE, "primary", 0.0) == []
    assert responder.counters["unpadded"] == 4
    for flags in ((False, True), (True, True)):
        change = (Attr.CHANGE_REQUEST, stun.encode_change_request(*flags))
        request = _request(change, pad=100)
        (out,) = responder.handle(request, SOURCE, "primary", 0.0)
        assert len(out.data) <= len(request)


def test_change_ip_asks_a_peer_which_answers_from_its_own_address() -> None:
    responder, peer = _responder(), DiscoveryResponder()
    peer.primary, peer.alternate = B, (B[0], 3479)
    change = (Attr.CHANGE_REQUEST, stun.encode_change_request(True, True))
    request = _request(change, pad=100)
    (forward,) = responder.handle(request, SOURCE, "primary", 0.0)
    assert (forward.to, forward.via) == (B, "primary")
    (probe,) = peer.handle(forward.data, A, "primary", 0.0)
    assert (probe.to, probe.via) == (SOURCE, "alternate")  # change-port as well
    assert len(probe.data) <= len(forward.data)
    answer = stun.decode_untrusted(probe.data)
    assert answer.transaction_id == bytes(12)
    assert stun.mapped_address_untrusted(answer) == SOURCE
    assert peer.counters["changed_ip"] == 1
    assert peer.handle(forward.data, A, "alternate", 0.0) == []  # forwards come to primary
    assert peer.counters["bad_forward"] == 1


def test_what_cannot_be_served_is_refused_with_420() -> None:
    lonely = _responder()
    lonely.peers = []
    change_ip = (Attr.CHANGE_REQUEST, stun.encode_change_request(True, False))
    (out,) = lonely.handle(_request(change_ip, pad=100), SOURCE, "primary", 0.0)
    assert stun.decode_untrusted(out.data).cls == Class.ERROR
    change_port = (Attr.CHANGE_REQUEST, stun.encode_change_request(False, True))
    (out,) = lonely.handle(_request(change_port, pad=100), SOURCE, "stream", 0.0)
    assert (out.via, stun.decode_untrusted(out.data).cls) == ("stream", Class.ERROR)
    assert lonely.counters["refused"] == 2


def test_plain_requests_with_change_request_learn_the_alternate_port() -> None:
    responder = _responder()
    none = (Attr.CHANGE_REQUEST, stun.encode_change_request(False, False))
    (out,) = responder.handle(_request(none), SOURCE, "primary", 0.0)
    assert out.via == "primary"
    from punchline.nat.stun_server import ALTERNATE_PORT

    value = stun.decode_untrusted(out.data).get(ALTERNATE_PORT) or b""
    assert stun.decode_response_port_untrusted(value) == 3479
    plain = responder.handle(_request(), SOURCE, "primary", 0.0)  # BindingResponder's
    assert len(plain) == 1
    assert responder.binding.counters["answered"] == 2


def test_change_answers_are_rate_limited_per_source() -> None:
    responder = _responder(per_source=RateLimitPolicy(rate=1.0, burst=3.0))
    change = (Attr.CHANGE_REQUEST, stun.encode_change_request(False, True))
    sent = [len(responder.handle(_request(change, pad=100), SOURCE, "primary", 0.0))
            for _ in range(10)]  # fmt: skip
    assert sum(sent) == 3
    assert responder.counters["rate_limited"] == 7
    other = ("192.0.2.9", 1)
    assert responder.handle(_request(change, pad=100), other, "primary", 0.0) != []
    assert responder.handle(_request(change, pad=100), SOURCE, "primary", 2.0) != []


def test_delayed_answers_are_bounded_and_deduplicated() -> None:
    responder = _responder()
    tids = (i.to_bytes(12, "big") for i in itertools.count(1))
    delay = (RESPONSE_DELAY, stun.encode_uint32(10))

    def ask(tid: bytes, source: Address = SOURCE) -> list[Outgoing]:
        msg = Message(Method.BINDING, Class.REQUEST, tid, (delay, (PAD, bytes(120))))
        return responder.handle(stun.encode(msg), source, "primary", 0.0)

    first = next(tids)
    assert len(ask(first)) == 1
    assert len(ask(first)) == 1  # a retransmission: answered, not scheduled twice
    for _ in range(20):
        ask(next(tids))
    assert responder.counters["delayed"] == responder.config.max_delays_per_source
    assert responder.counters["delay_full"] == 20 + 1 - responder.config.max_delays_per_source
    assert responder.next_timer() == 10.0
    assert responder.handle_timer(9.9) == []
    due = responder.handle_timer(10.0)
    assert len(due) == responder.config.max_delays_per_source
    assert {o.to for o in due} == {SOURCE}
    assert responder.next_timer() == float("inf")


def test_malformed_input_is_dropped_and_counted() -> None:
    responder = _responder()
    assert responder.handle(b"\x00\x01junk", SOURCE, "primary", 0.0) == []
    assert responder.binding.counters["malformed"] == 1
    bad = Message(Method.BINDING, Class.INDICATION, bytes(12), ((Attr.XOR_PEER_ADDRESS, b"x"),))
    assert responder.handle(stun.encode(bad), B, "primary", 0.0) == []
    assert responder.counters["bad_forward"] == 1
    broken = (Attr.CHANGE_REQUEST, b"\x00")
    (out,) = responder.handle(_request(broken, pad=100), SOURCE, "primary", 0.0)
    assert stun.decode_untrusted(out.data).cls == Class.ERROR
