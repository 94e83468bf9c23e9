"""Contacts: the list merge, its encryption, request verification, and the supernode's watch.

The end-to-end flows run here without sockets: contact books (one per device) talk to `Watch`
cores (one per supernode) that share a dict standing for the overlay, so requests, acceptances,
list sync between devices and presence pushes are all exercised through the real cores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchline.client.contacts import ContactBook, Contacts, Entry, merge
from punchline.client.store import ContactKeys, IdentityStore
from punchline.errors import LocalError
from punchline.identity import keys, signed
from punchline.overlay.index import presence_key
from punchline.supernode.watch import Listen, Put, Unlisten, Watch
from punchline.wire import contacts, presence
from tests.unit.cores import NOW, Party, make_party, record

if TYPE_CHECKING:
    from tests.unit.conftest import CA, IssueFn

T = NOW + 60.0
PASSWORD_KEYS: dict[tuple[str, str], bytes] = {}


def password_key(user: str, password: str) -> bytes:
    """scrypt is slow on purpose: derive each (user, password) once per run."""
    if (user, password) not in PASSWORD_KEYS:
        PASSWORD_KEYS[(user, password)] = contacts.password_key(user, password)
    return PASSWORD_KEYS[(user, password)]


@dataclass(frozen=True)
class People:
    ca: CA
    alice: Party
    alice2: Party  # alice's second device
    bob: Party
    carol: Party
    foreign_bob: Party  # "bob" certified by a CA nobody pinned


@pytest.fixture(scope="module")
def people(ca: CA, issue: IssueFn, issue_other: IssueFn) -> People:
    return People(ca, make_party(issue, ca.cert, "alice"), make_party(issue, ca.cert, "alice"),
                  make_party(issue, ca.cert, "bob"), make_party(issue, ca.cert, "carol"),
                  make_party(issue_other, ca.cert, "bob"))  # fmt: skip


# ------------------------------------------------------------------ merge

entries = st.dictionaries(
    st.sampled_from(["bob", "carol", "dave"]),
    st.builds(
        Entry,
        st.sampled_from(["requested", "accepted", "removed"]),
        st.integers(0, 5),
        st.sampled_from(["d1", "d2"]),
    ),
)


@given(entries, entries, entries)
def test_merge_is_a_join_so_devices_converge(
    a: dict[str, Entry], b: dict[str, Entry], c: dict[str, Entry]
) -> None:
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    assert merge(a, a) == a


def test_a_later_removal_beats_an_earlier_accept_and_ties_break_by_device() -> None:
    accepted = {"bob": Entry("accepted", 10, "d1")}
    removed = {"bob": Entry("removed", 11, "d2")}
    assert merge(accepted, removed)["bob"].state == "removed"
    assert merge(removed, accepted)["bob"].state == "removed"
    tie = {"bob": Entry("accepted", 11, "d3")}
    assert merge(removed, tie)["bob"].device == "d3"


# ------------------------------------------------------------------ encryption


def test_the_list_opens_with_its_key_only() -> None:
    alice_key = password_key("alice", "correct horse")
    list_key = contacts.initial_list_key(alice_key)
    sealed = contacts.seal_list(list_key, "alice", {"entries": {"bob": ["accepted", 1, "d"]}})
    assert contacts.open_list(list_key, "alice", sealed)["entries"]["bob"][0] == "accepted"
    bob_list_key = contacts.initial_list_key(password_key("bob", "correct horse"))
    with pytest.raises(contacts.UnreadableList):
        contacts.open_list(bob_list_key, "alice", sealed)  # another user's key
    with pytest.raises(contacts.UnreadableList):
        contacts.open_list(list_key, "mallory", sealed)  # bound to its user
    tampered = {**sealed, "ct": sealed["ct"][:-4] + "AAA="}
    with pytest.raises(contacts.UnreadableList):
        contacts.open_list(list_key, "alice", tampered)


def test_the_password_key_is_per_user_and_per_password() -> None:
    key = password_key("alice", "correct horse")
    assert key == contacts.password_key("alice", "correct horse")  # every device agrees
    assert key != password_key("bob", "correct horse")
    assert key != password_key("alice", "battery staple")
    wrapped = contacts.wrap(key, b"k" * 32, "alice")
    assert contacts.unwrap(key, wrapped, "alice") == b"k" * 32
    assert contacts.unwrap(password_key("alice", "battery staple"), wrapped, "alice") is None
    assert contacts.unwrap(key, wrapped, "bob") is None


def _list_doc(party: Party, seq: int = 1, user: str | None = None) -> dict[str, str]:
    key = password_key("alice", "pw")
    list_key = contacts.initial_list_key(key)
    wrapped = contacts.wrap(key, list_key, "alice")
    name = user or party.name
    return contacts.make_list(party.key, party.cert, name, "dev", seq, list_key, wrapped, T,
                              {"entries": {}}, T)  # fmt: skip


def test_list_documents_verify_against_the_ca(people: People) -> None:
    checked = contacts.verify_list(_list_doc(people.alice), people.ca.cert, T, "alice")
    assert (checked.user, checked.device, checked.seq) == ("alice", "dev", 1)
    with pytest.raises(contacts.ForgedDocument):  # bob writing alice's list
        contacts.verify_list(_list_doc(people.bob, user="alice"), people.ca.cert, T, "alice")
    with pytest.raises(contacts.ForgedDocument):  # filed under another name
        contacts.verify_list(_list_doc(people.bob), people.ca.cert, T, "alice")
    with pytest.raises(contacts.ForgedDocument):
        contacts.verify_list(_list_doc(people.foreign_bob), people.ca.cert, T, "bob")
    document = _list_doc(people.alice)
    payload = json.loads(document["payload"])
    payload["seq"] = 99
    altered = {"payload": json.dumps(payload), "signature": document["signature"]}
    with pytest.raises(contacts.ForgedDocument):
        contacts.verify_list(altered, people.ca.cert, T, "alice")


# ------------------------------------------------------------------ requests


def _request(party: Party, to: str = "bob", kind: str = "request", at: float = T) -> dict[str, str]:
    return contacts.make_request(party.key, party.cert, kind, party.name, to, at)


def test_requests_verify_and_forgeries_are_rejected(people: People) -> None:
    ca = people.ca.cert
    checked = contacts.verify_request(_request(people.alice), ca, T, "bob")
    assert (checked.kind, checked.sender, checked.recipient) == ("request", "alice", "bob")
    with pytest.raises(contacts.ForgedDocument):  # another CA
        contacts.verify_request(_request(people.foreign_bob, "alice"), ca, T, "alice")
    forged = dict(_request(people.carol))
    forged["payload"] = forged["payload"].replace('"from":"carol"', '"from":"alice"')
    with pytest.raises(contacts.ForgedDocument):  # signature no longer matches
        contacts.verify_request(forged, ca, T, "bob")
    payload = json.loads(_request(people.carol)["payload"])
    payload["from"] = "alice"  # carol signs a request claiming to be alice
    claimed = signed.sign_document(people.carol.key, contacts.REQUEST_CONTEXT, payload)
    with pytest.raises(contacts.ForgedDocument):
        contacts.verify_request(claimed, ca, T, "bob")
    with pytest.raises(contacts.ContactDocumentError):  # filed under someone else
        contacts.verify_request(_request(people.alice), ca, T, "carol")
    with pytest.raises(contacts.ContactDocumentError):  # expired
        contacts.verify_request(_request(people.alice), ca, T + contacts.REQUEST_LIFETIME + 1)
    with pytest.raises(contacts.ContactDocumentError):  # signed "in the future"
        contacts.verify_request(_request(people.alice, at=T + 3600), ca, T)


def test_a_request_outlives_the_certificate_that_signed_it(people: People) -> None:
    """Certificates last a day, requests a month: checked at signing time."""
    request = _request(people.alice)
    later = T + 10 * 86_400  # alice's certificate has long expired
    assert contacts.verify_request(request, people.ca.cert, later, "bob").sender == "alice"


def test_large_messages_travel_in_parts() -> None:
    message = {"t": "doc", "key": "contacts/alice", "document": {"payload": "x" * 20_000}}
    parts = contacts.split(message)
    assert len(parts) > 1
    assert all(len(json.dumps(p)) < 3_500 for p in parts)
    joiner = contacts.Joiner()
    results = [joiner.feed(p, T) for p in reversed(parts)]
    assert results[:-1] == [None] * (len(parts) - 1)
    assert results[-1] == message
    assert contacts.split({"t": "watch", "users": []}) == [{"t": "watch", "users": []}]
    bad_parts = [
        ({"ref": 1, "i": 5, "n": 2, "data": ""}, "out of range"),
        ({"ref": 1, "i": 0, "n": 999, "data": ""}, "out of range"),
        ({"ref": "x", "i": 0, "n": 1, "data": ""}, "no ref"),
        ({"ref": 1, "i": 0, "n": 1, "data": "!"}, "base64|Incorrect|Invalid|Non-base64"),
    ]
    for bad, why in bad_parts:
        with pytest.raises(ValueError, match=why):
            joiner.feed(bad, T)


# ------------------------------------------------------------------ books and watches


@dataclass
class Device:
    party: Party
    book: ContactBook
    node: int
    session: bytes


@dataclass
class World:
    """Supernodes (Watch cores) sharing one dict as the overlay, and devices attached to them."""

    ca: CA
    watches: list[Watch]
    overlay: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    listening: list[set[str]] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)
    now: float = T

    def attach(self, party: Party, node: int, keys_: ContactKeys | None) -> Device:
        book = ContactBook(party.name, keys.key_id(party.key.public_key()), party.key,
                           party.cert, self.ca.cert, keys_)  # fmt: skip
        device = Device(party, book, node, bytes([len(self.devices)]) * 8)
        self.devices.append(device)
        book.attached()
        return device

    def detach(self, device: Device) -> None:
        self.watches[device.node].drop(device.session)
        self.devices.remove(device)

    def run(self) -> None:
        """Carry messages until nothing moves."""
        for _round in range(50):
            moved = False
            for device in self.devices:
                for message in device.book.outgoing(self.now):
                    moved = True
                    self.watches[device.node].message(device.session, device.party.name,
                                                      message, self.now)  # fmt: skip
            for node, watch in enumerate(self.watches):
                for action in watch.actions():
                    moved = True
                    self._act(node, action)
            for node, watch in enumerate(self.watches):
                for session, message in watch.pushes():
                    moved = True
                    for device in self.devices:
                        if device.node == node and device.session == session:
                            device.book.receive(message, self.now)
            if not moved:
                return
        raise AssertionError("messages never settled")

    def _act(self, node: int, action: Listen | Unlisten | Put) -> None:
        watch = self.watches[node]
        if isinstance(action, Listen):
            self.listening[node].add(action.key)
            for document in self.overlay.get(action.key, {}).values():
                watch.value(action.key, document, self.now)
            watch.ready(action.key)
        elif isinstance(action, Unlisten):
            self.listening[node].discard(action.key)
        else:
            self.overlay.setdefault(action.key, {})[action.value_id] = action.document
            for other, keys_ in enumerate(self.listening):
                if action.key in keys_:
                    self.watches[other].value(action.key, action.document, self.now)

    def publish(self, party: Party, device: str, seq: int, status: str = "online") -> None:
        """A presence record lands in the overlay (as the presence code puts it)."""
        where = {"node_id": "sn", "addresses": []}
        if status == "offline":
            doc = presence.make_offline(party.key, party.cert, party.name, device, where, seq,
                                        self.now - 5)  # fmt: skip
        else:
            doc = presence.make(party.key, party.cert, party.name, device, where, seq,
                                self.now + 150, status)  # fmt: skip
        self._act(0, Put(presence_key(party.name), seq, doc, self.now + 150))


def _world(people: People, nodes: int = 2) -> World:
    watches = [Watch(people.ca.cert) for _ in range(nodes)]
    return World(people.ca, watches, listening=[set() for _ in range(nodes)])


def _keys(user: str, password: str = "pw", at: float = T) -> ContactKeys:
    return ContactKeys(password_key(user, password), at)


def _view(device: Device, now: float = T) -> dict[str, Any]:
    return device.book.view(now)


def test_two_users_on_different_supernodes_become_contacts(people: People) -> None:
    world = _world(people)
    alice = world.attach(people.alice, 0, _keys("alice"))
    bob = world.attach(people.bob, 1, _keys("bob"))
    world.run()
    assert alice.book.add("bob", world.now) == "contact request sent to bob"
    world.run()
    assert [r["user"] for r in _view(bob)["requests_in"]] == ["alice"]
    assert [r["user"] for r in _view(alice)["requests_out"]] == ["bob"]
    bob.book.accept("alice", world.now)
    world.run()
    assert [c["user"] for c in _view(alice)["contacts"]] == ["bob"]
    assert [c["user"] for c in _view(bob)["contacts"]] == ["alice"]
    assert _view(alice)["requests_out"] == _view(bob)["requests_in"] == []
    # live presence: bob's record reaches alice through her supernode's listen
    assert _view(alice)["contacts"][0]["status"] == "offline"
    world.publish(people.bob, "bob-phone", 1)
    world.run()
    assert _view(alice)["contacts"][0]["status"] == "online"
    world.publish(people.bob, "bob-phone", 2, "away")
    world.run()
    assert _view(alice)["contacts"][0]["status"] == "away"
    world.publish(people.bob, "bob-phone", 1)  # an older record never wins
    world.run()
    assert _view(alice)["contacts"][0]["status"] == "away"
    world.publish(people.bob, "bob-phone", 3, "offline")
    world.run()
    contact = _view(alice)["contacts"][0]
    assert contact["status"] == "offline"
    assert contact["last_seen"] == world.now  # it was online a moment ago, here
    # an expired record is not "online"
    world.publish(people.bob, "bob-laptop", 4)
    world.run()
    assert _view(alice, world.now + 151)["contacts"][0]["status"] == "offline"


def test_the_list_syncs_to_the_users_other_devices(people: People) -> None:
    world = _world(people)
    alice = world.attach(people.alice, 0, _keys("alice"))
    world.run()
    alice.book.add("bob", world.now)
    alice.book.add("carol", world.now)
    world.run()
    alice2 = world.attach(people.alice2, 1, _keys("alice"))  # logs in later, elsewhere
    world.run()
    assert [r["user"] for r in _view(alice2)["requests_out"]] == ["bob", "carol"]
    world.now += 1
    alice2.book.remove("carol", world.now)  # on one device, seen on the other
    world.run()
    assert [r["user"] for r in _view(alice)["requests_out"]] == ["bob"]
    # both edit while apart, then meet again: they converge
    world.detach(alice2)
    world.now += 1
    alice.book.remove("bob", world.now)
    world.run()
    world.now += 1
    alice2.book.add("dave", world.now)
    world.devices.append(alice2)
    alice2.book.attached()
    world.run()
    assert alice.book.entries == alice2.book.entries
    assert [r["user"] for r in _view(alice)["requests_out"]] == ["dave"]
    # the supernodes and the overlay hold only ciphertext
    assert "dave" not in json.dumps(world.overlay["contacts/alice"])


def test_forged_requests_are_dropped_and_counted(people: People) -> None:
    world = _world(people, 1)
    bob = world.attach(people.bob, 0, _keys("bob"))
    carol = world.attach(people.carol, 0, _keys("carol"))
    world.run()
    payload = json.loads(_request(people.carol)["payload"])
    payload["from"] = "alice"
    forged = signed.sign_document(people.carol.key, contacts.REQUEST_CONTEXT, payload)
    # carol's (modified) daemon tries to pass a request off as alice's
    put = {"t": "put", "key": "requests/bob", "document": forged}
    world.watches[0].message(carol.session, "carol", put, world.now)
    world.run()
    assert world.watches[0].counters["forged_documents"] == 1
    # and if the overlay itself delivers one (another supernode let it in), bob drops it
    world._act(0, Put("requests/bob", 1, forged, world.now + 60))
    world.run()
    assert bob.book.counters["forged_requests"] == 0  # the watch already dropped it
    bob.book.receive({"t": "doc", "key": "requests/bob", "document": forged}, world.now)
    assert bob.book.counters["forged_requests"] == 1
    assert _view(bob)["requests_in"] == []


def test_a_client_may_write_only_its_own_list_and_its_own_requests(people: People) -> None:
    watch = Watch(people.ca.cert)
    session = b"s" * 8
    watch.message(session, "bob", {"t": "put", "key": "contacts/alice",
                                   "document": _list_doc(people.alice)}, T)  # fmt: skip
    watch.message(session, "bob", {"t": "put", "key": "presence/bob",
                                   "document": _list_doc(people.bob)}, T)  # fmt: skip
    watch.message(session, "bob", {"t": "put", "key": "requests/carol",
                                   "document": _request(people.alice, "carol")}, T)  # fmt: skip
    assert watch.counters["forbidden_puts"] == 2
    assert watch.counters["forged_documents"] == 1
    assert not any(isinstance(a, Put) for a in watch.actions())
    watch.message(session, "bob", {"t": "put", "key": "requests/alice",
                                   "document": _request(people.bob, "alice")}, T)  # fmt: skip
    assert [a.key for a in watch.actions() if isinstance(a, Put)] == ["requests/alice"]


def test_listens_are_shared_between_local_clients(people: People) -> None:
    watch = Watch(people.ca.cert)
    a, b = b"a" * 8, b"b" * 8
    watch.message(a, "alice", {"t": "watch", "users": ["bob"]}, T)
    watch.message(b, "carol", {"t": "watch", "users": ["bob"]}, T)
    listens = [x.key for x in watch.actions() if isinstance(x, Listen)]
    assert sorted(listens) == ["contacts/alice", "contacts/carol", "presence/bob",
                               "requests/alice", "requests/carol"]  # fmt: skip
    watch.value("presence/bob", record(people.bob, "p", "sn", ("192.0.2.1", 1)), T)
    assert sorted(s for s, m in watch.pushes() if m["t"] == "presence") == [a, b]
    watch.drop(a)
    assert sorted(x.key for x in watch.actions()) == ["contacts/alice", "requests/alice"]
    watch.message(b, "carol", {"t": "watch", "users": []}, T)
    assert [x.key for x in watch.actions()] == ["presence/bob"]
    watch.message(b, "carol", {"t": "watch", "users": "bob"}, T)
    assert watch.counters["malformed"] == 1


def test_a_password_change_rewraps_and_other_devices_keep_reading(people: People) -> None:
    world = _world(people)
    alice = world.attach(people.alice, 0, _keys("alice", "old"))
    alice2 = world.attach(people.alice2, 1, _keys("alice", "old"))
    world.run()
    alice.book.add("bob", world.now)
    world.run()
    world.now += 1
    alice.book.rekey(_keys("alice", "new", world.now))  # `punchline passwd` on device 1
    alice.book.add("carol", world.now)
    world.run()
    assert [r["user"] for r in _view(alice2)["requests_out"]] == ["bob", "carol"]
    assert _view(alice2)["problem"] is None
    # a device that logs in with the new password reads everything, old documents included
    fresh = world.attach(people.alice2, 1, _keys("alice", "new", world.now + 1))
    world.run()
    assert [r["user"] for r in _view(fresh)["requests_out"]] == ["bob", "carol"]
    # the old password reads nothing any more
    stale = world.attach(people.alice2, 0, _keys("alice", "old"))  # never read the list
    world.run()
    assert _view(stale)["requests_out"] == []
    assert _view(stale)["problem"] is not None


def test_adding_someone_who_asked_first_accepts_and_self_is_refused(people: People) -> None:
    world = _world(people, 1)
    alice = world.attach(people.alice, 0, _keys("alice"))
    bob = world.attach(people.bob, 0, _keys("bob"))
    world.run()
    alice.book.add("bob", world.now)
    world.run()
    assert bob.book.add("bob-the-second", world.now).startswith("contact request")
    assert bob.book.add("alice", world.now) == "alice is now a contact"
    world.run()
    assert [c["user"] for c in _view(alice)["contacts"]] == ["bob"]
    with pytest.raises(LocalError):
        alice.book.add("alice", world.now)
    with pytest.raises(LocalError):
        alice.book.accept("carol", world.now)


def test_the_daemon_keeps_its_list_and_sent_requests_across_restarts(
    people: People, tmp_path: Path
) -> None:
    store = IdentityStore(tmp_path)
    store.save_contact_keys(_keys("alice"))
    device = keys.key_id(people.alice.key.public_key())

    def start() -> Contacts:
        return Contacts.open(store, "alice", device, people.alice.key, people.alice.cert,
                             people.ca.cert)  # fmt: skip

    first = start()
    assert first.control({"action": "add", "user": "Bob"}, T)["message"].endswith("to bob")
    with pytest.raises(LocalError, match="at least"):  # the daemon replies with the message
        first.control({"action": "add", "user": "x"}, T)
    again = start()
    assert again.control({"action": "list"}, T)["requests_out"] == [{"user": "bob", "at": T}]
    again.attached()
    puts = [m for m in again.outgoing(T) if m["t"] == "put"]
    assert [m["key"] for m in puts] == ["requests/bob"]  # re-put on attach: custody repaired
    assert again.control({"action": "frobnicate"}, T)["ok"] is False
