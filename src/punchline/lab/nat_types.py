"""NAT behaviours (RFC 4787 vocabulary) as nftables rulesets for a site's router.

How each kind is made from Linux netfilter (conntrack does the translation; these rules only
choose ports and what unsolicited traffic may enter):

- full-cone: endpoint-independent mapping (port kept) and filtering: masquerade, and any
  inbound UDP to a live mapped port (a dynamic set expiring with the mapping) is DNATed to
  the host.
- restricted-cone: endpoint-independent mapping, address-dependent filtering: as full-cone,
  but only from addresses this mapping sent to (a dynamic nftables set of address . port).
- port-restricted: endpoint-independent mapping, address-and-port-dependent filtering: plain
  masquerade; conntrack admits only replies.
- symmetric: address-and-port-dependent mapping with random ports: `snat ... random`, a fresh
  random port for each destination.
- symmetric-seq: address-and-port-dependent mapping with sequential ports: `snat to WAN :
  numgen inc mod N map {0 : 20000, ...}`, the next port (delta 1) for each new mapping.
- upnp: port-restricted, with miniupnpd on the router granting inbound mappings on request
  (UPnP-IGD, NAT-PMP and PCP): its DNAT rules live in a table of their own (`inet miniupnpd`,
  below), so our ruleset and the daemon's rules never touch each other.
- udp-blocked: masquerade, and every UDP packet from the LAN dropped.
- tcp-web-only: only TCP to ports 80 and 443 leaves the LAN.

Linux keeps the source port when it can, so masquerade is endpoint-independent mapping with
port preservation; the other mapping behaviours are asked for explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = (
    "open",
    "full-cone",
    "restricted-cone",
    "port-restricted",
    "upnp",
    "symmetric",
    "symmetric-seq",
    "udp-blocked",
    "tcp-web-only",
    "proxy-only",
    "double",
)
PROXY_PORT = 8888
IGD_TABLE = "miniupnpd"  # miniupnpd's nftables table (family inet), apart from ours
IGD_STUN_PORT = 34780  # the router's own STUN responder for miniupnpd, on its WAN address
ORDER = ("endpoint-independent", "address-dependent", "address-and-port-dependent")
SEQ_PORT_BASE = 20000
# Ports handed out in turn before wrapping. numgen's raw value is in host byte order, so used
# directly as a port it steps by 256; a map from numgen to typed port values steps by 1.
SEQ_PORT_SPAN = 512


@dataclass(frozen=True)
class Expected:
    """What `lab verify` must observe for a kind; None where the property cannot be probed."""

    udp: bool
    mapping: str | None  # endpoint-independent / address-dependent / address-and-port-dependent
    filtering: str | None
    allocation: str | None  # preserving / sequential / random
    tcp_web: bool = True
    tcp_other: bool = True
    proxy: bool = False  # an HTTP CONNECT proxy on the router reaches port 443
    hairpin: bool | None = False  # a LAN host reaches another's public mapping (None: no NAT)
    # (alive after s, gone after s) of an idle UDP mapping, with the router's timeout set to
    # verify.TIMEOUT; None where there is no mapping to expire
    lifetime: tuple[float, float] | None = None


EXPECTED = {
    "open": Expected(
        True, "endpoint-independent", "endpoint-independent", "preserving", hairpin=None
    ),
    "full-cone": Expected(True, "endpoint-independent", "endpoint-independent", "preserving"),
    "restricted-cone": Expected(True, "endpoint-independent", "address-dependent", "preserving"),
    "port-restricted": Expected(
        True, "endpoint-independent", "address-and-port-dependent", "preserving"
    ),
    # Port-restricted until a LAN host asks for a mapping (tests/lab/test_portmap.py).
    "upnp": Expected(True, "endpoint-independent", "address-and-port-dependent", "preserving"),
    "symmetric": Expected(
        True, "address-and-port-dependent", "address-and-port-dependent", "random"
    ),
    "symmetric-seq": Expected(
        True, "address-and-port-dependent", "address-and-port-dependent", "sequential"
    ),
    "udp-blocked": Expected(False, None, None, None),
    "tcp-web-only": Expected(False, None, None, None, tcp_web=True, tcp_other=False),
    "proxy-only": Expected(False, None, None, None, tcp_web=False, tcp_other=False, proxy=True),
}


def parse_double(kind: str) -> tuple[str, str]:
    """`double` or `double:INNER/OUTER` (home NAT / carrier NAT) into its two kinds."""
    if kind == "double":
        return "port-restricted", "port-restricted"
    inner, _, outer = kind.removeprefix("double:").partition("/")
    for part in (inner, outer):
        if part not in EXPECTED or part in ("open", "proxy-only"):
            raise ValueError(f"{kind!r}: each side of a double NAT must be a NAT kind")
    if outer == "upnp":  # its clients would be home routers, not hosts
        raise ValueError(f"{kind!r}: a carrier NAT does not offer port mapping")
    return inner, outer


def _worse(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return None
    return ORDER[max(ORDER.index(a), ORDER.index(b))]


def expected(kind: str) -> Expected:
    """What a kind must show; a double NAT shows the worse of its two NATs at each point."""
    if not kind.startswith("double"):
        return EXPECTED[kind]
    inner, outer = (EXPECTED[k] for k in parse_double(kind))
    allocation = inner.allocation if outer.allocation == "preserving" else outer.allocation
    if not (inner.udp and outer.udp):
        allocation = None
    return Expected(
        inner.udp and outer.udp,
        _worse(inner.mapping, outer.mapping),
        _worse(inner.filtering, outer.filtering),
        allocation,
        inner.tcp_web and outer.tcp_web,
        inner.tcp_other and outer.tcp_other,
    )


def tinyproxy_config(listen: str, allow: str, workdir: str, auth: tuple[str, str] | None) -> str:
    lines = [
        "User nobody", "Group nogroup", f"Port {PROXY_PORT}", f"Listen {listen}",
        f"Allow {allow}", "ConnectPort 443", "ConnectPort 80", f'PidFile "{workdir}/tp.pid"',
        f'LogFile "{workdir}/tp.log"', "LogLevel Info", "MaxClients 50", "Timeout 60",
    ]  # fmt: skip
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    return "\n".join(lines) + "\n"


def miniupnpd_config(lan_net: str, wan_ip: str, uuid: str) -> str:
    """miniupnpd on a `upnp` router: UPnP-IGD, NAT-PMP and PCP for LAN hosts, each host
    mapping only to itself (secure mode), unprivileged ports only.

    miniupnpd refuses to map when its WAN address is reserved (it would be behind another
    NAT), and the lab's public network is TEST-NET-3 (203.0.113.0/24), which it counts as
    reserved. Its STUN mode skips that check when four STUN answers show no NAT in front, so
    the router answers miniupnpd's STUN itself on its WAN address (`punchline.lab.igd`): in the
    lab that address really is the public one.
    """
    lines = [
        "ext_ifname=wan", "listening_ip=lan", "http_port=0",
        "enable_upnp=yes", "enable_natpmp=yes",  # NAT-PMP and PCP share the switch
        "secure_mode=yes", "system_uptime=no", f"uuid={uuid}",
        "min_lifetime=2",  # PCP's floor (default 120 s): lets tests watch renewals happen
        f"upnp_table_name={IGD_TABLE}", f"upnp_nat_table_name={IGD_TABLE}",
        "ext_perform_stun=yes", f"ext_stun_host={wan_ip}", f"ext_stun_port={IGD_STUN_PORT}",
        f"allow 1024-65535 {lan_net} 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _igd_tables() -> str:
    """The chains miniupnpd fills (it expects them to exist), hooked in beside ours: its DNAT
    rules admit the mapped ports, its filter chain accepts what they let in."""
    return (
        f"table inet {IGD_TABLE} {{\n"
        "  chain miniupnpd { }\n"
        "  chain prerouting_miniupnpd { }\n"
        "  chain postrouting_miniupnpd { }\n"
        "  chain forward { type filter hook forward priority filter; jump miniupnpd; }\n"
        "  chain prerouting { type nat hook prerouting priority dstnat; "
        "jump prerouting_miniupnpd; }\n"
        "  chain postrouting { type nat hook postrouting priority srcnat; "
        "jump postrouting_miniupnpd; }\n"
        "}\n"
    )


@dataclass(frozen=True)
class RouterPlan:
    kind: str
    wan_if: str
    lan_if: str
    wan_ip: str
    lan_host: str  # the (first) LAN host unsolicited traffic is forwarded to, for cones
    # Hairpinning: a LAN host reaches a mapping on the router's own public address; the
    # packet comes back into the LAN with that public address as its source.
    hairpin: bool = False
    lan_net: str = ""
    # Idle UDP mappings live this long (conntrack's own timeout is set to match).
    udp_timeout: int = 120


def ruleset(plan: RouterPlan) -> str:
    """The complete nftables ruleset for one router, replacing any previous one."""
    wan, lan, wan_ip, host = plan.wan_if, plan.lan_if, plan.wan_ip, plan.lan_host
    post = [f'oifname "{wan}" masquerade']
    pre: list[str] = []
    forward: list[str] = []
    sets = ""
    timeout = f"timeout {plan.udp_timeout}s"
    if plan.kind == "full-cone":
        # Only live mappings admit strangers: a set of mapped ports, refreshed by outbound
        # traffic, expiring like the mapping itself (masquerade keeps the port).
        sets = f"  set mapped {{ type inet_service; flags dynamic, timeout; {timeout}; }}\n"
        forward.append(f'oifname "{wan}" ip protocol udp update @mapped {{ udp sport }}')
        pre.append(f'iifname "{wan}" udp dport @mapped dnat to {host}')
    elif plan.kind == "restricted-cone":
        # Per mapping, as RFC 4787 means it: (remote address, mapped port) pairs.
        sets = ("  set contacted { type ipv4_addr . inet_service; flags dynamic, timeout; "
                f"{timeout}; }}\n")  # fmt: skip
        forward.append(
            f'oifname "{wan}" ip protocol udp update @contacted {{ ip daddr . udp sport }}'
        )
        pre.append(f'iifname "{wan}" ip saddr . udp dport @contacted dnat to {host}')
    elif plan.kind == "symmetric":
        post = [f'oifname "{wan}" ip protocol udp snat to {wan_ip}:1024-65535 random',
                f'oifname "{wan}" masquerade']  # fmt: skip
    elif plan.kind == "symmetric-seq":
        ports = ", ".join(f"{i} : {SEQ_PORT_BASE + i}" for i in range(SEQ_PORT_SPAN))
        post = [
            f'oifname "{wan}" ip protocol udp snat to {wan_ip} : numgen inc mod '
            f"{SEQ_PORT_SPAN} map {{ {ports} }}",
            f'oifname "{wan}" masquerade',
        ]
    elif plan.kind == "udp-blocked":
        forward.append(f'iifname "{lan}" ip protocol udp drop')
    elif plan.kind == "tcp-web-only":
        forward += [
            f'iifname "{lan}" tcp dport {{ 80, 443 }} accept',
            f'iifname "{lan}" ct state established,related accept',
            f'iifname "{lan}" drop',
        ]
    elif plan.kind == "proxy-only":
        forward.append(f'iifname "{lan}" drop')  # the proxy on the router is the only way out
    elif plan.kind not in ("port-restricted", "upnp"):
        raise ValueError(f"no router ruleset for NAT kind {plan.kind!r}")

    if plan.hairpin:
        pre.insert(0, f'iifname "{lan}" ip daddr {wan_ip} udp dport 1024-65535 dnat to {host}')
        post.insert(0, f'oifname "{lan}" ip saddr {plan.lan_net} ip daddr {plan.lan_net} '
                       f"snat to {wan_ip}")  # fmt: skip

    # Like any home router's firewall, nothing from the Internet reaches the router itself
    # unasked. Without it, a peer's punch arriving before ours leaves a conntrack entry that
    # makes masquerade move our mapping to another port: Linux NAT's "collision" trap.
    router_input = [
        f'iifname "{wan}" ct state established,related accept',
        f'iifname "{wan}" drop',
    ]

    def chain(name: str, hook: str, lines: list[str]) -> str:
        body = "".join(f"    {line}\n" for line in lines)
        return f"  chain {name} {{\n    type {hook};\n{body}  }}\n"

    return (
        "flush ruleset\n"
        "table ip punchline_lab {\n"
        + sets
        + chain("nat_pre", "nat hook prerouting priority dstnat", pre)
        + chain("nat_post", "nat hook postrouting priority srcnat", post)
        + chain("filter_forward", "filter hook forward priority filter", forward)
        + chain("filter_input", "filter hook input priority filter", router_input)
        + "}\n"
        + (_igd_tables() if plan.kind == "upnp" else "")
    )
