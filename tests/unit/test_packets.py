"""AEAD packet protection and the sliding replay window (RFC 3711 §3.3.2, RFC 7714)."""

from __future__ import annotations

import contextlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from punchline.crypto.handshake import SessionKeys
from punchline.crypto.packets import (
    ForgedPacket,
    PacketCipher,
    PacketError,
    ReplayedPacket,
    ReplayWindow,
    nonce,
)
from punchline.errors import LocalError, RemoteError

A_TO_B = bytes(range(32))
B_TO_A = bytes(range(32, 64))
SID = b"\x01" * 8


def pair(window: int = 64) -> tuple[PacketCipher, PacketCipher]:
    a = PacketCipher(SessionKeys(send=A_TO_B, receive=B_TO_A, session_id=SID), window)
    b = PacketCipher(SessionKeys(send=B_TO_A, receive=A_TO_B, session_id=SID), window)
    return a, b


# ------------------------------------------------------------------ sealing


def test_seal_open_both_directions() -> None:
    a, b = pair()
    assert b.open_untrusted(0, b"hdr", a.seal(0, b"hdr", b"hello bob")) == b"hello bob"
    assert a.open_untrusted(5, b"", b.seal(5, b"", b"hello alice")) == b"hello alice"


def test_ciphertext_is_plaintext_plus_tag_and_hides_it() -> None:
    a, _ = pair()
    sealed = a.seal(1, b"", b"secret words")
    assert len(sealed) == len(b"secret words") + 16
    assert b"secret" not in sealed


def test_nonce_layout_matches_the_documented_construction() -> None:
    assert nonce(0x0102030405060708) == bytes(4) + bytes([1, 2, 3, 4, 5, 6, 7, 8])
    a, _ = pair()
    sealed = a.seal(7, b"aad", b"data")
    assert ChaCha20Poly1305(A_TO_B).decrypt(nonce(7), sealed, b"aad") == b"data"


def test_empty_plaintext() -> None:
    a, b = pair()
    assert b.open_untrusted(0, b"x", a.seal(0, b"x", b"")) == b""


@pytest.mark.parametrize("index", [0, 3, 2**64])
def test_sender_index_must_strictly_increase(index: int) -> None:
    a, _ = pair()
    a.seal(3, b"", b"x")
    with pytest.raises(LocalError):
        a.seal(index, b"", b"y")


def test_sender_may_skip_indexes() -> None:
    a, b = pair()
    for i in (0, 1, 10, 1000, 2**48):
        assert b.open_untrusted(i, b"", a.seal(i, b"", b"p%d" % i)) == b"p%d" % i


# ------------------------------------------------------------------ forgery


@pytest.mark.parametrize("where", ["ciphertext", "tag", "aad", "index"])
def test_tampering_is_forged(where: str) -> None:
    a, b = pair()
    sealed = bytearray(a.seal(4, b"header", b"payload"))
    aad, index = b"header", 4
    if where == "ciphertext":
        sealed[0] ^= 1
    elif where == "tag":
        sealed[-1] ^= 0x80
    elif where == "aad":
        aad = b"headeR"
    else:
        index = 5
    with pytest.raises(ForgedPacket):
        b.open_untrusted(index, aad, bytes(sealed))


def test_own_packets_do_not_open_with_own_receive_key() -> None:
    a, _ = pair()
    with pytest.raises(ForgedPacket):
        a.open_untrusted(0, b"", a.seal(0, b"", b"reflected"))


def test_wrong_keys() -> None:
    a, _ = pair()
    stranger = PacketCipher(SessionKeys(bytes(32), bytes(32), SID))
    with pytest.raises(ForgedPacket):
        stranger.open_untrusted(0, b"", a.seal(0, b"", b"x"))


@pytest.mark.parametrize("length", [0, 1, 15])
def test_shorter_than_tag_is_forged(length: int) -> None:
    _, b = pair()
    with pytest.raises(ForgedPacket):
        b.open_untrusted(0, b"", bytes(length))


@pytest.mark.parametrize("index", [-1, 2**64])
def test_out_of_range_index_is_refused(index: int) -> None:
    _, b = pair()
    with pytest.raises(PacketError):
        b.open_untrusted(index, b"", bytes(32))


def test_bad_key_length_is_local_error() -> None:
    with pytest.raises(LocalError):
        PacketCipher(SessionKeys(bytes(16), bytes(32), SID))


def test_error_classes() -> None:
    assert issubclass(ReplayedPacket, PacketError)
    assert issubclass(ForgedPacket, PacketError)
    assert issubclass(PacketError, RemoteError)


# ------------------------------------------------------------------ replay


