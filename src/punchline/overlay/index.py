"""The small interface the call code sees: publish a signed record, look a user up.

Records are stored and returned as the signed documents their users made; verification is the
reader's job (`wire.presence.verify_untrusted`), so no index implementation has to be trusted.
`MemoryIndex` serves unit tests and a single supernode; `overlay.dht.DhtIndex` is the real,
shared one on OpenDHT.
"""

from __future__ import annotations

from typing import Any, Protocol


class PresenceIndex(Protocol):
    async def publish(self, user: str, device: str, record: dict[str, Any]) -> None: ...

    async def lookup(self, user: str) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class MemoryIndex:
    def __init__(self) -> None:
        self._records: dict[str, dict[str, dict[str, Any]]] = {}

    async def publish(self, user: str, device: str, record: dict[str, Any]) -> None:
        self._records.setdefault(user, {})[device] = record

    async def lookup(self, user: str) -> list[dict[str, Any]]:
        return list(self._records.get(user, {}).values())

    async def close(self) -> None:
        self._records.clear()
