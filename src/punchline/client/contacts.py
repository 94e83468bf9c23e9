"""The user's contact list, synced across devices, with the contacts' live presence.

The list is a last-writer-wins map from user name to entry (requested, accepted or removed,
with the time and device of the change). Two devices that edited it offline converge when
they merge: per name the entry with the later (time, device) wins, and a removal is kept as a
tombstone so it is not undone by a device that had not heard of it. Every device writes its
merged list to the overlay ("contacts/<user>", its own value), encrypted (`wire.contacts`), and
merges what the other devices wrote, which its supernode pushes as it arrives.

Requests: `add` files a signed request under "requests/<them>"; their supernode pushes it to
every device of theirs that is online (OpenDHT listen), and it waits in the overlay, kept alive
by the supernodes' custody, for those that are not; `accept` answers with a signed acceptance
under "requests/<us>" the same way. Each device re-puts the documents it sent whenever it
attaches to a supernode, until they expire, so a dead supernode's custody is repaired.

Presence: the daemon asks its supernode to watch its accepted contacts and receives their
signed presence records, which it verifies itself (the supernode is trusted for availability
only) and keeps per device; `view` reports each contact's best status.

`ContactBook` is the sans-I/O core (messages and `now` in, messages out); `Contacts` adds the
data-dir files and the control requests of `punchline contacts`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from punchline.client.store import ContactKeys, IdentityStore
from punchline.errors import LocalError
from punchline.identity import names
from punchline.util.files import atomic_write
from punchline.util.jsontext import loads_untrusted
from punchline.wire import contacts, presence
from punchline.wire.contacts import ContactRequest

log = structlog.get_logger(component="contacts")

STATES = frozenset({"requested", "accepted", "removed"})
# best first: the status shown for a contact with several devices online
STATUS_ORDER = ("online", "busy", "away", "offline")
MESSAGES = frozenset({"presence", "doc", "part", "synced"})
STATE_FILE = "contacts.json"


@dataclass(frozen=True)
class Entry:
    state: str  # "requested" (asked them), "accepted" (a contact), "removed" (tombstone)
    ts: int  # milliseconds when the state was set
    device: str  # which of the user's devices set it: breaks ties between equal times

    def wins_over(self, other: Entry) -> bool:
        return (self.ts, self.device, self.state) > (other.ts, other.device, other.state)

    def as_json(self) -> list[Any]:
        return [self.state, self.ts, self.device]


def merge(mine: dict[str, Entry], theirs: dict[str, Entry]) -> dict[str, Entry]:
    """The join of two lists: commutative, associative, idempotent, so devices converge."""
    merged = dict(mine)
    for name, entry in theirs.items():
        current = merged.get(name)
        if current is None or entry.wins_over(current):
            merged[name] = entry
    return merged


def entries_from_json(raw: object) -> dict[str, Entry]:
    """Entries of an untrusted (decrypted or on-disk) list; malformed ones are skipped."""
    found: dict[str, Entry] = {}
    if not isinstance(raw, dict):
        return found
    for name, value in raw.items():
        if not contacts.valid_name(name) or not isinstance(value, list) or len(value) != 3:
            continue
        state, ts, device = value
        good_ts = isinstance(ts, int) and not isinstance(ts, bool) and ts >= 0
        if state in STATES and good_ts and isinstance(device, str) and len(device) <= 64:
            found[name] = Entry(state, ts, device)
    return found


def entries_to_json(entries: dict[str, Entry]) -> dict[str, list[Any]]:
    return {name: entry.as_json() for name, entry in sorted(entries.items())}


def _ms(now: float) -> int:
    return int(now * 1000)


class ContactBook:
    def __init__(
        self,
        user: str,
        device: str,
        key: Ed25519PrivateKey,
        certificate: x509.Certificate,
        ca: x509.Certificate,
        keys: ContactKeys | None,
        saved: dict[str, Any] | None = None,
    ) -> None:
        self.user, self.device = user, device
        self.key, self.certificate, self.ca = key, certificate, ca
        self.keys = keys
        saved = saved or {}
        self.entries = entries_from_json(saved.get("entries"))
        # Our latest request or acceptance per recipient: re-put on every attach until expiry.
        self.sent: dict[str, dict[str, Any]] = {}
        for name, document in (saved.get("sent") or {}).items():
            if isinstance(document, dict):
                self.sent[str(name)] = document
        seq = saved.get("seq")
        self.seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else 0
        self.requests: dict[str, ContactRequest] = {}  # freshest per sender, for us
        self.presence: dict[str, dict[str, presence.Presence]] = {}
        self.last_online: dict[str, float] = {}
        self.synced = False  # the overlay's lists have been read once (before our first write)
        self.written: dict[str, Entry] | None = None  # what our own document holds
        self._key_used = False  # our list key is in a document others may have read
        self._other_keys: dict[str, bytes] = {}  # list keys of other devices' documents, by id
        self._carried: contacts.ListDocument | None = None  # newest password's wrap seen
        self._unsent: set[str] = set()
        self._need_watch = False
        self._rewrite = False
        self.problem: str | None = None if keys else "log in again to sync contacts"
        self.keys_changed = False  # the adapter saves `keys`
        self.changed = False  # the adapter saves `state_json()`
        self.counters = {"forged_requests": 0, "bad_documents": 0, "unreadable_lists": 0,
                         "bad_presence": 0, "malformed": 0}  # fmt: skip
        self._joiner = contacts.Joiner()

    # ----------------------------------------------------------------- user operations

    def add(self, name: str, now: float) -> str:
        name = self._other(name)
        entry = self.entries.get(name)
        if entry is not None and entry.state == "accepted":
            return f"{name} is already a contact"
        if self._pending_in(name) is not None:
            return self.accept(name, now)
        self._set(name, "requested", now)
        self._send("request", name, now)
        return f"contact request sent to {name}"

    def accept(self, name: str, now: float) -> str:
        name = self._other(name)
        if self._pending_in(name) is None:
            raise LocalError(f"there is no contact request from {name}")
        self._set(name, "accepted", now)
        self._send("accept", name, now)
        return f"{name} is now a contact"

    def remove(self, name: str, now: float) -> str:
        name = self._other(name)
        entry = self.entries.get(name)
        if (entry is None or entry.state == "removed") and self._pending_in(name) is None:
            raise LocalError(f"{name} is not a contact")
        self._set(name, "removed", now)
        self.sent.pop(name, None)
        self._unsent.discard(name)
        return f"{name} removed" if entry is not None else f"request from {name} declined"

    def _other(self, name: str) -> str:
        name = names.canonical(name)
        if name == self.user:
            raise LocalError("you cannot add yourself as a contact")
        return name

    def _set(self, name: str, state: str, now: float) -> None:
        old = self.entries.get(name)
        ts = max(_ms(now), old.ts + 1 if old is not None else 0)
        self.entries[name] = Entry(state, ts, self.device)
        self._need_watch = True
        self.changed = True

    def _send(self, kind: str, name: str, now: float) -> None:
        self.sent[name] = contacts.make_request(self.key, self.certificate, kind, self.user,
                                                name, now)  # fmt: skip
        self._unsent.add(name)

    def _pending_in(self, name: str) -> ContactRequest | None:
        """Their request, when no decision of ours came after it."""
        request = self.requests.get(name)
        if request is None or request.kind != "request":
            return None
        entry = self.entries.get(name)
        if entry is None or (entry.state == "removed" and entry.ts < request.ts):
            return request
        return None

    # ----------------------------------------------------------------- supernode

    def attached(self) -> None:
        """A new supernode session: watch again and re-put what we keep alive."""
        self._need_watch = True
        self._rewrite = True
        self._unsent |= set(self.sent)

    def watched(self) -> list[str]:
        return sorted(n for n, e in self.entries.items() if e.state == "accepted")

    def outgoing(self, now: float) -> list[dict[str, Any]]:
        """Messages for the supernode (the caller sends them only while attached)."""
        messages: list[dict[str, Any]] = []
        if self._need_watch:
            messages.append({"t": "watch", "users": self.watched()})
            self._need_watch = False
        for name in sorted(self._unsent):
            document = self.sent.get(name)
            if document is None or not self._alive(document, now):
                self.sent.pop(name, None)
                self.changed = True
                continue
            messages.append({"t": "put", "key": contacts.requests_key(name), "document": document})
        self._unsent.clear()
        own = self._own_document(now)
        if own is not None:
            messages.append({"t": "put", "key": contacts.contacts_key(self.user), "document": own})
        return [part for message in messages for part in contacts.split(message)]

    def _alive(self, document: dict[str, Any], now: float) -> bool:
        try:
            contacts.verify_request(document, self.ca, now)
        except contacts.ContactDocumentError:
            return False
        return True

    def _own_document(self, now: float) -> dict[str, Any] | None:
        """Our merged list, when the overlay's copy of ours is missing something."""
        if not self.synced or self.keys is None:
            return None
        if self.written == self.entries and not self._rewrite:
            return None
        keys = self.keys
        if keys.list_key is None:
            keys = self._adopt(contacts.initial_list_key(keys.password_key))
        assert keys.list_key is not None
        wrapped, set_at = (
            contacts.wrap(keys.password_key, keys.list_key, self.user),
            keys.password_set_at,
        )
        carried = self._carried
        if (carried is not None and carried.kid == contacts.key_id(keys.list_key)
                and carried.password_set_at > set_at):  # fmt: skip
            # a newer password (changed on another device) protects the list key: keep its wrap
            wrapped, set_at = carried.wrapped, carried.password_set_at
        self.seq = max(self.seq + 1, _ms(now))
        content = {"entries": entries_to_json(self.entries)}
        document = contacts.make_list(
            self.key, self.certificate, self.user, self.device, self.seq, keys.list_key,
            wrapped, set_at, content, now,
        )  # fmt: skip
        self.written, self._rewrite, self._key_used = dict(self.entries), False, True
        self.changed = True
        return document

    def _adopt(self, list_key: bytes) -> ContactKeys:
        assert self.keys is not None
        self.keys = ContactKeys(self.keys.password_key, self.keys.password_set_at, list_key)
        self.keys_changed = True
        self._rewrite = True
        return self.keys

    def rekey(self, keys: ContactKeys | None) -> None:
        """The password changed here (or this device logged in again): re-wrap the list key."""
        if keys is None:
            return
        list_key = keys.list_key or (self.keys.list_key if self.keys else None)
        self.keys = ContactKeys(keys.password_key, keys.password_set_at, list_key)
        self.keys_changed = True  # saved with the list key we hold
        self.problem = None
        self._rewrite = True

    # ----------------------------------------------------------------- input

    def receive(self, message: dict[str, Any], now: float) -> None:
        kind = message.get("t")
        if kind == "part":
            try:
                whole = self._joiner.feed(message, now)
            except ValueError:
                self.counters["malformed"] += 1
                return
            if whole is not None and whole.get("t") in MESSAGES - {"part"}:
                self.receive(whole, now)
        elif kind == "presence":
            self._presence(message.get("user"), message.get("record"), now)
        elif kind == "synced" and message.get("key") == contacts.contacts_key(self.user):
            self.synced = True
        elif kind == "doc":
            key, document = message.get("key"), message.get("document")
            if key == contacts.contacts_key(self.user):
                self._list_document(document, now)
            elif key == contacts.requests_key(self.user):
                self._request(document, now)

    def _presence(self, user: object, record: object, now: float) -> None:
        if not isinstance(user, str):
            self.counters["malformed"] += 1
            return
        try:
            checked = presence.verify_untrusted(record, self.ca, now, user)
        except presence.PresenceError:
            self.counters["bad_presence"] += 1
            return
        devices = self.presence.setdefault(user, {})
        current = devices.get(checked.device)
        if current is not None and current.seq >= checked.seq:
            return
        devices[checked.device] = checked
        if checked.status != "offline":
            self.last_online[user] = now

    def _request(self, document: object, now: float) -> None:
        try:
            request = contacts.verify_request(document, self.ca, now, self.user)
        except contacts.ForgedDocument as exc:
            self.counters["forged_requests"] += 1
            log.warning("forged contact request dropped", reason=str(exc))
            return
        except contacts.ContactDocumentError:
            self.counters["bad_documents"] += 1
            return
        current = self.requests.get(request.sender)
        if current is not None and current.ts >= request.ts:
            return
        self.requests[request.sender] = request
        entry = self.entries.get(request.sender)
        state = entry.state if entry is not None else None
        if request.kind == "accept" and state == "requested":
            self._set(request.sender, "accepted", now)
            self.sent.pop(request.sender, None)  # our request is answered
            log.info("contact request accepted", contact=request.sender)
        elif request.kind == "request" and state == "requested":
            self._set(request.sender, "accepted", now)  # we asked each other
            self._send("accept", request.sender, now)
        elif request.kind == "request" and state == "accepted":
            assert entry is not None
            if request.ts > entry.ts:  # they lost us (removed, re-added): answer again
                self._send("accept", request.sender, now)
        elif request.kind == "request" and self._pending_in(request.sender) is not None:
            log.info("contact request received", sender=request.sender)

    def _list_document(self, document: object, now: float) -> None:
        try:
            listed = contacts.verify_list(document, self.ca, now, self.user)
        except contacts.ContactDocumentError:
            self.counters["bad_documents"] += 1
            return
        if listed.device == self.device:
            self.seq = max(self.seq, listed.seq)
        if self._carried is None or listed.password_set_at > self._carried.password_set_at:
            self._carried = listed
        list_key = self._key_for(listed)
        if list_key is None:
            self.counters["unreadable_lists"] += 1
            mine = self.keys.password_set_at if self.keys else 0.0
            if listed.password_set_at > mine:
                self.problem = ("the password was changed on another device; log in again "
                                "here to read contacts added there")  # fmt: skip
            return
        try:
            content = contacts.open_list(list_key, self.user, listed.sealed)
        except contacts.UnreadableList:
            self.counters["unreadable_lists"] += 1
            return
        merged = merge(self.entries, entries_from_json(content.get("entries")))
        if merged != self.entries:
            self.entries = merged
            self._need_watch = True
            self.changed = True
            for name, entry in merged.items():
                if entry.state == "removed" and self.sent.pop(name, None) is not None:
                    self._unsent.discard(name)  # removed on another device: stop asking

    def _key_for(self, listed: contacts.ListDocument) -> bytes | None:
        """The list key `listed` is sealed under, if we hold it or can unwrap it; adopting it
        when ours is not in use yet, or when it is the lower of two keys in use (so every
        device settles on the same one)."""
        if self.keys is None:
            return None
        mine = self.keys.list_key
        if mine is not None and contacts.key_id(mine) == listed.kid:
            return mine
        key = self._other_keys.get(listed.kid)
        if key is None:
            key = contacts.unwrap(self.keys.password_key, listed.wrapped, self.user)
            if key is None or contacts.key_id(key) != listed.kid:
                return None
            self._other_keys[listed.kid] = key
        if mine is None or not self._key_used or listed.kid < contacts.key_id(mine):
            self._adopt(key)
        return key

    # ----------------------------------------------------------------- output

    def status_of(self, user: str, now: float) -> tuple[str, float | None]:
        """(status, last seen) from the freshest unexpired record of each device."""
        records = [p for p in self.presence.get(user, {}).values() if p.expires >= now]
        statuses = {p.status for p in records}
        status = next((s for s in STATUS_ORDER if s in statuses), "offline")
        if status != "offline":
            return status, now
        seen = [self.last_online.get(user)] + [p.last_seen for p in records]
        known = [s for s in seen if s is not None]
        return status, max(known) if known else None

    def view(self, now: float) -> dict[str, Any]:
        listed = []
        for name, entry in sorted(self.entries.items()):
            if entry.state != "accepted":
                continue
            status, last_seen = self.status_of(name, now)
            online = [p.device for p in self.presence.get(name, {}).values()
                      if p.expires >= now and p.status != "offline"]  # fmt: skip
            listed.append({"user": name, "status": status, "last_seen": last_seen,
                           "devices": len(online), "since": entry.ts / 1000})  # fmt: skip
        incoming = [{"user": r.sender, "at": r.ts / 1000} for r in
                    sorted(self.requests.values(), key=lambda r: r.sender)
                    if r.expires >= now and self._pending_in(r.sender) is not None]  # fmt: skip
        outgoing = [{"user": n, "at": e.ts / 1000} for n, e in sorted(self.entries.items())
                    if e.state == "requested"]  # fmt: skip
        return {"user": self.user, "contacts": listed, "requests_in": incoming,
                "requests_out": outgoing, "synced": self.synced, "problem": self.problem,
                "counters": dict(self.counters)}  # fmt: skip

    def state_json(self) -> dict[str, Any]:
        return {"entries": entries_to_json(self.entries), "sent": dict(sorted(self.sent.items())),
                "seq": self.seq}  # fmt: skip


