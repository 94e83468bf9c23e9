"""Ask the home router for an inbound UDP port: PCP, NAT-PMP or UPnP-IGD, whichever it speaks.

Why: a mapping the router made on purpose is the best candidate a NATed peer can offer: it
admits datagrams from anyone, so the other side can reach us directly without punching. Many
home routers offer one of three protocols for it; this module tries all of them at once and
takes the first that works:

- PCP (RFC 6887) and NAT-PMP (RFC 6886), small binary protocols on the gateway's UDP port
  5351 (codecs in `pcp` and `natpmp`, the retransmission core in `portmap_core`). They share
  the port, and a PCP server also answers NAT-PMP, so PCP goes first and NAT-PMP follows as
  soon as PCP is refused or answered in NAT-PMP, or after PCP's first 250 ms of silence
  (RFC 6887 Appendix A's version negotiation, with a short clock): one router, one mapping.
- UPnP-IGD: SSDP discovery (multicast, and unicast to the gateway), the device description,
  then WANIPConnection's AddPortMapping — done with async-upnp-client, the maintained asyncio
  UPnP library. Discovery runs alongside PCP; the mapping is only asked for if PCP/NAT-PMP
  have not already won.

This runs at every daemon start, so the ordinary outcome on most networks — no router that
maps ports — costs at most `timeout` seconds and returns None; it never raises for that.
Nothing is retried in the background. A granted mapping is renewed at half its lifetime by a
task of its own until `release()` (or leaving `async with mapping`) deletes it on the router.

    mapping = await map_udp_port(sock_port)           # None: no mapping-capable router
    if mapping is not None:
        candidates.append(mapping.external)           # (public ip, port)
        ...
        await mapping.release()
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp
import structlog
from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client import UpnpService
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.exceptions import UpnpActionResponseError, UpnpError
from async_upnp_client.search import SsdpSearchListener
from async_upnp_client.ssdp import SSDP_PORT, SSDP_TARGET_V4
from async_upnp_client.utils import CaseInsensitiveDict

from punchline.connect import natpmp, pcp
from punchline.connect.portmap_core import FIRST_INTERVAL, Exchange, Unreachable
from punchline.errors import LocalError, PunchlineError
from punchline.runtime.driver import Driver

log = structlog.get_logger(component="portmap")

PROTOCOLS = ("pcp", "natpmp", "upnp")
DESCRIPTION = "punchline"
RENEW_TIMEOUT = 5.0  # seconds for one renewal or deletion exchange
RETRY_AFTER = 30.0  # a failed renewal is tried again this soon (or sooner, near expiry)
IGD_SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
# Connection services that carry AddPortMapping, best first.
UPNP_SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
UPNP_CONFLICT = 718  # ConflictInMappingEntry: the external port is taken
UPNP_ONLY_PERMANENT = 725  # OnlyPermanentLeasesSupported (IGDv1 routers)
RTF_GATEWAY = 0x2

# Datagrams and answers dropped as not ours or malformed, by reason (e.g. "pcp.malformed").
DROPS: Counter[str] = Counter()
# What became of each attempt, by "protocol.outcome" (e.g. "upnp.ok", "pcp.unreachable").
OUTCOMES: Counter[str] = Counter()
# Background deletions of mappings that lost the race; kept so they are not collected.
_BACKGROUND: set[asyncio.Task[None]] = set()

T = TypeVar("T")

# What "the router cannot or will not map" looks like, from any of the three protocols: these
# end an attempt quietly; anything else is a bug and propagates.
ORDINARY = (PunchlineError, OSError, TimeoutError, UpnpError, aiohttp.ClientError, ValueError)


class NoMapping(PunchlineError):
    """An attempt found no usable answer (the reason is in the message)."""


@dataclass(frozen=True)
class Grant:
    """What the router granted: the public side of the mapping and for how long (0: no end)."""

    external_ip: str
    external_port: int
    lifetime: int


class _Session(Protocol):
    """One protocol's way to ask for (or renew) and delete one mapping."""

    protocol: str

    async def request(self, lifetime: int, timeout: float) -> Grant: ...

    async def delete(self, timeout: float) -> None: ...


