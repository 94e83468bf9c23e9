"""Relay throughput: our relay and coturn under the same TURN load, one after the other.

Load: coturn's `turnutils_uclient` (C, so the load generator is not the bottleneck) with N
concurrent sessions of voice-like traffic (160-byte datagrams every 20 ms each way, over
channels), bounced off `turnutils_peer`, against each server in turn with REST API
credentials. For each server and N it reports what uclient lost, its average round trip, the
server's CPU time (from /proc) and so relayed packets per CPU second, and the server's memory
growth per allocation. A final row per server sends back to back (`-z 0`) for saturation.

    .venv/bin/python bench/relay.py [--sessions 25,50,100] [--messages 250] [--json]

Latency: while uclient loads the server, a probe (our TURN client, one more session) sends a
timestamped 160-byte datagram every 20 ms through the relay to the echo peer and back; the
added latency is its round trip minus the direct round trip to the same echo peer (p50/p99).
Sessions go up the list until loss passes 0.1 %; the last count below is "held".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from punchline.lab.loopback import Network
from punchline.relay import credentials
from punchline.relay.connection import RelayServer, open_turn


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _load(port: int, secret: str, peer_port: int, sessions: int, messages: int,
          interval_ms: int) -> dict[str, Any]:  # fmt: skip
    argv = ["turnutils_uclient", "-W", secret, "-u", "bench", "-e", "127.0.0.1",
            "-r", str(peer_port), "-p", str(port), "-n", str(messages), "-l", "160",
            "-m", str(sessions), "-z", str(interval_ms), "-c", "127.0.0.1"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    text = done.stdout + done.stderr
    lost = re.search(r"Total lost packets (\d+)", text)
    rtt = re.search(r"Average round trip delay ([\d.]+) ms", text)
    sent = sessions * messages
    return {
        "sessions": sessions,
        "sent": sent,
        "lost": int(lost.group(1)) if lost else sent,
        "rtt_ms": float(rtt.group(1)) if rtt else None,
        "ok": lost is not None,
    }


async def _rtts(send: Any, replies: asyncio.Queue[bytes], count: int) -> list[float]:
    out = []
    for _ in range(count):
        stamp = struct.pack("!d", time.perf_counter()) + bytes(152)
        send(stamp)
        try:
            while True:
                data = await asyncio.wait_for(replies.get(), 1.0)
                if data == stamp:
                    out.append((time.perf_counter() - struct.unpack("!d", data[:8])[0]) * 1000)
                    break
        except TimeoutError:
            pass
        await asyncio.sleep(0.02)
    return out


async def _probe_async(port: int, secret: str, peer_port: int, count: int) -> dict[str, Any]:
    """Round trips through the relay and straight to the echo peer, in milliseconds."""
    loop = asyncio.get_running_loop()
    peer = ("127.0.0.1", peer_port)
    relayed: asyncio.Queue[bytes] = asyncio.Queue()
    creds = credentials.issue(secret, "probe", time.time(), 3600)
    conn = await open_turn(RelayServer("udp", "127.0.0.1", port), creds.username,
                           creds.password, on_data=lambda d, _p: relayed.put_nowait(d))  # fmt: skip
    conn.add_peer(peer)
    await asyncio.sleep(0.2)
    via = await _rtts(lambda d: conn.send(d, peer), relayed, count)
    await conn.close()
    direct_q: asyncio.Queue[bytes] = asyncio.Queue()

    class Echo(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
            direct_q.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    direct = await _rtts(lambda d: transport.sendto(d, peer), direct_q, count)
    transport.close()
    base = statistics.median(direct) if direct else 0.0
    added = sorted(max(0.0, v - base) for v in via)
    if not added:
        return {"added_p50_ms": None, "added_p99_ms": None, "probe_lost": count}
    return {
        "added_p50_ms": round(added[len(added) // 2], 3),
        "added_p99_ms": round(added[min(len(added) - 1, int(len(added) * 0.99))], 3),
        "probe_lost": count - len(via),
    }


class _Probe(threading.Thread):
    def __init__(self, port: int, secret: str, peer_port: int, count: int) -> None:
        super().__init__(daemon=True)
        self.args = (port, secret, peer_port, count)
        self.result: dict[str, Any] = {}

    def run(self) -> None:
        try:
            self.result = asyncio.run(_probe_async(*self.args))
        except Exception as exc:  # a failed probe is a figure too, not a crash
            self.result = {"probe_error": str(exc)}


def _measure(pid: int, port: int, secret: str, peer_port: int, args: argparse.Namespace,
             sessions: int, interval_ms: int) -> dict[str, Any]:  # fmt: skip
    cpu0, rss0, t0 = _cpu(pid), _rss(pid), time.monotonic()
    # back to back, the voice-rate message count would be over in milliseconds: send more
    messages = args.messages * (1 if interval_ms else 20)
    probe = _Probe(port, secret, peer_port, max(10, messages * interval_ms // 25))
    if interval_ms:
        probe.start()
    row = _load(port, secret, peer_port, sessions, messages, interval_ms)
    if interval_ms:
        probe.join()
        row.update(probe.result)
    cpu = _cpu(pid) - cpu0
    relayed = 2 * (row["sent"] - row["lost"])  # each echo crosses the relay twice
    row.update(
        interval_ms=interval_ms,
        wall_s=round(time.monotonic() - t0, 2),
        server_cpu_s=round(cpu, 3),
        packets_per_cpu_s=round(relayed / cpu) if cpu > 0 else None,
        loss_pct=round(100.0 * row["lost"] / max(1, row["sent"]), 3),
        rss_growth_kib_per_allocation=round((_rss(pid) - rss0) / 1024 / sessions, 1),
    )
    return row


def _series(
    pid: int, port: int, secret: str, peer_port: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Voice-rate rows up the session list until loss passes 0.1 %, then a back-to-back row."""
    rows = []
    for sessions in args.sessions:
        rows.append(_measure(pid, port, secret, peer_port, args, sessions, 20))
        if rows[-1]["loss_pct"] > LOSS_LIMIT_PCT:
            break
    rows.append(_measure(pid, port, secret, peer_port, args, args.sessions[0], 0))
    return rows


