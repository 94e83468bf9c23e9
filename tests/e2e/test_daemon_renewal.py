"""A daemon that runs longer than its certificate lives renews it and stays reachable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from punchline.client.store import IdentityStore
from punchline.lab.loopback import Network, call_with_sample


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    net = Network(tmp_path)
    try:
        net.start_auth("--user-cert-lifetime", "15s")
        net.start_supernode()
        net.signup("alice")
        net.signup("bob")
        yield net
    finally:
        net.stop()


def test_daemon_renews_and_stays_callable_past_the_first_expiry(network: Network) -> None:
    first = IdentityStore(network.root / "bob").certificate()
    network.start_daemon("bob", "--auto-answer", "--renewal-check", "1")
    network.start_daemon("alice", "--renewal-check", "1")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if IdentityStore(network.root / "bob").certificate().serial_number != first.serial_number:
            break
        time.sleep(0.2)
    renewed = IdentityStore(network.root / "bob").certificate()
    assert renewed.serial_number != first.serial_number, network.logs()
    time.sleep(max(0.0, first.not_valid_after_utc.timestamp() - time.time() + 1))
    assert time.time() > first.not_valid_after_utc.timestamp()  # the first one is dead now
    report = call_with_sample(network, "alice", "bob", network.root / "bob.wav", "--duration", "1")
    assert report["connected"] is True, network.logs()
