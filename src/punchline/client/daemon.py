"""The client daemon (`punchline up`): online presence, calls and media for one user.

It attaches to the supernode that answers first among a few from the CA-signed bootstrap list
(the lowest round-trip time), publishes a signed presence record through it and keeps the
session alive; when the supernode stops answering it re-attaches to another within seconds and
republishes. Calls are set up with `call.signaling.Call` through the supernodes; media flows
peer to peer, so losing a supernode mid-call does not touch the audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import psutil
import structlog

from punchline.call.media import Address, MediaConfig, MediaSession
from punchline.call.signaling import (
    ANSWERED_ON_ANOTHER_DEVICE,
    DECLINED_ON_ANOTHER_DEVICE,
    Call,
    CallConfig,
    CallState,
)
from punchline.client import account, auth_client, control
from punchline.client.call_paths import CallPaths, PathsConfig
from punchline.client.contacts import Contacts
from punchline.client.directory import DirectoryClient
from punchline.client.relay_path import RelayPath
from punchline.client.store import IdentityStore
from punchline.client.supernode_link import (
    DatagramLink,
    Ladder,
    Link,
    StreamLink,
    Supernode,
    stream_channel,
    supernodes_in,
)
from punchline.connect.agent import AgentConfig
from punchline.connect.candidates import Candidate
from punchline.connect.keepalive import keepalive_interval
from punchline.crypto import handshake
from punchline.errors import LocalError, PunchlineError
from punchline.identity import certs, keys
from punchline.nat.discover import NatMonitor, local_ipv4
from punchline.nat.discovery import EIM, NatReport
from punchline.relay.connection import ProxyConfig
from punchline.session.channel import ChannelConfig
from punchline.session.outbound import Identity, OutboundSession, State
from punchline.util.tasks import Tasks
from punchline.voice import wav
from punchline.voice.codec import FRAME_MS
from punchline.voice.wav import FrameSource
from punchline.wire import presence, stun
from punchline.wire import session as wire

if TYPE_CHECKING:
    from punchline.connect.portmap import PortMapping

log = structlog.get_logger(component="daemon")


@dataclass(frozen=True)
class DaemonConfig:
    data_dir: Path
    auto_answer: bool = False
    play: Path | None = None
    record: Path | None = None
    # Supernodes probed at once when attaching; the first to answer wins.
    probes: int = 3
    # Attach to this supernode (node id) when it answers, before trying any other.
    prefer: str | None = None
    # A supernode that failed is avoided for this long when re-attaching.
    avoid_failed_for: float = 30.0
    # How often to check whether the certificate is due for renewal.
    renewal_check_interval: float = 600.0
    # Presence records live this long; the supernode keeps them alive in the DHT (custody),
    # the daemon signs a new one when half its life is gone or anything in it changed.
    record_lifetime: float = 1200.0
    # Every this often the daemon re-sends its record (the repair if the supernode lost it)
    # with a fresh pre-signed offline record: its last-seen time is at most this old.
    republish_interval: float = 60.0
    # Media only through a relay node (`punchline up --relay-only`), over this transport
    # (auto: UDP, then TCP, TLS 443, then TLS through `proxy`).
    relay_only: bool = False
    relay_transport: str = "auto"
    proxy: str | None = None
    relay_retry_interval: float = 5.0
    # The daemon's own way to its supernode (`punchline up --supernode-transport`): auto climbs
    # UDP, TCP 443/80, TLS, TLS through `proxy`; the others force one rung (for tests).
    supernode_transport: str = "auto"
    # Allocate a relay for every call (the path that works when nothing direct does).
    call_relay: bool = True
    # The media socket's reflexive address is refreshed this often (and keeps its mapping).
    reflexive_interval: float = 20.0
    # How often the host's addresses are looked at: a laptop that joined another network
    # restarts its call's connectivity within this (plus a STUN round trip).
    network_poll: float = 1.0
    agent: AgentConfig = field(default_factory=AgentConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    call: CallConfig = field(default_factory=CallConfig)
    media: MediaConfig = field(default_factory=MediaConfig)


class Sink(Protocol):
    def write(self, frame: np.ndarray) -> None: ...

    def close(self) -> None: ...


@dataclass
class ActiveCall:
    call: Call
    requested_at: float
    source: FrameSource
    sink: Sink | None
    duration: float | None
    waiters: list[asyncio.Queue[dict[str, Any]]] = field(default_factory=list)
    media: MediaSession | None = None
    connectivity: CallPaths | None = None
    hangup_at: float | None = None
    finished: bool = False


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, daemon: Daemon, kind: str) -> None:
        self.daemon, self.kind = daemon, kind

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.daemon.received(self.kind, data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: on many paths the fastest sign that a supernode died
        self.daemon.socket_error(self.kind, exc)


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.store = IdentityStore(config.data_dir)
        self.identity: Identity | None = None
        self.user = ""
        self.device = ""
        self.supernodes: list[Supernode] = []
        # Sessions being attempted, by the link (UDP address or stream) each talks over.
        self.attempts: dict[Link, tuple[Supernode, OutboundSession]] = {}
        self.link: Link | None = None  # the current session's
        self._attach_started = 0.0
        self._ladder = Ladder(config.supernode_transport, config.proxy, self._stream_packet,
                              self._stream_ended)  # fmt: skip
        self.current: tuple[Supernode, OutboundSession] | None = None
        self.reflexive: Address | None = None
        # The media socket's own mapping, as a supernode saw it (STUN): the srflx candidate.
        self.media_reflexive: Address | None = None
        self._reflexive_probes: dict[bytes, float] = {}
        # Who waits for the next reflexive answer (a network change being looked into).
        self._reflexive_waiters: list[asyncio.Future[Address]] = []
        self._network_changed_at = float("-inf")
        self._rechecking = False
        self.port_mapping: PortMapping | None = None
        # The sequence number of the presence record the index confirmed holding, if current.
        self.published_seq: int | None = None
        self.avoid: dict[str, float] = {}
        self.call: ActiveCall | None = None
        self._seen_invites: dict[bytes, float] = {}
        self._seq = int(time.time() * 1000)
        self._next_publish = float("inf")
        # The current signed online record and what it was made from (re-signed on change).
        self._record: dict[str, Any] | None = None
        self._record_seq = 0
        self._record_made: tuple[Any, ...] = ()
        self._record_until = 0.0
        self.presence_status = "online"  # or away / busy: `punchline status --set`
        self._lookups: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._signal_ids = itertools.count(1)
        self._signal_sock: asyncio.DatagramTransport | None = None
        self._media_sock: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks = Tasks()
        self._stop = asyncio.Event()
        self.counters = {"replayed_invites": 0, "forged_invites": 0, "malformed": 0,
                         "bad_candidates": 0}  # fmt: skip
        self._pending_answer: dict[str, Any] = {}
        self._retry_at = 0.0
        self.contacts: Contacts | None = None  # the user's contact list, once started
        self.directory = DirectoryClient(config.data_dir)  # opt-in listing and searches
        self.relay: RelayPath | None = None
        # What our NAT does (nat.discovery), once measured in the background; the
        # connectivity engine reads `allocation` / `delta` from it for port prediction.
        self.nat: NatReport | None = None
        if config.relay_only:
            proxy = ProxyConfig.parse(config.proxy) if config.proxy else None
            self.relay = RelayPath(self.store, self._relayed_data, config.relay_transport, proxy)

    # ----------------------------------------------------------------- start

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    async def start(self) -> None:
        try:
            freshness = await asyncio.to_thread(account.ensure_fresh, self.store, time.time())
        except certs.CertificateExpired as exc:
            raise LocalError(
                f"{exc}; log in again with `punchline login NAME` to get a new certificate"
            ) from exc
        ca = self.store.pinned_ca()
        assert ca is not None
        await asyncio.to_thread(account.refresh_bootstrap, self.store)
        self.identity = Identity(self.store.key(), self.store.certificate(), ca)
        self.user = freshness.identity.profile.user
        self.device = keys.key_id(self.identity.key.public_key())
        self.contacts = Contacts.open(self.store, self.user, self.device, self.identity.key,
                                      self.identity.certificate, ca)  # fmt: skip
        self.supernodes = self._bootstrap_supernodes()
        if not self.supernodes:
            raise LocalError("the cached bootstrap list names no supernode; log in again later")
        loop = asyncio.get_running_loop()
        self._signal_sock, _ = await loop.create_datagram_endpoint(
            lambda: _Socket(self, "signal"),
            local_addr=("0.0.0.0", 0),  # noqa: S104
        )
        self._media_sock, _ = await loop.create_datagram_endpoint(
            lambda: _Socket(self, "media"),
            local_addr=("0.0.0.0", 0),  # noqa: S104
        )
        self._control = await control.serve(self.config.data_dir, self._control_request)
        log.info("daemon started", user=self.user, device=self.device,
                 supernodes=len(self.supernodes))  # fmt: skip
        self._attach(time.time())
        self._tasks.spawn(self._renewals())
        self._tasks.spawn(NatMonitor(
            lambda: [s.address for s in self.supernodes],
            self._nat_report,
            lambda: self.current is not None, lambda: self.reflexive,
        ).run())  # fmt: skip
        self._tasks.spawn(self._keep_reflexive())
        self._tasks.spawn(self._watch_network())
        self._tasks.spawn(self._map_port())
        if self.relay is not None:
            self._tasks.spawn(self._keep_relay(self.relay))

    async def _keep_relay(self, relay: RelayPath) -> None:
        """Relay-only mode: hold an allocation all the time, so a call's audio flows at once."""
        while True:
            try:
                connection = await relay.open()
            except PunchlineError as exc:
                log.warning("no relay allocation; retrying", reason=str(exc))
                await asyncio.sleep(self.config.relay_retry_interval)
                continue
            reason = await connection.wait_closed()
            log.warning("relay allocation lost; allocating again", reason=reason)
            relay.connection = None

    def _relayed_data(self, data: bytes, peer: Address) -> None:
        paths = self.call.connectivity if self.call is not None else None
        if paths is not None:
            paths.relayed_data(data, peer)

    # ----------------------------------------------------------------- reflexive address

    def _stun_server(self) -> Address | None:
        """The current supernode's UDP port (supernodes answer STUN there), else the first."""
        if self.current is not None:
            return self.current[0].address
        return self.supernodes[0].address if self.supernodes else None

    async def _keep_reflexive(self) -> None:
        """Keep the media socket's mapping open and known, so a call's candidates are ready
        before it starts (no gathering wait); asked of the current supernode."""
        while True:
            self._probe_reflexive()
            await asyncio.sleep(self._reflexive_interval())
            cutoff = time.time() - 10
            self._reflexive_probes = {t: at for t, at in self._reflexive_probes.items()
                                      if at > cutoff}  # fmt: skip

    def _probe_reflexive(self) -> None:
        server = self._stun_server()
        if self._media_sock is not None and server is not None:
            request = stun.binding_request()
            self._reflexive_probes[request[8:20]] = time.time()
            self._media_sock.sendto(request, server)

    async def _map_port(self) -> None:
        """Ask the router for a port (PCP, NAT-PMP, UPnP-IGD): where it says yes, peers reach
        the media socket directly whatever the NAT's own behaviour (a `mapped` candidate)."""
        from punchline.connect.portmap import map_udp_port

        assert self._media_sock is not None
        port = int(self._media_sock.get_extra_info("sockname")[1])
        mapping = await map_udp_port(port)
        if mapping is None:
            return
        self.port_mapping = mapping
        log.info("router mapped a port", external=mapping.external, protocol=mapping.protocol)

    def _nat_report(self, report: NatReport) -> None:
        """A new NAT report: the supernode session's keepalives follow its mapping lifetime."""
        self.nat = report
        if self.current is not None and isinstance(self.link, DatagramLink):
            channel = self._udp_channel()
            session = self.current[1]
            session.config = channel
            if session.channel is not None:
                session.channel.config = channel

    def _udp_channel(self) -> ChannelConfig:
        """The session's channel over UDP: pings (which also keep its NAT mapping open) at
        most every half mapping lifetime, and never rarer than the configured interval, which
        is what noticing a dead supernode within seconds needs."""
        config = self.config.channel
        lifetime = self.nat.mapping_lifetime_s if self.nat is not None else None
        if config.ping_interval is None:
            return config
        ping = keepalive_interval(lifetime, config.ping_interval, 0.5)
        return config if ping == config.ping_interval else replace(config, ping_interval=ping)

    def _reflexive_interval(self) -> float:
        """Soon while unknown; then well inside the NAT's measured idle-mapping lifetime, so
        the mapping (and the candidate the next call offers) stays valid."""
        if self.media_reflexive is None:
            return 0.5
        lifetime = self.nat.mapping_lifetime_s if self.nat is not None else None
        return keepalive_interval(lifetime, self.config.reflexive_interval, 2.0)

    def _reflexive_answer(self, data: bytes) -> bool:
        try:
            message = stun.decode_untrusted(data)
        except stun.StunError:
            return False
        if self._reflexive_probes.pop(message.transaction_id, None) is None:
            return False
        mapped = stun.mapped_address_untrusted(message)
        if mapped is None:
            return True
        waiters = [w for w in self._reflexive_waiters if not w.done()]
        self._reflexive_waiters = []
        for waiter in waiters:
            waiter.set_result(mapped)
        if mapped != self.media_reflexive:
            log.info("reflexive address", address=mapped, previous=self.media_reflexive)
            known = self.media_reflexive is not None
            self.media_reflexive = mapped
            if known and not waiters:  # the periodic refresh found the NAT rebound
                self._network_change("the reflexive address changed")
        return True

    # ----------------------------------------------------------------- network changes

    async def _watch_network(self) -> None:
        """Poll the host's addresses (cheap: one getifaddrs): a laptop that joined another
        network must restart its call and reach its supernode from there within seconds."""
        known = local_ipv4()
        while True:
            await asyncio.sleep(self.config.network_poll)
            current = local_ipv4()
            if current != known:
                log.info("host addresses changed", gone=sorted(known - current),
                         new=sorted(current - known))  # fmt: skip
                known = current
                self._network_change("the host's addresses changed")

    def _network_change(self, why: str) -> None:
        """Our addresses may have changed (new host addresses, a new mapping): make the
        supernode follow us at once, then find the new reflexive address and restart the
        call's connectivity if what it offers changed."""
        self._follow_move()
        self._tasks.spawn(self._recheck_network(why))

    def _follow_move(self) -> None:
        """Our public address changed: the supernode session and a standing relay follow."""
        now = time.time()
        recent = now - self._network_changed_at < 2.0
        self._network_changed_at = now
        if self.current is not None and isinstance(self.link, DatagramLink):
            # any authenticated packet from the new address moves the supernode's session
            node, session = self.current
            session.send({"t": "ping"}, now)
            self._send_signal_packets(session, node.address, now)
        if not recent and self.relay is not None and self.relay.connection is not None:
            # a standing allocation is bound to the old addresses: its keeper opens a new one
            self._tasks.spawn(self.relay.connection.close())

    def _path_lost(self) -> None:
        """The call's path in use stopped answering: perhaps our NAT rebound; ask now."""
        self._tasks.spawn(self._recheck_network("the call's path stopped answering"))

    async def _recheck_network(self, why: str) -> None:
        if self._rechecking:
            return
        self._rechecking = True
        try:
            before = self.media_reflexive
            mapped = await self._ask_reflexive()
            if mapped is not None and before is not None and mapped != before:
                self._follow_move()  # (our signalling socket moved too, surely)
            self._restart_call(why)
        finally:
            self._rechecking = False

    async def _ask_reflexive(self, attempts: int = 3, wait: float = 0.3) -> Address | None:
        """The media socket's mapping, asked of the supernode now (None: no answer)."""
        loop = asyncio.get_running_loop()
        for _attempt in range(attempts):
            waiter: asyncio.Future[Address] = loop.create_future()
            self._reflexive_waiters.append(waiter)
            self._probe_reflexive()
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(waiter, wait)
        return None

    def _restart_call(self, why: str) -> None:
        active = self.call
        if active is None or active.finished or active.connectivity is None:
            return
        now = time.time()
        if active.connectivity.network_changed(self._local_candidates(), now):
            log.info("call connectivity restarted", reason=why, peer=active.call.peer)
            self._pump(now)

    async def _renewals(self) -> None:
        """Renew the certificate while running (it lasts a day); new sessions and the
        presence record carry the fresh one. The login server being away is not an error."""
        while True:
            await asyncio.sleep(self.config.renewal_check_interval)
            freshness = await asyncio.to_thread(account.ensure_fresh, self.store, time.time())
            if await asyncio.to_thread(account.refresh_bootstrap, self.store):
                self.supernodes = self._bootstrap_supernodes() or self.supernodes
            if freshness.renewed and self.identity is not None:
                self.identity = Identity(self.identity.key, self.store.certificate(),
                                         self.identity.ca)  # fmt: skip
                if self.contacts is not None:
                    self.contacts.renewed(self.identity.certificate)
                self._publish(time.time())
                self._pump(time.time())

    def _bootstrap_supernodes(self) -> list[Supernode]:
        listing = self.store.bootstrap() or {}
        return supernodes_in(listing)

    # ----------------------------------------------------------------- attaching

    def _attach(self, now: float) -> None:
        assert self.identity is not None
        fresh = [s for s in self.supernodes if self.avoid.get(s.node_id, 0) <= now]
        if not fresh:
            fresh = self.supernodes  # everything failed recently: try them all again
        probes = self.config.probes
        preferred = [s for s in fresh if s.node_id == self.config.prefer]
        if preferred:
            fresh, probes = preferred, 1  # if it fails, it is avoided and others are probed
        self.attempts = {}
        self._attach_started = now
        chosen = fresh[:probes]
        if self._ladder.udp:
            for node in chosen:
                self._try_link(DatagramLink(node, self._signal_sock), now)
        # TCP, TLS and the proxy join in if UDP has not answered within a moment
        self._ladder.climb(chosen, self.identity.ca, lambda link: self._try_link(link, time.time()))
        if not self.attempts:  # no way to any supernode: try again in a moment, not in a loop
            self._retry_at = now + 1.0
        self._pump(now)

    def _try_link(self, link: Link, now: float) -> None:
        assert self.identity is not None
        node = link.node
        channel = self._udp_channel()
        if link.transport != "udp":
            channel = stream_channel(self.config.channel)
        session = OutboundSession(self.identity, node.node_id, now, config=channel)
        self.attempts[link] = (node, session)
        if isinstance(link, StreamLink):
            log.info("trying supernode", supernode=node.node_id, transport=link.transport,
                     address=link.where)  # fmt: skip
            self._pump(now)

    def _established(self, node: Supernode, session: OutboundSession, now: float) -> None:
        self.current = (node, session)
        for link, (_other, attempt) in self.attempts.items():
            if attempt is session:
                self.link = link
            elif attempt.established:
                attempt.send({"t": "bye"}, now, reliable=False)
                self._send_signal_packets(attempt, link, now)
        self.attempts = {}
        self._ladder.settle(self.link)
        assert self.link is not None
        log.info("attached", supernode=node.node_id, transport=self.link.transport,
                 address=self.link.where, attach_ms=round((now - self._attach_started) * 1000),
                 rtt_ms=None if session.rtt is None else round(session.rtt * 1000, 1))  # fmt: skip
        self._publish(now)
        if self.contacts is not None:
            self.contacts.attached()  # watch again, re-put what this device keeps alive
        if self.link.transport != "udp" and self.relay is None:
            self._standing_relay(self.link.transport)

    def _standing_relay(self, rung: str) -> None:
        """No UDP from here (the supernode only answered over a stream): every call will need
        a relay, so hold one from now on, over the rung that worked, and calls start at once."""
        proxy = self._proxy()
        if rung == "proxy":  # the proxy is the only way out: the login server too (TURN keys)
            auth_client.use_proxy(self.config.proxy)
        self.relay = RelayPath(self.store, self._relayed_data, "auto", proxy,
                               start=rung if rung != "proxy" or proxy else "tls")  # fmt: skip
        log.info("no UDP to the supernodes: holding a relay allocation", rung=rung)
        self._tasks.spawn(self._keep_relay(self.relay))

    def _proxy(self) -> ProxyConfig | None:
        return ProxyConfig.parse(self.config.proxy) if self.config.proxy else None

    def _lost(self, reason: str, now: float) -> None:
        if self.current is None:
            return
        node, _session = self.current
        log.warning("supernode lost; re-attaching", supernode=node.node_id, reason=reason)
        if now - self._network_changed_at > 10.0:  # (else our network moved, not its fault)
            self.avoid[node.node_id] = now + self.config.avoid_failed_for
        self.current = None
        if self.link is not None:
            self.link.close()
            self.link = None
        self.reflexive = None
        self.published_seq = None
        self._attach(now)

    def _publish(self, now: float) -> None:
        if self.current is None or self.identity is None:
            return
        node, session = self.current
        where = {"node_id": node.node_id,
                 "addresses": [{"transport": "udp", "host": node.address[0],
                                "port": node.address[1]}]}  # fmt: skip
        made = (node.node_id, node.address, self.presence_status, self.identity.certificate)
        aged = now > self._record_until - self.config.record_lifetime / 2
        if self._record is None or made != self._record_made or aged:
            self._seq = max(self._seq + 1, int(now * 1000))
            self._record = presence.make(
                self.identity.key, self.identity.certificate, self.user, self.device, where,
                self._seq, now + self.config.record_lifetime, self.presence_status,
            )  # fmt: skip
            self._record_seq, self._record_made = self._seq, made
            self._record_until = now + self.config.record_lifetime
        # What the supernode puts once this daemon is gone: offline, last seen now.
        self._seq = max(self._seq + 1, int(now * 1000))
        offline = presence.make_offline(self.identity.key, self.identity.certificate, self.user,
                                        self.device, where, self._seq, now)  # fmt: skip
        session.send({"t": "publish", "record": self._record, "offline": offline}, now)
        self._next_publish = now + self.config.republish_interval
        self._send_directory(now)

    def _send_directory(self, now: float) -> None:
        """Directory entries, to a supernode that has not taken them yet (client.directory)."""
        if self.current is None or self.identity is None:
            return
        node, session = self.current
        for message in self.directory.outgoing(self.identity, self.user, node.node_id, now):
            session.send(message, now)

    # ----------------------------------------------------------------- network input

    def received(self, kind: str, data: bytes, source: Address) -> None:
        now = time.time()
        if kind == "media":
            if data[:1] in (b"\x00", b"\x01") and self._reflexive_answer(data):
                return
            paths = self.call.connectivity if self.call is not None else None
            if paths is not None:
                paths.received("udp", data, source)
            return
        self._from_supernode(data, self._session_for(source), now)

    def _from_supernode(self, data: bytes, session: OutboundSession | None, now: float) -> None:
        try:
            packet = wire.decode_untrusted(data)
        except wire.SessionPacketError:
            self.counters["malformed"] += 1
            return
        if session is None:
            return
        for message in session.receive_untrusted(packet, now):
            self._message(message, now)
        self._pump(now)

    def _stream_packet(self, link: StreamLink, data: bytes) -> None:
        self._from_supernode(data, self._session_of(link), time.time())

    def _stream_ended(self, link: StreamLink, reason: str) -> None:
        """A TCP/TLS way closed: the current supernode is gone at once; an attempt just failed
        (its session times out like an unanswered UDP one, while other rungs go on)."""
        now = time.time()
        if link is self.link and self.current is not None:
            self._lost(reason, now)
            self._pump(now)
        elif link in self.attempts:
            log.info("supernode attempt failed", supernode=link.node.node_id,
                     transport=link.transport, address=link.where, reason=reason)  # fmt: skip

    def socket_error(self, kind: str, exc: Exception) -> None:
        if kind == "signal" and isinstance(self.link, DatagramLink) and self.current is not None:
            log.info("supernode unreachable", error=str(exc))
            self._lost(f"network error: {exc}", time.time())
            self._pump(time.time())

    def _session_for(self, source: Address) -> OutboundSession | None:
        """The session talking over UDP with `source` (stream links say who they are)."""
        links = [self.link, *self.attempts] if self.current is not None else list(self.attempts)
        for link in links:
            if isinstance(link, DatagramLink) and link.node.address == source:
                return self._session_of(link)
        return None

    def _session_of(self, link: Link) -> OutboundSession | None:
        if link is self.link and self.current is not None:
            return self.current[1]
        attempt = self.attempts.get(link)
        return attempt[1] if attempt else None

    def _message(self, message: dict[str, Any], now: float) -> None:
        kind = message.get("t")
        if kind in Contacts.MESSAGES and self.contacts is not None:
            self.contacts.receive(message, now)
        elif kind in DirectoryClient.MESSAGES:
            self.directory.received(message)
        elif kind == "welcome":
            reflexive = message.get("reflexive")
            if isinstance(reflexive, list) and len(reflexive) == 2:
                self.reflexive = (str(reflexive[0]), int(reflexive[1]))
        elif kind == "published":
            if message.get("seq") == self._record_seq:
                self.published_seq = self._record_seq
        elif kind == "lookup_result":
            ref = message.get("id")
            waiter = self._lookups.pop(ref, None) if isinstance(ref, int) else None
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
        elif kind == "signal":
            self._signal(message, now)
        elif kind == "signal_error":
            if self.call is not None and message.get("to") == self.call.call.peer:
                self.call.call.unreachable(f"{message.get('to')} is offline or unknown", now)
        elif kind == "error":
            log.warning("supernode reported an error", message=message.get("message"))

    # ----------------------------------------------------------------- calls

    def _local_candidates(self) -> list[Candidate]:
        """Host addresses of the media socket (loopback last) and its reflexive address."""
        assert self._media_sock is not None
        port = int(self._media_sock.get_extra_info("sockname")[1])
        hosts = []
        for addrs in psutil.net_if_addrs().values():
            hosts += [a.address for a in addrs if a.family == socket.AF_INET]
        hosts.sort(key=lambda h: h.startswith("127."))
        found = [Candidate.make("host", (h, port), 65535 - n)
                 for n, h in enumerate(dict.fromkeys(hosts))]  # fmt: skip
        mapping = self.port_mapping
        if mapping is not None and not mapping.lost:
            found.append(Candidate.make("mapped", mapping.external))
        reflexive = self.media_reflexive
        # Behind a NAT that allocates in sequence the mapping a supernode saw is useless to a
        # peer and sending to it would take a port the predicted candidates count on; behind a
        # random one it is just as useless, but it tells address-filtering peers whom to expect.
        sequential = self.nat is not None and self.nat.allocation == "sequential"
        if reflexive is not None and not sequential and all(c.address != reflexive for c in found):
            found.append(Candidate.make("srflx", reflexive))
        return found

    def _new_paths(self, controlling: bool, now: float) -> CallPaths:
        """The connectivity of a new call, with its relay allocation already under way."""
        assert self._media_sock is not None
        standing = self.relay
        if self.config.relay_only and (standing is None or standing.connection is None):
            raise LocalError("relay-only mode and no relay allocation yet; try again shortly")
        config = PathsConfig(self.config.agent, relay_only=self.config.relay_only)
        paths: CallPaths

        def trickle(items: list[dict[str, Any]], restart: bool) -> None:
            active = self.call
            if active is None or active.connectivity is not paths:
                return
            if active.call.outgoing or active.call.state is CallState.ACTIVE:
                # (a callee's go in its answer, once accepted)
                active.call.trickle(items, restart=restart)
                asyncio.get_running_loop().call_soon(self._fire)

        paths = CallPaths(controlling, now, self._media_sock, self._local_candidates(), trickle,
                          self._media_in, config, self._nat_hint(),
                          self._stun_server(), on_lost=self._path_lost)  # fmt: skip
        if standing is not None and standing.connection is not None:
            paths.use_relay(standing, False, now)
        elif self.config.call_relay:
            start = "udp" if standing is None else standing.start
            relay = RelayPath(self.store, paths.relayed_data, "auto", self._proxy(), start=start)
            paths.use_relay(relay, True, now)
        return paths

    def _nat_hint(self) -> dict[str, Any] | None:
        """What the peer needs to know of our NAT to pick a strategy (no addresses)."""
        if self.nat is None or not self.nat.udp:
            return None
        report = self.nat.as_json()
        hint = {k: report.get(k) for k in ("mapping", "filtering", "allocation", "delta")}
        if self.nat.mapping != EIM and self.nat.public is not None:
            hint["ip"] = self.nat.public[0]  # where a peer's birthday probes must aim
        return hint

    def _media_offer(self, paths: CallPaths) -> dict[str, Any]:
        return {"candidates": [c.as_json() for c in paths.local], "nat": self._nat_hint()}

    def _media_in(self, data: bytes, now: float) -> bool:
        """False when there is no media session (yet) to take it."""
        if self.call is None or self.call.media is None:
            return False
        self.call.media.receive_untrusted(data, now)
        return True

    def _signal(self, message: dict[str, Any], now: float) -> None:
        body, sender, device = message.get("body"), message.get("from"), message.get("from_device")
        if not isinstance(body, dict) or not isinstance(sender, str) or not isinstance(device, str):
            self.counters["malformed"] += 1
            return
        if body.get("type") == "invite":
            self._invite(sender, device, body, now)  # every invite passes the replay check
            return
        active = self.call
        if active is None or body.get("call_id") != active.call.call_id:
            return
        if body.get("type") == "candidates":
            paths = active.connectivity
            if paths is not None and active.call.peer_device in (None, device):
                if body.get("restart") is True:  # the peer moved: this is all it offers now
                    dropped = paths.peer_restarted(body.get("candidates"), now)
                else:
                    dropped = paths.add_remote(body.get("candidates"), now)
                self.counters["bad_candidates"] += dropped
            return
        # The call decides which device has a say: with several devices of the callee ringing,
        # the first answer binds the call and the others are told to stop (call.signaling).
        active.call.signal_untrusted(device, body, now)

    def _invite(self, sender: str, device: str, body: dict[str, Any], now: float) -> None:
        assert self.identity is not None
        hello_id = handshake.hello_id(body.get("hello"))
        if hello_id in self._seen_invites:
            self.counters["replayed_invites"] += 1
            return
        self._seen_invites[hello_id] = now + 600
        if self.call is not None and self.call.call.state is not CallState.ENDED:
            busy = {"type": "reject", "reason": "busy", "call_id": body.get("call_id")}
            self._send_signal(sender, device, busy, now)
            return
        try:
            call, answer = Call.incoming_untrusted(
                self.identity, self.user, sender, device, body, now, self.config.call
            )
        except handshake.HandshakeError as exc:
            self.counters["forged_invites"] += 1
            log.warning("invite refused", sender=sender, reason=str(exc))
            return
        source, sink = self._audio(self.config.play, self.config.record)
        paths = self._new_paths(False, now)
        self.counters["bad_candidates"] += paths.add_remote(call.peer_media.get("candidates"), now)
        paths.plan(call.peer_media.get("nat"), now)
        self.call = ActiveCall(call, now, source, sink, None, connectivity=paths)
        self._pending_answer = answer
        log.info("incoming call", peer=sender, call=call.call_id)
        if self.config.auto_answer:
            self._accept(now)

    def _audio(self, play: Path | None, record: Path | None) -> tuple[FrameSource, Sink | None]:
        """WAV files when given, else the sound card, else silence (a server has no card)."""
        from punchline.voice import devices

        source: FrameSource
        sink: Sink | None = None
        try:
            source = wav.WavSource(play) if play else devices.MicrophoneSource()
        except devices.DeviceUnavailable as exc:
            log.warning("no microphone: sending silence", reason=str(exc))
            source = wav.SilenceSource()
        try:
            sink = wav.WavSink(record) if record else devices.SpeakerSink()
        except devices.DeviceUnavailable as exc:
            log.warning("no speaker: the peer's audio is not played", reason=str(exc))
        return source, sink

    def _accept(self, now: float) -> None:
        if self.call is None or self.call.call.state is not CallState.INCOMING:
            return
        paths = self.call.connectivity
        media = {"candidates": []} if paths is None else self._media_offer(paths)
        self.call.call.accept(self._pending_answer, media, now)

    def place_call(
        self, peer: str, play: Path | None, record: Path | None, duration: float | None
    ) -> ActiveCall:
        assert self.identity is not None
        now = time.time()
        if peer == self.user:
            raise LocalError("you cannot call yourself")
        if self.current is None:
            raise LocalError("not connected to any supernode yet; try again in a moment")
        if self.call is not None and self.call.call.state is not CallState.ENDED:
            raise LocalError("a call is already in progress; hang it up first")
        paths = self._new_paths(True, now)
        source, sink = self._audio(play, self.config.record if record is None else record)
        media = self._media_offer(paths)
        call = Call.place(self.identity, self.user, peer, media, now, self.config.call)
        self.call = ActiveCall(call, now, source, sink, duration, connectivity=paths)
        log.info("calling", peer=peer, call=call.call_id)
        self._pump(now)
        return self.call

    def _call_progress(self, now: float) -> None:
        active = self.call
        if active is None:
            return
        call = active.call
        for outgoing in call.outgoing_signals():
            self._send_signal(outgoing.to, outgoing.to_device, outgoing.body, now)
        if call.state is CallState.ACTIVE and active.media is None:
            self._start_media(active, now)
        if active.hangup_at is not None and now >= active.hangup_at:
            call.hangup(now)
            for outgoing in call.outgoing_signals():
                self._send_signal(outgoing.to, outgoing.to_device, outgoing.body, now)
        if call.state is CallState.ENDED and not active.finished:
            self._finish(active)

    def _start_media(self, active: ActiveCall, now: float) -> None:
        call = active.call
        assert call.keys is not None
        assert active.connectivity is not None
        active.media = MediaSession(call.keys, active.source, active.sink, now, self.config.media)
        if call.outgoing:
            self.counters["bad_candidates"] += active.connectivity.add_remote(
                call.peer_media.get("candidates"), now
            )
            active.connectivity.plan(call.peer_media.get("nat"), now)
        active.connectivity.set_keys(call.keys, now)
        active.connectivity.pump(now)
        if active.duration is not None:
            active.hangup_at = now + active.duration
        elif isinstance(active.source, wav.WavSource) and call.outgoing:
            active.hangup_at = None  # hung up when the file has been played
        self._notify(active, {"event": "connected", "peer": call.peer,
                              "answered_by": call.answered_by})  # fmt: skip
        self._tasks.spawn(self._media_loop(active))

    async def _media_loop(self, active: ActiveCall) -> None:
        loop = asyncio.get_running_loop()
        step = FRAME_MS / 1000.0
        next_tick = loop.time()
        wall_start = time.time()
        frames = 0
        while active.call.state is CallState.ACTIVE and active.media is not None:
            # The playout clock is the ideal 20 ms tick, not the moment this loop got to run:
            # after a stall of our own event loop the catch-up ticks keep their scheduled
            # times, so the jitter buffer does not mistake our lateness for the network's and
            # cut audio to catch up (a sound card consumes frames on that ideal clock too).
            now = wall_start + frames * step
            frames += 1
            media, paths = active.media, active.connectivity
            media.tick(now)
            for data in media.datagrams():
                if paths is not None:
                    paths.send_media(data, now)
            source = active.source
            if (active.hangup_at is None and active.duration is None and active.call.outgoing
                    and isinstance(source, wav.WavSource) and source.exhausted):  # fmt: skip
                active.hangup_at = now + 0.5
            self._pump(now)
            next_tick += step
            await asyncio.sleep(max(0.0, next_tick - loop.time()))

    def _finish(self, active: ActiveCall) -> None:
        active.finished = True
        report = self.report(active)
        if active.connectivity is not None:
            self._tasks.spawn(active.connectivity.close())
        if active.sink is not None:
            active.sink.close()
            if isinstance(active.sink, wav.WavSink):
                report["recording"] = str(active.sink.path)
        close = getattr(active.source, "close", None)
        if close is not None:
            close()
        log.info("call ended", peer=active.call.peer, reason=active.call.end_reason,
                 connected=report["connected"],
                 jitter=active.media.jitter_stats if active.media else None)  # fmt: skip
        self._notify(active, {"event": "ended", "report": report})
        for queue in active.waiters:
            queue.put_nowait({"event": "closed"})
        active.waiters = []

    def report(self, active: ActiveCall) -> dict[str, Any]:
        call, media = active.call, active.media
        first = media.first_audio_at if media else None
        end = call.ended_at or time.time()
        summary = media.summary() if media else {
            "rtt_ms": None, "loss": 0.0, "jitter_ms": 0.0, "bytes_sent": 0, "bytes_received": 0
        }  # fmt: skip
        paths = active.connectivity
        return {
            "connected": call.connected_at is not None,
            "peer": call.peer,
            "path": None if paths is None else paths.label,
            # media path changes, each with `at_ms` after the call started on this side
            "paths": [] if paths is None else paths.paths,
            "checks": {} if paths is None else paths.agent.counters,
            "setup_ms": None if first is None else round((first - active.requested_at) * 1000),
            "duration_s": 0.0 if call.connected_at is None else round(end - call.connected_at, 2),
            **summary,
            "end_reason": call.end_reason,
            # the callee's device that took the call (several may have rung)
            "answered_by": call.answered_by,
            "peer_device": call.peer_device,
        }

    def _notify(self, active: ActiveCall, event: dict[str, Any]) -> None:
        for queue in active.waiters:
            queue.put_nowait(event)

    # ----------------------------------------------------------------- output and timers

    def _send_signal(
        self, to: str, to_device: str | None, body: dict[str, Any], now: float
    ) -> None:
        if self.current is None:
            return
        message = {"t": "signal", "id": next(self._signal_ids), "to": to, "body": body}
        if to_device is not None:
            message["to_device"] = to_device
        self.current[1].send(message, now)

    def _send_signal_packets(
        self, session: OutboundSession, via: Link | Address, now: float
    ) -> None:
        """`via` is an attempt's link, or the current supernode's address: its link is used."""
        link = via if isinstance(via, Link) else self.link
        if link is not None:
            link.send(session.datagrams(now))

    def _pump(self, now: float) -> None:
        """Run every core's timers and send everything they produced; then re-arm the timer."""
        for address, (node, session) in list(self.attempts.items()):
            session.handle_timer(now)
            self._send_signal_packets(session, address, now)
            if session.established and self.current is None:
                self._established(node, session, now)
                break
        if self.current is not None:
            node, session = self.current
            session.handle_timer(now)
            if session.state is State.FAILED:
                self._lost(session.failure, now)
            else:
                if now >= self._next_publish:
                    self._publish(now)
                self._call_tick(now)
                for message in self.contacts.outgoing(now) if self.contacts else []:
                    session.send(message, now)
                self._send_signal_packets(session, node.address, now)
        elif self.attempts and all(s.state is State.FAILED for _n, s in self.attempts.values()):
            for node, _session in self.attempts.values():
                self.avoid[node.node_id] = now + self.config.avoid_failed_for
            self.attempts = {}
            self._retry_at = now + 1.0
        elif not self.attempts and now >= self._retry_at:
            self._attach(now)
            return
        self._arm(now)

    def _call_tick(self, now: float) -> None:
        if self.call is not None:
            self.call.call.handle_timer(now)
            if self.call.connectivity is not None and not self.call.finished:
                self.call.connectivity.pump(now)
            self._call_progress(now)

    def _arm(self, now: float) -> None:
        times = [s.next_timer() for _n, s in self.attempts.values()]
        if self.current is not None:
            times += [self.current[1].next_timer(), self._next_publish]
        if self.call is not None:
            times.append(self.call.call.next_timer())
            if self.call.connectivity is not None and not self.call.finished:
                times.append(self.call.connectivity.next_timer())
            if self.call.hangup_at is not None:
                times.append(self.call.hangup_at)
        if not self.current and not self.attempts:
            times.append(max(self._retry_at, now + 0.2))
        due = min(times, default=now + 1.0)
        if self._timer is not None:
            self._timer.cancel()
        delay = min(max(0.0, due - time.time()), 5.0)
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._pump(time.time())

    # ----------------------------------------------------------------- control API

    def status(self) -> dict[str, Any]:
        call: dict[str, Any] | None = None
        if self.call is not None:
            call = {"peer": self.call.call.peer, "state": self.call.call.state.value,
                    "call_id": self.call.call.call_id, "answered_by": self.call.call.answered_by,
                    "end_reason": self.call.call.end_reason}  # fmt: skip
            if self.call.connectivity is not None:
                call["connectivity"] = self.call.connectivity.status()
        supernode = None
        if self.current is not None:
            node, _session = self.current
            supernode = {"node_id": node.node_id, "address": list(node.address)}
        return {
            "user": self.user,
            "device": self.device,
            "supernode": supernode,
            # how this daemon reaches its supernode: "udp", "tcp", "tls" or "proxy"
            "transport": self.link.transport if self.current and self.link else None,
            "reflexive": list(self.reflexive) if self.reflexive else None,
            # findable by others: the index confirmed holding the current presence record
            "published": self.current is not None and self.published_seq is not None,
            "presence": self.presence_status,
            "nat": None if self.nat is None else self.nat.as_json(),
            "relay": None if self.relay is None else self.relay.status(),
            "call": call,
            "counters": dict(self.counters),
        }

    async def _control_request(self, request: dict[str, Any], reply: control.Reply) -> None:
        op = request.get("op")
        try:
            if op == "status":
                await reply({"ok": True, **self.status()})
            elif op == "call":
                await self._control_call(request, reply)
            elif op in ("hangup", "answer"):
                await reply(self._control_hangup_or_answer(str(op)))
            elif op == "contacts" and self.contacts is not None:
                await reply(self.contacts.control(request, time.time()))
                self._pump(time.time())
            elif op == "shutdown":
                await reply({"ok": True})
                self._stop.set()
            elif op == "lookup":
                await reply(await self._control_lookup(request))
            elif op in ("directory", "search"):
                await reply(await self._control_directory(str(op), request))
            elif op == "set_status":
                await reply(self._control_set_status(request))
            else:
                await reply({"ok": False, "error": f"unknown op {op!r}"})
        except LocalError as exc:
            await reply({"ok": False, "error": str(exc)})

    async def _control_lookup(self, request: dict[str, Any]) -> dict[str, Any]:
        """Ask the supernode where a user is: online (devices, supernodes) or last seen."""
        user = request.get("user")
        if not isinstance(user, str) or not 0 < len(user) <= 64:
            return {"ok": False, "error": "lookup needs a user name"}
        if self.current is None:
            return {"ok": False, "error": "not attached to a supernode yet"}
        ref = next(self._signal_ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._lookups[ref] = waiter
        self.current[1].send({"t": "lookup", "id": ref, "user": user}, time.time())
        self._pump(time.time())
        try:
            result = await asyncio.wait_for(waiter, 10.0)
        except TimeoutError:
            return {"ok": False, "error": "the supernode did not answer the lookup"}
        finally:
            self._lookups.pop(ref, None)
        return {"ok": True, "user": user, "status": result.get("status", "unknown"),
                "last_seen": result.get("last_seen"),
                "devices": result.get("devices", [])}  # fmt: skip

    def _control_set_status(self, request: dict[str, Any]) -> dict[str, Any]:
        status = request.get("status")
        if status not in presence.STATUSES - {"offline"}:
            return {"ok": False, "error": "status must be online, away or busy"}
        self.presence_status = str(status)
        self._publish(time.time())
        self._pump(time.time())
        return {"ok": True, "status": self.presence_status}

    async def _control_directory(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        """`punchline directory` (list, unlist, show) and `punchline search`."""
        assert self.identity is not None
        if op == "search":
            found = await self.directory.search(
                str(request.get("query", "")), self._send_to_supernode, self.identity, time.time
            )
            return {"ok": True, **found}
        now = time.time()
        if isinstance(request.get("list"), str):
            self.directory.list_as(str(request["list"]), now)
        elif request.get("unlist") is True:
            self.directory.unlist(now)
        else:
            return {"ok": True, **self.directory.status()}
        taken = self.directory.expect_ack()
        self._send_directory(now)  # to the supernode at once, if attached
        self._pump(now)
        handed = await self.directory.acked(taken, 5.0 if self.current is not None else 0.0)
        return {"ok": True, **self.directory.status(), "handed_over": handed}

    def _send_to_supernode(self, message: dict[str, Any]) -> bool:
        if self.current is None:
            return False
        now = time.time()
        self.current[1].send(message, now)
        self._pump(now)
        return True

    def _control_hangup_or_answer(self, op: str) -> dict[str, Any]:
        now = time.time()
        if self.call is None or self.call.call.state is CallState.ENDED:
            ended = self.call.call.end_reason if self.call is not None else ""
            if op == "answer" and ended in (ANSWERED_ON_ANOTHER_DEVICE, DECLINED_ON_ANOTHER_DEVICE):
                return {"ok": False, "error": f"too late: the call was {ended}"}
            return {"ok": False, "error": "there is no call"}
        if op == "answer":
            self._accept(now)
        else:
            self.call.call.hangup(now)
        self._pump(now)
        return {"ok": True, "state": self.call.call.state.value}

    async def _control_call(self, request: dict[str, Any], reply: control.Reply) -> None:
        peer = request.get("user")
        if not isinstance(peer, str):
            await reply({"ok": False, "error": "call needs a user name"})
            return
        play = Path(request["play"]) if request.get("play") else self.config.play
        record = Path(request["record"]) if request.get("record") else None
        duration = request.get("duration")
        duration = float(duration) if isinstance(duration, int | float) else None
        if play is not None:
            wav.read_wav(play)  # a wrong file is the caller's error, before any ringing
        active = self.place_call(peer, play, record, duration)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        active.waiters.append(queue)
        await reply({"ok": True, "event": "calling", "call_id": active.call.call_id})
        while True:
            event = await queue.get()
            if event.get("event") == "closed":
                return
            await reply(event)

    # ----------------------------------------------------------------- lifecycle

    async def stop(self) -> None:
        now = time.time()
        if self.call is not None and self.call.call.state is not CallState.ENDED:
            self.call.call.hangup(now)
            self._call_progress(now)
        if self.call is not None and self.call.connectivity is not None:
            await self.call.connectivity.close()
        if self.current is not None:
            node, session = self.current
            session.send({"t": "bye"}, now, reliable=False)
            self._send_signal_packets(session, node.address, now)
        self._ladder.settle(None)
        if self.link is not None:
            self.link.close()  # a stream still sends the bye it holds
        self._tasks.cancel()
        if self._timer is not None:
            self._timer.cancel()
        self._control.close()
        with contextlib.suppress(FileNotFoundError):
            control.socket_path(self.config.data_dir).unlink()
        for sock in (self._signal_sock, self._media_sock):
            if sock is not None:
                sock.close()
        if self.relay is not None:
            with contextlib.suppress(Exception):
                await self.relay.close()
        if self.port_mapping is not None:
            with contextlib.suppress(Exception):
                await self.port_mapping.release()
        log.info("daemon stopped")
