"""The client side of TURN (RFC 8656) as a sans-I/O core: bytes and `now` in, bytes and events out.

Why a core of our own: a call that cannot be punched must still connect within the relay setup
time, through whichever TURN server (ours or a third party's, e.g. coturn) and transport (UDP,
TCP, TLS, TLS through an HTTP proxy) gets out of the user's network. Keeping the protocol in
one state machine without sockets or clocks lets the same code run under the asyncio adapter
(`punchline.relay.connection`), in the simulator, and in unit tests against a scripted server.

What it does, in the order a call needs it:

- Allocate (§7.1): first without credentials; the server's 401 names the REALM and a NONCE,
  and the request is sent again signed with the long-term key (RFC 8489 §9.2). A 438 Stale
  Nonce on any signed request is answered by re-sending it with the new nonce.
- Every response to a signed request must carry a MESSAGE-INTEGRITY that verifies under our
  key, except the 400/401/438 a server sends before it could check ours (RFC 8489 §9.2.5).
  Anything else is dropped and counted as forged, never acted on: a datagram with a guessed
  transaction id must not tear down or redirect an allocation.
- `send` to a new peer installs a permission (CreatePermission, §9) and binds a channel
  (ChannelBind, §12) at once. Data waits (bounded) until the permission is confirmed, because
  the server silently drops what arrives for a peer without one; then it goes in Send
  indications (44+ bytes of overhead) until the channel is bound, and in ChannelData (4 bytes)
  from then on.
- Leases are kept alive only while used: the allocation is refreshed a minute before it
  expires, a permission every 4 minutes (they last 5), a channel every 8 (they last 10), but
  a permission or channel no one sent to or received from since it was installed or last
  refreshed is allowed to lapse, so an allocation serving a long call does not keep every
  early candidate open.
- Requests are retransmitted over UDP (RFC 8489 §6.2.1 with a 100 ms initial RTO: a relayed
  path is the fallback that must come up fast); over TCP/TLS they are sent once and time out.

Input from the network never raises: malformed bytes, responses nobody is waiting for,
forged responses, data from peers without a permission and ChannelData on unknown channels
are counted in `counters` and dropped. Misuse by the caller (an address that is not an IP,
sending before `Allocated`) raises `LocalError`.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from punchline.errors import LocalError
from punchline.wire import channel_data, stun
from punchline.wire.stun import Attr, Class, Message, Method, StunError

Peer = tuple[str, int]

PERMISSION_LIFETIME = 300.0  # RFC 8656 §9: a permission lasts 5 minutes
PERMISSION_REFRESH = 240.0
CHANNEL_LIFETIME = 600.0  # RFC 8656 §12: a channel binding lasts 10 minutes
CHANNEL_REFRESH = 480.0
REFRESH_MARGIN = 60.0  # refresh the allocation this long before it expires
INITIAL_RTO = 0.1  # RFC 8489 §6.2.1 suggests 500 ms; relay setup time matters more here
MAX_SENDS = 7  # Rc
LAST_WAIT = 16  # Rm: the last send waits Rm * RTO for its answer
RELIABLE_TIMEOUT = 5.0  # one send over TCP/TLS, then give up
MAX_STALE_RETRIES = 3  # 438s in a row for one request before it counts as failed
LEASE_RETRY = 10.0  # a permission or channel refresh that got no answer is tried again
FAILED_HOLDOFF = 30.0  # a refused permission or channel is not asked for again before this
MAX_QUEUED = 32  # datagrams per peer waiting for its permission
# The largest datagram a Send indication can carry: the 65532-byte STUN body minus an IPv6
# XOR-PEER-ADDRESS (24), the DATA header (4) and FINGERPRINT (8).
MAX_DATA = 65496
FIRST_CHANNEL = channel_data.MIN_CHANNEL
# Error responses a server sends before it has checked our credentials, so without
# MESSAGE-INTEGRITY (RFC 8489 §9.2.5).
_UNSIGNED_ERRORS = frozenset({400, 401, 438})

COUNTERS = (
    "sent",  # messages handed out by to_server()
    "received",  # messages given to receive_untrusted()
    "retransmits",
    "timeouts",  # transactions that got no answer
    "errors",  # error responses received (after integrity checks)
    "malformed",  # neither valid STUN nor valid ChannelData
    "unexpected",  # valid, but no transaction waits for it, or not a kind we accept
    "forged",  # a response whose MESSAGE-INTEGRITY is missing or wrong
    "unknown_channel",  # ChannelData on a channel we did not bind
    "no_permission",  # a Data indication from a peer we have no permission for
    "dropped",  # our outgoing data thrown away: queue full, refused peer, closed allocation
    "data_in",
    "channel_data_in",
    "data_out",
    "channel_data_out",
    "send_indications_out",
)


@dataclass(frozen=True)
class Allocated:
    """The server granted an allocation: peers reach us at `relayed`."""

    relayed: Peer
    mapped: Peer | None  # our reflexive address as the server saw it, if it said
    lifetime: float


@dataclass(frozen=True)
class AllocationFailed:
    """No allocation: `code` is the STUN error (401 wrong credentials, 486 quota, 508 capacity,
    ...) or 0 when the server never answered or answered nonsense."""

    code: int
    reason: str


@dataclass(frozen=True)
class PeerData:
    data: bytes
    peer: Peer


@dataclass(frozen=True)
class Closed:
    """The allocation is gone (released by `close`, refused a refresh, or expired)."""

    reason: str


Event = Allocated | AllocationFailed | PeerData | Closed


class _State(Enum):
    IDLE = "idle"
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    CLOSING = "closing"
    CLOSED = "closed"


_Kind = Literal["allocate", "refresh", "release", "permission", "channel"]


@dataclass
class _Transaction:
    """One request in flight. The request is kept unsigned so that a 438 can re-sign it."""

    kind: _Kind
    method: Method
    attributes: tuple[tuple[int, bytes], ...]
    target: Peer | None  # the peer of a permission (port unused) or channel
    data: bytes
    key: bytes | None
    sends: int
    next_at: float
    stale_retries: int = 0


@dataclass
class _Lease:
    """A permission or a channel binding: server state with a lifetime, kept alive while used.

    `used` records traffic since the last request for it; at `refresh_at` a used lease is
    refreshed, an unused one is marked `lapsing` and simply expires unless traffic comes back
    before `expires_at` (which then refreshes it at once).
    """

    state: Literal["pending", "active", "failed"] = "pending"
    refresh_at: float = math.inf
    expires_at: float = math.inf
    used: bool = False
    lapsing: bool = False
    in_flight: bool = False


def _peer(peer: tuple[str, int]) -> Peer:
    """Normalise a peer address the way addresses decoded from the wire are spelled."""
    host, port = peer[0], peer[1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise LocalError(f"TURN peers are IP addresses, not {host!r}") from exc
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 0xFFFF:
        raise LocalError(f"peer port {port!r} is not 1-65535")
    return str(ip), port


def _has_integrity(data: bytes) -> bool:
    """Whether a (framing-checked) STUN message carries either MESSAGE-INTEGRITY attribute."""
    pos = stun.HEADER_BYTES
    while pos + 4 <= len(data):
        kind = int.from_bytes(data[pos : pos + 2], "big")
        size = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if kind in (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256):
            return True
        pos += 4 + size + (-size % 4)
    return False


class TurnClient:
    """One TURN allocation over one connection (5-tuple) to one server."""

    def __init__(
        self,
        username: str,
        password: str,
        now: float,
        *,
        reliable: bool = False,
        lifetime: float = 600.0,
        software: str = "punchline",
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.username = username
        self.password = password
        self.reliable = reliable
        if not 1 <= lifetime <= 0xFFFFFFFF:
            raise LocalError(f"a TURN allocation lifetime is at least 1 s, not {lifetime!r}")
        self.requested_lifetime = int(lifetime)
        self.software = software
        self._randbytes = randbytes
        self.created = now
        self.relayed: Peer | None = None
        self.mapped: Peer | None = None
        self.lifetime: float = 0.0
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._state = _State.IDLE
        self._realm: str | None = None
        self._nonce: bytes | None = None
        self._key: bytes | None = None
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._transactions: dict[bytes, _Transaction] = {}
        self._expires_at = math.inf
        self._refresh_at = math.inf
        self._refreshing = False
        self._permissions: dict[str, _Lease] = {}
        self._channel_leases: dict[Peer, _Lease] = {}
        # Channel numbers are never reused for another peer: RFC 8656 §12 forbids rebinding a
        # number to a different peer for 5 minutes after it expires, and 4096 is plenty.
        self._channel_of: dict[Peer, int] = {}
        self._peer_of_channel: dict[int, Peer] = {}
        self._queues: dict[Peer, deque[bytes]] = {}

    # ------------------------------------------------------------------ public interface

    @property
    def state(self) -> str:
        return self._state.value

    def start(self, now: float) -> None:
        """Queue the first, unauthenticated Allocate (its 401 tells us the realm and a nonce)."""
        if self._state is not _State.IDLE:
            raise LocalError("TurnClient.start() may be called once")
        self._state = _State.ALLOCATING
        self._request("allocate", Method.ALLOCATE, self._allocate_attributes(), None, now)

    def to_server(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def send(self, data: bytes, peer: tuple[str, int], now: float) -> None:
        """Send `data` to `peer` through the relay, setting up permission and channel first."""
        target = _peer(peer)
        if len(data) > MAX_DATA:
            raise LocalError(f"TURN carries datagrams of at most {MAX_DATA} bytes")
        if self._state in (_State.CLOSING, _State.CLOSED):
            self.counters["dropped"] += 1
            return
        self._require_allocation("send")
        self._ensure_peer(target, now)
        permission = self._permissions[target[0]]
        if permission.state == "active":
            self._deliver(data, target)
        elif permission.state == "pending":
            queue = self._queues.setdefault(target, deque())
            if len(queue) >= MAX_QUEUED:
                queue.popleft()
                self.counters["dropped"] += 1
            queue.append(bytes(data))
        else:
            self.counters["dropped"] += 1

    def add_peer(self, peer: tuple[str, int], now: float) -> None:
        """Install a permission and channel for `peer` before sending, so it can reach us."""
        target = _peer(peer)
        if self._state in (_State.CLOSING, _State.CLOSED):
            return
        self._require_allocation("add_peer")
        self._ensure_peer(target, now)

    def receive_untrusted(self, data: bytes, now: float) -> None:
        """One whole message from the server: a datagram, or one message of a StreamDecoder."""
        data = bytes(data)
        self.counters["received"] += 1
        if channel_data.is_channel_data(data):
            self._on_channel_data(data, now)
            return
        try:
            msg = stun.decode_untrusted(data)
        except StunError:
            self.counters["malformed"] += 1
            return
        if msg.cls in (Class.SUCCESS, Class.ERROR):
            self._on_response(msg, data, now)
        elif msg.cls == Class.INDICATION and msg.method == Method.DATA:
            self._on_data_indication(msg, now)
        else:
            self.counters["unexpected"] += 1

    def next_timer(self) -> float | None:
        if self._state in (_State.IDLE, _State.CLOSED):
            return None
        times = [tx.next_at for tx in self._transactions.values()]
        if self._state is _State.ALLOCATED:
            times.append(self._expires_at)
            if not self._refreshing:
                times.append(self._refresh_at)
            for lease in (*self._permissions.values(), *self._channel_leases.values()):
                times.append(lease.expires_at)
                if lease.state == "active" and not lease.in_flight and not lease.lapsing:
                    times.append(lease.refresh_at)
        due = min(times, default=math.inf)
        return None if math.isinf(due) else due

    def handle_timer(self, now: float) -> None:
        for tid, tx in list(self._transactions.items()):
            if tid in self._transactions and now >= tx.next_at:
                self._retransmit_or_time_out(tid, tx, now)
        if self._state is not _State.ALLOCATED:
            return
        if now >= self._expires_at:
            self._finish(Closed("the allocation expired: the server did not answer refreshes"))
            return
        if not self._refreshing and now >= self._refresh_at:
            self._send_refresh(now)
        self._tend_leases(now)

    def close(self, now: float) -> None:
        """Release the allocation (Refresh with LIFETIME 0); `Closed` follows its answer."""
        if self._state in (_State.CLOSING, _State.CLOSED):
            return
        if self._state is not _State.ALLOCATED:
            self._finish(Closed("closed before the allocation completed"))
            return
        self._transactions.clear()
        self._queues.clear()
        self._state = _State.CLOSING
        attributes = ((Attr.LIFETIME, stun.encode_uint32(0)),)
        self._request("release", Method.REFRESH, attributes, None, now)

    # ------------------------------------------------------------------ requests

    def _require_allocation(self, what: str) -> None:
        if self._state is not _State.ALLOCATED:
            raise LocalError(
                f"TurnClient.{what}() before the allocation exists: wait for Allocated"
            )

    def _allocate_attributes(self) -> tuple[tuple[int, bytes], ...]:
        return (
            (Attr.REQUESTED_TRANSPORT, stun.encode_requested_transport(17)),
            (Attr.LIFETIME, stun.encode_uint32(self.requested_lifetime)),
            (Attr.SOFTWARE, stun.encode_text(self.software)),
        )

    def _request(
        self,
        kind: _Kind,
        method: Method,
        attributes: tuple[tuple[int, bytes], ...],
        target: Peer | None,
        now: float,
        stale_retries: int = 0,
    ) -> None:
        """Send a new request, signed once the server has told us its realm and nonce.

        An empty XOR-PEER-ADDRESS in `attributes` stands for `target`: its encoding depends on
        the transaction id, so it is filled in here, again for each re-sent request.
        """
        tid = stun.new_transaction_id(self._randbytes)
        filled = tuple(
            (kind_, stun.encode_xor_address(target, tid))
            if kind_ == Attr.XOR_PEER_ADDRESS and not value and target is not None
            else (kind_, value)
            for kind_, value in attributes
        )
        if self._realm is not None and self._nonce is not None:
            filled = (
                *filled,
                (Attr.USERNAME, self.username.encode("utf-8")),
                (Attr.REALM, self._realm.encode("utf-8")),
                (Attr.NONCE, self._nonce),
            )
        data = stun.encode(Message(method, Class.REQUEST, tid, filled), self._key)
        tx = _Transaction(kind, method, attributes, target, data, self._key, 1, now, stale_retries)
        tx.next_at = self._next_send(tx, now)
        self._transactions[tid] = tx
        self._emit(data)

    def _next_send(self, tx: _Transaction, now: float) -> float:
        if self.reliable:
            return now + RELIABLE_TIMEOUT
        if tx.sends < MAX_SENDS:
            return now + INITIAL_RTO * float(1 << (tx.sends - 1))
        return now + INITIAL_RTO * LAST_WAIT

    def _retransmit_or_time_out(self, tid: bytes, tx: _Transaction, now: float) -> None:
        if self.reliable or tx.sends >= MAX_SENDS:
            del self._transactions[tid]
            self.counters["timeouts"] += 1
            self._on_timeout(tx, now)
            return
        tx.sends += 1
        tx.next_at = self._next_send(tx, now)
        self.counters["retransmits"] += 1
        self._emit(tx.data)

    def _emit(self, data: bytes) -> None:
        self.counters["sent"] += 1
        self._out.append(data)

    def _send_refresh(self, now: float) -> None:
        self._refreshing = True
        attributes = ((Attr.LIFETIME, stun.encode_uint32(self.requested_lifetime)),)
        self._request("refresh", Method.REFRESH, attributes, None, now)

    # ------------------------------------------------------------------ responses

    def _on_response(self, msg: Message, data: bytes, now: float) -> None:
        tx = self._transactions.get(msg.transaction_id)
        if tx is None or msg.method != tx.method:
            self.counters["unexpected"] += 1
            return
        code, reason = 0, ""
        if msg.cls == Class.ERROR:
            try:
                code, reason = stun.decode_error_code_untrusted(msg.get(Attr.ERROR_CODE) or b"")
            except StunError:
                self.counters["malformed"] += 1
                return
        if tx.key is not None and not (code in _UNSIGNED_ERRORS and not _has_integrity(data)):
            try:
                stun.decode_untrusted(data, tx.key)
            except StunError:
                self.counters["forged"] += 1
                return
        del self._transactions[msg.transaction_id]
        if msg.cls == Class.SUCCESS:
            self._on_success(tx, msg, now)
            return
        self.counters["errors"] += 1
        if code == 438 and self._take_nonce(msg) and tx.stale_retries < MAX_STALE_RETRIES:
            self._request(tx.kind, tx.method, tx.attributes, tx.target, now, tx.stale_retries + 1)
            return
        if code == 401 and tx.key is None and self._take_nonce(msg):
            self._request(tx.kind, tx.method, tx.attributes, tx.target, now, tx.stale_retries)
            return
        self._on_failure(tx, code, reason or "no reason given", now)

    def _take_nonce(self, msg: Message) -> bool:
        """Adopt the REALM and NONCE of a 401 or 438; False if the server left them out."""
        try:
            realm_value = msg.get(Attr.REALM)
            realm = self._realm if realm_value is None else stun.decode_text_untrusted(realm_value)
        except StunError:
            return False
        nonce = msg.get(Attr.NONCE)
        if realm is None or not nonce:
            return False
        if realm != self._realm or self._key is None:
            self._realm = realm
            self._key = stun.long_term_key(self.username, realm, self.password)
        self._nonce = nonce
        return True

    def _on_success(self, tx: _Transaction, msg: Message, now: float) -> None:
        if tx.kind == "allocate":
            self._on_allocated(msg, now)
        elif tx.kind == "refresh":
            self._refreshing = False
            self._set_lifetime(msg, now)
        elif tx.kind == "release":
            self._finish(Closed("released"))
        elif tx.kind == "permission" and tx.target is not None:
            permission = self._permissions.get(tx.target[0])
            self._lease_granted(permission, now, PERMISSION_LIFETIME, PERMISSION_REFRESH)
            self._flush_queues(tx.target[0])
        elif tx.kind == "channel" and tx.target is not None:
            channel = self._channel_leases.get(tx.target)
            self._lease_granted(channel, now, CHANNEL_LIFETIME, CHANNEL_REFRESH)
            # §12.2: a successful ChannelBind also installs the permission for the peer's IP
            permission = self._permissions.get(tx.target[0])
            if permission is not None and permission.state == "pending":
                self._lease_granted(
                    permission, now, PERMISSION_LIFETIME, PERMISSION_REFRESH, keep_in_flight=True
                )
                self._flush_queues(tx.target[0])

    def _on_allocated(self, msg: Message, now: float) -> None:
        tid = msg.transaction_id
        try:
            relayed = stun.decode_xor_address_untrusted(
                msg.get(Attr.XOR_RELAYED_ADDRESS) or b"", tid
            )
            mapped_value = msg.get(Attr.XOR_MAPPED_ADDRESS)
            mapped = (
                None
                if mapped_value is None
                else stun.decode_xor_address_untrusted(mapped_value, tid)
            )
        except StunError:
            self.counters["malformed"] += 1
            self._finish(AllocationFailed(0, "the Allocate success had no valid relayed address"))
            return
        self.relayed, self.mapped = relayed, mapped
        self._state = _State.ALLOCATED
        self._set_lifetime(msg, now)
        self._events.append(Allocated(relayed, mapped, self.lifetime))

    def _set_lifetime(self, msg: Message, now: float) -> None:
        value = msg.get(Attr.LIFETIME)
        try:
            lifetime = float(
                self.requested_lifetime if value is None else stun.decode_uint32_untrusted(value)
            )
        except StunError:
            self.counters["malformed"] += 1
            lifetime = float(self.requested_lifetime)
        self.lifetime = lifetime
        self._expires_at = now + lifetime
        self._refresh_at = now + max(lifetime - REFRESH_MARGIN, lifetime / 2)

    def _on_failure(self, tx: _Transaction, code: int, reason: str, now: float) -> None:
        """An error response (code > 0) or a timeout (code 0) ended `tx`."""
        text = f"{code} {reason}" if code else reason
        if tx.kind == "allocate":
            if code == 401:
                reason += " (wrong username or password, or expired credentials)"
            self._finish(AllocationFailed(code, reason))
        elif tx.kind == "refresh":
            self._refreshing = False
            if code == 0 and now < self._expires_at:
                self._send_refresh(now)  # the allocation still lives: keep trying until it ends
            else:
                self._finish(Closed(f"the server refused to refresh the allocation: {text}"))
        elif tx.kind == "release":
            self._finish(Closed(f"released ({text})"))
        elif tx.kind == "permission" and tx.target is not None:
            permission = self._permissions.get(tx.target[0])
            if permission is not None:
                self._lease_failed(permission, code, now)
            if permission is None or permission.state == "failed":
                self._drop_queues(tx.target[0])
        elif tx.kind == "channel" and tx.target is not None:
            channel = self._channel_leases.get(tx.target)
            if channel is not None:
                self._lease_failed(channel, code, now)

    def _on_timeout(self, tx: _Transaction, now: float) -> None:
        self._on_failure(tx, 0, "no answer from the TURN server", now)

    def _finish(self, event: AllocationFailed | Closed) -> None:
        self._state = _State.CLOSED
        self._transactions.clear()
        self._queues.clear()
        self._events.append(event)

    # ------------------------------------------------------------------ peers

    def _ensure_peer(self, peer: Peer, now: float) -> None:
        """Ask for whatever of permission and channel `peer` lacks, or mark them as in use.

        The use that creates a lease does not count towards keeping it: a peer sent to once
        and never again lapses at its first refresh time instead of living another period.
        """
        ip = peer[0]
        permission = self._permissions.get(ip)
        if permission is None:
            permission = self._permissions[ip] = _Lease()
            self._request_permission(ip, permission, now)
        elif self._touch(permission):
            self._request_permission(ip, permission, now)
        lease = self._channel_leases.get(peer)
        if lease is None:
            if self._channel_for(peer) is None:
                return  # out of channel numbers: this peer stays on Send indications
            lease = self._channel_leases[peer] = _Lease()
            self._request_channel(peer, lease, now)
        elif self._touch(lease):
            self._request_channel(peer, lease, now)

    @staticmethod
    def _touch(lease: _Lease) -> bool:
        """Mark `lease` as used; True if it was lapsing and must be refreshed right now."""
        lease.used = True
        return lease.lapsing and lease.state == "active" and not lease.in_flight

    def _channel_for(self, peer: Peer) -> int | None:
        channel = self._channel_of.get(peer)
        if channel is None:
            channel = FIRST_CHANNEL + len(self._channel_of)
            if channel > channel_data.MAX_CHANNEL:
                return None
            self._channel_of[peer] = channel
            self._peer_of_channel[channel] = peer
        return channel

    def _request_permission(self, ip: str, lease: _Lease, now: float) -> None:
        lease.in_flight, lease.used, lease.lapsing = True, False, False
        # §9.1: the port of XOR-PEER-ADDRESS is ignored; permissions are per IP address
        attributes = ((Attr.XOR_PEER_ADDRESS, b""),)
        self._request("permission", Method.CREATE_PERMISSION, attributes, (ip, 0), now)

    def _request_channel(self, peer: Peer, lease: _Lease, now: float) -> None:
        lease.in_flight, lease.used, lease.lapsing = True, False, False
        channel = self._channel_of[peer]
        attributes = (
            (Attr.CHANNEL_NUMBER, stun.encode_channel_number(channel)),
            (Attr.XOR_PEER_ADDRESS, b""),
        )
        self._request("channel", Method.CHANNEL_BIND, attributes, peer, now)

    @staticmethod
    def _lease_granted(
        lease: _Lease | None,
        now: float,
        lifetime: float,
        refresh: float,
        keep_in_flight: bool = False,
    ) -> None:
        if lease is None:
            return
        lease.state = "active"
        lease.in_flight = lease.in_flight and keep_in_flight
        lease.lapsing = False
        lease.expires_at = now + lifetime
        lease.refresh_at = now + refresh

    def _lease_failed(self, lease: _Lease, code: int, now: float) -> None:
        lease.in_flight = False
        if code == 0 and lease.state == "active" and now + LEASE_RETRY < lease.expires_at:
            lease.refresh_at = now + LEASE_RETRY  # no answer to a refresh: try again shortly
            lease.used = True
            return
        lease.state = "failed"
        lease.refresh_at = math.inf
        lease.expires_at = now + FAILED_HOLDOFF

    def _tend_leases(self, now: float) -> None:
        for ip, lease in list(self._permissions.items()):
            if self._tend(lease, now):
                del self._permissions[ip]
                self._drop_queues(ip)
            elif self._due(lease, now):
                self._request_permission(ip, lease, now)
        for peer, lease in list(self._channel_leases.items()):
            if self._tend(lease, now):
                del self._channel_leases[peer]
            elif self._due(lease, now):
                self._request_channel(peer, lease, now)

    @staticmethod
    def _tend(lease: _Lease, now: float) -> bool:
        """True when the lease has expired and should be forgotten."""
        return now >= lease.expires_at

    @staticmethod
    def _due(lease: _Lease, now: float) -> bool:
        """True when a used lease needs its refresh now; an unused one starts lapsing."""
        if lease.state != "active" or lease.in_flight or lease.lapsing or now < lease.refresh_at:
            return False
        if lease.used:
            return True
        lease.lapsing = True
        return False

    # ------------------------------------------------------------------ data

    def _deliver(self, data: bytes, peer: Peer) -> None:
        self.counters["data_out"] += 1
        channel_lease = self._channel_leases.get(peer)
        if channel_lease is not None and channel_lease.state == "active":
            self.counters["channel_data_out"] += 1
            channel = self._channel_of[peer]
            self._emit(channel_data.encode(channel, data, pad=self.reliable))
            return
        self.counters["send_indications_out"] += 1
        tid = stun.new_transaction_id(self._randbytes)
        attributes = (
            (Attr.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, tid)),
            (Attr.DATA, bytes(data)),
        )
        self._emit(stun.encode(Message(Method.SEND, Class.INDICATION, tid, attributes)))

    def _flush_queues(self, ip: str) -> None:
        for peer in [p for p in self._queues if p[0] == ip]:
            for data in self._queues.pop(peer):
                self._deliver(data, peer)

    def _drop_queues(self, ip: str) -> None:
        for peer in [p for p in self._queues if p[0] == ip]:
            self.counters["dropped"] += len(self._queues.pop(peer))

    def _on_channel_data(self, data: bytes, now: float) -> None:
        try:
            channel, payload = channel_data.decode_untrusted(data)
        except StunError:
            self.counters["malformed"] += 1
            return
        if not self._accepting():
            self.counters["unexpected"] += 1
            return
        peer = self._peer_of_channel.get(channel)
        lease = None if peer is None else self._channel_leases.get(peer)
        if peer is None or lease is None or lease.state == "failed":
            self.counters["unknown_channel"] += 1
            return
        lease.used = True
        self.counters["channel_data_in"] += 1
        self._surface(payload, peer)

    def _on_data_indication(self, msg: Message, now: float) -> None:
        value, payload = msg.get(Attr.XOR_PEER_ADDRESS), msg.get(Attr.DATA)
        if value is None or payload is None:
            self.counters["malformed"] += 1
            return
        try:
            peer = stun.decode_xor_address_untrusted(value, msg.transaction_id)
        except StunError:
            self.counters["malformed"] += 1
            return
        if not self._accepting():
            self.counters["unexpected"] += 1
            return
        permission = self._permissions.get(peer[0])
        if permission is None or permission.state == "failed":
            self.counters["no_permission"] += 1
            return
        self._surface(payload, peer)

    def _accepting(self) -> bool:
        return self._state is _State.ALLOCATED

    def _surface(self, payload: bytes, peer: Peer) -> None:
        permission = self._permissions.get(peer[0])
        if permission is not None:
            permission.used = True
        self.counters["data_in"] += 1
        self._events.append(PeerData(payload, peer))
