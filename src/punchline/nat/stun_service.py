"""The asyncio side of `DiscoveryResponder`: a second UDP socket, the sends, the delay timer.

Why a separate adapter: a supernode's primary UDP socket also carries client sessions, so the
supernode's own loop hands STUN datagrams over (`answer`), while this service owns only what
is extra: the alternate socket (change-port answers, RFC 5780) and delayed answers (mapping
lifetime). Run as a program it is a standalone STUN server with the same behaviour, for the
NAT lab where whole supernodes would be heavier than the test needs:

    python -m punchline.nat.stun_service --listen 203.0.113.10:3478 [--peer HOST:PORT ...]

It prints one JSON line {"primary": [host, port], "alternate": [host, port]} once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Iterable

import structlog

from punchline.nat.stun_server import Arrival, DiscoveryResponder, Outgoing
from punchline.util import sockets
from punchline.util.parse import host_port

log = structlog.get_logger(component="stun")

Address = tuple[str, int]


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, service: StunService, arrival: Arrival) -> None:
        self.service, self.arrival = service, arrival

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.service.received(data, (addr[0], addr[1]), self.arrival)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error", error=str(exc))


class StunService:
    """Owns the alternate socket; sends what the responder produces, when it is due."""

    def __init__(self, responder: DiscoveryResponder | None = None) -> None:
        self.responder = responder or DiscoveryResponder()
        self._transports: dict[str, asyncio.DatagramTransport] = {}
        self._timer: asyncio.TimerHandle | None = None

    async def open(self, primary: asyncio.DatagramTransport, alternate_port: int = 0) -> None:
        """Serve alongside `primary` (whose owner passes its STUN datagrams to `answer`)."""
        self._transports["primary"] = primary
        host, port = primary.get_extra_info("sockname")[:2]
        self.responder.primary = (str(host), int(port))
        loop = asyncio.get_running_loop()
        sock = sockets.udp_socket(str(host), alternate_port)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Listener(self, "alternate"), sock=sock
        )
        self._transports["alternate"] = transport
        alt_host, alt_port = transport.get_extra_info("sockname")[:2]
        self.responder.alternate = (str(alt_host), int(alt_port))

    def set_peers(self, peers: Iterable[Address]) -> None:
        """Other supernodes' primary UDP addresses, for change-IP (from the bootstrap list)."""
        primary = self.responder.primary
        self.responder.peers = [p for p in peers if p != primary]

    def answer(self, data: bytes, source: Address, stream: bool = False) -> bytes | None:
        """For the supernode's loop: the reply to write back on a stream; for datagrams None,
        as everything the responder asks for is sent here, from whichever socket it names."""
        out = self.received(data, source, "stream" if stream else "primary")
        return out[0].data if out else None

    def received(self, data: bytes, source: Address, arrival: Arrival) -> list[Outgoing]:
        """Handle one datagram; returns the replies for `arrival` that the caller must send
        itself (only "stream" ones: datagrams are all sent here)."""
        back = []
        for item in self.responder.handle(data, source, arrival, time.time()):
            if item.via == "stream":
                back.append(item)
            else:
                self._send(item)
        self._arm()
        return back

    def _send(self, item: Outgoing) -> None:
        transport = self._transports.get(item.via)
        if transport is not None and not transport.is_closing():
            transport.sendto(item.data, item.to)

    def _arm(self) -> None:
        due = self.responder.next_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if due != float("inf"):
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, due - time.time()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        for item in self.responder.handle_timer(time.time()):
            self._send(item)
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        alternate = self._transports.pop("alternate", None)
        if alternate is not None:
            alternate.close()


async def serve(listen: Address, peers: list[Address], alternate_port: int = 0) -> None:
    """Standalone: a STUN server of our own on `listen`, until cancelled."""
    loop = asyncio.get_running_loop()
    service = StunService()
    primary, _ = await loop.create_datagram_endpoint(
        lambda: _Listener(service, "primary"), sock=sockets.udp_socket(*listen)
    )
    await service.open(primary, alternate_port)
    service.set_peers(peers)
    print(json.dumps({"primary": service.responder.primary,
                      "alternate": service.responder.alternate}), flush=True)  # fmt: skip
    try:
        await asyncio.Event().wait()
    finally:
        service.close()
        primary.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="A standalone punchline STUN server.")
    parser.add_argument("--listen", required=True, help="HOST:PORT of the primary socket")
    parser.add_argument("--alternate-port", type=int, default=0)
    parser.add_argument("--peer", action="append", default=[], help="another server, HOST:PORT")
    args = parser.parse_args()
    peers = [host_port(p) for p in args.peer]
    asyncio.run(serve(host_port(args.listen), peers, args.alternate_port))


if __name__ == "__main__":
    main()