# ----------------------------------------------------------------- the mapping


class PortMapping:
    """A granted inbound UDP mapping, renewed in the background until released."""

    def __init__(
        self, session: _Session, gateway: str, internal: tuple[str, int], grant: Grant
    ) -> None:
        self._session = session
        self.protocol = session.protocol
        self.gateway = gateway
        self.internal = internal
        self._grant = grant
        self._granted_at = time.monotonic()
        self._renewer: asyncio.Task[None] | None = None
        self.released = False
        self.lost = False  # renewal failed until the lifetime ran out
        self.on_change: Callable[[PortMapping], None] | None = None  # new external address

    @property
    def external(self) -> tuple[str, int]:
        return self._grant.external_ip, self._grant.external_port

    @property
    def lifetime(self) -> int:
        """Seconds the router granted with the last request or renewal (0: until deleted)."""
        return self._grant.lifetime

    @property
    def expires_at(self) -> float:
        """time.monotonic() when the mapping lapses unless renewed (inf: never)."""
        if self._grant.lifetime == 0:
            return math.inf
        return self._granted_at + self._grant.lifetime

    def __repr__(self) -> str:
        return (f"PortMapping({self.protocol}, {self.internal[0]}:{self.internal[1]} -> "
                f"{self.external[0]}:{self.external[1]}, {self.lifetime} s)")  # fmt: skip

    def start_renewal(self, lifetime: int) -> None:
        if self._renewer is None and not self.released and self._grant.lifetime:
            self._renewer = asyncio.create_task(self._renew_forever(lifetime))

    async def _renew_forever(self, lifetime: int) -> None:
        """Renew at half the granted lifetime (RFC 6886 §3.3 and RFC 6887 §11.2.1 both say
        so); on failure try again, ever sooner, until the mapping has lapsed."""
        due = self._granted_at + self._grant.lifetime / 2
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                grant = await self._session.request(lifetime, RENEW_TIMEOUT)
            except ORDINARY as exc:
                left = self.expires_at - time.monotonic()
                if left <= 0:
                    self.lost = True
                    log.warning("port mapping lapsed", mapping=repr(self), error=str(exc))
                    return
                log.info("port mapping renewal failed", mapping=repr(self), error=str(exc))
                due = time.monotonic() + min(RETRY_AFTER, max(1.0, left / 2))
                continue
            changed = (grant.external_ip, grant.external_port) != self.external
            self._grant, self._granted_at = grant, time.monotonic()
            if changed:
                log.info("port mapping moved", mapping=repr(self))
                if self.on_change is not None:
                    self.on_change(self)
            if grant.lifetime == 0:
                return
            due = self._granted_at + grant.lifetime / 2

    async def release(self, timeout: float = 1.0) -> None:
        """Stop renewing and delete the mapping on the router; idempotent, never raises for
        an unreachable router (the mapping then lapses with its lifetime)."""
        if self.released:
            return
        self.released = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        try:
            await self._session.delete(timeout)
        except ORDINARY as exc:
            log.info("port mapping deletion failed", mapping=repr(self), error=str(exc))

    async def __aenter__(self) -> PortMapping:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


# ----------------------------------------------------------------- finding the gateway


def default_gateway_from_route_table(text: str) -> str | None:
    """The IPv4 default gateway in the text of /proc/net/route (lowest metric wins)."""
    best: tuple[int, str] | None = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 7:
            continue
        try:
            destination, gateway = int(fields[1], 16), int(fields[2], 16)
            flags, metric = int(fields[3], 16), int(fields[6])
        except ValueError:
            continue
        if destination != 0 or not flags & RTF_GATEWAY or gateway == 0:
            continue
        address = str(ipaddress.IPv4Address(gateway.to_bytes(4, "little")))
        if best is None or metric < best[0]:
            best = (metric, address)
    return None if best is None else best[1]


