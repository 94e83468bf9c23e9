"""The TURN server core (RFC 8656) driven by a scripted client built from the STUN codec."""

from __future__ import annotations

import itertools

import pytest

from punchline.relay import credentials
from punchline.relay.allocation import (
    Action,
    CloseRelay,
    FastBind,
    FastUnbind,
    OpenRelay,
    RelayConfig,
    RelayCore,
    ToClient,
    ToPeer,
)
from punchline.wire import channel_data, stun
from punchline.wire.stun import Attr, Class, Message, Method

SECRET = "relay-test-secret-0123456789"
NOW = 1_000_000.0
CLIENT = ("udp:3478", ("198.51.100.7", 40000))
PEER = ("192.0.2.10", 5000)
PUBLIC_PEER = ("8.8.8.8", 5000)
RELAYED = ("203.0.113.1", 50000)
_ids = itertools.count(1)


def tid() -> bytes:
    return next(_ids).to_bytes(12, "big")


class Client:
    """A minimal TURN client: enough protocol to put the server through its paces."""

    def __init__(self, core: RelayCore, client: tuple[str, tuple[str, int]] = CLIENT,
                 user: str = "alice", secret: str = SECRET, now: float = NOW) -> None:  # fmt: skip
        self.core, self.client = core, client
        creds = credentials.issue(secret, user, now, 3600)
        self.username, self.password = creds.username, creds.password
        self.nonce = b""
        self.key = stun.long_term_key(self.username, "punchline", self.password)

    def request(
        self, method: int, attrs: list[tuple[int, bytes]], now: float = NOW, auth: bool = True
    ) -> tuple[Message, list[Action]]:
        t = tid()
        full = list(attrs)
        if auth:
            full += [
                (Attr.USERNAME, stun.encode_text(self.username, 509)),
                (Attr.REALM, stun.encode_text("punchline")),
                (Attr.NONCE, self.nonce),
            ]
        data = stun.encode(Message(method, Class.REQUEST, t, tuple(full)),
                           integrity_key=self.key if auth else None)  # fmt: skip
        self.core.receive_from_client(data, self.client, now)
        actions = self.core.actions()
        for action in actions:
            if isinstance(action, OpenRelay):
                self.core.relay_opened(action.allocation, RELAYED, now)
        actions += self.core.actions()
        replies = [a for a in actions if isinstance(a, ToClient) and a.client == self.client]
        assert replies, actions
        reply = stun.decode_untrusted(replies[-1].data)
        assert reply.transaction_id == t
        if reply.cls is Class.ERROR and reply.get(Attr.NONCE):
            self.nonce = reply.get(Attr.NONCE) or b""
        return reply, actions

    def allocate(self, now: float = NOW, extra: list[tuple[int, bytes]] | None = None) -> Message:
        attrs = [(Attr.REQUESTED_TRANSPORT, stun.encode_requested_transport()), *(extra or [])]
        if not self.nonce:
            challenge, _ = self.request(Method.ALLOCATE, attrs, now, auth=False)
            assert error_code(challenge) == 401
        reply, _ = self.request(Method.ALLOCATE, attrs, now)
        return reply

    def peer_attr(self, peer: tuple[str, int], t: bytes) -> tuple[int, bytes]:
        return (Attr.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, t))


def error_code(msg: Message) -> int:
    raw = msg.get(Attr.ERROR_CODE)
    assert raw is not None, msg
    return stun.decode_error_code_untrusted(raw)[0]


def peer_request(client: Client, method: int, peer: tuple[str, int], extra=(), now=NOW):  # type: ignore[no-untyped-def]
    """CreatePermission/ChannelBind: the XOR'ed peer must use the request's own id, so build
    the request by hand here."""
    t = tid()
    attrs = [(Attr.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, t)), *extra,
             (Attr.USERNAME, stun.encode_text(client.username, 509)),
             (Attr.REALM, stun.encode_text("punchline")), (Attr.NONCE, client.nonce)]  # fmt: skip
    data = stun.encode(Message(method, Class.REQUEST, t, tuple(attrs)), integrity_key=client.key)
    client.core.receive_from_client(data, client.client, now)
    actions = client.core.actions()
    reply = next(a for a in actions if isinstance(a, ToClient))
    return stun.decode_untrusted(reply.data), actions


