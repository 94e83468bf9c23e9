"""A third-party classifier agrees with the lab: coturn's turnutils_natdiscovery (RFC 5780)
against coturn's turnserver with two public addresses, from a site of each NAT kind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from punchline.lab import nat_types, netns
from punchline.lab.topology import Host, Lab
from tests.conftest import unavailable

KINDS = ("full-cone", "restricted-cone", "port-restricted", "symmetric", "symmetric-seq")
WORDS = {"Endpoint Independent": "endpoint-independent", "Address Dependent": "address-dependent",
         "Address and Port Dependent": "address-and-port-dependent"}  # fmt: skip


@pytest.fixture(scope="module")
def stun_lab() -> Iterator[tuple[Lab, Host]]:
    if os.geteuid() != 0:
        unavailable("the NAT lab needs root")
    for tool in ("turnserver", "turnutils_natdiscovery"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} (Debian package coturn) is not installed")
    workdir = tempfile.mkdtemp(prefix="punchline-natdiscovery-")
    with Lab() as lab:
        stun = lab.add_public_host("stun")
        netns.address(stun.ns, "wan", "203.0.113.50/24")  # RFC 5780 needs a second address
        server = lab.popen(
            stun,
            ["turnserver", "-n", "--listening-ip", stun.ip, "--listening-ip", "203.0.113.50",
             "--listening-port", "3478", "--no-tls", "--no-dtls", "--stun-only", "--no-cli",
             "--log-file", "stdout", "--simple-log", "--pidfile", f"{workdir}/t.pid", "--db",
             f"{workdir}/t.db"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while ":3478" not in netns.ns_run(stun.ns, ["ss", "-Huln"]):
            assert time.monotonic() < deadline, "turnserver did not start"
            time.sleep(0.1)
        try:
            yield lab, stun
        finally:
            server.kill()
            server.wait()
            shutil.rmtree(workdir, ignore_errors=True)


def _discover(lab: Lab, host: Host, stun: Host, flag: str) -> str:
    out = lab.run(host, ["turnutils_natdiscovery", flag, stun.ip], timeout=60)
    found = re.findall(r"NAT with (.+?) (?:Mapping|Filtering)!", out)
    assert found, out
    return WORDS[found[-1]]


@pytest.mark.parametrize("kind", KINDS)
def test_turnutils_natdiscovery_agrees(stun_lab: tuple[Lab, Host], kind: str) -> None:
    lab, stun = stun_lab
    site = lab.add_site(f"n{KINDS.index(kind)}", kind)
    expected = nat_types.EXPECTED[kind]
    assert _discover(lab, site.host, stun, "-m") == expected.mapping
    assert _discover(lab, site.host, stun, "-f") == expected.filtering
