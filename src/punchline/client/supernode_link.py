"""The daemon's own session to its supernode: UDP, else TCP 443/80, else TLS, else via a proxy.

Why a ladder: a user must get online from whatever network they are in. UDP is cheapest and is
what the rest of the system (hole punching, media) wants, so it is tried first, at several
supernodes at once. Networks that drop UDP still let TCP out, often only to the web ports
443 and 80; some let only TLS through, and the most locked-down ones let nothing out except an
HTTP CONNECT proxy. Supernodes serve plain TCP and TLS on the same 443/80 ports, so each rung
of the ladder is one more way to the same session port.

The climb is "happy eyeballs" (RFC 8305): UDP alone gets a head start of `UDP_HEAD_START`;
then stream attempts start rung by rung (the first stream address of every probed supernode,
then the second, ...), `RUNG_DELAY` apart or sooner when every attempt of a rung has failed.
The first session to be welcomed wins; the daemon closes the rest. In a network where UDP
works no stream is ever opened; where only the proxy works, the proxy rung starts within two
seconds instead of after every direct attempt has timed out.

The `OutboundSession` core never learns which transport carries it: a link only moves its
packets (with a 2-byte length in front on streams) and reports a stream's end, which the
daemon treats as its supernode being gone — a killed supernode is noticed at once over TCP,
not after the channel's silence timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography import x509

from punchline.errors import LocalError
from punchline.identity import certs
from punchline.runtime.streams import (
    ProxyConfig,
    explain,
    hostport,
    open_stream,
    os_reason,
    web_order,
)
from punchline.session.channel import ChannelConfig
from punchline.wire import session as wire

log = structlog.get_logger(component="daemon")

TRANSPORT_CHOICES = ("auto", "udp", "tcp", "tls", "proxy")
STREAM_TRANSPORTS = ("tcp", "tls", "proxy")
UDP_HEAD_START = 0.3  # UDP alone this long before the first stream attempt starts
RUNG_DELAY = 0.25  # RFC 8305's recommended connection attempt delay
CONNECT_TIMEOUT = 5.0  # TCP connect, proxy tunnel and TLS handshake together
MAX_QUEUED = 32  # packets held while a stream connects (HELLO retries, the first messages)
MAX_WRITE_BUFFER = 64 * 1024  # unsent bytes beyond which a stalled stream drops packets
READ_CHUNK = 65536

Address = tuple[str, int]


@dataclass(frozen=True)
class Target:
    """One way to a supernode's session port: "tcp", "tls", or "proxy" (TLS in a tunnel)."""

    transport: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.transport} {hostport(self.host, self.port)}"


@dataclass
class Supernode:
    node_id: str
    # The UDP session address: where datagrams go, and what presence records name (other
    # supernodes hand signals over to it, whichever transport the client itself uses).
    address: Address
    # The TCP and TLS session addresses of the bootstrap list, in its order.
    streams: tuple[Target, ...] = ()


def supernodes_in(listing: dict[str, Any]) -> list[Supernode]:
    """The supernodes of a (CA-signed, verified) bootstrap list that have a UDP address."""
    found = []
    for node in listing.get("nodes", []):
        if "supernode" not in node.get("roles", []):
            continue
        udp: Address | None = None
        streams = []
        for address in node.get("addresses", []):
            transport, where = (
                address.get("transport"),
                (str(address["host"]), int(address["port"])),
            )
            if transport == "udp" and udp is None:
                udp = where
            elif transport in ("tcp", "tls"):
                streams.append(Target(str(transport), *where))
        if udp is not None:
            found.append(Supernode(str(node["node_id"]), udp, tuple(streams)))
    return found


def stream_targets(node: Supernode, transport: str, proxy: bool) -> list[Target]:
    """The stream ways to `node` for a `--supernode-transport` choice, best first.

    Web ports first (a firewall that lets only web traffic out is the common case), plain TCP
    before TLS (cheaper, and the supernode's port serves both), and through the proxy only TLS,
    so the proxy sees an ordinary HTTPS tunnel.
    """
    ordered = sorted(node.streams, key=lambda t: web_order(t.port))
    tcp = [t for t in ordered if t.transport == "tcp"]
    tls = [t for t in ordered if t.transport == "tls"]
    tunnelled = [dataclasses.replace(t, transport="proxy") for t in tls] if proxy else []
    if transport == "auto":
        return tcp + tls + tunnelled
    return {"tcp": tcp, "tls": tls, "proxy": tunnelled}.get(transport, [])


