"""The per-user identity store: key, CA pin, credentials and the cached bootstrap list."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from punchline.client.store import CAMismatch, IdentityStore, NotLoggedIn, Profile
from punchline.errors import LocalError, SecurityError
from punchline.identity import certs, keys, signed
from punchline.identity.certs import CertificateError, Role, WrongCA, WrongRole
from punchline.identity.signed import BadSignature

if TYPE_CHECKING:
    from tests.unit.conftest import CA, IssueFn

BOOTSTRAP = {"nodes": [{"id": "n1", "host": "192.0.2.1", "port": 443}], "serial": 3}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def profile(ca: CA, user: str = "alice") -> Profile:
    return Profile(
        user=user, auth_url="https://login.example", ca_fingerprint=certs.ca_fingerprint(ca.cert)
    )


@pytest.fixture
def store(tmp_path: Path) -> IdentityStore:
    return IdentityStore(tmp_path / "data")


@pytest.fixture
def pinned(store: IdentityStore, ca: CA) -> IdentityStore:
    store.pin(ca.cert)
    return store


# ------------------------------------------------------------------ key


def test_key_is_created_private_and_kept(store: IdentityStore) -> None:
    assert not store.dir.exists()
    key = store.key()
    assert mode(store.dir) == 0o700
    assert mode(store.key_path) == 0o600
    assert keys.private_from_pem(store.key_path.read_bytes())
    again = IdentityStore(store.dir).key()
    assert keys.public_raw(again.public_key()) == keys.public_raw(key.public_key())
    assert sorted(p.name for p in store.dir.iterdir()) == ["identity.key"]


def test_existing_dir_is_made_private(store: IdentityStore) -> None:
    store.dir.mkdir(mode=0o755)
    os.chmod(store.dir, 0o755)  # noqa: S103 - loose on purpose
    store.key()
    assert mode(store.dir) == 0o700


def test_unreadable_key_is_local_error(store: IdentityStore) -> None:
    store.dir.mkdir()
    store.key_path.write_bytes(b"not a key")
    with pytest.raises(LocalError, match=r"identity\.key"):
        store.key()


# ------------------------------------------------------------------ CA pin


def test_first_pin_writes_ca(store: IdentityStore, ca: CA) -> None:
    assert store.pinned_ca() is None
    store.pin(ca.cert)
    assert mode(store.ca_path) == 0o600
    assert store.ca_path.read_text() == certs.to_pem(ca.cert)
    pinned = store.pinned_ca()
    assert pinned is not None
    assert certs.ca_fingerprint(pinned) == certs.ca_fingerprint(ca.cert)
    store.pin(ca.cert)  # same CA again: fine
    store.pin(ca.cert, expected=certs.ca_fingerprint(ca.cert).upper())


def test_pinning_another_ca_is_refused(pinned: IdentityStore, ca: CA, other_ca: CA) -> None:
    before = pinned.ca_path.read_bytes()
    with pytest.raises(CAMismatch) as info:
        pinned.pin(other_ca.cert)
    message = str(info.value)
    assert certs.ca_fingerprint(ca.cert) in message
    assert certs.ca_fingerprint(other_ca.cert) in message
    assert pinned.ca_path.read_bytes() == before


def test_pin_with_wrong_expected_fingerprint(store: IdentityStore, ca: CA, other_ca: CA) -> None:
    expected = certs.ca_fingerprint(other_ca.cert)
    with pytest.raises(CAMismatch) as info:
        store.pin(ca.cert, expected=expected)
    assert expected in str(info.value)
    assert certs.ca_fingerprint(ca.cert) in str(info.value)
    assert not store.ca_path.exists()


def test_ca_mismatch_is_security_error() -> None:
    assert issubclass(CAMismatch, SecurityError)


# ------------------------------------------------------------------ credentials


def test_save_credentials(pinned: IdentityStore, ca: CA, issue: IssueFn) -> None:
    pem = certs.to_pem(issue(subject="alice"))
    cert = pinned.save_credentials(profile(ca), pem)
    assert cert.subject.rfc4514_string() == "CN=alice,OU=user,O=punchline"
    assert pinned.cert_path.read_text() == pem
    assert pinned.profile() == profile(ca)
    assert pinned.require_profile() == profile(ca)
    assert pinned.certificate().serial_number == cert.serial_number
    assert mode(pinned.cert_path) == 0o600
    assert mode(pinned.profile_path) == 0o600


def test_save_credentials_needs_a_pin(store: IdentityStore, ca: CA, issue: IssueFn) -> None:
    with pytest.raises(NotLoggedIn):
        store.save_credentials(profile(ca), certs.to_pem(issue()))


def test_certificate_for_another_user_is_refused(
    pinned: IdentityStore, ca: CA, issue: IssueFn
) -> None:
    with pytest.raises(SecurityError, match="'bob'") as info:
        pinned.save_credentials(profile(ca, "alice"), certs.to_pem(issue(subject="bob")))
    assert not isinstance(info.value, CertificateError)
    assert not pinned.cert_path.exists()
    assert not pinned.profile_path.exists()


def test_certificate_from_another_ca_is_refused(
    pinned: IdentityStore, ca: CA, issue_other: IssueFn
) -> None:
    with pytest.raises(WrongCA):
        pinned.save_credentials(profile(ca), certs.to_pem(issue_other(subject="alice")))
    assert not pinned.cert_path.exists()


def test_node_certificate_is_not_a_user_identity(
    pinned: IdentityStore, ca: CA, issue: IssueFn
) -> None:
    with pytest.raises(WrongRole):
        pinned.save_credentials(profile(ca), certs.to_pem(issue(roles=[Role.SUPERNODE])))


def test_not_logged_in(store: IdentityStore) -> None:
    assert store.profile() is None
    with pytest.raises(NotLoggedIn):
        store.require_profile()
    with pytest.raises(NotLoggedIn):
        store.certificate()


@pytest.mark.parametrize("content", ["not json", "[]", '{"user": "alice"}', "null"])
def test_damaged_profile(store: IdentityStore, content: str) -> None:
    store.dir.mkdir()
    store.profile_path.write_text(content)
    with pytest.raises(LocalError, match="damaged"):
        store.profile()


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_round_trip(pinned: IdentityStore, ca: CA) -> None:
    assert pinned.bootstrap() is None
    document = signed.sign_document(ca.key, "bootstrap", BOOTSTRAP)
    assert pinned.save_bootstrap(document) == BOOTSTRAP
    assert mode(pinned.bootstrap_path) == 0o600
    assert IdentityStore(pinned.dir).bootstrap() == BOOTSTRAP


def test_tampered_cached_bootstrap(pinned: IdentityStore, ca: CA) -> None:
    pinned.save_bootstrap(signed.sign_document(ca.key, "bootstrap", BOOTSTRAP))
    document = json.loads(pinned.bootstrap_path.read_text())
    document["payload"] = document["payload"].replace("192.0.2.1", "203.0.113.6")
    pinned.bootstrap_path.write_text(json.dumps(document))
    with pytest.raises(BadSignature):
        pinned.bootstrap()


def test_bootstrap_from_another_key_is_not_saved(pinned: IdentityStore, other_ca: CA) -> None:
    with pytest.raises(BadSignature):
        pinned.save_bootstrap(signed.sign_document(other_ca.key, "bootstrap", BOOTSTRAP))
    assert not pinned.bootstrap_path.exists()


def test_bootstrap_with_wrong_context_is_refused(pinned: IdentityStore, ca: CA) -> None:
    with pytest.raises(BadSignature):
        pinned.save_bootstrap(signed.sign_document(ca.key, "proof", BOOTSTRAP))


def test_damaged_bootstrap_cache(pinned: IdentityStore) -> None:
    pinned.bootstrap_path.write_text("{not json")
    with pytest.raises(LocalError, match="damaged"):
        pinned.bootstrap()


def test_bootstrap_needs_a_pin(store: IdentityStore, ca: CA) -> None:
    with pytest.raises(NotLoggedIn):
        store.save_bootstrap(signed.sign_document(ca.key, "bootstrap", BOOTSTRAP))
