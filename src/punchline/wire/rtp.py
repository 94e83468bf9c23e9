"""RTP and RTCP (RFC 3550) codecs, and their end-to-end protection.

Why RTP: it is what every voice stack, the PSTN gateway's SIP peers, and tools like Wireshark
speak, and its sequence numbers and timestamps are what a jitter buffer needs. We carry Opus
(RFC 7587) under the dynamic payload type 111 and send RTP, RTCP, STUN and everything else on
one port, so packets are told apart by their first two bytes (RFC 7983, RFC 5761 §4); RTP
payload types 64-95 would look like RTCP and are refused.

The codecs are strict: they refuse anything RFC 3550 does not allow rather than guess, and the
`*_untrusted` functions raise only `RtpError`. `SecureRtp` is SRTP's AEAD mode (RFC 7714)
with ChaCha20-Poly1305 from `crypto.packets` and keys from `crypto.handshake`: the RTP header
stays in clear as associated data so relays and the jitter buffer can read it, the payload is
encrypted, and the packet index is the sequence number extended by the rollover counter
(RFC 3711 §3.3.1). SRTCP carries its index explicitly in a 4-byte trailer (RFC 3711 §3.4).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from punchline.errors import LocalError, RemoteError

VERSION = 2
OPUS_PAYLOAD_TYPE = 111
HEADER_BYTES = 12
MAX_CSRCS = 15
RTCP_SR = 200
RTCP_RR = 201
MAX_REPORT_BLOCKS = 31
SRTCP_E_BIT = 0x8000_0000
MAX_SRTCP_INDEX = 0x7FFF_FFFF

_U32 = 2**32
_RTCP_RANGE = range(192, 224)  # RFC 5761 §4: the second byte of RTCP, as the PT field of RTP
_RTCP_LIKE_PAYLOAD_TYPES = range(64, 96)  # with the marker bit these collide with RTCP types
_BLOCK = struct.Struct("!IB3sIIII")
_SR_INFO = struct.Struct("!IQIII")


class RtpError(RemoteError):
    """RTP or RTCP bytes that break RFC 3550 (or our single-port profile of it)."""


# ------------------------------------------------------------------ demultiplexing


def is_rtp_or_rtcp(data: bytes) -> bool:
    """RFC 7983 §7: on a shared port, a first byte of 128..191 means RTP or RTCP."""
    return len(data) >= 1 and 128 <= data[0] <= 191


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 §4: RTP/RTCP whose second byte is 192..223 is RTCP (SR 200, RR 201, ...)."""
    return is_rtp_or_rtcp(data) and len(data) >= 2 and data[1] in _RTCP_RANGE


# ------------------------------------------------------------------ RTP


@dataclass(frozen=True)
class RtpPacket:
    """One RTP packet (RFC 3550 §5.1).

    `extension` is (profile-defined 16 bits, data whose length is a multiple of 4);
    `padding` is the number of padding octets including the final count octet (0 = none).
    """

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    extension: tuple[int, bytes] | None = None
    padding: int = 0


def _check_u32(value: int, what: str) -> None:
    if not 0 <= value < _U32:
        raise LocalError(f"{what} must be a 32-bit unsigned integer, got {value}")


def _check_rtp(p: RtpPacket) -> None:
    if not 0 <= p.payload_type <= 127:
        raise LocalError(f"payload type must be 0..127, got {p.payload_type}")
    if p.payload_type in _RTCP_LIKE_PAYLOAD_TYPES:
        raise LocalError("payload types 64-95 collide with RTCP on a shared port (RFC 5761 §4)")
    if not 0 <= p.sequence <= 0xFFFF:
        raise LocalError(f"sequence number must be 16 bits, got {p.sequence}")
    _check_u32(p.timestamp, "timestamp")
    _check_u32(p.ssrc, "SSRC")
    if len(p.csrcs) > MAX_CSRCS:
        raise LocalError(f"at most {MAX_CSRCS} CSRCs fit an RTP header")
    for csrc in p.csrcs:
        _check_u32(csrc, "CSRC")
    if p.extension is not None:
        profile, data = p.extension
        if not 0 <= profile <= 0xFFFF or len(data) % 4 or len(data) // 4 > 0xFFFF:
            raise LocalError("header extension: 16-bit profile, data a multiple of 4 bytes")
    if not 0 <= p.padding <= 255:
        raise LocalError(f"padding must be 0..255 octets, got {p.padding}")


