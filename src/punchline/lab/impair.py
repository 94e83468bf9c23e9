"""Link impairment without netem: a userspace Ethernet forwarder between two interfaces.

This machine's kernel has no `netem` qdisc (only htb, tbf and fifo), so an impaired link is a
"shaper" namespace with two interfaces and this program in between: it reads every frame from
one side with a raw AF_PACKET socket and writes it to the other after the impairment, in both
directions. Being a plain L2 copy, ARP and everything else pass unchanged.

Per direction: `delay_ms` + uniform `jitter_ms` (which also reorders frames, as real jitter
does), `loss` (probability), and `rate_kbit` (a token bucket: frames wait their turn, and past
`queue_ms` of backlog they are dropped like a full router queue). Seeded, so runs repeat.

    python -m punchline.lab.impair --a wanA --b wanB --delay-ms 25 --jitter-ms 5 --loss 0.01
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import random
import select
import socket
import time
from dataclasses import dataclass

ETH_P_ALL = 0x0003
MAX_FRAME = 65536


@dataclass(frozen=True)
class Impairment:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    rate_kbit: float = 0.0  # 0: unlimited
    queue_ms: float = 200.0

    def args(self) -> list[str]:
        return ["--delay-ms", str(self.delay_ms), "--jitter-ms", str(self.jitter_ms),
                "--loss", str(self.loss), "--rate-kbit", str(self.rate_kbit),
                "--queue-ms", str(self.queue_ms)]  # fmt: skip


class Direction:
    """The pure part: when (if ever) a frame of `size` bytes arriving at `now` leaves."""

    def __init__(self, impairment: Impairment, rng: random.Random) -> None:
        self.imp = impairment
        self.rng = rng
        self.link_free_at = 0.0
        self.dropped = 0
        self.passed = 0

    def departure(self, size: int, now: float) -> float | None:
        if self.imp.loss and self.rng.random() < self.imp.loss:
            self.dropped += 1
            return None
        start = now
        if self.imp.rate_kbit > 0:
            start = max(now, self.link_free_at)
            if start - now > self.imp.queue_ms / 1000.0:
                self.dropped += 1  # the queue is full: tail drop
                return None
            self.link_free_at = start + size * 8 / (self.imp.rate_kbit * 1000.0)
        jitter = self.rng.uniform(0.0, self.imp.jitter_ms) if self.imp.jitter_ms else 0.0
        self.passed += 1
        return start + (self.imp.delay_ms + jitter) / 1000.0


def _raw(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((interface, ETH_P_ALL))  # protocol 0 here would receive nothing
    sock.setblocking(False)
    return sock


def forward(a: str, b: str, impairment: Impairment, seed: int) -> None:
    """Copy frames a <-> b with the impairment in each direction, until killed."""
    side_a, side_b = _raw(a), _raw(b)
    rng = random.Random(seed)  # noqa: S311 - a repeatable network model, not cryptography
    directions = {side_a.fileno(): (Direction(impairment, rng), side_b),
                  side_b.fileno(): (Direction(impairment, rng), side_a)}  # fmt: skip
    pending: list[tuple[float, int, bytes, socket.socket]] = []
    order = 0
    print(json.dumps({"ready": True, "method": "userspace AF_PACKET forwarder"}), flush=True)
    while True:
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _due, _n, frame, out = heapq.heappop(pending)
            with contextlib.suppress(OSError):  # a full or vanished interface drops it
                out.send(frame)
        timeout = max(0.0, pending[0][0] - now) if pending else 1.0
        readable, _, _ = select.select([side_a, side_b], [], [], timeout)
        for sock in readable:
            try:
                frame, address = sock.recvfrom(MAX_FRAME)
            except BlockingIOError:
                continue
            if address[2] == socket.PACKET_OUTGOING:
                continue  # our own transmission seen again on this side
            direction, out = directions[sock.fileno()]
            due = direction.departure(len(frame), time.monotonic())
            if due is not None:
                order += 1
                heapq.heappush(pending, (due, order, frame, out))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m punchline.lab.impair")
    parser.add_argument("--a", required=True)
    parser.add_argument("--b", required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--rate-kbit", type=float, default=0.0)
    parser.add_argument("--queue-ms", type=float, default=200.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    imp = Impairment(args.delay_ms, args.jitter_ms, args.loss, args.rate_kbit, args.queue_ms)
    forward(args.a, args.b, imp, args.seed)


if __name__ == "__main__":
    main()
