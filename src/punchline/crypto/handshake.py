"""An authenticated ephemeral key agreement between two certified identities, in two messages.

Why this shape: both ends already hold CA-issued Ed25519 certificates (see
`identity.certs`), so a SIGMA-style exchange (Krawczyk, "SIGMA: the SIGn-and-MAc approach to
authenticated Diffie-Hellman", CRYPTO 2003) is the smallest protocol that gives mutual
authentication and forward secrecy: each side sends a fresh X25519 key (RFC 7748) signed with
its certified Ed25519 key (RFC 8032). We use the variant where each signature names the
intended peer (the `to` field) and the responder's signature also covers a hash of the hello,
instead of SIGMA's MAC: that binds both halves of the transcript to both identities, so an
answer can neither be moved to another handshake nor a hello redirected to another responder.
Two messages fit the places the handshake rides in: a client's attach request to a supernode
(context ``"session"``) and a call invite/answer pair (context ``"call"``), where a third
message would cost a round trip through two supernodes.

Messages are JSON-ready dicts. Signatures are computed over an unambiguous length-prefixed
encoding of the decoded fields (never over JSON text), with the `identity.signed` context label
``"handshake"`` and the caller's context inside the signed bytes, so a signature made for a
call can never open a supernode session and vice versa.

Keys come from HKDF-SHA256 (RFC 5869) over the X25519 shared secret, salted with the hash of
both signed transcripts, with one label per direction; an all-zero shared secret (a low-order
point, RFC 7748 §6.1) is refused. Losing an identity key later reveals nothing about past
sessions because the ephemeral private keys are never stored.

Replay: the timestamp window (`identity.signed.PROOF_WINDOW_SECONDS`) bounds how long a hello
can be replayed; within it, a responder that must not answer twice drops hellos whose
`hello_id` it has already seen. A replayed hello yields nothing to an attacker without the
initiator's ephemeral private key anyway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from punchline.errors import LocalError, SecurityError
from punchline.identity import certs, keys, signed
from punchline.identity.certs import Role

VERSION = 1
SESSION_CONTEXT = "session"
CALL_CONTEXT = "call"
SIGNATURE_CONTEXT = "handshake"  # the identity.signed label of every handshake signature
EPHEMERAL_BYTES = 32
NONCE_BYTES = 16
KEY_BYTES = 32
SESSION_ID_BYTES = 8
HASH_BYTES = 32
MAX_NAME_CHARS = 255

_PROTOCOL = b"punchline handshake v1"
_HELLO_ID_LABEL = b"punchline hello id v1"
_INITIATOR_TO_RESPONDER = b"initiator to responder"
_RESPONDER_TO_INITIATOR = b"responder to initiator"
_SESSION_ID_LABEL = b"session id"
_CONTEXT_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,31}")
_HELLO_FIELDS = frozenset({"v", "cert", "eph", "nonce", "to", "ts", "sig"})
_ANSWER_FIELDS = _HELLO_FIELDS | {"re"}
# base64 of a DER certificate no larger than certs.MAX_CERT_BYTES
_MAX_CERT_TEXT = 4 * ((certs.MAX_CERT_BYTES + 2) // 3)


class HandshakeError(SecurityError):
    """A handshake message was refused; `check` names the check that failed.

    The only error the `*_untrusted` functions raise. When a certificate or signature check
    failed, the original `CertificateError` / `BadSignature` is kept as ``__cause__``.
    """

    def __init__(self, message: str, check: str = "format") -> None:
        super().__init__(message)
        self.check = check


@dataclass(frozen=True)
class Peer:
    """Who is at the other end: the verified certificate's contents and its exact bytes."""

    info: certs.CertInfo
    certificate_der: bytes


@dataclass(frozen=True)
class SessionKeys:
    """Per-direction keys of one handshake; the initiator's `send` is the responder's `receive`.

    `session_id` is the same on both ends and public: a short name for the session in logs and
    on the wire, never key material for anything else.
    """

    send: bytes
    receive: bytes
    session_id: bytes

    def __repr__(self) -> str:  # keep keys out of logs and tracebacks
        return f"SessionKeys(session_id={self.session_id.hex()})"


@dataclass(frozen=True)
class _Message:
    """A hello or answer after the structural checks, fields decoded, nothing verified yet."""

    cert_der: bytes
    eph: bytes
    nonce: bytes
    to: str
    ts: int
    sig: str
    re: bytes | None  # answers only: hello_id of the hello answered


# ------------------------------------------------------------------ encoding


def _encode(*items: bytes) -> bytes:
    """Length-prefixed concatenation: distinct field tuples can never give the same bytes."""
    return b"".join(len(item).to_bytes(4, "big") + item for item in items)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _claims(m: _Message) -> list[bytes]:
    """What a message asserts: certificate, ephemeral key, nonce, recipient, time."""
    return [m.cert_der, m.eph, m.nonce, m.to.encode("utf-8"), m.ts.to_bytes(8, "big")]


