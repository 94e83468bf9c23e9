"""NAT behaviour discovery (RFC 4787 vocabulary, RFC 5780 tests) as sans-I/O cores.

Why: the connectivity engine chooses how to reach a peer from what our NAT does. Endpoint-
independent mapping means the address a supernode saw is the one a peer will see; a symmetric
NAT that allocates ports in sequence can be predicted (`delta`); a random one calls for
birthday probing; the filtering tells whether a peer's packets get in before we sent to it;
the mapping lifetime sets the keep-alive interval.

`Discovery` runs the tests over several local UDP sockets that its adapter opens (names from
`discovery_sockets`), against two supernodes (`a`, `b`, different IPs when possible):

- mapping (§4.3): the "map" socket asks A, B and A's alternate port; equal answers mean
  endpoint-independent, equal only towards A's two ports address-dependent, else
  address-and-port-dependent;
- filtering (§4.4): each "filter:N" socket talks to one supernode only, then asks it for an
  answer from another IP and port (the supernode gets a peer to send it) and from another
  port; what arrives tells endpoint-independent / address-dependent /
  address-and-port-dependent;
- allocation: "alloc:N" sockets, opened one after the other, each map a fresh port towards A
  at once: mapped = local port is "preserving", a constant difference "sequential" (`delta`),
  else "random";
- hairpinning: the "hairpin" socket sends to the "map" socket's public address.

`LifetimeProbe` measures how long an idle mapping lives: each "life:N" socket asks A to answer
again after N seconds (RESPONSE-DELAY); the second answer only gets in while the mapping holds.

The words are those of `lab.nat_types`, so lab verification compares them directly.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from punchline.nat.stun_server import ALTERNATE_PORT, PAD, RESPONSE_DELAY
from punchline.wire.stun import (
    Attr,
    Class,
    Message,
    Method,
    StunError,
    decode_error_code_untrusted,
    decode_response_port_untrusted,
    decode_untrusted,
    encode,
    encode_change_request,
    encode_uint32,
    is_stun,
    mapped_address_untrusted,
    new_transaction_id,
)

Address = tuple[str, int]

EIM = "endpoint-independent"
ADM = "address-dependent"
APDM = "address-and-port-dependent"
ORDER = (EIM, ADM, APDM)

MAX_DELTA = 16
"""Largest port step called "sequential" (as `lab.verify` counts it); beyond it prediction
would need too many guesses to beat random allocation."""

ASSUMED_LIFETIME = 30.0
"""Idle seconds a UDP mapping is assumed to live until measured: RFC 4787 REQ-5 asks for two
minutes, but many home routers and carrier NATs drop idle UDP after 30 s."""

PAD_TO = 180
"""Bytes of a request that asks for answers from elsewhere or later: servers send no more than
they received to an address that did not ask them (see `nat.stun_server`)."""


@dataclass(frozen=True)
class DiscoveryConfig:
    # when each request is sent again after the first (seconds); silence after `timeout`
    # means no answer will come
    retransmits: tuple[float, ...] = (0.25, 0.6, 1.0, 1.5)
    timeout: float = 2.0
    alloc_sockets: int = 6


@dataclass(frozen=True)
class NatReport:
    """What discovery found; `as_json()` is the shape `status --json` and `netcheck` show."""

    udp: bool
    mapping: str | None = None
    filtering: str | None = None
    allocation: str | None = None  # "preserving" | "sequential" | "random"
    delta: int | None = None  # the port step of a sequential allocation
    hairpinning: bool | None = None  # None: no NAT in the way, or not measurable
    mapping_lifetime_s: float | None = ASSUMED_LIFETIME
    lifetime_measured: bool = False
    mapping_lifetime_max_s: float | None = None  # a measured upper bound, when one expired
    public: Address | None = None
    behind_nat: bool | None = None
    samples: tuple[tuple[int, int], ...] = ()  # (local port, mapped port) of the alloc sockets
    servers: tuple[Address, ...] = ()
    notes: tuple[str, ...] = ()
    measured_at: float = 0.0
    duration_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "mapping": self.mapping,
            "filtering": self.filtering,
            "allocation": self.allocation,
            "delta": self.delta,
            "hairpinning": self.hairpinning,
            "mapping_lifetime_s": self.mapping_lifetime_s,
            "lifetime_measured": self.lifetime_measured,
            "mapping_lifetime_max_s": self.mapping_lifetime_max_s,
            "public": None if self.public is None else list(self.public),
            "udp": self.udp,
            "behind_nat": self.behind_nat,
            "samples": [list(s) for s in self.samples],
            "servers": [list(s) for s in self.servers],
            "notes": list(self.notes),
            "measured_at": self.measured_at,
            "duration_s": self.duration_s,
        }

    def with_lifetime(self, lower: float | None, upper: float | None) -> NatReport:
        """This report with a measured lifetime (bounds from `LifetimeProbe.bounds`)."""
        if lower is None and upper is None:
            return self
        return dataclasses.replace(
            self, mapping_lifetime_s=lower, lifetime_measured=True, mapping_lifetime_max_s=upper
        )


def discovery_sockets(config: DiscoveryConfig, servers: int) -> list[str]:
    """Names of the local UDP sockets `Discovery` needs, in the order to open them."""
    alloc = [f"alloc:{n}" for n in range(config.alloc_sockets)]
    return [*alloc, "map", *(f"filter:{n}" for n in range(min(servers, 2))), "hairpin"]


# ------------------------------------------------------------------ transactions


@dataclass
class _Tx:
    """One request: sent again on schedule until answered, refused or timed out."""

    purpose: str
    sock: str
    to: Address
    data: bytes
    started: float
    tries: int = 0
    sent_at: float = 0.0  # the latest transmission, for the round-trip time
    answer: Message | None = None
    answered_at: float | None = None
    error: int | None = None
    timed_out: bool = False

    @property
    def finished(self) -> bool:
        return self.answer is not None or self.error is not None or self.timed_out


def _request(tid: bytes, *attributes: tuple[int, bytes], pad: bool = False) -> bytes:
    attrs = list(attributes)
    if pad:
        bare = len(encode(Message(Method.BINDING, Class.REQUEST, tid, tuple(attrs))))
        attrs.append((PAD, bytes(max(0, PAD_TO - bare - 4))))
    return encode(Message(Method.BINDING, Class.REQUEST, tid, tuple(attrs)))


class _Transactions:
    """Retransmission and matching of STUN transactions shared by both cores."""

    def __init__(self, config: DiscoveryConfig, randbytes: Callable[[int], bytes]) -> None:
        self.config = config
        self.randbytes = randbytes
        self.txs: dict[bytes, _Tx] = {}
        self._out: list[tuple[str, bytes, Address]] = []
        self.stray = 0

    def start(
        self,
        purpose: str,
        sock: str,
        to: Address,
        now: float,
        *attributes: tuple[int, bytes],
        pad: bool = False,
    ) -> _Tx:
        tid = new_transaction_id(self.randbytes)
        tx = _Tx(purpose, sock, to, _request(tid, *attributes, pad=pad), now)
        self.txs[tid] = tx
        self._send(tx, now)
        return tx

    def _send(self, tx: _Tx, now: float) -> None:
        tx.tries += 1
        tx.sent_at = now
        self._out.append((tx.sock, tx.data, tx.to))

    def receive(self, sock: str, data: bytes, now: float) -> _Tx | None:
        """The transaction an answer belongs to (now finished), or None (counted as stray)."""
        if not is_stun(data):
            self.stray += 1
            return None
        try:
            message = decode_untrusted(data)
        except StunError:
            self.stray += 1
            return None
        tx = self.txs.get(message.transaction_id)
        if tx is None or tx.sock != sock or message.cls not in (Class.SUCCESS, Class.ERROR):
            self.stray += 1
            return None
        if tx.finished:
            return None
        if message.cls == Class.ERROR:
            try:
                tx.error, _ = decode_error_code_untrusted(message.get(Attr.ERROR_CODE) or b"")
            except StunError:
                tx.error = 400
        else:
            tx.answer, tx.answered_at = message, now
        return tx

    def handle_timer(self, now: float) -> None:
        for tx in self.txs.values():
            if tx.finished:
                continue
            if now >= tx.started + self.config.timeout:
                tx.timed_out = True
            elif tx.tries <= len(self.config.retransmits) and now >= self._due(tx):
                self._send(tx, now)

    def _due(self, tx: _Tx) -> float:
        return tx.started + self.config.retransmits[tx.tries - 1]

    def next_timer(self) -> float:
        times = []
        for tx in self.txs.values():
            if not tx.finished:
                times.append(tx.started + self.config.timeout)
                if tx.tries <= len(self.config.retransmits):
                    times.append(self._due(tx))
        return min(times, default=float("inf"))

    def datagrams(self) -> list[tuple[str, bytes, Address]]:
        out, self._out = self._out, []
        return out

    @property
    def busy(self) -> bool:
        return any(not tx.finished for tx in self.txs.values())


def _mapped(tx: _Tx | None) -> Address | None:
    if tx is None or tx.answer is None:
        return None
    try:
        return mapped_address_untrusted(tx.answer)
    except StunError:
        return None


# ------------------------------------------------------------------ discovery


class Discovery:
    """One round of NAT behaviour tests; `done` once every test has an outcome.

    `servers` are supernodes' primary STUN addresses (the first two are used; put ones at
    different IPs first); `local_ports` maps each name of `discovery_sockets` to its bound port;
    `local_ips` are this host's addresses (a public address among them means no NAT).
    """

    def __init__(
        self,
        servers: Sequence[Address],
        local_ports: Mapping[str, int],
        local_ips: Iterable[str],
        now: float,
        config: DiscoveryConfig | None = None,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not servers:
            raise ValueError("NAT discovery needs at least one STUN server")
        self.config = config or DiscoveryConfig()
        self.servers = list(servers[:2])
        self.local_ports = dict(local_ports)
        self.local_ips = set(local_ips)
        self.started = now
        self.finished_at: float | None = None
        self._t = _Transactions(self.config, randbytes)
        self._hairpin_tid: bytes | None = None
        self._hairpin_arrived = False
        self._hairpin_tx: _Tx | None = None
        self._by_purpose: dict[str, _Tx] = {}
        a = self.servers[0]
        # allocation first, one socket after the other, before any other socket maps a port
        for n in range(self.config.alloc_sockets):
            self._start(f"alloc:{n}", f"alloc:{n}", a, now)
        # CHANGE-REQUEST with no change asks A for its alternate port (and checks support)
        no_change = (Attr.CHANGE_REQUEST, encode_change_request(False, False))
        self._start("map:a", "map", a, now, no_change)
        if len(self.servers) > 1:
            self._start("map:b", "map", self.servers[1], now)
        for n, server in enumerate(self.servers):
            self._start(f"filter:{n}:base", f"filter:{n}", server, now, no_change)

    def _start(
        self, purpose: str, sock: str, to: Address, now: float, *attrs: tuple[int, bytes],
        pad: bool = False,
    ) -> None:  # fmt: skip
        self._by_purpose[purpose] = self._t.start(purpose, sock, to, now, *attrs, pad=pad)

    # ----------------------------------------------------------------- input

    def receive(self, sock: str, data: bytes, source: Address, now: float) -> None:
        if sock == "map" and self._is_hairpin(data):
            self._hairpin_arrived = True
            return
        tx = self._t.receive(sock, data, now)
        if tx is not None:
            self._answered(tx, now)

    def _is_hairpin(self, data: bytes) -> bool:
        return (
            self._hairpin_tid is not None
            and is_stun(data)
            and data[8:20] == self._hairpin_tid
            and data[0] <= 1  # a request (class bits 00): our own, come back round
        )

    def _answered(self, tx: _Tx, now: float) -> None:
        """Start the tests that need this answer."""
        if tx.answer is None:
            return
        if tx.purpose == "map:a":
            alternate = tx.answer.get(ALTERNATE_PORT)
            if alternate is not None:
                try:
                    port = decode_response_port_untrusted(alternate)
                except StunError:
                    port = 0
                if port:
                    self._start("map:alt", "map", (tx.to[0], port), now)
            mapped = _mapped(tx)
            if mapped is not None and self._behind_nat(mapped):
                self._hairpin_tx = self._t.start("hairpin", "hairpin", mapped, now)
                self._hairpin_tid = self._hairpin_tx.data[8:20]
        elif tx.purpose.startswith("filter:") and tx.purpose.endswith(":base"):
            n = tx.purpose.split(":")[1]
            ip_and_port = (Attr.CHANGE_REQUEST, encode_change_request(True, True))
            port_only = (Attr.CHANGE_REQUEST, encode_change_request(False, True))
            self._start(f"filter:{n}:ip", tx.sock, tx.to, now, ip_and_port, pad=True)
            self._start(f"filter:{n}:port", tx.sock, tx.to, now, port_only, pad=True)

    def _behind_nat(self, mapped: Address) -> bool:
        return not (mapped[0] in self.local_ips and mapped[1] == self.local_ports.get("map"))

    def handle_timer(self, now: float) -> None:
        self._t.handle_timer(now)
        if self._hairpin_tx is not None and self._hairpin_arrived:
            self._hairpin_tx.timed_out = True  # it came round: stop sending it
        if self.finished_at is None and not self._t.busy:
            self.finished_at = now

    def next_timer(self) -> float:
        return self._t.next_timer()

    def datagrams(self, now: float) -> list[tuple[str, bytes, Address]]:
        """(local socket name, bytes, destination) to send now."""
        return self._t.datagrams()

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    # ----------------------------------------------------------------- the verdict

    def report(self, now: float) -> NatReport:
        get = self._by_purpose.get
        mapped = {p: _mapped(get(p)) for p in ("map:a", "map:b", "map:alt")}
        public = mapped["map:a"] or mapped["map:b"]
        udp = any(tx.answer is not None for tx in self._t.txs.values())
        base = NatReport(udp, servers=tuple(self.servers), measured_at=now,
                         duration_s=round((self.finished_at or now) - self.started, 3))  # fmt: skip
        if not udp or public is None:
            return dataclasses.replace(base, udp=udp, notes=("no STUN answer over UDP",))
        notes: list[str] = []
        behind = self._behind_nat(public)
        allocation, delta, samples = self._allocation()
        hairpin = None if not behind else self._hairpin_arrived
        return dataclasses.replace(
            base,
            mapping=self._mapping(mapped, notes) if behind else EIM,
            filtering=self._filtering(notes),
            allocation=allocation,
            delta=delta,
            samples=samples,
            hairpinning=hairpin,
            public=public,
            behind_nat=behind,
            notes=tuple(notes),
        )

    def _mapping(self, mapped: dict[str, Address | None], notes: list[str]) -> str | None:
        first, other, alternate = mapped["map:a"], mapped["map:b"], mapped["map:alt"]
        if first is None:
            return None
        a, b = self.servers[0], self.servers[1] if len(self.servers) > 1 else None
        other_ip = other if b is not None and b[0] != a[0] else None
        if other_ip is not None and other_ip == first:
            return EIM
        other_port = alternate if alternate is not None else (other if other_ip is None else None)
        if other_port is None:
            notes.append("mapping: no second port of the same server answered; assumed worst")
            return APDM if other_ip is not None else None
        if other_port != first:
            return APDM
        if other_ip is None:
            notes.append("mapping: only one server IP answered; EIM and ADM look the same")
        return ADM

    def _filtering(self, notes: list[str]) -> str | None:
        outcomes: dict[str, set[str]] = {"ip": set(), "port": set()}
        for n in range(len(self.servers)):
            for kind in ("ip", "port"):
                tx = self._by_purpose.get(f"filter:{n}:{kind}")
                if tx is None:
                    continue
                if tx.answer is not None:
                    outcomes[kind].add("arrived")
                elif tx.error is not None:
                    outcomes[kind].add("unsupported")
                elif tx.timed_out:
                    outcomes[kind].add("silent")
        if "arrived" in outcomes["ip"]:
            return EIM
        if "arrived" in outcomes["port"]:
            if "silent" not in outcomes["ip"]:
                notes.append("filtering: no server could answer from another IP")
            return ADM
        if "silent" in outcomes["port"] or "silent" in outcomes["ip"]:
            return APDM
        notes.append("filtering: the servers cannot answer from another address")
        return None

    def _allocation(self) -> tuple[str | None, int | None, tuple[tuple[int, int], ...]]:
        samples = []
        for n in range(self.config.alloc_sockets):
            mapped = _mapped(self._by_purpose.get(f"alloc:{n}"))
            local = self.local_ports.get(f"alloc:{n}")
            if mapped is not None and local is not None:
                samples.append((local, mapped[1]))
        allocation, delta = classify_allocation(samples)
        return allocation, delta, tuple(samples)


def classify_allocation(samples: Sequence[tuple[int, int]]) -> tuple[str | None, int | None]:
    """(allocation, delta) from (local port, mapped port) of sockets opened in this order.

    Tolerant of a little noise (another host behind the same NAT taking a port in between):
    a clear majority decides, so a sequential NAT still gets its delta.
    """
    if len(samples) < 2:
        return None, None
    majority = len(samples) // 2 + 1
    if sum(1 for local, mapped in samples if local == mapped) >= majority:
        return "preserving", None
    mapped = [m for _local, m in samples]
    steps = Counter(b - a for a, b in itertools.pairwise(mapped))
    step, count = steps.most_common(1)[0]
    if 0 < abs(step) <= MAX_DELTA and count >= max(1, (len(mapped) - 1) // 2 + 1):
        return "sequential", step
    return "random", None


# ------------------------------------------------------------------ reachability


class Pings:
    """One Binding request to each server from its own socket ("ping:N"): the round-trip
    time (from the latest transmission) and the mapped address, or None for silence."""

    def __init__(
        self, servers: Sequence[Address], now: float, config: DiscoveryConfig | None = None
    ) -> None:
        self._t = _Transactions(config or DiscoveryConfig(), os.urandom)
        self._txs = [self._t.start("ping", f"ping:{n}", s, now) for n, s in enumerate(servers)]

    @staticmethod
    def sockets(servers: Sequence[Address]) -> list[str]:
        return [f"ping:{n}" for n in range(len(servers))]

    def receive(self, sock: str, data: bytes, source: Address, now: float) -> None:
        self._t.receive(sock, data, now)

    def handle_timer(self, now: float) -> None:
        self._t.handle_timer(now)

    def next_timer(self) -> float:
        return self._t.next_timer()

    def datagrams(self, now: float) -> list[tuple[str, bytes, Address]]:
        return self._t.datagrams()

    @property
    def done(self) -> bool:
        return not self._t.busy

    def results(self) -> list[tuple[float | None, Address | None]]:
        return [
            (None if tx.answered_at is None else tx.answered_at - tx.sent_at, _mapped(tx))
            for tx in self._txs
        ]


# ------------------------------------------------------------------ lifetime


@dataclass
class _Wait:
    seconds: float
    tx: _Tx
    second_at: float | None = None  # when the delayed answer arrived
    verdict: bool | None = None  # alive after `seconds`?
    supported: bool = False  # the server echoed RESPONSE-DELAY: a second answer will come


@dataclass
class LifetimeProbe:
    """Measures idle mapping lifetime: one socket ("life:N") per wait, all started at once."""

    server: Address
    waits: Sequence[float]
    now: float
    config: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    grace: float = 2.0  # how late the delayed answer may be (network, server timer)
    randbytes: Callable[[int], bytes] = os.urandom

    def __post_init__(self) -> None:
        self._t = _Transactions(self.config, self.randbytes)
        self._waits: dict[str, _Wait] = {}
        for n, seconds in enumerate(self.waits):
            delay = (RESPONSE_DELAY, encode_uint32(max(1, round(seconds))))
            tx = self._t.start(f"life:{n}", f"life:{n}", self.server, self.now, delay, pad=True)
            self._waits[f"life:{n}"] = _Wait(float(seconds), tx)

    @staticmethod
    def sockets(waits: Sequence[float]) -> list[str]:
        return [f"life:{n}" for n in range(len(waits))]

    def receive(self, sock: str, data: bytes, source: Address, now: float) -> None:
        wait = self._waits.get(sock)
        if wait is None:
            return
        first = wait.tx.answered_at
        if first is not None:
            # the same transaction answered again, and not a duplicate of the first answer
            if (wait.verdict is None and wait.supported and data[8:20] == wait.tx.data[8:20]
                    and now >= first + wait.seconds / 2 and is_stun(data)):  # fmt: skip
                wait.second_at, wait.verdict = now, True
            return
        tx = self._t.receive(sock, data, now)
        if tx is not None and tx.answer is not None:
            wait.supported = tx.answer.get(RESPONSE_DELAY) is not None

    def handle_timer(self, now: float) -> None:
        self._t.handle_timer(now)
        for wait in self._waits.values():
            answered = wait.tx.answered_at
            if (wait.verdict is None and wait.supported and answered is not None
                    and now >= answered + wait.seconds + self.grace):  # fmt: skip
                wait.verdict = False

    def next_timer(self) -> float:
        times = [self._t.next_timer()]
        for wait in self._waits.values():
            if wait.verdict is None and wait.supported and wait.tx.answered_at is not None:
                times.append(wait.tx.answered_at + wait.seconds + self.grace)
        return min(times)

    def datagrams(self, now: float) -> list[tuple[str, bytes, Address]]:
        return self._t.datagrams()

    @property
    def done(self) -> bool:
        return all(w.verdict is not None or (w.tx.finished and not w.supported)
                   for w in self._waits.values())  # fmt: skip

    def bounds(self) -> tuple[float | None, float | None]:
        """(longest wait survived, shortest wait not survived) so far; None where unknown.

        A server that ignores RESPONSE-DELAY answers once: such waits end up neither.
        """
        alive = [w.seconds for w in self._waits.values() if w.verdict is True]
        gone = [w.seconds for w in self._waits.values() if w.verdict is False]
        return (max(alive) if alive else None), (min(gone) if gone else None)
