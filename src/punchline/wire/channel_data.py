"""TURN ChannelData messages (RFC 8656 §12.4) and the framing of STUN and ChannelData on a stream.

ChannelData is the 4-byte-overhead way to carry a peer's datagram once a channel is bound:
channel number (0x4000-0x4FFF), length, data. Over UDP the length covers the datagram exactly
(padding may follow and is ignored); over TCP and TLS the message is padded to a multiple of 4
(§12.5) so the next message starts aligned, and the receiver must find message boundaries
itself: STUN says its length in its header, ChannelData in its own. `StreamDecoder` does that
for both ends of a TCP or TLS TURN connection. Stateless except for the decoder's buffer.
"""

from __future__ import annotations

import struct

from punchline.errors import LocalError
from punchline.wire.stun import HEADER_BYTES, StunError

MIN_CHANNEL = 0x4000
# RFC 8656 §12 narrowed channels to 0x4000-0x4FFF; RFC 5766 allowed up to 0x7FFF and deployed
# clients (coturn's turnutils_uclient among them) still pick numbers up there. Accepting the old
# range costs nothing: first bytes 0x50-0x7F belong to no protocol we multiplex (RFC 7983).
MAX_CHANNEL = 0x7FFF
CHANNEL_HEADER_BYTES = 4
# A TURN stream never carries a message longer than a STUN message can be (16-bit length).
MAX_STREAM_MESSAGE = HEADER_BYTES + 0xFFFF


class ChannelDataError(StunError):
    """Bytes that claim to be ChannelData are not a valid ChannelData message."""


def is_channel_data(data: bytes) -> bool:
    """RFC 7983 demultiplexing: first byte 64-79 is TURN ChannelData (and 80-127 for RFC 5766's
    wider channel range, see MAX_CHANNEL)."""
    return len(data) >= CHANNEL_HEADER_BYTES and 0x40 <= data[0] <= 0x7F


def valid_channel(channel: int) -> bool:
    return MIN_CHANNEL <= channel <= MAX_CHANNEL


def encode(channel: int, data: bytes, pad: bool = False) -> bytes:
    """A ChannelData message; `pad` for stream transports (RFC 8656 §12.5)."""
    if not valid_channel(channel):
        raise LocalError(f"channel numbers are 0x4000-0x7FFF, not {channel:#x}")
    if len(data) > 0xFFFF:
        raise LocalError("ChannelData carries at most 65535 bytes")
    message = struct.pack("!HH", channel, len(data)) + data
    return message + b"\0" * (-len(message) % 4) if pad else message


def decode_untrusted(data: bytes) -> tuple[int, bytes]:
    """(channel, application data) from one datagram; padding after the data is ignored."""
    if len(data) < CHANNEL_HEADER_BYTES:
        raise ChannelDataError("ChannelData shorter than its 4-byte header")
    channel, length = struct.unpack_from("!HH", data)
    if not valid_channel(channel):
        raise ChannelDataError(f"channel {channel:#x} is outside 0x4000-0x7FFF")
    if CHANNEL_HEADER_BYTES + length > len(data):
        raise ChannelDataError(f"ChannelData length {length} runs past the {len(data)} bytes")
    return channel, bytes(data[CHANNEL_HEADER_BYTES : CHANNEL_HEADER_BYTES + length])


class StreamDecoder:
    """Splits a TCP/TLS byte stream into whole STUN and ChannelData messages.

    Each message comes out as it would arrive in a UDP datagram (ChannelData without its stream
    padding), so one message handler serves every transport. Anything that is neither kind
    raises `StunError`: a stream cannot resynchronise after garbage, so the connection must be
    closed. The buffer never holds more than one maximal message plus one read.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        out: list[bytes] = []
        while len(self._buffer) >= CHANNEL_HEADER_BYTES:
            first = self._buffer[0]
            length = int.from_bytes(self._buffer[2:4], "big")
            if first <= 3:
                total = HEADER_BYTES + length
                take = total
            elif 0x40 <= first <= 0x7F:
                total = CHANNEL_HEADER_BYTES + length
                take = total + (-total % 4)
            else:
                raise StunError(f"byte {first:#04x} starts neither STUN nor ChannelData")
            if len(self._buffer) < take:
                break
            out.append(bytes(self._buffer[:total]))
            del self._buffer[:take]
        return out
