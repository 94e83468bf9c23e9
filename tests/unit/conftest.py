"""Shared fixtures for the unit suite: a CA, a second unrelated CA, and a leaf issuer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from punchline.identity import certs, keys

NOW = 1_700_000_000  # a fixed, whole-second moment: X.509 times have one-second resolution
DAY = 86_400


@dataclass(frozen=True)
class CA:
    key: Ed25519PrivateKey
    cert: x509.Certificate


IssueFn = Callable[..., x509.Certificate]


def _make_ca() -> CA:
    key = keys.generate()
    return CA(key=key, cert=certs.create_ca(key, NOW))


@pytest.fixture(scope="session")
def now() -> int:
    return NOW


@pytest.fixture(scope="session")
def ca() -> CA:
    return _make_ca()


@pytest.fixture(scope="session")
def other_ca() -> CA:
    return _make_ca()


@pytest.fixture(scope="session")
def user_key() -> Ed25519PrivateKey:
    return keys.generate()


def _issuer(authority: CA) -> IssueFn:
    def issue(
        subject: str = "alice",
        roles: Iterable[certs.Role] = (certs.Role.USER,),
        public_key: Ed25519PublicKey | None = None,
        now: float = NOW,
        lifetime: float = DAY,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> x509.Certificate:
        key = public_key if public_key is not None else keys.generate().public_key()
        return certs.issue(
            authority.key,
            authority.cert,
            subject,
            key,
            roles,
            now,
            lifetime,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
        )

    return issue


@pytest.fixture(scope="session")
def issue(ca: CA) -> IssueFn:
    """Issue a leaf certificate from `ca`; defaults: user "alice", one day from NOW."""
    return _issuer(ca)


@pytest.fixture(scope="session")
def issue_other(other_ca: CA) -> IssueFn:
    """Issue a leaf certificate from `other_ca`, a CA nobody pinned."""
    return _issuer(other_ca)
