"""The daemon's supernode ladder: which ways it tries in which order, and a stream link's life.

Stream links run against a real TCP server on loopback speaking the length-prefixed framing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from punchline.client.supernode_link import (
    RUNG_DELAY,
    UDP_HEAD_START,
    Ladder,
    StreamLink,
    Supernode,
    Target,
    rungs,
    stream_channel,
    stream_targets,
    supernodes_in,
)
from punchline.errors import LocalError
from punchline.session.channel import ChannelConfig
from punchline.wire import session as wire

LISTING: dict[str, Any] = {
    "nodes": [
        {
            "node_id": "a" * 16,
            "roles": ["supernode"],
            "addresses": [
                {"transport": "udp", "host": "192.0.2.1", "port": 3478},
                {"transport": "tls", "host": "192.0.2.1", "port": 8443},
                {"transport": "tcp", "host": "192.0.2.1", "port": 3478},
                {"transport": "tls", "host": "192.0.2.1", "port": 80},
                {"transport": "tcp", "host": "192.0.2.1", "port": 443},
                {"transport": "tls", "host": "192.0.2.1", "port": 443},
                {"transport": "dht", "host": "192.0.2.1", "port": 4222},
            ],
        },
        {"node_id": "b" * 16, "roles": ["relay"], "addresses": []},
        {  # an older supernode: TCP on the UDP port only
            "node_id": "c" * 16,
            "roles": ["supernode", "relay"],
            "addresses": [
                {"transport": "udp", "host": "192.0.2.3", "port": 3478},
                {"transport": "tcp", "host": "192.0.2.3", "port": 3478},
            ],
        },
        {"node_id": "d" * 16, "roles": ["supernode"], "addresses": []},  # unreachable: left out
    ]
}


def _ways(targets: list[Target]) -> list[tuple[str, int]]:
    return [(t.transport, t.port) for t in targets]


def test_supernodes_of_a_listing_keep_udp_and_stream_addresses() -> None:
    found = supernodes_in(LISTING)
    assert [n.node_id for n in found] == ["a" * 16, "c" * 16]
    assert found[0].address == ("192.0.2.1", 3478)
    assert len(found[0].streams) == 5


def test_web_ports_first_plain_tcp_before_tls_and_tls_through_the_proxy() -> None:
    node = supernodes_in(LISTING)[0]
    assert _ways(stream_targets(node, "auto", proxy=True)) == [
        ("tcp", 443), ("tcp", 3478), ("tls", 443), ("tls", 80), ("tls", 8443),
        ("proxy", 443), ("proxy", 80), ("proxy", 8443),
    ]  # fmt: skip
    assert _ways(stream_targets(node, "auto", proxy=False))[-1] == ("tls", 8443)
    assert _ways(stream_targets(node, "tls", proxy=True)) == [("tls", 443), ("tls", 80),
                                                              ("tls", 8443)]  # fmt: skip
    assert stream_targets(node, "udp", proxy=True) == []
    assert stream_targets(node, "proxy", proxy=False) == []


def test_each_rung_gives_every_node_its_next_way() -> None:
    a, c = supernodes_in(LISTING)
    steps = rungs([a, c], "tcp", proxy=False)
    assert [[(n.node_id[0], t.port) for n, t in rung] for rung in steps] == [
        [("a", 443), ("c", 3478)],
        [("a", 3478)],
    ]
    assert rungs([a, c], "udp", proxy=True) == []


def test_stream_sessions_resend_and_ping_less_but_still_notice_silence_within_seconds() -> None:
    udp = ChannelConfig()
    stream = stream_channel(udp)
    assert stream.retransmit_initial >= 1.0
    assert stream.ping_interval is not None
    assert udp.ping_interval is not None
    assert stream.ping_interval > udp.ping_interval
    assert stream.ping_interval + stream.dead_after <= 5.0
    assert stream_channel(ChannelConfig(ping_interval=None)).ping_interval is None


def test_transport_choices_are_checked() -> None:
    def ignore(*_args: Any) -> None:
        return None

    with pytest.raises(LocalError, match="one of"):
        Ladder("quic", None, ignore, ignore)
    with pytest.raises(LocalError, match="needs --proxy"):
        Ladder("proxy", None, ignore, ignore)
    with pytest.raises(LocalError, match="proxy URL"):
        Ladder("auto", "socks5://proxy:1080", ignore, ignore)


def test_a_bad_lower_case_https_proxy_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "https://proxy.example:3128")
    assert Ladder("auto", None, print, print).proxy is None
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert Ladder("auto", None, print, print).proxy is not None


# ------------------------------------------------------------------ stream links


async def _echo_server(
    reply: bytes | None,
) -> tuple[asyncio.Server, int, list[bytes]]:
    """A TCP server that records the frames it reads, answers each with `reply`, or (None)
    closes the connection after the first frame."""
    seen: list[bytes] = []

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = wire.FrameDecoder()
        while data := await reader.read(65536):
            for frame in decoder.feed(data):
                seen.append(frame)
                if reply is None:
                    writer.close()
                    return
                writer.write(wire.frame(reply))
        writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1]), seen


def _link(port: int, events: list[tuple[str, Any]]) -> StreamLink:
    node = Supernode("e" * 16, ("127.0.0.1", 9))
    return StreamLink(
        node, Target("tcp", "127.0.0.1", port), tls=None, proxy=None,
        on_packet=lambda link, data: events.append(("packet", data)),
        on_end=lambda link, reason: events.append(("end", reason)),
    )  # fmt: skip


def test_a_stream_link_sends_what_was_queued_while_connecting_and_delivers_frames() -> None:
    async def scenario() -> tuple[list[tuple[str, Any]], list[bytes]]:
        server, port, seen = await _echo_server(b"\x51{}")
        events: list[tuple[str, Any]] = []
        link = _link(port, events)
        link.send([b"\x50first", b"\x50second"])  # before the connection exists
        async with asyncio.timeout(5):
            while len(events) < 2:
                await asyncio.sleep(0.01)
        link.close()
        await link.ended
        server.close()
        return events, seen

    events, seen = asyncio.run(scenario())
    assert seen == [b"\x50first", b"\x50second"]
    assert events == [("packet", b"\x51{}"), ("packet", b"\x51{}")]  # close() is not an end


def test_a_stream_link_reports_a_closed_connection_and_a_refused_one() -> None:
    async def scenario() -> tuple[str, str]:
        server, port, _seen = await _echo_server(None)
        events: list[tuple[str, Any]] = []
        link = _link(port, events)
        link.send([b"\x50hello"])
        closed = await asyncio.wait_for(link.ended, 5)
        server.close()
        await server.wait_closed()
        refused = await asyncio.wait_for(_link(port, events).ended, 5)
        return closed, refused

    closed, refused = asyncio.run(scenario())
    assert closed == "the supernode closed the connection"
    assert refused == "cannot connect (Connection refused)"


def test_a_stream_link_ends_on_bytes_that_are_not_frames() -> None:
    async def scenario() -> str:
        async def garbage(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"\x00\x00")  # an empty frame
            await writer.drain()

        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        link = _link(int(server.sockets[0].getsockname()[1]), [])
        reason = await asyncio.wait_for(link.ended, 5)
        server.close()
        return reason

    assert asyncio.run(scenario()) == "the supernode sent bytes that are not session frames"


def _refused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens there once closed


def _climb(transport: str, ports: list[int], watch: float) -> list[tuple[float, int]]:
    """When (seconds after climb()) the ladder opened a link to which port."""
    from punchline.identity import certs, keys

    async def scenario() -> list[tuple[float, int]]:
        loop = asyncio.get_running_loop()
        node = Supernode("f" * 16, ("127.0.0.1", 9),
                         tuple(Target("tcp", "127.0.0.1", p) for p in ports))  # fmt: skip
        ladder = Ladder(transport, None, lambda link, data: None, lambda link, reason: None)
        opened: list[tuple[float, int]] = []
        start = loop.time()
        ca = certs.create_ca(keys.generate(), time.time())
        ladder.climb([node], ca, lambda link: opened.append((loop.time() - start, link.where[1])))
        await asyncio.sleep(watch)
        ladder.settle(None)
        return opened

    return asyncio.run(scenario())


def test_without_udp_the_first_rung_starts_at_once_and_failed_rungs_are_skipped() -> None:
    ports = [_refused_port() for _ in range(3)]
    opened = _climb("tcp", ports, watch=0.2)
    assert [port for _at, port in opened] == ports
    assert opened[0][0] < 0.01  # before climb() returned
    assert opened[-1][0] < RUNG_DELAY  # each rung was refused at once: no waiting


def test_with_udp_the_streams_wait_for_its_head_start() -> None:
    opened = _climb("auto", [_refused_port()], watch=UDP_HEAD_START + 0.1)
    assert len(opened) == 1
    assert opened[0][0] >= UDP_HEAD_START - 0.01
