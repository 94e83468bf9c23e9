"""Candidates: the addresses a peer might be reached at, and how they travel in signaling.

Why a priority per candidate (RFC 8445 §5.1.2): both ends rank the pairs they check the same
way, so the most direct path that works is the one both settle on. The kinds, best first:

- host: an address of the machine itself (reaches peers on the same LAN, or a public host);
- mapped: an external port the router opened for us on request (UPnP-IGD, NAT-PMP, PCP);
- prflx: learned from a connectivity check that arrived from an address nobody announced
  (a NAT's mapping towards this very peer);
- srflx: the NAT's mapping as a supernode saw it (STUN);
- predicted: ports a NAT that allocates in sequence is expected to use next;
- relay: an address on a relay node (TURN), the path that works whenever anything leaves.

On the wire a candidate is a small JSON object `{"k": kind, "a": host, "p": port, "pr":
priority}` plus `"via"` (the relay transport) for relayed ones. Lists from the peer are bounded
and every entry is validated; a bad one is dropped and counted, never trusted.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

Address = tuple[str, int]

TYPE_PREFERENCE = {
    "host": 126,
    "mapped": 115,
    "prflx": 110,
    "srflx": 100,
    "predicted": 90,
    "relay": 0,
}
KINDS = tuple(TYPE_PREFERENCE)
RELAY_TRANSPORTS = ("udp", "tcp", "tls", "proxy")
MAX_CANDIDATES = 32  # per peer and call: more is a flood, not a network


def priority(kind: str, local_preference: int = 65535) -> int:
    """RFC 8445 §5.1.2.1 with one component: type, then local preference."""
    return (TYPE_PREFERENCE[kind] << 24) | (local_preference << 8) | 255


def pair_priority(controlling: int, controlled: int) -> int:
    """RFC 8445 §6.1.2.3: both ends compute the same number for the same pair."""
    low, high = min(controlling, controlled), max(controlling, controlled)
    return (low << 32) + 2 * high + (1 if controlling > controlled else 0)


@dataclass(frozen=True)
class Candidate:
    kind: str
    address: Address
    priority: int
    # Relayed candidates: the transport between their owner and the relay (udp/tcp/tls/proxy).
    via: str | None = None

    @classmethod
    def make(
        cls, kind: str, address: Address, local_preference: int = 65535, via: str | None = None
    ) -> Candidate:
        return cls(kind, address, priority(kind, local_preference), via)

    def as_json(self) -> dict[str, Any]:
        item: dict[str, Any] = {"k": self.kind, "a": self.address[0], "p": self.address[1],
                                "pr": self.priority}  # fmt: skip
        if self.via is not None:
            item["via"] = self.via
        return item


class CandidateError(ValueError):
    """A candidate from the peer that does not make sense."""


def decode_untrusted(item: object) -> Candidate:
    if not isinstance(item, dict):
        raise CandidateError("a candidate is an object")
    kind, host, port, prio = item.get("k"), item.get("a"), item.get("p"), item.get("pr")
    if kind not in TYPE_PREFERENCE or kind == "prflx":
        raise CandidateError(f"unknown candidate kind {kind!r}")
    if not isinstance(host, str) or len(host) > 64:
        raise CandidateError("candidate address is not text")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise CandidateError(f"candidate address {host[:64]!r} is not an IP address") from exc
    if ip.is_multicast or ip.is_unspecified or ip.version != 4:
        raise CandidateError(f"candidate address {host} cannot be a peer")
    if type(port) is not int or not 1 <= port <= 65535:
        raise CandidateError("candidate port out of range")
    if type(prio) is not int or not 1 <= prio < 2**32:
        raise CandidateError("candidate priority out of range")
    via = item.get("via")
    if kind == "relay":
        if via not in RELAY_TRANSPORTS:
            raise CandidateError("relayed candidate without its transport")
    elif via is not None:
        raise CandidateError("only relayed candidates have a transport")
    return Candidate(str(kind), (str(ip), port), prio, via if isinstance(via, str) else None)


def decode_list_untrusted(
    items: object, limit: int = MAX_CANDIDATES
) -> tuple[list[Candidate], int]:
    """The valid candidates of a peer's list (at most `limit`) and how many were dropped."""
    if not isinstance(items, list):
        return [], 1 if items is not None else 0
    found: list[Candidate] = []
    dropped = 0
    for item in items:
        if len(found) >= limit:
            dropped += 1
            continue
        try:
            found.append(decode_untrusted(item))
        except CandidateError:
            dropped += 1
    return found, dropped
