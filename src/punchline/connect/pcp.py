"""PCP (RFC 6887) MAP messages: NAT-PMP's successor, spoken by miniupnpd and newer routers.

Why a codec of our own: only the MAP opcode is needed (ask for an inbound mapping, renew it,
delete it), a fixed 60-byte request and answer; no maintained Python library speaks PCP.
Stateless: bytes out, bytes in; retransmission and sockets live in `portmap_core`/`portmap`.

Replies are untrusted: a datagram that is not the answer to our request (size, version,
opcode, nonce, protocol, internal port) raises `PcpMalformed` and is dropped; a refusal raises
`PcpRefused` with the result code. A NAT-PMP-only gateway answers a PCP request with a
version-0 "unsupported version" reply (RFC 6887 §9), which raises `PcpUnsupportedVersion` so
the caller can fall back to NAT-PMP at once.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from punchline.errors import LocalError, RemoteError

PORT = 5351  # RFC 6887 §19.1, shared with NAT-PMP
VERSION = 2
NATPMP_VERSION = 0
OPCODE_MAP = 1
RESPONSE_BIT = 0x80
NONCE_BYTES = 12
MAX_MESSAGE = 1100  # RFC 6887 §7: larger messages are invalid
PROTOCOL_TCP = 6
PROTOCOL_UDP = 17


class Result(IntEnum):
    """Result codes (RFC 6887 §7.4)."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


class PcpMalformed(RemoteError):
    """A datagram that is not a valid answer to our request (dropped and counted)."""


class PcpRefused(RemoteError):
    """The PCP server answered our request with a non-zero result code."""

    def __init__(self, result: int, lifetime: int) -> None:
        try:
            name = Result(result).name.lower().replace("_", " ")
        except ValueError:
            name = "unknown result code"
        super().__init__(f"PCP server refused: {name} ({result})")
        self.result = result
        self.lifetime = lifetime  # for errors: how long the condition is expected to last


class PcpUnsupportedVersion(RemoteError):
    """The server speaks only NAT-PMP (or an older PCP): try NAT-PMP instead."""


# version, R|opcode, reserved, lifetime, client address (16)
_REQUEST_HEADER = struct.Struct("!BBHI16s")
# version, R|opcode, reserved, result, lifetime, epoch, reserved (12)
_RESPONSE_HEADER = struct.Struct("!BBBBII12s")
# nonce (12), protocol, reserved (3), internal port, external port, external address (16)
_MAP_BODY = struct.Struct("!12sB3sHH16s")
MESSAGE_SIZE = _REQUEST_HEADER.size + _MAP_BODY.size  # 60 both ways
assert _RESPONSE_HEADER.size == _REQUEST_HEADER.size


@dataclass(frozen=True)
class MapRequest:
    nonce: bytes
    protocol: int
    internal_port: int
    suggested_external_port: int  # 0: any
    suggested_external_ip: str  # "0.0.0.0": any
    lifetime: int  # 0 deletes the mapping (RFC 6887 §15)
    client_ip: str  # our own address as the server sees it (RFC 6887 §8.1)


@dataclass(frozen=True)
class MapReply:
    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_ip: str
    lifetime: int
    epoch: int


def _pack_ip(ip: str) -> bytes:
    """Addresses travel as 16 bytes; IPv4 as IPv4-mapped IPv6 (RFC 6887 §5)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed).packed
    return address.packed


def _unpack_ip(packed: bytes) -> str:
    address = ipaddress.IPv6Address(packed)
    mapped = address.ipv4_mapped
    return str(mapped if mapped is not None else address)


def encode_map_request(request: MapRequest) -> bytes:
    if len(request.nonce) != NONCE_BYTES:
        raise LocalError(f"a PCP nonce is {NONCE_BYTES} bytes")
    ports = (request.internal_port, request.suggested_external_port)
    if not 1 <= ports[0] <= 0xFFFF or not 0 <= ports[1] <= 0xFFFF:
        raise LocalError(f"PCP ports must be 1-65535 (got {request.internal_port})")
    if not 0 <= request.lifetime <= 0xFFFFFFFF or not 0 <= request.protocol <= 0xFF:
        raise LocalError("PCP lifetime or protocol out of range")
    header = _REQUEST_HEADER.pack(VERSION, OPCODE_MAP, 0, request.lifetime,
                                  _pack_ip(request.client_ip))  # fmt: skip
    body = _MAP_BODY.pack(request.nonce, request.protocol, b"\x00" * 3, request.internal_port,
                          request.suggested_external_port,
                          _pack_ip(request.suggested_external_ip))  # fmt: skip
    return header + body


def decode_map_request_untrusted(data: bytes) -> MapRequest:
    """The server's side, for tests and fakes that stand in for a gateway."""
    if len(data) < MESSAGE_SIZE or len(data) > MAX_MESSAGE or len(data) % 4:
        raise PcpMalformed(f"PCP request of {len(data)} bytes")
    version, opcode, _reserved, lifetime, client = _REQUEST_HEADER.unpack_from(data)
    if version != VERSION or opcode != OPCODE_MAP:
        raise PcpMalformed(f"not a PCP MAP request (version {version}, opcode {opcode})")
    nonce, protocol, _r, internal, external, external_ip = _MAP_BODY.unpack_from(
        data, _REQUEST_HEADER.size
    )
    return MapRequest(nonce, protocol, internal, external, _unpack_ip(external_ip), lifetime,
                      _unpack_ip(client))  # fmt: skip


