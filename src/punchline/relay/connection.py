"""TURN over real sockets: the asyncio adapter around the sans-I/O `TurnClient`.

Why each transport: a relayed call must get out of whatever network the user is in. UDP is
best for voice; where only TCP leaves the network, TURN runs over TCP; where only HTTPS leaves,
over TLS (port 443 looks like any web server); and where even that must go through the
corporate HTTP proxy, we ask the proxy for a tunnel (HTTP CONNECT, RFC 9110 §9.3.6) and speak
TLS inside it, so the proxy sees an ordinary HTTPS tunnel and nothing it could inspect.

The adapter only moves bytes and time: datagrams or a `StreamDecoder`'s messages go into the
core, `to_server()` goes out, the core's timer is one `loop.call_at` handle, and its events
become the `on_data` callback, the result of `open_turn`, or `closed_reason`. The core's clock
is `loop.time()`. Every failure to get an allocation is a `RelayUnavailable` whose message
says which server, which step, and what came back, because it ends up in front of a user
deciding whether their network or the relay is at fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import structlog

from punchline.errors import LocalError
from punchline.relay.turn_client import (
    Allocated,
    AllocationFailed,
    Event,
    Peer,
    PeerData,
    TurnClient,
)
from punchline.runtime.streams import (
    ProxyConfig,
    StreamUnavailable,
    explain,
    hostport,
    open_stream,
    os_reason,
)
from punchline.wire.channel_data import StreamDecoder
from punchline.wire.stun import StunError

__all__ = [
    "DataCallback",
    "ProxyConfig",  # from runtime.streams, where the daemon's supernode link shares it
    "RelayServer",
    "RelayUnavailable",
    "TurnConnection",
    "open_turn",
]

log = structlog.get_logger(component="turn")

TRANSPORTS = ("udp", "tcp", "tls")
CLOSE_TIMEOUT = 2.0  # how long close() waits for the server to confirm the release
MAX_WRITE_BUFFER = 256 * 1024  # queued stream bytes beyond which media is dropped, not buffered
READ_CHUNK = 65536

DataCallback = Callable[[bytes, Peer], None]


class RelayUnavailable(StreamUnavailable):
    """No allocation on this relay: unreachable, refused, timed out, or the proxy said no.

    `code` is the STUN error code (401, 486, 508, ...) or the proxy's HTTP status, when there
    was one.
    """


@dataclass(frozen=True)
class RelayServer:
    """Where a TURN server listens and how to talk to it."""

    transport: str  # "udp" | "tcp" | "tls"
    host: str
    port: int
    server_hostname: str | None = None  # the name its TLS certificate must carry; default host

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise LocalError(f"TURN transport must be one of {', '.join(TRANSPORTS)}")
        if not 0 < self.port <= 0xFFFF:
            raise LocalError(f"TURN server port {self.port} is not 1-65535")

    def __str__(self) -> str:
        return f"{hostport(self.host, self.port)} over {self.transport}"


class _Link(Protocol):
    def write(self, messages: list[bytes]) -> bool: ...

    def close(self) -> None: ...


class TurnConnection:
    """A live allocation: send to peers through it; their data arrives at `on_data`."""

    def __init__(self, core: TurnClient, transport: str, on_data: DataCallback) -> None:
        self.core = core
        self.transport = transport  # "udp" | "tcp" | "tls" | "tcp+proxy" | "tls+proxy"
        self.closed_reason: str | None = None
        self._on_data = on_data
        self._loop = asyncio.get_running_loop()
        self._link: _Link | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._allocated: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[str] = self._loop.create_future()
        self._adapter_counters = {"write_dropped": 0, "callback_errors": 0, "icmp_errors": 0}

    @property
    def relayed(self) -> Peer:
        assert self.core.relayed is not None, "TurnConnection exists only once allocated"
        return self.core.relayed

    @property
    def mapped(self) -> Peer | None:
        return self.core.mapped

    @property
    def counters(self) -> dict[str, int]:
        return {**self.core.counters, **self._adapter_counters}

    def send(self, data: bytes, peer: tuple[str, int]) -> None:
        """Send one datagram to `peer` through the relay (silently dropped once closed)."""
        self.core.send(data, peer, self._loop.time())
        self._pump()

    def add_peer(self, peer: tuple[str, int]) -> None:
        """Let `peer` reach us before we have sent it anything."""
        self.core.add_peer(peer, self._loop.time())
        self._pump()

    async def close(self) -> None:
        """Release the allocation, waiting briefly for the server to confirm, then disconnect."""
        if not self._closed.done():
            self.core.close(self._loop.time())
            self._pump()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._closed), CLOSE_TIMEOUT)
        self._shutdown("closed")

    async def wait_closed(self) -> str:
        """Wait until the allocation ends (released, refused a refresh, expired, link lost)."""
        return await asyncio.shield(self._closed)

    # ------------------------------------------------------------------ driven by the link

    def _attach(self, link: _Link) -> None:
        self._link = link

    def _receive(self, data: bytes) -> None:
        self.core.receive_untrusted(data, self._loop.time())
        self._pump()

    def _lost(self, reason: str) -> None:
        """The link died under us: the allocation is unreachable whatever the core thinks."""
        if not self._allocated.done():
            self._allocated.set_exception(RelayUnavailable(reason))
        self._shutdown(reason)

    def _icmp_error(self, exc: OSError) -> None:
        self._adapter_counters["icmp_errors"] += 1
        if not self._allocated.done():  # later ICMP errors may be transient or spoofed
            self._allocated.set_exception(
                RelayUnavailable(f"nothing answers there ({os_reason(exc)})")
            )

    def _pump(self) -> None:
        """Send what the core produced, act on its events, re-arm its timer."""
        if self._link is not None:
            messages = self.core.to_server()
            if messages and not self._link.write(messages):
                self._adapter_counters["write_dropped"] += len(messages)
        for event in self.core.events():
            self._on_event(event)
        if self._closed.done():
            return
        due = self.core.next_timer()
        if due != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = due
            self._timer = None if due is None else self._loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, None
        self.core.handle_timer(self._loop.time())
        self._pump()

    def _on_event(self, event: Event) -> None:
        if isinstance(event, PeerData):
            try:
                self._on_data(event.data, event.peer)
            except Exception:
                self._adapter_counters["callback_errors"] += 1
                log.exception("on_data callback failed", peer=event.peer)
        elif isinstance(event, Allocated):
            if not self._allocated.done():
                self._allocated.set_result(None)
        elif isinstance(event, AllocationFailed):
            if not self._allocated.done():
                message = (
                    f"refused the allocation: {event.code} {event.reason}"
                    if event.code
                    else event.reason
                )
                self._allocated.set_exception(RelayUnavailable(message, event.code or None))
        else:
            self._shutdown(event.reason)

    def _shutdown(self, reason: str) -> None:
        if not self._closed.done():
            self.closed_reason = reason
            self._closed.set_result(reason)
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, None
        if self._link is not None:
            self._link.close()


# ------------------------------------------------------------------ links


class _DatagramLink(asyncio.DatagramProtocol):
    """A connected UDP socket: only the server's datagrams reach us, ICMP errors surface."""

    def __init__(self, conn: TurnConnection) -> None:
        self.conn = conn
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (CPython's selector transport does not subclass DatagramTransport, hence the cast)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.conn._receive(data)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError):
            self.conn._icmp_error(exc)

    def write(self, messages: list[bytes]) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        for message in messages:
            self.transport.sendto(message)
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _StreamLink:
    """TCP or TLS: a reader task splits the stream into messages with `StreamDecoder`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: TurnConnection
    ) -> None:
        self.reader, self.writer, self.conn = reader, writer, conn
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        decoder = StreamDecoder()
        try:
            while data := await self.reader.read(READ_CHUNK):
                for message in decoder.feed(data):
                    self.conn._receive(message)
        except StunError:
            self.conn._lost("the TURN server sent bytes that are neither STUN nor ChannelData")
        except OSError as exc:
            self.conn._lost(f"the connection to the TURN server failed: {exc}")
        else:
            self.conn._lost("the TURN server closed the connection")

    def write(self, messages: list[bytes]) -> bool:
        if self.writer.is_closing():
            return False
        if self.writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            return False  # a stalled stream: late voice is useless, drop rather than queue
        self.writer.write(b"".join(messages))
        return True

    def close(self) -> None:
        if self.task is not asyncio.current_task():
            self.task.cancel()
        self.writer.close()


# ------------------------------------------------------------------ opening


async def open_turn(
    server: RelayServer,
    username: str,
    password: str,
    *,
    on_data: DataCallback,
    proxy: ProxyConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
    lifetime: float = 600.0,
) -> TurnConnection:
    """Connect to `server` (through `proxy` if given) and allocate a relayed UDP address.

    TLS verifies the server's certificate against the system's CAs unless `ssl_context` says
    otherwise. `timeout` bounds everything: connecting, the proxy, TLS, and the Allocate
    exchange. Raises `RelayUnavailable` when no allocation results, `LocalError` for a
    combination that cannot work (UDP through an HTTP proxy).
    """
    if proxy is not None and server.transport == "udp":
        raise LocalError("an HTTP proxy only carries TCP: use TURN over tls (or tcp) with it")
    loop = asyncio.get_running_loop()
    label = server.transport + ("+proxy" if proxy is not None else "")
    core = TurnClient(
        username, password, loop.time(), reliable=server.transport != "udp", lifetime=lifetime
    )
    conn = TurnConnection(core, label, on_data)
    where = f"TURN server {server}" + (f" via proxy {proxy}" if proxy is not None else "")
    try:
        async with asyncio.timeout(timeout):
            conn._attach(await _connect(server, proxy, ssl_context, conn))
            core.start(loop.time())
            conn._pump()
            await conn._allocated
    except TimeoutError:
        conn._shutdown("timeout")
        raise RelayUnavailable(f"{where}: no allocation within {timeout:g} s") from None
    except BaseException as exc:
        failure = explain(exc)
        if failure is None:
            conn._shutdown("cancelled")
            raise
        conn._shutdown(str(failure))
        raise RelayUnavailable(f"{where}: {failure}", failure.code) from exc
    return conn


async def _connect(
    server: RelayServer,
    proxy: ProxyConfig | None,
    ssl_context: ssl.SSLContext | None,
    conn: TurnConnection,
) -> _Link:
    loop = asyncio.get_running_loop()
    if server.transport == "udp":
        _, link = await loop.create_datagram_endpoint(
            lambda: _DatagramLink(conn), remote_addr=(server.host, server.port)
        )
        return link
    context = None
    if server.transport == "tls":
        context = ssl_context if ssl_context is not None else ssl.create_default_context()
    reader, writer = await open_stream(
        server.host, server.port, tls=context, server_hostname=server.server_hostname, proxy=proxy
    )
    return _StreamLink(reader, writer, conn)
