"""The per-user data dir: device key, certificate, pinned CA, profile, cached bootstrap list.

The directory is 0700 and every file 0600, written atomically. The CA certificate pinned here
at first contact is the root of all trust for this user: certificates, bootstrap lists and the
login server's TLS are all checked against it, offline.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import platformdirs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from punchline.errors import LocalError, SecurityError
from punchline.identity import certs, keys, signed
from punchline.util.files import atomic_write, private_dir
from punchline.util.jsontext import loads_untrusted
from punchline.wire.auth_api import BOOTSTRAP_CONTEXT


class NotLoggedIn(LocalError):
    """This data dir holds no identity yet."""


class CAMismatch(SecurityError):
    """The login server's CA is not the one this data dir pinned."""


@dataclass(frozen=True)
class ContactKeys:
    """The keys of the user's encrypted contact list (`wire.contacts`): the one derived from
    the password (the same on every device), when that password was set, and the list key once
    this device holds it."""

    password_key: bytes
    password_set_at: float
    list_key: bytes | None = None


@dataclass(frozen=True)
class Profile:
    """Who this data dir is (`user` holds the node id in a node's data dir) and where from."""

    user: str
    auth_url: str
    ca_fingerprint: str


def default_data_dir() -> Path:
    return Path(platformdirs.user_config_dir("punchline"))


class IdentityStore:
    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.key_path = data_dir / "identity.key"
        self.cert_path = data_dir / "identity.crt"
        self.ca_path = data_dir / "ca.crt"
        self.profile_path = data_dir / "profile.json"
        self.bootstrap_path = data_dir / "bootstrap.json"
        self.contact_keys_path = data_dir / "contacts-key.json"

    def _write(self, path: Path, data: bytes) -> None:
        private_dir(self.dir)
        atomic_write(path, data)

    # ----------------------------------------------------------------- key

    def key(self) -> Ed25519PrivateKey:
        """This device's key, created on first use and kept for good."""
        if self.key_path.exists():
            try:
                return keys.private_from_pem(self.key_path.read_bytes())
            except (ValueError, keys.KeyFormatError) as exc:
                raise LocalError(f"{self.key_path} is not a readable Ed25519 key: {exc}") from exc
        key = keys.generate()
        self._write(self.key_path, keys.private_to_pem(key))
        return key

    # ----------------------------------------------------------------- CA pin

    def pinned_ca(self) -> x509.Certificate | None:
        if not self.ca_path.exists():
            return None
        return certs.load_untrusted(self.ca_path.read_bytes())

    def pin(self, ca: x509.Certificate, expected: str | None = None) -> None:
        """Pin `ca` on first contact, or check it against the existing pin."""
        fingerprint = check_expected_fingerprint(ca, expected)
        current = self.pinned_ca()
        if current is None:
            self._write(self.ca_path, certs.to_pem(ca).encode("ascii"))
        elif certs.ca_fingerprint(current) != fingerprint:
            raise CAMismatch(ca_changed_message(certs.ca_fingerprint(current), fingerprint))

    # ----------------------------------------------------------------- profile + certificate

    def profile(self) -> Profile | None:
        try:
            raw = json.loads(self.profile_path.read_text())
            return Profile(raw["user"], raw["auth_url"], raw["ca_fingerprint"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise LocalError(f"{self.profile_path} is damaged: {exc}") from exc

    def save_credentials(
        self, profile: Profile, certificate_pem: str, role: certs.Role = certs.Role.USER
    ) -> x509.Certificate:
        """Store a certificate only after it verifies against the pinned CA for this subject."""
        ca = self.pinned_ca()
        if ca is None:
            raise NotLoggedIn("no CA pinned; log in first")
        cert = certs.load_untrusted(certificate_pem)
        info = certs.verify(cert, ca, cert.not_valid_before_utc.timestamp() + 1, role)
        if info.subject != profile.user:
            raise SecurityError(f"login server issued a certificate for {info.subject!r}")
        self._write(self.cert_path, certs.to_pem(cert).encode("ascii"))
        self._write(self.profile_path, json.dumps(asdict(profile), indent=2).encode())
        return cert

    def certificate(self) -> x509.Certificate:
        if not self.cert_path.exists():
            raise NotLoggedIn(
                f"no identity in {self.dir}; run `punchline signup` or `punchline login` first"
            )
        return certs.load_untrusted(self.cert_path.read_bytes())

    def require_profile(self) -> Profile:
        profile = self.profile()
        if profile is None:
            raise NotLoggedIn(
                f"no identity in {self.dir}; run `punchline signup` or `punchline login` first"
            )
        return profile

    # ----------------------------------------------------------------- contact list keys

    def contact_keys(self) -> ContactKeys | None:
        try:
            raw = json.loads(self.contact_keys_path.read_text())
            list_key = raw.get("list_key")
            return ContactKeys(
                base64.b64decode(raw["password_key"], validate=True),
                float(raw["password_set_at"]),
                base64.b64decode(list_key, validate=True) if list_key else None,
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LocalError(f"{self.contact_keys_path} is damaged: {exc}; log in again") from exc

    def save_contact_keys(self, value: ContactKeys) -> None:
        raw = {
            "password_key": base64.b64encode(value.password_key).decode(),
            "password_set_at": value.password_set_at,
            "list_key": base64.b64encode(value.list_key).decode() if value.list_key else None,
        }
        self._write(self.contact_keys_path, json.dumps(raw).encode())

    # ----------------------------------------------------------------- bootstrap list

    def save_bootstrap(self, document: object) -> dict[str, Any]:
        payload = self._open_bootstrap(document)
        self._write(self.bootstrap_path, json.dumps(document).encode())
        return payload

    def bootstrap(self) -> dict[str, Any] | None:
        """The cached CA-signed node list, or None; a tampered cache is an error, not ignored."""
        try:
            document = loads_untrusted(self.bootstrap_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise LocalError(f"{self.bootstrap_path} is damaged: {exc}") from exc
        return self._open_bootstrap(document)

    def _open_bootstrap(self, document: object) -> dict[str, Any]:
        ca = self.pinned_ca()
        if ca is None:
            raise NotLoggedIn("no CA pinned; log in first")
        return signed.open_document_untrusted(certs.cert_key(ca), BOOTSTRAP_CONTEXT, document)


def check_expected_fingerprint(ca: x509.Certificate, expected: str | None) -> str:
    """The CA's fingerprint, refused when the user gave another with --ca-fingerprint."""
    fingerprint = certs.ca_fingerprint(ca)
    if expected and expected.lower() != fingerprint:
        raise CAMismatch(
            f"the login server's CA fingerprint is {fingerprint}, "
            f"but --ca-fingerprint says {expected}; refusing to trust it"
        )
    return fingerprint


def ca_changed_message(pinned: str, presented: str) -> str:
    return (
        "the login server presents a different certificate authority than the one this data "
        f"dir pinned at first contact.\n  pinned:    {pinned}\n  presented: {presented}\n"
        "Someone may be intercepting the connection, or the server was reinstalled with a new "
        "CA. If the operator confirms the new fingerprint, use a fresh --data dir (or remove "
        "ca.crt from this one) and pass --ca-fingerprint."
    )
