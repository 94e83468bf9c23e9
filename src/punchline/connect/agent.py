"""The connectivity agent of one call: which path the media takes, and keeping it alive.

A sans-I/O core in the shape of RFC 8445 (ICE): local candidates sit on "bases" (a socket of
ours: the media socket `udp`, a relay allocation `relay`, a port-prediction socket, ...);
every base is paired with every remote candidate the peer announced (or that announced itself
by checking us: peer-reflexive), and each pair is tested with STUN Binding checks (RFC 8489)
authenticated end to end. Checks go out paced, retransmitted for long enough to open both
NATs (hole punching is two sides checking each other at once), and a check from the peer
triggers an immediate check back on the same pair.

Why not ICE's nomination: both ends of a punchline call are punchline, so each end simply
sends on the best pair it has proven to work, in its own direction. The first pair to work
carries media at once (often the relay); a direct pair that works later takes over mid-call
("upgrade"), and when the pair in use stops answering for `consent_timeout` the next best
live pair takes over ("failover"). Media sequence numbers and the SRTP replay window make the
switch seamless: nothing is lost while packets in flight on the old path still arrive, and
nothing is played twice.

Keys: the checks' MESSAGE-INTEGRITY keys are derived from the call's end-to-end handshake
keys, per direction, so neither a supernode (which carries the candidates) nor anyone on the
path can forge a check or a response. Checks that fail integrity, replays of a check from
another address, floods beyond `answer_rate`, and candidate lists beyond the limits are
dropped and counted. Only authenticated checks are answered, and never with more bytes than
the request had, so the agent cannot be used to amplify traffic towards a third party.

Consent freshness follows RFC 7675 with voice-call timings: the pair in use is checked every
quarter second and given up after `consent_timeout` (1.2 s) without an answer, so a dead
path is replaced well within two seconds; other working pairs are checked every second, which
also keeps their NAT mappings open.

Restart (ICE restart, RFC 8445 §9, without new credentials): when one side's addresses change
under a call (its NAT rebinds to new ports, the laptop joins another network), every pair
towards or from the old addresses is dead, and the peer's port-filtering NAT drops checks
from the new ones until the peer sends there first. The side that moved learns its new
addresses, `restart`s (every pair is proven again from scratch) and sends its candidates with
a restart flag; the peer `restart`s too, dropping what the moved side no longer offers, so
both NATs open towards the new addresses at once. A path chosen in the `restart_window` after
that says so ("restart") in the call report. A replaced socket or relay allocation under a
base is `rebase`d: its pairs are checked again, through the new one.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from punchline.connect.candidates import (
    MAX_CANDIDATES,
    Address,
    Candidate,
    pair_priority,
    priority,
)
from punchline.crypto.handshake import SessionKeys
from punchline.wire import stun
from punchline.wire.stun import Attr, Class, Message, Method, StunError

Route = tuple[str, str, int]  # (local base, remote host, remote port)

_LAN_NETS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "100.64.0.0/10",
    )
)


def lan_only(host: str) -> bool:
    """An address that only means something inside one network (a relay cannot reach it)."""
    ip = ipaddress.ip_address(host)
    return any(ip in net for net in _LAN_NETS)


def check_key(key: bytes) -> bytes:
    """The STUN short-term credential of one direction, from that direction's call key."""
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"punchline connectivity checks")  # fmt: skip
    return kdf.derive(key)


@dataclass(frozen=True)
class AgentConfig:
    # Ta (RFC 8445 §14.2): new checks go out no faster than one per `pacing` seconds.
    pacing: float = 0.005
    # Retransmissions of an unanswered check, then every `retry_max` until `check_timeout`.
    retry_intervals: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    retry_max: float = 0.5
    check_timeout: float = 10.0
    consent_interval: float = 0.25
    consent_timeout: float = 1.2
    # The pair in use unanswered this long: `Stalled`, so the adapter can find out whether
    # our own addresses changed (a STUN round trip) before consent runs out.
    stall_after: float = 0.6
    backup_interval: float = 1.0
    backup_timeout: float = 3.5
    # A pair that lost consent is still probed this long, and comes back if it answers.
    revive_window: float = 30.0
    # A better direct pair replaces the one in use only this soon after it was chosen.
    settle: float = 1.0
    # Before any pair works, media goes to this many of the peer's announced public
    # candidates for this long: the first packets open our NAT and arrive as early as
    # physics allows, instead of one check round trip later.
    optimistic_window: float = 2.0
    optimistic_routes: int = 3
    max_remote: int = MAX_CANDIDATES
    max_pairs: int = 1024
    answer_rate: float = 200.0  # answered checks per second (burst as large)
    # Birthday probing (a random symmetric NAT against a cone): the hard side's many sockets
    # check the easy side once and then only every `slow_interval` (to keep their mappings);
    # the easy side probes random ports of the hard side's address at `probe_rate`.
    slow_interval: float = 5.0
    slow_timeout: float = 30.0
    probe_rate: float = 250.0
    probe_duration: float = 20.0
    buffered_max: int = 16
    seen_max: int = 1024
    # A path chosen this soon after a restart is reported as the restart's ("restart").
    restart_window: float = 10.0


