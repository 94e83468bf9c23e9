"""What a user sees when a call cannot happen, and what a supernode does with garbage."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from punchline.lab.loopback import Network


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    net = Network(tmp_path_factory.mktemp("net"))
    try:
        net.start_auth()
        net.start_supernode()
        net.signup("alice")
        net.signup("bob")
        net.signup("carol")  # has an account but never comes online
        net.start_daemon("alice")
        net.start_daemon("bob", "--auto-answer")
        yield net
    finally:
        net.stop()


def _call(net: Network, *args: str) -> tuple[int, str, str]:
    result = net.cli("call", *args, "--data", str(net.root / "alice"), "--json")
    return result.returncode, result.stdout, result.stderr


def test_calling_oneself_is_refused(network: Network) -> None:
    code, _out, err = _call(network, "alice")
    assert code == 1
    assert "you cannot call yourself" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("who", ["carol", "nosuchuser"])
def test_offline_or_unknown_users_fail_quickly(network: Network, who: str) -> None:
    started = time.monotonic()
    code, out, err = _call(network, who)
    elapsed = time.monotonic() - started
    assert code == 1, err
    report = json.loads(out)
    assert report["connected"] is False
    assert "offline or unknown" in report["end_reason"]
    assert elapsed < 8.0  # the supernode says so; no waiting for the 10 s invite timeout
    assert "Traceback" not in err


def test_a_wav_in_the_wrong_format_is_a_clear_error(network: Network, tmp_path: Path) -> None:
    fake = tmp_path / "notes.wav"
    fake.write_bytes(b"ID3\x03\x00 this is an mp3 in disguise" * 10)
    code, _out, err = _call(network, "bob", "--play", str(fake))
    assert code == 1
    assert "not a WAV file" in err
    assert "Traceback" not in err


def test_commands_need_a_running_daemon(network: Network, tmp_path: Path) -> None:
    result = network.cli("status", "--data", str(network.root / "carol"), "--json")
    assert result.returncode == 1
    assert "no punchline daemon is running" in result.stderr
    assert "punchline up" in result.stderr


def test_supernode_counts_garbage_and_keeps_serving(network: Network) -> None:
    node = network.supernodes[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for payload in (b"", b"\x00" * 40, b"P{not json", b"R" + b"\xff" * 60, b"\x80" * 12,
                        bytes(range(256)) * 4):  # fmt: skip
            sock.sendto(payload, ("127.0.0.1", node.udp_port))
    with socket.create_connection(("127.0.0.1", node.udp_port), timeout=5) as tcp:
        tcp.sendall(b"\x00\x05hello\xff\xffgarbage")
    time.sleep(0.5)
    assert node.process.poll() is None, node.tail()
    code, out, err = _call(network, "bob", "--duration", "1")
    assert code == 0, err
    assert json.loads(out)["connected"] is True
    assert "Traceback" not in node.tail(200)