def _held(rows: list[dict[str, Any]]) -> int:
    voice = [r for r in rows if r["interval_ms"] and r["loss_pct"] <= LOSS_LIMIT_PCT]
    return max((r["sessions"] for r in voice), default=0)


def _ours(root: Path, args: argparse.Namespace, peer_port: int) -> list[dict[str, Any]]:
    net = Network(root / "ours")
    try:
        net.start_auth()
        relay = net.start_relay(*(["--python-forwarder"] if args.python else []),
                                "--user-allocations", "100000")  # fmt: skip
        secret = (net.root / "auth" / credentials.SECRET_FILE).read_text().strip()
        return _series(relay.process.pid, relay.udp_port, secret, peer_port, args)
    finally:
        net.stop()


def _coturn(root: Path, args: argparse.Namespace, peer_port: int) -> list[dict[str, Any]]:
    secret = "bench-secret-0123456789abcdef"  # noqa: S105 - a throw-away local server
    port = _free_port()
    argv = ["turnserver", "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
            f"--listening-port={port}", "--no-dtls", "--no-tls", "--no-cli",
            f"--pidfile={root / 'turnserver.pid'}", f"--db={root / 'turndb'}",
            "--log-file=stdout", "--simple-log", "--use-auth-secret",
            f"--static-auth-secret={secret}", "--realm=bench", "--allow-loopback-peers",
            "--no-stdout-log"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        return _series(process.pid, port, secret, peer_port, args)
    finally:
        process.terminate()
        process.wait(10)


WIDTHS = (8, 6, 7, 7, 6, 10, 9, 8, 8)
LOSS_LIMIT_PCT = 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="50,100,200,400,800",
                        type=lambda s: [int(x) for x in s.split(",")])  # fmt: skip
    parser.add_argument("--messages", type=int, default=250)
    parser.add_argument("--python", action="store_true", help="our relay without the C path")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for tool in ("turnutils_uclient", "turnutils_peer", "turnserver"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: install Debian's coturn (tools/run does)")
    peer_port = _free_port()
    peer = subprocess.Popen(["turnutils_peer", "-L", "127.0.0.1", "-p", str(peer_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ours = _ours(Path(tmp), args, peer_port)
            theirs = _coturn(Path(tmp), args, peer_port)
    finally:
        peer.kill()
    ratios = [
        round(o["packets_per_cpu_s"] / t["packets_per_cpu_s"], 2)
        if o["packets_per_cpu_s"] and t["packets_per_cpu_s"] else None
        for o, t in zip(ours, theirs, strict=False)
    ]  # fmt: skip
    result = {
        "ours": ours,
        "coturn": theirs,
        "ratio_packets_per_cpu_s": ratios,
        "sessions_held": {"ours": _held(ours), "coturn": _held(theirs)},
    }
    if args.json:
        print(json.dumps(result))
        return
    heads = ("sessions", "gap ms", "loss %", "rtt ms", "cpu s", "pkts/cpu-s", "KiB/alloc",
             "+p50 ms", "+p99 ms")  # fmt: skip
    print(f"{'server':8} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, WIDTHS, strict=True)))
    for name, rows in (("ours", ours), ("coturn", theirs)):
        for r in rows:
            rate, growth = r["packets_per_cpu_s"] or 0, r["rss_growth_kib_per_allocation"]
            cells = (r["sessions"], r["interval_ms"], r["loss_pct"], f"{r['rtt_ms'] or 0:.2f}",
                     r["server_cpu_s"], rate, growth, r.get("added_p50_ms", "-"),
                     r.get("added_p99_ms", "-"))  # fmt: skip
            print(f"{name:8} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS, strict=True)))
    print("ours/coturn packets per CPU second:", ratios)
    print("sessions held at voice rate with loss <= 0.1 %:", result["sessions_held"])


if __name__ == "__main__":
    main()
