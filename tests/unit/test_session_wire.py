"""Session packet framing: HELLO / WELCOME / REFUSED / SEALED, and TCP length-prefixed frames."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchline.errors import RemoteError
from punchline.wire import session as wire
from punchline.wire.session import (
    HELLO,
    MAX_FRAME,
    MAX_PACKET,
    REFUSED,
    SEALED,
    SEALED_HEADER,
    WELCOME,
    FrameDecoder,
    Hello,
    Refused,
    Sealed,
    SessionPacketError,
    Welcome,
    decode_untrusted,
    frame,
)

SID = bytes(range(1, 9))
TAG = b"\xaa" * 16


def sealed_packet(index: int = 7, body: bytes = TAG) -> bytes:
    return wire.encode_sealed(wire.sealed_header(SID, index), body)


# ------------------------------------------------------------------ round trips


def test_hello_round_trip() -> None:
    hello = {"v": 1, "to": "sn1", "ts": 5, "nested": {"a": [1, 2]}}
    data = wire.encode_hello(hello)
    assert data[0] == HELLO
    assert decode_untrusted(data) == Hello(hello)


def test_welcome_round_trip() -> None:
    answer = {"v": 1, "re": "abc", "sig": "x"}
    data = wire.encode_welcome(answer)
    assert data[0] == WELCOME
    assert decode_untrusted(data) == Welcome(answer)


def test_refused_round_trip_and_truncation() -> None:
    data = wire.encode_refused("wrong CA")
    assert data[0] == REFUSED
    assert decode_untrusted(data) == Refused("wrong CA")
    long = wire.encode_refused("x" * 1000)
    decoded = decode_untrusted(long)
    assert isinstance(decoded, Refused)
    assert decoded.reason == "x" * 200


@pytest.mark.parametrize("body", [b"{}", b'{"reason":5}', b'{"reason":null}', b'{"why":"x"}'])
def test_refused_without_a_text_reason_says_refused(body: bytes) -> None:
    assert decode_untrusted(bytes([REFUSED]) + body) == Refused("refused")


def test_sealed_round_trip_keeps_header_as_associated_data() -> None:
    ciphertext = b"secret bytes" + TAG
    header = wire.sealed_header(SID, 2**64 - 1)
    assert len(header) == SEALED_HEADER.size == 17
    data = wire.encode_sealed(header, ciphertext)
    packet = decode_untrusted(data)
    assert packet == Sealed(SID, 2**64 - 1, header, ciphertext)


def test_shortest_sealed_packet_is_header_plus_tag() -> None:
    assert isinstance(decode_untrusted(sealed_packet(body=TAG)), Sealed)
    with pytest.raises(SessionPacketError):
        decode_untrusted(sealed_packet(body=TAG[:-1]))
    with pytest.raises(SessionPacketError):
        decode_untrusted(bytes([SEALED]))


def test_json_bodies_are_compact() -> None:
    data = wire.encode_hello({"a": 1, "b": [1, 2]})
    assert data[1:] == b'{"a":1,"b":[1,2]}'


# ------------------------------------------------------------------ demultiplexing


@pytest.mark.parametrize(
    ("first", "expected"),
    [(0x00, False), (0x01, False), (0x4F, False), (0x50, True), (0x51, True), (0x52, True),
     (0x53, True), (0x54, False), (0x80, False), (0xBF, False), (0xFF, False)],
)  # fmt: skip
def test_first_byte_tells_session_packets_from_stun_and_rtp(first: int, expected: bool) -> None:
    assert wire.is_session(bytes([first]) + b"{}") is expected


def test_empty_datagram_is_not_a_session_packet() -> None:
    assert not wire.is_session(b"")


# ------------------------------------------------------------------ strict rejection


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42" + bytes(12),  # a STUN binding request
        b"\x80\x00\x00\x01" + bytes(8),  # RTP
        bytes([HELLO]),  # no body
        bytes([HELLO]) + b"not json",
        bytes([WELCOME]) + b"[1,2]",
        bytes([HELLO]) + b'"text"',
        bytes([REFUSED]) + b"null",
        bytes([HELLO]) + b"\xff\xfe\xfd",
        bytes([HELLO]) + b'{"a":1',
        bytes([HELLO]) + b"{}" + b" " * MAX_PACKET,  # too long
        bytes([SEALED]) + bytes(20),  # too short
    ],
)
def test_malformed_packets_are_refused(data: bytes) -> None:
    with pytest.raises(SessionPacketError):
        decode_untrusted(data)


def test_largest_packet_accepted_one_more_refused() -> None:
    pad = MAX_PACKET - len(wire.encode_hello({"p": ""}))
    exact = wire.encode_hello({"p": "x" * pad})
    assert len(exact) == MAX_PACKET
    assert decode_untrusted(exact) == Hello({"p": "x" * pad})
    with pytest.raises(SessionPacketError):
        decode_untrusted(wire.encode_hello({"p": "x" * (pad + 1)}))


def test_error_is_a_remote_error() -> None:
    assert issubclass(SessionPacketError, RemoteError)


def test_deeply_nested_json_raises_only_the_packet_error() -> None:
    with pytest.raises(SessionPacketError):
        decode_untrusted(bytes([HELLO]) + b"[" * (MAX_PACKET - 1))


# ------------------------------------------------------------------ TCP framing


def test_frame_prefixes_a_big_endian_length() -> None:
    assert frame(b"abc") == b"\x00\x03abc"
    assert frame(b"x" * 258)[:2] == b"\x01\x02"


def test_frame_refuses_oversized_packets() -> None:
    assert len(frame(b"x" * MAX_FRAME)) == MAX_FRAME + 2
    with pytest.raises(ValueError, match="too large"):
        frame(b"x" * (MAX_FRAME + 1))


def test_decoder_single_frame() -> None:
    decoder = FrameDecoder()
    hello = wire.encode_hello({"a": 1})
    assert decoder.feed(frame(hello)) == [hello]
    assert decoder.feed(b"") == []


def test_decoder_coalesced_frames_in_one_read() -> None:
    packets = [wire.encode_hello({"n": i}) for i in range(5)] + [sealed_packet()]
    decoder = FrameDecoder()
    assert decoder.feed(b"".join(frame(p) for p in packets)) == packets


def test_decoder_split_byte_by_byte() -> None:
    packets = [wire.encode_welcome({"n": 1}), sealed_packet(3)]
    stream = b"".join(frame(p) for p in packets)
    decoder = FrameDecoder()
    got: list[bytes] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == packets


def test_decoder_split_inside_length_prefix_and_across_frames() -> None:
    a, b = wire.encode_hello({"x": "a"}), wire.encode_hello({"x": "b"})
    stream = frame(a) + frame(b)
    decoder = FrameDecoder()
    assert decoder.feed(stream[:1]) == []  # half of the length
    assert decoder.feed(stream[1 : len(frame(a)) + 3]) == [a]  # a, and the start of b
    assert decoder.feed(stream[len(frame(a)) + 3 :]) == [b]


def test_decoder_waits_for_a_whole_large_frame() -> None:
    big = b"\x52" + bytes(MAX_FRAME - 1)
    decoder = FrameDecoder()
    stream = frame(big)
    assert decoder.feed(stream[:1000]) == []
    assert decoder.feed(stream[1000:]) == [big]


def test_decoder_refuses_an_empty_frame() -> None:
    decoder = FrameDecoder()
    with pytest.raises(SessionPacketError):
        decoder.feed(b"\x00\x00")


# ------------------------------------------------------------------ fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=80),
        st.tuples(st.integers(0x50, 0x53), st.binary(max_size=60)).map(
            lambda t: bytes([t[0]]) + t[1]
        ),
        st.tuples(st.integers(0x50, 0x53), json_values).map(
            lambda t: bytes([t[0]]) + json.dumps(t[1]).encode()
        ),
    )
)
def test_decode_untrusted_only_raises_the_packet_error(data: bytes) -> None:
    try:
        packet = decode_untrusted(data)
    except SessionPacketError:
        return
    assert wire.is_session(data)
    if isinstance(packet, Hello | Welcome):
        assert isinstance(packet.hello if isinstance(packet, Hello) else packet.answer, dict)
    elif isinstance(packet, Refused):
        assert isinstance(packet.reason, str)
    else:
        assert packet.header + packet.ciphertext == data


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_hello_and_welcome_round_trip_any_object(value: dict[str, Any]) -> None:
    assert decode_untrusted(wire.encode_hello(value)) == Hello(value)
    assert decode_untrusted(wire.encode_welcome(value)) == Welcome(value)


@settings(max_examples=200, deadline=None)
@given(
    packets=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    seed=st.integers(0, 2**32),
)
def test_decoder_reassembles_any_chunking(packets: list[bytes], seed: int) -> None:
    stream = b"".join(frame(p) for p in packets)
    rng = random.Random(seed)
    decoder = FrameDecoder()
    got: list[bytes] = []
    i = 0
    while i < len(stream):
        step = rng.randint(1, 50)
        got += decoder.feed(stream[i : i + step])
        i += step
    assert got == packets


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_decoder_on_arbitrary_bytes_only_raises_the_packet_error(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    try:
        for chunk in chunks:
            for packet in decoder.feed(chunk):
                assert 0 < len(packet) <= MAX_FRAME
    except SessionPacketError:
        pass
