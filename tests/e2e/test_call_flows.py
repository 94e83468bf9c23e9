"""Answering by hand, declining, busy, and hanging up from either side."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from punchline.client import control
from punchline.lab.loopback import Network


@pytest.fixture
def network(tmp_path: Any) -> Iterator[Network]:
    net = Network(tmp_path)
    try:
        net.start_auth()
        net.start_supernode()
        for user in ("alice", "bob", "carol"):
            net.signup(user)
            net.start_daemon(user)
        yield net
    finally:
        net.stop()


def _start_call(net: Network, caller: str, callee: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "punchline", "call", callee, "--data", str(net.root / caller),
         "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_state(net: Network, user: str, state: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (net.status(user).get("call") or {}).get("state") == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"{user} never reached {state}: {net.status(user)}\n{net.logs()}")


def _report(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=60)
    assert "Traceback" not in err
    value = json.loads(out)
    assert isinstance(value, dict)
    return value


def test_answer_by_hand_then_callee_hangs_up(network: Network) -> None:
    call = _start_call(network, "alice", "bob")
    _wait_state(network, "bob", "incoming")
    _wait_state(network, "alice", "ringing")
    assert network.cli("answer", "--data", str(network.root / "bob")).returncode == 0
    _wait_state(network, "alice", "active")
    time.sleep(1.0)
    assert network.cli("hangup", "--data", str(network.root / "bob")).returncode == 0
    report = _report(call)
    assert report["connected"] is True
    assert report["end_reason"] == "peer hung up"
    assert 0.5 < report["duration_s"] < 5


def test_declined_call(network: Network) -> None:
    call = _start_call(network, "alice", "bob")
    _wait_state(network, "bob", "incoming")
    assert network.cli("hangup", "--data", str(network.root / "bob")).returncode == 0
    report = _report(call)
    assert report["connected"] is False
    assert report["end_reason"] == "declined"
    assert call.returncode == 1


def test_busy_while_in_another_call(network: Network) -> None:
    first = _start_call(network, "alice", "bob")
    _wait_state(network, "bob", "incoming")
    network.cli("answer", "--data", str(network.root / "bob"))
    _wait_state(network, "alice", "active")
    second = _start_call(network, "carol", "bob")
    report = _report(second)
    assert report["connected"] is False
    assert report["end_reason"] == "busy"
    network.cli("hangup", "--data", str(network.root / "alice"))
    assert _report(first)["connected"] is True


def test_control_socket_is_private(network: Network) -> None:
    path = control.socket_path(network.root / "alice")
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    result = network.cli("hangup", "--data", str(network.root / "alice"))
    assert result.returncode == 1
    assert "there is no call" in result.stderr
