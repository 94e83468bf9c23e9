"""STUN messages (RFC 8489) with the attributes of NAT behaviour discovery (RFC 5780) and TURN
(RFC 8656): a strict, stateless codec.

Why a codec of our own: every supernode answers STUN from anyone on the Internet, so the parser
is the first code that untrusted bytes reach. It therefore accepts exactly one well-formed
message per datagram and reports every defect as `StunError`, the single exception that
`decode_untrusted` and the other `*_untrusted` functions may raise (trio's naming, h11's split
of faults: bad bytes from a peer are a `RemoteError`; misuse of the encoder on this side is a
`LocalError`).

Attribute values stay raw bytes inside `Message`; the small `encode_*` / `decode_*_untrusted`
helpers below turn the ones we use into Python values, so the framing and each value format can
be tested and fuzzed on their own. Nothing here keeps state, reads a clock or touches a socket;
randomness (transaction ids) comes in as a function.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import struct
import unicodedata
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from punchline.errors import LocalError, RemoteError

MAGIC_COOKIE = 0x2112A442
HEADER_BYTES = 20
TRANSACTION_ID_BYTES = 12
# RFC 8489 §14.7: FINGERPRINT is CRC-32 of the message XOR'ed with "STUN", so it differs from
# the CRC a multiplexed protocol might carry in the same position.
FINGERPRINT_XOR = 0x5354554E
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_MAX_BODY_BYTES = 0xFFFF - 3  # the 16-bit length field, rounded down to a multiple of 4
# RFC 8489 §14.8/§14.14/§14.3-5: text values are "fewer than 128 characters", which is at most
# 763 bytes of UTF-8 when decoding (509 for USERNAME, 763 for REALM, NONCE, SOFTWARE, reasons).
MAX_TEXT_CHARS = 127
MAX_TEXT_BYTES = 763


class StunError(RemoteError):
    """Bytes from the network are not a valid STUN message or attribute value."""


class StunUsageError(LocalError):
    """This side asked the codec for something STUN cannot carry (bad id, address, code...)."""


class Class(IntEnum):
    """Message class, the two C bits of the message type (RFC 8489 §5)."""

    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Method(IntEnum):
    """STUN methods we speak: Binding (RFC 8489 §18.2) and TURN's (RFC 8656 §17)."""

    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class Attr(IntEnum):
    """Attribute types (IANA STUN registry). Below 0x8000 = comprehension-required (§14)."""

    MAPPED_ADDRESS = 0x0001  # RFC 8489 §14.1
    CHANGE_REQUEST = 0x0003  # RFC 5780 §7.2
    USERNAME = 0x0006  # RFC 8489 §14.3
    MESSAGE_INTEGRITY = 0x0008  # RFC 8489 §14.5
    ERROR_CODE = 0x0009  # RFC 8489 §14.8
    UNKNOWN_ATTRIBUTES = 0x000A  # RFC 8489 §14.13
    CHANNEL_NUMBER = 0x000C  # RFC 8656 §18.1
    LIFETIME = 0x000D  # RFC 8656 §18.2
    XOR_PEER_ADDRESS = 0x0012  # RFC 8656 §18.3
    DATA = 0x0013  # RFC 8656 §18.4
    REALM = 0x0014  # RFC 8489 §14.9
    NONCE = 0x0015  # RFC 8489 §14.10
    XOR_RELAYED_ADDRESS = 0x0016  # RFC 8656 §18.5
    REQUESTED_ADDRESS_FAMILY = 0x0017  # RFC 8656 §18.6
    EVEN_PORT = 0x0018  # RFC 8656 §18.7
    REQUESTED_TRANSPORT = 0x0019  # RFC 8656 §18.8
    DONT_FRAGMENT = 0x001A  # RFC 8656 §18.9
    MESSAGE_INTEGRITY_SHA256 = 0x001C  # RFC 8489 §14.6
    PASSWORD_ALGORITHM = 0x001D  # RFC 8489 §14.12
    USERHASH = 0x001E  # RFC 8489 §14.4
    XOR_MAPPED_ADDRESS = 0x0020  # RFC 8489 §14.2
    RESERVATION_TOKEN = 0x0022  # RFC 8656 §18.10
    PRIORITY = 0x0024  # RFC 8445 §16.1
    USE_CANDIDATE = 0x0025  # RFC 8445 §16.1
    PADDING = 0x0026  # RFC 5780 §7.6
    RESPONSE_PORT = 0x0027  # RFC 5780 §7.5
    PASSWORD_ALGORITHMS = 0x8002  # RFC 8489 §14.11
    ALTERNATE_DOMAIN = 0x8003  # RFC 8489 §14.16
    SOFTWARE = 0x8022  # RFC 8489 §14.14
    ALTERNATE_SERVER = 0x8023  # RFC 8489 §14.15
    FINGERPRINT = 0x8028  # RFC 8489 §14.7
    ICE_CONTROLLED = 0x8029  # RFC 8445 §16.1
    ICE_CONTROLLING = 0x802A  # RFC 8445 §16.1
    RESPONSE_ORIGIN = 0x802B  # RFC 5780 §7.3
    OTHER_ADDRESS = 0x802C  # RFC 5780 §7.4


