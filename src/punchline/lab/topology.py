"""The lab's shape: an Internet bridge with public hosts, and sites behind NAT routers.

Everything lives in network namespaces named `pl<run id>-...`: the "internet" namespace holds
the bridge, each public host and each router has its own namespace, and each site's LAN hosts
sit behind their router on a LAN bridge. Nothing is connected to the machine's own network, so
lab traffic can never leave it. Leaving the context manager (normally, on an exception or on
Ctrl-C) removes every namespace of the run, with the processes inside.

Addresses: public 203.0.113.0/24 (TEST-NET-3): hosts from .10, routers' WAN side from .100;
site n's LAN is 10.n.0.0/24 with the router at .1 and hosts from .10.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from punchline.lab import nat_types, netns
from punchline.lab.impair import Impairment
from punchline.lab.netns import LabError

PUBLIC_NET = "203.0.113"
PREFIX = "pl"


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    ip: str


@dataclass
class Site:
    name: str
    kind: str
    router_ns: str | None
    wan_ip: str
    hosts: list[Host] = field(default_factory=list)
    proxy: tuple[str, int] | None = None
    proxy_auth: tuple[str, str] | None = None

    @property
    def host(self) -> Host:
        return self.hosts[0]


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(143)


class Lab:
    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id or secrets.token_hex(3)
        self.prefix = f"{PREFIX}{self.run_id}-"
        self.internet = self.prefix + "internet"
        self.public: dict[str, Host] = {}
        self.sites: dict[str, Site] = {}
        self._ports = 0
        self._sites = 0
        self._moves = 0
        self._processes: list[subprocess.Popen[bytes]] = []
        self.impairment_method: str | None = None
        self._old_sigterm: Any = None
        self._dirs: list[Path] = []
        # namespace -> (address, MAC) of each interface on the Internet bridge
        self._wan: dict[str, tuple[str, str]] = {}

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Lab:
        # SIGTERM (a killed test, `timeout`) would skip __exit__ and leave namespaces behind:
        # turn it into a normal exit while the lab is open (main thread only).
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            netns.add_ns(self.internet)
            netns.ns_run(self.internet, ["ip", "link", "add", "br0", "type", "bridge"])
            netns.ns_run(self.internet, ["ip", "link", "set", "br0", "up"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        for process in self._processes:
            process.kill()
            process.wait()
        netns.cleanup(self.prefix)
        for directory in self._dirs:
            shutil.rmtree(directory, ignore_errors=True)

    # ----------------------------------------------------------------- building

    def _uplink(self, ns: str, ip: str, impairment: Impairment | None = None) -> None:
        """Connect `ns` to the Internet bridge with address `ip` on its `wan` interface,
        through a shaper namespace running the userspace impairment forwarder if asked."""
        self._ports += 1
        port = f"p{self._ports}"
        self._link(self.internet, port, ns, "wan", impairment)
        netns.ns_run(self.internet, ["ip", "link", "set", port, "master", "br0"])
        netns.address(ns, "wan", f"{ip}/24")
        self._neighbours(ns, ip)

    def _neighbours(self, ns: str, ip: str) -> None:
        """Permanent ARP entries between every pair of Internet-side interfaces.

        Why: the lab's Internet is one flat Ethernet, so the first packet between two sites
        would wait for an ARP round trip through both (delayed) uplinks, 100 ms at 25 ms each
        way, that no real path has (a router's only neighbour is its ISP's gateway, always
        known). Connection set-up times measured here would carry that artefact.
        """
        mac = netns.ns_run(ns, ["cat", "/sys/class/net/wan/address"]).strip()
        for other_ns, (other_ip, other_mac) in self._wan.items():
            netns.ns_run(ns, ["ip", "neigh", "replace", other_ip, "lladdr", other_mac,
                              "dev", "wan", "nud", "permanent"])  # fmt: skip
            netns.ns_run(other_ns, ["ip", "neigh", "replace", ip, "lladdr", mac, "dev", "wan",
                                    "nud", "permanent"])  # fmt: skip
        self._wan[ns] = (ip, mac)

    def _link(
        self, a_ns: str, a_name: str, b_ns: str, b_name: str, impairment: Impairment | None
    ) -> None:
        """A cable a <-> b; with an impairment, through a shaper namespace in the middle where
        the userspace forwarder applies it (this kernel has no netem)."""
        if impairment is None:
            netns.veth(a_ns, a_name, b_ns, b_name)
            return
        shaper = f"{b_ns}-{b_name}-shaper"
        netns.add_ns(shaper)
        netns.veth(a_ns, a_name, shaper, "side_a")
        netns.veth(shaper, "side_b", b_ns, b_name)
        for dev in ("side_a", "side_b"):  # whole frames only: no offload aggregates to re-split
            netns.run(netns.in_ns(shaper, ["ethtool", "-K", dev, "gro", "off", "gso", "off",
                                           "tso", "off"]), check=False)  # fmt: skip
        process = subprocess.Popen(
            netns.in_ns(shaper, [sys.executable, "-m", "punchline.lab.impair", "--a", "side_a",
                                 "--b", "side_b", *impairment.args()]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert process.stdout is not None
        if not process.stdout.readline():
            raise LabError(f"the impairment forwarder for {b_ns} did not start")
        self._processes.append(process)
        self.impairment_method = "userspace AF_PACKET forwarder (no netem on this kernel)"

    def add_public_host(self, name: str, impairment: Impairment | None = None) -> Host:
        ns = self.prefix + name
        ip = f"{PUBLIC_NET}.{10 + len(self.public)}"
        netns.add_ns(ns)
        self._uplink(ns, ip, impairment)
        host = Host(name, ns, ip)
        self.public[name] = host
        return host

    def add_site(
        self,
        name: str,
        kind: str,
        hosts: int = 1,
        proxy_auth: tuple[str, str] | None = None,
        hairpin: bool = False,
        udp_timeout: int | None = None,
        impairment: Impairment | None = None,
        lan_impairment: Impairment | None = None,
        carrier_impairment: Impairment | None = None,
    ) -> Site:
        """A site of `kind`: `open`, a NAT kind, `proxy-only` or `double[:INNER/OUTER]`.

        `udp_timeout` (seconds) sets how long an idle UDP mapping lives on the (home) router,
        through conntrack's per-namespace timeouts; `hairpin` lets LAN hosts reach mappings
        on the site's own public address. `impairment` applies to the router's Internet
        uplink, `lan_impairment` to each LAN host's link, `carrier_impairment` to the link
        between a double NAT's carrier and home routers.
        """
        base = "double" if kind.startswith("double") else kind
        if base not in nat_types.KINDS:
            raise LabError(f"unknown site kind {kind!r}; known: {', '.join(nat_types.KINDS)}")
        if kind == "open":
            host = self.add_public_host(name, impairment)
            site = Site(name, kind, None, host.ip, [host])
            self.sites[name] = site
            return site
        self._sites += 1
        index = self._sites
        router = self.prefix + name
        wan_ip = f"{PUBLIC_NET}.{100 + index}"
        netns.add_ns(router)
        self._uplink(router, wan_ip, impairment)
        inner_kind, home = kind, router
        if base == "double":
            try:
                inner_kind, outer_kind = nat_types.parse_double(kind)
            except ValueError as exc:
                raise LabError(str(exc)) from exc
            home, home_wan = self._carrier(router, index, wan_ip, outer_kind, carrier_impairment)
        else:
            home_wan = wan_ip
        self._lan(home, f"10.{index}.0.1/24")
        site = Site(name, kind, router, wan_ip,
                    self._hosts(name, router, home, index, hosts, lan_impairment))  # fmt: skip
        plan = nat_types.RouterPlan(inner_kind, "wan", "lan", home_wan, site.hosts[0].ip,
                                    hairpin, f"10.{index}.0.0/24",
                                    udp_timeout or 120)  # fmt: skip
        netns.nft(home, nat_types.ruleset(plan))
        if udp_timeout is not None:
            for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
                netns.sysctl(home, f"net.netfilter.{key}", str(udp_timeout))
        if kind == "proxy-only":
            site.proxy = (f"10.{index}.0.1", nat_types.PROXY_PORT)
            site.proxy_auth = proxy_auth
            self._start_proxy(home, f"10.{index}.0", proxy_auth)
        if inner_kind == "upnp":
            self._start_igd(home, f"10.{index}.0.0/24", home_wan)
        self.sites[name] = site
        return site

    def _carrier(
        self, router: str, index: int, wan_ip: str, kind: str, impairment: Impairment | None
    ) -> tuple[str, str]:
        """Make `router` a carrier NAT of `kind` with a home router behind it in 100.64.n/24;
        returns the home router's namespace and WAN address."""
        home, home_wan = f"{router}-home", f"100.64.{index}.2"
        self._lan(router, f"100.64.{index}.1/24")
        netns.add_ns(home)
        self._link(router, "c1", home, "wan", impairment)
        netns.ns_run(router, ["ip", "link", "set", "c1", "master", "lan"])
        netns.address(home, "wan", f"{home_wan}/24")
        netns.default_route(home, f"100.64.{index}.1")
        outer = nat_types.RouterPlan(kind, "wan", "lan", wan_ip, home_wan)
        netns.nft(router, nat_types.ruleset(outer))
        return home, home_wan

    def _hosts(
        self,
        name: str,
        router: str,
        home: str,
        index: int,
        count: int,
        impairment: Impairment | None,
    ) -> list[Host]:
        hosts = []
        for number in range(1, count + 1):
            ns, ip = f"{router}-h{number}", f"10.{index}.0.{9 + number}"
            netns.add_ns(ns)
            self._link(home, f"l{number}", ns, "eth0", impairment)
            netns.ns_run(home, ["ip", "link", "set", f"l{number}", "master", "lan"])
            netns.address(ns, "eth0", f"{ip}/24")
            netns.default_route(ns, f"10.{index}.0.1")
            hosts.append(Host(f"{name}-h{number}", ns, ip))
        return hosts

    def _lan(self, router: str, cidr: str) -> None:
        netns.ns_run(router, ["ip", "link", "add", "lan", "type", "bridge"])
        netns.ns_run(router, ["ip", "link", "set", "lan", "up"])
        netns.address(router, "lan", cidr)
        netns.sysctl(router, "net.ipv4.ip_forward", "1")

    def _start_proxy(self, router: str, lan: str, auth: tuple[str, str] | None) -> None:
        """tinyproxy on the router's LAN address: the only way out of a proxy-only site."""
        workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}proxy-"))
        shutil.chown(workdir, "nobody", "nogroup")  # tinyproxy drops to nobody and logs here
        self._dirs.append(workdir)
        config = workdir / "tinyproxy.conf"
        config.write_text(nat_types.tinyproxy_config(f"{lan}.1", f"{lan}.0/24", str(workdir), auth))
        process = subprocess.Popen(
            netns.in_ns(router, ["tinyproxy", "-d", "-c", str(config)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._processes.append(process)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = netns.ns_run(router, ["ss", "-Hltn", f"sport = :{nat_types.PROXY_PORT}"])
            if probe.strip():
                return
            if process.poll() is not None:
                break
            time.sleep(0.05)
        raise LabError("tinyproxy did not start on the proxy-only site's router")

    def _start_igd(self, router: str, lan_net: str, wan_ip: str) -> None:
        """miniupnpd on a `upnp` router (UPnP-IGD, NAT-PMP, PCP on the LAN side), with the
        STUN responder it needs to believe its TEST-NET address (`nat_types.miniupnpd_config`
        says why)."""
        workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}igd-"))
        self._dirs.append(workdir)
        stun = subprocess.Popen(
            netns.in_ns(router, [sys.executable, "-m", "punchline.lab.igd", "--listen", wan_ip,
                                 "--port", str(nat_types.IGD_STUN_PORT)]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._processes.append(stun)
        assert stun.stdout is not None
        if not stun.stdout.readline():
            raise LabError("the STUN responder for miniupnpd did not start")
        config = workdir / "miniupnpd.conf"
        config.write_text(nat_types.miniupnpd_config(lan_net, wan_ip, str(uuid.uuid4())))
        with (workdir / "miniupnpd.log").open("wb") as log:
            daemon = subprocess.Popen(
                netns.in_ns(router, [shutil.which("miniupnpd") or "/usr/sbin/miniupnpd",
                                     "-d", "-f", str(config),
                                     "-P", str(workdir / "miniupnpd.pid")]),
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._processes.append(daemon)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # NAT-PMP/PCP listen after the STUN verdict
            if netns.ns_run(router, ["ss", "-Hlun", "sport = :5351"]).strip():
                break
            if daemon.poll() is not None:
                break
            time.sleep(0.05)
        detail = (workdir / "miniupnpd.log").read_text(errors="replace")
        if daemon.poll() is None and "Port forwarding is now enabled" in detail:
            return
        raise LabError(f"miniupnpd did not start mapping on the upnp router: {detail[-600:]}")

    # ----------------------------------------------------------------- network changes

    def _home(self, site: Site) -> str:
        """The namespace holding the site's LAN bridge and the NAT its hosts sit behind."""
        if site.router_ns is None:
            raise LabError(f"site {site.name} has no router")
        return site.router_ns + ("-home" if site.kind.startswith("double") else "")

    def rebind(self, site: Site, host: Host | None = None, shift: int = 1000) -> dict[int, int]:
        """The site's NAT forgets its mappings and maps `host`'s UDP sockets anew, each to
        another public port (its port plus `shift`, wrapped), the same for every destination:
        NAT rebinding as after a router reboot or a carrier NAT's timeout, endpoint-
        independent as before. (Linux's masquerade alone would hand the old ports out again
        after a flush.) Returns {old port: new port}."""
        home, host = self._home(site), host or site.host
        listing = netns.ns_run(host.ns, ["ss", "-Huan"])
        ports = sorted({int(line.split()[3].rsplit(":", 1)[1]) for line in listing.splitlines()
                        if len(line.split()) >= 5})  # fmt: skip
        if not ports:
            raise LabError(f"{host.name} has no UDP socket to rebind")
        moved = {p: 1024 + (p - 1024 + shift) % (65536 - 1024) for p in ports}
        wan_ip = netns.ns_run(home, ["ip", "-4", "-o", "addr", "show", "dev", "wan"]).split()[3]
        mapping = ", ".join(f"{a} : {b}" for a, b in moved.items())
        netns.ns_run(home, ["nft", "insert", "rule", "ip", "punchline_lab", "nat_post",
                            "oifname", '"wan"', "ip", "saddr", host.ip, "udp", "sport",
                            "{", ", ".join(map(str, ports)), "}", "snat", "to",
                            wan_ip.split("/")[0], ":", "udp", "sport", "map",
                            "{", mapping, "}"])  # fmt: skip
        netns.flush_conntrack(home)
        return moved

    def move_host(self, host: Host, site: Site) -> Host:
        """A laptop joins another network: `host` (its namespace and processes, sockets
        included) is cabled to `site`'s LAN with the next free address, its default route
        switched there, and its old cable pulled. Returns the host as it is now."""
        home = self._home(site)
        lan = site.host.ip.rsplit(".", 1)[0]
        self._moves += 1
        used = {h.ip for h in site.hosts}
        ip = next(f"{lan}.{n}" for n in range(10, 250) if f"{lan}.{n}" not in used)
        old_dev = netns.ns_run(host.ns, ["ip", "-o", "-4", "route", "show", "default"]).split()
        device = f"mv{self._moves}"
        netns.veth(home, device, host.ns, device)
        netns.ns_run(home, ["ip", "link", "set", device, "master", "lan"])
        netns.address(host.ns, device, f"{ip}/24")
        netns.ns_run(host.ns, ["ip", "route", "replace", "default", "via", f"{lan}.1",
                               "dev", device])  # fmt: skip
        if "dev" in old_dev:
            netns.ns_run(host.ns, ["ip", "link", "del", old_dev[old_dev.index("dev") + 1]])
        moved = Host(host.name, host.ns, ip)
        site.hosts.append(moved)
        return moved

    # ----------------------------------------------------------------- running things

    def popen(self, host: Host, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(netns.in_ns(host.ns, argv), text=True, **kwargs)

    def run(self, host: Host, argv: Sequence[str], timeout: float = 30) -> str:
        result = subprocess.run(
            netns.in_ns(host.ns, argv), capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed in {host.name}: {result.stderr.strip()}")
        return result.stdout

    def python(self, host: Host, module: str, *args: str) -> list[str]:
        """argv to run one of punchline's modules with this Python inside a namespace."""
        return [sys.executable, "-m", module, *args]
