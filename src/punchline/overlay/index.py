"""The small interfaces the rest of punchline sees of the global index.

`Overlay` is a generic store of signed JSON documents under text keys ("presence/alice",
"contacts/alice", "dir/al"): put, get, listen. `PresenceIndex` adds the two presence calls the
call code uses, as thin wrappers over the same store. Documents are stored and returned as the
signed documents their authors made; verification is always the reader's job
(`wire.presence.verify_untrusted`, `identity.signed.open_document_untrusted`), so no store has to
be trusted.

Readers must expect several versions of one value under a key: OpenDHT keeps an older copy on
some nodes and a newer one on others until the old one expires (10 minutes), so every reader
keeps the highest sequence number per author/device and never assumes "last put wins".

`MemoryIndex` is the in-process implementation: one shared object stands for "the network" in
unit tests; `overlay.dht.DhtIndex` is the real one on OpenDHT.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from typing import Any, Protocol

MAX_DOCUMENT_BYTES = 60_000  # OpenDHT silently drops values over ~65,530 bytes
PRESENCE_PREFIX = "presence/"


class Listening(Protocol):
    def cancel(self) -> None: ...


class Overlay(Protocol):
    async def put(self, key: str, value_id: int, document: dict[str, Any]) -> None:
        """Store a signed JSON document under `key`; `value_id` tells several values under one
        key apart (e.g. one per device). ValueError if over MAX_DOCUMENT_BYTES of JSON."""
        ...

    async def get(self, key: str) -> list[dict[str, Any]]:
        """All documents found under `key`, unverified (possibly several versions of one)."""
        ...

    def listen(self, key: str, on_value: Callable[[dict[str, Any]], None]) -> Listening:
        """Call `on_value` on the event loop for every new or changed document under `key`
        until cancelled. Must be called from the event loop's thread."""
        ...

    async def close(self) -> None: ...


class PresenceIndex(Overlay, Protocol):
    async def publish(self, user: str, device: str, record: dict[str, Any]) -> None: ...

    async def lookup(self, user: str) -> list[dict[str, Any]]: ...


def presence_key(user: str) -> str:
    return PRESENCE_PREFIX + user


def device_value_id(device: str) -> int:
    """A stable 63-bit value id per device (OpenDHT ids are unsigned 64-bit; 0 means "any")."""
    return (int.from_bytes(hashlib.sha256(device.encode()).digest()[:8], "big") >> 1) | 1


def encode_document(document: dict[str, Any]) -> bytes:
    data = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"document of {len(data)} bytes is over the {MAX_DOCUMENT_BYTES} limit")
    return data


class _MemoryListening:
    def __init__(self, index: MemoryIndex, key: str, on_value: Callable[[dict[str, Any]], None]):
        self._index, self.key, self.on_value = index, key, on_value

    def cancel(self) -> None:
        listeners = self._index._listeners.get(self.key, [])
        if self in listeners:
            listeners.remove(self)


class MemoryIndex:
    """An in-process overlay: latest document per (key, value id), listeners called soon on
    the running loop (never inside `put`, as with OpenDHT's threads)."""

    def __init__(self) -> None:
        self._documents: dict[str, dict[int, dict[str, Any]]] = {}
        self._listeners: dict[str, list[_MemoryListening]] = {}
        self.puts = 0

    async def put(self, key: str, value_id: int, document: dict[str, Any]) -> None:
        encode_document(document)
        self.puts += 1
        values = self._documents.setdefault(key, {})
        if values.get(value_id) == document:
            return  # a refresh: listeners only hear about new or changed documents
        values[value_id] = document
        loop = asyncio.get_running_loop()
        for listener in list(self._listeners.get(key, [])):
            loop.call_soon(self._notify, listener, document)

    def _notify(self, listener: _MemoryListening, document: dict[str, Any]) -> None:
        if listener in self._listeners.get(listener.key, []):
            listener.on_value(document)

    async def get(self, key: str) -> list[dict[str, Any]]:
        return list(self._documents.get(key, {}).values())

    def listen(self, key: str, on_value: Callable[[dict[str, Any]], None]) -> Listening:
        listening = _MemoryListening(self, key, on_value)
        self._listeners.setdefault(key, []).append(listening)
        return listening

    def drop(self, key: str) -> None:
        """Forget every value under `key`, as OpenDHT does when they expire or their nodes die."""
        self._documents.pop(key, None)

    async def publish(self, user: str, device: str, record: dict[str, Any]) -> None:
        await self.put(presence_key(user), device_value_id(device), record)

    async def lookup(self, user: str) -> list[dict[str, Any]]:
        return await self.get(presence_key(user))

    async def close(self) -> None:
        self._documents.clear()
        self._listeners.clear()
