"""In the NAT lab, daemons in sites that let no UDP out still get online (root; CI is root).

The real proof of the supernode ladder (loopback cannot drop UDP): login server and two
supernodes on public hosts (session port 3478, TCP and TLS on 443 and 80); a daemon in a
udp-blocked site and one in a tcp-web-only site must attach over TCP to port 443, and one in a
proxy-only site through the site's HTTP CONNECT proxy. All run in `auto`, as users would.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from punchline.lab.network import LabNetwork
from punchline.lab.topology import Lab
from tests.conftest import unavailable

SITES = {"udpblocked": "udp-blocked", "webonly": "tcp-web-only", "proxyonly": "proxy-only"}


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        unavailable("the NAT lab needs root (network namespaces, nftables)")


def _attached_line(net: LabNetwork, user: str) -> str:
    log = net.daemons[user].log.read_text()
    return log.rsplit("event='attached'", 1)[1].splitlines()[0]


def test_daemons_without_udp_attach_over_tcp_443_and_through_the_proxy(tmp_path: Path) -> None:
    with Lab() as lab:
        net = LabNetwork(tmp_path, lab=lab)
        try:
            for name in ("auth", "sn1", "sn2"):
                net.hosts[name] = lab.add_public_host(name)
            for name, kind in SITES.items():
                net.hosts[name] = lab.add_site(name, kind).host
            net.start_auth()
            net.start_supernode()
            net.start_supernode()
            online_s = {}
            for name in SITES:
                net.signup(name)
                proxy = lab.sites[name].proxy
                flags = ["--proxy", f"http://{proxy[0]}:{proxy[1]}"] if proxy else []
                started = time.monotonic()
                net.start_daemon(name, *flags)
                online_s[name] = time.monotonic() - started
            statuses = {name: net.status(name) for name in SITES}
            assert statuses["udpblocked"]["transport"] == "tcp", statuses
            assert statuses["webonly"]["transport"] == "tcp", statuses
            assert statuses["proxyonly"]["transport"] == "proxy", statuses
            for name in ("udpblocked", "webonly"):
                assert "443)" in _attached_line(net, name)  # the first stream rung
            for name, took in online_s.items():
                assert took < 10, (name, took, net.logs())
        finally:
            net.stop()
