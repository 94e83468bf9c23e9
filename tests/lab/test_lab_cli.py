"""punchline lab up / exec / down with a topology file, driven as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from punchline.lab import netns
from tests.conftest import unavailable

EXAMPLE = Path(__file__).parents[2] / "examples" / "lab-home-and-office.toml"


def _punchline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "punchline", *args], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        unavailable("the NAT lab needs root (network namespaces, nftables)")


def test_up_exec_down(tmp_path: Path) -> None:
    up = _punchline("lab", "up", str(EXAMPLE), "--json")
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    run = state["run_id"]
    try:
        assert set(state["hosts"]) >= {"server1", "home-h1", "home-h2", "mobile-h1", "office-h1"}
        assert state["sites"]["mobile"]["kind"] == "double:port-restricted/symmetric"
        server = state["hosts"]["server1"]["ip"]
        echo = subprocess.Popen(
            ["ip", "netns", "exec", state["hosts"]["server1"]["ns"], sys.executable, "-m",
             "punchline.lab.probe", "echo"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert echo.stdout is not None
        echo.stdout.readline()
        code = ("from punchline.lab.probe import _ask, _udp; "
                f"print(_ask(_udp(), ('{server}', 3478)))")  # fmt: skip
        seen = _punchline("lab", "exec", "home-h1", "--run", run, "--", sys.executable, "-c", code)
        echo.kill()
        assert seen.returncode == 0, seen.stderr
        assert state["sites"]["home"]["public_ip"] in seen.stdout  # it went out through the NAT
        unknown = _punchline("lab", "exec", "nobody", "--run", run, "--", "true")
        assert unknown.returncode == 1
        assert "no host 'nobody'" in unknown.stderr
    finally:
        down = _punchline("lab", "down", "--run", run)
    assert down.returncode == 0, down.stderr
    assert netns.list_ns(state["prefix"]) == []


def test_a_bad_topology_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[site]]\nname = "x"\nkind = "teleporter"\n')
    result = _punchline("lab", "up", str(bad))
    assert result.returncode == 1
    assert "unknown kind 'teleporter'" in result.stderr
    assert "Traceback" not in result.stderr
