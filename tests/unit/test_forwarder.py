"""The relay's data plane, C and pure Python alike, on real UDP sockets on loopback.

The pump-mode tests run against both implementations: the C one must be built (tools/run
builds it), and the Python one is the reference it must match. The threaded-mode tests (the
C forwarder's own reading thread) come last.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import select
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from punchline.relay import _fastpath
from punchline.relay.forwarder import (
    COUNTER_NAMES,
    STATS_NAMES,
    Datagram,
    Forwarder,
    PyForwarder,
    SlowDatagram,
    make_forwarder,
    threaded,
)

CHANNEL = 0x4000
QUIET = 0.05  # how long "nothing arrives" is watched for

Factory = Callable[[], Forwarder]


@pytest.fixture(params=["native", "python"])
def make(request: pytest.FixtureRequest) -> Factory:
    if request.param == "native":
        return _fastpath.Forwarder
    return PyForwarder


@pytest.fixture
def fwd(make: Factory) -> Forwarder:
    return make()


def channel_data(channel: int, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("!HH", channel, len(data) if length is None else length) + data


def udp(host: str = "127.0.0.1", *, blocking: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((host, 0))
    if blocking:
        sock.settimeout(2.0)
    else:
        sock.setblocking(False)
    return sock


def addr(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return name[0], name[1]


@dataclass
class Relay:
    """A listening socket, one allocation's relayed socket, a client and a peer."""

    listen: socket.socket
    relay: socket.socket
    client: socket.socket
    peer: socket.socket

    def bind(self, fwd: Forwarder, channel: int = CHANNEL, rate: int = 0) -> None:
        fwd.bind(
            self.listen.fileno(),
            addr(self.client),
            channel,
            self.relay.fileno(),
            addr(self.peer),
            rate,
        )

    def close(self) -> None:
        for sock in (self.listen, self.relay, self.client, self.peer):
            sock.close()


def make_relay(host: str = "127.0.0.1") -> Relay:
    return Relay(
        listen=udp(host, blocking=False),
        relay=udp(host, blocking=False),
        client=udp(host),
        peer=udp(host),
    )


@pytest.fixture
def net() -> Iterator[Relay]:
    relay = make_relay()
    yield relay
    relay.close()


def pump(
    fn: Callable[[int, int], list[Datagram]], sock: socket.socket, want: int
) -> list[Datagram]:
    """Calls a pump while `sock` is readable, until `want` datagrams came back to Python (or,
    with want=0, until the socket stays quiet); returns those datagrams."""
    out: list[Datagram] = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], QUIET)
        if not ready:
            break
        out += fn(sock.fileno(), 256)
        if len(out) >= want > 0:
            break
    return out


def recv_all(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(65536) for _ in range(count)]


def assert_quiet(sock: socket.socket) -> None:
    ready, _, _ = select.select([sock], [], [], QUIET)
    assert not ready, sock.recv(65536)


def test_make_forwarder_prefers_the_native_one() -> None:
    assert isinstance(make_forwarder(), _fastpath.Forwarder)
    assert isinstance(make_forwarder(prefer_native=False), PyForwarder)


def test_client_channel_data_reaches_the_peer_without_header(fwd: Forwarder, net: Relay) -> None:
    net.bind(fwd)
    net.client.sendto(channel_data(CHANNEL, b"hello peer"), addr(net.listen))
    assert pump(fwd.pump_client, net.listen, 0) == []
    data, source = net.peer.recvfrom(65536)
    assert data == b"hello peer"
    assert source == addr(net.relay)
    stats = fwd.stats(net.listen.fileno(), addr(net.client), CHANNEL)
    assert stats is not None
    assert stats["to_peer_packets"] == 1
    assert stats["to_peer_bytes"] == len(b"hello peer")


def test_peer_datagram_reaches_the_client_with_header(fwd: Forwarder, net: Relay) -> None:
    net.bind(fwd, channel=0x4ABC)
    net.peer.sendto(b"hello client", addr(net.relay))
    assert pump(fwd.pump_relay, net.relay, 0) == []
    data, source = net.client.recvfrom(65536)
    assert data == channel_data(0x4ABC, b"hello client")
    assert source == addr(net.listen)
    stats = fwd.stats(net.listen.fileno(), addr(net.client), 0x4ABC)
    assert stats is not None
    assert (stats["to_client_packets"], stats["to_client_bytes"]) == (1, len(b"hello client"))


def test_unknown_channel_client_and_peer_go_to_python(fwd: Forwarder, net: Relay) -> None:
    net.bind(fwd)
    stranger = udp()
    try:
        net.client.sendto(channel_data(CHANNEL + 1, b"other channel"), addr(net.listen))
        stranger.sendto(channel_data(CHANNEL, b"other client"), addr(net.listen))
        slow = pump(fwd.pump_client, net.listen, 2)
        assert slow == [
            (channel_data(CHANNEL + 1, b"other channel"), addr(net.client)),
            (channel_data(CHANNEL, b"other client"), addr(stranger)),
        ]
        stranger.sendto(b"from a permission-only peer", addr(net.relay))
        assert pump(fwd.pump_relay, net.relay, 1) == [
            (b"from a permission-only peer", addr(stranger))
        ]
    finally:
        stranger.close()
    assert_quiet(net.peer)
    assert_quiet(net.client)
    assert fwd.counters()["slow_packets"] == 3