@pytest.fixture
def core() -> RelayCore:
    return RelayCore(RelayConfig(allow_private_peers=True), SECRET, NOW)


def test_allocate_challenges_then_succeeds_with_relayed_and_mapped_address(core: RelayCore) -> None:
    client = Client(core)
    reply = client.allocate()
    assert reply.cls is Class.SUCCESS
    relayed = stun.decode_xor_address_untrusted(
        reply.get(Attr.XOR_RELAYED_ADDRESS) or b"", reply.transaction_id
    )
    mapped = stun.decode_xor_address_untrusted(
        reply.get(Attr.XOR_MAPPED_ADDRESS) or b"", reply.transaction_id
    )
    assert relayed == RELAYED
    assert mapped == CLIENT[1]
    assert stun.decode_uint32_untrusted(reply.get(Attr.LIFETIME) or b"") == 600
    stun.decode_untrusted(stun.encode(reply, integrity_key=client.key), client.key)
    assert core.counters["allocations"] == 1


def test_wrong_password_expired_credentials_and_foreign_secret_get_401(core: RelayCore) -> None:
    forger = Client(core, secret="another-secret-entirely-xxxxx")
    assert error_code(forger.allocate()) == 401
    expired = Client(core, ("udp:3478", ("198.51.100.8", 1)), now=NOW - 7200)
    assert error_code(expired.allocate()) == 401
    assert core.counters["bad_credentials"] == 2
    assert core.counters["allocations"] == 0


def test_stale_or_forged_nonce_gets_438_with_a_fresh_nonce(core: RelayCore) -> None:
    client = Client(core)
    client.allocate()
    later = NOW + 601  # the nonce lived 600 s
    reply, _ = client.request(Method.REFRESH, [], later)
    assert error_code(reply) == 438
    reply, _ = client.request(Method.REFRESH, [], later)
    assert reply.cls is Class.SUCCESS
    client.nonce = b"00" * 20
    reply, _ = client.request(Method.REFRESH, [], later)
    assert error_code(reply) == 438


def test_retransmitted_allocate_gets_the_same_answer_and_a_new_one_437(core: RelayCore) -> None:
    client = Client(core)
    client.allocate()
    reply = client.allocate()
    assert error_code(reply) == 437


def test_user_quota_486_and_capacity_508() -> None:
    core = RelayCore(RelayConfig(max_allocations_per_user=2, max_allocations=3), SECRET, NOW)
    for n in range(2):
        assert Client(core, ("udp:3478", ("198.51.100.1", n + 1))).allocate().cls is Class.SUCCESS
    assert error_code(Client(core, ("udp:3478", ("198.51.100.1", 9))).allocate()) == 486
    assert Client(core, ("udp:3478", ("198.51.100.2", 1)), user="bob").allocate().cls is (
        Class.SUCCESS
    )
    assert error_code(Client(core, ("udp:3478", ("198.51.100.3", 1)), user="carol").allocate()) == (
        508
    )
    assert core.refusals == {401: 5, 486: 1, 508: 1}


def test_private_and_loopback_peers_are_refused_by_default() -> None:
    core = RelayCore(RelayConfig(), SECRET, NOW)
    client = Client(core)
    client.allocate()
    for peer in [("127.0.0.1", 1), ("10.1.2.3", 1), ("192.168.1.1", 1), ("169.254.0.1", 1)]:
        reply, _ = peer_request(client, Method.CREATE_PERMISSION, peer)
        assert error_code(reply) == 403
    reply, _ = peer_request(client, Method.CREATE_PERMISSION, PUBLIC_PEER)
    assert reply.cls is Class.SUCCESS


