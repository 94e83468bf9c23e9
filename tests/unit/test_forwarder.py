"""The relay's data plane, C and pure Python alike, on real UDP sockets on loopback.

Every test runs against both implementations: the C one must be built (tools/run builds it),
and the Python one is the reference it must match.
"""

from __future__ import annotations

import gc
import os
import random
import select
import socket
import struct
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
    make_forwarder,
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
