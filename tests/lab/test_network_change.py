"""A call that survives its network changing under it: NAT rebinding, a laptop moving.

Two port-restricted sites with 25 ms on each uplink (and a third, empty one to move to) share
one lab, supernodes and relay. Each test places a direct call with speech and changes one
side's network a second after the path went direct:

- rebinding: the caller's router forgets every mapping and maps the caller's sockets to new
  ports. Every path through the old ports is dead, the callee's NAT drops checks from the new
  ones, and the caller's relay allocation is bound to its old port.
- moving: the callee's host is re-cabled into the third site: new host address, new NAT,
  new public address.

The side that changed notices (consent lost, reflexive address or host addresses changed),
restarts connectivity and tells the peer through the supernodes; the call must stay up, the
longest silence the caller hears is printed (the figure in docs/connectivity.md), and the
call must end on a direct path again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from punchline.lab import matrix
from punchline.lab.impair import Impairment
from punchline.lab.loopback import call_with_sample
from tests.conftest import unavailable

DELAY_MS = 25
MAX_GAP_MS = 3000


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        unavailable("the NAT lab needs root (network namespaces, nftables)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[matrix.Matrix]:
    if os.geteuid() != 0:
        unavailable("the NAT lab needs root (network namespaces, nftables)")
    root = tmp_path_factory.mktemp("network-change")
    sites = matrix.plan(["port-restricted", "port-restricted"])
    with matrix.Matrix(sites, DELAY_MS, root, lambda _line: None, clip_s=8.0) as m:
        m.lab.add_site("elsewhere", "port-restricted", impairment=Impairment(delay_ms=DELAY_MS))
        yield m


def _wait(check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    return None


def _call_with_change(
    m: matrix.Matrix, caller: str, callee: str, change: Callable[[], None]
) -> dict[str, Any]:
    """A call from `caller` to `callee`; `change()` runs a second after it went direct."""
    result: dict[str, Any] = {}
    previous = (m.net.status(caller).get("call") or {}).get("call_id")

    def call() -> None:
        recording = m.root / f"{callee}-recording.wav"
        result.update(call_with_sample(m.net, caller, callee, recording, sample=m.clip))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()

    def direct() -> bool:
        call_status = m.net.status(caller).get("call") or {}
        return (
            call_status.get("call_id") not in (None, previous)
            and call_status.get("state") == "active"
            and (call_status.get("connectivity") or {}).get("path") == "direct"
        )

    assert _wait(direct, 10), m.net.logs()
    time.sleep(1.0)
    change()
    thread.join(60)
    assert result.get("connected"), m.net.logs()
    return result


def _followed(m: matrix.Matrix, user: str, public_ip: str) -> bool:
    """The daemon's supernode session followed it to a new address on `public_ip` (its
    authenticated packets moved the session there: no re-attach, no republishing)."""
    return any(
        "client address changed" in line and f"subject='{user}'" in line and public_ip in line
        for log in m.root.glob("sn*.log")
        for line in log.read_text().splitlines()
    )


def _summary(result: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(p["path"], p["reason"], p["at_ms"]) for p in result["paths"]]


def test_a_call_survives_nat_rebinding_and_comes_back_direct(lab: matrix.Matrix) -> None:
    caller, callee = lab.sites[0].name, lab.sites[1].name
    moved: dict[int, int] = {}

    def rebind() -> None:
        moved.update(lab.lab.rebind(lab.lab.sites[caller]))

    result = _call_with_change(lab, caller, callee, rebind)
    paths = _summary(result)
    print(f"NAT rebinding: longest silence {result['max_gap_ms']} ms; ports moved {moved}; "
          f"paths {paths}")  # fmt: skip
    assert moved
    assert result["end_reason"] == "hung up", result  # the caller's clip ran out, nothing else
    assert any(reason == "restart" for _path, reason, _at in paths), paths
    assert result["path"] == "direct", paths
    assert result["checks"].get("restarts", 0) >= 1, result["checks"]
    assert result["max_gap_ms"] <= MAX_GAP_MS, result
    assert _followed(lab, caller, lab.lab.sites[caller].wan_ip), lab.net.logs()
    assert lab.net.status(caller).get("supernode") is not None


def test_a_call_survives_the_callee_moving_to_another_network(lab: matrix.Matrix) -> None:
    caller, callee = lab.sites[0].name, lab.sites[1].name

    def move() -> None:
        host = lab.net.hosts[callee]
        lab.net.hosts[callee] = lab.lab.move_host(host, lab.lab.sites["elsewhere"])

    result = _call_with_change(lab, caller, callee, move)
    paths = _summary(result)
    print(f"moving networks: longest silence {result['max_gap_ms']} ms; paths {paths}")
    assert result["end_reason"] == "hung up", result
    assert any(reason == "restart" for _path, reason, _at in paths), paths
    assert result["path"] == "direct", paths
    assert result["max_gap_ms"] <= MAX_GAP_MS, result
    assert _followed(lab, callee, lab.lab.sites["elsewhere"].wan_ip), lab.net.logs()
    assert lab.net.status(callee).get("supernode") is not None