def test_send_indication_needs_a_permission_and_peer_data_comes_back_as_data_indication(
    core: RelayCore,
) -> None:
    client = Client(core)
    client.allocate()
    t = tid()
    send = stun.encode(
        Message(
            Method.SEND, Class.INDICATION, t, (client.peer_attr(PEER, t), (Attr.DATA, b"hello"))
        )
    )
    core.receive_from_client(send, CLIENT, NOW)
    assert core.actions() == []
    assert core.counters["dropped_no_permission"] == 1
    core.receive_from_peer(1, b"sneaky", PEER, NOW)
    assert core.actions() == []
    reply, _ = peer_request(client, Method.CREATE_PERMISSION, PEER)
    assert reply.cls is Class.SUCCESS
    core.receive_from_client(send, CLIENT, NOW)
    assert core.actions() == [ToPeer(1, PEER, b"hello")]
    core.receive_from_peer(1, b"answer", PEER, NOW)
    (out,) = core.actions()
    assert isinstance(out, ToClient)
    data = stun.decode_untrusted(out.data)
    assert data.method == Method.DATA
    assert data.get(Attr.DATA) == b"answer"
    assert (
        stun.decode_xor_address_untrusted(
            data.get(Attr.XOR_PEER_ADDRESS) or b"", data.transaction_id
        )
        == PEER
    )
    # the permission is per IP address: another port of the same host may send too (§9)
    core.receive_from_peer(1, b"other port", (PEER[0], 6000), NOW)
    assert len(core.actions()) == 1


def test_channel_bind_forwards_channel_data_and_hands_the_binding_to_the_fast_path(
    core: RelayCore,
) -> None:
    client = Client(core)
    client.allocate()
    number = stun.encode_channel_number(0x4001)
    reply, actions = peer_request(
        client, Method.CHANNEL_BIND, PEER, [(Attr.CHANNEL_NUMBER, number)]
    )
    assert reply.cls is Class.SUCCESS
    assert FastBind(CLIENT, 0x4001, 1, PEER, 0) in actions
    core.receive_from_client(channel_data.encode(0x4001, b"voice"), CLIENT, NOW)
    assert core.actions() == [ToPeer(1, PEER, b"voice")]
    core.receive_from_peer(1, b"back", PEER, NOW)
    assert core.actions() == [ToClient(CLIENT, channel_data.encode(0x4001, b"back"))]
    core.receive_from_client(channel_data.encode(0x4002, b"unbound"), CLIENT, NOW)
    assert core.actions() == []
    assert core.counters["dropped_no_channel"] == 1
    # rebinding the channel to another peer, or the peer to another channel: 400
    other = ("192.0.2.11", 1)
    reply, _ = peer_request(client, Method.CHANNEL_BIND, other, [(Attr.CHANNEL_NUMBER, number)])
    assert error_code(reply) == 400
    other_channel = [(Attr.CHANNEL_NUMBER, stun.encode_channel_number(0x4005))]
    reply, _ = peer_request(client, Method.CHANNEL_BIND, PEER, other_channel)
    assert error_code(reply) == 400


def test_stream_clients_get_padded_channel_data_and_no_fast_path(core: RelayCore) -> None:
    tcp = ("tcp:1", ("198.51.100.9", 50001))
    client = Client(core, tcp)
    client.allocate()
    number = stun.encode_channel_number(0x4000)
    _, actions = peer_request(client, Method.CHANNEL_BIND, PEER, [(Attr.CHANNEL_NUMBER, number)])
    assert not any(isinstance(a, FastBind) for a in actions)
    core.receive_from_peer(1, b"abc", PEER, NOW)
    assert core.actions() == [ToClient(tcp, channel_data.encode(0x4000, b"abc", pad=True))]
    core.client_gone(tcp, NOW)
    assert core.actions() == [CloseRelay(1)]
    assert core.counters["allocations"] == 0


def test_permissions_channels_and_allocations_expire_on_time(core: RelayCore) -> None:
    client = Client(core)
    client.allocate()
    number = stun.encode_channel_number(0x4000)
    peer_request(client, Method.CHANNEL_BIND, PEER, [(Attr.CHANNEL_NUMBER, number)])
    assert core.next_timer() == NOW + 300  # the permission the channel installed
    core.handle_timer(NOW + 300)
    assert core.actions() == [FastUnbind(CLIENT, 0x4000)]
    core.receive_from_peer(1, b"late", PEER, NOW + 301)
    assert core.actions() == []
    # refreshing the binding revives the permission and the fast path (§12)
    peer_request(client, Method.CHANNEL_BIND, PEER, [(Attr.CHANNEL_NUMBER, number)], NOW + 302)
    core.handle_timer(NOW + 599)
    core.actions()
    core.handle_timer(NOW + 600)
    assert CloseRelay(1) in core.actions()
    assert core.allocations == {}


