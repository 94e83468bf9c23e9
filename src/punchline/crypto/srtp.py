"""Secure RTP and RTCP for one call, keyed by the end-to-end handshake (RFC 7714 style).

Lives in `crypto` rather than `wire` because it keeps state (replay windows, rollover
counters) and holds keys; `wire.rtp` stays a stateless codec.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from punchline.crypto.handshake import KEY_BYTES, SessionKeys
from punchline.crypto.packets import TAG_BYTES, PacketCipher
from punchline.errors import LocalError
from punchline.wire.rtp import (
    MAX_SRTCP_INDEX,
    SRTCP_E_BIT,
    VERSION,
    RtpError,
    RtpPacket,
    SequenceTracker,
    decode_rtp_untrusted,
    encode_rtp,
    header_length_untrusted,
    is_rtcp,
)


def derive_keys(keys: SessionKeys, label: str) -> SessionKeys:
    """Keys for one purpose ("rtp", "rtcp"), so two ciphers never share a key and nonce.

    HKDF-SHA256 (RFC 5869) of each direction's key, salted with the session id; the same label
    on both ends keeps the initiator's `send` equal to the responder's `receive`.
    """

    def one(key: bytes) -> bytes:
        info = b"punchline/" + label.encode("ascii")
        return HKDF(hashes.SHA256(), KEY_BYTES, keys.session_id, info).derive(key)

    return SessionKeys(send=one(keys.send), receive=one(keys.receive), session_id=keys.session_id)


class SecureRtp:
    """Protects one RTP stream and its RTCP in each direction, RFC 7714 style.

    SRTP packet: RTP header (clear, associated data) || ChaCha20-Poly1305(payload || padding)
    with index = extended sequence number. SRTCP packet: first 8 octets (clear) ||
    ChaCha20-Poly1305(rest) || E-bit and 31-bit index; the associated data is the clear 8
    octets and the trailer (RFC 7714 §9.1). Each direction carries one SSRC: a second one
    would reuse indexes, and so nonces, under the same key.
    """

    def __init__(self, keys: SessionKeys, window: int = 1024) -> None:
        self._rtp = PacketCipher(derive_keys(keys, "rtp"), window)
        self._rtcp = PacketCipher(derive_keys(keys, "rtcp"), window)
        self._send_seq = SequenceTracker()
        self._receive_seq = SequenceTracker()
        self._send_ssrc: int | None = None
        self._receive_ssrc: int | None = None
        self._rtcp_next = 0

    def protect_rtp(self, packet: RtpPacket) -> bytes:
        if self._send_ssrc is None:
            self._send_ssrc = packet.ssrc
        elif packet.ssrc != self._send_ssrc:
            raise LocalError("one SecureRtp protects one SSRC; start a new session for another")
        clear = encode_rtp(packet)
        header = header_length_untrusted(clear)
        index = self._send_seq.estimate(packet.sequence)
        sealed = self._rtp.seal(index, clear[:header], clear[header:])
        self._send_seq.update(index)
        return clear[:header] + sealed

    def unprotect_rtp_untrusted(self, data: bytes) -> RtpPacket:
        """Authenticate, decrypt and parse; only `RtpError` and `PacketError` escape."""
        header = header_length_untrusted(data)
        if is_rtcp(data):
            raise RtpError("this is an RTCP packet, not RTP (RFC 5761 §4)")
        ssrc = int.from_bytes(data[8:12], "big")
        if self._receive_ssrc is not None and ssrc != self._receive_ssrc:
            raise RtpError(f"packet from SSRC {ssrc:#010x}, expected {self._receive_ssrc:#010x}")
        index = self._receive_seq.estimate(int.from_bytes(data[2:4], "big"))
        plaintext = self._rtp.open_untrusted(index, data[:header], data[header:])
        self._receive_seq.update(index)
        self._receive_ssrc = ssrc
        return decode_rtp_untrusted(data[:header] + plaintext)

    def protect_rtcp(self, data: bytes) -> bytes:
        if len(data) < 8 or not is_rtcp(data):
            raise LocalError("protect_rtcp needs an RTCP packet of at least 8 bytes")
        if self._rtcp_next > MAX_SRTCP_INDEX:
            raise LocalError("SRTCP index exhausted; rekey with a new handshake")
        index = self._rtcp_next
        trailer = (SRTCP_E_BIT | index).to_bytes(4, "big")
        sealed = self._rtcp.seal(index, data[:8] + trailer, data[8:])
        self._rtcp_next += 1
        return data[:8] + sealed + trailer

    def unprotect_rtcp_untrusted(self, data: bytes) -> bytes:
        """Authenticate and decrypt a compound RTCP packet; only `RtpError`/`PacketError`."""
        if len(data) < 8 + TAG_BYTES + 4 or not is_rtcp(data) or data[0] >> 6 != VERSION:
            raise RtpError("not a protected RTCP packet (too short or wrong header)")
        trailer = data[-4:]
        word = int.from_bytes(trailer, "big")
        if not word & SRTCP_E_BIT:
            raise RtpError("unencrypted SRTCP (E bit clear) is not accepted")
        clear = data[:8]
        plaintext = self._rtcp.open_untrusted(word & MAX_SRTCP_INDEX, clear + trailer, data[8:-4])
        return clear + plaintext