class PairState(Enum):
    WAITING = "waiting"
    CHECKING = "checking"
    VALID = "valid"
    LOST = "lost"
    FAILED = "failed"


@dataclass
class Pair:
    base: str
    remote: Candidate
    priority: int
    created: float
    state: PairState = PairState.WAITING
    tries: int = 0
    first_check: float | None = None
    next_check: float = float("inf")
    last_response: float | None = None
    valid_since: float | None = None
    rtt: float | None = None
    # how the peer sees our side of this pair (host/srflx/prflx/relay...), from its answer
    local_kind: str = "?"
    lost_since: float | None = None
    stalled: bool = False

    @property
    def route(self) -> Route:
        return (self.base, self.remote.address[0], self.remote.address[1])

    @property
    def relayed(self) -> bool:
        return self.base == "relay" or self.remote.kind == "relay"


@dataclass(frozen=True)
class PathChanged:
    route: Route | None
    label: str
    local: str
    remote: str
    reason: str


@dataclass(frozen=True)
class NeedPermission:
    """A relay base must let this peer address in (TURN CreatePermission/ChannelBind)."""

    base: str
    address: Address


@dataclass(frozen=True)
class Stalled:
    """The pair in use has not answered for `stall_after`: perhaps our NAT rebound."""

    route: Route


@dataclass(frozen=True)
class Released:
    """Bases the agent will not use again (birthday sockets that lost): close them."""

    bases: tuple[str, ...]


Event = PathChanged | NeedPermission | Released | Stalled


def label(pair: Pair, relay_via: dict[str, str]) -> str:
    if pair.base in relay_via:
        return f"relay-{relay_via[pair.base]}"
    if pair.remote.kind == "relay":
        return "relay-peer"
    return "direct"


