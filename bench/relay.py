"""Relay throughput: our relay and coturn under the same TURN load, one after the other.

Load: coturn's `turnutils_uclient` (C, so the load generator is not the bottleneck) with N
concurrent sessions of voice-like traffic (160-byte datagrams every 20 ms each way, over
channels), bounced off `turnutils_peer`, against each server in turn with REST API
credentials. For each server and N it reports what uclient lost, its average round trip, the
server's CPU time (from /proc) and so relayed packets per CPU second, and the server's memory
growth per allocation. A final row per server sends back to back (`-z 0`) for saturation.

    .venv/bin/python bench/relay.py [--sessions 25,50,100] [--messages 250] [--json]

First cut (issue 5 asks for more): no p50/p99 latency (uclient prints only its average),
and the session count is a fixed list rather than a search for the 0.1 % loss knee.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from punchline.lab.loopback import Network
from punchline.relay.credentials import SECRET_FILE


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


def _measure(pid: int, port: int, secret: str, peer_port: int, args: argparse.Namespace,
             sessions: int, interval_ms: int) -> dict[str, Any]:  # fmt: skip
    cpu0, rss0, t0 = _cpu(pid), _rss(pid), time.monotonic()
    # back to back, the voice-rate message count would be over in milliseconds: send more
    messages = args.messages * (1 if interval_ms else 20)
    row = _load(port, secret, peer_port, sessions, messages, interval_ms)
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


def _ours(root: Path, args: argparse.Namespace, peer_port: int) -> list[dict[str, Any]]:
    net = Network(root / "ours")
    try:
        net.start_auth()
        relay = net.start_relay(*(["--python-forwarder"] if args.python else []),
                                "--user-allocations", "100000")  # fmt: skip
        secret = (net.root / "auth" / SECRET_FILE).read_text().strip()
        return [_measure(relay.process.pid, relay.udp_port, secret, peer_port, args, n, 20)
                for n in args.sessions] + [
            _measure(relay.process.pid, relay.udp_port, secret, peer_port, args,
                     args.sessions[0], 0)]  # fmt: skip
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
        return [_measure(process.pid, port, secret, peer_port, args, n, 20)
                for n in args.sessions] + [
            _measure(process.pid, port, secret, peer_port, args, args.sessions[0], 0)]  # fmt: skip
    finally:
        process.terminate()
        process.wait(10)


WIDTHS = (8, 6, 7, 7, 6, 10, 9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="25,50,100",
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
        for o, t in zip(ours, theirs, strict=True)
    ]  # fmt: skip
    result = {"ours": ours, "coturn": theirs, "ratio_packets_per_cpu_s": ratios}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'server':8} {'sessions':>8} {'gap ms':>6} {'loss %':>7} {'rtt ms':>7} "
          f"{'cpu s':>6} {'pkts/cpu-s':>10} {'KiB/alloc':>9}")  # fmt: skip
    for name, rows in (("ours", ours), ("coturn", theirs)):
        for r in rows:
            rate, growth = r["packets_per_cpu_s"] or 0, r["rss_growth_kib_per_allocation"]
            cells = (r["sessions"], r["interval_ms"], r["loss_pct"], f"{r['rtt_ms'] or 0:.2f}",
                     r["server_cpu_s"], rate, growth)  # fmt: skip
            print(f"{name:8} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS, strict=True)))
    print("ours/coturn packets per CPU second:", ratios)


if __name__ == "__main__":
    main()
