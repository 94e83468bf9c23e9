"""Opening and accepting TCP/TLS streams, directly or through an HTTP CONNECT proxy.

Why this is shared: the ways out of a restrictive network are the same whoever is leaving —
the relay client (TURN over TCP/TLS) and the daemon's own session to its supernode both need
"TCP, TLS checked against the pinned CA, or TLS inside a proxy tunnel", and both servers serve
plain TCP and TLS on one port 443 by looking at the first byte a client sends. Keeping it in
one place keeps the proxy's error messages (which a user reads to tell whether their network
or our server is at fault) the same everywhere.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from punchline.errors import LocalError, RemoteError

log = structlog.get_logger(component="streams")

MAX_PROXY_HEAD = 8192  # a CONNECT answer longer than this is not one we want to parse
TLS_FIRST_BYTE = 0x16  # TLS record type "handshake" (RFC 8446 §5.1): a ClientHello starts so
FIRST_BYTE_TIMEOUT = 10.0  # a client that connects and says nothing is let go after this

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]]


class StreamUnavailable(RemoteError):
    """No stream to the server: unreachable, TLS failed, or the proxy said no.

    `code` is the proxy's HTTP status (or a protocol's error code in subclasses), when there
    was one.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ProxyConfig:
    """An HTTP proxy that allows CONNECT, with optional Basic credentials."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> ProxyConfig:
        """`http://[user:pass@]host:port`, as found in HTTPS_PROXY or a user's settings."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise LocalError(f"proxy URL {url!r} is not valid: {exc}") from exc
        if parts.scheme != "http":
            raise LocalError(f"proxy URL {url!r} must start with http:// (an HTTP CONNECT proxy)")
        if not parts.hostname or port is None:
            raise LocalError(f"proxy URL {url!r} must name a host and a port: http://host:port")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise LocalError(f"proxy URL {url!r} must not have a path, query or fragment")
        username = None if parts.username is None else urllib.parse.unquote(parts.username)
        password = None if parts.password is None else urllib.parse.unquote(parts.password)
        return cls(parts.hostname, port, username, password)

    def authorization(self) -> str | None:
        """The Proxy-Authorization value (Basic, RFC 7617), or None without credentials."""
        if self.username is None:
            return None
        token = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(token).decode("ascii")

    def __str__(self) -> str:
        return hostport(self.host, self.port)


