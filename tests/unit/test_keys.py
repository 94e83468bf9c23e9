"""Ed25519 key encodings, fingerprints and key ids."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from punchline.errors import RemoteError
from punchline.identity import keys
from punchline.identity.keys import KeyFormatError, public_from_text_untrusted

KEY = keys.generate()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_public_text_round_trip() -> None:
    text = keys.public_to_text(KEY.public_key())
    assert len(base64.b64decode(text)) == keys.PUBLIC_KEY_BYTES
    parsed = public_from_text_untrusted(text)
    assert keys.public_raw(parsed) == keys.public_raw(KEY.public_key())
    parsed.verify(KEY.sign(b"hello"), b"hello")


def test_private_pem_round_trip() -> None:
    pem = keys.private_to_pem(KEY)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    again = keys.private_from_pem(pem)
    assert keys.public_raw(again.public_key()) == keys.public_raw(KEY.public_key())


def test_private_from_pem_rejects_other_key_types() -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(KeyFormatError, match="Ed25519"):
        keys.private_from_pem(pem)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "base64 of 32 bytes"),
        (123, "base64 of 32 bytes"),
        (b64(b"\x01" * 32).encode(), "base64 of 32 bytes"),  # bytes, not str
        ("A" * 65, "base64 of 32 bytes"),
        ("not base64!!", "not valid base64"),
        ("AAA", "not valid base64"),
        ("éééé", "not valid base64"),
        (b64(b"\x01" * 31), "32 bytes, got 31"),
        (b64(b"\x01" * 33), "32 bytes, got 33"),
        ("", "32 bytes, got 0"),
    ],
)
def test_public_from_text_rejects(value: object, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message):
        public_from_text_untrusted(value)


def test_key_format_error_is_remote_error() -> None:
    assert issubclass(KeyFormatError, RemoteError)


@settings(max_examples=200)
@given(st.one_of(st.text(max_size=70), st.binary(max_size=40).map(b64), st.none(), st.integers()))
def test_public_from_text_only_raises_key_format_error(value: object) -> None:
    try:
        key = public_from_text_untrusted(value)
    except KeyFormatError:
        return
    assert isinstance(value, str)
    assert keys.public_raw(key) == base64.b64decode(value)


def test_fingerprint_is_stable_and_prefixed() -> None:
    public = KEY.public_key()
    fp = keys.fingerprint(public)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    assert keys.fingerprint(public) == fp
    assert keys.fingerprint(public_from_text_untrusted(keys.public_to_text(public))) == fp
    assert keys.fingerprint(keys.generate().public_key()) != fp


def test_fingerprint_is_sha256_of_spki() -> None:
    spki = KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert keys.fingerprint(KEY.public_key()) == "sha256:" + hashlib.sha256(spki).hexdigest()


def test_key_id_is_deterministic_and_short() -> None:
    public = KEY.public_key()
    kid = keys.key_id(public)
    assert len(kid) == 16
    assert re.fullmatch(r"[a-z2-7]{16}", kid)
    assert keys.key_id(public_from_text_untrusted(keys.public_to_text(public))) == kid
    assert keys.key_id(keys.generate().public_key()) != kid


def test_known_values() -> None:
    public = public_from_text_untrusted(b64(bytes(range(32))))
    # sha256(SPKI prefix 302a300506032b6570032100 + raw key), computed independently
    assert keys.fingerprint(public) == (
        "sha256:9408457aefd071cec127c1f98539930861ad1ba94c940db975c972c09fc68b68"
    )
    # lower-case base32 of the first 10 bytes of sha256(raw key)
    assert keys.key_id(public) == "mmg42klgyqzwneis"