class Contacts:
    """The daemon's contacts: a `ContactBook` with its data-dir files and control requests."""

    MESSAGES = MESSAGES  # from the supernode, for `receive`

    def __init__(self, store: IdentityStore, book: ContactBook) -> None:
        self.store, self.book = store, book
        self.path = store.dir / STATE_FILE

    @classmethod
    def open(
        cls,
        store: IdentityStore,
        user: str,
        device: str,
        key: Ed25519PrivateKey,
        certificate: x509.Certificate,
        ca: x509.Certificate,
    ) -> Contacts:
        saved = _load(store.dir / STATE_FILE)
        keys = store.contact_keys()
        return cls(store, ContactBook(user, device, key, certificate, ca, keys, saved))

    def attached(self) -> None:
        self.book.attached()

    def receive(self, message: dict[str, Any], now: float) -> None:
        self.book.receive(message, now)
        self._save()

    def outgoing(self, now: float) -> list[dict[str, Any]]:
        messages = self.book.outgoing(now)
        self._save()
        return messages

    def renewed(self, certificate: x509.Certificate) -> None:
        self.book.certificate = certificate

    def control(self, request: dict[str, Any], now: float) -> dict[str, Any]:
        """`punchline contacts [add|accept|remove USER | rekey]`: one reply."""
        action, user = request.get("action", "list"), request.get("user")
        book = self.book
        if action == "list":
            return {"ok": True, **book.view(now)}
        if action == "rekey":
            book.rekey(self.store.contact_keys())
            return {"ok": True, "message": "contact list key re-wrapped"}
        if action not in ("add", "accept", "remove") or not isinstance(user, str):
            return {"ok": False, "error": "contacts: add, accept or remove a USER, or list"}
        if action == "add":
            message = book.add(user, now)
        elif action == "accept":
            message = book.accept(user, now)
        else:
            message = book.remove(user, now)
        self._save()
        return {"ok": True, "message": message}

    def _save(self) -> None:
        book = self.book
        if book.keys_changed and book.keys is not None:
            self.store.save_contact_keys(book.keys)
            book.keys_changed = False
        if book.changed:
            atomic_write(self.path, json.dumps(book.state_json()).encode())
            book.changed = False


def _load(path: Path) -> dict[str, Any] | None:
    try:
        raw = loads_untrusted(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        log.warning("contact list file damaged; starting from the overlay's copy", error=str(exc))
        return None
    return raw if isinstance(raw, dict) else None
