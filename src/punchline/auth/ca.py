"""The certificate authority's files and the login server's own TLS certificate.

On first start the CA key and certificate are created in the data dir; they never change after
that, because every client pins the CA's fingerprint. The server's TLS certificate is re-issued
at every start for the names and addresses it serves at that moment, signed by the same CA, so
clients that pinned the CA trust it with no extra step.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from punchline.identity import certs, keys
from punchline.util.files import atomic_write, private_dir

TLS_LIFETIME = 90 * 86400.0


@dataclass(frozen=True)
class CertificateAuthority:
    key: Ed25519PrivateKey
    cert: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return certs.ca_fingerprint(self.cert)

    @property
    def pem(self) -> str:
        return certs.to_pem(self.cert)


def load_or_create(data_dir: Path, now: float) -> CertificateAuthority:
    private_dir(data_dir)
    key_path, cert_path = data_dir / "ca.key", data_dir / "ca.crt"
    if key_path.exists() and cert_path.exists():
        key = keys.private_from_pem(key_path.read_bytes())
        cert = certs.load_untrusted(cert_path.read_bytes())
        return CertificateAuthority(key, cert)
    key = keys.generate()
    cert = certs.create_ca(key, now)
    atomic_write(key_path, keys.private_to_pem(key))
    atomic_write(cert_path, certs.to_pem(cert).encode("ascii"), mode=0o644)
    return CertificateAuthority(key, cert)


def local_names(listen_host: str, extra: Iterable[str]) -> tuple[list[str], list[str]]:
    """DNS names and IP addresses this server answers on, for its TLS certificate."""
    dns = {"localhost", socket.gethostname()}
    ips = {"127.0.0.1", "::1"}
    candidates = [listen_host, *extra]
    if listen_host in ("0.0.0.0", "::", ""):  # noqa: S104 - comparing, not binding
        for addrs in psutil.net_if_addrs().values():
            candidates += [a.address.split("%")[0] for a in addrs if a.family in (2, 10)]
    for name in candidates:
        if not name or name in ("0.0.0.0", "::"):  # noqa: S104
            continue
        try:
            ips.add(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.add(name)
    return sorted(dns), sorted(ips)


def issue_tls(
    ca: CertificateAuthority, data_dir: Path, now: float, dns: list[str], ips: list[str]
) -> tuple[Path, Path]:
    key = keys.generate()
    cert = certs.issue(
        ca.key, ca.cert, "login", key.public_key(), [certs.Role.LOGIN], now, TLS_LIFETIME,
        dns_names=dns, ip_addresses=ips,
    )  # fmt: skip
    key_path, cert_path = data_dir / "tls.key", data_dir / "tls.crt"
    atomic_write(key_path, keys.private_to_pem(key))
    atomic_write(cert_path, (certs.to_pem(cert) + ca.pem).encode("ascii"), mode=0o644)
    return cert_path, key_path


def load_or_create_secret(data_dir: Path, given: str | None) -> str:
    """The operator's node-enrolment secret: given on the command line, else kept in a file."""
    if given:
        return given
    path = data_dir / "enroll-secret"
    if path.exists():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(32)
    atomic_write(path, (secret + "\n").encode("ascii"))
    return secret