def rungs(
    nodes: list[Supernode], transport: str, proxy: bool
) -> list[list[tuple[Supernode, Target]]]:
    """Rung i holds the i-th stream way of every node: all nodes get their best way first."""
    ways = [stream_targets(node, transport, proxy) for node in nodes]
    depth = max((len(w) for w in ways), default=0)
    return [
        [(n, w[i]) for n, w in zip(nodes, ways, strict=True) if i < len(w)] for i in range(depth)
    ]


def stream_channel(config: ChannelConfig) -> ChannelConfig:
    """Channel timing for a session over a stream, where TCP already retransmits.

    Resending our own reliable messages early only duplicates what TCP delivers anyway, so the
    first resend waits longer; idle pings are rarer. A silent supernode is still noticed within
    `ping_interval + dead_after` (5 s), and a closed connection at once.
    """
    return dataclasses.replace(
        config,
        retransmit_initial=max(config.retransmit_initial, 1.0),
        retransmit_max=max(config.retransmit_max, 2.0),
        ping_interval=None if config.ping_interval is None else max(config.ping_interval, 2.5),
    )


def pinned_tls(ca: x509.Certificate) -> ssl.SSLContext:
    """TLS that trusts only our CA: a proxy or middlebox cannot pose as the supernode."""
    return ssl.create_default_context(cadata=certs.to_pem(ca))


def _environment_proxy() -> ProxyConfig | None:
    """The lower-case `https_proxy` many systems set (the CLI reads HTTPS_PROXY itself).

    A value we cannot use (say https://) is a warning, not a reason to stay offline.
    """
    url = os.environ.get("https_proxy")
    if not url:
        return None
    try:
        return ProxyConfig.parse(url)
    except LocalError as exc:
        log.warning("ignoring https_proxy from the environment", reason=str(exc))
        return None


# ------------------------------------------------------------------ links


