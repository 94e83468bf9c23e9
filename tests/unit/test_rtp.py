"""RTP/RTCP codecs (RFC 3550), demultiplexing (RFC 7983, RFC 5761), index estimation
(RFC 3711 §3.3.1) and secure RTP."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchline.crypto.handshake import SessionKeys
from punchline.crypto.packets import ForgedPacket, PacketError, ReplayedPacket
from punchline.crypto.srtp import SecureRtp
from punchline.errors import LocalError, RemoteError
from punchline.wire.rtp import (
    OPUS_PAYLOAD_TYPE,
    ReceiverReport,
    ReportBlock,
    RtpError,
    RtpPacket,
    SenderReport,
    SequenceTracker,
    decode_rtcp_untrusted,
    decode_rtp_untrusted,
    encode_rtcp,
    encode_rtp,
    header_length_untrusted,
    is_rtcp,
    is_rtp_or_rtcp,
    random_initial_sequence,
)

OPUS = RtpPacket(OPUS_PAYLOAD_TYPE, 1, 160, 0x12345678, b"\xfc\xff\xfe")

# ------------------------------------------------------------------ RTP by hand (RFC 3550 §5.1)


def test_decode_hand_assembled_minimal_packet() -> None:
    # V=2 P=0 X=0 CC=0 | M=0 PT=111 | seq=1 | ts=160 | ssrc=0x12345678 | payload
    data = bytes.fromhex("806f0001000000a012345678") + b"\xfc\xff\xfe"
    assert decode_rtp_untrusted(data) == OPUS
    assert encode_rtp(OPUS) == data
    assert header_length_untrusted(data) == 12


def test_decode_hand_assembled_full_packet() -> None:
    data = (
        bytes([0b1011_0010, 0x80 | 0])  # V=2 P=1 X=1 CC=2 | M=1 PT=0 (PCMU)
        + struct.pack("!HII", 0xFFFF, 0xDEADBEEF, 7)
        + struct.pack("!II", 11, 22)  # CSRC list
        + struct.pack("!HH", 0xBEDE, 1)  # RFC 8285 one-byte extension profile, 1 word
        + b"\x10\xaa\x00\x00"
        + b"voice"
        + b"\x00\x00\x03"  # padding: two zero octets and the count
    )
    packet = decode_rtp_untrusted(data)
    assert packet == RtpPacket(
        payload_type=0,
        sequence=0xFFFF,
        timestamp=0xDEADBEEF,
        ssrc=7,
        payload=b"voice",
        marker=True,
        csrcs=(11, 22),
        extension=(0xBEDE, b"\x10\xaa\x00\x00"),
        padding=3,
    )
    assert encode_rtp(packet) == data
    assert header_length_untrusted(data) == 12 + 8 + 8


def test_padding_octets_need_not_be_zero() -> None:
    data = bytes.fromhex("a06f0001000000a012345678") + b"ab" + b"\xff\x02"
    assert decode_rtp_untrusted(data).payload == b"ab"
    assert decode_rtp_untrusted(data).padding == 2


def test_padding_may_be_the_whole_payload() -> None:
    data = bytes.fromhex("a06f0001000000a012345678") + b"\x00\x00\x00\x04"
    packet = decode_rtp_untrusted(data)
    assert packet.payload == b""
    assert packet.padding == 4


def test_empty_extension_and_empty_payload() -> None:
    packet = RtpPacket(96, 5, 6, 7, b"", extension=(1, b""))
    data = encode_rtp(packet)
    assert len(data) == 16
    assert decode_rtp_untrusted(data) == packet


@pytest.mark.parametrize(
    "packet",
    [
        OPUS,
        RtpPacket(0, 0, 0, 0, b""),
        RtpPacket(127, 65535, 2**32 - 1, 2**32 - 1, b"x" * 1200, marker=True),
        RtpPacket(96, 9, 9, 9, b"p", csrcs=tuple(range(15))),
        RtpPacket(111, 9, 9, 9, b"p", extension=(0x1000, bytes(range(8))), padding=255),
        RtpPacket(111, 9, 9, 9, b"p", padding=1),
    ],
)
def test_rtp_round_trip(packet: RtpPacket) -> None:
    assert decode_rtp_untrusted(encode_rtp(packet)) == packet


HEADER = bytes.fromhex("806f0001000000a012345678")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(HEADER[:11], id="short-header"),
        pytest.param(bytes([0x40]) + HEADER[1:], id="version-1"),
        pytest.param(bytes([0xC0]) + HEADER[1:], id="version-3"),
        pytest.param(bytes([0x81]) + HEADER[1:], id="csrc-missing"),
        pytest.param(bytes([0x8F]) + HEADER[1:] + bytes(56), id="csrc-cut"),
        pytest.param(bytes([0x90]) + HEADER[1:], id="extension-header-missing"),
        pytest.param(bytes([0x90]) + HEADER[1:] + b"\x00\x01", id="extension-header-cut"),
        pytest.param(bytes([0x90]) + HEADER[1:] + b"\x00\x01\x00\x02" + bytes(4), id="ext-cut"),
        pytest.param(bytes([0xA0]) + HEADER[1:], id="padding-no-room"),
        pytest.param(bytes([0xA0]) + HEADER[1:] + b"ab\x00", id="padding-count-zero"),
        pytest.param(bytes([0xA0]) + HEADER[1:] + b"ab\x04", id="padding-too-long"),
        pytest.param(bytes([0x80, 0x80 | 72]) + HEADER[2:], id="rtcp-sr-lookalike"),
        pytest.param(bytes([0x80, 72]) + HEADER[2:], id="payload-type-72"),
        pytest.param(bytes([0x80, 64]) + HEADER[2:], id="payload-type-64"),
    ],
)
def test_strict_rejection(data: bytes) -> None:
    with pytest.raises(RtpError):
        decode_rtp_untrusted(data)


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(RtpPacket(128, 0, 0, 0, b""), id="pt-128"),
        pytest.param(RtpPacket(72, 0, 0, 0, b""), id="pt-rtcp-range"),
        pytest.param(RtpPacket(-1, 0, 0, 0, b""), id="pt-negative"),
        pytest.param(RtpPacket(0, 65536, 0, 0, b""), id="seq"),
        pytest.param(RtpPacket(0, 0, 2**32, 0, b""), id="timestamp"),
        pytest.param(RtpPacket(0, 0, 0, -1, b""), id="ssrc"),
        pytest.param(RtpPacket(0, 0, 0, 0, b"", csrcs=tuple(range(16))), id="16-csrcs"),
        pytest.param(RtpPacket(0, 0, 0, 0, b"", csrcs=(2**32,)), id="csrc-range"),
        pytest.param(RtpPacket(0, 0, 0, 0, b"", extension=(0, b"abc")), id="ext-unaligned"),
        pytest.param(RtpPacket(0, 0, 0, 0, b"", extension=(65536, b"")), id="ext-profile"),
        pytest.param(RtpPacket(0, 0, 0, 0, b"", padding=256), id="padding"),
    ],
)
def test_encode_refuses_invalid_packets(packet: RtpPacket) -> None:
    with pytest.raises(LocalError):
        encode_rtp(packet)


def test_rtp_error_is_remote_error() -> None:
    assert issubclass(RtpError, RemoteError)


# ------------------------------------------------------------------ demultiplexing


@pytest.mark.parametrize(
    ("data", "media", "control"),
    [
        pytest.param(encode_rtp(OPUS), True, False, id="rtp-opus"),
        pytest.param(
            encode_rtp(RtpPacket(111, 0, 0, 0, b"", marker=True)), True, False, id="rtp-opus-marker"
        ),
        pytest.param(encode_rtcp([ReceiverReport(1)]), True, True, id="rtcp-rr"),
        pytest.param(encode_rtcp([SenderReport(1, 2, 3, 4, 5)]), True, True, id="rtcp-sr"),
        pytest.param(bytes.fromhex("000100002112a442") + bytes(12), False, False, id="stun"),
        pytest.param(bytes([22, 0xFE, 0xFD]), False, False, id="dtls"),
        pytest.param(bytes([0xC0, 200]), False, False, id="first-byte-192"),
        pytest.param(bytes([0x80]), True, False, id="one-byte"),
        pytest.param(b"", False, False, id="empty"),
    ],
)
def test_demultiplexing(data: bytes, media: bool, control: bool) -> None:
    assert is_rtp_or_rtcp(data) is media
    assert is_rtcp(data) is control


# ------------------------------------------------------------------ RTCP (RFC 3550 §6.4)

BLOCK = ReportBlock(
    ssrc=0x11223344,
    fraction_lost=64,
    cumulative_lost=-3,
    highest_seq=0x0001_0005,
    jitter=120,
    lsr=0xAABBCCDD,
    dlsr=65536,
)
SR = SenderReport(
    ssrc=0x12345678,
    ntp_timestamp=0xE8A1_B2C3_8000_0000,
    rtp_timestamp=160_000,
    packet_count=1000,
    octet_count=160_000,
    reports=(BLOCK,),
)


def test_sender_report_by_hand() -> None:
    data = encode_rtcp([SR])
    expected = (
        bytes([0x81, 200])
        + struct.pack("!H", 12)  # V=2 RC=1 PT=SR, 13 words - 1
        + struct.pack("!IQIII", 0x12345678, 0xE8A1_B2C3_8000_0000, 160_000, 1000, 160_000)
        + struct.pack("!IB", 0x11223344, 64)
        + b"\xff\xff\xfd"  # -3 as 24-bit two's complement
        + struct.pack("!IIII", 0x0001_0005, 120, 0xAABBCCDD, 65536)
    )
    assert data == expected
    assert decode_rtcp_untrusted(expected) == [SR]


def test_receiver_report_by_hand() -> None:
    data = bytes([0x80, 201, 0, 1]) + struct.pack("!I", 99)
    assert decode_rtcp_untrusted(data) == [ReceiverReport(99)]
    assert encode_rtcp([ReceiverReport(99)]) == data


def sdes_cname(ssrc: int, cname: bytes) -> bytes:
    chunk = struct.pack("!I", ssrc) + bytes([1, len(cname)]) + cname + b"\x00"
    chunk += bytes(-len(chunk) % 4)
    return bytes([0x81, 202]) + struct.pack("!H", len(chunk) // 4) + chunk


def test_compound_round_trip_and_unknown_types_skipped() -> None:
    rr = ReceiverReport(5, (BLOCK, BLOCK))
    bye = bytes([0x81, 203, 0, 1]) + struct.pack("!I", 5)
    data = encode_rtcp([SR]) + sdes_cname(0x12345678, b"alice@punchline") + bye
    assert decode_rtcp_untrusted(data) == [SR]
    data = encode_rtcp([rr, SR]) + sdes_cname(5, b"x")
    assert decode_rtcp_untrusted(data) == [rr, SR]


def test_full_report_counts_and_limits() -> None:
    blocks = tuple(
        ReportBlock(i, 255, -(2**23), 2**32 - 1, 2**32 - 1, 0, 2**32 - 1) for i in range(31)
    )
    packets: list[SenderReport | ReceiverReport] = [
        SenderReport(2**32 - 1, 2**64 - 1, 0, 0, 0, blocks),
        ReceiverReport(0, blocks),
        ReceiverReport(1, (ReportBlock(1, 0, 2**23 - 1, 0, 0, 0, 0),)),
    ]
    assert decode_rtcp_untrusted(encode_rtcp(packets)) == packets


def test_padding_on_the_last_packet_and_profile_extension() -> None:
    sr = bytearray(encode_rtcp([SenderReport(1, 2, 3, 4, 5)]))
    sr[2:4] = struct.pack("!H", 7)  # one extra word of profile-specific extension
    sr += b"EXT!"
    rr = bytes([0xA0, 201, 0, 2]) + struct.pack("!I", 9) + b"\x00\x00\x00\x04"
    assert decode_rtcp_untrusted(bytes(sr) + rr) == [
        SenderReport(1, 2, 3, 4, 5),
        ReceiverReport(9),
    ]


RR = encode_rtcp([ReceiverReport(9)])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(RR[:3], id="cut-header"),
        pytest.param(RR[:-1], id="cut-body"),
        pytest.param(RR + b"\x80", id="trailing-byte"),
        pytest.param(RR + RR[:4], id="second-packet-cut"),
        pytest.param(bytes([0x40]) + RR[1:], id="version-1"),
        pytest.param(bytes([0x80, 111]) + RR[2:], id="rtp-payload-type"),
        pytest.param(bytes([0x80, 224]) + RR[2:], id="type-224"),
        pytest.param(bytes([0x81]) + RR[1:], id="block-missing"),
        pytest.param(bytes([0x80, 200, 0, 1]) + bytes(4), id="sr-too-short"),
        pytest.param(bytes([0xA0]) + RR[1:] + RR, id="padding-not-last"),
        pytest.param(bytes([0xA0, 201, 0, 1]) + bytes(4), id="padding-count-zero"),
        pytest.param(bytes([0xA0, 201, 0, 1]) + b"\x00\x00\x00\x09", id="padding-too-long"),
        pytest.param(bytes([0xA0, 201, 0, 0]), id="padding-empty-body"),
    ],
)
def test_rtcp_strict_rejection(data: bytes) -> None:
    with pytest.raises(RtpError):
        decode_rtcp_untrusted(data)


@pytest.mark.parametrize(
    "packets",
    [
        pytest.param([], id="empty"),
        pytest.param([ReceiverReport(1, (BLOCK,) * 32)], id="32-blocks"),
        pytest.param([ReceiverReport(2**32)], id="ssrc"),
        pytest.param([SenderReport(1, 2**64, 0, 0, 0)], id="ntp"),
        pytest.param([SenderReport(1, 0, 0, -1, 0)], id="packet-count"),
        pytest.param([ReceiverReport(1, (ReportBlock(1, 256, 0, 0, 0, 0, 0),))], id="fraction"),
        pytest.param([ReceiverReport(1, (ReportBlock(1, 0, 2**23, 0, 0, 0, 0),))], id="lost"),
        pytest.param([ReceiverReport(1, (ReportBlock(1, 0, 0, 0, 0, 0, -1),))], id="dlsr"),
    ],
)
def test_encode_rtcp_refuses_invalid(packets: list[SenderReport | ReceiverReport]) -> None:
    with pytest.raises(LocalError):
        encode_rtcp(packets)


# ------------------------------------------------------------------ index estimation


def test_first_number_sets_the_base() -> None:
    t = SequenceTracker()
    assert t.extend(40_000) == 40_000
    assert t.extend(40_001) == 40_001


def test_wraparound_in_order() -> None:
    t = SequenceTracker()
    assert [t.extend(s) for s in (65534, 65535, 0, 1)] == [65534, 65535, 65536, 65537]


def test_reordering_across_the_boundary() -> None:
    t = SequenceTracker()
    got = [t.extend(s) for s in (65533, 0, 65535, 1, 65534, 2)]
    assert got == [65533, 65536, 65535, 65537, 65534, 65538]
    assert t.highest == 65538


def test_late_packet_from_before_a_rollover() -> None:
    t = SequenceTracker()
    for s in (65000, 65535, 0, 100, 20_000, 40_000):
        t.extend(s)
    assert t.highest == 65536 + 40_000
    assert t.extend(65_500) == 65_500 + 65536  # ahead: 25,500 away, not 40,036 behind
    assert t.extend(50_000) == 50_000 + 65536  # late
    assert t.extend(10) == 2 * 65536 + 10  # ahead of 65,500 across the next rollover
    assert t.extend(65_535) == 65_535 + 65536  # late, from before that rollover


def test_many_rollovers() -> None:
    t = SequenceTracker()
    for i in range(5 * 65536 + 17):
        assert t.extend(i & 0xFFFF) == i


def test_estimate_does_not_move_the_state() -> None:
    t = SequenceTracker()
    t.extend(65535)
    assert t.estimate(0) == 65536
    assert t.highest == 65535
    assert t.estimate(65530) == 65530
    t.update(65536)
    assert t.highest == 65536
    t.update(3)
    assert t.highest == 65536


def test_packet_from_before_the_first_is_placed_at_period_zero() -> None:
    t = SequenceTracker()
    t.extend(100)
    assert t.estimate(99) == 99
    assert t.estimate(40_000) == 40_000  # ROC - 1 would be negative


@pytest.mark.parametrize("seq", [-1, 65536])
def test_tracker_refuses_out_of_range(seq: int) -> None:
    with pytest.raises(LocalError):
        SequenceTracker().extend(seq)


def test_random_initial_sequence_is_in_the_lower_half() -> None:
    assert random_initial_sequence(lambda n: b"\xff" * n) == 0x7FFF
    assert random_initial_sequence(lambda n: b"\x00" * n) == 0
    assert 0 <= random_initial_sequence() < 0x8000


# ------------------------------------------------------------------ secure RTP

KEYS_A = SessionKeys(send=bytes(range(32)), receive=bytes(range(32, 64)), session_id=b"S" * 8)
KEYS_B = SessionKeys(send=KEYS_A.receive, receive=KEYS_A.send, session_id=KEYS_A.session_id)


def pair() -> tuple[SecureRtp, SecureRtp]:
    return SecureRtp(KEYS_A), SecureRtp(KEYS_B)


def voice(
    seq: int,
    payload: bytes = b"opus frame",
    csrcs: tuple[int, ...] = (),
    extension: tuple[int, bytes] | None = None,
    padding: int = 0,
) -> RtpPacket:
    timestamp = seq * 960 % 2**32
    return RtpPacket(
        OPUS_PAYLOAD_TYPE, seq, timestamp, 0xCAFE, payload, False, csrcs, extension, padding
    )


def test_secure_rtp_round_trip_both_ways() -> None:
    a, b = pair()
    packet = voice(7, csrcs=(1, 2), extension=(0xBEDE, b"\x10\x01\x00\x00"), padding=4)
    protected = a.protect_rtp(packet)
    assert b.unprotect_rtp_untrusted(protected) == packet
    reply = RtpPacket(OPUS_PAYLOAD_TYPE, 1, 0, 0xBEEF, b"hi back")
    assert a.unprotect_rtp_untrusted(b.protect_rtp(reply)) == reply


def test_header_in_clear_payload_encrypted() -> None:
    a, _ = pair()
    packet = voice(7, payload=b"secret voice")
    clear = encode_rtp(packet)
    protected = a.protect_rtp(packet)
    assert protected[:12] == clear[:12]
    assert b"secret voice" not in protected
    assert len(protected) == len(clear) + 16
    assert decode_rtp_untrusted(protected).sequence == 7  # relays can still read the header


@pytest.mark.parametrize("index", [0, 1, 5, 11, 12, 20, -1])
def test_any_flipped_byte_is_forged(index: int) -> None:
    a, b = pair()
    protected = bytearray(a.protect_rtp(voice(7)))
    protected[index] ^= 0x01
    with pytest.raises((ForgedPacket, RtpError)):
        b.unprotect_rtp_untrusted(bytes(protected))


def test_flipped_header_field_is_forged_not_misread() -> None:
    a, b = pair()
    protected = bytearray(a.protect_rtp(voice(7)))
    protected[1] ^= 0x80  # marker bit: a valid header, but not the authenticated one
    with pytest.raises(ForgedPacket):
        b.unprotect_rtp_untrusted(bytes(protected))


def test_secure_rtp_replay() -> None:
    a, b = pair()
    protected = a.protect_rtp(voice(7))
    b.unprotect_rtp_untrusted(protected)
    with pytest.raises(ReplayedPacket):
        b.unprotect_rtp_untrusted(protected)


def test_secure_rtp_wrong_keys() -> None:
    a, _ = pair()
    stranger = SecureRtp(SessionKeys(bytes(32), bytes(32), b"S" * 8))
    with pytest.raises(ForgedPacket):
        stranger.unprotect_rtp_untrusted(a.protect_rtp(voice(7)))
    own = SecureRtp(KEYS_A)  # the same side's keys: its receive key is not the sender's
    with pytest.raises(ForgedPacket):
        own.unprotect_rtp_untrusted(a.protect_rtp(voice(8)))


def test_secure_rtp_across_rollover_with_reordering() -> None:
    a, b = pair()
    sealed = {s: a.protect_rtp(voice(s)) for s in (65533, 65534, 65535, 0, 1, 2)}
    for s in (65533, 0, 65535, 65534, 2, 1):
        assert b.unprotect_rtp_untrusted(sealed[s]).sequence == s
    for data in sealed.values():
        with pytest.raises(ReplayedPacket):
            b.unprotect_rtp_untrusted(data)


def test_lost_first_packets_do_not_break_the_stream() -> None:
    a, b = pair()
    sealed = [a.protect_rtp(voice(s)) for s in range(1000, 1100)]
    for data in sealed[50:]:
        b.unprotect_rtp_untrusted(data)
    assert b.unprotect_rtp_untrusted(sealed[49]).sequence == 1049  # late, still in the window


def test_forged_far_ahead_packet_does_not_derail_the_receiver() -> None:
    a, b = pair()
    b.unprotect_rtp_untrusted(a.protect_rtp(voice(10)))
    forged = bytearray(a.protect_rtp(voice(11)))
    forged[2:4] = (40_000).to_bytes(2, "big")
    with pytest.raises(ForgedPacket):
        b.unprotect_rtp_untrusted(bytes(forged))
    assert b.unprotect_rtp_untrusted(a.protect_rtp(voice(12))).sequence == 12


def test_sender_keeps_one_ssrc_and_increasing_sequence() -> None:
    a, _ = pair()
    a.protect_rtp(voice(7))
    with pytest.raises(LocalError):
        a.protect_rtp(RtpPacket(OPUS_PAYLOAD_TYPE, 8, 0, 0xBAD, b""))
    with pytest.raises(LocalError):
        a.protect_rtp(voice(7))  # same index twice would reuse the nonce
    a.protect_rtp(voice(8))


def test_rtcp_given_to_rtp_side_is_refused() -> None:
    a, b = pair()
    with pytest.raises(RtpError):
        b.unprotect_rtp_untrusted(a.protect_rtcp(RR))


def test_secure_rtcp_round_trip_trailer_and_replay() -> None:
    a, b = pair()
    compound = encode_rtcp([SR]) + sdes_cname(0x12345678, b"alice")
    first = a.protect_rtcp(compound)
    second = a.protect_rtcp(compound)
    assert first[:8] == compound[:8]  # header and sender SSRC in clear
    assert first[-4:] == bytes([0x80, 0, 0, 0])  # E bit set, index 0
    assert second[-4:] == bytes([0x80, 0, 0, 1])
    assert len(first) == len(compound) + 16 + 4
    assert is_rtcp(first)
    assert b.unprotect_rtcp_untrusted(second) == compound
    assert b.unprotect_rtcp_untrusted(first) == compound  # reordered: fine
    with pytest.raises(ReplayedPacket):
        b.unprotect_rtcp_untrusted(first)
    assert decode_rtcp_untrusted(b.unprotect_rtcp_untrusted(a.protect_rtcp(compound))) == [SR]


@pytest.mark.parametrize("index", [0, 4, 8, 20, -5, -1])
def test_secure_rtcp_tamper(index: int) -> None:
    a, b = pair()
    protected = bytearray(a.protect_rtcp(RR))
    protected[index] ^= 0x01
    with pytest.raises((ForgedPacket, RtpError)):
        b.unprotect_rtcp_untrusted(bytes(protected))


def test_secure_rtcp_refuses_clear_e_bit_and_short_packets() -> None:
    a, b = pair()
    protected = bytearray(a.protect_rtcp(RR))
    protected[-4] &= 0x7F
    with pytest.raises(RtpError, match="E bit"):
        b.unprotect_rtcp_untrusted(bytes(protected))
    with pytest.raises(RtpError):
        b.unprotect_rtcp_untrusted(RR)


def test_rtp_and_rtcp_keys_differ() -> None:
    a, b = pair()
    # an SRTP packet re-labelled as SRTCP: same key material underneath, but not the same key
    protected = a.protect_rtp(voice(0))
    fake = bytes([0x80, 201]) + protected[2:] + bytes([0x80, 0, 0, 0])
    with pytest.raises(ForgedPacket):
        b.unprotect_rtcp_untrusted(fake)


def test_protect_rtcp_refuses_non_rtcp() -> None:
    a, _ = pair()
    with pytest.raises(LocalError):
        a.protect_rtcp(encode_rtp(voice(1)))
    with pytest.raises(LocalError):
        a.protect_rtcp(RR[:4])


# ------------------------------------------------------------------ fuzzing

rtp_packets = st.builds(
    RtpPacket,
    payload_type=st.integers(0, 127).filter(lambda pt: not 64 <= pt <= 95),
    sequence=st.integers(0, 0xFFFF),
    timestamp=st.integers(0, 2**32 - 1),
    ssrc=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=64),
    marker=st.booleans(),
    csrcs=st.lists(st.integers(0, 2**32 - 1), max_size=15).map(tuple),
    extension=st.none()
    | st.tuples(
        st.integers(0, 0xFFFF), st.binary(max_size=12).map(lambda b: b + bytes(-len(b) % 4))
    ),
    padding=st.integers(0, 255),
)
u32 = st.integers(0, 2**32 - 1)
blocks = st.lists(
    st.builds(
        ReportBlock, u32, st.integers(0, 255), st.integers(-(2**23), 2**23 - 1), u32, u32, u32, u32
    ),
    max_size=3,
).map(tuple)
rtcp_packets = st.lists(
    st.one_of(
        st.builds(SenderReport, u32, st.integers(0, 2**64 - 1), u32, u32, u32, blocks),
        st.builds(ReceiverReport, u32, blocks),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(rtp_packets)
def test_rtp_round_trip_fuzz(packet: RtpPacket) -> None:
    data = encode_rtp(packet)
    assert decode_rtp_untrusted(data) == packet
    assert is_rtp_or_rtcp(data)
    assert not is_rtcp(data)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=80), st.binary(max_size=60).map(lambda b: b"\x80" + b)))
def test_decode_rtp_only_raises_rtp_error(data: bytes) -> None:
    try:
        packet = decode_rtp_untrusted(data)
    except RtpError:
        return
    # whatever decodes re-encodes to a packet that decodes the same
    assert decode_rtp_untrusted(encode_rtp(packet)) == packet


@settings(max_examples=200, deadline=None)
@given(rtcp_packets)
def test_rtcp_round_trip_fuzz(packets: list[SenderReport | ReceiverReport]) -> None:
    data = encode_rtcp(packets)
    assert decode_rtcp_untrusted(data) == packets
    assert is_rtcp(data)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=120), st.binary(max_size=100).map(lambda b: b"\x81\xc9" + b)))
def test_decode_rtcp_only_raises_rtp_error(data: bytes) -> None:
    with contextlib.suppress(RtpError):
        decode_rtcp_untrusted(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=50))
def test_tracker_is_consistent_with_the_16_bit_number(seqs: list[int]) -> None:
    t = SequenceTracker()
    previous = None
    for s in seqs:
        index = t.extend(s)
        assert index >= 0
        assert index & 0xFFFF == s
        if previous is not None:
            assert abs(index - previous) <= 0x8000 + 0x10000  # never a wild jump
        previous = t.highest


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_unprotect_only_raises_rtp_or_packet_error(data: bytes) -> None:
    _, b = pair()
    with contextlib.suppress(RtpError, PacketError):
        b.unprotect_rtp_untrusted(data)
    with contextlib.suppress(RtpError, PacketError):
        b.unprotect_rtcp_untrusted(data)


@settings(max_examples=200, deadline=None)
@given(packet=rtp_packets, index=st.integers(0, 200), mask=st.integers(1, 255))
def test_flipped_secure_rtp_never_opens(packet: RtpPacket, index: int, mask: int) -> None:
    a, b = pair()
    protected = bytearray(a.protect_rtp(packet))
    protected[index % len(protected)] ^= mask
    with pytest.raises((RtpError, PacketError)):
        b.unprotect_rtp_untrusted(bytes(protected))
