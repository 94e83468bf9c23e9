"""The relay's data plane: forwarding bound TURN channels between UDP sockets (RFC 8656 §12).

The TURN state machine decides; this module only moves datagrams. Once a channel is bound and
its permission is alive, the control plane calls `bind()`, and from then on

- ChannelData from the client (first byte 0x40-0x7F, length within the datagram, padding
  allowed) on the listening socket goes out of the allocation's relayed socket to the peer,
  without its 4-byte header;
- datagrams from that peer on the relayed socket go to the client from the listening socket,
  with the ChannelData header in front.

Everything else (STUN, unbound channels, peers with only a permission, garbage) goes to the
control plane, in arrival order. Two ways to drive a forwarder:

- Pump mode (`Forwarder`, both implementations): `pump_client()`/`pump_relay()` read one
  socket and return what is for Python as `(data, (host, port))`. They are meant for
  `loop.add_reader` callbacks on the sockets.
- Threaded mode (`ThreadedForwarder`, the C one only): `watch()` each socket and `start()` a
  thread of the forwarder's own that reads them all (epoll, recvmmsg, sendmmsg) without the
  GIL, so forwarded packets cost Python nothing at all, not even a wake-up. What is for Python
  waits in a bounded queue (4096 datagrams or 4 MiB; beyond that it is dropped and counted in
  `slow_dropped`) that `drain()` empties as `(kind, fd, data, (host, port))`, kind "client"
  or "relay" as the socket was watched; `notify_fd()` is an eventfd for `loop.add_reader`,
  readable while the queue is not empty. Every method may be called while the thread runs.

The sockets stay owned by Python: call `unbind_relay()` (and in threaded mode `unwatch()`,
after which the thread no longer touches the fd and `drain()` returns nothing more from it)
before closing a relayed socket, and `unbind()` as channels expire.

Two implementations with one behaviour: `punchline.relay._fastpath.Forwarder` in C (batches of
datagrams through recvmmsg/sendmmsg, no Python object per forwarded packet) and `PyForwarder`
here, the fallback and the reference the tests hold the C to. `make_forwarder()` picks one;
`threaded()` tells whether it has the threaded mode.

Counting: byte counts and the rate limit cover application data, not the ChannelData header. A
rate limit is a token bucket per direction refilling at `rate_bytes_per_s` with a one-second
burst; a datagram that does not fit is dropped and counted in `dropped_rate`. Send failures
(full buffers, unreachable destinations) are counted in `send_errors`, never raised.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias

from punchline.wire.channel_data import CHANNEL_HEADER_BYTES, MAX_CHANNEL, MIN_CHANNEL

Address: TypeAlias = tuple[str, int]
Datagram: TypeAlias = tuple[bytes, Address]


MAX_FD = 2**31 - 1
MAX_RATE = 1 << 48
MAX_BUDGET = 2**31 - 1
DEFAULT_BUDGET = 256
_MAX_DATAGRAM = 65536

COUNTER_NAMES = (
    "fast_to_peer_packets",
    "fast_to_peer_bytes",
    "fast_to_client_packets",
    "fast_to_client_bytes",
    "slow_packets",
    "slow_dropped",  # threaded mode: datagrams for Python dropped because the queue was full
    "dropped_rate",
    "send_errors",
)
STATS_NAMES = (
    "to_peer_packets",
    "to_peer_bytes",
    "to_client_packets",
    "to_client_bytes",
    "dropped_rate",
    "send_errors",
)


class Forwarder(Protocol):
    """What the control plane uses; both implementations satisfy it."""

    def bind(
        self,
        client_fd: int,
        client_addr: Address,
        channel: int,
        relay_fd: int,
        peer_addr: Address,
        rate_bytes_per_s: int = 0,
    ) -> None: ...

    def unbind(self, client_fd: int, client_addr: Address, channel: int) -> None: ...

    def unbind_relay(self, relay_fd: int) -> None: ...

    def pump_client(self, fd: int, budget: int = DEFAULT_BUDGET) -> list[Datagram]: ...

    def pump_relay(self, fd: int, budget: int = DEFAULT_BUDGET) -> list[Datagram]: ...

    def stats(
        self, client_fd: int, client_addr: Address, channel: int
    ) -> dict[str, int] | None: ...

    def counters(self) -> dict[str, int]: ...


Kind: TypeAlias = Literal["client", "relay"]
# What drain() returns: (the kind the socket was watched as, its fd, the datagram, the sender).
SlowDatagram: TypeAlias = tuple[str, int, bytes, Address]
DEFAULT_DRAIN = 1024


class ThreadedForwarder(Forwarder, Protocol):
    """A forwarder with a reading thread of its own (the C one)."""

    def watch(self, fd: int, kind: Kind) -> None: ...

    def unwatch(self, fd: int) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def notify_fd(self) -> int: ...

    def drain(self, budget: int = DEFAULT_DRAIN) -> list[SlowDatagram]: ...


def threaded(forwarder: Forwarder) -> ThreadedForwarder | None:
    """The forwarder as a ThreadedForwarder when it has the threaded mode, else None."""
    try:
        from punchline.relay import _fastpath
    except ImportError:
        return None
    return forwarder if isinstance(forwarder, _fastpath.Forwarder) else None


def make_forwarder(prefer_native: bool = True) -> Forwarder:
    """The C forwarder when it is built and wanted, else the pure-Python one."""
    if prefer_native:
        try:
            from punchline.relay import _fastpath
        except ImportError:
            pass
        else:
            return _fastpath.Forwarder()
    return PyForwarder()


# --- argument checks: the same as the C version's, TypeError for types, ValueError for values


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{what} must be in {lo}..{hi}")
    return value


def _address(value: object, what: str) -> tuple[socket.AddressFamily, Address]:
    """(family, (host, port)) with the host in the canonical text socket reports senders in."""
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError(f"{what} must be a (host, port) tuple")
    host, port = value
    if not isinstance(host, str):
        raise TypeError(f"{what} host must be a str")
    port = _int(port, "port", 0, 65535)
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return family, (socket.inet_ntop(family, socket.inet_pton(family, host)), port)
        except (OSError, ValueError):
            continue
    raise ValueError(f"{what} host {host!r} is not a numeric IPv4 or IPv6 address")


def _check_socket(fd: int, what: str, family: socket.AddressFamily) -> None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        raise ValueError(f"{what} {fd} is not a socket") from None
    try:
        kind = (sock.family, sock.type, sock.proto)
    finally:
        sock.detach()
    if (
        kind[1] != socket.SOCK_DGRAM
        or kind[2] != socket.IPPROTO_UDP
        or kind[0]
        not in {
            socket.AF_INET,
            socket.AF_INET6,
        }
    ):
        raise ValueError(f"{what} {fd} is not a UDP socket")
    if kind[0] != family:
        version = "IPv4" if family == socket.AF_INET else "IPv6"
        raise ValueError(f"{what} {fd} is not an {version} socket")


# --- the forwarder


@dataclass
class _Bucket:
    tokens: float
    last_ns: int

    def take(self, rate: int, size: int, now: int) -> bool:
        if rate == 0:
            return True
        if now > self.last_ns:
            self.tokens = min(float(rate), self.tokens + (now - self.last_ns) * rate / 1e9)
            self.last_ns = now
        if self.tokens < size:
            return False
        self.tokens -= size
        return True


@dataclass(eq=False)
class _Binding:
    client_fd: int
    client_addr: Address
    channel: int
    relay_fd: int
    peer_addr: Address
    rate: int
    to_peer_bucket: _Bucket
    to_client_bucket: _Bucket
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATS_NAMES, 0))

    @property
    def client_key(self) -> tuple[int, Address, int]:
        return self.client_fd, self.client_addr, self.channel

    @property
    def peer_key(self) -> tuple[int, Address]:
        return self.relay_fd, self.peer_addr


# What forwarding one datagram comes to: (binding, fd, datagram, destination, payload bytes);
# False when the rate limit dropped it, None when it is for Python.
_Forward: TypeAlias = tuple[_Binding, int, bytes, Address, int] | Literal[False] | None


class _Sockets:
    """Socket objects for fds owned elsewhere, for one pump call; detached, never closed."""

    def __init__(self) -> None:
        self._by_fd: dict[int, socket.socket] = {}

    def get(self, fd: int) -> socket.socket:
        sock = self._by_fd.get(fd)
        if sock is None:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self._by_fd[fd] = sock
        return sock

    def release(self) -> None:
        for sock in self._by_fd.values():
            sock.detach()
        self._by_fd.clear()


class PyForwarder:
    """The pure-Python forwarder: the fallback, and the behaviour the C version must match."""

    def __init__(self) -> None:
        self._by_client: dict[tuple[int, Address, int], _Binding] = {}
        self._by_peer: dict[tuple[int, Address], _Binding] = {}
        self._by_relay: dict[int, dict[tuple[int, Address], _Binding]] = {}
        self._counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._busy = False

    def bind(
        self,
        client_fd: int,
        client_addr: Address,
        channel: int,
        relay_fd: int,
        peer_addr: Address,
        rate_bytes_per_s: int = 0,
    ) -> None:
        client_key = self._client_key(client_fd, client_addr, channel)
        relay_fd = _int(relay_fd, "relay_fd", 0, MAX_FD)
        peer_family, peer = _address(peer_addr, "peer_addr")
        rate = _int(rate_bytes_per_s, "rate_bytes_per_s", 0, MAX_RATE)
        client_family, _ = _address(client_addr, "client_addr")
        _check_socket(client_key[0], "client_fd", client_family)
        _check_socket(relay_fd, "relay_fd", peer_family)
        now = time.monotonic_ns()
        old_client = self._by_client.get(client_key)
        old_peer = self._by_peer.get((relay_fd, peer))
        if old_client is not None and old_client is old_peer:
            # The same channel bound again (a refresh): keep the counters, take the rate.
            if old_client.rate != rate:
                old_client.rate = rate
                old_client.to_peer_bucket = _Bucket(float(rate), now)
                old_client.to_client_bucket = _Bucket(float(rate), now)
            return
        # A channel rebound to another peer or a peer moved to another channel: one binding
        # per key either way; the control plane decided which is allowed.
        for old in (old_client, old_peer):
            if old is not None:
                self._remove(old)
        binding = _Binding(
            client_fd=client_key[0],
            client_addr=client_key[1],
            channel=channel,
            relay_fd=relay_fd,
            peer_addr=peer,
            rate=rate,
            to_peer_bucket=_Bucket(float(rate), now),
            to_client_bucket=_Bucket(float(rate), now),
        )
        self._by_client[binding.client_key] = binding
        self._by_peer[binding.peer_key] = binding
        self._by_relay.setdefault(relay_fd, {})[binding.peer_key] = binding

    def unbind(self, client_fd: int, client_addr: Address, channel: int) -> None:
        binding = self._by_client.get(self._client_key(client_fd, client_addr, channel))
        if binding is not None:
            self._remove(binding)

    def unbind_relay(self, relay_fd: int) -> None:
        relay_fd = _int(relay_fd, "relay_fd", 0, MAX_FD)
        for binding in list(self._by_relay.get(relay_fd, {}).values()):
            self._remove(binding)

    def stats(self, client_fd: int, client_addr: Address, channel: int) -> dict[str, int] | None:
        binding = self._by_client.get(self._client_key(client_fd, client_addr, channel))
        return None if binding is None else dict(binding.stats)

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def pump_client(self, fd: int, budget: int = DEFAULT_BUDGET) -> list[Datagram]:
        return self._pump(fd, budget, to_client=False)

    def pump_relay(self, fd: int, budget: int = DEFAULT_BUDGET) -> list[Datagram]:
        return self._pump(fd, budget, to_client=True)

    # --- internals

    def _client_key(self, fd: object, addr: object, channel: object) -> tuple[int, Address, int]:
        fd = _int(fd, "client_fd", 0, MAX_FD)
        _family, address = _address(addr, "client_addr")
        return fd, address, _int(channel, "channel", MIN_CHANNEL, MAX_CHANNEL)

    def _remove(self, binding: _Binding) -> None:
        del self._by_client[binding.client_key]
        del self._by_peer[binding.peer_key]
        on_relay = self._by_relay[binding.relay_fd]
        del on_relay[binding.peer_key]
        if not on_relay:
            del self._by_relay[binding.relay_fd]

    def _pump(self, fd: int, budget: int, to_client: bool) -> list[Datagram]:
        fd = _int(fd, "fd", 0, MAX_FD)
        budget = _int(budget, "budget", 1, MAX_BUDGET)
        if self._busy:
            raise RuntimeError("Forwarder pump called re-entrantly")
        sockets = _Sockets()
        try:
            try:
                sock = sockets.get(fd)
            except OSError:
                raise ValueError(f"fd {fd} is not a socket") from None
            self._busy = True
            return self._pump_socket(sock, sockets, budget, to_client)
        finally:
            self._busy = False
            sockets.release()

    def _pump_socket(
        self, sock: socket.socket, sockets: _Sockets, budget: int, to_client: bool
    ) -> list[Datagram]:
        slow: list[Datagram] = []
        fd = sock.fileno()
        forward = self._forward_to_client if to_client else self._forward_to_peer
        for _ in range(budget):
            try:
                data, source = sock.recvfrom(_MAX_DATAGRAM)
            except OSError:
                break  # EAGAIN: drained; anything else: try again on the next readiness
            sender: Address = (source[0], source[1])
            outcome = forward(fd, data, sender, time.monotonic_ns())
            if outcome is None:
                self._counters["slow_packets"] += 1
                slow.append((data, sender))
            elif outcome is not False:
                binding, out_fd, message, destination, payload = outcome
                self._send(sockets, binding, out_fd, message, destination, payload, to_client)
        return slow

    def _forward_to_peer(self, fd: int, data: bytes, sender: Address, now: int) -> _Forward:
        if len(data) < CHANNEL_HEADER_BYTES or data[0] & 0xC0 != 0x40:
            return None
        channel = int.from_bytes(data[0:2], "big")
        length = int.from_bytes(data[2:4], "big")
        if CHANNEL_HEADER_BYTES + length > len(data):
            return None
        binding = self._by_client.get((fd, sender, channel))
        if binding is None:
            return None
        if not binding.to_peer_bucket.take(binding.rate, length, now):
            return self._dropped(binding)
        message = data[CHANNEL_HEADER_BYTES : CHANNEL_HEADER_BYTES + length]
        return binding, binding.relay_fd, message, binding.peer_addr, length

    def _forward_to_client(self, fd: int, data: bytes, sender: Address, now: int) -> _Forward:
        binding = self._by_peer.get((fd, sender))
        if binding is None:
            return None
        if not binding.to_client_bucket.take(binding.rate, len(data), now):
            return self._dropped(binding)
        header = binding.channel.to_bytes(2, "big") + len(data).to_bytes(2, "big")
        return binding, binding.client_fd, header + data, binding.client_addr, len(data)

    def _dropped(self, binding: _Binding) -> Literal[False]:
        binding.stats["dropped_rate"] += 1
        self._counters["dropped_rate"] += 1
        return False

    def _send(
        self,
        sockets: _Sockets,
        binding: _Binding,
        fd: int,
        message: bytes,
        destination: Address,
        payload: int,
        to_client: bool,
    ) -> None:
        try:
            sockets.get(fd).sendto(message, destination)
        except OSError:  # full buffer, unreachable or invalid destination: counted, not raised
            binding.stats["send_errors"] += 1
            self._counters["send_errors"] += 1
            return
        direction = "to_client" if to_client else "to_peer"
        binding.stats[f"{direction}_packets"] += 1
        binding.stats[f"{direction}_bytes"] += payload
        self._counters[f"fast_{direction}_packets"] += 1
        self._counters[f"fast_{direction}_bytes"] += payload
