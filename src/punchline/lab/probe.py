"""Probe programs run inside lab namespaces (`python -m punchline.lab.probe ...`).

- `echo`: on a public host, answers every UDP datagram with the address it came from
  (a minimal STUN-like reflector) and accepts TCP connections, so a LAN host can learn its
  mapped address and which ports reach out.
- `send`: a one-shot unsolicited datagram from a given port, for filtering tests.
- `client`: on a LAN host, runs the measurements of RFC 5780 §4: mapping behaviour (same
  external address for two destinations?), port allocation, UDP and TCP reachability; for the
  filtering test it prints its mapped address, waits while the orchestrator has other hosts
  send to it, and reports what got through. Output: JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import base64
import json
import select
import socket
import sys
import threading
import time
from typing import Any

ECHO_PORTS = (3478, 3479)
TCP_PORTS = (80, 443, 8080)


def _echo(ports: list[int], tcp_ports: list[int]) -> None:
    sockets = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # `send` pokes from it too
        sock.bind(("0.0.0.0", port))  # noqa: S104 - inside a lab namespace
        sockets.append(sock)
    for port in tcp_ports:
        threading.Thread(target=_tcp_accept, args=(port,), daemon=True).start()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        readable, _, _ = select.select(sockets, [], [])
        for sock in readable:
            data, addr = sock.recvfrom(2048)
            try:
                request = json.loads(data)
            except ValueError:
                continue
            reply = {"id": request.get("id"), "seen": [addr[0], addr[1]]}
            sock.sendto(json.dumps(reply).encode(), addr)


def _tcp_accept(port: int) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))  # noqa: S104 - inside a lab namespace
    server.listen(16)
    while True:
        conn, _ = server.accept()
        conn.sendall(b"ok\n")
        conn.close()


def _send(target: str, port: int, from_port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", from_port))  # noqa: S104 - inside a lab namespace (0: any port)
    for _ in range(3):
        sock.sendto(b'{"poke": true}', (target, port))
        time.sleep(0.05)


def _ask(sock: socket.socket, server: tuple[str, int], tries: int = 3) -> tuple[str, int] | None:
    for attempt in range(tries):
        sock.sendto(json.dumps({"id": attempt}).encode(), server)
        sock.settimeout(0.5)
        try:
            while True:
                data, addr = sock.recvfrom(2048)
                if addr == server:
                    seen = json.loads(data)["seen"]
                    return str(seen[0]), int(seen[1])
        except TimeoutError:
            continue
    return None


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))  # noqa: S104 - inside a lab namespace
    return sock


def _tcp_reaches(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as conn:
            return conn.recv(3) == b"ok\n"
    except OSError:
        return False


def _through_proxy(proxy: str, auth: str | None, host: str, port: int) -> bool:
    """HTTP CONNECT (RFC 9110 §9.3.6) to host:port through the proxy, then read our echo."""
    proxy_host, proxy_port = proxy.rsplit(":", 1)
    request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if auth:
        token = base64.b64encode(auth.encode()).decode()
        request += f"Proxy-Authorization: Basic {token}\r\n"
    try:
        with socket.create_connection((proxy_host, int(proxy_port)), timeout=3.0) as conn:
            conn.sendall((request + "\r\n").encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(1024)
                if not chunk:
                    return False
                head += chunk
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                return False
            rest = head.split(b"\r\n\r\n", 1)[1]
            while len(rest) < 3:
                chunk = conn.recv(16)
                if not chunk:
                    break
                rest += chunk
            return rest.startswith(b"ok\n")
    except OSError:
        return False


def _listen(p1: str, seconds: float) -> None:
    """Open a mapping towards P1, show it, and report every datagram that reaches it."""
    sock = _udp()
    print(json.dumps({"listen_ready": _ask(sock, (p1, ECHO_PORTS[0]))}), flush=True)
    print(json.dumps({"result": {"from": _collect(sock, seconds)}}), flush=True)


def _collect(sock: socket.socket, seconds: float) -> list[str]:
    """Sources of every poke that reaches `sock` within `seconds`."""
    got = []
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            data, addr = sock.recvfrom(2048)
        except TimeoutError:
            continue
        if b"poke" in data:
            got.append(f"{addr[0]}:{addr[1]}")
    return got


def _rtt(target: str, count: int, timeout: float = 0.5) -> None:
    """Round trips to an echo server, one at a time: median, minimum, lost (no answer within
    `timeout` seconds; a short one keeps a lossy link's measurement quick)."""
    sock = _udp()
    sock.settimeout(timeout)
    rtts, lost = [], 0
    for number in range(count):
        started = time.monotonic()
        sock.sendto(json.dumps({"id": number}).encode(), (target, ECHO_PORTS[0]))
        try:
            while json.loads(sock.recvfrom(2048)[0]).get("id") != number:
                pass
            rtts.append((time.monotonic() - started) * 1000)
        except TimeoutError:
            lost += 1
    rtts.sort()
    median = rtts[len(rtts) // 2] if rtts else None
    print(json.dumps({"p50_ms": median, "min_ms": rtts[0] if rtts else None, "lost": lost,
                      "count": count}), flush=True)  # fmt: skip


def _lifetimes(p1: str, waits: list[float]) -> None:
    """Open one mapping per wait; the orchestrator answers each after its wait; report which
    answers still got in (the mapping was alive) to bound the idle mapping lifetime."""
    sockets = [_udp() for _ in waits]
    mapped = [_ask(sock, (p1, ECHO_PORTS[0])) for sock in sockets]
    print(json.dumps({"lifetime_ready": mapped}), flush=True)
    alive: dict[str, bool] = {str(w): False for w in waits}
    deadline = time.monotonic() + max(waits) + 1.5
    for sock in sockets:
        sock.setblocking(False)
    while time.monotonic() < deadline:
        readable, _, _ = select.select(sockets, [], [], 0.1)
        for sock in readable:
            data, _addr = sock.recvfrom(2048)
            if b"poke" in data:
                alive[str(waits[sockets.index(sock)])] = True
    print(json.dumps({"result": {"alive_after": alive}}), flush=True)


def _client(p1: str, p2: str, wait: float, proxy: str | None, proxy_auth: str | None) -> None:
    main = _udp()
    result: dict[str, Any] = {"local_port": main.getsockname()[1]}
    result["p1"] = _ask(main, (p1, ECHO_PORTS[0]))
    result["udp"] = result["p1"] is not None
    if result["udp"]:
        result["p2"] = _ask(main, (p2, ECHO_PORTS[0]))
        result["p1_other_port"] = _ask(main, (p1, ECHO_PORTS[1]))
        allocations = []
        for _ in range(4):
            sock = _udp()
            seen = _ask(sock, (p1, ECHO_PORTS[0]))
            allocations.append([sock.getsockname()[1], seen[1] if seen else None])
            sock.close()
        result["allocations"] = allocations
        filtered = _udp()
        mapped = _ask(filtered, (p1, ECHO_PORTS[0]))
        print(json.dumps({"filtering_ready": mapped}), flush=True)
        sys.stdin.readline()  # the orchestrator says when the pokes are sent
        result["unsolicited_from"] = sorted(set(_collect(filtered, wait)))
    result["tcp"] = {str(port): _tcp_reaches(p1, port) for port in TCP_PORTS}
    if proxy:
        result["proxy"] = _through_proxy(proxy, proxy_auth, p1, 443)
        result["proxy_without_auth"] = _through_proxy(proxy, None, p1, 443) if proxy_auth else None
    print(json.dumps({"result": result}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m punchline.lab.probe")
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo")
    echo.add_argument("--port", type=int, action="append", default=[])
    echo.add_argument("--tcp-port", type=int, action="append", default=[])
    send = sub.add_parser("send")
    send.add_argument("--to", required=True)
    send.add_argument("--port", type=int, required=True)
    send.add_argument("--from-port", type=int, required=True)
    client = sub.add_parser("client")
    client.add_argument("--p1", required=True)
    client.add_argument("--p2", required=True)
    client.add_argument("--wait", type=float, default=1.0)
    client.add_argument("--proxy", help="HOST:PORT of an HTTP CONNECT proxy to try")
    client.add_argument("--proxy-auth", help="USER:PASSWORD for the proxy")
    rtt = sub.add_parser("rtt")
    rtt.add_argument("--to", required=True)
    rtt.add_argument("--count", type=int, default=50)
    rtt.add_argument("--timeout", type=float, default=0.5, help="seconds before a probe is lost")
    listen = sub.add_parser("listen")
    listen.add_argument("--p1", required=True)
    listen.add_argument("--seconds", type=float, default=2.0)
    lifetimes = sub.add_parser("lifetimes")
    lifetimes.add_argument("--p1", required=True)
    lifetimes.add_argument("--wait", type=float, action="append", required=True)
    args = parser.parse_args()
    if args.command == "echo":
        _echo(args.port or list(ECHO_PORTS), args.tcp_port or list(TCP_PORTS))
    elif args.command == "send":
        _send(args.to, args.port, args.from_port)
    elif args.command == "rtt":
        _rtt(args.to, args.count, args.timeout)
    elif args.command == "listen":
        _listen(args.p1, args.seconds)
    elif args.command == "lifetimes":
        _lifetimes(args.p1, args.wait)
    else:
        _client(args.p1, args.p2, args.wait, args.proxy, args.proxy_auth)


if __name__ == "__main__":
    main()
