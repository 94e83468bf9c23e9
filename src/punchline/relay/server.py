"""Runs a relay node: TURN over UDP, TCP and TLS (443/80, also via HTTP CONNECT), enrolled.

The protocol is all in `relay.allocation.RelayCore`; this adapter owns the sockets. UDP client
sockets and relayed sockets are read through the forwarder (`relay.forwarder`): datagrams of
established channels are forwarded there without becoming Python objects, everything else
comes back here for the core. With the C forwarder a thread of its own reads every UDP socket
(threaded mode: the event loop only hears of what the core must see, through the forwarder's
eventfd); with the Python one (`--python-forwarder`) the loop pumps each readable socket.

TCP ports speak plain TURN-over-TCP and TURN-over-TLS on the same port, told apart by the first
byte of the connection (0x16 starts a TLS handshake, STUN starts with 0x00-0x03), which is what
lets one port 443 serve TLS clients, clients tunnelling through an HTTP CONNECT proxy, and plain
TCP clients at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from punchline.client.store import IdentityStore
from punchline.identity import certs
from punchline.node import enrolment, lifecycle
from punchline.node.enrolment import NodeAddress
from punchline.relay import credentials
from punchline.relay.allocation import (
    Action,
    ClientKey,
    CloseRelay,
    FastBind,
    FastUnbind,
    OpenRelay,
    RelayConfig,
    RelayCore,
    ReleaseReservation,
    ToClient,
    ToPeer,
)
from punchline.relay.forwarder import (
    Forwarder,
    Kind,
    PyForwarder,
    SlowDatagram,
    ThreadedForwarder,
    make_forwarder,
    threaded,
)
from punchline.runtime.driver import Driver
from punchline.runtime.streams import TLS_FIRST_BYTE, first_byte
from punchline.util import sockets
from punchline.util.files import atomic_write, private_dir
from punchline.util.tasks import Tasks
from punchline.wire import channel_data, stun

log = structlog.get_logger(component="relay")

READY_FILE = "relay.json"
# A stream client whose unsent backlog passes this is too slow for real-time media: drop.
MAX_STREAM_BACKLOG = 256 * 1024


@dataclass(frozen=True)
class RelayServerConfig:
    data_dir: Path
    listen_host: str
    listen_port: int
    auth_url: str
    # The login server's TURN secret; None means the copy heartbeats bring (data dir).
    turn_secret_file: Path | None = None
    # Extra TCP ports serving TURN over TLS and over plain TCP (443 and 80 in production).
    tcp_ports: tuple[int, ...] = ()
    # Relayed sockets take ports from this range; (0, 0) lets the kernel choose.
    relay_ports: tuple[int, int] = (0, 0)
    enroll_secret: str | None = None
    ca_fingerprint: str | None = None
    advertise_host: str | None = None
    heartbeat_interval: float = 20.0
    # The health endpoint (HTTP, JSON counters); None turns it off.
    health_listen: tuple[str, int] | None = ("127.0.0.1", 0)
    native_forwarder: bool = True
    core: RelayConfig = field(default_factory=RelayConfig)


def _tune_udp(sock: socket.socket) -> None:
    """Big buffers (bursts of many flows land between two reads), non-blocking."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setblocking(False)


def _udp_socket(host: str, port: int) -> socket.socket:
    sock = sockets.udp_socket(host, port)
    _tune_udp(sock)
    return sock


class _Stream(asyncio.Protocol):
    """One TCP or TLS client connection: split the stream into messages for the core."""

    def __init__(self, relay: RelayServer, key: ClientKey, transport_name: str) -> None:
        self.relay, self.key, self.name = relay, key, transport_name
        self.decoder = channel_data.StreamDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.relay.streams[self.key[0]] = self

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except stun.StunError as exc:
            self.relay.count(self.name, "malformed_streams")
            log.info("stream client sent garbage; closing", peer=self.key[1], reason=str(exc))
            assert self.transport is not None
            self.transport.close()
            return
        if not messages:
            return
        now = time.time()
        self.relay.count(self.name, "messages_in", len(messages))
        for message in messages:
            self.relay.core.receive_from_client(message, self.key, now)
        self.relay.poke()

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() > MAX_STREAM_BACKLOG:
            self.relay.count(self.name, "dropped_backlog")
            return
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.streams.pop(self.key[0], None)
        self.relay.core.client_gone(self.key, time.time())
        self.relay.poke()


