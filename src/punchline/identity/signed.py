"""Signatures over exact bytes: CA-signed documents, proofs of key possession, signed requests.

We sign the exact serialised bytes and ship them alongside the signature instead of
re-serialising on the receiving side, so no JSON canonicalisation is ever needed.
Every signed message starts with a context label, so a signature made for one purpose can
never be replayed as another.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from punchline.errors import SecurityError
from punchline.util.jsontext import loads_object_untrusted

PROOF_WINDOW_SECONDS = 300.0
MAX_DOCUMENT_BYTES = 1_000_000


class BadSignature(SecurityError):
    """A signature is missing, malformed or does not verify."""


def _label(context: str) -> bytes:
    return b"punchline/" + context.encode("ascii") + b"\x00"


def sign(key: Ed25519PrivateKey, context: str, data: bytes) -> str:
    return base64.b64encode(key.sign(_label(context) + data)).decode("ascii")


def verify_untrusted(
    public: Ed25519PublicKey, context: str, data: bytes, signature: object
) -> None:
    if not isinstance(signature, str) or len(signature) > 200:
        raise BadSignature("signature must be base64 text")
    try:
        raw = base64.b64decode(signature, validate=True)
        public.verify(raw, _label(context) + data)
    except (binascii.Error, ValueError, InvalidSignature) as exc:
        raise BadSignature(f"signature does not verify ({context})") from exc


def sign_document(key: Ed25519PrivateKey, context: str, payload: dict[str, Any]) -> dict[str, str]:
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    return {"payload": text, "signature": sign(key, context, text.encode("utf-8"))}


def open_document_untrusted(
    public: Ed25519PublicKey, context: str, document: object
) -> dict[str, Any]:
    """Verify a signed document and return its payload; only `BadSignature` escapes."""
    if not isinstance(document, dict):
        raise BadSignature("signed document must be an object with payload and signature")
    text = document.get("payload")
    if not isinstance(text, str) or len(text) > MAX_DOCUMENT_BYTES:
        raise BadSignature("signed document has no payload text")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadSignature("signed payload is not valid UTF-8 text") from exc
    verify_untrusted(public, context, data, document.get("signature"))
    try:
        return loads_object_untrusted(text)
    except ValueError as exc:
        raise BadSignature(f"signed payload {exc}") from exc


def check_timestamp_untrusted(timestamp: object, now: float) -> None:
    """A signed message's time must be an integer within the window around our clock."""
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise BadSignature("timestamp must be an integer")
    # bound it first: a huge JSON integer would overflow the float subtraction below
    if not 0 <= timestamp < 2**53 or abs(now - timestamp) > PROOF_WINDOW_SECONDS:
        raise BadSignature(
            "timestamp is too far from the server's clock; check this machine's time"
        )


def _proof_bytes(purpose: str, subject: str, timestamp: int) -> bytes:
    return f"{purpose}\x00{subject}\x00{timestamp}".encode()


def make_proof(key: Ed25519PrivateKey, purpose: str, subject: str, timestamp: int) -> str:
    """Prove possession of `key` for one purpose, one subject, around one moment."""
    return sign(key, "proof", _proof_bytes(purpose, subject, timestamp))


def check_proof_untrusted(
    public: Ed25519PublicKey,
    purpose: str,
    subject: str,
    timestamp: object,
    proof: object,
    now: float,
) -> None:
    check_timestamp_untrusted(timestamp, now)
    assert isinstance(timestamp, int)
    verify_untrusted(public, "proof", _proof_bytes(purpose, subject, timestamp), proof)


def constant_time_equal(given: str, expected: str) -> bool:
    """Compare secrets without leaking, through timing, how much of them matched."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
