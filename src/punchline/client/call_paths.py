"""The I/O side of one call's connectivity agent: the sockets and relay allocation it uses.

The agent (`connect.agent`) decides; this adapter owns what the decisions need: the daemon's
media socket (base `udp`), a relay allocation made for the call (base `relay`, started at
once so a path exists within the relay's setup time even when nothing direct works), and for
NATs that allocate ports in sequence a port-prediction socket (base `predict`). New local
candidates (the relay's address, predicted ports) are trickled to the peer through the
supernodes as they appear; the peer's are added as they arrive.

When our addresses change under the call (the daemon notices: a new reflexive address, new
host addresses) `network_changed` restarts the agent with the new candidates, renews the relay
allocation (a UDP allocation is bound to the old address and port, a TCP one to a connection
through the old NAT) and sends the peer everything it can reach us at now, flagged `restart`;
the new relay address follows as an ordinary trickle once allocated. A relay allocation that
ends by itself mid-call (refused refresh, expiry, closed connection) is renewed the same way.
When the path in use stalls (unanswered for `stall_after`) or loses consent, `on_lost` asks
the daemon to look for such a change at once rather than at its next periodic check.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from punchline.client.relay_path import RelayPath
from punchline.connect import candidates as cand
from punchline.connect.agent import (
    Agent,
    AgentConfig,
    NeedPermission,
    PathChanged,
    Released,
    Route,
    Stalled,
    lan_only,
)
from punchline.connect.candidates import Address, Candidate
from punchline.crypto.handshake import SessionKeys
from punchline.errors import PunchlineError
from punchline.nat.discovery import APDM, EIM
from punchline.relay.connection import TurnConnection
from punchline.util.tasks import Tasks
from punchline.wire import stun

log = structlog.get_logger(component="paths")

# How far past the last mapped port a sequential NAT's next mappings are expected to land.
PREDICTED_PORTS = 8
# Media packets held while no path exists yet (10 = 200 ms of audio).
EARLY_FRAMES = 10


# Birthday probing: sockets opened on the hard (random symmetric) side.
BIRTHDAY_SOCKETS = 512
# A standing relay (shared by calls, renewed by the daemon) is waited for this long after a
# network change before the call gives up on its relay path.
STANDING_RELAY_WAIT = 15.0

Trickle = Callable[[list[dict[str, Any]], bool], None]


class _BaseSocket(asyncio.DatagramProtocol):
    """An extra socket of the call (prediction, birthday probing), named as the agent's base."""

    def __init__(self, paths: CallPaths, base: str) -> None:
        self.paths, self.base = paths, base

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.paths.received(self.base, data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP for a guessed port that was wrong: expected, the check just fails


def _kinds(kinds: frozenset[str]) -> Callable[[Candidate], bool]:
    return lambda candidate: candidate.kind in kinds


def _public(kinds: frozenset[str]) -> Callable[[Candidate], bool]:
    """These kinds, and public host addresses (a peer with no NAT)."""
    return lambda c: c.kind in kinds or (c.kind == "host" and not lan_only(c.address[0]))


def _same_lan(local: list[Candidate]) -> Callable[[Candidate], bool]:
    """Only peers on one of our own /24 networks (anything else would cross the NAT)."""
    nets = {c.address[0].rsplit(".", 1)[0] for c in local if c.kind == "host"}
    return lambda c: c.kind == "host" and c.address[0].rsplit(".", 1)[0] in nets


def _symmetric(nat: dict[str, Any] | None) -> bool:
    return nat is not None and nat.get("mapping") not in (None, EIM)


@dataclass
class PathsConfig:
    agent: AgentConfig
    # Offer only the relay (`punchline up --relay-only`).
    relay_only: bool = False


class CallPaths:
    def __init__(
        self,
        controlling: bool,
        now: float,
        media_sock: asyncio.DatagramTransport,
        local: list[Candidate],
        trickle: Trickle,
        on_media: Callable[[bytes, float], bool],
        config: PathsConfig,
        nat: dict[str, Any] | None = None,
        stun_server: Address | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        """`nat` is what discovery found about our NAT (`NatReport.as_json()`), `stun_server`
        a supernode's UDP address to learn a fresh socket's mapping from. `trickle(items,
        restart)` sends candidates to the peer; `on_lost()` is called when the path in use
        stopped answering."""
        self.agent = Agent(controlling, now, config.agent)
        self.config = config
        self._media_sock = media_sock
        self._trickle = trickle
        self._on_media = on_media
        self._on_lost = on_lost
        # what the media socket offers (kept in relay-only mode too, to notice changes)
        self._udp_local = list(local)
        self._relay: RelayPath | None = None
        self._own_relay = False
        self._sockets: dict[str, asyncio.DatagramTransport] = {}
        self._stun_waiters: dict[bytes, asyncio.Future[Address]] = {}
        self._tasks = Tasks()
        self.paths: list[dict[str, Any]] = []
        self._early: list[bytes] = []
        self._early_in: list[bytes] = []
        self._predicted = asyncio.Event()
        self._reopening = False
        self.restarts = 0
        self.started = now
        self.local = [] if config.relay_only else list(local)
        self.nat = nat
        self.closed = False
        if config.relay_only:
            return
        if _symmetric(nat) and nat is not None and nat.get("allocation") == "sequential":
            # every new destination of the media socket would take a port of the sequence
            # the predicted candidates count on: it only talks to LAN peers
            self.agent.add_base("udp", self.local, now, accept=_same_lan(self.local))
            if stun_server is not None:
                self._tasks.spawn(self._predict(stun_server, int(nat.get("delta") or 1)))
                return
        else:
            self.agent.add_base("udp", self.local, now)
        self._predicted.set()

    # ----------------------------------------------------------------- gathering

    def use_relay(self, relay: RelayPath, owned: bool, now: float) -> None:
        """Add the relay base: `relay` holds (or is opening) an allocation; `owned` ones are
        released with the call, shared standing ones are not."""
        self._relay, self._own_relay = relay, owned
        if relay.connection is not None:
            self._relay_ready(now)
        elif owned:
            self._tasks.spawn(self._open_relay(relay))

    async def _open_relay(self, relay: RelayPath) -> None:
        # after port prediction's mapping: the relay's socket takes a port of the sequence too
        self._reopening = True  # (a network change meanwhile must not open a second one)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._predicted.wait(), 2.0)
            await relay.open()
        except PunchlineError as exc:
            log.warning("no relay for this call", reason=str(exc))
            return
        finally:
            self._reopening = False
        if self.closed:
            await relay.close()
            return
        self._relay_ready(time.time())

    def _relay_ready(self, now: float) -> None:
        relay = self._relay
        assert relay is not None
        assert relay.connection is not None
        via = relay.label.removeprefix("relay-")
        candidate = Candidate.make("relay", relay.connection.relayed, via=via)
        self.local = [c for c in self.local if c.kind != "relay"]
        self.agent.rebase("relay", [candidate], now, relay_via=via)
        self._share([candidate])
        if self._own_relay:
            self._tasks.spawn(self._watch_relay(relay, relay.connection))

    async def _watch_relay(self, relay: RelayPath, connection: TurnConnection) -> None:
        """An allocation of ours that ends mid-call (a refresh refused or unanswered, the
        TCP connection closed) is renewed: the relay is the path of last resort."""
        reason = await connection.wait_closed()
        if self.closed or relay.connection is not connection:
            return  # released by us, or already replaced
        log.warning("relay allocation lost mid-call; allocating again", reason=reason)
        self._renew_relay()

    def _renew_relay(self) -> bool:
        """A fresh allocation (ours) or the daemon's renewed standing one; True if under way."""
        relay = self._relay
        if relay is None or self.closed:
            return False
        if self._own_relay:
            self._tasks.spawn(self._reopen_relay(relay, relay.connection))
        else:
            self._tasks.spawn(self._follow_standing(relay, relay.connection))
        return True

    async def _reopen_relay(self, relay: RelayPath, old: TurnConnection | None) -> None:
        if self._reopening:
            return
        self._reopening = True
        try:
            await relay.open()
        except PunchlineError as exc:
            log.warning("no new relay allocation after the network changed", reason=str(exc))
            return
        finally:
            self._reopening = False
        if old is not None and old is not relay.connection:
            self._tasks.spawn(_quietly_close(old))
        if self.closed:
            await relay.close()
            return
        self._relay_ready(time.time())
        log.info("relay allocated again", label=relay.label)
        self.pump(time.time())

    async def _follow_standing(self, relay: RelayPath, old: TurnConnection | None) -> None:
        """The daemon renews its standing allocation on a network change: use the new one."""
        deadline = time.monotonic() + STANDING_RELAY_WAIT
        while time.monotonic() < deadline and not self.closed:
            current = relay.connection
            if current is not None and current is not old and current.closed_reason is None:
                self._relay_ready(time.time())
                self.pump(time.time())
                return
            await asyncio.sleep(0.05)

    async def _open(self, base: str) -> asyncio.DatagramTransport:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _BaseSocket(self, base),
            local_addr=("0.0.0.0", 0),  # noqa: S104
        )
        self._sockets[base] = transport
        return transport

    async def _mapping(self, transport: asyncio.DatagramTransport, server: Address) -> Address:
        """The public address of a fresh socket, as a supernode sees it (STUN)."""
        request = stun.binding_request()
        waiter: asyncio.Future[Address] = asyncio.get_running_loop().create_future()
        self._stun_waiters[request[8:20]] = waiter
        try:
            for _attempt in range(3):
                transport.sendto(request, server)
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(waiter), 0.5)
            raise TimeoutError
        finally:
            self._stun_waiters.pop(request[8:20], None)

    async def _predict(self, stun_server: Address, delta: int) -> None:
        """A fresh socket for a NAT that allocates ports in sequence: learn the port of its
        first mapping, then offer the next few as candidates. Its first packets to the peer
        (and nothing else) take those ports in order, so both sides' guesses line up."""
        transport = await self._open("predict")
        try:
            host, port = await self._mapping(transport, stun_server)
        except TimeoutError:
            log.info("no mapping for port prediction: the supernode did not answer")
            return
        finally:
            self._predicted.set()
        if self.closed:
            return
        predicted = [
            Candidate.make("predicted", (host, port + delta * n), 65535 - n)
            for n in range(1, PREDICTED_PORTS + 1)
            if 0 < port + delta * n <= 65535
        ]
        kinds = frozenset({"srflx", "predicted", "mapped", "prflx"})
        self.agent.add_base("predict", predicted, time.time(), accept=_public(kinds))
        log.info("ports predicted", first=predicted[0].address if predicted else None,
                 delta=delta)  # fmt: skip
        self._share(predicted)

    def plan(self, peer_nat: object, now: float) -> None:
        """What the two NATs call for, once the peer's is known: birthday probing when one
        side maps every destination to a random port and the other filters by port."""
        if self.config.relay_only or not isinstance(peer_nat, dict) or self.nat is None:
            return
        mine, theirs = self.nat, peer_nat
        random_mine = _symmetric(mine) and mine.get("allocation") == "random"
        random_theirs = _symmetric(theirs) and theirs.get("allocation") == "random"
        if random_mine and theirs.get("mapping") == EIM and theirs.get("filtering") == APDM:
            self._tasks.spawn(self._birthday_sockets(now))
        elif random_theirs and mine.get("mapping") == EIM and mine.get("filtering") == APDM:
            target = theirs.get("ip")
            try:
                ipaddress.IPv4Address(target)
            except ValueError:
                return
            log.info("birthday probing", peer=target)
            self.agent.probe(str(target), now)

    async def _birthday_sockets(self, now: float) -> None:
        """The hard side of birthday probing: many sockets, each checking the peer's one
        public address (a mapping each), for the peer's random probes to find one."""
        accept = _kinds(frozenset({"srflx", "prflx"}))
        for n in range(BIRTHDAY_SOCKETS):
            if self.closed:
                return
            base = f"bday{n}"
            await self._open(base)
            self.agent.add_base(base, [], now, accept=accept, slow=True)
        log.info("birthday sockets open", count=BIRTHDAY_SOCKETS)
        self.pump(time.time())

    def _share(self, found: list[Candidate]) -> None:
        self.local += found
        self._trickle([c.as_json() for c in found], False)

    # ----------------------------------------------------------------- network changes

    def network_changed(self, local: list[Candidate], now: float) -> bool:
        """The media socket's candidates as they are now (`local`); when some the call offers
        are gone, restart: True if it did. New ones alone (a reflexive address learned after
        the call started, a port the router mapped late) are only trickled."""
        offered = {(c.kind, c.address) for c in self._udp_local}
        current = {(c.kind, c.address) for c in local}
        if self.closed or current == offered:
            return False
        if offered <= current:
            added = [c for c in local if (c.kind, c.address) not in offered]
            self._udp_local = list(local)
            if not self.config.relay_only:
                for candidate in added:
                    self.agent.add_local("udp", candidate)
                self._share(added)
            return False
        gone = sorted({c.address for c in self._udp_local} - {c.address for c in local})
        log.info("our addresses changed mid-call: restarting connectivity",
                 gone=gone, now=[c.address for c in local])  # fmt: skip
        self._udp_local = list(local)
        renewing = self._renew_relay()
        kept = [c for c in self.local if c.kind == "predicted" or (c.kind == "relay" and
                                                                    not renewing)]  # fmt: skip
        if self.config.relay_only:
            self.local = kept
        else:
            self.local = [*local, *kept]
            self.agent.replace_local("udp", local)
        self.agent.restart(now)
        self.restarts += 1
        self._trickle([c.as_json() for c in self.local], True)
        self.pump(now)
        return True

    def peer_restarted(self, items: object, now: float) -> int:
        """The peer's addresses changed and `items` is all it offers now; returns drops."""
        found, dropped = cand.decode_list_untrusted(items)
        log.info("the peer's addresses changed: restarting connectivity", offered=len(found))
        self.agent.peer_restarted(found, now)
        self.pump(now)
        return dropped

    def add_remote(self, items: object, now: float) -> int:
        """The peer's candidates (from the invite, the answer or a trickle); returns drops."""
        found, dropped = cand.decode_list_untrusted(items)
        for candidate in found:
            self.agent.add_remote(candidate, now)
        return dropped

    def set_keys(self, keys: SessionKeys, now: float) -> None:
        """The call is answered: checks start, and media that arrived early is handed over."""
        self.agent.set_keys(keys, now)
        early, self._early_in = self._early_in, []
        for data in early:
            self._on_media(data, now)

    # ----------------------------------------------------------------- traffic

    def received(self, base: str, data: bytes, source: Address) -> None:
        now = time.time()
        if data[:1] in (b"\x00", b"\x01"):
            if self._stun_waiters and self._mapping_answer(data):
                return
            self.agent.receive(base, data, source, now)
            self.pump(now)
        elif not self._on_media(data, now) and len(self._early_in) < EARLY_FRAMES:
            # media that beat the answer here (it carries no keys to check it with yet)
            self._early_in.append(data)

    def _mapping_answer(self, data: bytes) -> bool:
        try:
            message = stun.decode_untrusted(data)
        except stun.StunError:
            return False
        waiter = self._stun_waiters.get(message.transaction_id)
        mapped = stun.mapped_address_untrusted(message)
        if waiter is None or mapped is None:
            return False
        if not waiter.done():
            waiter.set_result(mapped)
        return True

    def relayed_data(self, data: bytes, peer: Address) -> None:
        self.received("relay", data, peer)

    def send_media(self, data: bytes, now: float) -> None:
        """Send on the path in use; before there is one, hold the last few frames and send
        them the moment a path works, so the first words are not lost to path setup."""
        routes = self.agent.media_routes(now)
        if not routes:
            self._early.append(data)
            del self._early[:-EARLY_FRAMES]
            return
        early, self._early = self._early, []
        for route in routes:
            for packet in [*early, data]:
                self._send(route, packet)

    def _send(self, route: Route, data: bytes) -> None:
        base, address = route[0], (route[1], route[2])
        if base == "udp":
            self._media_sock.sendto(data, address)
        elif base == "relay":
            if self._relay is not None and self._relay.connection is not None:
                self._relay.connection.send(data, address)
        elif base in self._sockets:
            self._sockets[base].sendto(data, address)

    def pump(self, now: float) -> None:
        if self.closed:
            return
        self.agent.handle_timer(now)
        for route, data in self.agent.transmit():
            self._send(route, data)
        for event in self.agent.events():
            if isinstance(event, NeedPermission):
                if self._relay is not None and self._relay.connection is not None:
                    self._relay.connection.add_peer(event.address)
            elif isinstance(event, PathChanged):
                self._changed(event, now)
            elif isinstance(event, Stalled):
                if self._on_lost is not None:
                    self._on_lost()  # perhaps our own addresses changed: find out now
            elif isinstance(event, Released):
                for base in event.bases:
                    transport = self._sockets.pop(base, None)
                    if transport is not None:
                        transport.close()

    def _changed(self, event: PathChanged, now: float) -> None:
        entry = {"path": event.label, "local": event.local, "remote": event.remote,
                 "reason": event.reason, "at_ms": round((now - self.started) * 1000)}  # fmt: skip
        self.paths.append(entry)
        log.info("media path", **entry)
        if event.reason == "failover" and self._on_lost is not None:
            self._on_lost()  # perhaps our own addresses changed: find out now

    def next_timer(self) -> float:
        return self.agent.next_timer()

    @property
    def label(self) -> str | None:
        return self.paths[-1]["path"] if self.paths else None

    # ----------------------------------------------------------------- end

    async def close(self) -> None:
        self.closed = True
        self.agent.close()
        self._tasks.cancel()
        for transport in self._sockets.values():
            transport.close()
        self._sockets = {}
        if self._relay is not None and self._own_relay:
            with contextlib.suppress(Exception):
                await self._relay.close()

    def status(self) -> dict[str, Any]:
        return {"path": self.label, "pairs": self.agent.pairs(), "counters": self.agent.counters,
                "restarts": self.restarts}  # fmt: skip


async def _quietly_close(connection: TurnConnection) -> None:
    """Release an allocation that is probably dead already (its answer may never come)."""
    with contextlib.suppress(Exception):
        await connection.close()
