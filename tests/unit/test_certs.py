"""Certificate issue and offline verification, and the error class each failure gets."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from punchline.errors import SecurityError
from punchline.identity import certs, keys
from punchline.identity.certs import (
    CertificateError,
    CertificateExpired,
    CertificateNotYetValid,
    MalformedCertificate,
    Role,
    TamperedCertificate,
    WrongCA,
    WrongRole,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tests.unit.conftest import CA, IssueFn

NOW = 1_700_000_000
DAY = 86_400
SKEW = int(certs.CLOCK_SKEW_ALLOWANCE.total_seconds())


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


def ec_self_signed() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")])
    start = dt.datetime.fromtimestamp(NOW, tz=dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def ca_flagged_leaf(authority: CA) -> x509.Certificate:
    """A certificate the CA did sign, with its AKI, but with the CA bit set."""
    key = keys.generate().public_key()
    start = dt.datetime.fromtimestamp(NOW, tz=dt.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, certs.ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, Role.USER.value),
            x509.NameAttribute(NameOID.COMMON_NAME, "mallory"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(authority.cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(certs.cert_key(authority.cert)),
            critical=False,
        )
        .sign(authority.key, algorithm=None)
    )


# ------------------------------------------------------------------ round trips


def test_user_certificate_round_trip(ca: CA, user_key: Ed25519PrivateKey) -> None:
    cert = certs.issue(ca.key, ca.cert, "alice", user_key.public_key(), [Role.USER], NOW, DAY)
    loaded = certs.load_untrusted(der(cert))
    info = certs.verify(loaded, ca.cert, NOW, Role.USER)
    assert info.subject == "alice"
    assert info.roles == frozenset({Role.USER})
    assert info.serial == cert.serial_number
    assert info.not_before == NOW - SKEW
    assert info.not_after == NOW + DAY
    assert info.lifetime == DAY + SKEW
    assert keys.public_raw(info.public_key) == keys.public_raw(user_key.public_key())
    assert info.key_fingerprint == keys.fingerprint(user_key.public_key())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH not in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku


def test_node_certificate_round_trip(ca: CA) -> None:
    node_key = keys.generate().public_key()
    node_id = keys.key_id(node_key)
    cert = certs.issue(
        ca.key,
        ca.cert,
        node_id,
        node_key,
        [Role.RELAY, Role.SUPERNODE, Role.SUPERNODE],
        NOW,
        7 * DAY,
        dns_names=[certs.node_dns_name(node_id)],
        ip_addresses=["192.0.2.7", "2001:db8::7"],
    )
    info = certs.verify(certs.load_untrusted(certs.to_pem(cert)), ca.cert, NOW, Role.SUPERNODE)
    assert info.subject == node_id
    assert info.roles == frozenset({Role.SUPERNODE, Role.RELAY})
    assert certs.verify(cert, ca.cert, NOW, Role.RELAY).roles == info.roles
    assert info.not_after == NOW + 7 * DAY
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [node_id + ".node.punchline.invalid"]
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {
        "192.0.2.7",
        "2001:db8::7",
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_verify_without_role_accepts_any_role(ca: CA, issue: IssueFn) -> None:
    assert certs.verify(issue(roles=[Role.GATEWAY]), ca.cert, NOW).roles == {Role.GATEWAY}


def test_serials_are_random_per_certificate(ca: CA, issue: IssueFn) -> None:
    serials = {certs.verify(issue(), ca.cert, NOW).serial for _ in range(5)}
    assert len(serials) == 5


def test_validity_window_edges_are_inclusive(ca: CA, issue: IssueFn) -> None:
    cert = issue(lifetime=DAY)
    certs.verify(cert, ca.cert, NOW - SKEW)
    certs.verify(cert, ca.cert, NOW + DAY)


def test_ca_certificate_shape(ca: CA) -> None:
    basic = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is True
    assert certs.ca_fingerprint(ca.cert) == keys.fingerprint(ca.key.public_key())
    common_name = ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == "punchline CA " + certs.ca_fingerprint(ca.cert)[7:19]


@pytest.mark.parametrize(
    ("roles", "kwargs"),
    [
        ([], {}),
        ([Role.CA], {}),
        ([Role.USER, Role.CA], {}),
        ([Role.USER], {"dns_names": ["alice.example"]}),
        ([Role.USER], {"ip_addresses": ["192.0.2.1"]}),
    ],
)
def test_issue_refuses_bad_requests(
    ca: CA, roles: list[Role], kwargs: dict[str, list[str]]
) -> None:
    with pytest.raises(ValueError, match="certificate"):
        certs.issue(
            ca.key, ca.cert, "alice", keys.generate().public_key(), roles, NOW, DAY, **kwargs
        )


def test_iso_format() -> None:
    assert certs.iso(NOW + 0.75) == "2023-11-14T22:13:20Z"


# ------------------------------------------------------------------ each failure, its own class


def test_tampered_subject_is_tampered_certificate(ca: CA, issue: IssueFn) -> None:
    original = der(issue(subject="alice"))
    assert original.count(b"alice") == 1
    forged = original.replace(b"alice", b"alicf")
    cert = certs.load_untrusted(forged)  # still parses
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alicf"
    with pytest.raises(TamperedCertificate):
        certs.verify(cert, ca.cert, NOW)


def test_tampered_role_is_tampered_certificate(ca: CA, issue: IssueFn) -> None:
    # "user" -> "supe" would not parse as a role; "relay" -> "relaz" keeps the length.
    original = der(issue(subject="n1", roles=[Role.RELAY]))
    forged = original.replace(b"relay", b"relaz")
    with pytest.raises(TamperedCertificate):
        certs.verify(certs.load_untrusted(forged), ca.cert, NOW)


def test_expired(ca: CA, issue: IssueFn) -> None:
    with pytest.raises(CertificateExpired, match="expired at 2023-11-15T22:13:20Z"):
        certs.verify(issue(lifetime=DAY), ca.cert, NOW + DAY + 1)


def test_not_yet_valid(ca: CA, issue: IssueFn) -> None:
    with pytest.raises(CertificateNotYetValid, match="not valid before 2023-11-14T22:08:20Z"):
        certs.verify(issue(), ca.cert, NOW - SKEW - 1)


def test_wrong_ca(ca: CA, issue_other: IssueFn) -> None:
    with pytest.raises(WrongCA, match=certs.ca_fingerprint(ca.cert)):
        certs.verify(issue_other(), ca.cert, NOW)


def test_forged_aki_is_tampered_not_accepted(ca: CA, other_ca: CA) -> None:
    """Another CA copying our key identifier into its certificate still fails the signature."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")])
    start = dt.datetime.fromtimestamp(NOW, tz=dt.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.cert.subject)
        .public_key(keys.generate().public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(certs.cert_key(ca.cert)),
            critical=False,
        )
        .sign(other_ca.key, algorithm=None)
    )
    with pytest.raises(TamperedCertificate):
        certs.verify(forged, ca.cert, NOW)