def test_padded_and_empty_channel_data_are_forwarded(fwd: Forwarder, net: Relay) -> None:
    net.bind(fwd)
    net.client.sendto(channel_data(CHANNEL, b"abc\0"), addr(net.listen))  # padded to 4
    net.client.sendto(channel_data(CHANNEL, b"abcdefgh", length=5), addr(net.listen))
    net.client.sendto(channel_data(CHANNEL, b""), addr(net.listen))
    assert pump(fwd.pump_client, net.listen, 0) == []
    assert recv_all(net.peer, 3) == [b"abc\0", b"abcde", b""]
    counters = fwd.counters()
    assert (counters["fast_to_peer_packets"], counters["fast_to_peer_bytes"]) == (3, 9)


@pytest.mark.parametrize(
    "datagram",
    [
        channel_data(CHANNEL, b"short", length=6),  # length runs past the datagram
        channel_data(CHANNEL, b"", length=1),
        b"\x40",  # shorter than the header
        b"\x40\x00\x00",
        b"",
        b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42" + bytes(12),  # a STUN Binding request
        b"\x80\x00\x00\x01x",  # first byte outside 0x40-0x7F (RTP/RTCP)
        b"\x3f\xff\x00\x01x",
    ],
)
def test_malformed_or_foreign_datagrams_go_to_python(
    fwd: Forwarder, net: Relay, datagram: bytes
) -> None:
    net.bind(fwd)
    net.client.sendto(datagram, addr(net.listen))
    assert pump(fwd.pump_client, net.listen, 1) == [(datagram, addr(net.client))]
    assert_quiet(net.peer)
    assert fwd.counters()["fast_to_peer_packets"] == 0


def test_unbind_stops_both_directions(fwd: Forwarder, net: Relay) -> None:
    net.bind(fwd)
    fwd.unbind(net.listen.fileno(), addr(net.client), CHANNEL)
    fwd.unbind(net.listen.fileno(), addr(net.client), CHANNEL)  # absent: no error
    message = channel_data(CHANNEL, b"x")
    net.client.sendto(message, addr(net.listen))
    net.peer.sendto(b"y", addr(net.relay))
    assert pump(fwd.pump_client, net.listen, 1) == [(message, addr(net.client))]
    assert pump(fwd.pump_relay, net.relay, 1) == [(b"y", addr(net.peer))]
    assert fwd.stats(net.listen.fileno(), addr(net.client), CHANNEL) is None


def test_unbind_relay_removes_every_channel_on_that_socket(fwd: Forwarder, net: Relay) -> None:
    other = make_relay()  # a second allocation, which must keep working
    second_peer = udp()
    try:
        net.bind(fwd, channel=0x4001)
        fwd.bind(
            net.listen.fileno(),
            addr(net.client),
            0x4002,
            net.relay.fileno(),
            addr(second_peer),
        )
        other.bind(fwd)
        fwd.unbind_relay(net.relay.fileno())
        fwd.unbind_relay(net.relay.fileno())
        fwd.unbind_relay(10_000)  # never bound
        for channel in (0x4001, 0x4002):
            assert fwd.stats(net.listen.fileno(), addr(net.client), channel) is None
            net.client.sendto(channel_data(channel, b"x"), addr(net.listen))
        assert len(pump(fwd.pump_client, net.listen, 2)) == 2
        second_peer.sendto(b"y", addr(net.relay))
        assert pump(fwd.pump_relay, net.relay, 1) == [(b"y", addr(second_peer))]
        other.client.sendto(channel_data(CHANNEL, b"still"), addr(other.listen))
        assert pump(fwd.pump_client, other.listen, 0) == []
        assert other.peer.recv(100) == b"still"
    finally:
        other.close()
        second_peer.close()


def test_rebinding_refreshes_or_replaces(fwd: Forwarder, net: Relay) -> None:
    net.bind(fwd)
    net.client.sendto(channel_data(CHANNEL, b"one"), addr(net.listen))
    pump(fwd.pump_client, net.listen, 0)
    assert net.peer.recv(100) == b"one"
    net.bind(fwd)  # refresh: the counters stay
    stats = fwd.stats(net.listen.fileno(), addr(net.client), CHANNEL)
    assert stats is not None
    assert stats["to_peer_packets"] == 1
    new_peer = udp()
    try:  # the channel now goes to another peer: a new binding, and the old peer is unbound
        fwd.bind(net.listen.fileno(), addr(net.client), CHANNEL, net.relay.fileno(), addr(new_peer))
        assert fwd.stats(net.listen.fileno(), addr(net.client), CHANNEL) == dict.fromkeys(
            STATS_NAMES, 0
        )
        net.client.sendto(channel_data(CHANNEL, b"two"), addr(net.listen))
        pump(fwd.pump_client, net.listen, 0)
        assert new_peer.recv(100) == b"two"
        net.peer.sendto(b"old", addr(net.relay))
        assert pump(fwd.pump_relay, net.relay, 1) == [(b"old", addr(net.peer))]
    finally:
        new_peer.close()


