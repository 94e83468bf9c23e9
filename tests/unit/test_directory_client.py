"""The daemon's directory state: what it hands to its supernode, and when."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from punchline.client.directory import DirectoryClient
from punchline.wire import directory
from tests.unit.cores import DAY, NOW, make_party

if TYPE_CHECKING:
    from tests.unit.conftest import CA, IssueFn


def opened(messages: list[dict[str, Any]], ca: CA, now: float = NOW) -> list[tuple[str, bool]]:
    entries = [directory.verify_untrusted(m["entry"], ca.cert, now) for m in messages]
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)  # the last one wins
    return [(e.display, e.listed) for e in entries]


def test_listing_renaming_and_leaving(tmp_path: Path, ca: CA, issue: IssueFn) -> None:
    alice = make_party(issue, ca.cert, "alice")
    client = DirectoryClient(tmp_path)
    assert client.outgoing(alice.identity, "alice", "sn1", NOW) == []  # never listed
    client.list_as(" Alice  Old ", NOW)
    assert opened(client.outgoing(alice.identity, "alice", "sn1", NOW + 1), ca) == [
        ("Alice Old", True)
    ]
    assert client.outgoing(alice.identity, "alice", "sn1", NOW + 2) == []  # it has them
    client.list_as("Alice New", NOW + 3)
    assert opened(client.outgoing(alice.identity, "alice", "sn1", NOW + 3), ca) == [
        ("Alice Old", False), ("Alice New", True)
    ]  # fmt: skip
    # the state survives a restart of the daemon
    again = DirectoryClient(tmp_path)
    assert again.status() == {"listed": True, "display": "Alice New"}
    again.unlist(NOW + 4)
    assert opened(again.outgoing(alice.identity, "alice", "sn1", NOW + 4), ca) == [
        ("Alice New", False), ("Alice Old", False)
    ]  # fmt: skip
    assert DirectoryClient(tmp_path).status() == {"listed": False, "display": None}


def test_entries_follow_the_daemon_and_its_certificate(
    tmp_path: Path, ca: CA, issue: IssueFn
) -> None:
    alice = make_party(issue, ca.cert, "alice")
    client = DirectoryClient(tmp_path)
    client.list_as("Alice", NOW)
    first = client.outgoing(alice.identity, "alice", "sn1", NOW)
    # an entry lives no longer than the certificate in it
    assert directory.verify_untrusted(first[0]["entry"], ca.cert, NOW).expires <= NOW + DAY
    # re-attached elsewhere: the new supernode gets the same entries (its custody takes over)
    assert client.outgoing(alice.identity, "alice", "sn2", NOW + 60) == first
    # a renewed certificate: re-signed with it
    renewed = make_party(issue, ca.cert, "alice", now=NOW + 100)
    resigned = client.outgoing(renewed.identity, "alice", "sn2", NOW + 100)
    assert resigned != first
    assert opened(resigned, ca, NOW + 100) == [("Alice", True)]
    # and well before they expire
    assert client.outgoing(renewed.identity, "alice", "sn2", NOW + 200) == []
    later = NOW + 100 + directory.ENTRY_LIFETIME / 2
    assert len(client.outgoing(renewed.identity, "alice", "sn2", later)) == 1


def test_a_broken_state_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "directory.json").write_text("{not json")
    assert DirectoryClient(tmp_path).status() == {"listed": False, "display": None}
    with pytest.raises(directory.InvalidDisplayName):
        DirectoryClient(tmp_path).list_as("\x00", NOW)
