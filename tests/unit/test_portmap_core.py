"""The PCP/NAT-PMP exchange core with a fake clock, and finding the default gateway."""

from __future__ import annotations

import asyncio
import socket

import pytest

from punchline.connect import natpmp, portmap
from punchline.connect.portmap_core import Exchange, ExchangeTimeout, Unreachable
from punchline.errors import LocalError

GATEWAY = ("10.1.0.1", 5351)
REQUEST = natpmp.encode_map_request(40000, 40000, 3600)
ANSWER = natpmp.encode_map_reply(natpmp.MapReply(1, 40000, 40000, 3600))


def _exchange(now: float = 100.0, deadline: float = 101.0) -> Exchange[natpmp.MapReply]:
    return Exchange(REQUEST, lambda d: natpmp.decode_map_reply_untrusted(d, 40000), GATEWAY,
                    now, deadline)  # fmt: skip


def test_retransmits_at_250_ms_doubling_until_the_deadline() -> None:
    core = _exchange(deadline=102.0)
    sent_at = []
    now = 100.0
    while not core.done:
        if core.datagrams_to_send(now):
            sent_at.append(round(now - 100.0, 3))
        now = core.next_timer()
        core.handle_timer(now)
    assert sent_at == [0.0, 0.25, 0.75, 1.75]
    assert isinstance(core.error, ExchangeTimeout)
    assert "after 4 tries" in str(core.error)


def test_an_answer_ends_it() -> None:
    core = _exchange()
    assert core.datagrams_to_send(100.0) == [REQUEST]
    core.receive(ANSWER, GATEWAY, 100.01)
    assert core.done
    assert core.result == natpmp.MapReply(1, 40000, 40000, 3600)
    assert core.datagrams_to_send(100.3) == []
    assert core.next_timer() == float("inf")


def test_strangers_and_garbage_are_dropped_and_counted() -> None:
    core = _exchange()
    core.receive(ANSWER, ("10.1.0.99", 5351), 100.01)  # another host
    core.receive(ANSWER, ("10.1.0.1", 5350), 100.01)  # another port of the gateway
    core.receive(b"\x00\x81\x00", GATEWAY, 100.02)
    core.receive(natpmp.encode_map_reply(natpmp.MapReply(1, 40001, 1, 60)), GATEWAY, 100.03)
    assert not core.done
    assert core.drops == {"wrong_source": 2, "malformed": 2}
    core.receive(ANSWER, GATEWAY, 100.04)
    assert core.result is not None


def test_a_refusal_or_an_icmp_error_ends_it_at_once() -> None:
    core = _exchange()
    core.receive(b"\x00\x81\x00\x02\x00\x00\x00\x01", GATEWAY, 100.01)
    assert isinstance(core.error, natpmp.NatPmpRefused)
    core = _exchange()
    core.unreachable("Connection refused")
    assert isinstance(core.error, Unreachable)


ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth1\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0100010A\t0003\t0\t0\t100\t00000000\t0\t0\t0
"""


def test_default_gateway_is_the_lowest_metric_default_route() -> None:
    assert portmap.default_gateway_from_route_table(ROUTES) == "10.1.0.1"
    only_link = ROUTES.splitlines()[0] + "\n" + ROUTES.splitlines()[1]
    assert portmap.default_gateway_from_route_table(only_link) is None
    assert portmap.default_gateway_from_route_table("garbage\nx y z\n") is None


def test_map_udp_port_rejects_nonsense_arguments() -> None:
    with pytest.raises(LocalError, match="unknown port mapping protocols"):
        asyncio.run(portmap.map_udp_port(40000, protocols=["smtp"]))
    with pytest.raises(LocalError):
        asyncio.run(portmap.map_udp_port(0))


def _answers(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        sock.send(natpmp.encode_address_request())
        sock.recv(64)
    except OSError:
        return False
    return True


def test_nothing_listening_gives_none_fast() -> None:
    """A 'gateway' where nothing listens answers PCP with ICMP: PCP and NAT-PMP give up at
    once (UPnP's SSDP search has no such signal, so it is left out here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        if probe.connect_ex(("127.0.0.1", 5351)) == 0 and _answers(probe):
            pytest.skip("something answers on 127.0.0.1:5351 on this machine")

    async def attempt() -> tuple[portmap.PortMapping | None, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await portmap.map_udp_port(
            40000, timeout=2.0, gateway="127.0.0.1", protocols=["pcp", "natpmp"]
        )
        return result, loop.time() - started

    result, seconds = asyncio.run(attempt())
    assert result is None
    assert seconds < 0.5
