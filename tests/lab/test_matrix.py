"""The connectivity matrix, reduced: one call per step of the NAT traversal ladder, for real.

Sites of the kinds each ladder step exists for sit behind real NAT routers with 25 ms of
one-way delay on their uplinks; each listed pair places one call playing speech. What must
hold is data: `NOW` is what works today (asserted), `TARGET` is what the connectivity engine
is to achieve (reported when still missing). Tighten `NOW` towards `TARGET` as the engine
improves; a pair doing better than `NOW` never fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from punchline.lab import matrix
from tests.conftest import unavailable

# Two sites of a kind are named KIND and KIND-2 (matrix.plan).
SITES = ("open", "open", "port-restricted", "port-restricted", "symmetric-seq", "symmetric",
         "udp-blocked", "proxy-only")  # fmt: skip

# (caller site, callee site) -> path class: "direct", "relay", or None (no audio).
TARGET: dict[tuple[str, str], str | None] = {
    ("open", "open-2"): "direct",  # both public: straight there
    ("open", "port-restricted"): "direct",  # the NATed side's answer opens the way
    ("port-restricted", "open"): "direct",  # the NATed side connects out
    ("port-restricted", "port-restricted-2"): "direct",  # UDP hole punching
    ("symmetric-seq", "port-restricted"): "direct",  # punching with port prediction
    # unpredictable ports against a port-filtering NAT: birthday probing finds one of 512
    # mappings within seconds (the relay carries the audio until then)
    ("symmetric", "port-restricted"): "direct",
    ("symmetric", "symmetric-seq"): "relay",  # both mappings per destination: a UDP relay
    ("udp-blocked", "open"): "relay",  # relay over TCP/TLS 443
    ("open", "udp-blocked"): "relay",
    ("proxy-only", "open"): "relay",  # relay through the HTTP CONNECT proxy
}
NOW: dict[tuple[str, str], str | None] = {
    **TARGET,
    # birthday probing upgraded within the 5 s call in most runs here (0.6-1 s) but not in one
    # fresh-clone CI run: not asserted yet (the table still shows it)
    ("symmetric", "port-restricted"): None,
}
# A clean direct call scores about 3.9-4.1 on this clip; one call per pair is a connectivity
# check, not a quality benchmark (bench/matrix.py gives medians): a fresh-clone CI run scored
# one direct hole-punched call 3.41 with nothing lost or late at the receiver.
MIN_PESQ = 3.2
# Through tinyproxy the audio arrives in bursts (26 ms of jitter measured: the proxy's own
# sockets batch small writes), which the jitter buffer absorbs at some cost: 3.1-3.7 seen.
MIN_PESQ_PROXY = 3.0


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        unavailable("the NAT lab needs root (network namespaces, nftables)")


def test_every_ladder_step(tmp_path: Path) -> None:
    lines: list[str] = []
    result = matrix.run(SITES, runs=1, delay_ms=25, progress=lines.append, workdir=tmp_path,
                        clip_s=4.0, online_timeout=15, only=list(TARGET))  # fmt: skip
    rows = {(r["caller"], r["callee"]): r for r in result["rows"]}
    assert set(rows) == set(TARGET)
    summary = "\n".join([*lines, matrix.table(result)])
    for pair, expected in NOW.items():
        row = rows[pair]
        if expected is None:
            continue
        assert row["connected"] == row["runs"] == 1, f"{pair}: {row['reason']}\n{summary}"
        assert row["path_class"] == expected, f"{pair}: {row['path']}\n{summary}"
        assert row["setup_ms"]["median"] is not None
        assert row["pesq"]["median"] is not None, summary
        floor = MIN_PESQ_PROXY if "proxy-only" in pair else MIN_PESQ
        assert row["pesq"]["median"] >= floor, summary
    for row in result["rows"]:  # whatever did not connect says why
        assert row["connected"] or row["reason"], row
    missing = {
        p: (rows[p]["path_class"], t) for p, t in TARGET.items() if rows[p]["path_class"] != t
    }
    print(f"ladder steps not at target yet (got, target): {missing}\n{summary}")
    assert result["timings"]["lab_build_s"] + result["timings"]["network_start_s"] < 60
    # first audio where a direct path exists from the start (issue #6: <= 200 ms), and
    # through the relay when UDP is blocked (<= 1 s) or only a proxy leads out (<= 1.5 s)
    for pair in (("open", "port-restricted"), ("port-restricted", "open"),
                 ("port-restricted", "port-restricted-2")):  # fmt: skip
        assert rows[pair]["setup_ms"]["median"] <= 200, summary
    assert rows[("udp-blocked", "open")]["setup_ms"]["median"] <= 1000, summary
    assert rows[("proxy-only", "open")]["setup_ms"]["median"] <= 1500, summary


def _contract(row: dict[str, Any]) -> None:
    for key in ("caller", "callee", "runs", "connected", "path"):
        assert key in row
    assert set(row["setup_ms"]) == set(row["direct_ms"]) == {"median", "p95"}
    assert set(row["pesq"]) == {"median", "min"}


def test_cli_prints_the_json_contract(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "punchline", "lab", "matrix", "--json", "--sites", "open,open",
         "--runs", "1", "--seconds", "2", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert [s["online"] for s in output["sites"]] == [True, True], output["sites"]
    assert len(output["rows"]) == 1  # two sites of one kind: one direction is enough
    row = output["rows"][0]
    _contract(row)
    assert (row["caller"], row["callee"], row["runs"], row["connected"]) == ("open", "open-2", 1, 1)
    assert row["path"] == "direct"
    assert row["setup_ms"]["median"] is not None
    assert "lab built" in result.stderr  # progress goes to stderr, JSON alone to stdout


def test_table_of_offline_and_unconnected_rows() -> None:
    """The table and row JSON hold up when nothing connected (no medians to show)."""
    a, b = matrix.plan(["open", "udp-blocked"])
    offline = matrix.Row(a, b, skipped="callee udp-blocked offline: no supernode session")
    failed = matrix.Row(b, a, [matrix.run_of({"connected": False, "end_reason": "timeout"}, None)])
    result = {"rows": [offline.as_json(), failed.as_json()], "runs": 1, "delay_ms": 25,
              "sites": [{"name": "udp-blocked", "online": False, "reason": "no session"}],
              "timings": {"lab_build_s": 1, "network_start_s": 2, "online_s": 20, "calls_s": 5,
                          "per_call_s": 5}}  # fmt: skip
    text = matrix.table(result, reference=lambda _a, _b: "ref")
    for shown in ("offline", "not connected", "timeout", "ref"):
        assert shown in text
    _contract(offline.as_json())
    assert offline.as_json()["runs"] == 0
    assert failed.as_json()["reason"] == "timeout"
