"""One PCP or NAT-PMP request to the gateway, as a sans-I/O core: bytes out, bytes in, time in.

Why a core: the retransmission schedule, the check that an answer really comes from the
gateway, and what counts as an answer are protocol logic; keeping them free of sockets and
clocks lets unit tests drive them with a fake clock and lets `portmap` stay a thin adapter.

Schedule: the request goes out at once and again after 250 ms, doubling each time (RFC 6886
§3.1; PCP's RFC 6887 §8.1.1 starts at 3 s, far past the short budget a daemon start gives
port mapping, so both protocols use NAT-PMP's quicker start), until the deadline. A datagram
that does not parse as the answer, or that comes from anywhere but the gateway's port 5351, is
dropped and counted in `drops`; a refusal or an "unsupported version" answer ends the exchange
with that error; so does an ICMP error (nothing listens on the gateway), which makes a router
without the service fail fast instead of at the deadline.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Generic, TypeVar

from punchline.connect.natpmp import NatPmpMalformed
from punchline.connect.pcp import PcpMalformed
from punchline.errors import PunchlineError, RemoteError

T = TypeVar("T")

FIRST_INTERVAL = 0.25
MALFORMED = (NatPmpMalformed, PcpMalformed)


class ExchangeTimeout(RemoteError):
    """The gateway did not answer before the deadline."""


class Unreachable(RemoteError):
    """The gateway's port answered with an ICMP error: nothing listens there."""


class Exchange(Generic[T]):
    """Send `request` to `gateway` until `parse` accepts an answer or the deadline passes."""

    def __init__(
        self,
        request: bytes,
        parse: Callable[[bytes], T],
        gateway: tuple[str, int],
        now: float,
        deadline: float,
        first_interval: float = FIRST_INTERVAL,
    ) -> None:
        self.request = request
        self._parse = parse
        self.gateway = gateway
        self.deadline = deadline
        self._next_send = now
        self._interval = first_interval
        self.result: T | None = None
        self.error: PunchlineError | None = None
        self.drops: Counter[str] = Counter()
        self.sent = 0

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def datagrams_to_send(self, now: float) -> list[bytes]:
        if self.done or now < self._next_send:
            return []
        self.sent += 1
        self._next_send = now + self._interval
        self._interval *= 2
        return [self.request]

    def receive(self, data: bytes, source: tuple[str, int], now: float) -> None:
        if self.done:
            return
        if source[:2] != self.gateway:
            self.drops["wrong_source"] += 1
            return
        try:
            self.result = self._parse(data)
        except MALFORMED:
            self.drops["malformed"] += 1
        except RemoteError as exc:  # a refusal or a version the gateway does not speak
            self.error = exc

    def unreachable(self, reason: str) -> None:
        if not self.done:
            self.error = Unreachable(f"{self.gateway[0]}:{self.gateway[1]}: {reason}")

    def next_timer(self) -> float:
        if self.done:
            return math.inf
        return min(self._next_send, self.deadline)

    def handle_timer(self, now: float) -> None:
        if not self.done and now >= self.deadline:
            self.error = ExchangeTimeout(
                f"no answer from {self.gateway[0]}:{self.gateway[1]} after {self.sent} tries"
            )
