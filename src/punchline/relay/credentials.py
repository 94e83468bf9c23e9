"""Ephemeral TURN credentials, the "TURN REST API" scheme (coturn's `use-auth-secret`).

The login server and every relay share one secret. A logged-in user gets a username
`EXPIRY:USER` (EXPIRY in Unix seconds) and the password base64(HMAC-SHA1(secret, username));
the relay recomputes the password from the username alone, so it needs no user database and
no round trip to the login server, and credentials stop working by themselves at EXPIRY. The
same scheme lets an operator hand third-party TURN tools (`turnutils_uclient -W SECRET`) working
credentials. The password is then used as the long-term credential (RFC 8489 §9.2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from punchline.errors import LocalError, RemoteError
from punchline.util.files import atomic_write

SEPARATOR = ":"
DEFAULT_TTL = 24 * 3600.0
# The name of the file (not a secret itself) that holds the secret in a data dir.
SECRET_FILE = "turn-secret"  # noqa: S105
# A username we parse must stay far below STUN's 509-byte USERNAME limit anyway.
_MAX_USERNAME = 300


class CredentialError(RemoteError):
    """A TURN username is malformed, expired, or not one of ours."""


@dataclass(frozen=True)
class TurnCredentials:
    username: str
    password: str
    expires: float

    def as_json(self) -> dict[str, object]:
        return {"username": self.username, "password": self.password, "expires": self.expires}


def password_for(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def issue(secret: str, user: str, now: float, ttl: float = DEFAULT_TTL) -> TurnCredentials:
    expires = int(now + ttl)
    username = f"{expires}{SEPARATOR}{user}"
    return TurnCredentials(username, password_for(secret, username), float(expires))


def check_untrusted(secret: str, username: str, now: float) -> tuple[str, str]:
    """(user, password) for a username that is well formed and not expired."""
    if not secret:
        raise CredentialError("this relay has not received the TURN secret yet")
    if len(username) > _MAX_USERNAME:
        raise CredentialError("TURN username too long")
    expiry_text, sep, user = username.partition(SEPARATOR)
    if not sep or not expiry_text.isdigit() or len(expiry_text) > 12:
        raise CredentialError("TURN username is not EXPIRY:USER")
    if int(expiry_text) < now:
        raise CredentialError("TURN credentials have expired")
    return user, password_for(secret, username)


def load_or_create_secret(path: Path) -> str:
    """The shared secret in `path`, created (private to the owner) on first use."""
    if path.exists():
        return read_secret(path)
    secret = secrets.token_urlsafe(32)
    atomic_write(path, (secret + "\n").encode(), 0o600)
    return secret


def read_secret(path: Path) -> str:
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise LocalError(f"cannot read the TURN secret file {path}: {exc.strerror}") from exc
    if len(secret) < 16:
        raise LocalError(f"the TURN secret in {path} is shorter than 16 characters")
    return secret
