"""Two connectivity agents over a simulated network of NATs, with a fake clock.

The simulation is small on purpose: each base of an agent has the public address the world
sees it at and a filter (open, or port-restricted: only sources it has sent to get in), links
have a one-way delay and can be cut. That is enough to show hole punching needing both sides,
the relay carrying media first, the upgrade, failover within two seconds and the bad-input
rules; the real NATs are exercised in the lab tests.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from punchline.connect.agent import (
    Agent,
    AgentConfig,
    NeedPermission,
    PairState,
    PathChanged,
    Released,
    Stalled,
)
from punchline.connect.candidates import Address, Candidate
from punchline.connect.keepalive import keepalive_interval
from punchline.crypto.handshake import SessionKeys
from punchline.wire import stun

KEYS_A = SessionKeys(send=b"a" * 32, receive=b"b" * 32, session_id=b"s" * 8)
KEYS_B = SessionKeys(send=b"b" * 32, receive=b"a" * 32, session_id=b"s" * 8)


@dataclass
class Base:
    agent: str
    name: str
    public: Address
    restricted: bool
    opened: set[Address] = field(default_factory=set)


class Sim:
    def __init__(self, delay: float = 0.025) -> None:
        self.delay = delay
        self.now = 0.0
        self.agents: dict[str, Agent] = {}
        self.bases: dict[Address, Base] = {}
        self.by_name: dict[tuple[str, str], Base] = {}
        self.queue: list[tuple[float, int, Address, Address, bytes]] = []
        self.cut: set[frozenset[Address]] = set()
        self.events: dict[str, list[PathChanged]] = {}
        self.released: dict[str, list[str]] = {}
        self.stalled: dict[str, list[float]] = {}
        self._ids = itertools.count()

    def add(self, name: str, agent: Agent) -> None:
        self.agents[name] = agent
        self.events[name] = []
        self.released[name] = []
        self.stalled[name] = []

    def base(self, agent: str, name: str, public: Address, restricted: bool) -> Base:
        base = Base(agent, name, public, restricted)
        self.bases[public] = base
        self.by_name[(agent, name)] = base
        return base

    def rebind(self, agent: str, name: str, public: Address) -> Base:
        """The NAT in front of a base maps it anew (rebinding, or the host moved): the world
        sees it at `public`, and nothing is let in that it has not sent to since."""
        base = self.by_name[(agent, name)]
        del self.bases[base.public]
        base.public, base.opened = public, set()
        self.bases[public] = base
        return base

    def remove(self, agent: str, name: str) -> None:
        """A base whose socket or allocation died: nothing reaches it, nothing leaves it."""
        base = self.by_name.pop((agent, name))
        del self.bases[base.public]

    def flush(self) -> None:
        for name, agent in self.agents.items():
            for route, data in agent.transmit():
                sender = self.by_name.get((name, route[0]))
                if sender is None:
                    continue
                target = (route[1], route[2])
                sender.opened.add(target)
                if frozenset((sender.public, target)) in self.cut:
                    continue
                heapq.heappush(self.queue, (self.now + self.delay, next(self._ids), sender.public,
                                            target, data))  # fmt: skip
            for event in agent.events():
                if isinstance(event, PathChanged):
                    self.events[name].append(event)
                elif isinstance(event, NeedPermission):
                    self.by_name[(name, event.base)].opened.add(event.address)
                elif isinstance(event, Released):
                    self.released[name] += event.bases
                elif isinstance(event, Stalled):
                    self.stalled[name].append(self.now)

    def run(self, until: float) -> None:
        self.flush()
        while True:
            timers = [a.next_timer() for a in self.agents.values()]
            due = min([*timers, self.queue[0][0] if self.queue else float("inf")])
            if due > until:
                self.now = until
                return
            self.now = max(self.now, due)
            while self.queue and self.queue[0][0] <= self.now:
                _t, _i, source, target, data = heapq.heappop(self.queue)
                base = self.bases.get(target)
                if base is None or (base.restricted and source not in base.opened):
                    continue
                self.agents[base.agent].receive(base.name, data, source, self.now)
            for agent in self.agents.values():
                agent.handle_timer(self.now)
            self.flush()


def pair_of_agents(sim: Sim, config: AgentConfig | None = None) -> tuple[Agent, Agent]:
    a, b = Agent(True, 0.0, config, seed=1), Agent(False, 0.0, config, seed=2)
    sim.add("a", a)
    sim.add("b", b)
    return a, b


def keyed_agents(
    setup: Callable[[Sim, Agent, Agent], None], config: AgentConfig | None = None
) -> tuple[Sim, Agent, Agent]:
    """Two agents on a simulated network laid out by `setup`, keys exchanged at time 0."""
    sim = Sim()
    a, b = pair_of_agents(sim, config)
    setup(sim, a, b)
    a.set_keys(KEYS_A, 0.0)
    b.set_keys(KEYS_B, 0.0)
    return sim, a, b


def nat_pair(sim: Sim, a: Agent, b: Agent, restricted: bool = True) -> None:
    sim.base("a", "udp", ("198.51.100.1", 4000), restricted)
    sim.base("b", "udp", ("198.51.100.2", 5000), restricted)
    a.add_base("udp", [Candidate.make("srflx", ("198.51.100.1", 4000))], 0.0)
    b.add_base("udp", [Candidate.make("srflx", ("198.51.100.2", 5000))], 0.0)
    a.add_remote(Candidate.make("srflx", ("198.51.100.2", 5000)), 0.0)
    b.add_remote(Candidate.make("srflx", ("198.51.100.1", 4000)), 0.0)


def test_port_restricted_nats_punch_a_direct_path_within_a_few_round_trips() -> None:
    sim, a, b = keyed_agents(nat_pair)
    sim.run(1.0)
    assert a.selected is not None
    assert b.selected is not None
    first = sim.events["a"][0]
    assert (first.label, first.reason) == ("direct", "first path")
    assert a.selected.route == ("udp", "198.51.100.2", 5000)
    assert a.selected.valid_since is not None
    assert a.selected.valid_since <= 0.2
    assert a.counters.get("forged", 0) == 0


def test_checks_arriving_before_the_keys_are_buffered_and_answered_later() -> None:
    sim = Sim()
    a, b = pair_of_agents(sim)
    nat_pair(sim, a, b, restricted=False)
    b.set_keys(KEYS_B, 0.0)  # the callee knows the keys at the invite, the caller later
    sim.run(0.1)
    assert a.counters["buffered"] >= 1
    a.set_keys(KEYS_A, sim.now)
    sim.run(0.5)
    assert a.selected is not None
    assert b.selected is not None


def relay_and_direct(sim: Sim, a: Agent, b: Agent) -> None:
    nat_pair(sim, a, b)
    sim.base("a", "relay", ("203.0.113.9", 50000), True)
    a.add_base("relay", [Candidate.make("relay", ("203.0.113.9", 50000), via="udp")], 0.0,
               relay_via="udp")  # fmt: skip
    b.add_remote(Candidate.make("relay", ("203.0.113.9", 50000), via="udp"), 0.0)


def test_media_starts_on_the_relay_and_upgrades_to_direct_when_punching_succeeds() -> None:
    sim = Sim()
    a, b = pair_of_agents(sim)
    relay_and_direct(sim, a, b)
    # the direct path opens late (a NAT that only lets the punch through after 2 s)
    direct = frozenset({("198.51.100.1", 4000), ("198.51.100.2", 5000)})
    sim.cut.add(direct)
    a.set_keys(KEYS_A, 0.0)
    b.set_keys(KEYS_B, 0.0)
    sim.run(1.0)
    assert [e.label for e in sim.events["a"]] == ["relay-udp"]
    assert [e.label for e in sim.events["b"]] == ["relay-peer"]
    sim.cut.discard(direct)
    sim.run(4.0)
    assert [(e.label, e.reason) for e in sim.events["a"]] == [
        ("relay-udp", "first path"),
        ("direct", "upgrade"),
    ]
    assert a.media_routes(sim.now) == [("udp", "198.51.100.2", 5000)]


def test_a_dead_direct_path_fails_over_to_the_relay_within_two_seconds() -> None:
    sim, a, b = keyed_agents(relay_and_direct)
    sim.run(3.0)
    assert a.selected is not None
    assert a.selected.base == "udp"
    sim.cut.add(frozenset({("198.51.100.1", 4000), ("198.51.100.2", 5000)}))
    died = sim.now
    sim.run(died + 2.0)
    failover = [e for e in sim.events["a"] if e.reason == "failover"]
    assert failover
    assert failover[0].label == "relay-udp"
    assert b.selected is not None
    assert b.selected.relayed
    # and back to direct when the path heals
    sim.cut.clear()
    sim.run(sim.now + 3.0)
    assert a.selected is not None
    assert a.selected.base == "udp"


def test_forged_and_replayed_checks_are_counted_and_never_answered() -> None:
    sim, a, b = keyed_agents(partial(nat_pair, restricted=False))
    sim.run(0.5)
    b.transmit()
    attacker = Agent(False, 0.0)
    attacker.set_keys(SessionKeys(b"x" * 32, b"y" * 32, b"s" * 8), 0.0)
    attacker.add_base("udp", [], 0.0)
    attacker.add_remote(Candidate.make("srflx", ("198.51.100.1", 4000)), 0.0)
    attacker.handle_timer(0.6)
    (_route, forged), *_ = attacker.transmit()
    a.receive("udp", forged, ("192.0.2.66", 666), 0.6)
    assert a.counters["forged"] == 1
    # a genuine check of b's, captured and replayed from another address
    b_pair = b.selected
    assert b_pair is not None
    b.handle_timer(b_pair.next_check)
    (_route, genuine), *_ = b.transmit()
    a.receive("udp", genuine, ("198.51.100.2", 5000), 2.0)
    a.transmit()
    a.receive("udp", genuine, ("192.0.2.66", 666), 2.0)
    assert a.counters["replayed"] == 1
    assert a.transmit() == []
    a.receive("udp", b"\x00\x01garbage", ("192.0.2.66", 666), 2.0)
    assert a.counters["malformed"] == 1
    assert a.transmit() == []


def test_answers_are_never_larger_than_the_check_and_a_flood_is_rate_limited() -> None:
    config = AgentConfig(answer_rate=50.0)
    sim, a, b = keyed_agents(partial(nat_pair, restricted=False), config)
    sim.run(0.5)
    a.transmit()
    checks = []
    for _n in range(300):  # b's genuine checks, each a fresh transaction, all at one instant
        pair = b.selected
        assert pair is not None
        b._check(pair, 1.0)
        (_route, data), *_ = b.transmit()
        checks.append(data)
        a.receive("udp", data, ("198.51.100.2", 5000), 1.0)
    answers = [d for r, d in a.transmit() if stun.decode_untrusted(d).cls == stun.Class.SUCCESS]
    assert len(answers) <= 51
    assert a.counters["flood"] >= 249
    assert max(len(x) for x in answers) <= min(len(c) for c in checks)


def test_huge_candidate_lists_are_bounded() -> None:
    a = Agent(True, 0.0)
    a.add_base("udp", [], 0.0)
    added = sum(a.add_remote(Candidate.make("srflx", ("198.51.100.7", 1000 + n)), 0.0)
                for n in range(500))  # fmt: skip
    assert added == AgentConfig().max_remote
    assert a.counters["dropped_candidates"] == 500 - added
    assert len(a.pairs()) == added


def test_a_relay_is_never_asked_to_reach_a_lan_address() -> None:
    a = Agent(True, 0.0)
    a.add_base("relay", [Candidate.make("relay", ("203.0.113.9", 50000), via="tcp")], 0.0,
               relay_via="tcp")  # fmt: skip
    a.add_remote(Candidate.make("host", ("10.1.0.10", 4000)), 0.0)
    a.add_remote(Candidate.make("srflx", ("198.51.100.2", 5000)), 0.0)
    assert [p["remote"] for p in a.pairs()] == [["198.51.100.2", 5000]]
    assert [e for e in a.events() if isinstance(e, NeedPermission)] == [
        NeedPermission("relay", ("198.51.100.2", 5000))
    ]


def test_optimistic_media_goes_to_public_candidates_first_until_a_path_works() -> None:
    sim = Sim()
    a, b = pair_of_agents(sim)
    nat_pair(sim, a, b)
    a.add_remote(Candidate.make("host", ("10.2.0.10", 5000)), 0.0)
    assert a.media_routes(0.0) == []  # no keys: nothing is sent at all
    a.set_keys(KEYS_A, 0.0)
    assert a.media_routes(0.01) == [("udp", "198.51.100.2", 5000), ("udp", "10.2.0.10", 5000)]
    assert a.media_routes(5.0) == []  # the guess expires
    b.set_keys(KEYS_B, 0.0)
    sim.run(1.0)
    assert a.media_routes(5.0) == [("udp", "198.51.100.2", 5000)]
    assert all(p.state is not PairState.FAILED for p in a._pairs.values() if p.base == "udp")


def test_birthday_probing_finds_a_random_symmetric_nat_within_seconds() -> None:
    """The hard side opens 256 sockets (each a random public port, each filtering all but the
    easy side); the easy side probes random ports at the configured rate until one answers."""
    import random

    sim = Sim()
    easy, hard = pair_of_agents(sim)
    sim.base("a", "udp", ("198.51.100.1", 4000), True)
    easy.add_base("udp", [Candidate.make("srflx", ("198.51.100.1", 4000))], 0.0)
    rng = random.Random(7)
    for n, port in enumerate(rng.sample(range(1024, 65536), 256)):
        sim.base("b", f"b{n}", ("198.51.100.2", port), True)
        hard.add_base(f"b{n}", [], 0.0, slow=True)
    hard.add_remote(Candidate.make("srflx", ("198.51.100.1", 4000)), 0.0)
    easy.set_keys(KEYS_A, 0.0)
    hard.set_keys(KEYS_B, 0.0)
    easy.probe("198.51.100.2", 0.0)
    sim.run(12.0)
    assert easy.selected is not None
    assert hard.selected is not None
    assert easy.selected.remote.address[0] == "198.51.100.2"
    assert easy.selected.valid_since is not None
    assert easy.selected.valid_since < 10.0
    found = sim.events["a"][0]
    assert found.label == "direct"
    probes = easy.counters["probes_sent"]
    assert probes <= 250 * 12 + 64
    # bounded chatter from the hard side: one check per socket, then one per 5 s until one
    # socket gets through; the others are then released
    assert hard.counters["checks_sent"] <= 256 * 4
    assert len(sim.released["b"]) == 255


def _reasons(sim: Sim, name: str) -> list[tuple[str, str]]:
    return [(e.label, e.reason) for e in sim.events[name]]


def test_after_a_nat_rebinding_a_restart_brings_the_direct_path_back_within_a_round_trip() -> None:
    """A's NAT maps its socket to a new port mid-call. B's port-filtering NAT drops A's checks
    from there, and nothing reaches the old port: consent fails over to the relay. A learns
    its new address (STUN, in the daemon) and restarts; B hears of it through signalling and
    restarts too, its checks open B's NAT towards A's new port, and the direct path is back."""
    sim, a, b = keyed_agents(relay_and_direct)
    sim.run(3.0)
    assert a.selected is not None
    assert a.selected.base == "udp"
    moved = ("198.51.100.1", 4444)
    sim.rebind("a", "udp", moved)
    sim.run(3.0 + 1.5)
    assert _reasons(sim, "a")[-1] == ("relay-udp", "failover")
    # the adapter heard of the stall well before consent ran out (it asks STUN then)
    assert sim.stalled["a"]
    assert 3.0 < sim.stalled["a"][0] <= 3.0 + 0.9
    # A's STUN answer: the new mapping; its restart reaches B one signalling hop later
    a.replace_local("udp", [Candidate.make("srflx", moved)])
    a.restart(sim.now)
    sim.run(sim.now + 0.05)
    offered = [Candidate.make("srflx", moved),
               Candidate.make("relay", ("203.0.113.9", 50000), via="udp")]  # fmt: skip
    b.peer_restarted(offered, sim.now)
    restarted = sim.now
    sim.run(restarted + 1.0)
    assert _reasons(sim, "a")[-1] == ("direct", "restart")
    assert a.selected is not None
    assert b.selected is not None
    assert b.selected.route == ("udp", *moved)
    assert a.selected.valid_since is not None
    assert a.selected.valid_since - restarted < 0.3
    assert a.counters["restarts"] == 1
    assert b.counters["restarts"] == 1
    assert b.remote_candidates("srflx") == [Candidate.make("srflx", moved)]  # the old one is gone
    sim.run(sim.now + 5.0)  # and it stays: no flapping back to the relay
    assert a.selected is not None
    assert a.selected.base == "udp"


def test_a_host_that_moves_networks_comes_back_on_a_new_relay_allocation_and_direct() -> None:
    """The laptop joins another network: new host address, new NAT, and its relay allocation
    (bound to the old addresses) is dead. It re-allocates and rebases the relay; the new
    allocation lets B's addresses in again, and the call comes back, direct."""
    sim, a, b = keyed_agents(relay_and_direct)
    sim.run(3.0)
    a.events()
    moved = ("192.0.2.50", 6000)
    sim.rebind("a", "udp", moved)
    sim.remove("a", "relay")
    sim.run(3.5)
    a.replace_local("udp", [Candidate.make("srflx", moved)])
    a.restart(sim.now)
    new_relay = Candidate.make("relay", ("203.0.113.9", 50001), via="udp")
    sim.base("a", "relay", new_relay.address, True)
    a.rebase("relay", [new_relay], sim.now, relay_via="udp")
    assert {e.address for e in a.events() if isinstance(e, NeedPermission)} == {
        ("198.51.100.2", 5000)
    }
    sim.by_name[("a", "relay")].opened.add(("198.51.100.2", 5000))
    sim.run(sim.now + 0.05)
    b.peer_restarted([Candidate.make("srflx", moved), new_relay], sim.now)
    restarted = sim.now
    sim.run(restarted + 1.5)
    assert a.selected is not None
    assert b.selected is not None
    assert (a.selected.base, b.selected.route) == ("udp", ("udp", *moved))
    # A restarted before its consent ran out: its pair answered again in time, no switch at
    # all (reported as the restart's); B's old pair (to A's old address) died and B moved to
    # the new one
    assert _reasons(sim, "a") == [("direct", "first path"), ("direct", "restart")]
    assert _reasons(sim, "b")[-1] == ("direct", "restart")
    assert {c.address for c in b.remote_candidates("relay")} == {new_relay.address}
    states = {p.remote.address[1]: p.state for p in b._pairs.values() if p.base == "udp"}
    assert states[50001] is PairState.VALID  # b reaches a's new allocation as a backup