class Link:
    """One way to one supernode that an OutboundSession's packets travel."""

    transport = ""

    def __init__(self, node: Supernode) -> None:
        self.node = node

    def send(self, packets: list[bytes]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop using this way (a UDP link shares the daemon's socket: nothing to close)."""

    @property
    def where(self) -> Address:
        return self.node.address


class DatagramLink(Link):
    """The supernode's UDP address, through the daemon's one signalling socket."""

    transport = "udp"

    def __init__(self, node: Supernode, sock: asyncio.DatagramTransport | None) -> None:
        super().__init__(node)
        self.sock = sock

    def send(self, packets: list[bytes]) -> None:
        if self.sock is not None and not self.sock.is_closing():
            for packet in packets:
                self.sock.sendto(packet, self.node.address)


PacketCallback = Callable[["StreamLink", bytes], None]
EndCallback = Callable[["StreamLink", str], None]


class StreamLink(Link):
    """A TCP or TLS connection (perhaps through a proxy) carrying length-prefixed packets.

    Connects in a task of its own; packets sent meanwhile wait (at most `MAX_QUEUED`). Frames
    read go to `on_packet`; when the connection fails or ends, `on_end` hears why — unless
    `close()` ended it. `ended` resolves either way, with the reason.
    """

    def __init__(
        self,
        node: Supernode,
        target: Target,
        *,
        tls: ssl.SSLContext | None,
        proxy: ProxyConfig | None,
        on_packet: PacketCallback,
        on_end: EndCallback,
        timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        super().__init__(node)
        self.target = target
        self.transport = target.transport
        self.connected = False
        self.dropped = 0
        self._tls = tls if target.transport in ("tls", "proxy") else None
        self._proxy = proxy if target.transport == "proxy" else None
        self._on_packet, self._on_end = on_packet, on_end
        self._timeout = timeout
        self._queue: list[bytes] = []
        self._writer: asyncio.StreamWriter | None = None
        self._closing = False
        loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[str] = loop.create_future()
        self._task = loop.create_task(self._run())

    @property
    def where(self) -> Address:
        return (self.target.host, self.target.port)

    def send(self, packets: list[bytes]) -> None:
        if self.ended.done() or not packets:
            return
        if self._writer is None:
            self._queue += packets
            del self._queue[:-MAX_QUEUED]
            return
        if self._writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.dropped += len(packets)  # stalled: the channel resends what matters
            return
        self._writer.write(b"".join(wire.frame(p) for p in packets))

    def close(self) -> None:
        self._closing = True
        if self._task is not asyncio.current_task():
            self._task.cancel()
        self._end("closed")

    async def _run(self) -> None:
        target = self.target
        try:
            async with asyncio.timeout(self._timeout):
                reader, self._writer = await open_stream(
                    target.host, target.port, tls=self._tls, proxy=self._proxy,
                    server_hostname=certs.node_dns_name(self.node.node_id),
                )  # fmt: skip
        except TimeoutError:
            self._end(f"no connection within {self._timeout:g} s")
            return
        except Exception as exc:
            failure = explain(exc)
            if failure is None:
                raise
            self._end(str(failure))
            return
        self.connected = True
        self.send(self._queue)
        self._queue = []
        decoder = wire.FrameDecoder()
        try:
            while data := await reader.read(READ_CHUNK):
                for frame in decoder.feed(data):
                    try:
                        self._on_packet(self, frame)
                    except Exception:  # a bug of ours must not silently stop the reading
                        log.exception("a packet from the supernode could not be handled")
        except wire.SessionPacketError:
            self._end("the supernode sent bytes that are not session frames")
        except ssl.SSLError as exc:
            self._end(f"the TLS connection failed ({exc.reason or exc})")
        except OSError as exc:
            self._end(f"the connection failed ({os_reason(exc)})")
        else:
            self._end("the supernode closed the connection")

    def _end(self, reason: str) -> None:
        if self.ended.done():
            return
        self.ended.set_result(reason)
        if self._writer is not None:
            self._writer.close()
        if not self._closing:
            self._on_end(self, reason)


# ------------------------------------------------------------------ the ladder


class Ladder:
    """Which ways the daemon tries, the stream attempts under way, and when each starts.

    `climb()` starts a fresh attempt (cancelling the previous one's streams); `opened(link)`
    is called for each stream link as its rung starts, so the daemon can give it a session.
    `settle(winner)` closes every other stream once a session won.
    """

    def __init__(
        self,
        transport: str,
        proxy_url: str | None,
        on_packet: PacketCallback,
        on_end: EndCallback,
    ) -> None:
        if transport not in TRANSPORT_CHOICES:
            raise LocalError(f"supernode transport must be one of {', '.join(TRANSPORT_CHOICES)}")
        self.transport = transport
        self.proxy = ProxyConfig.parse(proxy_url) if proxy_url else _environment_proxy()
        if transport == "proxy" and self.proxy is None:
            raise LocalError("--supernode-transport proxy needs --proxy URL (or HTTPS_PROXY)")
        self._on_packet, self._on_end = on_packet, on_end
        self._links: list[StreamLink] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def udp(self) -> bool:
        return self.transport in ("auto", "udp")

    def climb(
        self,
        nodes: list[Supernode],
        ca: x509.Certificate,
        opened: Callable[[StreamLink], None],
    ) -> None:
        self.settle(None)
        steps = rungs(nodes, self.transport, self.proxy is not None)
        if not steps:
            if not self.udp:
                log.warning("no supernode lists an address for this transport",
                            transport=self.transport)  # fmt: skip
            return
        tls = pinned_tls(ca)
        # Without UDP nothing else is trying: the first rung starts before climb() returns,
        # so the caller has attempts under way at once.
        first = [] if self.udp else self._start(steps.pop(0), tls, opened)
        self._task = asyncio.get_running_loop().create_task(self._climb(steps, tls, opened, first))

    async def _climb(
        self,
        steps: list[list[tuple[Supernode, Target]]],
        tls: ssl.SSLContext,
        opened: Callable[[StreamLink], None],
        started: list[StreamLink],
    ) -> None:
        if not started:
            await asyncio.sleep(UDP_HEAD_START)
        for rung in steps:
            if started:  # the next rung after RUNG_DELAY, or once this whole rung has failed
                await asyncio.wait([link.ended for link in started], timeout=RUNG_DELAY)
            started = self._start(rung, tls, opened)

    def _start(
        self,
        rung: list[tuple[Supernode, Target]],
        tls: ssl.SSLContext,
        opened: Callable[[StreamLink], None],
    ) -> list[StreamLink]:
        links = []
        for node, target in rung:
            link = StreamLink(node, target, tls=tls, proxy=self.proxy,
                              on_packet=self._on_packet, on_end=self._on_end)  # fmt: skip
            self._links.append(link)
            links.append(link)
            opened(link)
        return links

    def settle(self, winner: Link | None) -> None:
        """Stop climbing and close every stream attempt but `winner`."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for link in self._links:
            if link is not winner:
                link.close()
        self._links = []
