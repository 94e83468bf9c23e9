"""A stateless STUN Binding responder for supernodes (RFC 8489 §6.3, RFC 5780 §6.1).

Why: a client behind a NAT learns its reflexive (public) address by asking a server on the
other side what source address its datagram arrived from. Every supernode answers, so a client
can ask two of them at different addresses and compare the answers to classify its NAT's
mapping behaviour (RFC 4787, RFC 5780 §4.3).

The supernode's UDP loop calls `handle_untrusted` for every datagram that `wire.stun.is_stun`
accepts and sends whatever comes back to the datagram's source from the socket it arrived on.
The responder keeps no state per client, so a flood of requests costs CPU but no memory, and a
malformed or unwanted message is dropped silently (RFC 8489 §6.3: failed header checks and
anything not a request get no answer) and only counted.
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
    decode_untrusted,
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

    def _refusal(self, request: Message) -> tuple[int, str, list[int]] | None:
        """Why a Binding request cannot be answered: (error code, reason, unknown types)."""
        if request.method != Method.BINDING:
            # RFC 8489 §6.3.1: a request the server cannot process gets an error response;
            # 400, as this responder serves Binding only (TURN is the relay's business).
            return 400, "Bad Request: only Binding is served here", []
        unknown: list[int] = []
        for kind, _ in request.attributes:
            if (
                is_comprehension_required(kind)
                and kind not in self.config.understood
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
        if change_ip or change_port:
            # We answer from the socket the request came in on, so we cannot honour it; like a
            # server without an alternate address (RFC 5780 §6.1), we answer 420.
            return 420, "Unknown Attribute", [Attr.CHANGE_REQUEST]
        return None
