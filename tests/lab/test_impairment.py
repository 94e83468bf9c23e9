"""Impaired links in the lab (userspace forwarder, as this kernel has no netem)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from punchline.lab.impair import Impairment
from punchline.lab.topology import Host, Lab
from tests.conftest import unavailable

PROBE = [sys.executable, "-m", "punchline.lab.probe"]


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        unavailable("the NAT lab needs root (network namespaces, nftables)")


def test_delay_and_loss_on_a_site_uplink() -> None:
    with Lab() as lab:
        server = lab.add_public_host("p1")
        echo = lab.popen(server, [*PROBE, "echo"], stdout=subprocess.PIPE)
        assert echo.stdout is not None
        echo.stdout.readline()
        slow = lab.add_site("a", "port-restricted", impairment=Impairment(delay_ms=25))
        lossy = lab.add_site("b", "port-restricted", impairment=Impairment(loss=0.2))
        clean = lab.add_site("c", "port-restricted")
        lan = lab.add_site("d", "port-restricted", lan_impairment=Impairment(delay_ms=10))
        carrier = lab.add_site("e", "double", carrier_impairment=Impairment(delay_ms=10))

        def rtt(site_host: Host, count: int, timeout: float = 0.5) -> dict[str, float]:
            out = lab.run(site_host, [*PROBE, "rtt", "--to", server.ip, "--count", str(count),
                                      "--timeout", str(timeout)], timeout=200)  # fmt: skip
            result: dict[str, float] = json.loads(out)
            return result

        delayed = rtt(slow.host, 30)
        assert 49.0 <= delayed["p50_ms"] <= 60.0, delayed  # 25 ms each way
        assert delayed["lost"] == 0
        dropped = rtt(lossy.host, 200, timeout=0.1)  # an undelayed round trip takes < 5 ms
        assert 40 <= dropped["lost"] <= 105, dropped  # 1 - 0.8^2 = 36 % of round trips
        assert rtt(clean.host, 30)["p50_ms"] < 5.0
        for impaired in (lan, carrier):  # 10 ms each way on the host's or the carrier's link
            assert 19.0 <= rtt(impaired.host, 20)["p50_ms"] <= 30.0
        assert lab.impairment_method is not None
        assert "userspace" in lab.impairment_method
        echo.kill()