def test_a_restart_that_changed_nothing_keeps_the_path_without_a_gap() -> None:
    sim, a, b = keyed_agents(relay_and_direct)
    sim.run(3.0)
    before = _reasons(sim, "a")
    selected = a.selected
    a.restart(sim.now)
    b.peer_restarted([Candidate.make("srflx", ("198.51.100.1", 4000)),
                      Candidate.make("relay", ("203.0.113.9", 50000), via="udp")],
                     sim.now)  # fmt: skip
    sim.run(sim.now + 3.0)
    assert _reasons(sim, "a") == before
    assert a.selected is selected
    # the relay pairs were proven again and are ready to fail over to
    assert {p["state"] for p in a.pairs()} == {"valid"}


def test_keepalives_are_sized_to_the_measured_mapping_lifetime_within_bounds() -> None:
    assert keepalive_interval(None, 1.5, 0.5) == 1.5  # unknown: the configured interval
    assert keepalive_interval(120.0, 1.5, 0.5) == 1.5  # liveness needs it this often anyway
    assert keepalive_interval(2.0, 1.5, 0.5) == 1.0  # a NAT that forgets in 2 s
    assert keepalive_interval(0.3, 1.5, 0.5) == 0.5  # never a flood
    assert keepalive_interval(30.0, 20.0, 2.0) == 15.0  # the media socket's reflexive refresh