def test_rate_limit_drops_and_counts(fwd: Forwarder, net: Relay) -> None:
    net.bind(fwd, rate=1000)  # bytes/s, burst 1000 bytes
    sent = 30
    for _ in range(sent):
        net.client.sendto(channel_data(CHANNEL, bytes(100)), addr(net.listen))
    pump(fwd.pump_client, net.listen, 0)
    stats = fwd.stats(net.listen.fileno(), addr(net.client), CHANNEL)
    assert stats is not None
    forwarded = stats["to_peer_packets"]
    assert 10 <= forwarded <= 12  # the burst, plus what trickled in while sending
    assert stats["dropped_rate"] == sent - forwarded
    assert fwd.counters()["dropped_rate"] == sent - forwarded
    assert len(recv_all(net.peer, forwarded)) == forwarded
    assert_quiet(net.peer)
    # the other direction has its own bucket
    for _ in range(sent):
        net.peer.sendto(bytes(100), addr(net.relay))
    pump(fwd.pump_relay, net.relay, 0)
    stats = fwd.stats(net.listen.fileno(), addr(net.client), CHANNEL)
    assert stats is not None
    assert 10 <= stats["to_client_packets"] <= 12


def test_batches_larger_than_the_budget(fwd: Forwarder, net: Relay) -> None:
    net.bind(fwd)
    total = 200  # more than one recvmmsg batch, in every pump call
    for i in range(total):
        net.client.sendto(channel_data(CHANNEL, struct.pack("!I", i)), addr(net.listen))
    net.client.sendto(b"stun", addr(net.listen))
    assert fwd.pump_client(net.listen.fileno(), budget=150) == []
    assert fwd.counters()["fast_to_peer_packets"] == 150
    assert fwd.pump_client(net.listen.fileno(), budget=150) == [(b"stun", addr(net.client))]
    assert fwd.pump_client(net.listen.fileno()) == []
    assert fwd.counters()["fast_to_peer_packets"] == total
    arrived = [struct.unpack("!I", data)[0] for data in recv_all(net.peer, total)]
    assert arrived == list(range(total))  # in order