def default_gateway(route_table: Path = Path("/proc/net/route")) -> str | None:
    try:
        return default_gateway_from_route_table(route_table.read_text())
    except OSError:
        return None


def local_address_towards(gateway: str) -> str:
    """Our own address on the link to the gateway (what the router sees as the client);
    connecting a UDP socket only consults the routing table, nothing is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((gateway, natpmp.PORT))
        address: str = sock.getsockname()[0]
        return address


# ----------------------------------------------------------------- PCP and NAT-PMP


async def _exchange(core: Exchange[T], drops_prefix: str) -> T:
    """Run one `Exchange` core over a UDP socket connected to the gateway."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    holder: list[asyncio.DatagramTransport] = []

    def flush(now: float) -> None:
        for data in core.datagrams_to_send(now):
            holder[0].sendto(data)
        if core.done and not finished.done():
            finished.set_result(None)

    class _Protocol(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
            core.receive(data, (str(addr[0]), int(addr[1])), Driver.now())
            driver.poke()

        def error_received(self, exc: Exception) -> None:
            core.unreachable(str(exc))  # ICMP port unreachable: no server on the gateway
            driver.poke()

    transport, _ = await loop.create_datagram_endpoint(_Protocol, remote_addr=core.gateway)
    holder.append(transport)
    driver = Driver(core, flush)
    try:
        driver.poke()
        await finished
    finally:
        driver.stop()
        transport.close()
        for reason, count in core.drops.items():
            DROPS[f"{drops_prefix}.{reason}"] += count
    if core.result is not None:
        return core.result
    assert core.error is not None
    raise core.error


class PcpSession:
    """A PCP MAP mapping; the nonce ties renewals and the deletion to it (RFC 6887 §11.1)."""

    protocol = "pcp"

    def __init__(self, gateway: str, client_ip: str, internal_port: int) -> None:
        self.gateway, self.client_ip, self.internal_port = gateway, client_ip, internal_port
        self.nonce = os.urandom(pcp.NONCE_BYTES)
        self._last: Grant | None = None

    def _request(self, lifetime: int) -> pcp.MapRequest:
        last = self._last
        return pcp.MapRequest(
            self.nonce, pcp.PROTOCOL_UDP, self.internal_port,
            last.external_port if last else self.internal_port,  # ask to keep the port
            last.external_ip if last else "0.0.0.0",  # noqa: S104 - "any" in PCP terms
            lifetime, self.client_ip,
        )  # fmt: skip

    async def request(self, lifetime: int, timeout: float) -> Grant:
        request = self._request(lifetime)
        now = Driver.now()
        core = Exchange(pcp.encode_map_request(request),
                        lambda data: pcp.decode_map_reply_untrusted(data, request),
                        (self.gateway, pcp.PORT), now, now + timeout)  # fmt: skip
        reply = await _exchange(core, "pcp")
        self._last = Grant(reply.external_ip, reply.external_port, reply.lifetime)
        return self._last

    async def delete(self, timeout: float) -> None:
        request = self._request(0)
        now = Driver.now()
        core = Exchange(pcp.encode_map_request(request),
                        lambda data: pcp.decode_map_reply_untrusted(data, request),
                        (self.gateway, pcp.PORT), now, now + timeout)  # fmt: skip
        await _exchange(core, "pcp")


class NatPmpSession:
    """A NAT-PMP mapping: the external address and the port come from two requests."""

    protocol = "natpmp"

    def __init__(self, gateway: str, internal_port: int) -> None:
        self.gateway, self.internal_port = gateway, internal_port
        self._last: Grant | None = None

    async def _map(self, suggested: int, lifetime: int, timeout: float) -> natpmp.MapReply:
        now = Driver.now()
        core = Exchange(natpmp.encode_map_request(self.internal_port, suggested, lifetime),
                        lambda data: natpmp.decode_map_reply_untrusted(data, self.internal_port),
                        (self.gateway, natpmp.PORT), now, now + timeout)  # fmt: skip
        return await _exchange(core, "natpmp")

    async def request(self, lifetime: int, timeout: float) -> Grant:
        now = Driver.now()
        address_core = Exchange(natpmp.encode_address_request(),
                                natpmp.decode_address_reply_untrusted,
                                (self.gateway, natpmp.PORT), now, now + timeout)  # fmt: skip
        suggested = self._last.external_port if self._last else self.internal_port
        address, reply = await asyncio.gather(
            _exchange(address_core, "natpmp"), self._map(suggested, lifetime, timeout)
        )
        if reply.lifetime == 0:
            raise NoMapping("the NAT-PMP gateway granted a mapping of no lifetime")
        self._last = Grant(address.external_ip, reply.external_port, reply.lifetime)
        return self._last

    async def delete(self, timeout: float) -> None:
        await self._map(0, 0, timeout)  # RFC 6886 §3.4


# ----------------------------------------------------------------- UPnP-IGD


async def discover_igd(gateway: str, local_ip: str, timeout: float) -> UpnpService:
    """The first Internet Gateway Device to answer SSDP, as its port-mapping service.

    A LOCATION pointing anywhere but the device that answered is ignored (a LAN host could
    otherwise send us to fetch any URL)."""
    loop = asyncio.get_running_loop()
    found: asyncio.Future[str] = loop.create_future()

    async def on_response(headers: CaseInsensitiveDict) -> None:
        location = str(headers.get_lower("location") or "")
        try:
            host = urlsplit(location).hostname
        except ValueError:
            host = None
        if host is None or host != headers.get_lower("_host"):
            DROPS["upnp.foreign_location"] += 1
            return
        if not found.done():
            found.set_result(location)

    listener = SsdpSearchListener(
        async_callback=on_response, source=(local_ip, 0), target=SSDP_TARGET_V4, timeout=1,
        search_target=IGD_SEARCH_TARGET,
    )  # fmt: skip
    await listener.async_start()
    try:
        listener.async_search()
        listener.async_search(override_target=(gateway, SSDP_PORT))
        location = await found
    finally:
        listener.async_stop()
    requester = AiohttpRequester(timeout=max(1, math.ceil(timeout)))
    device = await UpnpFactory(requester).async_create_device(location)
    services = {service.service_type: service for service in device.all_services}
    for service_type in UPNP_SERVICES:
        service = services.get(service_type)
        if service is not None and service.has_action("AddPortMapping"):
            return service
    raise NoMapping(f"the IGD at {location} has no port-mapping service")


class UpnpSession:
    """A mapping made through WANIPConnection (or WANPPPConnection) on an IGD."""

    protocol = "upnp"

    def __init__(self, service: UpnpService, client_ip: str, internal_port: int) -> None:
        self.service, self.client_ip, self.internal_port = service, client_ip, internal_port
        self.external_port: int | None = None
        self._permanent = False

    async def _call(self, action: str, timeout: float, **arguments: Any) -> dict[str, Any]:
        result = await self.service.action(action).async_call(request_timeout=timeout, **arguments)
        return dict(result)

    async def _add(self, port: int, lifetime: int, timeout: float) -> None:
        """AddPortMapping, in IGDv1 and v2 alike. (IGDv2's AddAnyPortMapping would pick a free
        port itself, but async-upnp-client rejects miniupnpd's answer to it as malformed.)"""
        await self._call("AddPortMapping", timeout, NewRemoteHost="", NewExternalPort=port,
                         NewProtocol="UDP", NewInternalPort=self.internal_port,
                         NewInternalClient=self.client_ip, NewEnabled=True,
                         NewPortMappingDescription=DESCRIPTION,
                         NewLeaseDuration=0 if self._permanent else lifetime)  # fmt: skip

    async def request(self, lifetime: int, timeout: float) -> Grant:
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.05, deadline - time.monotonic())

        candidates = (
            [self.external_port]
            if self.external_port is not None  # a renewal: the same port again
            else [self.internal_port, *(random.randint(1024, 65535) for _ in range(3))]  # noqa: S311
        )
        port: int | None = None
        for candidate in candidates:
            try:
                await self._add(candidate, lifetime, left())
            except UpnpActionResponseError as exc:
                if exc.error_code == UPNP_ONLY_PERMANENT and not self._permanent:
                    self._permanent = True
                    await self._add(candidate, lifetime, left())
                elif exc.error_code == UPNP_CONFLICT and self.external_port is None:
                    continue  # taken by another host: try another port
                else:
                    raise
            port = candidate
            break
        if port is None:
            raise NoMapping("every external port the IGD was asked for is taken")
        self.external_port = port
        address = await self._call("GetExternalIPAddress", left())
        external_ip = str(address.get("NewExternalIPAddress") or "")
        ipaddress.IPv4Address(external_ip)  # ValueError: the IGD has no usable address
        return Grant(external_ip, port, 0 if self._permanent else lifetime)

    async def delete(self, timeout: float) -> None:
        if self.external_port is not None:
            await self._call("DeletePortMapping", timeout, NewRemoteHost="",
                             NewExternalPort=self.external_port, NewProtocol="UDP")  # fmt: skip


