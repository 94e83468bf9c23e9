"""The two-message authenticated key agreement: keys agree, and every check refuses."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from punchline.crypto import handshake
from punchline.crypto.handshake import (
    CALL_CONTEXT,
    SESSION_CONTEXT,
    HandshakeError,
    PendingHandshake,
    SessionKeys,
    answer_untrusted,
    hello_id,
    start,
)
from punchline.errors import LocalError, SecurityError
from punchline.identity import certs, keys, signed
from punchline.identity.certs import Role

if TYPE_CHECKING:
    from tests.unit.conftest import CA, IssueFn

NOW = 1_700_000_000
DAY = 86_400
WINDOW = int(signed.PROOF_WINDOW_SECONDS)


@dataclass(frozen=True)
class Identity:
    key: Ed25519PrivateKey
    cert: x509.Certificate

    @property
    def name(self) -> str:
        return str(self.cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


@dataclass(frozen=True)
class World:
    ca: CA
    alice: Identity
    bob: Identity
    carol: Identity
    supernode: Identity


def _identity(issue: IssueFn, subject: str, roles: tuple[Role, ...] = (Role.USER,)) -> Identity:
    key = keys.generate()
    return Identity(key, issue(subject=subject, roles=roles, public_key=key.public_key()))


@pytest.fixture(scope="module")
def world(ca: CA, issue: IssueFn) -> World:
    return World(
        ca=ca,
        alice=_identity(issue, "alice"),
        bob=_identity(issue, "bob"),
        carol=_identity(issue, "carol"),
        supernode=_identity(issue, "sn1", (Role.SUPERNODE,)),
    )


def rng(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def call_hello(w: World, seed: int = 1, to: str = "bob", now: float = NOW) -> PendingHandshake:
    return start(w.alice.key, w.alice.cert, CALL_CONTEXT, to, now, rng(seed))


def bob_answers(
    w: World, hello: object, now: float = NOW, seed: int = 2, **kwargs: Any
) -> tuple[handshake.Peer, SessionKeys, dict[str, Any]]:
    args: dict[str, Any] = {
        "identity_key": w.bob.key,
        "certificate": w.bob.cert,
        "ca_cert": w.ca.cert,
        "context": CALL_CONTEXT,
        "my_name": "bob",
        "now": now,
        "role": Role.USER,
        "randbytes": rng(seed),
    }
    args.update(kwargs)
    return answer_untrusted(hello, **args)


def assert_pair(initiator: SessionKeys, responder: SessionKeys) -> None:
    assert initiator.send == responder.receive
    assert initiator.receive == responder.send
    assert initiator.session_id == responder.session_id
    assert initiator.send != initiator.receive
    assert len(initiator.send) == len(initiator.receive) == 32
    assert len(initiator.session_id) == 8


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def refused(check: str, call: Callable[[], object], cause: type[Exception] | None = None) -> None:
    with pytest.raises(HandshakeError) as info:
        call()
    assert info.value.check == check, str(info.value)
    if cause is not None:
        assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)


# ------------------------------------------------------------------ round trips


def test_call_round_trip(world: World) -> None:
    pending = call_hello(world)
    alice, bob_keys, answer = bob_answers(world, pending.hello)
    bob, alice_keys = pending.finish_untrusted(answer, world.ca.cert, NOW, Role.USER, "bob")
    assert_pair(alice_keys, bob_keys)
    assert alice.info.subject == "alice"
    assert bob.info.subject == "bob"
    assert bob.certificate_der == world.bob.cert.public_bytes(serialization.Encoding.DER)
    assert alice.info.public_key == world.alice.cert.public_key()


def test_session_round_trip_client_to_supernode(world: World) -> None:
    sn = world.supernode
    pending = start(world.alice.key, world.alice.cert, SESSION_CONTEXT, "sn1", NOW, rng(3))
    client, sn_keys, answer = answer_untrusted(
        pending.hello, sn.key, sn.cert, world.ca.cert, SESSION_CONTEXT, "sn1", NOW, Role.USER
    )
    node, client_keys = pending.finish_untrusted(
        answer, world.ca.cert, NOW, Role.SUPERNODE, expected_subject="sn1"
    )
    assert_pair(client_keys, sn_keys)
    assert client.info.subject == "alice"
    assert node.info.roles == frozenset({Role.SUPERNODE})


def test_reverse_direction_round_trip(world: World) -> None:
    pending = start(world.bob.key, world.bob.cert, CALL_CONTEXT, "alice", NOW, rng(4))
    _, alice_keys, answer = answer_untrusted(
        pending.hello,
        world.alice.key,
        world.alice.cert,
        world.ca.cert,
        CALL_CONTEXT,
        "alice",
        NOW,
        Role.USER,
        rng(5),
    )
    _, bob_keys = pending.finish_untrusted(answer, world.ca.cert, NOW, Role.USER, "alice")
    assert_pair(bob_keys, alice_keys)


def test_messages_survive_json_and_have_the_documented_shape(world: World) -> None:
    pending = call_hello(world)
    hello = json.loads(json.dumps(pending.hello))
    assert set(hello) == {"v", "cert", "eph", "nonce", "to", "ts", "sig"}
    assert hello["v"] == 1
    assert hello["to"] == "bob"
    assert hello["ts"] == NOW
    assert len(base64.b64decode(hello["eph"])) == 32
    assert len(base64.b64decode(hello["nonce"])) == 16
    _, bob_keys, answer = bob_answers(world, hello)
    answer = json.loads(json.dumps(answer))
    assert set(answer) == {"v", "cert", "eph", "nonce", "to", "ts", "re", "sig"}
    assert answer["to"] == "alice"
    assert base64.b64decode(answer["re"]) == pending.hello_id
    _, alice_keys = pending.finish_untrusted(answer, world.ca.cert, NOW, Role.USER)
    assert_pair(alice_keys, bob_keys)


def test_role_none_accepts_any_role(world: World) -> None:
    pending = call_hello(world, to="sn1")
    sn = world.supernode
    _, _, answer = answer_untrusted(
        pending.hello, sn.key, sn.cert, world.ca.cert, CALL_CONTEXT, "sn1", NOW, None
    )
    peer, _ = pending.finish_untrusted(answer, world.ca.cert, NOW, None)
    assert peer.info.subject == "sn1"


def test_timestamps_at_the_edge_of_the_window_pass(world: World) -> None:
    pending = call_hello(world)
    _, _, answer = bob_answers(world, pending.hello, now=NOW + WINDOW)
    pending.finish_untrusted(answer, world.ca.cert, NOW + WINDOW, Role.USER)


# ------------------------------------------------------------------ freshness


def test_fresh_randomness_gives_fresh_keys(world: World) -> None:
    first = call_hello(world, seed=10)
    second = call_hello(world, seed=11)
    assert first.hello["eph"] != second.hello["eph"]
    assert first.hello_id != second.hello_id
    _, k1, _ = bob_answers(world, first.hello, seed=20)
    _, k2, _ = bob_answers(world, second.hello, seed=21)
    assert {k1.send, k1.receive, k1.session_id}.isdisjoint({k2.send, k2.receive, k2.session_id})


def test_responder_randomness_alone_changes_the_keys(world: World) -> None:
    pending = call_hello(world)
    _, k1, _ = bob_answers(world, pending.hello, seed=20)
    _, k2, _ = bob_answers(world, pending.hello, seed=21)
    assert k1.send != k2.send
    assert k1.session_id != k2.session_id


def test_same_randomness_repeats_exactly(world: World) -> None:
    def run() -> tuple[dict[str, Any], SessionKeys, SessionKeys]:
        pending = call_hello(world, seed=7)
        _, bob_keys, answer = bob_answers(world, pending.hello, seed=8)
        _, alice_keys = pending.finish_untrusted(answer, world.ca.cert, NOW, Role.USER)
        return answer, alice_keys, bob_keys

    assert run() == run()


def test_keys_are_not_in_repr(world: World) -> None:
    pending = call_hello(world)
    _, bob_keys, _ = bob_answers(world, pending.hello)
    assert bob_keys.send.hex() not in repr(bob_keys)
    assert bob_keys.session_id.hex() in repr(bob_keys)


# ------------------------------------------------------------------ hello refusals


def with_field(message: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**message, **changes}


def test_wrong_ca(world: World, issue_other: IssueFn) -> None:
    key = keys.generate()
    cert = issue_other(subject="alice", public_key=key.public_key())
    pending = start(key, cert, CALL_CONTEXT, "bob", NOW, rng(1))
    refused("certificate", lambda: bob_answers(world, pending.hello), certs.WrongCA)


def test_expired_certificate(world: World) -> None:
    later = NOW + 2 * DAY
    pending = call_hello(world, now=later)
    refused(
        "certificate",
        lambda: bob_answers(world, pending.hello, now=later),
        certs.CertificateExpired,
    )


def test_wrong_role(world: World) -> None:
    pending = start(world.alice.key, world.alice.cert, SESSION_CONTEXT, "bob", NOW, rng(1))
    refused(
        "certificate",
        lambda: bob_answers(world, pending.hello, context=SESSION_CONTEXT, role=Role.SUPERNODE),
        certs.WrongRole,
    )


def test_forged_signature_by_another_key(world: World) -> None:
    pending = call_hello(world)
    # carol signs alice's hello bytes and ships it with alice's certificate
    forged = start(world.carol.key, world.carol.cert, CALL_CONTEXT, "bob", NOW, rng(1))
    hello = with_field(forged.hello, cert=pending.hello["cert"])
    refused("signature", lambda: bob_answers(world, hello), signed.BadSignature)


def test_random_signature(world: World) -> None:
    hello = with_field(call_hello(world).hello, sig=b64(bytes(range(64))))
    refused("signature", lambda: bob_answers(world, hello), signed.BadSignature)


def test_certificate_swapped_for_another_genuine_one(world: World) -> None:
    carol_der = world.carol.cert.public_bytes(serialization.Encoding.DER)
    hello = with_field(call_hello(world).hello, cert=b64(carol_der))
    refused("signature", lambda: bob_answers(world, hello), signed.BadSignature)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("eph", b64(bytes([9]) + bytes(31))),
        ("nonce", b64(bytes(16))),
        ("ts", NOW + 1),
    ],
)
def test_tampered_hello_field(world: World, field: str, value: object) -> None:
    hello = with_field(call_hello(world).hello, **{field: value})
    refused("signature", lambda: bob_answers(world, hello), signed.BadSignature)


def test_tampered_to_answered_by_the_new_recipient(world: World) -> None:
    hello = with_field(call_hello(world).hello, to="carol")
    carol = world.carol
    refused(
        "signature",
        lambda: bob_answers(
            world, hello, identity_key=carol.key, certificate=carol.cert, my_name="carol"
        ),
        signed.BadSignature,
    )


def test_hello_addressed_to_someone_else(world: World) -> None:
    pending = call_hello(world, to="carol")
    refused("recipient", lambda: bob_answers(world, pending.hello))


@pytest.mark.parametrize("offset", [WINDOW + 1, -WINDOW - 1, 10 * DAY])
def test_stale_or_future_hello(world: World, offset: int) -> None:
    pending = call_hello(world)
    refused(
        "timestamp",
        lambda: bob_answers(world, pending.hello, now=NOW + offset),
        signed.BadSignature,
    )


def test_context_separates_calls_from_sessions(world: World) -> None:
    pending = call_hello(world)
    refused(
        "signature",
        lambda: bob_answers(world, pending.hello, context=SESSION_CONTEXT),
        signed.BadSignature,
    )


def test_expected_subject_mismatch_at_responder(world: World) -> None:
    pending = call_hello(world)
    refused("subject", lambda: bob_answers(world, pending.hello, expected_subject="carol"))
    bob_answers(world, pending.hello, expected_subject="alice")


@pytest.mark.parametrize("point", [bytes(32), bytes([1]) + bytes(31)], ids=["zero", "one"])
def test_low_order_ephemeral_key_is_refused(world: World, point: bytes) -> None:
    # a validly signed hello whose ephemeral key is a low-order point (RFC 7748 §6.1)
    der = world.alice.cert.public_bytes(serialization.Encoding.DER)
    m = handshake._Message(der, point, bytes(16), "bob", NOW, "", None)
    sig = signed.sign(
        world.alice.key, handshake.SIGNATURE_CONTEXT, handshake._signed_bytes("call", b"hello", m)
    )
    hello = handshake._as_dict(handshake._Message(der, point, bytes(16), "bob", NOW, sig, None))
    refused("key", lambda: bob_answers(world, hello))


@pytest.mark.parametrize(
    "hello",
    [
        pytest.param(None, id="none"),
        pytest.param([], id="list"),
        pytest.param({}, id="empty"),
        pytest.param("hello", id="text"),
    ],
)
def test_not_a_hello(world: World, hello: object) -> None:
    refused("format", lambda: bob_answers(world, hello))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"v": 2}, id="version"),
        pytest.param({"v": True}, id="version-bool"),
        pytest.param({"ts": True}, id="ts-bool"),
        pytest.param({"ts": 2**64}, id="ts-huge"),
        pytest.param({"ts": float(NOW)}, id="ts-float"),
        pytest.param({"to": ""}, id="to-empty"),
        pytest.param({"to": "b\ud800b"}, id="to-surrogate"),
        pytest.param({"to": 7}, id="to-int"),
        pytest.param({"eph": b64(bytes(31))}, id="eph-short"),
        pytest.param({"eph": "not base64!"}, id="eph-not-b64"),
        pytest.param({"eph": "é" * 44}, id="eph-non-ascii"),
        pytest.param({"nonce": b64(bytes(17))}, id="nonce-long"),
        pytest.param({"cert": b64(b"not a certificate")}, id="cert-garbage"),
        pytest.param({"cert": ""}, id="cert-empty"),
        pytest.param({"sig": None}, id="sig-none"),
        pytest.param({"extra": 1}, id="extra-field"),
    ],
)
def test_malformed_hello_fields(world: World, change: dict[str, Any]) -> None:
    hello = with_field(call_hello(world).hello, **change)
    with pytest.raises(HandshakeError):
        bob_answers(world, hello)


def test_non_canonical_base64_is_refused(world: World) -> None:
    hello = call_hello(world).hello
    text = hello["eph"]
    assert text.endswith("=")  # 32 bytes: 43 characters and one '=', low 2 bits unused
    last = text[-2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 1]
    mangled = text[:-2] + twin + "="
    assert base64.b64decode(mangled) == base64.b64decode(text)
    refused("format", lambda: bob_answers(world, with_field(hello, eph=mangled)))


def test_certificate_as_pem_is_refused(world: World) -> None:
    pem = world.alice.cert.public_bytes(serialization.Encoding.PEM)
    hello = with_field(call_hello(world).hello, cert=b64(pem))
    refused("certificate", lambda: bob_answers(world, hello), certs.MalformedCertificate)


# ------------------------------------------------------------------ answer refusals


def finish(
    w: World,
    pending: PendingHandshake,
    answer: object,
    now: float = NOW,
    role: Role | None = Role.USER,
    expected_subject: str | None = None,
) -> tuple[handshake.Peer, SessionKeys]:
    return pending.finish_untrusted(answer, w.ca.cert, now, role, expected_subject)


def test_swapped_answer_from_another_session(world: World) -> None:
    first, second = call_hello(world, seed=1), call_hello(world, seed=2)
    _, _, answer_to_second = bob_answers(world, second.hello)
    refused("binding", lambda: finish(world, first, answer_to_second))
    # pointing "re" at the first hello does not help: the signature covers the real hash
    relabelled = with_field(answer_to_second, re=b64(first.hello_id))
    refused("signature", lambda: finish(world, first, relabelled), signed.BadSignature)
    finish(world, second, answer_to_second)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("eph", b64(bytes([9]) + bytes(31))),
        ("nonce", b64(bytes(16))),
        ("ts", NOW - 1),
    ],
)
def test_tampered_answer_field(world: World, field: str, value: object) -> None:
    pending = call_hello(world)
    _, _, answer = bob_answers(world, pending.hello)
    refused(
        "signature",
        lambda: finish(world, pending, with_field(answer, **{field: value})),
        signed.BadSignature,
    )


def test_answer_addressed_to_someone_else(world: World) -> None:
    pending = call_hello(world)
    _, _, answer = bob_answers(world, pending.hello)
    refused("recipient", lambda: finish(world, pending, with_field(answer, to="carol")))


def test_answer_signed_by_a_third_party(world: World) -> None:
    pending = call_hello(world)
    carol = world.carol
    # carol answers a hello meant for bob, pretending to be bob
    _, _, answer = bob_answers(world, pending.hello, identity_key=carol.key, certificate=carol.cert)
    peer, _ = finish(world, pending, answer)  # genuine carol, and nothing claims otherwise...
    assert peer.info.subject == "carol"
    refused("subject", lambda: finish(world, pending, answer, expected_subject="bob"))
    carol_der = carol.cert.public_bytes(serialization.Encoding.DER)
    bob_der = world.bob.cert.public_bytes(serialization.Encoding.DER)
    assert answer["cert"] == b64(carol_der)
    refused(
        "signature",
        lambda: finish(world, pending, with_field(answer, cert=b64(bob_der))),
        signed.BadSignature,
    )


def test_stale_answer(world: World) -> None:
    pending = call_hello(world)
    _, _, answer = bob_answers(world, pending.hello)
    refused("timestamp", lambda: finish(world, pending, answer, now=NOW + WINDOW + 1))


def test_answer_with_wrong_role_or_ca(world: World, other_ca: CA) -> None:
    pending = call_hello(world)
    _, _, answer = bob_answers(world, pending.hello)
    refused(
        "certificate", lambda: finish(world, pending, answer, role=Role.SUPERNODE), certs.WrongRole
    )
    refused(
        "certificate",
        lambda: pending.finish_untrusted(answer, other_ca.cert, NOW, Role.USER),
        certs.WrongCA,
    )


def test_hello_reflected_as_answer(world: World) -> None:
    pending = call_hello(world)
    reflected = with_field(pending.hello, re=b64(pending.hello_id), to="alice")
    refused("signature", lambda: finish(world, pending, reflected), signed.BadSignature)


def test_refused_answer_does_not_consume_the_handshake(world: World) -> None:
    pending = call_hello(world)
    _, bob_keys, answer = bob_answers(world, pending.hello)
    with pytest.raises(HandshakeError):
        finish(world, pending, with_field(answer, sig=b64(bytes(64))))
    _, alice_keys = finish(world, pending, answer)
    assert_pair(alice_keys, bob_keys)


def test_handshake_error_is_a_security_error() -> None:
    assert issubclass(HandshakeError, SecurityError)


# ------------------------------------------------------------------ hello_id


def test_hello_id_is_stable_and_distinct(world: World) -> None:
    pending = call_hello(world)
    assert hello_id(pending.hello) == pending.hello_id
    assert hello_id(json.loads(json.dumps(pending.hello))) == pending.hello_id
    assert len(pending.hello_id) == 32
    assert hello_id(call_hello(world, seed=99).hello) != pending.hello_id
    # a replay with a damaged signature is still recognised as the same hello
    assert hello_id(with_field(pending.hello, sig="AAAA")) == pending.hello_id


def test_hello_id_refuses_garbage() -> None:
    with pytest.raises(HandshakeError):
        hello_id({"v": 1})


# ------------------------------------------------------------------ local misuse


def test_start_refuses_key_that_does_not_match_the_certificate(world: World) -> None:
    with pytest.raises(LocalError, match="does not match"):
        start(world.bob.key, world.alice.cert, CALL_CONTEXT, "bob", NOW)


@pytest.mark.parametrize("context", ["", "Call", "call\x00", "a" * 40, "ca ll"])
def test_start_refuses_bad_context(world: World, context: str) -> None:
    with pytest.raises(LocalError):
        start(world.alice.key, world.alice.cert, context, "bob", NOW)


def test_start_refuses_short_randomness(world: World) -> None:
    with pytest.raises(LocalError, match="randbytes"):
        start(world.alice.key, world.alice.cert, CALL_CONTEXT, "bob", NOW, lambda n: bytes(n - 1))


# ------------------------------------------------------------------ fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = ["v", "cert", "eph", "nonce", "to", "ts", "sig"]
fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(json_values)
def test_answer_untrusted_only_raises_handshake_error(world: World, hello: object) -> None:
    with pytest.raises(HandshakeError):
        bob_answers(world, hello)


@fuzz
@given(json_values)
def test_finish_untrusted_only_raises_handshake_error(world: World, answer: object) -> None:
    with pytest.raises(HandshakeError):
        finish(world, call_hello(world), answer)


@fuzz
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_hello_with_one_field_replaced_only_raises_handshake_error(
    world: World, field: str, value: object
) -> None:
    hello = call_hello(world).hello
    assume(value != hello[field])
    with pytest.raises(HandshakeError):
        bob_answers(world, with_field(hello, **{field: value}))


@fuzz
@given(field=st.sampled_from([*FIELDS, "re"]), value=json_values)
def test_answer_with_one_field_replaced_only_raises_handshake_error(
    world: World, field: str, value: object
) -> None:
    pending = call_hello(world)
    _, _, answer = bob_answers(world, pending.hello)
    assume(value != answer[field])
    with pytest.raises(HandshakeError):
        finish(world, pending, with_field(answer, **{field: value}))


@fuzz
@given(field=st.sampled_from(["cert", "eph", "nonce", "sig"]), data=st.data())
def test_hello_with_bit_flipped_field_only_raises_handshake_error(
    world: World, field: str, data: st.DataObject
) -> None:
    hello = call_hello(world).hello
    raw = bytearray(base64.b64decode(hello[field]))
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    raw[index] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(HandshakeError):
        bob_answers(world, with_field(hello, **{field: b64(bytes(raw))}))


@pytest.mark.parametrize("now", [-1.0, 2.0**60])
def test_start_refuses_implausible_clock(world: World, now: float) -> None:
    with pytest.raises(LocalError, match="clock"):
        start(world.alice.key, world.alice.cert, CALL_CONTEXT, "bob", now)
