"""A call's own addresses change mid-call: new ones alone are trickled, lost ones restart.

A reflexive address learned after the call started (or a port the router mapped late) must
reach the peer without disturbing the pairs that work; an address that went away (NAT
rebinding, another network) means every check so far is stale, so the call restarts and
offers everything it has now, flagged `restart`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from punchline.client.call_paths import CallPaths, PathsConfig
from punchline.connect.agent import AgentConfig
from punchline.connect.candidates import Candidate


async def _paths_on_a_socket() -> tuple[CallPaths, Candidate, list[tuple[list[Any], bool]]]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    host = Candidate.make("host", transport.get_extra_info("sockname")[:2])
    sent: list[tuple[list[Any], bool]] = []
    paths = CallPaths(
        True, time.time(), transport, [host], lambda items, restart: sent.append((items, restart)),
        lambda _data, _at: True, PathsConfig(AgentConfig()),
    )  # fmt: skip
    return paths, host, sent


def test_a_late_address_is_only_added_and_trickled() -> None:
    async def scenario() -> None:
        paths, host, sent = await _paths_on_a_socket()
        try:
            late = Candidate.make("srflx", ("198.51.100.7", 40_000))
            assert paths.network_changed([host, late], time.time()) is False
            assert sent == [([late.as_json()], False)]
            assert paths.restarts == 0
            assert late in paths.local
            assert host in paths.local
            # the same addresses again: nothing to tell
            assert paths.network_changed([host, late], time.time()) is False
            assert len(sent) == 1
        finally:
            await paths.close()

    asyncio.run(scenario())


def test_a_lost_address_restarts_and_offers_everything_now() -> None:
    async def scenario() -> None:
        paths, host, sent = await _paths_on_a_socket()
        try:
            elsewhere = Candidate.make("srflx", ("203.0.113.9", 50_000))
            assert paths.network_changed([elsewhere], time.time()) is True
            assert paths.restarts == 1
            assert sent[-1] == ([elsewhere.as_json()], True)
            assert host not in paths.local
        finally:
            await paths.close()

    asyncio.run(scenario())
