"""NAT-PMP (RFC 6886) and PCP (RFC 6887) MAP codecs: round trips, the RFCs' byte layouts,
strict rejection of anything that is not the answer we asked for, and fuzzing that bad bytes
only ever raise the codecs' own RemoteError subclasses."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchline.connect import natpmp, pcp
from punchline.errors import LocalError, RemoteError

FUZZ = settings(max_examples=300, deadline=None)
ANY = "0.0.0.0"  # noqa: S104 - PCP's "any address", nothing binds to it

# ----------------------------------------------------------------- NAT-PMP


def test_natpmp_requests_have_the_rfc_layout() -> None:
    assert natpmp.encode_address_request() == b"\x00\x00"
    request = natpmp.encode_map_request(40000, 40001, 3600)
    assert request == struct.pack("!BBHHHI", 0, 1, 0, 40000, 40001, 3600)
    assert natpmp.encode_map_request(40000, 0, 0, tcp=True)[1] == 2


def test_natpmp_map_round_trip() -> None:
    request = natpmp.encode_map_request(40000, 40000, 7200)
    assert natpmp.decode_map_request_untrusted(request) == (40000, 40000, 7200, False)
    reply = natpmp.MapReply(epoch=17, internal_port=40000, external_port=51000, lifetime=7200)
    assert natpmp.decode_map_reply_untrusted(natpmp.encode_map_reply(reply), 40000) == reply


def test_natpmp_address_round_trip() -> None:
    data = natpmp.encode_address_reply(5, "203.0.113.7")
    assert len(data) == 12
    assert natpmp.decode_address_reply_untrusted(data) == natpmp.AddressReply(5, "203.0.113.7")


def test_natpmp_deletion_answer_has_no_lifetime() -> None:
    reply = natpmp.MapReply(epoch=1, internal_port=40000, external_port=0, lifetime=0)
    assert natpmp.decode_map_reply_untrusted(natpmp.encode_map_reply(reply), 40000) == reply


def _natpmp_map_reply(**changes: int) -> bytes:
    fields = {"version": 0, "opcode": 129, "result": 0, "epoch": 1, "internal": 40000,
              "external": 40000, "lifetime": 3600} | changes  # fmt: skip
    return struct.pack("!BBHIHHI", *fields.values())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (_natpmp_map_reply()[:7], "too short"),
        (_natpmp_map_reply()[:15], "expected 16"),
        (_natpmp_map_reply() + b"\x00", "expected 16"),
        (_natpmp_map_reply(version=2), "version 2"),
        (_natpmp_map_reply(opcode=1), "opcode 1"),  # a request echoed back
        (_natpmp_map_reply(opcode=130), "opcode 130"),  # the TCP answer
        (_natpmp_map_reply(opcode=128), "opcode 128"),
        (_natpmp_map_reply(internal=40001), "port 40001"),
        (_natpmp_map_reply(external=0), "external port 0"),
    ],
)
def test_natpmp_rejects_what_is_not_our_answer(data: bytes, match: str) -> None:
    with pytest.raises(natpmp.NatPmpMalformed, match=match):
        natpmp.decode_map_reply_untrusted(data, 40000)


def test_natpmp_refusal_carries_the_result_code() -> None:
    # An error answer may be only the 8-byte header; the result code decides.
    with pytest.raises(natpmp.NatPmpRefused, match="not authorized") as caught:
        natpmp.decode_map_reply_untrusted(_natpmp_map_reply(result=2)[:8], 40000)
    assert caught.value.result == natpmp.Result.NOT_AUTHORIZED
    with pytest.raises(natpmp.NatPmpRefused, match="unknown result code"):
        natpmp.decode_map_reply_untrusted(_natpmp_map_reply(result=99), 40000)


def test_natpmp_rejects_a_bad_address_reply() -> None:
    good = natpmp.encode_address_reply(5, "203.0.113.7")
    for bad in (good[:11], good + b"\x00", b"\x00\x81" + good[2:]):
        with pytest.raises(natpmp.NatPmpMalformed):
            natpmp.decode_address_reply_untrusted(bad)


def test_natpmp_refuses_to_encode_nonsense() -> None:
    with pytest.raises(LocalError):
        natpmp.encode_map_request(0, 0, 60)
    with pytest.raises(LocalError):
        natpmp.encode_map_request(1, 70000, 60)
    with pytest.raises(LocalError):
        natpmp.encode_map_request(1, 1, -1)


@FUZZ
@given(st.binary(max_size=40))
def test_fuzz_natpmp_replies(data: bytes) -> None:
    for decode in (
        natpmp.decode_address_reply_untrusted,
        lambda d: natpmp.decode_map_reply_untrusted(d, 40000),
        natpmp.decode_map_request_untrusted,
    ):
        with contextlib.suppress(RemoteError):
            decode(data)


# ----------------------------------------------------------------- PCP

NONCE = bytes(range(12))
REQUEST = pcp.MapRequest(NONCE, pcp.PROTOCOL_UDP, 40000, 40000, ANY, 3600, "10.1.0.10")
REPLY = pcp.MapReply(NONCE, pcp.PROTOCOL_UDP, 40000, 40000, "203.0.113.101", 3600, 42)


def test_pcp_request_has_the_rfc_layout() -> None:
    data = pcp.encode_map_request(REQUEST)
    assert len(data) == 60
    assert data[:4] == b"\x02\x01\x00\x00"  # version 2, R=0 opcode MAP, reserved
    assert data[4:8] == (3600).to_bytes(4, "big")
    assert data[8:24] == b"\x00" * 10 + b"\xff\xff" + bytes((10, 1, 0, 10))  # IPv4-mapped
    assert data[24:36] == NONCE
    assert data[36] == 17  # UDP
    assert data[40:44] == (40000).to_bytes(2, "big") * 2
    assert data[44:60] == b"\x00" * 10 + b"\xff\xff" + b"\x00" * 4


def test_pcp_round_trips() -> None:
    assert pcp.decode_map_request_untrusted(pcp.encode_map_request(REQUEST)) == REQUEST
    assert pcp.decode_map_reply_untrusted(pcp.encode_map_reply(REPLY), REQUEST) == REPLY


def test_pcp_reply_may_carry_options() -> None:
    option = bytes((0x80, 0, 0, 5)) + b"abcde" + b"\x00" * 3  # code, reserved, length, padded
    reply = pcp.encode_map_reply(REPLY) + option
    assert pcp.decode_map_reply_untrusted(reply, REQUEST) == REPLY
    with pytest.raises(pcp.PcpMalformed, match="option longer"):
        pcp.decode_map_reply_untrusted(pcp.encode_map_reply(REPLY) + bytes((1, 0, 0, 9)), REQUEST)


def _edit(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


GOOD = pcp.encode_map_reply(REPLY)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (GOOD[:23], "too short"),
        (GOOD[:40], "too short"),
        (GOOD + b"\x00", "61 bytes"),
        (GOOD + b"\x00" * 1100, "bytes"),
        (_edit(GOOD, 0, b"\x03"), "version 3"),
        (_edit(GOOD, 1, b"\x01"), "opcode 1"),  # our request echoed back
        (_edit(GOOD, 1, b"\x82"), "opcode 130"),  # a PEER answer
        (_edit(GOOD, 24, b"\xff"), "nonce"),
        (_edit(GOOD, 36, b"\x06"), "protocol 6"),
        (_edit(GOOD, 40, b"\x00\x01"), "port 1"),
        (_edit(GOOD, 42, b"\x00\x00"), "no external port"),
        (_edit(GOOD, 4, b"\x00\x00\x00\x00"), "no lifetime"),
        (_edit(b"\x00\x81\x00\x00" + GOOD[4:], 0, b"\x00"), "NAT-PMP reply"),
    ],
)
def test_pcp_rejects_what_is_not_our_answer(data: bytes, match: str) -> None:
    with pytest.raises(pcp.PcpMalformed, match=match):
        pcp.decode_map_reply_untrusted(data, REQUEST)


def test_pcp_refusal_carries_the_result_code() -> None:
    refused = _edit(GOOD, 3, bytes((pcp.Result.NOT_AUTHORIZED,)))
    with pytest.raises(pcp.PcpRefused, match="not authorized") as caught:
        pcp.decode_map_reply_untrusted(refused, REQUEST)
    assert caught.value.result == pcp.Result.NOT_AUTHORIZED
    with pytest.raises(pcp.PcpRefused):  # an error answer without the MAP body
        pcp.decode_map_reply_untrusted(refused[:24], REQUEST)


def test_pcp_from_a_natpmp_only_gateway_asks_for_fallback() -> None:
    natpmp_says_no = struct.pack("!BBHI", 0, 0x81, natpmp.Result.UNSUPPORTED_VERSION, 9)
    with pytest.raises(pcp.PcpUnsupportedVersion):
        pcp.decode_map_reply_untrusted(natpmp_says_no, REQUEST)
    older = _edit(_edit(GOOD, 0, b"\x01"), 3, bytes((pcp.Result.UNSUPP_VERSION,)))
    with pytest.raises(pcp.PcpUnsupportedVersion):
        pcp.decode_map_reply_untrusted(older[:24], REQUEST)


def test_pcp_deletion_answer_may_have_no_port() -> None:
    delete = pcp.MapRequest(NONCE, pcp.PROTOCOL_UDP, 40000, 0, ANY, 0, "10.1.0.10")
    answer = pcp.MapReply(NONCE, pcp.PROTOCOL_UDP, 40000, 0, ANY, 0, 43)
    assert pcp.decode_map_reply_untrusted(pcp.encode_map_reply(answer), delete) == answer


def test_pcp_refuses_to_encode_nonsense() -> None:
    with pytest.raises(LocalError):
        pcp.encode_map_request(pcp.MapRequest(b"short", 17, 1, 0, ANY, 60, "10.0.0.1"))
    with pytest.raises(LocalError):
        pcp.encode_map_request(pcp.MapRequest(NONCE, 17, 0, 0, ANY, 60, "10.0.0.1"))


@FUZZ
@given(st.binary(max_size=120))
def test_fuzz_pcp_replies(data: bytes) -> None:
    for decode in (
        lambda d: pcp.decode_map_reply_untrusted(d, REQUEST),
        pcp.decode_map_request_untrusted,
    ):
        with contextlib.suppress(RemoteError):
            decode(data)


@FUZZ
@given(st.integers(0, 59), st.integers(0, 255))
def test_fuzz_pcp_one_byte_changed(offset: int, value: int) -> None:
    """Any single-byte change either still decodes to a consistent reply or raises ours."""
    try:
        reply = pcp.decode_map_reply_untrusted(_edit(GOOD, offset, bytes((value,))), REQUEST)
    except RemoteError:
        return
    assert reply.nonce == NONCE
    assert reply.internal_port == 40000
