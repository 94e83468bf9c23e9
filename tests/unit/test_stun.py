"""STUN codec (RFC 8489 / 5780 / 8656) and the Binding responder: RFC 5769 vectors, round trips,
strict rejection, and hypothesis fuzzing that bad bytes only ever raise `StunError`."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import struct
import zlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchline.errors import LocalError, RemoteError
from punchline.nat.stun_server import BindingResponder, BindingResponderConfig
from punchline.wire import stun
from punchline.wire.stun import (
    MAGIC_COOKIE,
    Attr,
    Class,
    Message,
    Method,
    StunError,
    StunUsageError,
    binding_request,
    binding_success,
    decode_address_untrusted,
    decode_error_code_untrusted,
    decode_untrusted,
    decode_xor_address_untrusted,
    encode,
    encode_address,
    encode_error_code,
    encode_xor_address,
    is_stun,
    long_term_key,
    new_transaction_id,
)


def h(text: str) -> bytes:
    """Hex as RFC 5769 prints it (spaces, line breaks) to bytes."""
    return bytes.fromhex("".join(text.split()))


# RFC 5769 §2: test vectors. The SOFTWARE / USERNAME padding in 2.1-2.3 is 0x20 on purpose.
PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
VECTOR_TID = h("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
SAMPLE_REQUEST = h("""
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf""")
SAMPLE_IPV4_RESPONSE = h("""
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96""")
SAMPLE_IPV6_RESPONSE = h("""
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c""")
SAMPLE_LONG_TERM_REQUEST = h("""
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66""")
VECTORS = [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE]

TID = bytes(range(12))
KEY = b"a shared secret"


def with_fingerprint(data: bytes) -> bytes:
    """Append a FINGERPRINT to an unfingerprinted message, independently of the codec."""
    grown = data[:2] + struct.pack("!H", len(data) - 20 + 8) + data[4:]
    crc = zlib.crc32(grown) ^ 0x5354554E
    return grown + struct.pack("!HHI", 0x8028, 4, crc)


def append_raw(data: bytes, kind: int, value: bytes) -> bytes:
    """Append one attribute and fix the header length, leaving everything else as it was."""
    tlv = struct.pack("!HH", kind, len(value)) + value + b"\x00" * (-len(value) % 4)
    return data[:2] + struct.pack("!H", len(data) - 20 + len(tlv)) + data[4:] + tlv


# ------------------------------------------------------------------ RFC 5769 vectors


def test_rfc5769_sample_request() -> None:
    msg = decode_untrusted(SAMPLE_REQUEST, PASSWORD)
    assert (msg.method, msg.cls, msg.transaction_id) == (Method.BINDING, Class.REQUEST, VECTOR_TID)
    assert msg.get(Attr.SOFTWARE) == b"STUN test client"
    assert msg.get(Attr.USERNAME) == b"evtj:h6vY"
    assert stun.decode_uint32_untrusted(msg.get(Attr.PRIORITY) or b"") == 0x6E0001FF
    assert stun.decode_uint64_untrusted(msg.get(Attr.ICE_CONTROLLED) or b"") == 0x932FF9B151263B36
    assert [kind for kind, _ in msg.attributes] == [
        Attr.SOFTWARE,
        Attr.PRIORITY,
        Attr.ICE_CONTROLLED,
        Attr.USERNAME,
    ]


@pytest.mark.parametrize(
    ("vector", "address"),
    [
        (SAMPLE_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (SAMPLE_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_sample_responses(vector: bytes, address: tuple[str, int]) -> None:
    msg = decode_untrusted(vector, PASSWORD)
    assert (msg.method, msg.cls) == (Method.BINDING, Class.SUCCESS)
    assert stun.decode_text_untrusted(msg.get(Attr.SOFTWARE) or b"") == "test vector"
    value = msg.get(Attr.XOR_MAPPED_ADDRESS)
    assert value is not None
    assert decode_xor_address_untrusted(value, msg.transaction_id) == address
    assert encode_xor_address(address, VECTOR_TID) == value
    assert stun.mapped_address_untrusted(msg) == address


@pytest.mark.parametrize("vector", VECTORS)
def test_rfc5769_vectors_re_encode_byte_for_byte(vector: bytes) -> None:
    msg = decode_untrusted(vector, PASSWORD)
    assert encode(msg, PASSWORD, padding_byte=0x20) == vector


@pytest.mark.parametrize("vector", VECTORS)
def test_rfc5769_vectors_refuse_a_wrong_password(vector: bytes) -> None:
    decode_untrusted(vector)  # fine without a key: FINGERPRINT is still checked
    with pytest.raises(StunError, match="MESSAGE-INTEGRITY"):
        decode_untrusted(vector, PASSWORD + b"x")


def test_rfc5769_long_term_request() -> None:
    # RFC 5769 §2.4; the password "TheMatrIX" is the vector's already-prepared form.
    key = long_term_key("マトリックス", "example.org", "TheMatrIX")
    msg = decode_untrusted(SAMPLE_LONG_TERM_REQUEST, key)
    assert stun.decode_text_untrusted(msg.get(Attr.USERNAME) or b"") == "マトリックス"
    assert msg.get(Attr.NONCE) == b"f//499k954d6OL34oL9FSTvy64sA"
    assert msg.get(Attr.REALM) == b"example.org"
    assert encode(msg, key, fingerprint=False) == SAMPLE_LONG_TERM_REQUEST
    with pytest.raises(StunError):
        decode_untrusted(
            SAMPLE_LONG_TERM_REQUEST, long_term_key("マトリックス", "example.org", "x")
        )


def test_long_term_key_is_md5_of_opaque_strings() -> None:
    expected = hashlib.md5(b"user:realm:pass", usedforsecurity=False).digest()
    assert long_term_key("user", "realm", "pass") == expected
    # RFC 8265 OpaqueString: non-ASCII spaces become U+0020, then NFC
    assert long_term_key("user", "realm", "a\u00a0b") == long_term_key("user", "realm", "a b")
    assert long_term_key("u", "r", "e\u0301") == long_term_key("u", "r", "\u00e9")
    assert stun.opaque_string(stun.opaque_string("x\u2003e\u0301")) == "x \u00e9"


# ------------------------------------------------------------------ framing


@pytest.mark.parametrize(
    ("method", "cls", "wire_type"),
    [
        (Method.BINDING, Class.REQUEST, 0x0001),
        (Method.BINDING, Class.INDICATION, 0x0011),
        (Method.BINDING, Class.SUCCESS, 0x0101),
        (Method.BINDING, Class.ERROR, 0x0111),
        (Method.ALLOCATE, Class.ERROR, 0x0113),
        (Method.SEND, Class.INDICATION, 0x0016),
        (Method.DATA, Class.INDICATION, 0x0017),
        (Method.CHANNEL_BIND, Class.SUCCESS, 0x0109),
        (0xFFF, Class.ERROR, 0x3FFF),
    ],
)
def test_message_type_bits(method: int, cls: Class, wire_type: int) -> None:
    data = encode(Message(method, cls, TID), fingerprint=False)
    assert data == struct.pack("!HHI", wire_type, 0, MAGIC_COOKIE) + TID
    msg = decode_untrusted(data)
    assert (msg.method, msg.cls) == (method, cls)


@pytest.mark.parametrize("sha256", [False, True])
@pytest.mark.parametrize("fingerprint", [False, True])
def test_round_trip_with_integrity_and_fingerprint(sha256: bool, fingerprint: bool) -> None:
    msg = Message(
        Method.ALLOCATE,
        Class.REQUEST,
        TID,
        ((Attr.REQUESTED_TRANSPORT, stun.encode_requested_transport()), (0xC001, b"abcde")),
    )
    data = encode(msg, KEY, sha256=sha256, fingerprint=fingerprint)
    assert len(data) % 4 == 0
    assert is_stun(data)
    assert decode_untrusted(data, KEY) == msg
    assert decode_untrusted(data) == msg
    trailer = Attr.MESSAGE_INTEGRITY_SHA256 if sha256 else Attr.MESSAGE_INTEGRITY
    assert trailer.to_bytes(2, "big") in data
    with pytest.raises(StunError):
        decode_untrusted(data, KEY + b"!")


def test_message_get_and_get_all() -> None:
    msg = Message(Method.BINDING, Class.REQUEST, TID, ((1, b"a"), (2, b"b"), (1, b"c")))
    assert msg.get(1) == b"a"
    assert msg.get(3) is None
    assert msg.get_all(1) == [b"a", b"c"]
    assert msg.get_all(3) == []


def test_unknown_methods_decode_as_plain_integers() -> None:
    msg = decode_untrusted(encode(Message(0x0AB, Class.REQUEST, TID)))
    assert msg.method == 0x0AB
    assert not isinstance(msg.method, Method)


def test_is_stun_demultiplexes() -> None:
    data = binding_request(TID)
    assert is_stun(data)
    assert not is_stun(data[:19])
    assert not is_stun(data + b"\x00" * 4)  # length field no longer consistent
    assert not is_stun(b"\x40" + data[1:])  # TURN ChannelData starts at 0x40 (RFC 7983)
    assert not is_stun(b"\x80" + data[1:])  # RTP
    assert not is_stun(data[:4] + b"\x21\x12\xa4\x43" + data[8:])
    odd = data[:2] + b"\x00\x02" + data[4:20] + b"\x00\x00"
    assert not is_stun(odd)
    assert not is_stun(b"")


# ------------------------------------------------------------------ strict rejection


def _good() -> bytes:
    return encode(Message(Method.BINDING, Class.REQUEST, TID, ((Attr.SOFTWARE, b"abc"),)), KEY)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than a STUN header"),
        (_good()[:19], "shorter than a STUN header"),
        (b"\xc0" + _good()[1:], "top two bits"),
        (_good()[:4] + b"\x21\x12\xa4\x43" + _good()[8:], "magic cookie"),
        (_good()[:2] + b"\x00\x02" + _good()[4:], "multiple of 4"),
        (_good()[:-4], "does not match"),
        (_good() + b"\x00" * 4, "does not match"),
        (_good()[:22] + b"\x00\xff" + _good()[24:], "runs past"),
        (_good()[:2] + b"\x00\x04" + _good()[4:24], "runs past"),
    ],
)
def test_framing_errors(data: bytes, reason: str) -> None:
    with pytest.raises(StunError, match=reason):
        decode_untrusted(data)


def test_wrong_fingerprint() -> None:
    data = _good()
    with pytest.raises(StunError, match="FINGERPRINT"):
        decode_untrusted(data[:-1] + bytes([data[-1] ^ 1]))
    flipped = data[:25] + bytes([data[25] ^ 0x20]) + data[26:]  # inside SOFTWARE
    with pytest.raises(StunError, match="FINGERPRINT"):
        decode_untrusted(flipped)


def test_fingerprint_must_be_last_and_four_bytes() -> None:
    data = encode(Message(Method.BINDING, Class.REQUEST, TID))
    with pytest.raises(StunError, match="last"):
        decode_untrusted(append_raw(data, Attr.SOFTWARE, b"x"))
    bare = encode(Message(Method.BINDING, Class.REQUEST, TID), fingerprint=False)
    with pytest.raises(StunError, match="4 bytes"):
        decode_untrusted(append_raw(bare, Attr.FINGERPRINT, b"\x00" * 8))


def test_wrong_integrity() -> None:
    data = encode(Message(Method.BINDING, Class.REQUEST, TID, ((Attr.SOFTWARE, b"abc"),)), KEY)
    with pytest.raises(StunError, match="does not verify"):
        decode_untrusted(data, b"another key")
    # alter a covered byte and repair FINGERPRINT so only the HMAC can notice
    unsealed = encode(
        Message(Method.BINDING, Class.REQUEST, TID, ((Attr.SOFTWARE, b"abc"),)),
        KEY,
        fingerprint=False,
    )
    forged = with_fingerprint(unsealed[:24] + b"abd" + unsealed[27:])
    decode_untrusted(forged)
    with pytest.raises(StunError, match="does not verify"):
        decode_untrusted(forged, KEY)


def test_integrity_required_when_a_key_is_given() -> None:
    with pytest.raises(StunError, match="no MESSAGE-INTEGRITY"):
        decode_untrusted(binding_request(TID), KEY)


@pytest.mark.parametrize(("kind", "size"), [(0x0008, 16), (0x0008, 32), (0x001C, 12), (0x001C, 36)])
def test_integrity_attributes_have_fixed_sizes(kind: int, size: int) -> None:
    data = append_raw(
        encode(Message(Method.BINDING, Class.REQUEST, TID), fingerprint=False), kind, bytes(size)
    )
    with pytest.raises(StunError, match="MESSAGE-INTEGRITY"):
        decode_untrusted(data)


def test_truncated_sha256_integrity_is_accepted() -> None:
    # RFC 8489 §14.6: MESSAGE-INTEGRITY-SHA256 may be truncated to 16-28 bytes
    bare = encode(Message(Method.BINDING, Class.REQUEST, TID), fingerprint=False)
    covered = bare[:2] + struct.pack("!H", 4 + 16) + bare[4:]
    mac = hmac.new(KEY, covered, hashlib.sha256).digest()[:16]
    data = with_fingerprint(append_raw(bare, Attr.MESSAGE_INTEGRITY_SHA256, mac))
    assert decode_untrusted(data, KEY).attributes == ()
    bad = with_fingerprint(append_raw(bare, Attr.MESSAGE_INTEGRITY_SHA256, bytes(16)))
    with pytest.raises(StunError):
        decode_untrusted(bad, KEY)


def test_attributes_after_message_integrity_are_ignored() -> None:
    sealed = encode(
        Message(Method.BINDING, Class.REQUEST, TID, ((Attr.USERNAME, b"u"),)),
        KEY,
        fingerprint=False,
    )
    data = with_fingerprint(append_raw(sealed, Attr.SOFTWARE, b"sneaked in"))
    msg = decode_untrusted(data, KEY)
    assert msg.attributes == ((Attr.USERNAME, b"u"),)


def test_both_integrity_attributes_are_checked() -> None:
    # RFC 8489 §9: MESSAGE-INTEGRITY-SHA256 after MESSAGE-INTEGRITY still counts
    sealed = encode(Message(Method.BINDING, Class.REQUEST, TID), KEY, fingerprint=False)
    covered = sealed[:2] + struct.pack("!H", len(sealed) - 20 + 36) + sealed[4:]
    mac = hmac.new(KEY, covered, hashlib.sha256).digest()
    decode_untrusted(with_fingerprint(append_raw(sealed, Attr.MESSAGE_INTEGRITY_SHA256, mac)), KEY)
    forged = with_fingerprint(append_raw(sealed, Attr.MESSAGE_INTEGRITY_SHA256, bytes(32)))
    with pytest.raises(StunError, match="SHA256"):
        decode_untrusted(forged, KEY)


def test_padding_may_hold_any_value_but_must_be_there() -> None:
    spaced = encode(
        Message(Method.BINDING, Class.REQUEST, TID, ((Attr.SOFTWARE, b"x"),)), padding_byte=0xFF
    )
    assert decode_untrusted(spaced).get(Attr.SOFTWARE) == b"x"
    unpadded = (
        struct.pack("!HHI", 0x0001, 5, MAGIC_COOKIE) + TID + struct.pack("!HH", 0x8022, 1) + b"x"
    )
    with pytest.raises(StunError):
        decode_untrusted(unpadded)


def test_stun_error_is_a_remote_error() -> None:
    assert issubclass(StunError, RemoteError)
    assert issubclass(StunUsageError, LocalError)


# ------------------------------------------------------------------ encoder misuse


@pytest.mark.parametrize(
    "msg",
    [
        Message(Method.BINDING, Class.REQUEST, b"short"),
        Message(0x1000, Class.REQUEST, TID),
        Message(Method.BINDING, 4, TID),  # type: ignore[arg-type]
        Message(Method.BINDING, Class.REQUEST, TID, ((Attr.FINGERPRINT, b"1234"),)),
        Message(Method.BINDING, Class.REQUEST, TID, ((Attr.MESSAGE_INTEGRITY, bytes(20)),)),
        Message(Method.BINDING, Class.REQUEST, TID, ((0x10000, b""),)),
        Message(Method.BINDING, Class.REQUEST, TID, ((Attr.DATA, bytes(70000)),)),
        Message(Method.BINDING, Class.REQUEST, TID, ((Attr.DATA, bytes(40000)),) * 2),
    ],
)
def test_encode_refuses_what_stun_cannot_carry(msg: Message) -> None:
    with pytest.raises(StunUsageError):
        encode(msg)


def test_transaction_ids() -> None:
    assert len(new_transaction_id()) == 12
    assert new_transaction_id() != new_transaction_id()
    assert new_transaction_id(lambda n: b"\x07" * n) == b"\x07" * 12
    with pytest.raises(StunUsageError):
        new_transaction_id(lambda n: b"\x07" * (n - 1))


# ------------------------------------------------------------------ attribute values


ADDRESSES = [
    ("192.0.2.1", 32853),
    ("0.0.0.0", 0),  # noqa: S104 - an address value, nothing binds to it
    ("255.255.255.255", 65535),
    ("2001:db8::1", 3478),
    ("::", 1),
    ("::1", 65535),
    ("fe80::1:2:3:4", 7),
]


@pytest.mark.parametrize("address", ADDRESSES)
def test_address_round_trips(address: tuple[str, int]) -> None:
    assert decode_address_untrusted(encode_address(address)) == address
    xored = encode_xor_address(address, TID)
    assert decode_xor_address_untrusted(xored, TID) == address
    assert len(xored) == (8 if "." in address[0] else 20)


def test_xor_address_depends_on_the_transaction_for_ipv6_only() -> None:
    other = bytes(12)
    assert encode_xor_address(("192.0.2.1", 1), TID) == encode_xor_address(("192.0.2.1", 1), other)
    assert encode_xor_address(("2001:db8::1", 1), TID) != encode_xor_address(
        ("2001:db8::1", 1), other
    )


def test_addresses_ignore_the_reserved_byte_and_scope() -> None:
    value = encode_address(("192.0.2.1", 80))
    assert decode_address_untrusted(b"\xff" + value[1:]) == ("192.0.2.1", 80)
    assert encode_address(("fe80::1%lo", 5)) == encode_address(("fe80::1", 5))


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x00\x01\x00",
        b"\x00\x03\x00\x50\x01\x02\x03\x04",
        b"\x00\x01\x00\x50\x01\x02\x03",
        bytes([0, 2, 0, 80]) + bytes(4),
    ],
)
def test_malformed_addresses(value: bytes) -> None:
    with pytest.raises(StunError):
        decode_address_untrusted(value)
    with pytest.raises(StunError):
        decode_xor_address_untrusted(value, TID)


@pytest.mark.parametrize(
    "address", [("example.org", 1), ("192.0.2.1", -1), ("192.0.2.1", 65536), ("::1", True)]
)
def test_encoding_a_bad_address_is_local_misuse(address: tuple[str, int]) -> None:
    with pytest.raises(StunUsageError):
        encode_address(address)
    with pytest.raises(StunUsageError):
        encode_xor_address(address, TID)


def test_xor_addresses_need_a_real_transaction_id() -> None:
    with pytest.raises(StunUsageError):
        encode_xor_address(("::1", 1), b"short")


@pytest.mark.parametrize(
    ("code", "reason"),
    [(300, "Try Alternate"), (420, "Unknown Attribute"), (699, ""), (438, "Stále Nonce")],
)
def test_error_code_round_trip(code: int, reason: str) -> None:
    value = encode_error_code(code, reason)
    assert value[:4] == bytes([0, 0, code // 100, code % 100])
    assert decode_error_code_untrusted(value) == (code, reason)


def test_error_code_reserved_bits_are_ignored() -> None:
    assert decode_error_code_untrusted(b"\xff\xff\xfc\x01Unauthorized") == (401, "Unauthorized")


@pytest.mark.parametrize(
    "value",
    [
        b"\x00\x00\x04",
        b"\x00\x00\x02\x00",
        b"\x00\x00\x07\x00",
        b"\x00\x00\x04\x64",
        b"\x00\x00\x04\x00\xff",
        b"\x00\x00\x04\x00" + b"a" * 764,
    ],
)
def test_malformed_error_codes(value: bytes) -> None:
    with pytest.raises(StunError):
        decode_error_code_untrusted(value)


@pytest.mark.parametrize(("code", "reason"), [(299, "x"), (700, "x"), (400, "x" * 128)])
def test_encoding_a_bad_error_code_is_local_misuse(code: int, reason: str) -> None:
    with pytest.raises(StunUsageError):
        encode_error_code(code, reason)


def test_small_value_round_trips() -> None:
    assert stun.decode_uint32_untrusted(stun.encode_uint32(600)) == 600
    assert stun.decode_uint64_untrusted(stun.encode_uint64(2**64 - 1)) == 2**64 - 1
    assert stun.decode_unknown_attributes_untrusted(
        stun.encode_unknown_attributes([0x0027, 0x0003])
    ) == [0x0027, 0x0003]
    for flags in [(False, False), (True, False), (False, True), (True, True)]:
        assert stun.decode_change_request_untrusted(stun.encode_change_request(*flags)) == flags
    assert stun.encode_change_request(True, True) == b"\x00\x00\x00\x06"
    assert stun.decode_response_port_untrusted(stun.encode_response_port(65535)) == 65535
    assert stun.decode_channel_number_untrusted(stun.encode_channel_number(0x4001)) == 0x4001
    assert stun.decode_requested_transport_untrusted(stun.encode_requested_transport()) == 17
    assert (
        stun.decode_requested_address_family_untrusted(stun.encode_requested_address_family(True))
        == 6
    )
    assert (
        stun.decode_requested_address_family_untrusted(stun.encode_requested_address_family(False))
        == 4
    )
    assert stun.decode_even_port_untrusted(stun.encode_even_port(True)) is True
    assert stun.decode_text_untrusted(stun.encode_text("ünï")) == "ünï"


@pytest.mark.parametrize(
    ("decoder", "value"),
    [
        (stun.decode_uint32_untrusted, b"\x00" * 3),
        (stun.decode_uint64_untrusted, b"\x00" * 4),
        (stun.decode_unknown_attributes_untrusted, b"\x00" * 3),
        (stun.decode_change_request_untrusted, b"\x00"),
        (stun.decode_response_port_untrusted, b"\x00\x01"),
        (stun.decode_channel_number_untrusted, b"\x3f\xff\x00\x00"),
        (stun.decode_channel_number_untrusted, b"\x80\x00\x00\x00"),
        (stun.decode_requested_transport_untrusted, b"\x11"),
        (stun.decode_requested_address_family_untrusted, b"\x03\x00\x00\x00"),
        (stun.decode_even_port_untrusted, b""),
        (stun.decode_text_untrusted, b"\xff\xfe"),
    ],
)
def test_small_values_reject_malformed_bytes(
    decoder: Callable[[bytes], object], value: bytes
) -> None:
    with pytest.raises(StunError):
        decoder(value)


@pytest.mark.parametrize(
    "call",
    [
        lambda: stun.encode_uint32(2**32),
        lambda: stun.encode_uint64(-1),
        lambda: stun.encode_channel_number(0x5000),
        lambda: stun.encode_response_port(70000),
        lambda: stun.encode_requested_transport(256),
        lambda: stun.encode_text("x" * 128),
    ],
)
def test_small_value_encoders_refuse_misuse(call: Callable[[], object]) -> None:
    with pytest.raises(StunUsageError):
        call()


# ------------------------------------------------------------------ ready-made messages


def test_binding_request() -> None:
    msg = decode_untrusted(binding_request(TID, software="punchline test"))
    assert (msg.method, msg.cls, msg.transaction_id) == (Method.BINDING, Class.REQUEST, TID)
    assert msg.attributes == ((Attr.SOFTWARE, b"punchline test"),)
    fresh = binding_request()
    assert decode_untrusted(fresh).attributes == ()
    assert fresh[8:20] != binding_request()[8:20]


def test_binding_success() -> None:
    data = binding_success(
        TID,
        ("198.51.100.7", 40000),
        response_origin=("192.0.2.1", 3478),
        other_address=("192.0.2.2", 3479),
    )
    msg = decode_untrusted(data)
    assert (msg.method, msg.cls) == (Method.BINDING, Class.SUCCESS)
    assert decode_xor_address_untrusted(msg.get(Attr.XOR_MAPPED_ADDRESS) or b"", TID) == (
        "198.51.100.7",
        40000,
    )
    assert decode_address_untrusted(msg.get(Attr.MAPPED_ADDRESS) or b"") == ("198.51.100.7", 40000)
    assert decode_address_untrusted(msg.get(Attr.RESPONSE_ORIGIN) or b"") == ("192.0.2.1", 3478)
    assert decode_address_untrusted(msg.get(Attr.OTHER_ADDRESS) or b"") == ("192.0.2.2", 3479)
    assert msg.get(Attr.SOFTWARE) == b"punchline"
    assert data[-8:-4] == b"\x80\x28\x00\x04"  # FINGERPRINT last
    bare = decode_untrusted(binding_success(TID, ("::1", 9), software=None))
    assert [kind for kind, _ in bare.attributes] == [Attr.XOR_MAPPED_ADDRESS, Attr.MAPPED_ADDRESS]


def test_mapped_address_falls_back_to_plain_mapped_address() -> None:
    old = Message(
        Method.BINDING,
        Class.SUCCESS,
        TID,
        ((Attr.MAPPED_ADDRESS, encode_address(("192.0.2.9", 9))),),
    )
    assert stun.mapped_address_untrusted(old) == ("192.0.2.9", 9)
    assert stun.mapped_address_untrusted(Message(Method.BINDING, Class.SUCCESS, TID)) is None


def test_error_response() -> None:
    request = decode_untrusted(binding_request(TID))
    msg = decode_untrusted(
        stun.error_response(
            request, 420, "Unknown Attribute", [0x0027], software="s", integrity_key=KEY
        ),
        KEY,
    )
    assert (msg.method, msg.cls, msg.transaction_id) == (Method.BINDING, Class.ERROR, TID)
    assert decode_error_code_untrusted(msg.get(Attr.ERROR_CODE) or b"") == (
        420,
        "Unknown Attribute",
    )
    assert stun.decode_unknown_attributes_untrusted(msg.get(Attr.UNKNOWN_ATTRIBUTES) or b"") == [
        0x0027
    ]
    assert msg.get(Attr.SOFTWARE) == b"s"


# ------------------------------------------------------------------ Binding responder


SOURCE = ("198.51.100.7", 40000)
LOCAL = ("192.0.2.1", 3478)


def _request(
    *attributes: tuple[int, bytes], method: int = Method.BINDING, cls: Class = Class.REQUEST
) -> bytes:
    return encode(Message(method, cls, TID, attributes))


def _error_of(reply: bytes | None) -> tuple[int, list[int]]:
    assert reply is not None
    msg = decode_untrusted(reply)
    assert (msg.cls, msg.transaction_id) == (Class.ERROR, TID)
    code, _ = decode_error_code_untrusted(msg.get(Attr.ERROR_CODE) or b"")
    unknown = msg.get(Attr.UNKNOWN_ATTRIBUTES)
    return code, [] if unknown is None else stun.decode_unknown_attributes_untrusted(unknown)


def test_responder_answers_binding_requests() -> None:
    responder = BindingResponder()
    reply = responder.handle_untrusted(_request(), SOURCE, LOCAL)
    assert reply is not None
    msg = decode_untrusted(reply)
    assert (msg.method, msg.cls, msg.transaction_id) == (Method.BINDING, Class.SUCCESS, TID)
    assert stun.mapped_address_untrusted(msg) == SOURCE
    assert decode_address_untrusted(msg.get(Attr.RESPONSE_ORIGIN) or b"") == LOCAL
    assert msg.get(Attr.OTHER_ADDRESS) is None
    assert responder.counters == {"malformed": 0, "not_request": 0, "answered": 1, "errors": 0}


def test_responder_advertises_its_other_address_and_takes_ipv6_socket_tuples() -> None:
    config = BindingResponderConfig(software=None, other_address=("2001:db8::2", 3479))
    responder = BindingResponder(config)
    source6: tuple[str, int] = ("2001:db8::7", 40000, 0, 0)  # type: ignore[assignment]
    reply = responder.handle_untrusted(_request(), source6, ("2001:db8::1", 3478))
    assert reply is not None
    msg = decode_untrusted(reply)
    assert stun.mapped_address_untrusted(msg) == ("2001:db8::7", 40000)
    assert decode_address_untrusted(msg.get(Attr.OTHER_ADDRESS) or b"") == ("2001:db8::2", 3479)
    assert msg.get(Attr.SOFTWARE) is None


def test_responder_drops_and_counts_what_it_does_not_answer() -> None:
    responder = BindingResponder()
    assert responder.handle_untrusted(b"\x00\x01junk", SOURCE, LOCAL) is None
    assert (
        responder.handle_untrusted(_request()[:-1] + b"\x00", SOURCE, LOCAL) is None
    )  # FINGERPRINT
    assert responder.handle_untrusted(_request(cls=Class.INDICATION), SOURCE, LOCAL) is None
    assert responder.handle_untrusted(binding_success(TID, SOURCE), SOURCE, LOCAL) is None
    assert responder.counters == {"malformed": 2, "not_request": 2, "answered": 0, "errors": 0}


def test_responder_refuses_other_methods_with_400() -> None:
    responder = BindingResponder()
    reply = responder.handle_untrusted(_request(method=Method.ALLOCATE), SOURCE, LOCAL)
    assert _error_of(reply) == (400, [])
    assert responder.counters["errors"] == 1


def test_responder_refuses_unknown_comprehension_required_attributes_with_420() -> None:
    responder = BindingResponder()
    request = _request(
        (0x7001, b"?"), (Attr.LIFETIME, b"\x00\x00\x00\x01"), (0x7001, b"!"), (0xC0DE, b"")
    )
    assert _error_of(responder.handle_untrusted(request, SOURCE, LOCAL)) == (
        420,
        [0x7001, Attr.LIFETIME],
    )
    # comprehension-optional unknowns and the ICE attributes are fine
    ice = _request(
        (0xC0DE, b"x"),
        (Attr.PRIORITY, b"\x6e\x00\x01\xff"),
        (Attr.USE_CANDIDATE, b""),
        (Attr.ICE_CONTROLLING, bytes(8)),
    )
    assert responder.handle_untrusted(ice, SOURCE, LOCAL) is not None
    assert responder.counters == {"malformed": 0, "not_request": 0, "answered": 1, "errors": 1}


def test_responder_and_rfc5780_change_requests() -> None:
    responder = BindingResponder()
    no_change = _request((Attr.CHANGE_REQUEST, stun.encode_change_request(False, False)))
    assert (
        decode_untrusted(responder.handle_untrusted(no_change, SOURCE, LOCAL) or b"").cls
        == Class.SUCCESS
    )
    change = _request((Attr.CHANGE_REQUEST, stun.encode_change_request(True, False)))
    assert _error_of(responder.handle_untrusted(change, SOURCE, LOCAL)) == (
        420,
        [Attr.CHANGE_REQUEST],
    )
    broken = _request((Attr.CHANGE_REQUEST, b"\x00\x06"))
    assert _error_of(responder.handle_untrusted(broken, SOURCE, LOCAL)) == (400, [])
    # what `turnutils_stunclient -f` sends: RESPONSE-PORT and CHANGE-REQUEST(ip, port)
    turnutils = _request(
        (Attr.RESPONSE_PORT, stun.encode_response_port(40001)),
        (Attr.CHANGE_REQUEST, b"\x00\x00\x00\x06"),
    )
    assert _error_of(responder.handle_untrusted(turnutils, SOURCE, LOCAL)) == (
        420,
        [Attr.RESPONSE_PORT],
    )


def test_responders_do_not_share_counters() -> None:
    one, two = BindingResponder(), BindingResponder()
    one.handle_untrusted(_request(), SOURCE, LOCAL)
    assert two.counters["answered"] == 0


# ------------------------------------------------------------------ fuzzing


FUZZ = settings(max_examples=400, deadline=None)
UNTRUSTED_VALUE_DECODERS: list[Callable[[bytes], object]] = [
    decode_address_untrusted,
    lambda v: decode_xor_address_untrusted(v, TID),
    decode_error_code_untrusted,
    stun.decode_text_untrusted,
    stun.decode_unknown_attributes_untrusted,
    stun.decode_uint32_untrusted,
    stun.decode_uint64_untrusted,
    stun.decode_change_request_untrusted,
    stun.decode_response_port_untrusted,
    stun.decode_channel_number_untrusted,
    stun.decode_requested_transport_untrusted,
    stun.decode_requested_address_family_untrusted,
    stun.decode_even_port_untrusted,
]

attribute_types = st.integers(0, 0xFFFF).filter(lambda t: t not in (0x0008, 0x001C, 0x8028))
messages = st.builds(
    Message,
    method=st.integers(0, 0xFFF),
    cls=st.sampled_from(Class),
    transaction_id=st.binary(min_size=12, max_size=12),
    attributes=st.lists(st.tuples(attribute_types, st.binary(max_size=40)), max_size=6).map(tuple),
)
valid_datagrams = st.one_of(
    st.sampled_from([*VECTORS, SAMPLE_LONG_TERM_REQUEST]),
    st.builds(
        encode,
        messages,
        st.one_of(st.none(), st.just(KEY)),
        st.booleans(),
        st.booleans(),
    ),
)


def _decode_quietly(data: bytes, key: bytes | None) -> Message | None:
    try:
        msg = decode_untrusted(data, key)
    except StunError:
        return None
    if data[0] <= 3:
        assert is_stun(data)
    return msg


@FUZZ
@given(st.binary(max_size=200), st.one_of(st.none(), st.just(KEY)))
def test_fuzz_arbitrary_bytes(data: bytes, key: bytes | None) -> None:
    is_stun(data)
    _decode_quietly(data, key)


@FUZZ
@given(
    st.integers(0, 0x3FFF),
    st.lists(st.integers(0, 255), max_size=120),
    st.one_of(st.none(), st.just(KEY)),
)
def test_fuzz_valid_header_random_body(
    message_type: int, body: list[int], key: bytes | None
) -> None:
    raw = bytes(body)[: len(body) // 4 * 4]
    data = struct.pack("!HHI", message_type, len(raw), MAGIC_COOKIE) + TID + raw
    assert is_stun(data) == (message_type < 0x400)
    _decode_quietly(data, key)


@FUZZ
@given(valid_datagrams, st.data(), st.one_of(st.none(), st.just(KEY), st.just(PASSWORD)))
def test_fuzz_mutated_valid_messages(
    original: bytes, data: st.DataObject, key: bytes | None
) -> None:
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        at = data.draw(st.integers(0, max(0, len(mutated) - 1)))
        if how == "flip" and mutated:
            mutated[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "cut":
            del mutated[at : at + data.draw(st.integers(1, 8))]
        elif how == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif mutated:
            mutated[at] = data.draw(st.integers(0, 255))
    _decode_quietly(bytes(mutated), key)


@FUZZ
@given(messages, st.one_of(st.none(), st.binary(max_size=64)), st.booleans(), st.booleans())
def test_fuzz_encode_decode_round_trip(
    msg: Message, key: bytes | None, sha256: bool, fingerprint: bool
) -> None:
    data = encode(msg, key, sha256, fingerprint)
    assert decode_untrusted(data, key) == msg


@FUZZ
@given(st.binary(max_size=40))
def test_fuzz_value_decoders(value: bytes) -> None:
    for decoder in UNTRUSTED_VALUE_DECODERS:
        with contextlib.suppress(StunError):
            decoder(value)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=120),
        valid_datagrams,
        st.builds(_request, st.tuples(attribute_types, st.binary(max_size=8))),
    )
)
def test_fuzz_responder(data: bytes) -> None:
    responder = BindingResponder()
    reply = responder.handle_untrusted(data, SOURCE, LOCAL)
    assert sum(responder.counters.values()) == 1
    if reply is not None:
        assert decode_untrusted(reply).cls in (Class.SUCCESS, Class.ERROR)
