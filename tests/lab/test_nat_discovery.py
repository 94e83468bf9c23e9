"""NAT discovery classifies each lab NAT kind as `nat_types.expected(kind)` says, with our own
STUN servers (the supernodes' responder, run standalone) on two public hosts (root; CI is root).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from punchline.lab import nat_types
from punchline.lab.topology import Host, Lab
from tests.conftest import unavailable

KINDS = ("full-cone", "restricted-cone", "port-restricted", "symmetric", "symmetric-seq")
PORT = 3478
TIMEOUT = 3  # seconds an idle mapping lives on every site's router
WAITS = (1.0, 6.0)  # lifetime probes: alive after 1 s idle, gone after 6 s


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, list[Host]]]:
    if os.geteuid() != 0:
        unavailable("the NAT lab needs root (network namespaces, nftables)")
    with Lab() as lab:
        hosts = [lab.add_public_host("stun1"), lab.add_public_host("stun2")]
        servers = []
        for host, other in ((hosts[0], hosts[1]), (hosts[1], hosts[0])):
            server = lab.popen(host, [sys.executable, "-m", "punchline.nat.stun_service",
                                      "--listen", f"{host.ip}:{PORT}", "--peer",
                                      f"{other.ip}:{PORT}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
            assert server.stdout is not None
            assert json.loads(server.stdout.readline())["primary"] == [host.ip, PORT]
            servers.append(server)
        try:
            yield lab, hosts
        finally:
            for server in servers:
                server.kill()
                server.wait()


def _discover_all(lab: Lab, stun: list[Host], kinds: tuple[str, ...]) -> dict[str, Any]:
    """Discovery from one site of each kind, all at once (each site has its own router)."""
    argv = [sys.executable, "-m", "punchline.nat.discover"]
    for host in stun:
        argv += ["--server", f"{host.ip}:{PORT}"]
    for wait in WAITS:
        argv += ["--lifetime", str(wait)]
    running = {}
    for kind in kinds:
        site = lab.add_site(f"d{len(lab.sites)}", kind, udp_timeout=TIMEOUT)
        running[kind] = lab.popen(site.host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reports = {}
    for kind, process in running.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        reports[kind] = json.loads(out)
    return reports


def test_discovery_matches_every_nat_kind(lab: tuple[Lab, list[Host]]) -> None:
    net, stun = lab
    started = time.monotonic()
    reports = _discover_all(net, stun, KINDS)
    elapsed = time.monotonic() - started
    mismatches = {}
    for kind, report in reports.items():
        expected = nat_types.expected(kind)
        observed = (report["udp"], report["mapping"], report["filtering"], report["allocation"],
                    report["hairpinning"])  # fmt: skip
        wanted = (expected.udp, expected.mapping, expected.filtering, expected.allocation,
                  expected.hairpin)  # fmt: skip
        if observed != wanted:
            mismatches[kind] = {"observed": observed, "expected": wanted, "report": report}
        assert report["behind_nat"] is True
        assert report["public"][0].startswith("203.0.113.")
        # the router forgets idle mappings after 3 s: alive after 1 s, gone after 6 s
        assert (report["mapping_lifetime_s"], report["mapping_lifetime_max_s"]) == WAITS, kind
        assert report["lifetime_measured"] is True
        assert report["duration_s"] < 5, kind  # discovery itself, before the lifetime probes
    assert mismatches == {}, json.dumps(mismatches, indent=2)
    assert reports["symmetric-seq"]["delta"] == 1  # the next port for each new mapping
    assert reports["symmetric"]["delta"] is None
    assert elapsed < 40


def test_udp_blocked_site_reports_no_udp(lab: tuple[Lab, list[Host]]) -> None:
    net, stun = lab
    report = _discover_all(net, stun, ("udp-blocked",))["udp-blocked"]
    assert report["udp"] is False
    assert report["mapping"] is None
    assert report["allocation"] is None
    assert report["public"] is None
