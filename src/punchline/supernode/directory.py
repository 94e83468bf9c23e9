"""The supernode's half of the directory: takes users' signed entries, answers searches.

A client that opts in sends its signed entry (`{"t": "directory", "entry": ...}`); this node
verifies it (the user's own, against the CA) and hands it to custody under every prefix key
(`wire.directory.keys_for`), which puts it and keeps it alive until the entry expires. Leaving
is the same with an unlisted entry, which hides the older copies DHT nodes still hold.

A search (`{"t": "search", "id", "query"}`) reads the one key of the query, keeps the newest
verified entry per user that is listed and matches, and answers with at most
`MAX_RESULTS` signed entries, one per message (`{"t": "search_result", "id", "i", "n",
"entry", "more"}`), so the client verifies each one itself; `n` is 0 when nothing matched.
Forged entries are dropped and counted.

Sans-I/O like the rest of the supernode: `message()` in, `actions()` (Keep, Get) for the
adapter, `found()` with what a Get read, `pushes()` out. `DirectoryRunner` is the adapter.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog
from cryptography import x509

from punchline.overlay.index import Overlay
from punchline.util.tasks import Tasks
from punchline.wire import directory

log = structlog.get_logger(component="supernode")

MAX_PENDING = 4  # searches one session may have under way at once
MAX_ENTRIES = 200  # entries one session may hand over (a daemon sends one per attach or hour)


@dataclass(frozen=True)
class Keep:
    key: str
    value_id: int
    document: dict[str, Any]
    until: float


@dataclass(frozen=True)
class Get:
    ref: int
    key: str


DirectoryAction = Keep | Get


@dataclass(frozen=True)
class _Search:
    session: bytes
    request_id: object
    query: str  # normalized


class Directory:
    MESSAGES: ClassVar[frozenset[str]] = frozenset({"directory", "search"})

    def __init__(self, ca: x509.Certificate) -> None:
        self.ca = ca
        self._refs = itertools.count(1)
        self._pending: dict[int, _Search] = {}
        self._entries: dict[bytes, int] = {}
        self._out: list[tuple[bytes, dict[str, Any]]] = []
        self._actions: list[DirectoryAction] = []
        self.counters: dict[str, int] = {
            "listed": 0, "unlisted": 0, "searches": 0, "results": 0, "forged_entries": 0,
            "bad_entries": 0, "refused": 0,
        }  # fmt: skip

    # ----------------------------------------------------------------- from clients

    def message(self, session: bytes, subject: str, message: dict[str, Any], now: float) -> None:
        if message.get("t") == "directory":
            self._entry(session, subject, message.get("entry"), now)
        else:
            self._search(session, message, now)

    def _entry(self, session: bytes, subject: str, document: object, now: float) -> None:
        try:
            entry = directory.verify_untrusted(document, self.ca, now)
            if entry.user != subject:
                raise directory.ForgedEntry(f"{subject} sent the entry of {entry.user}")
        except directory.ForgedEntry as exc:
            self._refuse(session, "forged_entries", str(exc))
            return
        except directory.DirectoryError as exc:
            self._refuse(session, "bad_entries", str(exc))
            return
        self._entries[session] = self._entries.get(session, 0) + 1
        if self._entries[session] > MAX_ENTRIES:
            self._refuse(session, "refused", "too many directory entries from this session")
            return
        assert isinstance(document, dict)
        keys = directory.keys_for(entry.user, entry.display)
        value_id = directory.value_id(entry.user)
        self._actions += [Keep(key, value_id, document, entry.expires) for key in keys]
        self.counters["listed" if entry.listed else "unlisted"] += 1
        log.info("directory entry", user=entry.user, listed=entry.listed, keys=len(keys))
        self._out.append((session, {"t": "directory_ok", "listed": entry.listed,
                                    "seq": entry.seq, "keys": len(keys)}))  # fmt: skip

    def _search(self, session: bytes, message: dict[str, Any], now: float) -> None:
        request_id = message.get("id")
        query = message.get("query")
        try:
            if not isinstance(query, str):
                raise directory.InvalidDisplayName("a search needs a query")
            wanted, key = directory.query_key(query)
        except directory.InvalidDisplayName as exc:
            self.counters["refused"] += 1
            self._out.append((session, {"t": "search_error", "id": request_id,
                                        "message": str(exc)}))  # fmt: skip
            return
        if sum(1 for s in self._pending.values() if s.session == session) >= MAX_PENDING:
            self.counters["refused"] += 1
            self._out.append((session, {"t": "search_error", "id": request_id,
                                        "message": "too many searches at once"}))  # fmt: skip
            return
        ref = next(self._refs)
        self._pending[ref] = _Search(session, request_id, wanted)
        self.counters["searches"] += 1
        self._actions.append(Get(ref, key))

    def _refuse(self, session: bytes, counter: str, why: str) -> None:
        self.counters[counter] += 1
        log.info("directory entry refused", reason=why)
        self._out.append((session, {"t": "error", "message": why}))

    def drop(self, session: bytes) -> None:
        self._entries.pop(session, None)
        self._pending = {r: s for r, s in self._pending.items() if s.session != session}

    # ----------------------------------------------------------------- from the overlay

    def found(self, ref: int, documents: list[dict[str, Any]], now: float) -> None:
        search = self._pending.pop(ref, None)
        if search is None:
            return  # the session went away meanwhile
        entries, forged = directory.select(documents, self.ca, now, search.query)
        self.counters["forged_entries"] += forged
        if forged:
            log.warning("forged directory entries dropped", count=forged)
        shown = entries[: directory.MAX_RESULTS]
        more = len(entries) > len(shown)
        self.counters["results"] += len(shown)
        base = {"t": "search_result", "id": search.request_id, "n": len(shown), "more": more}
        if not shown:
            self._out.append((search.session, base))
        for i, (_entry, document) in enumerate(shown):
            self._out.append((search.session, {**base, "i": i, "entry": document}))

    # ----------------------------------------------------------------- output

    def pushes(self) -> list[tuple[bytes, dict[str, Any]]]:
        out, self._out = self._out, []
        return out

    def actions(self) -> list[DirectoryAction]:
        out, self._actions = self._actions, []
        return out


class DirectoryRunner:
    """Runs a `Directory`'s actions: entries to custody (or straight to the overlay), reads."""

    def __init__(
        self,
        index: Overlay,
        core: Directory,
        poke: Callable[[], None],
        keep: Callable[[str, int, dict[str, Any], float], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index, self.core, self.poke, self.keep = index, core, poke, keep
        self._clock = clock
        self._tasks = Tasks()

    def run(self, actions: Iterable[DirectoryAction]) -> None:
        for action in actions:
            if isinstance(action, Get):
                self._tasks.spawn(self._get(action))
            elif self.keep is not None:
                self.keep(action.key, action.value_id, action.document, action.until)
            else:
                self._tasks.spawn(self._put(action))

    async def _get(self, action: Get) -> None:
        try:
            documents = await self.index.get(action.key)
        except Exception as exc:  # the overlay failing must not kill the node
            log.warning("directory read failed", key=action.key, error=str(exc))
            documents = []
        self.core.found(action.ref, documents, self._clock())
        self.poke()

    async def _put(self, action: Keep) -> None:
        try:
            await self.index.put(action.key, action.value_id, action.document)
        except Exception as exc:
            log.warning("directory put failed", key=action.key, error=str(exc))

    def close(self) -> None:
        self._tasks.cancel()
