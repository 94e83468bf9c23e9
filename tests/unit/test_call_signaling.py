"""Call signaling: invite, ring, answer, reject, cancel, hang up, time-outs, forged invites."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from punchline.call.signaling import Call, CallConfig, CallState, Outgoing
from punchline.crypto import handshake
from punchline.crypto.handshake import HandshakeError
from punchline.identity.certs import Role
from tests.unit.cores import DAY, NOW, Party, make_party

if TYPE_CHECKING:
    from tests.unit.conftest import CA, IssueFn

ALICE_MEDIA = {"candidates": [["192.0.2.1", 5004]]}
BOB_MEDIA = {"candidates": [["198.51.100.7", 6000]]}


@dataclass(frozen=True)
class World:
    ca: CA
    alice: Party
    bob: Party
    carol: Party
    expired_alice: Party
    foreign_alice: Party
    node_alice: Party  # a supernode certificate whose subject is "alice"


@pytest.fixture(scope="module")
def world(ca: CA, issue: IssueFn, issue_other: IssueFn) -> World:
    return World(
        ca=ca,
        alice=make_party(issue, ca.cert, "alice"),
        bob=make_party(issue, ca.cert, "bob"),
        carol=make_party(issue, ca.cert, "carol"),
        expired_alice=make_party(issue, ca.cert, "alice", now=NOW - 2 * DAY),
        foreign_alice=make_party(issue_other, ca.cert, "alice"),
        node_alice=make_party(issue, ca.cert, "alice", (Role.SUPERNODE,)),
    )


def place(
    caller: Party, peer: str = "bob", now: float = NOW, config: CallConfig | None = None
) -> tuple[Call, dict[str, Any]]:
    call = Call.place(caller.identity, caller.name, peer, ALICE_MEDIA, now, config)
    (invite,) = call.outgoing_signals()
    assert invite.to == peer
    return call, invite.body


def ring(
    callee: Party,
    body: dict[str, Any],
    now: float = NOW,
    sender: str = "alice",
    config: CallConfig | None = None,
) -> tuple[Call, dict[str, Any]]:
    return Call.incoming_untrusted(
        callee.identity, callee.name, sender, "laptop", body, now, config
    )


def only(call: Call) -> Outgoing:
    (signal,) = call.outgoing_signals()
    return signal


def state(call: Call) -> CallState:
    """The state, read through a call so mypy does not narrow it across method calls."""
    return call.state


def connected(world: World) -> tuple[Call, Call]:
    caller, invite = place(world.alice)
    callee, answer = ring(world.bob, invite, NOW + 0.1)
    caller.signal_untrusted("phone", only(callee).body, NOW + 0.2)  # ringing
    callee.accept(answer, BOB_MEDIA, NOW + 3)
    caller.signal_untrusted("phone", only(callee).body, NOW + 3.1)  # answer
    assert caller.state is callee.state is CallState.ACTIVE
    return caller, callee


# ------------------------------------------------------------------ the happy path


def test_place_sends_an_invite_carrying_a_hello_for_the_callee(world: World) -> None:
    call = Call.place(world.alice.identity, "alice", "bob", ALICE_MEDIA, NOW)
    assert call.state is CallState.INVITING
    assert call.outgoing
    assert call.peer == "bob"
    (invite,) = call.outgoing_signals()
    assert invite.to == "bob"
    assert invite.to_device is None  # every device of bob's rings
    assert set(invite.body) == {"type", "hello", "media", "call_id"}
    assert invite.body["type"] == "invite"
    assert invite.body["call_id"] == call.call_id
    assert invite.body["media"] == ALICE_MEDIA
    assert invite.body["hello"]["to"] == "bob"
    assert call.next_timer() == NOW + CallConfig().invite_timeout
    assert call.outgoing_signals() == []
    assert call.keys is None


def test_call_ids_are_fresh(world: World) -> None:
    ids = {place(world.alice)[0].call_id for _ in range(20)}
    assert len(ids) == 20


def test_incoming_invite_gives_an_incoming_call_that_rings_back(world: World) -> None:
    caller, invite = place(world.alice)
    callee, answer = ring(world.bob, invite, NOW + 0.5)
    assert callee.state is CallState.INCOMING
    assert not callee.outgoing
    assert callee.call_id == caller.call_id
    assert (callee.peer, callee.peer_device) == ("alice", "laptop")
    assert callee.peer_media == ALICE_MEDIA
    assert callee.next_timer() == NOW + 0.5 + CallConfig().ring_timeout
    assert only(callee) == Outgoing("alice", {"type": "ringing", "call_id": caller.call_id},
                                    "laptop")  # fmt: skip
    assert set(answer) == {"v", "cert", "eph", "nonce", "to", "ts", "re", "sig"}
    assert answer["to"] == "alice"


def test_ringing_moves_the_caller_to_ringing_with_the_ring_timeout(world: World) -> None:
    caller, invite = place(world.alice)
    callee, _ = ring(world.bob, invite)
    ringing = only(callee).body
    caller.signal_untrusted("phone", ringing, NOW + 1)
    assert caller.state is CallState.RINGING
    assert caller.next_timer() == NOW + 1 + CallConfig().ring_timeout
    caller.signal_untrusted("tablet", ringing, NOW + 5)  # a second device rings
    assert caller.next_timer() == NOW + 1 + CallConfig().ring_timeout


def test_accept_and_answer_give_both_sides_the_same_keys(world: World) -> None:
    caller, invite = place(world.alice)
    callee, answer = ring(world.bob, invite, NOW + 0.1)
    callee.outgoing_signals()
    callee.accept(answer, BOB_MEDIA, NOW + 3)
    assert callee.state is CallState.ACTIVE
    assert callee.connected_at == NOW + 3
    reply = only(callee)
    assert reply.to == "alice"
    assert reply.to_device == "laptop"
    assert reply.body == {"type": "answer", "answer": answer, "media": BOB_MEDIA,
                          "call_id": caller.call_id}  # fmt: skip
    caller.signal_untrusted("phone", reply.body, NOW + 3.2)  # answered without a ringing first
    assert caller.state is CallState.ACTIVE
    assert caller.connected_at == NOW + 3.2
    assert caller.peer_device == "phone"
    assert caller.peer_media == BOB_MEDIA
    assert caller.keys is not None
    assert callee.keys is not None
    assert caller.keys.send == callee.keys.receive
    assert caller.keys.receive == callee.keys.send
    assert caller.keys.session_id == callee.keys.session_id
    assert caller.next_timer() == callee.next_timer() == float("inf")
    assert caller.outgoing_signals() == []


def test_a_second_answer_after_connecting_is_ignored(world: World) -> None:
    caller, invite = place(world.alice)
    phone, phone_answer = ring(world.bob, invite)
    desk, desk_answer = ring(world.bob, invite)  # a forked invite: two devices
    phone.outgoing_signals()
    desk.outgoing_signals()
    phone.accept(phone_answer, BOB_MEDIA, NOW + 1)
    desk.accept(desk_answer, BOB_MEDIA, NOW + 1)
    caller.signal_untrusted("phone", only(phone).body, NOW + 2)
    keys = caller.keys
    caller.signal_untrusted("desk", only(desk).body, NOW + 2)
    assert caller.keys is keys
    assert caller.peer_device == "phone"
    assert caller.state is CallState.ACTIVE


# ------------------------------------------------------------------ ending calls


def test_reject_ends_both_sides_with_the_reason(world: World) -> None:
    caller, invite = place(world.alice)
    callee, _ = ring(world.bob, invite)
    callee.outgoing_signals()
    callee.reject("in a meeting", NOW + 2)
    assert callee.state is CallState.ENDED
    assert callee.end_reason == "in a meeting"
    assert callee.ended_at == NOW + 2
    signal = only(callee)
    assert signal.body == {"type": "reject", "reason": "in a meeting", "call_id": caller.call_id}
    assert signal.to_device == "laptop"
    caller.signal_untrusted("phone", signal.body, NOW + 2.1)
    assert caller.state is CallState.ENDED
    assert caller.end_reason == "in a meeting"
    assert caller.ended_at == NOW + 2.1
    assert caller.connected_at is None


def test_busy_from_a_device_already_in_a_call(world: World) -> None:
    caller, invite = place(world.alice)
    busy = {"type": "reject", "reason": "busy", "call_id": invite["call_id"]}
    caller.signal_untrusted("phone", busy, NOW + 1)
    # another device may still ring: the call waits a moment before giving up
    assert caller.next_timer() == NOW + 1 + CallConfig().busy_grace
    caller.handle_timer(NOW + 1 + CallConfig().busy_grace - 0.01)
    assert state(caller) is CallState.INVITING
    caller.handle_timer(caller.next_timer())
    assert (caller.state, caller.end_reason) == (CallState.ENDED, "busy")
    assert caller.ended_at == NOW + 1 + CallConfig().busy_grace
    assert caller.next_timer() == float("inf")


def test_reject_reasons_are_cut_short(world: World) -> None:
    caller, _ = place(world.alice)
    caller.signal_untrusted("phone", {"type": "reject", "reason": "x" * 500}, NOW)
    assert caller.end_reason == "x" * 40
    other, _ = place(world.alice)
    other.signal_untrusted("phone", {"type": "reject"}, NOW)
    assert other.end_reason == "rejected"


@pytest.mark.parametrize("ringing", [False, True])
def test_caller_hanging_up_before_an_answer_cancels(world: World, ringing: bool) -> None:
    caller, invite = place(world.alice)
    callee, _ = ring(world.bob, invite)
    if ringing:
        caller.signal_untrusted("phone", only(callee).body, NOW + 1)
    caller.hangup(NOW + 2)
    assert caller.state is CallState.ENDED
    assert caller.end_reason == "hung up"
    cancel = only(caller)
    assert cancel.body == {"type": "cancel", "reason": "hung up", "call_id": caller.call_id}
    assert cancel.to_device is None  # every ringing device must stop
    callee.signal_untrusted("laptop", cancel.body, NOW + 2.1)
    assert (callee.state, callee.end_reason) == (CallState.ENDED, "cancelled")


def test_hanging_up_an_active_call(world: World) -> None:
    caller, callee = connected(world)
    caller.hangup(NOW + 60)
    bye = only(caller)
    assert bye.body == {"type": "hangup", "reason": "hung up", "call_id": caller.call_id}
    assert bye.to_device == "phone"
    assert caller.ended_at == NOW + 60
    callee.signal_untrusted("laptop", bye.body, NOW + 60.1)
    assert (callee.state, callee.end_reason) == (CallState.ENDED, "peer hung up")
    assert callee.ended_at == NOW + 60.1


def test_the_callee_hanging_up_while_ringing_declines(world: World) -> None:
    _, invite = place(world.alice)
    callee, _ = ring(world.bob, invite)
    callee.outgoing_signals()
    callee.hangup(NOW + 1)
    assert only(callee).body["type"] == "reject"
    assert callee.end_reason == "declined"


def test_ending_twice_sends_one_signal(world: World) -> None:
    caller, _ = connected(world)
    caller.hangup(NOW + 10)
    caller.hangup(NOW + 11)
    caller.handle_timer(NOW + 1000)
    assert len(caller.outgoing_signals()) == 1
    assert caller.ended_at == NOW + 10


def test_accept_and_reject_only_act_on_incoming_calls(world: World) -> None:
    caller, invite = place(world.alice)
    caller.outgoing_signals()
    caller.accept({}, BOB_MEDIA, NOW)
    caller.reject("no", NOW)
    assert caller.state is CallState.INVITING
    assert caller.outgoing_signals() == []
    callee, answer = ring(world.bob, invite)
    callee.hangup(NOW + 1)
    callee.outgoing_signals()
    callee.accept(answer, BOB_MEDIA, NOW + 2)
    assert callee.state is CallState.ENDED
    assert callee.outgoing_signals() == []


def test_unreachable_ends_only_a_call_still_being_set_up(world: World) -> None:
    caller, _ = place(world.alice)
    caller.unreachable("bob is offline or unknown", NOW + 1)
    assert (caller.state, caller.end_reason) == (CallState.ENDED, "bob is offline or unknown")
    active, _ = connected(world)
    active.unreachable("late", NOW + 5)
    assert active.state is CallState.ACTIVE


def test_a_signal_after_the_call_ended_changes_nothing(world: World) -> None:
    caller, callee = connected(world)
    caller.hangup(NOW + 10)
    callee.hangup(NOW + 10)  # both hang up at once; the signals cross
    caller.signal_untrusted("phone", only(callee).body, NOW + 10.1)
    assert caller.end_reason == "hung up"
    assert caller.ended_at == NOW + 10


# ------------------------------------------------------------------ time-outs


def test_invite_timeout_cancels_and_ends(world: World) -> None:
    caller, _ = place(world.alice, config=CallConfig(invite_timeout=4, ring_timeout=30))
    caller.handle_timer(NOW + 3.99)
    assert state(caller) is CallState.INVITING
    assert caller.outgoing_signals() == []
    caller.handle_timer(caller.next_timer())
    assert state(caller) is CallState.ENDED
    assert caller.ended_at == NOW + 4
    assert "no answer" in caller.end_reason
    assert only(caller).body == {"type": "cancel", "reason": "timeout",
                                 "call_id": caller.call_id}  # fmt: skip
    assert caller.next_timer() == float("inf")


def test_ring_timeout_on_the_caller(world: World) -> None:
    config = CallConfig(invite_timeout=4, ring_timeout=30)
    caller, invite = place(world.alice, config=config)
    callee, _ = ring(world.bob, invite, config=config)
    caller.signal_untrusted("phone", only(callee).body, NOW + 3)
    caller.handle_timer(NOW + 10)  # past the invite timeout: ringing replaced it
    assert caller.state is CallState.RINGING
    assert caller.next_timer() == NOW + 33
    caller.handle_timer(NOW + 33)
    assert (caller.state, caller.end_reason) == (CallState.ENDED, "not answered")
    assert only(caller).body["type"] == "cancel"


def test_ring_timeout_on_the_callee(world: World) -> None:
    _, invite = place(world.alice)
    callee, answer = ring(world.bob, invite, config=CallConfig(ring_timeout=20))
    callee.outgoing_signals()
    callee.handle_timer(NOW + 19)
    assert state(callee) is CallState.INCOMING
    callee.handle_timer(NOW + 20)
    assert (callee.state, callee.end_reason) == (CallState.ENDED, "not answered")
    assert callee.outgoing_signals() == []  # the caller times out on its own
    callee.accept(answer, BOB_MEDIA, NOW + 21)
    assert state(callee) is CallState.ENDED


def test_an_active_call_has_no_timer(world: World) -> None:
    caller, callee = connected(world)
    for call in (caller, callee):
        call.handle_timer(NOW + 10_000)
        assert call.state is CallState.ACTIVE
        assert call.next_timer() == float("inf")


def test_timer_after_handling_lies_ahead(world: World) -> None:
    caller, _ = place(world.alice)
    due = caller.next_timer()
    caller.handle_timer(due)
    assert caller.next_timer() > due


# ------------------------------------------------------------------ forged and broken invites


def refused(call: Any, check: str | None = None) -> None:
    with pytest.raises(HandshakeError) as info:
        call()
    if check is not None:
        assert info.value.check == check, str(info.value)


def test_an_invite_addressed_to_another_user_is_refused(world: World) -> None:
    _, invite = place(world.alice, peer="carol")
    refused(lambda: ring(world.bob, invite), "recipient")


def test_an_invite_signed_by_someone_else_than_the_sender_is_refused(world: World) -> None:
    _, invite = place(world.carol)  # carol's hello, but the supernode says alice sent it
    refused(lambda: ring(world.bob, invite, sender="alice"))


def test_an_invite_with_an_expired_certificate_is_refused(world: World) -> None:
    _, invite = place(world.expired_alice)
    refused(lambda: ring(world.bob, invite), "certificate")


def test_an_invite_from_another_ca_is_refused(world: World) -> None:
    _, invite = place(world.foreign_alice)
    refused(lambda: ring(world.bob, invite), "certificate")


def test_an_invite_from_a_non_user_certificate_is_refused(world: World) -> None:
    _, invite = place(world.node_alice)
    refused(lambda: ring(world.bob, invite), "certificate")


def test_a_stale_invite_is_refused(world: World) -> None:
    _, invite = place(world.alice)
    refused(lambda: ring(world.bob, invite, now=NOW + 600), "timestamp")


def test_a_session_hello_is_not_an_invite(world: World) -> None:
    pending = handshake.start(world.alice.key, world.alice.cert, "session", "bob", NOW)
    body = {"type": "invite", "call_id": "c1", "hello": pending.hello, "media": {}}
    refused(lambda: ring(world.bob, body), "signature")


def test_an_invite_with_an_altered_hello_is_refused(world: World) -> None:
    _, invite = place(world.alice)
    hello = dict(invite["hello"])
    hello["ts"] += 1
    refused(lambda: ring(world.bob, {**invite, "hello": hello}), "signature")


@pytest.mark.parametrize(
    "change",
    [
        {"call_id": None},
        {"call_id": ""},
        {"call_id": "x" * 65},
        {"call_id": 5},
        {"hello": None},
        {"hello": "garbage"},
        {"hello": {}},
        {"hello": [1, 2]},
    ],
)
def test_garbage_invites_are_refused(world: World, change: dict[str, Any]) -> None:
    _, invite = place(world.alice)
    body = {k: v for k, v in {**invite, **change}.items() if v is not None}
    refused(lambda: ring(world.bob, body))


def test_a_media_field_that_is_not_an_object_is_ignored(world: World) -> None:
    _, invite = place(world.alice)
    callee, _ = ring(world.bob, {**invite, "media": "lots"})
    assert callee.peer_media == {}


# ------------------------------------------------------------------ forged and broken answers


def test_an_answer_from_the_wrong_user_is_ignored(world: World) -> None:
    caller, invite = place(world.alice)
    # carol got hold of the hello and answers it herself, posing as bob's device
    _, _, forged = handshake.answer_untrusted(
        invite["hello"], world.carol.key, world.carol.cert, world.ca.cert, "call", "bob", NOW,
        Role.USER,
    )  # fmt: skip
    body = {"type": "answer", "answer": forged, "media": {}, "call_id": caller.call_id}
    caller.signal_untrusted("phone", body, NOW + 1)
    assert caller.state.value == "inviting"  # unauthenticated input cannot end the call
    assert caller.rejected_answers == 1
    assert "carol" in caller.problem
    assert caller.keys is None
    assert caller.connected_at is None
    # bob's genuine answer still connects
    _, genuine = ring(world.bob, invite)
    caller.signal_untrusted("phone", {"type": "answer", "answer": genuine}, NOW + 2)
    assert caller.state is CallState.ACTIVE


def test_an_answer_to_another_call_is_ignored(world: World) -> None:
    caller, _ = place(world.alice)
    _, other_invite = place(world.alice)
    _, answer = ring(world.bob, other_invite)
    caller.signal_untrusted("phone", {"type": "answer", "answer": answer}, NOW + 1)
    assert caller.problem.startswith("answer rejected")
    assert caller.state is CallState.INVITING
    assert caller.keys is None


@pytest.mark.parametrize("answer", [None, "x", {}, {"v": 1}])
def test_a_garbage_answer_is_ignored(world: World, answer: object) -> None:
    caller, _ = place(world.alice)
    caller.signal_untrusted("phone", {"type": "answer", "answer": answer}, NOW + 1)
    assert caller.state is CallState.INVITING
    assert caller.rejected_answers == 1
    assert caller.problem.startswith("answer rejected")


def test_the_callee_ignores_answers_and_ringing(world: World) -> None:
    _, invite = place(world.alice)
    callee, answer = ring(world.bob, invite)
    callee.signal_untrusted("laptop", {"type": "answer", "answer": answer}, NOW)
    callee.signal_untrusted("laptop", {"type": "ringing"}, NOW)
    assert callee.state is CallState.INCOMING


# ------------------------------------------------------------------ fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=10,
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["invite", "ringing", "answer", "reject", "hangup", "cancel"])
        | json_values,
        "call_id": st.text(max_size=70) | json_values,
        "hello": json_values,
        "answer": json_values,
        "media": json_values,
        "reason": json_values,
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_incoming_untrusted_only_raises_handshake_error(body: dict[str, Any]) -> None:
    party = _FUZZ_BOB
    try:
        call, _ = Call.incoming_untrusted(party.identity, "bob", "alice", "x", body, NOW)
    except HandshakeError:
        return
    raise AssertionError(f"accepted a fuzzed invite: {call}")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(bodies, max_size=4), start_ringing=st.booleans())
def test_caller_signal_untrusted_never_raises(
    batch: list[dict[str, Any]], start_ringing: bool
) -> None:
    caller = Call.place(_FUZZ_ALICE.identity, "alice", "bob", {}, NOW)
    if start_ringing:
        caller.signal_untrusted("d", {"type": "ringing"}, NOW)
    for body in batch:
        caller.signal_untrusted("d", body, NOW + 1)
        assert caller.state in {CallState.INVITING, CallState.RINGING, CallState.ENDED}
        assert caller.keys is None


def _fuzz_parties() -> tuple[Party, Party]:
    from punchline.identity import certs, keys

    ca_key = keys.generate()
    ca = certs.create_ca(ca_key, NOW)

    def party(name: str) -> Party:
        key = keys.generate()
        cert = certs.issue(ca_key, ca, name, key.public_key(), [Role.USER], NOW, DAY)
        return Party(name, key, cert, ca)

    return party("alice"), party("bob")


_FUZZ_ALICE, _FUZZ_BOB = _fuzz_parties()
