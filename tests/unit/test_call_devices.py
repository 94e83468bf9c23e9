"""Several devices of one callee: all ring, the first answer wins, the others stop ringing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from punchline.call.signaling import (
    ANSWERED_ELSEWHERE,
    ANSWERED_ON_ANOTHER_DEVICE,
    DECLINED_ELSEWHERE,
    Call,
    CallConfig,
    CallState,
    Outgoing,
)
from punchline.identity.keys import key_id
from tests.unit.cores import NOW, Party, make_party

if TYPE_CHECKING:
    from tests.unit.conftest import CA, IssueFn


@dataclass(frozen=True)
class Devices:
    alice: Party
    phone: Party  # two devices of bob's: one user, two keys
    desk: Party

    def id(self, party: Party) -> str:
        return key_id(party.key.public_key())


@pytest.fixture(scope="module")
def devices(ca: CA, issue: IssueFn) -> Devices:
    return Devices(make_party(issue, ca.cert, "alice"), make_party(issue, ca.cert, "bob"),
                   make_party(issue, ca.cert, "bob"))  # fmt: skip


def place(d: Devices, config: CallConfig | None = None) -> tuple[Call, dict[str, Any]]:
    call = Call.place(d.alice.identity, "alice", "bob", {}, NOW, config)
    (invite,) = call.outgoing_signals()
    assert invite.to_device is None  # to every device of bob's
    return call, invite.body


def ring(party: Party, invite: dict[str, Any], now: float = NOW) -> tuple[Call, dict[str, Any]]:
    return Call.incoming_untrusted(party.identity, "bob", "alice", "laptop", invite, now)


def only(call: Call) -> Outgoing:
    (signal,) = call.outgoing_signals()
    return signal


def state(call: Call) -> CallState:
    return call.state


def both_ringing(d: Devices) -> tuple[Call, Call, Call, dict[str, Any], dict[str, Any]]:
    caller, invite = place(d)
    phone, phone_answer = ring(d.phone, invite, NOW + 0.1)
    desk, desk_answer = ring(d.desk, invite, NOW + 0.2)
    caller.signal_untrusted(d.id(d.phone), only(phone).body, NOW + 0.3)
    caller.signal_untrusted(d.id(d.desk), only(desk).body, NOW + 0.4)
    assert caller.state is CallState.RINGING
    return caller, phone, desk, phone_answer, desk_answer


def test_the_first_answer_wins_and_the_other_device_stops_ringing(devices: Devices) -> None:
    d = devices
    caller, phone, desk, phone_answer, _ = both_ringing(d)
    phone.accept(phone_answer, {}, NOW + 2)
    assert phone.answered_by == d.id(d.phone)
    caller.signal_untrusted(d.id(d.phone), only(phone).body, NOW + 2.1)
    assert caller.state is CallState.ACTIVE
    assert caller.peer_device == caller.answered_by == d.id(d.phone)
    cancel = only(caller)
    assert cancel == Outgoing("bob", {"type": "cancel", "reason": ANSWERED_ELSEWHERE,
                                      "answered_by": d.id(d.phone), "call_id": caller.call_id},
                              d.id(d.desk))  # fmt: skip
    desk.signal_untrusted("laptop", cancel.body, NOW + 2.2)
    assert (desk.state, desk.end_reason) == (CallState.ENDED, ANSWERED_ON_ANOTHER_DEVICE)
    assert desk.answered_by == d.id(d.phone)
    assert desk.outgoing_signals() == []
    assert phone.state is CallState.ACTIVE


def test_a_late_answer_from_another_device_is_refused(devices: Devices) -> None:
    d = devices
    caller, phone, desk, phone_answer, desk_answer = both_ringing(d)
    phone.accept(phone_answer, {}, NOW + 2)
    desk.accept(desk_answer, {}, NOW + 2)  # both answer at once; the desk's arrives second
    caller.signal_untrusted(d.id(d.phone), only(phone).body, NOW + 2.1)
    keys = caller.keys
    cancel = only(caller)
    caller.signal_untrusted(d.id(d.desk), only(desk).body, NOW + 2.2)
    assert caller.keys is keys
    assert caller.peer_device == d.id(d.phone)
    assert caller.outgoing_signals() == []  # the desk was told once already
    desk.signal_untrusted("laptop", cancel.body, NOW + 2.3)
    assert (desk.state, desk.end_reason) == (CallState.ENDED, ANSWERED_ON_ANOTHER_DEVICE)


def test_a_device_that_rings_after_the_answer_is_stopped(devices: Devices) -> None:
    d = devices
    caller, invite = place(d)
    phone, phone_answer = ring(d.phone, invite)
    phone.outgoing_signals()
    phone.accept(phone_answer, {}, NOW + 1)
    caller.signal_untrusted(d.id(d.phone), only(phone).body, NOW + 1.1)  # no ringing first
    assert caller.outgoing_signals() == []  # nobody else was ringing
    desk, _ = ring(d.desk, invite, NOW + 1.2)  # the invite reached the desk late
    caller.signal_untrusted(d.id(d.desk), only(desk).body, NOW + 1.3)
    cancel = only(caller)
    assert (cancel.to_device, cancel.body["reason"]) == (d.id(d.desk), ANSWERED_ELSEWHERE)
    desk.signal_untrusted("laptop", cancel.body, NOW + 1.4)
    assert desk.end_reason == ANSWERED_ON_ANOTHER_DEVICE


def test_other_devices_have_no_say_once_the_call_is_bound(devices: Devices) -> None:
    d = devices
    caller, phone, _, phone_answer, _ = both_ringing(d)
    phone.accept(phone_answer, {}, NOW + 2)
    caller.signal_untrusted(d.id(d.phone), only(phone).body, NOW + 2.1)
    caller.outgoing_signals()
    for kind in ("reject", "hangup", "cancel"):
        caller.signal_untrusted(d.id(d.desk), {"type": kind, "reason": "x"}, NOW + 3)
    assert caller.state is CallState.ACTIVE
    # and a callee listens only to the caller's device that invited it
    phone.signal_untrusted("tablet", {"type": "hangup"}, NOW + 3)
    assert phone.state is CallState.ACTIVE
    caller.hangup(NOW + 4)
    bye = only(caller)
    assert (bye.body["type"], bye.to_device) == ("hangup", d.id(d.phone))
    phone.signal_untrusted("laptop", bye.body, NOW + 4.1)
    assert phone.end_reason == "peer hung up"


def test_the_winner_ignores_a_cancel_that_names_it(devices: Devices) -> None:
    d = devices
    _caller, phone, _desk, phone_answer, _ = both_ringing(d)
    phone.accept(phone_answer, {}, NOW + 2)
    body = {"type": "cancel", "reason": ANSWERED_ELSEWHERE, "answered_by": d.id(d.phone)}
    phone.signal_untrusted("laptop", body, NOW + 2.1)
    assert phone.state is CallState.ACTIVE


def test_busy_on_one_device_does_not_stop_another_from_answering(devices: Devices) -> None:
    d = devices
    caller, invite = place(d)
    busy = {"type": "reject", "reason": "busy", "call_id": caller.call_id}
    caller.signal_untrusted(d.id(d.phone), busy, NOW + 0.1)
    assert caller.next_timer() == NOW + 0.1 + CallConfig().busy_grace
    desk, desk_answer = ring(d.desk, invite, NOW + 0.5)
    caller.signal_untrusted(d.id(d.desk), only(desk).body, NOW + 0.6)
    assert caller.next_timer() == NOW + 0.6 + CallConfig().ring_timeout
    caller.handle_timer(NOW + 5)
    assert state(caller) is CallState.RINGING
    desk.accept(desk_answer, {}, NOW + 6)
    caller.signal_untrusted(d.id(d.desk), only(desk).body, NOW + 6.1)
    assert state(caller) is CallState.ACTIVE
    assert caller.answered_by == d.id(d.desk)
    assert caller.outgoing_signals() == []  # the busy device is in another call: no cancel


def test_a_decline_on_one_device_stops_the_others(devices: Devices) -> None:
    d = devices
    caller, phone, desk, _, _ = both_ringing(d)
    phone.hangup(NOW + 2)  # declines
    caller.signal_untrusted(d.id(d.phone), only(phone).body, NOW + 2.1)
    assert (caller.state, caller.end_reason) == (CallState.ENDED, "declined")
    cancel = only(caller)
    assert (cancel.to_device, cancel.body["reason"]) == (d.id(d.desk), DECLINED_ELSEWHERE)
    desk.signal_untrusted("laptop", cancel.body, NOW + 2.2)
    assert (desk.state, desk.end_reason) == (CallState.ENDED, "declined on another device")
    assert desk.answered_by is None


def test_a_device_ringing_after_the_caller_gave_up_is_stopped(devices: Devices) -> None:
    d = devices
    caller, invite = place(d)
    caller.hangup(NOW + 1)
    assert only(caller).to_device is None  # the cancel goes to every device
    phone, _ = ring(d.phone, invite, NOW + 1.1)  # but this one got the invite after it
    caller.signal_untrusted(d.id(d.phone), only(phone).body, NOW + 1.2)
    cancel = only(caller)
    assert cancel.to_device == d.id(d.phone)
    phone.signal_untrusted("laptop", cancel.body, NOW + 1.3)
    assert (phone.state, phone.end_reason) == (CallState.ENDED, "cancelled")
