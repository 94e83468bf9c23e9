"""Presence records: signed by their user, verified against the CA alone, strict on every field."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from punchline.errors import RemoteError
from punchline.identity import signed
from punchline.identity.certs import Role
from punchline.wire import presence
from punchline.wire.presence import Presence, PresenceError, freshest, verify_untrusted
from tests.unit.cores import DAY, NOW, Party, make_party, node_info

if TYPE_CHECKING:
    from tests.unit.conftest import CA, IssueFn

SN = node_info("sn-a", ("198.51.100.1", 7000))


@dataclass(frozen=True)
class World:
    ca: CA
    other_ca: CA
    alice: Party
    bob: Party
    foreign_alice: Party
    node_alice: Party
    expired_alice: Party
    future_alice: Party


@pytest.fixture(scope="module")
def world(ca: CA, other_ca: CA, issue: IssueFn, issue_other: IssueFn) -> World:
    return World(
        ca=ca,
        other_ca=other_ca,
        alice=make_party(issue, ca.cert, "alice"),
        bob=make_party(issue, ca.cert, "bob"),
        foreign_alice=make_party(issue_other, ca.cert, "alice"),
        node_alice=make_party(issue, ca.cert, "alice", (Role.SUPERNODE,)),
        expired_alice=make_party(issue, ca.cert, "alice", now=NOW - 2 * DAY),
        future_alice=make_party(issue, ca.cert, "alice", now=NOW + 2 * DAY),
    )


def make(party: Party, device: str = "laptop", seq: int = 1, **kwargs: Any) -> dict[str, str]:
    args: dict[str, Any] = {"supernode": SN, "expires": NOW + 3600, "status": "online"}
    args.update(kwargs)
    last_seen = args.get("last_seen", NOW - 60 if args["status"] == "offline" else None)
    return presence.make(party.key, party.cert, party.name, device, args["supernode"], seq,
                         args["expires"], args["status"], last_seen)  # fmt: skip


def payload_of(party: Party, **overrides: Any) -> dict[str, Any]:
    """The payload `make` would sign; keys set to `...` in overrides are removed."""
    payload: dict[str, Any] = {
        "v": 1,
        "user": party.name,
        "device": "laptop",
        "cert": base64.b64encode(party.cert.public_bytes(Encoding.DER)).decode(),
        "supernode": SN,
        "status": "online",
        "seq": 1,
        "expires": NOW + 3600,
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not ...}


def signed_by(party: Party, payload: dict[str, Any], context: str = "presence") -> dict[str, str]:
    return signed.sign_document(party.key, context, payload)


def rejected(record: object, world: World, now: float = NOW, user: str | None = None) -> str:
    with pytest.raises(PresenceError) as info:
        verify_untrusted(record, world.ca.cert, now, user)
    return str(info.value)


# ------------------------------------------------------------------ round trip


def test_make_and_verify_round_trip(world: World) -> None:
    record = make(world.alice, "laptop", seq=7, status="away")
    assert set(record) == {"payload", "signature"}
    checked = verify_untrusted(record, world.ca.cert, NOW)
    assert checked == Presence(
        user="alice",
        device="laptop",
        supernode=SN,
        status="away",
        seq=7,
        expires=NOW + 3600,
        certificate_der=world.alice.cert.public_bytes(Encoding.DER),
    )
    assert verify_untrusted(record, world.ca.cert, NOW, "alice") == checked


def test_records_survive_json_transport(world: World) -> None:
    record = json.loads(json.dumps(make(world.alice)))
    assert verify_untrusted(record, world.ca.cert, NOW).user == "alice"


@pytest.mark.parametrize("status", sorted(presence.STATUSES))
def test_every_status_verifies(world: World, status: str) -> None:
    assert verify_untrusted(make(world.alice, status=status), world.ca.cert, NOW).status == status


def test_expiry_is_inclusive(world: World) -> None:
    record = make(world.alice, expires=NOW)
    assert verify_untrusted(record, world.ca.cert, NOW).expires == NOW
    assert "expired" in rejected(record, world, now=NOW + 0.5)


def test_integer_expiry_becomes_float(world: World) -> None:
    checked = verify_untrusted(make(world.alice, expires=int(NOW) + 60), world.ca.cert, NOW)
    assert isinstance(checked.expires, float)


def test_the_error_is_a_remote_error() -> None:
    assert issubclass(PresenceError, RemoteError)


# ------------------------------------------------------------------ forgeries


def test_asking_for_another_user_is_refused(world: World) -> None:
    assert "bob" in rejected(make(world.alice), world, user="bob")


def test_an_altered_payload_is_refused(world: World) -> None:
    record = dict(make(world.alice, seq=1))
    record["payload"] = record["payload"].replace('"seq":1', '"seq":99')
    rejected(record, world)


def test_a_signature_from_another_record_is_refused(world: World) -> None:
    first, second = make(world.alice, seq=1), make(world.alice, seq=2)
    rejected({"payload": first["payload"], "signature": second["signature"]}, world)


@pytest.mark.parametrize("signature", [None, "", "!!!", "A" * 88, 5, "A" * 300])
def test_a_missing_or_garbage_signature_is_refused(world: World, signature: object) -> None:
    record: dict[str, object] = dict(make(world.alice))
    record["signature"] = signature
    rejected(record, world)


def test_alices_record_signed_with_bobs_key_is_refused(world: World) -> None:
    record = presence.make(world.bob.key, world.alice.cert, "alice", "laptop", SN, 1, NOW + 60)
    rejected(record, world)


def test_bob_signing_a_record_for_alice_is_refused(world: World) -> None:
    record = presence.make(world.bob.key, world.bob.cert, "alice", "laptop", SN, 1, NOW + 60)
    message = rejected(record, world)
    assert "alice" in message
    assert "bob" in message


def test_a_record_signed_for_another_purpose_is_refused(world: World) -> None:
    rejected(signed_by(world.alice, payload_of(world.alice), context="handshake"), world)


def test_a_certificate_of_another_ca_is_refused(world: World) -> None:
    rejected(make(world.foreign_alice), world)
    # and the other CA accepts it: the record itself is fine
    assert verify_untrusted(make(world.foreign_alice), world.other_ca.cert, NOW).user == "alice"


def test_a_non_user_certificate_is_refused(world: World) -> None:
    rejected(make(world.node_alice), world)


@pytest.mark.parametrize("who", ["expired_alice", "future_alice"])
def test_a_certificate_outside_its_validity_is_refused(world: World, who: str) -> None:
    rejected(make(getattr(world, who)), world)


def test_an_expired_record_is_refused(world: World) -> None:
    assert "expired" in rejected(make(world.alice, expires=NOW - 1), world)


# ------------------------------------------------------------------ malformed fields


@pytest.mark.parametrize(
    "overrides",
    [
        {"user": ...},
        {"user": 5},
        {"device": ...},
        {"device": ""},
        {"device": "d" * 65},
        {"device": 7},
        {"supernode": ...},
        {"supernode": "sn-a"},
        {"supernode": ["sn-a"]},
        {"status": ...},
        {"status": "dancing"},
        {"status": None},
        {"seq": ...},
        {"seq": -1},
        {"seq": True},
        {"seq": "1"},
        {"seq": 1.5},
        {"expires": ...},
        {"expires": "tomorrow"},
        {"expires": True},
        {"expires": None},
        {"cert": ...},
        {"cert": "not base64!"},
        {"cert": base64.b64encode(b"\x30\x03junk").decode()},
        {"cert": 5},
    ],
    ids=repr,
)
def test_malformed_fields_are_refused(world: World, overrides: dict[str, Any]) -> None:
    rejected(signed_by(world.alice, payload_of(world.alice, **overrides)), world)


def test_longest_device_name_is_accepted(world: World) -> None:
    record = signed_by(world.alice, payload_of(world.alice, device="d" * 64))
    assert verify_untrusted(record, world.ca.cert, NOW).device == "d" * 64


@pytest.mark.parametrize(
    "record",
    [
        None,
        "record",
        [1, 2],
        {},
        {"payload": 5, "signature": "x"},
        {"payload": "not json", "signature": "x"},
        {"payload": "[1,2]", "signature": "x"},
        {"payload": "{}", "signature": "x"},
        {"payload": '{"cert":"AAAA"}', "signature": "x"},
    ],
)
def test_records_that_are_not_signed_documents_are_refused(world: World, record: object) -> None:
    rejected(record, world)


def test_deeply_nested_payload_raises_only_presence_error(world: World) -> None:
    rejected({"payload": "[" * 100_000, "signature": "x"}, world)


# ------------------------------------------------------------------ freshest


def _p(device: str, seq: int) -> Presence:
    return Presence("alice", device, SN, "online", seq, NOW + 60, b"")


def test_newer_than_compares_sequence_numbers() -> None:
    assert _p("a", 2).newer_than(_p("a", 1))
    assert not _p("a", 1).newer_than(_p("a", 1))
    assert not _p("a", 1).newer_than(_p("a", 2))


def test_freshest_keeps_the_highest_seq_per_device_sorted_by_device() -> None:
    records = [_p("phone", 3), _p("laptop", 9), _p("phone", 5), _p("laptop", 2), _p("desk", 1)]
    assert freshest(records) == [_p("desk", 1), _p("laptop", 9), _p("phone", 5)]
    assert freshest([]) == []


def test_freshest_keeps_the_first_of_equal_seqs() -> None:
    first = _p("phone", 4)
    second = replace(first, status="busy")
    assert freshest([first, second]) == [first]


def test_freshest_over_verified_records(world: World) -> None:
    records = [
        verify_untrusted(make(world.alice, "phone", seq=s), world.ca.cert, NOW) for s in (1, 3, 2)
    ]
    (best,) = freshest(records)
    assert best.seq == 3


@settings(max_examples=100)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 50)), max_size=12))
def test_freshest_property(pairs: list[tuple[str, int]]) -> None:
    result = freshest([_p(d, s) for d, s in pairs])
    assert [r.device for r in result] == sorted({d for d, _ in pairs})
    for r in result:
        assert r.seq == max(s for d, s in pairs if d == r.device)


# ------------------------------------------------------------------ fuzzing

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["v", "user", "device", "cert", "supernode", "status", "seq", "expires", "signature"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries({"payload": st.text(max_size=40), "signature": json_values}),
        st.fixed_dictionaries(
            {
                "payload": st.dictionaries(field_names, json_values, max_size=8).map(json.dumps),
                "signature": st.text(max_size=90),
            }
        ),
    )
)
def test_verify_untrusted_on_arbitrary_objects_only_raises_presence_error(record: object) -> None:
    with pytest.raises(PresenceError):
        verify_untrusted(record, _FUZZ.ca, NOW)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(field_names, json_values, max_size=8))
def test_validly_signed_garbage_only_raises_presence_error(overrides: dict[str, Any]) -> None:
    record = signed_by(_FUZZ, payload_of(_FUZZ, **overrides))
    try:
        checked = verify_untrusted(record, _FUZZ.ca, NOW)
    except PresenceError:
        return
    assert checked.user == "alice"
    assert 0 < len(checked.device) <= 64
    assert checked.status in presence.STATUSES
    assert checked.seq >= 0
    assert checked.expires >= NOW


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_change_to_a_signed_payload_is_refused(data: st.DataObject) -> None:
    record = _FUZZ_RECORD
    text = record["payload"]
    i = data.draw(st.integers(0, len(text) - 1))
    char = data.draw(st.characters(codec="utf-8").filter(lambda c: c != text[i]))
    changed = {"payload": text[:i] + char + text[i + 1 :], "signature": record["signature"]}
    with pytest.raises(PresenceError):
        verify_untrusted(changed, _FUZZ.ca, NOW)


def _fuzz_party() -> Party:
    from punchline.identity import certs, keys

    ca_key, key = keys.generate(), keys.generate()
    ca = certs.create_ca(ca_key, NOW)
    cert = certs.issue(ca_key, ca, "alice", key.public_key(), [Role.USER], NOW, DAY)
    return Party("alice", key, cert, ca)


_FUZZ = _fuzz_party()
_FUZZ_RECORD = make(_FUZZ)


# ------------------------------------------------------------------ offline records, lookups


def test_an_offline_record_lives_72_hours_and_says_when(world: World) -> None:
    record = presence.make_offline(world.alice.key, world.alice.cert, "alice", "laptop", SN, 8,
                                   NOW)  # fmt: skip
    checked = verify_untrusted(record, world.ca.cert, NOW + 71 * 3600)
    assert (checked.status, checked.last_seen, checked.seq) == ("offline", NOW, 8)
    assert checked.expires == NOW + presence.LAST_SEEN_WINDOW == NOW + 72 * 3600
    with pytest.raises(PresenceError) as info:
        verify_untrusted(record, world.ca.cert, NOW + 73 * 3600)
    assert info.value.kind == "expired"


@pytest.mark.parametrize(
    "overrides",
    [
        {"status": "offline", "last_seen": ...},
        {"last_seen": "yesterday"},
        {"last_seen": True},
        {"last_seen": [1]},
    ],
    ids=repr,
)
def test_offline_records_need_a_well_formed_last_seen(
    world: World, overrides: dict[str, Any]
) -> None:
    record = signed_by(world.alice, payload_of(world.alice, **overrides))
    with pytest.raises(PresenceError) as info:
        verify_untrusted(record, world.ca.cert, NOW)
    assert info.value.kind == "forged"


def test_failures_of_verification_count_as_forged(world: World) -> None:
    for record in (make(world.foreign_alice), make(world.node_alice), {"payload": "{}"}):
        with pytest.raises(PresenceError) as info:
            verify_untrusted(record, world.ca.cert, NOW)
        assert info.value.kind == "forged"


def _at(device: str, seq: int, status: str, last_seen: float | None = None) -> Presence:
    return Presence("alice", device, SN, status, seq, NOW + 60, b"", last_seen)


def test_summary_online_when_any_device_is_reachable() -> None:
    summary = presence.summarize("alice", [
        _at("laptop", 5, "offline", NOW - 100), _at("phone", 3, "away"), _at("desk", 2, "busy"),
    ])  # fmt: skip
    assert summary.status == "busy"  # busy is more available than away
    assert [d.device for d in summary.devices] == ["desk", "phone"]
    assert summary.last_seen is None
    assert summary.as_json()["devices"][0] == {"device": "desk", "status": "busy",
                                                "supernode": "sn-a", "seq": 2}  # fmt: skip


def test_summary_offline_with_the_latest_last_seen_and_higher_seq_wins() -> None:
    summary = presence.summarize("alice", [
        _at("laptop", 5, "online"), _at("laptop", 6, "offline", NOW - 100),
        _at("phone", 9, "offline", NOW - 50), _at("phone", 2, "online"),
    ])  # fmt: skip
    assert (summary.status, summary.last_seen, summary.devices) == ("offline", NOW - 50, [])
    # a stale offline record does not hide a newer online one
    back = presence.summarize("alice", [_at("laptop", 6, "offline", NOW - 100),
                                        _at("laptop", 7, "online")])  # fmt: skip
    assert back.status == "online"
    assert presence.summarize("alice", []).as_json() == {
        "user": "alice", "status": "unknown", "last_seen": None, "devices": []}  # fmt: skip


def test_an_offline_record_cannot_outrank_the_future_or_claim_the_future(world: World) -> None:
    """Checked at its last-seen time (it outlives the day-long certificate), an offline record
    may not carry a sequence number beyond that time, nor a last-seen time to come."""
    ahead = make(world.alice, seq=int((NOW + 3600) * 1000), status="offline", last_seen=NOW)
    assert "impossible" in rejected(ahead, world)
    future = make(world.alice, seq=1, status="offline", last_seen=NOW + 3600)
    assert "impossible" in rejected(future, world)
    # an online record is checked now: past the certificate's day it is refused
    assert "expired" in rejected(make(world.alice, expires=NOW + 3 * DAY), world,
                                 now=NOW + 2 * DAY)  # fmt: skip
