"""The sans-I/O TURN client against a TURN server scripted in the test from the STUN codec.

`Server` answers like a well-behaved RFC 8656 server (401 challenge, signed answers, LIFETIME
echoed) and records everything the client sent; tests that need a misbehaving or silent
server answer by hand with the `success`/`error`/`challenge` helpers. Time is a number.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchline.errors import LocalError
from punchline.relay import turn_client
from punchline.relay.connection import ProxyConfig, RelayServer, open_turn
from punchline.relay.turn_client import (
    Allocated,
    AllocationFailed,
    Closed,
    Event,
    PeerData,
    TurnClient,
)
from punchline.wire import channel_data, stun
from punchline.wire.stun import Attr, Class, Message, Method

USER, PASSWORD, REALM = "1700000000:alice", "s3cret", "example.org"
KEY = stun.long_term_key(USER, REALM, PASSWORD)
RELAYED = ("198.51.100.7", 50000)
MAPPED = ("203.0.113.5", 40000)
PEER = ("192.0.2.10", 6000)
PEER2 = ("192.0.2.10", 6001)  # same IP: shares PEER's permission, gets its own channel
OTHER = ("192.0.2.99", 7000)
T0 = 1000.0

Attrs = tuple[tuple[int, bytes], ...]


# ------------------------------------------------------------------ a scripted server


def challenge(request: Message, nonce: bytes = b"nonce-1", realm: str = REALM) -> bytes:
    attributes: Attrs = (
        (Attr.ERROR_CODE, stun.encode_error_code(401, "Unauthorized")),
        (Attr.REALM, realm.encode()),
        (Attr.NONCE, nonce),
    )
    return stun.encode(Message(request.method, Class.ERROR, request.transaction_id, attributes))


def success(request: Message, attributes: Attrs = (), key: bytes | None = KEY) -> bytes:
    msg = Message(request.method, Class.SUCCESS, request.transaction_id, attributes)
    return stun.encode(msg, key)


def error(
    request: Message, code: int, reason: str, key: bytes | None = KEY, extra: Attrs = ()
) -> bytes:
    attributes: Attrs = ((Attr.ERROR_CODE, stun.encode_error_code(code, reason)), *extra)
    return stun.encode(
        Message(request.method, Class.ERROR, request.transaction_id, attributes), key
    )


def allocate_success(request: Message, lifetime: int = 600, key: bytes | None = KEY) -> bytes:
    tid = request.transaction_id
    return success(
        request,
        (
            (Attr.XOR_RELAYED_ADDRESS, stun.encode_xor_address(RELAYED, tid)),
            (Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address(MAPPED, tid)),
            (Attr.LIFETIME, stun.encode_uint32(lifetime)),
        ),
        key,
    )


def peer_of(msg: Message) -> tuple[str, int]:
    return stun.decode_xor_address_untrusted(
        msg.get(Attr.XOR_PEER_ADDRESS) or b"", msg.transaction_id
    )


@dataclass
class Server:
    """Answers every request correctly; records requests, indications and ChannelData."""

    nonce: bytes = b"nonce-1"
    lifetime: int = 600
    silent: set[int] = field(default_factory=set)  # methods it does not answer
    requests: list[Message] = field(default_factory=list)
    indications: list[Message] = field(default_factory=list)
    channel_data: list[tuple[int, bytes]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)

    def handle(self, data: bytes) -> list[bytes]:
        self.raw.append(data)
        if channel_data.is_channel_data(data):
            self.channel_data.append(channel_data.decode_untrusted(data))
            return []
        msg = stun.decode_untrusted(data)
        if msg.cls == Class.INDICATION:
            self.indications.append(msg)
            return []
        self.requests.append(msg)
        if msg.method in self.silent:
            return []
        return [self.answer(msg, data)]

    def answer(self, msg: Message, data: bytes) -> bytes:
        if msg.get(Attr.USERNAME) is None:
            return challenge(msg, self.nonce)
        if msg.get(Attr.NONCE) != self.nonce:  # rotated: 438 tells the new one, unsigned
            return error(msg, 438, "Stale Nonce", key=None, extra=((Attr.NONCE, self.nonce),))
        stun.decode_untrusted(data, KEY)  # raises unless signed with the long-term key
        if msg.method == Method.ALLOCATE:
            return allocate_success(msg, self.lifetime)
        if msg.method == Method.REFRESH:
            asked = stun.decode_uint32_untrusted(msg.get(Attr.LIFETIME) or b"")
            granted = min(asked, self.lifetime)
            return success(msg, ((Attr.LIFETIME, stun.encode_uint32(granted)),))
        return success(msg)

    def of(self, method: int) -> list[Message]:
        return [m for m in self.requests if m.method == method]


def pump(client: TurnClient, server: Server, now: float) -> list[Event]:
    """Carry messages both ways until the client has nothing more to say."""
    while out := client.to_server():
        for data in out:
            for reply in server.handle(data):
                client.receive_untrusted(reply, now)
    return client.events()


def allocated(
    reliable: bool = False, lifetime: int = 600, server: Server | None = None
) -> tuple[TurnClient, Server]:
    client = TurnClient(USER, PASSWORD, T0, reliable=reliable)
    server = server or Server(lifetime=lifetime)
    client.start(T0)
    events = pump(client, server, T0)
    assert events == [Allocated(RELAYED, MAPPED, float(lifetime))]
    return client, server


def sent(client: TurnClient) -> list[Message]:
    return [stun.decode_untrusted(data) for data in client.to_server()]


# ------------------------------------------------------------------ allocation


def test_allocate_is_challenged_then_signed_with_the_long_term_key() -> None:
    client, server = allocated()
    first, second = server.of(Method.ALLOCATE)
    assert first.get(Attr.USERNAME) is None
    assert first.get(Attr.NONCE) is None
    assert (
        stun.decode_requested_transport_untrusted(first.get(Attr.REQUESTED_TRANSPORT) or b"") == 17
    )
    assert stun.decode_uint32_untrusted(first.get(Attr.LIFETIME) or b"") == 600
    assert second.get(Attr.USERNAME) == USER.encode()
    assert second.get(Attr.REALM) == REALM.encode()
    assert second.get(Attr.NONCE) == b"nonce-1"
    assert second.transaction_id != first.transaction_id
    assert (client.relayed, client.mapped, client.state) == (RELAYED, MAPPED, "allocated")
    assert client.counters["sent"] == 2
    assert client.counters["received"] == 2
    assert client.counters["errors"] == 1  # the challenge


def test_stale_nonce_is_retried_with_the_new_nonce() -> None:
    client = TurnClient(USER, PASSWORD, T0)
    client.start(T0)
    (first,) = sent(client)
    client.receive_untrusted(challenge(first, b"old"), T0)
    (signed,) = sent(client)
    assert signed.get(Attr.NONCE) == b"old"
    stale = error(signed, 438, "Stale Nonce", key=None, extra=((Attr.NONCE, b"new"),))
    client.receive_untrusted(stale, T0)
    (again,) = sent(client)
    assert again.get(Attr.NONCE) == b"new"
    assert again.transaction_id != signed.transaction_id
    client.receive_untrusted(allocate_success(again), T0)
    assert client.events() == [Allocated(RELAYED, MAPPED, 600.0)]


def test_a_nonce_rotated_mid_allocation_is_picked_up_by_any_request() -> None:
    client, server = allocated()
    server.nonce = b"nonce-2"
    client.send(b"hi", PEER, T0 + 10)
    pump(client, server, T0 + 10)
    stale, fresh = server.of(Method.CREATE_PERMISSION)
    assert (stale.get(Attr.NONCE), fresh.get(Attr.NONCE)) == (b"nonce-1", b"nonce-2")
    assert [m.get(Attr.DATA) for m in server.indications] == [b"hi"]


def test_stale_nonce_forever_gives_up() -> None:
    client = TurnClient(USER, PASSWORD, T0)
    client.start(T0)
    (request,) = sent(client)
    client.receive_untrusted(challenge(request), T0)
    for i in range(turn_client.MAX_STALE_RETRIES + 1):
        (request,) = sent(client)
        nonce = ((Attr.NONCE, f"n{i}".encode()),)
        client.receive_untrusted(error(request, 438, "Stale Nonce", None, nonce), T0)
    assert client.events() == [AllocationFailed(438, "Stale Nonce")]
    assert client.to_server() == []
    assert client.next_timer() is None


def test_wrong_password_fails_with_401_after_one_signed_try() -> None:
    client = TurnClient(USER, "wrong", T0)
    client.start(T0)
    (request,) = sent(client)
    client.receive_untrusted(challenge(request), T0)
    (signed,) = sent(client)
    assert signed.get(Attr.USERNAME) == USER.encode()
    client.receive_untrusted(challenge(signed, b"nonce-2"), T0)  # unsigned 401 again
    (event,) = client.events()
    assert isinstance(event, AllocationFailed)
    assert event.code == 401
    assert "wrong username or password" in event.reason
    assert client.to_server() == []
    assert client.next_timer() is None


@pytest.mark.parametrize(
    ("code", "reason"), [(486, "Allocation Quota Reached"), (508, "Insufficient Capacity")]
)
def test_signed_refusals_end_the_attempt(code: int, reason: str) -> None:
    client = TurnClient(USER, PASSWORD, T0)
    client.start(T0)
    (request,) = sent(client)
    client.receive_untrusted(challenge(request), T0)
    (signed,) = sent(client)
    client.receive_untrusted(error(signed, code, reason), T0)
    assert client.events() == [AllocationFailed(code, reason)]


def test_unsigned_refusals_of_a_signed_request_are_ignored_as_forged() -> None:
    """Only 400/401/438 may come unsigned; a spoofed 486 must not kill the allocation."""
    client = TurnClient(USER, PASSWORD, T0)
    client.start(T0)
    (request,) = sent(client)
    client.receive_untrusted(challenge(request), T0)
    (signed,) = sent(client)
    client.receive_untrusted(error(signed, 486, "spoofed", key=None), T0)
    client.receive_untrusted(error(signed, 508, "spoofed", key=b"not the key"), T0)
    client.receive_untrusted(allocate_success(signed, key=None), T0)
    client.receive_untrusted(allocate_success(signed, key=b"not the key"), T0)
    assert client.events() == []
    assert client.counters["forged"] == 4
    client.receive_untrusted(allocate_success(signed), T0)
    assert client.events() == [Allocated(RELAYED, MAPPED, 600.0)]


def test_a_server_without_authentication_is_accepted() -> None:
    client = TurnClient(USER, PASSWORD, T0)
    client.start(T0)
    (request,) = sent(client)
    client.receive_untrusted(allocate_success(request, key=None), T0)
    assert client.events() == [Allocated(RELAYED, MAPPED, 600.0)]


def test_udp_retransmits_with_doubling_rto_then_times_out() -> None:
    client = TurnClient(USER, PASSWORD, T0)
    client.start(T0)
    sends = [T0] if client.to_server() else []
    now = T0
    while (due := client.next_timer()) is not None:
        now = due
        client.handle_timer(now)
        if client.to_server():
            sends.append(now)
    offsets = [round(t - T0, 6) for t in sends]
    assert offsets == [0.0, 0.1, 0.3, 0.7, 1.5, 3.1, 6.3]
    assert math.isclose(now - T0, 6.3 + 16 * 0.1)  # Rm * RTO after the last send
    assert client.events() == [AllocationFailed(0, "no answer from the TURN server")]
    assert client.counters["retransmits"] == 6
    assert client.counters["timeouts"] == 1


def test_udp_retransmission_keeps_the_transaction_id_and_a_late_answer_counts() -> None:
    client = TurnClient(USER, PASSWORD, T0)
    client.start(T0)
    (request,) = sent(client)
    client.handle_timer(T0 + 0.1)
    (again,) = sent(client)
    assert again == request
    client.receive_untrusted(challenge(request), T0 + 0.15)
    client.receive_untrusted(challenge(request), T0 + 0.16)  # the answer to the retransmission
    assert client.counters["unexpected"] == 1
    assert len(client.to_server()) == 1  # one signed Allocate, not two


def test_reliable_transport_sends_once_and_waits_five_seconds() -> None:
    client = TurnClient(USER, PASSWORD, T0, reliable=True)
    client.start(T0)
    assert len(client.to_server()) == 1
    assert client.next_timer() == T0 + turn_client.RELIABLE_TIMEOUT
    client.handle_timer(T0 + 4.9)
    assert client.to_server() == []
    assert client.events() == []
    client.handle_timer(T0 + 5.0)
    assert client.to_server() == []
    assert client.events() == [AllocationFailed(0, "no answer from the TURN server")]
    assert client.counters["retransmits"] == 0


# ------------------------------------------------------------------ bad input


def test_responses_nobody_waits_for_are_counted_and_dropped() -> None:
    client, _ = allocated()
    stray = Message(Method.REFRESH, Class.REQUEST, stun.new_transaction_id())
    client.receive_untrusted(success(stray), T0)
    client.receive_untrusted(error(stray, 500, "whatever"), T0)
    request = Message(Method.BINDING, Class.REQUEST, stun.new_transaction_id())
    client.receive_untrusted(stun.encode(request), T0)  # servers do not send us requests
    assert client.counters["unexpected"] == 3
    assert client.events() == []
    assert client.to_server() == []
    assert client.state == "allocated"


def test_a_response_with_the_wrong_method_is_unexpected() -> None:
    client = TurnClient(USER, PASSWORD, T0)
    client.start(T0)
    (request,) = sent(client)
    wrong = Message(Method.REFRESH, Class.ERROR, request.transaction_id, challenge_attrs())
    client.receive_untrusted(stun.encode(wrong), T0)
    assert client.counters["unexpected"] == 1
    assert client.to_server() == []


def challenge_attrs() -> Attrs:
    return (
        (Attr.ERROR_CODE, stun.encode_error_code(401, "Unauthorized")),
        (Attr.REALM, REALM.encode()),
        (Attr.NONCE, b"n"),
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"garbage that is neither STUN nor ChannelData",
        b"\x40\x00\x00\x10abc",  # ChannelData shorter than it claims
        b"\x01\x01\x00\x04\x21\x12\xa4\x42" + bytes(12),  # length past the end
        b"\x01\x01\x00\x00\x00\x00\x00\x00" + bytes(12),  # no magic cookie
    ],
)
def test_malformed_bytes_are_counted_never_raised(data: bytes) -> None:
    client, _ = allocated()
    client.receive_untrusted(data, T0)
    assert client.counters["malformed"] == 1
    assert client.events() == []
    assert client.to_server() == []


def test_corrupted_fingerprint_is_malformed() -> None:
    client = TurnClient(USER, PASSWORD, T0)
    client.start(T0)
    (request,) = sent(client)
    reply = bytearray(challenge(request))
    reply[-1] ^= 1
    client.receive_untrusted(bytes(reply), T0)
    assert client.counters["malformed"] == 1
    assert client.to_server() == []


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    client = TurnClient(USER, PASSWORD, T0)
    client.start(T0)
    client.receive_untrusted(data, T0)
    client.receive_untrusted(b"\x00\x01" + data, T0)
    client.receive_untrusted(b"\x40\x00" + data, T0)


# ------------------------------------------------------------------ peers and data


def test_first_send_installs_permission_and_channel_and_waits_for_the_permission() -> None:
    client, _server = allocated()
    client.send(b"hello", PEER, T0)
    out = sent(client)
    assert [m.method for m in out] == [Method.CREATE_PERMISSION, Method.CHANNEL_BIND]
    permission, bind = out
    assert peer_of(permission)[0] == PEER[0]
    assert peer_of(bind) == PEER
    assert stun.decode_channel_number_untrusted(bind.get(Attr.CHANNEL_NUMBER) or b"") == 0x4000
    assert permission.get(Attr.USERNAME) == USER.encode()  # signed like every request
    # nothing goes to the peer until the server confirms the permission
    client.receive_untrusted(success(permission), T0)
    (indication,) = sent(client)
    assert (indication.method, indication.cls) == (Method.SEND, Class.INDICATION)
    assert peer_of(indication) == PEER
    assert indication.get(Attr.DATA) == b"hello"
    client.send(b"second", PEER, T0)
    (indication,) = sent(client)  # channel not bound yet: still an indication
    assert indication.get(Attr.DATA) == b"second"
    client.receive_untrusted(success(bind), T0)
    client.send(b"third", PEER, T0)
    (data,) = client.to_server()
    assert data == b"\x40\x00\x00\x05third"  # unpadded over UDP
    assert client.counters["send_indications_out"] == 2
    assert client.counters["channel_data_out"] == 1
    assert client.counters["data_out"] == 3


def test_a_second_port_on_the_same_ip_gets_a_channel_but_no_new_permission() -> None:
    client, server = allocated()
    client.send(b"a", PEER, T0)
    pump(client, server, T0)
    client.send(b"b", PEER2, T0)
    out = client.to_server()
    requests = [stun.decode_untrusted(d) for d in out if not channel_data.is_channel_data(d)]
    binds = [m for m in requests if m.method == Method.CHANNEL_BIND]
    assert [m.method for m in requests if m.cls == Class.REQUEST] == [Method.CHANNEL_BIND]
    assert stun.decode_channel_number_untrusted(binds[0].get(Attr.CHANNEL_NUMBER) or b"") == 0x4001
    indications = [m for m in requests if m.cls == Class.INDICATION]
    assert [peer_of(m) for m in indications] == [PEER2]  # the permission covers it already


def test_data_queued_for_a_refused_permission_is_dropped() -> None:
    client, _ = allocated()
    client.send(b"a", OTHER, T0)
    client.send(b"b", OTHER, T0)
    permission, _bind = sent(client)
    client.receive_untrusted(error(permission, 403, "Forbidden"), T0)
    assert client.to_server() == []
    assert client.counters["dropped"] == 2
    client.send(b"c", OTHER, T0 + 1)  # within the hold-off: not asked again
    assert client.to_server() == []
    assert client.counters["dropped"] == 3


def test_the_queue_per_peer_is_bounded() -> None:
    client, _ = allocated()
    for i in range(turn_client.MAX_QUEUED + 5):
        client.send(bytes([i]), PEER, T0)
    permission, _ = sent(client)
    client.receive_untrusted(success(permission), T0)
    indications = sent(client)
    assert len(indications) == turn_client.MAX_QUEUED
    assert indications[0].get(Attr.DATA) == bytes([5])  # the oldest were dropped
    assert client.counters["dropped"] == 5


def test_channel_data_is_padded_on_reliable_transports() -> None:
    client, server = allocated(reliable=True)
    client.send(b"x", PEER, T0)
    pump(client, server, T0)
    client.send(b"hello", PEER, T0)
    (data,) = client.to_server()
    assert data == b"\x40\x00\x00\x05hello\x00\x00\x00"
    assert len(data) % 4 == 0


def data_indication(peer: tuple[str, int], payload: bytes) -> bytes:
    tid = stun.new_transaction_id()
    attributes: Attrs = (
        (Attr.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, tid)),
        (Attr.DATA, payload),
    )
    return stun.encode(Message(Method.DATA, Class.INDICATION, tid, attributes))


def test_peer_data_only_from_peers_with_a_permission() -> None:
    client, server = allocated()
    client.add_peer(PEER, T0)
    pump(client, server, T0)
    client.receive_untrusted(data_indication(PEER2, b"via indication"), T0)  # same IP: allowed
    client.receive_untrusted(channel_data.encode(0x4000, b"via channel"), T0)
    client.receive_untrusted(data_indication(OTHER, b"stranger"), T0)
    client.receive_untrusted(channel_data.encode(0x4123, b"unknown channel"), T0)
    assert client.events() == [
        PeerData(b"via indication", PEER2),
        PeerData(b"via channel", PEER),
    ]
    assert client.counters["no_permission"] == 1
    assert client.counters["unknown_channel"] == 1
    assert client.counters["data_in"] == 2
    assert client.counters["channel_data_in"] == 1


def test_peer_addresses_are_checked_and_normalised() -> None:
    client, server = allocated()
    with pytest.raises(LocalError):
        client.send(b"x", ("example.org", 1), T0)
    with pytest.raises(LocalError):
        client.add_peer(("192.0.2.1", 0), T0)
    with pytest.raises(LocalError):
        client.send(bytes(turn_client.MAX_DATA + 1), PEER, T0)
    client.add_peer(("2001:db8:0::1", 5), T0)
    pump(client, server, T0)
    client.receive_untrusted(data_indication(("2001:db8::1", 5), b"v6"), T0)
    assert client.events() == [PeerData(b"v6", ("2001:db8::1", 5))]


def test_sending_before_the_allocation_is_a_local_error() -> None:
    client = TurnClient(USER, PASSWORD, T0)
    client.start(T0)
    with pytest.raises(LocalError, match="wait for Allocated"):
        client.send(b"x", PEER, T0)


# ------------------------------------------------------------------ timers


def test_allocation_refresh_before_expiry_uses_the_granted_lifetime() -> None:
    client, server = allocated()
    assert client.next_timer() == T0 + 540  # a minute before the 600 s lifetime ends
    client.handle_timer(T0 + 540)
    server.lifetime = 300
    assert pump(client, server, T0 + 540) == []
    (refresh,) = server.of(Method.REFRESH)
    assert stun.decode_uint32_untrusted(refresh.get(Attr.LIFETIME) or b"") == 600
    assert client.lifetime == 300
    assert client.next_timer() == T0 + 540 + 240


def test_unanswered_refreshes_end_in_closed_at_expiry() -> None:
    client, server = allocated()
    server.silent.add(Method.REFRESH)
    now, events = T0, []
    while (due := client.next_timer()) is not None and due <= T0 + 700:
        now = due
        client.handle_timer(now)
        events += pump(client, server, now)
    assert now == T0 + 600
    assert events == [Closed("the allocation expired: the server did not answer refreshes")]
    assert len(server.of(Method.REFRESH)) > 7  # it kept trying, attempt after attempt


def test_refresh_refused_with_437_closes() -> None:
    client, _ = allocated()
    client.handle_timer(T0 + 540)
    (refresh,) = sent(client)
    client.receive_untrusted(error(refresh, 437, "Allocation Mismatch"), T0 + 540)
    assert client.events() == [
        Closed("the server refused to refresh the allocation: 437 Allocation Mismatch")
    ]


def run_until(client: TurnClient, server: Server, end: float, traffic: float | None = None) -> None:
    """Fire timers until `end`; with `traffic`, also send to PEER every `traffic` seconds."""
    now = T0
    next_send = T0 if traffic is not None else math.inf
    while True:
        due = min(client.next_timer() or math.inf, next_send)
        if due > end:
            return
        now = due
        if now >= next_send:
            client.send(b"tick", PEER, now)
            next_send = now + (traffic or math.inf)
        client.handle_timer(now)
        pump(client, server, now)


def test_used_permissions_and_channels_are_refreshed_before_they_expire() -> None:
    client, server = allocated(lifetime=3600)
    run_until(client, server, T0 + 1000, traffic=20)
    creates = len(server.of(Method.CREATE_PERMISSION))
    binds = len(server.of(Method.CHANNEL_BIND))
    assert creates == 1 + 1000 // 240  # install + every 4 minutes
    assert binds == 1 + 1000 // 480  # install + every 8 minutes
    assert client.counters["channel_data_out"] >= 45


def test_unused_peers_lapse_and_come_back_on_demand() -> None:
    client, server = allocated(lifetime=3600)
    client.send(b"once", PEER, T0)
    pump(client, server, T0)
    run_until(client, server, T0 + 1000)
    # never used after they were installed: no refreshes, both expired
    assert len(server.of(Method.CREATE_PERMISSION)) == 1
    assert len(server.of(Method.CHANNEL_BIND)) == 1
    client.receive_untrusted(data_indication(PEER, b"late"), T0 + 1000)
    assert client.events() == []
    assert client.counters["no_permission"] == 1
    client.send(b"again", PEER, T0 + 1000)
    methods = [m.method for m in sent(client)]
    assert methods == [Method.CREATE_PERMISSION, Method.CHANNEL_BIND]


def test_a_lapsing_lease_is_refreshed_at_once_when_traffic_returns() -> None:
    client, server = allocated(lifetime=3600)
    client.send(b"once", PEER, T0)
    pump(client, server, T0)
    run_until(client, server, T0 + 250)  # refresh time passed unused: lapsing
    before = len(server.of(Method.CREATE_PERMISSION))
    client.send(b"back", PEER, T0 + 260)
    pump(client, server, T0 + 260)
    assert len(server.of(Method.CREATE_PERMISSION)) == before + 1


def test_timers_never_busy_loop() -> None:
    client, server = allocated(lifetime=3600)
    client.send(b"x", PEER, T0)
    pump(client, server, T0)
    now, rounds = T0, 0
    while (due := client.next_timer()) is not None and due < T0 + 5000:
        assert due > now or rounds == 0
        now = due
        client.handle_timer(now)
        pump(client, server, now)
        rounds += 1
    assert rounds < 50


# ------------------------------------------------------------------ closing


def test_close_releases_with_lifetime_zero() -> None:
    client, server = allocated()
    client.close(T0 + 1)
    assert pump(client, server, T0 + 1) == [Closed("released")]
    (release,) = server.of(Method.REFRESH)
    assert stun.decode_uint32_untrusted(release.get(Attr.LIFETIME) or b"") == 0
    assert client.next_timer() is None
    client.send(b"x", PEER, T0 + 2)  # a late send after close is dropped, not an error
    assert client.to_server() == []
    assert client.counters["dropped"] == 1


def test_close_without_an_answer_still_closes() -> None:
    client, server = allocated(reliable=True)
    server.silent.add(Method.REFRESH)
    client.close(T0)
    pump(client, server, T0)
    client.handle_timer(T0 + turn_client.RELIABLE_TIMEOUT)
    assert client.events() == [Closed("released (no answer from the TURN server)")]


def test_close_before_the_allocation_exists() -> None:
    client = TurnClient(USER, PASSWORD, T0)
    client.start(T0)
    client.to_server()
    client.close(T0)
    assert client.events() == [Closed("closed before the allocation completed")]
    assert client.to_server() == []
    assert client.next_timer() is None


# ------------------------------------------------------------------ adapter configuration


def test_proxy_urls_parse_with_and_without_credentials() -> None:
    plain = ProxyConfig.parse("http://proxy.example:3128")
    assert plain == ProxyConfig("proxy.example", 3128)
    assert plain.authorization() is None
    secret = ProxyConfig.parse("http://al%40ice:p%3Ass@10.0.0.1:8080/")
    assert (secret.username, secret.password) == ("al@ice", "p:ss")
    assert secret.authorization() == "Basic YWxAaWNlOnA6c3M="  # base64("al@ice:p:ss")
    assert "p:ss" not in repr(secret)


@pytest.mark.parametrize(
    "url",
    [
        "proxy.example:3128",  # no scheme
        "https://proxy.example:3128",  # TLS to the proxy itself is not supported
        "socks5://proxy.example:1080",
        "http://proxy.example",  # no port
        "http://proxy.example:99999",
        "http://proxy.example:3128/path",
        "http://:3128",
    ],
)
def test_bad_proxy_urls_are_local_errors(url: str) -> None:
    with pytest.raises(LocalError, match="proxy URL"):
        ProxyConfig.parse(url)


def test_relay_server_and_proxy_combinations_are_checked() -> None:
    with pytest.raises(LocalError, match="transport"):
        RelayServer("dtls", "127.0.0.1", 3478)
    with pytest.raises(LocalError, match="port"):
        RelayServer("udp", "127.0.0.1", 0)
    assert str(RelayServer("tls", "::1", 443)) == "[::1]:443 over tls"

    async def udp_through_a_proxy() -> None:
        await open_turn(
            RelayServer("udp", "127.0.0.1", 3478),
            USER,
            PASSWORD,
            on_data=lambda data, peer: None,
            proxy=ProxyConfig("127.0.0.1", 3128),
        )

    with pytest.raises(LocalError, match="only carries TCP"):
        asyncio.run(udp_through_a_proxy())