# ----------------------------------------------------------------- the race


async def _attempt(session: _Session, lifetime: int, deadline: float) -> tuple[_Session, Grant]:
    try:
        grant = await session.request(lifetime, max(0.05, deadline - time.monotonic()))
    except ORDINARY as exc:
        OUTCOMES[f"{session.protocol}.{type(exc).__name__}"] += 1
        raise NoMapping(f"{session.protocol}: {exc}") from exc
    OUTCOMES[f"{session.protocol}.ok"] += 1
    return session, grant


async def _pcp_then_natpmp(
    gateway: str, client_ip: str, internal_port: int, lifetime: int, deadline: float,
    use_pcp: bool, use_natpmp: bool,
) -> tuple[_Session, Grant]:  # fmt: skip
    """PCP first; NAT-PMP when PCP fails, or after PCP's first interval of silence."""
    tasks: list[asyncio.Task[tuple[_Session, Grant]]] = []
    if use_pcp:
        pcp_session = PcpSession(gateway, client_ip, internal_port)
        tasks.append(asyncio.create_task(_attempt(pcp_session, lifetime, deadline)))
    natpmp_session = NatPmpSession(gateway, internal_port)
    try:
        if tasks:
            done, _ = await asyncio.wait(tasks, timeout=FIRST_INTERVAL)
            if done:
                cause = tasks[0].exception()
                if cause is None:
                    return tasks[0].result()
                if not use_natpmp or isinstance(cause.__cause__, Unreachable):
                    raise cause  # nothing listens on port 5351: NAT-PMP would not either
        if use_natpmp:
            tasks.append(asyncio.create_task(_attempt(natpmp_session, lifetime, deadline)))
        errors = []
        for next_done in asyncio.as_completed(tasks):
            try:
                return await next_done
            except NoMapping as exc:
                errors.append(str(exc))
        raise NoMapping("; ".join(errors))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _upnp(
    gateway: str, client_ip: str, internal_port: int, lifetime: int, deadline: float,
    other_won: Callable[[], bool],
) -> tuple[_Session, Grant]:  # fmt: skip
    try:
        service = await discover_igd(gateway, client_ip, deadline - time.monotonic())
    except ORDINARY as exc:
        OUTCOMES[f"upnp.{type(exc).__name__}"] += 1
        raise NoMapping(f"upnp: {exc}") from exc
    if other_won():
        raise NoMapping("upnp: not needed")
    return await _attempt(UpnpSession(service, client_ip, internal_port), lifetime, deadline)


