"""`punchline netcheck`: what works from this network, measured against the nodes of the cached
bootstrap list, without a running daemon.

Why: when calls fail, the first question is which ways out exist here (UDP? only TCP 443? only
a proxy?) and how the NAT behaves; the answers are the same ones the daemon's connectivity
engine acts on, so a user or an operator can see them directly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import Any

import psutil

from punchline.nat.discover import StunServer, discover, ping, stun_servers
from punchline.runtime.streams import (
    ProxyConfig,
    StreamUnavailable,
    explain,
    open_stream,
    web_order,
)

TCP_TRANSPORTS = {"supernode": ("tcp", "tls"), "relay": ("turn-tcp", "turn-tls")}
TCP_TIMEOUT = 3.0
MAX_PROXY_TARGETS = 4


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def tcp_targets(listing: dict[str, Any]) -> list[dict[str, Any]]:
    """Every TCP or TLS port a supernode or relay lists, once per (host, port)."""
    seen: set[tuple[str, int]] = set()
    targets = []
    for node in listing.get("nodes", []):
        for role, transports in TCP_TRANSPORTS.items():
            if role not in node.get("roles", []):
                continue
            for address in node.get("addresses", []):
                key = (str(address.get("host")), int(address.get("port", 0)))
                if address.get("transport") in transports and key not in seen:
                    seen.add(key)
                    targets.append({"node_id": node.get("node_id"), "role": role,
                                    "transport": address["transport"],
                                    "address": list(key)})  # fmt: skip
    return targets


async def _tcp_connect(host: str, port: int, proxy: ProxyConfig | None = None) -> dict[str, Any]:
    """Connect time to host:port, directly or through a CONNECT tunnel of `proxy`."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(TCP_TIMEOUT):
            _reader, writer = await open_stream(host, port, proxy=proxy)
    except TimeoutError:
        return {"ok": False, "connect_ms": None, "error": f"no answer in {TCP_TIMEOUT:g} s"}
    except (OSError, StreamUnavailable) as exc:
        failure = explain(exc)
        code = failure.code if failure is not None else None
        return {"ok": False, "connect_ms": None, "error": str(failure or exc), "status": code}
    elapsed = time.monotonic() - started
    writer.close()
    return {"ok": True, "connect_ms": _ms(elapsed), "error": None}


def global_ipv6() -> list[str]:
    found = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET6:
                ip = ipaddress.ip_address(a.address.split("%")[0])
                if ip.is_global:
                    found.append(str(ip))
    return found


async def netcheck(
    listing: dict[str, Any], proxy: ProxyConfig | None, lifetime_waits: tuple[float, ...] = ()
) -> dict[str, Any]:
    """The whole report (one JSON object): nodes, UDP, TCP, proxy, IPv6 and the NAT."""
    servers = stun_servers(listing)
    targets = tcp_targets(listing)
    supernodes = [s.address for s in servers if s.role == "supernode"]
    pings_task = ping([s.address for s in servers])
    tcp_task = asyncio.gather(*(_tcp_connect(*t["address"]) for t in targets))
    nat_task = discover(supernodes, lifetime_waits=lifetime_waits)
    pings, tcp, nat = await asyncio.gather(pings_task, tcp_task, nat_task)
    proxied: list[dict[str, Any]] = []
    if proxy is not None:
        chosen = sorted(targets, key=lambda t: web_order(t["address"][1]))[:MAX_PROXY_TARGETS]
        results = await asyncio.gather(
            *(_tcp_connect(t["address"][0], t["address"][1], proxy) for t in chosen)
        )
        proxied = [{**t, **r} for t, r in zip(chosen, results, strict=True)]
    nodes = _nodes(servers, pings, targets, tcp)
    addresses = global_ipv6()
    return {
        "udp": any(rtt is not None for rtt, _ in pings),
        "tcp": any(r["ok"] for r in tcp),
        "tcp_web": any(
            r["ok"] for t, r in zip(targets, tcp, strict=True) if t["address"][1] in (443, 80)
        ),
        "proxy": None
        if proxy is None
        else {
            "proxy": str(proxy),
            "ok": any(p["ok"] for p in proxied),
            "tunnels": proxied,
        },
        "ipv6": {"global_addresses": addresses, "available": bool(addresses)},
        "nodes": nodes,
        "nat": nat.as_json(),
    }


