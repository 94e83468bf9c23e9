"""coturn's own TURN client (`turnutils_uclient`) relays through our relay node.

It allocates over UDP, TCP and TLS with TURN REST API credentials derived from the login
server's secret (`-W`), binds channels and bounces 160-byte datagrams off coturn's echo peer
(`turnutils_peer`) through our relayed addresses, then reports what it lost. Our relay's health
endpoint must account for the traffic on the right transports.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from punchline.lab.loopback import Network, Relay
from tests.interop.coturn import free_port, tool

MESSAGES = 40


class RelayUnderTest:
    def __init__(self, net: Network, relay: Relay, peer_port: int) -> None:
        self.net, self.relay, self.peer_port = net, relay, peer_port
        self.secret = (net.root / "auth" / "turn-secret").read_text().strip()

    def uclient(self, *flags: str, secret: str | None = None, port: int | None = None) -> str:
        argv = [tool("turnutils_uclient"), "-W", secret or self.secret, "-u", "carol",
                "-e", "127.0.0.1", "-r", str(self.peer_port), "-p",
                str(port or self.relay.udp_port), "-n", str(MESSAGES), "-l", "160", "-m", "2",
                "-z", "5", "-c", *flags, "127.0.0.1"]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        return done.stdout + done.stderr

    def health(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.relay.health_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as answer:
            value: dict[str, Any] = json.loads(answer.read())
        return value


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayUnderTest]:
    net = Network(tmp_path_factory.mktemp("relay"))
    peer_port = free_port()
    echo = subprocess.Popen(
        [tool("turnutils_peer"), "-L", "127.0.0.1", "-p", str(peer_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        net.start_auth()
        relay = net.start_relay("--tcp-port", "0")
        yield RelayUnderTest(net, relay, peer_port)
    finally:
        echo.kill()
        echo.wait()
        net.stop()


def _lost(output: str) -> int:
    found = re.search(r"Total lost packets (\d+)", output)
    assert found, output[-2000:]
    return int(found.group(1))


def _sent(output: str) -> int:
    found = re.search(r"Total transmit time is \d+", output)
    assert found, output[-2000:]
    return MESSAGES * 2


@pytest.mark.parametrize(
    ("transport", "flags"), [("udp", ()), ("tcp", ("-t",)), ("tls", ("-t", "-S"))]
)
def test_uclient_relays_through_our_relay(
    relay: RelayUnderTest, transport: str, flags: tuple[str, ...]
) -> None:
    before = relay.health()
    port = relay.relay.tcp_ports[0] if transport == "tls" else None
    output = relay.uclient(*flags, port=port)
    assert _sent(output) == 2 * MESSAGES
    assert _lost(output) == 0, output[-2000:]
    after = relay.health()
    # every message went client -> peer and back peer -> client through our relayed address
    relayed = after["relayed"]["packets_to_peer"] - before["relayed"]["packets_to_peer"]
    assert relayed >= 2 * MESSAGES
    assert after["transports"][transport]["messages_in"] > before["transports"].get(
        transport, {}
    ).get("messages_in", 0)


def test_uclient_with_the_wrong_secret_is_refused(relay: RelayUnderTest) -> None:
    before = relay.health()["refusals"].get("401", 0)
    output = relay.uclient(secret="not-the-secret-of-this-network")
    assert "401" in output or "Unauthorized" in output or "error" in output.lower(), output
    assert relay.health()["refusals"].get("401", 0) > before


def test_udp_fast_path_carries_the_channel_traffic(relay: RelayUnderTest) -> None:
    before = relay.health()["fast_path"]
    output = relay.uclient()
    assert _lost(output) == 0
    after = relay.health()["fast_path"]
    assert after["fast_to_peer_packets"] - before["fast_to_peer_packets"] >= MESSAGES
    assert after["fast_to_client_packets"] - before["fast_to_client_packets"] >= MESSAGES
