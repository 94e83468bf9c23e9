"""Framing of punchline's own session packets, next to STUN and RTP on the same UDP port.

The first byte tells the three apart (RFC 7983 demultiplexing): STUN uses 0-3, RTP/RTCP
128-191, and punchline sessions 0x50-0x53 ("P".."S"), a range no standard protocol claims.

- HELLO (client → server) and WELCOME (server → client) carry the JSON handshake messages of
  `crypto.handshake`; REFUSED says why a HELLO was not accepted.
- SEALED carries one encrypted message: type, 8-byte session id, 8-byte packet index, then the
  ChaCha20-Poly1305 ciphertext. The 17 header bytes are the AEAD's associated data.

Over TCP and TLS the same packets travel with a two-byte big-endian length in front.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from punchline.errors import RemoteError
from punchline.util.jsontext import loads_object_untrusted

HELLO, WELCOME, SEALED, REFUSED = 0x50, 0x51, 0x52, 0x53
SEALED_HEADER = struct.Struct("!B8sQ")
MAX_PACKET = 4096
MAX_FRAME = 65535


class SessionPacketError(RemoteError):
    """A datagram or frame that is not a well-formed session packet."""


@dataclass(frozen=True)
class Hello:
    hello: dict[str, Any]


@dataclass(frozen=True)
class Welcome:
    answer: dict[str, Any]


@dataclass(frozen=True)
class Refused:
    reason: str


@dataclass(frozen=True)
class Sealed:
    session_id: bytes
    index: int
    header: bytes
    ciphertext: bytes


Packet = Hello | Welcome | Refused | Sealed


def is_session(data: bytes) -> bool:
    return len(data) > 0 and HELLO <= data[0] <= REFUSED


def _json(kind: int, value: dict[str, Any]) -> bytes:
    return bytes([kind]) + json.dumps(value, separators=(",", ":")).encode()


def encode_hello(hello: dict[str, Any]) -> bytes:
    return _json(HELLO, hello)


def encode_welcome(answer: dict[str, Any]) -> bytes:
    return _json(WELCOME, answer)


def encode_refused(reason: str) -> bytes:
    return _json(REFUSED, {"reason": reason[:200]})


def sealed_header(session_id: bytes, index: int) -> bytes:
    return SEALED_HEADER.pack(SEALED, session_id, index)


def encode_sealed(header: bytes, ciphertext: bytes) -> bytes:
    return header + ciphertext


def _decode_json(body: bytes) -> dict[str, Any]:
    try:
        return loads_object_untrusted(body)
    except ValueError as exc:
        raise SessionPacketError(f"session packet body {exc}") from exc


def decode_untrusted(data: bytes) -> Packet:
    """Parse one packet; only `SessionPacketError` escapes."""
    if not is_session(data) or len(data) > MAX_PACKET:
        raise SessionPacketError("not a punchline session packet")
    kind = data[0]
    if kind == SEALED:
        if len(data) < SEALED_HEADER.size + 16:
            raise SessionPacketError("sealed packet too short")
        _, session_id, index = SEALED_HEADER.unpack_from(data)
        return Sealed(session_id, index, data[: SEALED_HEADER.size], data[SEALED_HEADER.size :])
    body = _decode_json(data[1:])
    if kind == HELLO:
        return Hello(body)
    if kind == WELCOME:
        return Welcome(body)
    reason = body.get("reason")
    return Refused(reason if isinstance(reason, str) else "refused")


class FrameDecoder:
    """Splits a TCP byte stream into packets: 2-byte length prefix, then the packet."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= 2:
            length = int.from_bytes(self._buffer[:2], "big")
            if length == 0:
                raise SessionPacketError("empty frame")
            if len(self._buffer) < 2 + length:
                break
            frames.append(bytes(self._buffer[2 : 2 + length]))
            del self._buffer[: 2 + length]
        return frames


def frame(packet: bytes) -> bytes:
    if len(packet) > MAX_FRAME:
        raise ValueError("packet too large for a frame")
    return len(packet).to_bytes(2, "big") + packet
