"""Calls whose media goes only through a relay node, over each way out a firewall may leave.

Login server, supernode, relay (TURN on UDP, TCP, and TLS on a second port) and two daemons
are real processes; tinyproxy is the HTTP CONNECT proxy of the proxy case. Both daemons run
with `--relay-only`, so every media packet crosses the relay, and the callee's recording of
the shipped speech sample must still sound as good as a direct call.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from punchline.lab.loopback import Network, Relay, call_with_sample, pesq_of_recording
from tests.conftest import unavailable
from tests.interop.tinyproxy import PROXY_PASSWORD, PROXY_USER, tinyproxy


def _health(relay: Relay) -> dict[str, Any]:
    url = f"http://127.0.0.1:{relay.health_port}/healthz"
    with urllib.request.urlopen(url, timeout=5) as answer:
        value: dict[str, Any] = json.loads(answer.read())
    return value


def _require_free(port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            unavailable(f"TCP port {port} on loopback is taken or needs root: {exc}")


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    net = Network(tmp_path_factory.mktemp("relayed"))
    try:
        net.start_auth()
        net.start_supernode()
        for port in (443, 80):  # the ports a firewall lets out; the suite runs as root
            _require_free(port)
        net.start_relay("--tcp-port", "443", "--tcp-port", "80")
        net.signup("alice")
        net.signup("bob")
        yield net
    finally:
        net.stop()


def _relayed_call(net: Network, tmp_path: Path, *relay_flags: str) -> dict[str, Any]:
    recording = tmp_path / "bob.wav"
    bob = net.start_daemon("bob", "--auto-answer", "--record", str(recording), "--relay-only",
                           *relay_flags)  # fmt: skip
    try:
        alice = net.start_daemon("alice", "--relay-only", *relay_flags)
    except BaseException:
        bob.stop()  # alice never started: bob's daemon must not outlive the test
        raise
    try:
        for user in ("alice", "bob"):
            _wait_for_relay(net, user)
        report = call_with_sample(net, "alice", "bob", recording)
        report["pesq"] = pesq_of_recording(recording)
        report["relay_status"] = net.status("alice")["relay"]
        shown = net.cli("status", "--data", str(net.root / "alice")).stdout
        assert "media relayed by" in shown, shown
        return report
    finally:
        alice.stop()
        bob.stop()


def _wait_for_relay(net: Network, user: str) -> None:
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if net.status(user).get("relay"):
            return
        time.sleep(0.05)
    pytest.fail(f"{user} got no relay allocation:\n{net.logs()}")


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_relayed_call_over_each_transport(network: Network, tmp_path: Path, transport: str) -> None:
    before = _health(network.relays[0])
    report = _relayed_call(network, tmp_path, "--relay-transport", transport)
    assert report["connected"], report
    assert report["path"] == f"relay-{transport}"
    assert report["relay_status"]["transport"] == f"relay-{transport}"
    if transport in ("tcp", "tls"):  # the first port listed, where firewalls let HTTPS out
        assert report["relay_status"]["server"][1] == 443
    assert report["pesq"] >= 3.8, report  # as a direct call (test_call.py)
    assert report["loss"] == 0.0
    after = _health(network.relays[0])
    relayed = after["relayed"]["packets_to_peer"] - before["relayed"]["packets_to_peer"]
    assert relayed >= 2 * 200  # both directions, every 20 ms frame of several seconds


def test_relayed_call_through_an_http_connect_proxy(network: Network, tmp_path: Path) -> None:
    relay = network.relays[0]
    with tinyproxy(tmp_path, relay.tcp_ports[0]) as proxy_port:
        proxy = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{proxy_port}"
        report = _relayed_call(network, tmp_path, "--relay-transport", "proxy", "--proxy", proxy)
    assert report["connected"], report
    assert report["path"] == "relay-proxy"
    assert report["pesq"] >= 3.8, report  # as a direct call (test_call.py)


def test_wrong_proxy_password_leaves_the_daemon_running_and_saying_why(
    network: Network, tmp_path: Path
) -> None:
    relay = network.relays[0]
    with tinyproxy(tmp_path, relay.tcp_ports[0]) as proxy_port:
        proxy = f"http://{PROXY_USER}:wrong@127.0.0.1:{proxy_port}"
        daemon = network.start_daemon("alice", "--relay-only", "--relay-transport", "proxy",
                                      "--proxy", proxy)  # fmt: skip
        try:
            import time

            time.sleep(2)
            assert network.status("alice").get("relay") is None
            result = network.cli("call", "bob", "--data", str(network.root / "alice"), "--json")
            assert result.returncode != 0
            assert "relay" in (result.stdout + result.stderr)
            assert "Traceback" not in daemon.log.read_text()
            assert "proxy refused" in daemon.log.read_text()
        finally:
            daemon.stop()
