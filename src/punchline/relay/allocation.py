"""The TURN server core (RFC 8656): allocations, permissions, channels, quotas. Sans-I/O.

Why a core of its own: every decision a relay makes — who may allocate, which peer may send
to whom, when an allocation, permission or channel dies — is protocol state that must be
exact (third-party TURN clients depend on it) and testable without sockets. The adapter
(`relay.server`) feeds it client messages (from a UDP socket or a TCP/TLS stream, identified
by a `ClientKey`) and peer datagrams (from a relayed socket, identified by an allocation id),
and carries out what `actions()` returns: send to a client, send to a peer, open or close a
relayed socket, and install or remove a *fast binding* — a bound channel with a live
permission, which the adapter may hand to the kernel-side forwarder so that established media
never enters Python. A fast binding is exactly the state in which the core would forward the
same bytes itself, so the observable behaviour is the same with or without the forwarder.

Authentication is the long-term credential mechanism (RFC 8489 §9.2) with passwords derived
from the username by the TURN REST API scheme (`relay.credentials`): the relay keeps no user
database. Nonces are stateless (expiry + HMAC under a per-process key), so a flood of
unauthenticated requests costs no memory.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from punchline.relay import credentials
from punchline.wire import channel_data, stun
from punchline.wire.stun import Attr, Class, Message, Method

Address = tuple[str, int]
# (connection, client address): "udp:PORT" for a UDP listening socket, "tcp:N" for the Nth
# stream connection. With the server address implied by the connection, this is RFC 8656's
# 5-tuple that names an allocation.
ClientKey = tuple[str, Address]

# Comprehension-required attributes that TURN requests may carry and this server understands.
_KNOWN = frozenset(
    {
        Attr.MAPPED_ADDRESS, Attr.USERNAME, Attr.ERROR_CODE, Attr.UNKNOWN_ATTRIBUTES,
        Attr.CHANNEL_NUMBER, Attr.LIFETIME, Attr.XOR_PEER_ADDRESS, Attr.DATA, Attr.REALM,
        Attr.NONCE, Attr.XOR_RELAYED_ADDRESS, Attr.REQUESTED_ADDRESS_FAMILY, Attr.EVEN_PORT,
        Attr.REQUESTED_TRANSPORT, Attr.DONT_FRAGMENT, Attr.PASSWORD_ALGORITHM, Attr.USERHASH,
        Attr.XOR_MAPPED_ADDRESS, Attr.RESERVATION_TOKEN, Attr.PRIORITY, Attr.USE_CANDIDATE,
    }
)  # fmt: skip
UDP = 17
COUNTERS = (
    "allocations", "allocations_total", "refreshes", "permissions", "channel_binds",
    "packets_to_peer", "bytes_to_peer", "packets_to_client", "bytes_to_client",
    "dropped_no_permission", "dropped_no_channel", "dropped_rate", "malformed", "unauthenticated",
    "bad_credentials", "stale_nonce", "refused_quota", "refused_capacity", "refused_peer",
    "mismatch", "bindings_answered",
)  # fmt: skip


@dataclass(frozen=True)
class RelayConfig:
    realm: str = "punchline"
    software: str = "punchline-relay"
    # RFC 8656 §7.2: default 10 min; the server may cap what clients ask for.
    default_lifetime: float = 600.0
    max_lifetime: float = 3600.0
    permission_lifetime: float = 300.0  # §9: exactly 300 s
    channel_lifetime: float = 600.0  # §12: 10 min
    channel_cooldown: float = 300.0  # §12: a number or peer is not rebound for 5 min
    nonce_lifetime: float = 600.0
    # Quotas: per user (the REST username's user part) and for the whole relay.
    max_allocations_per_user: int = 10
    max_allocations: int = 5000
    max_permissions_per_allocation: int = 64
    max_channels_per_allocation: int = 64
    # Bytes per second an allocation may relay in each direction; 0 = unlimited.
    rate_bytes_per_s: int = 0
    # Loopback, private and link-local peers are refused unless this is on (tests, labs).
    allow_private_peers: bool = False
    # The address family the relayed sockets use; IPv6 allocations are refused with 440.
    ipv6: bool = False


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class ToClient:
    client: ClientKey
    data: bytes


@dataclass(frozen=True)
class ToPeer:
    allocation: int
    peer: Address
    data: bytes


@dataclass(frozen=True)
class OpenRelay:
    """Open a relayed UDP socket, then call `relay_opened` or `relay_failed` with `allocation`.

    `even` asks for an even port; `reserve_next` to also hold port+1 under `token`, and a
    non-empty `use_token` to take the socket held under that token instead of opening one.
    """

    allocation: int
    even: bool = False
    reserve_next: bytes | None = None
    use_token: bytes | None = None


@dataclass(frozen=True)
class CloseRelay:
    allocation: int


@dataclass(frozen=True)
class ReleaseReservation:
    token: bytes


@dataclass(frozen=True)
class FastBind:
    client: ClientKey
    channel: int
    allocation: int
    peer: Address
    rate_bytes_per_s: int


@dataclass(frozen=True)
class FastUnbind:
    client: ClientKey
    channel: int


Action = ToClient | ToPeer | OpenRelay | CloseRelay | ReleaseReservation | FastBind | FastUnbind


# ------------------------------------------------------------------ state


class _Refusal(Exception):
    def __init__(self, code: int, reason: str, counter: str | None = None) -> None:
        super().__init__(reason)
        self.code, self.reason, self.counter = code, reason, counter


@dataclass
class _Channel:
    number: int
    peer: Address
    expires: float


@dataclass
class _Bucket:
    """Token bucket for the slow path's per-allocation rate limit (one second of burst)."""

    rate: float
    tokens: float
    at: float

    def take(self, size: int, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < size:
            return False
        self.tokens -= size
        return True


@dataclass
class Allocation:
    id: int
    client: ClientKey
    username: str
    user: str
    key: bytes
    expires: float
    relayed: Address | None = None
    transaction_id: bytes = b""
    pending_lifetime: float = 0.0
    pending_token: bytes | None = None
    permissions: dict[str, float] = field(default_factory=dict)  # peer IP -> expiry
    channels: dict[int, _Channel] = field(default_factory=dict)
    by_peer: dict[Address, int] = field(default_factory=dict)
    cooldown: dict[object, float] = field(default_factory=dict)  # number or peer -> until
    fast: set[int] = field(default_factory=set)  # channel numbers handed to the forwarder
    success: bytes = b""  # the Allocate success, resent on a retransmitted request
    to_peer: _Bucket | None = None
    to_client: _Bucket | None = None


class RelayCore:
    def __init__(
        self,
        config: RelayConfig,
        secret: str,
        now: float,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config
        self.secret = secret
        self._randbytes = randbytes
        self._nonce_key = randbytes(32)
        self._ids = 0
        self.allocations: dict[int, Allocation] = {}
        self._by_client: dict[ClientKey, Allocation] = {}
        self._per_user: dict[str, int] = {}
        self._reservations: dict[bytes, float] = {}
        # (when, allocation id, reservation token): a lazy heap, stale entries are harmless
        self._deadlines: list[tuple[float, int, bytes | None]] = []
        self._actions: list[Action] = []
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.refusals: dict[int, int] = {}

    # ----------------------------------------------------------------- inputs

    def receive_from_client(self, data: bytes, client: ClientKey, now: float) -> None:
        """One datagram, or one message split out of a stream by `StreamDecoder`."""
        if channel_data.is_channel_data(data):
            self._client_channel_data(data, client, now)
            return
        try:
            msg = stun.decode_untrusted(data)
        except stun.StunError:
            self.counters["malformed"] += 1
            return
        if msg.cls is Class.REQUEST:
            self._request(msg, data, client, now)
        elif msg.cls is Class.INDICATION and msg.method == Method.SEND:
            self._send_indication(msg, client, now)
        else:
            self.counters["malformed"] += 1

    def receive_from_peer(self, allocation: int, data: bytes, peer: Address, now: float) -> None:
        alloc = self.allocations.get(allocation)
        if alloc is None or alloc.relayed is None:
            return
        if self._permission(alloc, peer[0], now) is None:
            self.counters["dropped_no_permission"] += 1
            return
        if alloc.to_client is not None and not alloc.to_client.take(len(data), now):
            self.counters["dropped_rate"] += 1
            return
        number = alloc.by_peer.get(peer)
        if number is not None:
            message = channel_data.encode(number, data, pad=not alloc.client[0].startswith("udp"))
        else:
            tid = self._randbytes(12)
            attrs = ((Attr.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, tid)), (Attr.DATA, data))
            message = stun.encode(Message(Method.DATA, Class.INDICATION, tid, attrs))
        self.counters["packets_to_client"] += 1
        self.counters["bytes_to_client"] += len(data)
        self._actions.append(ToClient(alloc.client, message))

    def client_gone(self, client: ClientKey, now: float) -> None:
        """A TCP/TLS connection closed: its allocation goes with it (RFC 8656 §3.1)."""
        alloc = self._by_client.get(client)
        if alloc is not None:
            self._delete(alloc, now)

    def relay_opened(self, allocation: int, relayed: Address, now: float) -> None:
        alloc = self.allocations.get(allocation)
        if alloc is None:
            self._actions.append(CloseRelay(allocation))
            return
        alloc.relayed = relayed
        attrs: list[tuple[int, bytes]] = [
            (Attr.XOR_RELAYED_ADDRESS, stun.encode_xor_address(relayed, alloc.transaction_id)),
            (Attr.LIFETIME, stun.encode_uint32(int(alloc.pending_lifetime))),
            (Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address(alloc.client[1],
                                                              alloc.transaction_id)),
        ]  # fmt: skip
        if alloc.pending_token is not None:
            attrs.append((Attr.RESERVATION_TOKEN, alloc.pending_token))
            self._reservations[alloc.pending_token] = now + 30.0  # §7.2: ~30 s
            heapq.heappush(self._deadlines, (now + 30.0, 0, alloc.pending_token))
        request = Message(Method.ALLOCATE, Class.REQUEST, alloc.transaction_id)
        alloc.success = self._success(request, alloc.key, attrs)
        self.counters["allocations"] += 1
        self.counters["allocations_total"] += 1
        self._actions.append(ToClient(alloc.client, alloc.success))

    def relay_failed(self, allocation: int, now: float) -> None:
        """No relayed port could be opened (range exhausted, token unknown): 508."""
        alloc = self.allocations.get(allocation)
        if alloc is None:
            return
        request = Message(Method.ALLOCATE, Class.REQUEST, alloc.transaction_id)
        self._forget(alloc)
        refusal = _Refusal(508, "Insufficient Capacity", "refused_capacity")
        self._refuse(request, alloc.client, refusal, now, alloc.key)

    # ----------------------------------------------------------------- outputs

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def next_timer(self) -> float:
        return self._deadlines[0][0] if self._deadlines else float("inf")

    def handle_timer(self, now: float) -> None:
        """Expire what is due. Each deadline names one allocation (or a reservation), so a
        relay with thousands of allocations only looks at the ones whose time has come."""
        due: set[int] = set()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, alloc_id, token = heapq.heappop(self._deadlines)
            if token is not None:
                if self._reservations.get(token, now + 1) <= now:
                    del self._reservations[token]
                    self._actions.append(ReleaseReservation(token))
            else:
                due.add(alloc_id)
        for alloc_id in sorted(due):
            alloc = self.allocations.get(alloc_id)
            if alloc is not None:
                self._expire(alloc, now)

    def _expire(self, alloc: Allocation, now: float) -> None:
        if alloc.relayed is not None and alloc.expires <= now:
            self._delete(alloc, now)
            return
        for ip, until in list(alloc.permissions.items()):
            if until <= now:
                del alloc.permissions[ip]
        for chan in list(alloc.channels.values()):
            if chan.expires <= now:
                self._unbind_channel(alloc, chan, now)
        self._sync_fast(alloc, now)

    def _at(self, when: float, alloc: Allocation) -> None:
        heapq.heappush(self._deadlines, (when, alloc.id, None))

    # ----------------------------------------------------------------- requests

    def _request(self, msg: Message, data: bytes, client: ClientKey, now: float) -> None:
        if msg.method == Method.BINDING:
            self.counters["bindings_answered"] += 1
            answer = stun.binding_success(msg.transaction_id, client[1], self.config.software)
            self._actions.append(ToClient(client, answer))
            return
        if msg.method not in (Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION,
                              Method.CHANNEL_BIND):  # fmt: skip
            self._refuse(msg, client, _Refusal(400, "Bad Request", "malformed"), now)
            return
        unknown = [k for k, _ in msg.attributes if stun.is_comprehension_required(k)
                   and k not in _KNOWN]  # fmt: skip
        if unknown:
            self._actions.append(ToClient(client, stun.error_response(
                msg, 420, "Unknown Attribute", unknown, self.config.software)))  # fmt: skip
            return
        key: bytes | None = None
        try:
            username, user, key = self._authenticate(msg, data, now)
            if msg.method == Method.ALLOCATE:
                self._allocate(msg, client, username, user, key, now)
                return
            alloc = self._by_client.get(client)
            if alloc is None or alloc.relayed is None:
                raise _Refusal(437, "Allocation Mismatch", "mismatch")
            if alloc.username != username:
                raise _Refusal(441, "Wrong Credentials", "bad_credentials")
            handler = {
                Method.REFRESH: self._refresh,
                Method.CREATE_PERMISSION: self._create_permission,
                Method.CHANNEL_BIND: self._channel_bind,
            }[Method(msg.method)]
            attrs = handler(msg, alloc, now)
            self._actions.append(ToClient(client, self._success(msg, key, attrs)))
            if msg.method != Method.REFRESH or alloc.id in self.allocations:
                self._sync_fast(alloc, now)
        except _Refusal as refusal:
            self._refuse(msg, client, refusal, now, key)
        except stun.StunError:
            self.counters["malformed"] += 1
            self._refuse(msg, client, _Refusal(400, "Bad Request"), now, key)

    def _authenticate(self, msg: Message, data: bytes, now: float) -> tuple[str, str, bytes]:
        raw_user, raw_realm, raw_nonce = (msg.get(Attr.USERNAME), msg.get(Attr.REALM),
                                          msg.get(Attr.NONCE))  # fmt: skip
        if raw_user is None or raw_realm is None or raw_nonce is None:
            self.counters["unauthenticated"] += 1
            raise _Refusal(401, "Unauthorized")
        username = stun.decode_text_untrusted(raw_user, 509)
        realm = stun.decode_text_untrusted(raw_realm)
        if realm != self.config.realm or not self._nonce_valid(raw_nonce, now):
            self.counters["stale_nonce"] += 1
            raise _Refusal(438, "Stale Nonce")
        try:
            user, password = credentials.check_untrusted(self.secret, username, now)
        except credentials.CredentialError as exc:
            self.counters["bad_credentials"] += 1
            raise _Refusal(401, "Unauthorized") from exc
        key = stun.long_term_key(username, realm, password)
        try:
            stun.decode_untrusted(data, key)
        except stun.StunError as exc:
            self.counters["bad_credentials"] += 1
            raise _Refusal(401, "Unauthorized") from exc
        return username, user, key

    def _allocate(
        self, msg: Message, client: ClientKey, username: str, user: str, key: bytes, now: float
    ) -> None:
        existing = self._by_client.get(client)
        if existing is not None:
            if existing.transaction_id == msg.transaction_id:
                if existing.success:  # a retransmission: the same answer again (§7.2)
                    self._actions.append(ToClient(client, existing.success))
                return
            raise _Refusal(437, "Allocation Mismatch", "mismatch")
        even, token = self._check_allocate(msg)
        if self._per_user.get(user, 0) >= self.config.max_allocations_per_user:
            raise _Refusal(486, "Allocation Quota Reached", "refused_quota")
        if len(self.allocations) >= self.config.max_allocations:
            raise _Refusal(508, "Insufficient Capacity", "refused_capacity")
        self._ids += 1
        alloc = Allocation(self._ids, client, username, user, key, now)
        alloc.transaction_id = msg.transaction_id
        alloc.pending_lifetime = self._lifetime(msg)
        alloc.expires = now + alloc.pending_lifetime
        self._at(alloc.expires, alloc)
        if self.config.rate_bytes_per_s:
            rate = float(self.config.rate_bytes_per_s)
            alloc.to_peer, alloc.to_client = _Bucket(rate, rate, now), _Bucket(rate, rate, now)
        reserve = even is not None and stun.decode_even_port_untrusted(even)
        alloc.pending_token = self._randbytes(8) if reserve else None
        self.allocations[alloc.id] = alloc
        self._by_client[client] = alloc
        self._per_user[user] = self._per_user.get(user, 0) + 1
        if token is not None:
            del self._reservations[token]
        self._actions.append(
            OpenRelay(
                alloc.id, even=even is not None, reserve_next=alloc.pending_token, use_token=token
            )
        )

    def _check_allocate(self, msg: Message) -> tuple[bytes | None, bytes | None]:
        """RFC 8656 §7.2 checks of an Allocate; returns its EVEN-PORT and RESERVATION-TOKEN."""
        transport = msg.get(Attr.REQUESTED_TRANSPORT)
        if transport is None:
            raise _Refusal(400, "Bad Request: REQUESTED-TRANSPORT missing", "malformed")
        if stun.decode_requested_transport_untrusted(transport) != UDP:
            raise _Refusal(442, "Unsupported Transport Protocol")
        family = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        if family is not None:
            wanted = stun.decode_requested_address_family_untrusted(family)
            if (wanted == 2) != self.config.ipv6:
                raise _Refusal(440, "Address Family not Supported")
        even = msg.get(Attr.EVEN_PORT)
        token = msg.get(Attr.RESERVATION_TOKEN)
        if even is not None and token is not None:
            raise _Refusal(400, "Bad Request: EVEN-PORT with RESERVATION-TOKEN")
        if token is not None and token not in self._reservations:
            raise _Refusal(508, "Insufficient Capacity: unknown reservation", "refused_capacity")
        return even, token

    def _lifetime(self, msg: Message) -> float:
        raw = msg.get(Attr.LIFETIME)
        if raw is None:
            return self.config.default_lifetime
        asked = float(stun.decode_uint32_untrusted(raw))
        if asked == 0:
            return 0.0
        return min(max(asked, self.config.default_lifetime), self.config.max_lifetime)

    def _refresh(self, msg: Message, alloc: Allocation, now: float) -> list[tuple[int, bytes]]:
        lifetime = self._lifetime(msg)
        self.counters["refreshes"] += 1
        if lifetime == 0:
            self._delete(alloc, now)
        else:
            alloc.expires = now + lifetime
            self._at(alloc.expires, alloc)
        return [(Attr.LIFETIME, stun.encode_uint32(int(lifetime)))]

    def _peers(self, msg: Message) -> list[Address]:
        raw = msg.get_all(Attr.XOR_PEER_ADDRESS)
        if not raw:
            raise _Refusal(400, "Bad Request: XOR-PEER-ADDRESS missing", "malformed")
        peers = [stun.decode_xor_address_untrusted(v, msg.transaction_id) for v in raw]
        for host, _port in peers:
            ip = ipaddress.ip_address(host)
            if (ip.version == 6) != self.config.ipv6:
                raise _Refusal(443, "Peer Address Family Mismatch")
            if not self.config.allow_private_peers and _restricted(ip):
                raise _Refusal(403, "Forbidden: peer address not allowed", "refused_peer")
        return peers

    def _create_permission(
        self, msg: Message, alloc: Allocation, now: float
    ) -> list[tuple[int, bytes]]:
        peers = self._peers(msg)
        new = {h for h, _ in peers} - alloc.permissions.keys()
        if len(alloc.permissions) + len(new) > self.config.max_permissions_per_allocation:
            raise _Refusal(508, "Insufficient Capacity: too many permissions", "refused_quota")
        for host, _port in peers:
            alloc.permissions[host] = now + self.config.permission_lifetime
        self._at(now + self.config.permission_lifetime, alloc)
        self.counters["permissions"] += 1
        return []

    def _channel_bind(self, msg: Message, alloc: Allocation, now: float) -> list[tuple[int, bytes]]:
        raw = msg.get(Attr.CHANNEL_NUMBER)
        if raw is None:
            raise _Refusal(400, "Bad Request: CHANNEL-NUMBER missing", "malformed")
        number = stun.decode_channel_number_untrusted(raw)
        if not channel_data.valid_channel(number):
            raise _Refusal(400, "Bad Request: channel number out of range", "malformed")
        peer = self._peers(msg)[0]
        bound = alloc.channels.get(number)
        if bound is None:
            if peer in alloc.by_peer:
                raise _Refusal(400, "Bad Request: peer bound to another channel")
            if alloc.cooldown.get(number, 0) > now or alloc.cooldown.get(peer, 0) > now:
                raise _Refusal(400, "Bad Request: channel or peer recently unbound")
            if len(alloc.channels) >= self.config.max_channels_per_allocation:
                raise _Refusal(508, "Insufficient Capacity: too many channels", "refused_quota")
            bound = alloc.channels[number] = _Channel(number, peer, 0.0)
            alloc.by_peer[peer] = number
        elif bound.peer != peer:
            raise _Refusal(400, "Bad Request: channel bound to another peer")
        bound.expires = now + self.config.channel_lifetime
        alloc.permissions[peer[0]] = now + self.config.permission_lifetime  # §11.2
        self._at(bound.expires, alloc)
        self._at(now + self.config.permission_lifetime, alloc)
        self.counters["channel_binds"] += 1
        return []

    # ----------------------------------------------------------------- data from clients

    def _send_indication(self, msg: Message, client: ClientKey, now: float) -> None:
        alloc = self._by_client.get(client)
        raw_peer, data = msg.get(Attr.XOR_PEER_ADDRESS), msg.get(Attr.DATA)
        if alloc is None or alloc.relayed is None or raw_peer is None or data is None:
            self.counters["dropped_no_permission"] += 1
            return
        try:
            peer = stun.decode_xor_address_untrusted(raw_peer, msg.transaction_id)
        except stun.StunError:
            self.counters["malformed"] += 1
            return
        self._to_peer(alloc, peer, data, now)

    def _client_channel_data(self, data: bytes, client: ClientKey, now: float) -> None:
        try:
            number, payload = channel_data.decode_untrusted(data)
        except channel_data.ChannelDataError:
            self.counters["malformed"] += 1
            return
        alloc = self._by_client.get(client)
        chan = None if alloc is None else alloc.channels.get(number)
        if alloc is None or chan is None:
            self.counters["dropped_no_channel"] += 1
            return
        self._to_peer(alloc, chan.peer, payload, now)

    def _to_peer(self, alloc: Allocation, peer: Address, data: bytes, now: float) -> None:
        if self._permission(alloc, peer[0], now) is None:
            self.counters["dropped_no_permission"] += 1
            return
        if alloc.to_peer is not None and not alloc.to_peer.take(len(data), now):
            self.counters["dropped_rate"] += 1
            return
        self.counters["packets_to_peer"] += 1
        self.counters["bytes_to_peer"] += len(data)
        self._actions.append(ToPeer(alloc.id, peer, data))

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def _permission(alloc: Allocation, host: str, now: float) -> float | None:
        until = alloc.permissions.get(host)
        return until if until is not None and until > now else None

    def _sync_fast(self, alloc: Allocation, now: float) -> None:
        """Keep the forwarder's bindings equal to 'channel bound and permission alive'."""
        if not alloc.client[0].startswith("udp"):
            return
        live = {
            n for n, chan in alloc.channels.items()
            if chan.expires > now and self._permission(alloc, chan.peer[0], now) is not None
        }  # fmt: skip
        for number in sorted(alloc.fast - live):
            self._actions.append(FastUnbind(alloc.client, number))
        for number in sorted(live - alloc.fast):
            self._actions.append(FastBind(alloc.client, number, alloc.id,
                                          alloc.channels[number].peer,
                                          self.config.rate_bytes_per_s))  # fmt: skip
        alloc.fast = live

    def _unbind_channel(self, alloc: Allocation, chan: _Channel, now: float) -> None:
        del alloc.channels[chan.number]
        alloc.by_peer.pop(chan.peer, None)
        until = now + self.config.channel_cooldown
        alloc.cooldown[chan.number] = alloc.cooldown[chan.peer] = until
        for key, value in list(alloc.cooldown.items()):
            if value <= now:
                del alloc.cooldown[key]

    def _delete(self, alloc: Allocation, now: float) -> None:
        for number in sorted(alloc.fast):
            self._actions.append(FastUnbind(alloc.client, number))
        alloc.fast = set()
        self._forget(alloc)
        if alloc.relayed is not None:
            self.counters["allocations"] -= 1
        self._actions.append(CloseRelay(alloc.id))

    def _forget(self, alloc: Allocation) -> None:
        self.allocations.pop(alloc.id, None)
        if self._by_client.get(alloc.client) is alloc:
            del self._by_client[alloc.client]
        left = self._per_user.get(alloc.user, 1) - 1
        if left > 0:
            self._per_user[alloc.user] = left
        else:
            self._per_user.pop(alloc.user, None)

    def _nonce(self, now: float) -> bytes:
        expiry = struct.pack("!Q", int(now + self.config.nonce_lifetime))
        mac = hmac.new(self._nonce_key, expiry, hashlib.sha256).digest()[:12]
        return (expiry + mac).hex().encode()

    def _nonce_valid(self, raw: bytes, now: float) -> bool:
        try:
            blob = bytes.fromhex(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return False
        if len(blob) != 20:
            return False
        mac = hmac.new(self._nonce_key, blob[:8], hashlib.sha256).digest()[:12]
        return hmac.compare_digest(mac, blob[8:]) and struct.unpack("!Q", blob[:8])[0] > now

    def _success(self, request: Message, key: bytes, attrs: list[tuple[int, bytes]]) -> bytes:
        attrs = [*attrs, (Attr.SOFTWARE, stun.encode_text(self.config.software))]
        reply = Message(request.method, Class.SUCCESS, request.transaction_id, tuple(attrs))
        return stun.encode(reply, integrity_key=key)

    def _refuse(
        self,
        msg: Message,
        client: ClientKey,
        refusal: _Refusal,
        now: float,
        key: bytes | None = None,
    ) -> None:
        if refusal.counter:
            self.counters[refusal.counter] += 1
        self.refusals[refusal.code] = self.refusals.get(refusal.code, 0) + 1
        attrs: list[tuple[int, bytes]] = [
            (Attr.ERROR_CODE, stun.encode_error_code(refusal.code, refusal.reason))
        ]
        if refusal.code in (401, 438):  # a challenge: fresh nonce, our realm (§9.2.4)
            attrs += [(Attr.REALM, stun.encode_text(self.config.realm)),
                      (Attr.NONCE, self._nonce(now))]  # fmt: skip
            key = None
        attrs.append((Attr.SOFTWARE, stun.encode_text(self.config.software)))
        reply = Message(msg.method, Class.ERROR, msg.transaction_id, tuple(attrs))
        self._actions.append(ToClient(client, stun.encode(reply, integrity_key=key)))


def _restricted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return bool(
        ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified
        or ip.is_multicast or ip.is_reserved
    )  # fmt: skip