class RelayServer:
    def __init__(self, config: RelayServerConfig, store: IdentityStore | None = None) -> None:
        self.config = config
        self.store = store or IdentityStore(config.data_dir)
        self.core = RelayCore(config.core, "", time.time())  # no credentials work yet
        self.forwarder: Forwarder = make_forwarder(config.native_forwarder)
        self.native = not isinstance(self.forwarder, PyForwarder)
        # Threaded mode (the C forwarder): its thread reads the UDP sockets.
        self.threaded: ThreadedForwarder | None = threaded(self.forwarder)
        # Who a watched UDP socket belongs to: a client connection name or an allocation.
        self._conn_by_fd: dict[int, str] = {}
        self._allocation_by_fd: dict[int, int] = {}
        self._notify_fd: int | None = None
        self.udp: dict[str, socket.socket] = {}
        self.streams: dict[str, _Stream] = {}
        self.relays: dict[int, socket.socket] = {}
        self._held: dict[bytes, socket.socket] = {}
        self._listeners: list[socket.socket] = []
        self._tasks = Tasks()
        self._conn_ids = 0
        self._driver: Driver | None = None
        self._health: web.AppRunner | None = None
        self.health_port: int | None = None
        self.tls: ssl.SSLContext | None = None
        self.transport_counters: dict[str, dict[str, int]] = {}
        self.started = time.time()

    # ----------------------------------------------------------------- start-up

    @property
    def host(self) -> str:
        host = self.config.advertise_host or self.config.listen_host
        return "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104

    async def open(self) -> None:
        """Bind every socket (ports known from here on), before the node is enrolled."""
        loop = asyncio.get_running_loop()
        self._driver = Driver(self.core, self._flush)
        udp, tcp = sockets.udp_and_tcp(self.config.listen_host, self.config.listen_port)
        _tune_udp(udp)
        self._listeners.append(tcp)
        port = udp.getsockname()[1]
        conn = f"udp:{port}"
        self.udp[conn] = udp
        if self.threaded is not None:
            self._notify_fd = self.threaded.notify_fd()
            loop.add_reader(self._notify_fd, self._drain)
            self.threaded.start()
        self._conn_by_fd[udp.fileno()] = conn
        self._watch(udp.fileno(), "client")
        for tcp_port in self.config.tcp_ports:
            self._listeners.append(sockets.tcp_listener(self.config.listen_host, tcp_port))

    def addresses(self) -> list[NodeAddress]:
        port = self.udp_port
        return [
            NodeAddress("turn-udp", self.host, port),
            # TCP on 443/80 first: where a firewall lets only web ports out, those pass
            *(NodeAddress("turn-tcp", self.host, p) for p in self.tls_ports),
            NodeAddress("turn-tcp", self.host, port),
            *(NodeAddress("turn-tls", self.host, p) for p in self.tls_ports),
        ]

    @property
    def tls_ports(self) -> list[int]:
        """The extra TCP ports as bound (a configured 0 becomes the port the kernel chose)."""
        return [int(listener.getsockname()[1]) for listener in self._listeners[1:]]

    @property
    def udp_port(self) -> int:
        return int(next(iter(self.udp.values())).getsockname()[1])

    async def serve(self, tls: ssl.SSLContext) -> None:
        """Accept stream clients and answer health checks (needs the node certificate)."""
        self.tls = tls
        for listener in self._listeners:
            self._tasks.spawn(self._accept(listener))
        if self.config.health_listen is not None:
            self._health = web.AppRunner(self._health_app(), access_log=None, handle_signals=False)
            await self._health.setup()
            site = web.TCPSite(self._health, *self.config.health_listen)
            await site.start()
            server = site._server
            assert isinstance(server, asyncio.base_events.Server)
            self.health_port = int(server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Stand-alone relay: open, enrol as a relay, serve, heartbeat."""
        private_dir(self.config.data_dir)
        await self.open()
        addresses = self.addresses()
        await asyncio.to_thread(
            lifecycle.ensure_enrolled, self.store, self.config.auth_url, self.config.enroll_secret,
            [certs.Role.RELAY], addresses, self.config.ca_fingerprint,
        )  # fmt: skip
        await self.go_live(addresses)
        heartbeats = lifecycle.heartbeats(
            self.store,
            addresses,
            self.config.heartbeat_interval,
            certs.Role.RELAY,
            lambda _listing: self.load_secret(),
            self.renewed,
        )
        self._tasks.spawn(heartbeats)
        ready = {
            "node_id": self.store.require_profile().user,
            "pid": os.getpid(),
            "host": self.host,
            "udp": self.udp_port,
            "tcp_ports": self.tls_ports,
            "health_port": self.health_port,
        }
        atomic_write(self.config.data_dir / READY_FILE, json.dumps(ready).encode(), 0o644)
        log.info("relay running", udp=self.udp_port, tcp=[self.udp_port, *self.tls_ports],
                 health=self.health_port, native=self.native)  # fmt: skip

    async def go_live(self, addresses: list[NodeAddress]) -> None:
        """Once enrolled (alone or as a supernode's role): get the TURN secret, serve."""
        if self.config.turn_secret_file is None:  # the first heartbeat brings the secret
            await asyncio.to_thread(enrolment.heartbeat, self.store, addresses)
        self.load_secret()
        await self.serve(lifecycle.tls_context(self.store))

    def load_secret(self) -> None:
        """(Re)read the TURN secret: given by the operator, or kept fresh by heartbeats."""
        path = self.config.turn_secret_file or self.store.dir / credentials.SECRET_FILE
        self.core.secret = credentials.read_secret(path)

    def renewed(self) -> None:
        """A renewed node certificate serves new TLS connections from now on."""
        self.tls = lifecycle.tls_context(self.store)

    # ----------------------------------------------------------------- datagrams

    def _watch(self, fd: int, kind: Kind) -> None:
        """Have the forwarder read a UDP socket: its thread, or the event loop pumping it."""
        if self.threaded is not None:
            self.threaded.watch(fd, kind)
        else:
            asyncio.get_running_loop().add_reader(fd, self._pumped, fd, kind)

    def _unwatch(self, fd: int) -> None:
        """After this the socket is read by nobody; the caller may close it."""
        if self.threaded is not None:
            self.threaded.unwatch(fd)
        else:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)
        self._conn_by_fd.pop(fd, None)
        self._allocation_by_fd.pop(fd, None)

    def _pumped(self, fd: int, kind: Kind) -> None:
        """Pump mode (Python forwarder): a watched socket is readable."""
        pump = self.forwarder.pump_client if kind == "client" else self.forwarder.pump_relay
        self._to_core([(kind, fd, data, addr) for data, addr in pump(fd)])

    def _drain(self) -> None:
        """Threaded mode: what the forwarder's thread did not forward."""
        assert self.threaded is not None
        self._to_core(self.threaded.drain())

    def _to_core(self, batch: list[SlowDatagram]) -> None:
        if not batch:
            return
        now = time.time()
        from_clients = 0
        for kind, fd, data, addr in batch:
            if kind == "client":
                conn = self._conn_by_fd.get(fd)
                if conn is not None:
                    from_clients += 1
                    self.core.receive_from_client(data, (conn, addr), now)
            else:
                allocation = self._allocation_by_fd.get(fd)
                if allocation is not None:
                    self.core.receive_from_peer(allocation, data, addr, now)
        if from_clients:
            self.count("udp", "messages_in", from_clients)
        self.poke()

    def poke(self) -> None:
        if self._driver is not None:
            self._driver.poke()

    def _flush(self, now: float) -> None:
        actions = self.core.actions()
        while actions:
            for action in actions:
                self._do(action, now)
            actions = self.core.actions()  # opening a relay answers the Allocate at once

    def _do(self, action: Action, now: float) -> None:
        if isinstance(action, ToClient):
            self._to_client(action.client, action.data)
        elif isinstance(action, ToPeer):
            sock = self.relays.get(action.allocation)
            if sock is not None:
                with contextlib.suppress(OSError):  # ICMP errors, full buffers: media is lossy
                    sock.sendto(action.data, action.peer)
        elif isinstance(action, OpenRelay):
            self._open_relay(action, now)
        elif isinstance(action, CloseRelay):
            self._close_relay(action.allocation)
        elif isinstance(action, ReleaseReservation):
            held = self._held.pop(action.token, None)
            if held is not None:
                held.close()
        elif isinstance(action, FastBind):
            sock = self.relays.get(action.allocation)
            udp = self.udp.get(action.client[0])
            if sock is not None and udp is not None:
                self.forwarder.bind(
                    udp.fileno(), action.client[1], action.channel,
                    sock.fileno(), action.peer, action.rate_bytes_per_s,
                )  # fmt: skip
        elif isinstance(action, FastUnbind):
            udp = self.udp.get(action.client[0])
            if udp is not None:
                self.forwarder.unbind(udp.fileno(), action.client[1], action.channel)

    def _to_client(self, client: ClientKey, data: bytes) -> None:
        conn, addr = client
        udp = self.udp.get(conn)
        if udp is not None:
            with contextlib.suppress(OSError):
                udp.sendto(data, addr)
            return
        stream = self.streams.get(conn)
        if stream is not None:
            stream.write(data)

    def _open_relay(self, action: OpenRelay, now: float) -> None:
        sock: socket.socket | None = None
        if action.use_token is not None:
            sock = self._held.pop(action.use_token, None)
        else:
            sock = self._bind_relay(action.even, action.reserve_next)
        if sock is None:
            self.core.relay_failed(action.allocation, now)
            return
        self.relays[action.allocation] = sock
        self._allocation_by_fd[sock.fileno()] = action.allocation
        self._watch(sock.fileno(), "relay")
        port = int(sock.getsockname()[1])
        self.core.relay_opened(action.allocation, (self.host, port), now)

    def _bind_relay(self, even: bool, reserve: bytes | None) -> socket.socket | None:
        low, high = self.config.relay_ports
        host = self.config.listen_host
        for _attempt in range(64):
            if low:
                port = random.randint(low, high)  # noqa: S311 - port choice, not a secret
                if even or reserve:
                    port &= ~1
            else:
                port = 0
            try:
                sock = _udp_socket(host, port)
            except OSError:
                continue
            bound = int(sock.getsockname()[1])
            if (even or reserve) and bound % 2:
                sock.close()
                continue
            if reserve is not None:
                try:
                    self._held[reserve] = _udp_socket(host, bound + 1)
                except OSError:
                    sock.close()
                    continue
            return sock
        return None

    def _close_relay(self, allocation: int) -> None:
        sock = self.relays.pop(allocation, None)
        if sock is None:
            return
        fd = sock.fileno()
        self._unwatch(fd)
        self.forwarder.unbind_relay(fd)  # and sends nothing more through it
        sock.close()

    # ----------------------------------------------------------------- streams

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _addr = await loop.sock_accept(listener)
            except OSError as exc:
                log.warning("accept failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            self._tasks.spawn(self._serve_stream(conn))

    async def _serve_stream(self, conn: socket.socket) -> None:
        """Tell TLS from plain TURN by peeking at the first byte, then hand to a protocol."""
        loop = asyncio.get_running_loop()
        first = await first_byte(conn)
        if first is None:
            conn.close()
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = first == TLS_FIRST_BYTE
        name = "tls" if tls else "tcp"
        self._conn_ids += 1
        peer = conn.getpeername()
        key: ClientKey = (f"{name}:{self._conn_ids}", (str(peer[0]), int(peer[1])))
        self.count(name, "connections")
        try:
            if tls:
                await loop.connect_accepted_socket(
                    lambda: _Stream(self, key, name), conn, ssl=self.tls, ssl_handshake_timeout=10.0
                )
            else:
                await loop.connect_accepted_socket(lambda: _Stream(self, key, name), conn)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self.count(name, "handshake_failures")
            log.info("stream client failed to connect", peer=key[1], reason=str(exc))
            conn.close()

    # ----------------------------------------------------------------- counters

    def count(self, transport: str, name: str, amount: int = 1) -> None:
        bucket = self.transport_counters.setdefault(transport, {})
        bucket[name] = bucket.get(name, 0) + amount

    def stats(self) -> dict[str, Any]:
        """Everything an operator or a monitoring system reads (the health endpoint's body)."""
        fast = self.forwarder.counters()
        core = self.core.counters
        return {
            "status": "ok",
            "uptime_s": round(time.time() - self.started, 1),
            "allocations": core["allocations"],
            "native_forwarder": self.native,
            "relayed": {
                "packets_to_peer": core["packets_to_peer"] + fast["fast_to_peer_packets"],
                "bytes_to_peer": core["bytes_to_peer"] + fast["fast_to_peer_bytes"],
                "packets_to_client": core["packets_to_client"] + fast["fast_to_client_packets"],
                "bytes_to_client": core["bytes_to_client"] + fast["fast_to_client_bytes"],
            },
            "refusals": {str(code): n for code, n in sorted(self.core.refusals.items())},
            "core": dict(core),
            "fast_path": fast,
            "transports": self.transport_counters,
        }

    def _health_app(self) -> web.Application:
        async def healthz(_request: web.Request) -> web.Response:
            return web.json_response(self.stats())

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        return app

    # ----------------------------------------------------------------- shutdown

    async def stop(self) -> None:
        self._tasks.cancel()
        loop = asyncio.get_running_loop()
        if self.threaded is not None:
            self.threaded.stop()
            if self._notify_fd is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(self._notify_fd)
                self._notify_fd = None
        for allocation in list(self.relays):
            self._close_relay(allocation)
        for sock in self.udp.values():
            self._unwatch(sock.fileno())
            sock.close()
        for sock in [*self._listeners, *self._held.values()]:
            sock.close()
        for stream in list(self.streams.values()):
            if stream.transport is not None:
                stream.transport.close()
        if self._driver is not None:
            self._driver.stop()
        if self._health is not None:
            await self._health.cleanup()
        (self.config.data_dir / READY_FILE).unlink(missing_ok=True)


async def run(config: RelayServerConfig) -> None:
    server = RelayServer(config)
    await lifecycle.run_until_signalled(
        server, lambda: log.info("relay stopping", **server.stats()["relayed"])
    )
