"""Password hashing with argon2id (RFC 9106), via argon2-cffi.

The parameters are a config field so tests and small machines can tune cost without touching
code; hashes record their own parameters, and a login re-hashes when they change.
"""

from __future__ import annotations

from dataclasses import dataclass

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from punchline.errors import LocalError

MIN_PASSWORD = 8
MAX_PASSWORD = 1024


class InvalidPassword(LocalError):
    """A new password breaks the rules."""


@dataclass(frozen=True)
class Argon2Params:
    time_cost: int = 3
    memory_cost_kib: int = 65536
    parallelism: int = 4


class PasswordHasher:
    def __init__(self, params: Argon2Params) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=params.time_cost,
            memory_cost=params.memory_cost_kib,
            parallelism=params.parallelism,
            type=argon2.Type.ID,
        )
        self._dummy = self._hasher.hash("punchline-timing-equaliser")

    def hash(self, password: str) -> str:
        return str(self._hasher.hash(password))

    def verify(self, stored: str | None, password: str) -> bool:
        """Constant-ish time: unknown accounts are checked against a dummy hash."""
        try:
            if stored is None:
                self._hasher.verify(self._dummy, password)
                return False
            return bool(self._hasher.verify(stored, password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored: str) -> bool:
        return bool(self._hasher.check_needs_rehash(stored))


def check_new_password(password: object, name: str) -> str:
    if not isinstance(password, str):
        raise InvalidPassword("password must be text")
    if len(password) < MIN_PASSWORD:
        raise InvalidPassword(f"password must be at least {MIN_PASSWORD} characters long")
    if len(password) > MAX_PASSWORD:
        raise InvalidPassword(f"password must be at most {MAX_PASSWORD} characters long")
    if password.casefold() == name.casefold():
        raise InvalidPassword("password must not be the user name")
    return password
