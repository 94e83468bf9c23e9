"""The directory: normalized names, prefix keys, signed entries, and the supernode's searches."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from punchline.identity import signed
from punchline.overlay.index import MemoryIndex
from punchline.supernode.directory import Directory, DirectoryRunner, Get, Keep
from punchline.wire import directory
from punchline.wire.directory import InvalidDisplayName
from tests.unit.cores import DAY, NOW, Party, make_party

if TYPE_CHECKING:
    from tests.unit.conftest import CA, IssueFn


@dataclass(frozen=True)
class People:
    alice: Party
    bob: Party
    carol: Party
    foreign_alice: Party  # "alice" certified by another CA


@pytest.fixture(scope="module")
def people(ca: CA, issue: IssueFn, issue_other: IssueFn) -> People:
    return People(make_party(issue, ca.cert, "alice"), make_party(issue, ca.cert, "bob"),
                  make_party(issue, ca.cert, "carol"),
                  make_party(issue_other, ca.cert, "alice"))  # fmt: skip


def entry(
    party: Party, display: str, seq: int = 1, listed: bool = True, expires: float = NOW + 3600
) -> dict[str, str]:
    return directory.make(party.key, party.cert, party.name, display, seq, expires, listed)


# ------------------------------------------------------------------ names and keys


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("Alice Liddell", "alice liddell"),
        ("  ÉLODIE\t\u00a0Müller ", "elodie muller"),
        ("O'Brien-Smith", "obrien smith"),
        ("Straße", "strasse"),
        ("ＡＬＩＣＥ", "alice"),  # full-width letters
        ("Zoë\u200b!", "zoe"),  # a zero-width space and punctuation
    ],
)
def test_names_compare_without_case_accents_or_extra_spaces(text: str, normal: str) -> None:
    assert directory.normalize(text) == normal


@pytest.mark.parametrize("bad", ["", "   ", "x" * 65, "a\x07b", "!!", "é"])
def test_unusable_display_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidDisplayName):
        directory.check_display(bad)


def test_keys_cover_every_word_start_and_the_user_name_within_bounds() -> None:
    keys = directory.keys_for("alice", "Alice Pleasance Liddell")
    for wanted in ("al", "alice", "alice pl", "pl", "pleasanc", "li", "liddell"):
        assert "dir/" + wanted in keys
    assert "dir/a" not in keys  # shorter than a query may be
    assert "dir/alice ple" not in keys  # longer than the longest indexed prefix
    assert len(keys) == len(set(keys)) <= (directory.MAX_WORDS + 1) * directory.MAX_PREFIX
    many_words = directory.keys_for("zed", "a b c d e f g h i j k l")
    assert "dir/e f g h" not in many_words  # only the first words start terms


def test_a_query_reads_the_key_of_its_first_characters() -> None:
    assert directory.query_key("Alice Lid") == ("alice lid", "dir/alice li")
    assert directory.query_key(" LI ") == ("li", "dir/li")
    with pytest.raises(InvalidDisplayName):
        directory.query_key("a")


# ------------------------------------------------------------------ signed entries


def test_an_entry_verifies_against_the_ca(people: People, ca: CA) -> None:
    checked = directory.verify_untrusted(entry(people.alice, " Alice  Liddell"), ca.cert, NOW)
    assert checked == directory.Entry("alice", "Alice Liddell", True, 1, NOW + 3600)
    assert checked.matches("lid")
    assert checked.matches("ali")
    assert not checked.matches("bo")


def test_forged_entries_are_refused(people: People, ca: CA) -> None:
    genuine = entry(people.alice, "Alice")
    altered = {**genuine, "payload": genuine["payload"].replace("Alice", "Alicia")}
    foreign = entry(people.foreign_alice, "Alice")
    # bob signs an entry claiming to be alice, with his own certificate
    payload = signed.open_document_untrusted(
        people.bob.key.public_key(), directory.CONTEXT, entry(people.bob, "Bob")
    )
    impostor = signed.sign_document(people.bob.key, directory.CONTEXT, {**payload, "user": "alice"})
    for document in (altered, foreign, impostor):
        with pytest.raises(directory.ForgedEntry):
            directory.verify_untrusted(document, ca.cert, NOW)


@pytest.mark.parametrize(
    "document", [None, "x", {}, {"payload": "{}", "signature": ""}, {"payload": "[1]"}]
)
def test_garbage_is_refused(document: Any, ca: CA) -> None:
    with pytest.raises(directory.DirectoryError):
        directory.verify_untrusted(document, ca.cert, NOW)


def test_expired_entries_are_dropped_but_not_counted_as_forged(people: People, ca: CA) -> None:
    old = entry(people.alice, "Alice", expires=NOW - 1)
    with pytest.raises(directory.DirectoryError) as info:
        directory.verify_untrusted(old, ca.cert, NOW)
    assert not isinstance(info.value, directory.ForgedEntry)
    assert directory.select([old], ca.cert, NOW, "al") == ([], 0)


def test_select_keeps_the_newest_listed_entry_per_user(people: People, ca: CA) -> None:
    documents = [
        entry(people.alice, "Alice Old", seq=1),
        entry(people.alice, "Alice Liddell", seq=2),
        entry(people.bob, "Albert Bob", seq=5),
        entry(people.bob, "Albert Bob", seq=6, listed=False),  # bob left the directory
        entry(people.carol, "Alan Carol"),
        entry(people.foreign_alice, "Alina Forged"),
        entry(people.carol, "Zed", seq=0),  # older: carol is "Alan Carol"
    ]
    found, forged = directory.select(documents, ca.cert, NOW, "al")
    assert [(e.user, e.display) for e, _d in found] == [("carol", "Alan Carol"),
                                                        ("alice", "Alice Liddell")]  # fmt: skip
    assert forged == 1
    assert found[1][1] is documents[1]


# ------------------------------------------------------------------ the supernode's core


class Net:
    """Supernode directory cores sharing one in-memory overlay ("the network")."""

    def __init__(self, ca: CA) -> None:
        self.overlay = MemoryIndex()
        self.ca = ca
        self.cores = [Directory(ca.cert) for _ in range(2)]
        self.runners = [DirectoryRunner(self.overlay, core, lambda: None, clock=lambda: NOW)
                        for core in self.cores]  # fmt: skip

    async def settle(self) -> None:
        for _ in range(5):
            for core, runner in zip(self.cores, self.runners, strict=True):
                runner.run(core.actions())
            await asyncio.sleep(0)

    async def publish(self, node: int, subject: str, document: dict[str, Any]) -> list[Any]:
        self.cores[node].message(b"s", subject, {"t": "directory", "entry": document}, NOW)
        await self.settle()
        return [m for _s, m in self.cores[node].pushes()]

    async def search(self, node: int, query: str) -> list[dict[str, Any]]:
        self.cores[node].message(b"q", "dave", {"t": "search", "id": 7, "query": query}, NOW)
        await self.settle()
        return [m for _s, m in self.cores[node].pushes()]


def results(messages: list[dict[str, Any]], ca: CA) -> list[tuple[str, str]]:
    assert all(m["t"] == "search_result" and m["id"] == 7 for m in messages), messages
    out = []
    for m in messages:
        if "entry" in m:
            checked = directory.verify_untrusted(m["entry"], ca.cert, NOW)
            out.append((checked.user, checked.display))
    return out


def test_a_listed_user_is_found_from_another_supernode(people: People, ca: CA) -> None:
    async def body() -> None:
        net = Net(ca)
        (ok,) = await net.publish(0, "alice", entry(people.alice, "Alice Liddell"))
        assert ok["t"] == "directory_ok"
        assert ok["listed"] is True
        assert ok["keys"] == len(directory.keys_for("alice", "Alice Liddell"))
        for query in ("Ali", "lidd", "ALICE LIDDELL", "alice"):
            assert results(await net.search(1, query), ca) == [("alice", "Alice Liddell")], query
        assert await net.search(1, "bob") == [{"t": "search_result", "id": 7, "n": 0,
                                               "more": False}]  # fmt: skip
        assert net.cores[1].counters["searches"] == 5

    asyncio.run(body())


def test_leaving_hides_the_user_at_once(people: People, ca: CA) -> None:
    async def body() -> None:
        net = Net(ca)
        await net.publish(0, "alice", entry(people.alice, "Alice Liddell", seq=1))
        await net.publish(0, "alice", entry(people.alice, "Alice Liddell", seq=2, listed=False))
        assert results(await net.search(1, "ali"), ca) == []
        assert net.cores[0].counters["unlisted"] == 1

    asyncio.run(body())


def test_a_client_lists_only_itself(people: People, ca: CA) -> None:
    async def body() -> None:
        net = Net(ca)
        (error,) = await net.publish(0, "bob", entry(people.alice, "Alice Liddell"))
        assert error["t"] == "error"
        assert "bob sent the entry of alice" in error["message"]
        (error,) = await net.publish(0, "alice", entry(people.foreign_alice, "Alice Liddell"))
        assert error["t"] == "error"
        assert net.cores[0].counters["forged_entries"] == 2
        assert net.overlay.puts == 0
        assert results(await net.search(1, "ali"), ca) == []

    asyncio.run(body())


def test_forged_entries_in_the_overlay_are_dropped_and_counted(people: People, ca: CA) -> None:
    async def body() -> None:
        net = Net(ca)
        await net.overlay.put("dir/al", 1, entry(people.foreign_alice, "Alice Forged"))
        await net.overlay.put("dir/al", 2, {"payload": "{}", "signature": "AAAA"})
        await net.overlay.put("dir/al", 3, entry(people.bob, "Bob"))  # misplaced: does not match
        await net.publish(0, "carol", entry(people.carol, "Alma Carol"))
        assert results(await net.search(1, "al"), ca) == [("carol", "Alma Carol")]
        assert net.cores[1].counters["forged_entries"] == 2

    asyncio.run(body())


def test_results_are_bounded(ca: CA, issue: IssueFn) -> None:
    async def body() -> None:
        net = Net(ca)
        many = [make_party(issue, ca.cert, f"al{n:02d}") for n in range(directory.MAX_RESULTS + 3)]
        for party in many:
            document = entry(party, f"Al {party.name}")
            await net.overlay.put("dir/al", directory.value_id(party.name), document)
        messages = await net.search(1, "al")
        assert len(messages) == directory.MAX_RESULTS
        assert all(m["n"] == directory.MAX_RESULTS and m["more"] is True for m in messages)
        assert sorted(m["i"] for m in messages) == list(range(directory.MAX_RESULTS))
        assert [u for u, _d in results(messages, ca)] == [p.name for p in many][
            : directory.MAX_RESULTS
        ]

    asyncio.run(body())


def test_bad_searches_get_an_error(ca: CA) -> None:
    async def body() -> None:
        net = Net(ca)
        for query in ("a", None, "x" * 100):
            net.cores[0].message(b"q", "dave", {"t": "search", "id": 1, "query": query}, NOW)
            ((_s, error),) = net.cores[0].pushes()
            assert error["t"] == "search_error"
        assert net.cores[0].actions() == []

    asyncio.run(body())


def test_a_session_has_a_bounded_number_of_searches_under_way(ca: CA) -> None:
    async def body() -> None:
        core = Directory(ca.cert)
        for i in range(6):
            core.message(b"q", "dave", {"t": "search", "id": i, "query": "alice"}, NOW)
        assert len([a for a in core.actions() if isinstance(a, Get)]) == 4
        assert [m["t"] for _s, m in core.pushes()] == ["search_error"] * 2
        core.drop(b"q")
        core.found(1, [], NOW)  # the session went away: nothing to answer
        assert core.pushes() == []

    asyncio.run(body())


def test_entries_are_kept_until_they_expire(people: People, ca: CA) -> None:
    core = Directory(ca.cert)
    document = entry(people.alice, "Alice", expires=NOW + DAY / 2)
    core.message(b"s", "alice", {"t": "directory", "entry": document}, NOW)
    keeps = core.actions()
    assert {a.key for a in keeps if isinstance(a, Keep)} == set(
        directory.keys_for("alice", "Alice")
    )
    assert {(a.value_id, a.until) for a in keeps if isinstance(a, Keep)} == {
        (directory.value_id("alice"), NOW + DAY / 2)
    }