class Agent:
    def __init__(
        self,
        controlling: bool,
        now: float,
        config: AgentConfig | None = None,
        seed: int | None = None,
    ) -> None:
        self.controlling = controlling
        self.config = config or AgentConfig()
        self.started = now
        self._rng = random.Random(seed)  # noqa: S311 - spreads consent checks, not a secret
        self._tiebreaker = secrets.token_bytes(8)
        self._send_key: bytes | None = None
        self._receive_key: bytes | None = None
        self.local_ufrag = self.remote_ufrag = ""
        # base -> (local candidates on it, which remote candidates it may pair with; None: all)
        self._bases: dict[str, tuple[list[Candidate], Callable[[Candidate], bool] | None]] = {}
        self._relay_via: dict[str, str] = {}
        self._remote: list[Candidate] = []
        self._pairs: dict[Route, Pair] = {}
        # a check's pair, or for a birthday probe the route it went to
        self._transactions: dict[bytes, tuple[Pair | Route, float]] = {}
        self._slow: set[str] = set()
        self._probe_host: str | None = None
        self._probe_until = 0.0
        self._next_probe = float("inf")
        self._seen: OrderedDict[bytes, tuple[str, Address]] = OrderedDict()
        self._buffered: list[tuple[str, bytes, Address]] = []
        self._out: list[tuple[Route, bytes]] = []
        self._events: list[Event] = []
        self._next_paced = now
        self._tokens = self.config.answer_rate
        self._tokens_at = now
        self.selected: Pair | None = None
        self._selected_at = now
        self._restart_until = 0.0
        self._had_path = False
        # addresses the peer no longer offers (it moved) that the pair in use still goes to
        self._withdrawn: set[Address] = set()
        self._counters: Counter[str] = Counter()
        self.closed = False

    # ----------------------------------------------------------------- setup

    def set_keys(self, keys: SessionKeys, now: float) -> None:
        """The call's handshake is done: checks can be authenticated from now on."""
        if self._send_key is not None:
            return
        self._send_key, self._receive_key = check_key(keys.send), check_key(keys.receive)
        tag = keys.session_id.hex()[:8]
        self.local_ufrag = ("C" if self.controlling else "A") + tag
        self.remote_ufrag = ("A" if self.controlling else "C") + tag
        buffered, self._buffered = self._buffered, []
        for base, data, source in buffered:
            self.receive(base, data, source, now)

    def add_base(
        self,
        base: str,
        candidates: list[Candidate],
        now: float,
        accept: Callable[[Candidate], bool] | None = None,
        relay_via: str | None = None,
        slow: bool = False,
    ) -> None:
        """A socket of ours that can reach peers; `candidates` are how the peer may reach it.
        `slow` bases (birthday sockets) check rarely: they are there to be found."""
        self._bases[base] = (list(candidates), accept)
        if relay_via is not None:
            self._relay_via[base] = relay_via
        if slow:
            self._slow.add(base)
        for remote in self._remote:
            self._pair(base, remote, now)

    def add_local(self, base: str, candidate: Candidate) -> None:
        """A new way for the peer to reach an existing base (a late reflexive address)."""
        if base in self._bases:
            self._bases[base][0].append(candidate)

    def add_remote(self, candidate: Candidate, now: float) -> bool:
        known = next((c for c in self._remote if c.address == candidate.address), None)
        if known is not None:
            if known.kind != "prflx" or candidate.kind == "prflx":
                return False
            # Seen first as the source of a check on one base (peer-reflexive), now announced:
            # every base tries it (after a restart it is the peer's new address).
            self._remote[self._remote.index(known)] = candidate
            for base in self._bases:
                self._pair(base, candidate, now)
            return True
        if len(self._remote) >= self.config.max_remote:
            self._counters["dropped_candidates"] += 1
            return False
        self._remote.append(candidate)
        for base in self._bases:
            self._pair(base, candidate, now)
        return True

    # ----------------------------------------------------------------- restarts

    def replace_local(self, base: str, candidates: list[Candidate]) -> None:
        """Our addresses on `base` changed (another network, a new NAT mapping): the peer can
        reach it at `candidates` now, and only there."""
        if base in self._bases:
            self._bases[base] = (list(candidates), self._bases[base][1])

    def restart(self, now: float) -> None:
        """Addresses changed on one side: prove every pair again from scratch.

        The pair in use stays in use and is checked at once: if it survived, nothing is heard
        of the restart. Every other pair goes back to checking, best first and paced, so a
        pair that died with the old addresses can no longer be failed over to, and one that
        works again (the peer's NAT now lets our new mapping in) is found within a round trip.
        Birthday sockets are left to their own slow rhythm."""
        self._restart_until = now + self.config.restart_window
        self._counters["restarts"] += 1
        others = [p for p in self._pairs.values()
                  if p is not self.selected and p.base not in self._slow]  # fmt: skip
        self._recheck(others, now)
        if self.selected is not None:
            self.selected.next_check = now

    def peer_restarted(self, candidates: list[Candidate], now: float) -> None:
        """The peer's addresses changed and `candidates` is all it offers now: forget what it
        no longer offers (but the pair in use: consent decides about that one), add the new
        ones, restart. A call that moves many times never runs into the candidate limit."""
        keep = {c.address for c in candidates}
        self._withdrawn = set()
        if self.selected is not None and self.selected.remote.address not in keep:
            # still in use until something better works, which is anything that works now
            self._withdrawn.add(self.selected.remote.address)
            keep.add(self.selected.remote.address)
        for remote in list(self._remote):
            if remote.address in keep:
                continue
            routes = [r for r, p in self._pairs.items() if p.remote.address == remote.address]
            for route in routes:
                del self._pairs[route]
            self._remote.remove(remote)
            self._counters["forgotten_candidates"] += 1
        for candidate in candidates:
            self.add_remote(candidate, now)
        self.restart(now)

    def rebase(
        self, base: str, candidates: list[Candidate], now: float, relay_via: str | None = None
    ) -> None:
        """The socket or relay allocation behind `base` was replaced (the old one died with
        the old network): its pairs are proven again through the new one, and a new relay
        allocation is asked to let every peer address in again."""
        if base not in self._bases:
            self.add_base(base, candidates, now, relay_via=relay_via)
            return
        self._bases[base] = (list(candidates), self._bases[base][1])
        if relay_via is not None:
            self._relay_via[base] = relay_via
        pairs = [p for p in self._pairs.values() if p.base == base]
        if base in self._relay_via:
            self._events += [NeedPermission(base, p.remote.address) for p in pairs]
        self._recheck(pairs, now)
        if self.selected is not None and self.selected.base == base:
            self._select(self._best_live(), "failover", now)

    def _recheck(self, pairs: list[Pair], now: float) -> None:
        ordered = sorted(pairs, key=lambda p: p.priority, reverse=True)
        for rank, pair in enumerate(ordered):
            at = now + rank * self.config.pacing
            pair.state, pair.tries, pair.first_check, pair.next_check = (
                PairState.CHECKING, 0, at, at)  # fmt: skip
            pair.lost_since = None

    def _pair(self, base: str, remote: Candidate, now: float) -> Pair | None:
        _candidates, accept = self._bases[base]
        if accept is not None and not accept(remote):
            return None
        if base in self._relay_via and remote.kind == "host" and lan_only(remote.address[0]):
            return None  # a relay cannot reach an address inside the peer's LAN
        route = (base, *remote.address)
        if route in self._pairs:
            return self._pairs[route]
        if len(self._pairs) >= self.config.max_pairs:
            self._counters["dropped_pairs"] += 1
            return None
        mine = self._base_priority(base)
        prio = (pair_priority(mine, remote.priority) if self.controlling
                else pair_priority(remote.priority, mine))  # fmt: skip
        pair = Pair(base, remote, prio, now)
        if base in self._slow:  # birthday sockets: all at once, each mapping must exist
            pair.state, pair.first_check, pair.next_check = PairState.CHECKING, now, now
        self._pairs[route] = pair
        if base in self._relay_via:
            self._events.append(NeedPermission(base, remote.address))
        return pair

    def _base_priority(self, base: str) -> int:
        candidates, _kinds = self._bases[base]
        if base in self._relay_via:
            return priority("relay")
        return max((c.priority for c in candidates), default=priority("prflx"))

    # ----------------------------------------------------------------- input

    def receive(self, base: str, data: bytes, source: Address, now: float) -> None:
        """One STUN datagram that arrived on `base` from `source`."""
        try:
            message = stun.decode_untrusted(data)
        except StunError:
            self._counters["malformed"] += 1
            return
        if message.method != Method.BINDING:
            self._counters["unexpected"] += 1
        elif message.cls == Class.REQUEST:
            self._request(base, data, message, source, now)
        elif message.cls in (Class.SUCCESS, Class.ERROR):
            self._response(base, data, message, source, now)
        else:
            self._counters["unexpected"] += 1

    def _request(
        self, base: str, data: bytes, message: Message, source: Address, now: float
    ) -> None:
        if self._receive_key is None:
            if len(self._buffered) < self.config.buffered_max:
                self._buffered.append((base, data, source))
                self._counters["buffered"] += 1
            else:
                self._counters["flood"] += 1
            return
        username = message.get(Attr.USERNAME)
        if username != f"{self.local_ufrag}:{self.remote_ufrag}".encode():
            self._counters["forged"] += 1
            return
        try:
            stun.decode_untrusted(data, self._receive_key)
        except StunError:
            self._counters["forged"] += 1
            return
        tid = message.transaction_id
        seen = self._seen.get(tid)
        if seen is not None and seen != (base, source):
            self._counters["replayed"] += 1
            return
        if not self._take_token(now):
            self._counters["flood"] += 1
            return
        self._seen[tid] = (base, source)
        while len(self._seen) > self.config.seen_max:
            self._seen.popitem(last=False)
        answer = stun.encode(
            Message(Method.BINDING, Class.SUCCESS, tid,
                    ((Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address(source, tid)),)),
            integrity_key=self._receive_key,
        )  # fmt: skip
        if len(answer) > len(data):
            self._counters["oversize"] += 1  # never amplify, whatever the request looked like
            return
        self._out.append(((base, *source), answer))
        self._counters["checks_answered"] += 1
        self._triggered(base, message, source, now)

    def _triggered(self, base: str, message: Message, source: Address, now: float) -> None:
        """The peer reached us on this route: check back at once (RFC 8445 §7.3.1.4); an
        unknown source is a peer-reflexive candidate (§7.3.1.3), the NAT's own mapping."""
        pair = self._pairs.get((base, *source))
        if pair is None:
            value = message.get(Attr.PRIORITY)
            prio = priority("prflx")
            if value is not None and len(value) == 4:
                prio = max(1, stun.decode_uint32_untrusted(value))
            remote = Candidate("prflx", source, prio)
            if len(self._remote) >= self.config.max_remote + 8:
                self._counters["dropped_candidates"] += 1
                return
            self._remote.append(remote)
            pair = self._pair(base, remote, now)
            if pair is None:
                return
        if pair.state in (PairState.WAITING, PairState.FAILED):
            pair.state, pair.tries, pair.first_check = PairState.CHECKING, 0, now
            pair.next_check = now
        elif pair.state in (PairState.LOST, PairState.CHECKING):
            pair.next_check = min(pair.next_check, now)

    def _response(
        self, base: str, data: bytes, message: Message, source: Address, now: float
    ) -> None:
        entry = self._transactions.get(message.transaction_id)
        if entry is None or self._send_key is None:
            self._counters["unexpected"] += 1
            return
        target, sent_at = entry
        try:
            message = stun.decode_untrusted(data, self._send_key)
        except StunError:
            self._counters["forged"] += 1
            return
        if isinstance(target, tuple):  # a birthday probe hit one of the peer's mappings
            found = self._probe_hit(target, base, source, now)
            if found is None:
                return
            target = found
        pair = target
        if self._pairs.get(pair.route) is not pair:
            self._counters["unexpected"] += 1  # forgotten since (the peer restarted)
            return
        if (base, *source) != pair.route:
            self._counters["unexpected"] += 1  # not symmetric: this is not the pair we tested
            return
        del self._transactions[message.transaction_id]
        if message.cls == Class.ERROR:
            self._counters["error_responses"] += 1
            return
        self._counters["responses"] += 1
        if pair.stalled and pair is self.selected and now < self._restart_until:
            # the path in use stalled, the restart revived it: a change worth reporting
            self._restart_until = 0.0
            self._select(pair, "restart", now)
        pair.last_response, pair.stalled = now, False
        pair.rtt = now - sent_at
        mapped = stun.mapped_address_untrusted(message)
        if mapped is not None:
            pair.local_kind = self._kind_of(base, mapped)
        if pair.remote.address[0] == self._probe_host:
            self._probe_until = now  # birthday probing found its way
        if pair.base in self._slow:
            self._release_slow(keep=pair.base)
        if pair.state is not PairState.VALID:
            pair.state, pair.valid_since, pair.lost_since = PairState.VALID, now, None
            self._consider(pair, now)

    def _probe_hit(self, route: Route, base: str, source: Address, now: float) -> Pair | None:
        if (base, *source) != route:
            self._counters["unexpected"] += 1
            return None
        self._counters["probe_hits"] += 1
        self._probe_until = now  # found: stop probing
        self._remote.append(Candidate("prflx", source, priority("prflx")))
        pair = self._pair(base, self._remote[-1], now)
        if pair is not None and pair.state is PairState.WAITING:
            pair.state, pair.first_check, pair.tries = PairState.CHECKING, now, 1
        return pair

    def _release_slow(self, keep: str) -> None:
        """One birthday socket got through: the others have nothing left to do."""
        idle = sorted(b for b in self._slow if b != keep)
        for pair in self._pairs.values():
            if pair.base in idle:
                pair.state, pair.next_check = PairState.FAILED, float("inf")
        self._slow = {keep}
        if idle:
            self._events.append(Released(tuple(idle)))

    def probe(self, host: str, now: float) -> None:
        """Birthday probing: the peer sits behind a NAT that maps every destination to a new
        random port and has opened many; checks to random ports of `host` from our one
        (endpoint-independent) mapping find one of them in seconds, at a bounded rate."""
        self._probe_host = host
        self._probe_until = now + self.config.probe_duration
        self._next_probe = now

    def _probes(self, now: float) -> None:
        if self._probe_host is None or now >= self._probe_until:
            self._next_probe = float("inf")
            return
        step = 1.0 / self.config.probe_rate
        budget = 64  # a late timer catches up a little, never with a burst
        while self._next_probe <= now and budget:
            port = self._rng.randint(1024, 65535)
            route = ("udp", self._probe_host, port)
            tid = self._send_check(route, now)
            self._transactions[tid] = (route, now)
            self._counters["probes_sent"] += 1
            self._next_probe += step
            budget -= 1
        self._next_probe = max(self._next_probe, now)

    def _kind_of(self, base: str, mapped: Address) -> str:
        if base in self._relay_via:
            return "relay"
        for candidate in self._bases[base][0]:
            if candidate.address == mapped:
                return candidate.kind
        return "prflx"

    def _take_token(self, now: float) -> bool:
        rate = self.config.answer_rate
        self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    # ----------------------------------------------------------------- choosing a path

    def _better(self, pair: Pair, now: float) -> bool:
        current = self.selected
        if current is None or current.state is not PairState.VALID:
            return True
        if current.remote.address in self._withdrawn:
            return pair.remote.address not in self._withdrawn
        if current.relayed != pair.relayed:
            return current.relayed
        return pair.priority > current.priority and now - self._selected_at < self.config.settle

    def _consider(self, pair: Pair, now: float) -> None:
        if not self._better(pair, now):
            return
        previous = self.selected
        if now < self._restart_until:
            reason = "restart"
            self._restart_until = 0.0  # later changes are ordinary upgrades again
        elif previous is None:
            reason = "failover" if self._had_path else "first path"
        elif previous.state is not PairState.VALID:
            reason = "failover"
        elif previous.relayed and not pair.relayed:
            reason = "upgrade"
        else:
            reason = "better path"
        self._select(pair, reason, now)

    def _select(self, pair: Pair | None, reason: str, now: float) -> None:
        self.selected = pair
        self._selected_at = now
        self._had_path = self._had_path or pair is not None
        if pair is None:
            self._events.append(PathChanged(None, "none", "", "", reason))
            return
        self._events.append(PathChanged(pair.route, label(pair, self._relay_via),
                                        pair.local_kind, pair.remote.kind, reason))  # fmt: skip
        pair.next_check = min(pair.next_check, now + self.config.consent_interval)

    def _best_live(self) -> Pair | None:
        live = [p for p in self._pairs.values() if p.state is PairState.VALID]
        if not live:
            return None
        return max(live, key=lambda p: (not p.relayed, p.priority))

    # ----------------------------------------------------------------- timers

    def next_timer(self) -> float:
        if self.closed:
            return float("inf")
        due = min((p.next_check for p in self._pairs.values()), default=float("inf"))
        if self._send_key is not None:
            due = min(due, self._next_probe)
        if self._send_key is not None and any(
            p.state is PairState.WAITING for p in self._pairs.values()
        ):
            due = min(due, self._next_paced)
        return due

    def handle_timer(self, now: float) -> None:
        if self.closed or self._send_key is None:
            return
        for tid, (_target, sent_at) in list(self._transactions.items()):
            if now - sent_at <= 5.0:
                break  # (in order of sending)
            del self._transactions[tid]
        if now >= self._next_paced:
            waiting = [p for p in self._pairs.values() if p.state is PairState.WAITING]
            if waiting:
                pair = max(waiting, key=lambda p: p.priority)
                pair.state, pair.first_check, pair.next_check = PairState.CHECKING, now, now
                self._next_paced = now + self.config.pacing
        for pair in list(self._pairs.values()):
            if now >= pair.next_check:
                self._due(pair, now)
        self._probes(now)

    def _due(self, pair: Pair, now: float) -> None:
        config = self.config
        if pair.state is PairState.CHECKING:
            assert pair.first_check is not None
            slow = pair.base in self._slow
            if now - pair.first_check > (config.slow_timeout if slow else config.check_timeout):
                pair.state, pair.next_check = PairState.FAILED, float("inf")
                return
            self._check(pair, now)
            intervals = config.retry_intervals
            step = intervals[pair.tries - 1] if pair.tries <= len(intervals) else config.retry_max
            pair.next_check = now + (config.slow_interval if slow else step)
            return
        if pair.state is PairState.VALID:
            in_use = pair is self.selected
            timeout = config.consent_timeout if in_use else config.backup_timeout
            assert pair.last_response is not None
            if now - pair.last_response > timeout:
                self._lose(pair, now)
                return
            if in_use and not pair.stalled and now - pair.last_response > config.stall_after:
                pair.stalled = True
                self._events.append(Stalled(pair.route))
            self._check(pair, now)
            interval = config.consent_interval if in_use else config.backup_interval
            pair.next_check = now + interval * self._rng.uniform(0.8, 1.2)
            return
        if pair.state is PairState.LOST:
            assert pair.lost_since is not None
            if now - pair.lost_since > config.revive_window:
                pair.state, pair.next_check = PairState.FAILED, float("inf")
                return
            self._check(pair, now)
            pair.next_check = now + config.backup_interval
            return
        pair.next_check = float("inf")

    def _lose(self, pair: Pair, now: float) -> None:
        """Consent expired (RFC 7675 §5.1): stop using the pair; keep asking in case it comes
        back (a short outage), and move the media to the best pair still answering."""
        pair.state, pair.lost_since = PairState.LOST, now
        pair.next_check = now + self.config.backup_interval
        self._counters["paths_lost"] += 1
        if pair is self.selected:
            best = self._best_live()
            reason = "failover"
            if (
                best is not None
                and now < self._restart_until
                and (best.valid_since or 0.0) >= (self._restart_until - self.config.restart_window)
            ):
                reason, self._restart_until = "restart", 0.0  # a pair the restart proved
            self._select(best, reason, now)

    def _check(self, pair: Pair, now: float) -> None:
        self._transactions[self._send_check(pair.route, now)] = (pair, now)
        pair.tries += 1
        self._counters["checks_sent"] += 1

    def _send_check(self, route: Route, now: float) -> bytes:
        assert self._send_key is not None
        tid = stun.new_transaction_id()
        role = Attr.ICE_CONTROLLING if self.controlling else Attr.ICE_CONTROLLED
        attributes = (
            (Attr.USERNAME, f"{self.remote_ufrag}:{self.local_ufrag}".encode()),
            (Attr.PRIORITY, stun.encode_uint32(priority("prflx"))),
            (role, self._tiebreaker),
        )
        data = stun.encode(Message(Method.BINDING, Class.REQUEST, tid, attributes),
                           integrity_key=self._send_key)  # fmt: skip
        self._out.append((route, data))
        return tid

    # ----------------------------------------------------------------- output

    def transmit(self) -> list[tuple[Route, bytes]]:
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def media_routes(self, now: float) -> list[Route]:
        """Where media goes now: the pair in use, or before any works, an optimistic guess."""
        if self.selected is not None:
            return [self.selected.route]
        if self._send_key is None or now - self.started > self.config.optimistic_window:
            return []
        guesses = [
            p for p in self._pairs.values()
            if p.base == "udp" and p.remote.kind in ("prflx", "mapped", "srflx", "host")
            and p.state is not PairState.FAILED
        ]  # fmt: skip
        # A peer-reflexive pair exists once an authenticated check came from it: the peer's
        # own NAT mapping towards us, the one address that surely reaches a peer behind a
        # symmetric NAT (the peer connected out: media goes back the way its check came).
        # Public addresses first: a LAN address only helps a peer on the same LAN.
        guesses.sort(key=lambda p: (not lan_only(p.remote.address[0]), p.priority), reverse=True)
        return [p.route for p in guesses[: self.config.optimistic_routes]]

    def close(self) -> None:
        self.closed = True
        self._out, self._events = [], []

    def remote_candidates(self, kind: str) -> list[Candidate]:
        return [c for c in self._remote if c.kind == kind]

    # ----------------------------------------------------------------- report

    @property
    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def pairs(self) -> list[dict[str, object]]:
        """The checklist, best first, for status and the call report."""
        ordered = sorted(self._pairs.values(), key=lambda p: p.priority, reverse=True)
        return [
            {"base": p.base, "remote": list(p.remote.address), "kind": p.remote.kind,
             "state": p.state.value, "rtt_ms": None if p.rtt is None else round(p.rtt * 1000, 1),
             "selected": p is self.selected}
            for p in ordered
        ]  # fmt: skip
