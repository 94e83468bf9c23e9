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
import time
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
    hairpin: bool | None = None
    lifetime: tuple[float, float] | None = None


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
        and expected.hairpin == observed.hairpin
        and expected.lifetime == observed.lifetime
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


LIFETIME_WAITS = (1.0, 6.0)
TIMEOUT = 3  # seconds an idle UDP mapping lives on every verified router


def _lifetimes(lab: Lab, sites: list[Site], p1: Host, python: list[str]) -> dict[str, Any]:
    """For all sites at once: open mappings, let P1 answer each after 1 s and 6 s of idleness,
    and see which answers got in; returns (longest alive, shortest gone) per site."""
    clients, targets = {}, {}
    argv = [*python, "lifetimes", "--p1", p1.ip]
    for wait in LIFETIME_WAITS:
        argv += ["--wait", str(wait)]
    try:
        for site in sites:
            client = lab.popen(site.host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert client.stdout is not None
            clients[site.name] = client
            targets[site.name] = json.loads(client.stdout.readline())["lifetime_ready"]
        started = time.monotonic()
        for number, wait in enumerate(LIFETIME_WAITS):
            time.sleep(max(0.0, started + wait - time.monotonic()))
            for mapped in targets.values():
                target = mapped[number]
                if target is not None:
                    lab.run(p1, [*python, "send", "--to", str(target[0]), "--port",
                                 str(target[1]), "--from-port", str(ECHO_PORTS[0])])  # fmt: skip
        bounds = {}
        for name, client in clients.items():
            assert client.stdout is not None
            alive = json.loads(client.stdout.readline())["result"]["alive_after"]
            longest = max((w for w in LIFETIME_WAITS if alive.get(str(w))), default=0.0)
            gone = [w for w in LIFETIME_WAITS if not alive.get(str(w))]
            bounds[name] = (longest, min(gone) if gone else float("inf"))
        return bounds
    finally:
        for client in clients.values():
            client.kill()
            client.wait()


def _hairpin(lab: Lab, site: Site, p1: Host, python: list[str]) -> bool | None:
    """Does a second LAN host reach the first one's public mapping? (None without NAT.)"""
    if site.router_ns is None or len(site.hosts) < 2:
        return None
    listener = lab.popen(site.hosts[0], [*python, "listen", "--p1", p1.ip, "--seconds", "1.5"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert listener.stdout is not None
    try:
        mapped = json.loads(listener.stdout.readline())["listen_ready"]
        if mapped is None:
            return False
        lab.run(site.hosts[1], [*python, "send", "--to", str(mapped[0]), "--port",
                                str(mapped[1]), "--from-port", "0"])  # fmt: skip
        arrived = json.loads(listener.stdout.readline())["result"]["from"]
    finally:
        listener.kill()
        listener.wait()
    return any(source.startswith(site.wan_ip + ":") for source in arrived)


def _observe(
    lab: Lab, site: Site, p1: Host, p3: Host, python: list[str]
) -> tuple[Observed, dict[str, Any]]:
    result = _measure(lab, site, p1, p3, python)
    observed = classify(result, p1.ip, p3.ip)
    return dataclasses.replace(observed, hairpin=_hairpin(lab, site, p1, python)), result


def _knobs(lab: Lab, p1: Host, p3: Host, python: list[str]) -> list[Row]:
    """The hairpinning knob switched on (no verified kind hairpins by default)."""
    base = nat_types.EXPECTED["port-restricted"]
    site = lab.add_site("k1", "port-restricted", hosts=2, hairpin=True)
    observed, _ = _observe(lab, site, p1, p3, python)
    expected = dataclasses.replace(base, hairpin=True)
    return [Row("port-restricted+hairpin", expected, observed, _matches(expected, observed), {})]


def verify(
    kinds: Sequence[str] = nat_types.KINDS,
    python: Sequence[str] = ("python3", "-m", "punchline.lab.probe"),
    progress: Callable[[str], None] = lambda _line: None,
    knobs: bool = False,
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
        measured: list[tuple[Site, str, nat_types.Expected, Observed, dict[str, Any]]] = []
        expiring: list[Site] = []
        for number, kind in enumerate(kinds, start=1):
            auth = ("lab", secrets.token_hex(4)) if kind == "proxy-only" else None
            site = lab.add_site(f"s{number}", kind, hosts=2, proxy_auth=auth, udp_timeout=TIMEOUT)
            progress(f"measuring {kind}")
            observed, result = _observe(lab, site, p1, p3, list(python))
            expected = nat_types.expected(kind)
            if expected.udp and kind != "open":  # a NAT mapping that should expire
                expected = dataclasses.replace(expected, lifetime=LIFETIME_WAITS)
                expiring.append(site)
            if result.get("proxy_without_auth"):
                observed = dataclasses.replace(observed, proxy=False)  # auth was not enforced
            measured.append((site, kind, expected, observed, result))
        progress(f"measuring how long idle mappings live ({TIMEOUT} s configured)")
        lifetimes = _lifetimes(lab, expiring, p1, list(python))
        for site, kind, expected, partial, result in measured:
            observed = dataclasses.replace(partial, lifetime=lifetimes.get(site.name))
            rows.append(Row(kind, expected, observed, _matches(expected, observed),
                            {**result, "lifetime": lifetimes.get(site.name)}))  # fmt: skip
        if knobs:
            progress("measuring the hairpinning knob")
            rows += _knobs(lab, p1, p3, list(python))
        for server in servers:
            server.kill()
    return rows