# Added by `encode` itself and consumed by `decode_untrusted`, never carried in `Message`.
_TRAILER_ATTRS = frozenset(
    {Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT}
)


def is_comprehension_required(attr: int) -> bool:
    """RFC 8489 §14: types 0x0000-0x7FFF must be understood, or the request fails with 420."""
    return attr < 0x8000


@dataclass(frozen=True)
class Message:
    """One STUN message with raw attribute values, in wire order.

    `attributes` never holds MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 or FINGERPRINT: `encode`
    adds them from its arguments and `decode_untrusted` checks and removes them, together with
    anything RFC 8489 §9 says to ignore after the integrity attributes.
    """

    method: int
    cls: Class
    transaction_id: bytes  # 12 bytes (RFC 8489 §5)
    attributes: tuple[tuple[int, bytes], ...] = ()

    def get(self, attr: int) -> bytes | None:
        """The first value of `attr` (RFC 8489 §14: later duplicates are usually ignored)."""
        for kind, value in self.attributes:
            if kind == attr:
                return value
        return None

    def get_all(self, attr: int) -> list[bytes]:
        return [value for kind, value in self.attributes if kind == attr]


# ------------------------------------------------------------------ framing


def _message_type(method: int, cls: int) -> int:
    """Interleave the 12 method bits M11..M0 and 2 class bits C1 C0 (RFC 8489 §5, Figure 3)."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def _split_type(message_type: int) -> tuple[int, Class]:
    method = (
        (message_type & 0x000F) | ((message_type >> 1) & 0x0070) | ((message_type >> 2) & 0x0F80)
    )
    cls = ((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10)
    return method, Class(cls)


def _known_method(method: int) -> int:
    try:
        return Method(method)
    except ValueError:
        return method


def is_stun(data: bytes) -> bool:
    """Cheap demultiplexing test: could this datagram be one STUN message?

    RFC 7983 tells STUN from DTLS, RTP/RTCP, ZRTP and TURN ChannelData by the first byte (0-3
    is STUN, which is why methods 0x100-0xFFF stay unassigned); the magic cookie (RFC 8489
    §6) and a length that is a multiple of 4 and matches the datagram make a false positive
    very unlikely. Never raises.
    """
    return (
        len(data) >= HEADER_BYTES
        and data[0] <= 3
        and data[4:8] == _COOKIE_BYTES
        and (len(data) - HEADER_BYTES) % 4 == 0
        and int.from_bytes(data[2:4], "big") == len(data) - HEADER_BYTES
    )


def new_transaction_id(randbytes: Callable[[int], bytes] = os.urandom) -> bytes:
    """96 random bits (RFC 8489 §5: uniformly and randomly chosen, cryptographically random)."""
    tid = randbytes(TRANSACTION_ID_BYTES)
    if not isinstance(tid, bytes) or len(tid) != TRANSACTION_ID_BYTES:
        raise StunUsageError(f"randbytes({TRANSACTION_ID_BYTES}) must return exactly 12 bytes")
    return tid


def _check_transaction_id(tid: bytes) -> None:
    if not isinstance(tid, bytes) or len(tid) != TRANSACTION_ID_BYTES:
        raise StunUsageError("a STUN transaction id is exactly 12 bytes")


def _attribute(kind: int, value: bytes, padding_byte: int) -> bytes:
    """One TLV, padded to a multiple of 4 bytes (RFC 8489 §14: padding is sender's choice)."""
    pad = -len(value) % 4
    return struct.pack("!HH", kind, len(value)) + value + bytes([padding_byte]) * pad


def _header(message_type: int, length: int, tid: bytes) -> bytes:
    return struct.pack("!HHI", message_type, length, MAGIC_COOKIE) + tid


def encode(
    msg: Message,
    integrity_key: bytes | None = None,
    sha256: bool = False,
    fingerprint: bool = True,
    *,
    padding_byte: int = 0,
) -> bytes:
    """Serialise `msg`, then append the integrity attribute and FINGERPRINT it asks for.

    With `integrity_key`, adds MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5) or with `sha256`
    MESSAGE-INTEGRITY-SHA256 (§14.6, untruncated). Each HMAC and the CRC are computed over the
    message with the header length already counting the attribute being added, as §14.5-14.7
    require. `padding_byte` exists because RFC 8489 §14 leaves padding to the sender; the
    RFC 5769 test vectors pad with spaces and reproducing them byte for byte needs it.
    """
    _check_transaction_id(msg.transaction_id)
    if not 0 <= msg.method <= 0xFFF:
        raise StunUsageError(f"STUN methods are 12 bits, not {msg.method:#x}")
    if not 0 <= padding_byte <= 0xFF:
        raise StunUsageError("padding_byte must be one byte")
    if msg.cls not in (0, 1, 2, 3):
        raise StunUsageError(f"STUN classes are 0-3, not {msg.cls!r}")
    message_type = _message_type(msg.method, msg.cls)
    body = bytearray()
    for kind, value in msg.attributes:
        if not 0 <= kind <= 0xFFFF:
            raise StunUsageError(f"attribute type {kind:#x} is not 16 bits")
        if kind in _TRAILER_ATTRS:
            raise StunUsageError(f"{Attr(kind).name} is added by encode() itself, not passed in")
        if len(value) > 0xFFFF:
            raise StunUsageError(f"attribute {kind:#06x} value is longer than 65535 bytes")
        body += _attribute(kind, bytes(value), padding_byte)
    trailer = (36 if sha256 else 24) * (integrity_key is not None) + 8 * fingerprint
    if len(body) + trailer > _MAX_BODY_BYTES:
        raise StunUsageError("STUN message would be longer than its 16-bit length field allows")
    tid = msg.transaction_id
    if integrity_key is not None:
        kind, size, digest = (
            (Attr.MESSAGE_INTEGRITY_SHA256, 32, hashlib.sha256)
            if sha256
            else (Attr.MESSAGE_INTEGRITY, 20, hashlib.sha1)
        )
        covered = _header(message_type, len(body) + 4 + size, tid) + body
        body += _attribute(kind, hmac.new(integrity_key, covered, digest).digest(), 0)
    if fingerprint:
        covered = _header(message_type, len(body) + 8, tid) + body
        crc = (zlib.crc32(covered) ^ FINGERPRINT_XOR).to_bytes(4, "big")
        body += _attribute(Attr.FINGERPRINT, crc, 0)
    return _header(message_type, len(body), tid) + body


def _covered(data: bytes, start: int, attr_bytes: int) -> bytes:
    """The bytes an integrity attribute at `start` protects: everything before it, with the
    header length rewritten to end just after it (RFC 8489 §14.5, §14.6)."""
    length = start + attr_bytes - HEADER_BYTES
    return data[:2] + length.to_bytes(2, "big") + data[4:start]


def decode_untrusted(data: bytes, integrity_key: bytes | None = None) -> Message:
    """Parse one STUN message from a datagram; any defect raises `StunError`.

    Checks, in the order of RFC 8489 §6.3: top two bits zero, magic cookie, a length that is a
    multiple of 4 and covers the datagram exactly, every attribute (with its padding) inside
    the message; FINGERPRINT, if present, is last, 4 bytes and correct (§14.7). With
    `integrity_key`, MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 must be present and every
    one that counts must verify (compared in constant time). Per §9, attributes after
    MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT, and after a lone
    MESSAGE-INTEGRITY-SHA256 other than FINGERPRINT, are ignored. Padding bytes may hold any
    value (§14). Callers that must look at USERNAME/REALM to pick the key decode twice: once
    without a key, once with it.
    """
    data = bytes(data)
    method, cls = _split_type(_check_header(data))
    parts = _walk_attributes(data)
    if parts.fingerprint is not None:
        offset, value = parts.fingerprint
        if int.from_bytes(value, "big") != zlib.crc32(data[:offset]) ^ FINGERPRINT_XOR:
            raise StunError("FINGERPRINT does not match: corrupted, or not STUN")
    if integrity_key is not None:
        _verify_integrity(data, integrity_key, parts.integrity, parts.integrity256)
    return Message(_known_method(method), cls, data[8:20], tuple(parts.attributes))


def _check_header(data: bytes) -> int:
    """RFC 8489 §6.3 header checks; returns the message type."""
    if len(data) < HEADER_BYTES:
        raise StunError(f"{len(data)} bytes is shorter than a STUN header")
    message_type = int.from_bytes(data[0:2], "big")
    length = int.from_bytes(data[2:4], "big")
    if message_type & 0xC000:
        raise StunError("the top two bits of a STUN message must be zero")
    if data[4:8] != _COOKIE_BYTES:
        raise StunError("wrong magic cookie: not a STUN (RFC 5389 or later) message")
    if length % 4:
        raise StunError(f"message length {length} is not a multiple of 4")
    if HEADER_BYTES + length != len(data):
        raise StunError(f"message length {length} does not match the {len(data)}-byte datagram")
    return message_type


@dataclass
class _Parts:
    """What one pass over the attributes found; trailers as (offset, value)."""

    attributes: list[tuple[int, bytes]] = field(default_factory=list)
    integrity: tuple[int, bytes] | None = None
    integrity256: tuple[int, bytes] | None = None
    fingerprint: tuple[int, bytes] | None = None


def _walk_attributes(data: bytes) -> _Parts:
    parts = _Parts()
    pos = HEADER_BYTES
    while pos < len(data):
        if parts.fingerprint is not None:
            raise StunError("FINGERPRINT must be the last attribute")
        kind = int.from_bytes(data[pos : pos + 2], "big")
        size = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 4 + size + (-size % 4)
        if end > len(data):
            raise StunError(f"attribute {kind:#06x} of {size} bytes runs past the message end")
        value = data[pos + 4 : pos + 4 + size]
        if kind == Attr.FINGERPRINT:
            if size != 4:
                raise StunError("FINGERPRINT must be 4 bytes")
            parts.fingerprint = (pos, value)
        elif kind == Attr.MESSAGE_INTEGRITY_SHA256:
            if parts.integrity256 is None:  # honoured after MESSAGE-INTEGRITY too (§9)
                if not (16 <= size <= 32 and size % 4 == 0):
                    raise StunError("MESSAGE-INTEGRITY-SHA256 must be 16-32 bytes, a multiple of 4")
                parts.integrity256 = (pos, value)
        elif parts.integrity is None and parts.integrity256 is None:
            if kind == Attr.MESSAGE_INTEGRITY:
                if size != 20:
                    raise StunError("MESSAGE-INTEGRITY must be 20 bytes")
                parts.integrity = (pos, value)
            else:
                parts.attributes.append((kind, value))
        pos = end
    return parts


def _verify_integrity(
    data: bytes,
    key: bytes,
    integrity: tuple[int, bytes] | None,
    integrity256: tuple[int, bytes] | None,
) -> None:
    if integrity is None and integrity256 is None:
        raise StunError("message carries no MESSAGE-INTEGRITY but one is required")
    if integrity is not None:
        start, value = integrity
        mac = hmac.new(key, _covered(data, start, 24), hashlib.sha1).digest()
        if not hmac.compare_digest(mac, value):
            raise StunError("MESSAGE-INTEGRITY does not verify: wrong key or altered message")
    if integrity256 is not None:
        start, value = integrity256
        covered = _covered(data, start, 4 + len(value))
        mac = hmac.new(key, covered, hashlib.sha256).digest()[: len(value)]
        if not hmac.compare_digest(mac, value):
            raise StunError("MESSAGE-INTEGRITY-SHA256 does not verify: wrong key or altered")


# ------------------------------------------------------------------ addresses


_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02


def _pack_address(addr: tuple[str, int]) -> tuple[int, bytes, int]:
    host, port = addr[0], addr[1]
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
        raise StunUsageError(f"port {port!r} is not 0-65535")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise StunUsageError(f"{host!r} is not an IP address") from exc
    return (_FAMILY_IPV4 if ip.version == 4 else _FAMILY_IPV6), ip.packed, port


def _unpack_address(value: bytes) -> tuple[int, bytes, int]:
    """Family, packed address and port of a (XOR-)MAPPED-ADDRESS value (RFC 8489 §14.1).

    The first byte is reserved: "MUST be set to 0 and MUST be ignored by receivers".
    """
    if len(value) < 4:
        raise StunError("address attribute is shorter than 4 bytes")
    family = value[1]
    if family == _FAMILY_IPV4:
        size = 4
    elif family == _FAMILY_IPV6:
        size = 16
    else:
        raise StunError(f"address family {family:#04x} is neither IPv4 nor IPv6")
    if len(value) != 4 + size:
        raise StunError(f"address attribute is {len(value)} bytes, not {4 + size}")
    return family, value[4:], int.from_bytes(value[2:4], "big")


def _format_ip(family: int, packed: bytes) -> str:
    # inet_ntop is pure (no I/O) and spells addresses exactly as sockets report them
    return socket.inet_ntop(socket.AF_INET if family == _FAMILY_IPV4 else socket.AF_INET6, packed)


def _xor_mask(transaction_id: bytes, size: int) -> bytes:
    _check_transaction_id(transaction_id)
    return (_COOKIE_BYTES + transaction_id)[:size]


def encode_address(addr: tuple[str, int]) -> bytes:
    """MAPPED-ADDRESS, OTHER-ADDRESS, RESPONSE-ORIGIN, ALTERNATE-SERVER (RFC 8489 §14.1)."""
    family, packed, port = _pack_address(addr)
    return bytes([0, family]) + port.to_bytes(2, "big") + packed


def decode_address_untrusted(value: bytes) -> tuple[str, int]:
    family, packed, port = _unpack_address(value)
    return _format_ip(family, packed), port


def encode_xor_address(addr: tuple[str, int], transaction_id: bytes) -> bytes:
    """XOR-MAPPED/-PEER/-RELAYED-ADDRESS (RFC 8489 §14.2): port XOR the cookie's top 16 bits,
    address XOR the cookie (IPv4) or cookie + transaction id (IPv6), so NATs that rewrite
    addresses they find in payloads leave it alone."""
    family, packed, port = _pack_address(addr)
    mask = _xor_mask(transaction_id, len(packed))
    xport = port ^ (MAGIC_COOKIE >> 16)
    return (
        bytes([0, family])
        + xport.to_bytes(2, "big")
        + bytes(a ^ b for a, b in zip(packed, mask, strict=True))
    )


def decode_xor_address_untrusted(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    family, xpacked, xport = _unpack_address(value)
    mask = _xor_mask(transaction_id, len(xpacked))
    packed = bytes(a ^ b for a, b in zip(xpacked, mask, strict=True))
    return _format_ip(family, packed), xport ^ (MAGIC_COOKIE >> 16)


def mapped_address_untrusted(msg: Message) -> tuple[str, int] | None:
    """The reflexive address of a Binding success: XOR-MAPPED-ADDRESS, else the RFC 3489-style
    MAPPED-ADDRESS (RFC 8489 §14.1 keeps it for old servers), else None."""
    xored = msg.get(Attr.XOR_MAPPED_ADDRESS)
    if xored is not None:
        return decode_xor_address_untrusted(xored, msg.transaction_id)
    plain = msg.get(Attr.MAPPED_ADDRESS)
    return None if plain is None else decode_address_untrusted(plain)


# ------------------------------------------------------------------ other values


def encode_text(text: str, max_chars: int = MAX_TEXT_CHARS) -> bytes:
    """SOFTWARE, REALM, NONCE, reason phrases: UTF-8 of fewer than 128 characters (§14)."""
    if len(text) > max_chars:
        raise StunUsageError(f"STUN text is at most {max_chars} characters")
    return text.encode("utf-8")


def decode_text_untrusted(value: bytes, max_bytes: int = MAX_TEXT_BYTES) -> str:
    if len(value) > max_bytes:
        raise StunError(f"text attribute is longer than {max_bytes} bytes")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StunError("text attribute is not valid UTF-8") from exc


def encode_error_code(code: int, reason: str) -> bytes:
    """ERROR-CODE (RFC 8489 §14.8): 21 zero bits, class (hundreds), number, UTF-8 reason."""
    if not isinstance(code, int) or not 300 <= code <= 699:
        raise StunUsageError(f"STUN error codes are 300-699, not {code!r}")
    return bytes([0, 0, code // 100, code % 100]) + encode_text(reason)


def decode_error_code_untrusted(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise StunError("ERROR-CODE is shorter than 4 bytes")
    hundreds, number = value[2] & 0x07, value[3]  # §14.8: receivers ignore the reserved bits
    if not 3 <= hundreds <= 6 or number > 99:
        raise StunError(f"ERROR-CODE class {hundreds} / number {number} is out of range")
    return hundreds * 100 + number, decode_text_untrusted(value[4:])


def encode_unknown_attributes(kinds: Iterable[int]) -> bytes:
    """UNKNOWN-ATTRIBUTES (RFC 8489 §14.13): the 16-bit types a 420 response did not understand."""
    return b"".join(struct.pack("!H", kind) for kind in kinds)


def decode_unknown_attributes_untrusted(value: bytes) -> list[int]:
    if len(value) % 2:
        raise StunError("UNKNOWN-ATTRIBUTES must hold whole 16-bit types")
    return [int.from_bytes(value[i : i + 2], "big") for i in range(0, len(value), 2)]


def encode_uint32(number: int) -> bytes:
    """LIFETIME (RFC 8656 §18.2), PRIORITY (RFC 8445 §16.1)."""
    if not 0 <= number <= 0xFFFFFFFF:
        raise StunUsageError(f"{number} does not fit in 32 bits")
    return number.to_bytes(4, "big")


def decode_uint32_untrusted(value: bytes) -> int:
    if len(value) != 4:
        raise StunError("a 32-bit attribute value must be 4 bytes")
    return int.from_bytes(value, "big")


def encode_uint64(number: int) -> bytes:
    """ICE-CONTROLLED / ICE-CONTROLLING tie-breakers (RFC 8445 §16.1)."""
    if not 0 <= number <= 0xFFFFFFFFFFFFFFFF:
        raise StunUsageError(f"{number} does not fit in 64 bits")
    return number.to_bytes(8, "big")


def decode_uint64_untrusted(value: bytes) -> int:
    if len(value) != 8:
        raise StunError("a 64-bit attribute value must be 8 bytes")
    return int.from_bytes(value, "big")


CHANGE_IP = 0x04  # RFC 5780 §7.2 flag A
CHANGE_PORT = 0x02  # RFC 5780 §7.2 flag B


def encode_change_request(change_ip: bool, change_port: bool) -> bytes:
    """CHANGE-REQUEST (RFC 5780 §7.2): ask for the response from another IP and/or port."""
    return (CHANGE_IP * change_ip | CHANGE_PORT * change_port).to_bytes(4, "big")


def decode_change_request_untrusted(value: bytes) -> tuple[bool, bool]:
    """(change IP, change port); the other bits are unused and ignored."""
    flags = decode_uint32_untrusted(value)
    return bool(flags & CHANGE_IP), bool(flags & CHANGE_PORT)


def encode_response_port(port: int) -> bytes:
    """RESPONSE-PORT (RFC 5780 §7.5, erratum 2844): a port, then 2 bytes of padding."""
    if not 0 <= port <= 0xFFFF:
        raise StunUsageError(f"port {port} is not 0-65535")
    return port.to_bytes(2, "big") + b"\x00\x00"


def decode_response_port_untrusted(value: bytes) -> int:
    if len(value) != 4:
        raise StunError("RESPONSE-PORT must be 4 bytes")
    return int.from_bytes(value[:2], "big")


def encode_channel_number(channel: int) -> bytes:
    """CHANNEL-NUMBER (RFC 8656 §18.1): 0x4000-0x4FFF (§12), then 16 RFFU bits."""
    if not 0x4000 <= channel <= 0x4FFF:
        raise StunUsageError(f"TURN channel numbers are 0x4000-0x4FFF, not {channel:#x}")
    return channel.to_bytes(2, "big") + b"\x00\x00"


def decode_channel_number_untrusted(value: bytes) -> int:
    if len(value) != 4:
        raise StunError("CHANNEL-NUMBER must be 4 bytes")
    channel = int.from_bytes(value[:2], "big")
    # RFC 5766 clients (coturn's uclient among them) still use 0x5000-0x7FFF: accepted on
    # decode, never produced by `encode_channel_number`.
    if not 0x4000 <= channel <= 0x7FFF:
        raise StunError(f"channel number {channel:#x} is outside 0x4000-0x7FFF")
    return channel


def encode_requested_transport(protocol: int = 17) -> bytes:
    """REQUESTED-TRANSPORT (RFC 8656 §18.8): an IP protocol number (17 = UDP), 3 RFFU bytes."""
    if not 0 <= protocol <= 0xFF:
        raise StunUsageError(f"protocol {protocol} is not one byte")
    return bytes([protocol, 0, 0, 0])


def decode_requested_transport_untrusted(value: bytes) -> int:
    if len(value) != 4:
        raise StunError("REQUESTED-TRANSPORT must be 4 bytes")
    return value[0]


def encode_requested_address_family(ipv6: bool) -> bytes:
    """REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6): 0x01 IPv4 or 0x02 IPv6, 3 RFFU bytes."""
    return bytes([_FAMILY_IPV6 if ipv6 else _FAMILY_IPV4, 0, 0, 0])


def decode_requested_address_family_untrusted(value: bytes) -> int:
    """4 or 6."""
    if len(value) != 4 or value[0] not in (_FAMILY_IPV4, _FAMILY_IPV6):
        raise StunError("REQUESTED-ADDRESS-FAMILY must be 4 bytes naming IPv4 or IPv6")
    return 4 if value[0] == _FAMILY_IPV4 else 6


def encode_even_port(reserve_next: bool) -> bytes:
    """EVEN-PORT (RFC 8656 §18.7): one byte whose top bit R asks to reserve port + 1."""
    return bytes([0x80 if reserve_next else 0])


def decode_even_port_untrusted(value: bytes) -> bool:
    if len(value) != 1:
        raise StunError("EVEN-PORT must be 1 byte")
    return bool(value[0] & 0x80)


# ------------------------------------------------------------------ credentials


def opaque_string(text: str) -> str:
    """The OpaqueString profile of PRECIS (RFC 8265 §4.2.2) that RFC 8489 §9.2.2 applies to
    realm and password: non-ASCII spaces become U+0020, then Unicode NFC. Idempotent, so it is
    safe on a USERNAME that was already prepared."""
    spaced = "".join(" " if unicodedata.category(ch) == "Zs" else ch for ch in text)
    return unicodedata.normalize("NFC", spaced)


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """MD5(username ":" realm ":" password) after OpaqueString (RFC 8489 §9.2.2), the HMAC key
    of the long-term credential mechanism. MD5 here is the protocol's key derivation, not our
    choice of hash, hence `usedforsecurity=False` (FIPS builds would refuse it otherwise)."""
    text = ":".join(opaque_string(part) for part in (username, realm, password))
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).digest()


# ------------------------------------------------------------------ common messages


def binding_request(transaction_id: bytes | None = None, software: str | None = None) -> bytes:
    """A Binding request (RFC 8489 §3) with FINGERPRINT; read the id back from bytes 8-20."""
    tid = new_transaction_id() if transaction_id is None else transaction_id
    attributes = () if software is None else ((Attr.SOFTWARE, encode_text(software)),)
    return encode(Message(Method.BINDING, Class.REQUEST, tid, attributes))


def binding_success(
    transaction_id: bytes,
    mapped: tuple[str, int],
    software: str | None = "punchline",
    response_origin: tuple[str, int] | None = None,
    other_address: tuple[str, int] | None = None,
) -> bytes:
    """A Binding success response: XOR-MAPPED-ADDRESS (RFC 8489 §14.2), MAPPED-ADDRESS for
    RFC 3489 clients that predate it (§14.1), RESPONSE-ORIGIN and OTHER-ADDRESS when given
    (RFC 5780 §7.3-7.4), SOFTWARE, then FINGERPRINT."""
    attributes: list[tuple[int, bytes]] = [
        (Attr.XOR_MAPPED_ADDRESS, encode_xor_address(mapped, transaction_id)),
        (Attr.MAPPED_ADDRESS, encode_address(mapped)),
    ]
    if response_origin is not None:
        attributes.append((Attr.RESPONSE_ORIGIN, encode_address(response_origin)))
    if other_address is not None:
        attributes.append((Attr.OTHER_ADDRESS, encode_address(other_address)))
    if software is not None:
        attributes.append((Attr.SOFTWARE, encode_text(software)))
    return encode(Message(Method.BINDING, Class.SUCCESS, transaction_id, tuple(attributes)))


def error_response(
    request: Message,
    code: int,
    reason: str,
    unknown_attributes: Iterable[int] = (),
    software: str | None = None,
    integrity_key: bytes | None = None,
) -> bytes:
    """An error response to `request` (RFC 8489 §6.3.1.1): same method and transaction id,
    ERROR-CODE, UNKNOWN-ATTRIBUTES for a 420 (§14.13), SOFTWARE, FINGERPRINT."""
    attributes: list[tuple[int, bytes]] = [(Attr.ERROR_CODE, encode_error_code(code, reason))]
    unknown = list(unknown_attributes)
    if unknown:
        attributes.append((Attr.UNKNOWN_ATTRIBUTES, encode_unknown_attributes(unknown)))
    if software is not None:
        attributes.append((Attr.SOFTWARE, encode_text(software)))
    msg = Message(request.method, Class.ERROR, request.transaction_id, tuple(attributes))
    return encode(msg, integrity_key=integrity_key)
