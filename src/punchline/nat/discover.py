"""NAT discovery over real sockets: the asyncio runner of `nat.discovery`, and the daemon's
background monitor.

Why its own sockets: the tests need fresh mappings (allocation, filtering) and sockets that
contacted only one server; reusing the daemon's session or media socket would spoil both.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
import structlog

from punchline.nat.discovery import (
    Discovery,
    DiscoveryConfig,
    LifetimeProbe,
    NatReport,
    Pings,
    discovery_sockets,
)

log = structlog.get_logger(component="nat")

Address = tuple[str, int]


@dataclass(frozen=True)
class StunServer:
    """A node answering STUN Binding on UDP: supernodes on their session port, relays on
    their TURN port. Only supernodes run the behaviour tests (change-port/IP, delays)."""

    name: str  # node id
    role: str  # "supernode" | "relay"
    address: Address


def stun_servers(
    listing: dict[str, Any] | None, roles: Sequence[str] = ("supernode", "relay")
) -> list[StunServer]:
    """The STUN servers of a (verified) bootstrap listing, supernodes first."""
    transports = {"supernode": "udp", "relay": "turn-udp"}
    found = []
    for role in roles:
        for node in (listing or {}).get("nodes", []):
            if not isinstance(node, dict) or role not in node.get("roles", []):
                continue
            for address in node.get("addresses", []):
                host, port = address.get("host"), address.get("port")
                if (address.get("transport") == transports[role] and isinstance(host, str)
                        and isinstance(port, int)):  # fmt: skip
                    found.append(StunServer(str(node.get("node_id")), role, (host, port)))
                    break
    return found


def pick_pair(servers: Iterable[Address]) -> list[Address]:
    """Two servers for discovery, at different IPs when there are such (IPv4 only)."""
    usable = [s for s in servers if _is_ipv4(s[0])]
    if not usable:
        return []
    first = usable[0]
    other_ip = [s for s in usable[1:] if s[0] != first[0]]
    rest = other_ip or usable[1:]
    return [first, *rest[:1]]


def _is_ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


def local_ipv4() -> set[str]:
    found: set[str] = set()
    for addrs in psutil.net_if_addrs().values():
        found.update(a.address for a in addrs if a.family == socket.AF_INET)
    return found


class _Core(Protocol):
    def receive(self, sock: str, data: bytes, source: Address, now: float) -> None: ...

    def handle_timer(self, now: float) -> None: ...

    def next_timer(self) -> float: ...

    def datagrams(self, now: float) -> list[tuple[str, bytes, Address]]: ...

    @property
    def done(self) -> bool: ...


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, name: str, inbox: list[tuple[str, bytes, Address]], wake: asyncio.Event):
        self.name, self.inbox, self.wake = name, inbox, wake

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.inbox.append((self.name, data, (addr[0], addr[1])))
        self.wake.set()

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors: the transaction simply times out


class _Sockets:
    """Named UDP sockets on 0.0.0.0, opened in order (allocation tests rely on the order)."""

    def __init__(self) -> None:
        self.transports: dict[str, asyncio.DatagramTransport] = {}
        self.inbox: list[tuple[str, bytes, Address]] = []
        self.wake = asyncio.Event()

    async def open(self, names: Sequence[str]) -> dict[str, int]:
        loop = asyncio.get_running_loop()
        for name in names:
            transport, _ = await loop.create_datagram_endpoint(
                lambda name=name: _Receiver(name, self.inbox, self.wake),  # type: ignore[misc]
                local_addr=("0.0.0.0", 0),  # noqa: S104 - we need the NAT's view of any route
            )
            self.transports[name] = transport
        return {n: int(t.get_extra_info("sockname")[1]) for n, t in self.transports.items()}

    async def drive(self, core: _Core, limit: float) -> None:
        """Feed the core until it is done or `limit` (wall-clock time) passes."""
        while True:
            now = time.time()
            for name, data, source in self.inbox:
                core.receive(name, data, source, now)
            self.inbox.clear()
            core.handle_timer(now)
            for name, data, to in core.datagrams(now):
                transport = self.transports.get(name)
                if transport is not None:
                    transport.sendto(data, to)
            if core.done or now >= limit:
                return
            self.wake.clear()
            delay = max(0.0, min(core.next_timer(), limit) - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=min(delay, 5.0))

    def close(self) -> None:
        for transport in self.transports.values():
            transport.close()


async def discover(
    servers: Sequence[Address],
    config: DiscoveryConfig | None = None,
    lifetime_waits: Sequence[float] = (),
) -> NatReport:
    """Classify this host's NAT against `servers` (supernodes' UDP addresses).

    With `lifetime_waits` (seconds) the mapping lifetime is measured too, which takes the
    longest wait; without, the report carries the assumed lifetime.
    """
    config = config or DiscoveryConfig()
    pair = pick_pair(servers)
    if not pair:
        return NatReport(False, notes=("no IPv4 STUN server known",), measured_at=time.time())
    socks = _Sockets()
    try:
        names = discovery_sockets(config, len(pair))
        ports = await socks.open(names)
        core = Discovery(pair, ports, local_ipv4(), time.time(), config)
        await socks.drive(core, time.time() + config.timeout * 4)
        report = core.report(time.time())
    finally:
        socks.close()
    if lifetime_waits and report.udp:
        lower, upper = await measure_lifetime(pair[0], lifetime_waits, config)
        report = report.with_lifetime(lower, upper)
    return report


async def measure_lifetime(
    server: Address, waits: Sequence[float], config: DiscoveryConfig | None = None
) -> tuple[float | None, float | None]:
    """(longest idle time a mapping survived, shortest it did not) among `waits`."""
    socks = _Sockets()
    try:
        ports = await socks.open(LifetimeProbe.sockets(waits))
        del ports
        probe = LifetimeProbe(server, waits, time.time(), config or DiscoveryConfig())
        await socks.drive(probe, time.time() + max(waits) + 10.0)
        return probe.bounds()
    finally:
        socks.close()


async def ping(
    servers: Sequence[Address], config: DiscoveryConfig | None = None
) -> list[tuple[float | None, Address | None]]:
    """(round-trip seconds, mapped address) of a STUN Binding to each server; None: silent."""
    socks = _Sockets()
    try:
        await socks.open(Pings.sockets(servers))
        pings = Pings(servers, time.time(), config)
        await socks.drive(pings, time.time() + (config or DiscoveryConfig()).timeout + 1.0)
        return pings.results()
    finally:
        socks.close()


# ------------------------------------------------------------------ the daemon's monitor


@dataclass(frozen=True)
class MonitorConfig:
    first_delay: float = 0.5  # after attaching, so the session's own set-up goes first
    interval: float = 600.0  # rediscover this often
    check_every: float = 5.0  # how often to look for a network change
    lifetime_waits: tuple[float, ...] = (15.0, 30.0, 60.0, 120.0, 240.0, 480.0)


class NatMonitor:
    """Runs discovery after the daemon first attaches, every `interval`, and again when the
    host's addresses or its reflexive address change; the lifetime is measured in the
    background and merged into the report as it becomes known (`on_report` each time)."""

    def __init__(
        self,
        servers: Callable[[], Sequence[Address]],
        on_report: Callable[[NatReport], None],
        attached: Callable[[], bool],
        reflexive: Callable[[], Address | None],
        config: MonitorConfig | None = None,
    ) -> None:
        self.servers, self.on_report = servers, on_report
        self.attached, self.reflexive = attached, reflexive
        self.config = config or MonitorConfig()
        self.report: NatReport | None = None
        self._lifetime: asyncio.Task[None] | None = None

    async def run(self) -> None:
        try:
            while not self.attached():
                await asyncio.sleep(0.2)
            await asyncio.sleep(self.config.first_delay)
            while True:
                await self._discover()
                network = (local_ipv4(), self.reflexive())
                deadline = time.monotonic() + self.config.interval
                while time.monotonic() < deadline:
                    await asyncio.sleep(self.config.check_every)
                    current = (local_ipv4(), self.reflexive())
                    # a missing reflexive address is a re-attach in progress, not a new network
                    moved = None not in (current[1], network[1]) and current[1] != network[1]
                    if current[0] != network[0] or moved:
                        log.info("network changed: discovering the NAT again")
                        break
        finally:
            if self._lifetime is not None:
                self._lifetime.cancel()

    async def _discover(self) -> None:
        try:
            report = await discover(self.servers())
        except (OSError, ValueError) as exc:
            log.warning("NAT discovery failed", error=str(exc))
            return
        previous = self.report
        if previous is not None and previous.lifetime_measured and previous.public == report.public:
            report = report.with_lifetime(previous.mapping_lifetime_s,
                                          previous.mapping_lifetime_max_s)  # fmt: skip
        self._publish(report)
        log.info("NAT discovered", mapping=report.mapping, filtering=report.filtering,
                 allocation=report.allocation, delta=report.delta)  # fmt: skip
        if (
            report.udp
            and self.config.lifetime_waits
            and (self._lifetime is None or self._lifetime.done())
        ):
            self._lifetime = asyncio.ensure_future(self._measure(report.servers[0]))

    async def _measure(self, server: Address) -> None:
        waits = self.config.lifetime_waits
        # one probe per wait, each reported as soon as it is decided (shortest first)
        tasks = [asyncio.ensure_future(measure_lifetime(server, [w])) for w in waits]
        try:
            lower: float | None = None
            upper: float | None = None
            for task in asyncio.as_completed(tasks):
                alive, gone = await task
                if alive is not None:
                    lower = max(lower or 0.0, alive)
                if gone is not None:
                    upper = gone if upper is None else min(upper, gone)
                if self.report is not None and (alive is not None or gone is not None):
                    self._publish(self.report.with_lifetime(lower, upper))
        except OSError as exc:
            log.warning("mapping lifetime measurement failed", error=str(exc))
        finally:
            for task in tasks:
                task.cancel()

    def _publish(self, report: NatReport) -> None:
        self.report = report
        self.on_report(report)


def main() -> None:
    """`python -m punchline.nat.discover --server HOST:PORT ...`: one report as JSON (labs)."""
    import argparse
    import json

    from punchline.util.parse import host_port

    parser = argparse.ArgumentParser(description="Classify this host's NAT (one JSON line).")
    parser.add_argument("--server", action="append", required=True, help="HOST:PORT (repeat)")
    parser.add_argument("--lifetime", action="append", type=float, default=[], help="a wait, s")
    args = parser.parse_args()
    servers = [host_port(s) for s in args.server]
    report = asyncio.run(discover(servers, lifetime_waits=tuple(args.lifetime)))
    print(json.dumps(report.as_json()), flush=True)


if __name__ == "__main__":
    main()