def test_an_announced_address_first_seen_as_peer_reflexive_is_tried_from_every_base() -> None:
    """After a rebinding the peer's new address often checks our relay before its restart
    signal arrives: the announced candidate must still be paired with our other bases."""
    sim = Sim()
    a, b = pair_of_agents(sim)
    relay_and_direct(sim, a, b)
    b.set_keys(KEYS_B, 0.0)
    a.set_keys(KEYS_A, 0.0)
    sim.run(1.0)
    b.handle_timer(1.0)
    b.transmit()
    # a check of b's arrives at a's relay from an address b never announced
    b.add_base("other", [], 1.0)
    b.add_remote(Candidate.make("relay", ("203.0.113.9", 50000), via="udp"), 1.0)
    b.handle_timer(1.1)
    checks = [d for r, d in b.transmit() if r[0] == "other"]
    assert checks
    a.receive("relay", checks[0], ("198.51.100.2", 7777), 1.1)
    assert [c.address for c in a.remote_candidates("prflx")] == [("198.51.100.2", 7777)]
    assert a.add_remote(Candidate.make("srflx", ("198.51.100.2", 7777)), 1.2)
    bases = {p["base"] for p in a.pairs() if p["remote"] == ["198.51.100.2", 7777]}
    assert bases == {"udp", "relay"}


