"""What the login server does, independent of HTTP: sign-up, login, renewal, enrolment.

Every entry point takes the decoded request, the client's address and `now`, and returns a
JSON-ready dict or raises `ServiceError` with the HTTP status and a message for the user.
Methods are synchronous (argon2 and the database block) and thread-safe: the HTTP adapter
runs them in a worker thread.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from punchline.auth import passwords
from punchline.auth.ca import CertificateAuthority
from punchline.auth.config import AuthConfig
from punchline.auth.db import Account, IssuedCertificate, Node
from punchline.auth.throttle import Throttle
from punchline.identity import certs, keys, names, signed
from punchline.identity.certs import Role
from punchline.relay import credentials
from punchline.wire.auth_api import (
    BOOTSTRAP_CONTEXT,
    NODE_TRANSPORTS,
    REQUEST_CONTEXT,
    Refusal,
    decode_object_untrusted,
)

log = structlog.get_logger(component="auth")

MAX_ADDRESSES = 16


# The service refuses with the wire-level error the client will show its user.
ServiceError = Refusal


def _field(request: dict[str, Any], key: str, kind: type, max_len: int = 4096) -> Any:
    value = request.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ServiceError(400, "invalid_field", f"field {key!r} must be a {kind.__name__}")
    if isinstance(value, str | list) and len(value) > max_len:
        raise ServiceError(400, "invalid_field", f"field {key!r} is too long")
    return value


def _name(request: dict[str, Any]) -> str:
    try:
        return names.canonical(_field(request, "name", str, 256))
    except names.InvalidName as exc:
        raise ServiceError(422, "invalid_name", str(exc)) from exc


def _check_user_proof(
    request: dict[str, Any], key: Ed25519PublicKey, purpose: str, now: float
) -> None:
    """Users sign the name exactly as they typed it; it is case-folded only afterwards."""
    _check_proof(request, key, purpose, str(request["name"]), now)


def _public_key(request: dict[str, Any]) -> Ed25519PublicKey:
    try:
        return keys.public_from_text_untrusted(request.get("public_key"))
    except keys.KeyFormatError as exc:
        raise ServiceError(400, "invalid_field", str(exc)) from exc


def _check_proof(
    request: dict[str, Any], key: Ed25519PublicKey, purpose: str, subject: str, now: float
) -> None:
    try:
        signed.check_proof_untrusted(
            key, purpose, subject, request.get("ts"), request.get("proof"), now
        )
    except signed.BadSignature as exc:
        raise ServiceError(401, "bad_proof", f"proof of key possession rejected: {exc}") from exc


def _addresses(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_ADDRESSES:
        raise ServiceError(400, "invalid_field", f"addresses must be a list of ≤ {MAX_ADDRESSES}")
    result = []
    for item in value:
        ok = (
            isinstance(item, dict)
            and item.get("transport") in NODE_TRANSPORTS
            and isinstance(item.get("host"), str)
            and 0 < len(item["host"]) <= 255
            and isinstance(item.get("port"), int)
            and 0 < item["port"] < 65536
        )
        if not ok:
            raise ServiceError(
                400,
                "invalid_field",
                f"each address needs transport ({'/'.join(NODE_TRANSPORTS)}), host and port",
            )
        result.append({"transport": item["transport"], "host": item["host"], "port": item["port"]})
    return result


@dataclass(frozen=True)
class SignedRequest:
    """A request authenticated by a certificate and a signature over the exact body."""

    body: dict[str, Any]
    info: certs.CertInfo


class AuthService:
    def __init__(
        self,
        config: AuthConfig,
        ca: CertificateAuthority,
        sessions: sessionmaker[Session],
        hasher: passwords.PasswordHasher,
        enroll_secret: str,
        turn_secret: str,
    ) -> None:
        self.config = config
        self.ca = ca
        self._sessions = sessions
        self._hasher = hasher
        self._enroll_secret = enroll_secret
        self._turn_secret = turn_secret
        self._lock = threading.Lock()
        self._by_account = Throttle(config.account_throttle)
        self._by_source = Throttle(config.source_throttle)
        self._signups = Throttle(config.signup_throttle)

    # ----------------------------------------------------------------- helpers

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with self._sessions() as session, session.begin():
                yield session
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            log.error("database unavailable", error=str(exc).splitlines()[0])
            raise ServiceError(
                503,
                "database_unavailable",
                "the account database is unavailable; try again shortly",
            ) from exc

    def _throttled(self, keys_: list[tuple[Throttle, str]], now: float) -> None:
        with self._lock:
            wait = max(t.retry_after(k, now) for t, k in keys_)
        if wait > 0:
            raise ServiceError(
                429, "throttled", f"too many attempts; try again in {int(wait) + 1} s", wait
            )

    def _failed(self, keys_: list[tuple[Throttle, str]], now: float) -> None:
        with self._lock:
            for throttle, key in keys_:
                throttle.failure(key, now)

    def _issue(
        self,
        session: Session,
        subject: str,
        key: Ed25519PublicKey,
        roles: frozenset[Role],
        now: float,
    ) -> x509.Certificate:
        user = Role.USER in roles
        lifetime = self.config.user_cert_lifetime if user else self.config.node_cert_lifetime
        dns = () if user else (certs.node_dns_name(subject),)
        cert = certs.issue(self.ca.key, self.ca.cert, subject, key, roles, now, lifetime, dns)
        session.add(
            IssuedCertificate(
                serial=format(cert.serial_number, "x"),
                subject=subject,
                roles=",".join(sorted(r.value for r in roles)),
                key_fingerprint=keys.fingerprint(key),
                not_before=cert.not_valid_before_utc.timestamp(),
                not_after=cert.not_valid_after_utc.timestamp(),
                issued_at=now,
            )
        )
        return cert

    def _credentials(self, name: str, cert: x509.Certificate, now: float) -> dict[str, Any]:
        return {
            "user": name,
            "certificate": certs.to_pem(cert),
            "cert_expires": certs.iso(cert.not_valid_after_utc.timestamp()),
            "ca_certificate": self.ca.pem,
            "ca_fingerprint": self.ca.fingerprint,
            "bootstrap": self.bootstrap(now),
        }

    def _check_password(
        self, request: dict[str, Any], name: str, source: str, now: float, session: Session
    ) -> Account:
        """Verify name + password under throttling; the account is returned only on success."""
        guard = [(self._by_account, name), (self._by_source, source)]
        self._throttled(guard, now)
        password = _field(request, "password", str, passwords.MAX_PASSWORD)
        account = session.scalars(select(Account).where(Account.name == name)).one_or_none()
        if not self._hasher.verify(account.password_hash if account else None, password):
            self._failed(guard, now)
            log.info("login refused", user=name, source=source, reason="bad credentials")
            raise ServiceError(401, "bad_credentials", "unknown user or wrong password")
        assert account is not None
        with self._lock:
            self._by_account.success(name)
        if account.disabled:
            log.info("login refused", user=name, source=source, reason="account disabled")
            raise ServiceError(403, "account_disabled", f"account {name!r} is disabled")
        if self._hasher.needs_rehash(account.password_hash):
            account.password_hash = self._hasher.hash(password)
        return account

    # ----------------------------------------------------------------- users

    def signup(self, request: dict[str, Any], source: str, now: float) -> dict[str, Any]:
        name = _name(request)
        self._throttled([(self._signups, source)], now)
        try:
            password = passwords.check_new_password(request.get("password"), name)
        except passwords.InvalidPassword as exc:
            raise ServiceError(422, "invalid_password", str(exc)) from exc
        key = _public_key(request)
        _check_user_proof(request, key, "signup", now)
        password_hash = self._hasher.hash(password)
        try:
            with self._session() as session:
                session.add(
                    Account(
                        name=name,
                        password_hash=password_hash,
                        created_at=now,
                        password_changed_at=now,
                        disabled=False,
                    )
                )
                session.flush()
                cert = self._issue(session, name, key, frozenset({Role.USER}), now)
        except IntegrityError as exc:
            raise ServiceError(409, "name_taken", f"user name {name!r} is already taken") from exc
        self._failed([(self._signups, source)], now)
        log.info(
            "account created", user=name, source=source, serial=format(cert.serial_number, "x")
        )
        return self._credentials(name, cert, now)

    def login(self, request: dict[str, Any], source: str, now: float) -> dict[str, Any]:
        name = _name(request)
        key = _public_key(request)
        _check_user_proof(request, key, "login", now)
        with self._session() as session:
            self._check_password(request, name, source, now, session)
            cert = self._issue(session, name, key, frozenset({Role.USER}), now)
        log.info("login", user=name, source=source, key=keys.fingerprint(key)[:23])
        return self._credentials(name, cert, now)

    def change_password(self, request: dict[str, Any], source: str, now: float) -> dict[str, Any]:
        name = _name(request)
        try:
            new = passwords.check_new_password(request.get("new_password"), name)
        except passwords.InvalidPassword as exc:
            raise ServiceError(422, "invalid_password", str(exc)) from exc
        new_hash = self._hasher.hash(new)
        with self._session() as session:
            account = self._check_password(request, name, source, now, session)
            account.password_hash = new_hash
            account.password_changed_at = now
        log.info("password changed", user=name, source=source)
        return {"user": name, "changed": True}

    # ----------------------------------------------------------------- signed requests

    def open_signed(
        self, body: bytes, signature: str | None, now: float, roles: frozenset[Role]
    ) -> SignedRequest:
        """Authenticate a request by certificate + signature; refuse anything else with 401."""
        request = decode_object_untrusted(body)
        try:
            cert = certs.load_untrusted(request.get("certificate"))
            info = certs.verify(cert, self.ca.cert, now)
            if not info.roles & roles:
                raise certs.WrongRole("certificate's roles are not allowed here")
            signed.verify_untrusted(info.public_key, REQUEST_CONTEXT, body, signature)
        except certs.CertificateError as exc:
            code = "certificate_" + type(exc).__name__.lower()
            raise ServiceError(401, code, str(exc)) from exc
        except signed.BadSignature as exc:
            raise ServiceError(401, "bad_signature", str(exc)) from exc
        try:
            signed.check_timestamp_untrusted(request.get("ts"), now)
        except signed.BadSignature as exc:
            raise ServiceError(401, "stale_request", f"request refused: {exc}") from exc
        return SignedRequest(request, info)

    @staticmethod
    def _check_account_live(session: Session, subject: str) -> None:
        account = session.scalars(select(Account).where(Account.name == subject)).one_or_none()
        if account is None:
            raise ServiceError(404, "unknown_user", f"account {subject!r} no longer exists")
        if account.disabled:
            raise ServiceError(403, "account_disabled", f"account {subject!r} is disabled")

    def renew(self, body: bytes, signature: str | None, now: float) -> dict[str, Any]:
        req = self.open_signed(body, signature, now, frozenset(Role) - {Role.CA, Role.LOGIN})
        subject, roles = req.info.subject, req.info.roles
        with self._session() as session:
            if Role.USER in roles:
                self._check_account_live(session, subject)
            elif session.get(Node, subject) is None:
                raise ServiceError(404, "unknown_node", f"node {subject!r} is not enrolled")
            cert = self._issue(session, subject, req.info.public_key, roles, now)
        log.info("certificate renewed", subject=subject, roles=sorted(r.value for r in roles))
        return {
            "certificate": certs.to_pem(cert),
            "cert_expires": certs.iso(cert.not_valid_after_utc.timestamp()),
        }

    def turn_credentials(self, body: bytes, signature: str | None, now: float) -> dict[str, Any]:
        """Relay credentials for a logged-in user (TURN REST API scheme, `relay.credentials`)."""
        req = self.open_signed(body, signature, now, frozenset({Role.USER}))
        with self._session() as session:
            self._check_account_live(session, req.info.subject)
        issued = credentials.issue(
            self._turn_secret, req.info.subject, now, self.config.turn_credential_lifetime
        )
        return {**issued.as_json(), "ttl": self.config.turn_credential_lifetime}

    # ----------------------------------------------------------------- nodes

    def enroll_node(self, request: dict[str, Any], source: str, now: float) -> dict[str, Any]:
        guard = [(self._by_source, source)]
        self._throttled(guard, now)
        secret = _field(request, "secret", str, 512)
        if not signed.constant_time_equal(secret, self._enroll_secret):
            self._failed(guard, now)
            log.warning("node enrolment refused", source=source, reason="wrong enrolment secret")
            raise ServiceError(403, "bad_enroll_secret", "wrong enrolment secret")
        key = _public_key(request)
        node_id = keys.key_id(key)
        _check_proof(request, key, "enroll", node_id, now)
        raw_roles = _field(request, "roles", list, 8)
        try:
            roles = frozenset(Role(r) for r in raw_roles)
        except ValueError as exc:
            raise ServiceError(400, "invalid_field", "unknown role") from exc
        if not roles or not roles <= certs.NODE_ROLES:
            raise ServiceError(
                400, "invalid_field", "roles must be some of supernode, relay, gateway"
            )
        addresses = _addresses(request.get("addresses"))
        role_text = ",".join(sorted(r.value for r in roles))
        with self._session() as session:
            node = session.get(Node, node_id)
            if node is None:
                node = Node(node_id=node_id, enrolled_at=now)
                session.add(node)
            node.roles, node.public_key = role_text, keys.public_to_text(key)
            node.addresses, node.last_seen = json.dumps(addresses), now
            cert = self._issue(session, node_id, key, roles, now)
        log.info("node enrolled", node=node_id, roles=role_text, source=source)
        return {
            "node_id": node_id,
            "certificate": certs.to_pem(cert),
            "ca_certificate": self.ca.pem,
            "ca_fingerprint": self.ca.fingerprint,
        }

    def heartbeat(self, body: bytes, signature: str | None, now: float) -> dict[str, Any]:
        req = self.open_signed(body, signature, now, certs.NODE_ROLES)
        with self._session() as session:
            node = session.get(Node, req.info.subject)
            if node is None:
                raise ServiceError(404, "unknown_node", "node is not enrolled")
            if "addresses" in req.body:
                node.addresses = json.dumps(_addresses(req.body["addresses"]))
            node.last_seen = now
        answer: dict[str, Any] = {"node_id": req.info.subject, "bootstrap": self.bootstrap(now)}
        if Role.RELAY in req.info.roles:  # relays check the TURN credentials users are given
            answer["turn_secret"] = self._turn_secret
        return answer

    def bootstrap(self, now: float) -> dict[str, str]:
        """The CA-signed list of nodes that sent a heartbeat recently."""
        with self._session() as session:
            live = session.scalars(
                select(Node)
                .where(Node.last_seen >= now - self.config.node_liveness)
                .order_by(Node.node_id)
            ).all()
            nodes = [
                {
                    "node_id": n.node_id,
                    "roles": n.roles.split(","),
                    "public_key": n.public_key,
                    "addresses": json.loads(n.addresses),
                }
                for n in live
            ]
        payload = {
            "version": 1,
            "issued_at": now,
            "ca_fingerprint": self.ca.fingerprint,
            "nodes": nodes,
        }
        return signed.sign_document(self.ca.key, BOOTSTRAP_CONTEXT, payload)

    # ----------------------------------------------------------------- operator

    def health(self) -> dict[str, Any]:
        with self._session() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok", "ca_fingerprint": self.ca.fingerprint}
