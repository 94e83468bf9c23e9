"""Presence records: a user's signed statement "this device is online, reach it via that supernode".

The record is signed by the user's own key and carries the user's certificate, so any reader
verifies it against the CA alone: supernodes store and serve records but cannot forge or alter
them. No IP address of the user is in it; peers learn addresses only while setting up a call.
A higher sequence number replaces a lower one for the same device; an expired record is ignored.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding

from punchline.errors import RemoteError
from punchline.identity import certs, signed
from punchline.util.jsontext import loads_untrusted

CONTEXT = "presence"
STATUSES = frozenset({"online", "away", "busy", "offline"})


class PresenceError(RemoteError):
    """A record that is malformed, forged, expired or not the user's own."""


@dataclass(frozen=True)
class Presence:
    user: str
    device: str
    supernode: dict[str, Any]  # {"node_id": ..., "addresses": [{"transport","host","port"}, ...]}
    status: str
    seq: int
    expires: float
    certificate_der: bytes

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
) -> dict[str, str]:
    payload = {
        "v": 1,
        "user": user,
        "device": device,
        "cert": base64.b64encode(certificate.public_bytes(Encoding.DER)).decode(),
        "supernode": supernode,
        "status": status,
        "seq": seq,
        "expires": expires,
    }
    return signed.sign_document(key, CONTEXT, payload)


def verify_untrusted(
    record: object, ca_cert: x509.Certificate, now: float, user: str | None = None
) -> Presence:
    """Check a record end to end; only `PresenceError` escapes."""
    if not isinstance(record, dict) or not isinstance(record.get("payload"), str):
        raise PresenceError("presence record must be a signed document")
    try:
        claimed = loads_untrusted(record["payload"])
        if not isinstance(claimed, dict):
            raise PresenceError("presence payload must be an object")
        der = base64.b64decode(str(claimed.get("cert")), validate=True)
        cert = certs.load_untrusted(der)
        info = certs.verify(cert, ca_cert, now, certs.Role.USER)
        payload = signed.open_document_untrusted(info.public_key, CONTEXT, record)
    except (ValueError, binascii.Error, certs.CertificateError, signed.BadSignature) as exc:
        raise PresenceError(f"presence record rejected: {exc}") from exc
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
    if expires < now:
        raise PresenceError("presence record has expired")
    return Presence(name, device, supernode, status, seq, float(expires), der)


def freshest(records: list[Presence]) -> list[Presence]:
    """One record per device: the one with the highest sequence number."""
    best: dict[str, Presence] = {}
    for record in records:
        current = best.get(record.device)
        if current is None or record.newer_than(current):
            best[record.device] = record
    return sorted(best.values(), key=lambda r: r.device)