def test_refresh_with_zero_lifetime_deletes_and_lifetimes_are_capped(core: RelayCore) -> None:
    client = Client(core)
    reply = client.allocate(extra=[(Attr.LIFETIME, stun.encode_uint32(86400))])
    assert stun.decode_uint32_untrusted(reply.get(Attr.LIFETIME) or b"") == 3600
    reply, actions = client.request(Method.REFRESH, [(Attr.LIFETIME, stun.encode_uint32(0))])
    assert reply.cls is Class.SUCCESS
    assert CloseRelay(1) in actions
    reply, _ = client.request(Method.REFRESH, [])
    assert error_code(reply) == 437


def test_another_user_cannot_touch_an_allocation(core: RelayCore) -> None:
    Client(core).allocate()
    mallory = Client(core, user="mallory")
    mallory.nonce = Client(core).allocate().get(Attr.NONCE) or b""  # any valid nonce
    mallory.allocate()
    reply, _ = mallory.request(Method.REFRESH, [])
    assert error_code(reply) == 441


def test_garbage_unknown_attributes_and_bindings(core: RelayCore) -> None:
    for junk in [b"", b"\x00\x01", b"\x40\x00\xff\xff", b"\xff" * 40, bytes(20)]:
        core.receive_from_client(junk, CLIENT, NOW)
    assert core.actions() == []
    assert core.counters["malformed"] >= 3
    t = tid()
    odd = stun.encode(Message(Method.ALLOCATE, Class.REQUEST, t, ((0x7ABC, b"x"),)))
    core.receive_from_client(odd, CLIENT, NOW)
    (reply,) = core.actions()
    assert isinstance(reply, ToClient)
    assert error_code(stun.decode_untrusted(reply.data)) == 420
    core.receive_from_client(stun.binding_request(), CLIENT, NOW)
    (answer,) = core.actions()
    assert isinstance(answer, ToClient)
    assert stun.mapped_address_untrusted(stun.decode_untrusted(answer.data)) == CLIENT[1]


def test_even_port_reservation_token_gives_the_next_allocation_its_port(core: RelayCore) -> None:
    first = Client(core)
    reply = first.allocate(extra=[(Attr.EVEN_PORT, stun.encode_even_port(True))])
    token = reply.get(Attr.RESERVATION_TOKEN)
    assert token is not None
    assert len(token) == 8
    second = Client(core, ("udp:3478", ("198.51.100.7", 40001)))
    second.nonce = first.nonce
    _, actions = second.request(
        Method.ALLOCATE,
        [(Attr.REQUESTED_TRANSPORT, stun.encode_requested_transport()),
         (Attr.RESERVATION_TOKEN, token)],
    )  # fmt: skip
    assert any(isinstance(a, OpenRelay) and a.use_token == token for a in actions)
    third = Client(core, ("udp:3478", ("198.51.100.7", 40002)))
    third.nonce = first.nonce
    reply, _ = third.request(
        Method.ALLOCATE,
        [(Attr.REQUESTED_TRANSPORT, stun.encode_requested_transport()),
         (Attr.RESERVATION_TOKEN, token)],
    )  # fmt: skip
    assert error_code(reply) == 508


def test_rate_limit_drops_and_counts() -> None:
    core = RelayCore(RelayConfig(rate_bytes_per_s=1000, allow_private_peers=True), SECRET, NOW)
    client = Client(core)
    client.allocate()
    peer_request(client, Method.CHANNEL_BIND, PEER,
                 [(Attr.CHANNEL_NUMBER, stun.encode_channel_number(0x4000))])  # fmt: skip
    for _ in range(20):
        core.receive_from_client(channel_data.encode(0x4000, bytes(100)), CLIENT, NOW)
    assert len(core.actions()) == 10
    assert core.counters["dropped_rate"] == 10
    core.receive_from_client(channel_data.encode(0x4000, bytes(100)), CLIENT, NOW + 0.5)
    assert len(core.actions()) == 1
