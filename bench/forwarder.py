"""Relay data-plane throughput on loopback: ChannelData packets forwarded per CPU second.

For each forwarder (the C one in threaded and in pump mode, and the pure-Python one) this binds
`--bindings` channels (one client socket and one relayed socket each, all to one peer socket
that is never read: the kernel drops what does not fit) and measures two things, client to
peer:

- live: `--senders` processes blast ChannelData of `--size` bytes into the relay's listening
  socket while this process runs the relay side as the server does: in threaded mode the
  forwarder's own thread reads the socket (the asyncio loop only watches its eventfd), in pump
  mode an asyncio reader calls `pump_client()`. CPU time is this process's, all threads (user
  + system), so the senders do not count; figures cover `--seconds` after a warm-up. A
  forwarder that keeps up wakes up for small batches, so this includes the cost per wake-up
  (the event loop's too in pump mode).
- drain: this process queues a round of datagrams, then times only the pumps that empty the
  socket: the forwarder's own cost per packet, with full batches (on loopback the receive path
  is charged to the sender in both measurements; the relay's sends are charged to the relay).

Prints a table, or one JSON object with --json.

    .venv/bin/python bench/forwarder.py [--seconds 3] [--bindings 8] [--senders 1] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from punchline.relay._fastpath import Forwarder as NativeForwarder
from punchline.relay.forwarder import Forwarder, PyForwarder, ThreadedForwarder

WARMUP_S = 0.5
FIRST_CHANNEL = 0x4000
DRAIN_ROUND = 2048  # datagrams queued per drain round; fits the 4 MiB receive buffer


def _udp(rcvbuf: int = 1 << 22) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


@dataclass
class Setup:
    listen: socket.socket
    flows: list[tuple[socket.socket, bytes]]  # client socket, the ChannelData it sends
    others: list[socket.socket]


@contextlib.contextmanager
def _setup(fwd: Forwarder, args: argparse.Namespace) -> Iterator[Setup]:
    listen, peer = _udp(), _udp(rcvbuf=4096)
    relays = [_udp() for _ in range(args.bindings)]
    clients = [_udp() for _ in range(args.bindings)]
    flows = []
    for i, (relay, client) in enumerate(zip(relays, clients, strict=True)):
        channel = FIRST_CHANNEL + i
        fwd.bind(listen.fileno(), client.getsockname(), channel, relay.fileno(), peer.getsockname())
        flows.append((client, struct.pack("!HH", channel, args.size) + bytes(args.size)))
    try:
        yield Setup(listen, flows, [peer, *relays, *clients])
    finally:
        fwd.unbind_relay(listen.fileno())
        for sock in [listen, peer, *relays, *clients]:
            sock.close()


def _blast(flows: list[tuple[socket.socket, bytes]], target: tuple[str, int], until: float) -> None:
    """A sender process: round-robin over its flows until `until` (monotonic)."""
    while time.monotonic() < until:
        for sock, message in flows:
            with contextlib.suppress(BlockingIOError):  # the socket buffer is full: go on
                sock.sendto(message, target)


def _live(fwd: Forwarder, args: argparse.Namespace, threaded: bool = False) -> dict[str, Any]:
    with _setup(fwd, args) as setup:
        until = time.monotonic() + WARMUP_S + args.seconds + 0.5
        context = multiprocessing.get_context("fork")  # the senders inherit the client sockets
        target = setup.listen.getsockname()
        senders = [
            context.Process(target=_blast, args=(setup.flows[k :: args.senders], target, until))
            for k in range(args.senders)
        ]
        for sender in senders:
            sender.start()
        try:
            if threaded:
                assert isinstance(fwd, NativeForwarder)
                return asyncio.run(_threaded_side(fwd, setup.listen.fileno(), args.seconds))
            return asyncio.run(_relay_side(fwd, setup.listen.fileno(), args.seconds))
        finally:
            for sender in senders:
                sender.join()


async def _relay_side(fwd: Forwarder, fd: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    calls = 0

    def readable() -> None:
        nonlocal calls
        calls += 1
        fwd.pump_client(fd)

    loop.add_reader(fd, readable)
    try:
        await asyncio.sleep(WARMUP_S)
        before, calls0 = fwd.counters(), calls
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        after, calls1 = fwd.counters(), calls
        cpu1, wall1 = time.process_time(), time.monotonic()
    finally:
        loop.remove_reader(fd)
    packets = after["fast_to_peer_packets"] - before["fast_to_peer_packets"]
    return {
        "packets_per_cpu_s": round(packets / (cpu1 - cpu0)),
        "packets_per_s": round(packets / (wall1 - wall0)),
        "cpu_share": round((cpu1 - cpu0) / (wall1 - wall0), 2),
        "packets_per_pump": round(packets / max(1, calls1 - calls0), 1),
        "slow_packets": after["slow_packets"] - before["slow_packets"],
        "send_errors": after["send_errors"] - before["send_errors"],
    }


async def _threaded_side(fwd: ThreadedForwarder, fd: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    notify = fwd.notify_fd()
    loop.add_reader(notify, fwd.drain)
    fwd.watch(fd, "client")
    fwd.start()
    try:
        await asyncio.sleep(WARMUP_S)
        before = fwd.counters()
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        after = fwd.counters()
        cpu1, wall1 = time.process_time(), time.monotonic()
    finally:
        fwd.stop()
        fwd.unwatch(fd)
        loop.remove_reader(notify)
    packets = after["fast_to_peer_packets"] - before["fast_to_peer_packets"]
    return {
        "packets_per_cpu_s": round(packets / (cpu1 - cpu0)),
        "packets_per_s": round(packets / (wall1 - wall0)),
        "cpu_share": round((cpu1 - cpu0) / (wall1 - wall0), 2),
        "packets_per_pump": "-",
        "slow_packets": after["slow_packets"] - before["slow_packets"],
        "send_errors": after["send_errors"] - before["send_errors"],
    }


def _drain(fwd: Forwarder, args: argparse.Namespace) -> dict[str, Any]:
    def forwarded() -> int:
        return fwd.counters()["fast_to_peer_packets"]

    with _setup(fwd, args) as setup:
        target, fd = setup.listen.getsockname(), setup.listen.fileno()
        packets, cpu = 0, 0.0
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            for _ in range(DRAIN_ROUND // len(setup.flows)):
                for sock, message in setup.flows:
                    sock.sendto(message, target)
            start, cpu0 = forwarded(), time.process_time()
            while True:  # until a pump finds nothing
                before = forwarded()
                fwd.pump_client(fd)
                if forwarded() == before:
                    break
            cpu += time.process_time() - cpu0
            packets += forwarded() - start
    return {"packets_per_cpu_s": round(packets / cpu), "packets": packets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--bindings", type=int, default=8)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--size", type=int, default=160, help="payload bytes per packet")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.senders = max(1, min(args.senders, args.bindings))
    makers: dict[str, Callable[[], Forwarder]] = {"native": NativeForwarder, "python": PyForwarder}
    results: dict[str, Any] = {
        name: {"live": _live(make(), args), "drain": _drain(make(), args)}
        for name, make in makers.items()
    }
    results["threaded"] = {"live": _live(NativeForwarder(), args, threaded=True), "drain": None}
    for mode in ("live", "drain"):
        native = results["native"][mode]["packets_per_cpu_s"]
        results[f"{mode}_speedup"] = round(native / results["python"][mode]["packets_per_cpu_s"], 1)
    threaded = results["threaded"]["live"]["packets_per_cpu_s"]
    results["threaded_speedup"] = round(
        threaded / results["python"]["live"]["packets_per_cpu_s"], 1
    )
    results["payload_bytes"] = args.size
    if args.json:
        print(json.dumps(results))
        return
    rows = [
        ("live", "packets_per_cpu_s"),
        ("live", "packets_per_s"),
        ("live", "cpu_share"),
        ("live", "packets_per_pump"),
        ("live", "send_errors"),
        ("drain", "packets_per_cpu_s"),
    ]
    print(f"{'':<24}  {'threaded':>10}  {'native':>10}  {'python':>10}")
    for mode, row in rows:
        threaded_cell = results["threaded"][mode][row] if results["threaded"][mode] else "-"
        native, python = results["native"][mode][row], results["python"][mode][row]
        print(f"{mode + ' ' + row:<24}  {threaded_cell!s:>10}  {native!s:>10}  {python!s:>10}")
    print(
        f"native/python per CPU second: live {results['live_speedup']}x (threaded "
        f"{results['threaded_speedup']}x), drain {results['drain_speedup']}x "
        f"({args.size}-byte payloads; threaded = the native forwarder's own thread, "
        "native = its pumps)"
    )


if __name__ == "__main__":
    main()