def _release_later(session: _Session) -> None:
    task = asyncio.create_task(_quiet(session.delete(RENEW_TIMEOUT)))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def _quiet(step: Awaitable[None]) -> None:
    with contextlib.suppress(*ORDINARY):
        await step


def _release_losers(
    tasks: Sequence[asyncio.Task[tuple[_Session, Grant]]], winner: tuple[_Session, Grant]
) -> None:
    """Two protocols won at once: delete the loser's mapping, unless it is the winner's
    (same public port: one router rule that both protocols asked for)."""
    for task in tasks:
        if task.cancelled() or task.exception() is not None:
            continue
        session, grant = task.result()
        external = (grant.external_ip, grant.external_port)
        if session is not winner[0] and external != (
            winner[1].external_ip,
            winner[1].external_port,
        ):
            _release_later(session)


async def _race(
    gateway: str, client_ip: str, internal_port: int, lifetime: int, timeout: float,
    protocols: Sequence[str],
) -> tuple[_Session, Grant] | None:  # fmt: skip
    """Every asked-for protocol at once; the first grant wins, the others are stopped."""
    deadline = time.monotonic() + timeout
    tasks: list[asyncio.Task[tuple[_Session, Grant]]] = []
    winner: tuple[_Session, Grant] | None = None
    if "pcp" in protocols or "natpmp" in protocols:
        tasks.append(asyncio.create_task(_pcp_then_natpmp(
            gateway, client_ip, internal_port, lifetime, deadline,
            "pcp" in protocols, "natpmp" in protocols)))  # fmt: skip
    if "upnp" in protocols:
        tasks.append(asyncio.create_task(_upnp(
            gateway, client_ip, internal_port, lifetime, deadline,
            lambda: winner is not None)))  # fmt: skip
    failures: list[str] = []
    try:
        pending = set(tasks)
        while pending and winner is None:
            done, pending = await asyncio.wait(
                pending, timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
            if not done:
                break  # the deadline passed
            for task in done:
                error = task.exception()
                if isinstance(error, NoMapping):
                    failures.append(str(error))
                elif error is not None:  # a bug, not the network: say so, but start anyway
                    log.error("port mapping attempt crashed", exc_info=error)
                elif winner is None:
                    winner = task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if winner is not None:
            _release_losers(tasks, winner)
    if winner is None:
        log.info("no port mapping", gateway=gateway, seconds=timeout,
                 failures=failures or ["no answer in time"])  # fmt: skip
    return winner


async def map_udp_port(
    internal_port: int,
    lifetime: int = 3600,
    timeout: float = 1.0,
    gateway: str | None = None,
    protocols: Sequence[str] = PROTOCOLS,
) -> PortMapping | None:
    """Map UDP `internal_port` of this host on the router; None if no router would.

    Returns within `timeout` seconds (the default gateway from the routing table unless
    `gateway` is given); `protocols` limits which of "pcp", "natpmp", "upnp" are tried. The
    mapping asks for `lifetime` seconds and renews itself until `release()`.
    """
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise LocalError(f"unknown port mapping protocols {sorted(unknown)}; known: {PROTOCOLS}")
    if not 1 <= internal_port <= 0xFFFF or not 1 <= lifetime <= 0xFFFFFFFF:
        raise LocalError(f"cannot map port {internal_port} for {lifetime} s")
    gateway = gateway or default_gateway()
    if gateway is None:
        OUTCOMES["no_gateway"] += 1
        return None
    try:
        client_ip = local_address_towards(gateway)
    except OSError:
        OUTCOMES["no_route"] += 1
        return None
    winner = await _race(gateway, client_ip, internal_port, lifetime, timeout, protocols)
    if winner is None:
        return None
    session, grant = winner
    mapping = PortMapping(session, gateway, (client_ip, internal_port), grant)
    mapping.start_renewal(lifetime)
    log.info("port mapped", mapping=repr(mapping))
    return mapping
