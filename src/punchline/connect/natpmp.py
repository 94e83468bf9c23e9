"""NAT-PMP (RFC 6886) messages: the port mapping protocol of Apple routers and miniupnpd.

Why a codec of our own: NAT-PMP is two fixed-size binary messages, and the Python packages
that speak it are synchronous and unmaintained; strict parsing of the router's reply is all
that is needed, and here it is explicit. Stateless: bytes out, bytes in; retransmission and
sockets live in `portmap_core` and `portmap`.

Replies come from the network and are untrusted: anything that is not exactly the expected
answer (size, version, opcode, the internal port we asked about) raises `NatPmpMalformed`, a
well-formed refusal raises `NatPmpRefused` with the RFC's result code.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from punchline.errors import LocalError, RemoteError

PORT = 5351  # the gateway's NAT-PMP (and PCP) server port (RFC 6886 §3.1)
VERSION = 0
RESPONSE_BIT = 0x80


class Opcode(IntEnum):
    EXTERNAL_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class Result(IntEnum):
    """Result codes (RFC 6886 §3.5)."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


class NatPmpMalformed(RemoteError):
    """A datagram that is not a valid answer to our request (dropped and counted)."""


class NatPmpRefused(RemoteError):
    """The gateway answered with a non-zero result code: it will not map this port."""

    def __init__(self, result: int) -> None:
        try:
            name = Result(result).name.lower().replace("_", " ")
        except ValueError:
            name = "unknown result code"
        super().__init__(f"NAT-PMP gateway refused: {name} ({result})")
        self.result = result


_ADDRESS_REPLY = struct.Struct("!BBHI4s")  # version, opcode, result, epoch, address
_MAP_REQUEST = struct.Struct("!BBHHHI")  # version, opcode, reserved, internal, suggested, life
_MAP_REPLY = struct.Struct("!BBHIHHI")  # version, opcode, result, epoch, internal, external, life
_ERROR_HEADER = struct.Struct("!BBHI")  # version, opcode, result, epoch: what every reply starts


@dataclass(frozen=True)
class AddressReply:
    epoch: int  # seconds since the gateway's mapping table was (re)started (RFC 6886 §3.6)
    external_ip: str


@dataclass(frozen=True)
class MapReply:
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int  # seconds; 0 in the answer to a deletion


def encode_address_request() -> bytes:
    """The public address request (RFC 6886 §3.2)."""
    return bytes((VERSION, Opcode.EXTERNAL_ADDRESS))


def encode_map_request(
    internal_port: int, suggested_external_port: int, lifetime: int, tcp: bool = False
) -> bytes:
    """A mapping request (RFC 6886 §3.3); lifetime 0 with suggested port 0 deletes it (§3.4)."""
    if not 1 <= internal_port <= 0xFFFF or not 0 <= suggested_external_port <= 0xFFFF:
        raise LocalError(f"NAT-PMP ports must be 1-65535 (got {internal_port})")
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise LocalError(f"NAT-PMP lifetime {lifetime} is out of range")
    opcode = Opcode.MAP_TCP if tcp else Opcode.MAP_UDP
    return _MAP_REQUEST.pack(VERSION, opcode, 0, internal_port, suggested_external_port, lifetime)


def decode_map_request_untrusted(data: bytes) -> tuple[int, int, int, bool]:
    """(internal port, suggested external port, lifetime, tcp) of a mapping request: the
    server's side, for tests and fakes that stand in for a gateway."""
    if len(data) != _MAP_REQUEST.size:
        raise NatPmpMalformed(f"NAT-PMP request of {len(data)} bytes, expected {_MAP_REQUEST.size}")
    version, opcode, _reserved, internal, suggested, lifetime = _MAP_REQUEST.unpack(data)
    if version != VERSION or opcode not in (Opcode.MAP_UDP, Opcode.MAP_TCP) or internal == 0:
        raise NatPmpMalformed(f"not a NAT-PMP mapping request (version {version}, opcode {opcode})")
    return internal, suggested, lifetime, opcode == Opcode.MAP_TCP


def encode_address_reply(epoch: int, external_ip: str, result: int = Result.SUCCESS) -> bytes:
    packed = ipaddress.IPv4Address(external_ip).packed
    opcode = RESPONSE_BIT | Opcode.EXTERNAL_ADDRESS
    return _ADDRESS_REPLY.pack(VERSION, opcode, result, epoch, packed)


def encode_map_reply(reply: MapReply, tcp: bool = False, result: int = Result.SUCCESS) -> bytes:
    opcode = RESPONSE_BIT | (Opcode.MAP_TCP if tcp else Opcode.MAP_UDP)
    return _MAP_REPLY.pack(VERSION, opcode, result, reply.epoch, reply.internal_port,
                           reply.external_port, reply.lifetime)  # fmt: skip


def _check_header(data: bytes, opcode: int, size: int) -> None:
    """Version, opcode and result first: a refusal may be shorter than the full answer."""
    if len(data) < _ERROR_HEADER.size:
        raise NatPmpMalformed(f"NAT-PMP reply of {len(data)} bytes is too short")
    version, got_opcode, result, _epoch = _ERROR_HEADER.unpack_from(data)
    if version != VERSION:
        raise NatPmpMalformed(f"NAT-PMP reply has version {version}, not {VERSION}")
    if got_opcode != RESPONSE_BIT | opcode:
        raise NatPmpMalformed(f"NAT-PMP reply has opcode {got_opcode}, not {RESPONSE_BIT | opcode}")
    if result != Result.SUCCESS:
        raise NatPmpRefused(result)
    if len(data) != size:
        raise NatPmpMalformed(f"NAT-PMP reply of {len(data)} bytes, expected {size}")


def decode_address_reply_untrusted(data: bytes) -> AddressReply:
    _check_header(data, Opcode.EXTERNAL_ADDRESS, _ADDRESS_REPLY.size)
    _version, _opcode, _result, epoch, packed = _ADDRESS_REPLY.unpack(data)
    return AddressReply(epoch, str(ipaddress.IPv4Address(packed)))


def decode_map_reply_untrusted(data: bytes, internal_port: int, tcp: bool = False) -> MapReply:
    """The answer to `encode_map_request(internal_port, ...)`; any other datagram raises."""
    _check_header(data, Opcode.MAP_TCP if tcp else Opcode.MAP_UDP, _MAP_REPLY.size)
    _v, _o, _r, epoch, internal, external, lifetime = _MAP_REPLY.unpack(data)
    if internal != internal_port:
        raise NatPmpMalformed(f"NAT-PMP reply is for port {internal}, not {internal_port}")
    if external == 0 and lifetime != 0:
        raise NatPmpMalformed("NAT-PMP reply maps to external port 0")
    return MapReply(epoch, internal, external, lifetime)