def test_ipv6(fwd: Forwarder) -> None:
    try:
        relay = make_relay("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        relay.bind(fwd)
        relay.client.sendto(channel_data(CHANNEL, b"over v6"), addr(relay.listen))
        assert pump(fwd.pump_client, relay.listen, 0) == []
        assert relay.peer.recvfrom(100)[:2] == (b"over v6", relay.relay.getsockname())
        relay.peer.sendto(b"back", addr(relay.relay))
        assert pump(fwd.pump_relay, relay.relay, 0) == []
        assert relay.client.recv(100) == channel_data(CHANNEL, b"back")
        relay.client.sendto(b"stun", addr(relay.listen))
        assert pump(fwd.pump_client, relay.listen, 1) == [(b"stun", addr(relay.client))]
        # an equivalent spelling of the same address is the same binding
        fwd.unbind(relay.listen.fileno(), ("0:0::1", addr(relay.client)[1]), CHANNEL)
        assert fwd.stats(relay.listen.fileno(), addr(relay.client), CHANNEL) is None
    finally:
        relay.close()


def test_counters_and_send_errors(fwd: Forwarder, net: Relay) -> None:
    assert fwd.counters() == dict.fromkeys(COUNTER_NAMES, 0)
    net.bind(fwd)
    net.client.sendto(channel_data(CHANNEL, b"12345"), addr(net.listen))
    net.peer.sendto(b"123", addr(net.relay))
    net.client.sendto(b"stun", addr(net.listen))
    pump(fwd.pump_client, net.listen, 1)
    pump(fwd.pump_relay, net.relay, 0)
    # UDP to port 0 fails with EINVAL: counted, never raised
    fwd.bind(net.listen.fileno(), addr(net.client), 0x4FFF, net.relay.fileno(), ("127.0.0.1", 0))
    net.client.sendto(channel_data(0x4FFF, b"lost"), addr(net.listen))
    pump(fwd.pump_client, net.listen, 0)
    assert fwd.counters() == {
        "fast_to_peer_packets": 1,
        "fast_to_peer_bytes": 5,
        "fast_to_client_packets": 1,
        "fast_to_client_bytes": 3,
        "slow_packets": 1,
        "slow_dropped": 0,
        "dropped_rate": 0,
        "send_errors": 1,
    }
    stats = fwd.stats(net.listen.fileno(), addr(net.client), 0x4FFF)
    assert stats is not None
    assert (stats["send_errors"], stats["to_peer_packets"]) == (1, 0)


def test_invalid_arguments(fwd: Forwarder, net: Relay) -> None:
    listen, relay = net.listen.fileno(), net.relay.fileno()
    client, peer = addr(net.client), addr(net.peer)
    with pytest.raises(ValueError, match="channel"):
        fwd.bind(listen, client, 0x3FFF, relay, peer)
    with pytest.raises(ValueError, match="channel"):
        fwd.bind(listen, client, 0x8000, relay, peer)
    with pytest.raises(TypeError):
        fwd.bind(listen, "127.0.0.1:5", CHANNEL, relay, peer)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fwd.bind(str(listen), client, CHANNEL, relay, peer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="address"):
        fwd.bind(listen, ("localhost", 5), CHANNEL, relay, peer)
    with pytest.raises(ValueError, match="port"):
        fwd.bind(listen, ("127.0.0.1", 70000), CHANNEL, relay, peer)
    with pytest.raises(ValueError, match="rate"):
        fwd.bind(listen, client, CHANNEL, relay, peer, -1)
    with pytest.raises(ValueError, match="IPv6"):
        fwd.bind(listen, ("::1", 5), CHANNEL, relay, peer)
    with pytest.raises(ValueError, match="fd"):
        fwd.bind(-1, client, CHANNEL, relay, peer)
    read_end, write_end = os.pipe()
    tcp = socket.socket()
    try:
        with pytest.raises(ValueError, match="not a socket"):
            fwd.bind(listen, client, CHANNEL, read_end, peer)
        with pytest.raises(ValueError, match="not a UDP socket"):
            fwd.bind(listen, client, CHANNEL, tcp.fileno(), peer)
        with pytest.raises(ValueError, match="not a socket"):
            fwd.pump_client(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
        tcp.close()
    with pytest.raises(ValueError, match="budget"):
        fwd.pump_client(listen, 0)
    with pytest.raises(ValueError, match="channel"):
        fwd.unbind(listen, client, 1)
    assert fwd.counters() == dict.fromkeys(COUNTER_NAMES, 0)
    assert fwd.stats(listen, client, CHANNEL) is None


def test_pump_on_an_empty_socket_returns_nothing(fwd: Forwarder, net: Relay) -> None:
    assert fwd.pump_client(net.listen.fileno()) == []
    assert fwd.pump_relay(net.relay.fileno(), 1) == []


def test_no_leaks(make: Factory, net: Relay) -> None:
    """Python objects and the C allocations (PyMem, which tracemalloc sees) come back."""

    def workout() -> None:
        fwd = make()
        listen, relay = net.listen.fileno(), net.relay.fileno()
        for i in range(255):  # enough to grow the tables; these peers need not exist
            fwd.bind(listen, addr(net.client), 0x4000 + i, relay, ("127.0.0.1", 20_000 + i))
        for i in range(128):
            fwd.unbind(listen, addr(net.client), 0x4000 + i)
        net.bind(fwd, channel=0x4FFF)
        for _ in range(100):
            net.client.sendto(b"stun", addr(net.listen))
            net.client.sendto(channel_data(0x4FFF, b"fast"), addr(net.listen))
            net.peer.sendto(b"back", addr(net.relay))
        assert len(pump(fwd.pump_client, net.listen, 100)) == 100
        pump(fwd.pump_relay, net.relay, 0)
        assert len(recv_all(net.peer, 100)) == len(recv_all(net.client, 100)) == 100
        fwd.unbind_relay(relay)

    workout()  # warm-up: caches, interned strings
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5):
            workout()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20_000


def test_many_bindings(fwd: Forwarder, net: Relay) -> None:
    """Thousands of channels on one listening socket: the tables grow and stay consistent."""
    listen, relay = net.listen.fileno(), net.relay.fileno()
    clients = [(f"10.0.{i // 250}.{i % 250 + 1}", 40_000 + i % 7) for i in range(3000)]
    for i, client in enumerate(clients):
        fwd.bind(listen, client, 0x4000 + i % 0x1000, relay, ("192.0.2.1", 1024 + i))
    for i, client in enumerate(clients):
        assert fwd.stats(listen, client, 0x4000 + i % 0x1000) is not None
    for i, client in enumerate(clients[::2]):
        fwd.unbind(listen, client, 0x4000 + 2 * i % 0x1000)
    present = [fwd.stats(listen, c, 0x4000 + i % 0x1000) is not None for i, c in enumerate(clients)]
    assert present == [i % 2 == 1 for i in range(3000)]
    net.bind(fwd)  # a real one among them still forwards
    net.client.sendto(channel_data(CHANNEL, b"found"), addr(net.listen))
    assert pump(fwd.pump_client, net.listen, 0) == []
    assert net.peer.recv(100) == b"found"
    fwd.unbind_relay(relay)
    assert all(fwd.stats(listen, c, 0x4000 + i % 0x1000) is None for i, c in enumerate(clients))


def _random_datagrams(seed: int, count: int) -> list[bytes]:
    """ChannelData-ish datagrams: right and wrong channels, lengths, padding, other bytes."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        first = rng.choice([0x40, 0x40, 0x40, 0x41, 0x4F, 0x3F, 0x50, 0x80, 0x00, 0x01])
        second = rng.choice([0x00, 0x00, 0x01, 0xFF])
        body = rng.randbytes(rng.randrange(0, 40))
        length = rng.choice([len(body), len(body), max(0, len(body) - 3), len(body) + 1])
        datagram = bytes([first, second]) + struct.pack("!H", length) + body
        out.append(datagram[: rng.choice([len(datagram), len(datagram), rng.randrange(0, 5)])])
    return out


def test_native_and_python_agree_on_random_datagrams() -> None:
    """The same datagrams through both: the same forwarded payloads, datagrams for Python and
    counters."""
    datagrams = _random_datagrams(seed=8656, count=400)
    outcomes = []
    for make in (_fastpath.Forwarder, PyForwarder):
        fwd: Forwarder = make()
        net = make_relay()
        try:
            net.bind(fwd, channel=0x4000)
            for datagram in datagrams:
                net.client.sendto(datagram, addr(net.listen))
            slow = pump(fwd.pump_client, net.listen, 0)
            counters = fwd.counters()
            forwarded = recv_all(net.peer, counters["fast_to_peer_packets"])
            assert_quiet(net.peer)
            outcomes.append((forwarded, [data for data, _ in slow], counters))
        finally:
            net.close()
    native, python = outcomes
    assert native == python
    forwarded, for_python, counters = native
    assert len(forwarded) + len(for_python) == len(datagrams)
    assert counters["slow_packets"] == len(for_python)
    assert 20 < len(forwarded) < 380  # both kinds are represented


# --- threaded mode: the C forwarder's own thread reads the sockets, Python only drains


@pytest.fixture
def tfwd(net: Relay) -> Iterator[_fastpath.Forwarder]:
    """A native forwarder for threaded mode, stopped before `net`'s sockets close."""
    fwd = _fastpath.Forwarder()
    yield fwd
    fwd.stop()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def notified(fwd: _fastpath.Forwarder, timeout: float = QUIET) -> bool:
    ready, _, _ = select.select([fwd.notify_fd()], [], [], timeout)
    return bool(ready)


def drain_until(fwd: _fastpath.Forwarder, want: int) -> list[SlowDatagram]:
    """What drain() returns once notify_fd() said so, until `want` datagrams came."""
    out: list[SlowDatagram] = []
    deadline = time.monotonic() + 5.0
    while len(out) < want:
        assert time.monotonic() < deadline, out
        if notified(fwd, 0.05):
            out += fwd.drain()
    return out


def slow_seen(fwd: _fastpath.Forwarder) -> int:
    counters = fwd.counters()
    return counters["slow_packets"] + counters["slow_dropped"]


def discard(sock: socket.socket, at_most: int = 1000) -> None:
    """Reads away what waits in a socket (at most `at_most` datagrams)."""
    with contextlib.suppress(OSError):
        for _ in range(at_most):
            sock.recv(65536, socket.MSG_DONTWAIT)


def watch_both(fwd: _fastpath.Forwarder, net: Relay) -> None:
    fwd.watch(net.listen.fileno(), "client")
    fwd.watch(net.relay.fileno(), "relay")


def test_threaded_forwarder_satisfies_the_protocol() -> None:
    fwd = make_forwarder()
    assert threaded(fwd) is fwd
    assert threaded(make_forwarder(prefer_native=False)) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_threaded_forwards_both_ways_with_no_pumping(host: str) -> None:
    try:
        net = make_relay(host)
    except OSError:
        pytest.skip("no IPv6 loopback")
    fwd = _fastpath.Forwarder()
    try:
        net.bind(fwd, channel=0x4ABC)
        watch_both(fwd, net)
        fwd.start()
        for i in range(100):
            net.client.sendto(channel_data(0x4ABC, b"up %d" % i), addr(net.listen))
            net.peer.sendto(b"down %d" % i, addr(net.relay))
        assert recv_all(net.peer, 100) == [b"up %d" % i for i in range(100)]  # in order
        assert recv_all(net.client, 100) == [
            channel_data(0x4ABC, b"down %d" % i) for i in range(100)
        ]
        wait_until(lambda: fwd.counters()["fast_to_client_packets"] == 100)
        counters = fwd.counters()
        assert counters["fast_to_peer_packets"] == 100
        assert counters["fast_to_peer_bytes"] == sum(len(b"up %d" % i) for i in range(100))
        assert counters["slow_packets"] == 0
        stats = fwd.stats(net.listen.fileno(), addr(net.client), 0x4ABC)
        assert stats is not None
        assert (stats["to_peer_packets"], stats["to_client_packets"]) == (100, 100)
        assert not notified(fwd)
        assert fwd.drain() == []
    finally:
        fwd.stop()
        net.close()


def test_threaded_slow_datagrams_come_through_drain(tfwd: _fastpath.Forwarder, net: Relay) -> None:
    net.bind(tfwd)
    watch_both(tfwd, net)
    tfwd.start()
    listen, relay = net.listen.fileno(), net.relay.fileno()
    stranger = udp()
    stranger_addr = addr(stranger)
    try:
        net.client.sendto(b"stun 1", addr(net.listen))
        net.client.sendto(channel_data(CHANNEL + 1, b"unbound"), addr(net.listen))
        stranger.sendto(channel_data(CHANNEL, b"other client"), addr(net.listen))
        first = drain_until(tfwd, 3)
        stranger.sendto(b"permission only", addr(net.relay))
        second = drain_until(tfwd, 1)
    finally:
        stranger.close()
    assert first == [
        ("client", listen, b"stun 1", addr(net.client)),
        ("client", listen, channel_data(CHANNEL + 1, b"unbound"), addr(net.client)),
        ("client", listen, channel_data(CHANNEL, b"other client"), stranger_addr),
    ]
    assert second == [("relay", relay, b"permission only", stranger_addr)]
    assert not notified(tfwd)  # drained: the eventfd is clear
    assert tfwd.drain() == []
    assert tfwd.counters()["slow_packets"] == 4
    assert_quiet(net.peer)


def test_drain_budget_leaves_the_rest_signalled(tfwd: _fastpath.Forwarder, net: Relay) -> None:
    assert tfwd.drain() == []  # before anything is watched
    tfwd.watch(net.listen.fileno(), "client")
    tfwd.start()
    for i in range(10):
        net.client.sendto(b"stun %d" % i, addr(net.listen))
    wait_until(lambda: slow_seen(tfwd) == 10)
    first = tfwd.drain(3)
    assert len(first) == 3
    assert notified(tfwd)  # seven more are waiting
    rest = tfwd.drain()
    assert [data for _, _, data, _ in first + rest] == [b"stun %d" % i for i in range(10)]
    assert not notified(tfwd)
    net.client.sendto(b"again", addr(net.listen))
    assert notified(tfwd, 5.0)  # the next datagram signals anew
    assert tfwd.drain() == [("client", net.listen.fileno(), b"again", addr(net.client))]


def test_stop_and_start(tfwd: _fastpath.Forwarder, net: Relay) -> None:
    net.bind(tfwd)
    watch_both(tfwd, net)
    tfwd.stop()  # not started: nothing to do
    tfwd.start()
    tfwd.start()  # running already: nothing to do
    net.client.sendto(channel_data(CHANNEL, b"one"), addr(net.listen))
    assert net.peer.recv(100) == b"one"
    tfwd.stop()
    tfwd.stop()
    net.client.sendto(channel_data(CHANNEL, b"while stopped"), addr(net.listen))
    net.client.sendto(b"stun while stopped", addr(net.listen))
    assert_quiet(net.peer)
    assert not notified(tfwd)
    tfwd.start()  # what waited in the socket goes now
    assert net.peer.recv(100) == b"while stopped"
    assert [data for _, _, data, _ in drain_until(tfwd, 1)] == [b"stun while stopped"]
    tfwd.stop()
    net.client.sendto(channel_data(CHANNEL, b"pumped"), addr(net.listen))
    assert pump(tfwd.pump_client, net.listen, 0) == []  # pump mode works on a stopped one
    assert net.peer.recv(100) == b"pumped"
    assert tfwd.counters()["fast_to_peer_packets"] == 3


def test_rate_limit_in_threaded_mode(tfwd: _fastpath.Forwarder, net: Relay) -> None:
    net.bind(tfwd, rate=1000)  # bytes/s, burst 1000 bytes
    watch_both(tfwd, net)
    tfwd.start()
    for _ in range(30):
        net.client.sendto(channel_data(CHANNEL, bytes(100)), addr(net.listen))
    wait_until(
        lambda: sum(tfwd.counters()[k] for k in ("fast_to_peer_packets", "dropped_rate")) == 30
    )
    forwarded = tfwd.counters()["fast_to_peer_packets"]
    assert 10 <= forwarded <= 12
    assert len(recv_all(net.peer, forwarded)) == forwarded


def test_queue_overflow_is_dropped_and_counted(tfwd: _fastpath.Forwarder, net: Relay) -> None:
    tfwd.watch(net.listen.fileno(), "client")
    tfwd.start()
    sent = 4096 + 300
    for i in range(sent):
        net.client.sendto(b"stun %d" % i, addr(net.listen))
        if i % 200 == 199:  # let the thread keep up, so that the kernel drops nothing
            wait_until(lambda n=i + 1: slow_seen(tfwd) == n)  # type: ignore[misc]
    wait_until(lambda: slow_seen(tfwd) == sent)
    counters = tfwd.counters()
    assert (counters["slow_packets"], counters["slow_dropped"]) == (4096, 300)
    drained = tfwd.drain(1_000_000)
    assert [data for _, _, data, _ in drained] == [b"stun %d" % i for i in range(4096)]  # oldest
    assert not notified(tfwd)
    net.client.sendto(b"room again", addr(net.listen))
    assert [data for _, _, data, _ in drain_until(tfwd, 1)] == [b"room again"]


def test_queue_byte_cap_and_wrap_around(tfwd: _fastpath.Forwarder, net: Relay) -> None:
    """4 MiB of datagrams at most; big ones of random sizes with partial drains in between
    walk the byte ring round several times and come out whole and in order."""
    tfwd.watch(net.listen.fileno(), "client")
    tfwd.start()

    def datagram(i: int, size: int) -> bytes:
        return struct.pack("!I", i) + bytes([i % 251]) * size

    for i in range(100):  # nothing drained: about 4 MiB / 60 kB of them fit
        net.client.sendto(datagram(i, 60_000), addr(net.listen))
        wait_until(lambda n=i + 1: slow_seen(tfwd) == n)  # type: ignore[misc]
    kept = tfwd.counters()["slow_packets"]
    assert 60 <= kept <= 70
    assert tfwd.counters()["slow_dropped"] == 100 - kept
    assert tfwd.drain() == [
        ("client", net.listen.fileno(), datagram(i, 60_000), addr(net.client)) for i in range(kept)
    ]
    rng = random.Random(5766)
    sent: list[bytes] = []
    received: list[bytes] = []
    for i in range(400):
        sent.append(datagram(i, rng.choice([0, 10, 1000, 30_000, 65_000])))
        before = slow_seen(tfwd)
        net.client.sendto(sent[-1], addr(net.listen))
        wait_until(lambda n=before + 1: slow_seen(tfwd) == n)  # type: ignore[misc]
        if rng.random() < 0.3:
            received += [data for _, _, data, _ in tfwd.drain(rng.randint(1, 8))]
    received += [data for _, _, data, _ in tfwd.drain(100_000)]
    dropped = tfwd.counters()["slow_dropped"] - (100 - kept)
    assert len(received) == len(sent) - dropped
    assert dropped < len(sent) // 2
    indices = [struct.unpack("!I", data[:4])[0] for data in received]
    assert indices == sorted(indices)  # in order, with gaps only where the ring was full
    assert received == [sent[i] for i in indices]  # intact


def test_unwatch_forgets_the_fd_and_its_queued_datagrams(
    tfwd: _fastpath.Forwarder, net: Relay
) -> None:
    watch_both(tfwd, net)
    tfwd.start()
    net.peer.sendto(b"queued", addr(net.relay))
    wait_until(lambda: slow_seen(tfwd) == 1)
    tfwd.unwatch(net.relay.fileno())
    tfwd.unwatch(net.relay.fileno())  # not watched: no error
    tfwd.unwatch(10_000)
    assert tfwd.drain() == []  # the fd may name another socket soon: its datagram is gone
    assert not notified(tfwd)
    net.peer.sendto(b"unread", addr(net.relay))
    time.sleep(QUIET)
    assert net.relay.recv(100) == b"unread"  # the thread left it alone
    assert tfwd.counters()["slow_packets"] == 1
    tfwd.watch(net.relay.fileno(), "relay")  # and it can come back
    net.peer.sendto(b"watched again", addr(net.relay))
    assert drain_until(tfwd, 1) == [("relay", net.relay.fileno(), b"watched again", addr(net.peer))]


def test_unwatch_then_close_is_safe_under_traffic(tfwd: _fastpath.Forwarder, net: Relay) -> None:
    """Relayed sockets come and go (their fd numbers reused at once) while a sender blasts
    them: once unwatch() returned the thread never reads the fd again, nothing queued from it
    comes out of drain(), and the forwarder keeps working."""
    net.bind(tfwd)
    watch_both(tfwd, net)
    tfwd.start()
    targets: list[tuple[str, int]] = []
    stop = threading.Event()

    def blast() -> None:
        stranger = udp(blocking=False)
        peer = udp(blocking=False)
        try:
            while not stop.is_set():
                for target in list(targets):
                    with contextlib.suppress(OSError):
                        stranger.sendto(b"slow", target)  # no binding: for Python
                        peer.sendto(b"fast", target)  # bound below: forwarded to the client
        finally:
            stranger.close()
            peer.close()

    blaster = threading.Thread(target=blast)
    blaster.start()
    peer_addr = ("127.0.0.1", 0)
    marker = udp()
    try:
        for round_ in range(120):
            sock = udp(blocking=False)
            fd = sock.fileno()
            tfwd.bind(net.listen.fileno(), addr(net.client), 0x4100 + round_ % 64, fd, peer_addr)
            tfwd.watch(fd, "relay")
            targets.append(addr(sock))
            time.sleep(0.0005 * (round_ % 4))
            tfwd.unwatch(fd)
            tfwd.unbind_relay(fd)
            # Empty the socket first (the blaster may have filled its buffer, which would drop
            # the marker), then the marker sent after unwatch must still be there to read.
            targets.remove(addr(sock))
            time.sleep(0.001)
            with contextlib.suppress(BlockingIOError):
                while True:
                    sock.recv(100)
            marker.sendto(b"marker", addr(sock))
            time.sleep(0.001)
            seen = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    seen.append(sock.recv(100))
            assert b"marker" in seen
            sock.close()
            assert all(drained_fd != fd for _, drained_fd, _, _ in tfwd.drain())
    finally:
        stop.set()
        blaster.join()
        marker.close()
    assert tfwd.counters()["slow_packets"] > 0
    net.client.sendto(channel_data(CHANNEL, b"still alive"), addr(net.listen))
    assert net.peer.recv(100) == b"still alive"


def test_bind_and_unbind_while_traffic_flows(tfwd: _fastpath.Forwarder, net: Relay) -> None:
    """A thread hammers the tables (bind, rebind, unbind, unbind_relay, stats) while datagrams
    flow both ways and the counters are read: nothing breaks and the counters only grow."""
    peers = [udp(blocking=False) for _ in range(4)]
    channels = [CHANNEL + i for i in range(8)]
    watch_both(tfwd, net)
    tfwd.start()
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        while not stop.is_set():
            for channel in channels:
                with contextlib.suppress(OSError):
                    net.client.sendto(channel_data(channel, b"up"), addr(net.listen))
            for peer in peers:
                with contextlib.suppress(OSError):
                    peer.sendto(b"down", addr(net.relay))
            for peer in peers:  # keep the peers' buffers from filling
                discard(peer)
            time.sleep(0.0002)

    def hammer() -> None:
        rng = random.Random(8656)
        try:
            while not stop.is_set():
                channel, peer = rng.choice(channels), rng.choice(peers)
                action = rng.random()
                if action < 0.6:
                    tfwd.bind(
                        net.listen.fileno(),
                        addr(net.client),
                        channel,
                        net.relay.fileno(),
                        addr(peer),
                        rng.choice([0, 0, 10_000]),
                    )
                elif action < 0.9:
                    tfwd.unbind(net.listen.fileno(), addr(net.client), channel)
                elif action < 0.95:
                    tfwd.unbind_relay(net.relay.fileno())
                else:
                    tfwd.stats(net.listen.fileno(), addr(net.client), channel)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=traffic), threading.Thread(target=hammer)]
    for thread in threads:
        thread.start()
    try:
        previous = tfwd.counters()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            counters = tfwd.counters()
            assert all(counters[name] >= previous[name] for name in COUNTER_NAMES)
            previous = counters
            tfwd.drain()
            discard(net.client)
            time.sleep(0.001)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors
    counters = tfwd.counters()
    assert counters["fast_to_peer_packets"] > 0
    assert counters["fast_to_client_packets"] > 0
    assert counters["slow_packets"] > 0
    # settled: one fresh binding forwards both ways
    tfwd.unbind_relay(net.relay.fileno())
    net.bind(tfwd)
    discard(net.peer)
    net.client.sendto(channel_data(CHANNEL, b"settled"), addr(net.listen))
    assert net.peer.recv(100) == b"settled"
    for peer in peers:
        peer.close()


