"""Contact lists and contact requests as signed overlay documents, and their encryption.

A user's contact list lives in the overlay under "contacts/<user>", one document per device
(value id from the device), so two devices writing at once never overwrite each other: readers
merge them all. Each document is signed by the device's key and carries the user certificate,
so supernodes and readers check it against the CA alone and nobody else can replace it. The
list inside is sealed with AES-GCM under a *list key* the servers never see; the list key is
itself sealed ("wrapped") under a key derived from the user's password with scrypt. Every
device that logs in derives the password key, so it can read the list; a password change only
re-wraps the list key, so devices that already hold it keep reading without logging in again.

Contact requests and their acceptances live under "requests/<recipient>", one value per sender,
signed by the sender; they expire after `REQUEST_LIFETIME`.

Session messages are carried in single datagrams of at most 4 KB (`wire.session.MAX_PACKET`):
`split` cuts a larger message into numbered parts and `Joiner` puts them back together.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import Encoding

from punchline.errors import RemoteError, SecurityError
from punchline.identity import certified, certs, signed
from punchline.util.jsontext import loads_object_untrusted

LIST_CONTEXT = "contacts"
REQUEST_CONTEXT = "contact-request"
CONTACTS_PREFIX = "contacts/"
REQUESTS_PREFIX = "requests/"
REQUEST_KINDS = frozenset({"request", "accept"})
REQUEST_LIFETIME = 30 * 86_400.0
# scrypt cost: 64 MiB (as the login server's argon2id) and ~0.1 s, paid once per login or
# password change; it is what stands between a supernode holding a list and a password guess.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**16, 8, 1
MAX_PLAINTEXT = 1_000_000  # a decompressed list larger than this is refused (zip bomb)
PART_BYTES = 2_400  # of JSON per part: base64 (3,200 chars) plus envelope stays under 4 KB
MAX_PARTS = 64
MAX_NAME = 64
CLOCK_SKEW = 300.0  # seconds a signer's clock may be ahead of ours


class ContactDocumentError(RemoteError):
    """A contact list or request document that is malformed, expired or not for this key."""


class ForgedDocument(ContactDocumentError, SecurityError):
    """A document whose signature or certificate does not check out, or claims another user."""

    exit_code = 3


class UnreadableList(SecurityError):
    """A contact list sealed under a key this device does not hold."""


def contacts_key(user: str) -> str:
    return CONTACTS_PREFIX + user


def requests_key(user: str) -> str:
    return REQUESTS_PREFIX + user


def value_id(name: str) -> int:
    """A stable 63-bit, non-zero value id (OpenDHT's 0 means "any")."""
    return (int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1) | 1


def request_value_id(sender: str) -> int:
    return value_id("request-from/" + sender)


def valid_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and "/" not in name


# ------------------------------------------------------------------ keys


def password_key(user: str, password: str) -> bytes:
    """The same 32 bytes on every device of `user` that knows the password, and nowhere else.

    The salt is fixed per user (it must be: a new device has nothing but name and password);
    the purpose label keeps this key apart from anything else derived from the password.
    """
    salt = hashlib.sha256(b"punchline/contacts-password-key\x00" + user.encode()).digest()
    kdf = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return kdf.derive(password.encode("utf-8"))


def initial_list_key(key: bytes) -> bytes:
    """The list key a user starts with, derived so that devices signing up and logging in at
    the same time agree on it without having seen each other's documents."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"punchline/contacts-list-key/v1")  # fmt: skip
    return hkdf.derive(key)


def key_id(key: bytes) -> str:
    """Names a list key in documents without revealing it: readers pick the key to try."""
    return hashlib.sha256(b"punchline/contacts-key-id\x00" + key).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str) or len(text) > 2 * MAX_PLAINTEXT:
        raise ValueError("expected base64 text")
    return base64.b64decode(text, validate=True)


def _seal(key: bytes, data: bytes, context: bytes) -> dict[str, str]:
    nonce = os.urandom(12)
    return {"nonce": _b64(nonce), "ct": _b64(AESGCM(key).encrypt(nonce, data, context))}


def _open(key: bytes, sealed: object, context: bytes) -> bytes:
    if not isinstance(sealed, dict):
        raise ValueError("sealed data must be an object")
    nonce, ciphertext = _unb64(sealed.get("nonce")), _unb64(sealed.get("ct"))
    if len(nonce) != 12:
        raise ValueError("nonce must be 12 bytes")
    return AESGCM(key).decrypt(nonce, ciphertext, context)


def wrap(pw_key: bytes, list_key: bytes, user: str) -> dict[str, str]:
    return _seal(pw_key, list_key, b"punchline/contacts-wrap/" + user.encode())


def unwrap(pw_key: bytes, wrapped: object, user: str) -> bytes | None:
    """The list key inside `wrapped`, or None when it was wrapped under another password."""
    try:
        key = _open(pw_key, wrapped, b"punchline/contacts-wrap/" + user.encode())
    except (InvalidTag, ValueError, binascii.Error):
        return None
    return key if len(key) == 32 else None


def seal_list(list_key: bytes, user: str, content: dict[str, Any]) -> dict[str, str]:
    data = zlib.compress(json.dumps(content, separators=(",", ":"), sort_keys=True).encode())
    return _seal(list_key, data, b"punchline/contacts-list/" + user.encode())


def open_list(list_key: bytes, user: str, sealed: object) -> dict[str, Any]:
    """The list inside; `UnreadableList` if the key is wrong or the sealed data was altered."""
    try:
        data = _open(list_key, sealed, b"punchline/contacts-list/" + user.encode())
        inflater = zlib.decompressobj()
        text = inflater.decompress(data, MAX_PLAINTEXT)
        if inflater.unconsumed_tail:
            raise ValueError("contact list too large")
        return loads_object_untrusted(text)
    except (InvalidTag, ValueError, binascii.Error, zlib.error) as exc:
        raise UnreadableList(f"contact list cannot be opened: {type(exc).__name__}") from exc


# ------------------------------------------------------------------ documents


def _cert_text(certificate: x509.Certificate) -> str:
    return _b64(certificate.public_bytes(Encoding.DER))


def _verified(
    document: object, ca: x509.Certificate, now: float, context: str
) -> tuple[dict[str, Any], certs.CertInfo, float]:
    """Payload, signer and signing time of a signed document carrying its user certificate."""

    def signing_time(claimed: dict[str, Any]) -> float:
        # Checked at signing time: a request or list outlives the day-long certificate that
        # signed it (its device may stay offline for weeks); later ones carry renewed ones.
        signed_at = _time(claimed.get("signed_at"), "signing time")
        if signed_at > now + CLOCK_SKEW:
            raise ContactDocumentError("document claims to be signed in the future")
        return signed_at

    try:
        opened = certified.open_certified(document, ca, context, signing_time)
    except certified.NotADocument as exc:
        raise ContactDocumentError(str(exc)) from exc
    except certified.Rejected as exc:
        raise ForgedDocument(f"document rejected: {exc}") from exc
    payload, info, signed_at = opened.payload, opened.signer, opened.checked_at
    if payload.get("v") != 1:
        raise ContactDocumentError("unknown document version")
    return payload, info, signed_at


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ContactDocumentError(f"document has a malformed {what}")
    return value


def _time(value: object, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ContactDocumentError(f"document has a malformed {what}")
    return float(value)


@dataclass(frozen=True)
class ListDocument:
    """A verified contact list document; `sealed` still needs the list key."""

    user: str
    device: str
    seq: int
    kid: str  # names the list key it is sealed under
    wrapped: dict[str, Any]  # the list key, under the password key of `password_set_at`
    password_set_at: float
    sealed: dict[str, Any]


def make_list(
    key: Ed25519PrivateKey,
    certificate: x509.Certificate,
    user: str,
    device: str,
    seq: int,
    list_key: bytes,
    wrapped: dict[str, Any],
    password_set_at: float,
    content: dict[str, Any],
    now: float,
) -> dict[str, str]:
    payload = {
        "v": 1, "user": user, "device": device, "cert": _cert_text(certificate), "seq": seq,
        "signed_at": now, "kid": key_id(list_key), "wrap": wrapped,
        "password_set_at": password_set_at, "list": seal_list(list_key, user, content),
    }  # fmt: skip
    return signed.sign_document(key, LIST_CONTEXT, payload)


def verify_list(document: object, ca: x509.Certificate, now: float, user: str) -> ListDocument:
    """Check a contact list document of `user`; only `ContactDocumentError` escapes."""
    payload, info, _signed_at = _verified(document, ca, now, LIST_CONTEXT)
    if payload.get("user") != info.subject or info.subject != user:
        raise ForgedDocument(f"contact list of {payload.get('user')!r} signed by {info.subject!r}")
    device, kid = payload.get("device"), payload.get("kid")
    wrapped, sealed = payload.get("wrap"), payload.get("list")
    if not valid_name(device) or not isinstance(kid, str) or len(kid) > 64:
        raise ContactDocumentError("contact list names no device or key")
    if not isinstance(wrapped, dict) or not isinstance(sealed, dict):
        raise ContactDocumentError("contact list has no sealed content")
    assert isinstance(device, str)
    return ListDocument(user, device, _int(payload.get("seq"), "sequence number"), kid, wrapped,
                        _time(payload.get("password_set_at"), "password time"), sealed)  # fmt: skip


@dataclass(frozen=True)
class ContactRequest:
    """A verified request ("please add me") or acceptance, from `sender` to `recipient`."""

    kind: str
    sender: str
    recipient: str
    ts: int  # milliseconds, the sender's clock
    expires: float


def make_request(
    key: Ed25519PrivateKey,
    certificate: x509.Certificate,
    kind: str,
    sender: str,
    recipient: str,
    now: float,
    lifetime: float = REQUEST_LIFETIME,
) -> dict[str, str]:
    if kind not in REQUEST_KINDS:
        raise ValueError(f"unknown contact request kind {kind!r}")
    payload = {
        "v": 1, "kind": kind, "from": sender, "to": recipient, "cert": _cert_text(certificate),
        "ts": int(now * 1000), "signed_at": now, "expires": now + lifetime,
    }  # fmt: skip
    return signed.sign_document(key, REQUEST_CONTEXT, payload)


def verify_request(
    document: object, ca: x509.Certificate, now: float, recipient: str | None = None
) -> ContactRequest:
    """Check a request end to end; only `ContactDocumentError` escapes."""
    payload, info, signed_at = _verified(document, ca, now, REQUEST_CONTEXT)
    kind, sender, to = payload.get("kind"), payload.get("from"), payload.get("to")
    if sender != info.subject:
        raise ForgedDocument(f"request from {sender!r} signed by {info.subject!r}")
    if kind not in REQUEST_KINDS or not valid_name(to):
        raise ContactDocumentError("request has a malformed kind or recipient")
    if recipient is not None and to != recipient:
        raise ContactDocumentError(f"request for {to!r} filed under {recipient!r}")
    if to == sender:
        raise ContactDocumentError("a user cannot ask themselves")
    ts, expires = _int(payload.get("ts"), "time"), _time(payload.get("expires"), "expiry")
    if expires < now:
        raise ContactDocumentError("request has expired")
    if expires > signed_at + REQUEST_LIFETIME + CLOCK_SKEW:
        raise ContactDocumentError("request claims to live too long")
    assert isinstance(kind, str)
    assert isinstance(to, str)
    return ContactRequest(kind, info.subject, to, ts, expires)


# ------------------------------------------------------------------ parts of large messages

_part_ids = itertools.count(1)


def split(message: dict[str, Any], limit: int = PART_BYTES) -> list[dict[str, Any]]:
    """`message` itself when it fits in one datagram, else numbered parts of its JSON."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) <= limit:
        return [message]
    chunks = [data[i : i + limit] for i in range(0, len(data), limit)]
    if len(chunks) > MAX_PARTS:
        raise ValueError(f"message of {len(data)} bytes is too large to send")
    ref = next(_part_ids)
    return [
        {"t": "part", "ref": ref, "i": i, "n": len(chunks), "data": _b64(chunk)}
        for i, chunk in enumerate(chunks)
    ]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class _Partial:
    n: int
    started: float
    chunks: dict[int, bytes] = field(default_factory=dict)


class Joiner:
    """Reassembles parts from one peer; bounded in memory, incomplete messages age out."""

    def __init__(self, max_pending: int = 4, max_age: float = 30.0) -> None:
        self._pending: dict[int, _Partial] = {}
        self.max_pending, self.max_age = max_pending, max_age

    def feed(self, part: dict[str, Any], now: float) -> dict[str, Any] | None:
        """The whole message once its last part arrived; ValueError for a malformed part."""
        ref, i, n = part.get("ref"), part.get("i"), part.get("n")
        if not (_is_int(ref) and _is_int(i) and _is_int(n)):
            raise ValueError("part has no ref, index or count")
        assert isinstance(ref, int)
        assert isinstance(i, int)
        assert isinstance(n, int)
        if not 0 < n <= MAX_PARTS or not 0 <= i < n:
            raise ValueError("part index out of range")
        chunk = _unb64(part.get("data"))
        if len(chunk) > PART_BYTES:
            raise ValueError("part too large")
        self._pending = {r: p for r, p in self._pending.items() if now - p.started < self.max_age}
        partial = self._pending.get(ref)
        if partial is None:
            if len(self._pending) >= self.max_pending:
                raise ValueError("too many incomplete messages")
            partial = self._pending[ref] = _Partial(n, now)
        if partial.n != n:
            raise ValueError("part count changed")
        partial.chunks[i] = chunk
        if len(partial.chunks) < n:
            return None
        del self._pending[ref]
        return loads_object_untrusted(b"".join(partial.chunks[k] for k in range(n)))
