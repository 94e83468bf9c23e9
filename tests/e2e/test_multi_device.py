"""One user on two devices: a call rings both, the first answer wins, the other stops ringing.

Real processes: a login server, two supernodes, alice on the first; bob logged in twice (two
data dirs, two keys, one account), his phone on alice's supernode and his desk on the other,
so the invite reaches one device at once and the other through the DHT.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from punchline.lab.loopback import Network
from punchline.voice import wav

# A device that lost the race stops ringing within this (measured: tens of ms on loopback).
STOP_RINGING_BOUND_S = 2.0


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    net = Network(tmp_path_factory.mktemp("multi-device"))
    try:
        net.start_auth()
        sn1, sn2 = net.start_supernode(), net.start_supernode()
        assert net.auth is not None
        net.signup("alice")
        signup = net.cli("signup", "bob", "--auth", net.auth.url, "--data", str(net.root / "phone"),
                         "--password-stdin", stdin="correct horse\ncorrect horse\n")  # fmt: skip
        assert signup.returncode == 0, signup.stderr
        login = net.cli("login", "bob", "--data", str(net.root / "desk"), "--auth", net.auth.url,
                        "--password-stdin", stdin="correct horse\n")  # fmt: skip
        assert login.returncode == 0, login.stderr
        net.start_daemon("alice", "--supernode", sn1.node_id)
        net.start_daemon("phone", "--supernode", sn1.node_id,
                         "--record", str(net.root / "phone.wav"))  # fmt: skip
        net.start_daemon("desk", "--supernode", sn2.node_id, "--record", str(net.root / "desk.wav"))
        yield net
    finally:
        net.stop()


def _call(net: Network) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "punchline", "call", "bob", "--data", str(net.root / "alice"),
         "--play", str(wav.speech_sample()), "--duration", "2", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _call_state(net: Network, who: str) -> dict[str, Any]:
    return net.status(who).get("call") or {}


def _wait(net: Network, who: str, state: str, timeout: float = 10) -> float:
    """Seconds until `who`'s call reaches `state`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _call_state(net, who).get("state") == state:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"{who} never reached {state}: {net.status(who)}\n{net.logs()}")


def _report(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=60)
    assert "Traceback" not in err
    report = json.loads(out)
    assert isinstance(report, dict)
    return report


def _both_ringing(net: Network) -> subprocess.Popen[str]:
    call = _call(net)
    _wait(net, "phone", "incoming")
    _wait(net, "desk", "incoming")
    _wait(net, "alice", "ringing")
    return call


def test_both_devices_ring_and_the_first_answer_wins(network: Network) -> None:
    net = network
    phone, desk = net.status("phone")["device"], net.status("desk")["device"]
    assert phone != desk
    assert net.status("phone")["user"] == net.status("desk")["user"] == "bob"
    call = _both_ringing(net)
    # the desk (the device on the other supernode) answers; the phone must stop ringing
    answered = time.monotonic()
    assert net.cli("answer", "--data", str(net.root / "desk")).returncode == 0
    _wait(net, "phone", "ended", STOP_RINGING_BOUND_S)
    stopped_s = time.monotonic() - answered  # (includes starting the `answer` command)
    print(f"the phone stopped ringing {stopped_s * 1000:.0f} ms after the desk answered")
    assert _call_state(net, "phone")["end_reason"] == "answered on another device"
    assert _call_state(net, "phone")["answered_by"] == desk
    # answering on the phone now is refused, clearly
    late = net.cli("answer", "--data", str(net.root / "phone"))
    assert late.returncode == 1
    assert "answered on another device" in late.stderr
    assert _call_state(net, "alice")["answered_by"] == desk
    report = _report(call)
    assert report["connected"] is True, report
    assert (report["answered_by"], report["peer_device"]) == (desk, desk)
    assert report["loss"] == 0.0
    assert int(report["bytes_received"]) > 0
    _wait(net, "desk", "ended")
    heard = wav.read_wav(net.root / "desk.wav")
    assert len(heard) > 1.5 * 16000, len(heard)  # the desk got ~2 s of alice's speech
    assert abs(heard.astype(float)).mean() > 100
    with pytest.raises(wav.WavFormatError, match="no audio samples"):
        wav.read_wav(net.root / "phone.wav")  # the phone never played any


def test_answers_on_both_devices_at_once_bind_one(network: Network) -> None:
    net = network
    devices = {net.status(who)["device"]: who for who in ("phone", "desk")}
    call = _both_ringing(net)
    answers = [subprocess.Popen([sys.executable, "-m", "punchline", "answer", "--data",
                                 str(net.root / who)], stderr=subprocess.PIPE, text=True)
               for who in ("phone", "desk")]  # fmt: skip
    for answer in answers:
        _, err = answer.communicate(timeout=30)
        assert "Traceback" not in err
    winner = _call_state(net, "alice").get("answered_by")
    assert winner in devices, net.status("alice")
    loser = next(who for device, who in devices.items() if device != winner)
    _wait(net, loser, "ended", STOP_RINGING_BOUND_S)
    assert _call_state(net, loser)["end_reason"] == "answered on another device"
    assert _call_state(net, devices[winner])["state"] == "active"
    report = _report(call)
    assert report["connected"] is True, report
    assert report["answered_by"] == winner
