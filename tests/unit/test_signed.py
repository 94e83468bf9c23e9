"""Signed documents, proofs of key possession, and constant-time comparison."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from punchline.errors import SecurityError
from punchline.identity import keys, signed
from punchline.identity.signed import (
    PROOF_WINDOW_SECONDS,
    BadSignature,
    check_proof_untrusted,
    constant_time_equal,
    make_proof,
    open_document_untrusted,
    sign_document,
)

KEY = keys.generate()
OTHER = keys.generate()
PAYLOAD: dict[str, Any] = {"nodes": [{"id": "n1", "port": 443}], "serial": 7, "name": "ünï"}
TS = 1_700_000_000


def document() -> dict[str, str]:
    return sign_document(KEY, "bootstrap", PAYLOAD)


# ------------------------------------------------------------------ documents


def test_document_round_trip() -> None:
    doc = document()
    assert set(doc) == {"payload", "signature"}
    assert open_document_untrusted(KEY.public_key(), "bootstrap", doc) == PAYLOAD


def test_document_survives_json_transport() -> None:
    doc = json.loads(json.dumps(document()))
    assert open_document_untrusted(KEY.public_key(), "bootstrap", doc) == PAYLOAD


def test_payload_is_compact_sorted_json() -> None:
    doc = sign_document(KEY, "x", {"b": 1, "a": [1, 2]})
    assert doc["payload"] == '{"a":[1,2],"b":1}'


def _tampered_payload() -> dict[str, str]:
    doc = document()
    doc["payload"] = doc["payload"].replace('"serial":7', '"serial":8')
    assert doc["payload"] != document()["payload"]
    return doc


def _non_json_payload() -> dict[str, str]:
    text = "not json {"
    return {"payload": text, "signature": signed.sign(KEY, "bootstrap", text.encode())}


def _json_list_payload() -> dict[str, str]:
    text = "[1, 2]"
    return {"payload": text, "signature": signed.sign(KEY, "bootstrap", text.encode())}


def _signature_of(doc: dict[str, str], signature: object) -> dict[str, object]:
    return {"payload": doc["payload"], "signature": signature}


@pytest.mark.parametrize(
    ("public", "context", "doc"),
    [
        pytest.param(KEY.public_key(), "bootstrap", _tampered_payload(), id="tampered-payload"),
        pytest.param(KEY.public_key(), "other", document(), id="wrong-context"),
        pytest.param(OTHER.public_key(), "bootstrap", document(), id="wrong-key"),
        pytest.param(KEY.public_key(), "bootstrap", [document()], id="list"),
        pytest.param(KEY.public_key(), "bootstrap", json.dumps(document()), id="json-string"),
        pytest.param(KEY.public_key(), "bootstrap", None, id="none"),
        pytest.param(KEY.public_key(), "bootstrap", {"payload": "{}"}, id="missing-signature"),
        pytest.param(KEY.public_key(), "bootstrap", {"signature": "AAAA"}, id="missing-payload"),
        pytest.param(KEY.public_key(), "bootstrap", {"payload": {}, "signature": ""}, id="obj"),
        pytest.param(KEY.public_key(), "bootstrap", _non_json_payload(), id="non-json"),
        pytest.param(KEY.public_key(), "bootstrap", _json_list_payload(), id="json-list"),
        pytest.param(
            KEY.public_key(), "bootstrap", _signature_of(document(), 12), id="signature-int"
        ),
        pytest.param(
            KEY.public_key(),
            "bootstrap",
            _signature_of(document(), "!!not base64!!"),
            id="signature-not-base64",
        ),
        pytest.param(
            KEY.public_key(),
            "bootstrap",
            _signature_of(document(), document()["signature"] + "A" * 200),
            id="signature-too-long",
        ),
        pytest.param(
            KEY.public_key(),
            "bootstrap",
            _signature_of(document(), base64.b64encode(b"\x00" * 10).decode()),
            id="signature-short",
        ),
        pytest.param(
            KEY.public_key(),
            "bootstrap",
            _signature_of(document(), "é" * 88),
            id="signature-non-ascii",
        ),
        pytest.param(
            KEY.public_key(),
            "bootstrap",
            {"payload": "x" * (signed.MAX_DOCUMENT_BYTES + 1), "signature": "AAAA"},
            id="payload-too-big",
        ),
    ],
)
def test_bad_documents_raise_bad_signature(public: Any, context: str, doc: object) -> None:
    with pytest.raises(BadSignature):
        open_document_untrusted(public, context, doc)


def test_context_separates_signatures() -> None:
    data = b"same bytes"
    sig = signed.sign(KEY, "alpha", data)
    signed.verify_untrusted(KEY.public_key(), "alpha", data, sig)
    with pytest.raises(BadSignature):
        signed.verify_untrusted(KEY.public_key(), "alphabet", data, sig)
    with pytest.raises(BadSignature):
        signed.verify_untrusted(KEY.public_key(), "alpha", data + b"!", sig)


def test_bad_signature_is_security_error() -> None:
    assert issubclass(BadSignature, SecurityError)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
signature_like = st.one_of(
    json_values,
    st.binary(min_size=64, max_size=64).map(lambda b: base64.b64encode(b).decode()),
)


@settings(max_examples=200)
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries({"payload": json_values, "signature": signature_like}),
        st.fixed_dictionaries({"payload": st.text(), "signature": signature_like}),
    )
)
def test_open_document_only_raises_bad_signature(doc: object) -> None:
    with pytest.raises(BadSignature):
        open_document_untrusted(KEY.public_key(), "bootstrap", doc)


# ------------------------------------------------------------------ proofs


def proof(key: Ed25519PrivateKey = KEY, purpose: str = "login", subject: str = "alice") -> str:
    return make_proof(key, purpose, subject, TS)


@pytest.mark.parametrize("offset", [0.0, 1.5, -1.5, PROOF_WINDOW_SECONDS, -PROOF_WINDOW_SECONDS])
def test_proof_inside_window(offset: float) -> None:
    check_proof_untrusted(KEY.public_key(), "login", "alice", TS, proof(), TS + offset)


@pytest.mark.parametrize("offset", [PROOF_WINDOW_SECONDS + 0.5, -PROOF_WINDOW_SECONDS - 0.5])
def test_proof_outside_window(offset: float) -> None:
    with pytest.raises(BadSignature, match="clock"):
        check_proof_untrusted(KEY.public_key(), "login", "alice", TS, proof(), TS + offset)


@pytest.mark.parametrize(
    ("purpose", "subject", "timestamp", "public"),
    [
        pytest.param("signup", "alice", TS, KEY.public_key(), id="wrong-purpose"),
        pytest.param("login", "bob", TS, KEY.public_key(), id="wrong-subject"),
        pytest.param("login", "alice", TS + 1, KEY.public_key(), id="wrong-timestamp"),
        pytest.param("login", "alice", TS, OTHER.public_key(), id="wrong-key"),
        pytest.param("login", "alice\x00", TS, KEY.public_key(), id="subject-with-nul"),
    ],
)
def test_proof_mismatch(purpose: str, subject: str, timestamp: int, public: Any) -> None:
    with pytest.raises(BadSignature):
        check_proof_untrusted(public, purpose, subject, timestamp, proof(), TS)


@pytest.mark.parametrize("timestamp", [str(TS), float(TS), True, False, None, [TS]])
def test_proof_timestamp_must_be_int(timestamp: object) -> None:
    with pytest.raises(BadSignature, match="integer"):
        check_proof_untrusted(KEY.public_key(), "login", "alice", timestamp, proof(), TS)


@pytest.mark.parametrize("bad_proof", [None, 1, "", "AAAA", "é", "A" * 201])
def test_proof_garbage(bad_proof: object) -> None:
    with pytest.raises(BadSignature):
        check_proof_untrusted(KEY.public_key(), "login", "alice", TS, bad_proof, TS)


def test_proof_is_not_a_document_signature() -> None:
    """A proof signature cannot be replayed as a signature in another context."""
    data = f"login\x00alice\x00{TS}".encode()
    with pytest.raises(BadSignature):
        signed.verify_untrusted(KEY.public_key(), "bootstrap", data, proof())


# ------------------------------------------------------------------ constant_time_equal


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("secret", "secret", True),
        ("", "", True),
        ("ünï", "ünï", True),
        ("secret", "secreT", False),
        ("secret", "secret ", False),
        ("", "x", False),
        ("ü", "u", False),
    ],
)
def test_constant_time_equal(a: str, b: str, equal: bool) -> None:
    assert constant_time_equal(a, b) is equal


# ------------------------------------------------------------------ hostile encodings


def test_lone_surrogate_payload_is_bad_signature() -> None:
    doc = json.loads('{"payload": "\\ud800", "signature": "AAAA"}')  # valid JSON from a peer
    with pytest.raises(BadSignature):
        open_document_untrusted(KEY.public_key(), "bootstrap", doc)


def test_huge_proof_timestamp_is_bad_signature() -> None:
    timestamp = json.loads("1" + "0" * 400)  # valid JSON integer from a peer; `now` is a float
    with pytest.raises(BadSignature):
        check_proof_untrusted(KEY.public_key(), "login", "alice", timestamp, proof(), TS + 0.5)