def _signed_bytes(context: str, direction: bytes, m: _Message, hello_hash: bytes = b"") -> bytes:
    items = [_PROTOCOL, context.encode("ascii"), direction, *_claims(m)]
    if direction == b"answer":
        items.append(hello_hash)
    return _encode(*items)


def _hello_hash(m: _Message) -> bytes:
    # Covers everything the initiator asserts except the signature, so a replay with a
    # re-encoded or garbage signature still has the same id.
    return hashlib.sha256(_encode(_HELLO_ID_LABEL, *_claims(m))).digest()


# ------------------------------------------------------------------ parsing


def _field_b64(message: dict[Any, Any], name: str, size: int | None, max_text: int) -> bytes:
    value = message[name]
    if not isinstance(value, str) or not value or len(value) > max_text:
        raise HandshakeError(f"handshake field {name!r} must be base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HandshakeError(f"handshake field {name!r} is not valid base64") from exc
    if _b64(raw) != value:
        raise HandshakeError(f"handshake field {name!r} is not canonical base64")
    if size is not None and len(raw) != size:
        raise HandshakeError(f"handshake field {name!r} must be {size} bytes, got {len(raw)}")
    return raw


def _parse_untrusted(message: object, kind: str) -> _Message:
    """Check the shape of a hello or answer and decode its fields; verify nothing yet."""
    fields = _ANSWER_FIELDS if kind == "answer" else _HELLO_FIELDS
    if not isinstance(message, dict):
        raise HandshakeError(f"handshake {kind} must be a JSON object")
    if set(message) != fields:
        missing = sorted(str(k) for k in fields - set(message))
        extra = sorted(str(k) for k in set(message) - fields)
        raise HandshakeError(f"handshake {kind} fields wrong (missing {missing}, extra {extra})")
    version = message["v"]
    if not isinstance(version, int) or isinstance(version, bool) or version != VERSION:
        raise HandshakeError(f"handshake {kind} has unsupported version {version!r}")
    to = message["to"]
    if not isinstance(to, str) or not 0 < len(to) <= MAX_NAME_CHARS:
        raise HandshakeError(f"handshake {kind} field 'to' must be a name")
    try:
        to.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HandshakeError(f"handshake {kind} field 'to' is not valid text") from exc
    ts = message["ts"]
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < 2**53:
        raise HandshakeError(f"handshake {kind} field 'ts' must be a whole number of seconds")
    sig = message["sig"]
    if not isinstance(sig, str):
        raise HandshakeError(f"handshake {kind} field 'sig' must be base64 text")
    return _Message(
        cert_der=_field_b64(message, "cert", None, _MAX_CERT_TEXT),
        eph=_field_b64(message, "eph", EPHEMERAL_BYTES, 64),
        nonce=_field_b64(message, "nonce", NONCE_BYTES, 64),
        to=to,
        ts=ts,
        sig=sig,
        re=_field_b64(message, "re", HASH_BYTES, 64) if kind == "answer" else None,
    )


def hello_id(hello: object) -> bytes:
    """A stable 32-byte id of a hello, so a responder can drop replayed invites.

    The id is a hash of the decoded fields the initiator signs (certificate, ephemeral key,
    nonce, recipient, time), without the signature: re-encodings of one hello share one id.
    It is also what the answer's signature binds. Raises `HandshakeError` if `hello` is not
    shaped like a hello; the signature is not checked here.
    """
    return _hello_hash(_parse_untrusted(hello, "hello"))


# ------------------------------------------------------------------ checks


def _check_time(m: _Message, now: float, kind: str) -> None:
    try:
        signed.check_timestamp_untrusted(m.ts, now)
    except signed.BadSignature as exc:
        raise HandshakeError(
            f"handshake {kind} timestamp {m.ts} is more than {signed.PROOF_WINDOW_SECONDS:.0f} s "
            "from our clock (stale, replayed, or a clock is wrong)",
            check="timestamp",
        ) from exc


def _check_peer(
    m: _Message,
    ca_cert: x509.Certificate,
    now: float,
    role: Role | None,
    expected_subject: str | None,
    kind: str,
) -> Peer:
    try:
        cert = certs.load_untrusted(m.cert_der)
        if cert.public_bytes(serialization.Encoding.DER) != m.cert_der:
            raise certs.MalformedCertificate("certificate is not in canonical DER form")
        info = certs.verify(cert, ca_cert, now, role)
    except certs.CertificateError as exc:
        raise HandshakeError(
            f"handshake {kind} certificate rejected: {exc}", check="certificate"
        ) from exc
    if expected_subject is not None and info.subject != expected_subject:
        raise HandshakeError(
            f"handshake {kind} comes from {info.subject!r}, expected {expected_subject!r}",
            check="subject",
        )
    return Peer(info=info, certificate_der=m.cert_der)


def _check_signature(peer: Peer, data: bytes, m: _Message, kind: str) -> None:
    try:
        signed.verify_untrusted(peer.info.public_key, SIGNATURE_CONTEXT, data, m.sig)
    except signed.BadSignature as exc:
        raise HandshakeError(
            f"handshake {kind} signature does not verify with {peer.info.subject!r}'s key "
            "(forged or altered in transit)",
            check="signature",
        ) from exc


def _shared_secret(private: X25519PrivateKey, peer_eph: bytes) -> bytes:
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_eph))
    except ValueError as exc:  # cryptography refuses low-order points (all-zero result)
        raise HandshakeError(
            "peer's ephemeral key is a low-order point (RFC 7748 §6.1)", check="key"
        ) from exc
    if shared == bytes(len(shared)):  # belt and braces: never derive from an all-zero secret
        raise HandshakeError("X25519 shared secret is all zero (RFC 7748 §6.1)", check="key")
    return shared


