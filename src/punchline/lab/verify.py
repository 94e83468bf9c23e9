"""`punchline lab verify`: build one site of each kind and measure what its NAT really does.

Three public hosts run echo servers. From each site's LAN host, `lab.probe client` learns its
mapped address from P1 and P2 and from P1's second port (mapping behaviour, RFC 5780 §4.3),
opens fresh sockets to see how ports are allocated, and tries TCP ports 80, 443 and 8080. For
filtering (RFC 5780 §4.4) it shows a mapping it opened towards P1 only; P1 then sends to it
from its other port (same address, new port) and P3, never contacted, sends from its own
address; what arrives tells endpoint-independent / address-dependent /
address-and-port-dependent filtering. Observed behaviour is compared with what the kind is
built to do; any difference is a failure.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import secrets
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from punchline.lab import nat_types
from punchline.lab.netns import LabError
from punchline.lab.probe import ECHO_PORTS
from punchline.lab.topology import Host, Lab, Site

EIM = "endpoint-independent"
ADM = "address-dependent"
APDM = "address-and-port-dependent"


@dataclass(frozen=True)
class Observed:
    udp: bool
    mapping: str | None
    filtering: str | None
    allocation: str | None
    tcp_web: bool
    tcp_other: bool
    proxy: bool = False


@dataclass(frozen=True)
class Row:
    kind: str
    expected: nat_types.Expected
    observed: Observed
    ok: bool
    details: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "ok": self.ok, "expected": asdict(self.expected),
                "observed": asdict(self.observed), "details": self.details}  # fmt: skip


def classify(result: dict[str, Any], p1: str, p3: str) -> Observed:
    """Turn one client's raw measurements into RFC 4787 behaviours (pure)."""
    tcp = result.get("tcp", {})
    tcp_web = bool(tcp.get("80")) and bool(tcp.get("443"))
    tcp_other = bool(tcp.get("8080"))
    proxy = bool(result.get("proxy"))
    if not result.get("udp"):
        return Observed(False, None, None, None, tcp_web, tcp_other, proxy)
    first, second, other_port = result.get("p1"), result.get("p2"), result.get("p1_other_port")
    if first == second:
        mapping = EIM
    elif first == other_port:
        mapping = ADM
    else:
        mapping = APDM
    arrived = set(result.get("unsolicited_from", []))
    if any(source.startswith(p3 + ":") for source in arrived):
        filtering = EIM
    elif f"{p1}:{ECHO_PORTS[1]}" in arrived:
        filtering = ADM
    else:
        filtering = APDM
    return Observed(True, mapping, filtering, _allocation(result.get("allocations", [])),
                    tcp_web, tcp_other, proxy)  # fmt: skip


def _allocation(pairs: Sequence[Sequence[int | None]]) -> str | None:
    mapped = [m for _local, m in pairs if m is not None]
    if len(mapped) < 2:
        return None
    if all(local == m for local, m in pairs):
        return "preserving"
    deltas = {b - a for a, b in itertools.pairwise(mapped)}
    if len(deltas) == 1 and 0 < abs(next(iter(deltas))) <= 16:
        return "sequential"
    return "random"


def _matches(expected: nat_types.Expected, observed: Observed) -> bool:
    return (
        expected.udp == observed.udp
        and expected.mapping == observed.mapping
        and expected.filtering == observed.filtering
        and expected.allocation == observed.allocation
        and expected.tcp_web == observed.tcp_web
        and expected.tcp_other == observed.tcp_other
        and expected.proxy == observed.proxy
    )


def _measure(lab: Lab, site: Site, p1: Host, p3: Host, python: list[str]) -> dict[str, Any]:
    host = site.host
    argv = [*python, "client", "--p1", p1.ip, "--p2", lab.public["p2"].ip]
    if site.proxy is not None:
        argv += ["--proxy", f"{site.proxy[0]}:{site.proxy[1]}"]
        if site.proxy_auth is not None:
            argv += ["--proxy-auth", ":".join(site.proxy_auth)]
    client = lab.popen(
        host, argv,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert client.stdin is not None
    assert client.stdout is not None
    try:
        for line in client.stdout:
            message = json.loads(line)
            if "filtering_ready" in message:
                mapped = message["filtering_ready"]
                if mapped is not None:
                    target = ["--to", str(mapped[0]), "--port", str(mapped[1])]
                    lab.run(p1, [*python, "send", *target, "--from-port", str(ECHO_PORTS[1])])
                    lab.run(p3, [*python, "send", *target, "--from-port", str(ECHO_PORTS[0])])
                client.stdin.write("\n")
                client.stdin.flush()
            elif "result" in message:
                result: dict[str, Any] = message["result"]
                return result
    finally:
        client.kill()
        client.wait()
    raise LabError(f"the probe client in {host.name} ended without a result")


def verify(
    kinds: Sequence[str] = nat_types.KINDS,
    python: Sequence[str] = ("python3", "-m", "punchline.lab.probe"),
    progress: Callable[[str], None] = lambda _line: None,
) -> list[Row]:
    rows = []
    with Lab() as lab:
        echo = [*python, "echo"]
        servers = []
        for name in ("p1", "p2", "p3"):
            host = lab.add_public_host(name)
            server = lab.popen(host, echo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert server.stdout is not None
            server.stdout.readline()  # {"ready": true}
            servers.append(server)
        p1, p3 = lab.public["p1"], lab.public["p3"]
        for number, kind in enumerate(kinds, start=1):
            auth = ("lab", secrets.token_hex(4)) if kind == "proxy-only" else None
            site = lab.add_site(f"s{number}", kind, proxy_auth=auth)
            progress(f"measuring {kind}")
            result = _measure(lab, site, p1, p3, list(python))
            observed = classify(result, p1.ip, p3.ip)
            expected = nat_types.expected(kind)
            if result.get("proxy_without_auth"):
                observed = dataclasses.replace(observed, proxy=False)  # auth was not enforced
            rows.append(Row(kind, expected, observed, _matches(expected, observed), result))
        for server in servers:
            server.kill()
    return rows