def encode_rtp(p: RtpPacket) -> bytes:
    """Serialise per RFC 3550 §5.1; padding octets are zeros followed by their count."""
    _check_rtp(p)
    first = (VERSION << 6) | (0x20 if p.padding else 0) | (0x10 if p.extension else 0)
    first |= len(p.csrcs)
    second = (0x80 if p.marker else 0) | p.payload_type
    parts = [struct.pack("!BBHII", first, second, p.sequence, p.timestamp, p.ssrc)]
    parts += [c.to_bytes(4, "big") for c in p.csrcs]
    if p.extension is not None:
        profile, data = p.extension
        parts += [struct.pack("!HH", profile, len(data) // 4), data]
    parts.append(p.payload)
    if p.padding:
        parts.append(bytes(p.padding - 1) + bytes([p.padding]))
    return b"".join(parts)


def header_length_untrusted(data: bytes) -> int:
    """Length of the fixed header, CSRCs and header extension; what precedes the payload."""
    if len(data) < HEADER_BYTES:
        raise RtpError(f"RTP packet of {len(data)} bytes is shorter than the 12-byte header")
    if data[0] >> 6 != VERSION:
        raise RtpError(f"RTP version must be 2, got {data[0] >> 6}")
    length = HEADER_BYTES + 4 * (data[0] & 0x0F)
    if data[0] & 0x10:  # X: a header extension follows the CSRCs (RFC 3550 §5.3.1)
        if len(data) < length + 4:
            raise RtpError("RTP header extension is cut short")
        length += 4 + 4 * int.from_bytes(data[length + 2 : length + 4], "big")
    if len(data) < length:
        raise RtpError("RTP header (CSRC list or extension) runs past the end of the packet")
    return length


def decode_rtp_untrusted(data: bytes) -> RtpPacket:
    """Parse one RTP packet; only `RtpError` escapes."""
    length = header_length_untrusted(data)
    if is_rtcp(data):
        raise RtpError("this is an RTCP packet, not RTP (RFC 5761 §4)")
    payload_type = data[1] & 0x7F
    if payload_type in _RTCP_LIKE_PAYLOAD_TYPES:
        raise RtpError("payload types 64-95 are not used on a shared port (RFC 5761 §4)")
    _, _, sequence, timestamp, ssrc = struct.unpack_from("!BBHII", data)
    count = data[0] & 0x0F
    csrcs = struct.unpack_from(f"!{count}I", data, HEADER_BYTES)
    extension = None
    if data[0] & 0x10:
        start = HEADER_BYTES + 4 * count
        profile = int.from_bytes(data[start : start + 2], "big")
        extension = (profile, data[start + 4 : length])
    end = len(data)
    padding = 0
    if data[0] & 0x20:  # P: the last octet counts the padding, itself included (§5.1)
        padding = data[-1] if end > length else 0
        if not 0 < padding <= end - length:
            raise RtpError(f"RTP padding count {padding} does not fit the packet")
        end -= padding
    return RtpPacket(
        payload_type=payload_type,
        sequence=sequence,
        timestamp=timestamp,
        ssrc=ssrc,
        payload=data[length:end],
        marker=bool(data[1] & 0x80),
        csrcs=tuple(csrcs),
        extension=extension,
        padding=padding,
    )


# ------------------------------------------------------------------ RTCP


@dataclass(frozen=True)
class ReportBlock:
    """Reception statistics about one source (RFC 3550 §6.4.1)."""

    ssrc: int
    fraction_lost: int  # fixed point, lost/expected * 256, 0..255
    cumulative_lost: int  # signed 24-bit: duplicates can make it negative
    highest_seq: int  # extended highest sequence number received
    jitter: int
    lsr: int  # middle 32 bits of the NTP timestamp of the last SR received
    dlsr: int  # delay since that SR, in 1/65536 s


@dataclass(frozen=True)
class SenderReport:
    """RTCP SR, packet type 200 (RFC 3550 §6.4.1)."""

    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: tuple[ReportBlock, ...] = ()


@dataclass(frozen=True)
class ReceiverReport:
    """RTCP RR, packet type 201 (RFC 3550 §6.4.2)."""

    ssrc: int
    reports: tuple[ReportBlock, ...] = ()


def _encode_block(b: ReportBlock) -> bytes:
    for value, what in ((b.ssrc, "SSRC"), (b.highest_seq, "highest sequence")):
        _check_u32(value, what)
    for value, what in ((b.jitter, "jitter"), (b.lsr, "LSR"), (b.dlsr, "DLSR")):
        _check_u32(value, what)
    if not 0 <= b.fraction_lost <= 255:
        raise LocalError(f"fraction lost must be 0..255, got {b.fraction_lost}")
    if not -(2**23) <= b.cumulative_lost < 2**23:
        raise LocalError(f"cumulative lost must fit 24 signed bits, got {b.cumulative_lost}")
    lost = (b.cumulative_lost & 0xFFFFFF).to_bytes(3, "big")
    return _BLOCK.pack(b.ssrc, b.fraction_lost, lost, b.highest_seq, b.jitter, b.lsr, b.dlsr)


def _decode_block(data: bytes, offset: int) -> ReportBlock:
    ssrc, fraction, lost, highest, jitter, lsr, dlsr = _BLOCK.unpack_from(data, offset)
    cumulative = int.from_bytes(lost, "big", signed=True)
    return ReportBlock(ssrc, fraction, cumulative, highest, jitter, lsr, dlsr)


def encode_rtcp(packets: Sequence[SenderReport | ReceiverReport]) -> bytes:
    """A compound RTCP packet (RFC 3550 §6.1) of the given reports, in order, unpadded."""
    if not packets:
        raise LocalError("a compound RTCP packet needs at least one report")
    out = []
    for p in packets:
        if len(p.reports) > MAX_REPORT_BLOCKS:
            raise LocalError(f"at most {MAX_REPORT_BLOCKS} report blocks fit one RTCP packet")
        _check_u32(p.ssrc, "SSRC")
        if isinstance(p, SenderReport):
            if not 0 <= p.ntp_timestamp < 2**64:
                raise LocalError("NTP timestamp must be 64 bits")
            for value, what in (
                (p.rtp_timestamp, "RTP timestamp"),
                (p.packet_count, "packet count"),
                (p.octet_count, "octet count"),
            ):
                _check_u32(value, what)
            body = _SR_INFO.pack(
                p.ssrc, p.ntp_timestamp, p.rtp_timestamp, p.packet_count, p.octet_count
            )
            packet_type = RTCP_SR
        else:
            body = p.ssrc.to_bytes(4, "big")
            packet_type = RTCP_RR
        body += b"".join(_encode_block(b) for b in p.reports)
        first = (VERSION << 6) | len(p.reports)
        out.append(struct.pack("!BBH", first, packet_type, len(body) // 4) + body)
    return b"".join(out)


def _decode_report(packet_type: int, count: int, body: bytes) -> SenderReport | ReceiverReport:
    fixed = _SR_INFO.size if packet_type == RTCP_SR else 4
    if len(body) < fixed + count * _BLOCK.size:
        raise RtpError(f"RTCP packet type {packet_type} is too short for {count} report blocks")
    blocks = tuple(_decode_block(body, fixed + i * _BLOCK.size) for i in range(count))
    # anything after the blocks is a profile-specific extension (§6.4.1); we have none
    if packet_type == RTCP_RR:
        return ReceiverReport(ssrc=int.from_bytes(body[:4], "big"), reports=blocks)
    ssrc, ntp, rtp_ts, packets, octets = _SR_INFO.unpack_from(body)
    return SenderReport(ssrc, ntp, rtp_ts, packets, octets, blocks)


def decode_rtcp_untrusted(data: bytes) -> list[SenderReport | ReceiverReport]:
    """Parse a compound RTCP packet; SR and RR come back, other types are skipped.

    Checked as RFC 3550 Appendix A.2 suggests: every packet is version 2 with an RTCP packet
    type, the lengths add up to exactly the datagram, and only the last packet is padded.
    """
    if not data:
        raise RtpError("empty RTCP packet")
    reports: list[SenderReport | ReceiverReport] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 4:
            raise RtpError("RTCP packet ends inside a header")
        first, packet_type, words = struct.unpack_from("!BBH", data, offset)
        if first >> 6 != VERSION:
            raise RtpError(f"RTCP version must be 2, got {first >> 6}")
        if packet_type not in _RTCP_RANGE:
            raise RtpError(f"{packet_type} is not an RTCP packet type (RFC 5761 §4)")
        end = offset + 4 * (words + 1)
        if end > len(data):
            raise RtpError("RTCP length field runs past the end of the packet")
        body = data[offset + 4 : end]
        if first & 0x20:
            if end != len(data):
                raise RtpError("only the last packet of a compound RTCP packet may be padded")
            padding = body[-1] if body else 0
            if not 0 < padding <= len(body):
                raise RtpError(f"RTCP padding count {padding} does not fit the packet")
            body = body[:-padding]
        if packet_type in (RTCP_SR, RTCP_RR):
            reports.append(_decode_report(packet_type, first & 0x1F, body))
        offset = end
    return reports


# ------------------------------------------------------------------ sequence numbers


def random_initial_sequence(randbytes: Callable[[int], bytes] = os.urandom) -> int:
    """A random first sequence number below 2**15, as WebRTC stacks choose.

    RFC 3550 §5.1 wants it random; keeping it in the lower half means a receiver that misses
    the first packets still guesses the rollover counter right (RFC 3711 §3.3.1 assumes
    ROC = 0 at the first packet it sees).
    """
    return int.from_bytes(randbytes(2), "big") & 0x7FFF


class SequenceTracker:
    """Extends 16-bit RTP sequence numbers to 48-bit packet indexes (RFC 3711 §3.3.1).

    The first number seen is taken as rollover counter 0. A number is placed in the period
    (ROC - 1, ROC or ROC + 1) that puts it closest to the highest index so far, so reordering
    across 65535 -> 0 in either direction resolves correctly. A guess below zero (a packet
    apparently sent before the first one, at ROC 0) is placed at ROC 0 instead, the only
    period a sender can have used. `estimate` does not move the state, so a receiver can
    authenticate first and call `update` after, as RFC 3711 requires.
    """

    def __init__(self) -> None:
        self.highest: int | None = None

    def estimate(self, seq16: int) -> int:
        if not 0 <= seq16 <= 0xFFFF:
            raise LocalError(f"sequence number must be 16 bits, got {seq16}")
        if self.highest is None:
            return seq16
        roc, s_l = divmod(self.highest, 0x10000)
        if s_l < 0x8000:
            guess = roc - 1 if seq16 - s_l > 0x8000 else roc
        else:
            guess = roc + 1 if s_l - 0x8000 > seq16 else roc
        return seq16 + 0x10000 * max(guess, 0)

    def update(self, index: int) -> None:
        if self.highest is None or index > self.highest:
            self.highest = index

    def extend(self, seq16: int) -> int:
        index = self.estimate(seq16)
        self.update(index)
        return index