def test_wrong_role_user_as_supernode(ca: CA, issue: IssueFn) -> None:
    with pytest.raises(WrongRole, match="role\\(s\\) user, not supernode"):
        certs.verify(issue(), ca.cert, NOW, Role.SUPERNODE)


def test_wrong_role_node_as_user(ca: CA, issue: IssueFn) -> None:
    with pytest.raises(WrongRole):
        certs.verify(issue(subject="n1", roles=[Role.SUPERNODE]), ca.cert, NOW, Role.USER)


def test_ca_flagged_certificate_cannot_be_a_leaf(ca: CA) -> None:
    with pytest.raises(WrongRole, match="CA certificate"):
        certs.verify(ca_flagged_leaf(ca), ca.cert, NOW, Role.USER)


def test_ca_certificate_itself_is_not_accepted_as_leaf(ca: CA) -> None:
    with pytest.raises(WrongRole, match="CA's own certificate"):
        certs.verify(ca.cert, ca.cert, NOW)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        "",
        b"garbage",
        "garbage",
        b"\x30\x03\x02\x01\x01",
        b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
        b"\x00" * (certs.MAX_CERT_BYTES + 1),
        None,
        123,
        bytearray(b"x"),
    ],
)
def test_malformed_inputs(data: object) -> None:
    with pytest.raises(MalformedCertificate):
        certs.load_untrusted(data)


def test_oversize_valid_pem_is_malformed(issue: IssueFn) -> None:
    pem = certs.to_pem(issue())
    padded = pem + "\n" * (certs.MAX_CERT_BYTES - len(pem) + 1)
    certs.load_untrusted(padded[: certs.MAX_CERT_BYTES])  # at the limit: fine
    with pytest.raises(MalformedCertificate):
        certs.load_untrusted(padded)


