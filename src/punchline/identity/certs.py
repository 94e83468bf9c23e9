"""X.509 certificates issued by the login server's CA, verified offline by anyone.

Why X.509 rather than a home-made format: node certificates double as TLS server certificates
(supernodes' TCP 443, the login server's HTTPS), and standard tools (openssl, curl) can read
them. A certificate binds a subject (user name or node id) to an Ed25519 key, with a serial, a
validity window and roles. Roles ride in the subject as OU attributes, so a user certificate
can never pass as a supernode's and vice versa.

`verify` checks, in order: issued by this CA (Authority Key Identifier), signature intact, not a
CA itself, inside its validity window, carries the wanted role. Each failure has its own error
class so callers and users learn exactly what is wrong.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from punchline.errors import SecurityError
from punchline.identity import keys

ORGANIZATION = "punchline"
NODE_DNS_SUFFIX = ".node.punchline.invalid"
MAX_CERT_BYTES = 8192
CLOCK_SKEW_ALLOWANCE = dt.timedelta(minutes=5)


class Role(StrEnum):
    """What the holder of a certificate may act as."""

    USER = "user"
    SUPERNODE = "supernode"
    RELAY = "relay"
    GATEWAY = "gateway"
    LOGIN = "login"
    CA = "ca"


NODE_ROLES = frozenset({Role.SUPERNODE, Role.RELAY, Role.GATEWAY})


# What cryptography raises for damaged certificates; all of it becomes MalformedCertificate.
_PARSE_ERRORS = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


class CertificateError(SecurityError):
    """A certificate failed verification."""


class MalformedCertificate(CertificateError):
    """The bytes are not a certificate we can parse."""


class WrongCA(CertificateError):
    """The certificate was issued by a different certificate authority."""


class TamperedCertificate(CertificateError):
    """The CA's signature does not match the certificate's contents."""


class CertificateExpired(CertificateError):
    """The validity window has ended."""


class CertificateNotYetValid(CertificateError):
    """The validity window has not started."""


class WrongRole(CertificateError):
    """The certificate is genuine but not for the role it is being used in."""


@dataclass(frozen=True)
class CertInfo:
    """What a verified certificate says, in plain Python types."""

    subject: str
    roles: frozenset[Role]
    serial: int
    not_before: float
    not_after: float
    public_key: Ed25519PublicKey

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    @property
    def key_fingerprint(self) -> str:
        return keys.fingerprint(self.public_key)


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def iso(ts: float) -> str:
    """ISO 8601 in UTC with a Z, the form every JSON output uses."""
    return _utc(ts).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def node_dns_name(node_id: str) -> str:
    """The DNS name a node certificate carries, which TLS clients check for that node."""
    return node_id + NODE_DNS_SUFFIX


def create_ca(key: Ed25519PrivateKey, now: float, years: int = 20) -> x509.Certificate:
    public = key.public_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, Role.CA.value),
            x509.NameAttribute(
                NameOID.COMMON_NAME, "punchline CA " + keys.fingerprint(public)[7:19]
            ),
        ]
    )
    start = _utc(now) - CLOCK_SKEW_ALLOWANCE
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, algorithm=None)
    )


def issue(
    ca_key: Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    subject: str,
    public_key: Ed25519PublicKey,
    roles: Iterable[Role],
    now: float,
    lifetime: float,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> x509.Certificate:
    """Sign a leaf certificate. Node and login certificates may serve TLS; user ones may not."""
    role_set = sorted({Role(r) for r in roles}, key=lambda r: r.value)
    if not role_set or Role.CA in role_set:
        raise ValueError("a leaf certificate needs at least one non-CA role")
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, r.value) for r in role_set]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, subject))
    start = _utc(now) - CLOCK_SKEW_ALLOWANCE
    serves_tls = Role.USER not in role_set
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if serves_tls:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(_utc(now + lifetime))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(cert_key(ca_cert)),
            critical=False,
        )
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if alt_names:
        if not serves_tls:
            raise ValueError("user certificates carry no host names")
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, algorithm=None)


def cert_key(cert: x509.Certificate) -> Ed25519PublicKey:
    """The Ed25519 key a certificate binds; anything else is malformed for punchline."""
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise MalformedCertificate("certificate key is not Ed25519")
    return key


def to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_untrusted(data: object) -> x509.Certificate:
    """Parse a certificate from the network or disk; only `MalformedCertificate` escapes."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    if not isinstance(data, bytes) or not data or len(data) > MAX_CERT_BYTES:
        raise MalformedCertificate("certificate must be a non-empty PEM or DER string")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
        cert_key(cert)
        # cryptography parses lazily: touch every field now so damage fails here, as one type
        _ = (cert.subject, cert.issuer, cert.extensions, cert.not_valid_before_utc)
        _ = (cert.not_valid_after_utc, cert.serial_number)
    except _PARSE_ERRORS as exc:
        raise MalformedCertificate(f"not a valid certificate: {exc}") from exc
    return cert


def ca_fingerprint(ca_cert: x509.Certificate) -> str:
    return keys.fingerprint(cert_key(ca_cert))


def _attributes(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


def _roles(cert: x509.Certificate) -> frozenset[Role]:
    found = set()
    for value in _attributes(cert, NameOID.ORGANIZATIONAL_UNIT_NAME):
        try:
            found.add(Role(value))
        except ValueError:
            continue
    return frozenset(found)


def _check_issuer(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(cert_key(ca_cert)).digest
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound as exc:
        raise WrongCA("certificate names no issuing authority key; not from this CA") from exc
    except _PARSE_ERRORS as exc:
        raise MalformedCertificate(f"unreadable certificate extensions: {exc}") from exc
    if aki.key_identifier != ca_ski:
        raise WrongCA(
            "certificate was issued by a different certificate authority "
            f"than the pinned one ({ca_fingerprint(ca_cert)})"
        )
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise TamperedCertificate(
            "certificate contents do not match the CA signature (tampered or corrupted)"
        ) from exc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    now: float,
    role: Role | None = None,
) -> CertInfo:
    """Verify offline against the CA; raise the specific `CertificateError` on failure."""
    if keys.public_raw(cert_key(cert)) == keys.public_raw(cert_key(ca_cert)):
        raise WrongRole("the CA's own certificate cannot be used as a user or node certificate")
    _check_issuer(cert, ca_cert)
    if _is_ca(cert):
        raise WrongRole("a CA certificate cannot be used as a user or node certificate")
    not_before = cert.not_valid_before_utc.timestamp()
    not_after = cert.not_valid_after_utc.timestamp()
    if now < not_before:
        raise CertificateNotYetValid(f"certificate is not valid before {iso(not_before)}")
    if now > not_after:
        raise CertificateExpired(f"certificate expired at {iso(not_after)}")
    roles = _roles(cert)
    if role is not None and role not in roles:
        have = ", ".join(sorted(r.value for r in roles)) or "none"
        raise WrongRole(f"certificate is for role(s) {have}, not {role.value}")
    names = _attributes(cert, NameOID.COMMON_NAME)
    if len(names) != 1:
        raise MalformedCertificate("certificate must name exactly one subject")
    return CertInfo(
        subject=names[0],
        roles=roles,
        serial=cert.serial_number,
        not_before=not_before,
        not_after=not_after,
        public_key=cert_key(cert),
    )
