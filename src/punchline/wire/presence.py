"""Presence records: a user's signed statement "this device is online, reach it via that supernode".

The record is signed by the user's own key and carries the user's certificate, so any reader
verifies it against the CA alone: supernodes store and serve records but cannot forge or alter
them. No IP address of the user is in it; peers learn addresses only while setting up a call.
A higher sequence number replaces a lower one for the same device; an expired record is ignored.

Going offline is a record too: with each publish the client hands its supernode a pre-signed
"offline" record (status offline, `last_seen`, a higher sequence number, a 72-hour expiry) that
the supernode puts when the client detaches, so anyone who was online in the last 72 hours is
found, offline, with the time they were last seen.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding

from punchline.errors import RemoteError
from punchline.identity import certified, signed

CONTEXT = "presence"
STATUSES = frozenset({"online", "away", "busy", "offline"})
LAST_SEEN_WINDOW = 72 * 3600.0  # how long a user who went offline stays findable
CLOCK_SKEW = 300.0  # a last-seen time this far in the future is still believed


class PresenceError(RemoteError):
    """A record that is malformed, forged, expired or not the user's own.

    `kind` tells counters apart: "forged" (fails verification: signature, CA, certificate,
    user mismatch, malformed fields) or "expired" (genuine but past its expiry).
    """

    def __init__(self, message: str, kind: str = "forged") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Presence:
    user: str
    device: str
    supernode: dict[str, Any]  # {"node_id": ..., "addresses": [{"transport","host","port"}, ...]}
    status: str
    seq: int
    expires: float
    certificate_der: bytes
    last_seen: float | None = None  # offline records: when the user was last online

    def newer_than(self, other: Presence) -> bool:
        return self.seq > other.seq


def make(
    key: Ed25519PrivateKey,
    certificate: x509.Certificate,
    user: str,
    device: str,
    supernode: dict[str, Any],
    seq: int,
    expires: float,
    status: str = "online",
    last_seen: float | None = None,
) -> dict[str, str]:
    payload: dict[str, Any] = {
        "v": 1,
        "user": user,
        "device": device,
        "cert": base64.b64encode(certificate.public_bytes(Encoding.DER)).decode(),
        "supernode": supernode,
        "status": status,
        "seq": seq,
        "expires": expires,
    }
    if last_seen is not None:
        payload["last_seen"] = last_seen
    return signed.sign_document(key, CONTEXT, payload)


def make_offline(
    key: Ed25519PrivateKey,
    certificate: x509.Certificate,
    user: str,
    device: str,
    supernode: dict[str, Any],
    seq: int,
    now: float,
) -> dict[str, str]:
    """The record a supernode puts for this device once it detaches: findable for 72 hours."""
    return make(key, certificate, user, device, supernode, seq, now + LAST_SEEN_WINDOW,
                "offline", last_seen=now)  # fmt: skip


def verify_untrusted(
    record: object, ca_cert: x509.Certificate, now: float, user: str | None = None
) -> Presence:
    """Check a record end to end; only `PresenceError` escapes."""
    try:
        opened = certified.open_certified(record, ca_cert, CONTEXT, lambda c: _signed_at(c, now))
    except certified.NotADocument as exc:
        raise PresenceError(f"presence record: {exc}") from exc
    except certified.Rejected as exc:
        raise PresenceError(f"presence record rejected: {exc}") from exc
    payload, info, der = opened.payload, opened.signer, opened.certificate_der
    name, device, supernode = payload.get("user"), payload.get("device"), payload.get("supernode")
    status, seq, expires = payload.get("status"), payload.get("seq"), payload.get("expires")
    if not (isinstance(name, str) and isinstance(device, str) and 0 < len(device) <= 64):
        raise PresenceError("presence record names no user or device")
    if not isinstance(supernode, dict) or not isinstance(status, str) or status not in STATUSES:
        raise PresenceError("presence record has a malformed supernode or status")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise PresenceError("presence record has a malformed sequence number")
    if (
        not isinstance(expires, int | float)
        or isinstance(expires, bool)
        or not math.isfinite(expires)
    ):
        raise PresenceError("presence record has a malformed expiry")
    if not isinstance(supernode.get("node_id"), str) or not isinstance(
        supernode.get("addresses", []), list
    ):
        raise PresenceError("presence record names its supernode in a malformed way")
    if name != info.subject:
        raise PresenceError(f"record for {name!r} is signed by {info.subject!r}")
    if user is not None and name != user:
        raise PresenceError(f"asked for {user!r}, got a record for {name!r}")
    last_seen = _last_seen(payload, status)
    if last_seen is not None and (last_seen > now + CLOCK_SKEW or seq > (last_seen + 60) * 1000):
        raise PresenceError("presence record's last-seen time or sequence number is impossible")
    if expires < now:
        raise PresenceError("presence record has expired", "expired")
    return Presence(name, device, supernode, status, seq, float(expires), der, last_seen)


def _signed_at(claimed: dict[str, Any], now: float) -> float:
    """When the certificate must have been valid: now, except for an offline record, which
    outlives the user's day-long certificate (72 hours) and is checked at its last-seen time.

    Safe because an offline record's sequence number may not exceed its last-seen time in
    milliseconds (clients number records by the clock): one signed with an old key while its
    certificate was valid can never outrank the records the user made since.
    """
    last_seen = claimed.get("last_seen")
    if (
        claimed.get("status") == "offline"
        and isinstance(last_seen, int | float)
        and not isinstance(last_seen, bool)
        and math.isfinite(last_seen)
        and last_seen <= now + CLOCK_SKEW
    ):
        return float(last_seen)
    return now


def _last_seen(payload: dict[str, Any], status: str) -> float | None:
    value = payload.get("last_seen")
    if value is None:
        if status == "offline":
            raise PresenceError("an offline record must say when the user was last seen")
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise PresenceError("presence record has a malformed last-seen time")
    return float(value)


def freshest(records: list[Presence]) -> list[Presence]:
    """One record per device: the one with the highest sequence number."""
    best: dict[str, Presence] = {}
    for record in records:
        current = best.get(record.device)
        if current is None or record.newer_than(current):
            best[record.device] = record
    return sorted(best.values(), key=lambda r: r.device)


@dataclass(frozen=True)
class Summary:
    """What a lookup tells: online (any device not offline) with where each device is
    attached, or offline with the latest last-seen time; "unknown" when nothing was found."""

    user: str
    status: str  # online, away, busy, offline or unknown
    devices: list[Presence]  # reachable devices (freshest record not offline)
    last_seen: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "status": self.status,
            "last_seen": self.last_seen,
            "devices": [
                {"device": d.device, "status": d.status, "supernode": d.supernode.get("node_id"),
                 "seq": d.seq}
                for d in self.devices
            ],
        }  # fmt: skip


def summarize(user: str, records: list[Presence]) -> Summary:
    """The lookup answer over verified records: freshest per device decides.

    Several online devices: the "most available" status wins (online over busy over away).
    """
    best = freshest(records)
    reachable = [r for r in best if r.status != "offline"]
    seen = [r.last_seen for r in best if r.status == "offline" and r.last_seen is not None]
    last_seen = max(seen, default=None)
    if reachable:
        rank = {"online": 0, "busy": 1, "away": 2}
        status = min((r.status for r in reachable), key=lambda s: rank.get(s, 3))
        return Summary(user, status, reachable, None)
    return Summary(user, "offline" if best else "unknown", [], last_seen)