def encode_map_reply(reply: MapReply, result: int = Result.SUCCESS) -> bytes:
    header = _RESPONSE_HEADER.pack(VERSION, RESPONSE_BIT | OPCODE_MAP, 0, result,
                                   reply.lifetime, reply.epoch, b"\x00" * 12)  # fmt: skip
    body = _MAP_BODY.pack(reply.nonce, reply.protocol, b"\x00" * 3, reply.internal_port,
                          reply.external_port, _pack_ip(reply.external_ip))  # fmt: skip
    return header + body


def _walk_options(data: bytes) -> None:
    """Options may follow the MAP body (RFC 6887 §7.3); each must fit exactly. We ask for
    none and use none, but a reply whose options overrun it is malformed."""
    offset = MESSAGE_SIZE
    while offset < len(data):
        if offset + 4 > len(data):
            raise PcpMalformed("PCP reply has a truncated option header")
        length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        offset += 4 + (length + 3) // 4 * 4
        if offset > len(data):
            raise PcpMalformed("PCP reply has an option longer than the message")


def _check_header(data: bytes) -> tuple[int, int, int]:
    """(result, lifetime, epoch) of a MAP response header, or the error it amounts to."""
    if len(data) >= 4 and data[0] == NATPMP_VERSION and data[1] & RESPONSE_BIT:
        if int.from_bytes(data[2:4], "big") == Result.UNSUPP_VERSION:  # RFC 6886 §3.5
            raise PcpUnsupportedVersion("the gateway answered in NAT-PMP: it speaks NAT-PMP only")
        raise PcpMalformed("a NAT-PMP reply to a PCP request")
    if len(data) < _RESPONSE_HEADER.size:
        raise PcpMalformed(f"PCP reply of {len(data)} bytes is too short")
    version, opcode, _reserved, result, lifetime, epoch, _r = _RESPONSE_HEADER.unpack_from(data)
    if version != VERSION:
        if result == Result.UNSUPP_VERSION:
            raise PcpUnsupportedVersion(f"the PCP server speaks version {version}, not {VERSION}")
        raise PcpMalformed(f"PCP reply has version {version}")
    if opcode != RESPONSE_BIT | OPCODE_MAP:
        raise PcpMalformed(f"PCP reply has opcode {opcode}, not a MAP response")
    if len(data) > MAX_MESSAGE or len(data) % 4:
        raise PcpMalformed(f"PCP reply of {len(data)} bytes")
    if len(data) < MESSAGE_SIZE:
        if result != Result.SUCCESS:  # an error reply may come without the MAP body (§7.2)
            raise PcpRefused(result, lifetime)
        raise PcpMalformed(f"PCP MAP reply of {len(data)} bytes is too short")
    return result, lifetime, epoch


def decode_map_reply_untrusted(data: bytes, request: MapRequest) -> MapReply:
    """The answer to `request`; anything else raises (see the module docstring)."""
    result, lifetime, epoch = _check_header(data)
    nonce, protocol, _r3, internal, external, external_ip = _MAP_BODY.unpack_from(
        data, _REQUEST_HEADER.size
    )
    if nonce != request.nonce:
        raise PcpMalformed("PCP reply carries another request's nonce")
    if protocol != request.protocol or internal != request.internal_port:
        raise PcpMalformed(f"PCP reply is for protocol {protocol} port {internal}")
    if result != Result.SUCCESS:
        raise PcpRefused(result, lifetime)
    _walk_options(data)
    if request.lifetime and (external == 0 or lifetime == 0):
        raise PcpMalformed("PCP reply grants no external port or no lifetime")
    return MapReply(nonce, protocol, internal, external, _unpack_ip(external_ip), lifetime, epoch)
