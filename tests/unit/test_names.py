"""User-name canonicalisation: folding, NFKC, and the message each rule gives."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchline.errors import LocalError
from punchline.identity.names import MAX_LENGTH, MIN_LENGTH, RESERVED, InvalidName, canonical

CANONICAL = re.compile(r"[a-z][a-z0-9._-]{1,30}[a-z0-9]")


@pytest.mark.parametrize(
    ("given_name", "expected"),
    [
        ("alice", "alice"),
        ("Alice", "alice"),
        ("ALICE.B-C_9", "alice.b-c_9"),
        ("ＡＬＩＣＥ", "alice"),  # fullwidth letters
        ("ａｌｉｃｅ１２", "alice12"),  # fullwidth digits too
        ("ﬁona", "fiona"),  # ligature
        ("Straße", "strasse"),  # case folding, not just lower()
        ("\u212aate", "kate"),  # KELVIN SIGN
        ("abc", "abc"),
        ("a" * MAX_LENGTH, "a" * MAX_LENGTH),
        ("a1b", "a1b"),
    ],
)
def test_canonical_forms(given_name: str, expected: str) -> None:
    assert canonical(given_name) == expected


def test_variants_compare_equal() -> None:
    assert canonical("Alice") == canonical("alice") == canonical("ＡＬＩＣＥ")


def test_too_short() -> None:
    with pytest.raises(InvalidName, match=f"at least {MIN_LENGTH} characters"):
        canonical("ab")


def test_too_short_counts_after_normalisation() -> None:
    # "ﬀ" is one code point but two letters after NFKC
    assert canonical("ﬀa") == "ffa"


def test_too_long() -> None:
    with pytest.raises(InvalidName, match=f"at most {MAX_LENGTH} characters"):
        canonical("a" * (MAX_LENGTH + 1))


@pytest.mark.parametrize(
    ("bad", "char"),
    [
        ("ali ce", "' '"),
        ("ali@ce", "'@'"),
        ("alicé", "'é'"),
        ("аlice", "'а'"),  # Cyrillic a, a look-alike
        ("ali+ce", "'+'"),
    ],
)
def test_bad_character_is_named(bad: str, char: str) -> None:
    with pytest.raises(InvalidName, match="not allowed") as info:
        canonical(bad)
    assert char in str(info.value)


@pytest.mark.parametrize("bad", ["1alice", "_alice", ".alice", "-alice", "9lives"])
def test_must_start_with_letter(bad: str) -> None:
    with pytest.raises(InvalidName, match="start with a letter"):
        canonical(bad)


@pytest.mark.parametrize("bad", ["alice-", "alice.", "alice_"])
def test_must_end_with_letter_or_digit(bad: str) -> None:
    with pytest.raises(InvalidName, match="end with a letter or digit"):
        canonical(bad)


@pytest.mark.parametrize("bad", ["al..ice", "al-_ice", "al_.ice", "a--b"])
def test_double_punctuation(bad: str) -> None:
    with pytest.raises(InvalidName, match="two punctuation characters"):
        canonical(bad)


@pytest.mark.parametrize(
    ("bad", "folded"),
    [
        ("admin", "admin"),
        ("Admin", "admin"),
        ("ROOT", "root"),
        ("ｒｏｏｔ", "root"),
        ("supernode", "supernode"),
        ("echo", "echo"),
    ],
)
def test_reserved(bad: str, folded: str) -> None:
    with pytest.raises(InvalidName, match="is reserved") as info:
        canonical(bad)
    assert repr(folded) in str(info.value)


def test_all_reserved_names_are_rejected() -> None:
    for name in RESERVED:
        if len(name) >= MIN_LENGTH:
            with pytest.raises(InvalidName, match="reserved"):
                canonical(name)


def test_non_text_is_invalid() -> None:
    with pytest.raises(InvalidName, match="text"):
        canonical(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidName):
        canonical(b"alice")  # type: ignore[arg-type]


def test_invalid_name_is_local_error() -> None:
    assert issubclass(InvalidName, LocalError)


names_ish = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,33}[A-Za-z0-9]", fullmatch=True),
    st.text(alphabet="abcXYZ019._-ＡＢﬁß \u212a", max_size=36),
)


@settings(max_examples=200)
@given(names_ish)
def test_canonical_is_valid_and_idempotent_or_raises(text: str) -> None:
    try:
        result = canonical(text)
    except InvalidName:
        return
    assert CANONICAL.fullmatch(result)
    assert result not in RESERVED
    assert canonical(result) == result
    assert canonical(result.upper()) == result