def test_a_restart_that_revives_the_stalled_path_in_use_is_reported_without_a_switch() -> None:
    """A rebinding noticed quickly (the path stalled, STUN showed a new mapping): both sides
    restart before consent runs out, and the pair in use answers again, no failover."""
    sim, a, b = keyed_agents(relay_and_direct)
    sim.run(3.0)
    moved = ("198.51.100.1", 4444)
    sim.rebind("a", "udp", moved)
    sim.run(3.0 + 0.9)
    stalled = sim.stalled["a"][0]
    a.replace_local("udp", [Candidate.make("srflx", moved)])
    a.restart(stalled + 0.05)  # (the STUN round trip)
    sim.run(stalled + 0.1)
    b.peer_restarted([Candidate.make("srflx", moved)], sim.now)
    # b leaves the address a withdrew as soon as the new one answers, not when consent on
    # the old one runs out (about 4.2 here)
    sim.run(sim.now + 0.3)
    assert b.selected is not None
    assert b.selected.route == ("udp", *moved)
    assert sim.now < 4.1
    assert _reasons(sim, "b")[-1] == ("direct", "restart")
    sim.run(sim.now + 2.0)
    assert _reasons(sim, "a") == [("direct", "first path"), ("direct", "restart")]
    assert a.selected is not None
    assert a.selected.route == ("udp", "198.51.100.2", 5000)