def os_reason(exc: OSError) -> str:
    """A reason like "Connection refused", not asyncio's "Connect call failed (addr)"."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        return str(exc.strerror or exc)
    return os.strerror(exc.errno)


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def web_order(port: int) -> int:
    """Sort key putting 443, then 80 first: the ports a web-only firewall lets out."""
    return {443: 0, 80: 1}.get(port, 2)


def explain(exc: BaseException) -> StreamUnavailable | None:
    """What went wrong opening a stream, in words for a person; None if not a network failure.

    (Timeouts are the caller's to word: only it knows how long it waited.)
    """
    if isinstance(exc, StreamUnavailable):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return StreamUnavailable(f"its TLS certificate does not verify ({exc.verify_message})")
    if isinstance(exc, ssl.SSLError):
        return StreamUnavailable(f"TLS handshake failed ({exc.reason or exc})")
    if isinstance(exc, OSError):
        return StreamUnavailable(f"cannot connect ({os_reason(exc)})")
    return None


async def open_stream(
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    proxy: ProxyConfig | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP stream to host:port, TLS inside it when `tls` is given, through `proxy` if given.

    Through a proxy the TLS handshake runs inside the tunnel, so the proxy sees an ordinary
    HTTPS tunnel it cannot inspect. Direct connection failures raise the OSError/SSLError
    (`explain` words them); proxy failures raise `StreamUnavailable` with its status line.
    """
    hostname = (server_hostname or host) if tls is not None else None
    if proxy is None:
        return await asyncio.open_connection(host, port, ssl=tls, server_hostname=hostname)
    try:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port, limit=MAX_PROXY_HEAD)
    except OSError as exc:
        raise StreamUnavailable(f"cannot connect to the proxy ({os_reason(exc)})") from exc
    try:
        await proxy_connect(reader, writer, proxy, host, port)
        if tls is not None:
            await writer.start_tls(tls, server_hostname=hostname)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def proxy_connect(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    proxy: ProxyConfig,
    host: str,
    port: int,
) -> None:
    """Ask the proxy for a tunnel to host:port; return once it answered 2xx."""
    target = hostport(host, port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    authorization = proxy.authorization()
    if authorization is not None:
        lines.append(f"Proxy-Authorization: {authorization}")
    try:
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    except UnicodeEncodeError as exc:
        raise LocalError("proxy host names and credentials must be ASCII") from exc
    writer.write(request)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        raise StreamUnavailable("the proxy closed the connection instead of answering") from None
    except asyncio.LimitOverrunError:
        raise StreamUnavailable(
            f"the proxy's answer is longer than {MAX_PROXY_HEAD} bytes"
        ) from None
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1").strip()
    version, _, rest = status_line.partition(" ")
    code_text = rest[:3]
    if not version.startswith("HTTP/") or not code_text.isdigit():
        raise StreamUnavailable(f"the proxy did not answer in HTTP: {status_line[:80]!r}")
    code = int(code_text)
    if not 200 <= code < 300:
        # 407 is the proxy's "who are you"; tinyproxy answers wrong credentials with 401
        hint = " (proxy credentials missing or wrong)" if code in (401, 407) else ""
        raise StreamUnavailable(f"the proxy refused the tunnel: {status_line[:200]}{hint}", code)


# ------------------------------------------------------------------ serving


async def first_byte(conn: socket.socket, timeout: float = FIRST_BYTE_TIMEOUT) -> int | None:
    """Peek at the first byte a freshly accepted client sends, without consuming it.

    None when the client closed or stayed silent for `timeout`. The socket is left
    non-blocking and unread, ready for a transport (plain or TLS) to take it over.
    """
    loop = asyncio.get_running_loop()
    conn.setblocking(False)
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(conn.fileno(), ready)
    try:
        await asyncio.wait_for(readable, timeout)
        first = conn.recv(1, socket.MSG_PEEK)
    except (TimeoutError, OSError):
        return None
    finally:
        loop.remove_reader(conn.fileno())
    return first[0] if first else None


async def serve_plain_and_tls(
    listener: socket.socket,
    tls: ssl.SSLContext,
    handler: StreamHandler,
    handshake_timeout: float = 10.0,
) -> None:
    """Accept on `listener` forever; each client gets TLS or plain TCP by its first byte.

    This is what lets one port 443 serve TLS clients, clients tunnelling through an HTTP
    CONNECT proxy, and plain TCP clients at once. `handler(reader, writer, "tls"|"tcp")` runs
    in a task of its own per client; a client that fails its TLS handshake is logged and
    dropped. Cancel the task running this to stop accepting.
    """
    loop = asyncio.get_running_loop()
    clients: set[asyncio.Task[None]] = set()

    async def serve(conn: socket.socket) -> None:
        first = await first_byte(conn)
        if first is None:
            conn.close()
            return
        name = "tls" if first == TLS_FIRST_BYTE else "tcp"
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = asyncio.StreamReader(limit=2**16)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=tls if name == "tls" else None,
                ssl_handshake_timeout=handshake_timeout if name == "tls" else None,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.info("stream client failed to connect", transport=name, reason=str(exc))
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await handler(reader, writer, name)

    try:
        while True:
            try:
                conn, _addr = await loop.sock_accept(listener)
            except OSError as exc:
                log.warning("accept failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(serve(conn))
            clients.add(task)
            task.add_done_callback(clients.discard)
    finally:
        for task in list(clients):
            task.cancel()
