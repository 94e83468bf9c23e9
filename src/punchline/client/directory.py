"""The daemon's half of the directory: opting in or out, and searching.

Opting in (`punchline directory --list "Alice Liddell"`) is remembered in the data dir; while
online the daemon hands its signed entry to its supernode, which keeps it alive in the DHT
(custody) until it expires. Entries are re-signed well before they expire and whenever the
certificate is renewed (an entry is only as valid as the certificate in it), and handed over
again to every supernode the daemon attaches to, so a dead supernode's custody is repaired.
Opting out sends an unlisted entry for each name listed lately, which hides the copies the
DHT still holds; it is handed over until those copies would have expired anyway.

Searches go to the supernode, which reads the DHT; the daemon verifies every entry it gets
back against the CA itself and keeps only those that match the query.

`DirectoryClient` holds the state and the pending searches; the daemon gives it a way to send
to the current supernode and feeds it the supernode's directory messages.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import structlog

from punchline.errors import LocalError
from punchline.session.outbound import Identity
from punchline.util.files import atomic_write
from punchline.util.jsontext import loads_untrusted
from punchline.wire import directory

log = structlog.get_logger(component="directory")

STATE_FILE = "directory.json"
SEARCH_TIMEOUT = 8.0
ACK_TIMEOUT = 5.0
MAX_UNLISTED = 8  # old names whose unlisting is still handed over

Send = Callable[[dict[str, Any]], bool]  # False when there is no supernode to send to


@dataclass
class _Search:
    query: str
    done: asyncio.Future[None]
    n: int | None = None
    more: bool = False
    documents: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str = ""


class DirectoryClient:
    MESSAGES: ClassVar[frozenset[str]] = frozenset({"directory_ok", "search_result",
                                                    "search_error"})  # fmt: skip

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / STATE_FILE
        self.listed: str | None = None
        # names listed before, with the time until which an unlisting must hide them
        self.unlisted: dict[str, float] = {}
        self._load()
        self._signed: list[dict[str, Any]] = []
        self._signed_with: bytes | None = None  # certificate the entries were signed with
        self._resign_at = 0.0
        self._sent_to: str | None = None
        self._seq = 0
        self._ids = itertools.count(1)
        self._searches: dict[int, _Search] = {}
        self._acks: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.counters = {"forged_results": 0}

    # ----------------------------------------------------------------- state

    def _load(self) -> None:
        try:
            state = loads_untrusted(self.path.read_bytes())
        except (OSError, ValueError):
            return
        if not isinstance(state, dict):
            return
        listed = state.get("listed")
        self.listed = listed if isinstance(listed, str) else None
        unlisted = state.get("unlisted")
        if isinstance(unlisted, dict):
            self.unlisted = {
                name: float(until)
                for name, until in unlisted.items()
                if isinstance(name, str) and isinstance(until, int | float)
            }

    def _save(self) -> None:
        state = {"listed": self.listed, "unlisted": self.unlisted}
        atomic_write(self.path, json.dumps(state, indent=1).encode(), 0o600)

    def list_as(self, display: str, now: float) -> str:
        shown = directory.check_display(display)
        if self.listed is not None and self.listed != shown:
            self._forget(self.listed, now)
        self.unlisted.pop(shown, None)
        self.listed = shown
        self._save()
        self._resign_at = 0.0
        return shown

    def unlist(self, now: float) -> str | None:
        was = self.listed
        if was is not None:
            self._forget(was, now)
        self.listed = None
        self._save()
        self._resign_at = 0.0
        return was

    def _forget(self, display: str, now: float) -> None:
        self.unlisted[display] = now + directory.ENTRY_LIFETIME
        if len(self.unlisted) > MAX_UNLISTED:
            oldest = min(self.unlisted, key=lambda name: self.unlisted[name])
            del self.unlisted[oldest]

    # ----------------------------------------------------------------- entries to hand over

    def outgoing(
        self, identity: Identity, user: str, node_id: str, now: float
    ) -> list[dict[str, Any]]:
        """Messages for the supernode `node_id`: the entries, when they are new or re-signed,
        or when this is another supernode than the one that last took them."""
        from cryptography.hazmat.primitives.serialization import Encoding

        cert = identity.certificate.public_bytes(Encoding.DER)
        self.unlisted = {name: until for name, until in self.unlisted.items() if until > now}
        if cert != self._signed_with or now >= self._resign_at:
            self._sign(identity, user, now)
            self._signed_with = cert
            self._sent_to = None
        if node_id == self._sent_to:
            return []
        self._sent_to = node_id
        return [{"t": "directory", "entry": document} for document in self._signed]

    def _sign(self, identity: Identity, user: str, now: float) -> None:
        expires = min(now + directory.ENTRY_LIFETIME,
                      identity.certificate.not_valid_after_utc.timestamp())  # fmt: skip
        self._seq = max(self._seq + 1, int(now * 1000))
        signed = []
        # unlistings first: where an old and the new name share a key, the new entry is
        # handed over last and has the higher sequence number, so it wins
        for name in sorted(self.unlisted):
            signed.append(directory.make(identity.key, identity.certificate, user, name,
                                         self._seq, expires, listed=False))  # fmt: skip
            self._seq += 1
        if self.listed is not None:
            signed.append(directory.make(identity.key, identity.certificate, user, self.listed,
                                         self._seq, expires))  # fmt: skip
        self._signed = signed
        self._resign_at = now + directory.ENTRY_LIFETIME / 2

    @property
    def seq(self) -> int:
        return self._seq

    # ----------------------------------------------------------------- from the supernode

    def received(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "directory_ok":
            for future in list(self._acks.values()):
                if not future.done():
                    future.set_result(message)
            return
        request_id = message.get("id")
        search = self._searches.get(request_id) if isinstance(request_id, int) else None
        if search is None or search.done.done():
            return
        if kind == "search_error":
            search.error = str(message.get("message", "search refused"))[:200]
            search.done.set_result(None)
            return
        n, i = message.get("n"), message.get("i")
        if not isinstance(n, int) or not 0 <= n <= directory.MAX_RESULTS:
            return
        search.n, search.more = n, message.get("more") is True
        document = message.get("entry")
        if isinstance(i, int) and 0 <= i < n and isinstance(document, dict):
            search.documents[i] = document
        if len(search.documents) >= n:
            search.done.set_result(None)

    # ----------------------------------------------------------------- control requests

    def expect_ack(self) -> asyncio.Future[dict[str, Any]]:
        """A future for the supernode's word that it took the entries about to be sent."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[next(self._ids)] = future
        return future

    async def acked(
        self, future: asyncio.Future[dict[str, Any]], timeout: float = ACK_TIMEOUT
    ) -> bool:
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._acks = {r: f for r, f in self._acks.items() if f is not future}

    async def search(
        self, query: str, send: Send, identity: Identity, now: Callable[[], float]
    ) -> dict[str, Any]:
        wanted, _key = directory.query_key(query)
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        search = _Search(wanted, loop.create_future())
        self._searches[request_id] = search
        try:
            if not send({"t": "search", "id": request_id, "query": query}):
                raise LocalError("not connected to any supernode yet; try again in a moment")
            try:
                await asyncio.wait_for(asyncio.shield(search.done), SEARCH_TIMEOUT)
            except TimeoutError as exc:
                raise LocalError("the supernode did not answer the search in time") from exc
        finally:
            self._searches.pop(request_id, None)
        if search.error:
            raise LocalError(search.error)
        found, forged = directory.select(list(search.documents.values()), identity.ca, now(),
                                         wanted)  # fmt: skip
        if forged:
            self.counters["forged_results"] += forged
            log.warning("forged directory entries in search results", count=forged)
        return {"query": query, "results": [entry.as_json() for entry, _doc in found],
                "more": search.more}  # fmt: skip

    def status(self) -> dict[str, Any]:
        return {"listed": self.listed is not None, "display": self.listed}
