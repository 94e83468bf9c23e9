"""`punchline netcheck` and the daemon's NAT report, against real supernodes on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from punchline.lab.loopback import Network

NAT_KEYS = {"mapping", "filtering", "allocation", "delta", "hairpinning", "mapping_lifetime_s",
            "lifetime_measured", "public", "udp"}  # fmt: skip


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    net = Network(tmp_path_factory.mktemp("net"))
    try:
        net.start_auth()
        net.start_supernode()
        net.start_supernode()
        net.signup("alice")
        yield net
    finally:
        net.stop()


def _no_nat(nat: dict[str, object]) -> None:
    """Loopback has no NAT: everything endpoint-independent, ports kept, no hairpin test."""
    assert nat.keys() >= NAT_KEYS
    assert nat["udp"] is True
    assert nat["behind_nat"] is False
    assert nat["mapping"] == "endpoint-independent"
    assert nat["filtering"] == "endpoint-independent"  # change-IP answered by the peer
    assert nat["allocation"] == "preserving"
    assert nat["delta"] is None
    assert nat["hairpinning"] is None
    public = nat["public"]
    assert isinstance(public, list)
    assert public[0] == "127.0.0.1"


def test_netcheck_json_on_loopback(network: Network) -> None:
    started = time.monotonic()
    result = network.cli("netcheck", "--json", "--data", str(network.root / "alice"),
                         "--proxy", "http://u:p@127.0.0.1:9")  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["user"] == "alice"
    assert report["udp"] is True
    assert report["tcp"] is True  # the supernodes' session port takes TCP too
    _no_nat(report["nat"])
    assert report["nat"]["lifetime_measured"] is False  # assumed unless --lifetime
    udp_ports = {u["address"][1] for n in report["nodes"] for u in n["udp"] if u["rtt_ms"]}
    assert udp_ports == {s.udp_port for s in network.supernodes}
    assert {n["node_id"] for n in report["nodes"]} == {s.node_id for s in network.supernodes}
    assert all(t["ok"] and t["connect_ms"] is not None for n in report["nodes"] for t in n["tcp"])
    proxy = report["proxy"]  # nothing listens on port 9: a clear failure, not a traceback
    assert proxy["ok"] is False
    assert "proxy" in proxy["tunnels"][0]["error"]
    assert "ipv6" in report
    assert elapsed < 20


def test_netcheck_measures_lifetime_when_asked(network: Network) -> None:
    result = network.cli("netcheck", "--json", "--data", str(network.root / "alice"),
                         "--lifetime", "1,2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    nat = json.loads(result.stdout)["nat"]
    assert nat["lifetime_measured"] is True
    assert nat["mapping_lifetime_s"] == 2.0  # nothing expires on loopback
    assert nat["mapping_lifetime_max_s"] is None


def test_human_table(network: Network) -> None:
    result = network.cli("netcheck", "--data", str(network.root / "alice"))
    assert result.returncode == 0, result.stderr
    assert "NAT mapping    endpoint-independent" in result.stdout
    assert "(assumed)" in result.stdout


def test_netcheck_without_identity_is_a_clear_error(tmp_path: Path, network: Network) -> None:
    result = network.cli("netcheck", "--json", "--data", str(tmp_path / "nobody"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "signup" in result.stderr or "log in" in result.stderr


def test_daemon_reports_its_nat_in_status(network: Network) -> None:
    network.start_daemon("alice")
    deadline = time.monotonic() + 20
    nat = None
    while time.monotonic() < deadline and nat is None:
        nat = network.status("alice").get("nat")
        time.sleep(0.1)
    assert nat is not None, network.logs()
    _no_nat(nat)
    assert nat["lifetime_measured"] is False  # the first lifetime probe takes 15 s
