"""Port mapping against a real router: miniupnpd on a `upnp` lab site (root; CI is root).

From the LAN host, each protocol (PCP, NAT-PMP, UPnP-IGD) maps a UDP port on its own; a public
host then sends an unsolicited datagram to the mapped public address, and it must reach the
LAN host's socket — which a port-restricted NAT never allows without the mapping. After
`release()` a fresh datagram must no longer get in. On a plain port-restricted site
`map_udp_port` must give up with None within its timeout.

The LAN side runs this module as a program (`python -m tests.lab.test_portmap`): it owns the
socket and the mapping, and takes commands on stdin, one JSON line out for each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from punchline.connect import portmap
from punchline.lab import nat_types, netns
from punchline.lab.topology import Host, Lab
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 1.0


# ----------------------------------------------------------------- the LAN-side program


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def _received(sock: socket.socket, seconds: float) -> list[list[Any]]:
    """Sources of every datagram that arrives within `seconds`."""
    deadline = time.monotonic() + seconds
    sources = []
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            _data, source = sock.recvfrom(2048)
        except TimeoutError:
            break
        sources.append([source[0], source[1]])
    return sources


async def _agent(port: int, protocols: list[str], timeout: float, lifetime: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))  # noqa: S104 - inside a lab namespace
    started = time.monotonic()
    mapping = await portmap.map_udp_port(
        port, lifetime=lifetime, timeout=timeout, protocols=protocols
    )
    seconds = time.monotonic() - started
    if mapping is None:
        _say({"mapped": None, "seconds": seconds})
        return
    _say({"mapped": list(mapping.external), "protocol": mapping.protocol, "seconds": seconds,
          "lifetime": mapping.lifetime, "gateway": mapping.gateway})  # fmt: skip
    while True:  # stdin is read off the loop: the mapping's renewal task must keep running
        command = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if command == "recv":
            _say({"from": await asyncio.to_thread(_received, sock, 0.5)})
        elif command == "release":
            started = time.monotonic()
            await mapping.release()
            _say({"released": time.monotonic() - started})
        elif command == "quiet":  # what arrives while the mapping is gone
            _say({"from": await asyncio.to_thread(_received, sock, 0.5)})
        else:
            break


# ----------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        unavailable("the NAT lab needs root (network namespaces, nftables)")
    if shutil.which("miniupnpd") is None and not Path("/usr/sbin/miniupnpd").exists():
        unavailable("miniupnpd (Debian package miniupnpd-nftables) is not installed")
    with Lab() as lab:
        lab.add_public_host("p1")
        lab.add_site("igd", "upnp")
        lab.add_site("plain", "port-restricted")
        yield lab


class Agent:
    def __init__(
        self, lab: Lab, host: Host, port: int, protocols: list[str], lifetime: int = 120
    ) -> None:
        argv = [sys.executable, "-m", "tests.lab.test_portmap", "--port", str(port),
                "--timeout", str(TIMEOUT), "--lifetime", str(lifetime)]  # fmt: skip
        for protocol in protocols:
            argv += ["--protocol", protocol]
        self.process = lab.popen(host, argv, cwd=ROOT, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
        self.first = self.read()

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the LAN-side agent ended early"
        message: dict[str, Any] = json.loads(line)
        return message

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def _send(lab: Lab, to: list[Any], from_port: int) -> None:
    argv = [sys.executable, "-m", "punchline.lab.probe", "send", "--to", str(to[0]),
            "--port", str(to[1]), "--from-port", str(from_port)]  # fmt: skip
    lab.run(lab.public["p1"], argv)


def _igd_rules(lab: Lab) -> str:
    router = lab.sites["igd"].router_ns
    assert router is not None
    return netns.ns_run(router, ["nft", "list", "chain", "inet", nat_types.IGD_TABLE,
                                 "prerouting_miniupnpd"])  # fmt: skip


@pytest.mark.parametrize(("protocol", "port"), [("pcp", 40001), ("natpmp", 40002), ("upnp", 40003)])
def test_each_protocol_maps_a_port_that_admits_strangers(
    lab: Lab, protocol: str, port: int
) -> None:
    site = lab.sites["igd"]
    agent = Agent(lab, site.host, port, [protocol])
    try:
        first = agent.first
        assert first["mapped"] is not None, f"{protocol} mapped nothing"
        assert first["protocol"] == protocol
        assert first["mapped"][0] == site.wan_ip
        assert first["gateway"] == "10.1.0.1"  # found in the namespace's routing table
        assert first["seconds"] < TIMEOUT
        assert first["lifetime"] > 0
        assert f"dport {first['mapped'][1]}" in _igd_rules(lab)

        _send(lab, first["mapped"], from_port=5001)
        arrived = agent.ask("recv")["from"]
        assert [lab.public["p1"].ip, 5001] in arrived, "the mapping let nothing in"

        assert agent.ask("release")["released"] < TIMEOUT
        assert f"dport {first['mapped'][1]}" not in _igd_rules(lab)
        _send(lab, first["mapped"], from_port=5002)  # a new flow: no conntrack entry to reuse
        late = agent.ask("quiet")["from"]
        assert [lab.public["p1"].ip, 5002] not in late, "the released mapping still admits"
        print(f"{protocol}: mapped in {first['seconds'] * 1000:.1f} ms")
    finally:
        agent.close()


def test_all_protocols_at_once_leave_one_mapping(lab: Lab) -> None:
    agent = Agent(lab, lab.sites["igd"].host, 40010, list(portmap.PROTOCOLS))
    try:
        first = agent.first
        assert first["protocol"] == "pcp"  # PCP goes first; NAT-PMP and UPnP are not needed
        rules = [line for line in _igd_rules(lab).splitlines() if "dnat" in line]
        assert len(rules) == 1, rules
        agent.ask("release")
        print(f"race: {first['protocol']} in {first['seconds'] * 1000:.1f} ms")
    finally:
        agent.close()


def test_a_short_mapping_is_renewed_before_it_lapses(lab: Lab) -> None:
    """miniupnpd drops a 3 s mapping after 3 s; renewed at half its lifetime, it stays."""
    agent = Agent(lab, lab.sites["igd"].host, 40015, ["pcp"], lifetime=3)
    try:
        mapped = agent.first["mapped"]
        assert agent.first["lifetime"] == 3
        time.sleep(4.5)
        assert f"dport {mapped[1]}" in _igd_rules(lab)
        _send(lab, mapped, from_port=5004)
        assert [lab.public["p1"].ip, 5004] in agent.ask("recv")["from"]
        agent.ask("release")
    finally:
        agent.close()


def test_a_plain_router_gives_none_within_the_timeout(lab: Lab) -> None:
    agent = Agent(lab, lab.sites["plain"].host, 40020, list(portmap.PROTOCOLS))
    try:
        assert agent.first["mapped"] is None
        assert agent.first["seconds"] < TIMEOUT + 0.2
        print(f"no router: None after {agent.first['seconds'] * 1000:.0f} ms")
    finally:
        agent.close()


def test_the_upnp_site_is_port_restricted_without_a_mapping(lab: Lab) -> None:
    """Nothing gets in unasked: the daemon's tables add no inbound path of their own."""
    site = lab.sites["igd"]
    agent_argv = [sys.executable, "-c", (
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "s.bind(('0.0.0.0',40030));s.settimeout(0.7)\nprint('ready',flush=True)\n"
        "try:\n  print(s.recvfrom(100)[1])\nexcept TimeoutError:\n  print('none')\n")]  # fmt: skip
    listener = lab.popen(site.host, agent_argv, stdout=subprocess.PIPE)
    assert listener.stdout is not None
    try:
        assert listener.stdout.readline().strip() == "ready"
        _send(lab, [site.wan_ip, 40030], from_port=5003)
        assert listener.stdout.readline().strip() == "none"
    finally:
        listener.kill()
        listener.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--protocol", action="append", required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--lifetime", type=int, default=120)
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: JSON
    asyncio.run(_agent(args.port, args.protocol, args.timeout, args.lifetime))


if __name__ == "__main__":
    main()