def test_replay_is_refused() -> None:
    a, b = pair()
    sealed = a.seal(9, b"", b"once")
    b.open_untrusted(9, b"", sealed)
    with pytest.raises(ReplayedPacket):
        b.open_untrusted(9, b"", sealed)


def test_out_of_order_within_window_is_accepted_once() -> None:
    a, b = pair(window=64)
    sealed = {i: a.seal(i, b"", bytes([i])) for i in range(100)}
    order = [99, 50, 98, 36, 37, 97, 60]
    for i in order:
        assert b.open_untrusted(i, b"", sealed[i]) == bytes([i])
    for i in order:
        with pytest.raises(ReplayedPacket):
            b.open_untrusted(i, b"", sealed[i])


def test_too_old_is_refused_even_if_never_seen() -> None:
    a, b = pair(window=64)
    sealed = {i: a.seal(i, b"", b"") for i in (0, 36, 37, 100)}
    b.open_untrusted(100, b"", sealed[100])
    b.open_untrusted(37, b"", sealed[37])  # 100 - 37 = 63: the oldest still in the window
    with pytest.raises(ReplayedPacket):
        b.open_untrusted(36, b"", sealed[36])
    with pytest.raises(ReplayedPacket):
        b.open_untrusted(0, b"", sealed[0])


def test_forged_packet_does_not_advance_the_window() -> None:
    a, b = pair(window=64)
    genuine = {i: a.seal(i, b"", b"ok") for i in (1, 2)}
    b.open_untrusted(1, b"", genuine[1])
    # a forgery with a far-ahead index would push 2 out of the window if it were recorded
    with pytest.raises(ForgedPacket):
        b.open_untrusted(10_000, b"", bytes(40))
    assert b.window.highest == 1
    assert b.open_untrusted(2, b"", genuine[2]) == b"ok"


def test_forged_copy_does_not_mark_the_genuine_index_as_seen() -> None:
    a, b = pair()
    sealed = a.seal(3, b"", b"real")
    with pytest.raises(ForgedPacket):
        b.open_untrusted(3, b"", sealed[:-1] + bytes([sealed[-1] ^ 1]))
    assert b.open_untrusted(3, b"", sealed) == b"real"


def test_replay_checked_before_authentication() -> None:
    a, b = pair()
    b.open_untrusted(3, b"", a.seal(3, b"", b"x"))
    with pytest.raises(ReplayedPacket):
        b.open_untrusted(3, b"", bytes(40))  # garbage, but the index is already used


# ------------------------------------------------------------------ the window alone


def test_window_basics() -> None:
    w = ReplayWindow(4)
    assert w.check(0)
    assert w.check(1000)
    assert not w.check(-1)
    w.accept(10)
    assert not w.check(10)
    assert w.check(9)
    assert w.check(7)
    assert not w.check(6)
    w.accept(8)
    assert not w.check(8)
    assert w.check(9)
    w.accept(11)
    assert w.highest == 11
    assert not w.check(8)
    assert w.check(9)
    assert not w.check(7)  # 11 - 7 = 4, outside a window of 4


def test_window_jump_past_its_size_forgets_everything_cheaply() -> None:
    w = ReplayWindow(1024)
    w.accept(5)
    w.accept(2**63)
    assert w.highest == 2**63
    assert w.check(2**63 - 1)
    assert not w.check(2**63)
    assert not w.check(5)


def test_accept_without_check_is_local_error() -> None:
    w = ReplayWindow(8)
    w.accept(3)
    with pytest.raises(LocalError):
        w.accept(3)


@pytest.mark.parametrize("size", [0, -1])
def test_window_size_must_be_positive(size: int) -> None:
    with pytest.raises(LocalError):
        ReplayWindow(size)


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 70),
    indexes=st.lists(st.integers(0, 300), max_size=80),
)
def test_window_matches_a_simple_model(size: int, indexes: list[int]) -> None:
    """Compare with the obvious set-based model of RFC 3711 §3.3.2."""
    w = ReplayWindow(size)
    seen: set[int] = set()
    highest = -1
    for i in indexes:
        expected = i not in seen and (i > highest or highest - i < size)
        assert w.check(i) == expected
        if expected:
            w.accept(i)
            seen.add(i)
            highest = max(highest, i)


@settings(max_examples=200, deadline=None)
@given(index=st.integers(-(2**70), 2**70), aad=st.binary(max_size=40), data=st.binary(max_size=80))
def test_open_untrusted_only_raises_packet_error(index: int, aad: bytes, data: bytes) -> None:
    _, b = pair()
    with contextlib.suppress(PacketError):
        b.open_untrusted(index, aad, data)