def test_watch_invalid_arguments(tfwd: _fastpath.Forwarder, net: Relay) -> None:
    listen = net.listen.fileno()
    with pytest.raises(ValueError, match="kind"):
        tfwd.watch(listen, "peer")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="kind"):
        tfwd.watch(listen, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fd"):
        tfwd.watch(-1, "client")
    with pytest.raises(TypeError):
        tfwd.unwatch("3")  # type: ignore[arg-type]
    read_end, write_end = os.pipe()
    tcp = socket.socket()
    try:
        with pytest.raises(ValueError, match="not a socket"):
            tfwd.watch(read_end, "client")
        with pytest.raises(ValueError, match="not a UDP socket"):
            tfwd.watch(tcp.fileno(), "relay")
    finally:
        os.close(read_end)
        os.close(write_end)
        tcp.close()
    with pytest.raises(ValueError, match="budget"):
        tfwd.drain(0)
    tfwd.watch(listen, "client")
    tfwd.watch(listen, "relay")  # watched again: the kind changes
    tfwd.start()
    net.client.sendto(b"as relay", addr(net.listen))
    assert drain_until(tfwd, 1) == [("relay", listen, b"as relay", addr(net.client))]


def test_a_running_forwarder_can_just_be_dropped(net: Relay) -> None:
    fwd = _fastpath.Forwarder()
    net.bind(fwd)
    watch_both(fwd, net)
    fwd.start()
    net.client.sendto(channel_data(CHANNEL, b"last"), addr(net.listen))
    net.client.sendto(b"stun", addr(net.listen))
    assert net.peer.recv(100) == b"last"
    del fwd  # deallocation stops and joins the thread
    gc.collect()
    net.client.sendto(channel_data(CHANNEL, b"nobody reads"), addr(net.listen))
    assert_quiet(net.peer)


def test_threaded_mode_does_not_leak(net: Relay) -> None:
    """The thread's buffers, the queue and its datagrams come back (all PyMem, traced), and so
    do its file descriptors (epoll and two eventfds)."""

    def workout() -> None:
        fwd = _fastpath.Forwarder()
        net.bind(fwd)
        watch_both(fwd, net)
        fwd.start()
        for _ in range(50):
            net.client.sendto(b"stun", addr(net.listen))
            net.client.sendto(channel_data(CHANNEL, b"fast"), addr(net.listen))
            net.peer.sendto(b"back", addr(net.relay))
        assert len(drain_until(fwd, 50)) == 50
        assert len(recv_all(net.peer, 50)) == len(recv_all(net.client, 50)) == 50
        net.client.sendto(b"left queued", addr(net.listen))
        wait_until(lambda: fwd.counters()["slow_packets"] == 51)
        fwd.stop()
        fwd.start()  # and dropped while running

    workout()
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5):
            workout()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20_000
    assert len(os.listdir("/proc/self/fd")) == fds