def _derive(
    shared: bytes, context: str, hello_bytes: bytes, answer_bytes: bytes
) -> tuple[bytes, bytes, bytes]:
    """(initiator-to-responder key, responder-to-initiator key, session id), RFC 5869."""
    salt = hashlib.sha256(_encode(hello_bytes, answer_bytes)).digest()

    def expand(label: bytes, length: int) -> bytes:
        info = _encode(_PROTOCOL, context.encode("ascii"), label)
        return HKDF(hashes.SHA256(), length, salt, info).derive(shared)

    return (
        expand(_INITIATOR_TO_RESPONDER, KEY_BYTES),
        expand(_RESPONDER_TO_INITIATOR, KEY_BYTES),
        expand(_SESSION_ID_LABEL, SESSION_ID_BYTES),
    )


# ------------------------------------------------------------------ local inputs


def _check_context(context: str) -> None:
    if not isinstance(context, str) or not _CONTEXT_PATTERN.fullmatch(context):
        raise LocalError(f"handshake context must be a short lowercase label, got {context!r}")


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise LocalError(f"{what} must be a non-empty name of at most {MAX_NAME_CHARS} characters")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalError(f"{what} is not valid text") from exc


def _own_subject(identity_key: Ed25519PrivateKey, certificate: x509.Certificate) -> str:
    if keys.public_raw(identity_key.public_key()) != keys.public_raw(certs.cert_key(certificate)):
        raise LocalError("the identity key does not match our certificate")
    names = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(names) != 1:
        raise LocalError("our certificate must name exactly one subject")
    return names[0]


def _random(randbytes: Callable[[int], bytes], size: int) -> bytes:
    data = randbytes(size)
    if not isinstance(data, bytes) or len(data) != size:
        raise LocalError(f"randbytes({size}) must return exactly {size} bytes")
    return data


def _timestamp(now: float) -> int:
    ts = int(now)
    if not 0 <= ts < 2**53:
        raise LocalError(f"clock reading {now!r} is not a plausible Unix time")
    return ts


def _ephemeral(randbytes: Callable[[int], bytes]) -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.from_private_bytes(_random(randbytes, EPHEMERAL_BYTES))
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private, public


def _as_dict(m: _Message) -> dict[str, Any]:
    out: dict[str, Any] = {
        "v": VERSION,
        "cert": _b64(m.cert_der),
        "eph": _b64(m.eph),
        "nonce": _b64(m.nonce),
        "to": m.to,
        "ts": m.ts,
    }
    if m.re is not None:
        out["re"] = _b64(m.re)
    out["sig"] = m.sig
    return out


# ------------------------------------------------------------------ the two sides


