"""Password rules and argon2id hashing with cheap parameters."""

from __future__ import annotations

import pytest

from punchline.auth.passwords import (
    MAX_PASSWORD,
    MIN_PASSWORD,
    Argon2Params,
    InvalidPassword,
    PasswordHasher,
    check_new_password,
)
from punchline.errors import LocalError

CHEAP = Argon2Params(time_cost=1, memory_cost_kib=8, parallelism=1)


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(CHEAP)


@pytest.mark.parametrize(
    "password", ["x" * MIN_PASSWORD, "x" * MAX_PASSWORD, "correct horse", "pässwörd!"]
)
def test_good_new_password_is_returned(password: str) -> None:
    assert check_new_password(password, "alice") == password


@pytest.mark.parametrize(
    ("password", "message"),
    [
        (None, "text"),
        (12345678, "text"),
        (b"bytes-password", "text"),
        ("", "at least 8"),
        ("x" * (MIN_PASSWORD - 1), "at least 8"),
        ("x" * (MAX_PASSWORD + 1), "at most 1024"),
        ("alicealice", "user name"),
        ("ALICEALICE", "user name"),
    ],
)
def test_bad_new_password(password: object, message: str) -> None:
    with pytest.raises(InvalidPassword, match=message):
        check_new_password(password, "aliceAlice")


def test_invalid_password_is_local_error() -> None:
    assert issubclass(InvalidPassword, LocalError)


def test_hash_and_verify(hasher: PasswordHasher) -> None:
    stored = hasher.hash("correct horse")
    assert stored.startswith("$argon2id$")
    assert "m=8,t=1,p=1" in stored
    assert hasher.verify(stored, "correct horse") is True
    assert hasher.verify(stored, "correct horsE") is False
    assert hasher.verify(stored, "") is False


def test_hashes_are_salted(hasher: PasswordHasher) -> None:
    assert hasher.hash("same password") != hasher.hash("same password")


def test_unknown_account_never_verifies(hasher: PasswordHasher) -> None:
    assert hasher.verify(None, "correct horse") is False
    assert hasher.verify(None, "punchline-timing-equaliser") is False


@pytest.mark.parametrize("stored", ["garbage", "$argon2id$v=19$m=8,t=1,p=1$AAAA$AAAA", "$2b$"])
def test_garbage_hash_does_not_verify(hasher: PasswordHasher, stored: str) -> None:
    assert hasher.verify(stored, "correct horse") is False


def test_needs_rehash(hasher: PasswordHasher) -> None:
    stored = hasher.hash("correct horse")
    assert hasher.needs_rehash(stored) is False
    for params in (
        Argon2Params(time_cost=2, memory_cost_kib=8, parallelism=1),
        Argon2Params(time_cost=1, memory_cost_kib=16, parallelism=1),
        Argon2Params(time_cost=1, memory_cost_kib=16, parallelism=2),
    ):
        other = PasswordHasher(params)
        assert other.needs_rehash(stored) is True, params
        assert other.verify(stored, "correct horse") is True  # old hashes keep working


def test_empty_stored_hash_never_verifies(hasher: PasswordHasher) -> None:
    assert hasher.verify("", "punchline-timing-equaliser") is False