@pytest.mark.parametrize("encoding", [serialization.Encoding.DER, serialization.Encoding.PEM])
def test_non_ed25519_certificate_is_malformed(encoding: serialization.Encoding) -> None:
    with pytest.raises(MalformedCertificate, match="Ed25519"):
        certs.load_untrusted(ec_self_signed().public_bytes(encoding))


def test_error_classes_are_distinct_security_errors() -> None:
    classes = [
        MalformedCertificate,
        WrongCA,
        TamperedCertificate,
        CertificateExpired,
        CertificateNotYetValid,
        WrongRole,
    ]
    assert len(set(classes)) == len(classes)
    for cls in classes:
        assert issubclass(cls, CertificateError)
        assert issubclass(cls, SecurityError)
        for other in classes:
            assert cls is other or not issubclass(cls, other)


# ------------------------------------------------------------------ fuzzing


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=600), st.text(max_size=300)))
def test_load_untrusted_only_raises_malformed(data: bytes | str) -> None:
    with contextlib.suppress(MalformedCertificate):
        certs.load_untrusted(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_load_untrusted_pem_framing_only_raises_malformed(body: bytes) -> None:
    data = b"-----BEGIN CERTIFICATE-----\n" + body + b"\n-----END CERTIFICATE-----\n"
    with contextlib.suppress(MalformedCertificate):
        certs.load_untrusted(data)


@pytest.fixture(scope="module")
def node_cert(issue: IssueFn) -> x509.Certificate:
    return issue(subject="n1", roles=[Role.SUPERNODE], dns_names=["n1.example"])


def _flip_outcome(ca: CA, original_cert: x509.Certificate, index: int, mask: int) -> None:
    """Load and verify `original_cert` with one byte flipped; it must never pass as genuine."""
    mutated = flip(der(original_cert), index, mask)
    try:
        cert = certs.load_untrusted(mutated)
        certs.verify(cert, ca.cert, NOW)
    except CertificateError:
        return
    # Only a flip that changes neither the signed bytes nor the signature may pass (the
    # BIT STRING "unused bits" octet of the signature is ignored by the parser).
    assert cert.tbs_certificate_bytes == original_cert.tbs_certificate_bytes
    assert cert.signature == original_cert.signature


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@settings(max_examples=200, deadline=None)
@given(data=st.data(), mask=st.integers(min_value=1, max_value=255))
def test_single_byte_flip_never_verifies(
    ca: CA, node_cert: x509.Certificate, data: st.DataObject, mask: int
) -> None:
    index = data.draw(st.integers(min_value=0, max_value=len(der(node_cert)) - 1), label="index")
    _flip_outcome(ca, node_cert, index, mask)


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@pytest.mark.parametrize("mask", [1 << bit for bit in range(8)] + [0xFF])
def test_every_single_byte_flip_never_verifies(
    ca: CA, node_cert: x509.Certificate, issue: IssueFn, mask: int
) -> None:
    for original in (node_cert, issue()):
        for index in range(len(der(original))):
            _flip_outcome(ca, original, index, mask)


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, old
    return data.replace(old, new)


def _version_flipped(data: bytes) -> bytes:
    # [0] EXPLICIT INTEGER 2 (v3) -> INTEGER 3
    return _replace_once(data, b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x03")


def _key_algorithm_flipped(data: bytes) -> bytes:
    # SubjectPublicKeyInfo's algorithm 1.3.101.112 (Ed25519) -> 1.2.101.112 (unknown)
    spki = b"\x30\x2a\x30\x05\x06\x03"
    return _replace_once(data, spki + b"\x2b\x65\x70", spki + b"\x2a\x65\x70")


def _san_oid_made_duplicate(data: bytes) -> bytes:
    # subjectAltName 2.5.29.17 -> basicConstraints 2.5.29.19, which is already present
    return _replace_once(data, b"\x06\x03\x55\x1d\x11", b"\x06\x03\x55\x1d\x13")


def _san_entry_unknown_type(data: bytes) -> bytes:
    # dNSName [2] -> x400Address [3] constructed, which cryptography cannot represent
    return _replace_once(data, b"\x82\x0an1.example", b"\xa3\x0an1.example")


@pytest.mark.parametrize(
    "damage",
    [_version_flipped, _key_algorithm_flipped, _san_oid_made_duplicate, _san_entry_unknown_type],
)
def test_structural_damage_is_a_certificate_error(
    ca: CA, node_cert: x509.Certificate, damage: Callable[[bytes], bytes]
) -> None:
    with pytest.raises(CertificateError):
        certs.verify(certs.load_untrusted(damage(der(node_cert))), ca.cert, NOW)
