"""Live presence and contact documents for attached clients: the supernode's half of contacts.

A client names the users it follows (`{"t": "watch", "users": [...]}`); the supernode keeps one
overlay listen per watched key, shared by every local client that follows it, and pushes each
new verified document to them: `{"t": "presence", "user", "record"}` for presence records,
`{"t": "doc", "key", "document"}` for the client's own "contacts/<user>" (its other devices'
lists) and "requests/<user>" (requests and acceptances for it), which every watch includes.
Once the first overlay read of a key is done the client hears `{"t": "synced", "key"}`, so it
knows whether a list exists before writing one. A client may also put its own documents
(`{"t": "put", "key", "document"}`): its contact list under its own name, and its requests
under their recipient's. Everything is verified before it is stored or pushed (a lower
sequence number never replaces a higher one); what fails is dropped and counted.

Sans-I/O like the rest of the supernode: `actions()` says what to do to the overlay (Listen,
Unlisten, Put), the adapter feeds back `value()` for each document heard and `ready()` when a
key's first read ended, and `pushes()` says what to send to which session. `WatchRunner` is
the thin asyncio adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from cryptography import x509

from punchline.overlay.index import Listening, Overlay, presence_key
from punchline.util.tasks import Tasks
from punchline.wire import contacts, presence

log = structlog.get_logger(component="supernode")

MESSAGES = frozenset({"watch", "put", "part"})
MAX_WATCHED = 2_000  # users one session may follow
MAX_PUTS = 1_000  # documents one session may put (lists are rewritten on every change)
# A contact list is kept alive this long after its last put (its devices re-put on attach).
LIST_CUSTODY = 30 * 86_400.0


@dataclass(frozen=True)
class Listen:
    key: str


@dataclass(frozen=True)
class Unlisten:
    key: str


@dataclass(frozen=True)
class Put:
    key: str
    value_id: int
    document: dict[str, Any]
    until: float


WatchAction = Listen | Unlisten | Put


@dataclass
class _Watched:
    sessions: set[bytes] = field(default_factory=set)
    # freshest verified document per author slot (device, or sender of a request)
    values: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    ready: bool = False
    waiting: set[bytes] = field(default_factory=set)  # sessions to tell when ready


class Watch:
    MESSAGES = MESSAGES  # from clients, for `message`

    def __init__(self, ca: x509.Certificate) -> None:
        self.ca = ca
        self._keys: dict[str, _Watched] = {}
        self._by_session: dict[bytes, set[str]] = {}
        self._joiners: dict[bytes, contacts.Joiner] = {}
        self._puts: dict[bytes, int] = {}
        self._out: list[tuple[bytes, dict[str, Any]]] = []
        self._actions: list[WatchAction] = []
        self.counters: dict[str, int] = {
            "pushes": 0, "puts": 0, "forbidden_puts": 0, "forged_documents": 0,
            "bad_documents": 0, "forged_presence": 0, "expired_presence": 0, "stale": 0,
            "malformed": 0,
        }  # fmt: skip

    @property
    def watched_keys(self) -> int:
        return len(self._keys)

    # ----------------------------------------------------------------- from clients

    def message(self, session: bytes, subject: str, message: dict[str, Any], now: float) -> None:
        kind = message.get("t")
        if kind == "part":
            joiner = self._joiners.setdefault(session, contacts.Joiner())
            try:
                whole = joiner.feed(message, now)
            except ValueError:
                self.counters["malformed"] += 1
                return
            if whole is not None and whole.get("t") in MESSAGES - {"part"}:
                self.message(session, subject, whole, now)
            elif whole is not None:
                self.counters["malformed"] += 1
        elif kind == "watch":
            self._watch(session, subject, message.get("users"), now)
        elif kind == "put":
            self._put(session, subject, message, now)

    def _watch(self, session: bytes, subject: str, users: object, now: float) -> None:
        if not isinstance(users, list) or len(users) > MAX_WATCHED:
            self.counters["malformed"] += 1
            return
        wanted = {contacts.contacts_key(subject), contacts.requests_key(subject)}
        wanted |= {presence_key(u) for u in users if contacts.valid_name(u)}
        old = self._by_session.get(session, set())
        for key in old - wanted:
            self._leave(session, key)
        self._by_session[session] = wanted
        for key in sorted(wanted - old):
            self._join(session, key, now)

    def _join(self, session: bytes, key: str, now: float) -> None:
        watched = self._keys.get(key)
        if watched is None:
            watched = self._keys[key] = _Watched()
            self._actions.append(Listen(key))
        watched.sessions.add(session)
        for slot, (_order, document) in list(watched.values.items()):
            if self._check(key, document, now) is None:
                del watched.values[slot]  # expired while cached
            else:
                self._push(session, _message_for(key, document))
        if key.startswith("presence/"):
            return  # presence needs no "synced": nothing is written back from it
        if watched.ready:
            self._push(session, {"t": "synced", "key": key})
        else:
            watched.waiting.add(session)

    def _leave(self, session: bytes, key: str) -> None:
        watched = self._keys.get(key)
        if watched is None:
            return
        watched.sessions.discard(session)
        watched.waiting.discard(session)
        if not watched.sessions:
            del self._keys[key]
            self._actions.append(Unlisten(key))

    def drop(self, session: bytes) -> None:
        """The session closed: stop following what only it followed."""
        for key in self._by_session.pop(session, set()):
            self._leave(session, key)
        self._joiners.pop(session, None)
        self._puts.pop(session, None)

    def _put(self, session: bytes, subject: str, message: dict[str, Any], now: float) -> None:
        key, document = message.get("key"), message.get("document")
        if not isinstance(key, str) or not isinstance(document, dict):
            self.counters["malformed"] += 1
            return
        prefix, _, name = key.partition("/")
        try:
            if prefix + "/" == contacts.CONTACTS_PREFIX and name == subject:
                listed = contacts.verify_list(document, self.ca, now, subject)
                value_id, until = contacts.value_id(listed.device), now + LIST_CUSTODY
            elif prefix + "/" == contacts.REQUESTS_PREFIX and contacts.valid_name(name):
                request = contacts.verify_request(document, self.ca, now, name)
                if request.sender != subject:
                    raise contacts.ForgedDocument(f"{subject} sent a request of {request.sender}")
                value_id, until = contacts.request_value_id(subject), request.expires
            else:
                self._refuse(session, "forbidden_puts", f"{subject} may not write {key!r}")
                return
        except contacts.ForgedDocument as exc:
            self._refuse(session, "forged_documents", str(exc))
            return
        except contacts.ContactDocumentError as exc:
            self._refuse(session, "bad_documents", str(exc))
            return
        self._puts[session] = self._puts.get(session, 0) + 1
        if self._puts[session] > MAX_PUTS:
            self._refuse(session, "forbidden_puts", "too many documents from this session")
            return
        self.counters["puts"] += 1
        self._actions.append(Put(key, value_id, document, until))
        self.value(key, document, now)  # local followers hear it without the overlay's delay

    def _refuse(self, session: bytes, counter: str, why: str) -> None:
        self.counters[counter] += 1
        log.info("client document refused", reason=why)
        self._out.append((session, {"t": "error", "message": why}))

    # ----------------------------------------------------------------- from the overlay

    def value(self, key: str, document: dict[str, Any], now: float) -> None:
        """A document heard under `key` (from the overlay, or put by a local client)."""
        watched = self._keys.get(key)
        if watched is None:
            return  # nobody follows it any more
        checked = self._check(key, document, now)
        if checked is None:
            return
        slot, order = checked
        current = watched.values.get(slot)
        if current is not None and current[0] >= order:
            if current[0] > order:
                self.counters["stale"] += 1
            return
        watched.values[slot] = (order, document)
        for session in sorted(watched.sessions):
            self._push(session, _message_for(key, document))

    def ready(self, key: str) -> None:
        """The first overlay read of `key` ended: its followers now know all it holds."""
        watched = self._keys.get(key)
        if watched is None or watched.ready:
            return
        watched.ready = True
        for session in sorted(watched.waiting):
            self._push(session, {"t": "synced", "key": key})
        watched.waiting.clear()

    def _check(self, key: str, document: object, now: float) -> tuple[str, int] | None:
        """(author slot, order) of a document that verifies for `key`, else None, counted."""
        prefix, _, name = key.partition("/")
        try:
            if key.startswith("presence/"):
                record = presence.verify_untrusted(document, self.ca, now, name)
                return record.device, record.seq
            if prefix + "/" == contacts.CONTACTS_PREFIX:
                listed = contacts.verify_list(document, self.ca, now, name)
                return listed.device, listed.seq
            request = contacts.verify_request(document, self.ca, now, name)
            return request.sender, request.ts
        except presence.PresenceError as exc:
            self.counters["expired_presence" if exc.kind == "expired" else "forged_presence"] += 1
        except contacts.ForgedDocument:
            self.counters["forged_documents"] += 1
        except contacts.ContactDocumentError:
            self.counters["bad_documents"] += 1
        return None

    # ----------------------------------------------------------------- output

    def _push(self, session: bytes, message: dict[str, Any]) -> None:
        try:
            parts = contacts.split(message)
        except ValueError:
            self.counters["malformed"] += 1
            return
        self.counters["pushes"] += 1
        self._out += [(session, part) for part in parts]

    def pushes(self) -> list[tuple[bytes, dict[str, Any]]]:
        out, self._out = self._out, []
        return out

    def actions(self) -> list[WatchAction]:
        out, self._actions = self._actions, []
        return out


def _message_for(key: str, document: dict[str, Any]) -> dict[str, Any]:
    if key.startswith("presence/"):
        return {"t": "presence", "user": key.partition("/")[2], "record": document}
    return {"t": "doc", "key": key, "document": document}


class WatchRunner:
    """Runs a `Watch`'s actions on an overlay; `poke` makes the supernode flush its output."""

    def __init__(
        self,
        index: Overlay,
        watch: Watch,
        poke: Callable[[], None],
        keep: Callable[[str, int, dict[str, Any], float], None] | None = None,
    ) -> None:
        self.index, self.watch, self.poke, self.keep = index, watch, poke, keep
        self._listens: dict[str, Listening] = {}
        self._tasks = Tasks()

    def run(self, actions: Iterable[WatchAction]) -> None:
        for action in actions:
            if isinstance(action, Listen):
                self._listen(action.key)
            elif isinstance(action, Unlisten):
                listening = self._listens.pop(action.key, None)
                if listening is not None:
                    listening.cancel()
            else:
                self._tasks.spawn(self._put(action))

    def _listen(self, key: str) -> None:
        def heard(document: dict[str, Any]) -> None:
            self.watch.value(key, document, time.time())
            self.poke()

        self._listens[key] = self.index.listen(key, heard)
        self._tasks.spawn(self._first_read(key))

    async def _first_read(self, key: str) -> None:
        """A listen only hears what is stored from now on, on some overlays: read once too."""
        try:
            documents = await self.index.get(key)
        except Exception as exc:  # the overlay failing must not kill the node
            log.warning("overlay read failed", key=key, error=str(exc))
            documents = []
        now = time.time()
        for document in documents:
            self.watch.value(key, document, now)
        self.watch.ready(key)
        self.poke()

    async def _put(self, action: Put) -> None:
        if self.keep is not None:
            self.keep(action.key, action.value_id, action.document, action.until)
            return
        try:
            await self.index.put(action.key, action.value_id, action.document)
        except Exception as exc:
            log.warning("overlay put failed", key=action.key, error=str(exc))

    def close(self) -> None:
        self._tasks.cancel()
        for listening in self._listens.values():
            listening.cancel()
        self._listens.clear()
