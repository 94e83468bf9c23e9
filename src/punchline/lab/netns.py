"""Thin wrappers over iproute2 and nftables for the lab: one place that runs `ip` and `nft`.

Every object the lab creates carries the run's prefix in its name, so `cleanup(prefix)` can
sweep leftovers of a crashed run without touching anything else on the machine.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence

from punchline.errors import LocalError


class LabError(LocalError):
    """Building or using the lab failed; the message carries the command and its error."""


def run(argv: Sequence[str], input_text: str | None = None, check: bool = True) -> str:
    try:
        result = subprocess.run(
            list(argv), input=input_text, capture_output=True, text=True, check=False, timeout=30
        )
    except FileNotFoundError as exc:
        raise LabError(
            f"{argv[0]} is not installed: the lab needs iproute2 and nftables (as root)"
        ) from exc
    if check and result.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {result.stderr.strip() or result.stdout}")
    return result.stdout


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def ns_run(ns: str, argv: Sequence[str], input_text: str | None = None) -> str:
    return run(in_ns(ns, argv), input_text)


def add_ns(name: str) -> None:
    run(["ip", "netns", "add", name])
    ns_run(name, ["ip", "link", "set", "lo", "up"])


def sysctl(ns: str, key: str, value: str) -> None:
    ns_run(ns, ["sysctl", "-qw", f"{key}={value}"])


def nft(ns: str, ruleset: str) -> None:
    ns_run(ns, ["nft", "-f", "-"], input_text=ruleset)


def veth(a_ns: str, a_name: str, b_ns: str, b_name: str) -> None:
    """A cable between two namespaces (created in the first, one end moved to the second).

    The far end is born under a temporary name and renamed once moved, so it may share its
    final name with an interface of the first namespace (every router has a `wan`).
    """
    temporary = f"t{a_name}"[:15]
    ns_run(a_ns, ["ip", "link", "add", a_name, "type", "veth", "peer", "name", temporary])
    ns_run(a_ns, ["ip", "link", "set", temporary, "netns", b_ns])
    ns_run(b_ns, ["ip", "link", "set", temporary, "name", b_name])
    ns_run(a_ns, ["ip", "link", "set", a_name, "up"])
    ns_run(b_ns, ["ip", "link", "set", b_name, "up"])
    # Compute checksums in software: veth otherwise leaves them for "hardware" to fill in,
    # which never happens to a frame the userspace impairment forwarder copies.
    for ns, name in ((a_ns, a_name), (b_ns, b_name)):
        run(in_ns(ns, ["ethtool", "-K", name, "tx", "off"]), check=False)


def address(ns: str, dev: str, cidr: str) -> None:
    ns_run(ns, ["ip", "addr", "add", cidr, "dev", dev])


def default_route(ns: str, via: str) -> None:
    ns_run(ns, ["ip", "route", "add", "default", "via", via])


def list_ns(prefix: str) -> list[str]:
    names = []
    for line in run(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            names.append(name)
    return names


def delete_ns(name: str) -> None:
    """Kill what runs inside, then delete: veths inside go with it."""
    pids = run(["ip", "netns", "pids", name], check=False).split()
    for pid in pids:
        run(["kill", "-9", pid], check=False)
    run(["ip", "netns", "del", name], check=False)


def cleanup(prefix: str) -> list[str]:
    """Remove every namespace whose name starts with `prefix`; returns what was removed."""
    removed = list_ns(prefix)
    for name in removed:
        delete_ns(name)
    return removed


# ctnetlink (linux/netfilter/nfnetlink_conntrack.h): a DELETE naming no connection flushes
# the table of the family, like `conntrack -F` (conntrack-tools is not in the lab's packages).
_NETLINK_NETFILTER = 12
_CT_DELETE = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
_NLM_F_REQUEST_ACK = 0x1 | 0x4
_NLMSG_ERROR = 2


def flush_conntrack(ns: str) -> None:
    """Forget every IPv4 connection the namespace's conntrack tracks (its NAT mappings
    included): the next packet of each flow is new to the NAT, as after a router reboot or
    a carrier NAT's timeout."""
    code = "from punchline.lab.netns import flush_conntrack_here; flush_conntrack_here()"
    ns_run(ns, [sys.executable, "-c", code])


def flush_conntrack_here() -> None:
    """`flush_conntrack` for the namespace this process runs in."""
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)  # nfgenmsg: family, version, res_id
    header = struct.pack("=IHHII", 16 + len(body), _CT_DELETE, _NLM_F_REQUEST_ACK, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        sock.send(header + body)
        answer = sock.recv(4096)
    kind = struct.unpack_from("=H", answer, 4)[0]
    error = struct.unpack_from("=i", answer, 16)[0] if kind == _NLMSG_ERROR else 0
    if error not in (0, -2):  # (ENOENT: nothing to flush)
        name = errno.errorcode.get(-error, str(-error))
        raise LabError(f"flushing conntrack failed: {name} ({os.strerror(-error)})")
