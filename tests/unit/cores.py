"""Wiring sans-I/O cores back to back in memory: identities, a seeded network, a fake clock.

`Net` is a tiny discrete-event network: endpoints are registered under an address, whatever
they output is carried (after `delay` plus up to `jitter` seconds, so packets reorder) to the
endpoint at the destination address, subject to seeded loss and duplication. Time only moves
when `advance` jumps it to the next delivery or timer. If an endpoint keeps asking for a timer
at or before the current time, the clock creeps on by a microsecond per round (as a real clock
would under the asyncio driver) and `stalls` counts it; after 100 such rounds `advance` fails
with "busy loop" instead of spinning forever.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from punchline.crypto.handshake import SessionKeys
from punchline.identity import keys
from punchline.identity.certs import Role
from punchline.session.channel import SecureChannel
from punchline.session.outbound import Identity, OutboundSession
from punchline.supernode.core import Action, Lookup, Publish, Route, SupernodeCore
from punchline.wire import presence
from punchline.wire import session as wire

if TYPE_CHECKING:
    from tests.unit.conftest import IssueFn

NOW = 1_700_000_000.0
DAY = 86_400.0
Addr = tuple[str, int]

# ------------------------------------------------------------------ identities


@dataclass(frozen=True)
class Party:
    """A certified identity: a user or a node."""

    name: str
    key: Ed25519PrivateKey
    cert: x509.Certificate
    ca: x509.Certificate

    @property
    def identity(self) -> Identity:
        return Identity(self.key, self.cert, self.ca)


def make_party(
    issue: IssueFn,
    ca: x509.Certificate,
    name: str,
    roles: Iterable[Role] = (Role.USER,),
    now: float = NOW,
    lifetime: float = DAY,
) -> Party:
    key = keys.generate()
    cert = issue(subject=name, roles=tuple(roles), public_key=key.public_key(), now=now,
                 lifetime=lifetime)  # fmt: skip
    return Party(name, key, cert, ca)


def direct_keys(seed: int = 0) -> tuple[SessionKeys, SessionKeys]:
    """A matching pair of session keys without a handshake (initiator's, responder's)."""
    r = random.Random(seed)
    i2r, r2i, sid = r.randbytes(32), r.randbytes(32), r.randbytes(8)
    return SessionKeys(i2r, r2i, sid), SessionKeys(r2i, i2r, sid)


def udp(addr: Addr) -> Route:
    return ("udp", addr)


def node_info(node_id: str, addr: Addr) -> dict[str, Any]:
    """The `supernode` field of a presence record naming `node_id` reachable over UDP at addr."""
    return {"node_id": node_id, "addresses": [{"transport": "udp", "host": addr[0],
                                               "port": addr[1]}]}  # fmt: skip


def record(
    party: Party,
    device: str,
    node_id: str,
    addr: Addr,
    seq: int = 1,
    expires: float = NOW + 3600,
) -> dict[str, str]:
    """A presence record `party` signs for itself on `device`, naming supernode `node_id`."""
    return presence.make(party.key, party.cert, party.name, device, node_info(node_id, addr),
                         seq, expires)  # fmt: skip


# ------------------------------------------------------------------ endpoints


class Endpoint(Protocol):
    def deliver(self, data: bytes, source: Addr, now: float) -> None: ...

    def output(self, now: float) -> list[tuple[bytes, Addr]]: ...

    def next_timer(self) -> float: ...

    def handle_timer(self, now: float) -> None: ...


class ChannelEnd:
    """A `SecureChannel` talking to one peer address; what it delivers lands in `inbox`."""

    def __init__(self, channel: SecureChannel, peer: Addr) -> None:
        self.channel = channel
        self.peer = peer
        self.inbox: list[dict[str, Any]] = []

    def deliver(self, data: bytes, source: Addr, now: float) -> None:
        packet = wire.decode_untrusted(data)
        assert isinstance(packet, wire.Sealed)
        self.inbox += self.channel.receive_untrusted(packet, now)

    def output(self, now: float) -> list[tuple[bytes, Addr]]:
        return [(d, self.peer) for d in self.channel.datagrams(now)]

    def next_timer(self) -> float:
        return self.channel.next_timer()

    def handle_timer(self, now: float) -> None:
        self.channel.handle_timer(now)


class SessionEnd:
    """An `OutboundSession` (a client) talking to its server's address."""

    def __init__(self, session: OutboundSession, server: Addr, address: Addr | None = None) -> None:
        self.session = session
        self.server = server
        self.address = address  # where the client sits, if the test needs to know
        self.inbox: list[dict[str, Any]] = []

    def deliver(self, data: bytes, source: Addr, now: float) -> None:
        if source != self.server:
            return
        try:
            packet = wire.decode_untrusted(data)
        except wire.SessionPacketError:
            return
        self.inbox += self.session.receive_untrusted(packet, now)

    def output(self, now: float) -> list[tuple[bytes, Addr]]:
        return [(d, self.server) for d in self.session.datagrams(now)]

    def next_timer(self) -> float:
        return self.session.next_timer()

    def handle_timer(self, now: float) -> None:
        self.session.handle_timer(now)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.inbox if m.get("t") == kind]