class PendingHandshake:
    """The initiator's half-done handshake: send `hello`, then feed the answer to `finish`.

    Holds the ephemeral private key in memory only. It may finish more than once (a forked
    invite answered by several devices of one user gives one set of keys per answer); a refused
    answer does not consume it, so garbage injected by an attacker cannot block the real one.
    """

    def __init__(
        self,
        *,
        hello: dict[str, Any],
        context: str,
        my_name: str,
        peer_name: str,
        ephemeral: X25519PrivateKey,
        hello_bytes: bytes,
        hello_hash: bytes,
    ) -> None:
        self.hello = hello
        self.context = context
        self.my_name = my_name
        self.peer_name = peer_name
        self.hello_id = hello_hash
        self._ephemeral = ephemeral
        self._hello_bytes = hello_bytes

    def __repr__(self) -> str:
        return (
            f"PendingHandshake(context={self.context!r}, {self.my_name!r} -> "
            f"{self.peer_name!r}, hello_id={self.hello_id.hex()[:16]})"
        )

    def finish_untrusted(
        self,
        answer: object,
        ca_cert: x509.Certificate,
        now: float,
        role: Role | None,
        expected_subject: str | None = None,
    ) -> tuple[Peer, SessionKeys]:
        """Verify the responder's answer and derive the keys; only `HandshakeError` escapes.

        Without `expected_subject`, any certificate from the CA with `role` is accepted, and the
        caller must check `peer.info.subject` itself.
        """
        m = _parse_untrusted(answer, "answer")
        if m.re != self.hello_id:
            raise HandshakeError("answer belongs to a different handshake", check="binding")
        if m.to != self.my_name:
            raise HandshakeError(
                f"answer is addressed to {m.to!r}, not to us ({self.my_name!r})",
                check="recipient",
            )
        _check_time(m, now, "answer")
        peer = _check_peer(m, ca_cert, now, role, expected_subject, "answer")
        answer_bytes = _signed_bytes(self.context, b"answer", m, self.hello_id)
        _check_signature(peer, answer_bytes, m, "answer")
        shared = _shared_secret(self._ephemeral, m.eph)
        i2r, r2i, session_id = _derive(shared, self.context, self._hello_bytes, answer_bytes)
        return peer, SessionKeys(send=i2r, receive=r2i, session_id=session_id)


def start(
    identity_key: Ed25519PrivateKey,
    certificate: x509.Certificate,
    context: str,
    peer_name: str,
    now: float,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> PendingHandshake:
    """Make a signed hello addressed to `peer_name` (the responder's certificate subject)."""
    _check_context(context)
    _check_name(peer_name, "peer name")
    my_name = _own_subject(identity_key, certificate)
    ephemeral, eph = _ephemeral(randbytes)
    m = _Message(
        cert_der=certificate.public_bytes(serialization.Encoding.DER),
        eph=eph,
        nonce=_random(randbytes, NONCE_BYTES),
        to=peer_name,
        ts=_timestamp(now),
        sig="",
        re=None,
    )
    hello_bytes = _signed_bytes(context, b"hello", m)
    sig = signed.sign(identity_key, SIGNATURE_CONTEXT, hello_bytes)
    m = _Message(m.cert_der, m.eph, m.nonce, m.to, m.ts, sig, None)
    return PendingHandshake(
        hello=_as_dict(m),
        context=context,
        my_name=my_name,
        peer_name=peer_name,
        ephemeral=ephemeral,
        hello_bytes=hello_bytes,
        hello_hash=_hello_hash(m),
    )


def answer_untrusted(
    hello: object,
    identity_key: Ed25519PrivateKey,
    certificate: x509.Certificate,
    ca_cert: x509.Certificate,
    context: str,
    my_name: str,
    now: float,
    role: Role | None,
    randbytes: Callable[[int], bytes] = os.urandom,
    expected_subject: str | None = None,
) -> tuple[Peer, SessionKeys, dict[str, Any]]:
    """Verify a hello addressed to `my_name` and answer it; only `HandshakeError` escapes.

    Returns the initiator, our keys, and the answer to send back. Checks, in order: shape,
    recipient, time window, certificate (CA, validity at `now`, `role`; None accepts any
    role), `expected_subject`, signature, then the key agreement itself.
    """
    _check_context(context)
    _check_name(my_name, "my_name")
    _own_subject(identity_key, certificate)  # refuse a key that does not match our certificate
    h = _parse_untrusted(hello, "hello")
    if h.to != my_name:
        raise HandshakeError(
            f"hello is addressed to {h.to!r}, not to {my_name!r}", check="recipient"
        )
    _check_time(h, now, "hello")
    peer = _check_peer(h, ca_cert, now, role, expected_subject, "hello")
    hello_bytes = _signed_bytes(context, b"hello", h)
    _check_signature(peer, hello_bytes, h, "hello")
    ephemeral, eph = _ephemeral(randbytes)
    shared = _shared_secret(ephemeral, h.eph)
    hello_hash = _hello_hash(h)
    a = _Message(
        cert_der=certificate.public_bytes(serialization.Encoding.DER),
        eph=eph,
        nonce=_random(randbytes, NONCE_BYTES),
        to=peer.info.subject,
        ts=_timestamp(now),
        sig="",
        re=hello_hash,
    )
    answer_bytes = _signed_bytes(context, b"answer", a, hello_hash)
    sig = signed.sign(identity_key, SIGNATURE_CONTEXT, answer_bytes)
    a = _Message(a.cert_der, a.eph, a.nonce, a.to, a.ts, sig, a.re)
    i2r, r2i, session_id = _derive(shared, context, hello_bytes, answer_bytes)
    return peer, SessionKeys(send=r2i, receive=i2r, session_id=session_id), _as_dict(a)
