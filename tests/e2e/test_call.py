"""The first real call: two daemons, two supernodes, a login server, all separate processes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from punchline.lab.loopback import Network
from punchline.voice import quality, wav

REPORT_FIELDS = {"connected", "peer", "path", "paths", "setup_ms", "duration_s", "rtt_ms", "loss",
                 "jitter_ms", "bytes_sent", "bytes_received"}  # fmt: skip


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    net = Network(tmp_path)
    try:
        net.start_auth()
        net.start_supernode()
        net.start_supernode()
        net.signup("alice")
        net.signup("bob")
        yield net
    finally:
        net.stop()


def _wait_recording(net: Network, path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (net.status("bob").get("call") or {}).get("state") != "active":
            return
        time.sleep(0.1)
    raise AssertionError(f"no recording at {path}\n{net.logs()}")


def _call(net: Network, *extra: str) -> dict[str, Any]:
    sample = wav.speech_sample()
    result = net.cli("call", "bob", "--data", str(net.root / "alice"), "--play", str(sample),
                     "--json", *extra)  # fmt: skip
    assert result.returncode == 0, result.stderr + net.logs()
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    return report


def _pesq(recording: Path) -> float:
    return quality.pesq_wb(wav.read_wav(wav.speech_sample()), wav.read_wav(recording))


def test_call_carries_speech_end_to_end(network: Network) -> None:
    recording = network.root / "bob-recording.wav"
    network.start_daemon("bob", "--auto-answer", "--record", str(recording))
    network.start_daemon("alice")
    report = _call(network)
    assert set(report) >= REPORT_FIELDS
    assert report["connected"] is True
    assert report["peer"] == "bob"
    assert report["path"] == "direct"
    assert isinstance(report["setup_ms"], int)
    assert 0 < report["setup_ms"] < 2000
    assert 9.0 < float(report["duration_s"]) < 12.0  # the sample is 9.7 s
    assert report["loss"] == 0.0
    assert int(report["bytes_received"]) > 0
    _wait_recording(network, recording)
    score = _pesq(recording)
    print(f"PESQ-WB of the recording: {score:.2f}")
    assert score >= 3.8


def test_callee_supernode_dies_mid_call(network: Network) -> None:
    recording = network.root / "bob-recording.wav"
    network.start_daemon("bob", "--auto-answer", "--record", str(recording))
    network.start_daemon("alice")
    doomed = network.supernode_of("bob")
    moved: dict[str, float] = {}

    def kill_then_watch() -> None:
        time.sleep(3.0)
        doomed.kill()
        killed = time.monotonic()
        while time.monotonic() - killed < 10:
            node = network.status("bob").get("supernode")
            if node and node["node_id"] != doomed.node_id:
                moved["after_s"] = time.monotonic() - killed
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_then_watch)
    watcher.start()
    report = _call(network)
    watcher.join()
    assert report["connected"] is True
    assert float(report["duration_s"]) > 9.0
    assert report["loss"] == 0.0, report  # media is peer to peer: no gap
    assert "after_s" in moved, network.logs()
    print(f"bob re-attached {moved['after_s']:.2f} s after its supernode was killed")
    assert moved["after_s"] <= 5.0
    _wait_recording(network, recording)
    assert _pesq(recording) >= 3.8


def test_call_across_two_supernodes_through_the_dht(network: Network) -> None:
    """alice on sn1, bob on sn2: sn1 finds bob in the DHT and hands the invite to sn2."""
    sn1, sn2 = network.supernodes
    recording = network.root / "bob-recording.wav"
    network.start_daemon("bob", "--auto-answer", "--record", str(recording),
                         "--supernode", sn2.node_id)  # fmt: skip
    network.start_daemon("alice", "--supernode", sn1.node_id)
    assert network.supernode_of("alice") is sn1
    assert network.supernode_of("bob") is sn2
    report = _call(network, "--duration", "3")
    assert report["connected"] is True, report
    assert report["setup_ms"] < 2000
    assert report["loss"] == 0.0