@dataclass
class Index:
    """The global index, reduced to a dict: user -> device -> latest record."""

    records: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def lookup(self, user: str) -> list[dict[str, Any]]:
        return list(self.records.get(user, {}).values())


class CoreEnd:
    """A `SupernodeCore` on UDP. With an `index`, actions are run at once; else kept in
    `actions` for the test to answer by hand (`lookup_done`)."""

    def __init__(self, core: SupernodeCore, index: Index | None = None) -> None:
        self.core = core
        self.index = index
        self.actions: list[Action] = []

    def deliver(self, data: bytes, source: Addr, now: float) -> None:
        self.core.receive(data, udp(source), now)

    def output(self, now: float) -> list[tuple[bytes, Addr]]:
        for action in self.core.actions():
            if self.index is None:
                self.actions.append(action)
            elif isinstance(action, Publish):
                self.index.records.setdefault(action.user, {})[action.device] = action.record
            elif isinstance(action, Lookup):
                self.core.lookup_done(action.ref, self.index.lookup(action.user), now)
        out = []
        for data, route in self.core.datagrams(now):
            assert route[0] == "udp", route
            out.append((data, route[1]))
        return out

    def next_timer(self) -> float:
        return self.core.next_timer()

    def handle_timer(self, now: float) -> None:
        self.core.handle_timer(now)

    def lookups(self) -> list[Lookup]:
        return [a for a in self.actions if isinstance(a, Lookup)]

    def publishes(self) -> list[Publish]:
        return [a for a in self.actions if isinstance(a, Publish)]


# ------------------------------------------------------------------ the network


@dataclass(frozen=True)
class Sent:
    time: float
    data: bytes
    source: Addr
    destination: Addr


Tamper = Callable[[bytes, Addr, Addr], bytes | None]


class Net:
    """A seeded in-memory datagram network with a fake clock."""

    def __init__(
        self,
        now: float = NOW,
        seed: int = 0,
        loss: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.01,
        jitter: float = 0.0,
    ) -> None:
        self.now = now
        self.rng = random.Random(seed)
        self.loss, self.duplicate, self.delay, self.jitter = loss, duplicate, delay, jitter
        self.nodes: dict[Addr, Endpoint] = {}
        self.blocked: set[Addr] = set()  # everything to or from these addresses is dropped
        self.tamper: Tamper | None = None  # may rewrite or (returning None) drop a packet
        self.sent: list[Sent] = []  # every packet offered to the network, even dropped ones
        self.creep = 1e-6  # how far the clock moves when a timer stays due
        self.stalls = 0  # how often it had to
        self._flight: list[tuple[float, int, bytes, Addr, Addr]] = []
        self._order = itertools.count()

    def add(self, addr: Addr, endpoint: Endpoint) -> None:
        self.nodes[addr] = endpoint

    def send(self, data: bytes, source: Addr, destination: Addr) -> None:
        """Offer one packet to the network, as if `source` had sent it now."""
        self.sent.append(Sent(self.now, data, source, destination))
        if source in self.blocked or destination in self.blocked:
            return
        if self.tamper is not None:
            changed = self.tamper(data, source, destination)
            if changed is None:
                return
            data = changed
        if self.rng.random() < self.loss:
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            due = self.now + self.delay + self.rng.random() * self.jitter
            heapq.heappush(self._flight, (due, next(self._order), data, source, destination))

    def flush(self) -> None:
        for addr, node in list(self.nodes.items()):
            for data, destination in node.output(self.now):
                self.send(data, addr, destination)

    def next_event(self) -> float:
        times = [node.next_timer() for node in self.nodes.values()]
        if self._flight:
            times.append(self._flight[0][0])
        return min(times, default=float("inf"))

    def advance(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Run for `seconds` of fake time (or until `until()` holds), then stop there."""
        end = self.now + seconds
        self.flush()
        spins = 0
        while until is None or not until():
            due = self.next_event()
            if due > end:
                break
            if due <= self.now:
                spins += 1
                if spins > 100:
                    raise AssertionError(f"busy loop: a timer stays due at {self.now}")
                if spins > 3:  # as a real clock would, creep on; count it
                    self.now += self.creep
                    self.stalls += 1
            else:
                spins = 0
                self.now = due
            self._step()
        else:
            return
        self.now = end

    def _step(self) -> None:
        while self._flight and self._flight[0][0] <= self.now:
            _, _, data, source, destination = heapq.heappop(self._flight)
            node = self.nodes.get(destination)
            if node is not None:
                node.deliver(data, source, self.now)
        for node in list(self.nodes.values()):
            if node.next_timer() <= self.now:
                node.handle_timer(self.now)
        self.flush()

    def settle(self, limit: float = 10.0) -> None:
        """Run until nothing is in flight (timers may still be pending), at most `limit` s."""
        self.advance(limit, until=lambda: not self._flight)

    def between(self, source: Addr, destination: Addr) -> list[Sent]:
        return [s for s in self.sent if s.source == source and s.destination == destination]
