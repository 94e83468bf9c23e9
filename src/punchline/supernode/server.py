"""Runs a supernode: enrols, joins the DHT, serves UDP, TCP and TLS, heartbeats the login server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from punchline.client.store import IdentityStore
from punchline.identity import certs, keys
from punchline.nat.discover import stun_servers
from punchline.nat.stun_service import StunService
from punchline.node import lifecycle
from punchline.node.enrolment import NodeAddress
from punchline.overlay.custody import Custody
from punchline.overlay.dht import DhtConfig, DhtIndex
from punchline.overlay.index import PresenceIndex, device_value_id, presence_key
from punchline.relay.server import RelayServer, RelayServerConfig
from punchline.runtime import streams
from punchline.runtime.driver import Driver
from punchline.session.outbound import Identity
from punchline.supernode.core import CoreConfig, Lookup, Publish, Release, Route, SupernodeCore
from punchline.supernode.directory import DirectoryRunner
from punchline.supernode.watch import WatchRunner
from punchline.util import sockets
from punchline.util.files import atomic_write, private_dir
from punchline.util.tasks import Tasks
from punchline.wire import session as wire

log = structlog.get_logger(component="supernode")

READY_FILE = "supernode.json"
# Counters of the core, the DHT node and custody, rewritten when they change (for operators
# and tests: forged, stale and expired records dropped, offline records put and shared).
STATUS_FILE = "supernode-status.json"


@dataclass(frozen=True)
class SupernodeConfig:
    data_dir: Path
    listen_host: str
    listen_port: int
    auth_url: str
    # Extra TCP ports (443 and 80 in production), each serving session TCP and TLS with the
    # node certificate, told apart by the client's first byte.
    tcp_ports: tuple[int, ...] = ()
    # The DHT node's UDP port; 0 picks one. Advertised in the bootstrap list.
    dht_port: int = 0
    dht_bootstrap: tuple[tuple[str, int], ...] = ()
    enroll_secret: str | None = None
    ca_fingerprint: str | None = None
    # Address clients and other supernodes use; defaults to the listen address.
    advertise_host: str | None = None
    heartbeat_interval: float = 20.0
    dht_unlimited_rate: bool = False
    core: CoreConfig = field(default_factory=CoreConfig)
    # Also serve as a relay node (`supernode --relay`): TURN on its own ports, same identity.
    relay: RelayServerConfig | None = None


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, node: SupernodeServer) -> None:
        self.node = node

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.node.received(data, ("udp", (addr[0], addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error", error=str(exc))


class SupernodeServer:
    def __init__(self, config: SupernodeConfig) -> None:
        self.config = config
        self.store = IdentityStore(config.data_dir)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: dict[str, asyncio.StreamWriter] = {}
        self._listeners: list[socket.socket] = []
        self._tasks = Tasks()
        self._conn_ids = 0
        self.index: PresenceIndex | None = None
        # Keeps the records of attached (and recently detached) users alive in the DHT.
        self.custody: Custody | None = None
        self.watcher: WatchRunner | None = None  # contacts: overlay listens for clients
        self.directory: DirectoryRunner | None = None  # directory entries and searches
        self.core: SupernodeCore | None = None
        self.driver: Driver | None = None
        self.relay: RelayServer | None = None
        self.stun = StunService()

    # ----------------------------------------------------------------- start-up

    def _addresses(self, udp_port: int, dht_port: int) -> list[NodeAddress]:
        host = self.config.advertise_host or self.config.listen_host
        if host in ("0.0.0.0", ""):  # noqa: S104
            host = "127.0.0.1"
        # Clients try stream addresses in the listed order: the ports a web-only firewall lets
        # out (443, then 80) first, plain TCP before TLS (each --tcp-port serves both).
        web = sorted(self.config.tcp_ports, key=streams.web_order)
        found = [NodeAddress("udp", host, udp_port)]
        found += [NodeAddress("tcp", host, p) for p in [*web, udp_port]]
        found += [NodeAddress("tls", host, p) for p in web]
        found.append(NodeAddress("dht", host, dht_port))
        return found

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        private_dir(self.config.data_dir)
        udp_sock, tcp_sock = sockets.udp_and_tcp(self.config.listen_host, self.config.listen_port)
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp_sock)
        self._udp = transport
        udp_port = int(transport.get_extra_info("sockname")[1])
        await self.stun.open(transport)
        dht = DhtIndex(
            DhtConfig(
                bind_host=self.config.listen_host,
                port=self.config.dht_port,
                bootstrap=self.config.dht_bootstrap,
                unlimited_rate=self.config.dht_unlimited_rate,
            )
        )
        self.index = dht
        self.custody = Custody(dht)
        self._tasks.spawn(self.custody.run())
        addresses = self._addresses(udp_port, dht.port)
        roles = [certs.Role.SUPERNODE]
        if self.config.relay is not None:
            self.relay = RelayServer(self.config.relay, self.store)
            await self.relay.open()
            addresses += self.relay.addresses()
            roles.append(certs.Role.RELAY)
        identity = await asyncio.to_thread(
            lifecycle.ensure_enrolled, self.store, self.config.auth_url, self.config.enroll_secret,
            roles, addresses, self.config.ca_fingerprint,
        )  # fmt: skip
        if self.relay is not None:
            await self.relay.go_live(addresses)
        node_id = keys.key_id(identity.key.public_key())
        self.core = SupernodeCore(identity, node_id, time.time(), self.config.core, self._stun())
        self.driver = Driver(self.core, self._flush)
        self.watcher = WatchRunner(dht, self.core.watch, self.driver.poke, self.custody.keep)
        self.directory = DirectoryRunner(dht, self.core.directory, self.driver.poke,
                                         self.custody.keep)  # fmt: skip
        tls = lifecycle.tls_context(self.store)
        self._listeners.append(tcp_sock)
        for port in self.config.tcp_ports:
            self._listeners.append(sockets.tcp_listener(self.config.listen_host, port))
        for listener in self._listeners:  # each serves plain TCP and TLS, told by the first byte
            self._tasks.spawn(streams.serve_plain_and_tls(listener, tls, self._tcp_client))
        heartbeats = lifecycle.heartbeats(
            self.store,
            addresses,
            self.config.heartbeat_interval,
            certs.Role.SUPERNODE,
            self._listing,
            self._renewed,
        )
        self._tasks.spawn(heartbeats)
        self._tasks.spawn(self._write_status())
        ready = {
            "node_id": node_id,
            "pid": os.getpid(),
            "udp": [a.host for a in addresses if a.transport == "udp"] + [udp_port],
            "dht_port": dht.port,
            "tls_ports": list(self.config.tcp_ports),  # plain TCP too
            "relay": None
            if self.relay is None
            else {"udp": self.relay.udp_port, "health_port": self.relay.health_port},
        }
        atomic_write(self.config.data_dir / READY_FILE, json.dumps(ready).encode(), 0o644)
        log.info("supernode running", node=node_id, udp=udp_port, dht=dht.port,
                 tls=list(self.config.tcp_ports))  # fmt: skip

    def _stun(self) -> Any:
        """STUN on the session port, with RFC 5780 behaviour tests (nat.stun_service)."""

        def answer(data: bytes, route: Route) -> bytes | None:
            return self.stun.answer(data, route[1], stream=route[0] != "udp")

        return answer

    # ----------------------------------------------------------------- I/O

    def received(self, data: bytes, route: Route) -> None:
        if self.core is None or self.driver is None:
            return
        self.core.receive(data, route, time.time())
        self.driver.poke()

    def _flush(self, now: float) -> None:
        assert self.core is not None
        for data, route in self.core.datagrams(now):
            if route[0] == "udp":
                if self._udp is not None:
                    self._udp.sendto(data, route[1])
            else:
                writer = self._tcp.get(route[0])
                if writer is not None and not writer.is_closing():
                    writer.write(wire.frame(data))
        for action in self.core.actions():
            if isinstance(action, Publish):
                self._tasks.spawn(self._publish(action))
            elif isinstance(action, Lookup):
                self._tasks.spawn(self._lookup(action))
            elif isinstance(action, Release) and self.custody is not None:
                self.custody.release(presence_key(action.user), device_value_id(action.device))
        if self.watcher is not None:
            self.watcher.run(self.core.watch.actions())
        if self.directory is not None:
            self.directory.run(self.core.directory.actions())

    async def _publish(self, action: Publish) -> None:
        assert self.index is not None
        key, value_id = presence_key(action.user), device_value_id(action.device)
        try:
            await self.index.publish(action.user, action.device, action.record)
        except Exception as exc:  # the DHT failing must not kill the node
            log.warning("index publish failed", user=action.user, error=str(exc))
            return
        if self.custody is not None:
            self.custody.keep(key, value_id, action.record, action.until, put_now=False)
        if self.core is not None and self.driver is not None:
            self.core.published(action.user, action.device, action.record, time.time())
            self.driver.poke()

    async def _lookup(self, action: Lookup) -> None:
        assert self.index is not None
        assert self.core is not None
        assert self.driver is not None
        try:
            records = await self.index.lookup(action.user)
        except Exception as exc:
            log.warning("index lookup failed", user=action.user, error=str(exc))
            records = []
        self.core.lookup_done(action.ref, records, time.time())
        self.driver.poke()

    async def _tcp_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, transport: str
    ) -> None:
        self._conn_ids += 1
        name = f"tcp:{self._conn_ids}"
        peer = writer.get_extra_info("peername")
        route: Route = (name, (str(peer[0]), int(peer[1])))
        log.debug("stream client connected", peer=route[1], transport=transport)
        self._tcp[name] = writer
        decoder = wire.FrameDecoder()
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    self.received(frame, route)
        except (ConnectionError, wire.SessionPacketError, ssl.SSLError) as exc:
            log.info("stream client dropped", peer=route[1], transport=transport, reason=str(exc))
        finally:
            self._tcp.pop(name, None)
            writer.close()

    def status(self) -> dict[str, Any]:
        return {
            "node_id": None if self.core is None else self.core.node_id,
            "sessions": 0 if self.core is None else len(self.core.sessions),
            "counters": {} if self.core is None else dict(self.core.counters),
            "dht": dict(self.index.counters) if isinstance(self.index, DhtIndex) else {},
            "custody": {} if self.custody is None else self.custody.status(),
            "directory": {} if self.core is None else dict(self.core.directory.counters),
        }

    async def _write_status(self) -> None:
        """Rewrite the status file when something changed, and log what was dropped."""
        last: dict[str, Any] = {}
        while True:
            status = self.status()
            if status != last:
                atomic_write(self.config.data_dir / STATUS_FILE,
                             json.dumps(status).encode(), 0o644)  # fmt: skip
                counters, before = status["counters"], last.get("counters", {})
                dropped = {k: counters.get(k, 0) for k in
                           ("forged_record", "stale_record", "expired_record")}  # fmt: skip
                if any(dropped[k] != before.get(k, 0) for k in dropped):
                    log.info("presence records dropped so far", **dropped)
                last = status
            await asyncio.sleep(1.0)

    def _listing(self, listing: dict[str, Any]) -> None:
        self._bootstrap_dht(listing)
        if self.core is not None:
            self.core.set_peers(
                [n for n in listing.get("nodes", [])
                 if isinstance(n, dict) and "supernode" in n.get("roles", [])]
            )  # fmt: skip
        own = self.core.node_id if self.core is not None else None
        peers = stun_servers(listing, ("supernode",))
        self.stun.set_peers(s.address for s in peers if s.name != own)  # for change-IP
        if self.relay is not None:
            self.relay.load_secret()

    def _renewed(self) -> None:
        """Node certificates last a week: renewed while running, for new sessions from now on."""
        if self.relay is not None:
            self.relay.renewed()
        if self.core is not None:
            self.core.identity = Identity(self.core.identity.key, self.store.certificate(),
                                          self.core.identity.ca)  # fmt: skip

    def _bootstrap_dht(self, listing: dict[str, Any]) -> None:
        if not isinstance(self.index, DhtIndex) or self.core is None:
            return
        for node in listing.get("nodes", []):
            if node.get("node_id") == self.core.node_id:
                continue
            for address in node.get("addresses", []):
                if address.get("transport") == "dht":
                    self.index.bootstrap(str(address["host"]), int(address["port"]))

    async def stop(self) -> None:
        self._tasks.cancel()
        if self.watcher is not None:
            self.watcher.close()
        if self.directory is not None:
            self.directory.close()
        if self.custody is not None:
            self.custody.close()
        for listener in self._listeners:
            listener.close()
        self.stun.close()
        if self._udp is not None:
            self._udp.close()
        if self.driver is not None:
            self.driver.stop()
        if self.index is not None:
            await self.index.close()
        if self.relay is not None:
            await self.relay.stop()
        (self.config.data_dir / READY_FILE).unlink(missing_ok=True)
        (self.config.data_dir / STATUS_FILE).unlink(missing_ok=True)


async def run(config: SupernodeConfig) -> None:
    await lifecycle.run_until_signalled(
        SupernodeServer(config), lambda: log.info("supernode stopping")
    )
