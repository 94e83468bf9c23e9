"""A stateless STUN Binding responder for supernodes (RFC 8489 §6.3, RFC 5780 §6.1).

Why: a client behind a NAT learns its reflexive (public) address by asking a server on the
other side what source address its datagram arrived from. Every supernode answers, so a client
can ask two of them at different addresses and compare the answers to classify its NAT's
mapping behaviour (RFC 4787, RFC 5780 §4.3).

`BindingResponder.handle_untrusted` answers a datagram from the socket it arrived on. The
supernode runs it inside `DiscoveryResponder` (below; asyncio side in `nat.stun_service`),
which adds the RFC 5780 behaviour tests NAT discovery needs: answers from a second port, from a
peer supernode's address, and after a delay. The Binding responder keeps no state per client,
so a flood of requests costs CPU but no memory, and a malformed or unwanted message is dropped
silently (RFC 8489 §6.3: failed header checks and anything not a request get no answer) and
only counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from punchline.wire.stun import (
    Attr,
    Class,
    Message,
    Method,
    StunError,
    binding_success,
    decode_change_request_untrusted,
    decode_uint32_untrusted,
    decode_untrusted,
    decode_xor_address_untrusted,
    encode,
    encode_address,
    encode_change_request,
    encode_response_port,
    encode_text,
    encode_uint32,
    encode_xor_address,
    error_response,
    is_comprehension_required,
)

# Comprehension-required attributes a Binding request may carry that this responder
# understands (RFC 8489 §6.3.1): the STUN authentication attributes (this server does not
# authenticate, so they are understood and have no effect), the ICE connectivity-check
# attributes (RFC 8445 §7.1.1), and CHANGE-REQUEST (RFC 5780 §7.2, served when it asks for no
# change). PADDING and RESPONSE-PORT are deliberately absent: one socket that answers the
# source cannot honour them, and a 420 tells the client so (RFC 5780 §6.1).
BINDING_ATTRIBUTES = frozenset(
    {
        Attr.MAPPED_ADDRESS,
        Attr.USERNAME,
        Attr.ERROR_CODE,
        Attr.UNKNOWN_ATTRIBUTES,
        Attr.REALM,
        Attr.NONCE,
        Attr.PASSWORD_ALGORITHM,
        Attr.USERHASH,
        Attr.XOR_MAPPED_ADDRESS,
        Attr.PRIORITY,
        Attr.USE_CANDIDATE,
        Attr.CHANGE_REQUEST,
    }
)

COUNTERS = ("malformed", "not_request", "answered", "errors")


@dataclass(frozen=True)
class BindingResponderConfig:
    """Everything a `BindingResponder` can be told; the defaults suit a single-address server."""

    software: str | None = "punchline"
    """SOFTWARE in every response (RFC 8489 §14.14); None leaves it out (no version hint)."""

    other_address: tuple[str, int] | None = None
    """OTHER-ADDRESS (RFC 5780 §7.4): the IP and port of a second responder that clients can use
    to test their NAT's mapping behaviour. Leave None unless that second address really answers:
    RFC 5780 §6.1 forbids advertising an alternate address the server does not have. Even with
    it, CHANGE-REQUEST asking for a change gets 420: a reply is always sent from the socket the
    request came in on, so filtering tests use two responders instead."""

    understood: frozenset[int] = BINDING_ATTRIBUTES
    """Comprehension-required attribute types accepted in a Binding request; a request with any
    other type in 0x0000-0x7FFF is refused with 420 Unknown Attribute (RFC 8489 §6.3.1)."""


@dataclass
class BindingResponder:
    """Answers STUN Binding requests; bytes in, bytes (or nothing) out.

    `counters` tells operators what arrives: `malformed` (not a valid STUN message, dropped),
    `not_request` (an indication or response, dropped), `answered` (Binding success sent) and
    `errors` (error response sent: unsupported method, unknown attribute, malformed value).
    """

    config: BindingResponderConfig = field(default_factory=BindingResponderConfig)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def handle_untrusted(
        self, data: bytes, source: tuple[str, int], local: tuple[str, int]
    ) -> bytes | None:
        """The reply to send back to `source` for one datagram received on `local`, or None.

        `source` and `local` may be the 4-tuples of IPv6 sockets; only host and port are used.
        """
        try:
            request = decode_untrusted(data)
        except StunError:
            self.counters["malformed"] += 1
            return None
        if request.cls != Class.REQUEST:
            self.counters["not_request"] += 1
            return None
        refusal = self._refusal(request)
        if refusal is not None:
            code, reason, unknown = refusal
            self.counters["errors"] += 1
            return error_response(request, code, reason, unknown, software=self.config.software)
        self.counters["answered"] += 1
        return binding_success(
            request.transaction_id,
            (source[0], source[1]),
            software=self.config.software,
            response_origin=(local[0], local[1]),
            other_address=self.config.other_address,
        )

    def _refusal(
        self, request: Message, honoured: frozenset[int] = frozenset()
    ) -> tuple[int, str, list[int]] | None:
        """Why a Binding request cannot be answered: (error code, reason, unknown types).

        `honoured` names attributes a caller (`DiscoveryResponder`) acts on itself: they are
        understood, and a CHANGE-REQUEST asking for a change is not refused here.
        """
        if request.method != Method.BINDING:
            # RFC 8489 §6.3.1: a request the server cannot process gets an error response;
            # 400, as this responder serves Binding only (TURN is the relay's business).
            return 400, "Bad Request: only Binding is served here", []
        unknown: list[int] = []
        for kind, _ in request.attributes:
            if (
                is_comprehension_required(kind)
                and kind not in self.config.understood
                and kind not in honoured
                and kind not in unknown
            ):
                unknown.append(kind)
        if unknown:
            return 420, "Unknown Attribute", unknown
        change = request.get(Attr.CHANGE_REQUEST)
        if change is None:
            return None
        try:
            change_ip, change_port = decode_change_request_untrusted(change)
        except StunError:
            return 400, "Bad Request: malformed CHANGE-REQUEST", []
        if (change_ip or change_port) and Attr.CHANGE_REQUEST not in honoured:
            # We answer from the socket the request came in on, so we cannot honour it; like a
            # server without an alternate address (RFC 5780 §6.1), we answer 420.
            return 420, "Unknown Attribute", [Attr.CHANGE_REQUEST]
        return None


# ------------------------------------------------------------------ NAT behaviour discovery

# Private, comprehension-optional attributes (0xC000-0xFFFF, RFC 8489 §18.3): a server that
# does not know them ignores them and answers at once, which a client recognises.
ALTERNATE_PORT = 0xFC50
"""In a Binding success: the port of this server's second UDP socket (4 bytes: port, 2 zero
bytes, like RESPONSE-PORT). OTHER-ADDRESS would be the standard place, but RFC 5780 §7.4 gives
it the meaning "changed IP *and* port", which a single-address supernode cannot offer itself."""
RESPONSE_DELAY = 0xFC51
"""In a Binding request: "answer now, and once more after this many seconds" (uint32). The
second answer reaches the client only if its NAT still holds the mapping: that is how mapping
lifetimes are measured without the client sending anything meanwhile."""

PAD = 0xFC52
"""In a request: ignored filler, so a request can be as large as the answers it asks for."""

MAX_DELAY = 900
"""Longest RESPONSE-DELAY honoured, in seconds."""

DISCOVERY_COUNTERS = (
    "changed_port", "changed_ip", "forwarded", "delayed", "delayed_sent",
    "refused", "unpadded", "rate_limited", "no_peer", "delay_full", "bad_forward",
)  # fmt: skip

Arrival = str
"""Which of our sockets a datagram came in on: "primary", "alternate" or "stream" (TCP/TLS)."""


@dataclass(frozen=True)
class Outgoing:
    """One datagram to send: from the socket `via` ("primary" or "alternate") to `to`."""

    data: bytes
    to: tuple[str, int]
    via: str


@dataclass(frozen=True)
class RateLimitPolicy:
    rate: float  # tokens per second
    burst: float
    max_keys: int = 10_000


class RateLimit:
    """Token buckets keyed by source IP (memory bounded: the stalest keys go first).

    Why: every answer sent from an address the client did not contact could be aimed at a
    victim with a spoofed source; a per-IP and a global budget bound what a supernode can be
    made to send that way.
    """

    def __init__(self, policy: RateLimitPolicy) -> None:
        self.policy = policy
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float) -> bool:
        tokens, last = self._buckets.pop(key, (self.policy.burst, now))
        tokens = min(self.policy.burst, tokens + (now - last) * self.policy.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)  # most recent last
        while len(self._buckets) > self.policy.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return allowed


@dataclass(frozen=True)
class DiscoveryResponderConfig:
    per_source: RateLimitPolicy = RateLimitPolicy(rate=20.0, burst=40.0)
    overall: RateLimitPolicy = RateLimitPolicy(rate=2000.0, burst=2000.0, max_keys=1)
    max_pending_delays: int = 10_000
    max_delays_per_source: int = 16


@dataclass
class _Delayed:
    due: float
    data: bytes
    to: tuple[str, int]
    via: str


class DiscoveryResponder:
    """RFC 5780 behaviour tests on top of `BindingResponder` (sans-I/O, time passed in).

    - CHANGE-REQUEST change-port: answered from our second UDP socket (`alternate`).
    - change-IP (with or without change-port): a supernode has one address, so it asks a peer
      supernode (`peers`) with a Binding *indication* carrying the client's address
      (XOR-PEER-ADDRESS), the transaction id and whether to change port as well; the peer
      answers the client from its own address. The client never contacted that address, which
      is what an endpoint-independent filtering test needs (RFC 5780 §4.4).
    - RESPONSE-DELAY: answered at once and again after the delay (mapping lifetime, §4.6).

    Amplification safety: every answer that does not simply go back from the socket a request
    arrived on (changed port, forwarded, delayed) is a minimal Binding success
    (XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN, FINGERPRINT), sent only when the request was at least
    as large as everything it triggers (clients pad with SOFTWARE), within a per-source-IP and
    an overall rate; anything else is dropped and counted. A forward from a peer is only honoured
    when it is as large as the probe it asks for, so no one gets more bytes out than in.
    Requests without these features are `BindingResponder`'s business.
    """

    def __init__(
        self,
        binding: BindingResponder | None = None,
        config: DiscoveryResponderConfig | None = None,
    ) -> None:
        self.binding = binding or BindingResponder()
        self.config = config or DiscoveryResponderConfig()
        self.primary: tuple[str, int] | None = None
        self.alternate: tuple[str, int] | None = None
        self.peers: list[tuple[str, int]] = []
        self.counters: dict[str, int] = dict.fromkeys(DISCOVERY_COUNTERS, 0)
        self._per_source = RateLimit(self.config.per_source)
        self._overall = RateLimit(self.config.overall)
        self._delayed: dict[tuple[tuple[str, int], bytes], _Delayed] = {}

    # ----------------------------------------------------------------- input

    def handle(
        self, data: bytes, source: tuple[str, int], arrived: Arrival, now: float
    ) -> list[Outgoing]:
        """What to send for one datagram (or stream frame) from `source`.

        An Outgoing with `via == arrived` goes back on the socket (or stream) it came from.
        """
        source = (source[0], source[1])
        try:
            message = decode_untrusted(data)
        except StunError:
            message = None
        if message is not None and message.method == Method.BINDING:
            if message.cls == Class.INDICATION and message.get(Attr.XOR_PEER_ADDRESS):
                return self._forwarded(message, data, source, arrived, now)
            if message.cls == Class.REQUEST and (
                message.get(Attr.CHANGE_REQUEST) is not None
                or message.get(RESPONSE_DELAY) is not None
            ):
                return self._discovery_request(message, data, source, arrived, now)
        reply = self.binding.handle_untrusted(data, source, self._local(arrived))
        return [] if reply is None else [Outgoing(reply, source, arrived)]

    def _local(self, arrived: Arrival) -> tuple[str, int]:
        local = self.alternate if arrived == "alternate" else self.primary
        return local or ("0.0.0.0", 0)  # noqa: S104 - only a RESPONSE-ORIGIN before bind

    def _discovery_request(
        self, request: Message, data: bytes, source: tuple[str, int], arrived: Arrival, now: float
    ) -> list[Outgoing]:
        honoured = frozenset({Attr.CHANGE_REQUEST})
        refusal = self.binding._refusal(request, honoured)
        change_ip = change_port = False
        delay: int | None = None
        if refusal is None:
            raw_change, raw_delay = request.get(Attr.CHANGE_REQUEST), request.get(RESPONSE_DELAY)
            try:
                if raw_change is not None:
                    change_ip, change_port = decode_change_request_untrusted(raw_change)
                if raw_delay is not None:
                    delay = decode_uint32_untrusted(raw_delay)
            except StunError:
                refusal = 400, "Bad Request: malformed CHANGE-REQUEST or RESPONSE-DELAY", []
        if refusal is None:
            refusal = self._unservable(arrived, change_ip, change_port, delay)
        if refusal is not None:
            code, reason, unknown = refusal
            self.counters["refused"] += 1
            self.binding.counters["errors"] += 1
            reply = error_response(request, code, reason, unknown, software=None)
            return [Outgoing(reply, source, arrived)]
        tid = request.transaction_id
        if change_ip:
            return self._forward(tid, len(data), source, change_port, now)
        if change_port:
            via = "primary" if arrived == "alternate" else "alternate"
            probe = self._probe(tid, source, via)
            if not self._affordable(len(data), len(probe), source, now):
                return []
            self.counters["changed_port"] += 1
            return [Outgoing(probe, source, via)]
        if delay is not None:
            return self._delay(tid, len(data), source, arrived, delay, now)
        self.binding.counters["answered"] += 1
        extra: tuple[tuple[int, bytes], ...] = ()
        if self.alternate is not None:
            extra = ((ALTERNATE_PORT, encode_response_port(self.alternate[1])),)
        return [Outgoing(self._probe(tid, source, arrived, extra), source, arrived)]

    def _unservable(
        self, arrived: Arrival, change_ip: bool, change_port: bool, delay: int | None
    ) -> tuple[int, str, list[int]] | None:
        """RFC 5780 §6.1: a change the server cannot make is answered 420 (CHANGE-REQUEST)."""
        if delay is not None and (change_ip or change_port):
            return 400, "Bad Request: RESPONSE-DELAY cannot be combined with a change", []
        if arrived == "stream" and (change_ip or change_port or delay is not None):
            return 420, "Unknown Attribute: behaviour tests are UDP only", [Attr.CHANGE_REQUEST]
        if change_ip and not self.peers:
            self.counters["no_peer"] += 1
            return 420, "Unknown Attribute: no other address", [Attr.CHANGE_REQUEST]
        if change_port and not change_ip and self.alternate is None:
            return 420, "Unknown Attribute: no other port", [Attr.CHANGE_REQUEST]
        if delay is not None and not 0 < delay <= MAX_DELAY:
            return 400, f"Bad Request: RESPONSE-DELAY must be 1-{MAX_DELAY} s", []
        return None

    def _probe(
        self,
        tid: bytes,
        mapped: tuple[str, int],
        via: str,
        extra: tuple[tuple[int, bytes], ...] = (),
    ) -> bytes:
        """The minimal Binding success sent where the client may not have asked for it."""
        attributes = (
            (Attr.XOR_MAPPED_ADDRESS, encode_xor_address(mapped, tid)),
            (Attr.RESPONSE_ORIGIN, encode_address(self._local(via))),
            *extra,
        )
        return encode(Message(Method.BINDING, Class.SUCCESS, tid, attributes))

    def _affordable(self, received: int, sending: int, source: tuple[str, int], now: float) -> bool:
        if sending > received:
            self.counters["unpadded"] += 1
            return False
        if not (self._per_source.allow(source[0], now) and self._overall.allow("*", now)):
            self.counters["rate_limited"] += 1
            return False
        return True

    def _forward(
        self, tid: bytes, size: int, source: tuple[str, int], change_port: bool, now: float
    ) -> list[Outgoing]:
        """Ask a peer supernode to answer `source` from its own address."""
        peer = self._peer_for()
        attributes = (
            (Attr.XOR_PEER_ADDRESS, encode_xor_address(source, tid)),
            (Attr.CHANGE_REQUEST, encode_change_request(False, change_port)),
            (Attr.SOFTWARE, encode_text("punchline")),  # pads it to the probe's size
        )
        forward = encode(Message(Method.BINDING, Class.INDICATION, tid, attributes))
        probe_size = len(self._probe(tid, source, "primary"))
        if not self._affordable(size, probe_size, source, now):
            return []
        self.counters["forwarded"] += 1
        return [Outgoing(forward, peer, "primary")]

    def _peer_for(self) -> tuple[str, int]:
        """A peer at another IP than ours (the point of change-IP), else any peer."""
        own = self.primary[0] if self.primary else None
        others = [p for p in self.peers if p[0] != own]
        return (others or self.peers)[0]

    def _forwarded(
        self, message: Message, data: bytes, source: tuple[str, int], arrived: Arrival, now: float
    ) -> list[Outgoing]:
        """A peer asks us to send a probe (see `_forward`)."""
        try:
            target = decode_xor_address_untrusted(
                message.get(Attr.XOR_PEER_ADDRESS) or b"", message.transaction_id
            )
            raw_change = message.get(Attr.CHANGE_REQUEST)
            change_port = raw_change is not None and decode_change_request_untrusted(raw_change)[1]
        except StunError:
            self.counters["bad_forward"] += 1
            return []
        if arrived != "primary":
            self.counters["bad_forward"] += 1
            return []
        via = "alternate" if change_port and self.alternate is not None else "primary"
        probe = self._probe(message.transaction_id, target, via)
        # the target, not the asking peer, is who would be flooded: budget by the target
        if not self._affordable(len(data), len(probe), target, now):
            return []
        self.counters["changed_ip"] += 1
        return [Outgoing(probe, target, via)]

    def _delay(
        self,
        tid: bytes,
        size: int,
        source: tuple[str, int],
        arrived: Arrival,
        delay: int,
        now: float,
    ) -> list[Outgoing]:
        # RESPONSE-DELAY echoed: the client knows the second answer is coming
        echo = ((RESPONSE_DELAY, encode_uint32(delay)),)
        now_answer = self._probe(tid, source, arrived, echo)
        key = (source, tid)
        if key in self._delayed:  # a retransmission: it is scheduled already
            return [Outgoing(now_answer, source, arrived)]
        pending_here = sum(1 for (s, _t) in self._delayed if s[0] == source[0])
        if (
            len(self._delayed) >= self.config.max_pending_delays
            or pending_here >= self.config.max_delays_per_source
        ):
            self.counters["delay_full"] += 1
            return [Outgoing(now_answer, source, arrived)]  # answered, but never again
        if not self._affordable(size, 2 * len(now_answer), source, now):
            return []
        self.counters["delayed"] += 1
        self._delayed[key] = _Delayed(now + delay, now_answer, source, arrived)
        return [Outgoing(now_answer, source, arrived)]

    # ----------------------------------------------------------------- timers

    def next_timer(self) -> float:
        return min((d.due for d in self._delayed.values()), default=float("inf"))

    def handle_timer(self, now: float) -> list[Outgoing]:
        """The delayed answers now due, each from the socket its request came in on: from
        anywhere else a port-restricted NAT would drop it whatever the mapping's state."""
        due = [key for key, d in self._delayed.items() if d.due <= now]
        out = []
        for key in due:
            delayed = self._delayed.pop(key)
            self.counters["delayed_sent"] += 1
            out.append(Outgoing(delayed.data, delayed.to, delayed.via))
        return out
