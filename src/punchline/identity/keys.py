"""Ed25519 key pairs for users and nodes, and how they are written down.

Private keys live in PKCS#8 PEM files with mode 0600 (like ssh keys, unencrypted so a daemon can
start unattended); public keys travel as base64 of the raw 32 bytes, which is what fits a
datagram.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from punchline.errors import RemoteError

PUBLIC_KEY_BYTES = 32


class KeyFormatError(RemoteError):
    """A key received from elsewhere is not a well-formed Ed25519 key."""


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_from_pem(data: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError("the key file does not hold an Ed25519 private key")
    return key


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_to_text(key: Ed25519PublicKey) -> str:
    return base64.b64encode(public_raw(key)).decode("ascii")


def public_from_text_untrusted(text: object) -> Ed25519PublicKey:
    """Parse a public key that arrived over the network; only `KeyFormatError` escapes."""
    if not isinstance(text, str) or len(text) > 64:
        raise KeyFormatError("public_key must be base64 of 32 bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError("public_key is not valid base64") from exc
    if len(raw) != PUBLIC_KEY_BYTES:
        raise KeyFormatError(f"public_key must be {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """A stable, human-comparable name for a public key: SHA-256 of SubjectPublicKeyInfo.

    The SPKI (not the whole certificate) is hashed so that re-issuing the CA certificate with the
    same key keeps the fingerprint users pinned.
    """
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(spki).hexdigest()
    return "sha256:" + digest


def key_id(key: Ed25519PublicKey) -> str:
    """A short identifier derived from a public key, used as the id of infrastructure nodes."""
    digest = hashlib.sha256(public_raw(key)).digest()
    return base64.b32encode(digest[:10]).decode("ascii").lower()
