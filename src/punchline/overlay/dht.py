"""The presence index on OpenDHT (Debian's python3-opendht), run by every supernode.

Each supernode runs one DHT node in punchline's private network (its own network id), so
clients never join the DHT. The binding's blocking `get`/`put` run in worker threads so the
event loop never waits on them; OpenDHT's own threads never call back into Python here.

Traps handled (see shared/OPENDHT-NOTES.md): values expire after 10 minutes, so owners re-put
(clients republish through their supernode every minute); re-putting the same value id adds a
copy rather than replacing it, so readers keep the highest sequence number per device; the
per-address rate limit is lifted on loopback, where every node shares one address.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from punchline import environment
from punchline.util.jsontext import loads_untrusted

log = structlog.get_logger(component="dht")

NETWORK_ID = 0x70756E63  # "punc": our own DHT network, apart from Jami's
MAX_VALUE_BYTES = 60_000


@dataclass(frozen=True)
class DhtConfig:
    bind_host: str = "0.0.0.0"  # noqa: S104 - the DHT node is a public service
    port: int = 0
    bootstrap: Sequence[tuple[str, int]] = field(default_factory=tuple)
    network_id: int = NETWORK_ID
    # Lift OpenDHT's 1,024 requests/s per source address limit (for loopback tests).
    unlimited_rate: bool = False
    # A lookup ends this long after the last new value, and at the latest after the timeout.
    lookup_settle: float = 0.25
    lookup_timeout: float = 3.0


def _key(user: str) -> Any:
    import opendht

    return opendht.InfoHash.get("punchline/presence/" + user)


def _value_id(device: str) -> int:
    return int.from_bytes(hashlib.sha256(device.encode()).digest()[:8], "big") >> 1


class DhtIndex:
    def __init__(self, config: DhtConfig) -> None:
        environment.require_opendht()
        import opendht

        self._opendht = opendht
        self.config = config
        self._runner = opendht.DhtRunner()
        dht_config = opendht.DhtConfig()
        dht_config.setNetwork(config.network_id)
        if config.unlimited_rate:
            dht_config.setRateLimit(-1, -1)
        ipv4 = config.bind_host if ":" not in config.bind_host else ""
        ipv6 = config.bind_host if ":" in config.bind_host else ""
        self._runner.run(port=config.port, ipv4=ipv4, ipv6=ipv6, config=dht_config)
        self.port = int(self._runner.getBound().getPort())
        for host, port in config.bootstrap:
            self.bootstrap(host, port)
        log.info("dht node running", port=self.port, bootstrap=len(config.bootstrap))

    def bootstrap(self, host: str, port: int) -> None:
        if port == self.port and host in ("127.0.0.1", self.config.bind_host):
            return
        self._runner.bootstrap(host, str(port))

    async def publish(self, user: str, device: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, separators=(",", ":")).encode()
        if len(data) > MAX_VALUE_BYTES:
            raise ValueError("presence record too large for the DHT")
        value = self._opendht.Value(data)
        value.id = _value_id(device)
        await asyncio.to_thread(self._runner.put, _key(user), value)

    async def lookup(self, user: str) -> list[dict[str, Any]]:
        """Values found for `user`, without waiting on every slow or dead DHT node.

        OpenDHT's blocking get only returns once every search path has answered or timed out,
        which takes seconds when nodes have died. Here values stream in through callbacks (run
        on OpenDHT's thread and handed to the event loop), and the lookup ends when the search
        is done, or `settle` seconds after the last new value, or at `timeout`.
        """
        loop = asyncio.get_running_loop()
        found: dict[bytes, dict[str, Any]] = {}
        changed = asyncio.Event()
        finished = asyncio.Event()

        def on_value(value: Any) -> bool:
            data = bytes(value.data)
            loop.call_soon_threadsafe(self._collect, found, data, changed)
            return True

        def on_done(_ok: bool, _nodes: Any) -> None:
            loop.call_soon_threadsafe(finished.set)

        self._runner.get(_key(user), on_value, on_done)
        deadline = loop.time() + self.config.lookup_timeout
        while not finished.is_set() and loop.time() < deadline:
            changed.clear()
            wait = self.config.lookup_timeout if not found else self.config.lookup_settle
            wait = min(wait, deadline - loop.time())
            waiters = [
                asyncio.ensure_future(changed.wait()),
                asyncio.ensure_future(finished.wait()),
            ]
            done, pending = await asyncio.wait(waiters, timeout=max(0.0, wait),
                                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            for task in pending:
                task.cancel()
            if not done:
                break  # settled: nothing new for a while
        return list(found.values())

    @staticmethod
    def _collect(found: dict[bytes, dict[str, Any]], data: bytes, changed: asyncio.Event) -> None:
        if data in found:
            return
        try:
            record = loads_untrusted(data)
        except ValueError:
            return
        if isinstance(record, dict):
            found[data] = record
            changed.set()

    async def close(self) -> None:
        done = threading.Event()
        self._runner.shutdown(done.set)
        await asyncio.to_thread(done.wait, 5.0)