def _nodes(
    servers: list[StunServer],
    pings: list[tuple[float | None, tuple[str, int] | None]],
    targets: list[dict[str, Any]],
    tcp: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    nodes: dict[str, dict[str, Any]] = {}
    for server, (rtt, mapped) in zip(servers, pings, strict=True):
        node = nodes.setdefault(server.name, {"node_id": server.name, "roles": [], "udp": [],
                                              "tcp": []})  # fmt: skip
        node["roles"].append(server.role)
        node["udp"].append({"address": list(server.address), "rtt_ms": _ms(rtt),
                            "mapped": None if mapped is None else list(mapped)})  # fmt: skip
    for target, result in zip(targets, tcp, strict=True):
        node = nodes.setdefault(str(target["node_id"]), {"node_id": target["node_id"],
                                                         "roles": [target["role"]], "udp": [],
                                                         "tcp": []})  # fmt: skip
        node["tcp"].append({"transport": target["transport"], "address": target["address"],
                            **result})  # fmt: skip
    return list(nodes.values())


def _yes(value: bool | None) -> str:
    return "unknown" if value is None else "yes" if value else "no"


def human(report: dict[str, Any]) -> str:
    """The report as a short table for a person."""
    nat = report["nat"]
    web = _yes(report["tcp_web"])
    lines = [f"UDP            {_yes(report['udp'])}",
             f"TCP            {_yes(report['tcp'])} (web ports 443/80: {web})"]  # fmt: skip
    if nat["udp"]:
        allocation = nat["allocation"] or "unknown"
        if nat["delta"] is not None:
            allocation += f" (delta {nat['delta']:+d})"
        lifetime = nat["mapping_lifetime_s"]
        bound = "unknown" if lifetime is None else f">= {lifetime:g} s"
        public = nat["public"]
        lines += [
            f"public address {public[0]}:{public[1]}" if public else "public address unknown",
            f"behind NAT     {_yes(nat['behind_nat'])}",
            f"NAT mapping    {nat['mapping'] or 'unknown'}",
            f"NAT filtering  {nat['filtering'] or 'unknown'}",
            f"port alloc     {allocation}",
            f"hairpinning    {_yes(nat['hairpinning'])}",
            f"idle mapping   {bound} ({'measured' if nat['lifetime_measured'] else 'assumed'})",
        ]
    ipv6 = report["ipv6"]["global_addresses"]
    lines.append(f"IPv6           {', '.join(ipv6) if ipv6 else 'no global address'}")
    if report["proxy"] is not None:
        proxy = report["proxy"]
        lines.append(f"proxy          {proxy['proxy']}: {'works' if proxy['ok'] else 'fails'}")
        lines += [f"  CONNECT {t['address'][0]}:{t['address'][1]}  "
                  + (f"{t['connect_ms']} ms" if t["ok"] else str(t["error"]))
                  for t in proxy["tunnels"]]  # fmt: skip
    lines.append("")
    lines.append(f"{'node':<18}{'roles':<18}{'way':<10}{'address':<24}result")
    for node in report["nodes"]:
        name, roles = str(node["node_id"])[:16], ",".join(node["roles"])
        for udp in node["udp"]:
            result = "no answer" if udp["rtt_ms"] is None else f"{udp['rtt_ms']} ms"
            lines.append(f"{name:<18}{roles:<18}{'udp':<10}{_addr(udp['address']):<24}{result}")
        for tcp in node["tcp"]:
            result = f"{tcp['connect_ms']} ms" if tcp["ok"] else str(tcp["error"])
            lines.append(f"{name:<18}{roles:<18}{tcp['transport']:<10}"
                         f"{_addr(tcp['address']):<24}{result}")  # fmt: skip
    return "\n".join(lines)


def _addr(address: list[Any]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
