"""What a user does with the login server: sign up, log in, renew, change password.

After any of these the data dir holds everything needed to prove who the user is, offline:
nothing else talks to the login server until the next renewal.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from punchline.client import renewal
from punchline.client.auth_client import AuthClient, fetch_ca_unverified
from punchline.client.store import (
    CAMismatch,
    ContactKeys,
    IdentityStore,
    Profile,
    check_expected_fingerprint,
)
from punchline.errors import LocalError, RemoteError
from punchline.identity import certs, keys, names, signed
from punchline.relay.credentials import TurnCredentials
from punchline.wire.auth_api import REQUEST_CONTEXT

log = structlog.get_logger(component="client")


@dataclass(frozen=True)
class Identity:
    """A verified view of what the data dir holds."""

    profile: Profile
    info: certs.CertInfo

    def as_json(self) -> dict[str, Any]:
        return {
            "user": self.profile.user,
            "cert_expires": certs.iso(self.info.not_after),
            "ca_fingerprint": self.profile.ca_fingerprint,
            "auth_url": self.profile.auth_url,
            "cert_serial": format(self.info.serial, "x"),
            "key_fingerprint": self.info.key_fingerprint,
        }


def connect(store: IdentityStore, url: str, ca_fingerprint: str | None) -> AuthClient:
    """An HTTPS client trusting the pinned CA; on first contact the CA is fetched and checked."""
    pinned = store.pinned_ca()
    if pinned is None:
        ca = fetch_ca_unverified(url)
        check_expected_fingerprint(ca, ca_fingerprint)
        return AuthClient(url, ca)
    if ca_fingerprint and ca_fingerprint.lower() != certs.ca_fingerprint(pinned):
        raise CAMismatch(
            f"this data dir pinned CA {certs.ca_fingerprint(pinned)}, "
            f"not {ca_fingerprint}; use another --data dir for another login server"
        )
    return AuthClient(url, pinned)


def _check_same_user(store: IdentityStore, name: str) -> None:
    profile = store.profile()
    if profile is not None and profile.user != name:
        raise LocalError(
            f"{store.dir} already holds user {profile.user!r}; use another --data dir for {name!r}"
        )


def credentials_request(
    key: Ed25519PrivateKey, purpose: str, name: str, password: str
) -> dict[str, Any]:
    ts = int(time.time())
    return {
        "name": name,
        "password": password,
        "public_key": keys.public_to_text(key.public_key()),
        "ts": ts,
        "proof": signed.make_proof(key, purpose, name, ts),
    }


def _store_answer(
    store: IdentityStore, http: AuthClient, answer: dict[str, Any], url: str
) -> Identity:
    presented = certs.load_untrusted(answer.get("ca_certificate"))
    if certs.ca_fingerprint(presented) != certs.ca_fingerprint(http.ca):
        raise CAMismatch("login server answered with a CA other than the one it presented")
    store.pin(http.ca)
    profile = Profile(str(answer.get("user")), url, certs.ca_fingerprint(http.ca))
    store.save_credentials(profile, str(answer.get("certificate")))
    try:
        store.save_bootstrap(answer.get("bootstrap"))
    except signed.BadSignature as exc:
        log.warning("bootstrap list rejected", reason=str(exc))
    return current(store, time.time())


def _authenticate(
    purpose: str,
    store: IdentityStore,
    url: str,
    name: str,
    password: str,
    ca_fingerprint: str | None,
) -> Identity:
    name = names.canonical(name)
    _check_same_user(store, name)
    key = store.key()
    http = connect(store, url, ca_fingerprint)
    with http:
        answer = http.post(f"/v1/{purpose}", credentials_request(key, purpose, name, password))
        identity = _store_answer(store, http, answer, http.url)
    remember_contacts_password(store, name, password, time.time())
    return identity


def signup(
    store: IdentityStore, url: str, name: str, password: str, ca_fingerprint: str | None = None
) -> Identity:
    return _authenticate("signup", store, url, name, password, ca_fingerprint)


def login(
    store: IdentityStore, url: str, name: str, password: str, ca_fingerprint: str | None = None
) -> Identity:
    return _authenticate("login", store, url, name, password, ca_fingerprint)


def change_password(store: IdentityStore, old: str, new: str) -> None:
    profile = store.require_profile()
    http = connect(store, profile.auth_url, None)
    with http:
        http.post(
            "/v1/password",
            {"name": profile.user, "password": old, "new_password": new},
        )
    remember_contacts_password(store, profile.user, new, time.time())


def remember_contacts_password(store: IdentityStore, user: str, password: str, now: float) -> None:
    """Derive the contact list's password key (`wire.contacts`) while the password is at hand:
    every device of the user derives the same key, and the daemon never sees the password."""
    from punchline.wire import contacts

    key = contacts.password_key(user, password)
    old = store.contact_keys()
    if old is not None and old.password_key == key:
        return
    store.save_contact_keys(ContactKeys(key, now, old.list_key if old is not None else None))


def current(store: IdentityStore, now: float, role: certs.Role = certs.Role.USER) -> Identity:
    """The identity in the data dir, verified offline against the pinned CA."""
    profile = store.require_profile()
    ca = store.pinned_ca()
    if ca is None:
        raise LocalError(f"{store.dir} has a profile but no pinned CA; log in again")
    info = certs.verify(store.certificate(), ca, now, role)
    return Identity(profile, info)


def signed_request(
    key: Ed25519PrivateKey, certificate_pem: str, extra: dict[str, Any]
) -> tuple[bytes, str]:
    body = json.dumps({**extra, "certificate": certificate_pem, "ts": int(time.time())}).encode()
    return body, signed.sign(key, REQUEST_CONTEXT, body)


def renew(
    store: IdentityStore, timeout: float = 10.0, role: certs.Role = certs.Role.USER
) -> Identity:
    """Trade the current, still valid certificate for a fresh one; no password needed."""
    now = time.time()
    identity = current(store, now, role)
    ca = store.pinned_ca()
    assert ca is not None
    body, signature = signed_request(store.key(), certs.to_pem(store.certificate()), {})
    with AuthClient(identity.profile.auth_url, ca, timeout) as http:
        answer = http.post_signed("/v1/renew", body, signature)
    store.save_credentials(identity.profile, str(answer.get("certificate")), role)
    log.info("certificate renewed", user=identity.profile.user, expires=answer.get("cert_expires"))
    return current(store, time.time(), role)


def turn_credentials(store: IdentityStore, timeout: float = 10.0) -> TurnCredentials:
    """Fresh relay credentials from the login server (valid for a day by default)."""
    identity = current(store, time.time())
    ca = store.pinned_ca()
    assert ca is not None
    body, signature = signed_request(store.key(), certs.to_pem(store.certificate()), {})
    with AuthClient(identity.profile.auth_url, ca, timeout) as http:
        answer = http.post_signed("/v1/turn", body, signature)
    try:
        return TurnCredentials(
            str(answer["username"]), str(answer["password"]), float(answer["expires"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteError("the login server sent malformed TURN credentials") from exc


def refresh_bootstrap(store: IdentityStore, timeout: float = 3.0) -> bool:
    """Fetch the current CA-signed list of live nodes into the cache, if the server answers.

    Only a list that verifies against the pinned CA replaces the cache; when the login server
    is away the cached list serves, as the design intends.
    """
    profile = store.require_profile()
    ca = store.pinned_ca()
    if ca is None:
        return False
    try:
        with AuthClient(profile.auth_url, ca, timeout) as http:
            store.save_bootstrap(http.get("/v1/bootstrap"))
    except (RemoteError, signed.BadSignature) as exc:
        log.info("bootstrap list not refreshed; using the cached one", reason=str(exc))
        return False
    return True


@dataclass(frozen=True)
class Freshness:
    identity: Identity
    renewed: bool
    problem: str | None = None


def ensure_fresh(
    store: IdentityStore, now: float, timeout: float = 3.0, role: certs.Role = certs.Role.USER
) -> Freshness:
    """Renew when the policy says so and the server answers; otherwise keep what we have.

    An unreachable login server is not an error here: the certificate stays valid offline,
    which is the point of the design. An expired certificate is, because only a password
    login can replace it.
    """
    identity = current(store, now, role)
    if not renewal.due(identity.info, now):
        return Freshness(identity, renewed=False)
    try:
        return Freshness(renew(store, timeout, role), renewed=True)
    except RemoteError as exc:
        log.warning("certificate renewal failed; keeping the current one", reason=str(exc))
        return Freshness(identity, renewed=False, problem=str(exc))
